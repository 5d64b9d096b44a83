// Command backend is a small HTTP service for meshd's demo, lab and
// benchmarks. It answers every request with its name and the request it saw,
// after an optional delay, and fails a chosen share of requests.
package main

import (
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	addr := flag.String("listen", "127.0.0.1:9001", "address to serve on")
	name := flag.String("name", "", "name in every reply (default: the listen address)")
	delay := flag.Duration("delay", 0, "added to every response")
	errRate := flag.Float64("error-rate", 0, "share of requests answered 503, 0 to 1")
	size := flag.Int("size", 0, "when > 0, reply with a body of exactly this many bytes instead of the text reply")
	flag.Parse()
	if *name == "" {
		*name = *addr
	}
	body := []byte(strings.Repeat("x", max(*size, 0)))
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if *delay > 0 {
			time.Sleep(*delay)
		}
		w.Header().Set("X-Backend", *name)
		if *errRate > 0 && rand.Float64() < *errRate {
			http.Error(w, *name+": failing on purpose", http.StatusServiceUnavailable)
			return
		}
		if *size > 0 {
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.Write(body)
			return
		}
		fmt.Fprintf(w, "%s answered %s %s (host %s, via %s)\n", *name, r.Method, r.URL.RequestURI(), r.Host, r.Header.Get("X-Forwarded-For"))
	})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("backend: %v", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		srv.Close()
	}()
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatalf("backend: %v", err)
	}
}
