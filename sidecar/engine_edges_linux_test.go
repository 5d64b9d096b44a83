package sidecar

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// onLoops runs fn on each of e's loops, one at a time, and returns when
// all have.
func onLoops(t *testing.T, e *engine, fn func(*loop)) {
	t.Helper()
	done := make(chan struct{}, len(e.loops))
	var one sync.Mutex
	for _, l := range e.loops {
		l.mu.Lock()
		l.cmds = append(l.cmds, loopCmd{fn: func(l *loop) {
			one.Lock()
			fn(l)
			one.Unlock()
			done <- struct{}{}
		}})
		l.pokeLocked()
		l.mu.Unlock()
	}
	for range e.loops {
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("a loop did not run the command within 10 s")
		}
	}
}

// awaitLoops waits until cond holds on some loop, looking again each time
// the loops have run it; it fails after 10 s.
func awaitLoops(t *testing.T, e *engine, what string, cond func(*loop) bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		held := false
		onLoops(t, e, func(l *loop) { held = held || cond(l) })
		if held {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the loops did not come to %s within 10 s", what)
		}
	}
}

// A client that sent two requests and then closed its side while the
// first answer was still coming gets both answers, as on the goroutine
// path: what it sent before its end is served.
func TestEventLoopAnswersWhatCameBeforeAHalfClose(t *testing.T) {
	release := make(chan struct{})
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/first" {
			w.Header().Set("Content-Length", "200000")
			w.Write(bytes.Repeat([]byte("a"), 100000))
			w.(http.Flusher).Flush()
			<-release
			w.Write(bytes.Repeat([]byte("a"), 100000))
			return
		}
		fmt.Fprint(w, r.URL.Path)
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET /first HTTP/1.1\r\nHost: svc\r\n\r\nGET /second HTTP/1.1\r\nHost: svc\r\n\r\n")
	if _, err := c.br.Peek(1); err != nil { // the first answer has begun
		t.Fatal(err)
	}
	c.c.(*net.TCPConn).CloseWrite()
	awaitLoops(t, e, "see the client's end", func(l *loop) bool {
		for cl := range l.clients {
			if cl.eof && cl.x != nil {
				return true
			}
		}
		return false
	})
	close(release)
	if resp, body := c.answer("GET"); resp.StatusCode != 200 || len(body) != 200000 {
		t.Fatalf("first answer: %d, %d bytes", resp.StatusCode, len(body))
	}
	if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "/second" {
		t.Fatalf("second answer: %d %q", resp.StatusCode, body)
	}
	if n := e.native.Load(); n != 2 {
		t.Errorf("the loop answered %d requests, want 2", n)
	}
}

// A client that sends without reading its answers cannot make the loop
// hold more than maxPipelined of its input (and one read more): the loop
// stops reading it, and the kernel pushes back.
func TestEventLoopBoundsWhatAClientSendsAhead(t *testing.T) {
	// Whole answers in one write: the loop completes each at once, and
	// the ones the client does not take wait in its buffer.
	ri := newRawInstance(t, "HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n"+strings.Repeat("b", 4096))
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ri.ln.Addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	c.c.(*net.TCPConn).SetReadBuffer(64 << 10)
	// 2,000 requests for 8 MiB of answers, none of which is read, then
	// as many bytes as will go.
	c.send(strings.Repeat("GET / HTTP/1.1\r\nHost: svc\r\n\r\n", 2000))
	awaitLoops(t, e, "hold an answer the client does not take", func(l *loop) bool {
		for cl := range l.clients {
			if cl.x == nil && len(cl.out) > 0 {
				return true
			}
		}
		return false
	})
	junk := bytes.Repeat([]byte("j"), 1<<20)
	c.c.SetWriteDeadline(time.Now().Add(time.Second))
	sent := 0
	for sent < 64<<20 {
		n, err := c.c.Write(junk)
		sent += n
		if err != nil {
			break
		}
	}
	held := 0
	onLoops(t, e, func(l *loop) {
		for cl := range l.clients {
			held = max(held, len(cl.in))
		}
	})
	if limit := maxPipelined + len(e.loops[0].rbuf); held > limit {
		t.Errorf("the loop holds %d bytes of the client's input, over %d", held, limit)
	}
	if sent >= 32<<20 {
		t.Errorf("the client sent %d MiB into a connection whose answers it does not read", sent>>20)
	}
}

// An instance that sends the rest of its answer and then resets its
// connection while the loop is not reading it (its client is slow) still
// gets the whole answer to the client: the loop parks the connection on
// the reset and, once the client has caught up, reads what came before it.
// The test stops and restarts the reading itself, as a slow client's
// buffers would, so that the reset comes at that moment.
func TestEventLoopReadsAnAnswerSentBeforeAReset(t *testing.T) {
	half := bytes.Repeat([]byte("0123456789abcdef"), 4<<10) // 64 KiB, read as it comes
	tail := half[:16<<10]                                   // sent while the loop does not read
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	begun, more, reset := make(chan struct{}), make(chan struct{}), make(chan error, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		c := nc.(*net.TCPConn)
		defer c.Close()
		if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
			reset <- err
			return
		}
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(half)+len(tail), half)
		close(begun)
		<-more
		c.Write(tail)
		// Every byte acknowledged by meshd's side, then a reset.
		raw, err := c.SyscallConn()
		if err != nil {
			reset <- err
			return
		}
		for deadline := time.Now().Add(10 * time.Second); ; {
			var q int
			raw.Control(func(fd uintptr) { q, err = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) })
			if err != nil || q == 0 {
				break
			}
			if time.Now().After(deadline) {
				err = fmt.Errorf("%d bytes still unacknowledged after 10 s", q)
				break
			}
			time.Sleep(time.Millisecond) // the kernel's queue has no event to wait on
		}
		c.SetLinger(0)
		reset <- err
	}()
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {retry: {disabled: true}}}\n", ln.Addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
	<-begun
	paused := false
	onLoops(t, e, func(l *loop) {
		for _, o := range l.fds {
			if u, ok := o.(*upconn); ok && u.x != nil {
				l.upIn(u, false)
				paused = true
			}
		}
	})
	if !paused {
		t.Fatal("no loop had the request's connection to the instance")
	}
	close(more)
	if err := <-reset; err != nil {
		t.Fatal(err)
	}
	awaitLoops(t, e, "park the connection the instance reset", func(l *loop) bool {
		for _, o := range l.fds {
			if u, ok := o.(*upconn); ok && u.hup {
				l.upIn(u, true) // the client has caught up
				return true
			}
		}
		return false
	})
	resp, got := c.answer("GET")
	if want := string(half) + string(tail); resp.StatusCode != 200 || got != want {
		t.Fatalf("answer: %d, %d bytes of %d", resp.StatusCode, len(got), len(want))
	}
}

// A 204 goes out without a Content-Length, whatever the instance sent
// (RFC 9110, 8.6), on every path; the connection serves on.
func TestNoContentGoesOutWithoutALength(t *testing.T) {
	ri := newRawInstance(t,
		"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-A: 1\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ri.ln.Addr()))
	c := dialRaw(t, s)
	c.send("GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
	var head []string
	for {
		line, err := c.br.ReadString('\n')
		if err != nil {
			t.Fatalf("after %q: %v", head, err)
		}
		if line == "\r\n" {
			break
		}
		head = append(head, strings.TrimSpace(line))
	}
	if head[0] != "HTTP/1.1 204 No Content" || !slices.Contains(head, "X-A: 1") {
		t.Fatalf("head: %q", head)
	}
	for _, l := range head {
		if strings.HasPrefix(strings.ToLower(l), "content-length") || strings.HasPrefix(strings.ToLower(l), "transfer-encoding") {
			t.Errorf("a 204 went out with %q", l)
		}
	}
	c.send("GET /b HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("next answer: %d %q", resp.StatusCode, body)
	}
}

// The target reaches the instance as the client wrote it, an empty query
// included, on every path.
func TestTargetPassesAsWritten(t *testing.T) {
	ri := newRawInstance(t, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ri.ln.Addr()))
	c := dialRaw(t, s)
	targets := []string{"/a?", "/a?b=c", "/a%2Fb?", "/a;b=c"}
	for _, target := range targets {
		c.send("GET " + target + " HTTP/1.1\r\nHost: svc\r\n\r\n")
		if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("%s: %d %q", target, resp.StatusCode, body)
		}
	}
	seen := ri.seen()
	for i, target := range targets {
		if line, _, _ := strings.Cut(seen[i], "\r\n"); line != "GET "+target+" HTTP/1.1" {
			t.Errorf("sent %q, the instance got %q", target, line)
		}
	}
}

// Once a listener's shutdown has given up waiting (closeAll), a connection
// that was on its way into a loop is closed on arrival rather than served,
// so the shutdown's wait for its connections ends.
func TestEventLoopClosesAnArrivalAfterCloseAll(t *testing.T) {
	b := newBackend(t, "b", nil)
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	e := engineOf(t, s)
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	peer := os.NewFile(uintptr(pair[1]), "peer")
	defer peer.Close()
	f := &fastServer{}
	f.dropAll.Store(true)
	f.wg.Add(1)
	onLoops(t, e, func(l *loop) {
		if l == e.loops[0] {
			l.addClient(adoptee{fd: pair[0], f: f})
		}
	})
	done := make(chan struct{})
	go func() { f.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the connection was kept: its server's count never fell to zero")
	}
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := peer.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("the connection's other end read %d, %v; want the end of stream", n, err)
	}
}

// A connection a loop hands to the goroutine path after its listener's
// shutdown has given up waiting is closed, not served.
func TestEventLoopHandOverAfterCloseAllIsClosed(t *testing.T) {
	b := newBackend(t, "b", nil)
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	awaitLoops(t, e, "take the connection in", func(l *loop) bool { return len(l.clients) > 0 })
	var f *fastServer
	onLoops(t, e, func(l *loop) {
		for cl := range l.clients {
			f = cl.f
		}
	})
	f.dropAll.Store(true)
	// A request with a body: the loop hands it over.
	c.send("POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi")
	if resp, err := http.ReadResponse(c.br, nil); err == nil {
		t.Fatalf("the request was served (%d) after closeAll", resp.StatusCode)
	}
	if n := b.hits.Load(); n != 0 {
		t.Errorf("the instance was sent %d requests", n)
	}
}

// An instance's informational answers (103 Early Hints) reach an HTTP/1.1
// caller before the final answer, on every path, as a proxy must pass
// them on (RFC 9110, 15.2); a 100 Continue it was not asked for does not,
// and neither does anything to an HTTP/1.0 caller.
func TestInterimAnswersArePassedOn(t *testing.T) {
	ri := newRawInstance(t, "HTTP/1.1 100 Continue\r\n\r\n"+
		"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\r\n"+
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Final: 1\r\n\r\nok")
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ri.ln.Addr()))
	readHead := func(c *loopConn) []string {
		t.Helper()
		var head []string
		for {
			line, err := c.br.ReadString('\n')
			if err != nil {
				t.Fatalf("after %q: %v", head, err)
			}
			if line == "\r\n" {
				return head
			}
			head = append(head, strings.TrimSpace(line))
		}
	}
	// A GET; an upload larger than meshd's own client takes, which goes
	// through net/http's Transport; and a GET from an HTTP/1.0 caller.
	upload := strings.Repeat("u", 300<<10)
	for _, req := range []string{
		"GET /page HTTP/1.1\r\nHost: svc\r\n\r\n",
		"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: " + fmt.Sprint(len(upload)) + "\r\n\r\n" + upload,
		"GET /page HTTP/1.0\r\nHost: svc\r\n\r\n",
	} {
		proto := "HTTP/1.1"
		if strings.Contains(req[:20], "HTTP/1.0") {
			proto = "HTTP/1.0"
		}
		c := dialRaw(t, s)
		c.send(req)
		first := readHead(c)
		if proto == "HTTP/1.1" {
			if first[0] != "HTTP/1.1 103 Early Hints" || !slices.Contains(first, "Link: </a.css>; rel=preload") {
				t.Fatalf("%s: first head %q, want the 103 with its Link", proto, first)
			}
			for _, l := range first[1:] {
				if !strings.HasPrefix(l, "Link:") {
					t.Errorf("%s: the 103 carried %q", proto, l)
				}
			}
			first = readHead(c)
		}
		if !strings.HasSuffix(first[0], " 200 OK") || !slices.Contains(first, "X-Final: 1") || slices.Contains(first, "Link: </a.css>; rel=preload") {
			t.Fatalf("%s: final head %q", proto, first)
		}
		if body := make([]byte, 2); func() error { _, err := io.ReadFull(c.br, body); return err }() != nil || string(body) != "ok" {
			t.Fatalf("%s: body %q", proto, body)
		}
	}
}

// Bytes past the end of an answer the loop handed to the goroutine path
// (a 404, say) are never read as a later request's answer, whether they
// came with the answer or later, while the connection sat in the pool.
func TestHandedOverAnswerLeavesNoBytesBehind(t *testing.T) {
	const poison = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\npoison!"
	// With the answer: its body ends where a read straight into the
	// caller's buffer ends, so what follows is still in the prefix the
	// loop handed over.
	head := "HTTP/1.1 404 Not Found\r\nContent-Length: %05d\r\n\r\n"
	n := 8192 - len(fmt.Sprintf(head, 0)) + 10000
	ri := newRawInstance(t, fmt.Sprintf(head, n)+strings.Repeat("x", n)+poison, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhonest")
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {retry: {disabled: true}}}\n", ri.ln.Addr()))
	c := dialRaw(t, s)
	c.send("GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := c.answer("GET"); resp.StatusCode != 404 || len(body) != n {
		t.Fatalf("first: %d, %d bytes", resp.StatusCode, len(body))
	}
	c2 := dialRaw(t, s) // a POST: the goroutine path's pool
	c2.send("POST /b HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi")
	if resp, body := c2.answer("POST"); resp.StatusCode != 200 || body != "honest" {
		t.Errorf("with the answer: the next request got %d %q", resp.StatusCode, body)
	}

	// Later: sent unasked on the idle connection.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	sent, written := make(chan struct{}), make(chan struct{})
	go func() {
		var first sync.Once
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			go func(nc net.Conn) {
				defer nc.Close()
				br := bufio.NewReader(nc)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					answered := false
					first.Do(func() {
						io.WriteString(nc, "HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
						answered = true
					})
					if !answered {
						io.WriteString(nc, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhonest")
						continue
					}
					// Once meshd has the answer (its client has read it),
					// bytes nobody asked for.
					<-sent
					io.WriteString(nc, poison)
					close(written) // on loopback, in meshd's socket once written
				}
			}(nc)
		}
	}()
	s2 := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {retry: {disabled: true}}}\n", ln.Addr()))
	c3 := dialRaw(t, s2)
	c3.send("GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := c3.answer("GET"); resp.StatusCode != 404 || body != "no" {
		t.Fatalf("first: %d %q", resp.StatusCode, body)
	}
	sent <- struct{}{}
	<-written
	c4 := dialRaw(t, s2)
	c4.send("POST /b HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi")
	if resp, body := c4.answer("POST"); resp.StatusCode != 200 || body != "honest" {
		t.Errorf("sent later: the next request got %d %q", resp.StatusCode, body)
	}
}

// The loops' clock counts monotonic nanoseconds, never 0 (which means
// "never" to them), and saturates rather than wrap for a deadline too far
// away to count.
func TestLoopClock(t *testing.T) {
	now := time.Now()
	if m := mono(now); m <= 0 {
		t.Fatalf("mono(now) = %d, want > 0", m)
	}
	if d := mono(now.Add(3*time.Second)) - mono(now); d != int64(3*time.Second) {
		t.Fatalf("3 s apart on the loops' clock: %v", time.Duration(d))
	}
	if m := mono(now.Add(time.Duration(1<<63 - 1))); m != maxTime {
		t.Fatalf("a deadline past what the clock counts: %d, want maxTime", m)
	}
	if a, b := monoNow(), monoNow(); b < a {
		t.Fatalf("the clock went back: %d then %d", a, b)
	}
	// monoNow (the monotonic clock alone) and mono(time.Now()) are one
	// clock: monoNow may run behind by the slack of its epoch, never ahead.
	// (A second, not less: a loaded machine may deschedule the process
	// between the epoch's readings.)
	if monoEpochSlack < 0 || monoEpochSlack > int64(time.Second) {
		t.Fatalf("epoch slack %v", time.Duration(monoEpochSlack))
	}
	for i := 0; i < 1000; i++ {
		a := monoNow()
		m := mono(time.Now())
		b := monoNow()
		if a > m || m > b+monoEpochSlack {
			t.Fatalf("monoNow %d, then mono(time.Now()) %d, then monoNow %d (slack %d): not one clock", a, m, b, monoEpochSlack)
		}
	}
	// A deadline from now counts from a fresh reading, and saturates.
	a := monoNow()
	d := monoAfter(time.Second)
	if b := monoNow(); d < a+int64(time.Second) || d > b+int64(time.Second) {
		t.Fatalf("monoAfter(1s) = %d, read between %d and %d", d, a, b)
	}
	if d := monoAfter(time.Duration(maxTime)); d != maxTime {
		t.Fatalf("monoAfter past what the clock counts: %d, want maxTime", d)
	}
	// A reading as a time.Time is time.Now's clock, behind it by at most
	// the epoch's slack: so a deadline the goroutine path makes from it
	// means what the loop's does.
	for i := 0; i < 1000; i++ {
		before := time.Now()
		m := monoTime(monoNow())
		after := time.Now()
		if m.Sub(before) < -time.Duration(monoEpochSlack) || after.Sub(m) < 0 {
			t.Fatalf("monoTime(monoNow()) = %v, read between %v and %v (slack %v)", m, before, after, time.Duration(monoEpochSlack))
		}
	}
}

// A connection to an instance that was busy when the loop dropped its
// idle connections (as a reload does) is pooled again where the loop
// looks, not in the pool it was taken from: the next request reuses it.
func TestEventLoopPoolsAgainAfterADrop(t *testing.T) {
	release := make(chan struct{})
	arrived := make(chan string, 4)
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		arrived <- r.RemoteAddr
		if r.URL.Path == "/slow" {
			<-release
		}
		io.WriteString(w, r.URL.Path)
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET /first HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "/first" {
		t.Fatalf("first answer: %d %q", resp.StatusCode, body)
	}
	first := <-arrived
	c.send("GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
	if slow := <-arrived; slow != first {
		t.Fatalf("the second request came from %s, not from the pooled %s", slow, first)
	}
	// The connection is busy with /slow: the drop empties the pools
	// around it.
	e.dropIdle()
	for deadline := time.Now().Add(10 * time.Second); ; {
		pending := false
		onLoops(t, e, func(l *loop) { pending = pending || l.cmdPool.Load() })
		if !pending {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the loops did not drop their idle connections within 10 s")
		}
	}
	onLoops(t, e, func(l *loop) {
		if len(l.idle) != 0 {
			t.Errorf("a loop kept %d idle pools after the drop", len(l.idle))
		}
	})
	close(release)
	if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "/slow" {
		t.Fatalf("slow answer: %d %q", resp.StatusCode, body)
	}
	c.send("GET /third HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "/third" {
		t.Fatalf("third answer: %d %q", resp.StatusCode, body)
	}
	if third := <-arrived; third != first {
		t.Errorf("the third request came from %s: the connection of the first two (%s) was not pooled again", third, first)
	}
}
