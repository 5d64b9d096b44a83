//go:build unix

package sidecar

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// dialSmallWindow connects to addr with a small receive buffer, so that
// what the client does not read soon holds the sender back.
func dialSmallWindow(t *testing.T, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 32<<10)
		}); err != nil {
			return err
		}
		return serr
	}}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// A client that stops reading its answer is cut off after
// proxy.write_timeout on every serving path (make test runs the suite on each), and the instance's connection
// with it, rather than holding both for ever.
func TestClientThatStopsReadingIsCutOff(t *testing.T) {
	const size = 64 << 20 // far more than every socket buffer on the way holds
	abandoned := make(chan int64, 1)
	b := newBackend(t, "big", func(w http.ResponseWriter, r *http.Request) {
		chunk := make([]byte, 64<<10)
		w.Header().Set("Content-Length", strconv.Itoa(size))
		var sent int64
		for sent < size {
			n, err := w.Write(chunk)
			sent += int64(n)
			if err != nil {
				break
			}
		}
		abandoned <- sent
	})
	s := start(t, fmt.Sprintf("proxy: {write_timeout: 200ms}\ndiscovery: {static: {big: [%s]}}\nupstreams: {big: {}}\n", b.addr()))
	conn := dialSmallWindow(t, s.Addr("outbound"))
	io.WriteString(conn, "GET /big HTTP/1.1\r\nHost: big\r\n\r\n")
	br := bufio.NewReader(conn)
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("no answer head: %v", err)
	}
	// Read no more: the instance must be let go.
	var sent int64
	select {
	case sent = <-abandoned:
	case <-time.After(20 * time.Second):
		t.Fatal("the instance is still held 20 s after the client stopped reading")
	}
	if sent >= size {
		t.Fatalf("the instance sent its whole answer (%d bytes) to a client that read none of it", sent)
	}
	// What reached the client is cut short: the connection ends
	// before the body does.
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.Copy(io.Discard, resp.Body)
	if err == nil || got >= size {
		t.Fatalf("the client read %d of %d bytes and then %v; want the answer cut off", got, size, err)
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("the client's connection was left open after %d bytes: %v", got, err)
	}
	// Reset, not closed: meshd's end is gone, not left offering its unsent
	// bytes to a client that does not read.
	awaitSocketGone(t, s.Addr("outbound"), conn.LocalAddr().String())
}

// The write timeout bounds each write, not the answer: a client that reads
// slowly but steadily gets all of an answer that takes many timeouts to
// send.
func TestSlowSteadyReaderIsServed(t *testing.T) {
	const size = 16 << 20
	b := newBackend(t, "big", func(w http.ResponseWriter, r *http.Request) {
		chunk := make([]byte, 64<<10)
		w.Header().Set("Content-Length", strconv.Itoa(size))
		for sent := 0; sent < size; sent += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	})
	s := start(t, fmt.Sprintf("proxy: {write_timeout: 1s}\ndiscovery: {static: {big: [%s]}}\nupstreams: {big: {}}\n", b.addr()))
	conn := dialSmallWindow(t, s.Addr("outbound"))
	io.WriteString(conn, "GET /big HTTP/1.1\r\nHost: big\r\n\r\n")
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no answer head: %v", err)
	}
	began := time.Now()
	buf := make([]byte, 128<<10)
	var got int64
	for {
		n, err := io.ReadFull(resp.Body, buf)
		got += int64(n)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d of %d bytes in %v: %v", got, size, time.Since(began), err)
		}
		time.Sleep(25 * time.Millisecond) // the reader's pace, not a wait for an event
	}
	if got != size {
		t.Fatalf("read %d of %d bytes", got, size)
	}
	if el := time.Since(began); el < 2*time.Second {
		t.Fatalf("the answer took %v, less than two write timeouts: the test did not pace the sender", el)
	}
}

// A tunnel's client that stops reading is cut off too, and the instance's
// side of the tunnel closed at once, not after the half-close grace.
func TestTunnelClientThatStopsReadingIsCutOff(t *testing.T) {
	abandoned := make(chan struct{})
	b := newBackend(t, "stream", func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: feed\r\n\r\n")
		brw.Flush()
		chunk := make([]byte, 64<<10)
		for i := 0; i < 1024; i++ { // 64 MiB at most
			if _, err := conn.Write(chunk); err != nil {
				close(abandoned)
				return
			}
		}
	})
	s := start(t, fmt.Sprintf("proxy: {write_timeout: 200ms}\ndiscovery: {static: {stream: [%s]}}\nupstreams: {stream: {}}\n", b.addr()))
	conn := dialSmallWindow(t, s.Addr("outbound"))
	io.WriteString(conn, "GET /feed HTTP/1.1\r\nHost: stream\r\nConnection: Upgrade\r\nUpgrade: feed\r\n\r\n")
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	sent := time.Now()
	select {
	case <-abandoned:
	case <-time.After(20 * time.Second):
		t.Fatal("the instance's side of the tunnel is still open 20 s after the client stopped reading")
	}
	// The tunnel is torn down once the write times out, not
	// after the 5 s a half-closed tunnel is given to finish.
	if el := time.Since(sent); el > 4*time.Second {
		t.Errorf("the instance's side closed %v after the client stopped reading; want about the write timeout", el)
	}
}

// An HTTP/2 stream whose client stops reading (it grants no more window)
// is reset after the write timeout, and the instance let go, though the
// connection itself stays writable.
func TestH2StreamThatStopsReadingIsCutOff(t *testing.T) {
	const size = 64 << 20
	abandoned := make(chan int64, 1)
	b := newBackend(t, "big", func(w http.ResponseWriter, r *http.Request) {
		chunk := make([]byte, 64<<10)
		w.Header().Set("Content-Length", strconv.Itoa(size))
		var sent int64
		for sent < size {
			n, err := w.Write(chunk)
			sent += int64(n)
			if err != nil {
				break
			}
		}
		abandoned <- sent
	})
	s := start(t, fmt.Sprintf("proxy: {write_timeout: 200ms}\ndiscovery: {static: {big: [%s]}}\nupstreams: {big: {listen: 127.0.0.1:0}}\n", b.addr()))
	cp := new(http.Protocols)
	cp.SetUnencryptedHTTP2(true)
	client := &http.Client{Transport: &http.Transport{Protocols: cp}}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + s.Addr("upstream:big") + "/big")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.ProtoMajor != 2 {
		t.Fatalf("answered over %s, want HTTP/2", resp.Proto)
	}
	select {
	case sent := <-abandoned:
		if sent >= size {
			t.Fatalf("the instance sent its whole answer (%d bytes) to a stream that read none of it", sent)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the instance is still held 20 s after the stream's client stopped reading")
	}
	if got, err := io.Copy(io.Discard, resp.Body); err == nil || got >= size {
		t.Fatalf("the client read %d of %d bytes and then %v; want the stream reset", got, size, err)
	}
}

// An HTTP/2 CONNECT tunnel: a client that stops reading has its stream
// reset after the write timeout and the instance let go; one that resets
// its stream while the instance is silent ends the tunnel at once, rather
// than leave it waiting on the instance.
func TestH2ConnectTunnelEnds(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	feed := make(chan bool, 1) // per connection: stream to the client, or stay silent
	abandoned := make(chan struct{}, 1)
	quit := make(chan struct{})
	defer close(quit)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn, stream bool) {
				defer c.Close()
				if !stream {
					// Reads to the end, then stays silent and open: a
					// half-close is no reason for it to close.
					io.Copy(io.Discard, c)
					<-quit
					return
				}
				chunk := make([]byte, 64<<10)
				for i := 0; i < 1024; i++ { // 64 MiB at most
					if _, err := c.Write(chunk); err != nil {
						abandoned <- struct{}{}
						return
					}
				}
			}(c, <-feed)
		}
	}()
	s := start(t, fmt.Sprintf("proxy: {write_timeout: 200ms}\ndiscovery: {static: {db: [%s]}}\nupstreams: {db: {listen: 127.0.0.1:0}}\n", ln.Addr()))
	cp := new(http.Protocols)
	cp.SetUnencryptedHTTP2(true)
	client := &http.Client{Transport: &http.Transport{Protocols: cp}}
	defer client.CloseIdleConnections()
	connect := func(ctx context.Context) (*http.Response, *io.PipeWriter) {
		t.Helper()
		pr, pw := io.Pipe()
		req, _ := http.NewRequestWithContext(ctx, "CONNECT", "http://"+s.Addr("upstream:db"), pr)
		req.Host = "db:443"
		resp, err := client.Do(req)
		if err != nil || resp.StatusCode != 200 || resp.ProtoMajor != 2 {
			t.Fatalf("CONNECT over HTTP/2: %v %v", resp, err)
		}
		return resp, pw
	}

	feed <- true
	resp, pw := connect(context.Background())
	defer pw.Close()
	defer resp.Body.Close()
	select {
	case <-abandoned:
	case <-time.After(20 * time.Second):
		t.Fatal("the instance is still held 20 s after the tunnel's client stopped reading")
	}
	rzEventually(t, 10*time.Second, "stalled tunnel ended", func() bool { return rzInstance(t, s, "db", ln.Addr().String()).InFlight == 0 })

	feed <- false
	ctx, cancel := context.WithCancel(context.Background())
	resp2, pw2 := connect(ctx)
	defer pw2.Close()
	if st := rzInstance(t, s, "db", ln.Addr().String()); st.InFlight != 1 {
		t.Fatalf("%d tunnels in flight, want the one open", st.InFlight)
	}
	cancel() // resets the stream
	resp2.Body.Close()
	rzEventually(t, 10*time.Second, "reset tunnel ended", func() bool { return rzInstance(t, s, "db", ln.Addr().String()).InFlight == 0 })
}

// A write timeout too long to be a deadline sets none, rather than one in
// the past that would fail every write.
func TestHugeWriteTimeoutSetsNoDeadline(t *testing.T) {
	b := newBackend(t, "b", nil)
	s := start(t, fmt.Sprintf("proxy: {write_timeout: 2562047h}\ndiscovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	resp, err := proxyClient(s).Get("http://svc/x")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); resp.StatusCode != 200 || body != "b" {
		t.Fatalf("want 200 %q, have %d %q", "b", resp.StatusCode, body)
	}
}

// A shutdown whose deadline passes cuts both ends of a tunnel: with an
// instance that neither reads nor sends, cutting the client's end alone
// left the tunnel's copy blocked on the instance, and the shutdown waiting
// for it for ever.
func TestShutdownCutsATunnelStuckOnItsInstance(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	quit := make(chan struct{})
	defer close(quit)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { <-quit; c.Close() }() // never reads, never sends
		}
	}()
	s := start(t, fmt.Sprintf("discovery: {static: {db: [%s]}}\nupstreams: {db: {}}\n", ln.Addr()))
	conn, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "CONNECT db:443 HTTP/1.1\r\nHost: db:443\r\n\r\n")
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: "CONNECT"})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	// More than the instance's socket and meshd's take: the tunnel's copy
	// blocks writing to the instance.
	go conn.Write(make([]byte, 16<<20))
	ctx, cancel := contextWithTimeout(200 * time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.Shutdown(ctx) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("shutdown still waiting 15 s after its 200 ms deadline, on a tunnel whose instance does nothing")
	}
}

// A shutdown whose deadline passes closes every connection at once, not
// one lingering close after another: connections whose clients are still
// sending (uploads stuck behind an instance that does not read) each have
// unread bytes, and closing them must not wait for those.
func TestForcedShutdownClosesAtOnce(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	quit := make(chan struct{})
	defer close(quit)
	accepted := make(chan struct{}, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- struct{}{}
			go func() { <-quit; c.Close() }() // never reads, never answers
		}
	}()
	s := start(t, fmt.Sprintf("discovery: {static: {up: [%s]}}\nupstreams: {up: {retry: {attempts: 1}}}\n", ln.Addr()))
	const uploads = 6
	for i := 0; i < uploads; i++ {
		conn, err := net.Dial("tcp", s.Addr("outbound"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		go func() {
			io.WriteString(conn, "POST /up HTTP/1.1\r\nHost: up\r\nContent-Length: 67108864\r\n\r\n")
			conn.Write(make([]byte, 64<<20))
		}()
	}
	for i := 0; i < uploads; i++ {
		select {
		case <-accepted:
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of %d uploads reached the instance", i, uploads)
		}
	}
	ctx, cancel := contextWithTimeout(200 * time.Millisecond)
	defer cancel()
	began := time.Now()
	done := make(chan error, 1)
	go func() { done <- s.Shutdown(ctx) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("shutdown still waiting 15 s after its 200 ms deadline")
	}
	// Half a second a connection, one after another, would be 3 s.
	if el := time.Since(began); el > 1500*time.Millisecond {
		t.Fatalf("shutdown took %v with a 200 ms deadline and %d connections to cut", el, uploads)
	}
}
