// Command frontend is the walkthrough's front service. For every request it
// receives it calls the backend service by its mesh name (http://backend/ by
// default) and answers with what the backend said.
//
// It knows nothing about instances, balancing or retries: its HTTP client
// honours HTTP_PROXY, which points at the local meshd sidecar's outbound
// listener, and meshd does the rest. It has no tracing library either: it
// copies the trace headers of the request it received (W3C traceparent,
// tracestate, baggage and the B3 headers) onto the request it sends, which is
// all a service must do for meshd's spans on both sides of it to join into
// one trace.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// traceHeaders are the context headers a service passes from the request it
// serves to the requests it makes.
var traceHeaders = []string{
	"Traceparent", "Tracestate", "Baggage",
	"B3", "X-B3-Traceid", "X-B3-Spanid", "X-B3-Parentspanid", "X-B3-Sampled", "X-B3-Flags",
}

func main() {
	addr := flag.String("listen", "127.0.0.1:8081", "address to serve on")
	upstream := flag.String("upstream", "http://backend/", "URL called for every request (a mesh name, reached through HTTP_PROXY)")
	timeout := flag.Duration("timeout", 5*time.Second, "timeout of each call to the upstream")
	flag.Parse()

	probe, err := http.NewRequest(http.MethodGet, *upstream, nil)
	if err != nil {
		log.Fatalf("frontend: -upstream %q: %v", *upstream, err)
	}
	if p, err := http.ProxyFromEnvironment(probe); err != nil || p == nil {
		log.Printf("frontend: warning: no HTTP_PROXY applies to %s, so it is called directly, without the sidecar", *upstream)
	} else {
		log.Printf("frontend: calling %s through the sidecar at %s", *upstream, p.Host)
	}

	client := &http.Client{Timeout: *timeout} // DefaultTransport: HTTP_PROXY and keep-alive
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		out, err := http.NewRequestWithContext(r.Context(), http.MethodGet, *upstream, nil)
		if err != nil {
			http.Error(w, "frontend: "+err.Error(), http.StatusInternalServerError)
			return
		}
		for _, k := range traceHeaders {
			if v, ok := r.Header[k]; ok {
				out.Header[k] = v
			}
		}
		resp, err := client.Do(out)
		if err != nil {
			http.Error(w, "frontend: calling backend: "+err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if err != nil {
			http.Error(w, "frontend: reading backend's answer: "+err.Error(), http.StatusBadGateway)
			return
		}
		if b := resp.Header.Get("X-Backend"); b != "" {
			w.Header().Set("X-Backend", b)
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(resp.StatusCode)
		fmt.Fprintf(w, "frontend got %d from backend: %s", resp.StatusCode, body)
	})

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("frontend: %v", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		// Finish the requests in flight, then exit.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}()
	log.Printf("frontend: serving on %s", ln.Addr())
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		log.Fatalf("frontend: %v", err)
	}
	<-stopped
}
