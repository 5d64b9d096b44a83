package telemetry

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// meshd's own span attributes. See the package documentation for meanings.
const (
	AttrUpstream      = attribute.Key("meshd.upstream")
	AttrAlgorithm     = attribute.Key("meshd.lb.algorithm")
	AttrInstanceID    = attribute.Key("meshd.instance.id")
	AttrInstanceAddr  = attribute.Key("meshd.instance.address")
	AttrCandidates    = attribute.Key("meshd.lb.candidates")
	AttrReason        = attribute.Key("meshd.lb.reason")
	AttrScore         = attribute.Key("meshd.lb.score")
	AttrBreakerState  = attribute.Key("meshd.breaker.state")
	AttrAttempt       = attribute.Key("meshd.attempt")
	AttrCanceled      = attribute.Key("meshd.canceled")
	AttrRetryCause    = attribute.Key("meshd.retry.cause")
	AttrRetryBackoff  = attribute.Key("meshd.retry.backoff")
	AttrStaleSince    = attribute.Key("meshd.discovery.stale_since")
	AttrStaleFor      = attribute.Key("meshd.discovery.stale_for")
	AttrDiscoveryErr  = attribute.Key("meshd.discovery.error")
	AttrStatusClass   = attribute.Key("meshd.status_class")
	AttrDiscoverySrc  = attribute.Key("meshd.discovery.source")
	AttrBreakerFrom   = attribute.Key("meshd.breaker.from")
	AttrBreakerTo     = attribute.Key("meshd.breaker.to")
	attrNetworkProto  = semconv.NetworkProtocolVersionKey
	attrErrorType     = semconv.ErrorTypeKey
	attrStatusCode    = semconv.HTTPResponseStatusCodeKey
	attrRequestMethod = semconv.HTTPRequestMethodKey
	attrServerAddress = semconv.ServerAddressKey
	attrServerPort    = semconv.ServerPortKey
	attrURLScheme     = semconv.URLSchemeKey
)

// Span event names.
const (
	EventBreakerRejected = "meshd.breaker.rejected"
	EventRetry           = "meshd.retry"
	EventStaleDiscovery  = "meshd.discovery.stale"
	EventNoInstance      = "meshd.lb.no_instance"
)

// Error kinds for the errType arguments of EndServer, EndAttempt and
// Metrics.RequestDone, and the values ErrorType returns. Any other short,
// low-cardinality string is accepted too.
const (
	ErrTypeCanceled    = "canceled"     // the caller went away; not an upstream failure
	ErrTypeTimeout     = "timeout"      // a deadline passed
	ErrTypeConnect     = "connect"      // the connection could not be established
	ErrTypeReset       = "reset"        // the connection broke mid-exchange
	ErrTypeTLS         = "tls"          // TLS handshake or certificate failure
	ErrTypeBreakerOpen = "breaker_open" // every candidate's breaker refused
	ErrTypeNoInstance  = "no_instance"  // discovery had no usable instance
	ErrTypeOther       = "_OTHER"       // anything else
)

// Attempt describes one try of a request against one instance, for
// StartAttempt. Strings that are empty and Score when HasScore is false are
// left out of the span.
type Attempt struct {
	Upstream     string  // logical service name (meshd.upstream)
	Algorithm    string  // balancing algorithm that chose the instance
	InstanceID   string  // discovery ID of the chosen instance
	InstanceAddr string  // host:port dialled
	Candidates   int     // instances the picker could choose from
	Reason       string  // why this instance ("lowest ewma", "hash", ...)
	Score        float64 // the algorithm's score for the instance, if it has one
	HasScore     bool    // Score is meaningful
	Breaker      string  // breaker state when admitted: closed, open, half-open
	ResendCount  int     // 0 for the first attempt, 1 for the first retry, ...
}

var (
	serverStart = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindServer)}
	clientStart = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindClient)}
)

// StartServer starts the SERVER span for a request meshd received. It
// extracts the caller's trace context from r's headers with p.Propagator so
// the span continues the caller's trace. The span is named after the method,
// or "{method} {route}" when route is not empty (route must be a
// low-cardinality template such as the upstream name, never a raw path).
//
// Attributes are built only when the span is recording. A request that
// brings no trace context and that the sampler drops gets a span that is
// not recording, with a valid span context, made without the SDK (see
// lean.go). When tracing is off (or p is nil) it returns ctx unchanged and a
// no-op span. Safe for concurrent use. Finish the span with EndServer.
func (p *Provider) StartServer(ctx context.Context, r *http.Request, route string) (context.Context, trace.Span) {
	return p.StartServerIn(ctx, r, route, nil)
}

// StartServerIn is StartServer, with room for the span and its context
// when the request takes the lean path (see LeanRoom): then neither is a
// heap object of its own. room may be nil. Safe for concurrent use with
// distinct rooms.
func (p *Provider) StartServerIn(ctx context.Context, r *http.Request, route string, room *LeanRoom) (context.Context, trace.Span) {
	if p == nil || !p.tracing {
		return ctx, noop.Span{}
	}
	method, known := normalizeMethod(r.Method)
	name := method
	if !known {
		name = "HTTP"
	}
	var span trace.Span
	if p.lean {
		sctx, lean, did := p.startLean(ctx, r.Header, name, room)
		switch did {
		case leanDone:
			return sctx, lean
		case leanPreset:
			// Kept by the sampler: the SDK starts the span with the
			// trace ID startLean drew, under the caller's context.
			_, span = p.Tracer.Start(sctx, name, serverStart...)
			ctx = trace.ContextWithSpan(ctx, span)
		}
	}
	if span == nil {
		ctx = p.Propagator.Extract(ctx, headerCarrier(r.Header))
		ctx, span = p.Tracer.Start(ctx, name, serverStart...)
	}
	if !span.IsRecording() {
		return ctx, span
	}
	if route != "" {
		span.SetName(name + " " + route)
	}
	attrs := make([]attribute.KeyValue, 0, 16)
	attrs = append(attrs, attrRequestMethod.String(method))
	if !known {
		attrs = append(attrs, semconv.HTTPRequestMethodOriginal(r.Method))
	}
	scheme := "http"
	if r.URL != nil && r.URL.Scheme != "" {
		scheme = r.URL.Scheme
	} else if r.TLS != nil {
		scheme = "https"
	}
	attrs = append(attrs, semconv.URLScheme(scheme))
	if r.URL != nil {
		attrs = append(attrs, semconv.URLPath(r.URL.Path))
		if r.URL.RawQuery != "" {
			attrs = append(attrs, semconv.URLQuery(redactQuery(r.URL.RawQuery, p.recordQuery)))
		}
	}
	if route != "" {
		attrs = append(attrs, semconv.HTTPRoute(route))
	}
	if host, port := splitHostPort(r.Host, scheme); host != "" {
		attrs = append(attrs, semconv.ServerAddress(host))
		if port > 0 {
			attrs = append(attrs, semconv.ServerPort(port))
		}
	}
	peer, peerPort := splitHostPort(r.RemoteAddr, "")
	if peer != "" {
		attrs = append(attrs, semconv.NetworkPeerAddress(peer))
		if peerPort > 0 {
			attrs = append(attrs, semconv.NetworkPeerPort(peerPort))
		}
	}
	if c := clientAddress(r.Header.Get("X-Forwarded-For")); c != "" {
		attrs = append(attrs, semconv.ClientAddress(c))
	} else if peer != "" {
		attrs = append(attrs, semconv.ClientAddress(peer))
	}
	if ua := r.UserAgent(); ua != "" {
		attrs = append(attrs, semconv.UserAgentOriginal(ua))
	}
	if v := protoVersion(r); v != "" {
		attrs = append(attrs, attrNetworkProto.String(v))
	}
	span.SetAttributes(attrs...)
	return ctx, span
}

// Replaced lists the trace fields of a caller's request that StartAttempt
// removes from out.Header before it injects its own: both forms of b3 when
// b3 is propagated (a caller of the other form must not win as the
// instance's parent), tracestate when W3C trace context is (Inject writes
// it again when the caller's trace goes on). Who sends the caller's fields without putting
// them in out.Header must leave these out. nil when tracing is off. The
// slice is shared: do not modify it. Safe for concurrent use.
func (p *Provider) Replaced() []string {
	if p == nil || !p.tracing {
		return nil
	}
	return p.strip
}

// StartAttempt starts the CLIENT span for one attempt of forwarding a
// request to an instance, as a child of the span in ctx, and injects the new
// span's context into out.Header with p.Propagator so the instance continues
// the trace. Call it once per attempt, retries included (a.ResendCount > 0
// adds http.request.resend_count). The span is named after out's method.
//
// server.address and server.port come from out.URL (the origin the request
// is addressed to), network.peer.* from a.InstanceAddr. Attributes are built
// only when the span is recording; when tracing is off (or p is nil) it
// returns ctx unchanged, leaves out untouched and returns a no-op span. Safe
// for concurrent use. Finish the span with EndAttempt.
func (p *Provider) StartAttempt(ctx context.Context, out *http.Request, a Attempt) (context.Context, trace.Span) {
	if p == nil || !p.tracing {
		return ctx, noop.Span{}
	}
	method, known := normalizeMethod(out.Method)
	name := method
	if !known {
		name = "HTTP"
	}
	if out.Header == nil {
		out.Header = make(http.Header)
	}
	for _, k := range p.strip {
		delete(out.Header, k)
	}
	parent := trace.SpanFromContext(ctx)
	if lean, ok := parent.(*leanSpan); ok && p.injectLean(ctx, lean, out.Header) {
		return ctx, parent // as below, with the line made once
	}
	if !parent.IsRecording() && parent.SpanContext().IsValid() {
		// Not sampled: the attempt's span would be sampled out too
		// (with each sampler meshd can be given: a parent-based one
		// follows the request's span, a ratio decides by the trace ID
		// they share, always_off never samples), so none is made. The
		// instance is told the request's span as its parent, with the
		// same trace and flags; neither span reaches a backend. That is
		// most requests, and the SDK's span cost more than the rest of
		// the attempt's bookkeeping.
		p.Propagator.Inject(ctx, headerCarrier(out.Header))
		return ctx, parent
	}
	ctx, span := p.Tracer.Start(ctx, name, clientStart...)
	p.Propagator.Inject(ctx, headerCarrier(out.Header))
	if !span.IsRecording() {
		return ctx, span
	}
	attrs := make([]attribute.KeyValue, 0, 20)
	attrs = append(attrs, attrRequestMethod.String(method))
	if !known {
		attrs = append(attrs, semconv.HTTPRequestMethodOriginal(out.Method))
	}
	if out.URL != nil {
		attrs = append(attrs, semconv.URLFull(fullURL(out.URL, p.recordQuery)))
		if host, port := splitHostPort(out.URL.Host, out.URL.Scheme); host != "" {
			attrs = append(attrs, semconv.ServerAddress(host))
			if port > 0 {
				attrs = append(attrs, semconv.ServerPort(port))
			}
		}
	}
	if host, port := splitHostPort(a.InstanceAddr, ""); host != "" {
		attrs = append(attrs, semconv.NetworkPeerAddress(host))
		if port > 0 {
			attrs = append(attrs, semconv.NetworkPeerPort(port))
		}
	}
	if a.ResendCount > 0 {
		attrs = append(attrs, semconv.HTTPRequestResendCount(a.ResendCount))
	}
	attrs = appendNonEmpty(attrs, AttrUpstream, a.Upstream)
	attrs = appendNonEmpty(attrs, AttrAlgorithm, a.Algorithm)
	attrs = appendNonEmpty(attrs, AttrInstanceID, a.InstanceID)
	attrs = appendNonEmpty(attrs, AttrInstanceAddr, a.InstanceAddr)
	attrs = append(attrs, AttrCandidates.Int(a.Candidates))
	attrs = appendNonEmpty(attrs, AttrReason, a.Reason)
	if a.HasScore {
		attrs = append(attrs, AttrScore.Float64(a.Score))
	}
	attrs = appendNonEmpty(attrs, AttrBreakerState, a.Breaker)
	attrs = append(attrs, AttrAttempt.Int(a.ResendCount+1))
	span.SetAttributes(attrs...)
	return ctx, span
}

// EndServer finishes a span from StartServer. status is the status code
// sent to the caller (0 if none was sent); errType is empty on success or
// one of the ErrType* kinds. Statuses of 500 and above, and any errType
// except ErrTypeCanceled, mark the span as an error and set error.type (the
// status code as a string unless errType is given). A cancelled caller sets
// meshd.canceled=true and leaves the status unset. Safe on no-op spans.
func EndServer(span trace.Span, status int, errType string) { endHTTP(span, status, errType, 500) }

// EndAttempt finishes a span from StartAttempt. status is the status code
// the instance returned (0 if none); errType as for EndServer. Statuses of
// 400 and above mark a client span as an error, as the HTTP semantic
// conventions ask. Safe on no-op spans.
func EndAttempt(span trace.Span, status int, errType string) { endHTTP(span, status, errType, 400) }

func endHTTP(span trace.Span, status int, errType string, errorFrom int) {
	if !span.IsRecording() {
		span.End()
		return
	}
	if status > 0 {
		span.SetAttributes(attrStatusCode.Int(status))
	}
	switch {
	case errType == ErrTypeCanceled:
		span.SetAttributes(AttrCanceled.Bool(true))
	case errType != "":
		span.SetAttributes(attrErrorType.String(errType))
		span.SetStatus(codes.Error, errType)
	case status >= errorFrom:
		span.SetAttributes(attrErrorType.String(statusString(status)))
		span.SetStatus(codes.Error, "")
	}
	span.End()
}

// BreakerRejected records on span (normally the server span: a rejected
// attempt sends nothing and has no client span) that the breaker of
// instanceID, in state, refused the request.
func BreakerRejected(span trace.Span, instanceID, state string) {
	if !span.IsRecording() {
		return
	}
	span.AddEvent(EventBreakerRejected, trace.WithAttributes(
		AttrInstanceID.String(instanceID), AttrBreakerState.String(state)))
}

// Retrying records on span that attempt number attempt (2 for the first
// retry) will be made after backoff because of cause, the retry.on
// condition that allowed it (for example "503", "timeout",
// "connect-failure").
func Retrying(span trace.Span, attempt int, cause string, backoff time.Duration) {
	if !span.IsRecording() {
		return
	}
	span.AddEvent(EventRetry, trace.WithAttributes(
		AttrAttempt.Int(attempt), AttrRetryCause.String(cause),
		AttrRetryBackoff.Float64(backoff.Seconds())))
}

// StaleDiscovery records on span that the instance set of upstream used for
// this request is stale: discovery has failed since since with lastErr.
func StaleDiscovery(span trace.Span, upstream string, since time.Time, lastErr string) {
	if !span.IsRecording() {
		return
	}
	span.AddEvent(EventStaleDiscovery, trace.WithAttributes(
		AttrUpstream.String(upstream),
		AttrStaleSince.String(since.UTC().Format(time.RFC3339Nano)),
		AttrStaleFor.Float64(time.Since(since).Seconds()),
		AttrDiscoveryErr.String(lastErr)))
}

// NoInstance records on span that no instance could be chosen, and why.
func NoInstance(span trace.Span, reason string) {
	if !span.IsRecording() {
		return
	}
	span.AddEvent(EventNoInstance, trace.WithAttributes(AttrReason.String(reason)))
}

// ErrorType classifies a transport error into one of the ErrType* kinds:
// "" for nil, ErrTypeCanceled for context.Canceled, ErrTypeTimeout for
// deadlines and network timeouts, ErrTypeConnect for dial failures,
// ErrTypeReset for connections that broke, ErrTypeTLS for TLS failures and
// ErrTypeOther otherwise.
func ErrorType(err error) string {
	if err == nil {
		return ""
	}
	if errors.Is(err, context.Canceled) {
		return ErrTypeCanceled
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return ErrTypeTimeout
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return ErrTypeTimeout
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return ErrTypeConnect
	}
	switch {
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return ErrTypeConnect
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ECONNABORTED),
		errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return ErrTypeReset
	}
	var rh tls.RecordHeaderError
	var cv *tls.CertificateVerificationError
	var ae tls.AlertError
	if errors.As(err, &rh) || errors.As(err, &cv) || errors.As(err, &ae) {
		return ErrTypeTLS
	}
	return ErrTypeOther
}

// normalizeMethod returns the method as recorded in http.request.method and
// whether it is one the HTTP semantic conventions know.
func normalizeMethod(m string) (string, bool) {
	switch m {
	case http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodHead,
		http.MethodOptions, http.MethodPatch, http.MethodConnect, http.MethodTrace:
		return m, true
	case "":
		return http.MethodGet, true // net/http's meaning of an empty method
	}
	return "_OTHER", false
}

func appendNonEmpty(attrs []attribute.KeyValue, k attribute.Key, v string) []attribute.KeyValue {
	if v == "" {
		return attrs
	}
	return append(attrs, k.String(v))
}

// splitHostPort splits "host:port", "host", "[v6]:port" or "[v6]". When
// there is no port, the default port of scheme is returned (0 if unknown).
func splitHostPort(hp, scheme string) (string, int) {
	if hp == "" {
		return "", 0
	}
	host, portStr, err := net.SplitHostPort(hp)
	if err != nil {
		host = strings.TrimSuffix(strings.TrimPrefix(hp, "["), "]")
		switch scheme {
		case "http":
			return host, 80
		case "https":
			return host, 443
		}
		return host, 0
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		port = 0
	}
	return host, port
}

// clientAddress returns the first address of an X-Forwarded-For value.
func clientAddress(xff string) string {
	if xff == "" {
		return ""
	}
	first, _, _ := strings.Cut(xff, ",")
	return strings.TrimSpace(first)
}

func protoVersion(r *http.Request) string {
	switch {
	case r.ProtoMajor == 1 && r.ProtoMinor == 1:
		return "1.1"
	case r.ProtoMajor == 2:
		return "2"
	case r.ProtoMajor == 1 && r.ProtoMinor == 0:
		return "1.0"
	case r.ProtoMajor == 3:
		return "3"
	}
	return ""
}

// sensitiveQueryKeys are always redacted, following the HTTP semantic
// conventions' list of signature parameters (matched case-sensitively).
var sensitiveQueryKeys = [...]string{
	"AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature",
	"X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token",
}

func isSensitiveKey(k string) bool {
	for _, s := range sensitiveQueryKeys {
		if k == s {
			return true
		}
	}
	return false
}

// redactQuery returns raw with every value replaced by REDACTED, keys kept.
// With keep, only the sensitive keys' values are replaced.
func redactQuery(raw string, keep bool) string {
	if raw == "" {
		return ""
	}
	if keep {
		sensitive := false
		for rest := raw; rest != "" && !sensitive; {
			var part string
			part, rest, _ = strings.Cut(rest, "&")
			k, _, _ := strings.Cut(part, "=")
			sensitive = isSensitiveKey(k)
		}
		if !sensitive {
			return raw
		}
	}
	var b strings.Builder
	b.Grow(len(raw) + 16)
	first := true
	for rest := raw; rest != ""; {
		var part string
		part, rest, _ = strings.Cut(rest, "&")
		if !first {
			b.WriteByte('&')
		}
		first = false
		k, v, hasValue := strings.Cut(part, "=")
		b.WriteString(k)
		if !hasValue {
			continue
		}
		b.WriteByte('=')
		if keep && !isSensitiveKey(k) {
			b.WriteString(v)
		} else {
			b.WriteString("REDACTED")
		}
	}
	return b.String()
}

// fullURL renders u for url.full: credentials replaced, fragment dropped,
// query redacted unless keep.
func fullURL(u *url.URL, keep bool) string {
	var b strings.Builder
	b.Grow(len(u.Scheme) + len(u.Host) + len(u.Path) + len(u.RawQuery) + 24)
	scheme := u.Scheme
	if scheme == "" {
		scheme = "http"
	}
	b.WriteString(scheme)
	b.WriteString("://")
	if u.User != nil {
		b.WriteString("REDACTED:REDACTED@")
	}
	b.WriteString(u.Host)
	if p := u.EscapedPath(); p != "" {
		b.WriteString(p)
	} else {
		b.WriteByte('/')
	}
	if u.RawQuery != "" {
		b.WriteByte('?')
		b.WriteString(redactQuery(u.RawQuery, keep))
	}
	return b.String()
}

// statusStrings holds the decimal strings of 100..599 so error.type needs no
// allocation per request.
var statusStrings = func() []string {
	s := make([]string, 600)
	for i := 100; i < 600; i++ {
		s[i] = strconv.Itoa(i)
	}
	return s
}()

func statusString(code int) string {
	if code >= 100 && code < 600 {
		return statusStrings[code]
	}
	return strconv.Itoa(code)
}
