package balance

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshd/meshd/discovery"
)

// Snapshot is an immutable view of a pool: its endpoints and the picker built
// from them. Requests load it once and use it throughout.
type Snapshot struct {
	Endpoints []*Endpoint
	Picker    Picker
	Policy    Policy
	// Reason explains an empty set, from discovery.
	Reason string
	// Version increases with every rebuild.
	Version uint64
}

// Pool keeps an upstream's endpoints and their Stats across discovery updates
// and publishes a new Snapshot for each. Load is lock-free; Update, SetPolicy,
// Rebuild and Tick are serialised by a mutex and never run on the request
// path.
type Pool struct {
	mu      sync.Mutex
	policy  Policy
	stats   map[string]*Stats
	insts   map[string]discovery.Instance
	last    []discovery.Instance
	reason  string
	version uint64
	snap    atomic.Pointer[Snapshot]
	// warmUntil is the unix nanos at which the last slow-start window of the
	// published picker ends; 0 when no endpoint is warming up.
	warmUntil atomic.Int64

	// OnNew, when set before the first Update, is called (under the pool's
	// update lock) for every instance seen for the first time, before it is
	// published; it may set Stats.Ext.
	OnNew func(inst discovery.Instance, s *Stats)
	// OnRemove, when set, is called (under the update lock) for every instance
	// that leaves the set, after the snapshot without it is published.
	OnRemove func(inst discovery.Instance, s *Stats)
	// now is the clock, replaceable in tests.
	now func() time.Time
}

// NewPool returns an empty pool using policy.
func NewPool(policy Policy) *Pool {
	p := &Pool{policy: policy, stats: map[string]*Stats{}, now: time.Now}
	p.snap.Store(&Snapshot{Picker: emptyPicker{}, Policy: policy})
	return p
}

// Load returns the current snapshot. Lock-free; never nil.
func (p *Pool) Load() *Snapshot { return p.snap.Load() }

// Update replaces the instance set. Stats of instances still present (by ID)
// are kept; those of vanished instances are dropped. reason explains an empty
// set.
func (p *Pool) Update(insts []discovery.Instance, reason string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.last = append([]discovery.Instance(nil), insts...)
	p.reason = reason
	p.rebuildLocked()
}

// SetPolicy switches the algorithm (config reload), keeping all Stats.
func (p *Pool) SetPolicy(policy Policy) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.policy = policy
	p.rebuildLocked()
}

// SetClock replaces the pool's clock (time.Now by default), which stamps
// Stats.Added and gives slow start its time. Meant for tests.
func (p *Pool) SetClock(now func() time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if now == nil {
		now = time.Now
	}
	p.now = now
}

// Tick rebuilds the picker while some endpoint is inside its slow-start
// window (and others are not ramping in step with it), and once more after
// the last window ends, so that ramping weights reach the picker. Otherwise
// it is a no-op costing one atomic load. The sidecar calls it about once a
// second; safe for concurrent use.
func (p *Pool) Tick() {
	if p.warmUntil.Load() == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.warmUntil.Load() != 0 {
		p.rebuildLocked()
	}
}

// Warming reports whether some endpoint is inside its slow-start window as of
// the last rebuild (Tick will rebuild).
func (p *Pool) Warming() bool { return p.warmUntil.Load() != 0 }

// Rebuild builds a fresh picker from the current set (for time-dependent
// weights such as slow start).
func (p *Pool) Rebuild() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rebuildLocked()
}

// StatsOf returns the live Stats of an instance ID, or nil.
func (p *Pool) StatsOf(id string) *Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats[id]
}

func (p *Pool) rebuildLocked() {
	now := p.now()
	seen := make(map[string]*Stats, len(p.last))
	eps := make([]*Endpoint, 0, len(p.last))
	for _, in := range p.last {
		if _, dup := seen[in.ID]; dup {
			continue
		}
		if in.Weight <= 0 {
			in.Weight = 1
		}
		st := p.stats[in.ID]
		if st == nil {
			st = &Stats{Added: now}
			if p.OnNew != nil {
				p.OnNew(in, st)
			}
		}
		seen[in.ID] = st
		eps = append(eps, &Endpoint{Instance: in, Stats: st})
	}
	old, oldInsts := p.stats, p.insts
	p.stats = seen
	p.insts = make(map[string]discovery.Instance, len(eps))
	for _, e := range eps {
		p.insts[e.ID] = e.Instance
	}
	p.version++
	s := &Snapshot{Endpoints: eps, Policy: p.policy, Reason: p.reason, Version: p.version}
	var warm int64
	switch tp, timed := p.policy.(TimedPolicy); {
	case len(eps) == 0:
		s.Picker = emptyPicker{}
	case timed:
		s.Picker = tp.NewPickerAt(eps, now)
		if w := tp.SlowStart(); w > 0 {
			warm = warmEnd(eps, now, w)
		}
	default:
		s.Picker = p.policy.NewPicker(eps)
	}
	p.snap.Store(s)
	p.warmUntil.Store(warm)
	if p.OnRemove != nil {
		for id, st := range old {
			if seen[id] != st {
				p.OnRemove(oldInsts[id], st)
			}
		}
	}
}

// warmEnd returns when the last slow-start window among eps ends (unix
// nanos), or 0 if rebuilding would change nothing: no window is open at now,
// or every endpoint was added at the same time, so that all effective
// weights ramp up by the same factor and their proportions, which is all any
// algorithm looks at, stay the same.
func warmEnd(eps []*Endpoint, now time.Time, window time.Duration) int64 {
	first, last := eps[0].Added, eps[0].Added
	for _, e := range eps[1:] {
		if e.Added.Before(first) {
			first = e.Added
		}
		if e.Added.After(last) {
			last = e.Added
		}
	}
	end := last.Add(window)
	if first.Equal(last) || !end.After(now) {
		return 0
	}
	return end.UnixNano()
}
