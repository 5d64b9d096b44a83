package sidecar

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshd/meshd/sidecar/config"
	"github.com/meshd/meshd/telemetry"
)

// backend is a real local HTTP server that records what reached it.
type backend struct {
	*httptest.Server
	name string
	hits atomic.Int64
}

func newBackend(t testing.TB, name string, h http.HandlerFunc) *backend {
	t.Helper()
	b := &backend{name: name}
	if h == nil {
		h = func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, name) }
	}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.hits.Add(1)
		w.Header().Set("X-Backend", name)
		h(w, r)
	}))
	t.Cleanup(b.Close)
	return b
}

func (b *backend) addr() string { return strings.TrimPrefix(b.URL, "http://") }

// start runs a sidecar on loopback with the given YAML (listen addresses
// default to :0) and waits until it is ready.
func start(t testing.TB, yaml string) *Sidecar {
	t.Helper()
	s := startUnreadyWith(t, yaml, testLogger(t))
	waitReady(t, s)
	return s
}

// startUnreadyWith starts a sidecar logging to log, without waiting for
// readiness; it is shut down when the test ends.
func startUnreadyWith(t testing.TB, yaml string, log *slog.Logger) *Sidecar {
	t.Helper()
	cfg, err := parseConfig(yaml)
	if err != nil {
		t.Fatalf("config:\n%v", err)
	}
	return startConfig(t, cfg, log)
}

// startConfig starts a sidecar on cfg, logging to log, without waiting for
// readiness; it is shut down when the test ends.
func startConfig(t testing.TB, cfg *config.Config, log *slog.Logger) *Sidecar {
	t.Helper()
	return startWithTelemetry(t, cfg, log, nil)
}

// startWithTelemetry is startConfig with the telemetry provider tel (nil:
// none).
func startWithTelemetry(t testing.TB, cfg *config.Config, log *slog.Logger, tel *telemetry.Provider) *Sidecar {
	t.Helper()
	s, err := New(cfg, log, tel)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := contextWithTimeout(10 * time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	return s
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("MESHD_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// waitReady polls /ready until 200 (discovery answers asynchronously).
func waitReady(t testing.TB, s *Sidecar) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get("http://" + s.Addr("admin") + "/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("sidecar not ready after 5s (last: %v)", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// proxyClient sends requests through the sidecar as a forward proxy.
func proxyClient(s *Sidecar) *http.Client {
	u, _ := url.Parse("http://" + s.Addr("outbound"))
	return &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(u)}, Timeout: 30 * time.Second}
}

func readAll(t testing.TB, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading body: %v", err)
	}
	return string(b)
}

func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// topListen finds a top-level listen section.
var topListen = regexp.MustCompile(`(?m)^listen:`)

// parseConfig parses a test config, binding the sidecar's own listeners to
// free loopback ports unless the config has a listen section of its own.
func parseConfig(yaml string) (*config.Config, error) {
	if !topListen.MatchString(yaml) {
		yaml = "listen: {outbound: 127.0.0.1:0, admin: 127.0.0.1:0}\n" + yaml
	}
	cfg, err := config.Parse("test.yaml", []byte(yaml))
	off := false
	switch mode := os.Getenv("MESHD_TEST_FAST_PATH"); {
	case err != nil:
	case mode == "off":
		// make test runs the suite again on net/http's server alone,
		cfg.Proxy.FastPath = &off
	case mode == "goroutines":
		// and on the fast path without event loops.
		cfg.Proxy.EventLoop = &off
	}
	return cfg, err
}
