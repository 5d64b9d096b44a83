package h1

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// sentOn writes req with WriteHead on a new connection to srv's address,
// as an event loop would, and returns the connection.
func sentOn(t *testing.T, addr string, req *http.Request) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	bw := bufio.NewWriter(nc)
	if err := WriteHead(bw, req, nil); err != nil {
		t.Fatal(err)
	}
	if err := bw.Flush(); err != nil {
		t.Fatal(err)
	}
	return nc
}

// Resume reads the answer to a request another sender wrote, starting
// with bytes already received, and pools the connection after.
func TestResumeTakesOverAnExchange(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "answer to "+r.URL.Path+" "+r.Header.Get("X-Tag"))
	})
	addr := strings.TrimPrefix(srv.URL, "http://")
	tr := New(Options{})
	req, _ := http.NewRequest("GET", srv.URL+"/first", nil)
	req.Header.Set("X-Tag", "t1")
	nc := sentOn(t, addr, req)
	// Take the status line's first bytes off the wire, as a loop that
	// read part of the head would have.
	part := make([]byte, 5)
	if _, err := io.ReadFull(nc, part); err != nil {
		t.Fatal(err)
	}
	resp, err := tr.Resume(req, nc, part, false, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "answer to /first t1" {
		t.Fatalf("resumed: %d %q", resp.StatusCode, body)
	}
	if _, b := get(t, tr, srv.URL+"/second"); b != "answer to /second " {
		t.Fatalf("second: %q", b)
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections, want 1: the resumed one joins the pool", n)
	}
}

// A pooled connection the instance closed unanswered is resent on a new
// one when the request is safe to repeat, and not otherwise.
func TestResumeResendsOnlyWhatIsSafe(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, tc := range []struct {
		method string
		want   error
	}{{"GET", nil}, {"DELETE", errStale}} {
		req, _ := http.NewRequest(tc.method, srv.URL+"/", nil)
		// A connection that reads the request and closes unanswered.
		nc, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		peer, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		peer.Close()
		before := conns.Load()
		resp, err := New(Options{}).Resume(req, nc, nil, true, time.Now())
		if tc.want == nil {
			if err != nil {
				t.Fatalf("%s: %v", tc.method, err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(b) != "ok" || conns.Load() != before+1 {
				t.Errorf("%s: %q after %d new connections, want ok after 1", tc.method, b, conns.Load()-before)
			}
			continue
		}
		if !errors.Is(err, tc.want) || conns.Load() != before {
			t.Errorf("%s: want %v and no new connection, have %v and %d", tc.method, tc.want, err, conns.Load()-before)
		}
	}
}

// The header timeout counts from when the request was written, not from
// when Resume took over.
func TestResumeHeaderTimeoutCountsFromTheWrite(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close() // never answers
	tr := New(Options{ResponseHeaderTimeout: 200 * time.Millisecond})
	req, _ := http.NewRequestWithContext(context.Background(), "GET", "http://"+ln.Addr().String()+"/", nil)
	t0 := time.Now()
	_, err = tr.Resume(req, nc, nil, false, t0.Add(-150*time.Millisecond))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("want a timeout, have %v", err)
	}
	if d := time.Since(t0); d > 150*time.Millisecond {
		t.Errorf("timed out after %v: the wait counted from Resume, not from the write", d)
	}
}

// HeadParser reads heads as RoundTrip does, and says when one is not all there.
func TestHeadParser(t *testing.T) {
	var p HeadParser
	req, _ := http.NewRequest("GET", "http://x/", nil)
	full := "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nX-A: 2\r\n\r\nok"
	resp, n, err := p.Parse(req, []byte(full))
	if err != nil || resp.StatusCode != 200 || n != len(full)-2 || len(resp.Header["X-A"]) != 2 {
		t.Fatalf("whole head: %v %d %v", resp, n, err)
	}
	for i := 0; i < len(full)-2; i++ {
		if _, _, err := p.Parse(req, []byte(full[:i])); err != ErrIncomplete {
			t.Fatalf("%d bytes: want ErrIncomplete, have %v", i, err)
		}
	}
	for _, bad := range []string{"HTTP/1.1 2x0 OK\r\n\r\n", "SPDY/3 200 OK\r\n\r\n", "HTTP/1.1 200 OK\r\nno colon\r\n\r\n"} {
		if _, _, err := p.Parse(req, []byte(bad)); err == nil || err == ErrIncomplete {
			t.Errorf("%q: want an error, have %v", bad, err)
		}
	}
}

// WriteHead writes what RoundTrip would, and refuses a request with a body.
func TestWriteHead(t *testing.T) {
	req, _ := http.NewRequest("POST", "http://inst:80/p?q=1", nil)
	req.Host = "svc"
	req.Header.Set("X-Y", "z")
	var b bytes.Buffer
	bw := bufio.NewWriter(&b)
	if err := WriteHead(bw, req, []byte("X-Raw: 1\r\n")); err != nil {
		t.Fatal(err)
	}
	bw.Flush()
	want := "POST /p?q=1 HTTP/1.1\r\nHost: svc\r\nX-Y: z\r\nX-Raw: 1\r\nContent-Length: 0\r\n\r\n"
	if b.String() != want {
		t.Errorf("have %q, want %q", b.String(), want)
	}
	req.Body = io.NopCloser(strings.NewReader("x"))
	if err := WriteHead(bw, req, nil); err == nil {
		t.Error("a request with a body was written without it")
	}
}
