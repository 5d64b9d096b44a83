package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// JaegerEnv names the environment variable that points at a Jaeger v2
// binary; without it $HOME/.cache/meshd/bin/jaeger and PATH are tried.
const JaegerEnv = "MESHD_JAEGER_BIN"

// ErrTraceNotFound is returned (wrapped) by Jaeger.Trace while Jaeger does
// not know the trace.
var ErrTraceNotFound = errors.New("trace not found")

var errHTTPNotFound = errors.New("404 Not Found")

// Jaeger is a Jaeger v2 all-in-one process with in-memory storage whose
// every listener (OTLP gRPC and HTTP receivers, query HTTP and gRPC APIs,
// health check) is bound to 127.0.0.1 on a free port; it has no other
// listeners and does not trace itself. Methods are safe for concurrent use.
type Jaeger struct {
	ports jaegerPorts
	proc  *Process
	http  *http.Client
}

type jaegerPorts struct {
	otlpGRPC, otlpHTTP, queryHTTP, queryGRPC, health int
}

// StartJaeger starts Jaeger for t, waits until its health check reports
// every component ready and its query API answers, and stops it when the
// test ends. A missing binary skips or fails the test (see Require).
func StartJaeger(t testing.TB) *Jaeger {
	t.Helper()
	bin := Binary(t, JaegerEnv, "jaeger", "run `make tools` or `.ci/install-tool jaeger`, or set "+JaegerEnv)
	dir := t.TempDir()
	var lastErr error
	// Another program may take a port between FreePort and Jaeger binding
	// it; Jaeger then exits at once and a new set of ports is tried.
	for attempt := 1; attempt <= 3; attempt++ {
		j := &Jaeger{
			ports: jaegerPorts{
				otlpGRPC: FreePort(t), otlpHTTP: FreePort(t),
				queryHTTP: FreePort(t), queryGRPC: FreePort(t), health: FreePort(t),
			},
			http: &http.Client{Timeout: 5 * time.Second},
		}
		cfg := filepath.Join(dir, fmt.Sprintf("jaeger-%d.yaml", attempt))
		if err := os.WriteFile(cfg, []byte(j.config()), 0o600); err != nil {
			t.Fatalf("testenv: write jaeger config: %v", err)
		}
		j.proc = StartProcess(t, fmt.Sprintf("jaeger-%d", attempt), bin, "--config", "file:"+cfg)
		lastErr = j.waitReady(60 * time.Second)
		if lastErr == nil {
			return j
		}
		j.proc.Stop(5 * time.Second)
		t.Logf("testenv: jaeger start attempt %d: %v\n%s", attempt, lastErr, Tail(j.proc.LogPath(), 20))
	}
	t.Fatalf("testenv: jaeger did not become ready: %v", lastErr)
	return nil
}

// config renders the collector configuration: OTLP in, memory storage,
// query API, health check; internal metrics and self-tracing off.
func (j *Jaeger) config() string {
	return fmt.Sprintf(`service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    logs:
      level: info
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:%d
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    enable_tracing: false
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:%d
    grpc:
      endpoint: 127.0.0.1:%d
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:%d
      http:
        endpoint: 127.0.0.1:%d
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
`, j.ports.health, j.ports.queryHTTP, j.ports.queryGRPC, j.ports.otlpGRPC, j.ports.otlpHTTP)
}

// waitReady polls the health check and the query API until both answer
// 200, the health check reports StatusOK, and both OTLP ports accept
// connections.
func (j *Jaeger) waitReady(timeout time.Duration) error {
	exited := j.proc.Exited()
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return errors.New("jaeger exited during start-up")
		default:
		}
		last = func() error {
			body, err := j.get(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/status", j.ports.health))
			if err != nil {
				return fmt.Errorf("health check: %w", err)
			}
			if !strings.Contains(string(body), `"StatusOK"`) {
				return fmt.Errorf("health check: %s", strings.TrimSpace(string(body)))
			}
			if _, err := j.get(context.Background(), j.QueryURL()+"/api/services"); err != nil {
				return fmt.Errorf("query API: %w", err)
			}
			for _, addr := range []string{j.OTLPGRPC(), j.OTLPHTTP()} {
				c, err := net.DialTimeout("tcp", addr, time.Second)
				if err != nil {
					return fmt.Errorf("OTLP receiver: %w", err)
				}
				c.Close()
			}
			return nil
		}()
		if last == nil {
			return nil
		}
		select {
		case <-exited:
			return errors.New("jaeger exited during start-up")
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("after %v: %w", timeout, last)
}

// OTLPGRPC is the OTLP/gRPC receiver address, "127.0.0.1:PORT" (plaintext).
func (j *Jaeger) OTLPGRPC() string { return fmt.Sprintf("127.0.0.1:%d", j.ports.otlpGRPC) }

// OTLPHTTP is the OTLP/HTTP receiver address, "127.0.0.1:PORT" (plaintext;
// traces are posted to /v1/traces).
func (j *Jaeger) OTLPHTTP() string { return fmt.Sprintf("127.0.0.1:%d", j.ports.otlpHTTP) }

// QueryURL is the base URL of the query HTTP API and UI, without a
// trailing slash.
func (j *Jaeger) QueryURL() string { return fmt.Sprintf("http://127.0.0.1:%d", j.ports.queryHTTP) }

// LogPath is the file holding Jaeger's output.
func (j *Jaeger) LogPath() string { return j.proc.LogPath() }

// JaegerTrace is one trace as the query API returns it.
type JaegerTrace struct {
	TraceID string
	Spans   []JaegerSpan
}

// JaegerSpan is one span of a JaegerTrace. IDs are lower-case hex.
type JaegerSpan struct {
	TraceID       string
	SpanID        string
	ParentSpanID  string // from the CHILD_OF reference; "" for a root span
	OperationName string
	Kind          string // span.kind tag: server, client, internal, ...
	Service       string // service.name of the process that sent the span
	Start         time.Time
	Duration      time.Duration
	// Tags holds the span attributes and Jaeger's derived tags (span.kind,
	// otel.status_code, error, ...). Strings are as sent; numbers and
	// booleans in their JSON form ("503", "0.5", "true").
	Tags map[string]string
	// ProcessTags holds the resource attributes.
	ProcessTags map[string]string
	Events      []JaegerEvent
}

// JaegerEvent is a span event (a Jaeger "log").
type JaegerEvent struct {
	Name   string // the "event" field
	Time   time.Time
	Fields map[string]string
}

// Span returns the span with the given ID and whether it exists.
func (tr *JaegerTrace) Span(spanID string) (JaegerSpan, bool) {
	for _, s := range tr.Spans {
		if s.SpanID == spanID {
			return s, true
		}
	}
	return JaegerSpan{}, false
}

// ByKind returns the spans whose span.kind tag is kind, in the API's order.
func (tr *JaegerTrace) ByKind(kind string) []JaegerSpan {
	var out []JaegerSpan
	for _, s := range tr.Spans {
		if s.Kind == kind {
			out = append(out, s)
		}
	}
	return out
}

// Trace fetches traceID (32 hex digits) from the query API. It returns an
// error wrapping ErrTraceNotFound while Jaeger has no span of the trace.
func (j *Jaeger) Trace(ctx context.Context, traceID string) (*JaegerTrace, error) {
	body, err := j.get(ctx, j.QueryURL()+"/api/traces/"+traceID)
	if errors.Is(err, errHTTPNotFound) {
		return nil, fmt.Errorf("jaeger: trace %s: %w", traceID, ErrTraceNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("jaeger: trace %s: %w", traceID, err)
	}
	return parseJaegerTrace(traceID, body)
}

// WaitTrace polls the query API every 100ms until traceID is stored and
// ready (nil means "has at least one span") accepts it, and returns it. It
// fails the test with the last state seen when timeout passes.
func (j *Jaeger) WaitTrace(t testing.TB, traceID string, timeout time.Duration, ready func(*JaegerTrace) bool) *JaegerTrace {
	t.Helper()
	var tr *JaegerTrace
	err := WaitFor(timeout, 100*time.Millisecond, func() error {
		var err error
		tr, err = j.Trace(context.Background(), traceID)
		if err != nil {
			return err
		}
		if ready != nil && !ready(tr) {
			return fmt.Errorf("trace %s incomplete: %d spans", traceID, len(tr.Spans))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("testenv: jaeger: %v\n%s", err, Tail(j.LogPath(), 20))
	}
	return tr
}

func (j *Jaeger) get(ctx context.Context, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := j.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, fmt.Errorf("GET %s: read body: %w", url, err)
	}
	switch resp.StatusCode {
	case http.StatusOK:
		return body, nil
	case http.StatusNotFound:
		return nil, fmt.Errorf("GET %s: %w", url, errHTTPNotFound)
	}
	return nil, fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
}

// The query API's JSON (the format the Jaeger UI reads).
type apiTraceResponse struct {
	Data   []apiTrace `json:"data"`
	Errors []struct {
		Code int    `json:"code"`
		Msg  string `json:"msg"`
	} `json:"errors"`
}

type apiTrace struct {
	TraceID   string                `json:"traceID"`
	Spans     []apiSpan             `json:"spans"`
	Processes map[string]apiProcess `json:"processes"`
}

type apiSpan struct {
	TraceID       string   `json:"traceID"`
	SpanID        string   `json:"spanID"`
	OperationName string   `json:"operationName"`
	References    []apiRef `json:"references"`
	StartTime     int64    `json:"startTime"` // microseconds since the epoch
	Duration      int64    `json:"duration"`  // microseconds
	Tags          []apiKV  `json:"tags"`
	Logs          []apiLog `json:"logs"`
	ProcessID     string   `json:"processID"`
}

type apiRef struct {
	RefType string `json:"refType"`
	TraceID string `json:"traceID"`
	SpanID  string `json:"spanID"`
}

type apiKV struct {
	Key   string          `json:"key"`
	Type  string          `json:"type"`
	Value json.RawMessage `json:"value"`
}

type apiLog struct {
	Timestamp int64   `json:"timestamp"`
	Fields    []apiKV `json:"fields"`
}

type apiProcess struct {
	ServiceName string  `json:"serviceName"`
	Tags        []apiKV `json:"tags"`
}

func parseJaegerTrace(traceID string, body []byte) (*JaegerTrace, error) {
	var resp apiTraceResponse
	if err := json.Unmarshal(body, &resp); err != nil {
		return nil, fmt.Errorf("jaeger: decode trace %s: %w", traceID, err)
	}
	if len(resp.Errors) > 0 {
		if resp.Errors[0].Code == http.StatusNotFound {
			return nil, fmt.Errorf("jaeger: trace %s: %w", traceID, ErrTraceNotFound)
		}
		return nil, fmt.Errorf("jaeger: trace %s: %s", traceID, resp.Errors[0].Msg)
	}
	if len(resp.Data) == 0 || len(resp.Data[0].Spans) == 0 {
		return nil, fmt.Errorf("jaeger: trace %s: %w", traceID, ErrTraceNotFound)
	}
	at := resp.Data[0]
	tr := &JaegerTrace{TraceID: at.TraceID}
	for _, s := range at.Spans {
		span := JaegerSpan{
			TraceID:       s.TraceID,
			SpanID:        s.SpanID,
			OperationName: s.OperationName,
			Start:         time.UnixMicro(s.StartTime),
			Duration:      time.Duration(s.Duration) * time.Microsecond,
			Tags:          kvMap(s.Tags),
		}
		for _, r := range s.References {
			if r.RefType == "CHILD_OF" && r.TraceID == s.TraceID {
				span.ParentSpanID = r.SpanID
				break
			}
		}
		span.Kind = span.Tags["span.kind"]
		if p, ok := at.Processes[s.ProcessID]; ok {
			span.Service = p.ServiceName
			span.ProcessTags = kvMap(p.Tags)
		}
		for _, l := range s.Logs {
			fields := kvMap(l.Fields)
			span.Events = append(span.Events, JaegerEvent{
				Name: fields["event"], Time: time.UnixMicro(l.Timestamp), Fields: fields,
			})
		}
		tr.Spans = append(tr.Spans, span)
	}
	return tr, nil
}

func kvMap(kvs []apiKV) map[string]string {
	m := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		var s string
		if err := json.Unmarshal(kv.Value, &s); err == nil {
			m[kv.Key] = s
			continue
		}
		m[kv.Key] = string(kv.Value)
	}
	return m
}
