// Command loadgen sends the walkthrough's traffic and then asks Jaeger what
// the mesh recorded.
//
// It sends -n GET requests to -url spread evenly over -duration, at most
// -concurrency at a time, and prints how they were answered and by which
// backend. With -jaeger it then reads Jaeger's query API: it waits until
// every service in -services has reported spans and every request sent has a
// trace that reaches all of them, prints where the sidecars routed the
// requests (from their span attributes) and one trace as a tree, and exits 1
// when traces are missing.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	target := flag.String("url", "http://127.0.0.1:15006/", "where to send the requests (the frontend's sidecar, inbound)")
	n := flag.Int("n", 200, "number of requests")
	duration := flag.Duration("duration", 20*time.Second, "time the requests are spread over")
	concurrency := flag.Int("concurrency", 4, "requests in flight at most")
	wait := flag.Duration("wait", 30*time.Second, "first wait this long at most for -url to answer 200")
	jaeger := flag.String("jaeger", "", "Jaeger query URL (http://127.0.0.1:16686); when set, check the traces after the traffic")
	services := flag.String("services", "frontend-sidecar,backend-sidecar", "services every trace must reach; the first is where traces start")
	checkTimeout := flag.Duration("check-timeout", 30*time.Second, "how long to wait for Jaeger to have every trace")
	flag.Parse()
	if *n < 1 || *concurrency < 1 || *duration < 0 {
		fmt.Fprintln(os.Stderr, "loadgen: -n and -concurrency must be at least 1, -duration not negative")
		os.Exit(2)
	}

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: *concurrency}}
	if *wait > 0 {
		if err := waitReady(client, *target, *wait); err != nil {
			fmt.Fprintf(os.Stderr, "loadgen: %s is not answering: %v\n", *target, err)
			os.Exit(1)
		}
	}
	start := time.Now()
	res := send(client, *target, *n, *duration, *concurrency)
	res.print(os.Stdout, *target, time.Since(start))
	if *jaeger == "" {
		return
	}
	want := strings.Split(*services, ",")
	ctx, cancel := context.WithTimeout(context.Background(), *checkTimeout)
	defer cancel()
	if err := check(ctx, os.Stdout, strings.TrimRight(*jaeger, "/"), want, start, *n); err != nil {
		fmt.Fprintf(os.Stderr, "loadgen: trace check failed: %v\n", err)
		os.Exit(1)
	}
}

// waitReady polls target until it answers 200 or timeout passes.
func waitReady(c *http.Client, target string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		resp, err := c.Get(target)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = errors.New(resp.Status)
		}
		last = err
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("after %v: %w", timeout, last)
}

type results struct {
	mu       sync.Mutex
	statuses map[string]int
	backends map[string]int
	lat      []time.Duration
}

// send issues n requests, one every duration/n, with at most conc in flight.
func send(c *http.Client, target string, n int, duration time.Duration, conc int) *results {
	r := &results{statuses: map[string]int{}, backends: map[string]int{}}
	jobs := make(chan struct{})
	var wg sync.WaitGroup
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				t0 := time.Now()
				resp, err := c.Get(target)
				status, backend := "error", ""
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					status, backend = strconv.Itoa(resp.StatusCode), resp.Header.Get("X-Backend")
				}
				r.mu.Lock()
				r.statuses[status]++
				if backend != "" {
					r.backends[backend]++
				}
				r.lat = append(r.lat, time.Since(t0))
				r.mu.Unlock()
			}
		}()
	}
	every := duration / time.Duration(n)
	next := time.Now()
	for range n {
		time.Sleep(time.Until(next))
		jobs <- struct{}{}
		next = next.Add(every)
	}
	close(jobs)
	wg.Wait()
	return r
}

func (r *results) print(w io.Writer, target string, took time.Duration) {
	fmt.Fprintf(w, "sent %d requests to %s in %v\n", len(r.lat), target, took.Round(100*time.Millisecond))
	fmt.Fprintf(w, "  answers:  %s\n", counts(r.statuses))
	fmt.Fprintf(w, "  answered by (X-Backend): %s\n", counts(r.backends))
	if len(r.lat) > 0 {
		slices.Sort(r.lat)
		q := func(p float64) time.Duration {
			return r.lat[int(p*float64(len(r.lat)-1))].Round(100 * time.Microsecond)
		}
		fmt.Fprintf(w, "  latency:  p50 %v, p95 %v, max %v\n", q(0.5), q(0.95), q(1))
	}
}

func counts(m map[string]int) string {
	if len(m) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s ×%d", k, m[k])
	}
	return strings.Join(parts, ", ")
}

// Jaeger's query API (the JSON its UI reads).
type apiTrace struct {
	TraceID   string                `json:"traceID"`
	Spans     []apiSpan             `json:"spans"`
	Processes map[string]apiProcess `json:"processes"`
}

type apiSpan struct {
	SpanID        string `json:"spanID"`
	OperationName string `json:"operationName"`
	References    []struct {
		RefType string `json:"refType"`
		SpanID  string `json:"spanID"`
	} `json:"references"`
	StartTime int64   `json:"startTime"` // µs since the epoch
	Duration  int64   `json:"duration"`  // µs
	Tags      []apiKV `json:"tags"`
	Logs      []struct {
		Fields []apiKV `json:"fields"`
	} `json:"logs"`
	ProcessID string `json:"processID"`
}

type apiKV struct {
	Key   string `json:"key"`
	Value any    `json:"value"`
}

type apiProcess struct {
	ServiceName string `json:"serviceName"`
}

func getJSON(ctx context.Context, u string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("GET %s: %s: %s", u, resp.Status, strings.TrimSpace(string(body)))
	}
	dec := json.NewDecoder(resp.Body)
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	return nil
}

// check waits until Jaeger knows every service and holds at least n traces
// that started at services[0] since start and reach every service, then
// prints what they say.
func check(ctx context.Context, w io.Writer, base string, services []string, start time.Time, n int) error {
	var have []string
	err := poll(ctx, func() error {
		var resp struct {
			Data []string `json:"data"`
		}
		if err := getJSON(ctx, base+"/api/services", &resp); err != nil {
			return err
		}
		have = resp.Data
		for _, s := range services {
			if !slices.Contains(have, s) {
				return fmt.Errorf("jaeger knows services %v, not yet %s", have, s)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	var traces []apiTrace
	var incomplete int
	err = poll(ctx, func() error {
		q := url.Values{
			"service":  {services[0]},
			"start":    {strconv.FormatInt(start.UnixMicro(), 10)},
			"end":      {strconv.FormatInt(time.Now().Add(time.Minute).UnixMicro(), 10)},
			"limit":    {strconv.Itoa(2*n + 100)},
			"lookback": {"custom"},
		}
		var resp struct {
			Data []apiTrace `json:"data"`
		}
		if err := getJSON(ctx, base+"/api/traces?"+q.Encode(), &resp); err != nil {
			return err
		}
		traces, incomplete = resp.Data, 0
		for _, t := range traces {
			if !reaches(t, services) {
				incomplete++
			}
		}
		if len(traces) < n || incomplete > 0 {
			return fmt.Errorf("%d traces from %s since the traffic started (want %d), %d of them not reaching all of %v yet",
				len(traces), services[0], n, incomplete, services)
		}
		return nil
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\nJaeger (%s) has %d traces that start at %s since the traffic began (%d requests were sent), and each reaches %s.\n",
		base, len(traces), services[0], n, strings.Join(services[1:], ", "))
	summarize(w, traces, services[0])
	best := pickSample(traces)
	fmt.Fprintf(w, "\nOne of them (%d spans; in the UI: %s/trace/%s):\n", len(best.Spans), base, best.TraceID)
	printTree(w, best)
	return nil
}

func poll(ctx context.Context, f func() error) error {
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func reaches(t apiTrace, services []string) bool {
	seen := map[string]bool{}
	for _, s := range t.Spans {
		seen[t.Processes[s.ProcessID].ServiceName] = true
	}
	for _, s := range services {
		if !seen[s] {
			return false
		}
	}
	return true
}

func tags(kvs []apiKV) map[string]string {
	m := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		m[kv.Key] = fmt.Sprint(kv.Value)
	}
	return m
}

// summarize tells, from the client spans of the entry service's sidecar,
// where requests to each upstream went and why.
func summarize(w io.Writer, traces []apiTrace, service string) {
	type key struct{ upstream, instance string }
	picks := map[key]int{}
	reasons := map[string]map[string]int{}
	algos := map[string]string{}
	retries, failed := 0, 0
	for _, t := range traces {
		for _, s := range t.Spans {
			tg := tags(s.Tags)
			up := tg["meshd.upstream"]
			if t.Processes[s.ProcessID].ServiceName != service || tg["span.kind"] != "client" || up == "" || up == "inbound" {
				continue
			}
			picks[key{up, tg["meshd.instance.id"]}]++
			algos[up] = tg["meshd.lb.algorithm"]
			if reasons[up] == nil {
				reasons[up] = map[string]int{}
			}
			if r := tg["meshd.lb.reason"]; r != "" {
				reasons[up][r]++
			}
			if a, _ := strconv.Atoi(tg["meshd.attempt"]); a > 1 {
				retries++
			}
			if tg["error"] == "true" {
				failed++
			}
		}
	}
	keys := make([]key, 0, len(picks))
	for k := range picks {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].upstream != keys[j].upstream {
			return keys[i].upstream < keys[j].upstream
		}
		return keys[i].instance < keys[j].instance
	})
	fmt.Fprintf(w, "Attempts %s sent, by upstream and instance (meshd.upstream, meshd.instance.id):\n", service)
	for _, k := range keys {
		fmt.Fprintf(w, "  %-10s %-28s %4d  (%s)\n", k.upstream, k.instance, picks[k], algos[k.upstream])
	}
	for up, m := range reasons {
		fmt.Fprintf(w, "  why %s instances were chosen (meshd.lb.reason): %s\n", up, counts(m))
	}
	fmt.Fprintf(w, "  attempts that failed: %d; retries (meshd.attempt > 1): %d\n", failed, retries)
}

// pickSample prefers a trace with a retry in it, then one that went to the
// least chosen instance, then the longest one.
func pickSample(traces []apiTrace) apiTrace {
	picked := map[string]int{}
	for _, t := range traces {
		for _, s := range t.Spans {
			if id := tags(s.Tags)["meshd.instance.id"]; id != "" {
				picked[id]++
			}
		}
	}
	best, bestScore := traces[0], -1
	for _, t := range traces {
		score := len(t.Spans)
		rare := 0
		for _, s := range t.Spans {
			tg := tags(s.Tags)
			if a, _ := strconv.Atoi(tg["meshd.attempt"]); a > 1 {
				score += 1000
			}
			if n := picked[tg["meshd.instance.id"]]; n > 0 && n*4 < len(traces) {
				rare = 100
			}
		}
		if score += rare; score > bestScore {
			best, bestScore = t, score
		}
	}
	return best
}

// printTree prints a trace's spans nested under their parents.
func printTree(w io.Writer, t apiTrace) {
	ids := map[string]bool{}
	for _, s := range t.Spans {
		ids[s.SpanID] = true
	}
	children := map[string][]apiSpan{}
	var roots []apiSpan
	for _, s := range t.Spans {
		parent := ""
		for _, r := range s.References {
			if r.RefType == "CHILD_OF" && ids[r.SpanID] {
				parent = r.SpanID
			}
		}
		if parent == "" {
			roots = append(roots, s)
		} else {
			children[parent] = append(children[parent], s)
		}
	}
	byStart := func(ss []apiSpan) {
		sort.Slice(ss, func(i, j int) bool { return ss[i].StartTime < ss[j].StartTime })
	}
	byStart(roots)
	var walk func(s apiSpan, prefix string, last bool, top bool)
	walk = func(s apiSpan, prefix string, last bool, top bool) {
		branch, next := "", ""
		if !top {
			branch, next = "├─ ", "│  "
			if last {
				branch, next = "└─ ", "   "
			}
		}
		fmt.Fprintf(w, "%s%s%s\n", prefix, branch, describe(t, s))
		for _, l := range s.Logs {
			f := tags(l.Fields)
			name := f["event"]
			delete(f, "event")
			fmt.Fprintf(w, "%s%s   · event %s %s\n", prefix, next, name, sortedPairs(f))
		}
		kids := children[s.SpanID]
		byStart(kids)
		for i, k := range kids {
			walk(k, prefix+next, i == len(kids)-1, false)
		}
	}
	for _, r := range roots {
		walk(r, "  ", true, true)
	}
}

func describe(t apiTrace, s apiSpan) string {
	tg := tags(s.Tags)
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s %q", t.Processes[s.ProcessID].ServiceName, tg["span.kind"], s.OperationName)
	if st := tg["http.response.status_code"]; st != "" {
		b.WriteString(" " + st)
	}
	fmt.Fprintf(&b, " %v", (time.Duration(s.Duration) * time.Microsecond).Round(10*time.Microsecond))
	if up := tg["meshd.upstream"]; up != "" {
		fmt.Fprintf(&b, " → %s instance %s at %s", up, tg["meshd.instance.id"], tg["meshd.instance.address"])
		var why []string
		for _, k := range []string{"meshd.lb.algorithm", "meshd.lb.candidates", "meshd.lb.reason", "meshd.lb.score", "meshd.breaker.state", "meshd.attempt"} {
			if v, ok := tg[k]; ok {
				why = append(why, strings.TrimPrefix(strings.TrimPrefix(k, "meshd.lb."), "meshd.")+"="+strconv.Quote(v))
			}
		}
		fmt.Fprintf(&b, " [%s]", strings.Join(why, " "))
	}
	if e := tg["error.type"]; e != "" {
		b.WriteString(" error.type=" + e)
	}
	return b.String()
}

func sortedPairs(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + m[k]
	}
	return strings.Join(parts, " ")
}
