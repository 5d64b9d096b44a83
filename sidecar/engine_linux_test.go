//go:build linux

package sidecar

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"os"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// engineOf returns s's event loops, which serve its outbound listener;
// the test is skipped when the suite runs with them off.
func engineOf(t *testing.T, s *Sidecar) *engine {
	t.Helper()
	if os.Getenv("MESHD_TEST_FAST_PATH") != "" {
		t.Skip("event loops are off in this run")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.listeners["outbound"]
	if l == nil || l.fast == nil || l.fast.eng == nil || l.fast.eng != s.eng {
		t.Fatal("the outbound listener is not served by the sidecar's event loops")
	}
	return s.eng
}

// loopConn is a client connection to the outbound listener that writes
// requests as given and reads answers one by one.
type loopConn struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

func dialRaw(t *testing.T, s *Sidecar) *loopConn {
	t.Helper()
	c, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return &loopConn{t: t, c: c, br: bufio.NewReader(c)}
}

func (r *loopConn) send(s string) {
	r.t.Helper()
	if _, err := io.WriteString(r.c, s); err != nil {
		r.t.Fatal(err)
	}
}

// answer reads one answer to a request of method.
func (r *loopConn) answer(method string) (*http.Response, string) {
	r.t.Helper()
	resp, err := http.ReadResponse(r.br, &http.Request{Method: method})
	if err != nil {
		r.t.Fatalf("reading an answer: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		r.t.Fatalf("reading a body: %v", err)
	}
	return resp, string(b)
}

// Plain GETs are answered by the loop, which keeps its connection to the
// instance for the next one.
func TestEventLoopAnswersAndReusesItsConnection(t *testing.T) {
	var conns atomic.Int64
	b := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Path", r.URL.Path)
		fmt.Fprintf(w, "hello %s via %s", r.URL.Path, r.Header.Get("X-Forwarded-For"))
	}))
	b.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			conns.Add(1)
		}
	}
	b.Start()
	t.Cleanup(b.Close)
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.Listener.Addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	for i := 0; i < 3; i++ {
		path := fmt.Sprintf("/n%d", i)
		c.send("GET " + path + " HTTP/1.1\r\nHost: svc\r\n\r\n")
		resp, body := c.answer("GET")
		if resp.StatusCode != 200 || body != "hello "+path+" via 127.0.0.1" || resp.Header.Get("X-Path") != path {
			t.Fatalf("GET %s: %d %q %v", path, resp.StatusCode, body, resp.Header)
		}
	}
	if n := e.native.Load(); n != 3 {
		t.Errorf("the loops answered %d of 3 GETs", n)
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("the instance saw %d connections for 3 GETs in a row, want 1", n)
	}
}

// Requests the loop does not serve itself go to the goroutine path on the
// same connection, in order, and the connection comes back to the loop.
func TestEventLoopHandsOverAndTakesBack(t *testing.T) {
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if r.URL.Path == "/missing" {
			http.Error(w, "no such thing", http.StatusNotFound)
			return
		}
		fmt.Fprintf(w, "%s %s %s", r.Method, r.URL.Path, body)
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	steps := []struct {
		req, method string
		status      int
		body        string
	}{
		{"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n", "GET", 200, "GET /a "},
		{"POST /b HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nxyz", "POST", 200, "POST /b xyz"},
		{"GET /missing HTTP/1.1\r\nHost: svc\r\n\r\n", "GET", 404, "no such thing\n"},
		{"GET /c HTTP/1.1\r\nHost: nowhere\r\n\r\n", "GET", 403, ""},
		{"HEAD /d HTTP/1.1\r\nHost: svc\r\n\r\n", "HEAD", 200, ""},
		{"GET /e HTTP/1.1\r\nHost: svc\r\n\r\n", "GET", 200, "GET /e "},
	}
	for _, st := range steps {
		c.send(st.req)
		resp, body := c.answer(st.method)
		if resp.StatusCode != st.status || st.body != "" && body != st.body {
			t.Fatalf("%q: have %d %q, want %d %q", strings.SplitN(st.req, "\r\n", 2)[0], resp.StatusCode, body, st.status, st.body)
		}
	}
	// GET /a, HEAD /d and GET /e by the loop: the last proves the
	// connection came back after the requests handed over.
	if n, h := e.native.Load(), e.handed.Load(); n != 3 || h != 3 {
		t.Errorf("loop answered %d, handed over %d; want 3 and 3", n, h)
	}
}

// Pipelined requests are answered in order, the loop's and the goroutine
// path's alike.
func TestEventLoopPipelining(t *testing.T) {
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s%s", r.URL.Path, body)
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET /1 HTTP/1.1\r\nHost: svc\r\n\r\nGET /2 HTTP/1.1\r\nHost: svc\r\n\r\n" +
		"PUT /3 HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\n\r\n!GET /4 HTTP/1.1\r\nHost: svc\r\n\r\n")
	for _, want := range []string{"/1", "/2", "/3!", "/4"} {
		if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != want {
			t.Fatalf("want 200 %q, have %d %q", want, resp.StatusCode, body)
		}
	}
}

// Requests on one connection share its request store (reqStore): each
// must reach the instance as it was sent, with nothing left over from the
// one before: not a header, not an escaped path, not a query.
func TestEventLoopReusedRequestStore(t *testing.T) {
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s|%s|%s|%q", r.URL.EscapedPath(), r.URL.RawQuery, r.RequestURI, r.Header.Values("X-A"))
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	for i, x := range []struct{ head, want string }{
		{"GET /a/b?x=1 HTTP/1.1\r\nHost: svc\r\nX-A: one\r\nX-A: two\r\n", `/a/b|x=1|/a/b?x=1|["one" "two"]`},
		{"GET /c HTTP/1.1\r\nHost: svc\r\n", `/c||/c|[]`},
		{"GET /a/b?x=1 HTTP/1.1\r\nHost: svc\r\nX-A: three\r\n", `/a/b|x=1|/a/b?x=1|["three"]`},
		{"GET /p%2Fq?y HTTP/1.1\r\nHost: svc\r\n", `/p%2Fq|y|/p%2Fq?y|[]`},
		{"GET /pq HTTP/1.1\r\nHost: svc\r\n", `/pq||/pq|[]`},
	} {
		// With a caller's X-Forwarded-For to extend, the fields go to the
		// instance from the parsed header, not from the head's lines.
		c.send(x.head + "X-Forwarded-For: 192.0.2.1\r\n\r\n")
		if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != x.want {
			t.Fatalf("request %d: want 200 %s, have %d %s", i+1, x.want, resp.StatusCode, body)
		}
	}
	if n := e.native.Load(); n != 5 {
		t.Errorf("the loop answered %d requests, want 5", n)
	}
}

// A large answer to a client that reads slowly arrives whole: the loop
// stops reading the instance while the client catches up.
func TestEventLoopSlowReaderGetsAWholeBody(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<18) // 4 MiB
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(len(big)))
		w.Write(big)
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, err := http.ReadResponse(c.br, &http.Request{Method: "GET"})
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	buf := make([]byte, 64<<10)
	for i := 0; ; i++ {
		if i%8 == 0 {
			time.Sleep(2 * time.Millisecond) // a slow reader, not synchronisation
		}
		n, err := resp.Body.Read(buf)
		got.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d bytes: %v", got.Len(), err)
		}
	}
	if !bytes.Equal(got.Bytes(), big) {
		t.Fatalf("body: %d bytes, want %d, equal %v", got.Len(), len(big), bytes.Equal(got.Bytes(), big))
	}
	if e.native.Load() != 1 {
		t.Errorf("the loop answered %d requests, want 1", e.native.Load())
	}
}

// An instance that breaks off its answer after the head leaves the client
// with a cut answer, never a short one passed as whole, and the loop goes
// on serving.
func TestEventLoopBrokenAnswerIsCut(t *testing.T) {
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
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				if req.URL.Path == "/cut" {
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
					return
				}
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
			}(c)
		}
	}()
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ln.Addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET /cut HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, err := http.ReadResponse(c.br, &http.Request{Method: "GET"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Fatal("a body cut short read as whole")
	}
	// Settled before the client's connection closed.
	if st := rzInstance(t, s, "svc", ln.Addr().String()); st.Requests != 1 || st.Failures != 1 {
		t.Errorf("instance counted %d requests, %d failed; want 1 and 1", st.Requests, st.Failures)
	}
	c2 := dialRaw(t, s)
	c2.send("GET /fine HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := c2.answer("GET"); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("after the cut answer: %d %q", resp.StatusCode, body)
	}
	if e.native.Load() != 2 {
		t.Errorf("the loop passed on %d answers, want 2", e.native.Load())
	}
}

// A GET sent on a pooled connection the instance had closed is sent again
// on a new one, as the goroutine path's client does.
func TestEventLoopResendsAGETAfterAStaleConnection(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var reqs atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				br := bufio.NewReader(c)
				// Answers one request per connection, then reads the
				// next and closes unanswered.
				for n := 0; ; n++ {
					if _, err := http.ReadRequest(br); err != nil {
						return
					}
					reqs.Add(1)
					if n > 0 {
						return
					}
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
				}
			}(c)
		}
	}()
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ln.Addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	for i := 0; i < 2; i++ {
		c.send("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
		if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("GET %d: %d %q", i, resp.StatusCode, body)
		}
	}
	if n := reqs.Load(); n != 3 {
		t.Errorf("instance read %d requests, want 3 (the second GET twice)", n)
	}
	if e.handed.Load() != 1 {
		t.Errorf("handed over %d requests, want 1 (the resend)", e.handed.Load())
	}
}

// Connections idle past proxy.idle_timeout are closed by the loop.
func TestEventLoopClosesIdleConnections(t *testing.T) {
	b := newBackend(t, "b", nil)
	s := start(t, fmt.Sprintf("proxy: {idle_timeout: 1s}\ndiscovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
	c.answer("GET")
	t0 := time.Now()
	c.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.br.ReadByte(); err != io.EOF {
		t.Fatalf("idle connection: want EOF from the close, have %v", err)
	}
	if d := time.Since(t0); d < 900*time.Millisecond {
		t.Errorf("closed after %v, before the idle timeout", d)
	}
}

// A pipelined request whose first byte the client watch read, while the
// goroutine path served a slow request, reaches the instance whole after
// the connection goes back to the loop.
func TestEventLoopKeepsTheWatchedByte(t *testing.T) {
	arrived := make(chan struct{}, 1)
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			arrived <- struct{}{}
			time.Sleep(150 * time.Millisecond) // long enough for the watch to read
		}
		io.WriteString(w, r.Method+" "+r.URL.Path)
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	engineOf(t, s)
	c := dialRaw(t, s)
	// The timeout header sends it to the goroutine path.
	c.send("GET /slow HTTP/1.1\r\nHost: svc\r\nX-Meshd-Timeout: 5s\r\n\r\n")
	<-arrived
	// The watch starts reading 25 ms into a request; this lands after.
	// (Earlier, the test would pass without testing the watch: never
	// falsely fail.)
	time.Sleep(60 * time.Millisecond)
	c.send("GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
	for _, want := range []string{"GET /slow", "GET /next"} {
		if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != want {
			t.Fatalf("want 200 %q, have %d %q", want, resp.StatusCode, body)
		}
	}
}

// blackhole returns an address whose connects hang: a listener whose
// accept queue is full and never accepts.
func blackhole(t *testing.T) string {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := unix.Getsockname(fd)
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*unix.SockaddrInet4).Port)
	for i := 0; i < 4; i++ {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
	}
	if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
		c.Close()
		t.Skip("could not fill the accept queue")
	}
	return addr
}

// A connect that hangs fails after timeouts.connect once, as the goroutine
// path's dialer would, not once in the loop and again after the hand-over.
func TestEventLoopConnectTimeoutCountsOnce(t *testing.T) {
	addr := blackhole(t)
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {retry: {disabled: true}, timeouts: {connect: 300ms}}}\n", addr))
	engineOf(t, s)
	c := dialRaw(t, s)
	t0 := time.Now()
	c.send("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, body := c.answer("GET")
	if d := time.Since(t0); resp.StatusCode != http.StatusBadGateway || d > 550*time.Millisecond || !strings.Contains(body, "timeout") {
		t.Errorf("connect 300ms: %d %q after %v; want a 502 naming the timeout, well before 600ms", resp.StatusCode, body, d)
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// A client that resets its connection while the loop waits on the
// instance mid-answer does not leave the loop spinning on the reset.
func TestEventLoopDoesNotSpinOnAResetClient(t *testing.T) {
	release := make(chan struct{})
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "12345")
		w.(http.Flusher).Flush()
		<-release
		io.WriteString(w, "67890")
	})
	t.Cleanup(func() { close(release) }) // before the backend's Close
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	engineOf(t, s)
	c, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	part := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, part); err != nil {
		t.Fatal(err)
	}
	// Half-close first, so the loop stops reading the client; then reset.
	c.(*net.TCPConn).CloseWrite()
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	c0 := cpuTime()
	time.Sleep(time.Second) // a span of idleness to measure, not synchronisation
	if used := cpuTime() - c0; used > 400*time.Millisecond {
		t.Errorf("%v of CPU over 1s with nothing to do: the loop spins", used)
	}
}

// The loop's open try is settled when the request ends on the goroutine
// path: the request budget running out while the instance is silent, or
// discovery emptying the pool while the try is out.
func TestEventLoopOpenTryIsAlwaysSettled(t *testing.T) {
	t.Run("budget", func(t *testing.T) {
		release := make(chan struct{})
		b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
			<-release
			io.WriteString(w, "late")
		})
		t.Cleanup(func() { close(release) })
		s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {timeouts: {request: 100ms}}}\n", b.addr()))
		engineOf(t, s)
		c := dialRaw(t, s)
		c.send("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
		if resp, body := c.answer("GET"); resp.StatusCode != http.StatusGatewayTimeout {
			t.Fatalf("want 504, have %d %q", resp.StatusCode, body)
		}
		// Settled before the answer went out.
		if st := rzInstance(t, s, "svc", b.addr()); st.InFlight != 0 || st.Requests != 1 || st.Failures != 1 {
			t.Errorf("instance: %d in flight, %d requests, %d failed; want 0, 1 and 1 (a timeout)", st.InFlight, st.Requests, st.Failures)
		}
	})
	t.Run("pool emptied", func(t *testing.T) {
		arrived, release := make(chan struct{}), make(chan struct{})
		b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
			close(arrived)
			<-release
			io.WriteString(w, "still here")
		})
		s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {retry: {disabled: true}}}\n", b.addr()))
		engineOf(t, s)
		u := s.lookup("svc")
		ep := u.pool.Load().Endpoints[0]
		c := dialRaw(t, s)
		c.send("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
		<-arrived
		u.pool.Update(nil, "gone") // discovery empties while the try is out
		close(release)
		if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "still here" {
			t.Errorf("the try under way: want its 200, have %d %q", resp.StatusCode, body)
		}
		if n := ep.InFlight.Load(); n != 0 {
			t.Errorf("instance still counts %d in flight after the answer", n)
		}
	})
}

// rawInstance is an instance that records each request head as it came
// and answers with answers[i] (the last one over and over).
type rawInstance struct {
	ln      net.Listener
	mu      sync.Mutex
	heads   []string
	answers []string
}

func newRawInstance(t *testing.T, answers ...string) *rawInstance {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ri := &rawInstance{ln: ln, answers: answers}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go ri.serve(c)
		}
	}()
	return ri
}

func (ri *rawInstance) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	for {
		var head strings.Builder
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			head.WriteString(line)
			if line == "\r\n" {
				break
			}
		}
		ri.mu.Lock()
		ri.heads = append(ri.heads, head.String())
		a := ri.answers[min(len(ri.heads), len(ri.answers))-1]
		ri.mu.Unlock()
		if _, err := io.WriteString(c, a); err != nil {
			return
		}
	}
}

func (ri *rawInstance) seen() []string {
	ri.mu.Lock()
	defer ri.mu.Unlock()
	return append([]string(nil), ri.heads...)
}

// rawAnswer reads one answer's head and Content-Length body as bytes.
func (r *loopConn) rawAnswer() string {
	r.t.Helper()
	var b strings.Builder
	n := 0
	for {
		line, err := r.br.ReadString('\n')
		if err != nil {
			r.t.Fatalf("reading an answer: %v (so far %q)", err, b.String())
		}
		b.WriteString(line)
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok && strings.EqualFold(k, "Content-Length") {
			fmt.Sscan(strings.TrimSpace(v), &n)
		}
		if line == "\r\n" {
			break
		}
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r.br, body); err != nil {
		r.t.Fatalf("reading a body: %v", err)
	}
	return b.String() + string(body)
}

// The loop passes the fields of a request and of its answer on as they
// came: names as spelt, duplicates and order kept, hop-by-hop fields
// dropped (those a Connection field names too), the X-Forwarded ones
// added, the framing its own.
func TestEventLoopPassesFieldsAsTheyCame(t *testing.T) {
	ri := newRawInstance(t, "HTTP/1.1 200 OK\r\nx-lower: a\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nProxy-Connection: x\r\nContent-Length: 2\r\n\r\nok")
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ri.ln.Addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET /p?q=1 HTTP/1.1\r\nHost: svc\r\nx-mixed-Case: 1\r\nX-Dup: a\r\nX-Dup:b \r\nConnection: keep-alive\r\nKeep-Alive: 300\r\nProxy-Authorization: Basic eA==\r\nX-Forwarded-Proto: https\r\nContent-Length: 0\r\n\r\n")
	want := "HTTP/1.1 200 OK\r\nx-lower: a\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok"
	if got := c.rawAnswer(); got != want {
		t.Errorf("the client got\n%q\nwant\n%q", got, want)
	}
	// A Connection field naming another: that one is not passed on.
	c.send("GET /q HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nX-Keep: 2\r\n\r\n")
	if got := c.rawAnswer(); got != want {
		t.Errorf("the client got\n%q\nwant\n%q", got, want)
	}
	heads := ri.seen()
	if len(heads) != 2 {
		t.Fatalf("the instance saw %d requests, want 2", len(heads))
	}
	if want := "GET /p?q=1 HTTP/1.1\r\nHost: svc\r\nx-mixed-Case: 1\r\nX-Dup: a\r\nX-Dup: b\r\nX-Forwarded-Proto: https\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"; heads[0] != want {
		t.Errorf("the instance got\n%q\nwant\n%q", heads[0], want)
	}
	if !strings.HasPrefix(heads[1], "GET /q HTTP/1.1\r\nHost: svc\r\n") || strings.Contains(heads[1], "X-Drop") || !strings.Contains(heads[1], "X-Keep: 2\r\n") ||
		!strings.Contains(heads[1], "X-Forwarded-For: 127.0.0.1\r\n") || !strings.Contains(heads[1], "X-Forwarded-Proto: http\r\n") || strings.Contains(heads[1], "Connection") {
		t.Errorf("the instance got %q", heads[1])
	}
	if n := e.native.Load(); n != 2 {
		t.Errorf("the loops answered %d of 2 GETs", n)
	}
}

// A request whose fields the loop would copy from its head but which goes
// to the goroutine path (here for a 503 to retry) carries the same fields.
func TestEventLoopHandOverCarriesTheFields(t *testing.T) {
	ri := newRawInstance(t, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {retry: {backoff_base: 1ms, backoff_max: 1ms}}}\n", ri.ln.Addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET /p HTTP/1.1\r\nHost: svc\r\nX-Dup: a\r\nx-dup: b\r\nKeep-Alive: 300\r\nAccept: */*\r\n\r\n")
	if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("%d %q", resp.StatusCode, body)
	}
	if e.handed.Load() == 0 {
		t.Fatal("the loop did not hand the request over")
	}
	heads := ri.seen()
	if len(heads) != 2 {
		t.Fatalf("the instance saw %d requests, want 2", len(heads))
	}
	var fields [2]http.Header
	for i, h := range heads {
		tp := textproto.NewReader(bufio.NewReader(strings.NewReader(h)))
		if line, _ := tp.ReadLine(); line != "GET /p HTTP/1.1" {
			t.Fatalf("request line %q", line)
		}
		m, err := tp.ReadMIMEHeader()
		if err != nil {
			t.Fatal(err)
		}
		fields[i] = http.Header(m)
	}
	want := http.Header{"Host": {"svc"}, "X-Dup": {"a", "b"}, "Accept": {"*/*"}, "X-Forwarded-For": {"127.0.0.1"}, "X-Forwarded-Proto": {"http"}}
	for i, f := range fields {
		if !reflect.DeepEqual(f, want) {
			t.Errorf("try %d sent %v, want %v", i+1, f, want)
		}
	}
}

// An answer the h1 client refuses (a header line longer than it reads) is
// refused on the loop too: the same 502 whichever path a request takes.
func TestEventLoopRefusesWhatH1Refuses(t *testing.T) {
	ri := newRawInstance(t, "HTTP/1.1 200 OK\r\nX-Big: "+strings.Repeat("a", 9000)+"\r\nContent-Length: 2\r\n\r\nok")
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {retry: {disabled: true}}}\n", ri.ln.Addr()))
	engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
	get, _ := c.answer("GET")
	c.send("DELETE / HTTP/1.1\r\nHost: svc\r\n\r\n") // the goroutine path's
	del, _ := c.answer("DELETE")
	if get.StatusCode != http.StatusBadGateway || del.StatusCode != http.StatusBadGateway {
		t.Fatalf("GET (the loop's): %d; DELETE (the goroutine path's): %d; want 502 for both", get.StatusCode, del.StatusCode)
	}
}

// "Connection: close" names a field Close as much as any other token
// does: it is dropped in both directions, on the loop as elsewhere.
func TestEventLoopDropsAFieldNamedClose(t *testing.T) {
	ri := newRawInstance(t, "HTTP/1.1 200 OK\r\nConnection: close\r\nClose: 1\r\nContent-Length: 2\r\n\r\nok")
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ri.ln.Addr()))
	engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, close\r\nClose: 1\r\nX-Keep: 1\r\n\r\n")
	resp, body := c.answer("GET")
	if resp.StatusCode != 200 || body != "ok" || resp.Header.Get("Close") != "" {
		t.Errorf("the client got %d %q with Close %q", resp.StatusCode, body, resp.Header.Get("Close"))
	}
	heads := ri.seen()
	if len(heads) != 1 || strings.Contains(heads[0], "Close") || !strings.Contains(heads[0], "X-Keep: 1\r\n") {
		t.Errorf("the instance got %q", heads)
	}
}

// A loop spins only after a batch of several events, and only so long:
// one event at a time (one connection) must block, so that an idle or
// lightly used meshd leaves the processor to others.
func TestEventLoopSpinsOnlyWhenBusy(t *testing.T) {
	cases := []struct {
		last, spun int
		want       bool
	}{
		{0, 0, false},
		{1, 0, false},
		{spinBatch, 0, true},
		{spinBatch + 10, spinPolls - 1, true},
		{spinBatch + 10, spinPolls, false},
		{128, spinPolls + 1, false},
	}
	for _, c := range cases {
		if got := spinNext(c.last, c.spun); got != c.want {
			t.Errorf("spinNext(last %d, spun %d) = %v, want %v", c.last, c.spun, got, c.want)
		}
	}
	if spinBatch < 2 {
		t.Errorf("spinBatch %d: a loop serving one connection would spin between its requests", spinBatch)
	}
}

func TestYieldNextRules(t *testing.T) {
	at := int64(100 * time.Second)
	every, quiet := int64(yieldEvery), int64(quietYield)
	cases := []struct {
		waited, gave, now int64
		batches           int
		want              int
	}{
		// Busy: enough batches and long enough without a wait through
		// the runtime.
		{at, at, at + every, yieldBatches, yieldBusy},
		{at, at, at + every - 1, 1000, yieldNone},
		{at, at, at + every, yieldBatches - 1, yieldNone},
		// A loop that waits through the runtime after every batch (one
		// connection) never gives way for being busy...
		{at, at, at + 2*every, 1, yieldNone},
		// ...but by the clock, once quietYield has passed since it
		// last gave way, whatever it did meanwhile.
		{at + quiet - 1, at, at + quiet, 0, yieldClock},
		{at + 5*quiet, at, at + 5*quiet, 1, yieldClock},
		{at, at, at + quiet - 1, 0, yieldNone},
	}
	for _, c := range cases {
		if got := yieldNext(c.waited, c.gave, c.now, c.batches); got != c.want {
			t.Errorf("yieldNext(waited %v ago, gave way %v ago, %d batches) = %d, want %d",
				time.Duration(c.now-c.waited), time.Duration(c.now-c.gave), c.batches, got, c.want)
		}
	}
	if quietYield >= 10*time.Millisecond {
		t.Errorf("quietYield %v: the runtime preempts a goroutine after 10 ms; the loop must give way before", quietYield)
	}
}

// yieldCounts counts the times loops gave way, by rule.
type yieldCounts struct{ busy, clock atomic.Int64 }

// countYields makes the loops of the sidecars the test starts after it
// count the times they give way.
func countYields(t *testing.T) *yieldCounts {
	var n yieldCounts
	old := loopYield
	loopYield = func(why int) {
		switch why {
		case yieldBusy:
			n.busy.Add(1)
		case yieldClock:
			n.clock.Add(1)
		default:
			t.Errorf("a loop gave way for no reason (%d)", why)
		}
		old(why)
	}
	t.Cleanup(func() { loopYield = old })
	return &n
}

// A loop serving one connection gives way by the clock (quietYield), not
// for its requests: on a loop locked to its thread each Gosched is a
// hand-over to another thread and back, and counted in batches one
// request in 16 paid for one.
func TestEventLoopOneConnectionYieldsByTheClock(t *testing.T) {
	yields := countYields(t)
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nlog: {access: false}\n", rawBackend(t)))
	e := engineOf(t, s)
	const each = 2000
	began := time.Now()
	if n := hammer(t, s, 1, each, nil); n != each {
		t.Fatalf("%d requests answered, want %d", n, each)
	}
	took := time.Since(began)
	if b := yields.busy.Load(); b != 0 {
		t.Fatalf("the loops gave way %d times for being busy over %d requests on one connection, want none", b, each)
	}
	// The loop serving the connection once per quietYield; each idle
	// loop once per wait, a second at most, and once on the way in.
	c := yields.clock.Load()
	most := int64(took/quietYield) + 2 + int64(len(e.loops)-1)*(int64(took/time.Second)+2)
	if c > most {
		t.Fatalf("the loops gave way %d times by the clock over %v on one connection, want at most %d", c, took, most)
	}
	if took >= 3*quietYield && c == 0 {
		t.Fatalf("the loops never gave way over %v of requests on one connection; the runtime would preempt them", took)
	}
}

// sleepCount counts the times the process's threads have blocked in the
// kernel (voluntary context switches), summed over the threads there were
// when it was made. It reads them with raw system calls and without
// allocating: a read through the runtime's system-call path that takes a
// while, or a collection, would wake threads of its own.
type sleepCount struct {
	fds []int
	buf [4096]byte
}

func newSleepCount(t *testing.T) *sleepCount {
	t.Helper()
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	c := &sleepCount{}
	for _, task := range tasks {
		fd, err := unix.Open("/proc/self/task/"+task.Name()+"/status", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			continue // the thread has ended
		}
		c.fds = append(c.fds, fd)
	}
	t.Cleanup(func() {
		for _, fd := range c.fds {
			unix.Close(fd)
		}
	})
	return c
}

var voluntary = []byte("\nvoluntary_ctxt_switches:")

func (c *sleepCount) now() int64 {
	var total int64
	for _, fd := range c.fds {
		n, _, errno := unix.RawSyscall6(unix.SYS_PREAD64, uintptr(fd), uintptr(unsafe.Pointer(&c.buf[0])), uintptr(len(c.buf)), 0, 0, 0)
		if errno != 0 {
			continue // the thread has ended
		}
		b := c.buf[:n]
		i := bytes.Index(b, voluntary)
		if i < 0 {
			continue
		}
		var v int64
		for _, d := range bytes.TrimLeft(b[i+len(voluntary):], " \t") {
			if d < '0' || d > '9' {
				break
			}
			v = v*10 + int64(d-'0')
		}
		total += v
	}
	return total
}

// Giving way by the clock wakes no other thread: runtime.Gosched would
// wake an idle processor's thread each time, to look for work there is
// none of, and that thread would go back to sleep. The yields alternate
// with runtime.Gosched ones, and the threads' sleeps in the gap after
// each are put down to it, so that the process's other sleeps (the
// runtime's monitor, say) fall on both alike and the test cannot pass
// where Gosched wakes nothing either.
func TestClockYieldWakesNoThread(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4)) // idle processors to wake
	// Yields far enough apart for a woken thread to find nothing and
	// sleep again, as a loop's are (quietYield): back to back, a thread
	// woken by one would find the next.
	const n, gap = 300, 200 * time.Microsecond
	kinds := []struct {
		name  string
		yield func()
	}{
		{"runtime.Gosched", runtime.Gosched},
		{"the clock rule", func() { loopYield(yieldClock) }},
		{"the busy rule", func() { loopYield(yieldBusy) }},
	}
	for range 20 { // the threads the yields will wake, made beforehand
		runtime.Gosched()
		for began := time.Now(); time.Since(began) < gap; {
		}
	}
	sleeps := newSleepCount(t)
	// Where the machine is busy, woken threads may not get to run between
	// two yields: the next wake-up finds one still looking and wakes no
	// other. Up to five tries then, for a comparison to make.
	var got []int64
	for try := 0; try < 5 && (got == nil || got[0] < n/2); try++ {
		got = make([]int64, len(kinds))
		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := range n * len(kinds) {
				k := i % len(kinds)
				before := sleeps.now()
				kinds[k].yield()
				for began := time.Now(); time.Since(began) < gap; {
				}
				got[k] += sleeps.now() - before
			}
		}()
		<-done
		t.Logf("%d yields each; threads' sleeps after them: %d with runtime.Gosched, %d by the clock rule, %d by the busy rule", n, got[0], got[1], got[2])
	}
	if got[0] < n/2 {
		t.Skipf("runtime.Gosched made only %d sleeps in %d calls: nothing to compare with", got[0], n)
	}
	if got[1]*2 > got[0] {
		t.Errorf("giving way by the clock made %d threads' sleeps in %d calls (runtime.Gosched: %d), want few", got[1], n, got[0])
	}
	if got[2]*2 < got[0] {
		t.Errorf("giving way for being busy made %d threads' sleeps in %d calls (runtime.Gosched: %d): it must wake a thread for the goroutines queued behind the loop", got[2], n, got[0])
	}
}

// A loop kept busy gives way for being busy, so that goroutines queued
// on its processor do not wait for the spare one.
func TestEventLoopBusyYields(t *testing.T) {
	yields := countYields(t)
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nlog: {access: false}\n", rawBackend(t)))
	engineOf(t, s)
	stop := make(chan struct{})
	done := make(chan int64, 1)
	go func() { done <- hammer(t, s, 16, 50000, stop) }()
	deadline := time.After(20 * time.Second)
	for yields.busy.Load() == 0 {
		select {
		case n := <-done:
			t.Fatalf("no loop gave way for being busy while 16 connections sent %d requests", n)
		case <-deadline:
			close(stop)
			t.Fatalf("no loop gave way for being busy in 20 s under 16 connections (%d requests answered)", <-done)
		case <-time.After(time.Millisecond):
		}
	}
	close(stop)
	<-done
}

func TestBatchNextFollowsLoad(t *testing.T) {
	now := int64(100 * time.Second)
	quiet := int64(batchQuiet)
	cases := []struct {
		busyAt int64
		want   bool
	}{
		{0, false}, // never busy
		{now, true},
		{now - quiet + 1, true},
		{now - quiet, false},
		{now - 10*quiet, false},
	}
	for _, c := range cases {
		if got := batchNext(c.busyAt, now); got != c.want {
			t.Errorf("batchNext(busy %v ago) = %v, want %v", time.Duration(now-c.busyAt), got, c.want)
		}
	}
}

// setBatch changes the calling thread's policy and nothing else: its nice
// value stays, and reset-on-fork is set.
func TestSetBatchKeepsNiceAndResetsOnFork(t *testing.T) {
	errs := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		tid := unix.Gettid()
		was, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
		if err != nil {
			errs <- fmt.Errorf("getpriority: %w", err)
			return
		}
		var result error
		// Sent once the thread is as it was, or for good locked: no
		// later test finds a SCHED_BATCH thread of this one's.
		defer func() { errs <- result }()
		result = func() error {
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, 7); err != nil {
				return fmt.Errorf("setpriority: %w", err)
			}
			for _, on := range []bool{true, false, true} {
				if err := setBatch(on); err != nil {
					return fmt.Errorf("setBatch(%v): %w", on, err)
				}
				a, err := unix.SchedGetAttr(0, 0)
				if err != nil {
					return fmt.Errorf("sched_getattr: %w", err)
				}
				want := uint32(unix.SCHED_NORMAL)
				if on {
					want = unix.SCHED_BATCH
				}
				if a.Policy != want || a.Nice != 7 || a.Flags&unix.SCHED_FLAG_RESET_ON_FORK == 0 {
					return fmt.Errorf("after setBatch(%v): policy %d nice %d flags %#x, want policy %d nice 7 with reset-on-fork", on, a.Policy, a.Nice, a.Flags, want)
				}
			}
			return nil
		}()
		// The thread goes back to the runtime only as it was (getpriority
		// gives 20 - nice). Otherwise it stays locked, and ends with the
		// goroutine.
		if setBatch(false) == nil && unix.Setpriority(unix.PRIO_PROCESS, tid, 20-was) == nil {
			runtime.UnlockOSThread()
		}
	}()
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
}

// loopPolicies returns the scheduling policy of each of e's loop threads
// that is locked to one (-1 for a loop that is not).
func loopPolicies(t *testing.T, e *engine) []int {
	t.Helper()
	var out []int
	for _, l := range e.loops {
		tid := l.tid.Load()
		if tid == 0 {
			out = append(out, -1)
			continue
		}
		a, err := unix.SchedGetAttr(int(tid), 0)
		if err != nil {
			t.Fatalf("sched_getattr of loop thread %d: %v", tid, err)
		}
		out = append(out, int(a.Policy))
	}
	return out
}

// hammer sends GETs on conns keep-alive connections until stop is closed
// or each has sent max; it returns how many were answered.
func hammer(t *testing.T, s *Sidecar, conns, max int, stop <-chan struct{}) int64 {
	t.Helper()
	var wg sync.WaitGroup
	var answered atomic.Int64
	for i := 0; i < conns; i++ {
		r := dialRaw(t, s)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < max; n++ {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := io.WriteString(r.c, "GET /x HTTP/1.1\r\nHost: p\r\n\r\n"); err != nil {
					t.Errorf("writing a request: %v", err)
					return
				}
				resp, err := http.ReadResponse(r.br, nil)
				if err != nil {
					t.Errorf("reading an answer: %v", err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					t.Errorf("status %d", resp.StatusCode)
					return
				}
				answered.Add(1)
			}
		}()
	}
	wg.Wait()
	return answered.Load()
}

// batchThreads lists the threads of the process that are SCHED_BATCH.
func batchThreads(t *testing.T) []int {
	t.Helper()
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, task := range tasks {
		var tid int
		fmt.Sscan(task.Name(), &tid)
		if a, err := unix.SchedGetAttr(tid, 0); err == nil && a.Policy == unix.SCHED_BATCH {
			out = append(out, tid)
		}
	}
	return out
}

// unlocked reports whether no loop holds a thread of its own.
func unlocked(ps []int) bool {
	for _, p := range ps {
		if p != -1 {
			return false
		}
	}
	return true
}

// A busy loop runs as SCHED_BATCH, locked to its thread, and once its
// load is gone puts the thread back to the usual policy and lets it go.
func TestEventLoopBatchesOnlyWhileBusy(t *testing.T) {
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nlog: {access: false}\n", rawBackend(t)))
	e := engineOf(t, s)
	if ps := loopPolicies(t, e); !unlocked(ps) {
		t.Fatalf("loop policies before any load: %v, want no loop on a thread of its own", ps)
	}
	stop := make(chan struct{})
	done := make(chan int64, 1)
	go func() { done <- hammer(t, s, 16, 20000, stop) }()
	seen := false
	for deadline := time.Now().Add(20 * time.Second); !seen && time.Now().Before(deadline); {
		for _, p := range loopPolicies(t, e) {
			seen = seen || p == unix.SCHED_BATCH
		}
		select {
		case n := <-done:
			done <- n
			deadline = time.Time{} // the load ended: look once more
		case <-time.After(time.Millisecond):
		}
	}
	close(stop)
	n := <-done
	if !seen {
		t.Fatalf("no loop ran as SCHED_BATCH under 16 connections (%d requests answered); policies %v", n, loopPolicies(t, e))
	}
	// Idle, each loop wakes when its quiet spell (batchQuiet) ends and
	// goes back.
	deadline := time.Now().Add(5 * time.Second)
	for !unlocked(loopPolicies(t, e)) {
		if time.Now().After(deadline) {
			t.Fatalf("loops still %v 5 s after the load ended, want none on a thread of its own", loopPolicies(t, e))
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The threads they let go went back to the usual policy first.
	if b := batchThreads(t); len(b) > 0 {
		t.Fatalf("threads %v are SCHED_BATCH after every loop let its thread go", b)
	}
}

// proxy.event_loop_batch: false keeps the loops as they are, unlocked.
func TestEventLoopBatchOff(t *testing.T) {
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nproxy: {event_loop_batch: false}\nlog: {access: false}\n", rawBackend(t)))
	e := engineOf(t, s)
	if n := hammer(t, s, 16, 300, nil); n != 16*300 {
		t.Fatalf("%d requests answered, want %d", n, 16*300)
	}
	if ps := loopPolicies(t, e); !unlocked(ps) {
		t.Fatalf("loop policies %v: with event_loop_batch false no loop should hold a thread of its own", ps)
	}
	if b := batchThreads(t); len(b) > 0 {
		t.Fatalf("threads %v are SCHED_BATCH with event_loop_batch false", b)
	}
}

// A loop whose thread cannot be put back to the usual policy keeps the
// thread locked (so that no SCHED_BATCH thread goes back to the runtime),
// warns once, and goes on serving; the thread ends with the loop.
func TestEventLoopBatchCannotGoBack(t *testing.T) {
	var refused atomic.Int32
	old := setPolicy
	setPolicy = func(on bool) error {
		if on {
			return nil // (the thread's policy is left as it is)
		}
		refused.Add(1)
		return unix.EPERM
	}
	t.Cleanup(func() { setPolicy = old })
	var log syncBuf
	s := startLogged(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nlog: {access: false}\n", rawBackend(t)), &log)
	e := engineOf(t, s)
	stop := make(chan struct{})
	done := make(chan int64, 1)
	go func() { done <- hammer(t, s, 16, 20000, stop) }()
	// Wait for a loop to take a thread, then for the load to go and
	// the loop to try to go back.
	for deadline := time.Now().Add(20 * time.Second); unlocked(loopPolicies(t, e)); {
		if time.Now().After(deadline) {
			close(stop)
			t.Fatalf("no loop took a thread under 16 connections (%d requests answered)", <-done)
		}
		time.Sleep(time.Millisecond)
	}
	close(stop)
	<-done
	holding := func() int {
		n := 0
		for _, p := range loopPolicies(t, e) {
			if p != -1 {
				n++
			}
		}
		return n
	}
	// Each loop holding a thread tries to go back once its quiet spell
	// is over, once (it does not ask again), and keeps the thread.
	held := holding()
	for deadline := time.Now().Add(5 * time.Second); int(refused.Load()) != held; held = holding() {
		if time.Now().After(deadline) {
			t.Fatalf("5 s after the load, %d loops tried to go back to the usual policy and %d hold a thread (policies %v); want as many", refused.Load(), held, loopPolicies(t, e))
		}
		time.Sleep(5 * time.Millisecond)
	}
	if held == 0 {
		t.Fatal("no loop holds its thread after failing to go back")
	}
	if w := strings.Count(log.String(), "cannot change its scheduling policy"); w != held {
		t.Fatalf("%d warnings for %d loops that could not go back; log:\n%s", w, held, log.String())
	}
	if n := hammer(t, s, 4, 200, nil); n != 4*200 {
		t.Fatalf("%d requests answered after a loop could not go back, want %d", n, 4*200)
	}
}

// A kernel that refuses the policy (a seccomp profile, say) costs one
// warning per loop; the loops go on serving and do not ask again.
func TestEventLoopBatchRefused(t *testing.T) {
	var calls atomic.Int32
	old := setPolicy
	setPolicy = func(bool) error { calls.Add(1); return unix.EPERM }
	t.Cleanup(func() { setPolicy = old })
	var log syncBuf
	s := startLogged(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nlog: {access: false}\n", rawBackend(t)), &log)
	e := engineOf(t, s)
	const conns, each = 16, 2000
	if n := hammer(t, s, conns, each, nil); n != conns*each {
		t.Fatalf("%d requests answered, want %d", n, conns*each)
	}
	warned := strings.Count(log.String(), "cannot change its scheduling policy")
	if c := int(calls.Load()); c == 0 || c > len(e.loops) || warned != c {
		t.Fatalf("%d refused changes and %d warnings under load, want 1-%d of each, equal; log:\n%s", c, warned, len(e.loops), log.String())
	}
	if ps := loopPolicies(t, e); !unlocked(ps) {
		t.Fatalf("loop policies %v after a refused change, want no loop on a thread of its own", ps)
	}
	if b := batchThreads(t); len(b) > 0 {
		t.Fatalf("threads %v are SCHED_BATCH after a refused change", b)
	}
}

// sumOf returns the value of the first sample of name whose labels include
// label, and whether there is one.
func sumOf(text, name, label string) (float64, bool) {
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"{") || !strings.Contains(line, label) {
			continue
		}
		f := strings.Fields(line)
		var v float64
		if _, err := fmt.Sscan(f[len(f)-1], &v); err == nil {
			return v, true
		}
	}
	return 0, false
}

// The loop times the requests it serves by its turn's clock: each time
// it records is read once a turn, so a request's duration, its try's and
// the instance's response time must still span the instance's delay and
// no more than the client waited.
func TestEventLoopTimesWhatItServes(t *testing.T) {
	const delay = 30 * time.Millisecond
	b := newBackend(t, "slow", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			time.Sleep(delay)
		}
		io.WriteString(w, "ok")
	})
	s, tel := startWithMetrics(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	var waited time.Duration
	for _, path := range []string{"/slow", "/fast", "/slow", "/fast"} {
		t0 := time.Now()
		c.send("GET " + path + " HTTP/1.1\r\nHost: svc\r\n\r\n")
		if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("GET %s: %d %q", path, resp.StatusCode, body)
		}
		waited += time.Since(t0)
	}
	if n := e.native.Load(); n != 4 {
		t.Fatalf("the loops answered %d of 4 GETs", n)
	}
	text := scrapeText(t, tel)
	for _, name := range []string{"http_server_request_duration_seconds_sum", "http_client_request_duration_seconds_sum"} {
		got, ok := sumOf(text, name, `meshd_upstream="svc"`)
		if !ok {
			t.Fatalf("no %s for svc in\n%s", name, text)
		}
		if d := time.Duration(got * float64(time.Second)); d < 2*delay || d > waited {
			t.Errorf("%s = %v for two requests of %v each and four that took %v in all", name, d, delay, waited)
		}
	}
	// The first answer, a slow one, sets the instance's average response
	// time; the others fold in with a weight that grows with the time
	// between them, a few milliseconds against a decay of seconds.
	if d, ok := s.lookup("svc").pool.Load().Endpoints[0].Latency(); !ok || d < delay/2 || d > waited {
		t.Errorf("the instance's response time is %v (%v), for a first answer of %v and four that took %v in all", d, ok, delay, waited)
	}
}
