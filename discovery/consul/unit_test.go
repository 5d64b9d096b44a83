package consul

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func TestNextIndex(t *testing.T) {
	for _, tc := range []struct{ prev, got, want uint64 }{
		{0, 10, 10},
		{10, 12, 12},
		{10, 10, 10},
		{12, 5, 0}, // went backwards: start over
		{0, 0, 1},  // never block on 0
		{1, 0, 0},  // backwards wins; the next answer is checked again
	} {
		if have := nextIndex(tc.prev, tc.got); have != tc.want {
			t.Errorf("nextIndex(%d, %d): want %d, have %d", tc.prev, tc.got, tc.want, have)
		}
	}
}

func TestBackoff(t *testing.T) {
	defer func(f func(int64) int64) { jitter = f }(jitter)
	base, max := 250*time.Millisecond, 30*time.Second
	for _, tc := range []struct {
		attempt int
		full    time.Duration // the un-jittered delay
	}{
		{1, 250 * time.Millisecond}, {2, 500 * time.Millisecond}, {3, time.Second},
		{8, 30 * time.Second}, {40, 30 * time.Second},
	} {
		jitter = func(n int64) int64 { return 0 }
		if have := backoff(base, max, tc.attempt); have != tc.full/2 {
			t.Errorf("attempt %d, least jitter: want %v, have %v", tc.attempt, tc.full/2, have)
		}
		jitter = func(n int64) int64 { return n - 1 }
		if have := backoff(base, max, tc.attempt); have != tc.full {
			t.Errorf("attempt %d, most jitter: want %v, have %v", tc.attempt, tc.full, have)
		}
	}
}

func TestLimiter(t *testing.T) {
	var l limiter
	now := time.Unix(1000, 0)
	for i := range queryBurst {
		if d := l.wait(now); d != 0 {
			t.Fatalf("query %d of a burst: want no wait, have %v", i+1, d)
		}
	}
	if d := l.wait(now); d != queryGap {
		t.Errorf("query after the burst: want %v, have %v", queryGap, d)
	}
	if d := l.wait(now.Add(queryGap)); d != queryGap {
		t.Errorf("next query, one gap later: want %v, have %v", queryGap, d)
	}
	// After a long quiet spell the burst is available again.
	later := now.Add(time.Hour)
	for i := range queryBurst {
		if d := l.wait(later); d != 0 {
			t.Fatalf("query %d after a quiet hour: want no wait, have %v", i+1, d)
		}
	}
}

func TestToInstance(t *testing.T) {
	check := func(id, status string) *api.HealthCheck {
		return &api.HealthCheck{CheckID: id, Status: status}
	}
	entry := func(checks ...*api.HealthCheck) *api.ServiceEntry {
		return &api.ServiceEntry{
			Node:    &api.Node{Node: "n1", Address: "10.0.0.1"},
			Service: &api.AgentService{ID: "s1", Service: "svc", Port: 80, Weights: api.AgentWeights{Passing: 4, Warning: 2}},
			Checks:  checks,
		}
	}
	for _, tc := range []struct {
		name           string
		e              *api.ServiceEntry
		includeWarning bool
		wantOK         bool
		wantWeight     int
	}{
		{"passing", entry(check("serfHealth", "passing")), false, true, 4},
		{"no checks", entry(), false, true, 4},
		{"warning excluded", entry(check("c", "warning")), false, false, 0},
		{"warning included", entry(check("c", "warning")), true, true, 2},
		{"critical", entry(check("c", "critical")), true, false, 0},
		{"node maintenance", entry(check(api.NodeMaint, "critical"), check("c", "passing")), true, false, 0},
		{"service maintenance", entry(check(api.ServiceMaintPrefix+"s1", "critical")), true, false, 0},
		{"unknown status", entry(check("c", "bogus")), true, false, 0},
	} {
		in, ok := toInstance(tc.e, tc.includeWarning)
		if ok != tc.wantOK || (ok && in.Weight != tc.wantWeight) {
			t.Errorf("%s: want ok=%v weight=%d, have ok=%v weight=%d", tc.name, tc.wantOK, tc.wantWeight, ok, in.Weight)
		}
	}

	e := entry()
	e.Service.Weights = api.AgentWeights{}
	in, ok := toInstance(e, false)
	if !ok || in.ID != "n1/s1" || in.Address != "10.0.0.1:80" || in.Weight != 1 {
		t.Errorf("fallbacks: want n1/s1 at 10.0.0.1:80 weight 1, have %+v", in)
	}
	e.Service.Address = "2001:db8::5"
	if in, _ := toInstance(e, false); in.Address != "[2001:db8::5]:80" {
		t.Errorf("IPv6: want [2001:db8::5]:80, have %s", in.Address)
	}
	e.Service.Port = 0
	if _, ok := toInstance(e, false); ok {
		t.Error("port 0: want the instance left out")
	}
}

func TestResolveToken(t *testing.T) {
	isolateEnv(t)
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	fieldFile := write("field", " from-field-file\n")
	envFile := write("env", "from-env-file\n")

	check := func(what string, cfg Config, want string) {
		t.Helper()
		have, err := resolveToken(cfg)
		if err != nil || have != want {
			t.Errorf("%s: want %q, have %q (err %v)", what, want, have, err)
		}
	}
	check("nothing", Config{}, "")
	t.Setenv(api.HTTPTokenEnvName, "from-env")
	check("env token", Config{}, "from-env")
	t.Setenv(api.HTTPTokenFileEnvName, envFile)
	check("env file beats env token", Config{}, "from-env-file")
	check("field beats env", Config{Token: "from-field"}, "from-field")
	check("field file beats field", Config{Token: "from-field", TokenFile: fieldFile}, "from-field-file")

	_, err := resolveToken(Config{TokenFile: filepath.Join(dir, "missing")})
	if err == nil {
		t.Error("missing token file: want an error, have nil")
	}
}

func TestConfigDefaults(t *testing.T) {
	isolateEnv(t)
	c, err := newConn(Config{})
	if err != nil {
		t.Fatal(err)
	}
	if c.wait != DefaultWaitTime || c.backoffBase != DefaultBackoffBase || c.backoffMax != DefaultBackoffMax || !c.stale {
		t.Errorf("defaults: want wait %v backoff %v..%v stale, have wait %v backoff %v..%v stale=%v",
			DefaultWaitTime, DefaultBackoffBase, DefaultBackoffMax, c.wait, c.backoffBase, c.backoffMax, c.stale)
	}
	no := false
	c, err = newConn(Config{WaitTime: time.Hour, AllowStale: &no})
	if err != nil {
		t.Fatal(err)
	}
	if c.wait != maxWaitTime || c.stale {
		t.Errorf("overrides: want wait capped at %v and no stale reads, have %v stale=%v", maxWaitTime, c.wait, c.stale)
	}
}
