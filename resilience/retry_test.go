package resilience

import (
	"context"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

var (
	connectOutcome = Classify(context.Background(), &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, 0, Defaults().Failure)
	resetOutcome   = Classify(context.Background(), &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}, 0, Defaults().Failure)
	timeoutOutcome = Classify(context.Background(), context.DeadlineExceeded, 0, Defaults().Failure)
)

func status(code int) Outcome { return Classify(context.Background(), nil, code, Defaults().Failure) }

// roomyBudget keeps the budget out of the way of decision tests.
func roomyBudget() Config {
	c := Defaults()
	c.Retry.BudgetMinPerSecond = 1 << 20
	return c
}

func TestRetryDecision(t *testing.T) {
	if connectOutcome.Kind() != KindConnect || resetOutcome.Kind() != KindReset || timeoutOutcome.Kind() != KindTimeout {
		t.Fatalf("fixtures: want connect/reset/timeout, have %s/%s/%s", connectOutcome.Kind(), resetOutcome.Kind(), timeoutOutcome.Kind())
	}
	with := func(f func(c *Config)) Config {
		c := roomyBudget()
		f(&c)
		return c
	}
	def := roomyBudget()
	cases := []struct {
		name       string
		cfg        Config
		method     string
		attempt    int
		o          Outcome
		replayable bool
		retry      bool
		cause      string
	}{
		{"GET 503", def, "GET", 1, status(503), true, true, "503"},
		{"GET 502 second try", def, "GET", 2, status(502), true, true, "502"},
		{"GET 503 last try", def, "GET", 3, status(503), true, false, NoRetryAttempts},
		{"GET 503 attempts 1", with(func(c *Config) { c.Retry.Attempts = 1 }), "GET", 1, status(503), true, false, NoRetryAttempts},
		{"POST 503", def, "POST", 1, status(503), true, false, NoRetryMethod},
		{"PATCH reset", def, "PATCH", 1, resetOutcome, true, false, NoRetryMethod},
		{"POST connect failure", def, "POST", 1, connectOutcome, true, true, OnConnectFailure},
		{"POST 503 non-idempotent on", with(func(c *Config) { c.Retry.RetryNonIdempotent = true }), "POST", 1, status(503), true, true, "503"},
		{"PUT reset", def, "PUT", 1, resetOutcome, true, true, OnReset},
		{"GET 500 default", def, "GET", 1, status(500), true, false, NoRetryCondition},
		{"GET 500 with 5xx", with(func(c *Config) { c.Retry.On = []string{On5xx} }), "GET", 1, status(500), true, true, On5xx},
		{"GET 429 listed", with(func(c *Config) { c.Retry.On = []string{"429", On5xx} }), "GET", 1, status(429), true, true, "429"},
		{"GET 503 gateway-error", with(func(c *Config) { c.Retry.On = []string{OnGatewayError} }), "GET", 1, status(503), true, true, "503"},
		{"GET 200", def, "GET", 1, status(200), true, false, NoRetryCondition},
		{"GET timeout default", def, "GET", 1, timeoutOutcome, true, false, NoRetryCondition},
		{"GET timeout listed", with(func(c *Config) { c.Retry.On = []string{OnTimeout} }), "GET", 1, timeoutOutcome, true, true, OnTimeout},
		{"GET connect not listed", with(func(c *Config) { c.Retry.On = []string{OnReset} }), "GET", 1, connectOutcome, true, false, NoRetryCondition},
		{"GET other error", def, "GET", 1, Classify(context.Background(), errFailed, 0, Defaults().Failure), true, false, NoRetryCondition},
		{"GET canceled", def, "GET", 1, canceledOutcome(), true, false, NoRetryCanceled},
		{"GET body not replayable", def, "GET", 1, status(503), false, false, NoRetryBody},
		{"POST connect body not replayable", def, "POST", 1, connectOutcome, false, false, NoRetryBody},
		{"disabled", with(func(c *Config) { c.Retry.Disabled = true }), "GET", 1, connectOutcome, true, false, NoRetryDisabled},
		{"lower-case method in config", with(func(c *Config) { c.Retry.Methods = []string{"get"} }), "GET", 1, status(503), true, true, "503"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := newTestGuard(t, tc.cfg)
			g.RequestStarted()
			retry, cause := g.RetryDecision(tc.method, tc.attempt, tc.o, tc.replayable)
			if retry != tc.retry || cause != tc.cause {
				t.Errorf("want (%v, %q), have (%v, %q)", tc.retry, tc.cause, retry, cause)
			}
		})
	}
}

// fakeClock is a settable clock safe for concurrent reads.
type fakeClock struct{ ns atomic.Int64 }

func (c *fakeClock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }
func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}
func budgetGuard(t *testing.T, cfg Config) (*Guard, *fakeClock) {
	t.Helper()
	clk := newFakeClock()
	g := newTestGuard(t, cfg)
	g.now = clk.now
	g.budget.epoch = clk.now()
	return g, clk
}

// outage runs n requests that all fail to connect and each want every retry
// allowed; it returns the number of retries granted.
func outage(g *Guard, n int) int {
	retries := 0
	attempts := g.Config().Retry.Attempts
	for range n {
		g.RequestStarted()
		for attempt := 1; attempt < attempts; attempt++ {
			ok, _ := g.RetryDecision(http.MethodGet, attempt, connectOutcome, true)
			if !ok {
				break
			}
			retries++
		}
	}
	return retries
}

func TestRetryBudgetBoundsOutage(t *testing.T) {
	cfg := Defaults()
	cfg.Retry.Attempts = 3
	cfg.Retry.BudgetPercent = 20
	cfg.Retry.BudgetMinPerSecond = 10
	g, clk := budgetGuard(t, cfg)

	// Within one second: 1000 requests want up to 2000 retries.
	const n = 1000
	bound := n*20/100 + 10
	if have := outage(g, n); have > bound || have < bound-2 {
		t.Fatalf("retries for %d requests at 20%% + 10/s: want at most %d (and close to it), have %d", n, bound, have)
	}
	// Spent: one more request in the same second gets nothing beyond its share.
	if ok, cause := g.RetryDecision(http.MethodGet, 1, connectOutcome, true); ok || cause != NoRetryBudgetSpent {
		t.Fatalf("retry with the budget spent: want (false, %q), have (%v, %q)", NoRetryBudgetSpent, ok, cause)
	}

	// The next second brings a fresh minimum allowance but the percentage
	// still counts the earlier retries.
	clk.advance(time.Second)
	granted := 0
	for range 50 {
		if ok, _ := g.RetryDecision(http.MethodGet, 1, connectOutcome, true); ok {
			granted++
		}
	}
	if granted != 10 {
		t.Fatalf("retries without new requests in a new second: want the minimum 10, have %d", granted)
	}

	// Once the ten-second window has passed, the percentage starts afresh.
	clk.advance(11 * time.Second)
	if have, want := outage(g, 100), 100*20/100+10; have > want || have < want-2 {
		t.Fatalf("retries for 100 requests in a fresh window: want at most %d (and close to it), have %d", want, have)
	}

	// With no minimum and no percentage, nothing is ever retried.
	none := cfg
	none.Retry.BudgetPercent = 0
	none.Retry.BudgetMinPerSecond = 0
	g2, _ := budgetGuard(t, none)
	if have := outage(g2, 100); have != 0 {
		t.Fatalf("retries with an empty budget: want 0, have %d", have)
	}
}

func TestRetryBudgetConcurrent(t *testing.T) {
	cfg := Defaults()
	cfg.Retry.Attempts = 5
	g, _ := budgetGuard(t, cfg) // the clock stands still: one second
	const workers, perWorker = 8, 250
	var total atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			total.Add(int64(outage(g, perWorker)))
		}()
	}
	wg.Wait()
	bound := int64(workers*perWorker*20/100 + 10)
	t.Logf("%d retries granted, bound %d", total.Load(), bound)
	if have := total.Load(); have > bound || have < bound/2 {
		t.Fatalf("concurrent retries: want at most %d (and at least half of it), have %d", bound, have)
	}
}

func TestBackoff(t *testing.T) {
	cfg := Defaults() // 25ms base, 250ms cap
	g := newTestGuard(t, cfg)
	g.randN = func(n int64) int64 { return n - 1 } // the top of the range
	for _, tc := range []struct {
		attempt int
		upper   time.Duration
	}{
		{0, 25 * time.Millisecond},
		{1, 25 * time.Millisecond},
		{2, 50 * time.Millisecond},
		{3, 100 * time.Millisecond},
		{4, 200 * time.Millisecond},
		{5, 250 * time.Millisecond},
		{64, 250 * time.Millisecond},
		{1 << 30, 250 * time.Millisecond},
	} {
		if have := g.Backoff(tc.attempt); have != tc.upper-1 {
			t.Errorf("Backoff(%d) at the top of the range: want %s, have %s", tc.attempt, tc.upper-1, have)
		}
	}
	g.randN = func(int64) int64 { return 0 }
	if have := g.Backoff(3); have != 0 {
		t.Errorf("Backoff at the bottom of the range: want 0, have %s", have)
	}

	// Real randomness: within [0, cap) and not constant.
	g.randN = newTestGuard(t, cfg).randN
	seen := map[time.Duration]bool{}
	for range 200 {
		d := g.Backoff(3)
		if d < 0 || d >= 100*time.Millisecond {
			t.Fatalf("Backoff(3): want in [0, 100ms), have %s", d)
		}
		seen[d] = true
	}
	if len(seen) < 50 {
		t.Errorf("Backoff(3) over 200 draws: want jitter (at least 50 distinct values), have %d", len(seen))
	}

	off := cfg
	off.Retry.BackoffBase, off.Retry.BackoffMax = 0, 0
	if have := newTestGuard(t, off).Backoff(2); have != 0 {
		t.Errorf("Backoff with no base: want 0, have %s", have)
	}
}
