package h1

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// BenchmarkRoundTrip compares this client with net/http's Transport on the
// same loopback server (128-byte answers, keep-alive, one connection per
// parallel goroutine).
func BenchmarkRoundTrip(b *testing.B) {
	body := strings.Repeat("x", 128)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, body)
	}))
	defer srv.Close()
	dial := (&net.Dialer{Timeout: time.Second}).DialContext
	for _, c := range []struct {
		name string
		rt   http.RoundTripper
	}{
		{"h1", New(Options{Dial: dial, MaxIdlePerHost: 64})},
		{"net-http", &http.Transport{DialContext: dial, MaxIdleConnsPerHost: 64, DisableCompression: true}},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				req, _ := http.NewRequest("GET", srv.URL+"/x", nil)
				buf := make([]byte, 512)
				for pb.Next() {
					resp, err := c.rt.RoundTrip(req)
					if err != nil {
						b.Fatal(err)
					}
					for {
						if _, err := resp.Body.Read(buf); err != nil {
							break
						}
					}
					resp.Body.Close()
				}
			})
		})
	}
}
