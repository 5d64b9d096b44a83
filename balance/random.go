package balance

import (
	"math"
	"math/bits"
	"time"
)

func init() {
	Register("random", func(cfg Config) (Policy, error) {
		return newPolicy("random", cfg, false, func(eps []*Endpoint, _ []uint64, _ time.Time) Picker {
			return &uniformRandom{eps: eps}
		}), nil
	})
	Register("weighted_random", func(cfg Config) (Policy, error) {
		return newPolicy("weighted_random", cfg, true, newWeightedRandom), nil
	})
}

// randProbe is how many random draws a pick makes before it stops hoping
// to hit a usable instance and scans the list instead.
const randProbe = 8

// Reasons reported by the random algorithms.
const (
	reasonRandom         = "random choice"
	reasonWeightedRandom = "weighted random choice"
	reasonRandomScan     = "random choice among usable after a scan"
)

type uniformRandom struct {
	eps []*Endpoint
}

func (p *uniformRandom) Pick(req *Request) (*Endpoint, error) {
	req.Candidates = len(p.eps)
	req.Score = 0
	for range randProbe {
		if e := p.eps[randIntN(len(p.eps))]; req.Usable(e) {
			req.Reason = reasonRandom
			return e, nil
		}
	}
	return weightedScan(p.eps, nil, req)
}

// weightedScan picks among the usable endpoints with probability
// proportional to units (uniformly when units is nil), in two passes over
// the list. It is the slow path when random draws keep hitting unusable
// instances.
func weightedScan(eps []*Endpoint, units []uint64, req *Request) (*Endpoint, error) {
	var total uint64
	for i, e := range eps {
		if req.Usable(e) {
			total += unitAt(units, i)
		}
	}
	if total == 0 {
		return nil, ErrNoneAvailable
	}
	target, _ := bits.Mul64(randUint64(), total) // uniform in [0, total)
	var last *Endpoint
	for i, e := range eps {
		if !req.Usable(e) {
			continue
		}
		last = e
		u := unitAt(units, i)
		if target < u {
			req.Reason = reasonRandomScan
			return e, nil
		}
		target -= u
	}
	// Availability changed between the passes; any usable one will do.
	if last != nil {
		req.Reason = reasonRandomScan
		return last, nil
	}
	return nil, ErrNoneAvailable
}

func unitAt(units []uint64, i int) uint64 {
	if units == nil {
		return 1
	}
	return units[i]
}

// weightedRandom draws with Vose's alias method: one random number selects a
// column uniformly and, with its remaining bits, either the column's own
// instance or its alias. O(1) per pick, exact proportions up to float64
// rounding.
type weightedRandom struct {
	eps   []*Endpoint
	units []uint64
	slots []aliasSlot
}

type aliasSlot struct {
	// keep is the probability (scaled to 2^64) of taking the column's own
	// instance rather than alias.
	keep  uint64
	alias uint32
}

func newWeightedRandom(eps []*Endpoint, units []uint64, _ time.Time) Picker {
	return &weightedRandom{eps: eps, units: units, slots: newAlias(units)}
}

// newAlias builds the alias table of Vose's method for weights units (all
// positive): draw then picks index i with probability units[i]/sum.
func newAlias(units []uint64) []aliasSlot {
	n := len(units)
	var total float64
	for _, u := range units {
		total += float64(u)
	}
	prob := make([]float64, n)
	small := make([]int, 0, n)
	large := make([]int, 0, n)
	for i, u := range units {
		prob[i] = float64(u) * float64(n) / total
		if prob[i] < 1 {
			small = append(small, i)
		} else {
			large = append(large, i)
		}
	}
	slots := make([]aliasSlot, n)
	for len(small) > 0 && len(large) > 0 {
		s := small[len(small)-1]
		small = small[:len(small)-1]
		l := large[len(large)-1]
		slots[s] = aliasSlot{keep: probToU64(prob[s]), alias: uint32(l)}
		prob[l] -= 1 - prob[s]
		if prob[l] < 1 {
			large = large[:len(large)-1]
			small = append(small, l)
		}
	}
	// What remains is 1 up to rounding: always keep.
	for _, i := range large {
		slots[i] = aliasSlot{keep: math.MaxUint64, alias: uint32(i)}
	}
	for _, i := range small {
		slots[i] = aliasSlot{keep: math.MaxUint64, alias: uint32(i)}
	}
	return slots
}

// drawAlias maps the random x to an index of the alias table slots.
func drawAlias(slots []aliasSlot, x uint64) int {
	col, frac := bits.Mul64(x, uint64(len(slots)))
	if frac >= slots[col].keep {
		return int(slots[col].alias)
	}
	return int(col)
}

func probToU64(p float64) uint64 {
	if p <= 0 {
		return 0
	}
	if p >= 1 {
		return math.MaxUint64
	}
	return uint64(p * (1 << 64))
}

func (p *weightedRandom) Pick(req *Request) (*Endpoint, error) {
	req.Candidates = len(p.eps)
	req.Score = 0
	for range randProbe {
		i := drawAlias(p.slots, randUint64())
		if e := p.eps[i]; req.Usable(e) {
			req.Reason = reasonWeightedRandom
			return e, nil
		}
	}
	return weightedScan(p.eps, p.units, req)
}
