package balance

import (
	"math/rand/v2"
	"testing"
)

func TestRoundRobinExact(t *testing.T) {
	seedRand(t, 1)
	eps := endpoints(5)
	pk := picker(t, Config{Algorithm: "round_robin"}, eps)
	req := newReq()
	first, err := pk.Pick(req)
	if err != nil {
		t.Fatal(err)
	}
	if req.Reason != reasonRotation || req.Candidates != 5 {
		t.Errorf("reason, candidates: want %q, 5; have %q, %d", reasonRotation, req.Reason, req.Candidates)
	}
	prev := index(eps, first)
	for i := 1; i < 50; i++ {
		e, _ := pk.Pick(req)
		cur := index(eps, e)
		if want := (prev + 1) % 5; cur != want {
			t.Fatalf("pick %d: want instance %d after %d, have %d", i, want, prev, cur)
		}
		prev = cur
	}
	c := counts(t, pk, eps, 5000)
	for i, n := range c {
		if n != 1000 {
			t.Errorf("instance %d: want exactly 1000 picks, have %d", i, n)
		}
	}
}

func TestRoundRobinRandomStart(t *testing.T) {
	seedRand(t, 2)
	eps := endpoints(4)
	starts := make([]int, 4)
	for range 400 {
		pk := picker(t, Config{Algorithm: "round_robin"}, eps)
		e, _ := pk.Pick(newReq())
		starts[index(eps, e)]++
	}
	if x := chiSquared(starts, uniform(4)); x > 16.266 { // df 3, p=0.001
		t.Errorf("first picks of new pickers %v: want uniform start (chi2 <= 16.27), have chi2 %.2f", starts, x)
	}
}

func index(eps []*Endpoint, e *Endpoint) int {
	for i, x := range eps {
		if x == e {
			return i
		}
	}
	return -1
}

// schedule returns the sequence of instance indices a WRR picker produces.
func wrrSchedule(t *testing.T, weights ...int) ([]int, []*Endpoint, Picker) {
	t.Helper()
	eps := endpoints(len(weights), weights...)
	pk := picker(t, Config{Algorithm: "weighted_round_robin"}, eps)
	w := pk.(*weightedRoundRobin)
	seq := make([]int, len(w.sched))
	req := newReq()
	for i := range seq {
		e, err := pk.Pick(req)
		if err != nil {
			t.Fatal(err)
		}
		seq[i] = index(eps, e)
	}
	return seq, eps, pk
}

// maxRuns returns, per instance, the longest run of consecutive picks in the
// cyclic sequence.
func maxRuns(seq []int, n int) []int {
	runs := make([]int, n)
	L := len(seq)
	for st := range L {
		c := 0
		for c < L && seq[(st+c)%L] == seq[st] {
			c++
		}
		runs[seq[st]] = max(runs[seq[st]], c)
	}
	return runs
}

func TestWeightedRoundRobin123(t *testing.T) {
	seedRand(t, 3)
	seq, eps, pk := wrrSchedule(t, 1, 2, 3)
	if len(seq) != 6 {
		t.Fatalf("cycle length: want 6, have %d (%v)", len(seq), seq)
	}
	// Any six consecutive picks, wherever the cycle starts, are 1:2:3.
	for st := range 6 {
		c := make([]int, 3)
		for k := range 6 {
			c[seq[(st+k)%6]]++
		}
		if c[0] != 1 || c[1] != 2 || c[2] != 3 {
			t.Errorf("window at %d of %v: want counts [1 2 3], have %v", st, seq, c)
		}
	}
	// Nobody twice in a row, even across the cycle boundary.
	for i, r := range maxRuns(seq, 3) {
		if r != 1 {
			t.Errorf("instance %d in %v: want longest run 1, have %d", i, seq, r)
		}
	}
	c := counts(t, pk, eps, 6000)
	if c[0] != 1000 || c[1] != 2000 || c[2] != 3000 {
		t.Errorf("6000 picks: want [1000 2000 3000], have %v", c)
	}
}

func TestWeightedRoundRobinSmooth(t *testing.T) {
	seedRand(t, 4)
	r := rand.New(rand.NewPCG(7, 7))
	for trial := range 150 {
		n := 2 + r.IntN(6)
		ws := make([]int, n)
		total := 0
		for i := range ws {
			ws[i] = 1 + r.IntN(12)
			total += ws[i]
		}
		seq, _, _ := wrrSchedule(t, ws...)
		g := 0
		for _, w := range ws {
			g = int(gcd(uint64(g), uint64(w)))
		}
		if len(seq) != total/g {
			t.Fatalf("weights %v: want cycle %d, have %d", ws, total/g, len(seq))
		}
		c := make([]int, n)
		for _, i := range seq {
			c[i]++
		}
		runs := maxRuns(seq, n)
		for i, w := range ws {
			if c[i] != w/g {
				t.Errorf("trial %d weights %v: instance %d: want %d per cycle, have %d", trial, ws, i, w/g, c[i])
			}
			wi, others := w/g, len(seq)-w/g
			bound := wi // alone: one run of everything
			if others > 0 {
				bound = (wi+others-1)/others + 1 // unavoidable + 1
			}
			if runs[i] > bound {
				t.Errorf("trial %d weights %v seq %v: instance %d: want longest run <= %d, have %d", trial, ws, seq, i, bound, runs[i])
			}
			// In any stretch of L picks, at most L*share + 2.
			for st := range seq {
				k := 0
				for L := 1; L <= len(seq); L++ {
					if seq[(st+L-1)%len(seq)] == i {
						k++
					}
					if lim := float64(L*wi)/float64(len(seq)) + 2; float64(k) > lim {
						t.Fatalf("trial %d weights %v: instance %d has %d of %d picks from %d: want <= %.2f", trial, ws, i, k, L, st, lim)
					}
				}
			}
		}
	}
}

func TestWeightedRoundRobinReducesAndCaps(t *testing.T) {
	seq, _, _ := wrrSchedule(t, 100, 200, 300)
	if len(seq) != 6 {
		t.Errorf("weights 100:200:300: want a cycle of 6 after dividing by the gcd, have %d", len(seq))
	}
	// Ten thousand instances with weights in the hundreds: the cycle is
	// capped and each share stays within one slot of exact.
	r := rand.New(rand.NewPCG(9, 9))
	units := make([]uint64, 10000)
	var sum uint64
	for i := range units {
		units[i] = 1 + r.Uint64N(500)
		sum += units[i]
	}
	w := reduceWeights(units, maxCycle)
	var got uint64
	for i, x := range w {
		got += x
		exact := float64(units[i]) * maxCycle / float64(sum)
		if d := float64(x) - exact; d > 1 || d < -1 || x < 1 {
			t.Fatalf("instance %d: want %.2f±1 (and >= 1) slots, have %d", i, exact, x)
		}
	}
	if got > maxCycle+10000 || got < maxCycle-1 {
		t.Errorf("cycle: want about %d slots, have %d", maxCycle, got)
	}
	sched := edfSchedule(w)
	c := make([]uint64, len(w))
	for _, i := range sched {
		c[i]++
	}
	for i := range w {
		if c[i] != w[i] {
			t.Fatalf("instance %d: want %d slots in the schedule, have %d", i, w[i], c[i])
		}
	}
}

func TestWeightedRoundRobinSkipsUnusable(t *testing.T) {
	seedRand(t, 5)
	eps := endpoints(3, 1, 2, 3)
	pk := picker(t, Config{Algorithm: "weighted_round_robin"}, eps)
	eps[2].SetBreaker(BreakerOpen, t0.Add(time1m))
	c := counts(t, pk, eps, 6000)
	if c[2] != 0 {
		t.Errorf("open instance: want 0 picks, have %d", c[2])
	}
	// The skipped turns go to whoever is next in the cycle; both remaining
	// instances keep receiving traffic.
	if c[0] == 0 || c[1] == 0 || c[0]+c[1] != 6000 {
		t.Errorf("remaining instances: want all 6000 picks spread over both, have %v", c)
	}
}
