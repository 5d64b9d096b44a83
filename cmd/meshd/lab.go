package main

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/sidecar"
	"github.com/meshd/meshd/sidecar/config"
)

const labSynopsis = `lab [flags]

Compares balancing algorithms on this machine. The lab starts local backends
on 127.0.0.1 (one per -latency value, each with its own service time, error
rate, weight and pool of workers), then, for each algorithm in turn, starts a
fresh sidecar over them (static catalog, access log off), replays the same
load through it (-requests requests from -concurrency clients) and records
which instance answered each request and how long the client waited. A fresh
sidecar and fresh backends per algorithm mean that no algorithm inherits
what an earlier one learned (latency averages, requests in flight).

It prints one row per algorithm: the share of the answered requests each
instance served, the client-measured p50 and p99 latency, the requests the
client saw fail (transport error or a status outside 2xx) and the throughput,
then explains what the figures show, and draws them in an SVG chart.

Each backend serves at most -workers requests at once and queues the rest, as
a server with a fixed pool of workers does, so an instance sent more than it
can take gets slower still. With -workers 0 a backend never slows under load
and p99 only tells whether at least 1% of the requests met the slow instance.

Retries and circuit breakers are off unless -resilience is given, so that the
table shows the algorithms alone. hash keys on the header X-Lab-Key and
ip_hash on X-Forwarded-For (trusted); each request carries one of -keys keys.

Example:
  meshd lab -latency 2ms,2ms,20ms -errors 0,0,0.05 -requests 5000

Flags:`

// labDefaultAlgorithms are compared when -algorithms is not given.
const labDefaultAlgorithms = "round_robin,weighted_round_robin,least_connections,least_response_time,p2c,random,hash"

// labUpstream is the name of the lab's one upstream.
const labUpstream = "lab"

// labInstanceHeader names the header by which a backend says who it is.
const labInstanceHeader = "X-Lab-Instance"

// labKeyHeader carries the key that hash balances on.
const labKeyHeader = "X-Lab-Key"

// labSpec describes one backend.
type labSpec struct {
	name    string
	latency time.Duration
	errRate float64
	weight  int
}

// label is the backend's column heading: name, service time, and error rate
// and weight when they are not the defaults.
func (b labSpec) label() string {
	s := b.name + " " + labDur(b.latency)
	if b.errRate > 0 {
		s += " " + strconv.FormatFloat(b.errRate*100, 'g', 3, 64) + "%err"
	}
	if b.weight != 1 {
		s += " w" + strconv.Itoa(b.weight)
	}
	return s
}

// labOptions are the parsed flags.
type labOptions struct {
	backends    []labSpec
	jitter      float64
	workers     int
	algorithms  []string
	requests    int
	concurrency int
	keys        int
	timeout     time.Duration
	chart       string
	resilience  bool
}

// labRun is what one algorithm did with the load.
type labRun struct {
	algorithm string
	counts    []int // requests answered, per backend
	answered  int   // requests some backend answered
	done      int   // requests completed (answered or failed)
	errors    int   // completed requests the client saw fail
	p50, p99  time.Duration
	elapsed   time.Duration
	cut       bool // stopped by -timeout before every request was sent
}

// share is the percentage of the answered requests that backend i served.
func (r labRun) share(i int) float64 {
	if r.answered == 0 {
		return 0
	}
	return 100 * float64(r.counts[i]) / float64(r.answered)
}

// cmdLab runs the algorithm lab; see labSynopsis. It returns 2 for bad
// flags and 1 when the lab could not run.
func cmdLab(args []string, stdout, stderr io.Writer) int {
	opt, code, ok := labParse(args, stdout, stderr)
	if !ok {
		return code
	}
	fmt.Fprintf(stdout, "meshd lab: %d backends (%s), %d requests from %d clients per algorithm\n",
		len(opt.backends), labBackendSummary(opt), opt.requests, opt.concurrency)
	if opt.resilience {
		fmt.Fprintln(stdout, "retries and circuit breakers: sidecar defaults")
	} else {
		fmt.Fprintln(stdout, "retries and circuit breakers: off (-resilience to turn them on)")
	}
	fmt.Fprintln(stdout, "each algorithm runs on a fresh sidecar and fresh backends")
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	var runs []labRun
	for _, alg := range opt.algorithms {
		r, err := labRunOne(opt, alg, log)
		if err != nil {
			fmt.Fprintf(stderr, "meshd lab: %s: %v\n", alg, err)
			return 1
		}
		runs = append(runs, r)
	}
	fmt.Fprintln(stdout)
	labTable(stdout, opt, runs)
	fmt.Fprintln(stdout)
	labExplain(stdout, opt, runs)
	if opt.chart != "" {
		if err := os.WriteFile(opt.chart, labSVG(opt, runs), 0o644); err != nil {
			fmt.Fprintf(stderr, "meshd lab: chart: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "\nchart written to %s\n", opt.chart)
	}
	return 0
}

// labParse reads and checks the flags; ok is false when the command stops
// with code.
func labParse(args []string, stdout, stderr io.Writer) (labOptions, int, bool) {
	fs := newFlags("lab", labSynopsis, stderr)
	latency := fs.String("latency", "2ms,2ms,20ms", "service time of each backend, comma-separated; one backend per value (at most 26)")
	errs := fs.String("errors", "0", "fraction of requests each backend answers with 503, comma-separated (0 to 1); one value applies to all")
	weights := fs.String("weights", "1", "weight of each backend in the static catalog, comma-separated (1 to 1000); one value applies to all")
	jitter := fs.Float64("jitter", 0.1, "each service time is drawn uniformly from latency×(1±jitter), 0 to 1")
	workers := fs.Int("workers", 4, "requests each backend serves at once; the others wait in its queue (0 = no limit)")
	algs := fs.String("algorithms", labDefaultAlgorithms, "algorithms to compare, comma-separated, in this order (known: "+strings.Join(balance.Names(), ", ")+")")
	requests := fs.Int("requests", 2000, "requests sent through each algorithm's sidecar (1 to 1000000)")
	concurrency := fs.Int("concurrency", 16, "concurrent clients, each sending one request after the other (1 to 1024)")
	keys := fs.Int("keys", 100, "distinct keys (users) the requests cycle through, for hash and ip_hash")
	timeout := fs.Duration("timeout", time.Minute, "time limit for each algorithm's load; requests not sent by then are left out and the row is marked")
	chart := fs.String("chart", "lab.svg", "write an SVG chart of the results to this file (\"\" for none)")
	resil := fs.Bool("resilience", false, "keep the sidecar's default retries and circuit breakers (off by default, to show the algorithms alone)")
	if code, ok := parseFlags(fs, args, stdout); !ok {
		return labOptions{}, code, false
	}
	bad := func(format string, a ...any) (labOptions, int, bool) {
		fmt.Fprintf(stderr, "meshd lab: "+format+"\nRun 'meshd lab --help' for the flags.\n", a...)
		return labOptions{}, 2, false
	}

	lats := labSplit(*latency)
	if len(lats) == 0 || len(lats) > 26 {
		return bad("-latency: want 1 to 26 comma-separated durations, have %q", *latency)
	}
	errRates := labSplit(*errs)
	if len(errRates) != 1 && len(errRates) != len(lats) {
		return bad("-errors: want one value or %d (one per backend), have %d", len(lats), len(errRates))
	}
	ws := labSplit(*weights)
	if len(ws) != 1 && len(ws) != len(lats) {
		return bad("-weights: want one value or %d (one per backend), have %d", len(lats), len(ws))
	}
	opt := labOptions{
		jitter: *jitter, workers: *workers, requests: *requests, concurrency: *concurrency,
		keys: *keys, timeout: *timeout, chart: *chart, resilience: *resil,
	}
	for i, l := range lats {
		d, err := time.ParseDuration(l)
		if err != nil || d < 0 || d > time.Minute {
			return bad("-latency: %q is not a duration from 0 to 1m", l)
		}
		e := errRates[min(i, len(errRates)-1)]
		er, err := strconv.ParseFloat(e, 64)
		if err != nil || !(er >= 0 && er <= 1) {
			return bad("-errors: %q is not a fraction from 0 to 1", e)
		}
		w := ws[min(i, len(ws)-1)]
		wt, err := strconv.Atoi(w)
		if err != nil || wt < 1 || wt > 1000 {
			return bad("-weights: %q is not a whole number from 1 to 1000", w)
		}
		opt.backends = append(opt.backends, labSpec{name: "b" + strconv.Itoa(i+1), latency: d, errRate: er, weight: wt})
	}
	if !(opt.jitter >= 0 && opt.jitter <= 1) {
		return bad("-jitter: want 0 to 1, have %v", opt.jitter)
	}
	if opt.workers < 0 || opt.workers > 100000 {
		return bad("-workers: want 0 to 100000, have %d", opt.workers)
	}
	if opt.requests < 1 || opt.requests > 1000000 {
		return bad("-requests: want 1 to 1000000, have %d", opt.requests)
	}
	if opt.concurrency < 1 || opt.concurrency > 1024 {
		return bad("-concurrency: want 1 to 1024, have %d", opt.concurrency)
	}
	if opt.keys < 1 || opt.keys > 1<<24 {
		return bad("-keys: want 1 to 16777216, have %d", opt.keys)
	}
	if opt.timeout <= 0 {
		return bad("-timeout: want a positive duration, have %v", opt.timeout)
	}
	for _, a := range labSplit(*algs) {
		bc := balance.Config{Algorithm: a}
		if a == "hash" {
			bc.Key = "header:" + labKeyHeader
		}
		if _, err := balance.New(bc); err != nil {
			return bad("-algorithms: %v", err)
		}
		if slices.Contains(opt.algorithms, a) {
			return bad("-algorithms: %s is listed twice", a)
		}
		opt.algorithms = append(opt.algorithms, a)
	}
	if len(opt.algorithms) == 0 {
		return bad("-algorithms: want at least one algorithm")
	}
	return opt, 0, true
}

// labSplit splits a comma-separated list, dropping blanks.
func labSplit(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func labBackendSummary(opt labOptions) string {
	parts := make([]string, len(opt.backends))
	for i, b := range opt.backends {
		parts[i] = b.label()
	}
	s := strings.Join(parts, ", ")
	if opt.jitter > 0 {
		s += fmt.Sprintf("; ±%g%% jitter", opt.jitter*100)
	}
	if opt.workers > 0 {
		s += fmt.Sprintf("; %d workers each", opt.workers)
	} else {
		s += "; no worker limit"
	}
	return s
}

// labBackend is one running backend.
type labBackend struct {
	spec    labSpec
	jitter  float64
	workers chan struct{} // nil: no limit
	seen    atomic.Int64
	srv     *http.Server
	addr    string
}

// ServeHTTP waits for a free worker, takes the service time, and answers
// 503 for its share of errors (every request whose ordinal crosses the next
// multiple of 1/errRate, so the rate is exact and the same in every run),
// else 200.
func (b *labBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := b.seen.Add(1)
	if b.workers != nil {
		select {
		case b.workers <- struct{}{}:
		case <-r.Context().Done():
			return
		}
	}
	d := b.spec.latency
	if b.jitter > 0 && d > 0 {
		d = time.Duration(float64(d) * (1 + b.jitter*(2*rand.Float64()-1)))
	}
	t := time.NewTimer(d)
	select {
	case <-t.C:
	case <-r.Context().Done():
		t.Stop()
	}
	if b.workers != nil {
		<-b.workers
	}
	w.Header().Set(labInstanceHeader, b.spec.name)
	rate := b.spec.errRate
	if math.Floor(float64(n)*rate) > math.Floor(float64(n-1)*rate) {
		http.Error(w, b.spec.name+": injected error", http.StatusServiceUnavailable)
		return
	}
	io.WriteString(w, b.spec.name+"\n")
}

// labStartBackends starts one server per spec on a free loopback port.
func labStartBackends(opt labOptions) ([]*labBackend, error) {
	var bs []*labBackend
	for _, sp := range opt.backends {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			labStopBackends(bs)
			return nil, fmt.Errorf("backend %s: %w", sp.name, err)
		}
		b := &labBackend{spec: sp, jitter: opt.jitter, addr: ln.Addr().String()}
		if opt.workers > 0 {
			b.workers = make(chan struct{}, opt.workers)
		}
		b.srv = &http.Server{Handler: b, ReadHeaderTimeout: 10 * time.Second}
		go b.srv.Serve(ln)
		bs = append(bs, b)
	}
	return bs, nil
}

func labStopBackends(bs []*labBackend) {
	for _, b := range bs {
		b.srv.Close()
	}
}

// labConfig is the sidecar config for one algorithm over the backends.
func labConfig(opt labOptions, alg string, bs []*labBackend) (*config.Config, error) {
	var y strings.Builder
	y.WriteString("listen: {outbound: 127.0.0.1:0, admin: 127.0.0.1:0}\n")
	y.WriteString("log: {access: false, level: error}\n")
	y.WriteString("telemetry: {traces: none, metrics: none}\n")
	y.WriteString("proxy: {trust_forwarded_for: true}\n")
	y.WriteString("discovery:\n  static:\n    " + labUpstream + ":\n")
	for _, b := range bs {
		fmt.Fprintf(&y, "      - {id: %s, address: %q, weight: %d}\n", b.spec.name, b.addr, b.spec.weight)
	}
	if alg == "hash" {
		fmt.Fprintf(&y, "upstreams:\n  %s:\n    balance: {algorithm: %s, key: %q}\n", labUpstream, alg, "header:"+labKeyHeader)
	} else {
		fmt.Fprintf(&y, "upstreams:\n  %s:\n    balance: {algorithm: %s}\n", labUpstream, alg)
	}
	if !opt.resilience {
		y.WriteString("    retry: {disabled: true}\n    breaker: {disabled: true}\n")
	}
	cfg, err := config.Parse("lab.yaml", []byte(y.String()))
	if err != nil {
		return nil, fmt.Errorf("sidecar config: %w", err)
	}
	return cfg, nil
}

// labRunOne runs the load through a fresh sidecar and fresh backends.
func labRunOne(opt labOptions, alg string, log *slog.Logger) (labRun, error) {
	bs, err := labStartBackends(opt)
	if err != nil {
		return labRun{}, err
	}
	defer labStopBackends(bs)
	cfg, err := labConfig(opt, alg, bs)
	if err != nil {
		return labRun{}, err
	}
	sc, err := sidecar.New(cfg, log, nil)
	if err != nil {
		return labRun{}, fmt.Errorf("sidecar: %w", err)
	}
	if err := sc.Start(); err != nil {
		return labRun{}, fmt.Errorf("sidecar: %w", err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		sc.Shutdown(ctx)
	}()
	if err := labAwaitInstances(sc, len(bs)); err != nil {
		return labRun{}, err
	}
	return labLoad(opt, alg, sc, bs)
}

// labAwaitInstances polls until the sidecar's upstream has every instance
// (the static catalog is delivered asynchronously).
func labAwaitInstances(sc *sidecar.Sidecar, n int) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, u := range sc.Status() {
			if u.Name == labUpstream && u.Ready && len(u.Instances) == n {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return errors.New("sidecar: upstream lab not ready after 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// labSample is one request as the client saw it.
type labSample struct {
	done     bool
	instance int // backend index, -1 when none answered
	failed   bool
	latency  time.Duration
}

// labLoad sends opt.requests requests from opt.concurrency clients through
// the sidecar and summarises them.
func labLoad(opt labOptions, alg string, sc *sidecar.Sidecar, bs []*labBackend) (labRun, error) {
	proxy, err := url.Parse("http://" + sc.Addr("outbound"))
	if err != nil {
		return labRun{}, fmt.Errorf("sidecar address: %w", err)
	}
	tr := &http.Transport{Proxy: http.ProxyURL(proxy), MaxIdleConnsPerHost: opt.concurrency, DisableCompression: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	index := make(map[string]int, len(bs))
	for i, b := range bs {
		index[b.spec.name] = i
	}
	ctx, cancel := context.WithTimeout(context.Background(), opt.timeout)
	defer cancel()
	samples := make([]labSample, opt.requests)
	var next atomic.Int64
	var wg sync.WaitGroup
	t0 := time.Now()
	for range opt.concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= opt.requests || ctx.Err() != nil {
					return
				}
				samples[i] = labDo(ctx, client, i%opt.keys, index)
			}
		}()
	}
	wg.Wait()
	run := labRun{algorithm: alg, counts: make([]int, len(bs)), elapsed: time.Since(t0)}
	var lat []time.Duration
	for _, s := range samples {
		if !s.done {
			run.cut = true
			continue
		}
		run.done++
		lat = append(lat, s.latency)
		if s.failed {
			run.errors++
		}
		if s.instance >= 0 {
			run.counts[s.instance]++
			run.answered++
		}
	}
	slices.Sort(lat)
	run.p50, run.p99 = labPercentile(lat, 50), labPercentile(lat, 99)
	return run, nil
}

// labDo sends one request with key k and times it. A request cut off by the
// load's deadline is not done.
func labDo(ctx context.Context, c *http.Client, k int, index map[string]int) labSample {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+labUpstream+"/", nil)
	if err != nil {
		return labSample{done: true, instance: -1, failed: true}
	}
	req.Header.Set(labKeyHeader, "user-"+strconv.Itoa(k))
	req.Header.Set("X-Forwarded-For", fmt.Sprintf("10.%d.%d.%d", k>>16&255, k>>8&255, k&255))
	t0 := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return labSample{}
		}
		return labSample{done: true, instance: -1, failed: true, latency: time.Since(t0)}
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	s := labSample{done: true, instance: -1, latency: time.Since(t0)}
	if err != nil && ctx.Err() != nil {
		return labSample{}
	}
	if i, ok := index[resp.Header.Get(labInstanceHeader)]; ok {
		s.instance = i
	}
	s.failed = err != nil || resp.StatusCode < 200 || resp.StatusCode > 299
	return s
}

// labPercentile is the nearest-rank p-th percentile of sorted values.
func labPercentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[min(max(rank, 0), len(sorted)-1)]
}

// labDur prints a duration briefly: 2ms, 1.5ms, 250µs.
func labDur(d time.Duration) string {
	switch {
	case d >= time.Second:
		return strconv.FormatFloat(d.Seconds(), 'g', 3, 64) + "s"
	case d >= time.Millisecond:
		return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'g', 3, 64) + "ms"
	default:
		return strconv.FormatFloat(float64(d)/float64(time.Microsecond), 'g', 3, 64) + "µs"
	}
}

func labMS(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 1, 64) + "ms"
}

// labTable prints one row per algorithm.
func labTable(w io.Writer, opt labOptions, runs []labRun) {
	// Right-aligned columns; the names are padded so that they read left-aligned.
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	nameW := len("algorithm")
	for _, r := range runs {
		nameW = max(nameW, len(r.algorithm)+1)
	}
	fmt.Fprintf(tw, "%-*s\t", nameW, "algorithm")
	for _, b := range opt.backends {
		fmt.Fprintf(tw, "%s\t", b.label())
	}
	fmt.Fprint(tw, "p50\tp99\terrors\treq/s\t\n")
	cut := false
	for _, r := range runs {
		name := r.algorithm
		if r.cut {
			name += "*"
			cut = true
		}
		fmt.Fprintf(tw, "%-*s\t", nameW, name)
		for i := range opt.backends {
			fmt.Fprintf(tw, "%.1f%%\t", r.share(i))
		}
		rate := 0.0
		if r.elapsed > 0 {
			rate = float64(r.done) / r.elapsed.Seconds()
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%.0f\t\n", labMS(r.p50), labMS(r.p99), r.errors, rate)
	}
	tw.Flush()
	fmt.Fprintln(w, "share: % of the requests an instance answered; p50, p99: latency seen by the client;")
	fmt.Fprintln(w, "errors: requests the client saw fail (no response or a status outside 2xx).")
	if cut {
		fmt.Fprintf(w, "* stopped by -timeout %v before every request was sent; figures cover the requests that completed.\n", opt.timeout)
	}
}

// labExplain prints what the figures show, naming the slowest backend.
func labExplain(w io.Writer, opt labOptions, runs []labRun) {
	fmt.Fprintln(w, "What this shows:")
	fmt.Fprintln(w, labWrap(`Every algorithm got the same requests from the same clients; only the
choice of instance differed. round_robin, weighted_round_robin and random
split the requests by count (or weight) and never look at how an instance is
doing, so a slow instance still gets its full share: its workers fill up,
requests queue behind them, and the app's tail latency (p99) becomes that
queue. least_connections and p2c look at requests in flight: a slow instance
holds on to its requests longer, so it shows more of them in flight and is
picked less, without any clock (p2c compares just two random instances, which
is enough to steer around it). least_response_time also measures each
instance's recent response time and multiplies it by the requests in flight,
so an instance ten times slower must be ten times less busy to win: it gets a
sliver, enough to notice when it recovers. With clients that wait for each
answer before sending the next, as here, a queue at one instance also holds
back the clients stuck in it, which is why req/s falls with p99. hash and ip_hash put each key on a
fixed instance whatever the load, so their shares follow how the keys happen
to fall (try -keys), not speed. Without -resilience the sidecar neither
retries nor ejects failing instances, so errors count what each algorithm
sent to them; with it, retries hide most of them from the app.`, 78))
	equal := true
	for _, b := range opt.backends {
		equal = equal && b.weight == opt.backends[0].weight
	}
	if equal && slices.ContainsFunc(runs, func(r labRun) bool { return strings.HasPrefix(r.algorithm, "weighted_") }) {
		fmt.Fprintln(w)
		fmt.Fprintln(w, labWrap(`All weights are equal, so the weighted algorithms behave like their
unweighted twins; give the fast instances more weight (for example -weights
3,3,1) to see weighted_round_robin send less to the slow one, though never in
response to how it is doing.`, 78))
	}
	slow, fast := 0, 0
	for i, b := range opt.backends {
		if b.latency > opt.backends[slow].latency {
			slow = i
		}
		if b.latency < opt.backends[fast].latency {
			fast = i
		}
	}
	if len(opt.backends) < 2 || opt.backends[slow].latency == opt.backends[fast].latency {
		return
	}
	parts := make([]string, len(runs))
	for i, r := range runs {
		parts[i] = fmt.Sprintf("%s %.1f%%", r.algorithm, r.share(slow))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, labWrap(fmt.Sprintf("Here the slowest instance, %s (%s), served: %s. A split by weight would give it %.1f%%.",
		opt.backends[slow].name, labDur(opt.backends[slow].latency), strings.Join(parts, ", "), labWeightShare(opt, slow)), 78))
}

// labWeightShare is backend i's share of the total weight, in percent.
func labWeightShare(opt labOptions, i int) float64 {
	sum := 0
	for _, b := range opt.backends {
		sum += b.weight
	}
	return 100 * float64(opt.backends[i].weight) / float64(sum)
}

// labWrap refills text to lines of at most width columns.
func labWrap(text string, width int) string {
	var b strings.Builder
	n := 0
	for _, word := range strings.Fields(text) {
		switch {
		case n == 0:
		case n+1+len([]rune(word)) > width:
			b.WriteByte('\n')
			n = 0
		default:
			b.WriteByte(' ')
			n++
		}
		b.WriteString(word)
		n += len([]rune(word))
	}
	return b.String()
}

// labColors are the bar colours of the backends, in turn.
var labColors = []string{"#4e79a7", "#59a14f", "#e15759", "#f28e2b", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"}

// labSVG draws two panels: grouped bars of each backend's share per
// algorithm, and each algorithm's p50 and p99. Every bar is a rect with
// class "share", "p50" or "p99" and data-algorithm (and data-instance for
// shares), and a title for tooltips.
func labSVG(opt labOptions, runs []labRun) []byte {
	const (
		left, right, top = 64, 24, 76
		panelH           = 200
		gapH             = 90 // between the panels: labels and the second title
		barW             = 16
	)
	nb := len(opt.backends)
	longest := 0
	for _, r := range runs {
		longest = max(longest, len(r.algorithm))
	}
	groupW := max(nb*barW+32, longest*7+16, 2*barW+40)
	plotW := groupW * len(runs)
	width := left + plotW + right
	legendY := top + panelH + 36
	p2Top := top + panelH + gapH
	height := p2Top + panelH + 48

	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect x="0" y="0" width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(&b, `<text x="%d" y="20" font-size="14" font-weight="bold">%s</text>`+"\n", left, labEsc(fmt.Sprintf("meshd lab: %d requests from %d clients per algorithm", opt.requests, opt.concurrency)))
	fmt.Fprintf(&b, `<text x="%d" y="38" fill="#555">%s</text>`+"\n", left, labEsc(labBackendSummary(opt)))

	// Panel 1: share per instance.
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">share of requests per instance (%%)</text>`+"\n", left, top-4)
	labAxis(&b, left, top, plotW, panelH, 100, 25, "%")
	for g, r := range runs {
		x0 := left + g*groupW + (groupW-nb*barW)/2
		for i, sp := range opt.backends {
			v := r.share(i)
			h := v / 100 * panelH
			x := x0 + i*barW
			fmt.Fprintf(&b, `<rect class="share" data-algorithm="%s" data-instance="%s" x="%d" y="%.1f" width="%d" height="%.1f" fill="%s"><title>%s</title></rect>`+"\n",
				labEsc(r.algorithm), labEsc(sp.name), x, float64(top+panelH)-h, barW-2, h, labColors[i%len(labColors)],
				labEsc(fmt.Sprintf("%s, %s: %.1f%%", r.algorithm, sp.label(), v)))
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">%s</text>`+"\n", left+g*groupW+groupW/2, top+panelH+16, labEsc(r.algorithm))
	}
	equal := true
	for _, sp := range opt.backends {
		equal = equal && sp.weight == opt.backends[0].weight
	}
	if nb > 0 && equal {
		even := float64(top+panelH) - panelH/float64(nb)
		fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#333" stroke-dasharray="4 3"/>`+"\n", left, left+plotW, even, even)
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end" fill="#333" font-size="10">even split</text>`+"\n", left+plotW, even-3)
	}
	for i, sp := range opt.backends {
		x := left + i*150
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/><text x="%d" y="%d">%s</text>`+"\n",
			x, legendY-10, labColors[i%len(labColors)], x+16, legendY, labEsc(sp.label()))
	}

	// Panel 2: p50 and p99 per algorithm.
	var maxMS float64
	for _, r := range runs {
		maxMS = max(maxMS, float64(r.p99)/float64(time.Millisecond))
	}
	top2, step := labNiceScale(maxMS)
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">client latency (ms): p50 light, p99 dark</text>`+"\n", left, p2Top-4)
	labAxis(&b, left, p2Top, plotW, panelH, top2, step, "")
	for g, r := range runs {
		x0 := left + g*groupW + (groupW-2*barW)/2
		for k, q := range []struct {
			class string
			d     time.Duration
			fill  string
		}{{"p50", r.p50, "#a0b8d8"}, {"p99", r.p99, "#2b4c7e"}} {
			ms := float64(q.d) / float64(time.Millisecond)
			h := ms / top2 * panelH
			x := x0 + k*barW
			fmt.Fprintf(&b, `<rect class="%s" data-algorithm="%s" x="%d" y="%.1f" width="%d" height="%.1f" fill="%s"><title>%s</title></rect>`+"\n",
				q.class, labEsc(r.algorithm), x, float64(p2Top+panelH)-h, barW-2, h, q.fill,
				labEsc(fmt.Sprintf("%s %s: %s", r.algorithm, q.class, labMS(q.d))))
		}
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="middle" font-size="10">%s</text>`+"\n",
			x0+barW+barW/2, float64(p2Top+panelH)-float64(r.p99)/float64(time.Millisecond)/top2*panelH-3, labEsc(labMS(r.p99)))
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">%s</text>`+"\n", left+g*groupW+groupW/2, p2Top+panelH+16, labEsc(r.algorithm))
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}

// labAxis draws a panel's frame, horizontal grid lines every step up to
// top, and their labels.
func labAxis(b *bytes.Buffer, x, y, w, h int, top, step float64, unit string) {
	for v := 0.0; v <= top+step/1000; v += step {
		yy := float64(y+h) - v/top*float64(h)
		fmt.Fprintf(b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", x, x+w, yy, yy)
		fmt.Fprintf(b, `<text x="%d" y="%.1f" text-anchor="end" fill="#555" font-size="10">%s%s</text>`+"\n", x-6, yy+3, strconv.FormatFloat(v, 'g', 4, 64), unit)
	}
	fmt.Fprintf(b, `<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="#333"/>`+"\n", x, x+w, y+h, y+h)
	fmt.Fprintf(b, `<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="#333"/>`+"\n", x, x, y, y+h)
}

// labNiceScale returns an axis top at or above v and a grid step, both
// round numbers (1, 2 or 5 times a power of ten), with 4 to 10 steps.
func labNiceScale(v float64) (top, step float64) {
	if !(v > 0) {
		return 1, 0.25
	}
	step = math.Pow(10, math.Floor(math.Log10(v/4)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v/(step*m) <= 10 {
			step *= m
			break
		}
	}
	top = math.Ceil(v/step) * step
	return top, step
}

// labEsc escapes text for XML content and attribute values.
func labEsc(s string) string {
	var b strings.Builder
	xml.EscapeText(&b, []byte(s))
	return b.String()
}
