package sidecar

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	neturl "net/url"
	"strings"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/meshd/meshd/sidecar/config"
	"github.com/meshd/meshd/telemetry"
)

// scrapeText returns the Prometheus exposition of tel.
func scrapeText(t *testing.T, tel *telemetry.Provider) string {
	t.Helper()
	w := httptest.NewRecorder()
	tel.MetricsHandler.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if w.Code != http.StatusOK {
		t.Fatalf("GET /metrics: %d", w.Code)
	}
	return w.Body.String()
}

// series reports whether the exposition has a sample of name whose labels
// include every one of labels (each `key="value"`).
func series(text, name string, labels ...string) bool {
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		all := true
		for _, l := range labels {
			if !strings.Contains(line, l) {
				all = false
				break
			}
		}
		if all {
			return true
		}
	}
	return false
}

// startWithMetrics is start with meshd's metrics on.
func startWithMetrics(t *testing.T, yaml string) (*Sidecar, *telemetry.Provider) {
	t.Helper()
	tel, err := telemetry.Setup(context.Background(), telemetry.Config{Metrics: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tel.Shutdown(context.Background()) })
	cfg, err := parseConfig(yaml)
	if err != nil {
		t.Fatal(err)
	}
	s := startWithTelemetry(t, cfg, testLogger(t), tel)
	waitReady(t, s)
	return s, tel
}

// An instance that leaves discovery, and an upstream a reload removes, stop
// showing in /metrics; the rest stay.
func TestMetricsForgetWhatLeft(t *testing.T) {
	b1, b2, b3 := newBackend(t, "b1", nil), newBackend(t, "b2", nil), newBackend(t, "b3", nil)
	conf := func(svc string, q bool) string {
		y := fmt.Sprintf("discovery: {static: {svc: [%s], q: [%s]}}\nupstreams:\n  svc: {balance: {algorithm: round_robin}}\n", svc, b3.addr())
		if q {
			y += "  q: {}\n"
		}
		return y
	}
	s, tel := startWithMetrics(t, conf(b1.addr()+", "+b2.addr(), true))
	var (
		cfg *config.Config
		err error
	)
	c := proxyClient(s)
	for _, host := range []string{"svc", "svc", "q"} {
		resp, err := c.Get("http://" + host + "/")
		if err != nil {
			t.Fatal(err)
		}
		readAll(t, resp)
	}
	inst := func(b *backend) string { return `meshd_instance_id="` + b.addr() + `"` }
	const reqs = "meshd_requests_total"
	text := scrapeText(t, tel)
	for _, b := range []*backend{b1, b2, b3} {
		if !series(text, reqs, inst(b)) {
			t.Fatalf("before any change: no %s for %s:\n%s", reqs, b.name, text)
		}
	}
	if !series(text, "meshd_discovery_instances", `meshd_upstream="q"`) {
		t.Fatal("before any change: no meshd_discovery_instances for q")
	}

	// b1 leaves svc.
	cfg, err = parseConfig(conf(b2.addr(), true))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "svc down to one instance", func() bool { return len(s.lookup("svc").pool.Load().Endpoints) == 1 })
	text = scrapeText(t, tel)
	if series(text, reqs, inst(b1)) || series(text, "http_client_request_duration_seconds_count", inst(b1)) {
		t.Errorf("b1 left svc, but its series are still reported")
	}
	if !series(text, reqs, inst(b2)) || !series(text, reqs, inst(b3)) {
		t.Errorf("b2 and b3 are still in use, but a series of theirs is gone")
	}

	// q leaves the config.
	cfg, err = parseConfig(conf(b2.addr(), false))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	text = scrapeText(t, tel)
	for _, name := range []string{reqs, "http_server_request_duration_seconds_count", "meshd_discovery_instances", "meshd_discovery_stale"} {
		if series(text, name, `meshd_upstream="q"`) {
			t.Errorf("%s: q was removed, but is still reported", name)
		}
		if !series(text, name, `meshd_upstream="svc"`) {
			t.Errorf("%s: svc is still configured, but is gone", name)
		}
	}
}

// slowThenReload sends GET url through s and, while the instance holds it,
// reloads s with yaml; then it lets the request finish and sends a second
// request, to svc, on the same connection: served in turn, its answer means
// the first request's handler has returned, metrics recorded.
func slowThenReload(t *testing.T, s *Sidecar, entered, release chan struct{}, url, yaml string) {
	t.Helper()
	pu, _ := neturl.Parse("http://" + s.Addr("outbound"))
	c := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(pu), MaxConnsPerHost: 1}, Timeout: 30 * time.Second}
	done := make(chan error, 1)
	go func() {
		resp, err := c.Get(url)
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		done <- err
	}()
	<-entered
	cfg, err := parseConfig(yaml)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "svc with only what the reload left", func() bool { return len(s.lookup("svc").pool.Load().Endpoints) == 1 })
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	resp, err := c.Get("http://svc/next")
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
}

// holdSlow is a handler that holds /slow until release is closed.
func holdSlow(name string, entered, release chan struct{}) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(entered)
			<-release
		}
		fmt.Fprint(w, name)
	}
}

// A try still running when its instance leaves does not bring the
// instance's series back when it ends.
func TestMetricsOfALeftInstanceStayGoneAfterItsLastTry(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	b1 := newBackend(t, "b1", holdSlow("b1", entered, release))
	b2 := newBackend(t, "b2", nil)
	conf := func(svc string) string {
		return fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", svc)
	}
	s, tel := startWithMetrics(t, conf(b1.addr()))
	slowThenReload(t, s, entered, release, "http://svc/slow", conf(b2.addr()))
	text := scrapeText(t, tel)
	for _, name := range []string{"meshd_requests_total", "http_client_request_duration_seconds_count"} {
		if series(text, name, `meshd_instance_id="`+b1.addr()+`"`) {
			t.Errorf("%s: b1 left svc before its last try ended, and is reported again", name)
		}
	}
	if !series(text, "meshd_requests_total", `meshd_instance_id="`+b2.addr()+`"`) {
		t.Error("meshd_requests_total: b2 served the last request, but is not reported")
	}
}

// A request still running when a reload removes its upstream does not
// bring the upstream's series back when it ends.
func TestMetricsOfARemovedUpstreamStayGoneAfterItsLastRequest(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	b1 := newBackend(t, "b1", holdSlow("b1", entered, release))
	conf := func(q bool) string {
		y := fmt.Sprintf("discovery: {static: {svc: [%s], q: [%s]}}\nupstreams:\n  svc: {}\n", b1.addr(), b1.addr())
		if q {
			y += "  q: {}\n"
		}
		return y
	}
	s, tel := startWithMetrics(t, conf(true))
	slowThenReload(t, s, entered, release, "http://q/slow", conf(false))
	text := scrapeText(t, tel)
	for _, name := range []string{"meshd_requests_total", "http_server_request_duration_seconds_count"} {
		if series(text, name, `meshd_upstream="q"`) {
			t.Errorf("%s: q was removed while a request ran, and is reported again", name)
		}
	}
}

// A caller that leaves before its answer gets none: the access log says
// 499, but the span and http.server.request.duration carry no status code
// (none was sent), and error.type canceled instead.
func TestCallerThatLeftHasNoStatusInSpansAndMetrics(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		close(arrived)
		<-release
	})
	t.Cleanup(func() { close(release) }) // before the backend's Close, which waits for the handler
	s, tel, rec := startTraced(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://svc/wait", nil)
	go func() { <-arrived; cancel() }()
	if _, err := proxyClient(s).Do(req); err == nil {
		t.Fatal("want the request cancelled")
	}
	waitFor(t, "the request recorded", func() bool {
		return series(scrapeText(t, tel), "http_server_request_duration_seconds_count", `meshd_upstream="svc"`)
	})
	text := scrapeText(t, tel)
	if !series(text, "http_server_request_duration_seconds_count", `meshd_upstream="svc"`, `error_type="canceled"`) ||
		series(text, "http_server_request_duration_seconds_count", `http_response_status_code="499"`) {
		t.Errorf("want a series with error_type canceled and no 499:\n%s", text)
	}
	for _, sp := range rec.Ended() {
		if sp.SpanKind() != trace.SpanKindServer {
			continue
		}
		for _, a := range sp.Attributes() {
			if a.Key == "http.response.status_code" {
				t.Errorf("server span of a caller that left: http.response.status_code %v, want none", a.Value.Emit())
			}
		}
	}
}

// startTraced is start with every span recorded in rec, and metrics on.
func startTraced(t *testing.T, yaml string) (*Sidecar, *telemetry.Provider, *tracetest.SpanRecorder) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	tel, err := telemetry.NewTestProvider(rec, telemetry.Config{})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := parseConfig(yaml)
	if err != nil {
		t.Fatal(err)
	}
	s := startWithTelemetry(t, cfg, testLogger(t), tel)
	waitReady(t, s)
	return s, tel, rec
}

// Every request meshd receives gets a server span, refused ones and
// tunnels too, not only those forwarded.
func TestRefusedAndTunnelledRequestsHaveSpans(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { echo.Close() })
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	s, _, rec := startTraced(t, fmt.Sprintf("discovery: {static: {db: [%s]}}\nupstreams: {db: {}}\n", echo.Addr()))
	resp, err := proxyClient(s).Get("http://nosuch/")
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	conn, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(conn, "CONNECT db:443 HTTP/1.1\r\nHost: db:443\r\n\r\n")
	if resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: "CONNECT"}); err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	conn.Close()
	statusOf := func(sp sdktrace.ReadOnlySpan) int64 {
		for _, a := range sp.Attributes() {
			if a.Key == "http.response.status_code" {
				return a.Value.AsInt64()
			}
		}
		return 0
	}
	waitFor(t, "the tunnel's span to end", func() bool {
		for _, sp := range rec.Ended() {
			if sp.Name() == "CONNECT" {
				return true
			}
		}
		return false
	})
	var refused, tunnel bool
	for _, sp := range rec.Ended() {
		if sp.SpanKind() != trace.SpanKindServer {
			continue
		}
		switch {
		case statusOf(sp) == http.StatusForbidden:
			refused = true
		case sp.Name() == "CONNECT" && statusOf(sp) == http.StatusOK:
			tunnel = true
		}
	}
	if !refused || !tunnel {
		t.Errorf("server spans: refused 403 %v, tunnel %v; want both", refused, tunnel)
	}
}
