package resilience

import (
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// Reasons returned by RetryDecision when it declines a retry. When it allows
// one, the reason is the matching condition of RetryConfig.On instead
// ("connect-failure", "reset", "timeout", "5xx", or a status such as "503").
const (
	NoRetryDisabled    = "disabled"            // retries are turned off
	NoRetryCanceled    = "canceled"            // the caller gave up
	NoRetryCondition   = "not-retriable"       // the outcome matches no condition
	NoRetryMethod      = "non-idempotent"      // reached the upstream with a non-idempotent method
	NoRetryBody        = "body-not-replayable" // the request body cannot be sent again
	NoRetryAttempts    = "attempts-exhausted"  // Attempts tries were made
	NoRetryBudgetSpent = "budget-exhausted"    // the retry budget is spent
)

// RequestStarted counts one incoming request towards the retry budget. Call
// it once per request the forwarder accepts for this upstream (not per try).
// Lock-free.
func (g *Guard) RequestStarted() {
	g.budget.started(g.budget.second(g.now()))
}

// RetryDecision says whether the request should be tried again after its
// try number attempt (1 for the first try) ended with o, and why (a stable
// label for metrics and span events). Checks, in order: retries enabled; not
// canceled; o matches a condition of RetryConfig.On; a request that reached
// the upstream has an idempotent method (or RetryNonIdempotent is set); the
// body can be sent again (bodyReplayable: no body, or a buffered one);
// attempt < Attempts; and last the retry budget, of which an allowed retry
// consumes one token. Safe for concurrent use; only the budget check takes a
// short lock.
//
// The forwarder must still not retry once it has written any part of the
// response to its caller, nor once the whole-request budget has run out; a
// retry should go to another instance (balance.Request.Exclude), after
// Backoff(attempt). A breaker rejection is not a try and needs no decision.
func (g *Guard) RetryDecision(method string, attempt int, o Outcome, bodyReplayable bool) (retry bool, cause string) {
	c := g.cfg.Load()
	r := &c.cfg.Retry
	if r.Disabled {
		return false, NoRetryDisabled
	}
	if o.Canceled() {
		return false, NoRetryCanceled
	}
	cause = c.retryCause(o)
	if cause == "" {
		return false, NoRetryCondition
	}
	if o.ReachedUpstream() && !r.RetryNonIdempotent && !c.idempotent(method) {
		return false, NoRetryMethod
	}
	if !bodyReplayable {
		return false, NoRetryBody
	}
	if attempt >= r.Attempts {
		return false, NoRetryAttempts
	}
	if !g.budget.withdraw(g.now, r.BudgetPercent, r.BudgetMinPerSecond) {
		return false, NoRetryBudgetSpent
	}
	return true, cause
}

// retryCause returns the condition of RetryConfig.On that o matches, or "".
func (c *compiled) retryCause(o Outcome) string {
	switch o.Kind() {
	case KindConnect:
		if c.onConnect {
			return OnConnectFailure
		}
	case KindReset:
		if c.onReset {
			return OnReset
		}
	case KindTimeout:
		if c.onTimeout {
			return OnTimeout
		}
	case KindNone:
		s := o.Status
		if s > 0 && s < len(c.statusCause) && c.statusCause[s] != "" {
			return c.statusCause[s]
		}
		if c.on5xx && s >= 500 && s <= 599 {
			return On5xx
		}
	}
	return ""
}

// Backoff returns the pause before the retry that follows try number attempt
// (1 for the first try): a uniformly random duration in
// [0, min(BackoffMax, BackoffBase·2^(attempt-1))), "full jitter". It is 0
// when BackoffBase is 0. Safe for concurrent use.
func (g *Guard) Backoff(attempt int) time.Duration {
	r := &g.cfg.Load().cfg.Retry
	if r.BackoffBase <= 0 || r.BackoffMax <= 0 {
		return 0
	}
	if attempt < 1 {
		attempt = 1
	}
	upper := r.BackoffMax
	if shift := attempt - 1; shift < 62 {
		if grown := r.BackoffBase << shift; grown>>shift == r.BackoffBase && grown > 0 && grown < upper {
			upper = grown
		}
	}
	return time.Duration(g.randN(int64(upper)))
}

// budgetBuckets is the retry budget's window in seconds (one bucket each).
const budgetBuckets = 10

// budget limits retries to a share of recent requests plus a minimum per
// second. Requests are counted lock-free in per-second buckets; retry
// withdrawals are serialised by mu, which makes the bound exact: within any
// window of budgetBuckets seconds, retries ≤ percent × requests + one
// minimum allowance per second.
type budget struct {
	epoch time.Time
	// reqs[s % budgetBuckets] packs the second s (high 32 bits) and the
	// number of requests started in it (low 32 bits).
	reqs [budgetBuckets]atomic.Uint64

	mu     sync.Mutex
	pct    [budgetBuckets]budgetSlot // retries charged to the percentage
	minSec uint32                    // second of minN
	minN   int                       // retries charged to the minimum in minSec
}

type budgetSlot struct{ sec, n uint32 }

// second numbers the seconds since epoch from 1, so that 0 marks an unused
// bucket.
func (b *budget) second(now time.Time) uint32 {
	d := now.Sub(b.epoch)
	if d < 0 {
		return 1
	}
	s := int64(d/time.Second) + 1
	if s > math.MaxUint32 {
		s = math.MaxUint32
	}
	return uint32(s)
}

func inWindow(tag, sec uint32) bool {
	return tag != 0 && tag <= sec && sec-tag < budgetBuckets
}

func (b *budget) started(sec uint32) {
	p := &b.reqs[sec%budgetBuckets]
	for {
		old := p.Load()
		tag, n := uint32(old>>32), uint32(old)
		var next uint64
		switch {
		case tag >= sec: // this second (or a later one, for a late caller)
			if n == math.MaxUint32 {
				return
			}
			next = old + 1
		default: // the bucket still holds an older second
			next = uint64(sec)<<32 | 1
		}
		if p.CompareAndSwap(old, next) {
			return
		}
	}
}

// withdraw reads the clock under the lock so that seconds never go backwards
// between withdrawals.
func (b *budget) withdraw(now func() time.Time, percent float64, minPerSecond int) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	sec := b.second(now())
	var reqs, retries uint64
	for i := range b.reqs {
		v := b.reqs[i].Load()
		if inWindow(uint32(v>>32), sec) {
			reqs += uint64(uint32(v))
		}
	}
	for _, s := range b.pct {
		if inWindow(s.sec, sec) {
			retries += uint64(s.n)
		}
	}
	if float64(retries+1)*100 <= percent*float64(reqs) {
		slot := &b.pct[sec%budgetBuckets]
		if slot.sec < sec {
			*slot = budgetSlot{sec: sec}
		}
		slot.n++
		return true
	}
	if b.minSec < sec {
		b.minSec, b.minN = sec, 0
	}
	if b.minN < minPerSecond {
		b.minN++
		return true
	}
	return false
}
