package balance

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/meshd/meshd/discovery"
)

// t0 is the fixed "now" of tests.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// seedRand makes the package's randomness deterministic for one test.
func seedRand(t testing.TB, seed uint64) {
	t.Helper()
	old := randUint64
	randUint64 = rand.New(rand.NewPCG(seed, seed^0x5bd1e995)).Uint64
	t.Cleanup(func() { randUint64 = old })
}

// endpoints makes n endpoints with IDs "i0".."i(n-1)"; weights, if given,
// are applied in order.
func endpoints(n int, weights ...int) []*Endpoint {
	eps := make([]*Endpoint, n)
	for i := range eps {
		w := 1
		if i < len(weights) {
			w = weights[i]
		}
		eps[i] = &Endpoint{
			Instance: discovery.Instance{ID: fmt.Sprintf("i%d", i), Address: fmt.Sprintf("10.0.%d.%d:80", i/250, i%250), Weight: w},
			Stats:    &Stats{},
		}
	}
	return eps
}

func mustPolicy(t testing.TB, cfg Config) Policy {
	t.Helper()
	p, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%+v): want no error, have %v", cfg, err)
	}
	return p
}

// builtPolicy is mustPolicy without New's refusal of settings the
// algorithm ignores, for tests of how the ignoring works.
func builtPolicy(t testing.TB, cfg Config) Policy {
	t.Helper()
	p, err := build(cfg)
	if err != nil {
		t.Fatalf("build(%+v): want no error, have %v", cfg, err)
	}
	return p
}

// picker builds a picker for eps at t0.
func picker(t testing.TB, cfg Config, eps []*Endpoint) Picker {
	t.Helper()
	p := mustPolicy(t, cfg)
	if tp, ok := p.(TimedPolicy); ok {
		return tp.NewPickerAt(eps, t0)
	}
	return p.NewPicker(eps)
}

func newReq() *Request { return &Request{Now: t0.UnixNano()} }

// counts picks n times with a fresh request each time and returns how often
// each endpoint (by index) was chosen.
func counts(t testing.TB, pk Picker, eps []*Endpoint, n int) []int {
	t.Helper()
	idx := make(map[*Endpoint]int, len(eps))
	for i, e := range eps {
		idx[e] = i
	}
	out := make([]int, len(eps))
	req := newReq()
	for range n {
		e, err := pk.Pick(req)
		if err != nil {
			t.Fatalf("Pick: want an endpoint, have error %v", err)
		}
		i, ok := idx[e]
		if !ok {
			t.Fatalf("Pick returned an endpoint not in the list: %v", e.ID)
		}
		out[i]++
	}
	return out
}

// chiSquared returns the statistic of observed counts against expected
// probabilities.
func chiSquared(obs []int, probs []float64) float64 {
	total := 0
	for _, o := range obs {
		total += o
	}
	var x float64
	for i, o := range obs {
		e := probs[i] * float64(total)
		d := float64(o) - e
		x += d * d / e
	}
	return x
}

func uniform(n int) []float64 {
	p := make([]float64, n)
	for i := range p {
		p[i] = 1 / float64(n)
	}
	return p
}

// Critical values of the chi-squared distribution at significance 0.001
// (a correct implementation fails with probability 1/1000 per seed; the
// seeds are fixed, so the tests are deterministic).
var chi2Crit001 = map[int]float64{
	4:  18.467,
	7:  24.322,
	9:  27.877,
	19: 43.820,
}

const time1m = time.Minute
