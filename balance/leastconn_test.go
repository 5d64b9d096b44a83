package balance

import (
	"math/rand/v2"
	"slices"
	"testing"
)

func TestLeastConnectionsPicksIdle(t *testing.T) {
	seedRand(t, 21)
	eps := endpoints(5)
	for i, v := range []int64{3, 5, 0, 2, 7} {
		eps[i].InFlight.Store(v)
	}
	pk := picker(t, Config{Algorithm: "least_connections"}, eps)
	req := newReq()
	for range 200 {
		e, err := pk.Pick(req)
		if err != nil {
			t.Fatal(err)
		}
		if e != eps[2] {
			t.Fatalf("want the idle instance i2, have %s", e.ID)
		}
	}
	if req.Candidates != 5 || req.Reason != reasonLeastConn || req.Score != 0 {
		t.Errorf("want candidates 5, reason %q, score 0; have %d, %q, %v", reasonLeastConn, req.Candidates, req.Reason, req.Score)
	}
}

func TestLeastConnectionsTiesSpread(t *testing.T) {
	seedRand(t, 22)
	eps := endpoints(8)
	for _, e := range eps[3:7] {
		e.InFlight.Store(5)
	}
	for _, i := range []int{0, 1, 2, 7} {
		eps[i].InFlight.Store(1)
	}
	pk := picker(t, Config{Algorithm: "least_connections"}, eps)
	c := counts(t, pk, eps, 40000)
	tied := []int{c[0], c[1], c[2], c[7]}
	for i := 3; i < 7; i++ {
		if c[i] != 0 {
			t.Errorf("busier instance %d: want 0 picks, have %d", i, c[i])
		}
	}
	// Four tied instances share evenly: df 3, critical 16.266 at p=0.001.
	// Breaking ties by list order would give all picks to i0; taking the
	// first tie after a random start would give i7 five eighths.
	if x := chiSquared(tied, uniform(4)); x > 16.266 {
		t.Errorf("tied instances %v: want chi2 <= 16.266 (df 3), have %.3f", tied, x)
	}
}

func TestLeastConnectionsLargeSample(t *testing.T) {
	seedRand(t, 23)
	eps := endpoints(1000)
	r := rand.New(rand.NewPCG(1, 1))
	vals := make([]int, len(eps))
	for i, e := range eps {
		vals[i] = r.IntN(1000)
		e.InFlight.Store(int64(vals[i]))
	}
	slices.Sort(vals)
	pk := picker(t, Config{Algorithm: "least_connections"}, eps)
	req := newReq()
	var sum int64
	const picks = 5000
	for range picks {
		e, err := pk.Pick(req)
		if err != nil {
			t.Fatal(err)
		}
		sum += e.InFlight.Load()
		if req.Candidates != lcSample || req.Reason != reasonLeastConnSample {
			t.Fatalf("candidates, reason: want %d, %q; have %d, %q", lcSample, reasonLeastConnSample, req.Candidates, req.Reason)
		}
	}
	// The minimum of 8 uniform draws has mean 1/9 of the range (about 111
	// here); a random pick would average about 500.
	if mean := float64(sum) / picks; mean > 135 {
		t.Errorf("mean in-flight of picked instances: want <= 135 (8-sample minimum), have %.1f", mean)
	}
}

func TestLeastConnectionsExactUpTo16(t *testing.T) {
	seedRand(t, 25)
	eps := endpoints(lcExact)
	for _, e := range eps {
		e.InFlight.Store(9)
	}
	eps[lcExact-1].InFlight.Store(8)
	pk := picker(t, Config{Algorithm: "least_connections"}, eps)
	c := counts(t, pk, eps, 500)
	if c[lcExact-1] != 500 {
		t.Errorf("16 instances, one less busy: want it picked every time, have %d of 500", c[lcExact-1])
	}
}

func TestWeightedLeastConnections(t *testing.T) {
	seedRand(t, 24)
	eps := endpoints(3, 1, 3, 6)
	pk := picker(t, Config{Algorithm: "weighted_least_connections"}, eps)
	req := newReq()
	// Requests that never finish: in-flight must grow in proportion to
	// weight, (in flight + 1) / weight staying level.
	for range 1000 {
		e, err := pk.Pick(req)
		if err != nil {
			t.Fatal(err)
		}
		e.InFlight.Add(1)
	}
	for i, w := range []int64{1, 3, 6} {
		want := 100 * w
		if have := eps[i].InFlight.Load(); have < want-6 || have > want+6 {
			t.Errorf("instance %d (weight %d): want about %d in flight, have %d", i, w, want, have)
		}
	}
	// (2+1)/1 = 3 against (5+1)/3 = 2: the heavier, busier one wins.
	eps2 := endpoints(2, 1, 3)
	eps2[0].InFlight.Store(2)
	eps2[1].InFlight.Store(5)
	pk2 := picker(t, Config{Algorithm: "weighted_least_connections"}, eps2)
	if e, _ := pk2.Pick(req); e != eps2[1] {
		t.Errorf("want i1 (score 2 < 3), have %s", e.ID)
	}
	if req.Score != 2 || req.Reason != reasonWeightedLeastConn {
		t.Errorf("want score 2, reason %q; have %v, %q", reasonWeightedLeastConn, req.Score, req.Reason)
	}
}
