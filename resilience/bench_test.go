package resilience

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"testing"

	"github.com/meshd/meshd/balance"
)

func benchGuard(b *testing.B) (*Guard, *balance.Stats) {
	g, err := NewGuard("bench", Defaults(), slog.New(slog.DiscardHandler), nil)
	if err != nil {
		b.Fatal(err)
	}
	return g, attach(g, "a")
}

// One admitted try on a closed breaker, from many goroutines on one instance.
func BenchmarkAdmitDone(b *testing.B) {
	g, st := benchGuard(b)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			done, err := g.Admit(st)
			if err != nil {
				b.Fatal(err)
			}
			done(okOutcome)
		}
	})
}

// A rejected try on an open breaker.
func BenchmarkAdmitRejected(b *testing.B) {
	g, st := benchGuard(b)
	for range 5 {
		done, err := g.Admit(st)
		if err != nil {
			b.Fatal(err)
		}
		done(failOutcome)
	}
	if st.Breaker() != balance.BreakerOpen {
		b.Fatal("breaker did not open")
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := g.Admit(st); err == nil {
				b.Fatal("admitted")
			}
		}
	})
}

func BenchmarkClassify(b *testing.B) {
	fc := Defaults().Failure
	ctx := context.Background()
	b.Run("status", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			Classify(ctx, nil, 503, fc)
		}
	})
	b.Run("reset", func(b *testing.B) {
		err := resetOutcome.Err
		b.ReportAllocs()
		for b.Loop() {
			Classify(ctx, err, 0, fc)
		}
	})
	b.Run("eof", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			Classify(ctx, io.ErrUnexpectedEOF, 0, fc)
		}
	})
}

func BenchmarkRequestStarted(b *testing.B) {
	g, _ := benchGuard(b)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			g.RequestStarted()
		}
	})
}

// Decisions that reach the budget (a retriable GET), from many goroutines.
func BenchmarkRetryDecision(b *testing.B) {
	g, _ := benchGuard(b)
	o := status(503)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			g.RequestStarted()
			g.RetryDecision(http.MethodGet, 1, o, true)
		}
	})
}
