package resilience

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/discovery"
)

// forwarder is the smallest forwarder that uses a Guard the way the sidecar
// is meant to: budget, pick, admit, try, classify, record, decide, back off.
type forwarder struct {
	g    *Guard
	pool *balance.Pool
	tr   http.RoundTripper
}

func newForwarder(t *testing.T, cfg Config, insts []discovery.Instance) *forwarder {
	t.Helper()
	g := newTestGuard(t, cfg)
	policy, err := balance.New(balance.Config{Algorithm: "round_robin"})
	if err != nil {
		t.Fatalf("balance: %v", err)
	}
	pool := balance.NewPool(policy)
	pool.OnNew = g.Attach
	pool.OnRemove = g.Detach
	pool.Update(insts, "")
	tr := &http.Transport{DisableKeepAlives: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &forwarder{g: g, pool: pool, tr: tr}
}

type result struct {
	status int
	tries  int
	body   string
	err    error
}

func (f *forwarder) do(ctx context.Context, method, body string) result {
	g := f.g
	g.RequestStarted()
	timeouts := g.Config().Timeouts
	snap := f.pool.Load()
	breq := &balance.Request{}
	tries := 0
	for {
		breq.Now = time.Now().UnixNano()
		breq.IgnoreHealth = g.FailOpen(len(snap.Endpoints))
		ep, err := snap.Picker.Pick(breq)
		if err != nil {
			return result{tries: tries, err: err}
		}
		var done func(Outcome)
		if breq.IgnoreHealth {
			done = g.AdmitForced(ep.Stats)
		} else if done, err = g.Admit(ep.Stats); err != nil {
			if errors.Is(err, ErrBreakerOpen) {
				breq.Exclude(ep) // not a try
				continue
			}
			return result{tries: tries, err: err}
		}
		tries++
		tryCtx, cancel := ctx, context.CancelFunc(func() {})
		if d := timeouts.TryTimeout(0); d > 0 {
			tryCtx, cancel = context.WithTimeout(ctx, d)
		}
		req, _ := http.NewRequestWithContext(tryCtx, method, "http://"+ep.Address+"/", strings.NewReader(body))
		resp, err := f.tr.RoundTrip(req)
		var res result
		if err == nil {
			var b []byte
			b, err = io.ReadAll(resp.Body)
			resp.Body.Close()
			res = result{status: resp.StatusCode, body: string(b)}
		}
		cancel()
		o := g.Classify(ctx, err, res.status)
		done(o)
		ep.Requests.Add(1) // the forwarder owns the counters
		if o.Failure() {
			ep.Failures.Add(1)
		}
		retry, _ := g.RetryDecision(method, tries, o, true)
		if !retry {
			res.tries, res.err = tries, err
			return res
		}
		breq.Exclude(ep)
		time.Sleep(g.Backoff(tries))
	}
}

func liveBackend(t *testing.T, name string, hits *atomic.Int64) discovery.Instance {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, name)
	}))
	t.Cleanup(srv.Close)
	return discovery.Instance{ID: name, Address: srv.Listener.Addr().String(), Weight: 1}
}

// With no resilience keys configured, a dead instance among live ones costs
// the application no failed request, GET or POST, and is ejected after
// ConsecutiveFailures connection failures.
func TestDefaultsProtectFromDeadInstance(t *testing.T) {
	var hitsA, hitsB atomic.Int64
	dead := discovery.Instance{ID: "dead", Address: closedAddr(t), Weight: 1}
	f := newForwarder(t, Defaults(), []discovery.Instance{
		liveBackend(t, "a", &hitsA), dead, liveBackend(t, "b", &hitsB),
	})
	deadStats := f.pool.StatsOf("dead")

	const n = 60
	retried := 0
	for i := range n {
		method := http.MethodGet
		if i%2 == 1 {
			method = http.MethodPost
		}
		res := f.do(context.Background(), method, "order=1")
		if res.err != nil || res.status != http.StatusOK || (res.body != "a" && res.body != "b") {
			t.Fatalf("request %d (%s): want 200 from a live instance, have status %d body %q err %v", i, method, res.status, res.body, res.err)
		}
		if res.tries > 1 {
			retried++
		}
	}
	threshold := uint64(Defaults().Breaker.ConsecutiveFailures)
	if have := deadStats.Failures.Load(); have != threshold {
		t.Errorf("tries sent to the dead instance: want %d, have %d", threshold, have)
	}
	if retried != int(threshold) {
		t.Errorf("requests that needed a retry: want %d, have %d", threshold, retried)
	}
	if have := deadStats.Breaker(); have != balance.BreakerOpen {
		t.Errorf("dead instance's breaker: want open, have %s", have)
	}
	if have := hitsA.Load() + hitsB.Load(); have != n {
		t.Errorf("requests served by live instances: want %d, have %d", n, have)
	}
	if f.g.FailOpen(3) {
		t.Error("FailOpen with one of three instances ejected: want false")
	}
}

// flakyBackend answers 503 while failing is set, 200 otherwise.
func flakyBackend(t *testing.T, name string, failing *atomic.Bool) discovery.Instance {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if failing.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		fmt.Fprint(w, name)
	}))
	t.Cleanup(srv.Close)
	return discovery.Instance{ID: name, Address: srv.Listener.Addr().String(), Weight: 1}
}

// After a burst of errors has ejected every instance, an upstream that fails
// open keeps serving from the instances (which have recovered) while their
// breakers are still open; one that does not fail open refuses requests.
func TestFailOpenKeepsServing(t *testing.T) {
	for _, failOpen := range []bool{true, false} {
		t.Run(fmt.Sprintf("fail_open=%v", failOpen), func(t *testing.T) {
			var failing atomic.Bool
			failing.Store(true)
			cfg := Defaults()
			cfg.Breaker.ConsecutiveFailures = 1
			cfg.Breaker.OpenFor = time.Minute
			cfg.Breaker.OpenMax = time.Minute
			cfg.Breaker.FailOpen = failOpen
			cfg.Retry.Disabled = true
			f := newForwarder(t, cfg, []discovery.Instance{
				flakyBackend(t, "a", &failing), flakyBackend(t, "b", &failing), flakyBackend(t, "c", &failing),
			})
			for i := 0; i < 30 && f.g.Ejected() < 3; i++ {
				f.do(context.Background(), http.MethodGet, "")
			}
			if have := f.g.Ejected(); have != 3 {
				t.Fatalf("Ejected after the burst: want 3, have %d", have)
			}
			if have := f.g.FailOpen(3); have != failOpen {
				t.Fatalf("FailOpen: want %v, have %v", failOpen, have)
			}
			failing.Store(false)
			served, refused := 0, 0
			for range 20 {
				res := f.do(context.Background(), http.MethodGet, "")
				switch {
				case res.err == nil && res.status == http.StatusOK:
					served++
				case errors.Is(res.err, balance.ErrNoneAvailable):
					refused++
				}
			}
			want := map[bool][2]int{true: {20, 0}, false: {0, 20}}[failOpen]
			if served != want[0] || refused != want[1] {
				t.Errorf("served and refused: want %d and %d, have %d and %d", want[0], want[1], served, refused)
			}
		})
	}
}
