package sidecar

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/resilience"
	"github.com/meshd/meshd/sidecar/h1"
	"github.com/meshd/meshd/telemetry"
)

// proxyHandler serves the outbound listener and the dedicated per-upstream listeners.
type proxyHandler struct {
	s *Sidecar
	l *listener
}

func (h *proxyHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s := h.s
	start := time.Now()
	u, rerr := s.route(r, h.l)
	if rerr != nil {
		s.reject(w, r, nil, rerr.status, rerr.msg, start)
		return
	}
	u.requests.Add(1)
	u.lastUsed.Store(start.UnixNano())
	if r.Method == http.MethodConnect {
		s.tunnel(w, r, u, start)
		return
	}
	s.forward(w, r, u, start, h.l.fixed.Load() != nil, nil)
}

// forward sends r to an instance of u and streams the response back. Each
// try picks an instance the request has not tried, passes its circuit
// breaker, and gets what is left of the request's time budget; failed tries
// are retried as the upstream's retry policy and budget allow. pre, when
// not nil, is a request the event loop began: its span, and perhaps its
// first try, are taken over.
func (s *Sidecar) forward(w http.ResponseWriter, r *http.Request, u *upstream, start time.Time, dedicated bool, pre *started) {
	var ctx context.Context
	var span trace.Span
	if pre != nil {
		span = pre.span
		ctx = trace.ContextWithSpan(r.Context(), span)
		if pre.ctx != nil {
			ctx = valuesFrom{Context: r.Context(), vals: pre.ctx}
		}
	} else {
		ctx, span = s.tel.StartServer(r.Context(), r, "")
	}
	m := metricsOf(s.tel)
	ex := exchange{s: s, w: w, r: r, u: u, start: start, ctx: ctx}
	// The event loop's open try, if any: settled by the loop below, or,
	// when the request ends before it gets there, here.
	first := pre.takeTry()
	defer func() {
		if first != nil {
			ex.settleOpen(first)
		}
		ex.record(span)
		if ex.silent {
			// Recorded; now make sure the server sends nothing.
			panic(http.ErrAbortHandler)
		}
		ex.boundDiscard()
	}()
	ctx = &interimCtx{Context: ctx, w: w, r: r}
	g := u.guard
	rc := g.Config()
	budget, err := rc.Timeouts.Budget(r)
	if err != nil {
		ex.fail(http.StatusBadRequest, "", err.Error())
		return
	}
	if budget > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, start.Add(budget))
		defer cancel()
		ex.ctx = ctx
	}
	set := u.settings.Load()
	snap := u.pool.Load()
	ex.snap = snap
	if stale, since, err := u.stale(); stale {
		telemetry.StaleDiscovery(span, u.name, since, err.Error())
	}
	if len(snap.Endpoints) == 0 && first == nil {
		reason := snap.Reason
		if reason == "" {
			reason = "discovery has not answered yet"
			if stale, _, err := u.stale(); stale {
				reason = "discovery failing: " + err.Error()
			}
		}
		telemetry.NoInstance(span, reason)
		ex.fail(http.StatusBadGateway, telemetry.ErrTypeNoInstance, "upstream "+quote(u.name)+" has no instances: "+reason)
		return
	}
	cfg := s.cfg.Load()
	hdr := make(http.Header, len(r.Header)+2)
	copyEndToEnd(hdr, r.Header)
	delete(hdr, http.CanonicalHeaderKey(rc.Timeouts.Header))
	upgrade := upgradeType(r.Header)
	if upgrade != "" {
		hdr["Connection"] = []string{"Upgrade"}
		hdr["Upgrade"] = []string{upgrade}
	}
	if wantsTrailers(r.Header) {
		hdr["Te"] = []string{"trailers"}
	}
	peer := remoteIP(r)
	if cfg.Proxy.XForwardedOn() {
		// The local app's own X-Forwarded-Proto is kept; a remote
		// caller's, on the inbound listener, is not: meshd knows the hop.
		setForwarded(hdr, r, peer, u.inboundAddr == "")
	}
	clientIP := peer
	if cfg.Proxy.TrustForwardedFor {
		if ip, ok := firstForwarded(r.Header); ok {
			clientIP = ip
		}
	}
	host := r.Host
	if dedicated {
		host = u.name
	}
	limit := rc.Retry.BufferBody
	if rc.Retry.Disabled {
		limit = 0
	}
	var body *reqBody
	if hasBody(r) {
		if r.ProtoMajor == 1 {
			// An instance may answer while the upload still comes in
			// (an echo, a stream): let the answer through instead of
			// net/http's server first waiting to discard the body.
			// (meshd's own HTTP/1.1 server is full duplex already.)
			http.NewResponseController(w).EnableFullDuplex()
		}
		// The caller's body is read while buffering it and, past the
		// buffer, while a try is sent. If the caller stalls, the budget
		// ending (or the caller leaving) must end that read, whichever
		// transport is reading: net/http's Transport waits for its body
		// write before RoundTrip returns.
		ab := newAbortableBody(r.Body, w, r.Context(), r.ContentLength)
		ex.ab = ab
		stop := context.AfterFunc(ctx, ab.AbortRead)
		defer func() {
			stop()
			ab.settle(body != nil && body.used)
		}()
	}
	body, err = prepareBody(r, ex.ab, limit)
	if err != nil {
		ex.bodyFailed(err)
		return
	}
	if first == nil {
		g.RequestStarted()
	}
	preq := balance.Request{HTTP: r, ClientIP: clientIP}
	rejected := 0
	var lastErr error
	var own resilience.Ticket // the breaker's report of this path's tries
	for {
		if ctx.Err() != nil && first == nil {
			// (An open try ending with the budget is settled as its
			// own timeout first, as one of forward's own would be.)
			ex.failCtx(lastErr)
			return
		}
		var (
			ep        *balance.Endpoint
			tk        *resilience.Ticket
			tryCtx    context.Context
			cancelTry context.CancelFunc
			aspan     trace.Span
			t0        time.Time
			resp      *http.Response
			err       error
		)
		if first != nil {
			// The event loop's try, taken over where it stands.
			ep, tk, aspan, t0 = first.ep, first.tk, first.aspan, first.t0
			preq.Exclude(ep)
			ex.tries++
			ex.instance = ep.ID
			tryCtx = ctx
			if !first.deadline.IsZero() {
				tryCtx, cancelTry = context.WithDeadline(ctx, first.deadline)
			}
			resp, err = first.finish(tryCtx, set.transport)
			first = nil
		} else {
			preq.Now = time.Now().UnixNano()
			preq.IgnoreHealth = g.FailOpen(len(snap.Endpoints))
			ep, err = snap.Picker.Pick(&preq)
			if errors.Is(err, balance.ErrNoneAvailable) && ex.tries > 0 && preq.Tried() >= len(snap.Endpoints) {
				// Every instance has been tried: a retry may go to one again.
				preq.ClearExcluded()
				ep, err = snap.Picker.Pick(&preq)
			}
			if err != nil {
				if ex.held != nil {
					ex.passHeld("found no other instance to try")
					return
				}
				msg := "no available instance of " + quote(u.name) + ": " + err.Error()
				if errors.Is(err, balance.ErrNoneAvailable) {
					msg += " (" + unavailableWhy(snap.Endpoints, preq.Tried()) + ")"
				}
				if lastErr != nil {
					msg += "; last error: " + lastErr.Error()
				}
				ex.fail(http.StatusServiceUnavailable, telemetry.ErrTypeBreakerOpen, msg)
				return
			}
			preq.Exclude(ep)
			// The request's tries run one after another, each reported
			// before the next is admitted: they share one ticket.
			tk = &own
			if preq.IgnoreHealth {
				g.AdmitForcedTo(ep.Stats, tk)
			} else if err = g.AdmitTo(ep.Stats, tk); err != nil {
				telemetry.BreakerRejected(span, ep.ID, ep.Breaker().String())
				if rejected++; rejected > len(snap.Endpoints) {
					if ex.held != nil {
						ex.passHeld("found no other instance to try")
						return
					}
					ex.fail(http.StatusServiceUnavailable, telemetry.ErrTypeBreakerOpen, "no available instance of "+quote(u.name)+": "+err.Error())
					return
				}
				continue
			}
			ex.tries++
			ex.instance = ep.ID
			ep.MarkPicked(preq.Now)
			tryCtx, cancelTry = ctx, nil
			if tt := rc.Timeouts.TryTimeout(remaining(ctx)); tt > 0 {
				tryCtx, cancelTry = context.WithTimeout(ctx, tt)
				if body.stream != nil {
					// The try's end must also end a read stalled on the
					// caller: net/http's Transport does not return before
					// its body write does. (Ending the try ourselves stops
					// this first.)
					stop, cancel := context.AfterFunc(tryCtx, ex.ab.AbortRead), cancelTry
					cancelTry = func() { stop(); cancel() }
				}
			}
			if ex.tries > 1 {
				// The try before may still be read by its transport (a
				// held answer's body is open, and net/http asks that a
				// request not change until then); this one, whose
				// attempt span injects its own trace context, gets its
				// own header map.
				hdr = hdr.Clone()
			}
			out := outgoing(tryCtx, r, ep.Address, host, hdr, body)
			_, aspan = s.tel.StartAttempt(tryCtx, out, telemetry.Attempt{
				Upstream: u.name, Algorithm: set.algorithm, InstanceID: ep.ID, InstanceAddr: ep.Address,
				Candidates: preq.Candidates, Reason: preq.Reason, Score: preq.Score, HasScore: preq.Score != 0,
				Breaker: ep.Breaker().String(), ResendCount: ex.tries - 1,
			})
			ep.InFlight.Add(1)
			m.InFlight(u.name, 1)
			t0 = time.Now()
			resp, err = set.transport.RoundTrip(out)
		}
		var cbe *clientBodyError
		if err != nil {
			cbe = asClientBodyError(err)
		}
		switch {
		case err == nil:
		case ex.ab != nil && ex.ab.wasAborted():
			// The budget ended while meshd waited on the caller's body: a
			// timeout, but the caller's, not the instance's.
			ex.endTry(ep, tk, g.Classify(canceledCtx, err, 0), aspan, 0, t0, cancelTry)
			ex.fail(http.StatusGatewayTimeout, telemetry.ErrTypeTimeout, "upstream "+quote(u.name)+": request timed out while the caller's body stalled")
			return
		case cbe != nil:
			// The caller's body broke off or was malformed: not the
			// instance's fault either.
			ex.endTry(ep, tk, g.Classify(canceledCtx, err, 0), aspan, 0, t0, cancelTry)
			if cbe.callerGone() || ex.callerCtx().Err() != nil {
				ex.callerLeftMidBody()
				return
			}
			ex.closeConn()
			ex.fail(http.StatusBadRequest, "", cbe.Error())
			return
		}
		if err != nil {
			o := g.Classify(ex.callerCtx(), err, 0)
			ex.endTry(ep, tk, o, aspan, 0, t0, cancelTry)
			if o.Canceled() {
				ex.callerWentAway()
				return
			}
			lastErr = fmt.Errorf("%s: %s", ep.Address, errText(err))
			if ex.retry(span, g, o, body.replayable()) {
				continue
			}
			status := http.StatusBadGateway
			if o.Kind() == resilience.KindTimeout {
				status = http.StatusGatewayTimeout
			}
			ex.fail(status, o.Kind(), "upstream "+quote(u.name)+" instance "+lastErr.Error())
			return
		}
		now := time.Now()
		ep.ObserveLatencyAt(now.Sub(t0), now.UnixNano(), balance.DecayOf(snap.Policy))
		o := g.Classify(ex.callerCtx(), nil, resp.StatusCode)
		if (o.Failure() || resp.StatusCode >= 400) && resp.StatusCode != http.StatusSwitchingProtocols {
			// A failing status, or one retry.on names (a 429, a 500 that
			// is no breaker failure): retry it if the policy allows, on a
			// body the client has not seen.
			wait, fits := ex.backoff(g)
			if !fits {
				// The pause before a retry would outlast the budget:
				// the instance's answer goes out now.
			} else if retry, cause := g.RetryDecision(r.Method, ex.tries, o, body.replayable()); retry && ctx.Err() == nil {
				// Kept, not thrown away: if the retry finds nowhere to
				// go, this real answer beats one of meshd's making.
				ex.hold(resp)
				ex.endTry(ep, tk, o, aspan, resp.StatusCode, t0, cancelTry)
				lastErr = fmt.Errorf("%s: answered %d", ep.Address, resp.StatusCode)
				if ex.retryDecided(span, g, cause, wait) {
					continue
				}
				ex.failCtx(lastErr)
				return
			}
		}
		status, n, rerr := s.respond(w, r, resp, ep)
		ex.status, ex.bytes, ex.wire = status, n, status
		bodyBroke := false
		if rerr != nil {
			cctx := ex.callerCtx()
			if bodyBroke = ex.ab != nil && ex.ab.readFailed(); bodyBroke {
				// The caller's body broke while the answer streamed,
				// and the transport cut the exchange for it: the
				// caller's doing, not the instance's.
				cctx = canceledCtx
			}
			o = g.Classify(cctx, rerr, status)
			switch {
			case bodyBroke:
				ex.status, ex.errType, ex.errMsg = http.StatusBadRequest, "", "the request body broke off while its answer streamed: "+rerr.Error()
				if ex.ab.readFailedGone() {
					ex.status, ex.errType = 499, telemetry.ErrTypeCanceled
				}
			case !o.Canceled():
				ex.errType, ex.errMsg = o.Kind(), "response broke off: "+rerr.Error()
			}
		} else if status >= 500 {
			ex.errType = strconv.Itoa(status)
		}
		ex.endTry(ep, tk, o, aspan, status, t0, cancelTry)
		if rerr != nil && (!o.Canceled() || bodyBroke) {
			// The status line is gone; abort so the client sees a broken
			// response rather than a short one.
			panic(http.ErrAbortHandler)
		}
		return
	}
}

// exchange is the state of one forwarded request across its tries.
type exchange struct {
	s        *Sidecar
	w        http.ResponseWriter
	r        *http.Request
	u        *upstream
	ctx      context.Context
	start    time.Time
	tries    int
	instance string
	status   int
	bytes    int64
	errType  string
	errMsg   string
	ab       *abortableBody    // the request body, if any
	snap     *balance.Snapshot // the instances when the request began
	held     *heldAnswer       // the last failing answer a retry replaced
	silent   bool              // the caller left: abort instead of answering
	clk      *turnClock        // the event loop's, on the loop; nil reads time.Now
	// wire is the status that went out, 0 if none: the access log keeps
	// meshd's account (499 for a caller that left), spans and metrics
	// report only a status sent, as the HTTP conventions ask.
	wire int
}

// turnClock is an event loop's clock for the turn at hand: the time is
// read when first asked for after reset (which the loop calls each time
// its own monotonic clock moves on: after a wait, after a batch, after
// giving way), and the same reading is given for the rest of the turn. A
// request served on the loop so takes two to four readings (its begin
// and its answer are always in different turns), shared with the turn's
// other requests, where it took six of its own. Each time given is early
// by the turn's work before the ask: microseconds at one connection, up
// to hundreds of them in a batch of many events, and more if the loop
// stalls. A span between two of them is never negative. So the loop takes
// from it what requests record (durations, the request's start and
// budget, the instance's response time) and reads the clock afresh for
// the deadlines of a dial and of an answer's head (monoAfter). The reading
// is time.Now's, wall and monotonic. Only the loop's goroutine may use
// one; a nil *turnClock reads time.Now each time (the goroutine path).
type turnClock struct {
	t  time.Time
	ok bool
}

// now is the turn's time (time.Now for a nil c).
func (c *turnClock) now() time.Time {
	if c == nil {
		return time.Now()
	}
	if !c.ok {
		c.t, c.ok = time.Now(), true
	}
	return c.t
}

// reset begins a new turn: the next now reads the clock.
func (c *turnClock) reset() { c.ok = false }

// interimCtx is a request's context that carries what passes an
// instance's informational (1xx) answers on to the caller: h1's client
// finds it under h1.InterimKey{}. One allocation for both.
type interimCtx struct {
	context.Context
	w    http.ResponseWriter
	r    *http.Request
	sent int
}

func (c *interimCtx) Value(key any) any {
	if _, ok := key.(h1.InterimKey); ok {
		return c
	}
	return c.Context.Value(key)
}

// maxInterims is how many informational answers one request passes on.
const maxInterims = 5

// Interim passes an instance's informational answer on to the caller, as
// a proxy must (RFC 9110, 15.2): not a 100 Continue (meshd's own server
// sends that when it reads the body), not to an HTTP/1.0 caller, and no
// more than maxInterims. The transport calls it during RoundTrip, before
// any final answer has gone out.
func (c *interimCtx) Interim(code int, h http.Header) error {
	if code == http.StatusContinue || c.sent >= maxInterims || !c.r.ProtoAtLeast(1, 1) {
		return nil
	}
	c.sent++
	out := c.w.Header()
	saved := out.Clone()
	clear(out)
	copyEndToEnd(out, h)
	c.w.WriteHeader(code)
	clear(out)
	for k, vv := range saved {
		out[k] = vv
	}
	return nil
}

// settleOpen settles an open try of the event loop's that the request
// ended without finishing (meshd's own answer went out first): as one
// whose caller went away, which is not the instance's doing.
func (ex *exchange) settleOpen(t *openTry) {
	ex.endTry(t.ep, t.tk, ex.u.guard.Classify(canceledCtx, context.Canceled, 0), t.aspan, 0, t.t0, nil)
	if t.nc != nil {
		t.nc.Close()
	}
	if ex.tries == 0 {
		ex.tries, ex.instance = 1, t.ep.ID
	}
}

// record ends the request's span and records it in the metrics, the
// upstream's counters and the access log.
func (ex *exchange) record(span trace.Span) {
	u, r, m := ex.u, ex.r, metricsOf(ex.s.tel)
	telemetry.EndServer(span, ex.wire, ex.errType)
	d := ex.clk.now().Sub(ex.start)
	m.ServerRequestDone(u.name, r.Method, ex.wire, ex.errType, d)
	if ex.wire >= 500 || ex.errType != "" && ex.errType != telemetry.ErrTypeCanceled && ex.wire < 400 {
		// Once per request, however many tries failed: a 5xx sent, or
		// an answer that broke off.
		u.errors.Add(1)
	}
	if m != nil && u.retired.Load() {
		u.settleMetrics("")
	}
	telemetry.AccessLog(ex.s.accessLogger(), ex.ctx, telemetry.Access{
		Upstream: u.name, Instance: ex.instance, Method: r.Method, Path: r.URL.Path,
		Status: ex.status, Duration: d, Attempts: ex.tries, Bytes: ex.bytes, Err: ex.errMsg,
	})
}

// closeConn asks that the caller's HTTP/1 connection close after this
// answer. (On HTTP/2 it would end every stream of the connection.)
func (ex *exchange) closeConn() {
	if ex.r.ProtoMajor != 1 {
		return
	}
	if c, ok := ex.w.(interface{ closeAfterResponse() }); ok {
		c.closeAfterResponse()
		return
	}
	ex.w.Header().Set("Connection", "close")
}

// canceledCtx is a context already cancelled, to classify a try the caller
// ended: the breaker does not count it.
var canceledCtx = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// callerCtx is the caller's context, for telling the caller going away from
// meshd's own cancellation. Once meshd has cut the caller's body read
// short, net/http's server may take the caller for gone and cancel its
// context; it is not, so that cancellation is ignored.
func (ex *exchange) callerCtx() context.Context {
	if ex.ab != nil && ex.ab.wasCut() {
		return context.WithoutCancel(ex.r.Context())
	}
	return ex.r.Context()
}

// endTry settles one try: breaker outcome, counters, span and metrics.
func (ex *exchange) endTry(ep *balance.Endpoint, tk *resilience.Ticket, o resilience.Outcome, aspan trace.Span, status int, t0 time.Time, cancel context.CancelFunc) {
	tk.Finish(o)
	if cancel != nil {
		cancel()
	}
	ep.InFlight.Add(-1)
	ep.Requests.Add(1)
	m := metricsOf(ex.s.tel)
	m.InFlight(ex.u.name, -1)
	kind := ""
	if o.Kind() != resilience.KindNone {
		kind = o.Kind()
	}
	if o.Failure() {
		ep.Failures.Add(1)
	}
	telemetry.EndAttempt(aspan, status, kind)
	m.RequestDone(ex.u.name, ep.ID, ep.Address, ex.r.Method, status, ex.clk.now().Sub(t0), kind)
	if m != nil && (ex.u.pool.Load() != ex.snap || ex.u.retired.Load()) {
		// The instance, or the upstream, may have left while the try ran.
		ex.u.settleMetrics(ep.ID)
	}
}

// retry asks the policy whether a failed try is tried again, and waits the backoff.
func (ex *exchange) retry(span trace.Span, g *resilience.Guard, o resilience.Outcome, replayable bool) bool {
	if ex.ctx.Err() != nil {
		return false
	}
	wait, fits := ex.backoff(g)
	if !fits {
		return false
	}
	ok, cause := g.RetryDecision(ex.r.Method, ex.tries, o, replayable)
	if !ok {
		return false
	}
	return ex.retryDecided(span, g, cause, wait)
}

// backoff draws the pause before the next retry, and says whether a retry
// after it would still have some of the request's budget: one that cannot
// is not made (nor taken from the retry budget), and the failure is
// answered at once instead of after waiting out the budget.
func (ex *exchange) backoff(g *resilience.Guard) (time.Duration, bool) {
	wait := g.Backoff(ex.tries)
	_, bounded := ex.ctx.Deadline()
	return wait, !bounded || wait < remaining(ex.ctx)
}

// retryDecided records a retry the policy granted, labelled with the
// policy's cause (a retry.on condition), and sleeps its backoff wait; false
// when the request's budget ends first.
func (ex *exchange) retryDecided(span trace.Span, g *resilience.Guard, cause string, wait time.Duration) bool {
	telemetry.Retrying(span, ex.tries+1, cause, wait)
	metricsOf(ex.s.tel).Retry(ex.u.name, cause)
	if wait <= 0 {
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ex.ctx.Done():
		return false
	}
}

// fail answers with meshd's own error.
func (ex *exchange) fail(status int, errType, msg string) {
	ex.status, ex.errType, ex.errMsg = status, errType, msg
	if errType == "" && status >= 500 {
		ex.errType = strconv.Itoa(status)
	}
	if ex.ab != nil {
		if ex.budgetOver() {
			// The budget is over: the rest of the body will not be read.
			// Cut it now, before the answer goes out; the budget's own
			// AbortRead may not have run yet, and once the handler has
			// returned it would do nothing, leaving the server to wait
			// on a stalled caller to discard the rest. (Other answers
			// leave the rest to the server's usual discard, so that a
			// caller still sending is not reset mid-write.)
			ex.ab.AbortRead()
		}
		if ex.ab.wasCut() || !ex.ab.complete.Load() && (ex.ab.length < 0 || ex.ab.length-ex.ab.got.Load() > maxDiscard) {
			// The client's connection had its read cut short, or more of
			// its body is left unread than a server discards: it cannot
			// carry another request, and the answer says so.
			ex.closeConn()
		}
	}
	writeError(ex.w, status, msg)
	ex.wire = status
}

// budgetOver reports whether the request's budget has ended, by the clock:
// a transport's deadline can fire before the context's timer has run.
func (ex *exchange) budgetOver() bool {
	if ex.ctx.Err() != nil {
		return true
	}
	d, ok := ex.ctx.Deadline()
	return ok && !time.Now().Before(d)
}

// bodyFailed answers a request whose body could not be read in full before
// any try: the budget ended while the caller stalled (504), the caller left
// (499) or the body was malformed (400). None is an instance's doing.
func (ex *exchange) bodyFailed(err error) {
	switch cbe := asClientBodyError(err); {
	case ex.ab.wasAborted() || errors.Is(err, errBodyStopped):
		ex.fail(http.StatusGatewayTimeout, telemetry.ErrTypeTimeout, "upstream "+quote(ex.u.name)+": request timed out while the caller's body stalled")
	case cbe != nil && (cbe.callerGone() || ex.callerCtx().Err() != nil):
		ex.callerLeftMidBody()
	default:
		msg := "reading the request body: " + err.Error()
		if cbe != nil {
			msg = cbe.Error()
		}
		ex.closeConn()
		ex.fail(http.StatusBadRequest, "", msg)
	}
}

// callerLeftMidBody ends a request whose caller stopped sending its body
// part way (it closed or reset its connection). It is recorded as 499, the
// caller's doing. A caller that only half-closed may still be reading, so
// it gets a 400 that closes the connection, never the server's default
// empty 200; one that has gone never sees it.
func (ex *exchange) callerLeftMidBody() {
	ex.closeConn()
	writeError(ex.w, http.StatusBadRequest, "the request body ended before its end")
	ex.status, ex.errType, ex.errMsg = 499, telemetry.ErrTypeCanceled, "the caller went away during its upload"
}

// boundDiscard gives net/http's server, which reads what is left of an
// unfinished body after the answer to keep the connection, the idle timeout
// to do it in: a caller that stalls mid-body then is as good as idle. (The
// fast path does this itself; cut connections close anyway.)
func (ex *exchange) boundDiscard() {
	if ex.r.ProtoMajor != 1 || !hasBody(ex.r) || ex.ab != nil && (ex.ab.complete.Load() || ex.ab.wasCut()) {
		return
	}
	if _, fast := ex.w.(*fastWriter); fast {
		return
	}
	http.NewResponseController(ex.w).SetReadDeadline(time.Now().Add(ex.s.cfg.Load().Proxy.IdleTimeout))
}

// maxDiscard is how much of an unread request body net/http's server (and
// the fast path) discard to keep a connection; past it they close it.
const maxDiscard = 256 << 10

// callerWentAway ends a request whose caller left before its answer. It is
// recorded as 499, and then the handler aborts, so that the server sends
// nothing: net/http's would otherwise send its default empty 200 to a caller
// that only half-closed and still reads, as if the request had succeeded.
func (ex *exchange) callerWentAway() {
	ex.status, ex.errType, ex.errMsg = 499, telemetry.ErrTypeCanceled, "the caller went away"
	ex.silent = true
}

// failCtx answers a request whose budget ran out or whose caller left.
func (ex *exchange) failCtx(lastErr error) {
	if ex.callerCtx().Err() != nil {
		ex.callerWentAway()
		return
	}
	if ex.held != nil {
		ex.passHeld("ran out of time")
		return
	}
	msg := "upstream " + quote(ex.u.name) + ": request timed out"
	if lastErr != nil {
		msg += "; last error: " + lastErr.Error()
	}
	ex.fail(http.StatusGatewayTimeout, telemetry.ErrTypeTimeout, msg)
}

// heldAnswer is an instance's failing answer kept while meshd retries, to
// be passed on if the retry finds nowhere to go.
type heldAnswer struct {
	status int
	header http.Header
	body   []byte
}

// maxHeld bounds the body of a held answer; a longer one is dropped, as
// before, and a failed retry is then answered by meshd.
const maxHeld = 64 << 10

// hold keeps resp (its body read, up to maxHeld) as the answer to pass on
// if the retry fails for want of an instance or of time, and closes it.
func (ex *exchange) hold(resp *http.Response) {
	defer resp.Body.Close()
	ex.held = nil
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxHeld+1))
	if err != nil || len(body) > maxHeld {
		return
	}
	ex.held = &heldAnswer{status: resp.StatusCode, header: resp.Header, body: body}
}

// passHeld answers with the held answer; why says what the retry met.
func (ex *exchange) passHeld(why string) {
	h := ex.held
	dst := ex.w.Header()
	copyEndToEnd(dst, h.header)
	dst["Content-Length"] = []string{strconv.Itoa(len(h.body))}
	ex.w.WriteHeader(h.status)
	ex.wire = h.status
	n, _ := ex.w.Write(h.body)
	ex.status, ex.bytes = h.status, int64(n)
	if h.status >= 500 {
		ex.errType = strconv.Itoa(h.status)
	}
	ex.errMsg = "the retry " + why + "; the instance's answer was passed on"
}

// unavailableWhy says why no instance could be picked: open breakers,
// instances this request already tried, or both.
func unavailableWhy(eps []*balance.Endpoint, tried int) string {
	open := 0
	for _, e := range eps {
		if e.Breaker() == balance.BreakerOpen {
			open++
		}
	}
	switch {
	case open >= len(eps):
		return "every circuit breaker is open"
	case tried == 0:
		return fmt.Sprintf("%d of %d circuit breakers open", open, len(eps))
	}
	return fmt.Sprintf("%d of %d circuit breakers open, %d instance(s) tried already", open, len(eps), tried)
}

// remaining is the time left before ctx's deadline, 0 when it has none.
func remaining(ctx context.Context) time.Duration {
	if d, ok := ctx.Deadline(); ok {
		return max(time.Until(d), time.Nanosecond)
	}
	return 0
}

// drain reads a little of a discarded body so its connection can be reused.
func drain(body io.ReadCloser) {
	io.CopyN(io.Discard, body, 64<<10)
	body.Close()
}

// outgoing builds one attempt's request to addr.
func outgoing(ctx context.Context, r *http.Request, addr, host string, hdr http.Header, body *reqBody) *http.Request {
	u := &url.URL{Scheme: "http", Host: addr, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery, ForceQuery: r.URL.ForceQuery}
	if r.URL.Opaque != "" {
		u.Opaque = r.URL.Opaque
	}
	out := &http.Request{
		Method:        r.Method,
		URL:           u,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        hdr,
		Host:          host,
		ContentLength: body.length,
		Body:          body.reader(),
		Trailer:       r.Trailer,
	}
	if body.length < 0 && len(r.Trailer) > 0 {
		// Said outright, so that net/http's Transport does not probe a
		// GET's empty body, find nothing and send no trailers.
		out.TransferEncoding = []string{"chunked"}
	}
	if out.Body != nil {
		out.GetBody = body.getBody
	}
	return out.WithContext(ctx)
}

// reqBody is a request body, buffered when small enough to resend.
type reqBody struct {
	buf    []byte        // whole body when replayable
	stream io.ReadCloser // when not replayable
	length int64
	used   bool
	none   bool
}

func (b *reqBody) replayable() bool { return b.none || b.stream == nil }

func (b *reqBody) reader() io.ReadCloser {
	switch {
	case b.none:
		return nil
	case b.stream != nil:
		if b.used {
			return http.NoBody
		}
		b.used = true
		return b.stream
	default:
		return io.NopCloser(bytes.NewReader(b.buf))
	}
}

func (b *reqBody) getBody() (io.ReadCloser, error) {
	if b.stream != nil {
		return nil, errors.New("request body is streamed and cannot be resent")
	}
	return io.NopCloser(bytes.NewReader(b.buf)), nil
}

// abortableBody is a request body whose read meshd can end (AbortRead)
// when the request's budget ends while meshd buffers it, or while a
// transport streams it, and the client has stopped sending: it sets an
// immediate read deadline on the client's connection through the
// ResponseController. It
// does so only while the body is unfinished and the caller still there,
// and never after finish (called before the handler returns), so a late
// cancellation cannot touch the connection once it serves another request.
// A read error that meshd did not cause is the caller's doing and is
// reported as such (clientBodyError). Read is called by one transport
// goroutine at a time; AbortRead may run concurrently with it.
type abortableBody struct {
	io.ReadCloser
	w          http.ResponseWriter
	caller     context.Context
	length     int64        // -1 when unknown
	got        atomic.Int64 // bytes read (written by Read only)
	complete   atomic.Bool
	aborted    atomic.Bool // a Read blocked on the caller was ended
	cut        atomic.Bool // the caller's connection got a past read deadline
	failed     atomic.Bool // a read from the caller failed (clientBodyError)
	failedGone atomic.Bool // ... because the caller left (set before failed)
	stop       atomic.Bool // no more reads: the budget ended
	inRead     atomic.Bool
	mu         sync.Mutex // orders AbortRead and finish
	done       bool
	closed     chan struct{} // closed by Close
	closeOnce  sync.Once
}

func newAbortableBody(rc io.ReadCloser, w http.ResponseWriter, caller context.Context, length int64) *abortableBody {
	return &abortableBody{ReadCloser: rc, w: w, caller: caller, length: length, closed: make(chan struct{})}
}

func (b *abortableBody) Read(p []byte) (int, error) {
	// inRead and stop order Read against AbortRead (both sequentially
	// consistent): either this Read sees stop, or AbortRead sees it reading
	// and ends it with a deadline.
	b.inRead.Store(true)
	defer b.inRead.Store(false)
	if b.stop.Load() {
		return 0, errBodyStopped
	}
	n, err := b.ReadCloser.Read(p)
	got := b.got.Add(int64(n))
	if err == io.EOF || b.length >= 0 && got >= b.length {
		b.complete.Store(true)
	}
	if err != nil && err != io.EOF && !b.aborted.Load() {
		cbe := &clientBodyError{err}
		b.failedGone.Store(cbe.callerGone())
		b.failed.Store(true)
		err = cbe
	}
	return n, err
}

// errBodyStopped is a Read after the budget ended, while the transport was
// busy with the instance: it is the request's timeout.
var errBodyStopped = fmt.Errorf("request budget ended before the body was sent: %w", context.DeadlineExceeded)

// clientBodyError is a failure reading the request body from the caller
// (it hung up mid-upload, or sent a broken body): not the instance's fault.
type clientBodyError struct{ err error }

func (e *clientBodyError) Error() string { return "reading the request body: " + e.err.Error() }
func (e *clientBodyError) Unwrap() error { return e.err }

// asClientBodyError finds a clientBodyError in err's chain, or nil. (A
// function of its own, so that the error path alone pays for errors.As.)
func asClientBodyError(err error) *clientBodyError {
	var cbe *clientBodyError
	if errors.As(err, &cbe) {
		return cbe
	}
	return nil
}

// callerGone reports whether the read failed because the caller's
// connection ended, rather than on a malformed body.
func (e *clientBodyError) callerGone() bool {
	var ne net.Error
	return errors.Is(e.err, io.ErrUnexpectedEOF) || errors.Is(e.err, io.EOF) || errors.Is(e.err, net.ErrClosed) ||
		errors.Is(e.err, syscall.ECONNRESET) || errors.As(e.err, &ne)
}

// Close is called by the transport when it is done with the body.
func (b *abortableBody) Close() error {
	err := b.ReadCloser.Close()
	b.closeOnce.Do(func() { close(b.closed) })
	return err
}

// settle runs as the handler returns. A transport may still be reading the
// body (net/http's writes it on a goroutine of its own, past the response):
// that read is ended and awaited, so that nothing reads the client's
// connection once the server goes on with it. Then later AbortReads do
// nothing.
func (b *abortableBody) settle(handedOver bool) {
	if handedOver {
		select {
		case <-b.closed:
		default:
			b.AbortRead()
			t := time.NewTimer(5 * time.Second) // a bound, should a transport never close it
			select {
			case <-b.closed:
			case <-t.C:
			}
			t.Stop()
		}
	}
	b.finish()
}

// AbortRead stops further reads and ends one blocked on the caller (which
// wasAborted then reports: the caller stalled, not the instance). It does
// nothing once the body is complete, when the caller has gone (its read
// fails on its own) or after finish.
func (b *abortableBody) AbortRead() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done || b.complete.Load() || b.caller.Err() != nil {
		return
	}
	b.stop.Store(true)
	reading := b.inRead.Load()
	if reading {
		b.aborted.Store(true) // before the deadline, so Read sees it with the error
	}
	// The deadline goes on even between reads: the rest of the body will
	// not be read, so the connection cannot serve another request, and the
	// server must not wait on the stalled caller to discard it.
	if err := http.NewResponseController(b.w).SetReadDeadline(aLongTimeAgo); err != nil {
		// Nothing was cut: a later failure of the read is not meshd's.
		b.aborted.Store(false)
		return
	}
	b.cut.Store(true)
}

// readFailed reports whether a read of the caller's body failed on the
// caller's side (it left, or sent a malformed body).
func (b *abortableBody) readFailed() bool { return b.failed.Load() }

// readFailedGone reports, after readFailed, whether the caller left (as
// opposed to sending a malformed body).
func (b *abortableBody) readFailedGone() bool { return b.failedGone.Load() }

// wasCut reports whether AbortRead put a past read deadline on the
// caller's connection, which then cannot carry another request.
func (b *abortableBody) wasCut() bool { return b.cut.Load() }

func (b *abortableBody) wasAborted() bool { return b.aborted.Load() }

func (b *abortableBody) finish() {
	b.mu.Lock()
	b.done = true
	b.mu.Unlock()
}

// noReqBody is the body of requests without one. It is shared: a reqBody
// with none set is never modified.
var noReqBody = &reqBody{none: true}

// prepareBody buffers bodies up to limit so that they can be resent; larger
// ones (and unknown lengths beyond limit) are streamed once.
func prepareBody(r *http.Request, ab *abortableBody, limit int64) (*reqBody, error) {
	if ab == nil {
		return noReqBody, nil
	}
	if len(r.Trailer) > 0 {
		// Trailers follow the body, so it goes on chunked whatever its
		// length (an HTTP/2 caller may send both); read to its end, it
		// fills them in.
		return prepareChunked(ab, limit)
	}
	if r.ContentLength > limit {
		return &reqBody{stream: ab, length: r.ContentLength}, nil
	}
	if r.ContentLength > 0 {
		buf := make([]byte, r.ContentLength)
		if _, err := io.ReadFull(ab, buf); err != nil {
			return nil, err
		}
		return &reqBody{buf: buf, length: r.ContentLength}, nil
	}
	// Unknown length: read up to limit; past it, stream the rest.
	rb, err := prepareChunked(ab, limit)
	if err == nil && rb.stream == nil {
		rb.length = int64(len(rb.buf))
	}
	return rb, err
}

// prepareChunked reads a body of unknown length up to limit; past it, the
// rest is streamed. Either way its length is left unknown (-1), so that it
// is sent chunked.
func prepareChunked(ab *abortableBody, limit int64) (*reqBody, error) {
	buf, err := io.ReadAll(io.LimitReader(ab, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(buf)) <= limit {
		// (ReadAll met the body's end, which is when the trailers that
		// follow it are filled in.)
		return &reqBody{buf: buf, length: -1}, nil
	}
	return &reqBody{stream: &prefixedBody{io.MultiReader(bytes.NewReader(buf), ab), ab}, length: -1}, nil
}

// prefixedBody is a body of unknown length streamed after the part of it
// already buffered. Close and AbortRead reach the caller's body, so that a
// transport ending a try can still cut a read stalled on the caller.
type prefixedBody struct {
	io.Reader
	ab *abortableBody
}

func (p *prefixedBody) Close() error { return p.ab.Close() }
func (p *prefixedBody) AbortRead()   { p.ab.AbortRead() }

// hasBody reports whether r carries a request body to forward.
func hasBody(r *http.Request) bool {
	return r.Body != nil && r.Body != http.NoBody && (r.ContentLength != 0 || len(r.TransferEncoding) != 0)
}

var copyBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// respond writes resp to w. It returns the status, the body bytes written
// and the upstream's error when its body broke off part way.
func (s *Sidecar) respond(w http.ResponseWriter, r *http.Request, resp *http.Response, ep *balance.Endpoint) (int, int64, error) {
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusSwitchingProtocols {
		st, err := s.switchProtocols(w, r, resp)
		return st, 0, err
	}
	h := w.Header()
	copyEndToEnd(h, resp.Header)
	if n := len(resp.Trailer); n > 0 {
		keys := make([]string, 0, n)
		for k := range resp.Trailer {
			keys = append(keys, k)
		}
		h["Trailer"] = []string{strings.Join(keys, ", ")}
	}
	w.WriteHeader(resp.StatusCode)
	stream := resp.ContentLength == -1 || isEventStream(resp.Header)
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	buf := *bp
	var flusher http.Flusher
	if stream {
		flusher, _ = w.(http.Flusher)
		if flusher != nil {
			flusher.Flush()
		}
	}
	var st *streamTimer
	if r.ProtoMajor == 2 {
		// A stream's writes wait for its window, which the connection's
		// deadline does not see.
		st = newStreamTimer(s, w)
	}
	var written int64
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if st != nil {
				st.arm()
			}
			if _, werr := w.Write(buf[:n]); werr != nil {
				// The client is gone, or stopped reading; nothing more
				// can be sent.
				if errors.Is(werr, os.ErrDeadlineExceeded) || st != nil && st.expired() {
					s.log.Warn("client stopped reading its answer: connection closed", "client", r.RemoteAddr, "waited", s.cfg.Load().Proxy.WriteTimeout, "sent_bytes", written)
				}
				return resp.StatusCode, written, context.Canceled
			}
			written += int64(n)
			if flusher != nil {
				flusher.Flush()
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if r.Context().Err() == nil {
				s.log.Warn("upstream response broke off", "instance", ep.ID, "err", rerr)
			}
			return resp.StatusCode, written, rerr
		}
	}
	for k, vv := range resp.Trailer {
		h[http.TrailerPrefix+k] = vv
	}
	return resp.StatusCode, written, nil
}

func isEventStream(h http.Header) bool {
	ct := h.Get("Content-Type")
	return strings.HasPrefix(ct, "text/event-stream")
}

// switchProtocols completes an upgrade (WebSocket and others): the client's
// connection is taken over and bytes are copied both ways until one side closes.
func (s *Sidecar) switchProtocols(w http.ResponseWriter, r *http.Request, resp *http.Response) (int, error) {
	backend, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		writeError(w, http.StatusBadGateway, "upstream switched protocols without a usable connection")
		return http.StatusBadGateway, nil
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		writeError(w, http.StatusBadGateway, "cannot switch protocols on this connection: "+err.Error())
		return http.StatusBadGateway, nil
	}
	defer conn.Close()
	untrack := s.trackTunnel(conn, backend)
	defer untrack()
	h := make(http.Header, len(resp.Header))
	copyEndToEnd(h, resp.Header)
	h["Connection"] = []string{"Upgrade"}
	h["Upgrade"] = []string{resp.Header.Get("Upgrade")}
	brw.WriteString("HTTP/1.1 101 Switching Protocols\r\n")
	h.Write(brw)
	brw.WriteString("\r\n")
	if err := brw.Flush(); err != nil {
		return http.StatusSwitchingProtocols, nil
	}
	s.pipe(conn, brw.Reader, backend)
	return http.StatusSwitchingProtocols, nil
}

// pipe copies client→backend (starting with what is already buffered from
// the client) and backend→client until either direction ends, then closes
// both. A direction that ends cleanly is passed on as a half-close and the
// other gets a moment to finish its last bytes; one that fails (a reset,
// or a client that stopped reading past the write timeout) tears both
// down at once.
func (s *Sidecar) pipe(client net.Conn, fromClient *bufio.Reader, backend io.ReadWriteCloser) {
	done := make(chan error, 2)
	go func() {
		_, err := io.Copy(backend, fromClient)
		if err == nil {
			closeWrite(backend)
		}
		done <- err
	}()
	go func() {
		_, err := io.Copy(client, backend)
		if err == nil {
			closeWrite(client)
		} else if errors.Is(err, os.ErrDeadlineExceeded) {
			s.log.Warn("client stopped reading its tunnel: connection closed", "client", client.RemoteAddr().String(), "waited", s.cfg.Load().Proxy.WriteTimeout)
		}
		done <- err
	}()
	if err := <-done; err == nil {
		t := time.NewTimer(5 * time.Second)
		select {
		case <-done:
		case <-t.C:
		}
		t.Stop()
	}
	client.Close()
	backend.Close()
}

func closeWrite(c any) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// tunnel serves CONNECT NAME:PORT by opening a TCP connection to a picked
// instance of u (the port asked for is not used: the instance's is). Dials
// pass the instance's circuit breaker and move on to another instance on
// failure.
func (s *Sidecar) tunnel(w http.ResponseWriter, r *http.Request, u *upstream, start time.Time) {
	ctx, span := s.tel.StartServer(r.Context(), r, "")
	cfg := s.cfg.Load()
	if !cfg.Proxy.ConnectOn() {
		s.rejectTraced(ctx, span, w, r, u, http.StatusMethodNotAllowed, "CONNECT is disabled (proxy.allow_connect)", start)
		return
	}
	snap := u.pool.Load()
	if len(snap.Endpoints) == 0 {
		s.rejectTraced(ctx, span, w, r, u, http.StatusBadGateway, "upstream "+quote(u.name)+" has no instances: "+snap.Reason, start)
		return
	}
	g := u.guard
	rc := g.Config()
	preq := balance.Request{HTTP: r, ClientIP: remoteIP(r)}
	var backend net.Conn
	var ep *balance.Endpoint
	var lastErr error
	dialed := false // an instance was dialled (and failed), not only unavailable
	tries := 0
	for i := 0; i < len(snap.Endpoints) && i < max(rc.Retry.Attempts, 1) && backend == nil; i++ {
		preq.Now = time.Now().UnixNano()
		preq.IgnoreHealth = g.FailOpen(len(snap.Endpoints))
		e, err := snap.Picker.Pick(&preq)
		if err != nil {
			lastErr = err
			break
		}
		preq.Exclude(e)
		done, err := g.Admit(e.Stats)
		if err != nil {
			lastErr = err
			continue
		}
		d := net.Dialer{Timeout: rc.Timeouts.Connect}
		c, err := d.DialContext(r.Context(), "tcp", e.Address)
		o := g.Classify(r.Context(), err, 0)
		done(o)
		dialed = true
		tries++
		if err != nil {
			e.Failures.Add(1)
			lastErr = err
			continue
		}
		backend, ep = c, e
	}
	if backend == nil {
		if !dialed {
			// None could be tried: unavailable, as for other requests.
			msg := "no available instance of " + quote(u.name) + " (" + unavailableWhy(snap.Endpoints, preq.Tried()) + ")"
			if lastErr != nil {
				msg += ": " + lastErr.Error()
			}
			s.rejectTraced(ctx, span, w, r, u, http.StatusServiceUnavailable, msg, start)
			return
		}
		msg := "no instance of " + quote(u.name) + " accepted the tunnel"
		if lastErr != nil {
			msg += ": " + lastErr.Error()
		}
		s.rejectTraced(ctx, span, w, r, u, http.StatusBadGateway, msg, start)
		return
	}
	defer backend.Close()
	ep.InFlight.Add(1)
	defer ep.InFlight.Add(-1)
	ep.Requests.Add(1)
	ep.MarkPicked(preq.Now)
	telemetry.AccessLog(s.accessLogger(), ctx, telemetry.Access{
		Upstream: u.name, Instance: ep.ID, Method: r.Method, Path: r.Host, Status: http.StatusOK, Duration: time.Since(start), Attempts: tries,
	})
	// The span lasts as long as the tunnel.
	defer telemetry.EndServer(span, http.StatusOK, "")
	if r.ProtoMajor == 1 {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			http.Error(w, "meshd: cannot tunnel on this connection", http.StatusInternalServerError)
			return
		}
		defer conn.Close()
		untrack := s.trackTunnel(conn, backend)
		defer untrack()
		conn.Write([]byte("HTTP/1.1 200 Connection Established\r\n\r\n"))
		s.pipe(conn, brw.Reader, backend)
		return
	}
	// HTTP/2 CONNECT: the stream is the tunnel.
	w.WriteHeader(http.StatusOK)
	ctl := http.NewResponseController(w)
	ctl.Flush()
	go func() {
		if _, err := io.Copy(backend, r.Body); err != nil {
			// The stream was reset or broke: the tunnel is over, and
			// the read below must not wait for the instance.
			backend.Close()
			return
		}
		closeWrite(backend)
	}()
	st := newStreamTimer(s, w)
	buf := make([]byte, 32<<10)
	for {
		n, err := backend.Read(buf)
		if n > 0 {
			st.arm()
			if _, werr := w.Write(buf[:n]); werr != nil {
				if st.expired() {
					s.log.Warn("client stopped reading its tunnel: stream reset", "client", r.RemoteAddr, "waited", s.cfg.Load().Proxy.WriteTimeout)
				}
				return
			}
			ctl.Flush()
		}
		if err != nil {
			return
		}
	}
}

// writeError answers with meshd's own short plain-text reason.
func writeError(w http.ResponseWriter, status int, msg string) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Meshd-Error", http.StatusText(status))
	w.WriteHeader(status)
	io.WriteString(w, "meshd: "+msg+"\n")
}

// reject answers a request that never reached an upstream's data path.
func (s *Sidecar) reject(w http.ResponseWriter, r *http.Request, u *upstream, status int, msg string, start time.Time) {
	// Every request meshd receives has its server span, refused ones too.
	ctx, span := s.tel.StartServer(r.Context(), r, "")
	s.rejectTraced(ctx, span, w, r, u, status, msg, start)
}

// rejectTraced is reject within a server span already started, which it
// ends; its access line carries the span's IDs.
func (s *Sidecar) rejectTraced(ctx context.Context, span trace.Span, w http.ResponseWriter, r *http.Request, u *upstream, status int, msg string, start time.Time) {
	writeError(w, status, msg)
	name := ""
	if u != nil {
		name = u.name
		if status >= 500 {
			u.errors.Add(1)
		}
	}
	errType := ""
	if status >= 500 {
		errType = strconv.Itoa(status)
	}
	telemetry.EndServer(span, status, errType)
	telemetry.AccessLog(s.accessLogger(), ctx, telemetry.Access{
		Upstream: name, Method: r.Method, Path: r.URL.Path, Status: status, Duration: time.Since(start), Err: msg,
	})
}

// accessLogger is the logger for access lines, nil when they are off.
func (s *Sidecar) accessLogger() *slog.Logger {
	if !s.cfg.Load().Log.AccessOn() {
		return nil
	}
	return s.log
}

// remoteIP is the address of the connection's peer.
func remoteIP(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// firstForwarded returns the first (client-most) X-Forwarded-For hop.
func firstForwarded(h http.Header) (netip.Addr, bool) {
	v := h["X-Forwarded-For"]
	if len(v) == 0 {
		return netip.Addr{}, false
	}
	first, _, _ := strings.Cut(v[0], ",")
	ip, err := netip.ParseAddr(strings.TrimSpace(first))
	if err != nil {
		return netip.Addr{}, false
	}
	return ip.Unmap(), true
}

// setForwarded appends the peer to X-Forwarded-For and sets X-Forwarded-Proto,
// keeping one the caller set only when keepProto (the caller is the local
// app).
func setForwarded(h http.Header, r *http.Request, peer netip.Addr, keepProto bool) {
	if peer.IsValid() {
		ip := peerHost(r.RemoteAddr)
		if prior := r.Header["X-Forwarded-For"]; len(prior) > 0 {
			ip = strings.Join(prior, ", ") + ", " + ip
		}
		h["X-Forwarded-For"] = []string{ip}
	}
	if _, ok := h["X-Forwarded-Proto"]; !ok || !keepProto {
		if r.TLS != nil {
			h["X-Forwarded-Proto"] = protoHTTPS
		} else {
			h["X-Forwarded-Proto"] = protoHTTP
		}
	}
}

// Shared, never modified: header values are not written in place.
var (
	protoHTTP  = []string{"http"}
	protoHTTPS = []string{"https"}
)

// peerHost is the host part of a RemoteAddr ("127.0.0.1" of
// "127.0.0.1:5000", "::1" of "[::1]:5000") without allocating.
func peerHost(addr string) string {
	if i := strings.LastIndexByte(addr, ':'); i > 0 {
		addr = addr[:i]
	}
	if len(addr) > 1 && addr[0] == '[' && addr[len(addr)-1] == ']' {
		addr = addr[1 : len(addr)-1]
	}
	return addr
}

// errText shortens transport errors for response bodies.
func errText(err error) string {
	var op *net.OpError
	if errors.As(err, &op) {
		return op.Op + ": " + op.Err.Error()
	}
	return err.Error()
}
