package balance

import (
	"math"
	"math/bits"
	"slices"
	"time"
)

func init() {
	Register("least_connections", func(cfg Config) (Policy, error) {
		return newPolicy("least_connections", cfg, false, func(eps []*Endpoint, _ []uint64, _ time.Time) Picker {
			return newLeastConn(eps, nil)
		}), nil
	})
	Register("weighted_least_connections", func(cfg Config) (Policy, error) {
		return newPolicy("weighted_least_connections", cfg, true, func(eps []*Endpoint, units []uint64, _ time.Time) Picker {
			return newLeastConn(eps, units)
		}), nil
	})
	Register("p2c", func(cfg Config) (Policy, error) {
		return newPolicy("p2c", cfg, false, func(eps []*Endpoint, _ []uint64, _ time.Time) Picker {
			return &p2c{eps: eps, all: leastConn{eps: eps, stats: statsOf(eps)}}
		}), nil
	})
}

// least_connections compares every instance when there are at most lcExact.
// With more, it compares lcSample instances: a window of consecutive entries,
// at a random position, in an order shuffled when the picker is built (so
// that a window is a random group, unrelated to the order of discovery, while
// the scan still reads memory sequentially). A pick's cost therefore does not
// grow with the upstream, at the price of choosing the least loaded of 8
// rather than of all: every instance is equally likely to be compared, and
// the winner is busier than a fraction q of all instances with probability
// (1-q)^8 (under 2% for q = 40%).
const (
	lcExact  = 16
	lcSample = 8
)

// p2cProbe is how many random pairs p2c draws before it falls back to a scan
// when it keeps drawing unusable instances.
const p2cProbe = 4

// Reasons reported by the in-flight algorithms.
const (
	reasonLeastConn         = "fewest in-flight requests"
	reasonLeastConnSample   = "fewest in-flight requests in a random sample of 8"
	reasonWeightedLeastConn = "fewest in-flight requests per weight"
	reasonWeightedLCSample  = "fewest in-flight requests per weight in a random sample of 8"
	reasonP2C               = "fewer in-flight requests of two random choices"
	reasonP2COne            = "only usable one of two random choices"
	reasonP2CScan           = "fewest in-flight requests after a scan"
)

// randBits hands out several bounded random numbers from few 64-bit draws:
// each intN consumes about log2(n) bits from the top of the current draw and
// a fresh draw is taken when fewer than 8 spare bits would remain.
type randBits struct {
	x    uint64
	left int // bits of x not yet consumed
}

func newRandBits() randBits { return randBits{x: randUint64(), left: 64} }

func (r *randBits) intN(n int) int {
	need := bits.Len64(uint64(n))
	if r.left-need < 8 {
		r.x, r.left = randUint64(), 64
	}
	r.left -= need
	hi, lo := bits.Mul64(r.x, uint64(n))
	r.x = lo
	return int(hi)
}

func inflightOf(e *Endpoint) uint64 {
	v := e.InFlight.Load()
	if v < 0 {
		return 0
	}
	return uint64(v)
}

// leastConn picks the usable endpoint with the fewest in-flight requests
// (units == nil) or the lowest (in-flight+1)/weight: exactly among all
// endpoints when there are at most lcExact, otherwise among a window of
// lcSample (see lcSample; falling back to a scan of all if none in the window
// is usable). Ties are broken uniformly at random.
type leastConn struct {
	// eps, stats and units are parallel; for large lists in a shuffled order.
	eps   []*Endpoint
	stats []*Stats // eps[i].Stats, saving a memory access per instance
	units []uint64
	// instances is how many there are (eps may repeat them, see
	// weightedRing).
	instances int
}

func newLeastConn(eps []*Endpoint, units []uint64) *leastConn {
	n := len(eps)
	p := &leastConn{eps: eps, units: units, instances: n}
	if n > lcExact {
		order := shuffled(n)
		if units != nil && !slices.Equal(units, slices.Repeat(units[:1], n)) {
			// Weights differ: in a list where each instance appears once,
			// a window would let one win at most about lcSample/n of the
			// picks, whatever its weight. Each appears in proportion to
			// its weight instead, so that windows sample by weight.
			order = weightedRing(units)
		}
		p.eps = make([]*Endpoint, len(order))
		if units != nil {
			p.units = make([]uint64, len(order))
		}
		for i, j := range order {
			p.eps[i] = eps[j]
			if units != nil {
				p.units[i] = units[j]
			}
		}
	}
	p.stats = statsOf(p.eps)
	return p
}

// weightedRing returns indexes of units in a random order, each repeated in
// proportion to its weight over about 4 entries per instance (at most
// 65,536 in all, at least one per instance, so an instance of tiny relative
// weight is sampled a little more often than its weight says).
func weightedRing(units []uint64) []int {
	n := len(units)
	var total float64
	for _, u := range units {
		total += float64(u)
	}
	size := max(n, min(4*n, 1<<16))
	per := total / float64(size)
	ring := make([]int, 0, size+n)
	for i, u := range units {
		for range max(1, int(math.Round(float64(u)/per))) {
			ring = append(ring, i)
		}
	}
	for i := len(ring) - 1; i > 0; i-- {
		j := randIntN(i + 1)
		ring[i], ring[j] = ring[j], ring[i]
	}
	return ring
}

// shuffled returns a random permutation of [0, n).
func shuffled(n int) []int {
	perm := make([]int, n)
	for i := range perm {
		perm[i] = i
	}
	for i := n - 1; i > 0; i-- {
		j := randIntN(i + 1)
		perm[i], perm[j] = perm[j], perm[i]
	}
	return perm
}

func statsOf(eps []*Endpoint) []*Stats {
	out := make([]*Stats, len(eps))
	for i, e := range eps {
		out[i] = e.Stats
	}
	return out
}

func (p *leastConn) Pick(req *Request) (*Endpoint, error) {
	n := len(p.eps)
	rb := newRandBits()
	start := rb.intN(n)
	window := min(n, lcExact)
	if n > lcExact {
		window = lcSample
	}
	i, score := p.window(start, window, &rb, req)
	seen := window
	if i < 0 && window < n {
		// Nothing usable in the window: look at everything.
		b, _ := p.scan(start, n, &rb, req)
		req.Candidates = p.instances
		if b.e == nil {
			return nil, ErrNoneAvailable
		}
		req.Score = b.score(p.units != nil)
		req.Reason = reasonLeastConn
		if p.units != nil {
			req.Reason = reasonWeightedLeastConn
		}
		return b.e, nil
	}
	req.Candidates = seen
	if i < 0 {
		return nil, ErrNoneAvailable
	}
	req.Score = score
	sampled := window < n
	switch {
	case p.units == nil && !sampled:
		req.Reason = reasonLeastConn
	case p.units == nil:
		req.Reason = reasonLeastConnSample
	case !sampled:
		req.Reason = reasonWeightedLeastConn
	default:
		req.Reason = reasonWeightedLCSample
	}
	return p.eps[i], nil
}

// window compares count (at most lcExact) endpoints from start and returns
// the index of the best usable one (-1 if none) and its score. It works in
// two passes, first the scores and their minimum, then a uniform choice
// among the ties, which avoids a hard-to-predict branch per instance. Scores
// are float64: in-flight counts are exact, and (in-flight+1)/units are
// correctly rounded quotients of small integers, so equal fractions compare
// equal and different ones differ.
func (p *leastConn) window(start, count int, rb *randBits, req *Request) (int, float64) {
	var scores [lcExact]float64
	n := len(p.eps)
	lo := math.Inf(1)
	i := start
	for k := range count {
		sc := math.Inf(1)
		if e, s := p.eps[i], p.stats[i]; req.usable(e, s) {
			sc = float64(max(s.InFlight.Load(), 0))
			if p.units != nil {
				sc = (sc + 1) / float64(p.units[i])
			}
		}
		scores[k] = sc
		lo = min(lo, sc)
		if i++; i == n {
			i = 0
		}
	}
	if math.IsInf(lo, 1) {
		return -1, 0
	}
	ties := 0
	for _, sc := range scores[:count] {
		if sc == lo {
			ties++
		}
	}
	pick := 0
	if ties > 1 {
		pick = rb.intN(ties)
	}
	k := 0
	for ; ; k++ {
		if scores[k] == lo {
			if pick == 0 {
				break
			}
			pick--
		}
	}
	if i = start + k; i >= n {
		i -= n
	}
	if p.units != nil {
		lo *= rampSteps // in units of configured weight
	}
	return i, lo
}

// scan offers count endpoints from start (wrapping) and returns the best and
// how many were looked at; the streaming form of window, for any count.
func (p *leastConn) scan(start, count int, rb *randBits, req *Request) (lcBest, int) {
	var b lcBest
	n := len(p.eps)
	i := start
	for range count {
		if e, s := p.eps[i], p.stats[i]; req.usable(e, s) {
			b.offer(e, s, p.units, i, rb)
		}
		if i++; i == n {
			i = 0
		}
	}
	return b, count
}

// lcBest tracks the best endpoint offered so far. Scores are fractions
// num/den compared exactly: (in-flight+1)/units when weighted, otherwise
// in-flight/1.
type lcBest struct {
	e        *Endpoint
	num, den uint64
	ties     int
}

func (b *lcBest) offer(e *Endpoint, s *Stats, units []uint64, i int, rb *randBits) {
	num, den := uint64(max(s.InFlight.Load(), 0)), uint64(1)
	if units != nil {
		num, den = num+1, units[i]
	}
	if b.e == nil {
		b.e, b.num, b.den, b.ties = e, num, den, 1
		return
	}
	l, r := num*b.den, b.num*den
	if l < r {
		b.e, b.num, b.den, b.ties = e, num, den, 1
	} else if l == r {
		// Reservoir sampling: the k-th tie replaces the choice with
		// probability 1/k.
		b.ties++
		if rb.intN(b.ties) == 0 {
			b.e = e
		}
	}
}

// score is the winner's in-flight count, or (in-flight+1)/weight.
func (b *lcBest) score(weighted bool) float64 {
	if weighted {
		return float64(b.num) * rampSteps / float64(b.den)
	}
	return float64(b.num)
}

// p2c draws two distinct endpoints at random and takes the one with fewer
// in-flight requests (either on a tie: the draw order is random).
type p2c struct {
	eps []*Endpoint
	all leastConn // for the scan when random pairs keep hitting unusable ones
}

func (p *p2c) Pick(req *Request) (*Endpoint, error) {
	n := len(p.eps)
	if n == 1 {
		e := p.eps[0]
		req.Candidates = 1
		if !req.Usable(e) {
			return nil, ErrNoneAvailable
		}
		req.Score = float64(inflightOf(e))
		req.Reason = reasonP2COne
		return e, nil
	}
	req.Candidates = 2
	for range p2cProbe {
		i, j := randPair(n)
		a, b := p.eps[i], p.eps[j]
		ua, ub := req.Usable(a), req.Usable(b)
		switch {
		case ua && ub:
			fa, fb := inflightOf(a), inflightOf(b)
			if fb < fa {
				a, fa = b, fb
			}
			req.Score = float64(fa)
			req.Reason = reasonP2C
			return a, nil
		case ua:
			req.Score = float64(inflightOf(a))
			req.Reason = reasonP2COne
			return a, nil
		case ub:
			req.Score = float64(inflightOf(b))
			req.Reason = reasonP2COne
			return b, nil
		}
	}
	rb := newRandBits()
	b, _ := p.all.scan(rb.intN(n), n, &rb, req)
	req.Candidates = n
	if b.e == nil {
		return nil, ErrNoneAvailable
	}
	req.Score = b.score(false)
	req.Reason = reasonP2CScan
	return b.e, nil
}
