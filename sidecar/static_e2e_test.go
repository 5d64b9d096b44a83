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
	"syscall"
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
	s := startConfig(t, cfg, testLogger(t))
	waitReady(t, s)
	waitFor(t, "the edit made during start to reach routing", func() bool {
		st := status(t, s, "payments")
		return len(st.Instances) == 1 && st.Instances[0].Address == b2.addr()
	})
}

// catalogAddrs is the static catalog's addresses for svc, as swapped in
// (synchronously) by the file watcher or a reload.
func catalogAddrs(s *Sidecar, svc string) []string {
	in, _ := s.catalog.Lookup(svc)
	out := make([]string, 0, len(in))
	for _, i := range in {
		out = append(out, i.Address)
	}
	return out
}

// fastStaticPoll makes the file watcher poll every 20ms for the test, and
// installs hooks; the originals come back after the sidecar is shut down.
func fastStaticPoll(t *testing.T, settling, polled func()) {
	t.Helper()
	oldPoll, oldSettling, oldPolled := staticFilePoll, staticFileSettling, staticFilePolled
	staticFilePoll, staticFileSettling, staticFilePolled = 20*time.Millisecond, settling, polled
	t.Cleanup(func() { staticFilePoll, staticFileSettling, staticFilePolled = oldPoll, oldSettling, oldPolled })
}

// pollCounter counts the watcher's polls so that a test can await "n more
// polls" instead of sleeping.
type pollCounter struct {
	mu sync.Mutex
	n  int
	ch chan struct{}
}

func newPollCounter() *pollCounter { return &pollCounter{ch: make(chan struct{}, 1)} }

func (p *pollCounter) polled() {
	p.mu.Lock()
	p.n++
	p.mu.Unlock()
	select {
	case p.ch <- struct{}{}:
	default:
	}
}

// await returns after at least n polls more than when it was called.
func (p *pollCounter) await(t *testing.T, n int) {
	t.Helper()
	p.mu.Lock()
	target := p.n + n
	p.mu.Unlock()
	deadline := time.After(10 * time.Second)
	for {
		p.mu.Lock()
		done := p.n >= target
		p.mu.Unlock()
		if done {
			return
		}
		select {
		case <-p.ch:
		case <-deadline:
			t.Fatalf("the static file watcher did not poll %d more times", n)
		}
	}
}

// Content that loading the config would refuse is refused on change too,
// and the catalog stays as it was: a service that discovery.static also
// lists, or a file that leaves a static upstream without instances (an
// empty file, say).
func TestStaticCatalogFileRefusesWhatLoadRefuses(t *testing.T) {
	polls := newPollCounter()
	fastStaticPoll(t, nil, polls.polled)
	b1, b2 := newBackend(t, "b1", nil), newBackend(t, "b2", nil)
	catalog := filepath.Join(t.TempDir(), "catalog.yaml")
	if err := os.WriteFile(catalog, []byte("payments: ["+b1.addr()+"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuf{}
	s := startLogged(t, fmt.Sprintf("discovery: {static: {orders: [%s]}, static_file: %s}\nupstreams: {payments: {}, orders: {}}\n", b1.addr(), catalog), logs)
	for _, tc := range []struct{ name, content, want string }{
		{"duplicate", "payments: [" + b2.addr() + "]\norders: [" + b2.addr() + "]\n", `service \"orders\" is in both discovery.static and ` + catalog},
		{"upstream left without instances", "inventory: [" + b2.addr() + "]\n", `upstreams.payments: no instances`},
		{"empty", "", `upstreams.payments: no instances`},
		{"service emptied", "payments: []\n", `payments: lists no instance`},
		{"service key alone", "payments:\n", `payments: lists no instance`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			off := len(logs.String())
			if err := os.WriteFile(catalog, []byte(tc.content), 0o644); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the file to be refused", func() bool { return strings.Contains(logs.String()[off:], tc.want) })
			for _, svc := range []string{"payments", "orders"} {
				if have := catalogAddrs(s, svc); len(have) != 1 || have[0] != b1.addr() {
					t.Fatalf("%s: a refused catalog file changed the catalog: %v", svc, have)
				}
			}
		})
	}
	if _, ok := s.catalog.Lookup("inventory"); ok {
		t.Fatal("a refused file added a service")
	}
	// A good file after refused ones is taken.
	if err := os.WriteFile(catalog, []byte("payments: ["+b2.addr()+"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the good file to be applied", func() bool {
		have := catalogAddrs(s, "payments")
		return len(have) == 1 && have[0] == b2.addr()
	})
}

// A reload that lands while the watcher settles a change to the old file
// wins: the poll that read under the old config does not swap its catalog
// in afterwards.
func TestStaticCatalogReloadDuringSettleWins(t *testing.T) {
	settling := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	polls := newPollCounter()
	fastStaticPoll(t, func() {
		once.Do(func() {
			close(settling)
			<-release
		})
	}, polls.polled)
	b1, b2, b3 := newBackend(t, "b1", nil), newBackend(t, "b2", nil), newBackend(t, "b3", nil)
	dir := t.TempDir()
	fileA, fileB := filepath.Join(dir, "a.yaml"), filepath.Join(dir, "b.yaml")
	os.WriteFile(fileA, []byte("payments: ["+b1.addr()+"]\n"), 0o644)
	os.WriteFile(fileB, []byte("payments: ["+b3.addr()+"]\n"), 0o644)
	s := start(t, fmt.Sprintf("discovery: {static_file: %s}\nupstreams: {payments: {}}\n", fileA))
	os.WriteFile(fileA, []byte("payments: ["+b2.addr()+"]\n"), 0o644)
	select {
	case <-settling:
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("the watcher never saw the edit")
	}
	cfg, err := parseConfig(fmt.Sprintf("discovery: {static_file: %s}\nupstreams: {payments: {}}\n", fileB))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(cfg); err != nil {
		close(release)
		t.Fatal(err)
	}
	close(release)
	polls.await(t, 3)
	if have := catalogAddrs(s, "payments"); len(have) != 1 || have[0] != b3.addr() {
		t.Fatalf("after a reload to %s during a settle of %s: want %s, have %v", fileB, fileA, b3.addr(), have)
	}
}

// Content that changes again while it settles is not applied; the content
// it settles on is.
func TestStaticCatalogFileUnsettledContentIsNotApplied(t *testing.T) {
	b1, b2 := newBackend(t, "b1", nil), newBackend(t, "b2", nil)
	catalog := filepath.Join(t.TempDir(), "catalog.yaml")
	os.WriteFile(catalog, []byte("payments: ["+b1.addr()+"]\n"), 0o644)
	var once sync.Once
	polls := newPollCounter()
	fastStaticPoll(t, func() {
		// The watcher has read the half-written file; the writer finishes.
		once.Do(func() { os.WriteFile(catalog, []byte("payments: ["+b1.addr()+", "+b2.addr()+"]\n"), 0o644) })
	}, polls.polled)
	logs := &syncBuf{}
	s := startLogged(t, fmt.Sprintf("discovery: {static: {orders: [%s]}, static_file: %s}\nupstreams: {payments: {}}\n", b1.addr(), catalog), logs)
	// Half-written: parses, and would be accepted on its own.
	os.WriteFile(catalog, []byte("payments: ["+b2.addr()+"]\n"), 0o644)
	waitFor(t, "the finished file to be applied", func() bool { return len(catalogAddrs(s, "payments")) == 2 })
	// The poll that applied it logs after the swap: let it, and one more,
	// finish before counting.
	polls.await(t, 2)
	if n := strings.Count(logs.String(), "static catalog file reloaded"); n != 1 {
		t.Fatalf("want the finished file applied once and nothing else, have %d reloads:\n%s", n, logs.String())
	}
}

// An unreadable file is logged once per outage, and its return too.
func TestStaticCatalogFileOutagesAreLogged(t *testing.T) {
	polls := newPollCounter()
	fastStaticPoll(t, nil, polls.polled)
	b1 := newBackend(t, "b1", nil)
	catalog := filepath.Join(t.TempDir(), "catalog.yaml")
	content := []byte("payments: [" + b1.addr() + "]\n")
	os.WriteFile(catalog, content, 0o644)
	logs := &syncBuf{}
	s := startLogged(t, fmt.Sprintf("discovery: {static_file: %s}\nupstreams: {payments: {}}\n", catalog), logs)
	for i := 1; i <= 2; i++ {
		os.Remove(catalog)
		waitFor(t, "the outage logged", func() bool { return strings.Count(logs.String(), "static catalog file unreadable") == i })
		polls.await(t, 3)
		if n := strings.Count(logs.String(), "static catalog file unreadable"); n != i {
			t.Fatalf("outage %d logged %d times in all", i, n)
		}
		os.WriteFile(catalog, content, 0o644)
		waitFor(t, "the return logged", func() bool { return strings.Count(logs.String(), "static catalog file readable again") == i })
	}
	if have := catalogAddrs(s, "payments"); len(have) != 1 || have[0] != b1.addr() {
		t.Fatalf("outages changed the catalog: %v", have)
	}
}

// A catalog file replaced by a FIFO neither blocks the watcher nor, through
// it, shutdown.
func TestStaticCatalogFileFIFODoesNotBlock(t *testing.T) {
	fastStaticPoll(t, nil, nil)
	b1 := newBackend(t, "b1", nil)
	catalog := filepath.Join(t.TempDir(), "catalog.yaml")
	os.WriteFile(catalog, []byte("payments: ["+b1.addr()+"]\n"), 0o644)
	logs := &syncBuf{}
	s := startLogged(t, fmt.Sprintf("discovery: {static_file: %s}\nupstreams: {payments: {}}\n", catalog), logs)
	os.Remove(catalog)
	if err := syscall.Mkfifo(catalog, 0o644); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	waitFor(t, "the FIFO refused", func() bool { return strings.Contains(logs.String(), "not a regular file") })
	ctx, cancel := contextWithTimeout(5 * time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
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
