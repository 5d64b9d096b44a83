package sidecar

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"
)

// rawBackend answers every request on a keep-alive connection with the same
// fixed response, allocating nothing per request, so that a benchmark's
// allocations are the sidecar's own.
func rawBackend(b testing.TB) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	resp := []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 128\r\n\r\n" + string(bytes.Repeat([]byte("x"), 128)))
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
					// Read one head (these requests have no body).
					for {
						line, err := br.ReadSlice('\n')
						if err != nil {
							return
						}
						if len(line) <= 2 {
							break
						}
					}
					if _, err := c.Write(resp); err != nil {
						return
					}
				}
			}(c)
		}
	}()
	return ln.Addr().String()
}

// discardWriter is a ResponseWriter that keeps nothing.
type discardWriter struct{ h http.Header }

func (d *discardWriter) Header() http.Header         { return d.h }
func (d *discardWriter) Write(p []byte) (int, error) { return len(p), nil }
func (d *discardWriter) WriteHeader(int)             {}

// BenchmarkForward measures the forward path alone: route decided, then
// pick, breaker, the h1 exchange with a real loopback instance, response
// copy, metrics (on, as by default) and the access line (off).
func BenchmarkForward(b *testing.B) {
	addr := rawBackend(b)
	s := start(b, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nlog: {access: false}\n", addr))
	u := s.lookup("p")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		r, _ := http.NewRequest("GET", "http://p/items?id=1", nil)
		r.RemoteAddr = "127.0.0.1:5555"
		w := &discardWriter{h: make(http.Header)}
		for pb.Next() {
			clear(w.h)
			s.forward(w, r, u, time.Now(), false, nil)
		}
	})
}
