package telemetry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/baggage"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// newRecorded returns a test provider recording into a fresh recorder.
func newRecorded(t *testing.T, cfg Config) (*Provider, *tracetest.SpanRecorder) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	p, err := NewTestProvider(rec, cfg)
	if err != nil {
		t.Fatalf("NewTestProvider: %v", err)
	}
	t.Cleanup(func() { _ = p.Shutdown(context.Background()) })
	return p, rec
}

func attrMap(kvs []attribute.KeyValue) map[string]attribute.Value {
	m := make(map[string]attribute.Value, len(kvs))
	for _, kv := range kvs {
		m[string(kv.Key)] = kv.Value
	}
	return m
}

// wantAttrs checks that span has exactly the given values for the listed
// keys (string, int, int64, float64 or bool) and none of the absent keys.
func wantAttrs(t *testing.T, span sdktrace.ReadOnlySpan, want map[string]any, absent ...string) {
	t.Helper()
	have := attrMap(span.Attributes())
	for k, w := range want {
		v, ok := have[k]
		if !ok {
			t.Errorf("span %q: attribute %s: want %v, have none", span.Name(), k, w)
			continue
		}
		if got := v.AsInterface(); fmt.Sprint(got) != fmt.Sprint(w) || fmt.Sprintf("%T", normalize(got)) != fmt.Sprintf("%T", normalize(w)) {
			t.Errorf("span %q: attribute %s: want %v (%T), have %v (%T)", span.Name(), k, w, w, got, got)
		}
	}
	for _, k := range absent {
		if v, ok := have[k]; ok {
			t.Errorf("span %q: attribute %s: want absent, have %v", span.Name(), k, v.AsInterface())
		}
	}
}

func normalize(v any) any {
	if i, ok := v.(int); ok {
		return int64(i)
	}
	return v
}

func ended(t *testing.T, rec *tracetest.SpanRecorder, want int) []sdktrace.ReadOnlySpan {
	t.Helper()
	spans := rec.Ended()
	if len(spans) != want {
		names := make([]string, len(spans))
		for i, s := range spans {
			names[i] = s.Name()
		}
		t.Fatalf("ended spans: want %d, have %d %v", want, len(spans), names)
	}
	return spans
}

func inbound(method, target string) *http.Request {
	r := httptest.NewRequest(method, target, nil)
	r.Host = "payments.mesh:9191"
	r.RemoteAddr = "127.0.0.5:40123"
	r.Header.Set("User-Agent", "orders/1.2")
	return r
}

func outbound(t *testing.T, ctx context.Context, method, target string) *http.Request {
	t.Helper()
	r, err := http.NewRequestWithContext(ctx, method, target, nil)
	if err != nil {
		t.Fatalf("new request: %v", err)
	}
	return r
}

func TestServerSpanAttributesAndName(t *testing.T) {
	p, rec := newRecorded(t, Config{})
	r := inbound(http.MethodPost, "/charge/42?card=4111&amount=10")
	r.Header.Set("X-Forwarded-For", "127.0.0.9, 127.0.0.10")
	_, span := p.StartServer(context.Background(), r, "payments")
	EndServer(span, 201, "")

	s := ended(t, rec, 1)[0]
	if have, want := s.Name(), "POST payments"; have != want {
		t.Errorf("name: want %q, have %q", want, have)
	}
	if have, want := s.SpanKind(), trace.SpanKindServer; have != want {
		t.Errorf("kind: want %v, have %v", want, have)
	}
	wantAttrs(t, s, map[string]any{
		"http.request.method":       "POST",
		"url.scheme":                "http",
		"url.path":                  "/charge/42",
		"url.query":                 "card=REDACTED&amount=REDACTED",
		"http.route":                "payments",
		"server.address":            "payments.mesh",
		"server.port":               9191,
		"network.peer.address":      "127.0.0.5",
		"network.peer.port":         40123,
		"client.address":            "127.0.0.9",
		"user_agent.original":       "orders/1.2",
		"network.protocol.version":  "1.1",
		"http.response.status_code": 201,
	}, "http.request.method_original", "error.type", "url.full")
	if have := s.Status().Code; have != codes.Unset {
		t.Errorf("status: want Unset, have %v", have)
	}
}

func TestServerSpanWithoutRouteAndForwardedFor(t *testing.T) {
	p, rec := newRecorded(t, Config{})
	r := inbound(http.MethodGet, "/health")
	r.Host = "payments.mesh" // no port: the scheme's default
	_, span := p.StartServer(context.Background(), r, "")
	EndServer(span, 200, "")
	s := ended(t, rec, 1)[0]
	if have, want := s.Name(), "GET"; have != want {
		t.Errorf("name: want %q, have %q", want, have)
	}
	wantAttrs(t, s, map[string]any{
		"server.address": "payments.mesh",
		"server.port":    80,
		"client.address": "127.0.0.5", // the peer, as nothing says otherwise
	}, "http.route", "url.query")
}

func TestUnknownMethodIsOther(t *testing.T) {
	p, rec := newRecorded(t, Config{})
	ctx, srv := p.StartServer(context.Background(), inbound("PURGE", "/x"), "cache")
	_, cl := p.StartAttempt(ctx, outbound(t, ctx, "PURGE", "http://127.0.0.1:9001/x"), Attempt{Upstream: "cache"})
	EndAttempt(cl, 200, "")
	EndServer(srv, 200, "")
	spans := ended(t, rec, 2)
	if have, want := spans[0].Name(), "HTTP"; have != want {
		t.Errorf("client name: want %q, have %q", want, have)
	}
	if have, want := spans[1].Name(), "HTTP cache"; have != want {
		t.Errorf("server name: want %q, have %q", want, have)
	}
	for _, s := range spans {
		wantAttrs(t, s, map[string]any{
			"http.request.method":          "_OTHER",
			"http.request.method_original": "PURGE",
		})
	}
}

func TestRetriedRequestHasTwoClientSpans(t *testing.T) {
	p, rec := newRecorded(t, Config{})
	ctx, srv := p.StartServer(context.Background(), inbound(http.MethodGet, "/orders"), "payments")

	ctx1, a1 := p.StartAttempt(ctx, outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/orders"), Attempt{
		Upstream: "payments", Algorithm: "least_response_time", InstanceID: "node1/payments-1",
		InstanceAddr: "127.0.0.1:9001", Candidates: 3, Reason: "lowest ewma", Score: 0.0125, HasScore: true,
		Breaker: "closed",
	})
	if ctx1 == ctx {
		t.Error("StartAttempt returned the parent context, want one carrying the client span")
	}
	EndAttempt(a1, 503, "")
	Retrying(srv, 2, "503", 25*time.Millisecond)
	_, a2 := p.StartAttempt(ctx, outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9002/orders"), Attempt{
		Upstream: "payments", Algorithm: "round_robin", InstanceID: "node2/payments-2",
		InstanceAddr: "127.0.0.1:9002", Candidates: 2, Breaker: "half-open", ResendCount: 1,
	})
	EndAttempt(a2, 200, "")
	EndServer(srv, 200, "")

	spans := ended(t, rec, 3)
	c1, c2, s := spans[0], spans[1], spans[2]
	for i, c := range []sdktrace.ReadOnlySpan{c1, c2} {
		if have, want := c.SpanKind(), trace.SpanKindClient; have != want {
			t.Errorf("attempt %d kind: want %v, have %v", i+1, want, have)
		}
		if have, want := c.Name(), "GET"; have != want {
			t.Errorf("attempt %d name: want %q, have %q", i+1, want, have)
		}
		if have, want := c.Parent().SpanID(), s.SpanContext().SpanID(); have != want {
			t.Errorf("attempt %d parent: want server span %v, have %v", i+1, want, have)
		}
		if have, want := c.SpanContext().TraceID(), s.SpanContext().TraceID(); have != want {
			t.Errorf("attempt %d trace: want %v, have %v", i+1, want, have)
		}
	}
	wantAttrs(t, c1, map[string]any{
		"http.request.method":       "GET",
		"url.full":                  "http://127.0.0.1:9001/orders",
		"server.address":            "127.0.0.1",
		"server.port":               9001,
		"network.peer.address":      "127.0.0.1",
		"network.peer.port":         9001,
		"meshd.upstream":            "payments",
		"meshd.lb.algorithm":        "least_response_time",
		"meshd.instance.id":         "node1/payments-1",
		"meshd.instance.address":    "127.0.0.1:9001",
		"meshd.lb.candidates":       3,
		"meshd.lb.reason":           "lowest ewma",
		"meshd.lb.score":            0.0125,
		"meshd.breaker.state":       "closed",
		"meshd.attempt":             1,
		"http.response.status_code": 503,
		"error.type":                "503",
	}, "http.request.resend_count")
	if have := c1.Status().Code; have != codes.Error {
		t.Errorf("attempt 1 status: want Error, have %v", have)
	}
	wantAttrs(t, c2, map[string]any{
		"http.request.resend_count": 1,
		"meshd.attempt":             2,
		"meshd.instance.id":         "node2/payments-2",
		"meshd.lb.algorithm":        "round_robin",
		"meshd.lb.candidates":       2,
		"meshd.breaker.state":       "half-open",
		"network.peer.port":         9002,
		"http.response.status_code": 200,
	}, "meshd.lb.score", "meshd.lb.reason", "error.type")
	if have := c2.Status().Code; have != codes.Unset {
		t.Errorf("attempt 2 status: want Unset, have %v", have)
	}

	ev := s.Events()
	if len(ev) != 1 || ev[0].Name != EventRetry {
		t.Fatalf("server events: want one %s, have %v", EventRetry, ev)
	}
	wantEventAttrs(t, ev[0], map[string]any{"meshd.attempt": 2, "meshd.retry.cause": "503", "meshd.retry.backoff": 0.025})
}

func wantEventAttrs(t *testing.T, ev sdktrace.Event, want map[string]any) {
	t.Helper()
	have := attrMap(ev.Attributes)
	for k, w := range want {
		v, ok := have[k]
		if !ok || fmt.Sprint(v.AsInterface()) != fmt.Sprint(w) {
			t.Errorf("event %s attribute %s: want %v, have %v (present %v)", ev.Name, k, w, v.AsInterface(), ok)
		}
	}
}

func TestEventsOnServerSpan(t *testing.T) {
	p, rec := newRecorded(t, Config{})
	_, srv := p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "payments")
	BreakerRejected(srv, "node1/payments-1", "open")
	since := time.Now().Add(-90 * time.Second)
	StaleDiscovery(srv, "payments", since, "consul: connection refused")
	NoInstance(srv, "all breakers open")
	EndServer(srv, 503, ErrTypeBreakerOpen)

	s := ended(t, rec, 1)[0]
	ev := s.Events()
	if len(ev) != 3 {
		t.Fatalf("events: want 3, have %d: %v", len(ev), ev)
	}
	if have, want := ev[0].Name, EventBreakerRejected; have != want {
		t.Errorf("event 0: want %s, have %s", want, have)
	}
	wantEventAttrs(t, ev[0], map[string]any{"meshd.instance.id": "node1/payments-1", "meshd.breaker.state": "open"})
	if have, want := ev[1].Name, EventStaleDiscovery; have != want {
		t.Errorf("event 1: want %s, have %s", want, have)
	}
	wantEventAttrs(t, ev[1], map[string]any{
		"meshd.upstream": "payments", "meshd.discovery.error": "consul: connection refused",
		"meshd.discovery.stale_since": since.UTC().Format(time.RFC3339Nano),
	})
	if staleFor := attrMap(ev[1].Attributes)["meshd.discovery.stale_for"].AsFloat64(); staleFor < 90 || staleFor > 3600 {
		t.Errorf("stale_for: want about 90s, have %v", staleFor)
	}
	if have, want := ev[2].Name, EventNoInstance; have != want {
		t.Errorf("event 2: want %s, have %s", want, have)
	}
	wantEventAttrs(t, ev[2], map[string]any{"meshd.lb.reason": "all breakers open"})
	wantAttrs(t, s, map[string]any{"error.type": "breaker_open", "http.response.status_code": 503})
	if have := s.Status().Code; have != codes.Error {
		t.Errorf("status: want Error, have %v", have)
	}
}

func TestQueryRedaction(t *testing.T) {
	cases := []struct {
		name       string
		record     bool
		target     string
		wantFull   string
		wantServer string
	}{
		{"default redacts every value", false,
			"http://127.0.0.1:9001/p?user=alice&token=s3cr3t&flag",
			"http://127.0.0.1:9001/p?user=REDACTED&token=REDACTED&flag",
			"user=REDACTED&token=REDACTED&flag"},
		{"record keeps values but not signatures", true,
			"http://127.0.0.1:9001/p?user=alice&sig=abc&X-Amz-Signature=def",
			"http://127.0.0.1:9001/p?user=alice&sig=REDACTED&X-Amz-Signature=REDACTED",
			"user=alice&sig=REDACTED&X-Amz-Signature=REDACTED"},
		{"record without sensitive keys is verbatim", true,
			"http://127.0.0.1:9001/p?a=1&b=2",
			"http://127.0.0.1:9001/p?a=1&b=2",
			"a=1&b=2"},
		{"credentials never recorded", false,
			"http://bob:hunter2@127.0.0.1:9001/",
			"http://REDACTED:REDACTED@127.0.0.1:9001/",
			""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, rec := newRecorded(t, Config{RecordQuery: tc.record})
			in := inbound(http.MethodGet, tc.target)
			ctx, srv := p.StartServer(context.Background(), in, "")
			_, cl := p.StartAttempt(ctx, outbound(t, ctx, http.MethodGet, tc.target), Attempt{})
			EndAttempt(cl, 200, "")
			EndServer(srv, 200, "")
			spans := ended(t, rec, 2)
			wantAttrs(t, spans[0], map[string]any{"url.full": tc.wantFull})
			if tc.wantServer == "" {
				wantAttrs(t, spans[1], nil, "url.query")
			} else {
				wantAttrs(t, spans[1], map[string]any{"url.query": tc.wantServer})
			}
			for _, s := range spans {
				for _, kv := range s.Attributes() {
					v := kv.Value.String()
					for _, secret := range []string{"s3cr3t", "hunter2", "abc", "def"} {
						if strings.Contains(v, secret) {
							t.Errorf("span %q attribute %s leaks %q: %s", s.Name(), kv.Key, secret, v)
						}
					}
				}
			}
		})
	}
}

func TestEndStatusAndErrorType(t *testing.T) {
	cases := []struct {
		name       string
		client     bool
		status     int
		errType    string
		wantCode   codes.Code
		wantErr    string // "" means error.type absent
		wantCancel bool
	}{
		{"client 503", true, 503, "", codes.Error, "503", false},
		{"server 503", false, 503, "", codes.Error, "503", false},
		{"client 404 is an error", true, 404, "", codes.Error, "404", false},
		{"server 404 is not", false, 404, "", codes.Unset, "", false},
		{"client timeout", true, 0, ErrTypeTimeout, codes.Error, "timeout", false},
		{"server timeout with 504", false, 504, ErrTypeTimeout, codes.Error, "timeout", false},
		{"client connect", true, 0, ErrTypeConnect, codes.Error, "connect", false},
		{"client reset", true, 0, ErrTypeReset, codes.Error, "reset", false},
		{"client canceled", true, 0, ErrTypeCanceled, codes.Unset, "", true},
		{"server canceled", false, 499, ErrTypeCanceled, codes.Unset, "", true},
		{"client 200", true, 200, "", codes.Unset, "", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, rec := newRecorded(t, Config{})
			var span trace.Span
			if tc.client {
				_, span = p.StartAttempt(context.Background(), outbound(t, context.Background(), http.MethodGet, "http://127.0.0.1:9001/"), Attempt{})
				EndAttempt(span, tc.status, tc.errType)
			} else {
				_, span = p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "")
				EndServer(span, tc.status, tc.errType)
			}
			s := ended(t, rec, 1)[0]
			if have := s.Status().Code; have != tc.wantCode {
				t.Errorf("status: want %v, have %v", tc.wantCode, have)
			}
			want := map[string]any{}
			var absent []string
			if tc.wantErr != "" {
				want["error.type"] = tc.wantErr
			} else {
				absent = append(absent, "error.type")
			}
			if tc.status > 0 {
				want["http.response.status_code"] = tc.status
			} else {
				absent = append(absent, "http.response.status_code")
			}
			if tc.wantCancel {
				want["meshd.canceled"] = true
			} else {
				absent = append(absent, "meshd.canceled")
			}
			wantAttrs(t, s, want, absent...)
		})
	}
}

func TestTraceContextExtractedAndInjected(t *testing.T) {
	p, rec := newRecorded(t, Config{})
	const incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	in := inbound(http.MethodGet, "/")
	in.Header.Set("traceparent", incoming)
	in.Header.Set("baggage", "tenant=acme")
	ctx, srv := p.StartServer(context.Background(), in, "payments")
	out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
	_, cl := p.StartAttempt(ctx, out, Attempt{Upstream: "payments"})
	EndAttempt(cl, 200, "")
	EndServer(srv, 200, "")

	spans := ended(t, rec, 2)
	c, s := spans[0], spans[1]
	if have, want := s.SpanContext().TraceID().String(), "4bf92f3577b34da6a3ce929d0e0e4736"; have != want {
		t.Errorf("server trace ID: want %s, have %s", want, have)
	}
	if have, want := s.Parent().SpanID().String(), "00f067aa0ba902b7"; have != want {
		t.Errorf("server parent: want the incoming span %s, have %s", want, have)
	}
	if !s.Parent().IsRemote() {
		t.Error("server parent: want remote")
	}
	want := fmt.Sprintf("00-%s-%s-01", c.SpanContext().TraceID(), c.SpanContext().SpanID())
	if have := out.Header.Get("traceparent"); have != want {
		t.Errorf("outgoing traceparent: want %s, have %s", want, have)
	}
	if have, want := out.Header.Get("baggage"), "tenant=acme"; have != want {
		t.Errorf("outgoing baggage: want %q, have %q", want, have)
	}
}

func TestB3Propagation(t *testing.T) {
	const traceID, spanID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	t.Run("single header", func(t *testing.T) {
		p, rec := newRecorded(t, Config{Propagators: []string{"b3"}})
		in := inbound(http.MethodGet, "/")
		in.Header.Set("b3", traceID+"-"+spanID+"-1")
		ctx, srv := p.StartServer(context.Background(), in, "")
		out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
		_, cl := p.StartAttempt(ctx, out, Attempt{})
		EndAttempt(cl, 200, "")
		EndServer(srv, 200, "")
		spans := ended(t, rec, 2)
		if have := spans[1].Parent().SpanID().String(); have != spanID {
			t.Errorf("server parent: want %s, have %s", spanID, have)
		}
		want := fmt.Sprintf("%s-%s-1", traceID, spans[0].SpanContext().SpanID())
		if have := out.Header.Get("b3"); have != want {
			t.Errorf("outgoing b3: want %s, have %s", want, have)
		}
		if have := out.Header.Get("traceparent"); have != "" {
			t.Errorf("outgoing traceparent: want none with b3 only, have %s", have)
		}
	})
	t.Run("multiple headers", func(t *testing.T) {
		p, rec := newRecorded(t, Config{Propagators: []string{"b3multi"}})
		in := inbound(http.MethodGet, "/")
		in.Header.Set("X-B3-TraceId", traceID)
		in.Header.Set("X-B3-SpanId", spanID)
		in.Header.Set("X-B3-Sampled", "1")
		ctx, srv := p.StartServer(context.Background(), in, "")
		out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
		_, cl := p.StartAttempt(ctx, out, Attempt{})
		EndAttempt(cl, 200, "")
		EndServer(srv, 200, "")
		spans := ended(t, rec, 2)
		if have := spans[1].Parent().SpanID().String(); have != spanID {
			t.Errorf("server parent: want %s, have %s", spanID, have)
		}
		if have := out.Header.Get("X-B3-TraceId"); have != traceID {
			t.Errorf("X-B3-TraceId: want %s, have %s", traceID, have)
		}
		if have, want := out.Header.Get("X-B3-SpanId"), spans[0].SpanContext().SpanID().String(); have != want {
			t.Errorf("X-B3-SpanId: want %s, have %s", want, have)
		}
		if have := out.Header.Get("b3"); have != "" {
			t.Errorf("b3 single header: want none, have %s", have)
		}
	})
}

// The caller's headers reach the instance copied; a b3 form meshd does not
// write must not go along beside the one it does, still naming the
// caller's span as the parent.
func TestB3OtherFormIsNotPassedOn(t *testing.T) {
	const traceID, spanID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	for _, tc := range []struct {
		propagator string
		caller     map[string]string
		gone       []string
	}{
		{"b3multi", map[string]string{"b3": traceID + "-" + spanID + "-1"}, []string{"B3"}},
		{"b3", map[string]string{"X-B3-TraceId": traceID, "X-B3-SpanId": spanID, "X-B3-Sampled": "1"}, []string{"X-B3-Traceid", "X-B3-Spanid", "X-B3-Sampled"}},
	} {
		p, rec := newRecorded(t, Config{Propagators: []string{tc.propagator}})
		in := inbound(http.MethodGet, "/")
		for k, v := range tc.caller {
			in.Header.Set(k, v)
		}
		ctx, srv := p.StartServer(context.Background(), in, "")
		out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
		for k, v := range in.Header { // as the forward copies them
			out.Header[k] = v
		}
		_, cl := p.StartAttempt(ctx, out, Attempt{})
		EndAttempt(cl, 200, "")
		EndServer(srv, 200, "")
		spans := ended(t, rec, 2)
		for _, k := range tc.gone {
			if v, ok := out.Header[k]; ok {
				t.Errorf("%s: the caller's %s reached the instance: %q", tc.propagator, k, v)
			}
		}
		got := out.Header.Get("X-B3-SpanId")
		if tc.propagator == "b3" {
			got = strings.Split(out.Header.Get("b3"), "-")[1]
		}
		if want := spans[0].SpanContext().SpanID().String(); got != want {
			t.Errorf("%s: the instance's parent: want meshd's client span %s, have %s", tc.propagator, want, got)
		}
	}
}

func TestUnsampledSpanStillPropagates(t *testing.T) {
	zero := 0.0
	p, rec := newRecorded(t, Config{SampleRatio: &zero})
	ctx, srv := p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "payments")
	if srv.IsRecording() {
		t.Fatal("server span recording with ratio 0")
	}
	out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
	_, cl := p.StartAttempt(ctx, out, Attempt{Upstream: "payments"})
	BreakerRejected(srv, "x", "open")
	EndAttempt(cl, 503, "")
	EndServer(srv, 503, "")
	if n := len(rec.Ended()); n != 0 {
		t.Errorf("recorded spans: want 0, have %d", n)
	}
	tp := out.Header.Get("traceparent")
	if !strings.HasSuffix(tp, "-00") || len(tp) != 55 {
		t.Errorf("traceparent: want a not-sampled context, have %q", tp)
	}
}

// passThroughKey marks a context so that a test can tell it came back unchanged.
type passThroughKey struct{}

func TestTracingOffIsPassThrough(t *testing.T) {
	for name, p := range map[string]*Provider{"nil provider": nil, "exporter none": mustSetup(t, Config{Exporter: ExporterNone})} {
		t.Run(name, func(t *testing.T) {
			in := inbound(http.MethodGet, "/")
			in.Header.Set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
			base := context.WithValue(context.Background(), passThroughKey{}, 1)
			ctx, srv := p.StartServer(base, in, "payments")
			if ctx != base {
				t.Error("StartServer changed the context")
			}
			if srv.IsRecording() || srv.SpanContext().IsValid() {
				t.Errorf("server span: want no-op, have recording=%v valid=%v", srv.IsRecording(), srv.SpanContext().IsValid())
			}
			out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
			out.Header.Set("traceparent", in.Header.Get("traceparent"))
			_, cl := p.StartAttempt(ctx, out, Attempt{})
			EndAttempt(cl, 200, "")
			EndServer(srv, 200, "")
			if have, want := out.Header.Get("traceparent"), in.Header.Get("traceparent"); have != want {
				t.Errorf("traceparent: want the app's %s unchanged, have %s", want, have)
			}
			if p.Tracing() {
				t.Error("Tracing(): want false")
			}
		})
	}
}

func mustSetup(t *testing.T, cfg Config) *Provider {
	t.Helper()
	p, err := Setup(context.Background(), cfg, nil)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	t.Cleanup(func() { _ = p.Shutdown(context.Background()) })
	return p
}

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

func TestErrorType(t *testing.T) {
	cases := []struct {
		err  error
		want string
	}{
		{nil, ""},
		{context.Canceled, ErrTypeCanceled},
		{fmt.Errorf("forward: %w", context.Canceled), ErrTypeCanceled},
		{context.DeadlineExceeded, ErrTypeTimeout},
		{&net.OpError{Op: "read", Err: timeoutErr{}}, ErrTypeTimeout},
		{&net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}, ErrTypeConnect},
		{&net.OpError{Op: "read", Err: &os.SyscallError{Syscall: "read", Err: syscall.ECONNRESET}}, ErrTypeReset},
		{io.ErrUnexpectedEOF, ErrTypeReset},
		{errors.New("something odd"), ErrTypeOther},
	}
	for _, tc := range cases {
		if have := ErrorType(tc.err); have != tc.want {
			t.Errorf("ErrorType(%v): want %q, have %q", tc.err, tc.want, have)
		}
	}
}

func TestErrorTypeFromRealConnections(t *testing.T) {
	// A port nobody listens on: connect.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	_, err = http.Get("http://" + addr + "/")
	if have := ErrorType(err); have != ErrTypeConnect {
		t.Errorf("refused connection (%v): want %q, have %q", err, ErrTypeConnect, have)
	}

	// A server that hangs: timeout from the client's deadline.
	block := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-block:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(block)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
	_, err = srv.Client().Do(req)
	if have := ErrorType(err); have != ErrTypeTimeout {
		t.Errorf("deadline (%v): want %q, have %q", err, ErrTypeTimeout, have)
	}

	// The caller cancels.
	ctx2, cancel2 := context.WithCancel(context.Background())
	req2, _ := http.NewRequestWithContext(ctx2, http.MethodGet, srv.URL, nil)
	done := make(chan error, 1)
	go func() {
		_, err := srv.Client().Do(req2)
		done <- err
	}()
	cancel2()
	if have := ErrorType(<-done); have != ErrTypeCanceled {
		t.Errorf("cancel: want %q, have %q", ErrTypeCanceled, have)
	}
}

// A request without trace context that the sampler drops gets a span
// context and a traceparent line without the SDK: valid, not sampled, the
// same in the request's context, in the line and in the access log, and
// nothing recorded.
func TestDroppedRootSpanWithoutSDK(t *testing.T) {
	t.Run("heap", func(t *testing.T) { testDroppedRootSpan(t, nil) })
	t.Run("room", func(t *testing.T) { testDroppedRootSpan(t, new(LeanRoom)) })
}

func testDroppedRootSpan(t *testing.T, room *LeanRoom) {
	zero := 0.0
	p, rec := newRecorded(t, Config{SampleRatio: &zero})
	in := inbound(http.MethodGet, "/")
	in.Header.Set("tracestate", "vendor=stale") // without traceparent: ignored
	ctx, srv := p.StartServerIn(context.Background(), in, "payments", room)
	if _, ok := srv.(*leanSpan); !ok {
		t.Fatalf("server span: want the lean span, have %T", srv)
	}
	if inRoom := room != nil && srv == trace.Span(&room.span); inRoom != (room != nil) {
		t.Fatalf("server span in the room: %v, want %v", inRoom, room != nil)
	}
	sc := srv.SpanContext()
	if srv.IsRecording() || !sc.IsValid() || sc.IsSampled() || sc.IsRemote() {
		t.Fatalf("server span: want valid, not sampled, not recording; have %+v recording=%v", sc, srv.IsRecording())
	}
	if have := trace.SpanContextFromContext(ctx); !have.Equal(sc) {
		t.Errorf("context's span context: want %v, have %v", sc, have)
	}
	if srv.TracerProvider() != p.TracerProvider {
		t.Error("span's tracer provider is not the provider's")
	}
	for i := 1; i <= 2; i++ { // a retry passes on the same parent
		out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
		out.Header.Set("tracestate", "vendor=stale")
		_, cl := p.StartAttempt(ctx, out, Attempt{Upstream: "payments", ResendCount: i - 1})
		want := fmt.Sprintf("00-%s-%s-00", sc.TraceID(), sc.SpanID())
		if have := out.Header.Values("traceparent"); len(have) != 1 || have[0] != want {
			t.Errorf("attempt %d traceparent: want %s, have %q", i, want, have)
		}
		if have := out.Header.Get("tracestate"); have != "" {
			t.Errorf("attempt %d tracestate: want none, have %q", i, have)
		}
		if have := out.Header.Get("baggage"); have != "" {
			t.Errorf("attempt %d baggage: want none, have %q", i, have)
		}
		EndAttempt(cl, 200, "")
	}
	EndServer(srv, 200, "")
	if n := len(rec.Ended()); n != 0 {
		t.Errorf("recorded spans: want 0, have %d", n)
	}
	var buf strings.Builder
	AccessLog(slog.New(slog.NewTextHandler(&buf, nil)), ctx, Access{Upstream: "payments", Status: 200})
	if want := "trace_id=" + sc.TraceID().String(); !strings.Contains(buf.String(), want) {
		t.Errorf("access log: want %s in %q", want, buf.String())
	}
}

// The lean path's span and context in a LeanRoom: found as
// trace.ContextWithSpan's would be, the parent's values still there, no
// allocation for the whole request's spans, and a new span each time the
// room is used again.
func TestLeanRoom(t *testing.T) {
	if !roomsWork {
		t.Fatalf("the trace package's span key was not found (%v): rooms are not used, and the lean path allocates", spanKey)
	}
	zero := 0.0
	p, _ := newRecorded(t, Config{SampleRatio: &zero})
	type key struct{}
	parent := context.WithValue(context.Background(), key{}, "v")
	in := inbound(http.MethodGet, "/")
	out := outbound(t, context.Background(), http.MethodGet, "http://127.0.0.1:9001/")
	var room LeanRoom
	ctx, srv := p.StartServerIn(parent, in, "payments", &room)
	if srv != trace.Span(&room.span) || trace.SpanFromContext(ctx) != srv {
		t.Fatalf("want the room's span in the room's context; have %T, context's %T", srv, trace.SpanFromContext(ctx))
	}
	if ctx.Value(key{}) != "v" {
		t.Error("the room's context lost its parent's value")
	}
	first := srv.SpanContext()
	ctx2, srv2 := p.StartServerIn(parent, in, "payments", &room)
	if srv2.SpanContext().Equal(first) || !trace.SpanContextFromContext(ctx2).Equal(srv2.SpanContext()) {
		t.Errorf("the room used again: span context %v, context's %v, first %v", srv2.SpanContext(), trace.SpanContextFromContext(ctx2), first)
	}
	allocs := testing.AllocsPerRun(200, func() {
		ctx, srv := p.StartServerIn(parent, in, "payments", &room)
		_, cl := p.StartAttempt(ctx, out, Attempt{Upstream: "payments"})
		EndAttempt(cl, 200, "")
		EndServer(srv, 200, "")
	})
	if allocs != 0 {
		t.Errorf("a dropped request's spans in a room: %v allocations, want 0", allocs)
	}
	// (srv2 is the room's span: it now holds the last request's IDs.)
	if sc, tp := srv2.SpanContext(), out.Header.Get("traceparent"); sc.Equal(first) || tp != fmt.Sprintf("00-%s-%s-00", sc.TraceID(), sc.SpanID()) {
		t.Errorf("the last attempt's traceparent %q does not name the room's last span %v", tp, sc)
	}
}

// A request without trace context that the sampler keeps is started by the
// SDK with the very trace ID the sampler was shown, so that the decision
// holds: the lean path draws the ID, the SDK must not draw another.
func TestKeptRootSpanHasTheDrawnTraceID(t *testing.T) {
	half := 0.5
	p, rec := newRecorded(t, Config{SampleRatio: &half})
	// A ratio of one half keeps a trace ID whose ninth byte is below 0x80.
	kept := trace.TraceID{0xa1, 1, 2, 3, 4, 5, 6, 7, 0x10, 9, 10, 11, 12, 13, 14, 15}
	dropped := trace.TraceID{0xa2, 1, 2, 3, 4, 5, 6, 7, 0xf0, 9, 10, 11, 12, 13, 14, 15}
	ids := []trace.TraceID{kept, dropped}
	saved := newTraceID
	t.Cleanup(func() { newTraceID = saved })
	newTraceID = func() trace.TraceID {
		if len(ids) == 0 {
			t.Fatal("more trace IDs drawn than requests started")
		}
		id := ids[0]
		ids = ids[1:]
		return id
	}

	ctx, srv := p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "payments")
	out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
	_, cl := p.StartAttempt(ctx, out, Attempt{Upstream: "payments"})
	if !srv.IsRecording() || !cl.IsRecording() {
		t.Fatalf("kept trace: want both spans recording, have server %v, attempt %v", srv.IsRecording(), cl.IsRecording())
	}
	if ctx.Value(presetTrace{}) != nil {
		t.Error("the preset trace ID leaked into the request's context")
	}
	EndAttempt(cl, 200, "")
	EndServer(srv, 200, "")
	spans := ended(t, rec, 2)
	for _, s := range spans {
		if have := s.SpanContext().TraceID(); have != kept {
			t.Errorf("span %q: want trace %s, have %s", s.Name(), kept, have)
		}
	}
	if want := fmt.Sprintf("00-%s-%s-01", kept, spans[0].SpanContext().SpanID()); out.Header.Get("traceparent") != want {
		t.Errorf("kept traceparent: want %s, have %s", want, out.Header.Get("traceparent"))
	}

	ctx, srv = p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "payments")
	out = outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
	_, cl = p.StartAttempt(ctx, out, Attempt{Upstream: "payments"})
	if srv.IsRecording() || srv.SpanContext().TraceID() != dropped {
		t.Errorf("dropped trace: want a span of trace %s not recording, have %s recording=%v", dropped, srv.SpanContext().TraceID(), srv.IsRecording())
	}
	if want := fmt.Sprintf("00-%s-%s-00", dropped, srv.SpanContext().SpanID()); out.Header.Get("traceparent") != want {
		t.Errorf("dropped traceparent: want %s, have %s", want, out.Header.Get("traceparent"))
	}
	EndAttempt(cl, 200, "")
	EndServer(srv, 200, "")
	ended(t, rec, 2)
	if len(ids) != 0 {
		t.Errorf("%d trace IDs not drawn", len(ids))
	}
}

// Baggage, in the request or in the caller's context, and propagators other
// than W3C's take the SDK's way, which writes them.
func TestDroppedRootSpanWithBaggageOrB3(t *testing.T) {
	zero := 0.0
	t.Run("baggage header", func(t *testing.T) {
		p, _ := newRecorded(t, Config{SampleRatio: &zero})
		in := inbound(http.MethodGet, "/")
		in.Header.Set("baggage", "tenant=acme")
		ctx, srv := p.StartServer(context.Background(), in, "")
		out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
		p.StartAttempt(ctx, out, Attempt{})
		if have := out.Header.Get("baggage"); have != "tenant=acme" {
			t.Errorf("baggage: want tenant=acme, have %q", have)
		}
		if tp := out.Header.Get("traceparent"); !strings.HasSuffix(tp, "-00") || !strings.Contains(tp, srv.SpanContext().TraceID().String()) {
			t.Errorf("traceparent: want the request's trace, not sampled; have %q", tp)
		}
	})
	t.Run("baggage in context", func(t *testing.T) {
		p, _ := newRecorded(t, Config{SampleRatio: &zero})
		m, _ := baggage.NewMember("tenant", "acme")
		b, _ := baggage.New(m)
		ctx, _ := p.StartServer(baggage.ContextWithBaggage(context.Background(), b), inbound(http.MethodGet, "/"), "")
		out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
		p.StartAttempt(ctx, out, Attempt{})
		if have := out.Header.Get("baggage"); have != "tenant=acme" {
			t.Errorf("baggage: want tenant=acme, have %q", have)
		}
	})
	t.Run("baggage added after the server span", func(t *testing.T) {
		p, _ := newRecorded(t, Config{SampleRatio: &zero})
		ctx, srv := p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "")
		if _, ok := srv.(*leanSpan); !ok {
			t.Fatalf("server span: want the lean span, have %T", srv)
		}
		m, _ := baggage.NewMember("tenant", "acme")
		b, _ := baggage.New(m)
		ctx = baggage.ContextWithBaggage(ctx, b)
		out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
		p.StartAttempt(ctx, out, Attempt{})
		if have := out.Header.Get("baggage"); have != "tenant=acme" {
			t.Errorf("baggage: want tenant=acme, have %q", have)
		}
		if tp := out.Header.Get("traceparent"); tp != formatTraceparent(srv.SpanContext()) {
			t.Errorf("traceparent: want %s, have %q", formatTraceparent(srv.SpanContext()), tp)
		}
	})
	t.Run("b3", func(t *testing.T) {
		p, _ := newRecorded(t, Config{SampleRatio: &zero, Propagators: []string{"tracecontext", "b3"}})
		ctx, srv := p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "")
		if _, ok := srv.(*leanSpan); ok {
			t.Fatal("server span: lean with b3 propagated")
		}
		out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
		p.StartAttempt(ctx, out, Attempt{})
		sc := srv.SpanContext()
		if want := fmt.Sprintf("%s-%s-0", sc.TraceID(), sc.SpanID()); out.Header.Get("b3") != want {
			t.Errorf("b3: want %s, have %q", want, out.Header.Get("b3"))
		}
	})
}

func TestLeanPropagators(t *testing.T) {
	for _, c := range []struct {
		names        []string
		lean, w3cCtx bool
	}{
		{[]string{"tracecontext", "baggage"}, true, true},
		{[]string{" TraceContext "}, true, true},
		{[]string{"baggage"}, true, false},
		{[]string{"tracecontext", "b3"}, false, false},
		{[]string{"b3multi"}, false, false},
		{nil, false, false},
	} {
		lean, tc := leanPropagators(c.names)
		if lean != c.lean || tc != c.w3cCtx {
			t.Errorf("leanPropagators(%q): want %v %v, have %v %v", c.names, c.lean, c.w3cCtx, lean, tc)
		}
	}
}

func TestFormatTraceparent(t *testing.T) {
	tid, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	sid, _ := trace.SpanIDFromHex("00f067aa0ba902b7")
	for _, flags := range []trace.TraceFlags{0, trace.FlagsSampled} {
		sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid, TraceFlags: flags})
		h := http.Header{}
		propagation.TraceContext{}.Inject(trace.ContextWithSpanContext(context.Background(), sc), propagation.HeaderCarrier(h))
		if have, want := formatTraceparent(sc), h.Get("traceparent"); have != want {
			t.Errorf("flags %v: want %s (as the SDK's propagator writes it), have %s", flags, want, have)
		}
	}
}

// formatTraceparent is appendTraceparent's line as a string.
func formatTraceparent(sc trace.SpanContext) string { return string(appendTraceparent(nil, sc)) }
