package resilience

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/discovery"
)

var (
	// ErrBreakerOpen is returned (wrapped with the upstream and instance) by
	// Admit when the instance's breaker rejects the request: it is open, or
	// half-open with all its probes in flight. Nothing was sent; pick another
	// instance without counting a try.
	ErrBreakerOpen = errors.New("circuit breaker open")
	// ErrNotAttached is returned (wrapped) by Admit for Stats that were not
	// attached to this Guard: a wiring mistake, not an upstream failure.
	ErrNotAttached = errors.New("instance not attached to this guard")
)

// errExcluded is reported to gobreaker for outcomes that must not count.
var errExcluded = errors.New("excluded outcome")

// errFailed is reported to gobreaker for failed outcomes.
var errFailed = errors.New("failed outcome")

// Guard holds one upstream's resilience state: a circuit breaker per
// instance, the count of ejected instances and the retry budget. All methods
// are safe for concurrent use. Admit, AdmitForced, the done functions they
// return, FailOpen, RequestStarted, RetryDecision, Backoff and Classify are
// meant for the request path: they never block on I/O; Admit and done take
// only the instance's own breaker lock, and RetryDecision a short Guard-wide
// lock for its budget check. A breaker transition (rare) is logged and
// reported to onTransition synchronously by the goroutine that caused it, one
// report at a time and in order.
type Guard struct {
	name         string
	log          *slog.Logger
	onTransition func(instanceID string, from, to balance.BreakerState)

	cfg     atomic.Pointer[compiled]
	ejected atomic.Int64 // attached instances whose breaker is open or half-open

	// mu guards insts, the bookkeeping fields of every breaker, events and
	// draining. It may be taken while a gobreaker mutex is held (from
	// OnStateChange), so no gobreaker method may be called while holding it.
	mu       sync.Mutex
	insts    map[*balance.Stats]*breaker
	events   []transition
	draining bool
	pending  atomic.Bool // events is non-empty

	budget budget
	// now is the retry budget's clock; randN(n) returns a value in [0,n) for
	// backoff jitter. Both are replaced in tests.
	now   func() time.Time
	randN func(n int64) int64
}

// breaker is one instance's breaker, stored in balance.Stats.Ext.
type breaker struct {
	g         *Guard
	id        string
	st        *balance.Stats
	rejectErr error

	// cur is the gobreaker generation in use; nil when breakers are disabled.
	// Replaced (under g.mu) only when the breaker settings change.
	cur atomic.Pointer[generation]
	// openUntil is when the current open period ends (unix nanos); 0 while
	// closed. It is kept during half-open.
	openUntil atomic.Int64

	// Guarded by g.mu.
	state    balance.BreakerState // as last reported
	trips    int                  // probes failed in a row: the open period's exponent
	isEject  bool                 // counted in g.ejected
	detached bool
}

type generation struct {
	cb *gobreaker.TwoStepCircuitBreaker[struct{}]
}

type transition struct {
	id       string
	from, to balance.BreakerState
	period   time.Duration
	reason   string
}

// NewGuard returns the Guard of upstream name. cfg must be valid (see
// Config.Validate; errors are joined). logger receives breaker transitions
// (slog.Default() when nil); onTransition, when not nil, is called after each
// transition of an attached instance, in the order the transitions happened,
// never concurrently with itself, and without any lock of the Guard held.
func NewGuard(name string, cfg Config, logger *slog.Logger, onTransition func(instanceID string, from, to balance.BreakerState)) (*Guard, error) {
	c, err := compile(cfg)
	if err != nil {
		return nil, fmt.Errorf("resilience: upstream %q: %w", name, err)
	}
	if logger == nil {
		logger = slog.Default()
	}
	g := &Guard{
		name:         name,
		log:          logger,
		onTransition: onTransition,
		insts:        map[*balance.Stats]*breaker{},
		now:          time.Now,
		randN:        rand.Int64N,
	}
	g.cfg.Store(c)
	g.budget.epoch = g.now()
	return g, nil
}

// Name returns the upstream's name.
func (g *Guard) Name() string { return g.name }

// Config returns the configuration in force. Its slices are shared: do not
// modify them.
func (g *Guard) Config() Config { return g.cfg.Load().cfg }

// Reconfigure applies a new configuration (a reload); an invalid one is
// refused and the old one stays. Retry, timeout and failure settings apply to
// the next call that reads them; the retry budget keeps its counts. Breakers
// keep their state, counts and open periods unless a setting that gobreaker
// was built with changed (consecutive_failures, failure_ratio, min_requests,
// window, open_for, half_open_probes, disabled): then every instance gets a
// fresh, closed breaker, and instances that were ejected are reported as
// moving to closed. open_multiplier and open_max apply from the next trip;
// max_ejection_percent and fail_open at once.
func (g *Guard) Reconfigure(cfg Config) error {
	c, err := compile(cfg)
	if err != nil {
		return fmt.Errorf("resilience: upstream %q: %w", g.name, err)
	}
	g.mu.Lock()
	old := g.cfg.Swap(c)
	if rebuildKey(old.cfg.Breaker) != rebuildKey(c.cfg.Breaker) {
		for _, b := range g.insts {
			var gen *generation
			if !c.cfg.Breaker.Disabled {
				gen = g.newGeneration(b, c.cfg.Breaker)
			}
			b.cur.Store(gen)
			prev := b.state
			b.state = balance.BreakerClosed
			b.trips = 0
			b.openUntil.Store(0)
			b.st.SetBreaker(balance.BreakerClosed, time.Time{})
			g.unejectLocked(b)
			if prev != balance.BreakerClosed {
				g.queueLocked(transition{id: b.id, from: prev, to: balance.BreakerClosed, reason: "reconfigured"})
			}
		}
	}
	g.mu.Unlock()
	g.flush()
	return nil
}

// rebuildKey keeps the breaker settings that a gobreaker instance is built with.
func rebuildKey(b BreakerConfig) BreakerConfig {
	b.OpenMultiplier, b.OpenMax, b.MaxEjectionPercent, b.FailOpen = 0, 0, 0, false
	return b
}

// Attach creates the breaker of a new instance and stores it in st.Ext. It is
// meant as (or to be called from) balance.Pool.OnNew, before st is published.
// Attaching Stats that are already attached to g does nothing. Safe for
// concurrent use.
func (g *Guard) Attach(inst discovery.Instance, st *balance.Stats) {
	if st == nil {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if b, ok := st.Ext.(*breaker); ok && b.g == g && g.insts[st] == b {
		return
	}
	b := &breaker{
		g:         g,
		id:        inst.ID,
		st:        st,
		rejectErr: fmt.Errorf("resilience: upstream %q instance %q: %w", g.name, inst.ID, ErrBreakerOpen),
	}
	if c := g.cfg.Load(); !c.cfg.Breaker.Disabled {
		b.cur.Store(g.newGeneration(b, c.cfg.Breaker))
	}
	st.Ext = b
	g.insts[st] = b
}

// Detach forgets an instance that left the upstream, so that it no longer
// counts as ejected. It is meant as (or to be called from)
// balance.Pool.OnRemove. Outcomes of requests still in flight to it are
// recorded in its Stats but change nothing else. Safe for concurrent use.
func (g *Guard) Detach(inst discovery.Instance, st *balance.Stats) {
	g.mu.Lock()
	defer g.mu.Unlock()
	b := g.insts[st]
	if b == nil {
		return
	}
	delete(g.insts, st)
	g.unejectLocked(b)
	b.detached = true
}

func (g *Guard) newGeneration(b *breaker, bc BreakerConfig) *generation {
	gen := &generation{}
	gen.cb = gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
		Name:         g.name + "/" + b.id,
		MaxRequests:  bc.HalfOpenProbes,
		Interval:     bc.Window,
		BucketPeriod: bc.Window / 10,
		Timeout:      bc.OpenFor,
		ReadyToTrip:  tripFunc(bc),
		OnStateChange: func(_ string, from, to gobreaker.State) {
			g.stateChanged(b, gen, from, to)
		},
		IsExcluded: func(err error) bool { return err == errExcluded },
	})
	return gen
}

func tripFunc(bc BreakerConfig) func(gobreaker.Counts) bool {
	consecutive, ratio, minReq := bc.ConsecutiveFailures, bc.FailureRatio, uint64(bc.MinRequests)
	return func(c gobreaker.Counts) bool {
		if consecutive > 0 && c.ConsecutiveFailures >= consecutive {
			return true
		}
		if ratio > 0 {
			n := uint64(c.TotalFailures) + uint64(c.TotalSuccesses)
			return n >= minReq && float64(c.TotalFailures) >= ratio*float64(n)
		}
		return false
	}
}

// openPeriod is OpenFor × OpenMultiplier^trips, capped at OpenMax.
func openPeriod(bc BreakerConfig, trips int) time.Duration {
	p := float64(bc.OpenFor) * math.Pow(bc.OpenMultiplier, float64(trips))
	if math.IsNaN(p) || p >= float64(bc.OpenMax) {
		return bc.OpenMax
	}
	return time.Duration(p)
}

// stateChanged runs under the gobreaker mutex of gen: it only updates the
// Guard's own bookkeeping and queues the transition for flush.
func (g *Guard) stateChanged(b *breaker, gen *generation, from, to gobreaker.State) {
	now := time.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	if b.cur.Load() != gen || b.detached {
		return // a replaced generation or a departed instance
	}
	bc := g.cfg.Load().cfg.Breaker
	t := transition{id: b.id, from: mapState(from), to: mapState(to)}
	b.state = t.to
	switch to {
	case gobreaker.StateOpen:
		if from == gobreaker.StateHalfOpen && b.trips < 64 && openPeriod(bc, b.trips) < bc.OpenMax {
			b.trips++
		}
		t.period = openPeriod(bc, b.trips)
		until := now.Add(t.period)
		b.openUntil.Store(until.UnixNano())
		b.st.SetBreaker(balance.BreakerOpen, until)
		if !b.isEject {
			b.isEject = true
			g.ejected.Add(1)
		}
	case gobreaker.StateHalfOpen:
		// gobreaker's own open period is OpenFor; a longer one is enforced
		// by Admit, and pickers must keep skipping the instance until then.
		if until := b.openUntil.Load(); now.UnixNano() < until {
			b.st.SetBreaker(balance.BreakerOpen, time.Unix(0, until))
		} else {
			b.st.SetBreaker(balance.BreakerHalfOpen, time.Time{})
		}
	default:
		b.trips = 0
		b.openUntil.Store(0)
		b.st.SetBreaker(balance.BreakerClosed, time.Time{})
		g.unejectLocked(b)
	}
	g.queueLocked(t)
}

func mapState(s gobreaker.State) balance.BreakerState {
	switch s {
	case gobreaker.StateOpen:
		return balance.BreakerOpen
	case gobreaker.StateHalfOpen:
		return balance.BreakerHalfOpen
	default:
		return balance.BreakerClosed
	}
}

func (g *Guard) unejectLocked(b *breaker) {
	if b.isEject {
		b.isEject = false
		g.ejected.Add(-1)
	}
}

func (g *Guard) queueLocked(t transition) {
	g.events = append(g.events, t)
	g.pending.Store(true)
}

// flush reports queued transitions. One goroutine at a time drains the queue,
// so reports keep their order; the others leave their events to it.
func (g *Guard) flush() {
	if !g.pending.Load() {
		return
	}
	g.mu.Lock()
	if g.draining {
		g.mu.Unlock()
		return
	}
	g.draining = true
	for len(g.events) > 0 {
		evs := g.events
		g.events = nil
		g.pending.Store(false)
		g.mu.Unlock()
		for _, t := range evs {
			g.report(t)
		}
		g.mu.Lock()
	}
	g.draining = false
	g.mu.Unlock()
}

func (g *Guard) report(t transition) {
	attrs := []slog.Attr{
		slog.String("upstream", g.name),
		slog.String("instance", t.id),
		slog.String("from", t.from.String()),
		slog.String("to", t.to.String()),
	}
	level, msg := slog.LevelInfo, "circuit breaker "+t.to.String()
	switch t.to {
	case balance.BreakerOpen:
		level, msg = slog.LevelWarn, "circuit breaker opened"
		attrs = append(attrs, slog.Duration("open_for", t.period))
	case balance.BreakerClosed:
		msg = "circuit breaker closed"
	}
	if t.reason != "" {
		attrs = append(attrs, slog.String("reason", t.reason))
	}
	g.log.LogAttrs(context.Background(), level, msg, attrs...)
	if g.onTransition != nil {
		g.onTransition(t.id, t.from, t.to)
	}
}

// Admit asks the breaker of the instance owning st whether a try may be sent.
// On success the returned done must be called once with the try's Outcome
// (later calls are ignored) to feed the breaker; a canceled outcome counts as
// neither success nor failure. A try that is admitted but never reported
// holds a half-open probe slot until the breaker changes state, so call done
// on every path. When the breaker rejects the try, Admit returns an error
// wrapping ErrBreakerOpen and nothing may be sent. With breakers disabled
// every try is admitted. Admit and done leave the counters of st (InFlight,
// Requests, Failures, latency) to the forwarder. Safe for concurrent use.
//
// Admit allocates its done function; AdmitTo is the same admission into a
// Ticket the caller keeps, for paths that count their allocations.
func (g *Guard) Admit(st *balance.Stats) (done func(Outcome), err error) {
	var adm Ticket // on the stack: a refusal allocates nothing
	if err := g.AdmitTo(st, &adm); err != nil {
		return nil, err
	}
	if adm.done == nil {
		return noop, nil
	}
	t := &Ticket{g: adm.g, done: adm.done}
	t.armed.Store(true)
	return t.Finish, nil
}

// AdmitTo is Admit with the report kept in t: on success t.Finish must be
// called once with the try's Outcome, on every path, as Admit's done. On
// error t is left empty (its Finish does nothing) and nothing may be sent.
// t must not be in use by another try. If it still holds an unreported
// one, that try is reported first as canceled (neither success nor
// failure), so that a half-open breaker does not wait on it for ever.
// Safe for concurrent use with other tickets.
func (g *Guard) AdmitTo(st *balance.Stats, t *Ticket) error {
	if t.armed.Load() {
		t.Finish(unreported)
	}
	t.g, t.done = nil, nil // not armed: Finish reports nothing
	var b *breaker
	if st != nil {
		b, _ = st.Ext.(*breaker)
	}
	if b == nil || b.g != g {
		return fmt.Errorf("resilience: upstream %q: %w", g.name, ErrNotAttached)
	}
	gen := b.cur.Load()
	if gen == nil {
		return nil // breakers disabled: t reports nothing
	}
	if until := b.openUntil.Load(); until != 0 && time.Now().UnixNano() < until {
		return b.rejectErr
	}
	cbDone, err := gen.cb.Allow()
	g.flush()
	if err != nil {
		return b.rejectErr
	}
	// A caller that read openUntil before a trip and reached gobreaker after
	// gobreaker's own (shorter) open period may have been admitted as a probe
	// too early: hand the slot back and reject.
	if until := b.openUntil.Load(); until != 0 && time.Now().UnixNano() < until {
		cbDone(errExcluded)
		g.flush()
		return b.rejectErr
	}
	t.set(g, cbDone)
	return nil
}

// noop is the done function of tries the breaker does not see.
func noop(Outcome) {}

// unreported is the outcome of a try left unreported in a ticket filled
// again: canceled, neither success nor failure.
var unreported = Outcome{kind: KindCanceled}

// AdmitForced is Admit for an upstream that fails open (see FailOpen): it
// never rejects. When the breaker admits the try (closed, or a probe is due)
// it behaves exactly like Admit and done feeds the breaker; when the breaker
// would reject, the try is sent anyway and done ignores its outcome, since
// an open breaker only learns from its probes. Safe for concurrent use.
func (g *Guard) AdmitForced(st *balance.Stats) (done func(Outcome)) {
	if d, err := g.Admit(st); err == nil {
		return d
	}
	return noop
}

// AdmitForcedTo is AdmitForced with the report kept in t, as AdmitTo: when
// the breaker would have rejected the try, t is left empty and its Finish
// does nothing.
func (g *Guard) AdmitForcedTo(st *balance.Stats, t *Ticket) {
	if g.AdmitTo(st, t) != nil {
		t.set(nil, nil)
	}
}

// Ticket carries one admitted try's outcome to its instance's breaker. It
// is filled by Guard.AdmitTo or Guard.AdmitForcedTo, and its Finish reports
// the outcome; the zero Ticket, and one whose try the breaker does not see
// (breakers disabled, a forced try, a refused admission), reports nothing.
// Finish is safe for concurrent use, and only its first call after a fill
// counts. A Ticket lets a caller that serves one try after another keep the
// report in memory it reuses (Admit allocates it): it may be filled again
// once its Finish has been called and no one can call it for the old try.
// It must not be copied while in use.
type Ticket struct {
	g     *Guard
	done  func(error)
	armed atomic.Bool // a report is due: set by a fill, taken by Finish
}

// set fills t for a new try (done nil: nothing to report).
func (t *Ticket) set(g *Guard, done func(error)) {
	t.g, t.done = g, done
	t.armed.Store(done != nil)
}

// Finish reports the try's outcome to the breaker: a failure counts
// against the instance, a canceled outcome counts as neither success nor
// failure, anything else as a success. Calls after the first are ignored.
// A nil *Ticket does nothing.
func (t *Ticket) Finish(o Outcome) {
	if t == nil || !t.armed.Swap(false) {
		return
	}
	switch {
	case o.Canceled():
		t.done(errExcluded)
	case o.Failure():
		t.done(errFailed)
	default:
		t.done(nil)
	}
	t.g.flush()
}

// FailOpen reports whether more than MaxEjectionPercent of total instances
// (the size of the current snapshot) are ejected while FailOpen is on. The
// forwarder then sets balance.Request.IgnoreHealth and uses AdmitForced for
// the pick. O(1), lock-free.
func (g *Guard) FailOpen(total int) bool {
	bc := &g.cfg.Load().cfg.Breaker
	if bc.Disabled || !bc.FailOpen || total <= 0 {
		return false
	}
	return g.ejected.Load()*100 > int64(bc.MaxEjectionPercent)*int64(total)
}

// Ejected returns how many attached instances have an open or half-open
// breaker. Lock-free.
func (g *Guard) Ejected() int { return int(g.ejected.Load()) }

// Classify is Classify with the Guard's current FailureConfig.
func (g *Guard) Classify(ctx context.Context, err error, status int) Outcome {
	return Classify(ctx, err, status, g.cfg.Load().cfg.Failure)
}
