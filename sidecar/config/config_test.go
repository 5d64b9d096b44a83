package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func parse(t *testing.T, src string) (*Config, Errors) {
	t.Helper()
	c, err := Parse("meshd.yaml", []byte(src))
	if err == nil {
		return c, nil
	}
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("Parse error is %T, want Errors: %v", err, err)
	}
	return nil, es
}

func TestIssueExampleLoadsAsWritten(t *testing.T) {
	c, es := parse(t, `
listen: {outbound: 127.0.0.1:15001, admin: 127.0.0.1:15000}
discovery:
  static:
    payments: [127.0.0.1:9001, 127.0.0.1:9002, 127.0.0.1:9003]
upstreams:
  payments:
    balance: {algorithm: round_robin}
`)
	if es != nil {
		t.Fatalf("unexpected errors:\n%v", es)
	}
	if have := len(c.Static["payments"]); have != 3 {
		t.Fatalf("static instances: want 3, have %d", have)
	}
	u := c.Upstreams["payments"]
	if u.Discovery != "static" || u.Balance.Algorithm != "round_robin" {
		t.Fatalf("upstream: have %+v", u)
	}
	if c.Proxy.Drain != DefaultDrain || c.Proxy.ReadHeaderTimeout != DefaultReadHeader || c.Proxy.WriteTimeout != DefaultWriteTimeout || u.MaxIdlePerInstance != DefaultMaxIdlePerHost {
		t.Fatalf("defaults not applied: proxy %+v upstream %+v", c.Proxy, u)
	}
}

func TestWeightedEntriesAndDurations(t *testing.T) {
	c, es := parse(t, `
discovery:
  static:
    payments:
      - 127.0.0.1:9001
      - {address: 127.0.0.1:9002, weight: 3}
upstreams:
  payments:
    timeout: 2s
    timeouts: {connect: 150ms}
`)
	if es != nil {
		t.Fatalf("unexpected errors:\n%v", es)
	}
	e := c.Static["payments"]
	if e[0].Address != "127.0.0.1:9001" || e[1].Weight != 3 {
		t.Fatalf("entries: have %+v", e)
	}
	u := c.Upstreams["payments"]
	if u.Timeouts.Request != 2*time.Second || u.Timeouts.Connect != 150*time.Millisecond {
		t.Fatalf("timeouts: have %+v", u.Timeouts)
	}
}

// Each case is one bad file and the key and message fragment its single error must name.
func TestEveryValidationError(t *testing.T) {
	base := "discovery:\n  static:\n    payments: [127.0.0.1:9001]\n"
	cases := []struct {
		name, src, key, msg string
		line                int
	}{
		{"unknown top key", base + "upstreamz: {}\n", "upstreamz", "unknown key", 4},
		{"unknown nested key", base + "upstreams:\n  payments:\n    balanse: {}\n", "upstreams.payments.balanse", "unknown key", 6},
		{"duplicate key", base + "listen: {admin: 127.0.0.1:1, admin: 127.0.0.1:2}\n", "listen.admin", "duplicate key", 4},
		{"bad duration", base + "upstreams:\n  payments:\n    timeout: 2 seconds\n", "upstreams.payments.timeout", "bad duration", 6},
		{"negative duration", base + "proxy: {drain: -1s}\n", "proxy.drain", "negative", 4},
		{"duration not scalar", base + "proxy: {drain: [1s]}\n", "proxy.drain", "want a duration", 4},
		{"unknown algorithm", base + "upstreams:\n  payments:\n    balance: {algorithm: fastest}\n", "upstreams.payments.balance.algorithm", "unknown algorithm", 6},
		{"slow_start unused", base + "upstreams:\n  payments:\n    balance: {slow_start: 30s}\n", "upstreams.payments.balance.slow_start", "p2c does not use weights", 6},
		{"bad listen address", base + "listen: {outbound: localhost}\n", "listen.outbound", "host:port", 4},
		{"listen port out of range", base + "listen: {admin: 127.0.0.1:70000}\n", "listen.admin", "bad port", 4},
		{"listen clash", base + "listen: {outbound: 127.0.0.1:5000, admin: 127.0.0.1:5000}\n", "", "already used", 0},
		{"static bad address", "discovery:\n  static:\n    payments: [nothost]\n", "discovery.static.payments[0].address", "host:port", 3},
		{"static negative weight", "discovery:\n  static:\n    payments: [{address: 127.0.0.1:1, weight: -2}]\n", "discovery.static.payments[0].weight", "at least 1", 3},
		{"upstream with a capital", "discovery:\n  static:\n    payments: [127.0.0.1:1]\nupstreams:\n  Payments: {discovery: static}\n", "upstreams.Payments", "lower-case", 5},
		{"static service with a capital", "discovery:\n  static:\n    Payments: [127.0.0.1:1]\n", "discovery.static.Payments", "lower-case", 3},
		{"telemetry endpoint", "discovery:\n  static:\n    payments: [127.0.0.1:1]\ntelemetry: {traces: otlp, endpoint: collector.internal}\n", "telemetry.endpoint", "host:port", 4},
		{"telemetry propagators", "discovery:\n  static:\n    payments: [127.0.0.1:1]\ntelemetry: {propagators: [b3, none]}\n", "telemetry.propagators", "none", 4},
		{"timeout twice", base + "upstreams:\n  payments:\n    timeout: 2s\n    timeouts: {request: 5s}\n", "upstreams.payments.timeout", "disagree", 6},
		{"explicit zero read as the default", base + "upstreams:\n  payments:\n    retry: {attempts: 0}\n", "upstreams.payments.retry.attempts", "read as the default", 6},
		{"explicit zero timeout", base + "upstreams:\n  payments:\n    timeouts: {response_header: 0s}\n", "upstreams.payments.timeouts.response_header", "read as the default", 6},
		{"static upstream with no instance", "discovery:\n  static:\n    payments: []\nupstreams:\n  payments: {}\n", "discovery.static.payments", "lists none", 3},
		{"second document", "discovery:\n  static:\n    payments: [127.0.0.1:1]\n---\nupstreams: {bogus: {}}\n", "", "second YAML document", 4},
		{"static zero weight", "discovery:\n  static:\n    payments: [{address: 127.0.0.1:1, weight: 0}]\n", "discovery.static.payments[0].weight", "at least 1", 3},
		{"static weight not a number", "discovery:\n  static:\n    payments: [{address: 127.0.0.1:1, weight: heavy}]\n", "discovery.static.payments[0].weight", "whole number", 3},
		{"static duplicate instance", "discovery:\n  static:\n    payments: [127.0.0.1:1, 127.0.0.1:1]\n", "discovery.static.payments[1]", "twice", 3},
		{"static not a list", "discovery:\n  static:\n    payments: 127.0.0.1:1\n", "discovery.static.payments", "want a list", 3},
		{"upstream without source", base + "upstreams:\n  orders: {}\n", "upstreams.orders", "not in the static catalog", 5},
		{"consul source without consul", base + "upstreams:\n  payments: {discovery: consul}\n", "upstreams.payments.discovery", "discovery.consul", 5},
		{"unknown source", base + "upstreams:\n  payments: {discovery: dns}\n", "upstreams.payments.discovery", "want static or consul", 5},
		{"bad upstream name", "discovery:\n  static:\n    'pay ments': [127.0.0.1:1]\n", "discovery.static.pay ments", "letters, digits", 3},
		{"bool type", base + "proxy: {x_forwarded: maybe}\n", "proxy.x_forwarded", "true or false", 4},
		{"int type", base + "proxy: {max_header_bytes: lots}\n", "proxy.max_header_bytes", "whole number", 4},
		{"negative header bytes", base + "proxy: {max_header_bytes: -1}\n", "proxy.max_header_bytes", "negative", 4},
		{"negative write timeout", base + "proxy: {write_timeout: -1s}\n", "proxy.write_timeout", "must not be negative", 4},
		{"negative idle timeout", base + "proxy: {idle_timeout: -5s}\n", "proxy.idle_timeout", "must not be negative", 4},
		{"failure status range", base + "upstreams:\n  payments:\n    failure: {statuses: [503, 700]}\n", "upstreams.payments.failure.statuses[1]", "100-599", 6},
		{"breaker ratio", base + "upstreams:\n  payments:\n    breaker: {failure_ratio: 1.5}\n", "upstreams.payments.breaker.failure_ratio", "must be in (0,1]", 6},
		{"retry attempts", base + "upstreams:\n  payments:\n    retry: {attempts: -1}\n", "upstreams.payments.retry.attempts", "at least 1", 6},
		{"upstream listen", base + "upstreams:\n  payments: {listen: 9191}\n", "upstreams.payments.listen", "host:port", 5},
		{"service port", base + "service: {name: orders}\n", "service.port", "port is required", 4},
		{"register without consul", base + "service: {name: orders, port: 8080, register: true}\n", "service.register", "discovery.consul", 4},
		{"register without name", base + "service: {port: 8080, register: true}\ndiscovery_x: 1\n", "service.name", "name is required", 4},
		{"log format", base + "log: {format: xml}\n", "log.format", "auto, text or json", 4},
		{"log level", base + "log: {level: loud}\n", "log.level", "debug, info", 4},
		{"traces exporter", base + "telemetry: {traces: zipkin}\n", "telemetry.traces", "otlp", 4},
		{"sample ratio", base + "telemetry: {sample_ratio: 2}\n", "telemetry.sample_ratio", "0 to 1", 4},
		{"propagator", base + "telemetry: {propagators: [jaeger]}\n", "telemetry.propagators[0]", "tracecontext", 4},
		{"consul scheme", base + "discovery:\n  consul: {scheme: ftp}\n", "", "", 0},
		{"consul cert without key", "discovery:\n  consul: {cert_file: /etc/c.pem}\n", "discovery.consul.cert_file", "together", 2},
		{"static file missing", base + "discovery: {static_file: /nonexistent/catalog.yaml}\n", "", "", 0},
		{"not yaml", "listen: [\n", "", "not valid YAML", 0},
		{"mapping expected", "listen: 5\n", "listen", "want a mapping", 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, es := parse(t, tc.src)
			if len(es) == 0 {
				t.Fatalf("want an error, have none for:\n%s", tc.src)
			}
			if tc.msg == "" {
				return // only that it fails (duplicate section keys are reported too)
			}
			for _, e := range es {
				if (tc.key == "" || e.Key == tc.key) && strings.Contains(e.Msg, tc.msg) {
					if tc.line != 0 && e.Line != tc.line {
						t.Errorf("want line %d, have %d: %v", tc.line, e.Line, e)
					}
					if e.File != "meshd.yaml" {
						t.Errorf("want file meshd.yaml, have %q", e.File)
					}
					return
				}
			}
			t.Fatalf("want an error at key %q containing %q, have:\n%v", tc.key, tc.msg, es)
		})
	}
}

func TestTenErrorsAllReported(t *testing.T) {
	src := `listen:
  outbound: nowhere
  admin: 127.0.0.1:99999
  sideways: 1
discovery:
  static:
    payments: [127.0.0.1:1, {address: 127.0.0.1:2, weight: -1}]
upstreams:
  payments:
    timeout: soon
    balance: {algorithm: magic}
    retry: {attempts: -3}
  ghost: {}
log: {format: xml, level: loud}
`
	_, es := parse(t, src)
	want := []string{
		"listen.outbound", "listen.admin", "listen.sideways",
		"discovery.static.payments[1].weight", "upstreams.payments.timeout",
		"upstreams.payments.balance.algorithm", "upstreams.payments.retry.attempts",
		"upstreams.ghost", "log.format", "log.level",
	}
	have := map[string]bool{}
	for _, e := range es {
		have[e.Key] = true
	}
	for _, k := range want {
		if !have[k] {
			t.Errorf("no error reported for %s", k)
		}
	}
	if len(es) < len(want) {
		t.Fatalf("want at least %d errors, have %d:\n%v", len(want), len(es), es)
	}
	// Errors are ordered by line and each line is file:line: key: message.
	for i := 1; i < len(es); i++ {
		if es[i].Line < es[i-1].Line {
			t.Fatalf("errors not in line order:\n%v", es)
		}
	}
	if s := es[0].Error(); !strings.HasPrefix(s, "meshd.yaml:2: listen.outbound: ") {
		t.Fatalf("first error: have %q", s)
	}
}

func TestStaticFile(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "catalog.yaml"), []byte("inventory:\n  - {address: 127.0.0.1:7001, weight: 2}\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "meshd.yaml"), []byte("discovery: {static_file: catalog.yaml}\nupstreams: {inventory: {}}\n"), 0o644)
	c, err := Load(filepath.Join(dir, "meshd.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if e := c.Static["inventory"]; len(e) != 1 || e[0].Weight != 2 {
		t.Fatalf("static from file: have %+v", e)
	}
	// An error inside the catalog file names that file and line.
	os.WriteFile(filepath.Join(dir, "catalog.yaml"), []byte("inventory:\n  - bad\n"), 0o644)
	_, err = Load(filepath.Join(dir, "meshd.yaml"))
	var es Errors
	if !errors.As(err, &es) || !strings.Contains(es.Error(), "catalog.yaml:2: inventory[0].address") {
		t.Fatalf("want an error in catalog.yaml line 2, have %v", err)
	}
}

// A new content of the catalog file is checked as loading checks it; the
// config keeps the content it was built from.
func TestStaticWithFile(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "catalog.yaml")
	os.WriteFile(file, []byte("payments: [127.0.0.1:7001]\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "meshd.yaml"), []byte("discovery: {static: {a: [127.0.0.1:1], b: [127.0.0.1:2]}, static_file: catalog.yaml}\nupstreams: {payments: {}, a: {}}\n"), 0o644)
	c, err := Load(filepath.Join(dir, "meshd.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if string(c.StaticFileData) != "payments: [127.0.0.1:7001]\n" {
		t.Fatalf("StaticFileData: have %q", c.StaticFileData)
	}
	m, err := c.StaticWithFile([]byte("payments: [127.0.0.1:7002]\nextra: [127.0.0.1:7003]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 4 || m["payments"][0].Address != "127.0.0.1:7002" || m["a"][0].Address != "127.0.0.1:1" {
		t.Fatalf("merged catalog: have %+v", m)
	}
	_, err = c.StaticWithFile([]byte("payments: [127.0.0.1:7002]\na: [127.0.0.1:9]\nb: [127.0.0.1:9]\n"))
	if err == nil || !strings.Contains(err.Error(), `service "a" is in both`) || !strings.Contains(err.Error(), `service "b" is in both`) {
		t.Fatalf("want both duplicates reported, have %v", err)
	}
	_, err = c.StaticWithFile([]byte("other: [127.0.0.1:7002]\n"))
	if err == nil || !strings.Contains(err.Error(), "upstreams.payments: no instances") {
		t.Fatalf("want the upstream left without instances reported, have %v", err)
	}
	if _, err = c.StaticWithFile([]byte("payments: [nothost]\n")); err == nil || !strings.Contains(err.Error(), "catalog.yaml:1") {
		t.Fatalf("want a parse error naming the file and line, have %v", err)
	}
}

// The Consul section's files are found beside the config file, as the
// static catalog is; absolute paths stay as written.
func TestConsulFilesRelativeToTheConfig(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "meshd.yaml"), []byte("discovery:\n  consul: {token_file: tok, ca_file: tls/ca.pem, cert_file: /abs/c.pem, key_file: ../k.pem}\n"), 0o644)
	c, err := Load(filepath.Join(dir, "meshd.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	cc := c.Discovery.Consul
	for _, p := range [][2]string{
		{cc.TokenFile, filepath.Join(dir, "tok")},
		{cc.CAFile, filepath.Join(dir, "tls", "ca.pem")},
		{cc.CertFile, "/abs/c.pem"},
		{cc.KeyFile, filepath.Join(filepath.Dir(dir), "k.pem")},
	} {
		if p[0] != p[1] {
			t.Errorf("want %s, have %s", p[1], p[0])
		}
	}
}

func TestOnDemandPatterns(t *testing.T) {
	c, es := parse(t, "discovery:\n  consul: {address: 127.0.0.1:8500}\n  on_demand_allow: ['inv*']\n")
	if es != nil {
		t.Fatal(es)
	}
	if !c.AllowedOnDemand("inventory") || c.AllowedOnDemand("payments") {
		t.Fatal("on_demand_allow pattern not applied")
	}
	c, _ = parse(t, "discovery:\n  static: {a: [127.0.0.1:1]}\n")
	if c.AllowedOnDemand("a") {
		t.Fatal("on-demand discovery must be off without consul")
	}
}

func TestResilienceKeysLayOverDefaults(t *testing.T) {
	c, es := parse(t, `
discovery: {static: {payments: [127.0.0.1:1]}}
upstreams:
  payments:
    timeout: 3s
    breaker: {consecutive_failures: 2, open_for: 100ms, max_ejection_percent: 0, fail_open: false}
    retry: {attempts: 5, on: [connect-failure, "429"], budget_percent: 0}
    timeouts: {connect: 50ms, per_try: 200ms}
    failure: {statuses: [500, 503]}
`)
	if es != nil {
		t.Fatal(es)
	}
	rc := c.Upstreams["payments"].Resilience()
	if rc.Breaker.ConsecutiveFailures != 2 || rc.Breaker.OpenFor != 100*time.Millisecond || rc.Breaker.MaxEjectionPercent != 0 || rc.Breaker.FailOpen {
		t.Errorf("breaker: have %+v", rc.Breaker)
	}
	if rc.Breaker.HalfOpenProbes != 1 || rc.Breaker.OpenMultiplier != 2 {
		t.Errorf("breaker defaults lost: have %+v", rc.Breaker)
	}
	if rc.Retry.Attempts != 5 || len(rc.Retry.On) != 2 || rc.Retry.BudgetPercent != 0 || rc.Retry.BufferBody != 64<<10 {
		t.Errorf("retry: have %+v", rc.Retry)
	}
	if rc.Timeouts.Request != 3*time.Second || rc.Timeouts.Connect != 50*time.Millisecond || rc.Timeouts.PerTry != 200*time.Millisecond || rc.Timeouts.Header != "X-Meshd-Timeout" {
		t.Errorf("timeouts: have %+v", rc.Timeouts)
	}
	if len(rc.Failure.Statuses) != 2 {
		t.Errorf("failure: have %+v", rc.Failure)
	}
	_, es = parse(t, "discovery: {static: {payments: [127.0.0.1:1]}}\nupstreams: {payments: {retry: {on: [sometimes]}}}\n")
	if len(es) == 0 || !strings.Contains(es.Error(), "upstreams.payments.retry.on") {
		t.Fatalf("unknown retry condition: want an error naming retry.on, have %v", es)
	}
}
