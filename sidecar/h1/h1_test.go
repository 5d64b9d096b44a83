package h1

import (
	"bufio"
	"context"
	"errors"
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
)

// countingServer is a real loopback server that counts connections.
func countingServer(t *testing.T, h http.HandlerFunc) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var conns atomic.Int64
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv, &conns
}

func get(t *testing.T, tr *Transport, url string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("GET %s body: %v", url, err)
	}
	return resp, string(b)
}

func TestKeepAliveReusesOneConnection(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s %s", r.Method, r.URL.RequestURI())
	})
	tr := New(Options{})
	for i := 0; i < 50; i++ {
		resp, body := get(t, tr, srv.URL+fmt.Sprintf("/p?i=%d", i))
		if resp.StatusCode != 200 || body != fmt.Sprintf("hello GET /p?i=%d", i) {
			t.Fatalf("request %d: have %d %q", i, resp.StatusCode, body)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("50 sequential requests used %d connections, want 1", n)
	}
}

func TestChunkedBothWaysAndHeaders(t *testing.T) {
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Got", fmt.Sprintf("%d %v %s", len(b), r.TransferEncoding, r.Header.Get("X-In")))
		w.Header()["X-Multi"] = []string{"a", "b"}
		for i := 0; i < 3; i++ {
			fmt.Fprintf(w, "part%d;", i)
			w.(http.Flusher).Flush()
		}
	})
	tr := New(Options{})
	req, _ := http.NewRequest("POST", srv.URL+"/up", io.NopCloser(strings.NewReader(strings.Repeat("z", 70000))))
	req.ContentLength = -1
	req.Header.Set("X-In", "yes")
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "part0;part1;part2;" || resp.ContentLength != -1 {
		t.Fatalf("chunked response: have %q (length %d)", b, resp.ContentLength)
	}
	if got := resp.Header.Get("X-Got"); got != "70000 [chunked] yes" {
		t.Fatalf("server saw %q", got)
	}
	if v := resp.Header["X-Multi"]; len(v) != 2 {
		t.Fatalf("repeated header: have %v", v)
	}
	// The connection is reusable after a chunked exchange.
	if resp, body := get(t, tr, srv.URL+"/again"); resp.StatusCode != 200 || !strings.HasPrefix(body, "part0") {
		t.Fatalf("after chunked: %d %q", resp.StatusCode, body)
	}
}

func TestBodilessResponses(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/204":
			w.WriteHeader(204)
		case "/304":
			w.WriteHeader(304)
		default:
			w.Header().Set("Content-Length", "5")
			if r.Method != "HEAD" {
				io.WriteString(w, "hello")
			}
		}
	})
	tr := New(Options{})
	for _, c := range []struct{ method, path string }{{"HEAD", "/x"}, {"GET", "/204"}, {"GET", "/304"}, {"GET", "/x"}} {
		req, _ := http.NewRequest(c.method, srv.URL+c.path, nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatalf("%s %s: %v", c.method, c.path, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if c.method == "HEAD" && (len(b) != 0 || resp.ContentLength != 5) {
			t.Fatalf("HEAD: body %q, length %d", b, resp.ContentLength)
		}
		if c.path == "/x" && c.method == "GET" && string(b) != "hello" {
			t.Fatalf("GET after bodiless answers: %q (framing lost)", b)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("bodiless answers broke keep-alive: %d connections", n)
	}
}

func TestConnectionCloseIsHonoured(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		io.WriteString(w, "bye")
	})
	tr := New(Options{})
	for i := 0; i < 3; i++ {
		if _, body := get(t, tr, srv.URL); body != "bye" {
			t.Fatalf("have %q", body)
		}
	}
	if n := conns.Load(); n != 3 {
		t.Fatalf("Connection: close answers: want 3 connections, have %d", n)
	}
}

// A pooled connection the instance closed is detected and a request safe
// to repeat sent again on a new one. A request that is not safe to repeat
// is not sent on a pooled connection the instance has closed.
func TestStalePooledConnectionIsRetried(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int64
	closed := make(chan struct{}, 8)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			go func(c net.Conn) {
				defer func() { c.Close(); closed <- struct{}{} }()
				br := bufio.NewReader(c)
				req, err := http.ReadRequest(br)
				if err != nil {
					return
				}
				b, _ := io.ReadAll(req.Body)
				fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(b)+2, "ok"+string(b))
				// Then close: the client's pooled connection is now stale.
			}(c)
		}
	}()
	tr := New(Options{})
	url := "http://" + ln.Addr().String()
	if _, body := get(t, tr, url); body != "ok" {
		t.Fatalf("first: %q", body)
	}
	// Give the server's close time to arrive is not needed: the retry path
	// covers both orders. Second request: stale connection → retried.
	if _, body := get(t, tr, url); body != "ok" {
		t.Fatalf("second: %q", body)
	}
	// Both connections so far are closed; the POST finds the pooled one
	// closed before sending and dials.
	<-closed
	<-closed
	req, _ := http.NewRequest("POST", url, strings.NewReader("data"))
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader("data")), nil }
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("POST over a stale connection: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	if string(b) != "okdata" {
		t.Fatalf("POST: have %q", b)
	}
	if accepted.Load() != 3 {
		t.Fatalf("want 3 connections (one per request), have %d", accepted.Load())
	}
}

func TestCancellationAndDeadlines(t *testing.T) {
	release := make(chan struct{})
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slowbody" {
			w.Header().Set("Content-Length", "10")
			io.WriteString(w, "12345")
			w.(http.Flusher).Flush()
		}
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	tr := New(Options{})

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+"/hang", nil)
	began := time.Now()
	_, err := tr.RoundTrip(req)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("deadline: want DeadlineExceeded, have %v", err)
	}
	if d := time.Since(began); d > 2*time.Second {
		t.Fatalf("deadline honoured only after %v", d)
	}

	ctx2, cancel2 := context.WithCancel(context.Background())
	req, _ = http.NewRequestWithContext(ctx2, "GET", srv.URL+"/slowbody", nil)
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, buf); err != nil {
		t.Fatal(err)
	}
	cancel2()
	_, err = io.ReadAll(resp.Body)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancel mid-body: want context.Canceled, have %v", err)
	}

	h := New(Options{ResponseHeaderTimeout: 100 * time.Millisecond})
	req, _ = http.NewRequest("GET", srv.URL+"/hang", nil)
	_, err = h.RoundTrip(req)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("response header timeout: want a timeout error, have %v", err)
	}
}

func TestErrorsLookLikeNetHTTPs(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	tr := New(Options{})
	req, _ := http.NewRequest("GET", "http://"+addr, nil)
	_, err := tr.RoundTrip(req)
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "dial" {
		t.Fatalf("refused: want a dial *net.OpError, have %T %v", err, err)
	}

	// Garbage instead of HTTP, and a reset before any byte.
	ln2, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln2.Close()
	go func() {
		for i := 0; ; i++ {
			c, err := ln2.Accept()
			if err != nil {
				return
			}
			bufio.NewReader(c).ReadString('\n')
			if i == 0 {
				io.WriteString(c, "SMTP ready\r\n\r\n")
				c.Close()
			} else {
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
			}
		}
	}()
	req, _ = http.NewRequest("GET", "http://"+ln2.Addr().String(), nil)
	if _, err := tr.RoundTrip(req); err == nil || !strings.Contains(err.Error(), "malformed status line") {
		t.Fatalf("garbage: want a malformed status line error, have %v", err)
	}
	req, _ = http.NewRequest("GET", "http://"+ln2.Addr().String(), nil)
	if _, err := tr.RoundTrip(req); !errors.Is(err, io.ErrUnexpectedEOF) && !strings.Contains(fmt.Sprint(err), "reset") {
		t.Fatalf("reset: want an unexpected EOF or reset, have %v", err)
	}
}

func TestSupports(t *testing.T) {
	mk := func(method string, h map[string]string) *http.Request {
		r, _ := http.NewRequest(method, "http://x/", nil)
		for k, v := range h {
			r.Header.Set(k, v)
		}
		return r
	}
	if !Supports(mk("GET", nil)) || !Supports(mk("POST", nil)) {
		t.Fatal("plain requests must be supported")
	}
	for name, r := range map[string]*http.Request{
		"upgrade": mk("GET", map[string]string{"Upgrade": "websocket"}),
		"expect":  mk("POST", map[string]string{"Expect": "100-continue"}),
		"te":      mk("POST", map[string]string{"Te": "trailers"}),
		"connect": mk("CONNECT", nil),
	} {
		if Supports(r) {
			t.Errorf("%s must be left to net/http", name)
		}
	}
}

func TestConcurrentUseUnderRace(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.URL.Path) })
	tr := New(Options{MaxIdlePerHost: 4})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 100; i++ {
				p := fmt.Sprintf("/%d/%d", g, i)
				req, _ := http.NewRequest("GET", srv.URL+p, nil)
				resp, err := tr.RoundTrip(req)
				if err != nil {
					errs <- err
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if string(b) != p {
					errs <- fmt.Errorf("want %q, have %q", p, b)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("800 requests from 8 goroutines over %d connections", conns.Load())
	if conns.Load() > 8+8 {
		t.Fatalf("connections not reused: %d for 8 concurrent clients", conns.Load())
	}
}

func TestResponseHeadParsing(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					if _, err := http.ReadRequest(br); err != nil {
						return
					}
					io.WriteString(c, "HTTP/1.1 299 Fine Thanks\r\ncontent-type:  text/odd \r\nx-custom-thing: a\r\nSet-Cookie: s=1\r\nset-cookie: t=2\r\nContent-Length: 2\r\n\r\nok")
				}
			}(c)
		}
	}()
	tr := New(Options{})
	for i := 0; i < 2; i++ { // the second read reuses the connection's buffers
		resp, body := get(t, tr, "http://"+ln.Addr().String()+"/")
		if resp.StatusCode != 299 || resp.Status != "299 Fine Thanks" || body != "ok" {
			t.Fatalf("status: have %d %q body %q", resp.StatusCode, resp.Status, body)
		}
		if v := resp.Header["Content-Type"]; len(v) != 1 || v[0] != "text/odd" {
			t.Fatalf("Content-Type: have %q", v)
		}
		if v := resp.Header.Get("X-Custom-Thing"); v != "a" {
			t.Fatalf("X-Custom-Thing: have %q (header map %v)", v, resp.Header)
		}
		if v := resp.Header["Set-Cookie"]; len(v) != 2 || v[0] != "s=1" || v[1] != "t=2" {
			t.Fatalf("Set-Cookie: have %q", v)
		}
	}
	resp, _ := get(t, tr, "http://"+ln.Addr().String()+"/")
	resp.Header["Set-Cookie"] = append(resp.Header["Set-Cookie"], "u=3")
	if resp.Header.Get("Content-Type") != "text/odd" {
		t.Fatal("appending to one header's values overwrote another's")
	}
}

// The header timeout bounds each response head on a reused connection, but
// not a body that arrives slowly after its head, even when the previous
// exchange on the connection left the head's deadline in place.
func TestHeaderTimeoutOnReusedConnection(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/small":
			io.WriteString(w, "ok")
		case "/stream":
			w.Header().Set("Content-Length", "10")
			io.WriteString(w, "12345")
			w.(http.Flusher).Flush()
			// The rest comes after three header timeouts.
			select {
			case <-time.After(300 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
			io.WriteString(w, "67890")
		case "/hang":
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
	})
	tr := New(Options{ResponseHeaderTimeout: 100 * time.Millisecond})
	if _, body := get(t, tr, srv.URL+"/small"); body != "ok" {
		t.Fatalf("small: have %q", body)
	}
	if _, body := get(t, tr, srv.URL+"/stream"); body != "1234567890" {
		t.Fatalf("slow body after a quick head: have %q", body)
	}
	if _, body := get(t, tr, srv.URL+"/small"); body != "ok" {
		t.Fatalf("small after the slow body: have %q", body)
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("want one connection reused throughout, have %d", n)
	}
	req, _ := http.NewRequest("GET", srv.URL+"/hang", nil)
	began := time.Now()
	_, err := tr.RoundTrip(req)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("hung head on a reused connection: want a timeout error, have %v", err)
	}
	if d := time.Since(began); d > 2*time.Second {
		t.Fatalf("header timeout honoured only after %v", d)
	}
}

// slowBody is an upload that trickles: one byte per tick.
type slowBody struct {
	n    int
	tick time.Duration
}

func (b *slowBody) Read(p []byte) (int, error) {
	if b.n == 0 {
		return 0, io.EOF
	}
	time.Sleep(b.tick) // the upload's pace, the scenario itself
	b.n--
	p[0] = 'x'
	return 1, nil
}

func (b *slowBody) Close() error { return nil }

// The header timeout starts once the request is sent: an upload slower than
// the timeout, answered at once, succeeds.
func TestHeaderTimeoutStartsAfterTheUpload(t *testing.T) {
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "got %d", n)
	})
	tr := New(Options{ResponseHeaderTimeout: 150 * time.Millisecond})
	req, _ := http.NewRequest("POST", srv.URL, &slowBody{n: 5, tick: 80 * time.Millisecond})
	req.ContentLength = 5
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("a 400 ms upload under a 150 ms header timeout: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "got 5" {
		t.Fatalf("want %q, have %q", "got 5", b)
	}
}

// After Close, connections whose exchange was in flight are closed when it
// ends instead of going back to the pool.
func TestCloseRetiresBusyConnections(t *testing.T) {
	release := make(chan struct{})
	arrived := make(chan struct{}, 1)
	closed := make(chan struct{}, 4)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-release
		io.WriteString(w, "done")
	}))
	srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
		if s == http.StateClosed {
			closed <- struct{}{}
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	tr := New(Options{})
	type result struct {
		body string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		req, _ := http.NewRequest("GET", srv.URL, nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			done <- result{err: err}
			return
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		done <- result{string(b), err}
	}()
	<-arrived
	tr.Close()
	close(release)
	r := <-done
	if r.err != nil || r.body != "done" {
		t.Fatalf("the request in flight at Close: want %q, have %q, %v", "done", r.body, r.err)
	}
	if n := tr.Idle(strings.TrimPrefix(srv.URL, "http://")); n != 0 {
		t.Fatalf("after Close: want no pooled connection, have %d", n)
	}
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("the instance never saw the retired connection close")
	}
}

// A cancellation that lands between the request being written and the
// response deadline being set still ends the exchange at once: setting the
// deadline must not undo the cancellation's.
func TestCancelBeforeTheHeadDeadlineIsSet(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		select { // never answers
		case <-release:
		case <-r.Context().Done():
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	hook := func(c *conn) {
		cancel()
		for !c.canceled.Load() { // until the cancellation's callback has run
			runtime.Gosched()
		}
	}
	testHookWritten.Store(&hook)
	t.Cleanup(func() { testHookWritten.Store(nil) })
	tr := New(Options{ResponseHeaderTimeout: 10 * time.Second})
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL, nil)
	done := make(chan error, 1)
	go func() {
		_, err := tr.RoundTrip(req)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("want context.Canceled, have %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the cancelled exchange still waits for the instance")
	}
}

// Requests cancelled at random moments must never leave a pooled connection
// that makes a later, uncancelled request fail: a cancellation that fires
// as its exchange ends closes the connection instead of pooling it.
func TestRandomCancellationsSpareLaterRequests(t *testing.T) {
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	})
	tr := New(Options{})
	const workers, per = 4, 300
	var wg sync.WaitGroup
	var failed atomic.Int64
	var firstErr atomic.Value
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				ctx := context.Background()
				if i%2 == 1 {
					var cancel context.CancelFunc
					ctx, cancel = context.WithCancel(ctx)
					timer := time.AfterFunc(time.Duration((i*7919+w*104729)%400)*time.Microsecond, cancel)
					defer timer.Stop()
				}
				req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL, nil)
				resp, err := tr.RoundTrip(req)
				if err == nil {
					var b []byte
					b, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					if err == nil && string(b) != "ok" {
						err = fmt.Errorf("body %q", b)
					}
				}
				if err != nil && ctx.Err() == nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		}()
	}
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d requests that were never cancelled failed; the first: %v", n, firstErr.Load())
	}
}

// When an instance has closed every idle connection (its keep-alive
// timeout is shorter than meshd's), a request meets a stale one first; its
// retry dials instead of trying the next stale one, and the others, idle as
// long, are dropped rather than met one by one by later requests.
func TestStalePoolIsLeftBehind(t *testing.T) {
	const n = 4
	var arrived sync.WaitGroup
	arrived.Add(n)
	release := make(chan struct{})
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/together" {
			arrived.Done()
			<-release
		}
		io.WriteString(w, "ok")
	})
	tr := New(Options{})
	// n requests at once: n connections, all pooled afterwards.
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest("GET", srv.URL+"/together", nil)
			resp, err := tr.RoundTrip(req)
			if err != nil {
				t.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}()
	}
	arrived.Wait()
	close(release)
	wg.Wait()
	if conns.Load() != n {
		t.Fatalf("want %d connections, have %d", n, conns.Load())
	}
	// The instance closes them all, as an idle timeout would.
	srv.CloseClientConnections()
	for i := 0; i < n; i++ {
		if _, body := get(t, tr, srv.URL+"/"); body != "ok" {
			t.Fatalf("request %d after the instance closed its idle connections: %q", i, body)
		}
	}
	// One new connection served them all: the stale ones were not met
	// again, each of them costing a failed write and a new dial.
	if have := conns.Load(); have != n+1 {
		t.Fatalf("want %d connections in all (one new), have %d", n+1, have)
	}
}

// rawAnswer serves every connection by reading one request head and
// writing answer (then closing).
func rawAnswer(t *testing.T, answer func(io.Writer)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
					return
				}
				answer(c)
			}(c)
		}
	}()
	return "http://" + ln.Addr().String() + "/"
}

// A response head that does not end is cut off at 1 MiB, not read into
// memory until the header timeout.
func TestEndlessResponseHeadIsRefused(t *testing.T) {
	url := rawAnswer(t, func(w io.Writer) {
		io.WriteString(w, "HTTP/1.1 200 OK\r\n")
		line := "X-Filler: " + strings.Repeat("a", 1000) + "\r\n"
		for i := 0; i < 4096; i++ { // 4 MiB, if read whole
			if _, err := io.WriteString(w, line); err != nil {
				return
			}
		}
	})
	req, _ := http.NewRequest("GET", url, nil)
	if _, err := New(Options{}).RoundTrip(req); err == nil || !strings.Contains(err.Error(), "response head over") {
		t.Fatalf("want the head refused past 1 MiB, have %v", err)
	}
}

// A Content-Length beside chunked framing is dropped: the body is
// decoded, and the length would contradict what the caller is sent.
func TestChunkedResponseLosesItsContentLength(t *testing.T) {
	url := rawAnswer(t, func(w io.Writer) {
		io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
	})
	resp, body := get(t, New(Options{}), url)
	if body != "hello" || resp.Header.Get("Content-Length") != "" || resp.ContentLength != -1 {
		t.Fatalf("want body hello with no Content-Length, have %q, header %q, length %d", body, resp.Header.Get("Content-Length"), resp.ContentLength)
	}
}
