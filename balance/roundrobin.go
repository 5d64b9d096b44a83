package balance

import (
	"math"
	"sort"
	"sync/atomic"
	"time"
)

func init() {
	Register("round_robin", func(cfg Config) (Policy, error) {
		return newPolicy("round_robin", cfg, false, func(eps []*Endpoint, _ []uint64, _ time.Time) Picker {
			rr := &roundRobin{eps: eps}
			// A random start keeps sidecars restarted together from all
			// sending their first requests to the first instance.
			rr.next.Store(uint64(randIntN(len(eps))))
			return rr
		}), nil
	})
	Register("weighted_round_robin", func(cfg Config) (Policy, error) {
		return newPolicy("weighted_round_robin", cfg, true, newWeightedRoundRobin), nil
	})
}

// newPolicy returns the common policy of an algorithm; weighted algorithms
// get effective weights (and slow start) passed to build.
func newPolicy(name string, cfg Config, weighted bool, build func([]*Endpoint, []uint64, time.Time) Picker) *policy {
	p := &policy{name: name, decay: cfg.Decay, build: build, weighted: weighted}
	if weighted {
		p.slowStart = cfg.SlowStart
	}
	return p
}

// Reasons reported by the rotation algorithms.
const (
	reasonRotation         = "next in rotation"
	reasonWeightedRotation = "next in weighted rotation"
	reasonScan             = "first usable after a scan"
)

type roundRobin struct {
	eps  []*Endpoint
	next atomic.Uint64
}

func (rr *roundRobin) Pick(req *Request) (*Endpoint, error) {
	n := uint64(len(rr.eps))
	start := (rr.next.Add(1) - 1) % n
	req.Candidates = len(rr.eps)
	req.Score = 0
	i := start
	for range n {
		e := rr.eps[i]
		if req.Usable(e) {
			req.Reason = reasonRotation
			return e, nil
		}
		if i++; i == n {
			i = 0
		}
	}
	return nil, ErrNoneAvailable
}

// maxCycle bounds the length of a weighted round-robin schedule (4 bytes per
// slot). Weights are first divided by their greatest common divisor; if the
// sum is still larger, they are scaled down to sum to maxCycle (largest
// remainder, at least one slot each), so each instance's share is exact to
// within one slot per cycle.
const maxCycle = 1 << 18

// wrrProbe is how many schedule slots a pick walks past unusable instances
// before it falls back to a scan of the endpoint list.
const wrrProbe = 16

// weightedRoundRobin plays a precomputed smooth schedule: one cycle in which
// every instance appears exactly as often as its (reduced) weight. Picks
// index it with an atomic counter.
type weightedRoundRobin struct {
	eps   []*Endpoint
	sched []uint32
	next  atomic.Uint64
}

func newWeightedRoundRobin(eps []*Endpoint, units []uint64, _ time.Time) Picker {
	w := reduceWeights(units, max(maxCycle, len(eps)))
	p := &weightedRoundRobin{eps: eps, sched: edfSchedule(w)}
	p.next.Store(uint64(randIntN(len(p.sched))))
	return p
}

func (p *weightedRoundRobin) Pick(req *Request) (*Endpoint, error) {
	n := uint64(len(p.sched))
	pos := (p.next.Add(1) - 1) % n
	req.Candidates = len(p.eps)
	req.Score = 0
	for range min(n, wrrProbe) {
		e := p.eps[p.sched[pos]]
		if req.Usable(e) {
			req.Reason = reasonWeightedRotation
			return e, nil
		}
		if pos++; pos == n {
			pos = 0
		}
	}
	return scanFrom(p.eps, int(p.sched[pos]), req)
}

// scanFrom returns the first usable endpoint at or after index start
// (wrapping), or ErrNoneAvailable.
func scanFrom(eps []*Endpoint, start int, req *Request) (*Endpoint, error) {
	n := len(eps)
	i := start
	for range n {
		if e := eps[i]; req.Usable(e) {
			req.Reason = reasonScan
			return e, nil
		}
		if i++; i == n {
			i = 0
		}
	}
	return nil, ErrNoneAvailable
}

// reduceWeights divides the weights by their gcd and, if their sum still
// exceeds limit, scales them to sum to about limit (largest remainder, each
// at least 1). The result is a new slice.
func reduceWeights(units []uint64, limit int) []uint64 {
	var g, sum uint64
	for _, u := range units {
		g = gcd(g, u)
	}
	w := make([]uint64, len(units))
	for i, u := range units {
		w[i] = u / g
		sum += w[i]
	}
	if sum <= uint64(limit) {
		return w
	}
	scale := float64(limit) / float64(sum)
	rem := make([]float64, len(w))
	order := make([]int, len(w))
	var got uint64
	for i, x := range w {
		exact := float64(x) * scale
		f := math.Floor(exact)
		rem[i] = exact - f
		if f < 1 {
			f, rem[i] = 1, -1 // already rounded up: no remainder to claim
		}
		w[i] = uint64(f)
		got += w[i]
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return rem[order[a]] > rem[order[b]] })
	for _, i := range order {
		if got >= uint64(limit) || rem[i] <= 0 {
			break
		}
		w[i]++
		got++
	}
	return w
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// edfSchedule returns one cycle of a smooth weighted schedule: sum(w) slots
// in which instance i appears exactly w[i] times.
//
// It is earliest-deadline-first over unit jobs: instance i's k-th job (k from
// 0) is released at k/w[i] of the cycle and due at (k+1)/w[i]; each slot runs
// the released job with the earliest deadline, ties going to the larger
// weight and then to the lower index. Because a job is not released before its
// time, no instance runs ahead of its share: in any stretch of the cycle an
// instance appears within a couple of picks of its proportional count, and its
// longest run is at most one more than the unavoidable
// ceil(w[i] / (sum - w[i])). Cost O(sum × log n).
//
// Times are float64 quotients of integers below 2^32: equal fractions give
// equal floats and distinct ones distinct floats, so the order is exact.
func edfSchedule(w []uint64) []uint32 {
	var total uint64
	for _, x := range w {
		total += x
	}
	k := make([]uint64, len(w)) // jobs done per instance
	ready := edfHeap{a: make([]edfJob, 0, len(w))}
	for i, x := range w {
		ready.push(edfJob{at: 1 / float64(x), w: x, i: int32(i)})
	}
	// Jobs not yet released wait in FIFO buckets by release slot
	// ceil(k*total/w), linked through next.
	head := make([]int32, total)
	tail := make([]int32, total)
	for j := range head {
		head[j], tail[j] = -1, -1
	}
	next := make([]int32, len(w))
	deadline := func(i int32) edfJob {
		return edfJob{at: float64(k[i]+1) / float64(w[i]), w: w[i], i: i}
	}
	sched := make([]uint32, 0, total)
	for j := uint64(0); j < total; j++ {
		for i := head[j]; i >= 0; i = next[i] {
			ready.push(deadline(i))
		}
		if len(ready.a) == 0 {
			// Cannot happen: by slot j, j jobs are done and at least j+1
			// released. Were it to, a shorter cycle is still a valid one.
			break
		}
		i := ready.pop().i
		sched = append(sched, uint32(i))
		k[i]++
		if k[i] == w[i] {
			continue
		}
		r := (k[i]*total + w[i] - 1) / w[i] // release slot of the next job
		if r <= j {
			ready.push(deadline(i))
			continue
		}
		next[i] = -1
		if tail[r] < 0 {
			head[r] = i
		} else {
			next[tail[r]] = i
		}
		tail[r] = i
	}
	return sched
}

// edfJob is an instance's released job; at is its deadline as a fraction of
// the cycle.
type edfJob struct {
	at float64
	w  uint64
	i  int32
}

// edfHeap is a binary min-heap of jobs by deadline, then larger weight, then
// lower index.
type edfHeap struct {
	a []edfJob
}

func (h *edfHeap) less(x, y *edfJob) bool {
	if x.at != y.at {
		return x.at < y.at
	}
	if x.w != y.w {
		return x.w > y.w
	}
	return x.i < y.i
}

func (h *edfHeap) push(x edfJob) {
	h.a = append(h.a, x)
	i := len(h.a) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !h.less(&h.a[i], &h.a[p]) {
			break
		}
		h.a[i], h.a[p] = h.a[p], h.a[i]
		i = p
	}
}

func (h *edfHeap) pop() edfJob {
	top := h.a[0]
	last := len(h.a) - 1
	h.a[0] = h.a[last]
	h.a = h.a[:last]
	i := 0
	for {
		l := 2*i + 1
		if l >= last {
			break
		}
		m := l
		if r := l + 1; r < last && h.less(&h.a[r], &h.a[l]) {
			m = r
		}
		if !h.less(&h.a[m], &h.a[i]) {
			break
		}
		h.a[i], h.a[m] = h.a[m], h.a[i]
		i = m
	}
	return top
}
