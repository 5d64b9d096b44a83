package resilience

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
)

// Config is one upstream's resilience settings. Start from Defaults and
// override what the configuration file sets: every field is used as given, so
// a zero means zero (for example no whole-request timeout), not "default".
// Validate reports what is wrong; NewGuard and Reconfigure refuse an invalid
// Config. A Config is a plain value, safe to copy; its slices must not be
// modified after it has been handed to a Guard.
type Config struct {
	Breaker  BreakerConfig
	Retry    RetryConfig
	Timeouts TimeoutConfig
	Failure  FailureConfig
}

// BreakerConfig configures the circuit breaker kept for every instance of the
// upstream (YAML section "breaker").
type BreakerConfig struct {
	// ConsecutiveFailures trips the breaker after this many failures in a row
	// within Window; 0 turns this trigger off. Default 5.
	ConsecutiveFailures uint32
	// FailureRatio trips the breaker when failures/(failures+successes) over
	// Window reaches it, once MinRequests outcomes were seen; 0 turns this
	// trigger off, otherwise it must be in (0,1]. Default 0 (off).
	FailureRatio float64
	// MinRequests is the number of outcomes within Window below which
	// FailureRatio is not evaluated. Default 20.
	MinRequests uint32
	// Window is the rolling period over which outcomes are counted, kept in
	// ten buckets of Window/10. Default 10s.
	Window time.Duration
	// OpenFor is how long a freshly tripped breaker rejects requests before
	// it admits probes. Default 5s.
	OpenFor time.Duration
	// OpenMultiplier grows the open period each time a probe fails:
	// OpenFor × OpenMultiplier^k after k failed probes in a row; 1 means no
	// growth. Default 2.
	OpenMultiplier float64
	// OpenMax caps the open period. Default 60s.
	OpenMax time.Duration
	// HalfOpenProbes is how many requests a half-open breaker admits; it
	// closes when all of them succeed and opens again on the first failure.
	// Default 1.
	HalfOpenProbes uint32
	// MaxEjectionPercent is the share of the upstream's instances (0-100)
	// whose breakers may be open or half-open before the upstream fails open.
	// Default 50.
	MaxEjectionPercent int
	// FailOpen, when more than MaxEjectionPercent of the instances are
	// ejected, routes to ejected instances again rather than failing every
	// request. Default true.
	FailOpen bool
	// Disabled turns the breakers off: every instance is always admitted.
	Disabled bool
}

// RetryConfig configures retries of failed tries (YAML section "retry").
type RetryConfig struct {
	// Attempts is the total number of tries of one request, the first
	// included; 1 means no retries. Default 3.
	Attempts int
	// On lists the conditions that are retried: "connect-failure", "reset",
	// "timeout", "5xx", "gateway-error" (502, 503 and 504) and single status
	// codes from 400 to 599 such as "503" or "429". Default
	// ["connect-failure", "reset", "502", "503", "504"].
	On []string
	// Methods lists the idempotent methods: requests with these methods are
	// retried on every condition of On; others only on "connect-failure".
	// Default GET, HEAD, OPTIONS, PUT, DELETE.
	Methods []string
	// RetryNonIdempotent also retries requests with other methods after they
	// reached the upstream. Default false.
	RetryNonIdempotent bool
	// BackoffBase and BackoffMax shape the pause before a retry: a random
	// duration in [0, min(BackoffMax, BackoffBase·2^(n-1))) before retry n.
	// Defaults 25ms and 250ms; 0 and 0 means no pause.
	BackoffBase time.Duration
	BackoffMax  time.Duration
	// BufferBody is the largest request body, in bytes, kept in memory so
	// that it can be sent again; requests with a larger or unknown-length
	// body are not retried once the body was read. Default 65536.
	BufferBody int64
	// BudgetPercent allows retries up to this percentage of the requests
	// started in the last ten seconds (0-100). Default 20.
	BudgetPercent float64
	// BudgetMinPerSecond allows this many retries every second on top of the
	// percentage, so that a quiet upstream can still retry. Default 10.
	BudgetMinPerSecond int
	// Disabled turns retries off.
	Disabled bool
}

// TimeoutConfig bounds the time spent on a request (YAML section "timeouts").
// A zero duration means no limit.
type TimeoutConfig struct {
	// Connect bounds establishing a connection to an instance. Default 1s.
	Connect time.Duration
	// ResponseHeader bounds the wait for the response headers of one try,
	// counted from the end of writing the request. The response body is not
	// covered. Default 15s.
	ResponseHeader time.Duration
	// Request bounds the whole request, every try, pause and the response
	// body included. Default 0 (none).
	Request time.Duration
	// PerTry bounds one try, its response body included. Default 0 (none).
	PerTry time.Duration
	// Header names the request header with which a caller may shorten (never
	// lengthen) the Request budget; "" ignores callers. Default
	// "X-Meshd-Timeout".
	Header string
}

// FailureConfig decides which responses count as failures of the instance
// (YAML section "failure"). Transport errors other than the caller's
// cancellation always do.
type FailureConfig struct {
	// Statuses are the response status codes that count as failures.
	// Default 502, 503, 504.
	Statuses []int
}

// Retry conditions understood in RetryConfig.On.
const (
	// OnConnectFailure retries a try whose connection could not be
	// established; the request never reached the upstream, so any method is
	// retried.
	OnConnectFailure = "connect-failure"
	// OnReset retries a try whose connection was reset or closed before the
	// response was complete.
	OnReset = "reset"
	// OnTimeout retries a try that ran out of time.
	OnTimeout = "timeout"
	// On5xx retries any response status from 500 to 599.
	On5xx = "5xx"
	// OnGatewayError retries the statuses 502, 503 and 504.
	OnGatewayError = "gateway-error"
)

// DefaultTimeoutHeader is the default of TimeoutConfig.Header.
const DefaultTimeoutHeader = "X-Meshd-Timeout"

// Defaults returns the default configuration, documented field by field; its
// slices are fresh copies that the caller may modify.
func Defaults() Config {
	return Config{
		Breaker: BreakerConfig{
			ConsecutiveFailures: 5,
			MinRequests:         20,
			Window:              10 * time.Second,
			OpenFor:             5 * time.Second,
			OpenMultiplier:      2,
			OpenMax:             60 * time.Second,
			HalfOpenProbes:      1,
			MaxEjectionPercent:  50,
			FailOpen:            true,
		},
		Retry: RetryConfig{
			Attempts:           3,
			On:                 []string{OnConnectFailure, OnReset, "502", "503", "504"},
			Methods:            []string{http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodPut, http.MethodDelete},
			BackoffBase:        25 * time.Millisecond,
			BackoffMax:         250 * time.Millisecond,
			BufferBody:         64 << 10,
			BudgetPercent:      20,
			BudgetMinPerSecond: 10,
		},
		Timeouts: TimeoutConfig{
			Connect:        time.Second,
			ResponseHeader: 15 * time.Second,
			Header:         DefaultTimeoutHeader,
		},
		Failure: FailureConfig{Statuses: []int{502, 503, 504}},
	}
}

// FieldError is a configuration error naming the offending key as written
// in YAML, relative to the upstream (for example "breaker.failure_ratio").
type FieldError struct {
	Key string
	Err error
}

// Error names the key and the problem.
func (e *FieldError) Error() string { return e.Key + ": " + e.Err.Error() }

// Unwrap returns the problem without the key.
func (e *FieldError) Unwrap() error { return e.Err }

func fieldErr(key, format string, args ...any) error {
	return &FieldError{Key: key, Err: fmt.Errorf(format, args...)}
}

// Validate reports every invalid field of c, each as a *FieldError; nil
// means c is usable. It never panics.
func (c Config) Validate() []error {
	var errs []error
	add := func(e error) { errs = append(errs, e) }
	nonNeg := func(key string, d time.Duration) {
		if d < 0 {
			add(fieldErr(key, "must not be negative (have %s)", d))
		}
	}

	b := c.Breaker
	if !b.Disabled && b.ConsecutiveFailures == 0 && b.FailureRatio == 0 {
		add(fieldErr("breaker", "no trip condition: set consecutive_failures or failure_ratio, or disabled: true"))
	}
	if math.IsNaN(b.FailureRatio) || b.FailureRatio < 0 || b.FailureRatio > 1 {
		add(fieldErr("breaker.failure_ratio", "must be in (0,1], or 0 for off (have %v)", b.FailureRatio))
	}
	if b.FailureRatio > 0 && b.MinRequests == 0 {
		add(fieldErr("breaker.min_requests", "must be at least 1 when failure_ratio is set"))
	}
	if b.Window <= 0 {
		add(fieldErr("breaker.window", "must be positive (have %s)", b.Window))
	}
	if b.OpenFor <= 0 {
		add(fieldErr("breaker.open_for", "must be positive (have %s)", b.OpenFor))
	}
	if math.IsNaN(b.OpenMultiplier) || math.IsInf(b.OpenMultiplier, 0) || b.OpenMultiplier < 1 {
		add(fieldErr("breaker.open_multiplier", "must be a finite number of at least 1 (have %v)", b.OpenMultiplier))
	}
	if b.OpenMax < b.OpenFor {
		add(fieldErr("breaker.open_max", "must not be below open_for (have %s < %s)", b.OpenMax, b.OpenFor))
	}
	if b.HalfOpenProbes == 0 {
		add(fieldErr("breaker.half_open_probes", "must be at least 1"))
	}
	if b.MaxEjectionPercent < 0 || b.MaxEjectionPercent > 100 {
		add(fieldErr("breaker.max_ejection_percent", "must be in [0,100] (have %d)", b.MaxEjectionPercent))
	}

	r := c.Retry
	if r.Attempts < 1 {
		add(fieldErr("retry.attempts", "must be at least 1, the first try included (have %d)", r.Attempts))
	}
	for i, cond := range r.On {
		if _, err := parseCondition(cond); err != nil {
			add(fieldErr(fmt.Sprintf("retry.on[%d]", i), "%v", err))
		}
	}
	for i, m := range r.Methods {
		if m == "" || !validToken(m) {
			add(fieldErr(fmt.Sprintf("retry.methods[%d]", i), "%q is not an HTTP method", m))
		}
	}
	nonNeg("retry.backoff_base", r.BackoffBase)
	nonNeg("retry.backoff_max", r.BackoffMax)
	if r.BackoffMax < r.BackoffBase {
		add(fieldErr("retry.backoff_max", "must not be below backoff_base (have %s < %s)", r.BackoffMax, r.BackoffBase))
	}
	if r.BufferBody < 0 {
		add(fieldErr("retry.buffer_body", "must not be negative (have %d)", r.BufferBody))
	}
	if math.IsNaN(r.BudgetPercent) || r.BudgetPercent < 0 || r.BudgetPercent > 100 {
		add(fieldErr("retry.budget_percent", "must be in [0,100] (have %v)", r.BudgetPercent))
	}
	if r.BudgetMinPerSecond < 0 {
		add(fieldErr("retry.budget_min_per_second", "must not be negative (have %d)", r.BudgetMinPerSecond))
	}

	t := c.Timeouts
	nonNeg("timeouts.connect", t.Connect)
	nonNeg("timeouts.response_header", t.ResponseHeader)
	nonNeg("timeouts.request", t.Request)
	nonNeg("timeouts.per_try", t.PerTry)
	if t.Header != "" && !httpguts.ValidHeaderFieldName(t.Header) {
		add(fieldErr("timeouts.header", "%q is not a valid header name", t.Header))
	}

	for i, s := range c.Failure.Statuses {
		if s < 100 || s > 599 {
			add(fieldErr(fmt.Sprintf("failure.statuses[%d]", i), "%d is not an HTTP status code (100-599)", s))
		}
	}
	return errs
}

func validToken(s string) bool {
	for _, r := range s {
		if !httpguts.IsTokenRune(r) {
			return false
		}
	}
	return true
}

// condition is one parsed entry of RetryConfig.On.
type condition struct {
	connect, reset, timeout, any5xx bool
	statuses                        []int
}

func parseCondition(s string) (condition, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case OnConnectFailure:
		return condition{connect: true}, nil
	case OnReset:
		return condition{reset: true}, nil
	case OnTimeout:
		return condition{timeout: true}, nil
	case On5xx:
		return condition{any5xx: true}, nil
	case OnGatewayError:
		return condition{statuses: []int{502, 503, 504}}, nil
	}
	code, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return condition{}, fmt.Errorf("unknown retry condition %q (known: %s, %s, %s, %s, %s, or a status code 400-599)",
			s, OnConnectFailure, OnReset, OnTimeout, On5xx, OnGatewayError)
	}
	if code < 400 || code > 599 {
		return condition{}, fmt.Errorf("status %d cannot be retried (want 400-599)", code)
	}
	return condition{statuses: []int{code}}, nil
}

// compiled is a validated Config in the form the hot path reads. It is
// immutable once published.
type compiled struct {
	cfg Config
	// retry conditions
	onConnect, onReset, onTimeout, on5xx bool
	statusCause                          [600]string // non-empty: retry this status, cause label
	methods                              []string
}

func compile(cfg Config) (*compiled, error) {
	if errs := cfg.Validate(); len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	c := &compiled{cfg: cfg}
	c.cfg.Retry.On = slices.Clone(cfg.Retry.On)
	c.cfg.Retry.Methods = slices.Clone(cfg.Retry.Methods)
	c.cfg.Failure.Statuses = slices.Clone(cfg.Failure.Statuses)
	for _, s := range cfg.Retry.On {
		cond, _ := parseCondition(s) // validated above
		c.onConnect = c.onConnect || cond.connect
		c.onReset = c.onReset || cond.reset
		c.onTimeout = c.onTimeout || cond.timeout
		c.on5xx = c.on5xx || cond.any5xx
		for _, code := range cond.statuses {
			c.statusCause[code] = strconv.Itoa(code)
		}
	}
	for _, m := range cfg.Retry.Methods {
		c.methods = append(c.methods, strings.ToUpper(m))
	}
	return c, nil
}

// idempotent reports whether method is listed in Retry.Methods.
func (c *compiled) idempotent(method string) bool {
	for _, m := range c.methods {
		if m == method {
			return true
		}
	}
	return false
}
