package sidecar

import (
	"context"
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
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshd/meshd/internal/testenv"
	"github.com/meshd/meshd/sidecar/config"
)

// consulEnvClear keeps a developer's CONSUL_* variables out of the tests.
func consulEnvClear(t *testing.T) {
	for _, v := range []string{api.HTTPAddrEnvName, api.HTTPTokenEnvName, api.HTTPTokenFileEnvName, api.HTTPSSLEnvName} {
		t.Setenv(v, "")
	}
}

func register(t *testing.T, c *api.Client, name, id string, b *backend, ttl bool) {
	t.Helper()
	host, port, _ := net.SplitHostPort(b.addr())
	p, _ := strconv.Atoi(port)
	reg := &api.AgentServiceRegistration{Name: name, ID: id, Address: host, Port: p}
	if ttl {
		reg.Check = &api.AgentServiceCheck{CheckID: "ttl-" + id, TTL: "1m", Status: api.HealthPassing}
	}
	if err := c.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
}

// hitUntil sends requests (bounded by count and time) until pred says the
// answering backend is the one wanted; it returns how long that took.
func hitUntil(t *testing.T, c *http.Client, url string, pred func(body string) bool) time.Duration {
	t.Helper()
	began := time.Now()
	for i := 0; i < 5000 && time.Since(began) < 10*time.Second; i++ {
		resp, err := c.Get(url)
		if err != nil {
			continue
		}
		body := readAll(t, resp)
		if pred(body) {
			return time.Since(began)
		}
	}
	t.Fatalf("routing did not change within 10s")
	return 0
}

func status(t *testing.T, s *Sidecar, name string) UpstreamStatus {
	t.Helper()
	for _, u := range s.Status() {
		if u.Name == name {
			return u
		}
	}
	t.Fatalf("no upstream %q in /upstreams", name)
	return UpstreamStatus{}
}

func TestConsulRoutingFollowsTheCatalog(t *testing.T) {
	consulEnvClear(t)
	c := testenv.StartConsul(t)
	cl := c.Client(t)
	b1, b2, b3 := newBackend(t, "b1", nil), newBackend(t, "b2", nil), newBackend(t, "b3", nil)
	register(t, cl, "payments", "p1", b1, false)
	register(t, cl, "payments", "p2", b2, true)
	s := start(t, fmt.Sprintf(`
discovery: {consul: {address: %s, wait_time: 30s}}
upstreams: {payments: {discovery: consul, balance: {algorithm: round_robin}}}
`, c.Addr()))
	pc := proxyClient(s)
	seen := map[string]bool{}
	for i := 0; i < 10; i++ {
		resp, err := pc.Get("http://payments/")
		if err != nil {
			t.Fatal(err)
		}
		seen[readAll(t, resp)] = true
	}
	if !seen["b1"] || !seen["b2"] || len(seen) != 2 {
		t.Fatalf("want traffic to b1 and b2, have %v", seen)
	}

	// A new instance: the time from the Consul write to the first request
	// routed to it. With a 30s blocking wait, anything well under a second
	// can only come from the watch firing on the change.
	write := time.Now()
	register(t, cl, "payments", "p3", b3, false)
	d := hitUntil(t, pc, "http://payments/", func(b string) bool { return b == "b3" })
	t.Logf("consul write → first request routed to the new instance: %v (after the write call returned: %v)", time.Since(write), d)
	if d > time.Second {
		t.Fatalf("new instance took %v to receive traffic: not event-driven", d)
	}

	// A failing TTL check takes p2 out.
	if err := cl.Agent().UpdateTTL("ttl-p2", "down", api.HealthCritical); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "p2 removed after its check failed", func() bool { return len(status(t, s, "payments").Instances) == 2 })
	b2.hits.Store(0)
	for i := 0; i < 20; i++ {
		resp, _ := pc.Get("http://payments/")
		readAll(t, resp)
	}
	if n := b2.hits.Load(); n != 0 {
		t.Fatalf("critical instance still got %d requests", n)
	}

	// Deregistration takes p1 out.
	if err := cl.Agent().ServiceDeregister("p1"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "p1 removed after deregistration", func() bool { return len(status(t, s, "payments").Instances) == 1 })

	// Consul says no passing instance: the pool empties and requests get 502 with the reason.
	cl.Agent().ServiceDeregister("p3")
	waitFor(t, "pool emptied", func() bool { return len(status(t, s, "payments").Instances) == 0 })
	resp, err := pc.Get("http://payments/")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); resp.StatusCode != 502 || !strings.Contains(body, "no passing instances") {
		t.Fatalf("want 502 naming the reason, have %d %q", resp.StatusCode, body)
	}
}

// waitFor polls cond until it holds (there is no event to await across the
// process boundary to Consul), failing after 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestConsulOutageKeepsTheLastGoodSet(t *testing.T) {
	consulEnvClear(t)
	c := testenv.StartConsul(t)
	cl := c.Client(t)
	b1, b2 := newBackend(t, "b1", nil), newBackend(t, "b2", nil)
	register(t, cl, "payments", "p1", b1, false)
	register(t, cl, "payments", "p2", b2, false)
	s := start(t, fmt.Sprintf(`
discovery: {consul: {address: %s, wait_time: 30s, backoff_base: 50ms, backoff_max: 300ms}}
upstreams: {payments: {discovery: consul}}
`, c.Addr()))
	pc := proxyClient(s)

	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			deadline := time.Now().Add(30 * time.Second)
			for i := 0; i < 20000 && time.Now().Before(deadline); i++ {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := pc.Get("http://payments/")
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, resp.Status)
					continue
				}
				ok.Add(1)
			}
		}()
	}
	waitFor(t, "traffic flowing", func() bool { return ok.Load() > 100 })
	c.Kill()
	waitFor(t, "upstream marked stale", func() bool { return status(t, s, "payments").Stale })
	st := status(t, s, "payments")
	if st.State != "stale" || st.Since == nil || st.LastError == "" || len(st.Instances) != 2 {
		t.Fatalf("stale upstream: have %+v", st)
	}
	// /upstreams JSON says so in words, and /ready's body carries the reason while staying 200.
	raw := get(t, "http://"+s.Addr("admin")+"/upstreams")
	if !strings.Contains(raw, `"state": "stale"`) || !strings.Contains(raw, `"stale_since"`) || !strings.Contains(raw, `"last_error"`) {
		t.Fatalf("/upstreams does not show staleness:\n%s", raw)
	}
	resp, err := http.Get("http://" + s.Addr("admin") + "/ready")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); resp.StatusCode != 200 || !strings.Contains(body, "payments: stale since") {
		t.Fatalf("/ready during an outage: want 200 saying stale, have %d %q", resp.StatusCode, body)
	}
	before := ok.Load()
	waitFor(t, "traffic still flowing during the outage", func() bool { return ok.Load() > before+200 })
	close(stop)
	wg.Wait()
	t.Logf("%d requests succeeded through the outage, %d failed", ok.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Fatalf("%d requests failed while consul was down; first: %v", failed.Load(), firstErr.Load())
	}

	// Consul back: the watch resumes and a new set arrives. (A -dev agent
	// starts empty, so until the registration below Consul truly has no
	// instance; traffic was stopped above so that this window is not
	// counted as an outage failure.)
	c.Start()
	cl = c.Client(t)
	register(t, cl, "payments", "p2", b2, false)
	waitFor(t, "watch resumed with the new set", func() bool {
		st := status(t, s, "payments")
		return !st.Stale && len(st.Instances) == 1 && st.Instances[0].Address == b2.addr()
	})
	resp, err = pc.Get("http://payments/")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); resp.StatusCode != 200 || body != "b2" {
		t.Fatalf("after consul came back: want 200 from b2, have %d %q", resp.StatusCode, body)
	}
}

func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	return readAll(t, resp)
}

func TestConsulACLs(t *testing.T) {
	consulEnvClear(t)
	c := testenv.StartConsul(t, testenv.WithACL())
	admin := c.Client(t)
	b1 := newBackend(t, "b1", nil)
	register(t, admin, "payments", "p1", b1, false)
	policy, _, err := admin.ACL().PolicyCreate(&api.ACLPolicy{Name: "reader", Rules: `service_prefix "" { policy = "read" } node_prefix "" { policy = "read" }`}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := admin.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: policy.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}

	s := start(t, fmt.Sprintf("discovery: {consul: {address: %s, token: %s}}\nupstreams: {payments: {discovery: consul}}\n", c.Addr(), tok.SecretID))
	resp, err := proxyClient(s).Get("http://payments/")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); resp.StatusCode != 200 || body != "b1" {
		t.Fatalf("with a reader token: want 200 b1, have %d %q", resp.StatusCode, body)
	}
	raw := get(t, "http://"+s.Addr("admin")+"/upstreams")
	if strings.Contains(raw, tok.SecretID) {
		t.Fatal("/upstreams shows the ACL token")
	}

	// Without a token: not ready, and /ready says why.
	cfgYAML := fmt.Sprintf("listen: {outbound: 127.0.0.1:0, admin: 127.0.0.1:0}\ndiscovery: {consul: {address: %s, backoff_base: 50ms, backoff_max: 200ms}}\nupstreams: {payments: {discovery: consul}}\n", c.Addr())
	s2 := startUnready(t, cfgYAML)
	waitFor(t, "/ready to explain the ACL failure", func() bool {
		resp, err := http.Get("http://" + s2.Addr("admin") + "/ready")
		if err != nil {
			return false
		}
		body := readAll(t, resp)
		return resp.StatusCode == 503 && strings.Contains(body, "payments: discovery failing") && strings.Contains(strings.ToLower(body), "acl")
	})
	resp, err = proxyClient(s2).Get("http://payments/")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); resp.StatusCode != 502 || !strings.Contains(strings.ToLower(body), "acl") {
		t.Fatalf("without a token: want 502 naming the ACL problem, have %d %q", resp.StatusCode, body)
	}
}

// startUnready is start without waiting for readiness.
func startUnready(t *testing.T, yaml string) *Sidecar {
	t.Helper()
	return startUnreadyWith(t, yaml, testLogger(t))
}

func TestRegistrationLifecycle(t *testing.T) {
	consulEnvClear(t)
	c := testenv.StartConsul(t)
	cl := c.Client(t)
	app := newBackend(t, "app", nil)
	_, port, _ := net.SplitHostPort(app.addr())
	s := start(t, fmt.Sprintf(`
listen: {outbound: 127.0.0.1:0, admin: 127.0.0.1:0, inbound: 127.0.0.1:0}
service: {name: orders, port: %s, register: true, tags: [v1], meta: {team: core}, weights: {passing: 3, warning: 1}, check: {interval: 1s}}
discovery: {consul: {address: %s}}
`, port, c.Addr()))
	inbound := s.Addr("inbound")
	var svc *api.AgentService
	waitFor(t, "orders registered", func() bool {
		svcs, err := cl.Agent().Services()
		if err != nil {
			return false
		}
		for _, v := range svcs {
			if v.Service == "orders" {
				svc = v
				return true
			}
		}
		return false
	})
	if got := net.JoinHostPort(svc.Address, strconv.Itoa(svc.Port)); got != inbound {
		t.Errorf("registered at %s, want the inbound listener %s", got, inbound)
	}
	if svc.Weights.Passing != 3 || len(svc.Tags) != 1 || svc.Meta["team"] != "core" {
		t.Errorf("registration: have weights %+v tags %v meta %v", svc.Weights, svc.Tags, svc.Meta)
	}
	// The check passes because the inbound listener reaches the app.
	waitFor(t, "the registered check to pass", func() bool {
		entries, _, err := cl.Health().Service("orders", "", true, nil)
		return err == nil && len(entries) == 1
	})
	if body := get(t, "http://"+inbound+"/"); body != "app" {
		t.Fatalf("inbound: want the app's answer, have %q", body)
	}

	// The check probes the app, not meshd's inbound listener: a dead app
	// goes critical although the listener is still up.
	app.Close()
	waitFor(t, "the check to fail once the app is gone", func() bool {
		entries, _, err := cl.Health().Service("orders", "", true, nil)
		return err == nil && len(entries) == 0
	})

	// The agent restarts and forgets: meshd registers again.
	c.Stop()
	c.Start()
	cl = c.Client(t)
	waitFor(t, "orders registered again after the agent restart", func() bool {
		svcs, err := cl.Agent().Services()
		return err == nil && len(svcs) == 1
	})

	// Graceful shutdown deregisters.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	svcs, err := cl.Agent().Services()
	if err != nil {
		t.Fatal(err)
	}
	if len(svcs) != 0 {
		t.Fatalf("after shutdown the agent still lists %v", svcs)
	}
}

func TestDiscoverOnDemand(t *testing.T) {
	consulEnvClear(t)
	c := testenv.StartConsul(t)
	cl := c.Client(t)
	inv := newBackend(t, "inventory-1", nil)
	register(t, cl, "inventory", "i1", inv, false)
	register(t, cl, "secret", "s1", inv, false)
	s, tel := startWithMetrics(t, fmt.Sprintf(`
discovery: {consul: {address: %s}, on_demand_allow: ["inv*"], on_demand_idle: 300ms}
`, c.Addr()))
	pc := proxyClient(s)
	resp, err := pc.Get("http://inventory/")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); resp.StatusCode != 200 || body != "inventory-1" {
		t.Fatalf("on demand: want 200 from inventory, have %d %q", resp.StatusCode, body)
	}
	if st := status(t, s, "inventory"); !st.OnDemand || st.Source != "consul" {
		t.Fatalf("on-demand upstream: have %+v", st)
	}
	if !series(scrapeText(t, tel), "meshd_requests_total", `meshd_upstream="inventory"`) {
		t.Fatal("no meshd_requests_total for the on-demand upstream")
	}
	resp, _ = pc.Get("http://ghost/")
	if body := readAll(t, resp); resp.StatusCode != 403 {
		t.Fatalf("name consul does not know: want 403, have %d %q", resp.StatusCode, body)
	}
	resp, _ = pc.Get("http://secret/")
	if body := readAll(t, resp); resp.StatusCode != 403 {
		t.Fatalf("name outside on_demand_allow: want 403, have %d %q", resp.StatusCode, body)
	}
	waitFor(t, "idle on-demand watch stopped", func() bool {
		for _, u := range s.Status() {
			if u.Name == "inventory" {
				return false
			}
		}
		return true
	})
	// A reaped watch's upstream stops being reported.
	text := scrapeText(t, tel)
	for _, name := range []string{"meshd_requests_total", "http_server_request_duration_seconds_count", "meshd_discovery_instances"} {
		if series(text, name, `meshd_upstream="inventory"`) {
			t.Errorf("%s: the reaped on-demand upstream is still reported", name)
		}
	}
}

// Static and Consul upstreams side by side in one sidecar.
func TestStaticAndConsulUpstreamsTogether(t *testing.T) {
	consulEnvClear(t)
	c := testenv.StartConsul(t)
	fromConsul, fromCatalog := newBackend(t, "from-consul", nil), newBackend(t, "from-catalog", nil)
	register(t, c.Client(t), "payments", "p1", fromConsul, false)
	// "ledger" is in both places; its discovery key decides which is used.
	register(t, c.Client(t), "ledger", "l1", fromConsul, false)
	s := start(t, fmt.Sprintf(`
discovery:
  consul: {address: %s}
  static: {inventory: [%s], ledger: [%s]}
upstreams:
  payments: {}
  inventory: {}
  ledger: {discovery: consul}
`, c.Addr(), fromCatalog.addr(), fromCatalog.addr()))
	pc := proxyClient(s)
	for name, want := range map[string]string{"payments": "from-consul", "inventory": "from-catalog", "ledger": "from-consul"} {
		resp, err := pc.Get("http://" + name + "/")
		if err != nil {
			t.Fatal(err)
		}
		if body := readAll(t, resp); body != want {
			t.Errorf("%s: want an answer %s, have %q", name, want, body)
		}
		if st := status(t, s, name); st.Source != map[string]string{"from-consul": "consul", "from-catalog": "static"}[want] {
			t.Errorf("%s: source %q", name, st.Source)
		}
	}
}

// A production-like agent: the API over HTTPS only to clients with a
// certificate. meshd discovers and registers through it, with the files
// named relative to its config file.
func TestConsulOverTLS(t *testing.T) {
	consulEnvClear(t)
	files := testenv.NewTLSFiles(t)
	c := testenv.StartConsul(t, testenv.WithTLS(files))
	cl := c.Client(t) // plain HTTP, the test's own view
	b1 := newBackend(t, "b1", nil)
	register(t, cl, "payments", "p1", b1, false)
	app := newBackend(t, "app", nil)
	_, port, _ := net.SplitHostPort(app.addr())
	dir := filepath.Dir(files.CA)
	yaml := fmt.Sprintf(`
listen: {outbound: 127.0.0.1:0, admin: 127.0.0.1:0}
service: {name: orders, port: %s, register: true}
discovery:
  consul: {address: %s, scheme: https, ca_file: %s, cert_file: %s, key_file: %s}
upstreams: {payments: {discovery: consul}}
`, port, c.HTTPSAddr(), filepath.Base(files.CA), filepath.Base(files.ClientCert), filepath.Base(files.ClientKey))
	path := filepath.Join(dir, "meshd.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	s := startConfig(t, cfg, testLogger(t))
	waitReady(t, s)
	resp, err := proxyClient(s).Get("http://payments/")
	if err != nil {
		t.Fatal(err)
	}
	if body := readAll(t, resp); resp.StatusCode != 200 || body != "b1" {
		t.Fatalf("discovery over HTTPS: want 200 b1, have %d %q", resp.StatusCode, body)
	}
	waitFor(t, "orders registered over HTTPS", func() bool {
		svcs, err := cl.Agent().Services()
		if err != nil {
			return false
		}
		for _, v := range svcs {
			if v.Service == "orders" {
				return true
			}
		}
		return false
	})
}

// An agent that hangs (here stopped) does not hold up a graceful shutdown:
// deregistration gets a bounded share of the drain, and the request in
// flight still completes within it.
func TestShutdownWithAHungAgentStillDrains(t *testing.T) {
	consulEnvClear(t)
	c := testenv.StartConsul(t)
	cl := c.Client(t)
	arrived, release := make(chan struct{}), make(chan struct{})
	app := newBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(arrived)
			<-release
		}
		io.WriteString(w, "app")
	})
	_, port, _ := net.SplitHostPort(app.addr())
	s := start(t, fmt.Sprintf(`
listen: {outbound: 127.0.0.1:0, admin: 127.0.0.1:0, inbound: 127.0.0.1:0}
service: {name: orders, port: %s, register: true}
discovery: {consul: {address: %s}}
`, port, c.Addr()))
	waitFor(t, "orders registered", func() bool {
		svcs, err := cl.Agent().Services()
		return err == nil && len(svcs) == 1
	})
	inbound := s.Addr("inbound") // (Addr waits while Shutdown runs)
	slow := make(chan string, 1)
	go func() { slow <- get(t, "http://"+inbound+"/slow") }()
	<-arrived
	if err := syscall.Kill(c.Pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(c.Pid(), syscall.SIGCONT) })
	waitFor(t, "the agent to be stopped", func() bool {
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", c.Pid()))
		// The state follows the command name in parentheses.
		i := strings.LastIndexByte(string(st), ')')
		return err == nil && i > 0 && i+2 < len(st) && st[i+2] == 'T'
	})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.Shutdown(ctx) }()
	// Deregistration hangs for its share (1s of 4s); then the drain waits
	// for the request in flight, which is let go.
	waitFor(t, "the listeners to close", func() bool {
		conn, err := net.Dial("tcp", inbound)
		if err == nil {
			conn.Close()
		}
		return err != nil
	})
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("shutdown with a hung agent: %v (want a complete drain)", err)
	}
	if body := <-slow; body != "app" {
		t.Fatalf("the request in flight: %q", body)
	}
}

// Registered at its inbound listener, the app is also checked there: if
// meshd dies while the app lives (here: its listener closes without a
// deregistration), the instance goes critical instead of sending peers to
// a dead port for good.
func TestRegistrationChecksTheInboundListener(t *testing.T) {
	consulEnvClear(t)
	c := testenv.StartConsul(t)
	cl := c.Client(t)
	app := newBackend(t, "app", nil)
	_, port, _ := net.SplitHostPort(app.addr())
	s := start(t, fmt.Sprintf(`
listen: {outbound: 127.0.0.1:0, admin: 127.0.0.1:0, inbound: 127.0.0.1:0}
service: {name: orders, port: %s, register: true, check: {interval: 1s}}
discovery: {consul: {address: %s}}
`, port, c.Addr()))
	inbound := s.Addr("inbound")
	waitFor(t, "orders passing", func() bool {
		entries, _, err := cl.Health().Service("orders", "", true, nil)
		return err == nil && len(entries) == 1
	})
	checks, err := cl.Agent().Checks()
	if err != nil {
		t.Fatal(err)
	}
	var targets []string
	for _, ch := range checks {
		if ch.ServiceName == "orders" {
			targets = append(targets, ch.Name)
		}
	}
	sort.Strings(targets)
	if want := []string{"TCP 127.0.0.1:" + port, "listener " + inbound}; !slices.Equal(targets, want) {
		t.Fatalf("checks: want %q, have %q", want, targets)
	}
	s.mu.Lock()
	s.listeners["inbound"].ln.Close()
	s.mu.Unlock()
	waitFor(t, "orders critical once the listener is gone", func() bool {
		entries, _, err := cl.Health().Service("orders", "", true, nil)
		return err == nil && len(entries) == 0
	})
}

// While the app is registered, a reload that would change its registration
// is refused with the reason, rather than accepted and left unapplied in
// Consul; the same config reloads fine.
func TestReloadRefusesRegistrationChanges(t *testing.T) {
	consulEnvClear(t)
	c := testenv.StartConsul(t)
	app := newBackend(t, "app", nil)
	_, port, _ := net.SplitHostPort(app.addr())
	conf := func(tags, inbound string) string {
		return fmt.Sprintf(`
listen: {outbound: 127.0.0.1:0, admin: 127.0.0.1:0, inbound: %s}
service: {name: orders, port: %s, register: true, tags: [%s]}
discovery: {consul: {address: %s}}
`, inbound, port, tags, c.Addr())
	}
	s := start(t, conf("v1", "127.0.0.1:0"))
	for _, tc := range []struct{ yaml, want string }{
		{conf("v1", "127.0.0.1:0"), ""},
		{conf("v2", "127.0.0.1:0"), "service changed while registered in Consul"},
		{conf("v1", "127.0.0.1:1"), "listen.inbound changed while the app is registered"},
	} {
		cfg, err := parseConfig(tc.yaml)
		if err != nil {
			t.Fatal(err)
		}
		err = s.Reload(cfg)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("an unchanged registration: want the reload, have %v", err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("want the reload refused with %q, have %v", tc.want, err)
		}
	}
}

// Registering a loopback address is right on one machine and wrong on a
// cluster: meshd says so in its log, and is quiet for a routable address.
func TestLoopbackRegistrationIsWarnedOf(t *testing.T) {
	consulEnvClear(t)
	c := testenv.StartConsul(t)
	cl := c.Client(t)
	app := newBackend(t, "app", nil)
	_, port, _ := net.SplitHostPort(app.addr())
	const warning = "registering a loopback address"
	for _, tc := range []struct {
		extra string
		warn  bool
	}{{"", true}, {", register_address: 10.1.2.3:" + port, false}} {
		var logs syncBuf
		s := startLogged(t, fmt.Sprintf(`
listen: {outbound: 127.0.0.1:0, admin: 127.0.0.1:0, inbound: 127.0.0.1:0}
service: {name: orders, port: %s, register: true%s}
discovery: {consul: {address: %s}}
`, port, tc.extra, c.Addr()), &logs)
		waitFor(t, "orders registered", func() bool {
			svcs, err := cl.Agent().Services()
			return err == nil && len(svcs) == 1
		})
		if have := strings.Contains(logs.String(), warning); have != tc.warn {
			t.Errorf("service%s: warned of a loopback registration: %v, want %v", tc.extra, have, tc.warn)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s.Shutdown(ctx)
		cancel()
	}
}
