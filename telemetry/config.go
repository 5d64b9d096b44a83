package telemetry

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"

	"go.opentelemetry.io/contrib/propagators/b3"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// Exporter names accepted in Config.Exporter and OTEL_TRACES_EXPORTER.
const (
	ExporterOTLP     = "otlp"      // OTLP; protocol from Config.Protocol or OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL
	ExporterOTLPGRPC = "otlp-grpc" // OTLP over gRPC
	ExporterOTLPHTTP = "otlp-http" // OTLP over HTTP with protobuf bodies
	ExporterConsole  = "console"   // human-readable spans on standard output
	ExporterNone     = "none"      // no trace export; spans are never recorded
)

// OTLP protocols accepted in Config.Protocol and OTEL_EXPORTER_OTLP_PROTOCOL.
const (
	ProtocolGRPC = "grpc"
	ProtocolHTTP = "http/protobuf"
)

// Config selects where traces go and how they are sampled and propagated.
// The zero value is valid: everything then comes from the standard OTEL_*
// environment variables, and without any of them tracing is off while metrics
// follow Config.Metrics.
//
// Precedence, highest first: a non-zero field of Config, then the matching
// OTEL_* environment variable, then the built-in default. Config is a plain
// value; Setup reads it once and does not keep it.
type Config struct {
	// ServiceName is the service.name resource attribute. Default: the
	// OTEL_SERVICE_NAME variable, then service.name in
	// OTEL_RESOURCE_ATTRIBUTES, then "meshd".
	ServiceName string
	// Exporter is one of otlp, otlp-grpc, otlp-http, console, none. Default:
	// OTEL_TRACES_EXPORTER, else otlp when an OTLP endpoint is configured
	// (Endpoint or OTEL_EXPORTER_OTLP_ENDPOINT / _TRACES_ENDPOINT), else none.
	Exporter string
	// Endpoint is the OTLP collector address: host:port, or a URL
	// (http://host:4318 — for otlp-http a URL without a path gets /v1/traces).
	// Default: the OTLP exporter's own reading of OTEL_EXPORTER_OTLP_ENDPOINT
	// and OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else localhost:4317 (gRPC) or
	// localhost:4318 (HTTP).
	Endpoint string
	// Protocol is grpc or http/protobuf, used when Exporter is otlp. Default:
	// OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, then OTEL_EXPORTER_OTLP_PROTOCOL,
	// then http/protobuf.
	Protocol string
	// Insecure forces plaintext (no TLS) to the collector. When false the
	// scheme of the endpoint and OTEL_EXPORTER_OTLP_(TRACES_)INSECURE decide.
	Insecure bool
	// Headers are sent with every export request (for example an API key).
	// When set they replace OTEL_EXPORTER_OTLP_(TRACES_)HEADERS entirely.
	Headers map[string]string
	// SampleRatio, when non-nil, samples that fraction (0..1) of new traces
	// and follows the caller's decision for traces that arrive with a parent
	// (parentbased_traceidratio). When nil: OTEL_TRACES_SAMPLER and
	// OTEL_TRACES_SAMPLER_ARG, else parentbased_always_on.
	SampleRatio *float64
	// Propagators lists the trace-context header formats read from incoming
	// and written to outgoing requests: tracecontext, baggage, b3 (single
	// header), b3multi, none. Default: OTEL_PROPAGATORS, else
	// tracecontext,baggage.
	Propagators []string
	// Metrics turns on the metric instruments and the Prometheus handler.
	Metrics bool
	// RecordQuery records query-string values in url.query and url.full. By
	// default every value is replaced by REDACTED and only the keys are kept;
	// even with RecordQuery the values of well-known signature parameters
	// (sig, X-Amz-Signature, ...) stay redacted.
	RecordQuery bool
}

// Validate reports every problem in c, each naming the offending key
// (telemetry.exporter, telemetry.protocol, ...). It does not look at
// environment variables; Setup reports bad ones.
func (c Config) Validate() []error {
	var errs []error
	if c.Exporter != "" {
		if _, ok := exporterKind(c.Exporter); !ok {
			errs = append(errs, fmt.Errorf("telemetry.exporter: unknown exporter %q (want otlp, otlp-grpc, otlp-http, console or none)", c.Exporter))
		}
	}
	if c.Protocol != "" {
		if err := checkProtocol(c.Protocol); err != nil {
			errs = append(errs, fmt.Errorf("telemetry.protocol: %w", err))
		}
	}
	if c.Endpoint != "" {
		if err := checkEndpoint(c.Endpoint); err != nil {
			errs = append(errs, fmt.Errorf("telemetry.endpoint: %w", err))
		}
	}
	for k := range c.Headers {
		if strings.TrimSpace(k) == "" {
			errs = append(errs, errors.New("telemetry.headers: empty header name"))
			break
		}
	}
	if c.SampleRatio != nil {
		if r := *c.SampleRatio; math.IsNaN(r) || r < 0 || r > 1 {
			errs = append(errs, fmt.Errorf("telemetry.sample_ratio: %v is outside 0..1", r))
		}
	}
	if len(c.Propagators) > 0 {
		if _, err := buildPropagator(c.Propagators); err != nil {
			errs = append(errs, fmt.Errorf("telemetry.propagators: %w", err))
		}
	}
	return errs
}

// exporterKind maps an exporter name to its canonical form.
func exporterKind(name string) (string, bool) {
	switch strings.ToLower(strings.TrimSpace(name)) {
	case ExporterOTLP:
		return ExporterOTLP, true
	case ExporterOTLPGRPC:
		return ExporterOTLPGRPC, true
	case ExporterOTLPHTTP:
		return ExporterOTLPHTTP, true
	case ExporterConsole, "logging", "stdout":
		return ExporterConsole, true
	case ExporterNone:
		return ExporterNone, true
	}
	return "", false
}

func checkProtocol(p string) error {
	switch p {
	case ProtocolGRPC, ProtocolHTTP:
		return nil
	case "http/json":
		return errors.New("http/json is not supported by the Go OTLP exporter (want grpc or http/protobuf)")
	}
	return fmt.Errorf("unknown protocol %q (want grpc or http/protobuf)", p)
}

func checkEndpoint(ep string) error {
	if strings.Contains(ep, "://") {
		u, err := url.Parse(ep)
		if err != nil {
			return fmt.Errorf("parse %q: %w", ep, err)
		}
		if u.Scheme != "http" && u.Scheme != "https" {
			return fmt.Errorf("%q: scheme must be http or https", ep)
		}
		if u.Host == "" {
			return fmt.Errorf("%q: no host", ep)
		}
		return nil
	}
	if _, _, err := net.SplitHostPort(ep); err != nil {
		return fmt.Errorf("%q: want host:port or a URL: %w", ep, err)
	}
	return nil
}

// resolved is Config after environment variables and defaults are applied.
type resolved struct {
	disabled    bool // OTEL_SDK_DISABLED
	exporters   []string
	protocol    string
	sampler     sdktrace.Sampler
	samplerDesc string
	// root decides, without the sampler, for a trace with no parent, as
	// the sampler would (rootKnown false: ask the sampler).
	root       rootDecider
	rootKnown  bool
	batch      batchConfig
	propagator propagation.TextMapPropagator
	propNames  []string
}

// resolve applies the environment to c. Errors name the key or variable.
func resolve(c Config) (resolved, error) {
	var r resolved
	if errs := c.Validate(); len(errs) > 0 {
		return r, errors.Join(errs...)
	}
	if v := strings.TrimSpace(os.Getenv("OTEL_SDK_DISABLED")); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return r, fmt.Errorf("OTEL_SDK_DISABLED: %q is not a boolean", v)
		}
		r.disabled = b
	}

	// Propagators.
	names := c.Propagators
	if len(names) == 0 {
		if v := strings.TrimSpace(os.Getenv("OTEL_PROPAGATORS")); v != "" {
			names = splitList(v)
		}
	}
	if len(names) == 0 {
		names = []string{"tracecontext", "baggage"}
	}
	prop, err := buildPropagator(names)
	if err != nil {
		if len(c.Propagators) == 0 {
			return r, fmt.Errorf("OTEL_PROPAGATORS: %w", err)
		}
		return r, fmt.Errorf("telemetry.propagators: %w", err)
	}
	r.propagator, r.propNames = prop, names

	// Sampler.
	if c.SampleRatio != nil {
		r.sampler = sdktrace.ParentBased(sdktrace.TraceIDRatioBased(*c.SampleRatio))
		r.samplerDesc = "parentbased_traceidratio:" + strconv.FormatFloat(*c.SampleRatio, 'g', -1, 64)
		r.root, r.rootKnown = newRootDecider(*c.SampleRatio), true
	} else {
		var root float64
		r.sampler, r.samplerDesc, root, err = samplerFromEnv()
		if err != nil {
			return r, err
		}
		r.root, r.rootKnown = newRootDecider(root), true
	}

	if r.batch, err = batchConfigFromEnv(); err != nil {
		return r, err
	}

	// Protocol.
	r.protocol = c.Protocol
	if r.protocol == "" {
		for _, k := range []string{"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"} {
			if v := strings.TrimSpace(os.Getenv(k)); v != "" {
				if err := checkProtocol(v); err != nil {
					return r, fmt.Errorf("%s: %w", k, err)
				}
				r.protocol = v
				break
			}
		}
	}
	if r.protocol == "" {
		r.protocol = ProtocolHTTP
	}

	// Exporters.
	switch {
	case c.Exporter != "":
		k, _ := exporterKind(c.Exporter)
		r.exporters = []string{k}
	case strings.TrimSpace(os.Getenv("OTEL_TRACES_EXPORTER")) != "":
		for _, n := range splitList(os.Getenv("OTEL_TRACES_EXPORTER")) {
			k, ok := exporterKind(n)
			if !ok {
				return r, fmt.Errorf("OTEL_TRACES_EXPORTER: unknown exporter %q (want otlp, console or none)", n)
			}
			r.exporters = append(r.exporters, k)
		}
	case c.Endpoint != "" || os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != "":
		r.exporters = []string{ExporterOTLP}
	}
	// "none" anywhere in the list wins, as the specification asks.
	kept := r.exporters[:0]
	for _, e := range r.exporters {
		if e == ExporterNone {
			kept = nil
			break
		}
		kept = append(kept, e)
	}
	r.exporters = kept
	for i, e := range r.exporters {
		if e == ExporterOTLP {
			if r.protocol == ProtocolGRPC {
				r.exporters[i] = ExporterOTLPGRPC
			} else {
				r.exporters[i] = ExporterOTLPHTTP
			}
		}
	}
	return r, nil
}

func splitList(v string) []string {
	var out []string
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// samplerFromEnv reads OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG. It
// also returns the share of traces with no parent the sampler keeps.
func samplerFromEnv() (sdktrace.Sampler, string, float64, error) {
	name := strings.ToLower(strings.TrimSpace(os.Getenv("OTEL_TRACES_SAMPLER")))
	arg := strings.TrimSpace(os.Getenv("OTEL_TRACES_SAMPLER_ARG"))
	ratio := func() (float64, error) {
		if arg == "" {
			return 1, nil
		}
		f, err := strconv.ParseFloat(arg, 64)
		if err != nil || math.IsNaN(f) || f < 0 || f > 1 {
			return 0, fmt.Errorf("OTEL_TRACES_SAMPLER_ARG: %q is not a ratio between 0 and 1", arg)
		}
		return f, nil
	}
	switch name {
	case "", "parentbased_always_on":
		return sdktrace.ParentBased(sdktrace.AlwaysSample()), "parentbased_always_on", 1, nil
	case "always_on":
		return sdktrace.AlwaysSample(), name, 1, nil
	case "always_off":
		return sdktrace.NeverSample(), name, 0, nil
	case "parentbased_always_off":
		return sdktrace.ParentBased(sdktrace.NeverSample()), name, 0, nil
	case "traceidratio":
		f, err := ratio()
		if err != nil {
			return nil, "", 0, err
		}
		return sdktrace.TraceIDRatioBased(f), name + ":" + strconv.FormatFloat(f, 'g', -1, 64), f, nil
	case "parentbased_traceidratio":
		f, err := ratio()
		if err != nil {
			return nil, "", 0, err
		}
		return sdktrace.ParentBased(sdktrace.TraceIDRatioBased(f)), name + ":" + strconv.FormatFloat(f, 'g', -1, 64), f, nil
	}
	return nil, "", 0, fmt.Errorf("OTEL_TRACES_SAMPLER: unsupported sampler %q (want always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio)", name)
}

// buildPropagator composes the named propagators in order.
func buildPropagator(names []string) (propagation.TextMapPropagator, error) {
	var ps []propagation.TextMapPropagator
	seen := make(map[string]bool, len(names))
	for _, n := range names {
		n = strings.ToLower(strings.TrimSpace(n))
		if seen[n] {
			continue
		}
		seen[n] = true
		switch n {
		case "tracecontext":
			ps = append(ps, propagation.TraceContext{})
		case "baggage":
			ps = append(ps, propagation.Baggage{})
		case "b3":
			ps = append(ps, b3.New(b3.WithInjectEncoding(b3.B3SingleHeader)))
		case "b3multi":
			ps = append(ps, b3.New(b3.WithInjectEncoding(b3.B3MultipleHeader)))
		case "none":
			if len(names) > 1 {
				return nil, errors.New(`"none" cannot be combined with other propagators`)
			}
		default:
			return nil, fmt.Errorf("unknown propagator %q (want tracecontext, baggage, b3, b3multi or none)", n)
		}
	}
	return propagation.NewCompositeTextMapPropagator(ps...), nil
}
