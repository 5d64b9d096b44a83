//go:build unix

package h1

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Bytes an instance sends past an answer's end (a HEAD answer with a body,
// a body longer than its Content-Length, anything sent on an idle
// connection) are never read as a later request's answer: the connection
// is retired and the next request dials.
func TestLeftoverBytesRetireTheConnection(t *testing.T) {
	const poison = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\npoison!"
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var conns atomic.Int64
	late := make(chan struct{}) // the test asks for the unasked bytes
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n := conns.Add(1)
			go func(c net.Conn) {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					switch req.URL.Path {
					case "/head":
						fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(poison), poison)
					case "/long":
						io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"+poison)
					case "/late":
						io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
						<-late
						io.WriteString(c, poison)
					default:
						fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nconn%02d", n)
					}
				}
			}(c)
		}
	}()
	tr := New(Options{})
	t.Cleanup(tr.CloseIdleConnections)
	url := "http://" + ln.Addr().String()
	fresh := func(step string) {
		t.Helper()
		before := conns.Load()
		if _, body := get(t, tr, url+"/next"); body != fmt.Sprintf("conn%02d", before+1) {
			t.Errorf("after %s: the next answer was %q, want one on a new connection (conn%02d)", step, body, before+1)
		}
	}

	req, _ := http.NewRequest("HEAD", url+"/head", nil)
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	fresh("a HEAD answer with a body")

	if _, body := get(t, tr, url+"/long"); body != "ok" {
		t.Fatalf("/long: %q", body)
	}
	fresh("a body longer than its Content-Length")

	if _, body := get(t, tr, url+"/late"); body != "ok" {
		t.Fatalf("/late: %q", body)
	}
	late <- struct{}{}
	waitReadable(t, tr, ln.Addr().String())
	fresh("bytes sent on an idle connection")
}

// waitReadable waits until the one idle connection pooled to addr has
// bytes to read.
func waitReadable(t *testing.T, tr *Transport, addr string) {
	t.Helper()
	p := tr.poolFor(addr)
	p.mu.Lock()
	if len(p.idle) != 1 {
		p.mu.Unlock()
		t.Fatalf("%d idle connections, want 1", len(p.idle))
	}
	c := p.idle[0]
	p.mu.Unlock()
	rc, err := c.nc.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.nc.SetReadDeadline(time.Time{})
	var b [1]byte
	if err := rc.Read(func(fd uintptr) bool {
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return err != syscall.EAGAIN
	}); err != nil {
		t.Fatal(err)
	}
}

// Informational answers are reported, in order, to the request's
// httptrace.ClientTrace before the final answer is returned.
func TestInterimAnswersReachTheTrace(t *testing.T) {
	url := rawAnswer(t, func(w io.Writer) {
		io.WriteString(w, "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	})
	var got []string
	trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
		got = append(got, fmt.Sprint(code, " ", h.Get("Link")))
		return nil
	}}
	req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET", url, nil)
	resp, err := New(Options{}).RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "ok" || fmt.Sprint(got) != "[103 </a> 102 ]" {
		t.Fatalf("final %d %q, interim answers %q", resp.StatusCode, b, got)
	}
}

// A pooled connection is reused after its last exchange's deadlines have
// passed: the look for bytes sent unasked ignores them.
func TestPoolOutlivesItsLastDeadline(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	tr := New(Options{ResponseHeaderTimeout: 50 * time.Millisecond})
	t.Cleanup(tr.CloseIdleConnections)
	for i := 0; i < 3; i++ {
		if i > 0 {
			time.Sleep(100 * time.Millisecond) // idle past the header deadline: the scenario, not a wait
		}
		ctx, cancel := context.WithTimeout(context.Background(), 80*time.Millisecond)
		req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL, nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadAll(resp.Body)
		resp.Body.Close()
		cancel()
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("3 requests, each after the last one's deadlines, opened %d connections, want 1", n)
	}
}
