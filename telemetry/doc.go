// Package telemetry gives meshd its logs, traces and metrics.
//
// # Overview
//
// Setup turns a Config plus the standard OpenTelemetry environment variables
// into a Provider. The sidecar's forwarding path calls, per request:
//
//	ctx, srv := p.StartServer(ctx, r, upstream)        // the request meshd received
//	p.Metrics.InFlight(upstream, +1)
//	for each attempt {
//	    actx, span := p.StartAttempt(ctx, out, telemetry.Attempt{...}) // also injects trace headers into out
//	    ... send ...
//	    telemetry.EndAttempt(span, status, telemetry.ErrorType(err))
//	    p.Metrics.RequestDone(upstream, instanceID, addr, method, status, elapsed, errType)
//	    telemetry.Retrying(srv, next, cause, backoff)    // when retrying
//	}
//	telemetry.EndServer(srv, status, errType)
//	p.Metrics.ServerRequestDone(upstream, method, status, errType, total)
//	p.Metrics.InFlight(upstream, -1)
//	telemetry.AccessLog(logger, ctx, telemetry.Access{...})
//
// A nil *Provider and a nil *Metrics are valid and do nothing, so callers
// need no "is telemetry on?" checks. When tracing is off the Start methods
// return the context unchanged and a no-op span without touching headers
// (trace headers the app sent pass through the proxy as they are); when a
// span is not sampled no attribute is built, and a request that brings no
// trace context and is sampled out never reaches the SDK: meshd decides as
// the sampler would and writes the not-sampled traceparent (when only W3C
// trace context and baggage are propagated). Metric methods reuse cached
// attribute sets and do not allocate after the first request of each label
// combination.
//
// # Configuration
//
// Every setting has a config key (under telemetry: in meshd's YAML; the
// Config field in brackets) and, where OpenTelemetry defines one, an
// environment variable. A key that is set wins over the variable; a
// variable wins over the default.
//
//   - service_name [ServiceName], OTEL_SERVICE_NAME: the service.name shown
//     in Jaeger. Without both, service.name from OTEL_RESOURCE_ATTRIBUTES,
//     else "meshd".
//   - OTEL_RESOURCE_ATTRIBUTES: extra key=value pairs describing this
//     process (deployment.environment.name=prod,...), attached to every
//     span and to the target_info metric.
//   - exporter [Exporter], OTEL_TRACES_EXPORTER: where spans go. "otlp"
//     sends OTLP using the protocol below; "otlp-grpc" and "otlp-http" pick
//     the protocol directly; "console" prints spans to standard output;
//     "none" turns tracing off. The variable may list several
//     (otlp,console). Default: otlp when an OTLP endpoint is configured,
//     otherwise none.
//   - endpoint [Endpoint], OTEL_EXPORTER_OTLP_ENDPOINT,
//     OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: the collector (Jaeger, an
//     OpenTelemetry Collector). host:port or a URL; an http:// URL means
//     plaintext. For OTLP/HTTP a URL without a path gets /v1/traces. The
//     variables are read by the OpenTelemetry exporter itself with its
//     usual rules (the general one gets /v1/traces appended, the TRACES one
//     is used as is). Defaults: localhost:4317 (gRPC), localhost:4318
//     (HTTP).
//   - protocol [Protocol], OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
//     OTEL_EXPORTER_OTLP_PROTOCOL: "grpc" or "http/protobuf" (default, as
//     the OpenTelemetry specification says). http/json is not supported.
//   - insecure [Insecure], OTEL_EXPORTER_OTLP_INSECURE,
//     OTEL_EXPORTER_OTLP_TRACES_INSECURE: true sends without TLS. When the
//     key is false the endpoint's scheme and the variables decide.
//   - headers [Headers], OTEL_EXPORTER_OTLP_HEADERS,
//     OTEL_EXPORTER_OTLP_TRACES_HEADERS: extra headers on every export,
//     such as an API key. Headers from the key replace those from the
//     variables. Other OTEL_EXPORTER_OTLP_* variables (certificates,
//     compression, timeout) are honoured by the exporter directly.
//   - OTEL_BSP_SCHEDULE_DELAY (ms, 5000), OTEL_BSP_EXPORT_TIMEOUT (ms,
//     30000), OTEL_BSP_MAX_QUEUE_SIZE (2048) and
//     OTEL_BSP_MAX_EXPORT_BATCH_SIZE (512): batching, with the SDK batch
//     processor's meaning and defaults. meshd batches spans itself (a span
//     ending wakes no goroutine); a value that is not a positive integer
//     is an error.
//   - sample_ratio [SampleRatio], OTEL_TRACES_SAMPLER,
//     OTEL_TRACES_SAMPLER_ARG: which traces are recorded. sample_ratio r
//     records the fraction r of new traces and follows the caller's
//     decision when a request arrives with trace context
//     (parentbased_traceidratio). The variable accepts always_on,
//     always_off, traceidratio, parentbased_always_on,
//     parentbased_always_off and parentbased_traceidratio, with the ratio in
//     the _ARG variable (default 1). Default: parentbased_always_on.
//   - propagators [Propagators], OTEL_PROPAGATORS: which trace headers
//     meshd reads from the app and writes to upstreams: "tracecontext"
//     (W3C traceparent/tracestate), "baggage" (W3C baggage), "b3" (Zipkin's
//     single b3 header), "b3multi" (X-B3-* headers), "none". Default:
//     tracecontext,baggage.
//   - OTEL_SDK_DISABLED=true: turns tracing and metrics off whatever else is
//     configured.
//   - metrics [Metrics]: serve Prometheus metrics on the admin /metrics
//     endpoint (Provider.MetricsHandler). Off: the handler answers 404.
//   - record_query [RecordQuery]: record query-string values in url.query
//     and url.full. By default only the keys are kept and every value reads
//     REDACTED; even when on, values of signature parameters (sig,
//     Signature, AWSAccessKeyId, X-Goog-Signature, X-Amz-Signature,
//     X-Amz-Credential, X-Amz-Security-Token) stay redacted. User names and
//     passwords in URLs are never recorded.
//
// Bad values are errors that name the key or variable; Config.Validate
// checks the keys alone, Setup also checks the variables.
//
// # Spans
//
// meshd makes one SERVER span for each request it receives, named after
// the HTTP method or "{method} {route}" (the route being the upstream
// name), and one CLIENT span for every attempt to send it to an instance,
// named after the method; a retried request therefore shows one client span
// per try under the same server span. Unknown methods are recorded as
// _OTHER and spans are then named "HTTP".
//
// Standard attributes (OpenTelemetry HTTP semantic conventions):
//
//   - http.request.method: GET, POST, ... or _OTHER.
//   - http.request.method_original: the method as sent, when it was _OTHER.
//   - http.response.status_code: the status code returned.
//   - http.route: the route given to StartServer (server spans).
//   - http.request.resend_count: on client spans of retries: 1 for the
//     first retry, 2 for the second...
//   - url.full: the URL sent to the instance (client spans), query values
//     redacted.
//   - url.scheme, url.path, url.query: the request the app sent (server
//     spans), query values redacted.
//   - server.address, server.port: on server spans the Host the app
//     addressed; on client spans the host and port of url.full.
//   - network.peer.address, network.peer.port: the other end of the
//     connection: the app on server spans, the instance on client spans.
//   - client.address: the original client: the first X-Forwarded-For entry,
//     else the peer (server spans).
//   - user_agent.original: the app's User-Agent (server spans).
//   - network.protocol.version: 1.0, 1.1, 2 (server spans).
//   - error.type: why the request failed: the status code for failures
//     (5xx on server spans, 4xx and 5xx on client spans), or an error kind:
//     timeout, connect, reset, tls, breaker_open, no_instance, _OTHER. Such
//     spans also get the Error status. A caller that cancels is not an
//     error: the span gets meshd.canceled=true and keeps an unset status.
//
// meshd's own attributes, which explain why a request went where it went:
//
//   - meshd.upstream: the logical service the request was for.
//   - meshd.lb.algorithm: the balancing algorithm that chose the instance.
//   - meshd.lb.candidates: how many instances it could choose from.
//   - meshd.lb.reason: why it chose this one, in the algorithm's words.
//   - meshd.lb.score: the algorithm's score for the instance (for example
//     its latency estimate), when the algorithm has one.
//   - meshd.instance.id: the discovery ID of the chosen instance.
//   - meshd.instance.address: the host:port dialled.
//   - meshd.breaker.state: the instance's circuit breaker state when the
//     attempt was admitted: closed, open, half-open.
//   - meshd.attempt: 1 for the first attempt, 2 for the first retry, ...
//   - meshd.canceled: true when the caller went away.
//
// Events on the server span:
//
//   - meshd.breaker.rejected: an instance's breaker refused the request, so
//     nothing was sent to it (meshd.instance.id, meshd.breaker.state).
//   - meshd.retry: another attempt follows (meshd.attempt: its number,
//     meshd.retry.cause: what failed, meshd.retry.backoff: the wait in
//     seconds).
//   - meshd.discovery.stale: discovery for the upstream is failing and the
//     last good instance set was used (meshd.upstream,
//     meshd.discovery.stale_since, meshd.discovery.stale_for in seconds,
//     meshd.discovery.error).
//   - meshd.lb.no_instance: no instance could be chosen (meshd.lb.reason).
//
// # Metrics
//
// Names as Prometheus shows them on /metrics (the OpenTelemetry name has
// dots instead of underscores). Labels in brackets.
//
//   - http_client_request_duration_seconds (histogram): how long each
//     attempt to an instance took [meshd_upstream, meshd_instance_id,
//     http_request_method (_OTHER for methods the conventions do not know),
//     server_address, server_port, http_response_status_code, error_type].
//   - meshd_requests_total (counter): attempts to instances by outcome
//     [meshd_upstream, meshd_instance_id, meshd_status_class: 1xx..5xx,
//     "error" when no response came back, "canceled" when the caller went
//     away].
//   - http_server_request_duration_seconds (histogram): how long requests
//     the app sent took, retries included [meshd_upstream,
//     http_request_method, url_scheme, http_response_status_code when one
//     was sent, error_type for 5xx, or
//     canceled when the caller left before its answer (the access log
//     says 499 for those; no 499 is ever sent)].
//   - meshd_requests_in_flight (gauge): requests to an upstream being
//     handled now [meshd_upstream].
//   - meshd_retries_total (counter): retries [meshd_upstream,
//     meshd_retry_cause].
//   - meshd_breaker_transitions_total (counter): circuit breaker state
//     changes [meshd_upstream, meshd_instance_id, meshd_breaker_from,
//     meshd_breaker_to].
//   - meshd_breaker_state (gauge): each instance's breaker: 0 closed, 1
//     open, 2 half-open [meshd_upstream, meshd_instance_id].
//   - meshd_discovery_updates_total (counter): instance sets received
//     [meshd_upstream, meshd_discovery_source].
//   - meshd_discovery_instances (gauge): instances in the latest set
//     [meshd_upstream].
//   - meshd_discovery_stale (gauge): 1 while discovery for the upstream is
//     failing and the last good set is in use, else 0 [meshd_upstream].
//   - target_info: the resource attributes (service.name, ...).
//   - go_* and process_*: the Go runtime and process of meshd itself.
//
// The series of an instance that left discovery, and of an upstream that
// is gone, are dropped (Metrics.ForgetInstance, Metrics.ForgetUpstream),
// except the counters of retries, breaker transitions and discovery
// updates and the in-flight gauge.
//
// Duration buckets are 5ms, 10ms, 25ms, 50ms, 75ms, 100ms, 250ms, 500ms,
// 750ms, 1s, 2.5s, 5s, 7.5s and 10s.
//
// # Logs
//
// NewLogger writes structured logs as JSON or as key=value text ("auto"
// picks text on a terminal). AccessLog writes one "access" line per request
// with upstream, instance, method, path, status, duration_ms, attempts,
// bytes, error (on failure) and, when the request was traced, trace_id and
// span_id, so a log line leads straight to its trace in Jaeger.
package telemetry
