package sidecar

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/meshd/meshd/sidecar/h1"
)

// fastServer serves a proxy listener's plain HTTP/1.1 traffic itself and
// hands every other connection to net/http.
//
// net/http's server parses each request into a general-purpose structure and
// runs a background read per request; for a proxy that only forwards, that
// is a large share of the CPU per request. fastServer reads the request head
// from the connection's buffer, builds the *http.Request forward needs and
// writes the response directly. Anything it does not handle itself (an h2c
// preface, CONNECT, upgrades, Expect, TE, HTTP/1.0, a head it cannot parse or
// one over the size limit) is handed to net/http together with the bytes
// already read, so those requests get exactly net/http's behaviour,
// including its 400 and 431 answers.
//
// One difference remains: net/http notices a client that disconnects while
// its request waits on the upstream; the fast path notices when it writes
// the response. Waits are bounded by the upstream's timeouts.
type fastServer struct {
	s       *Sidecar
	l       *listener
	handler http.Handler
	handoff *handoffListener
	eng     *engine // the Sidecar's event loops; nil: every connection gets a goroutine

	mu      sync.Mutex
	conns   map[*fastConn]struct{}
	closing atomic.Bool
	dropAll atomic.Bool // closeAll has begun: a connection arriving now is closed
	wg      sync.WaitGroup
	served  chan struct{} // closed when the accept loop ends
}

// fastConn states.
const (
	connIdle int32 = iota
	connActive
	connClosed
)

type fastConn struct {
	nc     net.Conn
	state  atomic.Int32
	remote string
	ctx    context.Context
	cancel context.CancelFunc
	// rdl is the read deadline set on nc. The serving goroutine owns it,
	// except while a client watch reads (see clientWatch).
	rdl time.Time
	// foreignDeadline is set when a handler set a read deadline through
	// http.ResponseController (to abort a stalled request body): rdl no
	// longer holds, so the connection closes after the request.
	foreignDeadline atomic.Bool
	// For a connection the event loop handed over: first is the request
	// it had begun (nil when the loop handed over bytes to parse), and
	// back, when set, returns the connection to the loop once it is idle
	// with nothing buffered.
	first *started
	req   *http.Request
	back  func(net.Conn) bool
	// tw is nc as the response writer sees it: writes bounded by the
	// write timeout.
	tw timedWriter
}

// setReadDeadline sets nc's read deadline unless it is already t.
func (c *fastConn) setReadDeadline(t time.Time) {
	if !t.Equal(c.rdl) {
		c.rdl = t
		c.nc.SetReadDeadline(t)
	}
}

// readWithin bounds the next reads to d from now. A deadline already set
// that falls no more than d/16 short of that is kept: re-arming the
// connection's timer for every request costs more than the precision is
// worth, so an idle connection may close up to d/16 early.
func (c *fastConn) readWithin(d time.Duration) {
	want := time.Now().Add(d)
	if !c.rdl.IsZero() && !c.rdl.After(want) && want.Sub(c.rdl) < d/16 {
		return
	}
	c.setReadDeadline(want)
}

// headBuffered reports whether br holds a whole request head, so that
// parsing it reads nothing from the connection.
func headBuffered(br *bufio.Reader) bool {
	b, _ := br.Peek(br.Buffered())
	return bytes.Contains(b, headEndCRLF) || bytes.Contains(b, headEndLF)
}

// The empty line that ends a head, after the last field's line feed.
var (
	headEndCRLF = []byte("\n\r\n")
	headEndLF   = []byte("\n\n")
)

func newFastServer(s *Sidecar, l *listener, h http.Handler) *fastServer {
	return &fastServer{
		s: s, l: l, handler: h,
		handoff: newHandoffListener(l.ln.Addr()),
		conns:   map[*fastConn]struct{}{},
		served:  make(chan struct{}),
	}
}

// serve accepts until the listener closes. net/http serves the connections
// handed to it on the side.
func (f *fastServer) serve() error {
	defer close(f.served)
	go f.l.srv.Serve(f.handoff)
	var delay time.Duration
	for {
		nc, err := f.l.ln.Accept()
		if err != nil {
			if f.closing.Load() || errors.Is(err, net.ErrClosed) {
				return http.ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		if f.eng != nil && f.eng.adopt(nc, f, 0) {
			nc.Close()
			continue
		}
		c := &fastConn{nc: nc, remote: nc.RemoteAddr().String()}
		c.ctx, c.cancel = context.WithCancel(context.Background())
		f.mu.Lock()
		if f.closing.Load() {
			f.mu.Unlock()
			nc.Close()
			continue
		}
		f.conns[c] = struct{}{}
		f.wg.Add(1)
		f.mu.Unlock()
		go f.serveConn(c)
	}
}

var (
	fastReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4<<10) }}
	fastWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 8<<10) }}
)

func (f *fastServer) forget(c *fastConn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
	c.cancel()
	f.wg.Done()
}

func (f *fastServer) serveConn(c *fastConn) {
	br := fastReaders.Get().(*bufio.Reader)
	br.Reset(c.nc)
	bw := fastWriters.Get().(*bufio.Writer)
	c.tw.c, c.tw.wt.s = c.nc, f.s
	bw.Reset(&c.tw)
	handedOff := false
	defer func() {
		if !handedOff {
			if c.tw.wt.timedOut.Load() {
				resetOnClose(c.nc)
			}
			c.nc.Close()
		}
		br.Reset(nil)
		fastReaders.Put(br)
		bw.Reset(nil)
		fastWriters.Put(bw)
		f.forget(c)
	}()
	w := &fastWriter{bw: bw, fc: c, closing: &f.closing}
	watch := newClientWatch(c)
	// Requests are copies of base, which carries the connection's context;
	// building them so spares the copy WithContext would make per request.
	base := (&http.Request{}).WithContext(c.ctx)
	defer watch.timer.Stop()
	var raw []byte
	for {
		cfg := f.s.cfg.Load()
		if c.back != nil && c.req == nil && br.Buffered() == 0 && c.nc.(*replayConn).drained() && c.state.CompareAndSwap(connIdle, connClosed) {
			// Idle again: back to the event loop, which takes a
			// descriptor of its own; this one closes.
			if c.back(c.nc) {
				return
			}
			c.back = nil // the loop would not have it: serve on here
			c.state.Store(connIdle)
		}
		var (
			req *http.Request
			st  *started
		)
		if c.req != nil {
			// The event loop's request, parsed already; the connection
			// was handed over active.
			req, st = c.req.WithContext(c.ctx), c.first
			c.req, c.first = nil, nil
			if c.state.Load() != connActive {
				// Dropped by a shutdown before it got here.
				if st != nil {
					st.abandon(f.s, req)
				}
				return
			}
		} else {
			// Wait for the next request as an idle connection.
			c.readWithin(cfg.Proxy.IdleTimeout)
			if _, err := br.Peek(1); err != nil {
				return
			}
			if !c.state.CompareAndSwap(connIdle, connActive) {
				return // closed by a shutdown
			}
			if !headBuffered(br) {
				c.setReadDeadline(time.Now().Add(cfg.Proxy.ReadHeaderTimeout))
			}
			raw = raw[:0]
			var (
				ok  bool
				err error
			)
			req, ok, err = readHead(br, &raw, cfg.Proxy.MaxHeaderBytes, base, nil)
			if err != nil {
				return // timed out or the client went away mid-head
			}
			if !ok {
				handedOff = f.handOff(c, raw, br)
				return
			}
		}
		req.RemoteAddr = c.remote
		body, _ := req.Body.(*fastBody)
		if body != nil {
			// The body is read while the request is served, without limit.
			// Without one, the idle deadline may stay: nothing reads the
			// connection until the next request, but a client watch, which
			// clears it.
			c.setReadDeadline(time.Time{})
		}
		w.reset(req)
		watch.arm(br, body)
		ok := f.call(w, req, st)
		if !watch.stop(br) || !ok {
			return
		}
		if err := w.finish(); err != nil {
			return
		}
		if w.closeAfter || f.closing.Load() || c.foreignDeadline.Load() {
			// A body not read to its end, or requests pipelined behind
			// this one, would make the close a reset.
			if body != nil && !body.done && !body.restBuffered() || unreadConn(c.nc) {
				c.lingerClose()
			}
			return
		}
		if body != nil && !body.done {
			// What is left of the body is read to keep the connection,
			// but a client that stalls mid-body after its answer is as
			// good as idle: it gets the idle timeout, no more.
			c.readWithin(cfg.Proxy.IdleTimeout)
		}
		if body != nil && !body.drain() {
			if body.err == nil {
				c.lingerClose()
			}
			return
		}
		if !c.state.CompareAndSwap(connActive, connIdle) {
			return
		}
	}
}

// lingerMax bounds how long lingerClose waits for a client to stop sending.
var lingerMax = 500 * time.Millisecond

// lingerClose is for a connection closing after an answer while the client
// may still be sending its request body. Closing at once would reset the
// connection, and a reset can destroy the answer before the client reads
// it; instead the sending side is shut, and what the client still sends is
// read and dropped until it closes too or lingerMax passes. The caller
// then closes the connection.
func (c *fastConn) lingerClose() { lingerConn(c.nc) }

// lingerConn is lingerClose for any connection.
func lingerConn(nc net.Conn) {
	cw, ok := nc.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	nc.SetReadDeadline(time.Now().Add(lingerMax))
	io.CopyN(io.Discard, nc, 64<<20)
}

// clientWatchDelay is how long a request runs before meshd starts watching
// its connection for the client going away; quicker requests never pay for it.
const clientWatchDelay = 25 * time.Millisecond

// clientWatch notices a client that closes its connection while its request
// is still being served, and cancels the request. It reads one byte from the
// connection on a goroutine of its own, started only for slow requests whose
// body has been read and after which nothing is buffered. One watch serves
// all of a connection's requests in turn: arm starts it for a request, stop
// ends it. Its timer is reused, so quick requests cost no allocation.
type clientWatch struct {
	c     *fastConn
	timer *time.Timer
	mu    sync.Mutex
	state int // 0 waiting, 1 reading, 2 stopped
	br    *bufio.Reader
	body  *fastBody
	done  chan struct{}
	b     [1]byte
	n     int
	err   error
}

func newClientWatch(c *fastConn) *clientWatch {
	w := &clientWatch{c: c, state: 2}
	w.timer = time.AfterFunc(time.Hour, w.fire)
	w.timer.Stop()
	return w
}

// arm starts watching for the request being served.
func (w *clientWatch) arm(br *bufio.Reader, body *fastBody) {
	w.mu.Lock()
	w.state, w.br, w.body, w.n, w.err = 0, br, body, 0, nil
	w.mu.Unlock()
	w.timer.Reset(clientWatchDelay)
}

// fire runs on the timer's goroutine. A stale firing (its request already
// stopped) finds the state not waiting and returns.
func (w *clientWatch) fire() {
	w.mu.Lock()
	if w.state != 0 || (w.body != nil && !w.body.finished.Load()) || w.br.Buffered() > 0 {
		w.mu.Unlock()
		return
	}
	w.state = 1
	w.done = make(chan struct{})
	c := w.c
	// Cleared before stop can see the watch reading, so that its own
	// deadline (which ends the read) always comes after.
	c.setReadDeadline(time.Time{})
	w.mu.Unlock()
	n, err := c.nc.Read(w.b[:])
	w.n, w.err = n, err
	var ne net.Error
	if n == 0 && err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
		c.cancel() // the client went away: cancel its request
	}
	close(w.done)
}

// stop ends the watch after the handler returned. A byte the client already
// sent (its next request) is put back in front of br. false means the
// connection is unusable.
func (w *clientWatch) stop(br *bufio.Reader) bool {
	w.mu.Lock()
	if w.state == 0 {
		w.state = 2
		w.mu.Unlock()
		w.timer.Stop()
		return true
	}
	w.state = 2
	done := w.done
	w.mu.Unlock()
	w.c.setReadDeadline(aLongTimeAgo)
	<-done
	w.c.setReadDeadline(time.Time{})
	if w.n == 1 {
		if rc, ok := w.c.nc.(*replayConn); ok {
			// (The event loop's connection: the byte must stay where
			// the check before handing it back looks.)
			rc.prefix = append([]byte{w.b[0]}, rc.prefix...)
			br.Reset(rc)
		} else {
			br.Reset(&replayConn{Conn: w.c.nc, prefix: []byte{w.b[0]}})
		}
		return true
	}
	var ne net.Error
	return w.err == nil || errors.As(w.err, &ne) && ne.Timeout()
}

var aLongTimeAgo = time.Unix(1, 0)

// call runs the handler, or for a request the event loop began, forward;
// false when it aborted the response.
func (f *fastServer) call(w *fastWriter, r *http.Request, st *started) (ok bool) {
	defer func() {
		if p := recover(); p != nil {
			if p != http.ErrAbortHandler {
				f.s.log.Error("panic serving a request", "listener", f.l.key, "panic", p)
			}
			ok = false
		}
	}()
	if st != nil {
		f.s.forward(w, r, st.u, st.start, st.dedicated, st)
		return true
	}
	f.handler.ServeHTTP(w, r)
	return true
}

// handOff gives the connection to net/http, replaying what was read.
func (f *fastServer) handOff(c *fastConn, raw []byte, br *bufio.Reader) bool {
	buffered, _ := br.Peek(br.Buffered())
	prefix := make([]byte, 0, len(raw)+len(buffered))
	prefix = append(append(prefix, raw...), buffered...)
	c.nc.SetReadDeadline(time.Time{})
	return f.handoff.give(newTimedConn(f.s, &replayConn{Conn: c.nc, prefix: prefix}))
}

// shutdown stops accepting, closes idle connections as they become idle and
// waits for active ones, until ctx ends; then drains what net/http holds.
func (f *fastServer) shutdown(ctx context.Context) error {
	f.closing.Store(true)
	f.l.ln.Close()
	<-f.served
	done := make(chan struct{})
	go func() { f.wg.Wait(); close(done) }()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var err error
	for waiting := true; waiting; {
		f.closeIdle()
		select {
		case <-done:
			waiting = false
		case <-ctx.Done():
			f.closeAll()
			<-done
			err = ctx.Err()
			waiting = false
		case <-tick.C:
		}
	}
	if herr := f.l.srv.Shutdown(ctx); herr != nil && err == nil {
		err = herr
	}
	return err
}

func (f *fastServer) closeIdle() {
	if f.eng != nil {
		f.eng.closeIdle(f)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for c := range f.conns {
		if c.state.CompareAndSwap(connIdle, connClosed) {
			c.nc.Close()
		}
	}
}

func (f *fastServer) closeAll() {
	// First, so that a connection a loop takes in or hands over while
	// this runs is closed on arrival, and the wait for all of them ends.
	f.dropAll.Store(true)
	if f.eng != nil {
		f.eng.closeAll(f) // the loops drop this listener's connections
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for c := range f.conns {
		c.state.Store(connClosed)
		c.nc.Close()
		// Its request too: one blocked on the instance (an upload it does
		// not read) would not notice the client's connection closing.
		c.cancel()
	}
}

// reqStore is the memory of a request the event loop parses, kept by its
// client connection and reused for the connection's next request: the
// loop serves one request of a connection at a time and lets go of it when
// the request ends, and a request handed to the goroutine path takes its
// connection, and the store, with it. Not safe for concurrent use.
type reqStore struct {
	req http.Request
	url url.URL
	hdr http.Header
	uri string // the last request's target: a client often asks for the same again
}

// readHead parses one request head into a copy of base (which sets its
// context), in st's memory when st is not nil (any request st held before
// is overwritten). ok is false when the request must go to net/http; raw
// then holds every byte consumed, for replay.
func readHead(br *bufio.Reader, raw *[]byte, maxHeader int, base *http.Request, st *reqStore) (*http.Request, bool, error) {
	line, err := br.ReadSlice('\n')
	*raw = append(*raw, line...)
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, false, nil
		}
		return nil, false, err
	}
	size := len(line)
	l := trimCRLF(line)
	sp1 := bytes.IndexByte(l, ' ')
	sp2 := bytes.LastIndexByte(l, ' ')
	if sp1 <= 0 || sp2 <= sp1+1 || string(l[sp2+1:]) != "HTTP/1.1" || bytes.IndexByte(l[sp1+1:sp2], ' ') >= 0 {
		return nil, false, nil // HTTP/1.0, an h2c preface, or something net/http should judge
	}
	method := internMethod(l[:sp1])
	target := l[sp1+1 : sp2]
	if method == "" || method == http.MethodConnect || target[0] == '*' {
		return nil, false, nil
	}
	var r *http.Request
	var hdr http.Header
	var u *url.URL
	if st != nil {
		r, u = &st.req, &st.url
		if hdr = st.hdr; hdr == nil {
			hdr = make(http.Header, 8)
			st.hdr = hdr
		} else {
			clear(hdr)
		}
	} else {
		r, hdr = new(http.Request), make(http.Header, 8)
	}
	*r = *base
	r.Method, r.Proto, r.ProtoMajor, r.ProtoMinor, r.Header = method, "HTTP/1.1", 1, 1, hdr
	if st != nil && st.uri == string(target) {
		r.RequestURI = st.uri
	} else {
		r.RequestURI = string(target)
		if st != nil {
			st.uri = r.RequestURI
		}
	}
	if u != nil && parseOrigin(r.RequestURI, u) {
		r.URL = u
	} else if r.URL, err = url.ParseRequestURI(r.RequestURI); err != nil {
		return nil, false, nil
	}
	var cl, te, hosts int
	for {
		line, err := br.ReadSlice('\n')
		*raw = append(*raw, line...)
		if err != nil {
			if errors.Is(err, bufio.ErrBufferFull) {
				return nil, false, nil
			}
			return nil, false, err
		}
		if size += len(line); size > maxHeader {
			return nil, false, nil
		}
		l := trimCRLF(line)
		if len(l) == 0 {
			break
		}
		i := bytes.IndexByte(l, ':')
		if i <= 0 || l[0] == ' ' || l[0] == '\t' || bytes.IndexByte(l[:i], ' ') >= 0 {
			return nil, false, nil // obsolete folding or a malformed name: net/http answers
		}
		key, known := requestKeys[string(l[:i])]
		if !known {
			if !httpguts.ValidHeaderFieldName(string(l[:i])) {
				return nil, false, nil
			}
			key = textproto.CanonicalMIMEHeaderKey(string(l[:i]))
		}
		raw := bytes.Trim(l[i+1:], " \t")
		if !httpguts.ValidHeaderFieldValue(string(raw)) {
			return nil, false, nil // net/http answers 400
		}
		v := string(raw)
		switch key {
		case "Host":
			if hosts++; hosts > 1 || !httpguts.ValidHostHeader(v) {
				return nil, false, nil // net/http answers 400
			}
			r.Host = v
			continue
		case "Content-Length":
			cl++
		case "Transfer-Encoding":
			te++
		case "Upgrade", "Expect", "Te", "Trailer":
			// (A declared trailer is net/http's to collect: it fills
			// Request.Trailer, which the forward passes on.)
			return nil, false, nil
		}
		r.Header[key] = append(r.Header[key], v)
	}
	if r.Host == "" && r.URL.Host == "" {
		return nil, false, nil
	}
	if r.URL.Host != "" {
		r.Host = r.URL.Host
	}
	switch {
	case te > 0:
		if te > 1 || cl > 0 || r.Header.Get("Transfer-Encoding") != "chunked" {
			return nil, false, nil
		}
		delete(r.Header, "Transfer-Encoding")
		r.TransferEncoding = []string{"chunked"}
		r.ContentLength = -1
		r.Body = &fastBody{r: httputil.NewChunkedReader(br), br: br, chunked: true}
	case cl > 0:
		// Digits only, as net/http wants: a sign ("+3") is its 400.
		u, err := strconv.ParseUint(r.Header.Get("Content-Length"), 10, 63)
		if cl > 1 || err != nil {
			return nil, false, nil
		}
		n := int64(u)
		r.ContentLength = n
		if n == 0 {
			r.Body = http.NoBody
		} else {
			r.Body = &fastBody{r: io.LimitReader(br, n), br: br}
		}
	default:
		r.Body = http.NoBody
	}
	for _, v := range r.Header["Connection"] {
		if containsToken(v, "close") {
			r.Close = true
		}
	}
	return r, true, nil
}

// parseOrigin sets *u to what url.ParseRequestURI makes of target, for
// the usual origin-form target: a path of characters a URL path keeps as
// they are, and an optional query of visible ASCII. It reports false,
// leaving *u to be overwritten, for anything else (escapes, a scheme,
// other characters), which ParseRequestURI must judge. Path and RawQuery
// share target's memory.
func parseOrigin(target string, u *url.URL) bool {
	if target == "" || target[0] != '/' {
		return false
	}
	path, query, hasQuery := strings.Cut(target, "?")
	for i := 0; i < len(path); i++ {
		if !pathKeeps[path[i]] {
			return false
		}
	}
	if hasQuery {
		if query == "" {
			return false // a bare "?": ParseRequestURI sets ForceQuery
		}
		for i := 0; i < len(query); i++ {
			if c := query[i]; c <= ' ' || c >= 0x7f {
				return false
			}
		}
	}
	*u = url.URL{Path: path, RawQuery: query}
	return true
}

// pathKeeps marks the bytes a URL path holds unescaped: letters, digits,
// the unreserved "-._~" and the sub-delimiters and separators net/url does
// not escape in a path. With only these, Path is the target's path and
// RawPath stays empty.
var pathKeeps = func() (t [256]bool) {
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
	}
	for c := 'A'; c <= 'Z'; c++ {
		t[c] = true
	}
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for _, c := range "-._~$&+,/:;=@" {
		t[c] = true
	}
	return t
}()

func trimCRLF(b []byte) []byte {
	if n := len(b); n > 0 && b[n-1] == '\n' {
		b = b[:n-1]
		if n := len(b); n > 0 && b[n-1] == '\r' {
			b = b[:n-1]
		}
	}
	return b
}

func internMethod(b []byte) string {
	switch string(b) {
	case "GET":
		return http.MethodGet
	case "POST":
		return http.MethodPost
	case "PUT":
		return http.MethodPut
	case "DELETE":
		return http.MethodDelete
	case "HEAD":
		return http.MethodHead
	case "PATCH":
		return http.MethodPatch
	case "OPTIONS":
		return http.MethodOptions
	case "CONNECT":
		return http.MethodConnect
	}
	if !httpguts.ValidHeaderFieldName(string(b)) {
		return ""
	}
	return string(b)
}

func containsToken(v, tok string) bool {
	for _, f := range bytes.Split([]byte(v), []byte(",")) {
		if bytes.EqualFold(bytes.TrimSpace(f), []byte(tok)) {
			return true
		}
	}
	return false
}

// requestKeys interns the canonical form of frequent request header names.
var requestKeys = func() map[string]string {
	m := map[string]string{}
	for _, k := range []string{
		"Host", "User-Agent", "Accept", "Accept-Encoding", "Accept-Language", "Authorization",
		"Cache-Control", "Connection", "Content-Length", "Content-Type", "Cookie", "Keep-Alive",
		"Origin", "Pragma", "Proxy-Connection", "Proxy-Authorization", "Referer", "Te", "Transfer-Encoding",
		"Upgrade", "Expect", "X-Forwarded-For", "X-Forwarded-Proto", "X-Request-Id", "X-Meshd-Timeout",
		"Traceparent", "Tracestate", "Baggage", "If-None-Match", "If-Modified-Since",
	} {
		m[k] = k
		m[textproto.CanonicalMIMEHeaderKey(k)] = k
		lower := []byte(k)
		for i, c := range lower {
			if 'A' <= c && c <= 'Z' {
				lower[i] = c + 'a' - 'A'
			}
		}
		m[string(lower)] = k
	}
	return m
}()

// fastBody is a request body read straight from the connection's buffer.
type fastBody struct {
	r        io.Reader
	br       *bufio.Reader
	chunked  bool
	done     bool
	err      error
	finished atomic.Bool // done, readable from the client watch
}

// restBuffered reports whether what is left of a Content-Length body has
// already arrived (it is in the connection's reader), so that closing the
// connection resets nothing the client still sends.
func (b *fastBody) restBuffered() bool {
	lr, ok := b.r.(*io.LimitedReader)
	return ok && b.err == nil && lr.N <= int64(b.br.Buffered())
}

// errMalformedTrailer is a chunked body whose trailer section is broken:
// the caller's mistake, answered 400, not a hang-up.
var errMalformedTrailer = errors.New("malformed chunked trailer section")

func (b *fastBody) Read(p []byte) (int, error) {
	if b.done {
		return 0, io.EOF
	}
	if b.err != nil {
		return 0, b.err
	}
	n, err := b.r.Read(p)
	if err == io.EOF {
		if b.chunked {
			// The trailer section follows the last chunk.
			// Like net/http, the section must end with CRLF.
			for {
				line, lerr := b.br.ReadSlice('\n')
				switch {
				case lerr == bufio.ErrBufferFull || lerr == nil && string(line) == "\n":
					// A trailer line past the buffer, or a bare LF
					// ending the section: the body is malformed.
					b.err = errMalformedTrailer
					return n, b.err
				case lerr == io.EOF:
					b.err = io.ErrUnexpectedEOF // the caller stopped sending
					return n, b.err
				case lerr != nil:
					b.err = lerr // a reset, a deadline: the connection's
					return n, b.err
				}
				if string(line) == "\r\n" {
					break
				}
			}
		} else if lr, ok := b.r.(*io.LimitedReader); ok && lr.N > 0 {
			b.err = io.ErrUnexpectedEOF
			return n, b.err
		}
		b.done = true
		b.finished.Store(true)
		return n, io.EOF
	}
	if err != nil {
		b.err = err
	} else if lr, ok := b.r.(*io.LimitedReader); ok && lr.N == 0 {
		b.done = true
		b.finished.Store(true)
	}
	return n, err
}

// Close leaves the rest of the body for drain.
func (b *fastBody) Close() error { return nil }

// drain reads what the handler left of the body so that the connection can
// carry the next request; false when that is too much or fails.
func (b *fastBody) drain() bool {
	if b.done {
		return true
	}
	if b.err != nil {
		return false
	}
	n, _ := io.CopyN(io.Discard, b, 256<<10)
	return b.done && n < 256<<10
}

// fastWriter is the http.ResponseWriter of the fast path. Small answers
// without a Content-Length get one; larger or flushed ones are chunked.
type fastWriter struct {
	bw          *bufio.Writer
	header      http.Header
	req         *http.Request
	status      int
	wroteHeader bool
	committed   bool
	chunked     bool
	noBody      bool
	fc          *fastConn
	closing     *atomic.Bool // the server's: set once a shutdown began
	closeAfter  bool
	declared    int64 // Content-Length set by the handler, -1 if none
	written     int64
	buf         []byte
	num         []byte
	// raw holds header lines ready to send ("Name: value\r\n" each),
	// written before those of header; the event loop's answers use it.
	// The bytes must stay put until the head is committed.
	raw []byte
}

const fastBufferLimit = 4 << 10

func (w *fastWriter) reset(r *http.Request) {
	if w.header == nil {
		w.header = make(http.Header, 8)
	} else {
		clear(w.header)
	}
	w.req, w.status, w.wroteHeader, w.committed, w.chunked = r, 0, false, false, false
	w.closeAfter, w.declared, w.written, w.buf, w.raw = r.Close, -1, 0, w.buf[:0], nil
	w.noBody = r.Method == http.MethodHead
}

func (w *fastWriter) Header() http.Header { return w.header }

// SetReadDeadline sets the client connection's read deadline, for
// http.ResponseController; forward uses it to end a read of a stalled
// request body. The connection then closes after the request. Safe to call
// from another goroutine while the handler runs.
func (w *fastWriter) SetReadDeadline(t time.Time) error {
	w.fc.foreignDeadline.Store(true)
	return w.fc.nc.SetReadDeadline(t)
}

// closeAfterResponse makes the connection close after this response and
// the response say so (the Connection header of the handler's own header
// map is not sent on this path).
func (w *fastWriter) closeAfterResponse() { w.closeAfter = true }

func (w *fastWriter) WriteHeader(code int) {
	if w.wroteHeader {
		return
	}
	if code < 200 {
		w.interim(code)
		return
	}
	w.wroteHeader, w.status = true, code
	if code == http.StatusNoContent || code == http.StatusNotModified {
		w.noBody = true
	}

	if v := w.header["Content-Length"]; len(v) == 1 {
		if n, err := strconv.ParseInt(v[0], 10, 64); err == nil && n >= 0 {
			w.declared = n
		}
	}
}

func (w *fastWriter) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if w.noBody {
		return len(p), nil
	}
	if w.declared >= 0 && w.written+int64(len(p)) > w.declared {
		return 0, http.ErrContentLength
	}
	w.written += int64(len(p))
	if !w.committed {
		if w.declared >= 0 || len(w.buf)+len(p) > fastBufferLimit {
			if err := w.commit(); err != nil {
				return 0, err
			}
		} else {
			w.buf = append(w.buf, p...)
			return len(p), nil
		}
	}
	return w.writeBody(p)
}

func (w *fastWriter) writeBody(p []byte) (int, error) {
	if !w.chunked {
		return w.bw.Write(p)
	}
	w.num = strconv.AppendInt(w.num[:0], int64(len(p)), 16)
	w.bw.Write(w.num)
	w.bw.WriteString("\r\n")
	w.bw.Write(p)
	if _, err := w.bw.WriteString("\r\n"); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush sends what is buffered, committing to chunked framing when no
// length was given.
func (w *fastWriter) Flush() {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.committed {
		w.commit()
	}
	w.bw.Flush()
}

// commit writes the status line and headers, then any buffered body.
// interim sends an informational (1xx) answer with the fields in the
// header map at once, as net/http's server does; the final answer follows.
// 101 is for the upgrade path, which meshd's own server takes.
func (w *fastWriter) interim(code int) {
	if code < 100 || code == http.StatusSwitchingProtocols {
		return
	}
	bw := w.bw
	bw.WriteString("HTTP/1.1 ")
	w.num = strconv.AppendInt(w.num[:0], int64(code), 10)
	bw.Write(w.num)
	bw.WriteString(" ")
	bw.WriteString(http.StatusText(code))
	bw.WriteString("\r\n")
	for k, vv := range w.header {
		if k == "Transfer-Encoding" || k == "Connection" || k == "Content-Length" {
			continue
		}
		for _, v := range vv {
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(v)
			bw.WriteString("\r\n")
		}
	}
	bw.WriteString("\r\n")
	bw.Flush()
}

func (w *fastWriter) commit() error {
	w.committed = true
	bw := w.bw
	bw.WriteString("HTTP/1.1 ")
	if st := h1.StatusLine(w.status); st != "" {
		bw.WriteString(st)
	} else {
		w.num = strconv.AppendInt(w.num[:0], int64(w.status), 10)
		bw.Write(w.num)
		bw.WriteString(" status")
	}
	bw.WriteString("\r\n")
	bw.Write(w.raw)
	for k, vv := range w.header {
		if k == "Transfer-Encoding" || k == "Connection" || k == "Content-Length" || len(k) > 0 && k[0] == 'T' && len(k) > len(http.TrailerPrefix) && k[:len(http.TrailerPrefix)] == http.TrailerPrefix {
			continue
		}
		for _, v := range vv {
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(v)
			bw.WriteString("\r\n")
		}
	}
	switch {
	case w.status == http.StatusNoContent || w.status < 200:
		// Neither a length nor framing (RFC 9110, 8.6), whatever the
		// instance said.
	case w.declared >= 0:
		bw.WriteString("Content-Length: ")
		w.num = strconv.AppendInt(w.num[:0], w.declared, 10)
		bw.Write(w.num)
		bw.WriteString("\r\n")
	case w.noBody:
		if w.status != http.StatusNotModified && w.req.Method != http.MethodHead {
			bw.WriteString("Content-Length: 0\r\n")
		}
	default:
		w.chunked = true
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	}
	if !w.closeAfter && w.closing != nil && w.closing.Load() {
		// Draining: this connection closes after the answer, and the
		// client must know before it sends another request on it.
		w.closeAfter = true
	}
	if w.closeAfter || w.fc != nil && w.fc.foreignDeadline.Load() {
		bw.WriteString("Connection: close\r\n")
	}
	bw.WriteString("\r\n")
	if len(w.buf) > 0 {
		b := w.buf
		w.buf = w.buf[:0]
		if _, err := w.writeBody(b); err != nil {
			return err
		}
	}
	return nil
}

// finish completes the response after the handler returned.
func (w *fastWriter) finish() error {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.committed {
		if w.declared < 0 && !w.noBody {
			w.declared = int64(len(w.buf))
		}
		if err := w.commit(); err != nil {
			return err
		}
	}
	if w.chunked {
		w.bw.WriteString("0\r\n\r\n")
	} else if w.declared >= 0 && w.written != w.declared && !w.noBody {
		// A short body cannot be framed: the client learns by the close.
		w.bw.Flush()
		return io.ErrShortWrite
	}
	return w.bw.Flush()
}

// handoffListener feeds connections to a net/http server.
type handoffListener struct {
	addr   net.Addr
	ch     chan net.Conn
	once   sync.Once
	closed chan struct{}
}

func newHandoffListener(addr net.Addr) *handoffListener {
	return &handoffListener{addr: addr, ch: make(chan net.Conn), closed: make(chan struct{})}
}

func (h *handoffListener) give(c net.Conn) bool {
	select {
	case h.ch <- c:
		return true
	case <-h.closed:
		return false
	}
}

func (h *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-h.ch:
		return c, nil
	case <-h.closed:
		return nil, net.ErrClosed
	}
}

func (h *handoffListener) Close() error {
	h.once.Do(func() { close(h.closed) })
	return nil
}

func (h *handoffListener) Addr() net.Addr { return h.addr }

// replayConn is a connection whose first reads return bytes already consumed.
type replayConn struct {
	net.Conn
	prefix []byte
}

// CloseWrite shuts the sending side, when the connection has one to shut.
func (c *replayConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("connection cannot shut its sending side")
}

// drained reports whether the replayed bytes have all been read.
func (c *replayConn) drained() bool { return len(c.prefix) == 0 }

func (c *replayConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}
