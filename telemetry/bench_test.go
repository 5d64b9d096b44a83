package telemetry

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// discardProcessor drops ended spans, so benchmarks measure meshd's span
// building and the SDK, not a recorder's growing slice.
type discardProcessor struct{}

func (discardProcessor) OnStart(context.Context, sdktrace.ReadWriteSpan) {}
func (discardProcessor) OnEnd(sdktrace.ReadOnlySpan)                     {}
func (discardProcessor) Shutdown(context.Context) error                  { return nil }
func (discardProcessor) ForceFlush(context.Context) error                { return nil }

func benchProviders(b *testing.B) map[string]*Provider {
	b.Helper()
	zero, one, pct := 0.0, 1.0, 0.01
	mk := func(cfg Config, sp sdktrace.SpanProcessor) *Provider {
		p, err := setup(context.Background(), cfg, nil, sp)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = p.Shutdown(context.Background()) })
		return p
	}
	return map[string]*Provider{
		"recording": mk(Config{Exporter: ExporterNone, SampleRatio: &one}, discardProcessor{}),
		"unsampled": mk(Config{Exporter: ExporterNone, SampleRatio: &zero}, discardProcessor{}),
		"root-1pct": mk(Config{Exporter: ExporterNone, SampleRatio: &pct}, discardProcessor{}),
		"off":       mk(Config{Exporter: ExporterNone}, nil),
	}
}

// BenchmarkRequestSpans is the forwarding path of one request with one
// attempt: server span, client span with routing attributes and header
// injection, both ended. "unsampled" continues a caller's trace that the
// caller chose not to sample; "root-1pct" starts a trace for a request that
// came without one, sampling 1% of them, as most sidecars run.
func BenchmarkRequestSpans(b *testing.B) {
	providers := benchProviders(b)
	for _, name := range []string{"recording", "unsampled", "root-1pct", "off"} {
		p := providers[name]
		b.Run(name, func(b *testing.B) {
			in := httptest.NewRequest(http.MethodGet, "/orders?id=7", nil)
			in.Host = "payments.mesh:9191"
			in.RemoteAddr = "127.0.0.1:50000"
			flags := "01"
			if name == "unsampled" {
				flags = "00" // the caller decided not to sample
			}
			if name != "root-1pct" {
				in.Header.Set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-"+flags)
			}
			out, _ := http.NewRequest(http.MethodGet, "http://127.0.0.1:9001/orders?id=7", nil)
			a := Attempt{Upstream: "payments", Algorithm: "least_request", InstanceID: "n1/p1",
				InstanceAddr: "127.0.0.1:9001", Candidates: 3, Reason: "fewest in flight", Breaker: "closed"}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				ctx, srv := p.StartServer(context.Background(), in, "payments")
				_, cl := p.StartAttempt(ctx, out, a)
				EndAttempt(cl, 200, "")
				EndServer(srv, 200, "")
			}
		})
	}
}

func BenchmarkRequestDone(b *testing.B) {
	p, err := NewTestProvider(nil, Config{})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Shutdown(context.Background())
	m := p.Metrics
	m.RequestDone("payments", "n1/p1", "", "GET", 200, time.Millisecond, "")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			m.InFlight("payments", 1)
			m.RequestDone("payments", "n1/p1", "", "GET", 200, 3*time.Millisecond, "")
			m.ServerRequestDone("payments", "GET", 200, "", 3*time.Millisecond)
			m.InFlight("payments", -1)
		}
	})
}

func BenchmarkAccessLog(b *testing.B) {
	l, err := NewLogger(io.Discard, "json", "info")
	if err != nil {
		b.Fatal(err)
	}
	a := Access{Upstream: "payments", Instance: "n1/p1", Method: "GET", Path: "/orders", Status: 200,
		Duration: 3 * time.Millisecond, Attempts: 1, Bytes: 512}
	b.ReportAllocs()
	for b.Loop() {
		AccessLog(l, context.Background(), a)
	}
}
