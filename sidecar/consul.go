package sidecar

import (
	"context"
	"fmt"
	"net"
	"os"
	"reflect"
	"strconv"
	"sync"
	"time"

	"github.com/meshd/meshd/discovery"
	"github.com/meshd/meshd/discovery/consul"
	"github.com/meshd/meshd/sidecar/config"
)

// consulClientConfig converts the discovery.consul section.
func consulClientConfig(c *config.Consul, s *Sidecar) consul.Config {
	return consul.Config{
		Address: c.Address, Scheme: c.Scheme, Datacenter: c.Datacenter,
		Token: c.Token, TokenFile: c.TokenFile,
		TLS:      consul.TLSConfig{CAFile: c.CAFile, CertFile: c.CertFile, KeyFile: c.KeyFile},
		WaitTime: c.WaitTime, AllowStale: c.AllowStale, Logger: s.log,
		BackoffBase: c.BackoffBase, BackoffMax: c.BackoffMax,
	}
}

// consulWatch is one upstream's view of the Consul source: its Consul
// service name and selection options.
type consulWatch struct {
	src     *consul.Source
	service string
	opts    consul.WatchOptions
}

func (w consulWatch) Name() string { return "consul" }

func (w consulWatch) Watch(ctx context.Context, _ string, box *discovery.Mailbox) error {
	return w.src.WatchService(ctx, w.service, w.opts, box)
}

func watchFor(src *consul.Source, name string, uc config.Upstream) consulWatch {
	svc := uc.Consul.Service
	if svc == "" {
		svc = name
	}
	return consulWatch{src: src, service: svc, opts: consul.WatchOptions{
		Tags: uc.Consul.Tags, Datacenter: uc.Consul.Datacenter, Filter: uc.Consul.Filter, IncludeWarning: uc.Consul.IncludeWarning,
	}}
}

// startConsul creates the Consul source and, when asked, the registration
// of the local app. Called from Start with s.mu held.
func (s *Sidecar) startConsul(cfg *config.Config) error {
	if cfg.Discovery.Consul == nil {
		return nil
	}
	src, err := consul.New(consulClientConfig(cfg.Discovery.Consul, s))
	if err != nil {
		return fmt.Errorf("discovery.consul: %w", err)
	}
	s.consul = src
	s.consulCfg = *cfg.Discovery.Consul
	if cfg.Service.Register {
		reg, err := s.registration(cfg)
		if err != nil {
			return err
		}
		r, err := consul.NewRegistrar(consulClientConfig(cfg.Discovery.Consul, s), reg)
		if err != nil {
			return fmt.Errorf("service registration: %w", err)
		}
		s.registrar = r
		s.bg.Add(1)
		go func() {
			defer s.bg.Done()
			s.log.Info("registering the app in consul", "service", reg.Name, "id", r.ID(), "address", reg.Address, "port", reg.Port)
			if ip := net.ParseIP(reg.Address); ip != nil && ip.IsLoopback() {
				// Right on one machine, wrong on a cluster: a peer on
				// another node would dial its own loopback.
				s.log.Warn("registering a loopback address: only peers on this machine can reach the app; bind listen.inbound to a routable address or set service.register_address",
					"service", reg.Name, "address", reg.Address)
			}
			if err := r.Run(s.ctx); err != nil {
				s.log.Error("service registration stopped", "service", reg.Name, "err", err)
			}
		}()
	}
	if cfg.Discovery.OnDemandOn() {
		s.bg.Add(1)
		go func() {
			defer s.bg.Done()
			s.reapIdle()
		}()
	}
	return nil
}

// registration describes the local app for Consul: at the inbound listener
// when there is one (the address Consul peers should call), else the app's
// own; the default health check is a TCP connect to the app, and a
// registration at the inbound listener also has that listener checked.
func (s *Sidecar) registration(cfg *config.Config) (consul.Registration, error) {
	sv := cfg.Service
	addr := sv.RegisterAddress
	listener := ""
	if addr == "" {
		if in := s.addrOf("inbound"); in != "" {
			addr, listener = in, in
		} else {
			addr = net.JoinHostPort(sv.Address, strconv.Itoa(sv.Port))
		}
	}
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return consul.Registration{}, fmt.Errorf("service registration address %q: %w", addr, err)
	}
	port, _ := strconv.Atoi(portStr)
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		// 0.0.0.0: let Consul use the node's address.
		host = ""
	}
	// The default check probes the app itself: the inbound listener stays up
	// when the app dies, so checking it would keep a dead app registered.
	checkAddr := net.JoinHostPort(sv.Address, strconv.Itoa(sv.Port))
	id := sv.ID
	if id == "" {
		hn, _ := os.Hostname()
		id = sv.Name + "-" + hn + "-" + portStr
	}
	reg := consul.Registration{
		Name: sv.Name, ID: id, Address: host, Port: port, Tags: sv.Tags, Meta: sv.Meta,
		DeregisterCriticalServiceAfter: sv.Check.DeregisterAfter,
		Check:                          consul.Check{HTTP: sv.Check.HTTP, TCP: sv.Check.TCP, Interval: sv.Check.Interval, Timeout: sv.Check.Timeout},
	}
	if reg.Check.HTTP == "" && reg.Check.TCP == "" {
		reg.Check.TCP = checkAddr
	}
	if listener != "" {
		// Peers dial meshd's inbound listener: if meshd dies while the app
		// lives, the app's check still passes, so the listener is checked
		// too (from the local agent; an unspecified host means this one).
		lh, lp, _ := net.SplitHostPort(listener)
		if ip := net.ParseIP(lh); ip != nil && ip.IsUnspecified() {
			lh = "127.0.0.1"
			if ip.To4() == nil {
				lh = "::1"
			}
		}
		reg.ListenerTCP = net.JoinHostPort(lh, lp)
	}
	if reg.DeregisterCriticalServiceAfter == 0 {
		reg.DeregisterCriticalServiceAfter = time.Minute
	}
	if sv.Weights != nil {
		reg.Weights = consul.Weights{Passing: sv.Weights.Passing, Warning: sv.Weights.Warning}
	}
	return reg, nil
}

// deregisterMax bounds deregistration at shutdown: an agent that hangs
// must not use up the drain, with the listeners still accepting and
// everything in flight cut at its end. Within it, deregistration gets at
// most a quarter of what is left of the drain.
var deregisterMax = 2 * time.Second

// deregister removes the app from Consul before draining, so that peers stop
// sending new requests while in-flight ones finish.
func (s *Sidecar) deregister(ctx context.Context) {
	if s.registrar == nil {
		return
	}
	limit := deregisterMax
	if dl, ok := ctx.Deadline(); ok {
		limit = min(limit, time.Until(dl)/4)
	}
	dctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	if err := s.registrar.Deregister(dctx); err != nil {
		s.log.Warn("deregistering the app from consul failed; draining anyway (Consul drops the registration once its check fails)",
			"id", s.registrar.ID(), "err", err, "waited", limit)
		return
	}
	s.log.Info("deregistered the app from consul", "id", s.registrar.ID())
}

// checkConsulReload refuses reloads that change the Consul client itself,
// or, while the app is registered, what its registration was built from.
func (s *Sidecar) checkConsulReload(cfg *config.Config) error {
	var next config.Consul
	if cfg.Discovery.Consul != nil {
		next = *cfg.Discovery.Consul
	}
	if (s.consul == nil) != (cfg.Discovery.Consul == nil) || (s.consul != nil && !reflect.DeepEqual(next, s.consulCfg)) {
		return fmt.Errorf("discovery.consul changed: restart meshd to apply it")
	}
	if cfg.Service.Register != (s.registrar != nil) {
		return fmt.Errorf("service.register changed: restart meshd to apply it")
	}
	if s.registrar != nil {
		// What Consul holds was built from these; applied without
		// registering again, it would go stale (a moved inbound port
		// left advertised, say).
		cur := s.cfg.Load()
		if !reflect.DeepEqual(cfg.Service, cur.Service) {
			return fmt.Errorf("service changed while registered in Consul: restart meshd to apply it")
		}
		if cfg.Listen.Inbound != cur.Listen.Inbound {
			return fmt.Errorf("listen.inbound changed while the app is registered in Consul: restart meshd to apply it")
		}
	}
	return nil
}

// negativeTTL is how long a name Consul does not know is remembered as unknown.
const negativeTTL = 5 * time.Second

type negCache struct {
	mu sync.Mutex
	m  map[string]time.Time
}

func (n *negCache) has(name string, now time.Time) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	exp, ok := n.m[name]
	if ok && now.After(exp) {
		delete(n.m, name)
		return false
	}
	return ok
}

func (n *negCache) add(name string, now time.Time) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.m == nil {
		n.m = map[string]time.Time{}
	}
	if len(n.m) > 4096 {
		clear(n.m)
	}
	n.m[name] = now.Add(negativeTTL)
}

// onDemand starts a Consul watch for a forward-proxy name that is not
// configured, when discovery on demand allows it, and waits briefly for its
// first answer. It returns (nil, nil) when the name is not eligible.
func (s *Sidecar) onDemand(ctx context.Context, name string) (*upstream, *routeError) {
	cfg := s.cfg.Load()
	if s.consul == nil || !cfg.AllowedOnDemand(name) {
		return nil, nil
	}
	now := time.Now()
	if s.unknown.has(name, now) {
		return nil, &routeError{403, "unknown upstream " + quote(name) + ": consul does not know it"}
	}
	known, err := s.consul.Known(ctx, name)
	if err != nil {
		return nil, &routeError{502, "cannot ask consul about " + quote(name) + ": " + err.Error()}
	}
	if !known {
		s.unknown.add(name, now)
		return nil, &routeError{403, "unknown upstream " + quote(name) + ": consul does not know it"}
	}
	u, err := s.addOnDemand(name)
	if err != nil {
		return nil, &routeError{502, err.Error()}
	}
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-u.first:
	case <-ctx.Done():
	case <-t.C:
	}
	return u, nil
}

// addOnDemand adds (once) an upstream with default settings watched in Consul.
func (s *Sidecar) addOnDemand(name string) (*upstream, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if u := s.lookup(name); u != nil {
		return u, nil
	}
	if !s.started || s.draining.Load() {
		return nil, fmt.Errorf("meshd is shutting down")
	}
	uc := config.DefaultUpstream("consul")
	policy, err := newPolicy(uc)
	if err != nil {
		return nil, err
	}
	u, err := newUpstream(name, "consul", uc, policy, s.log, s.tel)
	if err != nil {
		return nil, err
	}
	u.current = s.lookup
	u.onDemand = true
	u.lastUsed.Store(time.Now().UnixNano())
	old := *s.upstreams.Load()
	next := make(map[string]*upstream, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	next[name] = u
	s.upstreams.Store(&next)
	s.startUpstream(u)
	s.log.Info("discovering on demand", "upstream", name)
	return u, nil
}

// reapIdle stops on-demand watches unused for discovery.on_demand_idle.
func (s *Sidecar) reapIdle() {
	for {
		idle := s.cfg.Load().Discovery.OnDemandIdle
		t := time.NewTimer(max(idle/4, 10*time.Millisecond))
		select {
		case <-s.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		cutoff := time.Now().Add(-idle).UnixNano()
		s.mu.Lock()
		old := *s.upstreams.Load()
		var gone []*upstream
		next := make(map[string]*upstream, len(old))
		for k, u := range old {
			if u.onDemand && u.lastUsed.Load() < cutoff && inFlight(u) == 0 {
				gone = append(gone, u)
				continue
			}
			next[k] = u
		}
		if len(gone) > 0 {
			s.upstreams.Store(&next)
		}
		for _, u := range gone {
			// Under s.mu: an on-demand watch made again for the same name
			// cannot start reporting before this forgets the old one.
			u.retired.Store(true)
			metricsOf(s.tel).ForgetUpstream(u.name)
		}
		s.mu.Unlock()
		for _, u := range gone {
			s.log.Info("stopping idle on-demand watch", "upstream", u.name, "idle", idle)
			u.stop()
		}
	}
}

func inFlight(u *upstream) int64 {
	var n int64
	for _, e := range u.pool.Load().Endpoints {
		n += e.InFlight.Load()
	}
	return n
}
