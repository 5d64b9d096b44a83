package consul

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshd/meshd/internal/testenv"
)

func TestRegistrar(t *testing.T) {
	isolateEnv(t)
	c := testenv.StartConsul(t, testenv.WithACL())
	cl := c.Client(t)
	health := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	}))
	defer health.Close()
	port := health.Listener.Addr().(*net.TCPAddr).Port

	log, logs := newLogger(t)
	cfg := testConfig(c, log)
	cfg.Token = c.ManagementToken()
	cfg.BackoffMax = 200 * time.Millisecond
	r, err := NewRegistrar(cfg, Registration{
		Name: "orders", ID: "orders-1", Address: "127.0.0.1", Port: port,
		Tags: []string{"v2"}, Meta: map[string]string{"team": "core"},
		Weights:                        Weights{Passing: 3, Warning: new(1)},
		Check:                          Check{HTTP: health.URL + "/healthz", Interval: 200 * time.Millisecond, Timeout: time.Second},
		DeregisterCriticalServiceAfter: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	if r.ID() != "orders-1" {
		t.Errorf("ID: want orders-1, have %s", r.ID())
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runDone := make(chan error, 1)
	go func() { runDone <- r.Run(ctx) }()

	// Registered, with its check passing, as others see it in the catalog.
	passing := func() error {
		entries, _, err := cl.Health().Service("orders", "", true, nil)
		if err != nil {
			return err
		}
		if len(entries) != 1 {
			return fmt.Errorf("want 1 passing instance, have %d", len(entries))
		}
		e := entries[0]
		if e.Service.ID != "orders-1" || e.Service.Port != port || e.Service.Address != "127.0.0.1" ||
			e.Service.Weights.Passing != 3 || e.Service.Meta["team"] != "core" || len(e.Service.Tags) != 1 {
			return fmt.Errorf("want orders-1 as registered, have %+v", e.Service)
		}
		for _, chk := range e.Checks {
			if chk.ServiceID == "orders-1" && chk.Type == "http" && chk.Status == api.HealthPassing {
				return nil
			}
		}
		return fmt.Errorf("want a passing http check, have %d checks", len(e.Checks))
	}
	if err := testenv.WaitFor(10*time.Second, 50*time.Millisecond, passing); err != nil {
		t.Fatalf("after Run: %v", err)
	}

	// The agent crashes and forgets everything; the registrar notices and
	// registers again.
	c.Kill()
	c.Start()
	restarted := time.Now()
	cl = c.Client(t)
	if err := testenv.WaitFor(10*time.Second, 50*time.Millisecond, passing); err != nil {
		t.Fatalf("after agent restart: %v", err)
	}
	t.Logf("registered and passing again %v after the agent was back", time.Since(restarted).Round(time.Millisecond))
	if !strings.Contains(logs.String(), "registering again") {
		t.Errorf("logs: want the re-registration logged, have:\n%s", logs)
	}

	dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer dcancel()
	if err := r.Deregister(dctx); err != nil {
		t.Fatalf("Deregister: %v", err)
	}
	select {
	case err := <-runDone:
		if err != nil {
			t.Errorf("Run after Deregister: want nil, have %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run still running 5s after Deregister")
	}
	if _, _, err := cl.Agent().Service("orders-1", nil); !isNotFound(err) {
		t.Errorf("agent after Deregister: want 404, have %v", err)
	}
	entries, _, err := cl.Catalog().Service("orders", "", nil)
	if err != nil || len(entries) != 0 {
		t.Errorf("catalog after Deregister: want no instance, have %d (err %v)", len(entries), err)
	}
	// Deregistering twice is harmless.
	if err := r.Deregister(dctx); err != nil {
		t.Errorf("second Deregister: want nil, have %v", err)
	}
	if strings.Contains(logs.String(), c.ManagementToken()) {
		t.Error("logs: want no ACL token, have it")
	}
}

func TestRegistrarWithoutPermission(t *testing.T) {
	isolateEnv(t)
	c := testenv.StartConsul(t, testenv.WithACL())
	log, logs := newLogger(t)
	cfg := testConfig(c, log)
	cfg.Token = "6f7e2b1a-0c1d-4e5f-8a9b-0c1d2e3f4a5b" // unknown to the agent
	r, err := NewRegistrar(cfg, Registration{Name: "orders", Port: 8080})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	if err := testenv.WaitFor(5*time.Second, 20*time.Millisecond, func() error {
		if n := strings.Count(logs.String(), "consul registration failed"); n < 2 {
			return fmt.Errorf("want 2 failed attempts logged, have %d", n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run after cancel: want nil, have %v", err)
	}
	text := logs.String()
	if !strings.Contains(text, "ACL not found") || strings.Contains(text, cfg.Token) {
		t.Errorf("logs: want the ACL failure without the token, have:\n%s", text)
	}
}

func TestRegistrationValidation(t *testing.T) {
	good := Registration{Name: "orders", Port: 8080}
	for _, tc := range []struct {
		name string
		edit func(*Registration)
	}{
		{"no name", func(r *Registration) { r.Name = "" }},
		{"bad name", func(r *Registration) { r.Name = "a/b" }},
		{"port 0", func(r *Registration) { r.Port = 0 }},
		{"port too big", func(r *Registration) { r.Port = 70000 }},
		{"negative weight", func(r *Registration) { r.Weights.Warning = new(-1) }},
		{"both check targets", func(r *Registration) { r.Check = Check{HTTP: "http://127.0.0.1/", TCP: "127.0.0.1:1"} }},
		{"relative check URL", func(r *Registration) { r.Check.HTTP = "/healthz" }},
		{"bad check TCP", func(r *Registration) { r.Check.TCP = "127.0.0.1" }},
		{"interval without target", func(r *Registration) { r.Check.Interval = time.Second }},
		{"deregister without check", func(r *Registration) { r.DeregisterCriticalServiceAfter = time.Minute }},
		{"listener check without check", func(r *Registration) { r.ListenerTCP = "127.0.0.1:15006" }},
		{"bad listener check", func(r *Registration) { r.Check.TCP, r.ListenerTCP = "127.0.0.1:8080", "127.0.0.1" }},
	} {
		reg := good
		tc.edit(&reg)
		if _, err := NewRegistrar(Config{Address: "127.0.0.1:1"}, reg); err == nil {
			t.Errorf("%s: want an error, have nil", tc.name)
		}
	}

	ar, err := Registration{Name: "orders", Address: "10.0.0.7", Port: 8080,
		Check: Check{TCP: "10.0.0.7:8080", Interval: time.Second}}.agentRegistration()
	if err != nil {
		t.Fatal(err)
	}
	if ar.ID != "orders-10.0.0.7-8080" || ar.Weights != nil || ar.Check.TCP != "10.0.0.7:8080" ||
		ar.Check.Interval != "1s" || ar.Check.Timeout != "1s" {
		t.Errorf("defaults: want id orders-10.0.0.7-8080, no weights, tcp check every 1s with 1s timeout, have %+v %+v", ar, ar.Check)
	}
	ar, err = Registration{Name: "orders", Port: 15006, DeregisterCriticalServiceAfter: time.Minute,
		Check: Check{TCP: "127.0.0.1:8080", Interval: 2 * time.Second}, ListenerTCP: "127.0.0.1:15006"}.agentRegistration()
	if err != nil {
		t.Fatal(err)
	}
	if ar.Check != nil || len(ar.Checks) != 2 || ar.Checks[0].TCP != "127.0.0.1:8080" || ar.Checks[1].TCP != "127.0.0.1:15006" ||
		ar.Checks[1].Interval != "2s" || ar.Checks[1].DeregisterCriticalServiceAfter != "1m0s" {
		t.Errorf("with a listener check: want the service's and the listener's TCP checks alike, have %+v", ar.Checks)
	}
	// Warning is Consul's default of 1 unless set; 0 is kept (no traffic
	// while the checks warn), not taken for unset.
	for _, tc := range []struct {
		w                Weights
		passing, warning int
	}{
		{Weights{Passing: 3}, 3, 1},
		{Weights{Passing: 3, Warning: new(0)}, 3, 0},
		{Weights{Warning: new(0)}, 1, 0},
		{Weights{Passing: 2, Warning: new(5)}, 2, 5},
	} {
		ar, err := Registration{Name: "orders", Port: 8080, Weights: tc.w}.agentRegistration()
		if err != nil {
			t.Fatal(err)
		}
		if ar.Weights == nil || ar.Weights.Passing != tc.passing || ar.Weights.Warning != tc.warning {
			t.Errorf("weights %+v: want passing %d warning %d, have %+v", tc.w, tc.passing, tc.warning, ar.Weights)
		}
	}
	if _, err := NewRegistrar(Config{Address: "127.0.0.1:1"}, good); err != nil {
		t.Errorf("valid registration: want no error, have %v", err)
	}
	if err := (&Registrar{}).guard(); !errors.Is(err, errNotConfigured) {
		t.Errorf("zero Registrar: want errNotConfigured, have %v", err)
	}
}
