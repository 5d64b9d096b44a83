// Package resilience keeps a failing instance from hurting the application:
// it classifies the result of every try, trips a circuit breaker per
// instance, retries within a budget, and bounds the time a request may take.
//
// # How the forwarder uses it
//
// One Guard serves one upstream. Its Attach and Detach methods are wired to
// the upstream's balance.Pool (OnNew and OnRemove), so every instance gets
// its own breaker, kept in its balance.Stats for as long as the instance is
// known. For each request the forwarder:
//
//  1. calls RequestStarted, and computes the request's time budget with
//     Timeouts.Budget (a malformed timeout header is a 400);
//  2. picks an instance (setting balance.Request.IgnoreHealth when
//     FailOpen says so) and calls Admit (or AdmitForced when failing open).
//     A rejection wraps ErrBreakerOpen: nothing was sent, so it excludes the
//     instance and picks again without counting a try;
//  3. sends the try with a deadline of Timeouts.TryTimeout(remaining budget),
//     classifies the result with Classify and reports it to the function
//     Admit returned, on every path (the counters of balance.Stats stay the
//     forwarder's own business);
//  4. asks RetryDecision whether to try again and, if so, waits Backoff and
//     goes back to step 2, excluding the instances already tried.
//
// # Defaults
//
// With no resilience keys configured, a dead instance costs the application
// no failed GET: a refused connection is retried on another instance after
// a pause of at most 25ms (whatever the method, since nothing was sent), and
// after five failures in a row the instance's breaker opens for 5 seconds, so that it is no longer
// picked. A failed probe reopens it for twice as long, up to a minute.
//
// # Configuration keys
//
// The keys below belong to an upstream; they are listed by YAML section, each
// with the Config struct it fills. Durations are written as Go durations ("250ms",
// "5s"). A zero duration for a timeout means no limit.
//
// breaker — circuit breaker kept for each instance (BreakerConfig):
//
//   - consecutive_failures (default 5): open the breaker after this many
//     failures in a row. 0 turns this trigger off; then failure_ratio must
//     be set.
//   - failure_ratio (default 0, off): open the breaker when this share of
//     the outcomes seen over window are failures, a number in (0,1], e.g.
//     0.5 for half.
//   - min_requests (default 20): failure_ratio is only judged once window
//     holds at least this many outcomes.
//   - window (default 10s): how far back failures and successes are counted;
//     the count rolls forward in ten steps.
//   - open_for (default 5s): how long an opened breaker keeps the instance
//     out before letting a probe through.
//   - open_multiplier (default 2): each probe that fails multiplies the next
//     open period by this; 1 keeps it constant. It is reset to open_for once
//     the breaker closes again.
//   - open_max (default 60s): the longest an open period can grow to.
//   - half_open_probes (default 1): how many requests are let through to an
//     instance whose open period has passed. If all succeed the breaker
//     closes; the first failure reopens it.
//   - max_ejection_percent (default 50): the share of instances, in percent,
//     that breakers may keep out at once.
//   - fail_open (default true): when more instances than
//     max_ejection_percent allows are kept out, balance requests over all
//     instances again, kept out or not, rather than failing them.
//   - disabled (default false): no breakers at all.
//
// A failure is any transport error except the caller's cancellation
// (connection refused or reset, timeout, malformed response) or a response
// whose status is listed under failure.statuses. A caller that gives up
// neither helps nor hurts an instance.
//
// retry — trying a failed request again, on another instance (RetryConfig):
//
//   - attempts (default 3): the most tries of one request, the first
//     included; 1 means never retry.
//   - on (default [connect-failure, reset, 502, 503, 504]): what is retried.
//     connect-failure: no connection could be made; reset: the connection
//     broke before the response was complete; timeout: a try ran out of
//     time; 5xx: any status from 500 to 599; gateway-error: 502, 503 and
//     504; or a single status code from 400 to 599 such as 429.
//   - methods (default [GET, HEAD, OPTIONS, PUT, DELETE]): the methods that
//     are safe to send twice. Requests with other methods are only retried
//     after a connect-failure, which guarantees that the upstream never saw
//     them.
//   - retry_non_idempotent (default false): also retry other methods after
//     the upstream may have seen them.
//   - backoff_base (default 25ms) and backoff_max (default 250ms): before
//     retry n the forwarder waits a random time below
//     min(backoff_max, backoff_base × 2^(n-1)). Both 0: no wait.
//   - buffer_body (default 65536): request bodies up to this many bytes are
//     kept in memory so they can be sent again; a request with a larger body
//     is not retried once its body was sent.
//   - budget_percent (default 20): retries may add at most this percentage
//     to the requests of the last ten seconds, so that retries cannot
//     multiply the load on a failing upstream.
//   - budget_min_per_second (default 10): this many retries per second are
//     always allowed, so that an upstream with little traffic still gets
//     retried.
//   - disabled (default false): never retry.
//
// timeouts — how long a request may take (TimeoutConfig):
//
//   - connect (default 1s): the longest wait for a connection to an
//     instance.
//   - response_header (default 15s): the longest wait for the response
//     headers of one try once the request was sent. The response body is not
//     limited by it, so long downloads and streams keep working.
//   - request (default none): the longest the whole request may take, every
//     try, wait and the response body included. The upstream shorthand
//     "timeout: 2s" sets it.
//   - per_try (default none): the longest one try may take, its response
//     body included.
//   - header (default X-Meshd-Timeout): a request header through which the
//     application may shorten (never lengthen) request for one call, as a
//     duration ("500ms") or a number of milliseconds ("500"). A malformed
//     value is answered with 400 Bad Request. Empty: the header is ignored.
//
// failure — what counts against an instance (FailureConfig):
//
//   - statuses (default [502, 503, 504]): response statuses counted as
//     failures, in addition to transport errors. Add 500 or 429 if the
//     upstream uses them for overload.
//
// Config.Validate reports every invalid key at once, each error naming the
// key, for example "breaker.failure_ratio: must be in (0,1], or 0 for off".
package resilience
