package balance

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshd/meshd/discovery"
)

func inst(id string, w int) discovery.Instance {
	return discovery.Instance{ID: id, Address: id + ":80", Weight: w}
}

func TestPoolKeepsStatsAndCallsHooks(t *testing.T) {
	p := NewPool(mustPolicy(t, Config{Algorithm: "round_robin"}))
	var newIDs, removedIDs []string
	p.OnNew = func(in discovery.Instance, s *Stats) {
		newIDs = append(newIDs, in.ID)
		s.Ext = "ext-" + in.ID
		if p.Load().Version != 0 && slices.ContainsFunc(p.Load().Endpoints, func(e *Endpoint) bool { return e.ID == in.ID }) {
			t.Errorf("OnNew(%s): want it called before the instance is published", in.ID)
		}
	}
	p.OnRemove = func(in discovery.Instance, s *Stats) {
		removedIDs = append(removedIDs, in.ID)
		if slices.ContainsFunc(p.Load().Endpoints, func(e *Endpoint) bool { return e.ID == in.ID }) {
			t.Errorf("OnRemove(%s): want it called after a snapshot without it is published", in.ID)
		}
		if s.Ext != "ext-"+in.ID {
			t.Errorf("OnRemove(%s): want its own Stats, have Ext %v", in.ID, s.Ext)
		}
	}
	p.Update([]discovery.Instance{inst("a", 1), inst("b", 1), inst("a", 5)}, "")
	sa, sb := p.StatsOf("a"), p.StatsOf("b")
	if sa == nil || sb == nil || len(p.Load().Endpoints) != 2 {
		t.Fatalf("after first update: want stats for a and b (duplicate a dropped), have %v %v, %d endpoints", sa, sb, len(p.Load().Endpoints))
	}
	sa.Requests.Add(7)
	p.Update([]discovery.Instance{inst("a", 3), inst("c", 0)}, "")
	if p.StatsOf("a") != sa {
		t.Error("a still present: want the same *Stats across updates")
	}
	if p.StatsOf("b") != nil {
		t.Error("b removed: want its Stats dropped")
	}
	snap := p.Load()
	for _, e := range snap.Endpoints {
		switch e.ID {
		case "a":
			if e.Stats != sa || e.Weight != 3 || e.Requests.Load() != 7 {
				t.Errorf("a: want same Stats (7 requests) and new weight 3, have %p %d %d", e.Stats, e.Weight, e.Requests.Load())
			}
		case "c":
			if e.Weight != 1 {
				t.Errorf("c with weight 0: want weight 1, have %d", e.Weight)
			}
		}
	}
	p.Update([]discovery.Instance{inst("a", 3), inst("b", 1)}, "")
	if sb2 := p.StatsOf("b"); sb2 == nil || sb2 == sb {
		t.Error("b re-added: want fresh Stats")
	}
	if want := []string{"a", "b", "c", "b"}; !slices.Equal(newIDs, want) {
		t.Errorf("OnNew calls: want %v, have %v", want, newIDs)
	}
	if want := []string{"b", "c"}; !slices.Equal(removedIDs, want) {
		t.Errorf("OnRemove calls: want %v, have %v", want, removedIDs)
	}
	p.Update(nil, "no passing instances")
	if snap := p.Load(); snap.Reason != "no passing instances" || len(snap.Endpoints) != 0 {
		t.Errorf("empty update: want reason and no endpoints, have %q, %d", snap.Reason, len(snap.Endpoints))
	} else if _, err := snap.Picker.Pick(newReq()); !errors.Is(err, ErrNoInstances) {
		t.Errorf("empty pool: want ErrNoInstances, have %v", err)
	}
}

func TestPoolConcurrentPickDuringUpdate(t *testing.T) {
	for _, cfg := range algorithmCases {
		t.Run(cfg.Algorithm, func(t *testing.T) {
			cfg.SlowStart = time.Minute
			p := NewPool(builtPolicy(t, cfg))
			sets := [][]discovery.Instance{
				{inst("a", 1), inst("b", 2), inst("c", 3)},
				{inst("b", 2), inst("d", 1)},
				{},
				{inst("a", 1), inst("e", 4), inst("f", 1), inst("g", 2)},
			}
			p.Update(sets[0], "")
			var wg sync.WaitGroup
			var picks atomic.Int64
			stop := make(chan struct{})
			errs := make(chan error, 4)
			reqs := keyedRequests(4)
			for g := range 4 {
				wg.Add(1)
				go func(req *Request) {
					defer wg.Done()
					for i := 0; ; i++ {
						select {
						case <-stop:
							return
						default:
						}
						if picks.Add(1)%16 == 0 {
							runtime.Gosched() // let the updater in
						}
						snap := p.Load()
						req.Now = time.Now().UnixNano()
						e, err := snap.Picker.Pick(req)
						switch {
						case err != nil && len(snap.Endpoints) != 0:
							errs <- fmt.Errorf("pick from %d endpoints: %w", len(snap.Endpoints), err)
							return
						case err == nil && !slices.Contains(snap.Endpoints, e):
							errs <- fmt.Errorf("picked %s, not in its snapshot", e.ID)
							return
						case err == nil:
							e.InFlight.Add(1)
							e.ObserveLatencyAt(time.Millisecond, req.Now, time.Second)
							e.InFlight.Add(-1)
						}
					}
				}(reqs[g])
			}
			deadline := time.Now().Add(20 * time.Second)
			for i := range 60 {
				p.Update(sets[i%len(sets)], "")
				if i%20 == 0 {
					p.SetPolicy(builtPolicy(t, cfg))
				}
				p.Tick()
				// Let picks run against every snapshot before replacing it.
				for want := picks.Load() + 8; picks.Load() < want; runtime.Gosched() {
					if time.Now().After(deadline) {
						t.Fatalf("pickers stalled after %d updates", i)
					}
				}
			}
			close(stop)
			wg.Wait()
			select {
			case err := <-errs:
				t.Fatal(err)
			default:
			}
		})
	}
}

// fakeClock is a settable clock for pools.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// cycleShare returns the share of instance id over one whole WRR cycle.
func cycleShare(t *testing.T, p *Pool, id string) float64 {
	t.Helper()
	snap := p.Load()
	w, ok := snap.Picker.(*weightedRoundRobin)
	if !ok {
		t.Fatalf("want a weighted round-robin picker, have %T", snap.Picker)
	}
	n := 0
	req := newReq()
	for range len(w.sched) {
		e, err := snap.Picker.Pick(req)
		if err != nil {
			t.Fatal(err)
		}
		if e.ID == id {
			n++
		}
	}
	return float64(n) / float64(len(w.sched))
}

func TestPoolSlowStart(t *testing.T) {
	clock := &fakeClock{now: t0}
	p := NewPool(mustPolicy(t, Config{Algorithm: "weighted_round_robin", SlowStart: 30 * time.Second}))
	p.SetClock(clock.Now)
	p.Update([]discovery.Instance{inst("old", 1)}, "")
	clock.Add(time.Hour)
	p.Tick() // the old instance's window ended long ago: final rebuild
	if p.Warming() {
		t.Fatal("after the window: want not warming")
	}
	v := p.Load().Version
	p.Tick()
	if p.Load().Version != v {
		t.Error("Tick with nothing warming: want no rebuild")
	}

	p.Update([]discovery.Instance{inst("old", 1), inst("new", 1)}, "")
	if !p.Warming() {
		t.Fatal("new instance added: want warming")
	}
	if got := p.StatsOf("new").Added; !got.Equal(clock.Now()) {
		t.Errorf("Added: want the injected clock's %v, have %v", clock.Now(), got)
	}
	// Linear ramp from 10% to 100% of weight 1 against the old instance's 1.
	steps := []struct {
		at   time.Duration
		want float64 // new instance's share: f / (1 + f)
	}{
		{0, 0.1 / 1.1},
		{15 * time.Second, 0.55 / 1.55},
		{27 * time.Second, 0.91 / 1.91},
		{30 * time.Second, 0.5},
	}
	elapsed := time.Duration(0)
	for _, s := range steps {
		clock.Add(s.at - elapsed)
		elapsed = s.at
		p.Tick()
		if have := cycleShare(t, p, "new"); have < s.want-0.02 || have > s.want+0.02 {
			t.Errorf("%v into slow start: want share %.3f±0.02, have %.3f", s.at, s.want, have)
		}
	}
	if p.Warming() {
		t.Error("window over: want not warming")
	}
	v = p.Load().Version
	clock.Add(time.Second)
	p.Tick()
	if p.Load().Version != v {
		t.Error("Tick after the ramp: want no rebuild")
	}
}

func TestPoolTickWithoutSlowStart(t *testing.T) {
	p := NewPool(builtPolicy(t, Config{Algorithm: "p2c", SlowStart: time.Minute}))
	p.Update([]discovery.Instance{inst("a", 1)}, "")
	v := p.Load().Version
	p.Tick()
	if p.Warming() || p.Load().Version != v {
		t.Error("p2c ignores weights: want no warming and no rebuild")
	}
}

func TestPoolNoTicksWhenAllRampTogether(t *testing.T) {
	clock := &fakeClock{now: t0}
	p := NewPool(mustPolicy(t, Config{Algorithm: "weighted_random", SlowStart: 30 * time.Second}))
	p.SetClock(clock.Now)
	p.Update([]discovery.Instance{inst("a", 1), inst("b", 3)}, "")
	if p.Warming() {
		t.Error("all instances new together: want no warming (proportions do not change)")
	}
	clock.Add(10 * time.Second)
	p.Update([]discovery.Instance{inst("a", 1), inst("b", 3), inst("c", 1)}, "")
	if !p.Warming() {
		t.Error("c added 10s later: want warming")
	}
}
