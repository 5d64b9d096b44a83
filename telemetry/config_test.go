package telemetry

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/protobuf/proto"
)

// clearOTelEnv blanks every variable Setup reads so the host environment
// cannot leak into a test.
func clearOTelEnv(t *testing.T) {
	for _, k := range []string{
		"OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
		"OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_PROPAGATORS",
		"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
		"OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
		"OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
	} {
		t.Setenv(k, "")
	}
}

// setupRecorded runs the full Setup path with rec attached.
func setupRecorded(t *testing.T, cfg Config) (*Provider, *tracetest.SpanRecorder) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	p, err := setup(context.Background(), cfg, nil, rec)
	if err != nil {
		t.Fatalf("setup: %v", err)
	}
	t.Cleanup(func() { _ = p.Shutdown(context.Background()) })
	return p, rec
}

func TestValidateNamesKeys(t *testing.T) {
	bad, nan := 1.5, -0.1
	errs := Config{
		Exporter: "zipkin", Protocol: "http/json", Endpoint: "ftp://x", SampleRatio: &bad,
		Propagators: []string{"tracecontext", "xray"}, Headers: map[string]string{" ": "v"},
	}.Validate()
	wantKeys := []string{"telemetry.exporter", "telemetry.protocol", "telemetry.endpoint", "telemetry.headers", "telemetry.sample_ratio", "telemetry.propagators"}
	if len(errs) != len(wantKeys) {
		t.Fatalf("errors: want %d, have %d: %v", len(wantKeys), len(errs), errs)
	}
	for i, k := range wantKeys {
		if !strings.HasPrefix(errs[i].Error(), k+":") {
			t.Errorf("error %d: want it to name %s, have %q", i, k, errs[i])
		}
	}
	if errs := (Config{SampleRatio: &nan}).Validate(); len(errs) != 1 {
		t.Errorf("negative ratio: want 1 error, have %v", errs)
	}
	good := 0.25
	if errs := (Config{
		Exporter: "otlp", Protocol: "grpc", Endpoint: "127.0.0.1:4317", SampleRatio: &good,
		Propagators: []string{"b3multi", "baggage"}, Headers: map[string]string{"x-key": "v"},
	}).Validate(); len(errs) != 0 {
		t.Errorf("valid config: want no errors, have %v", errs)
	}
	if errs := (Config{}).Validate(); len(errs) != 0 {
		t.Errorf("zero config: want no errors, have %v", errs)
	}
}

func TestResolveExportersFromConfigAndEnv(t *testing.T) {
	cases := []struct {
		name string
		cfg  Config
		env  map[string]string
		want []string
	}{
		{"nothing set: off", Config{}, nil, nil},
		{"endpoint in env: otlp over http/protobuf", Config{},
			map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, []string{ExporterOTLPHTTP}},
		{"traces endpoint and grpc protocol in env", Config{},
			map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
			[]string{ExporterOTLPGRPC}},
		{"traces protocol beats the general one", Config{},
			map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
			[]string{ExporterOTLPHTTP}},
		{"config endpoint and protocol", Config{Endpoint: "127.0.0.1:4317", Protocol: "grpc"}, nil, []string{ExporterOTLPGRPC}},
		{"config protocol beats env", Config{Endpoint: "127.0.0.1:4317", Protocol: "grpc"},
			map[string]string{"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, []string{ExporterOTLPGRPC}},
		{"env exporter console", Config{}, map[string]string{"OTEL_TRACES_EXPORTER": "console"}, []string{ExporterConsole}},
		{"env exporter none beats endpoint", Config{},
			map[string]string{"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, nil},
		{"config exporter beats env", Config{Exporter: "otlp-grpc"},
			map[string]string{"OTEL_TRACES_EXPORTER": "console"}, []string{ExporterOTLPGRPC}},
		{"config none beats env", Config{Exporter: "none"},
			map[string]string{"OTEL_TRACES_EXPORTER": "otlp"}, nil},
		{"env list", Config{}, map[string]string{"OTEL_TRACES_EXPORTER": "otlp, console"}, []string{ExporterOTLPHTTP, ExporterConsole}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			clearOTelEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			r, err := resolve(tc.cfg)
			if err != nil {
				t.Fatalf("resolve: %v", err)
			}
			if len(r.exporters) == 0 && len(tc.want) == 0 {
				return
			}
			if !reflect.DeepEqual(r.exporters, tc.want) {
				t.Errorf("exporters: want %v, have %v", tc.want, r.exporters)
			}
		})
	}
}

func TestEnvErrorsNameTheVariable(t *testing.T) {
	cases := map[string]string{
		"OTEL_SDK_DISABLED":           "maybe",
		"OTEL_PROPAGATORS":            "tracecontext,jaeger",
		"OTEL_TRACES_SAMPLER":         "jaeger_remote",
		"OTEL_TRACES_EXPORTER":        "zipkin",
		"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
	}
	for k, v := range cases {
		t.Run(k, func(t *testing.T) {
			clearOTelEnv(t)
			t.Setenv(k, v)
			_, err := Setup(context.Background(), Config{}, nil)
			if err == nil || !strings.Contains(err.Error(), k) {
				t.Errorf("Setup with %s=%s: want an error naming %s, have %v", k, v, k, err)
			}
		})
	}
	t.Run("OTEL_TRACES_SAMPLER_ARG", func(t *testing.T) {
		clearOTelEnv(t)
		t.Setenv("OTEL_TRACES_SAMPLER", "traceidratio")
		t.Setenv("OTEL_TRACES_SAMPLER_ARG", "2")
		_, err := Setup(context.Background(), Config{}, nil)
		if err == nil || !strings.Contains(err.Error(), "OTEL_TRACES_SAMPLER_ARG") {
			t.Errorf("want an error naming OTEL_TRACES_SAMPLER_ARG, have %v", err)
		}
	})
}

func TestSDKDisabled(t *testing.T) {
	clearOTelEnv(t)
	t.Setenv("OTEL_SDK_DISABLED", "true")
	p, rec := setupRecorded(t, Config{Exporter: ExporterConsole, Metrics: true})
	if p.Tracing() {
		t.Error("Tracing(): want false with OTEL_SDK_DISABLED=true")
	}
	_, span := p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "x")
	if span.IsRecording() {
		t.Error("span recording with the SDK disabled")
	}
	EndServer(span, 200, "")
	if n := len(rec.Ended()); n != 0 {
		t.Errorf("recorded spans: want 0, have %d", n)
	}
	if p.Metrics != nil {
		t.Error("Metrics: want nil (off) with the SDK disabled")
	}
	p.Metrics.RequestDone("u", "i", "", "GET", 200, time.Millisecond, "") // nil-safe
	w := httptest.NewRecorder()
	p.MetricsHandler.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if w.Code != http.StatusNotFound {
		t.Errorf("metrics handler: want 404, have %d", w.Code)
	}

	t.Setenv("OTEL_SDK_DISABLED", "false")
	p2, rec2 := setupRecorded(t, Config{})
	_, span2 := p2.StartServer(context.Background(), inbound(http.MethodGet, "/"), "x")
	EndServer(span2, 200, "")
	if !p2.Tracing() || len(rec2.Ended()) != 1 {
		t.Errorf("OTEL_SDK_DISABLED=false: want tracing on and 1 span, have %v and %d", p2.Tracing(), len(rec2.Ended()))
	}
}

func TestPropagatorsFromEnv(t *testing.T) {
	cases := []struct {
		env, cfg   string
		wantFields []string
	}{
		{"", "", []string{"baggage", "traceparent", "tracestate"}},
		{"b3multi", "", []string{"x-b3-flags", "x-b3-sampled", "x-b3-spanid", "x-b3-traceid"}},
		{"b3,tracecontext", "", []string{"b3", "traceparent", "tracestate"}},
		{"none", "", nil},
		{"b3multi", "tracecontext", []string{"traceparent", "tracestate"}}, // config wins
	}
	for _, tc := range cases {
		t.Run(tc.env+"/"+tc.cfg, func(t *testing.T) {
			clearOTelEnv(t)
			t.Setenv("OTEL_PROPAGATORS", tc.env)
			var cfg Config
			if tc.cfg != "" {
				cfg.Propagators = strings.Split(tc.cfg, ",")
			}
			p, _ := setupRecorded(t, cfg)
			have := map[string]bool{}
			for _, f := range p.Propagator.Fields() {
				have[strings.ToLower(f)] = true
			}
			for _, f := range tc.wantFields {
				if !have[f] {
					t.Errorf("fields: want %s among %v", f, p.Propagator.Fields())
				}
			}
			if len(tc.wantFields) == 0 && len(have) != 0 {
				t.Errorf("fields: want none, have %v", p.Propagator.Fields())
			}
			if tc.env == "b3multi" && tc.cfg == "" {
				// Injection really uses the multi-header form.
				ctx, srv := p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "")
				out := outbound(t, ctx, http.MethodGet, "http://127.0.0.1:9001/")
				_, cl := p.StartAttempt(ctx, out, Attempt{})
				if out.Header.Get("X-B3-TraceId") != cl.SpanContext().TraceID().String() || out.Header.Get("traceparent") != "" {
					t.Errorf("outgoing headers: want X-B3-TraceId only, have %v", out.Header)
				}
				EndAttempt(cl, 200, "")
				EndServer(srv, 200, "")
			}
		})
	}
}

func TestSamplerFromEnv(t *testing.T) {
	const sampledParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	// count starts n root spans and one span under a sampled remote parent.
	count := func(p *Provider, n int) (roots int, childSampled bool) {
		for range n {
			_, s := p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "")
			if s.IsRecording() {
				roots++
			}
			s.End()
		}
		in := inbound(http.MethodGet, "/")
		in.Header.Set("traceparent", sampledParent)
		_, s := p.StartServer(context.Background(), in, "")
		childSampled = s.IsRecording()
		s.End()
		return roots, childSampled
	}
	t.Run("traceidratio 0.5 ignores the parent", func(t *testing.T) {
		clearOTelEnv(t)
		t.Setenv("OTEL_TRACES_SAMPLER", "traceidratio")
		t.Setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
		p, _ := setupRecorded(t, Config{})
		roots, _ := count(p, 2000)
		// Binomial(2000, 0.5): 800..1200 is more than 8 standard deviations.
		if roots < 800 || roots > 1200 {
			t.Errorf("sampled roots: want about 1000 of 2000, have %d", roots)
		}
	})
	t.Run("traceidratio 0 drops even a sampled parent", func(t *testing.T) {
		clearOTelEnv(t)
		t.Setenv("OTEL_TRACES_SAMPLER", "traceidratio")
		t.Setenv("OTEL_TRACES_SAMPLER_ARG", "0")
		p, _ := setupRecorded(t, Config{})
		roots, child := count(p, 50)
		if roots != 0 || child {
			t.Errorf("want nothing sampled, have %d roots, child %v", roots, child)
		}
	})
	t.Run("parentbased_traceidratio 0 follows a sampled parent", func(t *testing.T) {
		clearOTelEnv(t)
		t.Setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
		t.Setenv("OTEL_TRACES_SAMPLER_ARG", "0")
		p, _ := setupRecorded(t, Config{})
		roots, child := count(p, 50)
		if roots != 0 || !child {
			t.Errorf("want 0 roots and the child sampled, have %d roots, child %v", roots, child)
		}
	})
	t.Run("default is parentbased_always_on", func(t *testing.T) {
		clearOTelEnv(t)
		p, _ := setupRecorded(t, Config{})
		roots, child := count(p, 50)
		if roots != 50 || !child {
			t.Errorf("want 50 roots and the child, have %d, %v", roots, child)
		}
		in := inbound(http.MethodGet, "/")
		in.Header.Set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
		_, s := p.StartServer(context.Background(), in, "")
		if s.IsRecording() {
			t.Error("an unsampled parent's child was sampled")
		}
		s.End()
	})
	t.Run("config ratio beats env", func(t *testing.T) {
		clearOTelEnv(t)
		t.Setenv("OTEL_TRACES_SAMPLER", "always_off")
		one := 1.0
		p, _ := setupRecorded(t, Config{SampleRatio: &one})
		if roots, _ := count(p, 20); roots != 20 {
			t.Errorf("want 20 sampled, have %d", roots)
		}
	})
}

func resourceAttr(rec *tracetest.SpanRecorder, key string) (string, bool) {
	for _, s := range rec.Ended() {
		for _, kv := range s.Resource().Attributes() {
			if string(kv.Key) == key {
				return kv.Value.String(), true
			}
		}
	}
	return "", false
}

func TestResourceFromEnv(t *testing.T) {
	cases := []struct {
		name, envName, envAttrs, cfgName, want string
	}{
		{"default", "", "", "", "meshd"},
		{"OTEL_SERVICE_NAME", "orders-sidecar", "", "", "orders-sidecar"},
		{"resource attributes", "", "service.name=from-attrs,deployment.environment.name=test", "", "from-attrs"},
		{"OTEL_SERVICE_NAME beats attributes", "orders-sidecar", "service.name=from-attrs", "", "orders-sidecar"},
		{"config beats env", "orders-sidecar", "", "configured", "configured"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			clearOTelEnv(t)
			t.Setenv("OTEL_SERVICE_NAME", tc.envName)
			t.Setenv("OTEL_RESOURCE_ATTRIBUTES", tc.envAttrs)
			p, rec := setupRecorded(t, Config{ServiceName: tc.cfgName})
			_, s := p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "")
			s.End()
			if have, _ := resourceAttr(rec, "service.name"); have != tc.want {
				t.Errorf("service.name: want %q, have %q", tc.want, have)
			}
			if tc.envAttrs != "" && strings.Contains(tc.envAttrs, "deployment") {
				if have, _ := resourceAttr(rec, "deployment.environment.name"); have != "test" {
					t.Errorf("deployment.environment.name: want test, have %q", have)
				}
			}
			if have, ok := resourceAttr(rec, "telemetry.sdk.language"); !ok || have != "go" {
				t.Errorf("telemetry.sdk.language: want go, have %q", have)
			}
		})
	}
}

// otlpSink is an OTLP/HTTP receiver on loopback that decodes what it gets.
type otlpSink struct {
	srv *httptest.Server
	mu  sync.Mutex
	got []received
}

type received struct {
	path    string
	headers http.Header
	spans   []string
	service string
}

func newOTLPSink(t *testing.T) *otlpSink {
	s := &otlpSink{}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		var req collectortrace.ExportTraceServiceRequest
		if err := proto.Unmarshal(body, &req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		rc := received{path: r.URL.Path, headers: r.Header.Clone()}
		for _, rs := range req.ResourceSpans {
			for _, a := range rs.GetResource().GetAttributes() {
				if a.Key == "service.name" {
					rc.service = a.GetValue().GetStringValue()
				}
			}
			for _, ss := range rs.ScopeSpans {
				for _, sp := range ss.Spans {
					rc.spans = append(rc.spans, sp.Name)
				}
			}
		}
		s.mu.Lock()
		s.got = append(s.got, rc)
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
		out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
		_, _ = w.Write(out)
	}))
	t.Cleanup(s.srv.Close)
	return s
}

func (s *otlpSink) received() []received {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]received(nil), s.got...)
}

func TestOTLPHTTPExportFlushedOnShutdown(t *testing.T) {
	t.Run("config endpoint and headers", func(t *testing.T) {
		clearOTelEnv(t)
		t.Setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-from-env=1")
		sink := newOTLPSink(t)
		p, err := Setup(context.Background(), Config{
			ServiceName: "orders-sidecar", Exporter: "otlp-http", Endpoint: sink.srv.URL,
			Headers: map[string]string{"X-Api-Key": "k1"},
		}, nil)
		if err != nil {
			t.Fatalf("Setup: %v", err)
		}
		_, s := p.StartServer(context.Background(), inbound(http.MethodGet, "/"), "payments")
		EndServer(s, 200, "")
		if n := len(sink.received()); n != 0 {
			t.Fatalf("exports before Shutdown: want 0 (batched), have %d", n)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Shutdown(ctx); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		got := sink.received()
		if len(got) != 1 {
			t.Fatalf("exports: want 1, have %d", len(got))
		}
		if got[0].path != "/v1/traces" {
			t.Errorf("path: want /v1/traces, have %s", got[0].path)
		}
		if have := got[0].headers.Get("X-Api-Key"); have != "k1" {
			t.Errorf("X-Api-Key: want k1, have %q", have)
		}
		if have := got[0].headers.Get("X-From-Env"); have != "" {
			t.Errorf("env headers: want replaced by config headers, have X-From-Env=%q", have)
		}
		if !reflect.DeepEqual(got[0].spans, []string{"GET payments"}) || got[0].service != "orders-sidecar" {
			t.Errorf("export: want span [GET payments] from orders-sidecar, have %v from %q", got[0].spans, got[0].service)
		}
		if err := p.Shutdown(ctx); err != nil {
			t.Errorf("second Shutdown: want nil, have %v", err)
		}
	})
	t.Run("env endpoint read by the exporter", func(t *testing.T) {
		clearOTelEnv(t)
		sink := newOTLPSink(t)
		t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", sink.srv.URL)
		t.Setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-from-env=yes")
		t.Setenv("OTEL_SERVICE_NAME", "env-named")
		p, err := Setup(context.Background(), Config{}, nil)
		if err != nil {
			t.Fatalf("Setup: %v", err)
		}
		if !p.Tracing() {
			t.Fatal("Tracing(): want true when OTEL_EXPORTER_OTLP_ENDPOINT is set")
		}
		_, s := p.StartServer(context.Background(), inbound(http.MethodPut, "/"), "")
		EndServer(s, 200, "")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Shutdown(ctx); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		got := sink.received()
		if len(got) != 1 || got[0].path != "/v1/traces" || got[0].headers.Get("X-From-Env") != "yes" || got[0].service != "env-named" {
			t.Fatalf("exports: want one to /v1/traces with X-From-Env and service env-named, have %+v", got)
		}
		if !reflect.DeepEqual(got[0].spans, []string{"PUT"}) {
			t.Errorf("spans: want [PUT], have %v", got[0].spans)
		}
	})
}

func TestSetGlobal(t *testing.T) {
	clearOTelEnv(t)
	var buf strings.Builder
	var mu sync.Mutex
	logger := slog.New(slog.NewTextHandler(writerFunc(func(b []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return buf.Write(b)
	}), nil))
	p, err := Setup(context.Background(), Config{Propagators: []string{"b3"}}, logger)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	defer p.Shutdown(context.Background())
	prevTP, prevProp := otel.GetTracerProvider(), otel.GetTextMapPropagator()
	defer func() {
		otel.SetTracerProvider(prevTP)
		otel.SetTextMapPropagator(prevProp)
		otel.SetErrorHandler(otel.ErrorHandlerFunc(func(error) {}))
	}()
	p.SetGlobal()
	if have := otel.GetTextMapPropagator().Fields(); !reflect.DeepEqual(have, p.Propagator.Fields()) {
		t.Errorf("global propagator fields: want %v, have %v", p.Propagator.Fields(), have)
	}
	otel.Handle(errors.New("export failed: connection refused"))
	mu.Lock()
	out := buf.String()
	mu.Unlock()
	if !strings.Contains(out, "level=WARN") || !strings.Contains(out, "export failed: connection refused") {
		t.Errorf("log: want a warn line with the OpenTelemetry error, have %q", out)
	}
	if !strings.Contains(out, "telemetry ready") {
		t.Errorf("log: want the setup summary line, have %q", out)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

// The lean path decides for a trace with no parent without the sampler:
// its decision must be the sampler's, for every sampler meshd can be given
// and every trace ID, or a trace would be started by one and dropped by
// the other.
func TestRootDecisionIsTheSamplers(t *testing.T) {
	clearOTelEnv(t)
	type setup struct {
		name string
		cfg  Config
		env  [2]string // OTEL_TRACES_SAMPLER and its argument
	}
	ratio := func(f float64) *float64 { return &f }
	var setups []setup
	for _, f := range []float64{0, 1e-12, 0.01, 0.25, 0.5, 0.999999, 1} {
		setups = append(setups, setup{name: fmt.Sprint("sample_ratio ", f), cfg: Config{SampleRatio: ratio(f)}})
	}
	for _, e := range [][2]string{{"", ""}, {"always_on", ""}, {"always_off", ""}, {"parentbased_always_on", ""},
		{"parentbased_always_off", ""}, {"traceidratio", "0.3"}, {"traceidratio", "0"}, {"parentbased_traceidratio", "0.01"},
		{"parentbased_traceidratio", "1"}} {
		setups = append(setups, setup{name: "OTEL_TRACES_SAMPLER=" + e[0] + " " + e[1], env: e})
	}
	rng := rand.New(rand.NewPCG(1, 2))
	ids := make([]trace.TraceID, 0, 20000)
	for len(ids) < cap(ids) {
		var tid trace.TraceID
		binary.BigEndian.PutUint64(tid[:8], rng.Uint64())
		binary.BigEndian.PutUint64(tid[8:], rng.Uint64())
		ids = append(ids, tid)
	}
	// IDs at the edges of each ratio's bound, where a rounding slip would
	// show, and at both ends of the range.
	edge := func(x uint64) trace.TraceID {
		var tid trace.TraceID
		tid[0] = 1
		binary.BigEndian.PutUint64(tid[8:], x<<1)
		return tid
	}
	ids = append(ids, edge(0), edge(1<<63-1))
	for _, f := range []float64{1e-12, 0.01, 0.25, 0.3, 0.5, 0.999999} {
		b := uint64(f * (1 << 63))
		for _, x := range []uint64{b - 1, b, b + 1} {
			ids = append(ids, edge(x))
		}
	}
	for _, s := range setups {
		t.Run(s.name, func(t *testing.T) {
			if s.env[0] != "" {
				t.Setenv("OTEL_TRACES_SAMPLER", s.env[0])
				t.Setenv("OTEL_TRACES_SAMPLER_ARG", s.env[1])
			}
			r, err := resolve(s.cfg)
			if err != nil {
				t.Fatal(err)
			}
			kept := 0
			for _, tid := range ids {
				res := r.sampler.ShouldSample(sdktrace.SamplingParameters{ParentContext: context.Background(), TraceID: tid, Name: "GET", Kind: trace.SpanKindServer})
				want := res.Decision != sdktrace.Drop
				if have := r.root.sample(tid); have != want {
					t.Fatalf("trace %s: the sampler keeps it %v, the lean path %v", tid, want, have)
				}
				if want {
					kept++
				}
			}
			t.Logf("%d of %d kept", kept, len(ids))
		})
	}
}
