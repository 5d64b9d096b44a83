package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/exporters/stdout/stdouttrace"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// ScopeName is the instrumentation scope of meshd's tracer and meter.
const ScopeName = "github.com/meshd/meshd/telemetry"

// Provider bundles the tracer, propagator and metrics of one meshd process.
// All fields are set by Setup and must not be changed afterwards; every
// method is safe for concurrent use. A nil *Provider is valid and does
// nothing: its Start methods return the context unchanged and a no-op span.
type Provider struct {
	// TracerProvider is the SDK provider, or a no-op one when tracing is off.
	TracerProvider trace.TracerProvider
	// Tracer creates meshd's spans.
	Tracer trace.Tracer
	// Propagator reads and writes trace context headers (tracecontext and
	// baggage unless configured otherwise).
	Propagator propagation.TextMapPropagator
	// Metrics records meshd's metrics. It is nil when metrics are off; its
	// methods accept a nil receiver and then do nothing.
	Metrics *Metrics
	// MetricsHandler serves the Prometheus text exposition for the admin
	// /metrics endpoint. When metrics are off it answers 404.
	MetricsHandler http.Handler

	tracing     bool // spans can be recorded; false means Start* are pass-through
	recordQuery bool
	// strip are the caller's trace headers removed before injecting:
	// every form of a format meshd writes in one form only (b3 single or
	// multiple headers), so that a form meshd does not write cannot reach
	// the instance beside the one it does and name the caller's span as
	// the parent.
	strip  []string
	logger *slog.Logger
	// sampler is the provider's sampler; lean is true when requests
	// without trace context may be started by startLean (the propagators
	// are only W3C trace context and baggage), leanTC when trace context
	// is among them.
	root         rootDecider // the sampler's decision for a trace with no parent
	lean, leanTC bool

	shutdownOnce sync.Once
	shutdownErr  error
	shutdowns    []func(context.Context) error
}

// Setup builds a Provider from cfg and the standard OTEL_* environment
// variables (see the package documentation for the full list and the
// precedence rules). logger receives one line describing the outcome and,
// after SetGlobal, exporter errors; nil discards them.
//
// Setup does not change any process-wide OpenTelemetry state; call SetGlobal
// for that. Call Shutdown before exit so buffered spans are sent.
func Setup(ctx context.Context, cfg Config, logger *slog.Logger) (*Provider, error) {
	return setup(ctx, cfg, logger, nil)
}

// NewTestProvider returns a Provider for tests: every span is sampled and
// handed synchronously to rec (no exporter, no background goroutine),
// metrics are on, and propagators and query recording follow cfg (other
// fields of cfg and the OTEL_* environment still apply, except that
// Exporter is forced to none). Call Shutdown when done.
func NewTestProvider(rec *tracetest.SpanRecorder, cfg Config) (*Provider, error) {
	cfg.Exporter = ExporterNone
	cfg.Metrics = true
	if cfg.SampleRatio == nil {
		one := 1.0
		cfg.SampleRatio = &one
	}
	var sp sdktrace.SpanProcessor
	if rec != nil {
		sp = rec
	}
	return setup(context.Background(), cfg, nil, sp)
}

// b3Headers are both forms of b3 propagation, single and multiple.
var b3Headers = []string{"B3", "X-B3-Traceid", "X-B3-Spanid", "X-B3-Sampled", "X-B3-Flags", "X-B3-Parentspanid"}

// stripFor lists the headers to remove before prop injects: all of b3's
// when prop writes either of its forms, and tracestate when it writes W3C
// trace context. A caller's tracestate belongs to its traceparent: when
// that was valid, the span context meshd continues carries the state and
// Inject writes it again; when it was not, meshd starts a new trace, and
// the old state must not ride along with it (W3C Trace Context).
func stripFor(prop propagation.TextMapPropagator) []string {
	if prop == nil {
		return nil
	}
	var strip []string
	b3, state := false, false
	for _, f := range prop.Fields() {
		for _, h := range b3Headers {
			if strings.EqualFold(f, h) {
				b3 = true
			}
		}
		if strings.EqualFold(f, "tracestate") {
			state = true
		}
	}
	if b3 {
		strip = append(strip, b3Headers...)
	}
	if state {
		strip = append(strip, "Tracestate")
	}
	return strip
}

func setup(ctx context.Context, cfg Config, logger *slog.Logger, extra sdktrace.SpanProcessor) (*Provider, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	r, err := resolve(cfg)
	if err != nil {
		return nil, fmt.Errorf("telemetry: %w", err)
	}
	p := &Provider{
		Propagator:  r.propagator,
		recordQuery: cfg.RecordQuery,
		logger:      logger,
		strip:       stripFor(r.propagator),
	}

	var res *resource.Resource
	if !r.disabled && (len(r.exporters) > 0 || extra != nil || cfg.Metrics) {
		res, err = buildResource(ctx, cfg.ServiceName)
		if err != nil {
			return nil, fmt.Errorf("telemetry: resource: %w", err)
		}
	}

	// Tracing.
	if r.disabled || (len(r.exporters) == 0 && extra == nil) {
		p.TracerProvider = noop.NewTracerProvider()
	} else {
		opts := []sdktrace.TracerProviderOption{
			sdktrace.WithResource(res),
			sdktrace.WithSampler(r.sampler),
			sdktrace.WithIDGenerator(idGenerator{}),
		}
		for _, name := range r.exporters {
			exp, err := newExporter(ctx, name, cfg)
			if err != nil {
				p.shutdownAll(ctx)
				return nil, fmt.Errorf("telemetry: exporter %s: %w", name, err)
			}
			opts = append(opts, sdktrace.WithSpanProcessor(newBatcher(exp, r.batch)))
		}
		if extra != nil {
			opts = append(opts, sdktrace.WithSpanProcessor(extra))
		}
		tp := sdktrace.NewTracerProvider(opts...)
		p.TracerProvider = tp
		p.tracing = true
		p.root = r.root
		p.lean, p.leanTC = leanPropagators(r.propNames)
		p.shutdowns = append(p.shutdowns, tp.Shutdown)
	}
	p.Tracer = p.TracerProvider.Tracer(ScopeName)

	// Metrics.
	if cfg.Metrics && !r.disabled {
		m, h, shutdown, err := newMetrics(res)
		if err != nil {
			p.shutdownAll(ctx)
			return nil, fmt.Errorf("telemetry: metrics: %w", err)
		}
		p.Metrics, p.MetricsHandler = m, h
		p.shutdowns = append(p.shutdowns, shutdown)
	} else {
		p.MetricsHandler = http.NotFoundHandler()
	}

	logger.LogAttrs(ctx, slog.LevelInfo, "telemetry ready",
		slog.Bool("tracing", p.tracing),
		slog.String("exporters", strings.Join(r.exporters, ",")),
		slog.String("sampler", r.samplerDesc),
		slog.String("propagators", strings.Join(r.propNames, ",")),
		slog.Bool("metrics", p.Metrics != nil),
		slog.Bool("sdk_disabled", r.disabled))
	return p, nil
}

// buildResource describes this process: service.name (Config, then
// OTEL_SERVICE_NAME, then OTEL_RESOURCE_ATTRIBUTES, then "meshd"), the SDK
// identity, and any OTEL_RESOURCE_ATTRIBUTES.
func buildResource(ctx context.Context, serviceName string) (*resource.Resource, error) {
	opts := []resource.Option{
		resource.WithSchemaURL(semconv.SchemaURL),
		resource.WithAttributes(semconv.ServiceName("meshd")),
		resource.WithTelemetrySDK(),
		resource.WithFromEnv(),
	}
	if serviceName != "" {
		opts = append(opts, resource.WithAttributes(semconv.ServiceName(serviceName)))
	}
	return resource.New(ctx, opts...)
}

func newExporter(ctx context.Context, name string, cfg Config) (sdktrace.SpanExporter, error) {
	switch name {
	case ExporterOTLPGRPC:
		var opts []otlptracegrpc.Option
		if cfg.Endpoint != "" {
			if strings.Contains(cfg.Endpoint, "://") {
				opts = append(opts, otlptracegrpc.WithEndpointURL(cfg.Endpoint))
			} else {
				opts = append(opts, otlptracegrpc.WithEndpoint(cfg.Endpoint))
			}
		}
		if cfg.Insecure {
			opts = append(opts, otlptracegrpc.WithInsecure())
		}
		if len(cfg.Headers) > 0 {
			opts = append(opts, otlptracegrpc.WithHeaders(cfg.Headers))
		}
		return otlptracegrpc.New(ctx, opts...)
	case ExporterOTLPHTTP:
		var opts []otlptracehttp.Option
		if cfg.Endpoint != "" {
			if strings.Contains(cfg.Endpoint, "://") {
				u, err := url.Parse(cfg.Endpoint)
				if err != nil {
					return nil, fmt.Errorf("endpoint %q: %w", cfg.Endpoint, err)
				}
				if u.Path == "" || u.Path == "/" {
					u.Path = "/v1/traces"
				}
				opts = append(opts, otlptracehttp.WithEndpointURL(u.String()))
			} else {
				opts = append(opts, otlptracehttp.WithEndpoint(cfg.Endpoint))
			}
		}
		if cfg.Insecure {
			opts = append(opts, otlptracehttp.WithInsecure())
		}
		if len(cfg.Headers) > 0 {
			opts = append(opts, otlptracehttp.WithHeaders(cfg.Headers))
		}
		return otlptracehttp.New(ctx, opts...)
	case ExporterConsole:
		return stdouttrace.New(stdouttrace.WithWriter(os.Stdout))
	}
	return nil, fmt.Errorf("unknown exporter %q", name)
}

// Tracing reports whether spans can be recorded (an SDK is installed and not
// disabled). When false, StartServer and StartAttempt cost nearly nothing
// and leave headers untouched, so trace headers the app sent pass through
// the proxy unchanged.
func (p *Provider) Tracing() bool { return p != nil && p.tracing }

// SetGlobal installs p's tracer provider and propagator as the process-wide
// OpenTelemetry defaults and routes OpenTelemetry's internal errors (failed
// exports, for example) to p's logger at warn level. Call it once from main.
func (p *Provider) SetGlobal() {
	if p == nil {
		return
	}
	otel.SetTracerProvider(p.TracerProvider)
	otel.SetTextMapPropagator(p.Propagator)
	l := p.logger
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
		l.Warn("opentelemetry", slog.String("error", err.Error()))
	}))
}

// Shutdown flushes buffered spans to the exporters and stops them and the
// metric pipeline. It honours ctx's deadline, is safe to call more than
// once (later calls return the first result) and from any goroutine.
func (p *Provider) Shutdown(ctx context.Context) error {
	if p == nil {
		return nil
	}
	p.shutdownOnce.Do(func() { p.shutdownErr = p.shutdownAll(ctx) })
	return p.shutdownErr
}

func (p *Provider) shutdownAll(ctx context.Context) error {
	var errs []error
	for i := len(p.shutdowns) - 1; i >= 0; i-- {
		if err := p.shutdowns[i](ctx); err != nil {
			errs = append(errs, err)
		}
	}
	p.shutdowns = nil
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("telemetry: shutdown: %w", err)
	}
	return nil
}
