// Package balance chooses an instance of an upstream for each request.
//
// A Policy (one per configured algorithm) builds an immutable Picker from the
// endpoints of each discovery update. Pick is called concurrently on the hot
// path: it does not lock, block or allocate. Per-instance state lives in
// Stats, which a Pool keeps across updates for as long as the instance is
// present.
//
// # Choosing an algorithm
//
// An upstream's balance section names one algorithm; the default is p2c.
//
//	balance: {algorithm: least_response_time, decay: 10s}
//	balance: {algorithm: hash, key: "header:x-user", fallback: p2c}
//	balance: {algorithm: weighted_round_robin, slow_start: 30s}
//
// A setting the chosen algorithm does not use is an error, not ignored: key
// belongs to hash, fallback to hash and ip_hash, slow_start to algorithms
// that use weights (for hash, its own table or its fallback). decay and
// slow_start must not be negative.
//
// Every algorithm skips instances it may not use for the request: those
// already tried by an earlier attempt, and those whose circuit breaker is
// open (until its open period has passed, when the instance is a candidate
// again so that the breaker can let a probe through). If no instance is
// usable the pick fails with ErrNoneAvailable. Each pick records, for traces,
// how many instances it chose among (Request.Candidates), why the winner won
// (Request.Reason) and, where the algorithm scores instances, the winning
// score (Request.Score).
//
// Random choices come from math/rand/v2's lock-free per-thread generator.
//
// # round_robin
//
// Takes the instances in turn, each new list starting at a random position
// so that sidecars restarted together do not all begin with the same
// instance. An unusable instance is passed over for the next one. Weights are
// ignored.
//
// # weighted_round_robin
//
// Takes the instances in turn in proportion to their weights, spread out
// rather than in bursts: with weights 1, 2 and 3 every cycle of six requests
// sends exactly one, two and three to them, and none gets two in a row. In
// general an instance's longest run of consecutive turns is at most one more
// than its weight makes unavoidable. The cycle is computed once per
// instance list (earliest-deadline-first, where an instance's k-th turn falls
// due at k/weight of the cycle), so a pick only advances a shared counter.
// Weights are divided by their greatest common divisor; should a cycle still
// exceed 262,144 turns (for example ten thousand instances with weights in
// the hundreds), the weights are scaled down to fit, which keeps every share
// exact to within one turn per cycle. An unusable instance is passed over for
// the next turn in the cycle. Uses slow_start.
//
// # random and weighted_random
//
// random picks uniformly. weighted_random picks in proportion to the weights
// with the alias method (constant time whatever the number of instances).
// After eight draws that hit unusable instances, a pick chooses among the
// usable ones with a scan of the list. weighted_random uses slow_start.
//
// # p2c (default)
//
// Power of two random choices: draws two different instances at random and
// takes the one with fewer requests in flight (either, when equal). It needs
// no shared counter, costs the same for three instances or ten thousand, and
// avoids both the herd effect of always picking the global minimum and the
// blindness of pure random choice. Weights are ignored.
//
// # least_connections and weighted_least_connections
//
// least_connections takes the instance with the fewest requests in flight;
// ties are broken at random, never by position in the list. With up to 16
// instances every instance is compared. With more, a pick compares 8: a run
// of consecutive instances at a random position in an order shuffled when the
// list changes, so that the cost does not grow with the upstream (and memory
// is read sequentially). The winner is then the least loaded of a random
// sample of 8, not necessarily of all: every instance is equally likely to be
// compared, and the chance that the winner is busier than a fraction q of all
// instances is (1-q)^8 (under 2% for q = 40%). If none of the 8 is usable,
// the pick compares every instance.
//
// weighted_least_connections does the same with the score
// (in flight + 1) / weight, so an instance of weight 3 carries three times the
// requests of one of weight 1. Past 16 instances whose weights differ, the
// shuffled order holds each instance about in proportion to its weight (some
// 4 entries per instance, at least one each), so that the 8 compared are
// drawn by weight: drawn uniformly, an instance could win no more than about
// 8/n of the picks, whatever its weight. It uses slow_start.
//
// # least_response_time
//
// Draws two usable instances at random (in proportion to their weights,
// when these differ: drawn uniformly, an instance could win no more than
// about 2/n of the picks, whatever its weight) and takes the lower score
//
//	average response time × (requests in flight + 1) / weight
//
// The average is exponentially decaying in time, with time constant decay
// (default 10s): a sample counts 1 - exp(-Δt/decay), Δt being the time since
// the instance's previous sample, so it follows roughly the last decay worth
// of traffic at any request rate (see Stats.ObserveLatencyAt and DecayOf). An
// instance without a sample yet is scored with the latency of the instance
// it is compared with, or the median of the known averages if neither has
// one, so it competes on requests in flight alone: it is neither flooded nor
// starved. An instance not picked for decay is taken the next time a pick
// draws it, once, so a slow instance is re-measured now and then and can win
// traffic back. Request.Score is the winning score (nanoseconds). Uses
// slow_start.
//
// # hash and ip_hash
//
// Send every request with the same key to the same instance. hash reads the
// key named by key:
//
//	header:NAME   first value of request header NAME (header:host is the Host)
//	cookie:NAME   value of cookie NAME (surrounding quotes removed)
//	query:NAME    first non-empty value of query parameter NAME, as sent
//	              (not unescaped)
//	path          the URL path
//	url           the URL path and query
//
// ip_hash hashes the client address (which the listener resolves, including
// trusted X-Forwarded-For hops); an IPv4 address and its IPv4-mapped IPv6
// form are the same key.
//
// Keys map to instances through a Maglev lookup table, which takes constant
// time per pick, gives each instance a share of keys proportional to its
// weight, and, when an instance joins or leaves a list of N, moves close to
// the minimum 1/N of the keys (measured: about 1% more than the minimum for
// N=10). A hash ring needs a binary search per pick and many virtual nodes to
// even the load; rendezvous hashing compares every instance on every pick.
// The table has 65,537 slots for up to 655 instances, and doubles when the
// list grows past 655, 1,310, 2,621, 5,242 or 10,485 instances (at least 100
// slots per instance, up to about two million); when the list crosses one of
// these sizes most keys move once. The hash function is fixed and the table
// does not depend on the order of the list, so every sidecar that sees the
// same instances maps a key to the same one. If a key's instance is unusable, the
// request goes to the next usable instance in the table, which is the same
// for every request with that key. Requests without the key (or without a
// client address) go to the fallback algorithm, round_robin unless fallback
// names another; the fallback cannot be hash or ip_hash. Uses slow_start.
//
// # Slow start
//
// With slow_start set, a weighted algorithm (weighted_round_robin,
// weighted_random, weighted_least_connections, least_response_time, hash,
// ip_hash and, through it, their fallback) ramps a newly seen instance's
// weight up linearly from 10% to 100% over that window, so a cold instance is
// not sent a full share at once. Pickers are immutable, so Pool.Tick rebuilds
// the picker about once a second while some instance is ramping up, and does
// nothing otherwise. Instances seen together (as at startup) ramp up
// together, which leaves their proportions, and so the picker, unchanged.
//
// # Cost
//
// Picks take constant time whatever the number of instances, except in the
// rare fallbacks noted above (scans when most instances are unusable). Pickers
// are built on every discovery update and, during slow start, once a second:
// that is linear in the number of instances for most algorithms; the
// weighted round-robin cycle and the Maglev table cost tens of milliseconds
// for ten thousand instances (see BENCHMARKS.md).
package balance
