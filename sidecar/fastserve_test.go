package sidecar

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// rawConn talks HTTP/1.x by hand to the outbound listener.
func rawConn(t *testing.T, s *Sidecar) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c, bufio.NewReader(c)
}

func readResp(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading a response: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("reading a body: %v", err)
	}
	return resp, string(b)
}

func TestFastPathPipeliningAndKeepAlive(t *testing.T) {
	var n atomic.Int64
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%d %s %s %s", n.Add(1), r.Method, r.URL.Path, body)
	})
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\n", b.addr()))
	c, br := rawConn(t, s)
	// Three requests written at once, one of them with a chunked body.
	io.WriteString(c, "GET /one HTTP/1.1\r\nHost: p\r\n\r\n"+
		"POST /two HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"+
		"POST /three HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n\r\nxyz")
	for i, want := range []string{"1 GET /one ", "2 POST /two abcde", "3 POST /three xyz"} {
		resp, body := readResp(t, br, "GET")
		if resp.StatusCode != 200 || body != want {
			t.Fatalf("pipelined response %d: want 200 %q, have %d %q", i, want, resp.StatusCode, body)
		}
	}
	// HEAD keeps the framing of the next answer intact.
	io.WriteString(c, "HEAD /h HTTP/1.1\r\nHost: p\r\n\r\nGET /after HTTP/1.1\r\nHost: p\r\n\r\n")
	if resp, body := readResp(t, br, "HEAD"); resp.StatusCode != 200 || body != "" {
		t.Fatalf("HEAD: have %d %q", resp.StatusCode, body)
	}
	if _, body := readResp(t, br, "GET"); !strings.HasSuffix(body, "GET /after ") {
		t.Fatalf("after HEAD: have %q", body)
	}
	// Connection: close is honoured and announced.
	io.WriteString(c, "GET /last HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
	resp, _ := readResp(t, br, "GET")
	if !resp.Close {
		t.Fatal("response to Connection: close did not announce the close")
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("connection not closed after Connection: close (%v)", err)
	}
}

func TestFastPathHandsOtherRequestsToNetHTTP(t *testing.T) {
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "%s %s", r.Proto, r.URL.Path) })
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\n", b.addr()))
	c, br := rawConn(t, s)
	// A plain request first (fast path), then HTTP/1.0 on the same
	// connection, which net/http takes over with the bytes already read.
	io.WriteString(c, "GET /a HTTP/1.1\r\nHost: p\r\n\r\n")
	if resp, body := readResp(t, br, "GET"); resp.StatusCode != 200 || body != "HTTP/1.1 /a" {
		t.Fatalf("first: %d %q", resp.StatusCode, body)
	}
	io.WriteString(c, "GET /b HTTP/1.0\r\nHost: p\r\n\r\n")
	if resp, body := readResp(t, br, "GET"); resp.StatusCode != 200 || body != "HTTP/1.1 /b" {
		t.Fatalf("HTTP/1.0 after a fast request: %d %q", resp.StatusCode, body)
	}
	// Expect: 100-continue goes to net/http, which sends the interim answer.
	c2, br2 := rawConn(t, s)
	io.WriteString(c2, "POST /c HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
	line, _ := br2.ReadString('\n')
	if !strings.HasPrefix(line, "HTTP/1.1 100") {
		t.Fatalf("Expect: 100-continue: want a 100 first, have %q", line)
	}
	br2.ReadString('\n')
	io.WriteString(c2, "hi")
	if resp, body := readResp(t, br2, "POST"); resp.StatusCode != 200 || body != "HTTP/1.1 /c" {
		t.Fatalf("after 100-continue: %d %q", resp.StatusCode, body)
	}
}

func TestFastPathShortUpstreamBodyAbortsTheResponse(t *testing.T) {
	// The instance promises 10 bytes and sends 3: the client must see a
	// broken response, never a short one presented as complete.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				http.ReadRequest(bufio.NewReader(c))
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
				c.Close()
			}(c)
		}
	}()
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {retry: {disabled: true}}}\n", ln.Addr()))
	c, br := rawConn(t, s)
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: p\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return // closed before the head: also a broken response
	}
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Fatal("a short upstream body reached the client as a complete response")
	}
}

// An idle client connection is closed after proxy.idle_timeout (the fast
// path may close it up to a sixteenth early), while a request that takes
// longer than the idle timeout is still answered on a connection that
// stays usable.
func TestIdleTimeoutAndSlowRequests(t *testing.T) {
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			select {
			case <-time.After(400 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
		}
		io.WriteString(w, "done "+r.URL.Path)
	})
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nproxy: {idle_timeout: 200ms}\n", b.addr()))
	c, br := rawConn(t, s)
	for _, path := range []string{"/quick", "/slow", "/quick", "/slow"} {
		io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: p\r\n\r\n")
		resp, body := readResp(t, br, "GET")
		if resp.StatusCode != 200 || body != "done "+path {
			t.Fatalf("%s: want 200 %q, have %d %q", path, "done "+path, resp.StatusCode, body)
		}
	}
	idleSince := time.Now()
	if _, err := br.ReadByte(); err == nil {
		t.Fatal("the idle connection sent a byte instead of closing")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("the idle connection was not closed within the test's 10 s deadline")
	}
	// The server's clock starts before the client's: allow for the gap.
	if idle := time.Since(idleSince); idle < 150*time.Millisecond {
		t.Fatalf("closed after %v idle, well before the 200ms idle timeout", idle)
	}
}

// A client that hangs up during a request that has outlasted the idle
// timeout still cancels the request upstream: the idle deadline, left on the
// connection during the request, must not end the watch for the hang-up.
func TestHangUpAfterIdleTimeoutCancels(t *testing.T) {
	arrived := make(chan struct{}, 1)
	canceled := make(chan bool, 1)
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		select {
		case <-r.Context().Done():
			canceled <- true
		case <-time.After(5 * time.Second):
			canceled <- false
		}
	})
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nproxy: {idle_timeout: 200ms}\n", b.addr()))
	c, _ := rawConn(t, s)
	io.WriteString(c, "GET /hang HTTP/1.1\r\nHost: p\r\n\r\n")
	<-arrived
	// The scenario: the request runs past the idle timeout, then the
	// client gives up.
	time.Sleep(400 * time.Millisecond)
	c.Close()
	if !<-canceled {
		t.Fatal("the instance's request was not cancelled when the client hung up")
	}
}

// Answers of every size reach the client intact on one kept-alive
// connection: bodies small enough to be buffered, ones that leave with the
// head in one writev, and ones the instance streams without a length.
func TestFastPathAnswerSizes(t *testing.T) {
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		body := make([]byte, n)
		for i := range body {
			body[i] = 'a' + byte(i%26)
		}
		if r.URL.Query().Get("stream") == "" {
			w.Header().Set("Content-Length", strconv.Itoa(n))
			w.Write(body)
			return
		}
		for len(body) > 0 { // no length: chunked, flushed in parts
			k := min(len(body), 3000)
			w.Write(body[:k])
			w.(http.Flusher).Flush()
			body = body[k:]
		}
	})
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\n", b.addr()))
	c, br := rawConn(t, s)
	for _, stream := range []string{"", "1"} {
		for _, n := range []int{0, 1, 100, 4095, 4097, 8000, 8192, 8300, 20000, 65536, 200001} {
			fmt.Fprintf(c, "GET /?n=%d&stream=%s HTTP/1.1\r\nHost: p\r\n\r\n", n, stream)
			resp, body := readResp(t, br, "GET")
			if resp.StatusCode != 200 || len(body) != n {
				t.Fatalf("n=%d stream=%q: want 200 and %d bytes, have %d and %d", n, stream, n, resp.StatusCode, len(body))
			}
			if stream == "" && resp.ContentLength != int64(n) {
				t.Fatalf("n=%d: Content-Length %d", n, resp.ContentLength)
			}
			for i := 0; i < n; i++ {
				if body[i] != 'a'+byte(i%26) {
					t.Fatalf("n=%d stream=%q: byte %d is %q", n, stream, i, body[i])
				}
			}
		}
	}
}

// A client answered before its body was read, that then stalls mid-body,
// keeps its connection no longer than an idle one would (either server).
func TestStalledBodyAfterAnswerGetsTheIdleTimeout(t *testing.T) {
	b := newBackend(t, "b", nil)
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\nproxy: {idle_timeout: 300ms}\n", b.addr()))
	c, br := rawConn(t, s)
	// A malformed timeout header is answered before the body is read.
	io.WriteString(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nX-Meshd-Timeout: bogus\r\nContent-Length: 1000\r\n\r\n"+strings.Repeat("x", 100))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("want 400, have %d", resp.StatusCode)
	}
	// The rest of the body never comes; the connection must end.
	if _, err := br.ReadByte(); err == nil {
		rest, _ := io.ReadAll(br)
		t.Fatalf("data after the answer: %q", rest)
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("the connection outlived the idle timeout by seconds while its body stalled")
	}
}

// An answer sent while the server drains says Connection: close, as
// net/http's does: the connection closes after it, and a keep-alive
// client must not send its next request on it.
func TestDrainingAnswerSaysClose(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		close(arrived)
		<-release
		io.WriteString(w, "ok")
	})
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\n", b.addr()))
	c, br := rawConn(t, s)
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: p\r\n\r\n")
	<-arrived
	s.mu.Lock() // (Shutdown holds it from here on)
	l := s.listeners["outbound"]
	s.mu.Unlock()
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- s.Shutdown(ctx)
	}()
	waitFor(t, "the drain to begin", func() bool {
		if l.fast != nil {
			return l.fast.closing.Load()
		}
		return s.draining.Load()
	})
	close(release)
	resp, body := readResp(t, br, "GET")
	if body != "ok" || !resp.Close {
		t.Errorf("answer while draining: want ok with Connection: close, have %q, Connection %q", body, resp.Header.Get("Connection"))
	}
	if err := <-done; err != nil {
		t.Errorf("shutdown: %v", err)
	}
}

// Content-Length is digits only: a sign is net/http's 400 on either path,
// not a body forwarded.
func TestSignedContentLengthIsRefused(t *testing.T) {
	b := newBackend(t, "b", nil)
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\n", b.addr()))
	c, br := rawConn(t, s)
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: p\r\nContent-Length: +3\r\n\r\nabc")
	if resp, body := readResp(t, br, "POST"); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("Content-Length: +3: want 400, have %d %q (instance reached %d times)", resp.StatusCode, body, b.hits.Load())
	}
}

// While requests drain, the admin listener stays up and /ready says 503
// "shutting down", as documented, instead of refusing connections.
func TestReadyDuringDrainIs503(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	let := func() { once.Do(func() { close(release) }) }
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		close(arrived)
		<-release
		io.WriteString(w, "ok")
	})
	t.Cleanup(let) // before the backend's Close, which waits for the handler
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\n", b.addr()))
	admin := "http://" + s.Addr("admin") + "/ready"
	c, br := rawConn(t, s)
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: p\r\n\r\n")
	<-arrived
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- s.Shutdown(ctx)
	}()
	waitFor(t, "the drain to begin", func() bool { return s.draining.Load() })
	if resp, err := http.Get(admin); err != nil {
		t.Errorf("/ready during the drain: %v", err)
	} else if body := readAll(t, resp); resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "shutting down") {
		t.Errorf("/ready during the drain: want 503 shutting down, have %d %q", resp.StatusCode, body)
	}
	let()
	if _, body := readResp(t, br, "GET"); body != "ok" {
		t.Errorf("the request in flight: %q", body)
	}
	if err := <-done; err != nil {
		t.Errorf("shutdown: %v", err)
	}
	if _, err := http.Get(admin); err == nil {
		t.Error("/ready after shutdown: want the admin listener closed")
	}
}
