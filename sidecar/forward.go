package sidecar

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/meshd/meshd/balance"
)

// proxyHandler serves the outbound listener and the dedicated per-upstream listeners.
type proxyHandler struct {
	s *Sidecar
	l *listener
}

func (h *proxyHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s := h.s
	start := time.Now()
	u, rerr := s.route(r, h.l)
	if rerr != nil {
		s.fail(w, r, nil, "", rerr.status, rerr.msg, start, 0)
		return
	}
	u.requests.Add(1)
	u.lastUsed.Store(start.UnixNano())
	if r.Method == http.MethodConnect {
		s.tunnel(w, r, u, start)
		return
	}
	s.forward(w, r, u, start, h.l.fixed.Load() != nil)
}

// defaultAttempts bounds tries per request until resilience settings say otherwise.
const defaultAttempts = 3

// defaultBufferBody is the largest request body kept for a resend.
const defaultBufferBody = 64 << 10

// latencyAlpha weighs each new response time in the instance's average.
const latencyAlpha = 0.3

// forward sends r to an instance of u, retrying on another instance when the
// first could not be reached, and streams the response back.
func (s *Sidecar) forward(w http.ResponseWriter, r *http.Request, u *upstream, start time.Time, dedicated bool) {
	set := u.settings.Load()
	snap := u.pool.Load()
	if len(snap.Endpoints) == 0 {
		reason := snap.Reason
		if reason == "" {
			reason = "discovery has not answered yet"
			if stale, _, err := u.stale(); stale {
				reason = "discovery failing: " + err.Error()
			}
		}
		s.fail(w, r, u, "", http.StatusBadGateway, "upstream "+quote(u.name)+" has no instances: "+reason, start, 0)
		return
	}
	cfg := s.cfg.Load()
	hdr := make(http.Header, len(r.Header)+2)
	copyEndToEnd(hdr, r.Header)
	upgrade := upgradeType(r.Header)
	if upgrade != "" {
		hdr["Connection"] = []string{"Upgrade"}
		hdr["Upgrade"] = []string{upgrade}
	}
	if wantsTrailers(r.Header) {
		hdr["Te"] = []string{"trailers"}
	}
	peer := remoteIP(r)
	if cfg.Proxy.XForwardedOn() {
		setForwarded(hdr, r, peer)
	}
	clientIP := peer
	if cfg.Proxy.TrustForwardedFor {
		if ip, ok := firstForwarded(r.Header); ok {
			clientIP = ip
		}
	}
	host := r.Host
	if dedicated {
		host = u.name
	}

	body, err := prepareBody(r, defaultBufferBody)
	if err != nil {
		s.fail(w, r, u, "", http.StatusBadRequest, "reading the request body: "+err.Error(), start, 0)
		return
	}
	preq := balance.Request{HTTP: r, ClientIP: clientIP}
	attempts := defaultAttempts
	var lastErr error
	for attempt := 0; attempt < attempts; attempt++ {
		preq.Now = time.Now().UnixNano()
		ep, err := snap.Picker.Pick(&preq)
		if errors.Is(err, balance.ErrNoneAvailable) && preq.Tried() > 0 && preq.Tried() >= len(snap.Endpoints) {
			preq.ClearExcluded()
			ep, err = snap.Picker.Pick(&preq)
		}
		if err != nil {
			msg := "no available instance of " + quote(u.name) + ": " + err.Error()
			if lastErr != nil {
				msg += " (last error: " + lastErr.Error() + ")"
			}
			s.fail(w, r, u, "", http.StatusServiceUnavailable, msg, start, attempt)
			return
		}
		preq.Exclude(ep)
		ep.MarkPicked(preq.Now)
		out := outgoing(r, ep.Address, host, hdr, body)
		ep.InFlight.Add(1)
		t0 := time.Now()
		resp, err := set.transport.RoundTrip(out)
		if err != nil {
			ep.InFlight.Add(-1)
			ep.Requests.Add(1)
			if r.Context().Err() != nil {
				s.access(r, u, ep.ID, 499, start, attempt+1, "client went away")
				return
			}
			ep.Failures.Add(1)
			u.errors.Add(1)
			lastErr = fmt.Errorf("%s: %w", ep.Address, err)
			if isDialError(err) && body.replayable() && attempt+1 < attempts && len(snap.Endpoints) > 1 {
				s.log.Debug("retrying on another instance", "upstream", u.name, "instance", ep.ID, "err", err)
				continue
			}
			status := http.StatusBadGateway
			if isTimeout(err) {
				status = http.StatusGatewayTimeout
			}
			s.fail(w, r, u, ep.ID, status, "upstream "+quote(u.name)+" instance "+ep.Address+": "+errText(err), start, attempt+1)
			return
		}
		ep.ObserveLatency(time.Since(t0), latencyAlpha)
		status, ok := s.respond(w, r, resp, ep)
		ep.InFlight.Add(-1)
		ep.Requests.Add(1)
		if !ok {
			ep.Failures.Add(1)
			u.errors.Add(1)
		}
		s.access(r, u, ep.ID, status, start, attempt+1, "")
		if !ok {
			// The status line is gone; abort so the client sees a broken
			// response rather than a short one.
			panic(http.ErrAbortHandler)
		}
		return
	}
}

// outgoing builds one attempt's request to addr.
func outgoing(r *http.Request, addr, host string, hdr http.Header, body *reqBody) *http.Request {
	u := &url.URL{Scheme: "http", Host: addr, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery}
	if r.URL.Opaque != "" {
		u.Opaque = r.URL.Opaque
	}
	out := &http.Request{
		Method:        r.Method,
		URL:           u,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        hdr,
		Host:          host,
		ContentLength: body.length,
		Body:          body.reader(),
		Trailer:       r.Trailer,
	}
	if out.Body != nil {
		out.GetBody = body.getBody
	}
	return out.WithContext(r.Context())
}

// reqBody is a request body, buffered when small enough to resend.
type reqBody struct {
	buf    []byte        // whole body when replayable
	stream io.ReadCloser // when not replayable
	length int64
	used   bool
	none   bool
}

func (b *reqBody) replayable() bool { return b.none || b.stream == nil }

func (b *reqBody) reader() io.ReadCloser {
	switch {
	case b.none:
		return nil
	case b.stream != nil:
		if b.used {
			return http.NoBody
		}
		b.used = true
		return b.stream
	default:
		return io.NopCloser(bytes.NewReader(b.buf))
	}
}

func (b *reqBody) getBody() (io.ReadCloser, error) {
	if b.stream != nil {
		return nil, errors.New("request body is streamed and cannot be resent")
	}
	return io.NopCloser(bytes.NewReader(b.buf)), nil
}

// prepareBody buffers bodies up to limit so that they can be resent; larger
// ones (and unknown lengths beyond limit) are streamed once.
func prepareBody(r *http.Request, limit int64) (*reqBody, error) {
	if r.Body == nil || r.Body == http.NoBody || (r.ContentLength == 0 && len(r.TransferEncoding) == 0) {
		return &reqBody{none: true}, nil
	}
	if r.ContentLength > limit {
		return &reqBody{stream: r.Body, length: r.ContentLength}, nil
	}
	if r.ContentLength > 0 {
		buf := make([]byte, r.ContentLength)
		if _, err := io.ReadFull(r.Body, buf); err != nil {
			return nil, err
		}
		return &reqBody{buf: buf, length: r.ContentLength}, nil
	}
	// Unknown length: read up to limit; past it, stream the rest.
	buf, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(buf)) <= limit {
		return &reqBody{buf: buf, length: int64(len(buf))}, nil
	}
	return &reqBody{stream: struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(buf), r.Body), r.Body}, length: -1}, nil
}

var copyBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// respond writes resp to w. It returns the status and false when the
// upstream's body failed part way.
func (s *Sidecar) respond(w http.ResponseWriter, r *http.Request, resp *http.Response, ep *balance.Endpoint) (int, bool) {
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return s.switchProtocols(w, r, resp)
	}
	h := w.Header()
	copyEndToEnd(h, resp.Header)
	if n := len(resp.Trailer); n > 0 {
		keys := make([]string, 0, n)
		for k := range resp.Trailer {
			keys = append(keys, k)
		}
		h["Trailer"] = []string{strings.Join(keys, ", ")}
	}
	w.WriteHeader(resp.StatusCode)
	stream := resp.ContentLength == -1 || isEventStream(resp.Header)
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	buf := *bp
	var flusher http.Flusher
	if stream {
		flusher, _ = w.(http.Flusher)
		if flusher != nil {
			flusher.Flush()
		}
	}
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				// The client is gone; nothing more can be sent.
				return resp.StatusCode, true
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if r.Context().Err() != nil {
				return resp.StatusCode, true
			}
			s.log.Warn("upstream response broke off", "instance", ep.ID, "err", rerr)
			return resp.StatusCode, false
		}
	}
	for k, vv := range resp.Trailer {
		h[http.TrailerPrefix+k] = vv
	}
	return resp.StatusCode, true
}

func isEventStream(h http.Header) bool {
	ct := h.Get("Content-Type")
	return strings.HasPrefix(ct, "text/event-stream")
}

// switchProtocols completes an upgrade (WebSocket and others): the client's
// connection is taken over and bytes are copied both ways until one side closes.
func (s *Sidecar) switchProtocols(w http.ResponseWriter, r *http.Request, resp *http.Response) (int, bool) {
	backend, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		http.Error(w, "meshd: upstream switched protocols without a usable connection", http.StatusBadGateway)
		return http.StatusBadGateway, false
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, "meshd: cannot switch protocols on this connection: "+err.Error(), http.StatusBadGateway)
		return http.StatusBadGateway, false
	}
	defer conn.Close()
	untrack := s.trackTunnel(conn)
	defer untrack()
	h := make(http.Header, len(resp.Header))
	copyEndToEnd(h, resp.Header)
	h["Connection"] = []string{"Upgrade"}
	h["Upgrade"] = []string{resp.Header.Get("Upgrade")}
	brw.WriteString("HTTP/1.1 101 Switching Protocols\r\n")
	h.Write(brw)
	brw.WriteString("\r\n")
	if err := brw.Flush(); err != nil {
		return http.StatusSwitchingProtocols, true
	}
	pipe(conn, brw.Reader, backend)
	return http.StatusSwitchingProtocols, true
}

// pipe copies client→backend (starting with what is already buffered from
// the client) and backend→client until either direction ends, then closes both.
func pipe(client net.Conn, fromClient *bufio.Reader, backend io.ReadWriteCloser) {
	done := make(chan struct{}, 2)
	go func() {
		io.Copy(backend, fromClient)
		closeWrite(backend)
		done <- struct{}{}
	}()
	go func() {
		io.Copy(client, backend)
		closeWrite(client)
		done <- struct{}{}
	}()
	<-done
	// Give the other direction a moment to finish its last bytes after a
	// half-close, then tear both down.
	t := time.NewTimer(5 * time.Second)
	select {
	case <-done:
	case <-t.C:
	}
	t.Stop()
	client.Close()
	backend.Close()
}

func closeWrite(c any) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// tunnel serves CONNECT NAME:PORT by opening a TCP connection to a picked
// instance of u (the port asked for is not used: the instance's is).
func (s *Sidecar) tunnel(w http.ResponseWriter, r *http.Request, u *upstream, start time.Time) {
	cfg := s.cfg.Load()
	if !cfg.Proxy.ConnectOn() {
		s.fail(w, r, u, "", http.StatusMethodNotAllowed, "CONNECT is disabled (proxy.allow_connect)", start, 0)
		return
	}
	set := u.settings.Load()
	snap := u.pool.Load()
	if len(snap.Endpoints) == 0 {
		s.fail(w, r, u, "", http.StatusBadGateway, "upstream "+quote(u.name)+" has no instances: "+snap.Reason, start, 0)
		return
	}
	connect := set.cfg.Timeouts.Connect
	if connect == 0 {
		connect = 2 * time.Second
	}
	preq := balance.Request{HTTP: r, ClientIP: remoteIP(r)}
	var backend net.Conn
	var ep *balance.Endpoint
	var lastErr error
	for attempt := 0; attempt < defaultAttempts && backend == nil; attempt++ {
		preq.Now = time.Now().UnixNano()
		e, err := snap.Picker.Pick(&preq)
		if err != nil {
			break
		}
		preq.Exclude(e)
		d := net.Dialer{Timeout: connect}
		c, err := d.DialContext(r.Context(), "tcp", e.Address)
		if err != nil {
			e.Failures.Add(1)
			lastErr = err
			continue
		}
		backend, ep = c, e
	}
	if backend == nil {
		msg := "no instance of " + quote(u.name) + " accepted the tunnel"
		if lastErr != nil {
			msg += ": " + lastErr.Error()
		}
		s.fail(w, r, u, "", http.StatusBadGateway, msg, start, 0)
		return
	}
	defer backend.Close()
	ep.InFlight.Add(1)
	defer ep.InFlight.Add(-1)
	ep.Requests.Add(1)
	ep.MarkPicked(preq.Now)
	s.access(r, u, ep.ID, http.StatusOK, start, 1, "")
	if r.ProtoMajor == 1 {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			http.Error(w, "meshd: cannot tunnel on this connection", http.StatusInternalServerError)
			return
		}
		defer conn.Close()
		untrack := s.trackTunnel(conn)
		defer untrack()
		conn.Write([]byte("HTTP/1.1 200 Connection Established\r\n\r\n"))
		pipe(conn, brw.Reader, backend)
		return
	}
	// HTTP/2 CONNECT: the stream is the tunnel.
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	rc.Flush()
	go func() {
		io.Copy(backend, r.Body)
		closeWrite(backend)
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := backend.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			rc.Flush()
		}
		if err != nil {
			return
		}
	}
}

// fail answers a request meshd could not forward, with a short plain-text reason.
func (s *Sidecar) fail(w http.ResponseWriter, r *http.Request, u *upstream, inst string, status int, msg string, start time.Time, attempts int) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Meshd-Error", http.StatusText(status))
	w.WriteHeader(status)
	io.WriteString(w, "meshd: "+msg+"\n")
	if u != nil && status >= 500 {
		u.errors.Add(1)
	}
	s.accessErr(r, u, inst, status, start, attempts, msg)
}

func (s *Sidecar) access(r *http.Request, u *upstream, inst string, status int, start time.Time, attempts int, errMsg string) {
	s.accessErr(r, u, inst, status, start, attempts, errMsg)
}

func (s *Sidecar) accessErr(r *http.Request, u *upstream, inst string, status int, start time.Time, attempts int, errMsg string) {
	if !s.cfg.Load().Log.AccessOn() {
		return
	}
	name := ""
	if u != nil {
		name = u.name
	}
	attrs := []slog.Attr{
		slog.String("upstream", name),
		slog.String("instance", inst),
		slog.String("method", r.Method),
		slog.String("path", r.URL.Path),
		slog.Int("status", status),
		slog.Duration("duration", time.Since(start)),
		slog.Int("attempts", attempts),
	}
	if errMsg != "" {
		attrs = append(attrs, slog.String("error", errMsg))
	}
	s.log.LogAttrs(r.Context(), slog.LevelInfo, "access", attrs...)
}

// remoteIP is the address of the connection's peer.
func remoteIP(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// firstForwarded returns the first (client-most) X-Forwarded-For hop.
func firstForwarded(h http.Header) (netip.Addr, bool) {
	v := h["X-Forwarded-For"]
	if len(v) == 0 {
		return netip.Addr{}, false
	}
	first, _, _ := strings.Cut(v[0], ",")
	ip, err := netip.ParseAddr(strings.TrimSpace(first))
	if err != nil {
		return netip.Addr{}, false
	}
	return ip.Unmap(), true
}

// setForwarded appends the peer to X-Forwarded-For and sets X-Forwarded-Proto
// when the app did not.
func setForwarded(h http.Header, r *http.Request, peer netip.Addr) {
	if peer.IsValid() {
		ip := peer.String()
		if prior := r.Header["X-Forwarded-For"]; len(prior) > 0 {
			ip = strings.Join(prior, ", ") + ", " + ip
		}
		h["X-Forwarded-For"] = []string{ip}
	}
	if _, ok := h["X-Forwarded-Proto"]; !ok {
		if r.TLS != nil {
			h["X-Forwarded-Proto"] = []string{"https"}
		} else {
			h["X-Forwarded-Proto"] = []string{"http"}
		}
	}
}

func isDialError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// errText shortens transport errors for response bodies.
func errText(err error) string {
	var op *net.OpError
	if errors.As(err, &op) {
		return op.Op + ": " + op.Err.Error()
	}
	return err.Error()
}
