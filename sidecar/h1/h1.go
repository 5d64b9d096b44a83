// Package h1 is meshd's HTTP/1.1 client to upstream instances: a
// RoundTripper that writes the request and reads the response on the
// caller's goroutine over pooled keep-alive connections.
//
// net/http's Transport runs two goroutines per connection and hands every
// request to them over channels; for a proxy that waits on each answer
// anyway, those hand-offs cost more than the work itself. This client does
// the same exchange synchronously. It handles what a forwarded request needs
// (fixed-length and chunked bodies both ways, keep-alive, Connection: close,
// HEAD/204/304, cancellation, deadlines, retrying a request that met a
// connection the instance had already closed) and nothing else: upgrades,
// HTTP/2 and trailers are left to net/http by the caller.
package h1

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http/httpguts"
)

// Transport is a pool of keep-alive connections per address. Safe for
// concurrent use; the zero value is not usable, use New.
type Transport struct {
	// Dial opens a connection (a *net.Dialer's DialContext).
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// MaxIdlePerHost bounds pooled idle connections per address.
	maxIdle int
	// IdleTimeout closes pooled connections unused for this long.
	idleTimeout time.Duration
	// ResponseHeaderTimeout bounds the wait for the response head; 0 = none.
	headerTimeout time.Duration

	mu     sync.Mutex                       // serialises changes to pools
	pools  atomic.Pointer[map[string]*pool] // read without locking; copied on change
	closed atomic.Bool                      // set by Close: nothing is pooled any more
}

// Options configure a Transport.
type Options struct {
	Dial                  func(ctx context.Context, network, addr string) (net.Conn, error)
	MaxIdlePerHost        int           // default 64
	IdleTimeout           time.Duration // default 90s
	ResponseHeaderTimeout time.Duration // default none
}

// New returns a Transport.
func New(o Options) *Transport {
	if o.Dial == nil {
		o.Dial = (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	}
	if o.MaxIdlePerHost <= 0 {
		o.MaxIdlePerHost = 64
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 90 * time.Second
	}
	t := &Transport{dial: o.Dial, maxIdle: o.MaxIdlePerHost, idleTimeout: o.IdleTimeout, headerTimeout: o.ResponseHeaderTimeout}
	t.pools.Store(&map[string]*pool{})
	return t
}

// pool is the idle connections of one address, newest last.
type pool struct {
	mu   sync.Mutex
	idle []*conn
	dead bool // drained by CloseIdleConnections: no longer reachable
}

type conn struct {
	nc       net.Conn
	br       *bufio.Reader
	bw       *bufio.Writer
	idleAt   time.Time
	reused   bool
	broken   atomic.Bool
	hdrBuf   []byte
	t        *Transport
	addr     string
	stopCtx  func() bool
	onCancel func() // c.abort, bound once
	// reqBody is the exchange's request body, for abort. Set before the
	// context is watched; a connection whose watch fired is never reused,
	// so abort never sees the next exchange's.
	reqBody  io.ReadCloser
	canceled atomic.Bool
	ctx      context.Context
	// arena and fields are reused across response heads.
	arena  []byte
	fields []field
	// reuse and reuseHdr, when set (a HeadParser's), hold every head
	// parsed: each is valid until the next.
	reuse    *respBlock
	reuseHdr http.Header
	// rdl and wdl are the deadlines set on nc, kept to skip setting them
	// again. Only the exchange's goroutine uses them; a cancellation sets
	// nc's deadlines itself, and a cancelled conn is never reused.
	rdl, wdl time.Time
	// raw, peek and peekOK serve alive's look at an idle connection.
	raw    syscall.RawConn
	peek   func(fd uintptr)
	peekOK bool
}

// leftover reports whether bytes past the last answer wait to be read: in
// the read buffer, or in what a resumed connection was given (prefixConn).
func (c *conn) leftover() bool {
	if c.br.Buffered() > 0 {
		return true
	}
	p, ok := c.nc.(*prefixConn)
	return ok && len(p.prefix) > 0
}

func (c *conn) setReadDeadline(t time.Time) {
	if !t.Equal(c.rdl) {
		c.rdl = t
		c.nc.SetReadDeadline(t)
	}
}

// armReadDeadline sets the read deadline while the exchange's context is
// watched: a cancellation may have just set its own, immediate deadline,
// which this one would overwrite, so it is put back. (abort marks the
// connection before setting its deadline, so one of the two always comes
// last.)
func (c *conn) armReadDeadline(t time.Time) {
	c.setReadDeadline(t)
	if c.canceled.Load() {
		c.nc.SetDeadline(aLongTimeAgo)
	}
}

func (c *conn) setWriteDeadline(t time.Time) {
	if !t.Equal(c.wdl) {
		c.wdl = t
		c.nc.SetWriteDeadline(t)
	}
}

var (
	readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, MaxLine) }}
	writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}
)

// poolFor returns addr's pool, adding it on first use. Lookups take no lock:
// the map is replaced, never changed, when an address is added.
func (t *Transport) poolFor(addr string) *pool {
	if p := (*t.pools.Load())[addr]; p != nil {
		return p
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	old := *t.pools.Load()
	if p := old[addr]; p != nil {
		return p
	}
	m := make(map[string]*pool, len(old)+1)
	for k, v := range old {
		m[k] = v
	}
	p := &pool{}
	m[addr] = p
	t.pools.Store(&m)
	return p
}

// get returns an idle connection to addr, or nil.
func (t *Transport) get(addr string) *conn {
	p := t.poolFor(addr)
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	for n := len(p.idle); n > 0; n = len(p.idle) {
		c := p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		if now.Sub(c.idleAt) > t.idleTimeout {
			c.close()
			continue
		}
		c.reused = true
		return c
	}
	return nil
}

// dropIdleSince closes the pooled connections to addr that have been idle
// since before (or at) t: the instance closed one idle that long, so it
// has closed these too or is about to.
func (t *Transport) dropIdleSince(addr string, since time.Time) {
	p := t.poolFor(addr)
	p.mu.Lock()
	kept := p.idle[:0]
	for _, c := range p.idle {
		if c.idleAt.After(since) {
			kept = append(kept, c)
		} else {
			c.close()
		}
	}
	clear(p.idle[len(kept):])
	p.idle = kept
	p.mu.Unlock()
}

// put returns a healthy connection to its pool.
func (t *Transport) put(c *conn) {
	if c.broken.Load() {
		c.close()
		return
	}
	c.idleAt = time.Now()
	p := t.poolFor(c.addr)
	p.mu.Lock()
	if p.dead || t.closed.Load() || len(p.idle) >= t.maxIdle {
		p.mu.Unlock()
		c.close()
		return
	}
	p.idle = append(p.idle, c)
	p.mu.Unlock()
}

// CloseIdleConnections closes every pooled connection; in-flight ones are
// closed when their exchange ends.
func (t *Transport) CloseIdleConnections() {
	t.mu.Lock()
	pools := *t.pools.Swap(&map[string]*pool{})
	t.mu.Unlock()
	for _, p := range pools {
		p.mu.Lock()
		for _, c := range p.idle {
			c.close()
		}
		p.idle = nil
		p.dead = true
		p.mu.Unlock()
	}
}

// Close closes the idle connections, and every other connection when its
// exchange ends instead of pooling it. Requests after Close still work but
// open a connection each; Close is for a Transport being retired. Safe for
// concurrent use.
func (t *Transport) Close() {
	t.closed.Store(true)
	t.CloseIdleConnections()
}

func (c *conn) close() {
	c.nc.Close()
	if c.br != nil {
		c.br.Reset(nil)
		readers.Put(c.br)
		c.br = nil
	}
	if c.bw != nil {
		c.bw.Reset(nil)
		writers.Put(c.bw)
		c.bw = nil
	}
}

func (t *Transport) dialConn(ctx context.Context, addr string) (*conn, error) {
	nc, err := t.dial(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	br := readers.Get().(*bufio.Reader)
	br.Reset(nc)
	bw := writers.Get().(*bufio.Writer)
	bw.Reset(nc)
	return &conn{nc: nc, br: br, bw: bw, t: t, addr: addr}, nil
}

// ErrUnsupported is returned for requests this client does not handle; the
// caller sends them with net/http instead.
var ErrUnsupported = errors.New("h1: request needs net/http")

// Supports reports whether RoundTrip can send req.
func Supports(req *http.Request) bool {
	if req.URL.Scheme != "http" || req.Method == http.MethodConnect {
		return false
	}
	h := req.Header
	if _, ok := h["Upgrade"]; ok {
		return false
	}
	if _, ok := h["Expect"]; ok {
		return false
	}
	if _, ok := h["Te"]; ok {
		return false
	}
	return len(req.Trailer) == 0
}

// RoundTrip sends req and returns the response; its Body must be read to
// EOF or closed, which returns the connection to the pool. A request that
// meets a pooled connection the instance had closed is sent again on a new
// connection when it can be: safe to repeat (see replayable), and without
// a body or with GetBody.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if !Supports(req) {
		return nil, ErrUnsupported
	}
	ctx := req.Context()
	addr := req.URL.Host
	for try := 0; ; try++ {
		var c *conn
		if try == 0 {
			// A retry after a stale connection dials: the next pooled
			// one is likely stale too.
			c = t.get(addr)
			// No request is sent on a connection the instance has
			// closed or has sent bytes on unasked: a request that may
			// not be sent twice could not be sent again, and bytes
			// waiting there would be read as this request's answer.
			for c != nil && !c.alive() {
				c.close()
				c = t.get(addr)
			}
		}
		if c == nil {
			var err error
			if c, err = t.dialConn(ctx, addr); err != nil {
				closeBody(req)
				return nil, err
			}
		}
		resp, err := c.roundTrip(req)
		if err == nil {
			return resp, nil
		}
		if c.reused && errors.Is(err, errStale) {
			// The instance closed a connection idle this long; those idle
			// as long or longer went the same way.
			t.dropIdleSince(addr, c.idleAt)
		}
		if c.reused && try < 2 && errors.Is(err, errStale) && ctx.Err() == nil && replayable(req) {
			if req.Body == nil || req.Body == http.NoBody {
				continue
			}
			if req.GetBody != nil {
				body, gerr := req.GetBody()
				if gerr == nil {
					r2 := *req
					r2.Body = body
					req = &r2
					continue
				}
			}
		}
		closeBody(req)
		return nil, err
	}
}

// replayable reports whether req may be sent again after a connection
// closed before its answer. The instance may have read and acted on it
// first, so only a request that is safe to repeat qualifies: GET, HEAD,
// OPTIONS and TRACE, or one that carries an idempotency key (the rule
// net/http's Transport follows).
func replayable(req *http.Request) bool {
	switch req.Method {
	case "", http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	_, ok := req.Header["Idempotency-Key"]
	if !ok {
		_, ok = req.Header["X-Idempotency-Key"]
	}
	return ok
}

// closeBody closes a request's body on an error, as http.RoundTripper asks,
// including before it was written (closing twice is harmless).
func closeBody(req *http.Request) {
	if req.Body != nil {
		req.Body.Close()
	}
}

// errStale marks a pooled connection the instance closed before answering.
// It wraps io.ErrUnexpectedEOF so that callers see a reset.
var errStale = fmt.Errorf("h1: connection closed by the instance before it answered: %w", io.ErrUnexpectedEOF)

func (c *conn) roundTrip(req *http.Request) (resp *http.Response, err error) {
	ctx := req.Context()
	if err := ctx.Err(); err != nil {
		c.close()
		return nil, err
	}
	c.watch(req)
	if err := c.writeRequest(req); err != nil {
		var bre *bodyReadError
		if c.reused && isClosedErr(err) && !errors.As(err, &bre) {
			return c.fail(req, errStale)
		}
		return c.fail(req, err)
	}
	if hook := testHookWritten.Load(); hook != nil {
		(*hook)(c)
	}
	return c.await(req, time.Now())
}

// watch makes the exchange of req end when its context does.
func (c *conn) watch(req *http.Request) {
	ctx := req.Context()
	c.ctx = ctx
	c.reqBody = req.Body
	deadline, _ := ctx.Deadline()
	c.setWriteDeadline(deadline) // zero without one
	if ctx.Done() != nil {
		if c.onCancel == nil {
			c.onCancel = c.abort // bound once per connection, not per exchange
		}
		c.stopCtx = context.AfterFunc(ctx, c.onCancel)
	}
}

// fail ends a failed exchange: the connection closes, and the error says
// so when the context's end caused it.
func (c *conn) fail(req *http.Request, e error) (*http.Response, error) {
	ctx := req.Context()
	c.release()
	c.close()
	if c.canceled.Load() {
		if cerr := ctx.Err(); cerr != nil {
			return nil, cerr
		}
	}
	deadline, hasDeadline := ctx.Deadline()
	if ne, ok := e.(net.Error); ok && ne.Timeout() && hasDeadline && !time.Now().Before(deadline) {
		return nil, context.DeadlineExceeded
	}
	return nil, e
}

// await reads the answer to req, which was written at written.
func (c *conn) await(req *http.Request, written time.Time) (*http.Response, error) {
	deadline, hasDeadline := req.Context().Deadline()
	// The header timeout runs from the end of the request, body included,
	// as net/http's ResponseHeaderTimeout does. A deadline already set that
	// falls less than ht/16 short of it is kept, sparing a timer update per
	// exchange.
	headDeadline := deadline
	if ht := c.t.headerTimeout; ht > 0 && (!hasDeadline || deadline.Sub(written) > ht) {
		headDeadline = written.Add(ht)
		if !c.rdl.IsZero() && !c.rdl.After(headDeadline) && headDeadline.Sub(c.rdl) < ht/16 {
			headDeadline = c.rdl
		}
	}
	c.armReadDeadline(headDeadline)
	resp, err := c.readResponse(req)
	if err != nil {
		if c.reused && errors.Is(err, errNothingRead) {
			return c.fail(req, errStale)
		}
		if errors.Is(err, errNothingRead) {
			err = io.ErrUnexpectedEOF
		}
		return c.fail(req, err)
	}
	if b, ok := resp.Body.(*body); ok && !headDeadline.Equal(deadline) {
		// The body is read under the request's own deadline, unless all
		// of it is buffered already. (Without a body, the connection is
		// back in the pool and no longer this exchange's to touch.)
		if b.r != &b.limited || b.limited.N > int64(c.br.Buffered()) {
			c.armReadDeadline(deadline)
		}
	}
	return resp, nil
}

var aLongTimeAgo = time.Unix(1, 0)

// testHookWritten, when set by a test, runs after a request is written.
var testHookWritten atomic.Pointer[func(*conn)]

// abort ends the exchange in progress when its context is done; it runs on
// the context's goroutine.
func (c *conn) abort() {
	c.canceled.Store(true)
	c.nc.SetDeadline(aLongTimeAgo)
	if a, ok := c.reqBody.(interface{ AbortRead() }); ok {
		// The request body may be what the exchange waits on.
		a.AbortRead()
	}
}

// release stops watching the exchange's context. When the watch already
// fired (its callback may not have run yet, and would then set deadlines on
// a pooled connection behind the cached values), the connection counts as
// cancelled and is closed rather than reused.
func (c *conn) release() {
	if c.stopCtx != nil {
		if !c.stopCtx() {
			c.canceled.Store(true)
		}
		c.stopCtx = nil
	}
}

func isClosedErr(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "connection reset") || strings.Contains(err.Error(), "broken pipe")
}

func (c *conn) writeRequest(req *http.Request) error {
	bw := c.bw
	if err := writeStart(bw, req); err != nil {
		return err
	}
	body := req.Body
	if body == http.NoBody {
		body = nil
	}
	chunked := false
	switch {
	case body == nil:
		if req.Method == http.MethodPost || req.Method == http.MethodPut || req.Method == http.MethodPatch {
			bw.WriteString("Content-Length: 0\r\n")
		}
	case req.ContentLength > 0:
		bw.WriteString("Content-Length: ")
		c.hdrBuf = strconv.AppendInt(c.hdrBuf[:0], req.ContentLength, 10)
		bw.Write(c.hdrBuf)
		bw.WriteString("\r\n")
	default:
		chunked = true
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	}
	bw.WriteString("\r\n")
	if body == nil {
		return bw.Flush()
	}
	defer body.Close()
	var err error
	src := &readTracker{r: body}
	if chunked {
		cw := httputil.NewChunkedWriter(bw)
		_, err = io.Copy(cw, src)
		if err == nil {
			err = cw.Close()
		}
		if err == nil {
			_, err = bw.WriteString("\r\n")
		}
	} else {
		var n int64
		src.r = io.LimitReader(body, req.ContentLength)
		n, err = io.Copy(bw, src)
		if err == nil && n != req.ContentLength {
			err = fmt.Errorf("h1: request body is %d bytes, Content-Length said %d", n, req.ContentLength)
		}
	}
	if err != nil {
		c.broken.Store(true)
		if src.err != nil {
			return &bodyReadError{src.err}
		}
		return &bodyError{err}
	}
	return bw.Flush()
}

// writeStart writes req's request line and header fields, but for the
// framing ones.
func writeStart(bw *bufio.Writer, req *http.Request) error {
	bw.WriteString(req.Method)
	bw.WriteByte(' ')
	if req.URL.Opaque != "" {
		bw.WriteString(req.URL.Opaque)
	} else {
		path := req.URL.EscapedPath()
		if path == "" {
			path = "/"
		}
		bw.WriteString(path)
		if req.URL.RawQuery != "" || req.URL.ForceQuery {
			bw.WriteByte('?')
			bw.WriteString(req.URL.RawQuery)
		}
	}
	bw.WriteString(" HTTP/1.1\r\nHost: ")
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	bw.WriteString(host)
	bw.WriteString("\r\n")
	for k, vv := range req.Header {
		if k == "Host" || k == "Content-Length" || k == "Transfer-Encoding" || k == "Connection" {
			continue
		}
		for _, v := range vv {
			if !validHeaderValue(v) {
				return fmt.Errorf("h1: invalid value for header %q", k)
			}
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(v)
			bw.WriteString("\r\n")
		}
	}
	return nil
}

// WriteHead writes the head of req, which has no body, as RoundTrip would
// send it; an event loop sending requests itself uses it. The framing
// fields of req.Header are not written: an empty POST, PUT or PATCH says
// Content-Length: 0. lines, header lines ready to send ("Name: value\r\n"
// each, checked by the caller), go after those of req.Header.
func WriteHead(bw *bufio.Writer, req *http.Request, lines []byte) error {
	if req.Body != nil && req.Body != http.NoBody {
		return errors.New("h1: WriteHead is for requests without a body")
	}
	if err := writeStart(bw, req); err != nil {
		return err
	}
	bw.Write(lines)
	if req.Method == http.MethodPost || req.Method == http.MethodPut || req.Method == http.MethodPatch {
		bw.WriteString("Content-Length: 0\r\n")
	}
	_, err := bw.WriteString("\r\n")
	return err
}

// readTracker records the error of reading the request body, to tell it
// from an error writing to the instance.
type readTracker struct {
	r   io.Reader
	err error
}

func (t *readTracker) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if err != nil && err != io.EOF {
		t.err = err
	}
	return n, err
}

// bodyReadError is a failure reading the request body from its source: the
// connection to the instance is not to blame, so it is never taken for a
// stale one.
type bodyReadError struct{ err error }

func (e *bodyReadError) Error() string { return "h1: reading the request body: " + e.err.Error() }
func (e *bodyReadError) Unwrap() error { return e.err }

// bodyError is a failure while sending the request body (the instance may
// have seen part of the request).
type bodyError struct{ err error }

func (e *bodyError) Error() string { return "h1: writing the request body: " + e.err.Error() }
func (e *bodyError) Unwrap() error { return e.err }

func validHeaderValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if b := v[i]; b == '\r' || b == '\n' || b == 0 {
			return false
		}
	}
	return true
}

// Interim is told of the informational (1xx) answers to a request whose
// context carries it under InterimKey{}, in order, before the final
// answer; h's values are valid only during the call. An error ends the
// exchange with it. Called on the goroutine that called RoundTrip or
// Resume.
type Interim interface {
	Interim(code int, h http.Header) error
}

// InterimKey is the context key a request's Interim is found under. (A
// context type of the caller's own can answer it without the allocation
// of context.WithValue.)
type InterimKey struct{}

func (c *conn) readResponse(req *http.Request) (*http.Response, error) {
	for {
		resp, err := c.readHead(req)
		if err != nil {
			return nil, err
		}
		// Interim answers (100 Continue, 103 Early Hints) are reported
		// to the request's Interim, or else to its
		// httptrace.ClientTrace as net/http's Transport reports them,
		// and the final answer is read on.
		if resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols {
			var err error
			if i, ok := req.Context().Value(InterimKey{}).(Interim); ok {
				err = i.Interim(resp.StatusCode, resp.Header)
			} else if trace := httptrace.ContextClientTrace(req.Context()); trace != nil && trace.Got1xxResponse != nil {
				err = trace.Got1xxResponse(resp.StatusCode, textproto.MIMEHeader(resp.Header))
			}
			if err != nil {
				c.broken.Store(true)
				return nil, err
			}
			continue
		}
		return resp, c.attachBody(req, resp)
	}
}

// errNothingRead is a connection that ended before any byte of the response.
var errNothingRead = errors.New("h1: connection ended before the response began")

func (c *conn) readHead(req *http.Request) (*http.Response, error) {
	line, err := c.readLineBytes()
	if err != nil {
		if errors.Is(err, io.EOF) || isClosedErr(err) && !errors.Is(err, io.ErrUnexpectedEOF) {
			if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
				return nil, errNothingRead
			}
		}
		return nil, err
	}
	// HTTP/1.1 200 OK
	if len(line) < 12 || (string(line[:8]) != "HTTP/1.1" && string(line[:8]) != "HTTP/1.0") || line[8] != ' ' || len(line) > 12 && line[12] != ' ' {
		c.broken.Store(true)
		return nil, fmt.Errorf("h1: malformed status line %q", truncate(string(line)))
	}
	code := int(line[9]-'0')*100 + int(line[10]-'0')*10 + int(line[11]-'0')
	if line[9] < '1' || line[9] > '9' || line[10] < '0' || line[10] > '9' || line[11] < '0' || line[11] > '9' {
		c.broken.Store(true)
		return nil, fmt.Errorf("h1: malformed status code in %q", truncate(string(line)))
	}
	// The response and the first header values share one allocation.
	blk := c.reuse
	if blk == nil {
		blk = new(respBlock)
	} else {
		*blk = respBlock{}
	}
	resp := &blk.resp
	*resp = http.Response{
		StatusCode: code,
		Proto:      "HTTP/1.1",
		ProtoMajor: 1,
		ProtoMinor: 1,
		Request:    req,
	}
	if string(line[:8]) == "HTTP/1.0" {
		resp.Proto, resp.ProtoMinor = "HTTP/1.0", 0
	}
	if st := StatusLine(code); st != "" && st == string(line[9:]) {
		resp.Status = st
	} else {
		resp.Status = string(line[9:])
	}
	// Header values are gathered in one buffer and become one string, so a
	// response head costs a handful of allocations whatever its size.
	arena := c.arena[:0]
	fields := c.fields[:0]
	size := len(line)
	for {
		l, err := c.readLineBytes()
		if err != nil {
			return nil, err
		}
		if len(l) == 0 {
			break
		}
		if size += len(l) + 2; size > maxResponseHead {
			c.broken.Store(true)
			return nil, fmt.Errorf("h1: response head over %d bytes", maxResponseHead)
		}
		i := indexByte(l, ':')
		if i <= 0 {
			c.broken.Store(true)
			return nil, fmt.Errorf("h1: malformed header line %q", truncate(string(l)))
		}
		key, ok := commonKeys[string(l[:i])]
		if !ok {
			if !httpguts.ValidHeaderFieldName(string(l[:i])) {
				c.broken.Store(true)
				return nil, fmt.Errorf("h1: malformed header name in %q", truncate(string(l)))
			}
			key = textproto.CanonicalMIMEHeaderKey(string(l[:i]))
		}
		v := trimSpace(l[i+1:])
		if !httpguts.ValidHeaderFieldValue(string(v)) {
			c.broken.Store(true)
			return nil, fmt.Errorf("h1: malformed value for header %q", key)
		}
		start := len(arena)
		arena = append(arena, v...)
		fields = append(fields, field{key: key, start: start, end: len(arena)})
	}
	values := string(arena)
	vals := blk.vals[:]
	if len(fields) > len(vals) {
		vals = make([]string, len(fields))
	}
	if c.reuse != nil && c.reuseHdr != nil {
		clear(c.reuseHdr)
		resp.Header = c.reuseHdr
	} else {
		resp.Header = make(http.Header, len(fields))
		if c.reuse != nil {
			c.reuseHdr = resp.Header
		}
	}
	for i, f := range fields {
		vals[i] = values[f.start:f.end]
		if prev, ok := resp.Header[f.key]; ok {
			resp.Header[f.key] = append(prev[:len(prev):len(prev)], vals[i])
			continue
		}
		resp.Header[f.key] = vals[i : i+1 : i+1]
	}
	c.arena, c.fields = arena, fields
	return resp, nil
}

// maxResponseHead bounds a response head (status line and fields): an
// instance sending fields without end would otherwise grow meshd's memory
// until the header timeout. net/http's Transport allows 10 MB by default;
// 1 MiB is far past any real head.
const maxResponseHead = 1 << 20

// MaxLine is the longest line of a response head the client reads, its
// line feed included: the size of its read buffer. A longer one is an
// error.
const MaxLine = 8 << 10

// respBlock holds a response and room for the values of a typical head.
type respBlock struct {
	resp http.Response
	vals [10]string
}

// field locates one header value in the head's value buffer.
type field struct {
	key        string
	start, end int
}

// StatusLine returns "200 OK" and the like for a code with a standard text,
// "" otherwise, without allocating. Safe for concurrent use.
func StatusLine(code int) string {
	if code >= 0 && code < len(statusLines) {
		return statusLines[code]
	}
	return ""
}

// statusLines holds "200 OK" and friends, indexed by code.
var statusLines = func() []string {
	out := make([]string, 600)
	for code := 100; code < 600; code++ {
		if t := http.StatusText(code); t != "" {
			out[code] = strconv.Itoa(code) + " " + t
		}
	}
	return out
}()

// commonKeys interns the canonical form of frequent response header names.
var commonKeys = func() map[string]string {
	m := map[string]string{}
	for _, k := range []string{
		"Accept-Ranges", "Age", "Cache-Control", "Connection", "Content-Encoding", "Content-Language",
		"Content-Length", "Content-Type", "Date", "Etag", "Expires", "Keep-Alive", "Last-Modified",
		"Location", "Server", "Set-Cookie", "Trailer", "Transfer-Encoding", "Vary", "Via",
		"X-Content-Type-Options", "X-Frame-Options", "X-Request-Id", "Traceparent", "Tracestate",
		"Grpc-Status", "Grpc-Message", "Strict-Transport-Security", "Access-Control-Allow-Origin",
	} {
		m[k] = k
		m[strings.ToLower(k)] = k
	}
	m["ETag"] = "Etag"
	return m
}()

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

// readLineBytes reads one CRLF-terminated line without the terminator. The
// slice is valid until the next read.
func (c *conn) readLineBytes() ([]byte, error) {
	line, err := c.br.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		c.broken.Store(true)
		return nil, errors.New("h1: response header line too long")
	}
	if err != nil {
		if err == io.EOF && len(line) > 0 {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	n := len(line) - 1
	if n > 0 && line[n-1] == '\r' {
		n--
	}
	return line[:n], nil
}

// attachBody frames the response body and decides whether the connection
// can be reused once it is read.
func (c *conn) attachBody(req *http.Request, resp *http.Response) error {
	if cls := resp.Header["Content-Length"]; len(cls) > 1 {
		for _, v := range cls[1:] {
			if v != cls[0] {
				// Conflicting lengths cannot frame the body safely.
				c.broken.Store(true)
				return fmt.Errorf("h1: conflicting Content-Length values %q", cls)
			}
		}
		resp.Header["Content-Length"] = cls[:1]
	}
	if cls := resp.Header["Content-Length"]; len(cls) == 1 {
		if n, err := strconv.ParseUint(cls[0], 10, 63); err != nil || cls[0] == "" || n > 1<<62 {
			c.broken.Store(true)
			return fmt.Errorf("h1: bad Content-Length %q", cls[0])
		}
	}
	// Transfer codings exist from HTTP/1.1 on: an HTTP/1.0 body runs to the close.
	te := resp.Header["Transfer-Encoding"]
	if resp.ProtoMinor == 0 {
		te = nil
	}
	if len(te) > 0 && (len(te) != 1 || !strings.EqualFold(te[0], "chunked")) {
		c.broken.Store(true)
		return fmt.Errorf("h1: unsupported Transfer-Encoding %q", te)
	}
	reuse := resp.ProtoMinor == 1
	for _, v := range resp.Header["Connection"] {
		for v != "" {
			var tok string
			tok, v, _ = strings.Cut(v, ",")
			switch tok = strings.TrimSpace(tok); {
			case strings.EqualFold(tok, "close"):
				reuse = false
			case strings.EqualFold(tok, "keep-alive"):
				if resp.ProtoMinor == 0 {
					reuse = true
				}
			}
		}
	}
	if resp.ProtoMinor == 0 && reuse {
		// HTTP/1.0 keep-alive needs a length to frame the body.
		_, hasLen := resp.Header["Content-Length"]
		reuse = hasLen
	}
	resp.Close = !reuse
	noBody := req.Method == http.MethodHead || resp.StatusCode/100 == 1 || resp.StatusCode == http.StatusNoContent || resp.StatusCode == http.StatusNotModified
	var r io.Reader
	switch {
	case noBody:
		resp.ContentLength = 0
		if cl := resp.Header.Get("Content-Length"); cl != "" && req.Method == http.MethodHead {
			resp.ContentLength, _ = strconv.ParseInt(cl, 10, 64)
		}
		resp.Body = http.NoBody
		c.finish(reuse)
		return nil
	case len(te) > 0:
		r = httputil.NewChunkedReader(c.br)
		delete(resp.Header, "Transfer-Encoding")
		// A length beside chunked framing is wrong and must not reach the
		// caller, whose answer is framed anew (RFC 9112 §6.3).
		delete(resp.Header, "Content-Length")
		resp.TransferEncoding = []string{"chunked"}
		resp.ContentLength = -1
	default:
		cl := resp.Header.Get("Content-Length")
		if cl == "" {
			reuse = false
			resp.Close = true
			resp.ContentLength = -1
			r = c.br
			break
		}
		n, err := strconv.ParseInt(cl, 10, 64)
		if err != nil || n < 0 {
			c.broken.Store(true)
			return fmt.Errorf("h1: bad Content-Length %q", cl)
		}
		resp.ContentLength = n
		if n == 0 {
			resp.Body = http.NoBody
			c.finish(reuse)
			return nil
		}
		b := &body{c: c, reuse: reuse, want: n}
		b.limited = io.LimitedReader{R: c.br, N: n}
		b.r = &b.limited
		resp.Body = b
		return nil
	}
	resp.Body = &body{c: c, r: r, reuse: reuse, want: resp.ContentLength, chunked: resp.TransferEncoding != nil && reuse}
	return nil
}

// finish ends an exchange: the connection goes back to the pool or is closed.
//
// A connection that holds bytes past the answer's end (a HEAD or 304
// answer with a body, a body longer than its Content-Length) is closed:
// those bytes would otherwise be read as the next request's answer.
func (c *conn) finish(reuse bool) {
	c.release()
	if !reuse || c.canceled.Load() || c.broken.Load() || c.leftover() {
		c.close()
		return
	}
	c.reused = false
	c.ctx = nil
	c.reqBody = nil // the watch was stopped in time: abort will not run
	c.t.put(c)
}

// body is a response body; reading it to the end returns the connection.
type body struct {
	c     *conn
	r     io.Reader
	reuse bool
	want  int64
	got   int64
	done  bool
	mu    sync.Mutex
	// chunked bodies end with a trailer section to consume before reuse.
	chunked bool
	// limited frames a body of known length; part of body to save an allocation.
	limited io.LimitedReader
}

func (b *body) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return 0, io.EOF
	}
	n, err := b.r.Read(p)
	b.got += int64(n)
	if err == io.EOF && b.chunked {
		// The chunked reader stops at the last chunk; the trailer section
		// (usually just CRLF) must be read before the connection is reused.
		// Like net/http, the section must end with CRLF.
		for {
			l, lerr := b.c.br.ReadSlice('\n')
			if lerr != nil || string(l) == "\n" {
				b.c.broken.Store(true)
				b.end(false)
				return n, io.ErrUnexpectedEOF
			}
			if string(l) == "\r\n" {
				break
			}
		}
	}
	if err == io.EOF {
		if b.want > 0 && b.got < b.want {
			err = io.ErrUnexpectedEOF
			b.c.broken.Store(true)
			b.end(false)
			return n, err
		}
		b.end(b.reuse)
		return n, io.EOF
	}
	if err != nil {
		if b.c.canceled.Load() {
			if cerr := b.c.ctxErr(); cerr != nil {
				err = cerr
			}
		}
		b.c.broken.Store(true)
		b.end(false)
		return n, err
	}
	if b.want > 0 && b.got == b.want {
		// Fixed length fully read: the connection is free now.
		b.end(b.reuse)
		if n > 0 {
			return n, nil
		}
		return 0, io.EOF
	}
	return n, nil
}

func (c *conn) ctxErr() error {
	if c.ctx == nil {
		return nil
	}
	return c.ctx.Err()
}

func (b *body) end(reuse bool) {
	if b.done {
		return
	}
	b.done = true
	b.c.finish(reuse)
}

// Close discards an unread body (closing the connection rather than reading
// more than a little of it).
func (b *body) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return nil
	}
	b.end(false)
	return nil
}

// Idle reports how many pooled idle connections there are to addr.
func (t *Transport) Idle(addr string) int {
	p := (*t.pools.Load())[addr]
	if p == nil {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}
