package telemetry

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/attribute"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
)

// Metric names (OpenTelemetry form; Prometheus replaces dots with
// underscores and adds _seconds / _total suffixes).
const (
	MetricClientDuration     = "http.client.request.duration"
	MetricServerDuration     = "http.server.request.duration"
	MetricRequests           = "meshd.requests"
	MetricInFlight           = "meshd.requests.in_flight"
	MetricRetries            = "meshd.retries"
	MetricBreakerTransitions = "meshd.breaker.transitions"
	MetricBreakerState       = "meshd.breaker.state"
	MetricDiscoveryUpdates   = "meshd.discovery.updates"
	MetricDiscoveryInstances = "meshd.discovery.instances"
	MetricDiscoveryStale     = "meshd.discovery.stale"
)

// durationBuckets are the boundaries (seconds) the HTTP semantic
// conventions recommend for request durations. Upper bounds are inclusive.
var durationBuckets = [...]float64{0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10}

// Metrics records meshd's request, retry, breaker and discovery metrics.
//
// All methods are safe for concurrent use and accept a nil receiver, which
// does nothing (the state when metrics are off). The per-request methods
// (RequestDone, ServerRequestDone, InFlight, Retry) look up a cached
// series or attribute set per label combination and do not allocate once a
// combination has been seen; the cache keeps every combination for the life
// until ForgetInstance or ForgetUpstream drops it, like the Prometheus
// series it feeds. RequestDone,
// ServerRequestDone and InFlight take no lock: their series are atomic
// counters read when /metrics is scraped (see hotMetrics).
type Metrics struct {
	hot      hotMetrics
	inFlight metric.Int64ObservableUpDownCounter
	// inFlightBy holds an *atomic.Int64 per upstream, read at collection
	// time, so that the hot path pays an atomic add instead of a metric record.
	inFlightBy         seriesCache[string, *atomic.Int64]
	retries            metric.Int64Counter
	breakerTransitions metric.Int64Counter
	discUpdates        metric.Int64Counter
	// The gauges are observed at collection time from these, so that the
	// series of a forgotten instance or upstream stop being exported.
	breakerState  gaugeSet[[2]string]
	discInstances gaugeSet[string]
	discStale     gaugeSet[string]

	upstreamSets setCache[string]
	retrySets    setCache[[2]string]
}

type reqKey struct {
	upstream, instance string
	addr, method       string // the instance's host:port; normalized method
	status             int
	errType            string
}

type srvKey struct {
	upstream string
	method   string // normalized
	status   int
	errType  string // only without a status
}

// newMetrics builds the instruments on a meter provider that exports to a
// private Prometheus registry, and the handler serving that registry.
func newMetrics(res *resource.Resource) (*Metrics, http.Handler, func(context.Context) error, error) {
	reg := prometheus.NewRegistry()
	exp, err := otelprom.New(otelprom.WithRegisterer(reg), otelprom.WithoutScopeInfo())
	if err != nil {
		return nil, nil, nil, fmt.Errorf("prometheus exporter: %w", err)
	}
	if err := reg.Register(collectors.NewGoCollector()); err != nil {
		return nil, nil, nil, fmt.Errorf("go collector: %w", err)
	}
	if err := reg.Register(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})); err != nil {
		return nil, nil, nil, fmt.Errorf("process collector: %w", err)
	}
	opts := []sdkmetric.Option{sdkmetric.WithReader(exp)}
	if res != nil {
		opts = append(opts, sdkmetric.WithResource(res))
	}
	mp := sdkmetric.NewMeterProvider(opts...)
	m, err := newInstruments(mp.Meter(ScopeName))
	if err != nil {
		_ = mp.Shutdown(context.Background())
		return nil, nil, nil, err
	}
	if err := reg.Register(&m.hot); err != nil {
		_ = mp.Shutdown(context.Background())
		return nil, nil, nil, fmt.Errorf("request metrics: %w", err)
	}
	h := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	return m, h, mp.Shutdown, nil
}

func newInstruments(meter metric.Meter) (*Metrics, error) {
	m := &Metrics{}
	var err error
	fail := func(name string, err error) (*Metrics, error) {
		return nil, fmt.Errorf("instrument %s: %w", name, err)
	}
	if m.inFlight, err = meter.Int64ObservableUpDownCounter(MetricInFlight, metric.WithUnit("{request}"),
		metric.WithDescription("Requests to an upstream currently being handled.")); err != nil {
		return fail(MetricInFlight, err)
	}
	if _, err = meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		m.inFlightBy.eachKey(func(upstream string, n *atomic.Int64) {
			o.ObserveInt64(m.inFlight, n.Load(), m.upstreamOpts(upstream).obs...)
		})
		return nil
	}, m.inFlight); err != nil {
		return fail(MetricInFlight, err)
	}
	if m.retries, err = meter.Int64Counter(MetricRetries, metric.WithUnit("{retry}"),
		metric.WithDescription("Retries, by cause.")); err != nil {
		return fail(MetricRetries, err)
	}
	if m.breakerTransitions, err = meter.Int64Counter(MetricBreakerTransitions, metric.WithUnit("{transition}"),
		metric.WithDescription("Circuit breaker state changes.")); err != nil {
		return fail(MetricBreakerTransitions, err)
	}
	if err = m.breakerState.register(meter, MetricBreakerState, "",
		"Circuit breaker state per instance: 0 closed, 1 open, 2 half-open."); err != nil {
		return fail(MetricBreakerState, err)
	}
	if m.discUpdates, err = meter.Int64Counter(MetricDiscoveryUpdates, metric.WithUnit("{update}"),
		metric.WithDescription("Instance sets received from discovery.")); err != nil {
		return fail(MetricDiscoveryUpdates, err)
	}
	if err = m.discInstances.register(meter, MetricDiscoveryInstances, "{instance}",
		"Instances in the latest set from discovery."); err != nil {
		return fail(MetricDiscoveryInstances, err)
	}
	if err = m.discStale.register(meter, MetricDiscoveryStale, "",
		"1 while discovery for the upstream is failing and the last good set is in use."); err != nil {
		return fail(MetricDiscoveryStale, err)
	}
	return m, nil
}

// RequestDone records one finished attempt to an instance (at addr,
// host:port) with method: its duration in http.client.request.duration
// (labels meshd.upstream, meshd.instance.id, http.request.method,
// server.address and server.port, http.response.status_code when status >
// 0, error.type when errType is set or status >= 400) and one count in
// meshd.requests (labels meshd.upstream, meshd.instance.id,
// meshd.status_class: 1xx..5xx, or "canceled" / "error" when no status was
// received). Methods the HTTP conventions do not know count as _OTHER.
func (m *Metrics) RequestDone(upstream, instance, addr, method string, status int, dur time.Duration, errType string) {
	if m == nil {
		return
	}
	method, _ = normalizeMethod(method)
	rs := m.hot.request(reqKey{upstream: upstream, instance: instance, addr: addr, method: method, status: max(status, 0), errType: errType})
	rs.dur.observe(dur)
	rs.cnt.n.Add(1)
}

func statusClass(status int, errType string) string {
	switch {
	case status >= 100 && status < 200:
		return "1xx"
	case status >= 200 && status < 300:
		return "2xx"
	case status >= 300 && status < 400:
		return "3xx"
	case status >= 400 && status < 500:
		return "4xx"
	case status >= 500 && status < 600:
		return "5xx"
	case errType == ErrTypeCanceled:
		return "canceled"
	}
	return "error"
}

// ServerRequestDone records one finished request meshd received for
// upstream in http.server.request.duration (labels meshd.upstream,
// http.request.method, url.scheme, http.response.status_code when a status
// was sent (status > 0), error.type when a status of 500 or more was sent
// or, with no status sent, errType, such as canceled for a caller that
// left).
func (m *Metrics) ServerRequestDone(upstream, method string, status int, errType string, dur time.Duration) {
	if m == nil {
		return
	}
	// A status below 0 means none, like 0: one series, not two with the
	// same labels, which would fail the whole scrape.
	status = max(status, 0)
	if status > 0 {
		errType = "" // the status says it
	}
	method, _ = normalizeMethod(method)
	m.hot.server(srvKey{upstream: upstream, method: method, status: status, errType: errType}).observe(dur)
}

// InFlight adds delta (+1 when a request to upstream starts, -1 when it
// ends) to meshd.requests.in_flight.
func (m *Metrics) InFlight(upstream string, delta int64) {
	if m == nil {
		return
	}
	c, ok := m.inFlightBy.get(upstream)
	if !ok {
		c = m.inFlightBy.getOrAdd(upstream, func() *atomic.Int64 { return new(atomic.Int64) })
	}
	c.Add(delta)
}

func (m *Metrics) upstreamOpts(upstream string) *setOpts {
	o, ok := m.upstreamSets.get(upstream)
	if !ok {
		s := attribute.NewSet(AttrUpstream.String(upstream))
		o = m.upstreamSets.put(upstream, [2]attribute.Set{s, s})
	}
	return o
}

// Retry counts one retry of a request to upstream in meshd.retries (labels
// meshd.upstream, meshd.retry.cause).
func (m *Metrics) Retry(upstream, cause string) {
	if m == nil {
		return
	}
	k := [2]string{upstream, cause}
	o, ok := m.retrySets.get(k)
	if !ok {
		s := attribute.NewSet(AttrUpstream.String(upstream), AttrRetryCause.String(cause))
		o = m.retrySets.put(k, [2]attribute.Set{s, s})
	}
	m.retries.Add(context.Background(), 1, o.add...)
}

// BreakerTransition counts a breaker state change of instance in
// meshd.breaker.transitions (labels meshd.upstream, meshd.instance.id,
// meshd.breaker.from, meshd.breaker.to) and sets meshd.breaker.state for
// the instance to the new state (0 closed, 1 open, 2 half-open; states
// other than closed, open, half-open leave the gauge unchanged). Rare event:
// attributes are built per call. Safe to call from a breaker's
// state-change callback (never blocks on meshd's locks).
func (m *Metrics) BreakerTransition(upstream, instance, from, to string) {
	if m == nil {
		return
	}
	ctx := context.Background()
	m.breakerTransitions.Add(ctx, 1, metric.WithAttributes(
		AttrUpstream.String(upstream), AttrInstanceID.String(instance),
		AttrBreakerFrom.String(from), AttrBreakerTo.String(to)))
	if v, ok := BreakerStateValue(to); ok {
		m.breakerState.set([2]string{upstream, instance}, v, func() attribute.Set {
			return attribute.NewSet(AttrUpstream.String(upstream), AttrInstanceID.String(instance))
		})
	}
}

// ForgetInstance drops the series of instance of upstream (its attempts'
// durations and counts, and its breaker state): call it when the instance
// leaves the upstream, so that a long-running sidecar does not report, or
// keep in memory, every instance it ever saw. Recording for the instance
// again starts its series anew. Safe for concurrent use.
func (m *Metrics) ForgetInstance(upstream, instance string) {
	if m == nil {
		return
	}
	m.hot.forget(upstream, instance)
	m.breakerState.delete(func(k [2]string) bool { return k == [2]string{upstream, instance} })
}

// ForgetUpstream drops every series of upstream that describes its current
// state or its instances: attempts and requests, breaker states and the
// discovery gauges. Call it when the upstream is gone (an on-demand watch
// reaped, an upstream a reload removed). The counters of retries, breaker
// transitions and discovery updates, and the in-flight gauge (0 once the
// upstream is idle), stay. Safe for concurrent use.
func (m *Metrics) ForgetUpstream(upstream string) {
	if m == nil {
		return
	}
	m.hot.forget(upstream, "")
	m.breakerState.delete(func(k [2]string) bool { return k[0] == upstream })
	m.discInstances.delete(func(k string) bool { return k == upstream })
	m.discStale.delete(func(k string) bool { return k == upstream })
}

// BreakerStateValue maps a breaker state name to the value of
// meshd.breaker.state: closed 0, open 1, half-open (or half_open) 2.
func BreakerStateValue(state string) (int64, bool) {
	switch state {
	case "closed":
		return 0, true
	case "open":
		return 1, true
	case "half-open", "half_open", "halfopen":
		return 2, true
	}
	return 0, false
}

// DiscoveryUpdate counts an instance set received for upstream from source
// ("static", "consul") in meshd.discovery.updates and sets
// meshd.discovery.instances to its size.
func (m *Metrics) DiscoveryUpdate(upstream, source string, instances int) {
	if m == nil {
		return
	}
	ctx := context.Background()
	m.discUpdates.Add(ctx, 1, metric.WithAttributes(AttrUpstream.String(upstream), AttrDiscoverySrc.String(source)))
	m.discInstances.set(upstream, int64(instances), func() attribute.Set { return attribute.NewSet(AttrUpstream.String(upstream)) })
}

// DiscoveryStale sets meshd.discovery.stale for upstream: 1 while discovery
// is failing and the last good set is in use, 0 otherwise.
func (m *Metrics) DiscoveryStale(upstream string, stale bool) {
	if m == nil {
		return
	}
	var v int64
	if stale {
		v = 1
	}
	m.discStale.set(upstream, v, func() attribute.Set { return attribute.NewSet(AttrUpstream.String(upstream)) })
}

// gaugeSet holds the current value of each series of an observed gauge.
// Updates are rare (state changes, discovery updates) and take a mutex.
type gaugeSet[K comparable] struct {
	mu sync.Mutex
	v  map[K]gaugeValue
}

type gaugeValue struct {
	n    int64
	opts []metric.ObserveOption
}

// register makes the gauge and the callback that observes every series.
func (g *gaugeSet[K]) register(meter metric.Meter, name, unit, desc string) error {
	opts := []metric.Int64ObservableGaugeOption{metric.WithDescription(desc)}
	if unit != "" {
		opts = append(opts, metric.WithUnit(unit))
	}
	inst, err := meter.Int64ObservableGauge(name, opts...)
	if err != nil {
		return err
	}
	_, err = meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, v := range g.v {
			o.ObserveInt64(inst, v.n, v.opts...)
		}
		return nil
	}, inst)
	return err
}

// set sets k's value; attrs builds its labels the first time k is seen.
func (g *gaugeSet[K]) set(k K, n int64, attrs func() attribute.Set) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.v == nil {
		g.v = map[K]gaugeValue{}
	}
	v, ok := g.v[k]
	if !ok {
		v.opts = []metric.ObserveOption{metric.WithAttributeSet(attrs())}
	}
	v.n = n
	g.v[k] = v
}

// delete drops the series whose key matches.
func (g *gaugeSet[K]) delete(match func(K) bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for k := range g.v {
		if match(k) {
			delete(g.v, k)
		}
	}
}

// setOpts are the pre-built measurement options for one label combination.
type setOpts struct {
	rec  []metric.RecordOption  // first set, for histograms and gauges
	add  []metric.AddOption     // first set, for counters
	add2 []metric.AddOption     // second set, for counters
	obs  []metric.ObserveOption // first set, for observed instruments
}

// setCache maps a label combination to its options. Reads are lock-free and
// allocation-free (copy-on-write map behind an atomic pointer); writes, once
// per new combination, copy the map under a mutex.
type setCache[K comparable] struct {
	m  atomic.Pointer[map[K]*setOpts]
	mu sync.Mutex
}

func (c *setCache[K]) get(k K) (*setOpts, bool) {
	if m := c.m.Load(); m != nil {
		o, ok := (*m)[k]
		return o, ok
	}
	return nil, false
}

func (c *setCache[K]) put(k K, sets [2]attribute.Set) *setOpts {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.m.Load()
	if old != nil {
		if o, ok := (*old)[k]; ok {
			return o
		}
	}
	first, second := metric.WithAttributeSet(sets[0]), metric.WithAttributeSet(sets[1])
	o := &setOpts{
		rec:  []metric.RecordOption{first},
		add:  []metric.AddOption{first},
		add2: []metric.AddOption{second},
		obs:  []metric.ObserveOption{first},
	}
	var next map[K]*setOpts
	if old == nil {
		next = make(map[K]*setOpts, 1)
	} else {
		next = make(map[K]*setOpts, len(*old)+1)
		for kk, v := range *old {
			next[kk] = v
		}
	}
	next[k] = o
	c.m.Store(&next)
	return o
}
