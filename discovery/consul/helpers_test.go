package consul

import (
	"bytes"
	"context"
	"fmt"
	"io"
	stdlog "log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshd/meshd/discovery"
	"github.com/meshd/meshd/internal/testenv"
)

// isolateEnv clears the CONSUL_* variables so a developer's shell cannot
// steer a test to another agent or token.
func isolateEnv(t testing.TB) {
	t.Helper()
	for _, v := range []string{
		api.HTTPAddrEnvName, api.HTTPTokenEnvName, api.HTTPTokenFileEnvName, api.HTTPAuthEnvName,
		api.HTTPSSLEnvName, api.HTTPCAFile, api.HTTPCAPath, api.HTTPClientCert, api.HTTPClientKey,
		api.HTTPTLSServerName, api.HTTPSSLVerifyEnvName, api.HTTPNamespaceEnvName, api.HTTPPartitionEnvName,
	} {
		t.Setenv(v, "")
	}
}

// logBuffer collects log output for assertions; safe for concurrent writes.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// newLogger returns a debug logger into a buffer whose content is printed
// if the test fails.
func newLogger(t *testing.T) (*slog.Logger, *logBuffer) {
	t.Helper()
	lb := &logBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log output:\n%s", lb.String())
		}
	})
	return slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})), lb
}

// testConfig is a Config for agent c with a long wait (so an update that
// arrives quickly cannot be the result of polling) and quick retries.
func testConfig(c *testenv.Consul, log *slog.Logger) Config {
	return Config{
		Address:     c.Addr(),
		WaitTime:    30 * time.Second,
		BackoffBase: 50 * time.Millisecond,
		BackoffMax:  400 * time.Millisecond,
		Logger:      log,
	}
}

func newSource(t *testing.T, cfg Config) *Source {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s
}

// event is one Take from a mailbox.
type event struct {
	at time.Time
	u  *discovery.Update
	st discovery.Status
}

func (e event) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s ", e.at.Format("15:04:05.000"))
	if e.u != nil {
		fmt.Fprintf(&b, "update(index=%d %v reason=%q) ", e.u.Index, ids(e.u), e.u.Reason)
	}
	if e.st.Err != nil {
		fmt.Fprintf(&b, "err=%v", e.st.Err)
	}
	return b.String()
}

// recorder drains a mailbox as a consumer would and keeps every event.
type recorder struct {
	mu     sync.Mutex
	events []event
	wake   chan struct{}
}

func newRecorder(t testing.TB, box *discovery.Mailbox) *recorder {
	r := &recorder{wake: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case <-box.Ready():
			}
			u, st, changed := box.Take()
			if !changed {
				continue
			}
			r.mu.Lock()
			r.events = append(r.events, event{at: time.Now(), u: u, st: st})
			close(r.wake)
			r.wake = make(chan struct{})
			r.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

// wait returns the first event at position from or later that satisfies
// cond, and the position after it.
func (r *recorder) wait(t testing.TB, from int, timeout time.Duration, what string, cond func(event) bool) (event, int) {
	t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		r.mu.Lock()
		for i := from; i < len(r.events); i++ {
			if cond(r.events[i]) {
				e := r.events[i]
				r.mu.Unlock()
				return e, i + 1
			}
		}
		wake := r.wake
		r.mu.Unlock()
		select {
		case <-wake:
		case <-timer.C:
			t.Fatalf("want %s within %v, have events:\n%s", what, timeout, r.dump())
			return event{}, from
		}
	}
}

func (r *recorder) all() []event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

func (r *recorder) dump() string {
	var b strings.Builder
	for _, e := range r.all() {
		b.WriteString("  " + e.String() + "\n")
	}
	return b.String()
}

// hasIDs matches an update whose instance IDs are exactly want.
func hasIDs(want ...string) func(event) bool {
	slices.Sort(want)
	return func(e event) bool {
		return e.u != nil && slices.Equal(ids(e.u), want)
	}
}

func failed(e event) bool { return e.st.Err != nil }

func ids(u *discovery.Update) []string {
	out := make([]string, 0, len(u.Instances))
	for _, in := range u.Instances {
		out = append(out, in.ID)
	}
	slices.Sort(out)
	return out
}

// running is a watch started by startWatch.
type running struct {
	rec  *recorder
	done chan struct{}
	err  error
}

// startWatch runs src.WatchService for the rest of the test.
func startWatch(t *testing.T, src *Source, service string, o WatchOptions) *running {
	t.Helper()
	box := discovery.NewMailbox()
	w := &running{rec: newRecorder(t, box), done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		defer close(w.done)
		w.err = src.WatchService(ctx, service, o, box)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-w.done:
		case <-time.After(5 * time.Second):
			t.Errorf("watch %q still running 5s after cancel", service)
		}
	})
	return w
}

func agentRegister(t *testing.T, cl *api.Client, reg *api.AgentServiceRegistration) time.Time {
	t.Helper()
	start := time.Now()
	if err := cl.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register %s: %v", reg.ID, err)
	}
	return start
}

// ttlCheck is a TTL check whose state the test sets with UpdateTTL.
func ttlCheck(id, status string) *api.AgentServiceCheck {
	return &api.AgentServiceCheck{CheckID: id, Name: id, TTL: "10m", Status: status}
}

// countingProxy forwards to a Consul agent and counts health queries. While
// broken, it answers every request with 503 instead.
type countingProxy struct {
	addr   string
	srv    *httptest.Server
	n      atomic.Int64
	broken atomic.Bool
}

// breakNow makes the proxy fail requests, including those in flight.
func (p *countingProxy) breakNow() {
	p.broken.Store(true)
	p.srv.CloseClientConnections()
}

func (p *countingProxy) repair() { p.broken.Store(false) }

func newCountingProxy(t *testing.T, target string) *countingProxy {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &countingProxy{}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ErrorLog = stdlog.New(io.Discard, "", 0) // canceled watches are expected
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/v1/health/service/") {
			p.n.Add(1)
		}
		if p.broken.Load() {
			http.Error(w, "proxy broken by the test", http.StatusServiceUnavailable)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	p.srv = srv
	t.Cleanup(srv.Close)
	p.addr = strings.TrimPrefix(srv.URL, "http://")
	return p
}

func (p *countingProxy) count() int64 { return p.n.Load() }
