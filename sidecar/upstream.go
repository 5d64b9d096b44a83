package sidecar

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/discovery"
	"github.com/meshd/meshd/resilience"
	"github.com/meshd/meshd/sidecar/config"
	"github.com/meshd/meshd/sidecar/h1"
	"github.com/meshd/meshd/telemetry"
)

// upstream is one routable service: its live pool, its transport to the
// instances and the state of its discovery watch. Request handlers read its
// fields without locks: everything mutable is atomic or replaced whole.
type upstream struct {
	name   string
	source string // "static" or "consul"
	log    *slog.Logger

	pool  *balance.Pool
	guard *resilience.Guard
	tel   *telemetry.Provider
	// settings holds everything a config reload may change at once.
	settings atomic.Pointer[upstreamSettings]

	answered atomic.Bool
	status   atomic.Pointer[discovery.Status]
	requests atomic.Uint64
	errors   atomic.Uint64
	lastUsed atomic.Int64 // unix nanos, for idle on-demand watches
	onDemand bool
	// retired is set when a reload or the idle reaper takes the upstream
	// out of service: instances its pool drops after that are no longer
	// its metrics' to forget (a successor may have them).
	retired atomic.Bool
	// current finds the upstream in service under a name now (the
	// sidecar's lookup, set by the sidecar before the upstream starts).
	current func(name string) *upstream
	// inboundAddr is the local app's address for the inbound upstream.
	inboundAddr string

	cancel context.CancelFunc
	done   chan struct{}
	// first is closed on the first discovery answer.
	first     chan struct{}
	firstOnce sync.Once
}

// upstreamSettings is the reloadable part of an upstream, swapped whole.
type upstreamSettings struct {
	cfg       config.Upstream
	algorithm string
	transport *upstreamTransport
}

// upstreamTransport sends plain HTTP/1.1 exchanges with meshd's synchronous
// client and everything else (upgrades, trailers, h2c, Expect) with net/http.
type upstreamTransport struct {
	fast *h1.Transport // nil for h2c upstreams and connection-capped ones
	std  *http.Transport
}

func (t *upstreamTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if t.fast != nil && h1.Supports(r) && !duplexBody(r) {
		return t.fast.RoundTrip(r)
	}
	if i, ok := r.Context().Value(h1.InterimKey{}).(h1.Interim); ok {
		// net/http's Transport reports informational answers through
		// httptrace, from its reading goroutine while RoundTrip waits.
		r = r.WithContext(httptrace.WithClientTrace(r.Context(), &httptrace.ClientTrace{
			Got1xxResponse: func(code int, h textproto.MIMEHeader) error { return i.Interim(code, http.Header(h)) },
		}))
	}
	return t.std.RoundTrip(r)
}

// halfDuplexMax is the largest request body sent through meshd's own
// HTTP/1.1 client, which writes the whole body before it reads the answer.
const halfDuplexMax = 256 << 10

// duplexBody reports whether r's body is streamed (unknown length) or
// large: net/http's Transport reads the answer while it sends such a body,
// so an instance that answers early (a 413 before the upload is read) or
// echoes as it reads is not stalled, or cut into a 502, by a client still
// writing.
func duplexBody(r *http.Request) bool {
	return r.Body != nil && r.Body != http.NoBody && (r.ContentLength < 0 || r.ContentLength > halfDuplexMax)
}

func (t *upstreamTransport) CloseIdleConnections() {
	if t.fast != nil {
		t.fast.CloseIdleConnections()
	}
	t.std.CloseIdleConnections()
}

// retire is for a transport no new request will use: its idle connections
// close now, and the h1 client's busy ones as their exchanges end. net/http
// pools connections that come back later until its idle timeout; a second
// sweep after drain (when positive) closes them sooner.
func (t *upstreamTransport) retire(drain time.Duration) {
	if t.fast != nil {
		t.fast.Close()
	}
	t.std.CloseIdleConnections()
	if drain > 0 {
		time.AfterFunc(drain, t.std.CloseIdleConnections)
	}
}

func newTransport(u config.Upstream) *upstreamTransport {
	std := newStdTransport(u)
	t := &upstreamTransport{std: std}
	if !u.H2C && u.MaxConnsPerInstance == 0 {
		rc := u.Resilience()
		t.fast = h1.New(h1.Options{
			Dial:                  std.DialContext,
			MaxIdlePerHost:        u.MaxIdlePerInstance,
			IdleTimeout:           config.DefaultIdleConnTimeout,
			ResponseHeaderTimeout: rc.Timeouts.ResponseHeader,
		})
	}
	return t
}

func newStdTransport(u config.Upstream) *http.Transport {
	rc := u.Resilience()
	d := &net.Dialer{Timeout: rc.Timeouts.Connect, KeepAlive: 30 * time.Second}
	t := &http.Transport{
		Proxy:                 nil, // never honour HTTP_PROXY: we are the proxy
		DialContext:           d.DialContext,
		MaxIdleConns:          0,
		MaxIdleConnsPerHost:   u.MaxIdlePerInstance,
		MaxConnsPerHost:       u.MaxConnsPerInstance,
		IdleConnTimeout:       config.DefaultIdleConnTimeout,
		ResponseHeaderTimeout: rc.Timeouts.ResponseHeader,
		ExpectContinueTimeout: time.Second,
		DisableCompression:    true, // pass bodies through untouched
		WriteBufferSize:       32 << 10,
		ReadBufferSize:        32 << 10,
	}
	if u.H2C {
		p := new(http.Protocols)
		p.SetUnencryptedHTTP2(true)
		t.Protocols = p
	}
	return t
}

// run applies discovery updates to the pool until ctx ends. The source runs
// in its own goroutine and never waits for a slow rebuild: the mailbox
// coalesces bursts.
func (u *upstream) run(ctx context.Context, src discovery.Source) {
	defer close(u.done)
	box := discovery.NewMailbox()
	go func() {
		backoff := 100 * time.Millisecond
		for {
			err := src.Watch(ctx, u.name, box)
			if ctx.Err() != nil {
				return
			}
			u.log.Warn("discovery watch ended; restarting", "upstream", u.name, "source", src.Name(), "err", err, "in", backoff)
			box.Fail(err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 10*time.Second)
		}
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			u.pool.Tick()
		case <-box.Ready():
			upd, st, _ := box.Take()
			if upd != nil {
				before := len(u.pool.Load().Endpoints)
				u.pool.Update(upd.Instances, upd.Reason)
				metricsOf(u.tel).DiscoveryUpdate(u.name, src.Name(), len(upd.Instances))
				if u.retired.Load() {
					u.settleMetrics("")
				}
				first := !u.answered.Swap(true)
				u.firstOnce.Do(func() { close(u.first) })
				lvl := slog.LevelDebug
				if first || before != len(upd.Instances) {
					lvl = slog.LevelInfo
				}
				u.log.Log(ctx, lvl, "discovery update", "upstream", u.name, "source", src.Name(), "instances", len(upd.Instances), "reason", upd.Reason)
			}
			prev := u.status.Load()
			u.status.Store(&st)
			metricsOf(u.tel).DiscoveryStale(u.name, st.Err != nil)
			if u.retired.Load() {
				u.settleMetrics("")
			}
			if st.Err != nil && (prev == nil || prev.Err == nil) {
				u.log.Warn("discovery failing; routing to the last known instances", "upstream", u.name, "source", src.Name(), "err", st.Err, "instances", len(u.pool.Load().Endpoints))
			} else if st.Err == nil && prev != nil && prev.Err != nil {
				u.log.Info("discovery recovered", "upstream", u.name, "source", src.Name())
			}
		}
	}
}

// settleMetrics is called after recording a metric of u (of its instance
// id, if id is set) when u or the instance may have left meanwhile: their
// leaving dropped their series, and the record must not bring them back
// for good. Whatever the interleaving with the leaving (which marks the
// upstream and publishes its successor or its absence, then forgets), one
// of the two forgets last.
func (u *upstream) settleMetrics(id string) {
	m := metricsOf(u.tel)
	if m == nil {
		return
	}
	cur := u
	if u.retired.Load() {
		if cur = u.current(u.name); cur == nil {
			m.ForgetUpstream(u.name)
			return
		}
	}
	if id != "" && !hasInstance(cur.pool.Load(), id) {
		m.ForgetInstance(u.name, id)
	}
}

// hasInstance reports whether snap holds the instance id.
func hasInstance(snap *balance.Snapshot, id string) bool {
	for _, e := range snap.Endpoints {
		if e.ID == id {
			return true
		}
	}
	return false
}

// stale reports whether discovery is failing, since when and why.
func (u *upstream) stale() (bool, time.Time, error) {
	st := u.status.Load()
	if st == nil || st.Err == nil {
		return false, time.Time{}, nil
	}
	return true, st.Since, st.Err
}

func (u *upstream) stop() {
	if u.cancel != nil {
		u.cancel()
		<-u.done
	}
	if s := u.settings.Load(); s != nil {
		s.transport.retire(0)
	}
}

// inboundSettings are the settings toward the local app. Retries are off:
// the callers' sidecars already retry, and the app is a single instance, so
// retrying here would only multiply the load on it. Nor is there a
// response-header timeout: a slow endpoint of the app (a report, a long
// poll) is waited on as long as the caller's budget (X-Meshd-Timeout, set
// by its sidecar) allows.
func inboundSettings() config.Upstream {
	return config.Upstream{MaxIdlePerInstance: config.DefaultMaxIdlePerHost, Retry: config.Retry{Disabled: true}, WaitForAnswer: true}
}

// newUpstream makes an upstream whose pool hands every new instance to a
// circuit breaker of the upstream's guard.
func newUpstream(name, source string, uc config.Upstream, policy balance.Policy, log *slog.Logger, tel *telemetry.Provider) (*upstream, error) {
	u := &upstream{name: name, source: source, log: log, tel: tel, pool: balance.NewPool(policy), done: make(chan struct{}), first: make(chan struct{})}
	g, err := resilience.NewGuard(name, uc.Resilience(), log, func(id string, from, to balance.BreakerState) {
		// Reported outside the guard's lock: the instance may have left
		// since it tripped.
		metricsOf(tel).BreakerTransition(name, id, from.String(), to.String())
		u.settleMetrics(id)
	})
	if err != nil {
		return nil, fmt.Errorf("upstream %q: %w", name, err)
	}
	u.guard = g
	u.pool.OnNew = g.Attach
	u.pool.OnRemove = func(inst discovery.Instance, st *balance.Stats) {
		g.Detach(inst, st)
		// An instance that left stops being reported: a long-running
		// sidecar would otherwise keep a series for every instance it
		// ever saw, a breaker shown open among them.
		if !u.retired.Load() {
			metricsOf(tel).ForgetInstance(name, inst.ID)
		}
	}
	u.current = func(string) *upstream { return u }
	u.settings.Store(&upstreamSettings{cfg: uc, algorithm: policy.Name(), transport: newTransport(uc)})
	return u, nil
}

// transportKey is what decides whether a reload needs a new transport.
func transportKey(u config.Upstream) [6]int64 {
	h2c := int64(0)
	if u.H2C {
		h2c = 1
	}
	rc := u.Resilience()
	return [6]int64{int64(rc.Timeouts.Connect), int64(rc.Timeouts.ResponseHeader), int64(u.MaxIdlePerInstance), int64(u.MaxConnsPerInstance), h2c, 0}
}

// metricsOf returns p's metrics, nil (a valid no-op) when there is no provider.
func metricsOf(p *telemetry.Provider) *telemetry.Metrics {
	if p == nil {
		return nil
	}
	return p.Metrics
}
