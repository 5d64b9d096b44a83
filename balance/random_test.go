package balance

import (
	"math"
	"testing"
)

func TestRandomChiSquared(t *testing.T) {
	seedRand(t, 11)
	eps := endpoints(10)
	pk := picker(t, Config{Algorithm: "random"}, eps)
	c := counts(t, pk, eps, 100000)
	// df = 10 - 1 = 9, critical value 27.877 at p = 0.001.
	if x := chiSquared(c, uniform(10)); x > chi2Crit001[9] {
		t.Errorf("counts %v: want chi2 <= %.3f (df 9), have %.3f", c, chi2Crit001[9], x)
	}
}

func TestP2CChiSquaredWhenIdle(t *testing.T) {
	seedRand(t, 12)
	eps := endpoints(10)
	pk := picker(t, Config{Algorithm: "p2c"}, eps)
	c := counts(t, pk, eps, 100000)
	if x := chiSquared(c, uniform(10)); x > chi2Crit001[9] {
		t.Errorf("counts %v: want chi2 <= %.3f (df 9), have %.3f", c, chi2Crit001[9], x)
	}
}

func TestP2CPrefersFewerInFlight(t *testing.T) {
	seedRand(t, 13)
	eps := endpoints(5)
	eps[3].InFlight.Store(50)
	pk := picker(t, Config{Algorithm: "p2c"}, eps)
	c := counts(t, pk, eps, 10000)
	// The busy instance loses every pair it is drawn in.
	if c[3] != 0 {
		t.Errorf("busy instance: want 0 picks, have %d (%v)", c[3], c)
	}
	// The others share the traffic evenly: df 3 over the four idle ones.
	idle := []int{c[0], c[1], c[2], c[4]}
	if x := chiSquared(idle, uniform(4)); x > 16.266 {
		t.Errorf("idle instances %v: want chi2 <= 16.266 (df 3), have %.3f", idle, x)
	}
	req := newReq()
	if _, err := pk.Pick(req); err != nil || req.Candidates != 2 || req.Reason != reasonP2C {
		t.Errorf("pick: want candidates 2, reason %q; have %d, %q (err %v)", reasonP2C, req.Candidates, req.Reason, err)
	}
}

func TestP2CSimulatedLoadIsBalanced(t *testing.T) {
	seedRand(t, 14)
	eps := endpoints(20)
	pk := picker(t, Config{Algorithm: "p2c"}, eps)
	req := newReq()
	// Keep 200 requests in flight: each pick adds one, and the oldest
	// finishes.
	var queue []*Endpoint
	for range 20000 {
		e, err := pk.Pick(req)
		if err != nil {
			t.Fatal(err)
		}
		e.InFlight.Add(1)
		queue = append(queue, e)
		if len(queue) > 200 {
			queue[0].InFlight.Add(-1)
			queue = queue[1:]
		}
	}
	lo, hi := int64(math.MaxInt64), int64(0)
	for _, e := range eps {
		v := e.InFlight.Load()
		lo, hi = min(lo, v), max(hi, v)
	}
	// Random choice would typically leave a spread of 10+; p2c keeps it
	// within a few requests.
	if hi-lo > 4 {
		t.Errorf("in flight per instance: want max-min <= 4, have %d..%d", lo, hi)
	}
}

func TestWeightedRandomProportions(t *testing.T) {
	seedRand(t, 15)
	weights := []int{1, 2, 3, 4, 10}
	eps := endpoints(len(weights), weights...)
	pk := picker(t, Config{Algorithm: "weighted_random"}, eps)
	const n = 1_000_000
	c := counts(t, pk, eps, n)
	for i, w := range weights {
		want := float64(n) * float64(w) / 20
		if d := math.Abs(float64(c[i])-want) / want; d > 0.02 {
			t.Errorf("instance %d (weight %d): want %.0f picks ±2%%, have %d (%.2f%% off)", i, w, want, c[i], 100*d)
		}
	}
}

func TestWeightedRandomSkewed(t *testing.T) {
	seedRand(t, 16)
	// One heavy instance among many light ones exercises the alias table's
	// redistribution.
	weights := make([]int, 20)
	for i := range weights {
		weights[i] = 1
	}
	weights[7] = 81
	eps := endpoints(len(weights), weights...)
	pk := picker(t, Config{Algorithm: "weighted_random"}, eps)
	c := counts(t, pk, eps, 200000)
	probs := make([]float64, 20)
	for i, w := range weights {
		probs[i] = float64(w) / 100
	}
	if x := chiSquared(c, probs); x > chi2Crit001[19] {
		t.Errorf("counts %v: want chi2 <= %.3f (df 19), have %.3f", c, chi2Crit001[19], x)
	}
}

func TestWeightedScanAmongUsable(t *testing.T) {
	seedRand(t, 17)
	weights := []int{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 6}
	eps := endpoints(len(weights), weights...)
	// Only the last two are usable: random draws mostly miss, so picks end
	// in the two-pass scan, which must still respect the weights 2:6.
	for _, e := range eps[:10] {
		e.SetBreaker(BreakerOpen, t0.Add(time1m))
	}
	pk := picker(t, Config{Algorithm: "weighted_random"}, eps)
	c := counts(t, pk, eps, 80000)
	for i := range 10 {
		if c[i] != 0 {
			t.Fatalf("open instance %d: want 0 picks, have %d", i, c[i])
		}
	}
	if share := float64(c[11]) / 80000; math.Abs(share-0.75) > 0.01 {
		t.Errorf("weight 6 of 8 among usable: want share 0.75±0.01, have %.4f", share)
	}
}
