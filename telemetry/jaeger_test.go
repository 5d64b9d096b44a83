package telemetry_test

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/meshd/meshd/internal/testenv"
	"github.com/meshd/meshd/telemetry"
)

// TestExportToJaeger sends a server span with two attempts (the first
// failed with 503 and was retried) and a breaker event to a real Jaeger over
// OTLP gRPC and OTLP HTTP, and reads the trace back from Jaeger's query API.
func TestExportToJaeger(t *testing.T) {
	j := testenv.StartJaeger(t)
	for _, tc := range []struct{ exporter, endpoint string }{
		{telemetry.ExporterOTLPGRPC, j.OTLPGRPC()},
		{telemetry.ExporterOTLPHTTP, "http://" + j.OTLPHTTP()},
	} {
		t.Run(tc.exporter, func(t *testing.T) {
			service := "meshd-test-" + tc.exporter
			p, err := telemetry.Setup(context.Background(), telemetry.Config{
				ServiceName: service, Exporter: tc.exporter, Endpoint: tc.endpoint, Insecure: true,
			}, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatalf("Setup: %v", err)
			}

			in := httptest.NewRequest(http.MethodGet, "/orders?id=7", nil)
			in.Host = "payments.mesh:9191"
			in.RemoteAddr = "127.0.0.1:50000"
			ctx, srv := p.StartServer(context.Background(), in, "payments")
			telemetry.BreakerRejected(srv, "n3/p3", "open")

			attempt := func(resend int, id, addr string, status int) (spanID string) {
				out, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/orders?id=7", nil)
				if err != nil {
					t.Fatal(err)
				}
				_, span := p.StartAttempt(ctx, out, telemetry.Attempt{
					Upstream: "payments", Algorithm: "least_request", InstanceID: id, InstanceAddr: addr,
					Candidates: 3, Reason: "fewest in flight", Score: 2, HasScore: true, Breaker: "closed",
					ResendCount: resend,
				})
				telemetry.EndAttempt(span, status, "")
				return span.SpanContext().SpanID().String()
			}
			first := attempt(0, "n1/p1", "127.0.0.1:9001", 503)
			telemetry.Retrying(srv, 2, "503", 10*time.Millisecond)
			second := attempt(1, "n2/p2", "127.0.0.1:9002", 200)
			telemetry.EndServer(srv, 200, "")
			traceID := srv.SpanContext().TraceID().String()
			serverID := srv.SpanContext().SpanID().String()

			sctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			if err := p.Shutdown(sctx); err != nil {
				t.Fatalf("Shutdown (flush): %v", err)
			}

			tr := j.WaitTrace(t, traceID, 30*time.Second, func(tr *testenv.JaegerTrace) bool { return len(tr.Spans) >= 3 })
			if len(tr.Spans) != 3 {
				t.Fatalf("spans: want 3, have %d", len(tr.Spans))
			}
			s, ok := tr.Span(serverID)
			if !ok {
				t.Fatalf("server span %s not in trace", serverID)
			}
			if s.OperationName != "GET payments" || s.Kind != "server" || s.ParentSpanID != "" || s.Service != service {
				t.Errorf("server span: want GET payments/server/root/%s, have %s/%s/%q/%s", service, s.OperationName, s.Kind, s.ParentSpanID, s.Service)
			}
			if s.Tags["url.query"] != "id=REDACTED" || s.Tags["http.response.status_code"] != "200" {
				t.Errorf("server tags: want url.query=id=REDACTED and status 200, have %v", s.Tags)
			}
			var sawBreaker, sawRetry bool
			for _, e := range s.Events {
				switch e.Name {
				case telemetry.EventBreakerRejected:
					sawBreaker = e.Fields["meshd.instance.id"] == "n3/p3" && e.Fields["meshd.breaker.state"] == "open"
				case telemetry.EventRetry:
					sawRetry = e.Fields["meshd.attempt"] == "2" && e.Fields["meshd.retry.cause"] == "503"
				}
			}
			if !sawBreaker || !sawRetry {
				t.Errorf("server events: want breaker rejection and retry with their fields, have %+v", s.Events)
			}

			for i, id := range []string{first, second} {
				c, ok := tr.Span(id)
				if !ok {
					t.Fatalf("attempt %d span %s not in trace", i+1, id)
				}
				if c.ParentSpanID != serverID || c.Kind != "client" || c.OperationName != "GET" {
					t.Errorf("attempt %d: want a GET client child of %s, have %s/%s child of %q", i+1, serverID, c.OperationName, c.Kind, c.ParentSpanID)
				}
				want := map[string]string{
					"meshd.upstream":      "payments",
					"meshd.lb.algorithm":  "least_request",
					"meshd.lb.candidates": "3",
					"meshd.lb.reason":     "fewest in flight",
					"meshd.lb.score":      "2",
					"meshd.breaker.state": "closed",
					"url.full":            "http://" + c.Tags["meshd.instance.address"] + "/orders?id=REDACTED",
				}
				if i == 0 {
					want["meshd.instance.id"], want["http.response.status_code"], want["error.type"] = "n1/p1", "503", "503"
					want["meshd.attempt"], want["otel.status_code"] = "1", "ERROR"
				} else {
					want["meshd.instance.id"], want["http.response.status_code"] = "n2/p2", "200"
					want["meshd.attempt"], want["http.request.resend_count"] = "2", "1"
				}
				for k, w := range want {
					if have := c.Tags[k]; have != w {
						t.Errorf("attempt %d tag %s: want %q, have %q", i+1, k, w, have)
					}
				}
			}
		})
	}
}
