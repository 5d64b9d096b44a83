package sidecar

import (
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestStaticCatalogFileIsWatched(t *testing.T) {
	old := staticFilePoll
	staticFilePoll = 20 * time.Millisecond
	t.Cleanup(func() { staticFilePoll = old })
	b1, b2 := newBackend(t, "b1", nil), newBackend(t, "b2", nil)
	dir := t.TempDir()
	catalog := filepath.Join(dir, "catalog.yaml")
	os.WriteFile(catalog, []byte("payments: ["+b1.addr()+"]\n"), 0o644)
	logs := &syncBuf{}
	s := startLogged(t, fmt.Sprintf("discovery: {static_file: %s}\nupstreams: {payments: {}}\n", catalog), logs)
	pc := proxyClient(s)
	resp, err := pc.Get("http://payments/")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); body != "b1" {
		t.Fatalf("want b1, have %q", body)
	}
	os.WriteFile(catalog, []byte("payments: ["+b2.addr()+"]\n"), 0o644)
	waitFor(t, "the catalog file change to reach routing", func() bool {
		st := status(t, s, "payments")
		return len(st.Instances) == 1 && st.Instances[0].Address == b2.addr()
	})
	// A broken file is refused and the last good catalog stays.
	os.WriteFile(catalog, []byte("payments: [not-an-address]\n"), 0o644)
	waitFor(t, "the broken catalog file to be rejected", func() bool {
		return strings.Contains(logs.String(), "static catalog file rejected")
	})
	if st := status(t, s, "payments"); len(st.Instances) != 1 || st.Instances[0].Address != b2.addr() {
		t.Fatalf("a broken catalog file changed routing: %+v", st.Instances)
	}
	resp, err = pc.Get("http://payments/")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); body != "b2" {
		t.Fatalf("want b2, have %q", body)
	}
}

func TestForwardedHeadersCanBeTurnedOffAndAdminServesProfiles(t *testing.T) {
	seen := make(chan http.Header, 1)
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) { seen <- r.Header.Clone() })
	s := start(t, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nproxy: {x_forwarded: false}\n", b.addr()))
	resp, err := proxyClient(s).Get("http://p/")
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	h := <-seen
	if h.Get("X-Forwarded-For") != "" || h.Get("X-Forwarded-Proto") != "" {
		t.Fatalf("x_forwarded: false still sent %v", h)
	}
	for path, want := range map[string]string{"/debug/pprof/": "goroutine", "/healthz": "ok", "/upstreams?format=text": "UPSTREAM"} {
		if body := get(t, "http://"+s.Addr("admin")+path); !strings.Contains(body, want) {
			t.Errorf("%s: want %q in %q", path, want, body[:min(len(body), 200)])
		}
	}
}

// syncBuf is a log sink safe for concurrent writes.
type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *syncBuf) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuf) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// startLogged is start with the sidecar's log going to w.
func startLogged(t *testing.T, yaml string, w io.Writer) *Sidecar {
	t.Helper()
	s := startUnreadyWith(t, yaml, slog.New(slog.NewTextHandler(w, nil)))
	waitReady(t, s)
	return s
}

// An edit that lands after the config was loaded but before the watcher's
// first poll must still reach routing: the watcher compares against the
// content the config was built from, not a later read.
func TestStaticCatalogEditDuringStartIsApplied(t *testing.T) {
	old := staticFilePoll
	staticFilePoll = 20 * time.Millisecond
	t.Cleanup(func() { staticFilePoll = old })
	b1, b2 := newBackend(t, "b1", nil), newBackend(t, "b2", nil)
	catalog := filepath.Join(t.TempDir(), "catalog.yaml")
	if err := os.WriteFile(catalog, []byte("payments: ["+b1.addr()+"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := parseConfig(fmt.Sprintf("discovery: {static_file: %s}\nupstreams: {payments: {}}\n", catalog))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(catalog, []byte("payments: ["+b2.addr()+"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := New(cfg, testLogger(t), nil)
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
	waitReady(t, s)
	waitFor(t, "the edit made during start to reach routing", func() bool {
		st := status(t, s, "payments")
		return len(st.Instances) == 1 && st.Instances[0].Address == b2.addr()
	})
}

// A file that names a service discovery.static already has is refused on
// change, as it is when the config loads, and routing stays as it was.
func TestStaticCatalogFileDuplicateIsRejected(t *testing.T) {
	old := staticFilePoll
	staticFilePoll = 20 * time.Millisecond
	t.Cleanup(func() { staticFilePoll = old })
	b1, b2 := newBackend(t, "b1", nil), newBackend(t, "b2", nil)
	catalog := filepath.Join(t.TempDir(), "catalog.yaml")
	if err := os.WriteFile(catalog, []byte("payments: ["+b1.addr()+"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuf{}
	s := startLogged(t, fmt.Sprintf("discovery: {static: {orders: [%s]}, static_file: %s}\nupstreams: {payments: {}, orders: {}}\n", b1.addr(), catalog), logs)
	if err := os.WriteFile(catalog, []byte("payments: ["+b2.addr()+"]\norders: ["+b2.addr()+"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the duplicate to be rejected", func() bool {
		return strings.Contains(logs.String(), `service \"orders\" is in both discovery.static and the file`)
	})
	for _, svc := range []string{"payments", "orders"} {
		if st := status(t, s, svc); len(st.Instances) != 1 || st.Instances[0].Address != b1.addr() {
			t.Fatalf("%s: a refused catalog file changed routing: %+v", svc, st.Instances)
		}
	}
}

func TestStaticFileSettledNeedsTwoEqualReads(t *testing.T) {
	old := staticFileSettle
	staticFileSettle = time.Millisecond
	t.Cleanup(func() { staticFileSettle = old })
	s := start(t, "discovery: {static: {p: [127.0.0.1:1]}}\nupstreams: {p: {}}\n")
	f := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(f, []byte("p: [127.0.0.1:2]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if !s.settled(f, []byte("p: [127.0.0.1:2]\n")) {
		t.Fatal("unchanged content not settled")
	}
	if s.settled(f, []byte("")) {
		t.Fatal("content read half-written (empty) counted as settled")
	}
	if s.settled(filepath.Join(t.TempDir(), "gone.yaml"), nil) {
		t.Fatal("a missing file counted as settled")
	}
}
