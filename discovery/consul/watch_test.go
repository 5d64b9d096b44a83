package consul

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshd/meshd/discovery"
	"github.com/meshd/meshd/internal/testenv"
)

// An update slower than this after a Consul write, with a 30s blocking wait,
// could only come from polling.
const eventDriven = 500 * time.Millisecond

func TestWatchFollowsRegistrationsAndChecks(t *testing.T) {
	isolateEnv(t)
	c := testenv.StartConsul(t)
	cl := c.Client(t)
	log, _ := newLogger(t)
	// Through a counting proxy, to see that queries block rather than poll.
	proxy := newCountingProxy(t, c.URL())
	cfg := testConfig(c, log)
	cfg.Address = proxy.addr
	src := newSource(t, cfg)
	node := c.NodeName()

	w := startWatch(t, src, "payments", WatchOptions{})
	first, pos := w.rec.wait(t, 0, 5*time.Second, "first answer", func(e event) bool { return e.u != nil })
	if len(first.u.Instances) != 0 || first.u.Reason != "no passing instances in consul" {
		t.Fatalf("first update: want empty set with reason, have %v reason %q", ids(first.u), first.u.Reason)
	}

	measure := func(what string, write time.Time, cond func(event) bool) {
		t.Helper()
		var e event
		e, pos = w.rec.wait(t, pos, 5*time.Second, what, cond)
		lat := e.at.Sub(write)
		t.Logf("%s: consul write to mailbox in %v", what, lat)
		if lat > eventDriven {
			t.Errorf("%s: want update within %v of the write (event-driven), have %v", what, eventDriven, lat)
		}
	}

	at := agentRegister(t, cl, &api.AgentServiceRegistration{ID: "p1", Name: "payments", Port: 9001, Address: "127.0.0.1",
		Tags: []string{"v1"}, Meta: map[string]string{"zone": "a"}})
	measure("register p1", at, hasIDs(node+"/p1"))

	at = agentRegister(t, cl, &api.AgentServiceRegistration{ID: "p2", Name: "payments", Port: 9002, Address: "127.0.0.1",
		Check: ttlCheck("p2-ttl", api.HealthPassing)})
	measure("register p2", at, hasIDs(node+"/p1", node+"/p2"))

	at = time.Now()
	if err := cl.Agent().UpdateTTL("p2-ttl", "broken", "fail"); err != nil {
		t.Fatal(err)
	}
	measure("p2 check critical", at, hasIDs(node+"/p1"))

	at = time.Now()
	if err := cl.Agent().UpdateTTL("p2-ttl", "fine", "pass"); err != nil {
		t.Fatal(err)
	}
	measure("p2 check passing again", at, hasIDs(node+"/p1", node+"/p2"))

	// A critical instance changes Consul's index for the service but not the
	// passing set: the watch wakes up and must not push the same set again.
	before := proxy.count()
	agentRegister(t, cl, &api.AgentServiceRegistration{ID: "p3", Name: "payments", Port: 9003, Address: "127.0.0.1",
		Check: ttlCheck("p3-ttl", api.HealthCritical)})
	if err := testenv.WaitFor(5*time.Second, 5*time.Millisecond, func() error {
		if proxy.count() == before {
			return errors.New("watch not woken by the critical instance")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	at = time.Now()
	if err := cl.Agent().ServiceDeregister("p1"); err != nil {
		t.Fatal(err)
	}
	measure("deregister p1", at, hasIDs(node+"/p2"))

	at = time.Now()
	if err := cl.Agent().ServiceDeregister("p2"); err != nil {
		t.Fatal(err)
	}
	measure("deregister p2", at, hasIDs())

	// Eight answers were needed (the first, six changes, the critical p3).
	// A polling client would have sent many more queries in this time.
	queries := proxy.count()
	t.Logf("health queries for 7 index changes: %d", queries)
	if queries > 14 {
		t.Errorf("queries: want at most 14 for 7 index changes (blocking), have %d", queries)
	}
	idle := time.NewTimer(500 * time.Millisecond)
	<-idle.C // an observation window: nothing may happen in it
	if have := proxy.count(); have > queries+1 {
		t.Errorf("queries while idle for 500ms: want at most 1 more, have %d more", have-queries)
	}

	events := w.rec.all()
	var last *discovery.Update
	for _, e := range events {
		if e.st.Err != nil {
			t.Errorf("want no errors, have %v", e.st.Err)
		}
		if e.u == nil {
			continue
		}
		if last != nil && equalInstances(last.Instances, e.u.Instances) {
			t.Errorf("want an update only when the set changes, have two equal ones in a row: %v", ids(e.u))
		}
		last = e.u
	}
	if len(last.Instances) != 0 || last.Reason == "" {
		t.Errorf("last update: want empty set with a reason, have %v %q", ids(last), last.Reason)
	}

	// The mapping of one instance, from the p1 update.
	for _, e := range events {
		if e.u == nil || len(e.u.Instances) != 2 {
			continue
		}
		p1 := e.u.Instances[0]
		if p1.ID != node+"/p1" || p1.Address != "127.0.0.1:9001" || p1.Weight != 1 ||
			len(p1.Tags) != 1 || p1.Tags[0] != "v1" || p1.Meta["zone"] != "a" {
			t.Errorf("p1: want {%s/p1 127.0.0.1:9001 weight 1 [v1] zone=a}, have %+v", node, p1)
		}
		if e.u.Service != "payments" || e.u.Index == 0 {
			t.Errorf("update: want service payments and an index, have %q %d", e.u.Service, e.u.Index)
		}
		break
	}
}

func TestWatchSurvivesConsulRestart(t *testing.T) {
	isolateEnv(t)
	c := testenv.StartConsul(t)
	log, logs := newLogger(t)
	proxy := newCountingProxy(t, c.URL())
	cfg := testConfig(c, log)
	cfg.Address = proxy.addr
	src := newSource(t, cfg)
	node := c.NodeName()

	w := startWatch(t, src, "orders", WatchOptions{})
	agentRegister(t, c.Client(t), &api.AgentServiceRegistration{ID: "o1", Name: "orders", Port: 9101, Address: "127.0.0.1"})
	_, pos := w.rec.wait(t, 0, 5*time.Second, "o1", hasIDs(node+"/o1"))

	// Consul unreachable for a moment, its catalog unchanged: the first
	// answer afterwards repeats the set, and must clear the error.
	proxy.breakNow()
	brokenAt := pos
	_, pos = w.rec.wait(t, pos, 5*time.Second, "a failure through the broken proxy", failed)
	_, pos = w.rec.wait(t, pos, 5*time.Second, "a second failure", failed)
	proxy.repair()
	_, pos = w.rec.wait(t, pos, 5*time.Second, "the same set again, error cleared", func(e event) bool {
		return hasIDs(node+"/o1")(e) && e.st.Err == nil
	})
	for _, e := range w.rec.all()[brokenAt : pos-1] {
		if e.u != nil {
			t.Errorf("want no update while consul is unreachable, have %v", e)
		}
	}

	c.Stop()
	stoppedAt := pos
	var fails []event
	for len(fails) < 3 {
		var e event
		e, pos = w.rec.wait(t, pos, 10*time.Second, "a failure while consul is down", failed)
		fails = append(fails, e)
	}
	for _, e := range w.rec.all()[stoppedAt:] {
		if e.u != nil {
			t.Errorf("want no update while consul is down (keep the last set), have %v", e)
		}
	}
	err := fails[0].st.Err
	if !strings.HasPrefix(err.Error(), `consul: watch "orders": `) {
		t.Errorf("error: want prefix %q, have %q", `consul: watch "orders": `, err)
	}
	// Retries back off: later gaps are not shorter than the first minimum.
	gap1, gap2 := fails[1].at.Sub(fails[0].at), fails[2].at.Sub(fails[1].at)
	t.Logf("retry gaps while down: %v, %v", gap1, gap2)
	if gap1 < 25*time.Millisecond || gap2 < 50*time.Millisecond {
		t.Errorf("want backoff of at least 25ms then 50ms between retries, have %v and %v", gap1, gap2)
	}

	c.Start()
	// The dev agent has forgotten everything; a new registration must arrive.
	at := agentRegister(t, c.Client(t), &api.AgentServiceRegistration{ID: "o2", Name: "orders", Port: 9102, Address: "127.0.0.1"})
	e, _ := w.rec.wait(t, pos, 10*time.Second, "o2 after restart", hasIDs(node+"/o2"))
	t.Logf("after restart: registration to mailbox in %v", e.at.Sub(at))
	if e.st.Err != nil {
		t.Errorf("status after recovery: want no error, have %v", e.st.Err)
	}
	if !strings.Contains(logs.String(), "consul watch recovered") {
		t.Errorf("logs: want a recovery line, have:\n%s", logs)
	}
}

func TestWatchOptions(t *testing.T) {
	isolateEnv(t)
	c := testenv.StartConsul(t)
	cl := c.Client(t)
	log, _ := newLogger(t)
	src := newSource(t, testConfig(c, log))
	node := c.NodeName()

	t.Run("tags all match", func(t *testing.T) {
		for id, tags := range map[string][]string{"t-ab": {"a", "b"}, "t-a": {"a"}, "t-b": {"b", "c"}} {
			agentRegister(t, cl, &api.AgentServiceRegistration{ID: id, Name: "tagged", Port: 9201, Tags: tags})
		}
		w := startWatch(t, src, "tagged", WatchOptions{Tags: []string{"a", "b"}})
		w.rec.wait(t, 0, 5*time.Second, "only t-ab", hasIDs(node+"/t-ab"))
		w2 := startWatch(t, src, "tagged", WatchOptions{Tags: []string{"a"}})
		w2.rec.wait(t, 0, 5*time.Second, "t-a and t-ab", hasIDs(node+"/t-a", node+"/t-ab"))
	})

	t.Run("datacenter", func(t *testing.T) {
		agentRegister(t, cl, &api.AgentServiceRegistration{ID: "dc-1", Name: "dcsvc", Port: 9202})
		w := startWatch(t, src, "dcsvc", WatchOptions{Datacenter: "dc1"})
		w.rec.wait(t, 0, 5*time.Second, "dc-1 in dc1", hasIDs(node+"/dc-1"))

		bad := startWatch(t, src, "dcsvc", WatchOptions{Datacenter: "nowhere"})
		_, pos := bad.rec.wait(t, 0, 5*time.Second, "a failure for an unknown datacenter", failed)
		bad.rec.wait(t, pos, 5*time.Second, "a second failure (retrying)", failed)
		for _, e := range bad.rec.all() {
			if e.u != nil {
				t.Errorf("unknown datacenter: want errors only, have an update %v", e)
			}
		}
		err := bad.rec.all()[0].st.Err
		if !strings.Contains(err.Error(), "No path to datacenter") {
			t.Errorf("unknown datacenter: want Consul's reason in the error, have %v", err)
		}
	})

	t.Run("filter", func(t *testing.T) {
		agentRegister(t, cl, &api.AgentServiceRegistration{ID: "f1", Name: "filtered", Port: 9203, Meta: map[string]string{"version": "1"}})
		agentRegister(t, cl, &api.AgentServiceRegistration{ID: "f2", Name: "filtered", Port: 9204, Meta: map[string]string{"version": "2"}})
		w := startWatch(t, src, "filtered", WatchOptions{Filter: `Service.Meta.version == "2"`})
		w.rec.wait(t, 0, 5*time.Second, "only f2", hasIDs(node+"/f2"))

		bad := startWatch(t, src, "filtered", WatchOptions{Filter: `Service.Meta.version ==`})
		select {
		case <-bad.done:
		case <-time.After(5 * time.Second):
			t.Fatal("bad filter: want the watch to stop, still running")
		}
		var se api.StatusError
		if !errors.As(bad.err, &se) || !strings.Contains(bad.err.Error(), "boolean expression") {
			t.Errorf("bad filter: want Consul's StatusError about the expression, have %v", bad.err)
		}
		e, _ := bad.rec.wait(t, 0, time.Second, "the failure in the mailbox", failed)
		if !strings.Contains(e.st.Err.Error(), `consul: watch "filtered": query rejected`) {
			t.Errorf("bad filter: want a clear mailbox error, have %v", e.st.Err)
		}
	})

	t.Run("a warning weight of 0 means no traffic while warning", func(t *testing.T) {
		agentRegister(t, cl, &api.AgentServiceRegistration{ID: "z1", Name: "zeroed", Port: 9211, Weights: &api.AgentWeights{Passing: 2, Warning: 0},
			Check: ttlCheck("z1-ttl", api.HealthWarning)})
		agentRegister(t, cl, &api.AgentServiceRegistration{ID: "z2", Name: "zeroed", Port: 9212, Weights: &api.AgentWeights{Passing: 2, Warning: 1},
			Check: ttlCheck("z2-ttl", api.HealthWarning)})
		w := startWatch(t, src, "zeroed", WatchOptions{IncludeWarning: true})
		w.rec.wait(t, 0, 5*time.Second, "z2 only", hasIDs(node+"/z2"))
	})

	t.Run("include warning and weights", func(t *testing.T) {
		weights := &api.AgentWeights{Passing: 5, Warning: 2}
		agentRegister(t, cl, &api.AgentServiceRegistration{ID: "w1", Name: "weighted", Port: 9205, Weights: weights,
			Check: ttlCheck("w1-ttl", api.HealthPassing)})
		agentRegister(t, cl, &api.AgentServiceRegistration{ID: "w2", Name: "weighted", Port: 9206, Weights: weights,
			Check: ttlCheck("w2-ttl", api.HealthWarning)})
		passing := startWatch(t, src, "weighted", WatchOptions{})
		warn := startWatch(t, src, "weighted", WatchOptions{IncludeWarning: true})

		e, ppos := passing.rec.wait(t, 0, 5*time.Second, "w1 only", hasIDs(node+"/w1"))
		if have := e.u.Instances[0].Weight; have != 5 {
			t.Errorf("passing w1: want weight 5, have %d", have)
		}
		e, wpos := warn.rec.wait(t, 0, 5*time.Second, "w1 and w2", hasIDs(node+"/w1", node+"/w2"))
		if w1, w2 := e.u.Instances[0].Weight, e.u.Instances[1].Weight; w1 != 5 || w2 != 2 {
			t.Errorf("include_warning: want weights w1=5 w2=2, have w1=%d w2=%d", w1, w2)
		}

		if err := cl.Agent().UpdateTTL("w1-ttl", "slow", "warn"); err != nil {
			t.Fatal(err)
		}
		passing.rec.wait(t, ppos, 5*time.Second, "no passing instance", hasIDs())
		e, wpos = warn.rec.wait(t, wpos, 5*time.Second, "w1 at warning weight", func(e event) bool {
			return hasIDs(node+"/w1", node+"/w2")(e) && e.u.Instances[0].Weight == 2
		})
		if e.u.Instances[1].Weight != 2 {
			t.Errorf("w2: want weight 2, have %d", e.u.Instances[1].Weight)
		}

		if err := cl.Agent().UpdateTTL("w2-ttl", "down", "fail"); err != nil {
			t.Fatal(err)
		}
		warn.rec.wait(t, wpos, 5*time.Second, "critical w2 dropped", hasIDs(node+"/w1"))
	})

	t.Run("service maintenance", func(t *testing.T) {
		agentRegister(t, cl, &api.AgentServiceRegistration{ID: "m1", Name: "maint", Port: 9207})
		agentRegister(t, cl, &api.AgentServiceRegistration{ID: "m2", Name: "maint", Port: 9208})
		w := startWatch(t, src, "maint", WatchOptions{IncludeWarning: true})
		_, pos := w.rec.wait(t, 0, 5*time.Second, "m1 and m2", hasIDs(node+"/m1", node+"/m2"))
		if err := cl.Agent().EnableServiceMaintenance("m1", "upgrade"); err != nil {
			t.Fatal(err)
		}
		_, pos = w.rec.wait(t, pos, 5*time.Second, "m1 left out", hasIDs(node+"/m2"))
		if err := cl.Agent().DisableServiceMaintenance("m1"); err != nil {
			t.Fatal(err)
		}
		w.rec.wait(t, pos, 5*time.Second, "m1 back", hasIDs(node+"/m1", node+"/m2"))
	})

	t.Run("node maintenance", func(t *testing.T) {
		agentRegister(t, cl, &api.AgentServiceRegistration{ID: "n1", Name: "nodemaint", Port: 9209})
		w := startWatch(t, src, "nodemaint", WatchOptions{IncludeWarning: true})
		_, pos := w.rec.wait(t, 0, 5*time.Second, "n1", hasIDs(node+"/n1"))
		if err := cl.Agent().EnableNodeMaintenance("reboot"); err != nil {
			t.Fatal(err)
		}
		defer cl.Agent().DisableNodeMaintenance()
		e, pos := w.rec.wait(t, pos, 5*time.Second, "n1 left out", hasIDs())
		if e.u.Reason == "" {
			t.Errorf("empty set: want a reason, have none")
		}
		if err := cl.Agent().DisableNodeMaintenance(); err != nil {
			t.Fatal(err)
		}
		w.rec.wait(t, pos, 5*time.Second, "n1 back", hasIDs(node+"/n1"))
	})

	t.Run("node address fallback", func(t *testing.T) {
		reg := func(node, addr, id, svcAddr string, port int) {
			t.Helper()
			_, err := cl.Catalog().Register(&api.CatalogRegistration{
				Node: node, Address: addr,
				Service: &api.AgentService{ID: id, Service: "external", Address: svcAddr, Port: port},
			}, nil)
			if err != nil {
				t.Fatal(err)
			}
		}
		reg("ext-a", "127.0.0.9", "e1", "", 7001)
		reg("ext-b", "127.0.0.10", "e2", "127.0.0.11", 7002)
		reg("ext-c", "127.0.0.12", "e3", "", 0) // no port: not dialable
		w := startWatch(t, src, "external", WatchOptions{})
		e, _ := w.rec.wait(t, 0, 5*time.Second, "e1 and e2", hasIDs("ext-a/e1", "ext-b/e2"))
		if a, b := e.u.Instances[0].Address, e.u.Instances[1].Address; a != "127.0.0.9:7001" || b != "127.0.0.11:7002" {
			t.Errorf("addresses: want 127.0.0.9:7001 (node) and 127.0.0.11:7002 (service), have %s and %s", a, b)
		}
		if have := e.u.Instances[0].Weight; have != 1 {
			t.Errorf("catalog instance without weights: want weight 1, have %d", have)
		}
	})

	t.Run("known", func(t *testing.T) {
		ctx := context.Background()
		for name, want := range map[string]bool{"tagged": true, "external": true, "never-registered": false} {
			have, err := src.Known(ctx, name)
			if err != nil || have != want {
				t.Errorf("Known(%q): want %v, have %v (err %v)", name, want, have, err)
			}
		}
		if _, err := src.Known(ctx, "bad/name"); err == nil {
			t.Error(`Known("bad/name"): want an error, have none`)
		}
	})

	t.Run("set options", func(t *testing.T) {
		src.SetOptions("tagged", WatchOptions{Tags: []string{"c"}})
		box := discovery.NewMailbox()
		rec := newRecorder(t, box)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- src.Watch(ctx, "tagged", box) }()
		rec.wait(t, 0, 5*time.Second, "t-b via SetOptions", hasIDs(node+"/t-b"))
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch after cancel: want nil, have %v", err)
		}
	})
}

func TestWatchEnvironment(t *testing.T) {
	isolateEnv(t)
	c := testenv.StartConsul(t)
	agentRegister(t, c.Client(t), &api.AgentServiceRegistration{ID: "e1", Name: "envsvc", Port: 9301})
	want := hasIDs(c.NodeName() + "/e1")
	log, _ := newLogger(t)

	t.Run("address from CONSUL_HTTP_ADDR", func(t *testing.T) {
		t.Setenv(api.HTTPAddrEnvName, c.Addr())
		w := startWatch(t, newSource(t, Config{Logger: log, WaitTime: time.Minute}), "envsvc", WatchOptions{})
		w.rec.wait(t, 0, 5*time.Second, "e1", want)
	})
	t.Run("field wins over CONSUL_HTTP_ADDR", func(t *testing.T) {
		t.Setenv(api.HTTPAddrEnvName, "127.0.0.1:1") // nothing listens there
		w := startWatch(t, newSource(t, Config{Address: "http://" + c.Addr(), Logger: log}), "envsvc", WatchOptions{})
		w.rec.wait(t, 0, 5*time.Second, "e1", want)
	})
}

func TestWatchRejectsBadInput(t *testing.T) {
	isolateEnv(t)
	src := newSource(t, Config{Address: "127.0.0.1:1"})
	ctx := context.Background()
	box := discovery.NewMailbox()
	for _, tc := range []struct {
		service string
		o       WatchOptions
		box     *discovery.Mailbox
	}{
		{"", WatchOptions{}, box},
		{"a/b", WatchOptions{}, box},
		{"a b", WatchOptions{}, box},
		{"ok", WatchOptions{Tags: []string{""}}, box},
		{"ok", WatchOptions{}, nil},
	} {
		if err := src.WatchService(ctx, tc.service, tc.o, tc.box); err == nil {
			t.Errorf("WatchService(%q, %+v, box=%v): want an error, have nil", tc.service, tc.o, tc.box != nil)
		}
	}
	for _, cfg := range []Config{
		{WaitTime: -1}, {BackoffBase: -1}, {Scheme: "ftp"}, {TokenFile: "/nonexistent/token"},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v): want an error, have nil", cfg)
		}
	}
}
