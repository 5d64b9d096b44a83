package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/meshd/meshd/internal/testenv"
)

// TestTraceAcrossTwoSidecars follows one request through the mesh and reads
// its trace back from a real Jaeger:
//
//	app A (this test, its own tracer) → sidecar A (outbound, forward proxy)
//	  → sidecar B (inbound, registered in a real Consul by itself)
//	  → app B (a local server that records the traceparent it got)
//
// Sidecar A finds svc-b only through Consul. Both sidecars export OTLP to
// Jaeger (sidecar A over gRPC, sidecar B over HTTP) and flush on SIGTERM.
// The trace must hold app A's span, a server and a client span from each
// sidecar, chained parent to child, with sidecar A's routing attributes.
func TestTraceAcrossTwoSidecars(t *testing.T) {
	m := trStartMesh(t, "least_connections")
	m.waitInstances(t, m.inboundB)
	traceID, appSpanID := m.call(t)
	m.stop(t)

	tr := m.jaeger.WaitTrace(t, traceID, 20*time.Second, func(tr *testenv.JaegerTrace) bool {
		n := trCount(tr)
		return n["app-a"] >= 1 && n["sidecar-a"] >= 2 && n["sidecar-b"] >= 2
	})
	if tr.TraceID != traceID {
		t.Fatalf("trace id: want %s, have %s", traceID, tr.TraceID)
	}
	n := trCount(tr)
	if n["app-a"] != 1 || n["sidecar-a"] != 2 || n["sidecar-b"] != 2 || len(tr.Spans) != 5 {
		t.Fatalf("spans per service: want app-a 1, sidecar-a 2, sidecar-b 2 (5 in all), have %v (%d in all)\n%s", n, len(tr.Spans), trDescribe(tr))
	}
	for _, s := range tr.Spans {
		if s.TraceID != traceID {
			t.Errorf("span %s %q: trace id want %s, have %s", s.SpanID, s.OperationName, traceID, s.TraceID)
		}
	}
	if app, ok := tr.Span(appSpanID); !ok || app.Service != "app-a" {
		t.Fatalf("app A's span %s: not in the trace as service app-a\n%s", appSpanID, trDescribe(tr))
	}
	serverA := trOnly(t, tr, "sidecar-a", "server")
	clientA := trOnly(t, tr, "sidecar-a", "client")
	serverB := trOnly(t, tr, "sidecar-b", "server")
	clientB := trOnly(t, tr, "sidecar-b", "client")
	for _, c := range []struct {
		what, wantParent, parentName string
		span                         testenv.JaegerSpan
	}{
		{"sidecar A server span", appSpanID, "app A's span", serverA},
		{"sidecar A client span", serverA.SpanID, "sidecar A's server span", clientA},
		{"sidecar B server span", clientA.SpanID, "sidecar A's client span", serverB},
		{"sidecar B client span", serverB.SpanID, "sidecar B's server span", clientB},
	} {
		if c.span.ParentSpanID != c.wantParent {
			t.Errorf("%s: parent want %s (%s), have %q\n%s", c.what, c.wantParent, c.parentName, c.span.ParentSpanID, trDescribe(tr))
		}
	}

	// Why the request went where it went, on sidecar A's attempt.
	for key, want := range map[string]string{
		"meshd.upstream":            "svc-b",
		"meshd.lb.algorithm":        "least_connections",
		"meshd.instance.id":         m.instanceIDB,
		"meshd.instance.address":    m.inboundB,
		"meshd.lb.candidates":       "1",
		"meshd.breaker.state":       "closed",
		"meshd.attempt":             "1",
		"http.request.method":       "GET",
		"http.response.status_code": "200",
	} {
		if have, ok := clientA.Tags[key]; !ok || have != want {
			t.Errorf("sidecar A client span %s: want %q, have %q (present %v)", key, want, have, ok)
		}
	}
	if have := serverA.Tags["server.address"]; have != "svc-b" {
		t.Errorf("sidecar A server span server.address: want svc-b, have %q", have)
	}
	if have := serverB.Tags["http.response.status_code"]; have != "200" {
		t.Errorf("sidecar B server span status: want 200, have %q", have)
	}
	if have, want := clientB.Tags["meshd.instance.address"], m.lnB.Addr().String(); have != want {
		t.Errorf("sidecar B client span meshd.instance.address: want app B %s, have %q", want, have)
	}

	// App B saw the same trace, continued by sidecar B's attempt.
	got := m.appB.received()
	if len(got) != 1 {
		t.Fatalf("requests at app B: want 1, have %d", len(got))
	}
	parts := strings.Split(got[0], "-")
	if len(parts) != 4 {
		t.Fatalf("app B's traceparent: want version-traceid-parentid-flags, have %q", got[0])
	}
	if parts[1] != traceID {
		t.Errorf("app B's traceparent trace id: want %s, have %s", traceID, parts[1])
	}
	if parts[2] != clientB.SpanID {
		t.Errorf("app B's traceparent parent id: want sidecar B's client span %s, have %s", clientB.SpanID, parts[2])
	}
	if parts[3] != "01" {
		t.Errorf("app B's traceparent flags: want 01 (sampled), have %s", parts[3])
	}
}

// TestTraceOfRetryAcrossSidecars adds a second svc-b instance to Consul that
// refuses connections. Under round robin, at least one of two requests tries
// it first, fails to connect and is retried on sidecar B. Such a trace must
// show both attempts as children of sidecar A's server span, numbered and
// with their instances; a meshd.retry event naming the attempt that follows
// and the retry.on condition that allowed it; and sidecar B's server span
// under the attempt that reached it.
func TestTraceOfRetryAcrossSidecars(t *testing.T) {
	m := trStartMesh(t, "round_robin")
	dead := trRefusingAddr(t)
	_, portStr, _ := net.SplitHostPort(dead)
	port, _ := strconv.Atoi(portStr)
	if err := m.consul.Client(t).Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "svc-b-refusing", Name: "svc-b", Address: "127.0.0.1", Port: port,
	}); err != nil {
		t.Fatalf("register the refusing instance: %v", err)
	}
	deadID := m.consul.NodeName() + "/svc-b-refusing"
	m.waitInstances(t, m.inboundB, dead)

	var calls [2][2]string // trace id, app span id
	for i := range calls {
		calls[i][0], calls[i][1] = m.call(t)
	}
	m.stop(t)

	retried := 0
	for _, c := range calls {
		tr := m.jaeger.WaitTrace(t, c[0], 20*time.Second, func(tr *testenv.JaegerTrace) bool {
			n := trCount(tr)
			return n["app-a"] >= 1 && n["sidecar-a"] >= 2 && n["sidecar-b"] >= 2
		})
		serverA := trOnly(t, tr, "sidecar-a", "server")
		if serverA.ParentSpanID != c[1] {
			t.Errorf("trace %s: sidecar A server span parent: want app A's span %s, have %q", c[0], c[1], serverA.ParentSpanID)
		}
		attempts := trOf(tr, "sidecar-a", "client")
		sort.Slice(attempts, func(i, j int) bool { return attempts[i].Start.Before(attempts[j].Start) })
		if len(attempts) < 1 || len(attempts) > 2 {
			t.Fatalf("trace %s: sidecar A attempts: want 1 or 2, have %d\n%s", c[0], len(attempts), trDescribe(tr))
		}
		if len(attempts) == 2 {
			retried++
		}
		for i, a := range attempts {
			num := i + 1
			want := map[string]string{
				"meshd.attempt":       strconv.Itoa(num),
				"meshd.upstream":      "svc-b",
				"meshd.lb.algorithm":  "round_robin",
				"meshd.lb.candidates": "2",
			}
			if num > 1 {
				want["http.request.resend_count"] = strconv.Itoa(num - 1)
			}
			if num < len(attempts) { // failed: the refusing instance
				want["meshd.instance.id"], want["meshd.instance.address"], want["error.type"] = deadID, dead, "connect"
			} else { // reached sidecar B
				want["meshd.instance.id"], want["meshd.instance.address"], want["http.response.status_code"] = m.instanceIDB, m.inboundB, "200"
			}
			for k, v := range want {
				if have := a.Tags[k]; have != v {
					t.Errorf("trace %s, attempt %d: %s want %q, have %q", c[0], num, k, v, have)
				}
			}
			if a.ParentSpanID != serverA.SpanID {
				t.Errorf("trace %s, attempt %d: parent want sidecar A's server span %s, have %q", c[0], num, serverA.SpanID, a.ParentSpanID)
			}
		}
		serverB := trOnly(t, tr, "sidecar-b", "server")
		if last := attempts[len(attempts)-1]; serverB.ParentSpanID != last.SpanID {
			t.Errorf("trace %s: sidecar B server span parent: want the last attempt %s, have %q\n%s", c[0], last.SpanID, serverB.ParentSpanID, trDescribe(tr))
		}
		var retries []testenv.JaegerEvent
		for _, e := range serverA.Events {
			if e.Name == "meshd.retry" {
				retries = append(retries, e)
			}
		}
		if len(retries) != len(attempts)-1 {
			t.Fatalf("trace %s: meshd.retry events on sidecar A's server span: want %d, have %d", c[0], len(attempts)-1, len(retries))
		}
		for i, e := range retries {
			if have, want := e.Fields["meshd.attempt"], strconv.Itoa(i+2); have != want {
				t.Errorf("trace %s: meshd.retry event %d: meshd.attempt (the attempt that follows) want %s, have %s", c[0], i+1, want, have)
			}
			if have := e.Fields["meshd.retry.cause"]; have != "connect-failure" {
				t.Errorf("trace %s: meshd.retry event %d: meshd.retry.cause want connect-failure (the retry.on condition), have %q", c[0], i+1, have)
			}
		}
	}
	if retried == 0 {
		t.Fatalf("neither of two round-robin requests was retried: want at least one to try the refusing instance first")
	}
	if have := len(m.appB.received()); have != len(calls) {
		t.Errorf("requests at app B: want %d, have %d", len(calls), have)
	}
}

// trMesh is app A's view of the mesh: a Consul agent and a Jaeger, app B
// behind sidecar B (inbound, registered in Consul), and sidecar A whose
// svc-b upstream is discovered in Consul.
type trMesh struct {
	consul      *testenv.Consul
	jaeger      *testenv.Jaeger
	appB        *trAppB
	lnB         net.Listener
	inboundB    string // sidecar B's inbound listener, the address registered for svc-b
	instanceIDB string // sidecar A's ID for that instance: node/service ID
	outboundA   string
	adminA      string
	sidecarA    *proc
	sidecarB    *proc
	tp          *sdktrace.TracerProvider // app A's
}

// trStartMesh starts everything, waits until Consul holds sidecar B's
// registration as passing, and sets up app A's tracer. algorithm is sidecar
// A's balancing algorithm for svc-b.
func trStartMesh(t *testing.T, algorithm string) *trMesh {
	t.Helper()
	m := &trMesh{consul: testenv.StartConsul(t), jaeger: testenv.StartJaeger(t), appB: &trAppB{}}
	dir := t.TempDir()

	var err error
	if m.lnB, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	srvB := &http.Server{Handler: m.appB, ReadHeaderTimeout: 5 * time.Second}
	go srvB.Serve(m.lnB)
	t.Cleanup(func() { srvB.Close() })

	m.inboundB = freeAddr(t)
	adminB := freeAddr(t)
	cfgB := filepath.Join(dir, "sidecar-b.yaml")
	trWriteFile(t, cfgB, fmt.Sprintf(`service:
  name: svc-b
  port: %d
  register: true
  check: {interval: 1s, timeout: 1s}
listen: {outbound: %s, inbound: %s, admin: %s}
discovery:
  consul: {address: %s}
proxy: {drain: 5s}
telemetry:
  service_name: sidecar-b
  traces: otlp-http
  endpoint: http://%s
  insecure: true
`, m.lnB.Addr().(*net.TCPAddr).Port, freeAddr(t), m.inboundB, adminB, m.consul.Addr(), m.jaeger.OTLPHTTP()))
	m.sidecarB = startMeshd(t, cfgB)
	waitReady(t, adminB)
	m.sidecarB.waitLog(t, "registering the app in consul", 1)

	m.outboundA, m.adminA = freeAddr(t), freeAddr(t)
	cfgA := filepath.Join(dir, "sidecar-a.yaml")
	trWriteFile(t, cfgA, fmt.Sprintf(`listen: {outbound: %s, admin: %s}
discovery:
  consul: {address: %s}
upstreams:
  svc-b:
    discovery: consul
    balance: {algorithm: %s}
proxy: {drain: 5s}
telemetry:
  service_name: sidecar-a
  traces: otlp-grpc
  endpoint: %s
  insecure: true
`, m.outboundA, m.adminA, m.consul.Addr(), algorithm, m.jaeger.OTLPGRPC()))
	m.sidecarA = startMeshd(t, cfgA)
	waitReady(t, m.adminA)

	// Sidecar B registered app B at its inbound address, and the check passes.
	err = testenv.WaitFor(15*time.Second, 50*time.Millisecond, func() error {
		entries, _, err := m.consul.Client(t).Health().Service("svc-b", "", true, nil)
		if err != nil {
			return err
		}
		for _, e := range entries {
			s := e.Service
			if net.JoinHostPort(s.Address, strconv.Itoa(s.Port)) == m.inboundB {
				m.instanceIDB = e.Node.Node + "/" + s.ID
				return nil
			}
		}
		return fmt.Errorf("no passing svc-b instance at sidecar B's inbound %s among %d", m.inboundB, len(entries))
	})
	if err != nil {
		t.Fatalf("consul: %v", err)
	}

	exp, err := otlptracegrpc.New(context.Background(), otlptracegrpc.WithEndpoint(m.jaeger.OTLPGRPC()), otlptracegrpc.WithInsecure())
	if err != nil {
		t.Fatalf("app A exporter: %v", err)
	}
	m.tp = sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithSampler(sdktrace.AlwaysSample()),
		sdktrace.WithResource(resource.NewSchemaless(attribute.String("service.name", "app-a"))),
	)
	t.Cleanup(func() { m.tp.Shutdown(context.Background()) })
	return m
}

// waitInstances waits until sidecar A's svc-b instances are exactly addrs,
// and checks that sidecar B's carries the ID Consul gives it.
func (m *trMesh) waitInstances(t *testing.T, addrs ...string) {
	t.Helper()
	want := slices.Sorted(slices.Values(addrs))
	var have []string
	var ids map[string]string
	err := testenv.WaitFor(15*time.Second, 50*time.Millisecond, func() error {
		u, err := trUpstreamStatus(m.adminA, "svc-b")
		if err != nil {
			return err
		}
		have, ids = nil, map[string]string{}
		for _, in := range u.Instances {
			have = append(have, in.Address)
			ids[in.Address] = in.ID
		}
		slices.Sort(have)
		if !slices.Equal(have, want) {
			return fmt.Errorf("sidecar A's svc-b instances: want %v, have %v", want, have)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if id := ids[m.inboundB]; id != m.instanceIDB {
		t.Fatalf("sidecar A's id for sidecar B: want %s (consul node/service id), have %s", m.instanceIDB, id)
	}
}

// call is app A's request: a root span of its own and GET http://svc-b/hello
// through sidecar A as a forward proxy, carrying the span's traceparent. It
// returns the trace and span IDs.
func (m *trMesh) call(t *testing.T) (traceID, spanID string) {
	t.Helper()
	ctx, span := m.tp.Tracer("app-a").Start(context.Background(), "call svc-b", trace.WithSpanKind(trace.SpanKindClient))
	defer span.End()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://svc-b/hello", nil)
	if err != nil {
		t.Fatal(err)
	}
	propagation.TraceContext{}.Inject(ctx, propagation.HeaderCarrier(req.Header))
	resp, err := proxyClient(m.outboundA).Do(req)
	if err != nil {
		t.Fatalf("request through sidecar A: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "hello from b\n" {
		t.Fatalf("response: want 200 %q, have %d %q", "hello from b\n", resp.StatusCode, body)
	}
	return span.SpanContext().TraceID().String(), span.SpanContext().SpanID().String()
}

// stop flushes app A's spans, stops both sidecars with SIGTERM (they flush
// theirs on the way out) and checks that sidecar B took its registration
// out of Consul.
func (m *trMesh) stop(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.tp.Shutdown(ctx); err != nil {
		t.Fatalf("app A: flushing spans: %v", err)
	}
	for _, p := range []*proc{m.sidecarA, m.sidecarB} {
		if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
	}
	for name, p := range map[string]*proc{"sidecar A": m.sidecarA, "sidecar B": m.sidecarB} {
		if err := p.wait(t); err != nil {
			t.Fatalf("%s exit: want 0, have %v", name, err)
		}
		if l := p.trLogLine("flushing spans on exit"); l != "" {
			t.Errorf("%s could not flush its spans: %s", name, l)
		}
	}
	entries, _, err := m.consul.Client(t).Health().Service("svc-b", "", false, nil)
	if err != nil {
		t.Fatalf("consul: %v", err)
	}
	for _, e := range entries {
		if net.JoinHostPort(e.Service.Address, strconv.Itoa(e.Service.Port)) == m.inboundB {
			t.Errorf("svc-b at %s still registered after sidecar B stopped", m.inboundB)
		}
	}
}

// trAppB answers "hello from b" and remembers each request's traceparent.
type trAppB struct {
	mu     sync.Mutex
	parent []string
}

func (a *trAppB) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	a.parent = append(a.parent, r.Header.Get("Traceparent"))
	a.mu.Unlock()
	io.WriteString(w, "hello from b\n")
}

func (a *trAppB) received() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.parent...)
}

// trRefusingAddr returns a loopback address nothing listens on.
func trRefusingAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func trWriteFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// trUpstream is the part of an admin /upstreams entry the tests read.
type trUpstream struct {
	Name      string `json:"name"`
	Instances []struct {
		ID      string `json:"id"`
		Address string `json:"address"`
	} `json:"instances"`
}

// trUpstreamStatus reads one upstream from a sidecar's admin /upstreams.
func trUpstreamStatus(admin, name string) (trUpstream, error) {
	resp, err := http.Get("http://" + admin + "/upstreams")
	if err != nil {
		return trUpstream{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return trUpstream{}, fmt.Errorf("GET /upstreams: %s", resp.Status)
	}
	var all struct {
		Upstreams []trUpstream `json:"upstreams"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&all); err != nil {
		return trUpstream{}, fmt.Errorf("GET /upstreams: %w", err)
	}
	for _, u := range all.Upstreams {
		if u.Name == name {
			return u, nil
		}
	}
	return trUpstream{}, fmt.Errorf("GET /upstreams: no upstream %q", name)
}

// trLogLine returns the first log line containing substr, or "".
func (p *proc) trLogLine(substr string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.lines {
		if strings.Contains(l, substr) {
			return l
		}
	}
	return ""
}

// trCount counts a trace's spans per service.
func trCount(tr *testenv.JaegerTrace) map[string]int {
	n := map[string]int{}
	for _, s := range tr.Spans {
		n[s.Service]++
	}
	return n
}

// trOf returns the spans of service with the given kind.
func trOf(tr *testenv.JaegerTrace, service, kind string) []testenv.JaegerSpan {
	var out []testenv.JaegerSpan
	for _, s := range tr.ByKind(kind) {
		if s.Service == service {
			out = append(out, s)
		}
	}
	return out
}

// trOnly returns the only span of service with the given kind.
func trOnly(t *testing.T, tr *testenv.JaegerTrace, service, kind string) testenv.JaegerSpan {
	t.Helper()
	found := trOf(tr, service, kind)
	if len(found) != 1 {
		t.Fatalf("%s %s spans: want 1, have %d\n%s", service, kind, len(found), trDescribe(tr))
	}
	return found[0]
}

// trDescribe lists a trace's spans for failure messages.
func trDescribe(tr *testenv.JaegerTrace) string {
	var b strings.Builder
	for _, s := range tr.Spans {
		fmt.Fprintf(&b, "  %s %-9s %-6s %-14q parent=%s attempt=%s instance=%s\n",
			s.SpanID, s.Service, s.Kind, s.OperationName, s.ParentSpanID, s.Tags["meshd.attempt"], s.Tags["meshd.instance.id"])
	}
	return b.String()
}
