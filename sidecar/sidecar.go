// Package sidecar is meshd's data path and control loop: listeners, routing
// of each request to an upstream, forwarding through the upstream's balancer,
// the admin endpoints, config reloads and graceful shutdown.
package sidecar

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/discovery"
	"github.com/meshd/meshd/discovery/consul"
	"github.com/meshd/meshd/discovery/static"
	"github.com/meshd/meshd/sidecar/config"
	"github.com/meshd/meshd/telemetry"
)

// Sidecar is one running meshd. Create it with New, then Start; Reload and
// Shutdown may be called from any goroutine (they are serialised).
type Sidecar struct {
	log *slog.Logger
	tel *telemetry.Provider

	cfg       atomic.Pointer[config.Config]
	upstreams atomic.Pointer[map[string]*upstream]
	catalog   *static.Catalog
	catalogMu sync.Mutex // serializes catalog swaps by Reload and the static file watcher
	consul    *consul.Source
	consulCfg config.Consul
	registrar *consul.Registrar
	unknown   negCache
	inbound   atomic.Pointer[upstream]

	mu        sync.Mutex // serialises Start, Reload, Shutdown and on-demand adds
	listeners map[string]*listener
	ctx       context.Context
	cancel    context.CancelFunc
	started   bool
	draining  atomic.Bool

	tunnels   sync.WaitGroup
	tunnelMu  sync.Mutex
	tunnelSet map[io.Closer]struct{} // both ends of every tunnel
	// eng is the event loops of the proxy listeners (nil: none).
	eng *engine
	// Listeners a reload replaced, still draining: Shutdown waits for them.
	retiring    sync.WaitGroup
	retiringMu  sync.Mutex
	retiringSet map[*listener]struct{}

	bg sync.WaitGroup
}

// listener is one bound address and the server behind it.
type listener struct {
	key  string // "outbound", "admin", "inbound", "upstream:NAME"
	addr string // as configured
	ln   net.Listener
	srv  *http.Server
	// fixed is the upstream of a dedicated listener.
	fixed atomic.Pointer[string]
	// fast serves plain HTTP/1.1 itself on proxy listeners (nil: net/http only).
	fast *fastServer
}

// shutdown drains the listener's connections until ctx ends.
func (l *listener) shutdown(ctx context.Context) error {
	if l.fast != nil {
		return l.fast.shutdown(ctx)
	}
	return l.srv.Shutdown(ctx)
}

// close drops every connection at once.
func (l *listener) close() {
	if l.fast != nil {
		l.fast.closeAll()
	}
	l.srv.Close()
}

// New returns a sidecar for cfg that has not bound anything yet. log and tel
// may be nil (the default logger; no traces or metrics).
func New(cfg *config.Config, log *slog.Logger, tel *telemetry.Provider) (*Sidecar, error) {
	if log == nil {
		log = slog.Default()
	}
	s := &Sidecar{log: log, tel: tel, listeners: map[string]*listener{}, tunnelSet: map[io.Closer]struct{}{}}
	s.catalog = static.New(staticInstances(cfg.Static))
	s.cfg.Store(cfg)
	empty := map[string]*upstream{}
	s.upstreams.Store(&empty)
	return s, nil
}

func staticInstances(m map[string][]config.StaticEntry) map[string][]discovery.Instance {
	out := make(map[string][]discovery.Instance, len(m))
	for svc, entries := range m {
		insts := make([]discovery.Instance, 0, len(entries))
		for _, e := range entries {
			id := e.ID
			if id == "" {
				id = e.Address
			}
			w := e.Weight
			if w == 0 {
				w = 1
			}
			insts = append(insts, discovery.Instance{ID: id, Address: e.Address, Weight: w, Tags: e.Tags})
		}
		out[svc] = insts
	}
	return out
}

// Start binds every listener and starts discovery. On error nothing is left running.
func (s *Sidecar) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		return errors.New("sidecar: already started")
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	cfg := s.cfg.Load()
	ups, err := s.buildUpstreams(cfg, nil)
	if err != nil {
		s.cancel()
		return err
	}
	if engineOn && cfg.Proxy.EventLoopOn() {
		// One set of loops for every proxy listener. If they cannot
		// start (out of descriptors), the listeners are served by
		// goroutines, and the log says so.
		if eng, err := newEngine(s); err != nil {
			s.log.Error("event loops did not start; serving without them", "err", err)
		} else {
			s.eng = eng
		}
	}
	if err := s.syncListeners(cfg); err != nil {
		s.abandonListeners()
		s.cancel()
		return err
	}
	if err := s.startConsul(cfg); err != nil {
		s.abandonListeners()
		s.cancel()
		return err
	}
	s.upstreams.Store(&ups)
	for _, u := range ups {
		s.startUpstream(u)
	}
	s.startStaticFileWatch(cfg)
	s.started = true
	s.log.Info("meshd started", "outbound", s.addrOf("outbound"), "admin", s.addrOf("admin"), "upstreams", len(ups))
	return nil
}

// buildUpstreams makes the upstream set for cfg, reusing the pools (and so
// the per-instance state) of old upstreams that keep their name and source.
func (s *Sidecar) buildUpstreams(cfg *config.Config, old map[string]*upstream) (map[string]*upstream, error) {
	out := make(map[string]*upstream, len(cfg.Upstreams))
	for _, name := range cfg.UpstreamNames() {
		uc := cfg.Upstreams[name]
		policy, err := newPolicy(uc)
		if err != nil {
			return nil, fmt.Errorf("upstream %q: balance: %w", name, err)
		}
		st := &upstreamSettings{cfg: uc, algorithm: policy.Name()}
		if prev, ok := old[name]; ok && prev.source == uc.Discovery && !prev.onDemand && consulKey(prev.settings.Load().cfg) == consulKey(uc) {
			if err := prev.guard.Reconfigure(uc.Resilience()); err != nil {
				return nil, fmt.Errorf("upstream %q: %w", name, err)
			}
			was := prev.settings.Load()
			retired := false
			if transportKey(was.cfg) == transportKey(uc) {
				st.transport = was.transport
			} else {
				st.transport = newTransport(uc)
				retired = true
			}
			prev.pool.SetPolicy(policy)
			prev.settings.Store(st)
			if retired {
				// Requests in flight finish on the old transport, which
				// closes their connections instead of pooling them; new
				// ones already take the new transport.
				was.transport.retire(cfg.Proxy.Drain)
			}
			out[name] = prev
			continue
		}
		u, err := newUpstream(name, uc.Discovery, uc, policy, s.log, s.tel)
		if err != nil {
			return nil, err
		}
		u.current = s.lookup
		out[name] = u
	}
	return out, nil
}

func (s *Sidecar) sourceFor(u *upstream) discovery.Source {
	if u.source == "consul" && s.consul != nil {
		return watchFor(s.consul, u.name, u.settings.Load().cfg)
	}
	return s.catalog
}

func newPolicy(uc config.Upstream) (balance.Policy, error) {
	return balance.New(uc.Balance.BalanceConfig())
}

// consulKey is what decides whether a reload restarts an upstream's Consul watch.
func consulKey(u config.Upstream) string {
	return fmt.Sprintf("%q %q %q %q %v", u.Consul.Service, u.Consul.Tags, u.Consul.Datacenter, u.Consul.Filter, u.Consul.IncludeWarning)
}

func (s *Sidecar) startUpstream(u *upstream) {
	ctx, cancel := context.WithCancel(s.ctx)
	u.cancel = cancel
	src := s.sourceFor(u)
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		u.run(ctx, src)
	}()
}

// lookup returns the upstream named name, lock-free.
func (s *Sidecar) lookup(name string) *upstream {
	return (*s.upstreams.Load())[name]
}

// desiredListeners maps listener keys to addresses for cfg.
func desiredListeners(cfg *config.Config) map[string]string {
	want := map[string]string{"outbound": cfg.Listen.Outbound, "admin": cfg.Listen.Admin}
	if cfg.Listen.Inbound != "" {
		want["inbound"] = cfg.Listen.Inbound
	}
	for name, u := range cfg.Upstreams {
		if u.Listen != "" {
			want["upstream:"+name] = u.Listen
		}
	}
	return want
}

// syncListeners binds listeners cfg wants and closes those it no longer
// wants. New listeners are bound before any old one closes, so a failed bind
// leaves the running set untouched.
func (s *Sidecar) syncListeners(cfg *config.Config) error {
	want := desiredListeners(cfg)
	var fresh []*listener
	for key, addr := range want {
		if l, ok := s.listeners[key]; ok && l.addr == addr {
			continue
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, f := range fresh {
				f.ln.Close()
			}
			return fmt.Errorf("listen %s on %s: %w", key, addr, err)
		}
		fresh = append(fresh, &listener{key: key, addr: addr, ln: ln})
	}
	for key, l := range s.listeners {
		if addr, ok := want[key]; !ok || addr != l.addr {
			delete(s.listeners, key)
			s.retire(l, cfg.Proxy.Drain)
		}
	}
	for _, l := range fresh {
		if name, ok := strings.CutPrefix(l.key, "upstream:"); ok {
			l.fixed.Store(&name)
		}
		l.srv = s.newServer(cfg, l)
		if ph, ok := l.srv.Handler.(*proxyHandler); ok && cfg.Proxy.FastPathOn() {
			l.fast = newFastServer(s, l, ph)
			l.fast.eng = s.eng // the Sidecar's loops, shared by its proxy listeners
		}
		s.listeners[l.key] = l
		s.bg.Add(1)
		go func(l *listener) {
			defer s.bg.Done()
			var err error
			if l.fast != nil {
				err = l.fast.serve()
			} else {
				err = l.srv.Serve(timedListener{l.ln, s})
			}
			if err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
				s.log.Error("listener stopped", "listener", l.key, "addr", l.ln.Addr().String(), "err", err)
			}
		}(l)
		s.log.Info("listening", "listener", l.key, "addr", l.ln.Addr().String())
	}
	return nil
}

// abandonListeners closes the listeners of a Start that failed, and the
// event loops serving them.
func (s *Sidecar) abandonListeners() {
	for _, l := range s.listeners {
		l.ln.Close()
	}
	s.listeners = map[string]*listener{}
	if s.eng != nil {
		s.eng.stop()
		s.eng = nil
	}
}

// retire drains a listener a reload replaced, on its own goroutine, and
// keeps it where Shutdown finds it until it is done.
func (s *Sidecar) retire(l *listener, drain time.Duration) {
	s.retiringMu.Lock()
	if s.retiringSet == nil {
		s.retiringSet = map[*listener]struct{}{}
	}
	s.retiringSet[l] = struct{}{}
	s.retiringMu.Unlock()
	s.retiring.Add(1)
	go func() {
		defer s.retiring.Done()
		s.closeListener(l, drain)
		s.retiringMu.Lock()
		delete(s.retiringSet, l)
		s.retiringMu.Unlock()
	}()
}

func (s *Sidecar) closeListener(l *listener, drain time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	if err := l.shutdown(ctx); err != nil {
		s.log.Warn("listener drain cut short", "listener", l.key, "err", err)
		l.close()
	}
}

func (s *Sidecar) newServer(cfg *config.Config, l *listener) *http.Server {
	var h http.Handler
	switch l.key {
	case "admin":
		h = s.adminHandler()
	case "inbound":
		h = http.HandlerFunc(s.serveInbound)
	default:
		h = &proxyHandler{s: s, l: l}
	}
	p := new(http.Protocols)
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: cfg.Proxy.ReadHeaderTimeout,
		IdleTimeout:       cfg.Proxy.IdleTimeout,
		MaxHeaderBytes:    cfg.Proxy.MaxHeaderBytes,
		Protocols:         p,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
}

// Addr returns the bound address of a listener ("outbound", "admin",
// "inbound" or "upstream:NAME"), or "" when there is none.
func (s *Sidecar) Addr(key string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addrOf(key)
}

func (s *Sidecar) addrOf(key string) string {
	if l, ok := s.listeners[key]; ok {
		return l.ln.Addr().String()
	}
	return ""
}

// Config returns the config in force.
func (s *Sidecar) Config() *config.Config { return s.cfg.Load() }

// checkServerReload refuses changes to the settings the listeners' servers
// were started with: applied to new listeners only, they would be reported
// reloaded while the running ones keep the old values.
func checkServerReload(cur, next config.Proxy) error {
	for _, c := range []struct {
		key     string
		changed bool
	}{
		{"proxy.read_header_timeout", cur.ReadHeaderTimeout != next.ReadHeaderTimeout},
		{"proxy.idle_timeout", cur.IdleTimeout != next.IdleTimeout},
		{"proxy.max_header_bytes", cur.MaxHeaderBytes != next.MaxHeaderBytes},
		{"proxy.fast_path", cur.FastPathOn() != next.FastPathOn()},
		{"proxy.event_loop", cur.EventLoopOn() != next.EventLoopOn()},
		{"proxy.event_loop_batch", cur.EventLoopBatchOn() != next.EventLoopBatchOn()},
	} {
		if c.changed {
			return fmt.Errorf("%s changed: restart meshd to apply it", c.key)
		}
	}
	return nil
}

// Reload switches to cfg without dropping requests: upstreams keep their
// instance state, new listeners are bound before old ones drain. On error the
// running config stays in force.
func (s *Sidecar) Reload(cfg *config.Config) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.started || s.draining.Load() {
		return errors.New("sidecar: not running")
	}
	if err := s.checkConsulReload(cfg); err != nil {
		return err
	}
	if err := checkServerReload(s.cfg.Load().Proxy, cfg.Proxy); err != nil {
		return err
	}
	old := *s.upstreams.Load()
	ups, err := s.buildUpstreams(cfg, old)
	if err != nil {
		return err
	}
	if err := s.syncListeners(cfg); err != nil {
		return err
	}
	s.catalogMu.Lock()
	s.catalog.Replace(staticInstances(cfg.Static))
	s.cfg.Store(cfg)
	s.catalogMu.Unlock()
	// Keep on-demand watches that the new config does not name.
	for name, u := range old {
		if _, ok := ups[name]; !ok && u.onDemand {
			ups[name] = u
		}
	}
	// Upstreams replaced or removed are marked, then the new set is
	// published, then their series are forgotten (the order settleMetrics
	// relies on), all before the successors start.
	for name, u := range old {
		if ups[name] != u {
			u.retired.Store(true)
		}
	}
	s.upstreams.Store(&ups)
	for name, u := range old {
		if ups[name] != u {
			metricsOf(s.tel).ForgetUpstream(name)
		}
	}
	for name, u := range ups {
		if prev, ok := old[name]; !ok || prev != u {
			s.startUpstream(u)
		}
	}
	for name, u := range old {
		if ups[name] != u {
			go u.stop()
		}
	}
	if s.eng != nil {
		// As the retired transports' idle connections close, so do the
		// loops': an upstream's new settings (a connection cap, h2c) or
		// a gone one must not leave connections behind.
		s.eng.dropIdle()
	}
	s.log.Info("config reloaded", "file", cfg.File, "upstreams", len(cfg.Upstreams))
	return nil
}

// Shutdown stops accepting, waits for in-flight requests and tunnels until
// ctx ends, then closes what is left and stops discovery. It returns
// ctx.Err() when the drain was cut short.
func (s *Sidecar) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.started {
		return nil
	}
	s.draining.Store(true)
	s.deregister(ctx)
	// Stop accepting on the data listeners before saying so; the drain
	// below then waits for the connections already open. The admin
	// listener stays up until they have drained, so that /ready answers
	// 503 "shutting down" meanwhile instead of refusing connections.
	for key, l := range s.listeners {
		if key != "admin" {
			l.ln.Close()
		}
	}
	s.log.Info("draining", "listeners", len(s.listeners))
	var wg sync.WaitGroup
	var cut atomic.Bool
	for key, l := range s.listeners {
		if key == "admin" {
			continue
		}
		wg.Add(1)
		go func(l *listener) {
			defer wg.Done()
			if err := l.shutdown(ctx); err != nil {
				cut.Store(true)
				l.close()
			}
		}(l)
	}
	wg.Wait()
	// Listeners a reload replaced may still be draining theirs.
	retired := make(chan struct{})
	go func() { s.retiring.Wait(); close(retired) }()
	select {
	case <-retired:
	case <-ctx.Done():
		cut.Store(true)
		s.retiringMu.Lock()
		for l := range s.retiringSet {
			l.close()
		}
		s.retiringMu.Unlock()
		<-retired
	}
	tunnelsDone := make(chan struct{})
	go func() { s.tunnels.Wait(); close(tunnelsDone) }()
	select {
	case <-tunnelsDone:
	case <-ctx.Done():
		cut.Store(true)
		s.tunnelMu.Lock()
		for c := range s.tunnelSet {
			c.Close()
		}
		s.tunnelMu.Unlock()
		<-tunnelsDone
	}
	if a := s.listeners["admin"]; a != nil {
		a.ln.Close()
		if err := a.shutdown(ctx); err != nil {
			a.close() // a scrape or profile still running: not a request cut
		}
	}
	if s.eng != nil {
		// Every proxy listener has drained (or been closed): the loops
		// hold nothing of theirs but idle connections to instances.
		s.eng.stop()
		s.eng = nil
	}
	s.cancel()
	for _, u := range *s.upstreams.Load() {
		u.stop()
	}
	s.bg.Wait()
	s.started = false
	if cut.Load() {
		s.log.Warn("drain deadline passed; remaining connections were closed")
		return ctx.Err()
	}
	s.log.Info("drained; all requests completed")
	return nil
}

func (s *Sidecar) trackTunnel(client net.Conn, backend io.Closer) (untrack func()) {
	s.tunnels.Add(1)
	s.tunnelMu.Lock()
	s.tunnelSet[client] = struct{}{}
	s.tunnelSet[backend] = struct{}{}
	s.tunnelMu.Unlock()
	return func() {
		s.tunnelMu.Lock()
		delete(s.tunnelSet, client)
		delete(s.tunnelSet, backend)
		s.tunnelMu.Unlock()
		s.tunnels.Done()
	}
}

// upstreamNames lists the live upstreams, sorted.
func (s *Sidecar) upstreamNames() []string {
	m := *s.upstreams.Load()
	out := make([]string, 0, len(m))
	for n := range m {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}
