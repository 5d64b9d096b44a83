package resilience

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/discovery"
)

// recorder collects transitions reported to onTransition and checks that
// reports never overlap.
type recorder struct {
	mu      sync.Mutex
	evs     []string
	inside  atomic.Bool
	overlap atomic.Bool
}

func (r *recorder) record(id string, from, to balance.BreakerState) {
	if r.inside.Swap(true) {
		r.overlap.Store(true)
	}
	r.mu.Lock()
	r.evs = append(r.evs, fmt.Sprintf("%s:%s->%s", id, from, to))
	r.mu.Unlock()
	r.inside.Store(false)
}

func (r *recorder) reset() {
	r.mu.Lock()
	r.evs = nil
	r.mu.Unlock()
}

func (r *recorder) events() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.evs...)
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func newTestGuard(t *testing.T, cfg Config) *Guard {
	t.Helper()
	g, err := NewGuard("payments", cfg, testLogger(t), nil)
	if err != nil {
		t.Fatalf("NewGuard: %v", err)
	}
	return g
}

func newRecordedGuard(t *testing.T, cfg Config) (*Guard, *recorder) {
	t.Helper()
	rec := &recorder{}
	g, err := NewGuard("payments", cfg, testLogger(t), rec.record)
	if err != nil {
		t.Fatalf("NewGuard: %v", err)
	}
	return g, rec
}

func attach(g *Guard, id string) *balance.Stats {
	st := &balance.Stats{Added: time.Now()}
	g.Attach(discovery.Instance{ID: id, Address: "127.0.0.1:1", Weight: 1}, st)
	return st
}

var (
	okOutcome   = Classify(context.Background(), nil, 200, Defaults().Failure)
	failOutcome = Classify(context.Background(), nil, 503, Defaults().Failure)
)

func canceledOutcome() Outcome {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return Classify(ctx, context.Canceled, 0, Defaults().Failure)
}

// try admits one request to st and reports o; it fails the test on rejection.
func try(t *testing.T, g *Guard, st *balance.Stats, o Outcome) {
	t.Helper()
	done, err := g.Admit(st)
	if err != nil {
		t.Fatalf("Admit: want admitted, have %v", err)
	}
	done(o)
}

func wantRejected(t *testing.T, g *Guard, st *balance.Stats, id string) {
	t.Helper()
	done, err := g.Admit(st)
	if err == nil {
		done(okOutcome)
		t.Fatalf("Admit %s: want rejection, have admitted", id)
	}
	if !errors.Is(err, ErrBreakerOpen) {
		t.Fatalf("Admit %s: want ErrBreakerOpen, have %v", id, err)
	}
	if !strings.Contains(err.Error(), id) {
		t.Errorf("rejection %q: want it to name instance %q", err, id)
	}
}

func wantState(t *testing.T, st *balance.Stats, want balance.BreakerState) {
	t.Helper()
	if have := st.Breaker(); have != want {
		t.Fatalf("breaker state: want %s, have %s", want, have)
	}
}

func wantEvents(t *testing.T, rec *recorder, want ...string) {
	t.Helper()
	have := rec.events()
	if strings.Join(have, " ") != strings.Join(want, " ") {
		t.Fatalf("transitions:\nwant %v\nhave %v", want, have)
	}
}

func fastBreaker() Config {
	c := Defaults()
	c.Breaker.ConsecutiveFailures = 3
	c.Breaker.OpenFor = 150 * time.Millisecond
	c.Breaker.OpenMultiplier = 2
	c.Breaker.OpenMax = time.Second
	return c
}

// openUntil is when the instance's open period ends, as the guard keeps it.
func openUntil(st *balance.Stats) time.Time {
	return time.Unix(0, st.Ext.(*breaker).openUntil.Load())
}

func waitAvailable(t *testing.T, st *balance.Stats) {
	t.Helper()
	waitFor(t, "the open period to pass", 5*time.Second, func() bool { return st.Available(time.Now().UnixNano()) })
}

func TestBreakerOpensAfterConsecutiveFailures(t *testing.T) {
	g, rec := newRecordedGuard(t, fastBreaker())
	st := attach(g, "a")

	try(t, g, st, failOutcome)
	try(t, g, st, failOutcome)
	try(t, g, st, okOutcome) // a success resets the run
	try(t, g, st, failOutcome)
	try(t, g, st, failOutcome)
	wantState(t, st, balance.BreakerClosed)
	if !st.Available(time.Now().UnixNano()) {
		t.Fatal("Available: want true while closed")
	}

	before := time.Now()
	try(t, g, st, failOutcome)
	after := time.Now()
	wantState(t, st, balance.BreakerOpen)
	wantRejected(t, g, st, "a")
	wantEvents(t, rec, "a:closed->open")
	if have := g.Ejected(); have != 1 {
		t.Errorf("Ejected: want 1, have %d", have)
	}

	until := openUntil(st)
	if until.Before(before.Add(150*time.Millisecond)) || until.After(after.Add(150*time.Millisecond)) {
		t.Errorf("open until: want %s after the trip (in [%s, %s]), have %s", 150*time.Millisecond, before, after, until)
	}
	if st.Available(until.UnixNano() - 1) {
		t.Error("Available just before the open period ends: want false, have true")
	}
	if !st.Available(until.UnixNano()) {
		t.Error("Available when the open period ends: want true, have false")
	}
	if st.Requests.Load() != 0 || st.Failures.Load() != 0 || st.InFlight.Load() != 0 {
		t.Error("Stats counters: want them left to the forwarder, have them changed")
	}
}

func TestBreakerRatioNeedsMinRequests(t *testing.T) {
	cfg := Defaults()
	cfg.Breaker.ConsecutiveFailures = 0
	cfg.Breaker.FailureRatio = 0.5
	cfg.Breaker.MinRequests = 10
	cfg.Breaker.Window = time.Minute
	g, rec := newRecordedGuard(t, cfg)

	// 9 outcomes, 4 of them failures: at or above half from the first
	// failure on, but below MinRequests.
	st := attach(g, "a")
	for i, o := range []Outcome{failOutcome, okOutcome, failOutcome, okOutcome, failOutcome, okOutcome, failOutcome, okOutcome, okOutcome} {
		try(t, g, st, o)
		if st.Breaker() != balance.BreakerClosed {
			t.Fatalf("after %d outcomes: want closed below min_requests, have %s", i+1, st.Breaker())
		}
	}
	try(t, g, st, failOutcome) // 5 of 10
	wantState(t, st, balance.BreakerOpen)
	wantEvents(t, rec, "a:closed->open")

	// A third of failures never trips at ratio 0.5.
	st2 := attach(g, "b")
	for i := range 60 {
		o := okOutcome
		if i%3 == 0 {
			o = failOutcome
		}
		try(t, g, st2, o)
	}
	wantState(t, st2, balance.BreakerClosed)
}

func TestBreakerHalfOpenProbesThenClose(t *testing.T) {
	cfg := fastBreaker()
	cfg.Breaker.HalfOpenProbes = 2
	g, rec := newRecordedGuard(t, cfg)
	st := attach(g, "a")
	for range 3 {
		try(t, g, st, failOutcome)
	}
	wantRejected(t, g, st, "a")
	waitAvailable(t, st)

	probe1, err := g.Admit(st)
	if err != nil {
		t.Fatalf("first probe: want admitted, have %v", err)
	}
	wantState(t, st, balance.BreakerHalfOpen)
	if have := g.Ejected(); have != 1 {
		t.Errorf("Ejected while half-open: want 1, have %d", have)
	}
	probe2, err := g.Admit(st)
	if err != nil {
		t.Fatalf("second probe: want admitted, have %v", err)
	}
	wantRejected(t, g, st, "a") // both probes in flight
	probe1(okOutcome)
	wantState(t, st, balance.BreakerHalfOpen)
	probe2(okOutcome)
	wantState(t, st, balance.BreakerClosed)
	if have := g.Ejected(); have != 0 {
		t.Errorf("Ejected after closing: want 0, have %d", have)
	}
	try(t, g, st, okOutcome)
	wantEvents(t, rec, "a:closed->open", "a:open->half-open", "a:half-open->closed")
}

func TestBreakerOpenPeriodGrowsAndResets(t *testing.T) {
	cfg := Defaults()
	cfg.Breaker.ConsecutiveFailures = 1
	cfg.Breaker.OpenFor = 30 * time.Millisecond
	cfg.Breaker.OpenMultiplier = 2
	cfg.Breaker.OpenMax = 100 * time.Millisecond
	g, rec := newRecordedGuard(t, cfg)
	st := attach(g, "a")

	// fail reports a failure through Admit and checks the open period.
	fail := func(want time.Duration) {
		t.Helper()
		done, err := g.Admit(st)
		if err != nil {
			t.Fatalf("Admit: want admitted, have %v", err)
		}
		before := time.Now()
		done(failOutcome)
		after := time.Now()
		wantState(t, st, balance.BreakerOpen)
		until := openUntil(st)
		if until.Before(before.Add(want)) || until.After(after.Add(want)) {
			t.Fatalf("open period: want %s, have about %s", want, until.Sub(after))
		}
		if st.Available(until.UnixNano() - 1) {
			t.Fatal("Available before the open period ends: want false, have true")
		}
	}

	fail(30 * time.Millisecond)
	for _, want := range []time.Duration{60 * time.Millisecond, 100 * time.Millisecond, 100 * time.Millisecond} {
		waitAvailable(t, st)
		fail(want) // the probe fails
	}
	waitAvailable(t, st)
	try(t, g, st, okOutcome) // the probe succeeds
	wantState(t, st, balance.BreakerClosed)
	fail(30 * time.Millisecond) // back to the base period

	wantEvents(t, rec,
		"a:closed->open",
		"a:open->half-open", "a:half-open->open",
		"a:open->half-open", "a:half-open->open",
		"a:open->half-open", "a:half-open->open",
		"a:open->half-open", "a:half-open->closed",
		"a:closed->open")
}

func TestBreakerIgnoresCancellation(t *testing.T) {
	g, rec := newRecordedGuard(t, fastBreaker())
	st := attach(g, "a")
	canceled := canceledOutcome()
	for range 100 {
		try(t, g, st, canceled)
	}
	try(t, g, st, failOutcome)
	try(t, g, st, failOutcome)
	for range 10 {
		try(t, g, st, canceled)
	}
	wantState(t, st, balance.BreakerClosed)
	wantEvents(t, rec)

	// A canceled probe neither closes nor reopens: the breaker stays half-open
	// and admits the next probe.
	try(t, g, st, failOutcome)
	wantState(t, st, balance.BreakerOpen)
	waitAvailable(t, st)
	try(t, g, st, canceled)
	wantState(t, st, balance.BreakerHalfOpen)
	try(t, g, st, okOutcome)
	wantState(t, st, balance.BreakerClosed)
}

func TestDoneIsIdempotent(t *testing.T) {
	g := newTestGuard(t, fastBreaker())
	st := attach(g, "a")
	done, err := g.Admit(st)
	if err != nil {
		t.Fatalf("Admit: %v", err)
	}
	for range 5 { // three would trip the breaker if each counted
		done(failOutcome)
	}
	wantState(t, st, balance.BreakerClosed)
	try(t, g, st, failOutcome)
	wantState(t, st, balance.BreakerClosed)
	try(t, g, st, failOutcome)
	wantState(t, st, balance.BreakerOpen)
}

// One Ticket serves try after try, as the event loop keeps it: each fill
// counts once, a second Finish of the same try is ignored, and a refused
// admission leaves a ticket whose Finish reports nothing.
func TestTicketReused(t *testing.T) {
	g := newTestGuard(t, fastBreaker())
	st := attach(g, "a")
	var tk Ticket
	tk.Finish(failOutcome) // the zero Ticket reports nothing
	(*Ticket)(nil).Finish(failOutcome)
	for i := range 2 {
		if err := g.AdmitTo(st, &tk); err != nil {
			t.Fatalf("AdmitTo %d: %v", i, err)
		}
		tk.Finish(failOutcome)
		tk.Finish(failOutcome) // ignored: three counted would trip it
	}
	wantState(t, st, balance.BreakerClosed)
	// A success between failures resets the run through the same ticket.
	if err := g.AdmitTo(st, &tk); err != nil {
		t.Fatalf("AdmitTo: %v", err)
	}
	tk.Finish(okOutcome)
	for i := range 3 {
		wantState(t, st, balance.BreakerClosed)
		if err := g.AdmitTo(st, &tk); err != nil {
			t.Fatalf("AdmitTo after the success, %d: %v", i, err)
		}
		tk.Finish(failOutcome)
	}
	wantState(t, st, balance.BreakerOpen)

	// Refused: the ticket is emptied, whatever it held.
	if err := g.AdmitTo(st, &tk); !errors.Is(err, ErrBreakerOpen) {
		t.Fatalf("AdmitTo while open: want ErrBreakerOpen, have %v", err)
	}
	tk.Finish(okOutcome)
	// Forced past the open breaker: sent, but the breaker learns nothing.
	g.AdmitForcedTo(st, &tk)
	tk.Finish(okOutcome)
	wantState(t, st, balance.BreakerOpen)

	// The probe, once due, goes through a reused ticket. Filled again
	// before it was reported, the ticket reports it as canceled first,
	// which frees the half-open breaker's one probe slot for the next.
	waitAvailable(t, st)
	if err := g.AdmitTo(st, &tk); err != nil {
		t.Fatalf("AdmitTo for the probe: %v", err)
	}
	if err := g.AdmitTo(st, &tk); err != nil {
		t.Fatalf("AdmitTo over an unreported probe: want it admitted (the old probe given back), have %v", err)
	}
	wantState(t, st, balance.BreakerHalfOpen)
	tk.Finish(okOutcome)
	wantState(t, st, balance.BreakerClosed)
}

// With breakers disabled a ticket is always admitted and reports nothing.
func TestTicketBreakerDisabled(t *testing.T) {
	cfg := fastBreaker()
	cfg.Breaker.Disabled = true
	g := newTestGuard(t, cfg)
	st := attach(g, "a")
	var tk Ticket
	for i := range 10 {
		if err := g.AdmitTo(st, &tk); err != nil {
			t.Fatalf("AdmitTo %d: %v", i, err)
		}
		if tk.armed.Load() {
			t.Fatalf("AdmitTo %d: the ticket holds a report with breakers disabled", i)
		}
		tk.Finish(failOutcome)
	}
	if err := g.AdmitTo(&balance.Stats{}, &tk); !errors.Is(err, ErrNotAttached) {
		t.Fatalf("AdmitTo with stats not attached: want ErrNotAttached, have %v", err)
	}
	tk.Finish(failOutcome)
}

func TestFailOpenAndDetach(t *testing.T) {
	cfg := fastBreaker()
	cfg.Breaker.OpenFor = time.Minute
	cfg.Breaker.OpenMax = time.Minute
	g := newTestGuard(t, cfg)
	a, b, c := attach(g, "a"), attach(g, "b"), attach(g, "c")
	trip := func(st *balance.Stats) {
		for range 3 {
			try(t, g, st, failOutcome)
		}
		wantState(t, st, balance.BreakerOpen)
	}
	if g.FailOpen(3) {
		t.Fatal("FailOpen with nothing ejected: want false")
	}
	trip(a)
	if g.FailOpen(3) {
		t.Fatal("FailOpen with 1 of 3 ejected at 50%: want false")
	}
	trip(b)
	if !g.FailOpen(3) {
		t.Fatal("FailOpen with 2 of 3 ejected at 50%: want true")
	}
	if have := g.Ejected(); have != 2 {
		t.Fatalf("Ejected: want 2, have %d", have)
	}

	// Failing open: the open instance is tried anyway and its breaker is
	// left alone, whatever the outcome.
	wantRejected(t, g, a, "a")
	for _, o := range []Outcome{okOutcome, okOutcome, failOutcome} {
		g.AdmitForced(a)(o)
	}
	wantState(t, a, balance.BreakerOpen)
	wantRejected(t, g, a, "a")
	// AdmitForced on a closed instance is an ordinary admission.
	g.AdmitForced(c)(failOutcome)
	g.AdmitForced(c)(failOutcome)
	g.AdmitForced(c)(failOutcome)
	wantState(t, c, balance.BreakerOpen)
	if have := g.Ejected(); have != 3 {
		t.Fatalf("Ejected: want 3, have %d", have)
	}

	g.Detach(discovery.Instance{ID: "b"}, b)
	g.Detach(discovery.Instance{ID: "b"}, b) // twice is harmless
	if have := g.Ejected(); have != 2 {
		t.Fatalf("Ejected after detaching an open instance: want 2, have %d", have)
	}
	g.Detach(discovery.Instance{ID: "c"}, c)
	if have := g.Ejected(); have != 1 {
		t.Fatalf("Ejected after detaching another: want 1, have %d", have)
	}
	if g.FailOpen(2) {
		t.Fatal("FailOpen with 1 of 2 ejected at 50%: want false")
	}
	// Outcomes of a detached instance no longer move the count.
	d := attach(g, "d")
	dDone, err := g.Admit(d)
	if err != nil {
		t.Fatalf("Admit d: %v", err)
	}
	try(t, g, d, failOutcome)
	try(t, g, d, failOutcome)
	g.Detach(discovery.Instance{ID: "d"}, d)
	dDone(failOutcome)
	if have := g.Ejected(); have != 1 {
		t.Fatalf("Ejected after a detached instance tripped: want 1, have %d", have)
	}

	// fail_open off: never.
	off := cfg
	off.Breaker.FailOpen = false
	if err := g.Reconfigure(off); err != nil {
		t.Fatal(err)
	}
	if g.FailOpen(1) {
		t.Fatal("FailOpen with fail_open off: want false")
	}
	wantState(t, a, balance.BreakerOpen) // fail_open does not rebuild breakers
}

func TestReconfigure(t *testing.T) {
	cfg := fastBreaker()
	cfg.Breaker.OpenFor = time.Minute
	cfg.Breaker.OpenMax = time.Minute
	g, rec := newRecordedGuard(t, cfg)
	a := attach(g, "a")
	for range 3 {
		try(t, g, a, failOutcome)
	}
	b := attach(g, "b")
	try(t, g, b, failOutcome)
	try(t, g, b, failOutcome)

	// Settings gobreaker does not hold: state and counts are kept.
	same := cfg
	same.Retry.Attempts = 5
	same.Breaker.OpenMultiplier = 3
	same.Breaker.MaxEjectionPercent = 10
	if err := g.Reconfigure(same); err != nil {
		t.Fatal(err)
	}
	wantState(t, a, balance.BreakerOpen)
	try(t, g, b, failOutcome) // third failure in a row on b
	wantState(t, b, balance.BreakerOpen)
	if have := g.Config().Retry.Attempts; have != 5 {
		t.Errorf("Config after reload: want attempts 5, have %d", have)
	}
	wantEvents(t, rec, "a:closed->open", "b:closed->open")
	rec.reset()

	// A breaker setting changed: fresh closed breakers.
	changed := same
	changed.Breaker.ConsecutiveFailures = 2
	if err := g.Reconfigure(changed); err != nil {
		t.Fatal(err)
	}
	evs := rec.events()
	slices.Sort(evs)
	if have, want := strings.Join(evs, " "), "a:open->closed b:open->closed"; have != want {
		t.Fatalf("transitions of the rebuild: want %s, have %s", want, have)
	}
	rec.reset()
	wantState(t, a, balance.BreakerClosed)
	wantState(t, b, balance.BreakerClosed)
	if have := g.Ejected(); have != 0 {
		t.Fatalf("Ejected after rebuild: want 0, have %d", have)
	}
	try(t, g, a, failOutcome)
	wantState(t, a, balance.BreakerClosed)
	try(t, g, a, failOutcome)
	wantState(t, a, balance.BreakerOpen)

	// Invalid: refused, old config kept.
	bad := changed
	bad.Retry.Attempts = 0
	if err := g.Reconfigure(bad); err == nil || !strings.Contains(err.Error(), "retry.attempts") {
		t.Fatalf("Reconfigure with attempts 0: want an error naming retry.attempts, have %v", err)
	}
	if have := g.Config().Retry.Attempts; have != 5 {
		t.Errorf("Config after a refused reload: want attempts 5, have %d", have)
	}

	// Disabled: everything is admitted and nothing trips.
	disabled := changed
	disabled.Breaker.Disabled = true
	if err := g.Reconfigure(disabled); err != nil {
		t.Fatal(err)
	}
	wantState(t, a, balance.BreakerClosed)
	for range 20 {
		try(t, g, a, failOutcome)
	}
	wantState(t, a, balance.BreakerClosed)
	if g.FailOpen(1) {
		t.Error("FailOpen with breakers disabled: want false")
	}
	c := attach(g, "c")
	try(t, g, c, failOutcome)

	wantEvents(t, rec, "a:closed->open", "a:open->closed")
}

func TestAdmitNotAttached(t *testing.T) {
	g := newTestGuard(t, Defaults())
	other := newTestGuard(t, Defaults())
	foreign := attach(other, "x")
	for name, st := range map[string]*balance.Stats{"nil": nil, "bare": {}, "foreign": foreign} {
		if _, err := g.Admit(st); !errors.Is(err, ErrNotAttached) {
			t.Errorf("Admit(%s): want ErrNotAttached, have %v", name, err)
		}
		g.AdmitForced(st)(failOutcome) // must not panic
	}
	g.Detach(discovery.Instance{ID: "x"}, foreign) // not ours: no effect
	g.Attach(discovery.Instance{ID: "y"}, nil)     // must not panic
	if _, err := other.Admit(foreign); err != nil {
		t.Errorf("Admit on its own guard: want admitted, have %v", err)
	}
}

// Many goroutines drive breakers through every state while the
// configuration is reloaded and instances come and go. Afterwards the
// ejection count must match the instances' states, every instance's reported
// transitions must form a chain, and reports must never have overlapped.
func TestBreakerConcurrent(t *testing.T) {
	cfg := Defaults()
	cfg.Breaker.ConsecutiveFailures = 2
	cfg.Breaker.OpenFor = time.Millisecond
	cfg.Breaker.OpenMax = 4 * time.Millisecond
	cfg.Breaker.HalfOpenProbes = 2
	g, rec := newRecordedGuard(t, cfg)
	g.log = slog.New(slog.DiscardHandler)

	const workers, maxOps = 6, 20000
	var stop atomic.Bool
	var mu sync.Mutex
	insts := []*balance.Stats{attach(g, "i0"), attach(g, "i1"), attach(g, "i2"), attach(g, "i3")}
	attached := map[*balance.Stats]bool{}
	for _, st := range insts {
		attached[st] = true
	}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 7))
			canceled := canceledOutcome()
			for i := 0; i < maxOps && !stop.Load(); i++ {
				mu.Lock()
				st := insts[r.IntN(len(insts))]
				mu.Unlock()
				var done func(Outcome)
				if i%5 == 0 {
					done = g.AdmitForced(st)
				} else {
					d, err := g.Admit(st)
					if err != nil {
						continue
					}
					done = d
				}
				switch r.IntN(4) {
				case 0, 1:
					done(failOutcome)
				case 2:
					done(okOutcome)
				default:
					done(canceled)
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer stop.Store(true)
		for i := range 40 {
			c := cfg
			c.Breaker.MinRequests = uint32(20 + i%2) // forces a rebuild every time
			if err := g.Reconfigure(c); err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			if i%4 == 0 {
				old := insts[0]
				g.Detach(discovery.Instance{ID: "old"}, old)
				delete(attached, old)
				st := attach(g, fmt.Sprintf("n%d", i))
				attached[st] = true
				insts = append(insts[1:], st)
			}
			mu.Unlock()
			time.Sleep(time.Millisecond) // let the workers run between reloads
		}
	}()
	wg.Wait()

	g.mu.Lock()
	want := 0
	for st := range attached {
		b := st.Ext.(*breaker)
		if b.isEject != (b.state != balance.BreakerClosed) {
			t.Errorf("instance %s: ejected=%v but state %s", b.id, b.isEject, b.state)
		}
		if b.isEject {
			want++
		}
	}
	g.mu.Unlock()
	if have := g.Ejected(); have != want {
		t.Errorf("Ejected: want %d (attached instances not closed), have %d", want, have)
	}
	if rec.overlap.Load() {
		t.Error("onTransition was called concurrently with itself")
	}
	last := map[string]string{}
	evs := rec.events()
	for _, e := range evs {
		id, move, _ := strings.Cut(e, ":")
		from, to, _ := strings.Cut(move, "->")
		prev, ok := last[id]
		if !ok {
			prev = "closed"
		}
		if from != prev {
			t.Fatalf("instance %s: transition %s follows state %s", id, move, prev)
		}
		last[id] = to
	}
	t.Logf("%d transitions reported", len(evs))
	if len(evs) < 10 {
		t.Errorf("want the load to cause transitions, have only %d", len(evs))
	}
}

// gobreaker's own open period is open_for; a grown period must hold even
// after that has passed.
func TestBreakerGrownPeriodIsEnforced(t *testing.T) {
	cfg := Defaults()
	cfg.Breaker.ConsecutiveFailures = 1
	cfg.Breaker.OpenFor = 40 * time.Millisecond
	cfg.Breaker.OpenMultiplier = 25
	cfg.Breaker.OpenMax = time.Minute
	g := newTestGuard(t, cfg)
	st := attach(g, "a")
	try(t, g, st, failOutcome)
	waitAvailable(t, st)
	try(t, g, st, failOutcome) // the probe fails: open for 1s now
	tripped := time.Now()
	if have := openUntil(st).Sub(tripped); have < 900*time.Millisecond {
		t.Fatalf("grown open period: want about 1s, have %s", have)
	}
	// Past open_for (gobreaker would admit a probe), inside the grown period.
	waitFor(t, "open_for to pass", time.Second, func() bool { return time.Since(tripped) > 80*time.Millisecond })
	for range 10 {
		wantRejected(t, g, st, "a")
		if st.Available(time.Now().UnixNano()) {
			t.Fatal("Available inside the grown open period: want false, have true")
		}
	}
	wantState(t, st, balance.BreakerOpen)
}
