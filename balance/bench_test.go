package balance

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

var benchSizes = []int{3, 100, 10000}

// benchEndpoints makes n endpoints with varied weights, in-flight counts and
// latencies, all recently picked.
func benchEndpoints(n int) []*Endpoint {
	eps := endpoints(n)
	for i, e := range eps {
		e.Weight = 1 + i%5
		e.InFlight.Store(int64(i % 7))
		e.ObserveLatency(time.Duration(1+i%10)*time.Millisecond, 1)
		e.MarkPicked(t0.UnixNano())
	}
	return eps
}

// BenchmarkPick measures Pick for every algorithm, list size, and serial or
// parallel callers. Requests rotate over 64 distinct hash keys and client
// addresses; each goroutine has its own requests.
func BenchmarkPick(b *testing.B) {
	for _, cfg := range algorithmCases {
		b.Run(cfg.Algorithm, func(b *testing.B) {
			for _, n := range benchSizes {
				b.Run(fmt.Sprintf("n=%d", n), func(b *testing.B) {
					pk := picker(b, cfg, benchEndpoints(n))
					// Enough request sets for any number of goroutines
					// RunParallel starts on this machine.
					sets := make([][]*Request, 64)
					for i := range sets {
						sets[i] = keyedRequests(64)
					}
					b.Run("serial", func(b *testing.B) {
						reqs := sets[0]
						b.ReportAllocs()
						i := 0
						for b.Loop() {
							if _, err := pk.Pick(reqs[i&63]); err != nil {
								b.Fatal(err)
							}
							i++
						}
					})
					b.Run("parallel", func(b *testing.B) {
						var next atomic.Int64
						b.ReportAllocs()
						b.RunParallel(func(pb *testing.PB) {
							reqs := sets[int(next.Add(1)-1)%len(sets)]
							i := 0
							for pb.Next() {
								if _, err := pk.Pick(reqs[i&63]); err != nil {
									b.Error(err)
									return
								}
								i++
							}
						})
					})
				})
			}
		})
	}
}

// BenchmarkBuild measures building a picker (done on every discovery update,
// and about once a second per upstream while an instance is in slow start).
func BenchmarkBuild(b *testing.B) {
	for _, cfg := range algorithmCases {
		for _, n := range benchSizes {
			b.Run(fmt.Sprintf("%s/n=%d", cfg.Algorithm, n), func(b *testing.B) {
				eps := benchEndpoints(n)
				for i, e := range eps {
					e.Weight = 1 + i%300
				}
				tp := mustPolicy(b, cfg).(TimedPolicy)
				b.ReportAllocs()
				for b.Loop() {
					tp.NewPickerAt(eps, t0)
				}
			})
		}
	}
}
