package balance

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshd/meshd/discovery"
)

// DefaultAlgorithm is used when an upstream names no algorithm: power of two
// random choices on in-flight requests.
const DefaultAlgorithm = "p2c"

// DefaultDecay is the time constant of the response-time average when
// Config.Decay is zero.
const DefaultDecay = 10 * time.Second

var (
	// ErrNoInstances means discovery knows no instance of the upstream.
	ErrNoInstances = errors.New("no instances")
	// ErrNoneAvailable means instances exist but every one is unavailable
	// (breaker open) or already tried by this request.
	ErrNoneAvailable = errors.New("no available instance")
)

// Stats is the live state of one instance. It is shared by every snapshot in
// which the instance appears and updated with atomics only.
type Stats struct {
	// InFlight counts requests currently forwarded to the instance.
	InFlight atomic.Int64
	// Requests and Failures are totals since the instance was first seen.
	Requests atomic.Uint64
	Failures atomic.Uint64

	ewmaBits  atomic.Uint64 // float64 nanoseconds; 0 = no sample yet
	obsAt     atomic.Int64  // unix nanos of the last latency sample
	lastPick  atomic.Int64  // unix nanos of the last pick
	retryAt   atomic.Int64  // unix nanos when an open breaker admits a probe; 0 = closed
	stateCode atomic.Uint32 // BreakerState for display

	// Added is when the instance was first seen (slow start).
	Added time.Time
	// Ext holds per-instance state of other packages (the circuit breaker). It
	// is set once by Pool.OnNew before the instance is published, then only read.
	Ext any
}

// BreakerState mirrors the instance's circuit breaker for pickers and display.
type BreakerState uint32

// Breaker states.
const (
	BreakerClosed BreakerState = iota
	BreakerOpen
	BreakerHalfOpen
)

// String is the state as /upstreams and traces show it: closed, open or half-open.
func (s BreakerState) String() string {
	switch s {
	case BreakerOpen:
		return "open"
	case BreakerHalfOpen:
		return "half-open"
	default:
		return "closed"
	}
}

// SetBreaker records the breaker's state. retryAt is when an open breaker will
// admit a probe (ignored for other states). Safe to call from any goroutine,
// including under the breaker's own lock.
func (s *Stats) SetBreaker(st BreakerState, retryAt time.Time) {
	s.stateCode.Store(uint32(st))
	if st == BreakerOpen {
		s.retryAt.Store(retryAt.UnixNano())
	} else {
		s.retryAt.Store(0)
	}
}

// Breaker returns the recorded breaker state.
func (s *Stats) Breaker() BreakerState { return BreakerState(s.stateCode.Load()) }

// Available reports whether the instance may be picked at now (unix nanos):
// its breaker is closed or half-open, or its open period has passed so that the
// breaker can admit a probe.
func (s *Stats) Available(now int64) bool {
	at := s.retryAt.Load()
	return at == 0 || now >= at
}

// ObserveLatency folds one response time into the decaying average with
// weight alpha in [0,1] (values outside are clamped). The first sample sets
// the average. Lock-free.
func (s *Stats) ObserveLatency(d time.Duration, alpha float64) {
	x := float64(d)
	if !(alpha > 0) { // also NaN
		alpha = 0
	} else if alpha > 1 {
		alpha = 1
	}
	for {
		old := s.ewmaBits.Load()
		var next float64
		if old == 0 {
			next = x
		} else {
			prev := math.Float64frombits(old)
			next = prev + alpha*(x-prev)
		}
		if next <= 0 {
			next = 1
		}
		if s.ewmaBits.CompareAndSwap(old, math.Float64bits(next)) {
			return
		}
	}
}

// ObserveLatencyAt folds one response time, completed at now (unix nanos),
// into the decaying average with a weight that depends on time rather than on
// the number of samples: alpha = 1 - exp(-dt/decay), where dt is the time since
// the previous sample. The average therefore reflects roughly the last decay
// of traffic at any request rate, and the first sample after a long silence
// mostly replaces a stale value. A sample at or before the previous one
// (taken at the same instant, or by a caller that read the clock earlier
// and got here later) has no weight and leaves the previous time as it
// is, so that the next sample's weight is not counted twice. One more than
// decay before it means the wall clock was set back: that time is taken as
// the previous one from then on (the sample still has no weight), so that
// the average does not stand still until the clock catches up. decay <= 0
// means DefaultDecay. Lock-free.
func (s *Stats) ObserveLatencyAt(d time.Duration, now int64, decay time.Duration) {
	if decay <= 0 {
		decay = DefaultDecay
	}
	prev := s.obsAt.Load()
	for (now > prev || prev-now > int64(decay)) && !s.obsAt.CompareAndSwap(prev, now) {
		prev = s.obsAt.Load()
	}
	alpha := 1.0
	if prev != 0 {
		dt := max(now-prev, 0)
		alpha = -math.Expm1(-float64(dt) / float64(decay))
	}
	s.ObserveLatency(d, alpha)
}

// Latency returns the decaying average response time; ok is false before the
// first sample.
func (s *Stats) Latency() (d time.Duration, ok bool) {
	b := s.ewmaBits.Load()
	if b == 0 {
		return 0, false
	}
	return time.Duration(math.Float64frombits(b)), true
}

// MarkPicked records that the instance was chosen at now (unix nanos).
func (s *Stats) MarkPicked(now int64) { s.lastPick.Store(now) }

// LastPicked returns the unix nanos of the last pick, 0 if never.
func (s *Stats) LastPicked() int64 { return s.lastPick.Load() }

// Endpoint is an instance together with its live state. Endpoints in a
// snapshot are immutable except through Stats.
type Endpoint struct {
	discovery.Instance
	*Stats
}

// maxTried bounds how many tried endpoints a Request remembers.
const maxTried = 8

// Request carries what a picker may look at, and what it reports back, for one
// pick. The sidecar reuses one Request per incoming request across attempts;
// it is not shared between goroutines.
type Request struct {
	// HTTP is the request being routed (headers, cookies, URL for hashing).
	HTTP *http.Request
	// ClientIP is the caller's address as resolved by the listener.
	ClientIP netip.Addr
	// Now is the pick time in unix nanos. Breaker retry times are compared
	// with it, and least_response_time uses it to find instances not picked
	// for a while (zero disables that).
	Now int64
	// IgnoreHealth makes unavailable (breaker-open) instances candidates again;
	// set when too many instances are ejected (fail open).
	IgnoreHealth bool

	tried  [maxTried]*Endpoint
	ntried int

	// Candidates, Reason and Score are filled by Pick for tracing: how many
	// instances the choice was made among (the whole list for rotation,
	// random and hash algorithms, the sample for sampling ones), why the
	// winner won (a string fixed when the picker was built; no allocation),
	// and the winning score where the algorithm has one (0 otherwise).
	Candidates int
	Reason     string
	Score      float64
}

// Exclude marks e as tried so that picks of this request avoid it.
func (r *Request) Exclude(e *Endpoint) {
	if r.ntried < maxTried {
		r.tried[r.ntried] = e
		r.ntried++
	}
}

// ClearExcluded forgets the tried endpoints (when every instance has been tried).
func (r *Request) ClearExcluded() { r.ntried = 0 }

// Tried reports how many endpoints have been excluded.
func (r *Request) Tried() int { return r.ntried }

// Usable reports whether e may be picked: not tried by this request and
// available (unless IgnoreHealth).
func (r *Request) Usable(e *Endpoint) bool {
	for i := 0; i < r.ntried; i++ {
		if r.tried[i] == e {
			return false
		}
	}
	return r.IgnoreHealth || e.Available(r.Now)
}

// usable is Usable for callers that hold e's Stats already: it reads s instead
// of loading it through e (one memory access less per instance scanned).
func (r *Request) usable(e *Endpoint, s *Stats) bool {
	for i := 0; i < r.ntried; i++ {
		if r.tried[i] == e {
			return false
		}
	}
	return r.IgnoreHealth || s.Available(r.Now)
}

// Picker chooses an endpoint. Implementations are immutable after
// construction; Pick is called concurrently and must not lock, block or
// allocate. It returns ErrNoInstances for an empty set and ErrNoneAvailable
// when every endpoint is unusable for req.
type Picker interface {
	Pick(req *Request) (*Endpoint, error)
}

// Policy is a configured algorithm. NewPicker is called off the hot path on
// every update with the complete endpoint list (never empty) and must not keep
// or modify the slice's order assumptions beyond the returned picker.
type Policy interface {
	Name() string
	NewPicker(eps []*Endpoint) Picker
}

// TimedPolicy is implemented by policies whose pickers depend on the time they
// are built at: weighted algorithms ramp a new instance's weight up over the
// slow-start window. The Pool builds their pickers with NewPickerAt using its
// own clock and rebuilds them from Tick while an instance is warming up.
// Every algorithm of this package implements it.
type TimedPolicy interface {
	Policy
	// NewPickerAt is NewPicker with the effective weights of time now.
	NewPickerAt(eps []*Endpoint, now time.Time) Picker
	// SlowStart is the ramp-up window; 0 when pickers do not depend on time.
	SlowStart() time.Duration
}

// DecayOf returns the response-time decay constant a policy was configured
// with (DefaultDecay for policies that have none). The sidecar passes it to
// Stats.ObserveLatencyAt.
func DecayOf(p Policy) time.Duration {
	if d, ok := p.(interface{ Decay() time.Duration }); ok {
		if v := d.Decay(); v > 0 {
			return v
		}
	}
	return DefaultDecay
}

// Config is an upstream's balance section. Fields not used by an algorithm
// are ignored by it; New rejects fields that make no sense.
type Config struct {
	// Algorithm is a registered name; DefaultAlgorithm when empty.
	Algorithm string
	// Key is the hash key of the hash algorithm: header:NAME, cookie:NAME,
	// query:NAME, path or url. Required by hash.
	Key string
	// Fallback is the algorithm hash and ip_hash use for a request without a
	// key; DefaultFallback (round_robin) when empty. It cannot be hash or
	// ip_hash.
	Fallback string
	// Decay is the time constant of the response-time average
	// (least_response_time); DefaultDecay when zero. Negative is an error.
	Decay time.Duration
	// SlowStart ramps a new instance's weight up linearly, from 10% to 100%,
	// over this window after it is first seen (weighted algorithms only);
	// zero disables it. Negative is an error.
	SlowStart time.Duration
}

// FieldError is a config error that names the offending field of Config
// (lower-case YAML key, e.g. "algorithm" or "key").
type FieldError struct {
	Field string
	Err   error
}

// Error names the field and the problem.
func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }

// Unwrap returns the problem without the field name.
func (e *FieldError) Unwrap() error { return e.Err }

// Builder makes a Policy from config; it returns *FieldError for bad values.
type Builder func(cfg Config) (Policy, error)

var (
	regMu    sync.RWMutex
	registry = map[string]Builder{}
)

// Register makes an algorithm available by name. It is meant to be called
// from init functions and panics on an empty or duplicate name.
func Register(name string, b Builder) {
	regMu.Lock()
	defer regMu.Unlock()
	if name == "" || b == nil {
		panic("balance: Register with empty name or nil builder")
	}
	if _, dup := registry[name]; dup {
		panic("balance: algorithm registered twice: " + name)
	}
	registry[name] = b
}

// Names lists the registered algorithms, sorted.
func Names() []string {
	regMu.RLock()
	defer regMu.RUnlock()
	out := make([]string, 0, len(registry))
	for n := range registry {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// New builds the policy cfg names. Errors are *FieldError. Safe for
// concurrent use.
func New(cfg Config) (Policy, error) {
	p, err := build(cfg)
	if err != nil {
		return nil, err
	}
	name := p.Name()
	// A setting the algorithm would ignore is a mistake to report, not to
	// pass over: a slow_start that ramps nothing leaves new instances
	// unprotected, a key on round_robin hashes nothing.
	if cfg.Key != "" && name != "hash" {
		return nil, &FieldError{Field: "key", Err: fmt.Errorf("only hash uses a key, not %s", name)}
	}
	if cfg.Fallback != "" && name != "hash" && name != "ip_hash" {
		return nil, &FieldError{Field: "fallback", Err: fmt.Errorf("only hash and ip_hash use a fallback, not %s", name)}
	}
	if cfg.SlowStart > 0 && slowStartOf(p) == 0 {
		return nil, &FieldError{Field: "slow_start", Err: fmt.Errorf("%s does not use weights, so there is nothing to ramp up; slow_start needs a weighted algorithm (%s)", name, strings.Join(weightedNames(), ", "))}
	}
	return p, nil
}

// build is New without the check for settings the algorithm ignores (hash
// passes its own to its fallback, which may not use them all).
func build(cfg Config) (Policy, error) {
	name := cfg.Algorithm
	if name == "" {
		name = DefaultAlgorithm
	}
	if cfg.Decay < 0 {
		return nil, &FieldError{Field: "decay", Err: fmt.Errorf("must not be negative, have %s", cfg.Decay)}
	}
	if cfg.SlowStart < 0 {
		return nil, &FieldError{Field: "slow_start", Err: fmt.Errorf("must not be negative, have %s", cfg.SlowStart)}
	}
	regMu.RLock()
	b, ok := registry[name]
	regMu.RUnlock()
	if !ok {
		return nil, &FieldError{Field: "algorithm", Err: fmt.Errorf("unknown algorithm %q (known: %s)", name, strings.Join(Names(), ", "))}
	}
	return b(cfg)
}

// weightedNames lists the algorithms whose picks follow weights (and so
// slow_start).
func weightedNames() []string {
	var out []string
	for _, n := range Names() {
		if p, err := build(Config{Algorithm: n, Key: keyFor(n), SlowStart: time.Second}); err == nil && slowStartOf(p) > 0 {
			out = append(out, n)
		}
	}
	return out
}

// slowStartOf is p's slow-start window, 0 when it has none.
func slowStartOf(p Policy) time.Duration {
	if tp, ok := p.(interface{ SlowStart() time.Duration }); ok {
		return tp.SlowStart()
	}
	return 0
}

// keyFor is a valid key for algorithms that need one.
func keyFor(name string) string {
	if name == "hash" {
		return "path"
	}
	return ""
}

// emptyPicker serves a pool with no instances.
type emptyPicker struct{}

func (emptyPicker) Pick(*Request) (*Endpoint, error) { return nil, ErrNoInstances }
