package telemetry

import (
	"bufio"
	"context"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// sample is one line of the Prometheus text format.
type sample struct {
	name   string
	labels map[string]string
	value  float64
}

// scrape fetches p's metrics handler and parses the samples.
func scrape(t *testing.T, p *Provider) []sample {
	t.Helper()
	w := httptest.NewRecorder()
	p.MetricsHandler.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if w.Code != http.StatusOK {
		t.Fatalf("GET /metrics: want 200, have %d", w.Code)
	}
	if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("Content-Type: want text/plain, have %q", ct)
	}
	var out []sample
	sc := bufio.NewScanner(w.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		sp := strings.LastIndexByte(line, ' ')
		series, val := line[:sp], line[sp+1:]
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			t.Fatalf("line %q: value: %v", line, err)
		}
		s := sample{labels: map[string]string{}, value: v}
		name, labels, hasLabels := strings.Cut(series, "{")
		s.name = name
		if hasLabels {
			labels = strings.TrimSuffix(labels, "}")
			for labels != "" {
				k, rest, _ := strings.Cut(labels, `="`)
				v, rest2, _ := strings.Cut(rest, `"`)
				s.labels[k] = v
				labels = strings.TrimPrefix(rest2, ",")
			}
		}
		out = append(out, s)
	}
	return out
}

// value returns the value of the sample named name whose labels include
// every pair in want, failing if there is not exactly one.
func value(t *testing.T, samples []sample, name string, want map[string]string) float64 {
	t.Helper()
	var found []sample
next:
	for _, s := range samples {
		if s.name != name {
			continue
		}
		for k, v := range want {
			if s.labels[k] != v {
				continue next
			}
		}
		found = append(found, s)
	}
	if len(found) != 1 {
		var names []string
		for _, s := range samples {
			if strings.HasPrefix(s.name, strings.SplitN(name, "_", 2)[0]) {
				names = append(names, s.name+" "+strconv.Quote(labelString(s.labels)))
			}
		}
		sort.Strings(names)
		t.Fatalf("%s%v: want exactly one sample, have %d among:\n%s", name, want, len(found), strings.Join(names, "\n"))
	}
	return found[0].value
}

func labelString(m map[string]string) string {
	var parts []string
	for k, v := range m {
		parts = append(parts, k+"="+v)
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

func TestMetricsExposition(t *testing.T) {
	p, _ := newRecorded(t, Config{})
	m := p.Metrics
	m.RequestDone("payments", "n1/p1", "", "GET", 200, 20*time.Millisecond, "")
	m.RequestDone("payments", "n1/p1", "", "GET", 200, 40*time.Millisecond, "")
	m.RequestDone("payments", "n1/p1", "", "GET", 503, 300*time.Millisecond, "")
	m.RequestDone("payments", "n2/p2", "", "GET", 0, 2*time.Second, ErrTypeTimeout)
	m.RequestDone("payments", "n2/p2", "", "GET", 0, time.Millisecond, ErrTypeCanceled)
	m.ServerRequestDone("payments", "GET", 200, "", 60*time.Millisecond)
	m.ServerRequestDone("payments", "GET", 502, "", 10*time.Millisecond)
	m.InFlight("payments", 1)
	m.InFlight("payments", 1)
	m.InFlight("payments", -1)
	m.Retry("payments", "503")
	m.Retry("payments", "503")
	m.Retry("payments", ErrTypeConnect)
	m.BreakerTransition("payments", "n1/p1", "closed", "open")
	m.BreakerTransition("payments", "n1/p1", "open", "half-open")
	m.BreakerTransition("payments", "n2/p2", "closed", "open")
	m.DiscoveryUpdate("payments", "consul", 3)
	m.DiscoveryUpdate("payments", "consul", 2)
	m.DiscoveryStale("payments", true)
	m.DiscoveryStale("orders", false)

	s := scrape(t, p)
	p1 := map[string]string{"meshd_upstream": "payments", "meshd_instance_id": "n1/p1"}
	with := func(base map[string]string, kv ...string) map[string]string {
		out := map[string]string{}
		for k, v := range base {
			out[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			out[kv[i]] = kv[i+1]
		}
		return out
	}
	checks := []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"http_client_request_duration_seconds_count", with(p1, "http_response_status_code", "200"), 2},
		{"http_client_request_duration_seconds_sum", with(p1, "http_response_status_code", "200"), 0.06},
		{"http_client_request_duration_seconds_bucket", with(p1, "http_response_status_code", "200", "le", "0.025"), 1},
		{"http_client_request_duration_seconds_bucket", with(p1, "http_response_status_code", "200", "le", "0.05"), 2},
		{"http_client_request_duration_seconds_count", with(p1, "http_response_status_code", "503", "error_type", "503"), 1},
		{"http_client_request_duration_seconds_count", map[string]string{"meshd_instance_id": "n2/p2", "error_type": "timeout"}, 1},
		{"meshd_requests_total", with(p1, "meshd_status_class", "2xx"), 2},
		{"meshd_requests_total", with(p1, "meshd_status_class", "5xx"), 1},
		{"meshd_requests_total", map[string]string{"meshd_instance_id": "n2/p2", "meshd_status_class": "error"}, 1},
		{"meshd_requests_total", map[string]string{"meshd_instance_id": "n2/p2", "meshd_status_class": "canceled"}, 1},
		{"http_server_request_duration_seconds_count", map[string]string{"meshd_upstream": "payments", "http_response_status_code": "200"}, 1},
		{"http_server_request_duration_seconds_count", map[string]string{"http_response_status_code": "502", "error_type": "502"}, 1},
		{"meshd_requests_in_flight", map[string]string{"meshd_upstream": "payments"}, 1},
		{"meshd_retries_total", map[string]string{"meshd_upstream": "payments", "meshd_retry_cause": "503"}, 2},
		{"meshd_retries_total", map[string]string{"meshd_retry_cause": "connect"}, 1},
		{"meshd_breaker_transitions_total", with(p1, "meshd_breaker_from", "closed", "meshd_breaker_to", "open"), 1},
		{"meshd_breaker_transitions_total", with(p1, "meshd_breaker_from", "open", "meshd_breaker_to", "half-open"), 1},
		{"meshd_breaker_state", p1, 2},
		{"meshd_breaker_state", map[string]string{"meshd_instance_id": "n2/p2"}, 1},
		{"meshd_discovery_updates_total", map[string]string{"meshd_upstream": "payments", "meshd_discovery_source": "consul"}, 2},
		{"meshd_discovery_instances", map[string]string{"meshd_upstream": "payments"}, 2},
		{"meshd_discovery_stale", map[string]string{"meshd_upstream": "payments"}, 1},
		{"meshd_discovery_stale", map[string]string{"meshd_upstream": "orders"}, 0},
	}
	for _, c := range checks {
		if have := value(t, s, c.name, c.labels); !near(have, c.want) {
			t.Errorf("%s%v: want %v, have %v", c.name, c.labels, c.want, have)
		}
	}
	// A successful attempt carries no error.type label.
	for _, smp := range s {
		if smp.name == "http_client_request_duration_seconds_count" && smp.labels["http_response_status_code"] == "200" {
			if et, ok := smp.labels["error_type"]; ok {
				t.Errorf("200 attempt: want no error_type, have %q", et)
			}
		}
	}
	// The process and Go runtime collectors share the registry.
	if value(t, s, "go_goroutines", nil) <= 0 {
		t.Error("go_goroutines: want > 0")
	}
}

func near(a, b float64) bool {
	d := a - b
	return d < 1e-9 && d > -1e-9
}

func TestMetricsConcurrent(t *testing.T) {
	p, _ := newRecorded(t, Config{})
	const workers, per = 8, 200
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			inst := "i" + strconv.Itoa(w%3)
			for i := range per {
				p.Metrics.InFlight("payments", 1)
				p.Metrics.RequestDone("payments", inst, "", "GET", 200+100*(i%4), time.Millisecond, "")
				p.Metrics.Retry("payments", "503")
				p.Metrics.ServerRequestDone("payments", "GET", 200, "", time.Millisecond)
				p.Metrics.InFlight("payments", -1)
			}
		}()
	}
	wg.Wait()
	s := scrape(t, p)
	var total float64
	for _, smp := range s {
		if smp.name == "meshd_requests_total" {
			total += smp.value
		}
	}
	if total != workers*per {
		t.Errorf("meshd_requests_total sum: want %d, have %v", workers*per, total)
	}
	if have := value(t, s, "meshd_requests_in_flight", map[string]string{"meshd_upstream": "payments"}); have != 0 {
		t.Errorf("in flight: want 0, have %v", have)
	}
	if have := value(t, s, "meshd_retries_total", nil); have != workers*per {
		t.Errorf("retries: want %d, have %v", workers*per, have)
	}
}

func TestNilMetricsAreNoOps(t *testing.T) {
	var m *Metrics
	m.RequestDone("u", "i", "", "GET", 200, time.Millisecond, "")
	m.ServerRequestDone("u", "GET", 200, "", time.Millisecond)
	m.InFlight("u", 1)
	m.Retry("u", "503")
	m.BreakerTransition("u", "i", "closed", "open")
	m.DiscoveryUpdate("u", "static", 1)
	m.DiscoveryStale("u", true)
	m.ForgetInstance("u", "i")
	m.ForgetUpstream("u")

	clearOTelEnv(t)
	p, err := Setup(context.Background(), Config{}, nil)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	defer p.Shutdown(context.Background())
	if p.Metrics != nil {
		t.Error("Metrics: want nil when Config.Metrics is false")
	}
	w := httptest.NewRecorder()
	p.MetricsHandler.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if w.Code != http.StatusNotFound {
		t.Errorf("metrics handler: want 404 when off, have %d", w.Code)
	}
}

func TestMetricsWithoutTracing(t *testing.T) {
	clearOTelEnv(t)
	p, err := Setup(context.Background(), Config{Metrics: true}, nil)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	defer p.Shutdown(context.Background())
	if p.Tracing() {
		t.Error("Tracing(): want false without an exporter")
	}
	p.Metrics.Retry("payments", "timeout")
	if have := value(t, scrape(t, p), "meshd_retries_total", map[string]string{"meshd_retry_cause": "timeout"}); have != 1 {
		t.Errorf("retries: want 1, have %v", have)
	}
}

func TestBreakerStateValue(t *testing.T) {
	for state, want := range map[string]int64{"closed": 0, "open": 1, "half-open": 2, "half_open": 2} {
		if have, ok := BreakerStateValue(state); !ok || have != want {
			t.Errorf("BreakerStateValue(%q): want %d, have %d (ok %v)", state, want, have, ok)
		}
	}
	if _, ok := BreakerStateValue("weird"); ok {
		t.Error("BreakerStateValue(weird): want not ok")
	}
}

// Bucket bounds are inclusive, as Prometheus's le says, and a duration past
// the last bound lands only in +Inf.
func TestDurationBucketEdges(t *testing.T) {
	p, _ := newRecorded(t, Config{})
	m := p.Metrics
	m.ServerRequestDone("edges", "GET", 200, "", 25*time.Millisecond)
	m.ServerRequestDone("edges", "GET", 200, "", 25*time.Millisecond+time.Nanosecond)
	m.ServerRequestDone("edges", "GET", 200, "", 10*time.Second+time.Nanosecond)
	s := scrape(t, p)
	at := func(le string) float64 {
		return value(t, s, "http_server_request_duration_seconds_bucket", map[string]string{"meshd_upstream": "edges", "le": le})
	}
	for le, want := range map[string]float64{"0.01": 0, "0.025": 1, "0.05": 2, "10": 2, "+Inf": 3} {
		if have := at(le); have != want {
			t.Errorf("le=%s: want %v, have %v", le, want, have)
		}
	}
	sum := value(t, s, "http_server_request_duration_seconds_sum", map[string]string{"meshd_upstream": "edges"})
	if want := 10.050000002; !near(sum, want) {
		t.Errorf("sum: want %v, have %v", want, sum)
	}
}

// A negative status is recorded as no status: one series, and the scrape
// still succeeds (two series with equal labels would fail it).
func TestNegativeStatusIsNoStatus(t *testing.T) {
	p, _ := newRecorded(t, Config{})
	m := p.Metrics
	m.ServerRequestDone("u", "GET", 0, "", time.Millisecond)
	m.ServerRequestDone("u", "GET", -1, "", time.Millisecond)
	m.RequestDone("u", "i", "", "GET", 0, time.Millisecond, "")
	m.RequestDone("u", "i", "", "GET", -1, time.Millisecond, "")
	s := scrape(t, p)
	if have := value(t, s, "http_server_request_duration_seconds_count", map[string]string{"meshd_upstream": "u"}); have != 2 {
		t.Errorf("server count: want 2, have %v", have)
	}
	if have := value(t, s, "http_client_request_duration_seconds_count", map[string]string{"meshd_upstream": "u"}); have != 2 {
		t.Errorf("client count: want 2, have %v", have)
	}
}

// has reports whether s holds a sample of name whose labels include want.
func has(s []sample, name string, want map[string]string) bool {
	for _, smp := range s {
		if smp.name != name {
			continue
		}
		ok := true
		for k, v := range want {
			if smp.labels[k] != v {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}

// An instance that left discovery, or an upstream that is gone, must not
// keep reporting: a breaker shown open for an instance that no longer
// exists would page someone forever.
func TestForgottenSeriesLeaveTheScrape(t *testing.T) {
	p, _ := newRecorded(t, Config{})
	m := p.Metrics
	for _, u := range []string{"payments", "orders"} {
		for _, inst := range []string{"n1/p1", "n2/p2"} {
			m.RequestDone(u, inst, "", "GET", 200, time.Millisecond, "")
			m.RequestDone(u, inst, "", "GET", 0, time.Millisecond, ErrTypeTimeout)
			m.BreakerTransition(u, inst, "closed", "open")
		}
		m.ServerRequestDone(u, "GET", 200, "", time.Millisecond)
		m.DiscoveryUpdate(u, "consul", 2)
		m.DiscoveryStale(u, true)
	}
	inst := func(u, i string) map[string]string {
		return map[string]string{"meshd_upstream": u, "meshd_instance_id": i}
	}
	up := func(u string) map[string]string { return map[string]string{"meshd_upstream": u} }
	perInstance := []string{"http_client_request_duration_seconds_count", "meshd_requests_total", "meshd_breaker_state"}

	m.ForgetInstance("payments", "n1/p1")
	s := scrape(t, p)
	for _, name := range perInstance {
		if has(s, name, inst("payments", "n1/p1")) {
			t.Errorf("%s: the forgotten instance is still reported", name)
		}
		for _, keep := range []map[string]string{inst("payments", "n2/p2"), inst("orders", "n1/p1")} {
			if !has(s, name, keep) {
				t.Errorf("%s%v: gone, but only payments n1/p1 was forgotten", name, keep)
			}
		}
	}
	// Recording again brings the instance back, from zero.
	m.RequestDone("payments", "n1/p1", "", "GET", 200, time.Millisecond, "")
	s = scrape(t, p)
	if have := value(t, s, "meshd_requests_total", map[string]string{"meshd_upstream": "payments", "meshd_instance_id": "n1/p1", "meshd_status_class": "2xx"}); have != 1 {
		t.Errorf("meshd_requests_total after coming back: want 1, have %v", have)
	}

	m.ForgetUpstream("payments")
	s = scrape(t, p)
	for _, name := range append(perInstance, "http_server_request_duration_seconds_count", "meshd_discovery_instances", "meshd_discovery_stale") {
		if has(s, name, up("payments")) {
			t.Errorf("%s: the forgotten upstream is still reported", name)
		}
		if !has(s, name, up("orders")) {
			t.Errorf("%s: orders is gone, but only payments was forgotten", name)
		}
	}
	if have := value(t, s, "meshd_breaker_state", inst("orders", "n2/p2")); have != 1 {
		t.Errorf("meshd_breaker_state for orders n2/p2: want 1, have %v", have)
	}
}

// Forgetting while attempts are recorded must not leave an attempt's series
// pointing at one the scrape no longer sees: once the churn stops, the next
// attempt of every instance shows.
func TestForgetRacingRecords(t *testing.T) {
	p, _ := newRecorded(t, Config{})
	m := p.Metrics
	insts := []string{"a", "b", "c", "d"}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				m.RequestDone("u", insts[(w+i)%len(insts)], "", "GET", 200+i%3, time.Millisecond, "")
			}
		}()
	}
	for i := range 2000 {
		m.ForgetInstance("u", insts[i%len(insts)])
	}
	close(stop)
	wg.Wait()
	for _, in := range insts {
		for st := 200; st < 203; st++ {
			m.RequestDone("u", in, "", "GET", st, time.Millisecond, "")
		}
	}
	s := scrape(t, p)
	for _, in := range insts {
		for st := 200; st < 203; st++ {
			labels := map[string]string{"meshd_instance_id": in, "http_response_status_code": strconv.Itoa(st)}
			if !has(s, "http_client_request_duration_seconds_count", labels) {
				t.Errorf("instance %s status %d: recorded after the churn, but not in the scrape", in, st)
			}
		}
	}
}

// The two semconv-named histograms carry the attributes the HTTP
// conventions require: the method (unknown ones as _OTHER) on both, the
// instance's address and port on the client one, the scheme on the server
// one; series differing only in them stay apart.
func TestHTTPDurationsCarryRequiredAttributes(t *testing.T) {
	p, _ := newRecorded(t, Config{})
	m := p.Metrics
	m.RequestDone("payments", "n1/p1", "10.0.0.7:9001", "GET", 200, time.Millisecond, "")
	m.RequestDone("payments", "n1/p1", "10.0.0.7:9001", "POST", 200, time.Millisecond, "")
	m.RequestDone("payments", "n1/p1", "10.0.0.7:9001", "POST", 200, time.Millisecond, "")
	m.ServerRequestDone("payments", "BREW", 200, "", time.Millisecond)
	s := scrape(t, p)
	client := map[string]string{"meshd_upstream": "payments", "server_address": "10.0.0.7", "server_port": "9001"}
	for method, want := range map[string]float64{"GET": 1, "POST": 2} {
		labels := map[string]string{"http_request_method": method}
		for k, v := range client {
			labels[k] = v
		}
		if have := value(t, s, "http_client_request_duration_seconds_count", labels); have != want {
			t.Errorf("client duration %v: want %v, have %v", labels, want, have)
		}
	}
	if have := value(t, s, "http_server_request_duration_seconds_count", map[string]string{"http_request_method": "_OTHER", "url_scheme": "http"}); have != 1 {
		t.Errorf("server duration for an unknown method: want 1 under _OTHER with url_scheme http, have %v", have)
	}
}
