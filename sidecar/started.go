package sidecar

import (
	"context"
	"net"
	"net/http"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/resilience"
	"github.com/meshd/meshd/sidecar/h1"
	"github.com/meshd/meshd/telemetry"
)

// started is a request the event loop began and hands to forward: its
// server span, and the try it had under way, if any. forward goes on from
// there as if it had done those steps itself. Owned by one goroutine at a
// time: the loop's until the hand-over, forward's after.
type started struct {
	u         *upstream
	start     time.Time
	dedicated bool
	span      trace.Span
	// ctx is the loop's context of the request: the span, and what the
	// propagators took from the caller's headers (b3's deferred or debug
	// sampling, say), which the instance's requests must carry on.
	ctx context.Context
	try *openTry
}

// valuesFrom is a context with the deadline and cancellation of its
// parent and the values of vals first: a request's own context, with what
// the event loop put in the one it began the request with.
type valuesFrom struct {
	context.Context
	vals context.Context
}

func (c valuesFrom) Value(key any) any {
	if v := c.vals.Value(key); v != nil {
		return v
	}
	return c.Context.Value(key)
}

// openTry is a try the event loop began: the instance is picked, admitted
// by its breaker and counted in flight, and the attempt's span is started.
type openTry struct {
	ep       *balance.Endpoint
	h1       *h1.Transport      // the client the loop began with, for Resume
	tk       *resilience.Ticket // the breaker's report: the loop's etry.ticket
	aspan    trace.Span
	t0       time.Time
	deadline time.Time     // the try's own deadline; zero for none
	out      *http.Request // the request for the instance
	// sent is true once out was written on nc, at written; buffered is
	// what the instance answered so far, and reused says nc had served
	// an exchange before this one.
	sent     bool
	nc       net.Conn
	buffered []byte
	reused   bool
	written  time.Time
	// err, when set, is how the try ended before it was sent.
	err error
}

// abandon settles a request begun by the event loop that no one will
// finish (its connection could not be handed over, or was dropped by a
// shutdown first): as one whose caller went away.
func (st *started) abandon(s *Sidecar, r *http.Request) {
	ex := exchange{s: s, r: r, u: st.u, start: st.start, ctx: trace.ContextWithSpan(context.Background(), st.span)}
	if t := st.takeTry(); t != nil {
		ex.settleOpen(t)
	}
	ex.status, ex.errType = 499, telemetry.ErrTypeCanceled
	ex.record(st.span)
}

// takeTry returns the open try, once; nil when there is none.
func (st *started) takeTry() *openTry {
	if st == nil {
		return nil
	}
	t := st.try
	st.try = nil
	return t
}

// finish completes the try under ctx: sends it when it was not sent yet,
// otherwise reads the instance's answer on the connection it was sent on.
func (t *openTry) finish(ctx context.Context, tr *upstreamTransport) (*http.Response, error) {
	if t.err != nil {
		return nil, t.err
	}
	out := t.out.WithContext(ctx)
	if !t.sent {
		return tr.RoundTrip(out)
	}
	// The loop's client, not tr's: a reload may have left the upstream a
	// transport without one. (A retired client still reads answers.)
	return t.h1.Resume(out, t.nc, t.buffered, t.reused, t.written)
}
