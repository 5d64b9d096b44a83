package balance

import (
	"math/bits"
	"math/rand/v2"
)

// randUint64 is the package's single source of randomness. The default,
// math/rand/v2's top-level generator, keeps its state per OS thread in the
// runtime, so it neither locks nor allocates. Tests replace it with a seeded
// generator to make picks deterministic (they must not do so while pickers
// run concurrently).
var randUint64 = rand.Uint64

// randIntN returns a value in [0, n) for n > 0 (multiply-shift reduction: the
// bias is below n/2^64, far under anything a test could observe).
func randIntN(n int) int {
	hi, _ := bits.Mul64(randUint64(), uint64(n))
	return int(hi)
}

// randPair returns two distinct indices in [0, n) for n >= 2 from one draw:
// the high half of r*n picks the first, the low half (uniform within that
// bucket) picks the second among the other n-1.
func randPair(n int) (int, int) {
	hi, lo := bits.Mul64(randUint64(), uint64(n))
	j, _ := bits.Mul64(lo, uint64(n-1))
	i := int(hi)
	k := int(j)
	if k >= i {
		k++
	}
	return i, k
}

// reduce maps a 64-bit hash onto [0, n) without division.
func reduce(h uint64, n int) int {
	hi, _ := bits.Mul64(h, uint64(n))
	return int(hi)
}
