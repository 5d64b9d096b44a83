package resilience

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
)

// Kinds of Outcome, as returned by Outcome.Kind. They are stable strings,
// suitable for the error.type span attribute and metric labels.
const (
	// KindNone: a response arrived and was read without a transport error.
	KindNone = "none"
	// KindConnect: no connection could be established (refused, unreachable,
	// name not resolved, connect timeout). The request never left.
	KindConnect = "connect"
	// KindTimeout: the try ran out of time after the connection was made.
	KindTimeout = "timeout"
	// KindReset: the connection was reset or closed before the response was
	// complete.
	KindReset = "reset"
	// KindCanceled: the caller gave up. Not the upstream's failure.
	KindCanceled = "canceled"
	// KindOther: any other transport error (for example a malformed response).
	KindOther = "other"
)

// Outcome is the classified result of one try. The zero Outcome is an
// outcome without response or error and is neither a failure nor retried.
// Outcome is a small value, safe to copy and share.
type Outcome struct {
	// Status is the response status code, 0 when no response headers arrived.
	Status int
	// Err is the transport error, nil when the try completed.
	Err error

	kind    string
	reached bool
	failure bool
}

// Kind is one of KindNone, KindConnect, KindTimeout, KindReset, KindCanceled
// and KindOther.
func (o Outcome) Kind() string {
	if o.kind == "" {
		return KindNone
	}
	return o.kind
}

// Failure reports whether the try counts against the instance: a transport
// error other than a cancellation, or a status listed in FailureConfig.
func (o Outcome) Failure() bool { return o.failure }

// ReachedUpstream reports whether the request may have been seen by the
// upstream. It is false for connect failures, which are therefore safe to
// retry whatever the method (and for the zero Outcome); a cancellation
// counts as reached, since nobody knows.
func (o Outcome) ReachedUpstream() bool { return o.reached }

// Canceled reports whether the caller gave up on the request.
func (o Outcome) Canceled() bool { return o.kind == KindCanceled }

// Classify turns the result of one try into an Outcome. ctx is the caller's
// context (the incoming request's, or one derived from it with a deadline;
// never one the forwarder cancels itself); err is the error of the round trip
// or, once headers arrived, of reading the body; status is the response
// status, 0 if none arrived. Classify is a pure function, safe for concurrent
// use.
//
// The caller's cancellation (ctx canceled, or err being context.Canceled) is
// KindCanceled and never a failure; forwarders should therefore implement
// try timeouts with deadlines, not by canceling. A dial error (a *net.OpError
// with Op "dial", or a DNS error) is KindConnect even when it is a timeout.
// Deadlines and net.Error timeouts are KindTimeout; ECONNRESET, EPIPE,
// ECONNABORTED and early EOFs are KindReset.
func Classify(ctx context.Context, err error, status int, fc FailureConfig) Outcome {
	o := Outcome{Status: status, Err: err, reached: true}
	if err == nil {
		o.kind = KindNone
		o.reached = status != 0
		for _, s := range fc.Statuses {
			if s == status {
				o.failure = true
				break
			}
		}
		return o
	}
	o.kind = errorKind(ctx, err)
	switch o.kind {
	case KindCanceled:
		// Not the upstream's doing; whether it saw the request is unknown,
		// so assume it did.
	case KindConnect:
		o.reached = false
		o.failure = true
	default:
		o.failure = true
	}
	return o
}

func errorKind(ctx context.Context, err error) string {
	if ctx != nil && errors.Is(ctx.Err(), context.Canceled) {
		return KindCanceled
	}
	if errors.Is(err, context.Canceled) {
		return KindCanceled
	}
	var op *net.OpError
	if errors.As(err, &op) && (op.Op == "dial" || op.Op == "proxyconnect") {
		return KindConnect
	}
	var dns *net.DNSError
	if errors.As(err, &dns) {
		return KindConnect
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return KindTimeout
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return KindTimeout
	}
	if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		return KindReset
	}
	// net/http and its HTTP/2 transport report these without exported types.
	msg := err.Error()
	for _, s := range resetMessages {
		if strings.Contains(msg, s) {
			return KindReset
		}
	}
	return KindOther
}

var resetMessages = []string{
	"connection reset",
	"broken pipe",
	"server closed idle connection",
	"client connection lost",
	"stream error",
	"unexpected EOF",
}
