package balance

import (
	"math"
	"testing"
	"time"
)

// lrtEndpoints makes endpoints with the given average latencies (0 = no
// sample yet), all picked just now so that none counts as stale.
func lrtEndpoints(lat ...time.Duration) []*Endpoint {
	eps := endpoints(len(lat))
	for i, d := range lat {
		if d > 0 {
			eps[i].ObserveLatency(d, 1)
		}
		eps[i].MarkPicked(t0.UnixNano())
	}
	return eps
}

func TestLeastResponseTimeAvoidsSlow(t *testing.T) {
	seedRand(t, 31)
	eps := lrtEndpoints(10*time.Millisecond, 10*time.Millisecond, 100*time.Millisecond, 10*time.Millisecond)
	pk := picker(t, Config{Algorithm: "least_response_time"}, eps)
	req := newReq()
	c := make([]int, 4)
	// Requests take a while: in-flight counts rise, so the fast instances
	// become less attractive, but a 10x slower one must still get far less.
	var queue []*Endpoint
	for range 10000 {
		e, err := pk.Pick(req)
		if err != nil {
			t.Fatal(err)
		}
		c[index(eps, e)]++
		e.InFlight.Add(1)
		queue = append(queue, e)
		if len(queue) > 12 {
			queue[0].InFlight.Add(-1)
			queue = queue[1:]
		}
	}
	if share := float64(c[2]) / 10000; share > 0.03 {
		t.Errorf("slow instance: want under 3%% of picks, have %.2f%% (%v)", 100*share, c)
	}
	for _, i := range []int{0, 1, 3} {
		if c[i] < 2500 {
			t.Errorf("fast instance %d: want a fair share (>= 2500), have %d (%v)", i, c[i], c)
		}
	}
	if req.Reason != reasonLRT || req.Candidates != 2 || !(req.Score > 0) {
		t.Errorf("want reason %q, candidates 2, score > 0; have %q, %d, %v", reasonLRT, req.Reason, req.Candidates, req.Score)
	}
}

func TestLeastResponseTimeScore(t *testing.T) {
	seedRand(t, 32)
	eps := lrtEndpoints(10*time.Millisecond, 30*time.Millisecond)
	eps[0].InFlight.Store(3) // 10ms × 4 = 40ms against 30ms × 1
	pk := picker(t, Config{Algorithm: "least_response_time"}, eps)
	req := newReq()
	e, err := pk.Pick(req)
	if err != nil || e != eps[1] {
		t.Fatalf("want i1 (score 30ms < 40ms), have %v, %v", e, err)
	}
	if want := float64(30 * time.Millisecond); req.Score != want {
		t.Errorf("score: want %v, have %v", want, req.Score)
	}
}

func TestLeastResponseTimeTriesNewInstance(t *testing.T) {
	seedRand(t, 33)
	eps := lrtEndpoints(10*time.Millisecond, 10*time.Millisecond, 10*time.Millisecond)
	fresh := endpoints(4)[3] // never picked, no latency sample
	eps = append(eps, fresh)
	pk := picker(t, Config{Algorithm: "least_response_time"}, eps)
	req := newReq()
	got := -1
	for i := range 100 {
		e, err := pk.Pick(req)
		if err != nil {
			t.Fatal(err)
		}
		if e == fresh {
			got = i
			break
		}
	}
	if got < 0 {
		t.Fatal("new instance: want it tried within 100 picks, have none")
	}
	if req.Reason != reasonLRTStale {
		t.Errorf("first pick of the new instance: want reason %q, have %q", reasonLRTStale, req.Reason)
	}
	if fresh.LastPicked() != req.Now {
		t.Errorf("LastPicked: want %d, have %d", req.Now, fresh.LastPicked())
	}
	// Without a sample it competes on in-flight requests at its peers'
	// latency: it is not flooded while its first responses are pending.
	for _, e := range eps[:3] {
		e.InFlight.Store(2)
	}
	fresh.InFlight.Store(1)
	for range 300 {
		e, err := pk.Pick(req)
		if err != nil {
			t.Fatal(err)
		}
		e.InFlight.Add(1) // nothing completes
	}
	lo := int64(math.MaxInt64)
	for _, e := range eps[:3] {
		lo = min(lo, e.InFlight.Load())
	}
	if f := fresh.InFlight.Load(); f > lo+3 || f < lo-3 {
		t.Errorf("new instance in flight: want within 3 of its peers' (%d), have %d", lo, f)
	}
}

func TestLeastResponseTimeRetriesStale(t *testing.T) {
	seedRand(t, 34)
	decay := 5 * time.Second
	eps := lrtEndpoints(10*time.Millisecond, 10*time.Millisecond, 200*time.Millisecond)
	eps[2].MarkPicked(t0.Add(-2 * decay).UnixNano())
	pk := picker(t, Config{Algorithm: "least_response_time", Decay: decay}, eps)
	req := newReq()
	slowPicks := func(now time.Time) int {
		req.Now = now.UnixNano()
		n := 0
		for range 1000 {
			e, err := pk.Pick(req)
			if err != nil {
				t.Fatal(err)
			}
			if e == eps[2] {
				n++
				if req.Reason != reasonLRTStale {
					t.Errorf("pick of the slow instance: want reason %q, have %q", reasonLRTStale, req.Reason)
				}
			}
		}
		return n
	}
	// Stale: taken exactly once, then it loses on its score again.
	if n := slowPicks(t0); n != 1 {
		t.Errorf("stale slow instance: want exactly 1 re-probe in 1000 picks, have %d", n)
	}
	// Within the decay window: not again.
	if n := slowPicks(t0.Add(decay / 2)); n != 0 {
		t.Errorf("slow instance re-probed %v ago: want 0 picks, have %d", decay/2, n)
	}
	// Once decay has passed since the probe: once more.
	if n := slowPicks(t0.Add(decay + time.Millisecond)); n != 1 {
		t.Errorf("slow instance after another %v: want 1 re-probe, have %d", decay, n)
	}
}

func TestObserveLatencyAt(t *testing.T) {
	var s Stats
	decay := 10 * time.Second
	now := t0.UnixNano()
	s.ObserveLatencyAt(100*time.Millisecond, now, decay)
	if d, ok := s.Latency(); !ok || d != 100*time.Millisecond {
		t.Fatalf("first sample: want 100ms, have %v (ok %v)", d, ok)
	}
	// A sample at the same instant carries no weight.
	s.ObserveLatencyAt(time.Second, now, decay)
	if d, _ := s.Latency(); d != 100*time.Millisecond {
		t.Errorf("simultaneous sample: want the average unchanged at 100ms, have %v", d)
	}
	// One decay later, a sample counts 1-1/e.
	s.ObserveLatencyAt(200*time.Millisecond, now+int64(decay), decay)
	want := 100e6 + (1-1/math.E)*100e6
	if d, _ := s.Latency(); math.Abs(float64(d)-want) > 1e3 {
		t.Errorf("after one decay: want %.0fns, have %d", want, d)
	}
	// A sample from before the last one (its caller read the clock
	// earlier) carries no weight, and the next one's weight still counts
	// from the latest time seen, not from the earlier one.
	before, _ := s.Latency()
	s.ObserveLatencyAt(time.Second, now, decay)
	if d, _ := s.Latency(); d != before {
		t.Errorf("late sample from the past: want the average unchanged at %v, have %v", before, d)
	}
	s.ObserveLatencyAt(time.Second, now+int64(decay), decay)
	if d, _ := s.Latency(); d != before {
		t.Errorf("a sample at the latest time after a late one: want the average unchanged at %v, have %v", before, d)
	}
	// After a long silence a sample mostly replaces the average.
	s.ObserveLatencyAt(10*time.Millisecond, now+int64(11*decay), decay)
	if d, _ := s.Latency(); d > 11*time.Millisecond {
		t.Errorf("after 10 decays of silence: want about 10ms, have %v", d)
	}
	// The wall clock set back an hour: the first sample after it has no
	// weight, and the ones after count from it, not from an hour ahead.
	back := now + int64(11*decay) - int64(time.Hour)
	s.ObserveLatencyAt(time.Second, back, decay)
	if d, _ := s.Latency(); d > 11*time.Millisecond {
		t.Errorf("the sample at a clock set back: want no weight, have the average at %v", d)
	}
	s.ObserveLatencyAt(time.Second, back+int64(10*decay), decay)
	if d, _ := s.Latency(); d < 999*time.Millisecond {
		t.Errorf("10 decays after a clock set back: want about 1s, have %v", d)
	}
	if DecayOf(mustPolicy(t, Config{Algorithm: "least_response_time", Decay: 3 * time.Second})) != 3*time.Second {
		t.Error("DecayOf: want the configured 3s")
	}
	if DecayOf(mustPolicy(t, Config{Algorithm: "least_response_time"})) != DefaultDecay {
		t.Error("DecayOf: want DefaultDecay when unset")
	}
}
