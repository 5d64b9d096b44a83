package balance

import (
	"slices"
	"time"
)

func init() {
	Register("least_response_time", func(cfg Config) (Policy, error) {
		var p *policy
		p = newPolicy("least_response_time", cfg, true, func(eps []*Endpoint, units []uint64, _ time.Time) Picker {
			return newLeastResponseTime(eps, units, p.Decay())
		})
		return p, nil
	})
}

// Reasons reported by least_response_time.
const (
	reasonLRT      = "lower latency score of two random choices"
	reasonLRTOne   = "only usable one of two random choices"
	reasonLRTStale = "re-probe: not picked recently"
	reasonLRTScan  = "lowest latency score after a scan"
)

// markGranularity limits how often a pick rewrites an instance's last-pick
// time, so that a busy instance's Stats are not written on every request.
const markGranularity = int64(time.Millisecond)

// leastResponseTime compares two random usable endpoints by
//
//	score = average latency × (in-flight + 1) / effective weight
//
// and takes the lower. An instance without a latency sample yet is scored
// with the other one's latency (so it competes on in-flight requests alone),
// or with the median latency known when the picker was built if neither has
// one. An instance not picked for stale (the decay constant) is taken as soon
// as a pick draws it, once, so its average is refreshed and none starves.
type leastResponseTime struct {
	eps   []*Endpoint
	units []uint64
	// alias draws the two candidates in proportion to weight when weights
	// differ: drawn uniformly, an instance could win at most about 2/n of
	// the picks, whatever its weight.
	alias []aliasSlot
	prior float64 // ns; median of the known averages at build time, 1 if none
	stale int64   // ns
}

func newLeastResponseTime(eps []*Endpoint, units []uint64, decay time.Duration) *leastResponseTime {
	known := make([]float64, 0, len(eps))
	for _, e := range eps {
		if d, ok := e.Latency(); ok {
			known = append(known, float64(d))
		}
	}
	prior := 1.0
	if len(known) > 0 {
		slices.Sort(known)
		prior = known[len(known)/2]
	}
	p := &leastResponseTime{eps: eps, units: units, prior: prior, stale: int64(decay)}
	if len(units) > 1 && !slices.Equal(units, slices.Repeat(units[:1], len(units))) {
		p.alias = newAlias(units)
	}
	return p
}

// pair draws two distinct indexes: uniformly, or by weight with alias.
func (p *leastResponseTime) pair(n int) (int, int) {
	if p.alias == nil {
		return randPair(n)
	}
	i := drawAlias(p.alias, randUint64())
	for range 3 {
		if j := drawAlias(p.alias, randUint64()); j != i {
			return i, j
		}
	}
	// One instance holds most of the weight: its rival is any other.
	j := randIntN(n - 1)
	if j >= i {
		j++
	}
	return i, j
}

func latencyOf(e *Endpoint) (float64, bool) {
	d, ok := e.Latency()
	return float64(d), ok
}

func (p *leastResponseTime) score(lat float64, e *Endpoint, i int) float64 {
	return lat * float64(inflightOf(e)+1) * rampSteps / float64(p.units[i])
}

// claimStale reports whether e has not been picked for p.stale and this pick
// is the one that re-probes it (a compare-and-swap, so concurrent picks do
// not all pile onto it).
func (p *leastResponseTime) claimStale(e *Endpoint, now int64) bool {
	if now <= 0 {
		return false
	}
	last := e.lastPick.Load()
	return now-last >= p.stale && e.lastPick.CompareAndSwap(last, now)
}

func mark(e *Endpoint, now int64) {
	if now > 0 && now-e.lastPick.Load() >= markGranularity {
		e.lastPick.Store(now)
	}
}

func (p *leastResponseTime) Pick(req *Request) (*Endpoint, error) {
	n := len(p.eps)
	if n == 1 {
		e := p.eps[0]
		req.Candidates = 1
		if !req.Usable(e) {
			return nil, ErrNoneAvailable
		}
		lat, ok := latencyOf(e)
		if !ok {
			lat = p.prior
		}
		req.Score = p.score(lat, e, 0)
		req.Reason = reasonLRTOne
		mark(e, req.Now)
		return e, nil
	}
	req.Candidates = 2
	for range p2cProbe {
		i, j := p.pair(n)
		a, b := p.eps[i], p.eps[j]
		ua, ub := req.Usable(a), req.Usable(b)
		if !ua && !ub {
			continue
		}
		if !ua || !ub {
			if !ua {
				a, i = b, j
			}
			lat, ok := latencyOf(a)
			if !ok {
				lat = p.prior
			}
			req.Score = p.score(lat, a, i)
			req.Reason = reasonLRTOne
			mark(a, req.Now)
			return a, nil
		}
		la, oka := latencyOf(a)
		lb, okb := latencyOf(b)
		switch {
		case !oka && !okb:
			la, lb = p.prior, p.prior
		case !oka:
			la = lb
		case !okb:
			lb = la
		}
		if p.claimStale(a, req.Now) {
			req.Score = p.score(la, a, i)
			req.Reason = reasonLRTStale
			return a, nil
		}
		if p.claimStale(b, req.Now) {
			req.Score = p.score(lb, b, j)
			req.Reason = reasonLRTStale
			return b, nil
		}
		sa, sb := p.score(la, a, i), p.score(lb, b, j)
		if sb < sa {
			a, sa = b, sb
		}
		req.Score = sa
		req.Reason = reasonLRT
		mark(a, req.Now)
		return a, nil
	}
	return p.scan(req)
}

// scan is the slow path when random pairs keep hitting unusable instances:
// the lowest score among all usable endpoints.
func (p *leastResponseTime) scan(req *Request) (*Endpoint, error) {
	var best *Endpoint
	var bestScore float64
	seen := 0
	for i, e := range p.eps {
		if !req.Usable(e) {
			continue
		}
		seen++
		lat, ok := latencyOf(e)
		if !ok {
			lat = p.prior
		}
		if s := p.score(lat, e, i); best == nil || s < bestScore {
			best, bestScore = e, s
		}
	}
	req.Candidates = seen
	if best == nil {
		return nil, ErrNoneAvailable
	}
	req.Score = bestScore
	req.Reason = reasonLRTScan
	mark(best, req.Now)
	return best, nil
}
