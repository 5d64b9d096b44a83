package telemetry

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"math/rand/v2"
	"net/http"
	"strings"
	"unsafe"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/baggage"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/embedded"
)

// Most requests a sidecar sees bring no trace context, and most of those
// are sampled out: at 1% sampling, 99 in 100 requests only need a trace ID
// and a span ID to pass on in traceparent, so that the services behind
// meshd join one trace and honour the decision. Through the SDK that took
// a tracer Start (options, sampler parameters, the span and its context)
// and a composite Inject, about 2 µs a request under load. The lean path
// below draws a trace ID itself and decides as the provider's sampler
// would (rootDecider: every sampler meshd can be configured with decides a
// trace with no parent by its ID alone); when the trace is dropped, it
// makes the span context and the traceparent line itself and the SDK
// never sees the request. When the trace is kept, the SDK starts the span
// as before, with the same trace ID (idGenerator), so its sampler answers
// the same.

// leanPropagators reports whether every propagator named is one the lean
// path can stand in for: W3C trace context, whose traceparent it writes,
// and baggage, which a request without baggage does not write at all.
func leanPropagators(names []string) (lean, traceContext bool) {
	for _, n := range names {
		switch strings.ToLower(strings.TrimSpace(n)) {
		case "tracecontext":
			traceContext = true
		case "baggage":
		default:
			return false, false
		}
	}
	return len(names) > 0, traceContext
}

// leanSpan is the span of a request that came without trace context and
// that the sampler dropped: not recording, with a valid span context that
// is not sampled. It is made by startLean and never changed afterwards
// (until the LeanRoom it may live in is reused), so it is safe for
// concurrent use.
type leanSpan struct {
	embedded.Span // (noop.Span would add a span context of its own: 80 B more a request)
	sc            trace.SpanContext
	tpro          trace.TracerProvider
	// traceparent is the line that tells an instance this span is its
	// parent, when trace context is propagated; shared by the attempts.
	// Its text is tp, written once before the span is shared.
	traceparent [1]string
	tp          [55]byte
}

// SpanContext returns the span's trace and span ID, not sampled.
func (s *leanSpan) SpanContext() trace.SpanContext { return s.sc }

// TracerProvider returns the provider that made the span.
func (s *leanSpan) TracerProvider() trace.TracerProvider { return s.tpro }

// IsRecording reports false: nothing is recorded.
func (*leanSpan) IsRecording() bool { return false }

// The rest do nothing, as on any span that does not record.
func (*leanSpan) End(...trace.SpanEndOption)              {}
func (*leanSpan) AddEvent(string, ...trace.EventOption)   {}
func (*leanSpan) AddLink(trace.Link)                      {}
func (*leanSpan) RecordError(error, ...trace.EventOption) {}
func (*leanSpan) SetStatus(codes.Code, string)            {}
func (*leanSpan) SetName(string)                          {}
func (*leanSpan) SetAttributes(...attribute.KeyValue)     {}

// LeanRoom is room for a request's span when the lean path starts it (see
// StartServerIn): the span and the context that carries it live here
// instead of in two heap objects, 208 bytes a request. A caller that keeps
// one LeanRoom per request it serves at a time, and reuses it, pays for
// neither.
//
// The context and span StartServerIn returns may point into the room: the
// caller must be done with both, and with whatever it handed them to
// (headers StartAttempt wrote included), before it starts another request
// in the same room. AccessLog hands its logger a copy that does not point
// into the room, since a log handler may keep the context it is given. The
// zero value is ready for use; a LeanRoom must not be copied once used.
type LeanRoom struct {
	_    noCopy
	span leanSpan
	ctx  leanCtx
}

// Holds reports whether span lives in r: if not, nothing of the request
// StartServerIn started is in the room, and the caller may reuse it at once.
func (r *LeanRoom) Holds(span trace.Span) bool { return span == trace.Span(&r.span) }

// noCopy makes go vet's copylocks check report a LeanRoom copied.
type noCopy struct{}

func (*noCopy) Lock()   {}
func (*noCopy) Unlock() {}

// outOfRoom returns ctx, or, when ctx is a LeanRoom's, a context with the
// same parent and span context that does not change when the room is
// reused (two allocations).
func outOfRoom(ctx context.Context) context.Context {
	if lc, ok := ctx.(*leanCtx); ok {
		return trace.ContextWithSpanContext(lc.Context, lc.span.sc)
	}
	return ctx
}

// leanCtx is a context that carries span as its current span, in a
// LeanRoom: what trace.ContextWithSpan makes, without the allocation.
type leanCtx struct {
	context.Context
	span *leanSpan
}

// Value returns the span for the trace package's key and asks the parent
// for any other.
func (c *leanCtx) Value(key any) any {
	if key == spanKey {
		return trace.Span(c.span)
	}
	return c.Context.Value(key)
}

// spanKey is the key the trace package keeps a context's span under,
// unexported there: found by asking trace.SpanFromContext about a context
// that notes what it is asked for. roomsWork says whether a leanCtx then
// carries its span as trace.ContextWithSpan's context would; if it ever
// does not (a new trace package that looks spans up otherwise), rooms are
// not used and the lean path allocates as before.
var (
	spanKey   any
	roomsWork bool
)

type keyProbe struct {
	context.Context
	asked []any
}

func (p *keyProbe) Value(key any) any {
	p.asked = append(p.asked, key)
	return nil
}

func init() {
	probe := &keyProbe{Context: context.Background()}
	trace.SpanFromContext(probe)
	if len(probe.asked) != 1 {
		return
	}
	spanKey = probe.asked[0]
	var room LeanRoom
	room.span.sc = trace.NewSpanContext(trace.SpanContextConfig{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{1}})
	room.ctx = leanCtx{Context: context.Background(), span: &room.span}
	got := trace.SpanFromContext(&room.ctx)
	roomsWork = got == trace.Span(&room.span) && trace.SpanContextFromContext(&room.ctx).Equal(room.span.sc)
}

// presetTrace is the context key under which startLean hands the SDK the
// trace ID it has already shown the sampler.
type presetTrace struct{}

// idGenerator is the SDK's ID generator for meshd's provider: random IDs,
// as the SDK's own, except that a root span started with a trace ID under
// presetTrace gets that ID. Safe for concurrent use.
type idGenerator struct{}

func (idGenerator) NewIDs(ctx context.Context) (trace.TraceID, trace.SpanID) {
	if tid, ok := ctx.Value(presetTrace{}).(trace.TraceID); ok && tid.IsValid() {
		return tid, newSpanID()
	}
	return newTraceID(), newSpanID()
}

func (idGenerator) NewSpanID(context.Context, trace.TraceID) trace.SpanID { return newSpanID() }

// newTraceID draws a random, valid trace ID. A variable so that a test can
// choose which IDs a sampler sees.
var newTraceID = func() trace.TraceID {
	var tid trace.TraceID
	for !tid.IsValid() {
		binary.NativeEndian.PutUint64(tid[:8], rand.Uint64())
		binary.NativeEndian.PutUint64(tid[8:], rand.Uint64())
	}
	return tid
}

// newSpanID draws a random, valid span ID.
func newSpanID() trace.SpanID {
	var sid trace.SpanID
	for !sid.IsValid() {
		binary.NativeEndian.PutUint64(sid[:], rand.Uint64())
	}
	return sid
}

// What startLean did.
const (
	leanNo     = iota // nothing: the SDK starts the span as usual
	leanDone          // started the span itself
	leanPreset        // the sampler keeps the trace: the SDK must start the span with the context startLean returned
)

// startLean starts the server span of a request with header h, named name,
// without the SDK when it can: the request brings no trace context or
// baggage, ctx holds neither, and the sampler drops the trace. Then it
// returns the context with the span and leanDone; both live in room when
// room is not nil. When the sampler keeps
// the trace it returns leanPreset and a context that makes the SDK use the
// trace ID the sampler saw, for that Start only (it must not become the
// request's context). Otherwise it returns ctx and leanNo.
func (p *Provider) startLean(ctx context.Context, h http.Header, name string, room *LeanRoom) (context.Context, trace.Span, int) {
	if _, ok := h["Traceparent"]; ok {
		return ctx, nil, leanNo
	}
	if _, ok := h["Baggage"]; ok {
		return ctx, nil, leanNo
	}
	if trace.SpanContextFromContext(ctx).IsValid() || baggage.FromContext(ctx).Len() > 0 {
		return ctx, nil, leanNo
	}
	tid := newTraceID()
	if p.root.sample(tid) {
		return context.WithValue(ctx, presetTrace{}, tid), nil, leanPreset
	}
	var s *leanSpan
	if room != nil && roomsWork {
		s = &room.span
	} else {
		room = nil
		s = new(leanSpan)
	}
	*s = leanSpan{
		sc:   trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: newSpanID()}),
		tpro: p.TracerProvider,
	}
	if p.leanTC {
		b := appendTraceparent(s.tp[:0], s.sc)
		if len(b) != len(s.tp) {
			panic("telemetry: traceparent is not 55 bytes") // the format is fixed; the array must hold it
		}
		// The line is the span's own bytes, written again only when
		// its LeanRoom is reused: by then the caller has dropped the
		// header it was injected into (see LeanRoom).
		s.traceparent[0] = unsafe.String(unsafe.SliceData(b), len(b))
	}
	if room != nil {
		room.ctx = leanCtx{Context: ctx, span: s}
		return &room.ctx, s, leanDone
	}
	return trace.ContextWithSpan(ctx, s), s, leanDone
}

// rootDecider decides for a trace with no parent, by its ID alone, what
// the samplers meshd can be given decide for it: a parent-based sampler
// defers to its root sampler, and the SDK's trace-ID ratio sampler keeps a
// trace when the ID's last 8 bytes, shifted right by one, fall under the
// ratio's share of 2^63
// (always_on is a ratio of 1, always_off of 0). Asking it costs none of
// the sampler's parameters and context look-ups.
type rootDecider struct {
	all   bool
	bound uint64
}

func newRootDecider(f float64) rootDecider {
	switch {
	case f >= 1:
		return rootDecider{all: true}
	case f <= 0:
		return rootDecider{}
	}
	return rootDecider{bound: uint64(f * (1 << 63))}
}

func (d rootDecider) sample(tid trace.TraceID) bool {
	return d.all || binary.BigEndian.Uint64(tid[8:16])>>1 < d.bound
}

// injectLean writes what p.Propagator would write for a lean span into h.
// It reports false, writing nothing, when ctx carries baggage, which only
// the propagator writes.
func (p *Provider) injectLean(ctx context.Context, s *leanSpan, h http.Header) bool {
	if baggage.FromContext(ctx).Len() > 0 {
		return false
	}
	if p.leanTC {
		h["Traceparent"] = s.traceparent[:]
	}
	return true
}

// appendTraceparent appends the W3C traceparent value for sc to b: version
// 00, the IDs in lower-case hex and the sampled flag, 55 bytes.
func appendTraceparent(b []byte, sc trace.SpanContext) []byte {
	tid, sid := sc.TraceID(), sc.SpanID()
	b = append(b, '0', '0', '-')
	b = hex.AppendEncode(b, tid[:])
	b = append(b, '-')
	b = hex.AppendEncode(b, sid[:])
	if sc.IsSampled() {
		return append(b, '-', '0', '1')
	}
	return append(b, '-', '0', '0')
}
