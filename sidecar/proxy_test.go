package sidecar

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

func TestRoutingThreeWays(t *testing.T) {
	seen := make(chan *http.Request, 10)
	b := newBackend(t, "p1", func(w http.ResponseWriter, r *http.Request) {
		seen <- r
		fmt.Fprint(w, "ok")
	})
	s := start(t, fmt.Sprintf(`
discovery: {static: {payments: [%s]}}
upstreams:
  payments: {listen: 127.0.0.1:0, balance: {algorithm: round_robin}}
`, b.addr()))
	c := proxyClient(s)

	check := func(how string, resp *http.Response, err error, wantHost string) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", how, err)
		}
		if body := readAll(t, resp); resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("%s: want 200 ok, have %d %q", how, resp.StatusCode, body)
		}
		r := <-seen
		if r.Host != wantHost {
			t.Errorf("%s: backend saw Host %q, want %q", how, r.Host, wantHost)
		}
		if r.URL.Path != "/x" || r.URL.RawQuery != "q=1" {
			t.Errorf("%s: backend saw %s, want /x?q=1", how, r.URL)
		}
		if xff := r.Header.Get("X-Forwarded-For"); xff != "127.0.0.1" {
			t.Errorf("%s: X-Forwarded-For %q, want 127.0.0.1", how, xff)
		}
		if p := r.Header.Get("X-Forwarded-Proto"); p != "http" {
			t.Errorf("%s: X-Forwarded-Proto %q, want http", how, p)
		}
	}
	resp, err := c.Get("http://payments/x?q=1")
	check("forward proxy", resp, err, "payments")
	resp, err = c.Get("http://payments.service.consul/x?q=1")
	check("forward proxy .service.consul", resp, err, "payments.service.consul")

	req, _ := http.NewRequest("GET", "http://"+s.Addr("outbound")+"/x?q=1", nil)
	req.Host = "payments"
	resp, err = http.DefaultClient.Do(req)
	check("host header", resp, err, "payments")

	resp, err = http.Get("http://" + s.Addr("upstream:payments") + "/x?q=1")
	check("dedicated listener", resp, err, "payments")
}

func TestUnknownAndEmptyUpstreams(t *testing.T) {
	s := start(t, `
discovery: {static: {empty: [127.0.0.1:1]}}
upstreams: {empty: {}}
`)
	// A catalog may not list a service with no instance (config refuses
	// it); discovery can still leave an upstream with none, as Consul does.
	s.lookup("empty").pool.Update(nil, "")
	c := proxyClient(s)
	resp, err := c.Get("http://inventory/")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); resp.StatusCode != 403 || !strings.Contains(body, `unknown upstream "inventory"`) {
		t.Fatalf("unknown: want 403 naming inventory, have %d %q", resp.StatusCode, body)
	}
	resp, err = c.Get("http://empty/")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); resp.StatusCode != 502 || !strings.Contains(body, `upstream "empty" has no instances`) {
		t.Fatalf("empty: want 502 naming empty, have %d %q", resp.StatusCode, body)
	}
	// CONNECT to an unknown name is refused too: meshd is not an open proxy.
	conn, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
	resp, err = http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil || resp.StatusCode != 403 {
		t.Fatalf("CONNECT to unknown: want 403, have %v %v", resp, err)
	}
}

func TestHopByHopHeaders(t *testing.T) {
	seen := make(chan http.Header, 1)
	b := newBackend(t, "p1", func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Header.Clone()
		w.Header().Set("Connection", "X-Resp-Hop")
		w.Header().Set("X-Resp-Hop", "secret")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("X-End-To-End", "kept")
		fmt.Fprint(w, "ok")
	})
	s := start(t, fmt.Sprintf("discovery: {static: {payments: [%s]}}\nupstreams: {payments: {}}\n", b.addr()))
	conn, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "GET http://payments/h HTTP/1.1\r\nHost: payments\r\n"+
		"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"+
		"Proxy-Connection: keep-alive\r\nTE: gzip\r\nUpgrade: h9\r\nX-Kept: yes\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	h := <-seen
	for _, k := range []string{"X-Hop", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "Te", "Upgrade"} {
		if v, ok := h[k]; ok {
			t.Errorf("hop-by-hop request header %s=%q reached the backend", k, v)
		}
	}
	if h.Get("X-Kept") != "yes" {
		t.Errorf("end-to-end request header X-Kept lost")
	}
	if v := resp.Header.Get("X-Resp-Hop"); v != "" {
		t.Errorf("hop-by-hop response header X-Resp-Hop=%q reached the client", v)
	}
	if resp.Header.Get("Keep-Alive") != "" {
		t.Errorf("Keep-Alive response header reached the client")
	}
	if resp.Header.Get("X-End-To-End") != "kept" {
		t.Errorf("end-to-end response header lost")
	}
}

// patternReader yields n deterministic bytes without holding them.
type patternReader struct{ n, off int64 }

func (p *patternReader) Read(b []byte) (int, error) {
	if p.off >= p.n {
		return 0, io.EOF
	}
	if rem := p.n - p.off; int64(len(b)) > rem {
		b = b[:rem]
	}
	for i := range b {
		b[i] = byte((p.off + int64(i)) % 251)
	}
	p.off += int64(len(b))
	return len(b), nil
}

func TestLargeBodiesStreamInBoundedMemory(t *testing.T) {
	const size = 100 << 20
	b := newBackend(t, "big", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		w.Header().Set("X-Received", fmt.Sprint(n))
		w.Header().Set("X-Sum", hex.EncodeToString(h.Sum(nil)))
		io.Copy(w, &patternReader{n: size})
	})
	s := start(t, fmt.Sprintf("discovery: {static: {big: [%s]}}\nupstreams: {big: {}}\n", b.addr()))

	var peak uint64
	var base runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&base)
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var m runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			runtime.ReadMemStats(&m)
			if m.HeapInuse > peak {
				peak = m.HeapInuse
			}
		}
	}()
	want := sha256.New()
	io.Copy(want, &patternReader{n: size})
	req, _ := http.NewRequest("POST", "http://big/upload", io.NopCloser(&patternReader{n: size}))
	req.ContentLength = -1 // chunked: meshd cannot know the size up front
	resp, err := proxyClient(s).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got := sha256.New()
	n, err := io.Copy(got, resp.Body)
	resp.Body.Close()
	close(stop)
	<-sampled
	if err != nil || n != size {
		t.Fatalf("response: read %d bytes, err %v; want %d", n, err, size)
	}
	if resp.Header.Get("X-Received") != fmt.Sprint(size) || resp.Header.Get("X-Sum") != hex.EncodeToString(want.Sum(nil)) {
		t.Fatalf("request body corrupted: backend got %s bytes, sum %s", resp.Header.Get("X-Received"), resp.Header.Get("X-Sum"))
	}
	if hex.EncodeToString(got.Sum(nil)) != hex.EncodeToString(want.Sum(nil)) {
		t.Fatal("response body corrupted")
	}
	growth := int64(peak) - int64(base.HeapInuse)
	t.Logf("heap in use grew by at most %d KiB while moving 2×100 MiB", growth>>10)
	if growth > 32<<20 {
		t.Fatalf("heap grew by %d MiB: bodies are being buffered", growth>>20)
	}
}

func TestWebSocketEcho(t *testing.T) {
	ws := newBackend(t, "ws", websocket.Handler(func(c *websocket.Conn) { io.Copy(c, c) }).ServeHTTP)
	s := start(t, fmt.Sprintf("discovery: {static: {chat: [%s]}}\nupstreams: {chat: {listen: 127.0.0.1:0}}\n", ws.addr()))
	addr := s.Addr("upstream:chat")
	conn, err := websocket.Dial("ws://"+addr+"/echo", "", "http://"+addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for i := 0; i < 5; i++ {
		msg := fmt.Sprintf("hello %d", i)
		if err := websocket.Message.Send(conn, msg); err != nil {
			t.Fatal(err)
		}
		var reply string
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if err := websocket.Message.Receive(conn, &reply); err != nil {
			t.Fatal(err)
		}
		if reply != msg {
			t.Fatalf("echo: want %q, have %q", msg, reply)
		}
	}
}

func TestConnectTunnel(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	s := start(t, fmt.Sprintf("discovery: {static: {db: [%s]}}\nupstreams: {db: {}}\n", ln.Addr()))
	conn, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "CONNECT db:443 HTTP/1.1\r\nHost: db:443\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: want 200, have %v %v", resp, err)
	}
	for i := 0; i < 3; i++ {
		msg := fmt.Sprintf("ping %d\n", i)
		conn.Write([]byte(msg))
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, err := br.ReadString('\n')
		if err != nil || line != msg {
			t.Fatalf("tunnel echo: want %q, have %q (%v)", msg, line, err)
		}
	}
}

func TestServerSentEventsArriveOneByOne(t *testing.T) {
	next := make(chan struct{})
	b := newBackend(t, "sse", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Content-Length", "") // no length: a stream
		for i := 0; i < 3; i++ {
			fmt.Fprintf(w, "data: event %d\n\n", i)
			w.(http.Flusher).Flush()
			select {
			case <-next: // the client saw this event before we write the next
			case <-time.After(10 * time.Second):
				return
			}
		}
	})
	s := start(t, fmt.Sprintf("discovery: {static: {events: [%s]}}\nupstreams: {events: {}}\n", b.addr()))
	resp, err := proxyClient(s).Get("http://events/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	lines := make(chan string, 16)
	go func() {
		defer close(lines)
		br := bufio.NewReader(resp.Body)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			if line != "\n" {
				lines <- line
			}
		}
	}()
	for i := 0; i < 3; i++ {
		select {
		case line := <-lines:
			if want := fmt.Sprintf("data: event %d\n", i); line != want {
				t.Fatalf("want %q, have %q", want, line)
			}
		case <-time.After(3 * time.Second):
			// The backend is blocked until we signal: had meshd buffered
			// the stream, the event would not have arrived.
			t.Fatalf("event %d did not arrive while the backend waited: the stream is buffered", i)
		}
		select {
		case next <- struct{}{}:
		case <-time.After(3 * time.Second):
			t.Fatal("backend stopped waiting")
		}
	}
}

// A Host no host could have is refused with 400, as net/http's server
// refuses it, on every path, and never passed on to the instance.
func TestMalformedHostIsRefused(t *testing.T) {
	b := newBackend(t, "p1", nil)
	s := start(t, fmt.Sprintf("discovery: {static: {payments: [%s]}}\nupstreams: {payments: {}}\n", b.addr()))
	for _, host := range []string{"payments:80 junk", "payments:x/../admin", "payments:1@evil.example", "pay ments", "payments\x7f"} {
		conn, err := net.Dial("tcp", s.Addr("outbound"))
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(conn, "GET / HTTP/1.1\r\nHost: "+host+"\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		conn.Close()
		if err != nil {
			t.Fatalf("Host %q: no answer: %v", host, err)
		}
		if resp.StatusCode != 400 {
			t.Errorf("Host %q: want 400, have %d", host, resp.StatusCode)
		}
	}
	if n := b.hits.Load(); n != 0 {
		t.Errorf("the instance was sent %d of the requests", n)
	}
}

func TestMalformedAndOversizedRequests(t *testing.T) {
	b := newBackend(t, "p1", nil)
	s := start(t, fmt.Sprintf("discovery: {static: {payments: [%s]}}\nupstreams: {payments: {}}\nproxy: {max_header_bytes: 4096, read_header_timeout: 300ms}\n", b.addr()))
	send := func(raw string) *http.Response {
		t.Helper()
		conn, err := net.Dial("tcp", s.Addr("outbound"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(conn, raw)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("no response to %q...: %v", raw[:min(len(raw), 30)], err)
		}
		return resp
	}
	if r := send("GARBAGE\r\n\r\n"); r.StatusCode != 400 {
		t.Errorf("malformed request line: want 400, have %d", r.StatusCode)
	}
	if r := send("GET / HTTP/1.1\r\nHost: payments\r\nBad Header Line\r\n\r\n"); r.StatusCode != 400 {
		t.Errorf("malformed header: want 400, have %d", r.StatusCode)
	}
	big := "GET / HTTP/1.1\r\nHost: payments\r\nX-Big: " + strings.Repeat("a", 16<<10) + "\r\n\r\n"
	if r := send(big); r.StatusCode != 431 {
		t.Errorf("oversized header: want 431, have %d", r.StatusCode)
	}
	// Still serving.
	if r := send("GET / HTTP/1.1\r\nHost: payments\r\n\r\n"); r.StatusCode != 200 {
		t.Errorf("after bad input: want 200, have %d", r.StatusCode)
	}

	// A client that dribbles its headers is cut off by the header timeout.
	conn, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	closed := make(chan time.Time, 1)
	go func() {
		buf := make([]byte, 512)
		for {
			if _, err := conn.Read(buf); err != nil {
				closed <- time.Now()
				return
			}
		}
	}()
	began := time.Now()
	slow := "GET / HTTP/1.1\r\nHost: payments\r\nX-Slow: " + strings.Repeat("s", 200)
	var cutAt time.Time
	for i := 0; i < len(slow) && cutAt.IsZero(); i++ {
		if _, err := conn.Write([]byte{slow[i]}); err != nil {
			break
		}
		select {
		case cutAt = <-closed:
		case <-time.After(20 * time.Millisecond):
		}
	}
	if cutAt.IsZero() {
		select {
		case cutAt = <-closed:
		case <-time.After(5 * time.Second):
			t.Fatal("a client sending headers byte by byte was never cut off")
		}
	}
	if d := cutAt.Sub(began); d > 3*time.Second {
		t.Fatalf("slow client cut off after %v; header timeout is 300ms", d)
	}
}

func TestRetriesOnAnotherInstanceWhenOneIsDown(t *testing.T) {
	good := newBackend(t, "good", nil)
	deadAddr := rzClosedAddr(t)
	s := start(t, fmt.Sprintf("discovery: {static: {payments: [%s, %s]}}\nupstreams: {payments: {balance: {algorithm: round_robin}}}\n", deadAddr, good.addr()))
	c := proxyClient(s)
	for i := 0; i < 20; i++ {
		resp, err := c.Get("http://payments/")
		if err != nil {
			t.Fatal(err)
		}
		if body := readAll(t, resp); resp.StatusCode != 200 || body != "good" {
			t.Fatalf("request %d: want 200 from good, have %d %q", i, resp.StatusCode, body)
		}
	}
}

func TestH2CUpstreamWithTrailers(t *testing.T) {
	var sawProto sync.Map
	h2 := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sawProto.Store(r.Proto, true)
		w.Header().Set("Trailer", "Grpc-Status")
		w.Header().Set("Content-Type", "application/grpc")
		io.WriteString(w, "payload")
		w.Header().Set("Grpc-Status", "0")
	})}
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	h2.Protocols = p
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	go h2.Serve(ln)
	defer h2.Close()
	s := start(t, fmt.Sprintf("discovery: {static: {grpc: [%s]}}\nupstreams: {grpc: {listen: 127.0.0.1:0, h2c: true}}\n", ln.Addr()))

	cp := new(http.Protocols)
	cp.SetUnencryptedHTTP2(true)
	client := &http.Client{Transport: &http.Transport{Protocols: cp}}
	req, _ := http.NewRequest("POST", "http://"+s.Addr("upstream:grpc")+"/pkg.Svc/Method", strings.NewReader("req"))
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("TE", "trailers")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body := readAll(t, resp)
	if body != "payload" || resp.ProtoMajor != 2 {
		t.Fatalf("want payload over HTTP/2, have %q over %s", body, resp.Proto)
	}
	if resp.Trailer.Get("Grpc-Status") != "0" {
		t.Fatalf("trailer Grpc-Status lost: %v", resp.Trailer)
	}
	if _, ok := sawProto.Load("HTTP/2.0"); !ok {
		t.Fatal("backend was not spoken to over HTTP/2")
	}
}

// Plain HTTP/1.1 exchanges must take the synchronous client; requests that
// need net/http (here one announcing trailers) must not.
func TestPlainRequestsTakeTheFastClient(t *testing.T) {
	var conns atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	// The h1 client is what is tested: the event loops, which send plain
	// GETs themselves, are off (TestEventLoop* test those).
	s := start(t, fmt.Sprintf("proxy: {event_loop: false}\ndiscovery: {static: {p: [%s]}}\nupstreams: {p: {}}\n", addr))
	fast := s.lookup("p").settings.Load().transport.fast
	if fast == nil {
		t.Fatal("no fast client for a plain HTTP/1.1 upstream")
	}
	for i := 0; i < 3; i++ {
		resp, err := proxyClient(s).Get("http://p/")
		if err != nil {
			t.Fatal(err)
		}
		readAll(t, resp)
	}
	if n := fast.Idle(addr); n != 1 || conns.Load() != 1 {
		t.Fatalf("after plain GETs: fast client pools %d, backend saw %d connections; want 1 and 1", n, conns.Load())
	}
	req, _ := http.NewRequest("GET", "http://p/", nil)
	req.Header.Set("TE", "trailers")
	resp, err := proxyClient(s).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	// net/http's transport opened its own connection.
	if conns.Load() != 2 {
		t.Fatalf("a request announcing trailers did not go through net/http: backend saw %d connections, want 2", conns.Load())
	}
}

// The inbound proxy sends each request to the app once: callers' sidecars
// retry, so retrying here too would multiply the load on a struggling app.
func TestInboundDoesNotRetry(t *testing.T) {
	app := newBackend(t, "app", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "busy", http.StatusServiceUnavailable) })
	_, port, _ := net.SplitHostPort(app.addr())
	s := start(t, fmt.Sprintf("listen: {outbound: 127.0.0.1:0, admin: 127.0.0.1:0, inbound: 127.0.0.1:0}\nservice: {name: orders, port: %s}\n", port))
	resp, err := http.Get("http://" + s.Addr("inbound") + "/x")
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	if resp.StatusCode != 503 || app.hits.Load() != 1 {
		t.Fatalf("want the app's 503 after exactly one try, have %d after %d tries", resp.StatusCode, app.hits.Load())
	}
}

// Trailers a caller sends after a chunked request body reach the instance,
// whether meshd buffered the body to be able to retry it or streamed it.
func TestRequestTrailersReachTheInstance(t *testing.T) {
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%d %s", n, r.Trailer.Get("X-Checksum"))
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {retry: {buffer_body: 1024}}}\n", b.addr()))
	for _, tc := range []struct {
		method string
		size   int
	}{{"POST", 10}, {"POST", 4096}, {"GET", 0}} { // buffered, streamed, empty
		size := tc.size
		body := io.MultiReader(strings.NewReader(strings.Repeat("x", size)))
		req, _ := http.NewRequest(tc.method, "http://svc/up", body)
		req.TransferEncoding = []string{"chunked"} // even for an empty GET body
		req.Trailer = http.Header{"X-Checksum": nil}
		req.Body = &trailerSetter{ReadCloser: io.NopCloser(body), req: req, value: fmt.Sprint("sum-", size)}
		resp, err := proxyClient(s).Do(req)
		if err != nil {
			t.Fatalf("%d bytes: %v", size, err)
		}
		want := fmt.Sprintf("%d sum-%d", size, size)
		if have := readAll(t, resp); resp.StatusCode != 200 || have != want {
			t.Errorf("%d bytes: want 200 %q, have %d %q", size, want, resp.StatusCode, have)
		}
	}
}

// trailerSetter sets a request's trailer value when its body ends, as a
// client computing a checksum while it sends would.
type trailerSetter struct {
	io.ReadCloser
	req   *http.Request
	value string
}

func (t *trailerSetter) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	if err == io.EOF {
		t.req.Trailer.Set("X-Checksum", t.value)
	}
	return n, err
}

// An HTTP/2 caller may send a length and trailers both; the trailers still
// reach the instance, which meshd then sends the body to chunked.
func TestH2CallerTrailersWithALength(t *testing.T) {
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%d %s", n, r.Trailer.Get("X-Checksum"))
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {listen: 127.0.0.1:0, retry: {buffer_body: 1024}}}\n", b.addr()))
	cp := new(http.Protocols)
	cp.SetUnencryptedHTTP2(true)
	client := &http.Client{Transport: &http.Transport{Protocols: cp}}
	for _, size := range []int{10, 4096} { // buffered, streamed
		req, _ := http.NewRequest("POST", "http://"+s.Addr("upstream:svc")+"/up", nil)
		req.ContentLength = int64(size)
		req.Trailer = http.Header{"X-Checksum": nil}
		body := strings.NewReader(strings.Repeat("x", size))
		req.Body = &trailerSetter{ReadCloser: io.NopCloser(body), req: req, value: fmt.Sprint("sum-", size)}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%d bytes: %v", size, err)
		}
		want := fmt.Sprintf("%d sum-%d", size, size)
		if have := readAll(t, resp); resp.StatusCode != 200 || have != want || resp.ProtoMajor != 2 {
			t.Errorf("%d bytes: want 200 %q over HTTP/2, have %d %q over %s", size, want, resp.StatusCode, have, resp.Proto)
		}
	}
}

// A CONNECT that finds every instance's breaker open is answered 503, like
// any other request with no instance to send it to; one whose instances
// refuse the connection, 502.
func TestConnectWithNoInstanceAvailable(t *testing.T) {
	dead := rzClosedAddr(t)
	s := start(t, fmt.Sprintf("discovery: {static: {db: [%s]}}\nupstreams: {db: {breaker: {consecutive_failures: 1, open_for: 1m}}}\n", dead))
	connect := func() (int, string) {
		conn, err := net.Dial("tcp", s.Addr("outbound"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprint(conn, "CONNECT db:443 HTTP/1.1\r\nHost: db:443\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: "CONNECT"})
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, readAll(t, resp)
	}
	if st, body := connect(); st != http.StatusBadGateway || !strings.Contains(body, "accepted the tunnel") {
		t.Errorf("refused: want 502, have %d %q", st, body)
	}
	if st, body := connect(); st != http.StatusServiceUnavailable || !strings.Contains(body, "every circuit breaker is open") {
		t.Errorf("breaker open: want 503 saying so, have %d %q", st, body)
	}
}

// Large and streamed uploads stream both ways: an instance that answers
// before reading the upload (a 413) gets its answer through, not a 502 for
// the write it stopped reading; one that echoes as it reads is not stalled
// by meshd still writing the body.
func TestUploadsStreamBothWays(t *testing.T) {
	t.Run("early answer", func(t *testing.T) {
		b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "too big", http.StatusRequestEntityTooLarge)
		})
		s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\n", b.addr()))
		const size = 32 << 20 // past what loopback socket buffers hold
		req, _ := http.NewRequest("POST", "http://p/up", io.NopCloser(&patternReader{n: size}))
		req.ContentLength = size
		resp, err := proxyClient(s).Do(req)
		if err != nil {
			t.Fatalf("client: %v", err)
		}
		if body := readAll(t, resp); resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Fatalf("want the instance's 413, have %d %q", resp.StatusCode, body)
		}
	})
	t.Run("echo", func(t *testing.T) {
		b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
			http.NewResponseController(w).EnableFullDuplex()
			io.Copy(w, r.Body)
		})
		s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {timeouts: {request: 10s}}}\n", b.addr()))
		const size = 32 << 20
		pr, pw := io.Pipe()
		go func() { io.Copy(pw, &patternReader{n: size}); pw.Close() }()
		req, _ := http.NewRequest("POST", "http://p/echo", pr)
		resp, err := proxyClient(s).Do(req)
		if err != nil {
			t.Fatalf("client: %v", err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if n != size || err != nil {
			t.Fatalf("status %d, echoed %d of %d bytes, err %v", resp.StatusCode, n, size, err)
		}
	})
}

// The inbound waits on the local app as long as the caller's budget allows:
// no response-header timeout of its own (15s for upstreams), which would
// cut a slow endpoint of the app (a report, a long poll) whatever the
// caller set.
func TestInboundHasNoHeaderTimeoutOfItsOwn(t *testing.T) {
	app := newBackend(t, "app", nil)
	_, port, _ := net.SplitHostPort(app.addr())
	s := start(t, fmt.Sprintf("listen: {inbound: 127.0.0.1:0}\nservice: {name: orders, port: %s}\n", port))
	if _, err := http.Get("http://" + s.Addr("inbound") + "/"); err != nil {
		t.Fatal(err)
	}
	u := s.inbound.Load()
	if u == nil {
		t.Fatal("no inbound upstream after a request")
	}
	if rh := u.guard.Config().Timeouts.ResponseHeader; rh != 0 {
		t.Errorf("inbound guard: response_header %v, want none", rh)
	}
	if rh := u.settings.Load().transport.std.ResponseHeaderTimeout; rh != 0 {
		t.Errorf("inbound transport: ResponseHeaderTimeout %v, want none", rh)
	}
}

// On the inbound listener the caller is remote: its X-Forwarded-Proto is
// not passed on to the app (meshd knows the hop was plain HTTP), while the
// local app's own, on the outbound side, is kept.
func TestInboundSetsForwardedProto(t *testing.T) {
	seen := make(chan string, 2)
	app := newBackend(t, "app", func(w http.ResponseWriter, r *http.Request) { seen <- r.Header.Get("X-Forwarded-Proto") })
	_, port, _ := net.SplitHostPort(app.addr())
	s := start(t, fmt.Sprintf("listen: {inbound: 127.0.0.1:0}\nservice: {name: orders, port: %s}\ndiscovery: {static: {orders: [%s]}}\nupstreams: {orders: {}}\n", port, app.addr()))
	req, _ := http.NewRequest("GET", "http://"+s.Addr("inbound")+"/", nil)
	req.Header.Set("X-Forwarded-Proto", "https")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	if have := <-seen; have != "http" {
		t.Errorf("inbound: want X-Forwarded-Proto http, have %q", have)
	}
	req, _ = http.NewRequest("GET", "http://orders/", nil)
	req.Header.Set("X-Forwarded-Proto", "https")
	resp, err = proxyClient(s).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	if have := <-seen; have != "https" {
		t.Errorf("outbound: want the app's X-Forwarded-Proto https kept, have %q", have)
	}
}

// A tunnel's access line counts the instances it dialled.
func TestConnectAccessLineCountsTries(t *testing.T) {
	dead := rzClosedAddr(t)
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { echo.Close() })
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	logs := &syncBuf{}
	s := startLogged(t, fmt.Sprintf("discovery: {static: {db: [%s, %s]}}\nupstreams: {db: {balance: {algorithm: round_robin}}}\n", dead, echo.Addr()), logs)
	for i := 0; i < 2; i++ { // round robin: one of the two starts with the dead instance
		conn, err := net.Dial("tcp", s.Addr("outbound"))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprint(conn, "CONNECT db:443 HTTP/1.1\r\nHost: db:443\r\n\r\n")
		if resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: "CONNECT"}); err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT %d: %v %v", i, resp, err)
		}
		conn.Close()
	}
	waitFor(t, "two access lines", func() bool { return strings.Count(logs.String(), "method=CONNECT") == 2 })
	// Round robin puts the dead instance first for at least one of them.
	if l := logs.String(); !strings.Contains(l, "attempts=2") {
		t.Errorf("want a tunnel line with attempts=2 (the dead instance, then the live one):\n%s", l)
	}
}

// A turn's clock gives one reading until it is reset; a nil one reads the
// clock each time.
func TestTurnClock(t *testing.T) {
	var c turnClock
	a := c.now()
	for time.Since(a) <= 0 {
		// the clock has to move on for the test to say anything
	}
	if b := c.now(); !b.Equal(a) {
		t.Fatalf("the same turn gave %v, then %v", a, b)
	}
	c.reset()
	if b := c.now(); !b.After(a) {
		t.Fatalf("after reset the turn gave %v, not after %v", b, a)
	}
	var n *turnClock
	x := n.now()
	for time.Since(x) <= 0 {
		// as above
	}
	if y := n.now(); !y.After(x) {
		t.Fatalf("a nil turnClock gave %v, then %v", x, y)
	}
}
