package balance

import (
	"testing"
	"time"
)

// loadShare simulates conc requests in flight: each pick adds one to the
// chosen instance, and the oldest open request ends once more than conc
// are open. It returns each instance's share of the picks.
func loadShare(t *testing.T, cfg Config, eps []*Endpoint, conc, picks int) []float64 {
	t.Helper()
	pk := picker(t, cfg, eps)
	var open []*Endpoint
	idx := make(map[*Endpoint]int, len(eps))
	for i, e := range eps {
		idx[e] = i
	}
	got := make([]float64, len(eps))
	for range picks {
		e, err := pk.Pick(newReq())
		if err != nil {
			t.Fatal(err)
		}
		got[idx[e]]++
		e.InFlight.Add(1)
		if open = append(open, e); len(open) > conc {
			open[0].InFlight.Add(-1)
			open = open[1:]
		}
	}
	for i := range got {
		got[i] /= float64(picks)
	}
	return got
}

// Weights count however many instances there are: one instance of weight n
// among n-1 of weight 1 carries about half the load. Past 16 instances
// weighted_least_connections compares a sample, and least_response_time
// always compares two; drawn uniformly, such samples capped the heavy
// instance near 8/n and 2/n of the picks.
func TestHeavyInstanceGetsItsShare(t *testing.T) {
	for _, alg := range []string{"weighted_least_connections", "least_response_time"} {
		for _, n := range []int{17, 100} {
			seedRand(t, uint64(n))
			ws := make([]int, n)
			for i := range ws {
				ws[i] = 1
			}
			ws[0] = n
			eps := endpoints(n, ws...)
			for _, e := range eps {
				e.ObserveLatency(time.Millisecond, 1)
			}
			share := loadShare(t, Config{Algorithm: alg}, eps, 2*n, 40000)
			// Exact least connections gives the heavy one 0.55-0.57 here
			// (the +1 in (in-flight+1)/weight favours it a little).
			if share[0] < 0.45 || share[0] > 0.7 {
				t.Errorf("%s, %d instances: the instance of weight %d got %.3f of the picks, want about half", alg, n, n, share[0])
			}
			for i, s := range share[1:] {
				if s == 0 {
					t.Errorf("%s, %d instances: instance %d of weight 1 never picked", alg, n, i+1)
					break
				}
			}
		}
	}
}

// The ring that makes a window sample by weight holds every instance at
// least once and the rest in proportion.
func TestWeightedRing(t *testing.T) {
	seedRand(t, 7)
	ring := weightedRing([]uint64{1, 1, 1_000_000, 3})
	seen := make([]int, 4)
	for _, i := range ring {
		seen[i]++
	}
	if len(ring) < 4 || len(ring) > 16+4 {
		t.Fatalf("ring of %d for 4 instances: want about 4 per instance", len(ring))
	}
	for i, c := range seen {
		if c == 0 {
			t.Errorf("instance %d missing from the ring", i)
		}
	}
	if seen[2] < len(ring)-4 {
		t.Errorf("the instance of weight 1e6 holds %d of %d entries, want all but the others' one each", seen[2], len(ring))
	}
}
