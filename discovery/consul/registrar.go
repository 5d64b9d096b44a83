package consul

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// Defaults for a registration's health check.
const (
	DefaultCheckInterval = 10 * time.Second
	DefaultCheckTimeout  = 5 * time.Second
)

// Weights are the relative capacities Consul reports for an instance while
// its checks pass and while they warn. A zero Passing, or a nil Warning,
// means Consul's default of 1; a Warning of 0 takes the instance out of
// rotation while its checks warn.
type Weights struct {
	Passing int
	Warning *int
}

// Check is the health check Consul runs against the registered service: an
// HTTP GET of a URL (2xx passing, 429 warning, otherwise critical) or a TCP
// connect. At most one of HTTP and TCP may be set; with neither, the service
// has no check and counts as passing while its node is healthy.
type Check struct {
	// HTTP is the URL to probe, such as "http://127.0.0.1:8080/healthz".
	HTTP string
	// TCP is the host:port to connect to.
	TCP string
	// Interval between probes; default DefaultCheckInterval.
	Interval time.Duration
	// Timeout of one probe; default DefaultCheckTimeout, at most Interval.
	Timeout time.Duration
}

// Registration describes the local service to register with the agent.
type Registration struct {
	// Name is the service name; required.
	Name string
	// ID is unique on the agent; default "Name-Address-Port", using the
	// host name when Address is empty.
	ID string
	// Address is what other instances dial; empty means the node's address.
	Address string
	// Port is required, 1-65535.
	Port    int
	Tags    []string
	Meta    map[string]string
	Weights Weights
	Check   Check
	// ListenerTCP, when set, adds a TCP check on this host:port, with
	// Check's interval and timeout: meant for the sidecar's own listener
	// that peers dial, so that the instance goes critical when the
	// sidecar dies while the app lives (Check alone probes the app).
	// Needs a Check.
	ListenerTCP string
	// DeregisterCriticalServiceAfter lets Consul remove the service once its
	// check has been critical this long; zero never does. Needs a Check.
	DeregisterCriticalServiceAfter time.Duration
}

// Registrar keeps one service registered with the local Consul agent. Run
// registers it and registers it again whenever the agent has lost it (an
// agent restart); Deregister removes it for a graceful shutdown. Run and
// Deregister may be called from different goroutines.
type Registrar struct {
	c   *conn
	reg *api.AgentServiceRegistration

	stopOnce sync.Once
	stopped  chan struct{} // closed by Deregister

	mu   sync.Mutex // orders registration against deregistration
	gone bool       // Deregister was called
}

// NewRegistrar checks reg and returns a Registrar for it. It does not
// contact Consul.
func NewRegistrar(cfg Config, reg Registration) (*Registrar, error) {
	ar, err := reg.agentRegistration()
	if err != nil {
		return nil, fmt.Errorf("consul: register %q: %w", reg.Name, err)
	}
	c, err := newConn(cfg)
	if err != nil {
		return nil, err
	}
	return &Registrar{c: c, reg: ar, stopped: make(chan struct{})}, nil
}

// ID is the service ID the Registrar registers.
func (r *Registrar) ID() string {
	if r.guard() != nil {
		return ""
	}
	return r.reg.ID
}

func (reg Registration) agentRegistration() (*api.AgentServiceRegistration, error) {
	if err := checkServiceName(reg.Name); err != nil {
		return nil, err
	}
	if reg.Port < 1 || reg.Port > 65535 {
		return nil, fmt.Errorf("port %d out of range 1-65535", reg.Port)
	}
	if reg.Weights.Passing < 0 || reg.Weights.Warning != nil && *reg.Weights.Warning < 0 {
		return nil, errors.New("negative weight")
	}
	if reg.DeregisterCriticalServiceAfter < 0 {
		return nil, errors.New("negative deregister_critical_service_after")
	}
	id := reg.ID
	if id == "" {
		host := reg.Address
		if host == "" {
			h, err := os.Hostname()
			if err != nil || h == "" {
				h = "localhost"
			}
			host = h
		}
		id = fmt.Sprintf("%s-%s-%d", reg.Name, host, reg.Port)
	}
	if err := checkServiceName(id); err != nil {
		return nil, fmt.Errorf("service id %q: %w", id, err)
	}
	ar := &api.AgentServiceRegistration{
		ID:      id,
		Name:    reg.Name,
		Address: reg.Address,
		Port:    reg.Port,
		Tags:    slices.Clone(reg.Tags),
		Meta:    maps.Clone(reg.Meta),
	}
	if reg.Weights.Passing != 0 || reg.Weights.Warning != nil {
		w := api.AgentWeights{Passing: max(reg.Weights.Passing, 1), Warning: 1}
		if reg.Weights.Warning != nil {
			w.Warning = *reg.Weights.Warning
		}
		ar.Weights = &w
	}
	chk, err := reg.Check.agentCheck()
	if err != nil {
		return nil, err
	}
	if reg.DeregisterCriticalServiceAfter > 0 {
		if chk == nil {
			return nil, errors.New("deregister_critical_service_after needs a check")
		}
		chk.DeregisterCriticalServiceAfter = reg.DeregisterCriticalServiceAfter.String()
	}
	if reg.ListenerTCP == "" {
		ar.Check = chk
		return ar, nil
	}
	if chk == nil {
		return nil, errors.New("a listener check needs a check of the service")
	}
	lc := reg.Check
	lc.HTTP, lc.TCP = "", reg.ListenerTCP
	lchk, err := lc.agentCheck()
	if err != nil {
		return nil, fmt.Errorf("listener check: %w", err)
	}
	lchk.Name = "listener " + reg.ListenerTCP
	lchk.DeregisterCriticalServiceAfter = chk.DeregisterCriticalServiceAfter
	ar.Checks = api.AgentServiceChecks{chk, lchk}
	return ar, nil
}

func (c Check) agentCheck() (*api.AgentServiceCheck, error) {
	if c.HTTP == "" && c.TCP == "" {
		if c.Interval != 0 || c.Timeout != 0 {
			return nil, errors.New("check interval or timeout without an HTTP or TCP target")
		}
		return nil, nil
	}
	if c.HTTP != "" && c.TCP != "" {
		return nil, errors.New("check has both HTTP and TCP targets")
	}
	if c.Interval < 0 || c.Timeout < 0 {
		return nil, errors.New("negative check interval or timeout")
	}
	interval := c.Interval
	if interval == 0 {
		interval = DefaultCheckInterval
	}
	timeout := c.Timeout
	if timeout == 0 {
		timeout = min(DefaultCheckTimeout, interval)
	}
	ac := &api.AgentServiceCheck{Interval: interval.String(), Timeout: timeout.String()}
	if c.HTTP != "" {
		u, err := url.Parse(c.HTTP)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("check URL %q: want an absolute http or https URL", c.HTTP)
		}
		ac.Name, ac.HTTP = "HTTP "+c.HTTP, c.HTTP
	} else {
		host, port, err := net.SplitHostPort(c.TCP)
		if err != nil || host == "" || port == "" {
			return nil, fmt.Errorf("check TCP address %q: want host:port", c.TCP)
		}
		if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
			return nil, fmt.Errorf("check TCP address %q: bad port", c.TCP)
		}
		ac.Name, ac.TCP = "TCP "+c.TCP, c.TCP
	}
	return ac, nil
}

var (
	errDeregistered  = errors.New("service was deregistered")
	errNotConfigured = errors.New("consul: registrar not created with NewRegistrar")
)

func (r *Registrar) guard() error {
	if r == nil || r.c == nil || r.reg == nil || r.stopped == nil {
		return errNotConfigured
	}
	return nil
}

// Run registers the service and keeps it registered until ctx ends or
// Deregister is called, and then returns nil. It waits on the agent's view
// of the service with a blocking query, so a lost registration is noticed as
// soon as the agent answers again. Failures are logged and retried with
// backoff; Run never deregisters on its own.
func (r *Registrar) Run(ctx context.Context) error {
	if err := r.guard(); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-r.stopped:
			cancel()
		case <-ctx.Done():
		}
	}()
	log := r.c.log.With("service", r.reg.Name, "service_id", r.reg.ID)
	var (
		registered bool
		hash       string
		failures   int
	)
	fail := func(msg string, err error) bool {
		failures++
		delay := backoff(r.c.backoffBase, r.c.backoffMax, failures)
		log.Warn(msg, "attempt", failures, "retry_in", delay, "error", err)
		return sleep(ctx, delay)
	}
	for ctx.Err() == nil {
		if !registered {
			err := r.register(ctx)
			switch {
			case errors.Is(err, errDeregistered) || ctx.Err() != nil:
				return nil
			case err != nil:
				if !fail("consul registration failed", err) {
					return nil
				}
				continue
			}
			log.Info("registered service with consul agent")
			registered, hash, failures = true, "", 0
		}
		q := &api.QueryOptions{Token: r.c.token, WaitHash: hash, WaitTime: r.c.wait}
		rctx, rcancel := context.WithTimeout(ctx, r.c.wait+r.c.wait/16+10*time.Second)
		_, meta, err := r.c.client.Agent().Service(r.reg.ID, q.WithContext(rctx))
		rcancel()
		switch {
		case ctx.Err() != nil:
			return nil
		case err == nil:
			hash, failures = meta.LastContentHash, 0
			if hash == "" {
				// Without a hash the query cannot block; do not spin.
				if !sleep(ctx, r.c.backoffMax) {
					return nil
				}
			}
		case isNotFound(err):
			log.Info("consul agent no longer has the service; registering again")
			registered = false
		default:
			hash = ""
			err = fmt.Errorf("consul: registration of %q: %w", r.reg.ID, r.c.redact(describe(err, needWrite)))
			if !fail("consul registration check failed", err) {
				return nil
			}
		}
	}
	return nil
}

func (r *Registrar) register(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.gone {
		return errDeregistered
	}
	opts := api.ServiceRegisterOpts{ReplaceExistingChecks: true, Token: r.c.token}.WithContext(ctx)
	if err := r.c.client.Agent().ServiceRegisterOpts(r.reg, opts); err != nil {
		return fmt.Errorf("consul: register %q: %w", r.reg.ID, r.c.redact(describe(err, needWrite)))
	}
	return nil
}

// Deregister stops Run from registering the service again and removes it
// from the agent. A service the agent does not know counts as removed.
func (r *Registrar) Deregister(ctx context.Context) error {
	if err := r.guard(); err != nil {
		return err
	}
	r.stopOnce.Do(func() { close(r.stopped) })
	r.mu.Lock()
	defer r.mu.Unlock()
	r.gone = true
	q := &api.QueryOptions{Token: r.c.token}
	err := r.c.client.Agent().ServiceDeregisterOpts(r.reg.ID, q.WithContext(ctx))
	if err != nil && !isNotFound(err) {
		err = fmt.Errorf("consul: deregister %q: %w", r.reg.ID, r.c.redact(describe(err, needWrite)))
		r.c.log.Warn("consul deregistration failed", "service", r.reg.Name, "service_id", r.reg.ID, "error", err)
		return err
	}
	r.c.log.Info("deregistered service from consul agent", "service", r.reg.Name, "service_id", r.reg.ID)
	return nil
}

func isNotFound(err error) bool {
	var se api.StatusError
	return errors.As(err, &se) && se.Code == http.StatusNotFound
}
