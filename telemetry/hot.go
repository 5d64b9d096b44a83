package telemetry

import (
	"math"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
)

// The per-request metrics (http.client.request.duration,
// http.server.request.duration and meshd.requests) are aggregated here with
// atomic adds and turned into Prometheus samples only when scraped. Through
// the OpenTelemetry SDK each record resolved its attribute set and took the
// series' lock, about 0.8 µs per request on the forward path; here a record
// is a lock-free map lookup and three atomic adds. The exposition is the
// same: names, help texts, labels and buckets.

// durationBoundsNs are durationBuckets in nanoseconds.
var durationBoundsNs = func() []int64 {
	out := make([]int64, len(durationBuckets))
	for i, b := range durationBuckets {
		out[i] = int64(b*1e9 + 0.5)
	}
	return out
}()

// hotHistogram is one series of a duration histogram. Safe for concurrent use.
type hotHistogram struct {
	desc    *prometheus.Desc
	counts  [len(durationBuckets) + 1]atomic.Uint64 // per bucket, not cumulative; the last is +Inf
	sumBits atomic.Uint64                           // float64 seconds, added by compare-and-swap
}

func (h *hotHistogram) observe(d time.Duration) {
	ns := int64(d)
	i := 0
	for i < len(durationBoundsNs) && ns > durationBoundsNs[i] {
		i++
	}
	h.counts[i].Add(1)
	// A float sum, as the SDK kept: nanoseconds in an int64 would wrap
	// after 292 years of summed latency, which a busy long-poll series
	// reaches in months.
	for {
		old := h.sumBits.Load()
		if h.sumBits.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+d.Seconds())) {
			return
		}
	}
}

// metric builds the series' sample. Buckets are read one by one while
// records go on, so the count is their sum, never less than a bucket.
func (h *hotHistogram) metric() prometheus.Metric {
	buckets := make(map[float64]uint64, len(durationBuckets))
	var cum uint64
	for i, b := range durationBuckets {
		cum += h.counts[i].Load()
		buckets[b] = cum
	}
	cum += h.counts[len(durationBuckets)].Load()
	return prometheus.MustNewConstHistogram(h.desc, cum, math.Float64frombits(h.sumBits.Load()), buckets)
}

// hotCounter is one series of a counter. Safe for concurrent use.
type hotCounter struct {
	desc *prometheus.Desc
	n    atomic.Uint64
}

// reqSeries are the series one RequestDone call feeds.
type reqSeries struct {
	dur *hotHistogram
	cnt *hotCounter
}

// seriesCache maps a label combination to its series. Reads are lock-free
// and allocation-free (a copy-on-write map behind an atomic pointer); a new
// combination copies the map under the mutex, once.
type seriesCache[K comparable, V any] struct {
	m  atomic.Pointer[map[K]V]
	mu sync.Mutex
}

func (c *seriesCache[K, V]) get(k K) (V, bool) {
	if m := c.m.Load(); m != nil {
		v, ok := (*m)[k]
		return v, ok
	}
	var zero V
	return zero, false
}

// getOrAdd returns k's value, calling mk to make it when k is new.
func (c *seriesCache[K, V]) getOrAdd(k K, mk func() V) V {
	if v, ok := c.get(k); ok {
		return v
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.m.Load()
	if old != nil {
		if v, ok := (*old)[k]; ok {
			return v
		}
	}
	v := mk()
	next := make(map[K]V, 1)
	if old != nil {
		next = make(map[K]V, len(*old)+1)
		for kk, vv := range *old {
			next[kk] = vv
		}
	}
	next[k] = v
	c.m.Store(&next)
	return v
}

// deleteWhere removes every key for which drop returns true.
func (c *seriesCache[K, V]) deleteWhere(drop func(K, V) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.m.Load()
	if old == nil {
		return
	}
	next := make(map[K]V, len(*old))
	for k, v := range *old {
		if !drop(k, v) {
			next[k] = v
		}
	}
	if len(next) != len(*old) {
		c.m.Store(&next)
	}
}

// each calls f for every value.
func (c *seriesCache[K, V]) each(f func(V)) {
	c.eachKey(func(_ K, v V) { f(v) })
}

// eachKey calls f for every key and value.
func (c *seriesCache[K, V]) eachKey(f func(K, V)) {
	if m := c.m.Load(); m != nil {
		for k, v := range *m {
			f(k, v)
		}
	}
}

// hotMetrics holds the per-request series. Safe for concurrent use.
type hotMetrics struct {
	// mu orders the making of a request's series against forget, so that
	// a reqSeries never points at a series forget has just dropped.
	mu      sync.Mutex
	req     seriesCache[reqKey, reqSeries]
	srv     seriesCache[srvKey, *hotHistogram]
	clients seriesCache[string, *hotHistogram] // by label string, shared by reqKeys
	counts  seriesCache[[3]string, *hotCounter]
}

const (
	helpClientDuration = "Duration of each attempt meshd made to an upstream instance."
	helpServerDuration = "Duration of requests meshd received, retries included."
	helpRequests       = "Attempts made to upstream instances, by status class."
)

// promName is the Prometheus form of an OpenTelemetry name.
func promName(k attribute.Key) string { return strings.ReplaceAll(string(k), ".", "_") }

func (h *hotMetrics) request(k reqKey) reqSeries {
	if v, ok := h.req.get(k); ok {
		return v
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.req.getOrAdd(k, func() reqSeries {
		labels := prometheus.Labels{promName(AttrUpstream): k.upstream, promName(AttrInstanceID): k.instance}
		if k.method != "" {
			labels[promName(attrRequestMethod)] = k.method
		}
		if k.addr != "" {
			host, port, err := net.SplitHostPort(k.addr)
			if err != nil {
				host, port = k.addr, ""
			}
			labels[promName(attrServerAddress)] = host
			if port != "" {
				labels[promName(attrServerPort)] = port
			}
		}
		if k.status > 0 {
			labels[promName(attrStatusCode)] = strconv.Itoa(k.status)
		}
		if k.errType != "" {
			labels[promName(attrErrorType)] = k.errType
		} else if k.status >= 400 {
			labels[promName(attrErrorType)] = statusString(k.status)
		}
		// Keys that differ only where the labels do not (none today, but
		// cheap to guard) share one series.
		id := labelID(labels)
		dur := h.clients.getOrAdd(id, func() *hotHistogram {
			return &hotHistogram{desc: prometheus.NewDesc("http_client_request_duration_seconds", helpClientDuration, nil, labels)}
		})
		class := statusClass(k.status, k.errType)
		cnt := h.counts.getOrAdd([3]string{k.upstream, k.instance, class}, func() *hotCounter {
			return &hotCounter{desc: prometheus.NewDesc("meshd_requests_total", helpRequests, nil, prometheus.Labels{
				promName(AttrUpstream): k.upstream, promName(AttrInstanceID): k.instance, promName(AttrStatusClass): class,
			})}
		})
		return reqSeries{dur: dur, cnt: cnt}
	})
}

func (h *hotMetrics) server(k srvKey) *hotHistogram {
	return h.srv.getOrAdd(k, func() *hotHistogram {
		labels := prometheus.Labels{promName(AttrUpstream): k.upstream, promName(attrURLScheme): "http"}
		if k.method != "" {
			labels[promName(attrRequestMethod)] = k.method
		}
		if k.status > 0 {
			labels[promName(attrStatusCode)] = strconv.Itoa(k.status)
		}
		if k.status >= 500 {
			labels[promName(attrErrorType)] = statusString(k.status)
		} else if k.status == 0 && k.errType != "" {
			labels[promName(attrErrorType)] = k.errType
		}
		return &hotHistogram{desc: prometheus.NewDesc("http_server_request_duration_seconds", helpServerDuration, nil, labels)}
	})
}

// forget drops the per-request series of upstream: all of them when
// instance is "", else those of that instance. An attempt recorded while
// this runs may be lost; one recorded after it starts the series anew.
func (h *hotMetrics) forget(upstream, instance string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	match := func(u, i string) bool { return u == upstream && (instance == "" || i == instance) }
	h.req.deleteWhere(func(k reqKey, _ reqSeries) bool { return match(k.upstream, k.instance) })
	h.counts.deleteWhere(func(k [3]string, _ *hotCounter) bool { return match(k[0], k[1]) })
	prefix := upstream + "\x00"
	if instance != "" {
		prefix += instance + "\x00"
	}
	h.clients.deleteWhere(func(id string, _ *hotHistogram) bool { return strings.HasPrefix(id, prefix) })
	if instance == "" {
		h.srv.deleteWhere(func(k srvKey, _ *hotHistogram) bool { return k.upstream == upstream })
	}
}

// labelID is a canonical string for a label set.
func labelID(l prometheus.Labels) string {
	var b strings.Builder
	// Upstream and instance first: forget matches on that prefix.
	for _, k := range []string{promName(AttrUpstream), promName(AttrInstanceID), promName(attrRequestMethod), promName(attrServerAddress), promName(attrServerPort), promName(attrStatusCode), promName(attrErrorType)} {
		b.WriteString(l[k])
		b.WriteByte(0)
	}
	return b.String()
}

// Describe sends nothing: the series' label sets differ (a 200 has no
// error_type), so the collector is unchecked, like the OpenTelemetry
// exporter beside it.
func (h *hotMetrics) Describe(chan<- *prometheus.Desc) {}

// Collect sends every series.
func (h *hotMetrics) Collect(ch chan<- prometheus.Metric) {
	h.clients.each(func(s *hotHistogram) { ch <- s.metric() })
	h.srv.each(func(s *hotHistogram) { ch <- s.metric() })
	h.counts.each(func(c *hotCounter) {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(c.n.Load()))
	})
}
