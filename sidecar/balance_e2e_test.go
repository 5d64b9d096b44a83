package sidecar

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// These tests send real traffic through the sidecar to real loopback
// backends and check what each balancing algorithm does with it, as the app
// sees it: which instance answered and how long the app waited.

// bzResult is one request as the client saw it.
type bzResult struct {
	instance string // X-Backend of the answer; "" when none came
	latency  time.Duration
	status   int // 0 when the request failed without a response
}

// bzLoad sends n GET requests to http://svc/ through the sidecar from conc
// concurrent clients and returns them in the order they were started. hdr,
// when not nil, sets the headers of request i. The load stops early, with
// the test failed, after 20 seconds.
func bzLoad(t *testing.T, s *Sidecar, svc string, n, conc int, hdr func(i int, h http.Header)) []bzResult {
	t.Helper()
	u, _ := url.Parse("http://" + s.Addr("outbound"))
	c := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(u), MaxIdleConnsPerHost: conc}, Timeout: 30 * time.Second}
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out := make([]bzResult, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+svc+"/", nil)
				if err != nil {
					return
				}
				if hdr != nil {
					hdr(i, req.Header)
				}
				t0 := time.Now()
				resp, err := c.Do(req)
				if err != nil {
					out[i] = bzResult{latency: time.Since(t0)}
					continue
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				r := bzResult{instance: resp.Header.Get("X-Backend"), latency: time.Since(t0), status: resp.StatusCode}
				if err != nil {
					r.status = 0
				}
				out[i] = r
			}
		}()
	}
	wg.Wait()
	if ctx.Err() != nil {
		t.Fatalf("load of %d requests not done within 20s", n)
	}
	return out
}

// bzSummary is what one load run came to.
type bzSummary struct {
	share    map[string]float64 // per instance, percent of all requests
	p50, p99 time.Duration
	mean     time.Duration
	errors   int
}

// bzSummarize counts shares and latency percentiles (nearest rank).
func bzSummarize(rs []bzResult) bzSummary {
	sum := bzSummary{share: map[string]float64{}}
	lat := make([]time.Duration, 0, len(rs))
	var total time.Duration
	for _, r := range rs {
		if r.status < 200 || r.status > 299 {
			sum.errors++
		}
		if r.instance != "" {
			sum.share[r.instance] += 100 / float64(len(rs))
		}
		lat = append(lat, r.latency)
		total += r.latency
	}
	slices.Sort(lat)
	sum.p50 = bzPercentile(lat, 50)
	sum.p99 = bzPercentile(lat, 99)
	if len(rs) > 0 {
		sum.mean = total / time.Duration(len(rs))
	}
	return sum
}

// bzPercentile is the nearest-rank p-th percentile of sorted values.
func bzPercentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(p/100*float64(len(sorted))+0.999999) - 1
	return sorted[min(max(rank, 0), len(sorted)-1)]
}

// bzWorkers is how many requests a backend of TestBZSlowInstanceAvoided
// serves at once.
const bzWorkers = 2

func bzMS(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond)) }

// bzStaticYAML is a static catalog "svc" over addrs (with weights when not
// nil) and an upstream section with the given balance settings.
func bzStaticYAML(addrs []string, weights []int, balance string) string {
	var b strings.Builder
	b.WriteString("log: {access: false}\ndiscovery:\n  static:\n    svc:\n")
	for i, a := range addrs {
		w := 1
		if weights != nil {
			w = weights[i]
		}
		fmt.Fprintf(&b, "      - {address: %s, weight: %d}\n", a, w)
	}
	fmt.Fprintf(&b, "upstreams:\n  svc:\n    balance: %s\n", balance)
	return b.String()
}

// TestBZSlowInstanceAvoided runs the same load through round_robin,
// least_response_time and p2c with one instance ten times slower than the
// other two, each algorithm on a fresh sidecar (no learned state).
//
// Each instance serves at most bzWorkers requests at once and queues the
// rest, as a server with a fixed pool of workers does: an instance that is
// sent more than it can serve gets slower still, which is what makes the
// choice of algorithm show in the app's tail latency. (Without the limit an
// instance never slows under load, and p99 only says whether 1% of the
// requests met the slow instance: p2c still sends it several percent, so its
// p99 would be the slow instance's service time, as round robin's is.)
func TestBZSlowInstanceAvoided(t *testing.T) {
	const requests, clients = 600, 16
	names := []string{"fast-a", "fast-b", "slow"}
	delays := []time.Duration{2 * time.Millisecond, 2 * time.Millisecond, 20 * time.Millisecond}
	var addrs []string
	for i, name := range names {
		d := delays[i]
		workers := make(chan struct{}, bzWorkers)
		b := newBackend(t, name, func(w http.ResponseWriter, r *http.Request) {
			select { // wait for a free worker, like a server with a fixed pool
			case workers <- struct{}{}:
			case <-r.Context().Done():
				return
			}
			time.Sleep(d) // the instance's service time
			<-workers
			fmt.Fprint(w, name)
		})
		addrs = append(addrs, b.addr())
	}
	algorithms := []string{"round_robin", "least_response_time", "p2c"}
	res := map[string]bzSummary{}
	for _, alg := range algorithms {
		s := start(t, bzStaticYAML(addrs, nil, "{algorithm: "+alg+"}"))
		res[alg] = bzSummarize(bzLoad(t, s, "svc", requests, clients, nil))
	}

	var tab strings.Builder
	fmt.Fprintf(&tab, "%d requests, %d concurrent clients; instances fast-a %s, fast-b %s, slow %s, %d workers each\n",
		requests, clients, delays[0], delays[1], delays[2], bzWorkers)
	fmt.Fprintf(&tab, "%-20s %7s %7s %7s %8s %8s %8s %6s\n", "algorithm", "fast-a", "fast-b", "slow", "p50", "p99", "mean", "errors")
	for _, alg := range algorithms {
		r := res[alg]
		fmt.Fprintf(&tab, "%-20s %6.1f%% %6.1f%% %6.1f%% %8s %8s %8s %6d\n", alg,
			r.share["fast-a"], r.share["fast-b"], r.share["slow"], bzMS(r.p50), bzMS(r.p99), bzMS(r.mean), r.errors)
	}
	t.Logf("\n%s", tab.String())

	rr := res["round_robin"]
	for _, alg := range algorithms {
		if have := res[alg].errors; have != 0 {
			t.Errorf("%s: want no failed requests, have %d", alg, have)
		}
	}
	// Round robin ignores speed: a third each, whatever the latency.
	if have := rr.share["slow"]; have < 30 || have > 36.7 {
		t.Errorf("round_robin: slow instance share: want about 33.3%%, have %.1f%%", have)
	}
	for _, alg := range []string{"least_response_time", "p2c"} {
		r := res[alg]
		if want, have := rr.share["slow"]/2, r.share["slow"]; have >= want {
			t.Errorf("%s: slow instance share: want < %.1f%% (half of round_robin's), have %.1f%%", alg, want, have)
		}
		if want, have := rr.p99, r.p99; have >= want {
			t.Errorf("%s: client p99: want < round_robin's %s, have %s", alg, bzMS(want), bzMS(have))
		}
	}
}

// TestBZWeightedRoundRobinExact checks that weights 1:2:3 in the static
// catalog give exactly 100, 200 and 300 of 600 sequential requests.
func TestBZWeightedRoundRobinExact(t *testing.T) {
	var bs []*backend
	var addrs []string
	for _, name := range []string{"w1", "w2", "w3"} {
		b := newBackend(t, name, nil)
		bs = append(bs, b)
		addrs = append(addrs, b.addr())
	}
	s := start(t, bzStaticYAML(addrs, []int{1, 2, 3}, "{algorithm: weighted_round_robin}"))
	c := proxyClient(s)
	seen := map[string]int{}
	for i := range 600 {
		resp, err := c.Get("http://svc/")
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		body := readAll(t, resp)
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: want 200, have %d %s", i, resp.StatusCode, body)
		}
		seen[resp.Header.Get("X-Backend")]++
	}
	for i, name := range []string{"w1", "w2", "w3"} {
		if want, have := 100*(i+1), seen[name]; have != want {
			t.Errorf("%s (weight %d): want %d requests, have %d (all: %v)", name, i+1, want, have, seen)
		}
		if want, have := int64(100*(i+1)), bs[i].hits.Load(); have != want {
			t.Errorf("%s: backend counted %d requests, want %d", name, have, want)
		}
	}
}

// bzStickiness sends rounds requests for each of users keys (interleaved,
// so that consecutive requests have different keys) and returns, per key,
// the set of instances that answered.
func bzStickiness(t *testing.T, s *Sidecar, users, rounds int, set func(user int, h http.Header)) map[int]map[string]int {
	t.Helper()
	c := proxyClient(s)
	got := map[int]map[string]int{}
	for round := range rounds {
		for u := range users {
			req, _ := http.NewRequest(http.MethodGet, "http://svc/", nil)
			set(u, req.Header)
			resp, err := c.Do(req)
			if err != nil {
				t.Fatalf("user %d round %d: %v", u, round, err)
			}
			body := readAll(t, resp)
			if resp.StatusCode != 200 {
				t.Fatalf("user %d round %d: want 200, have %d %s", u, round, resp.StatusCode, body)
			}
			if got[u] == nil {
				got[u] = map[string]int{}
			}
			got[u][resp.Header.Get("X-Backend")]++
		}
	}
	return got
}

// bzCheckSticky fails unless each key stayed on one instance, and checks
// that the keys as a whole used more than one instance (the algorithm
// spreads keys; it does not pin everything to one place).
func bzCheckSticky(t *testing.T, what string, got map[int]map[string]int) {
	t.Helper()
	used := map[string]bool{}
	for u, inst := range got {
		if len(inst) != 1 {
			t.Errorf("%s %d: want one instance, have %v", what, u, inst)
		}
		for name := range inst {
			used[name] = true
		}
	}
	if len(used) < 2 {
		t.Errorf("%ss as a whole: want keys spread over at least 2 of 3 instances, have %v", what, used)
	}
}

func bzThreeBackends(t *testing.T) []string {
	var addrs []string
	for _, name := range []string{"h1", "h2", "h3"} {
		addrs = append(addrs, newBackend(t, name, nil).addr())
	}
	return addrs
}

// TestBZHashKeepsUserOnOneInstance: hash on header:X-User.
func TestBZHashKeepsUserOnOneInstance(t *testing.T) {
	s := start(t, bzStaticYAML(bzThreeBackends(t), nil, `{algorithm: hash, key: "header:X-User"}`))
	got := bzStickiness(t, s, 25, 5, func(u int, h http.Header) { h.Set("X-User", fmt.Sprintf("user-%d", u)) })
	bzCheckSticky(t, "user", got)
}

// TestBZIPHashFollowsForwardedFor: ip_hash with trust_forwarded_for keys on
// the first X-Forwarded-For hop, not on the connection's peer (which is
// 127.0.0.1 for every request here).
func TestBZIPHashFollowsForwardedFor(t *testing.T) {
	yaml := "proxy: {trust_forwarded_for: true}\n" + bzStaticYAML(bzThreeBackends(t), nil, "{algorithm: ip_hash}")
	s := start(t, yaml)
	got := bzStickiness(t, s, 25, 5, func(u int, h http.Header) { h.Set("X-Forwarded-For", fmt.Sprintf("10.1.%d.%d", u/7, 10+u)) })
	bzCheckSticky(t, "client", got)
}

// TestBZUnknownAlgorithmIsAConfigError names the key in the error.
func TestBZUnknownAlgorithmIsAConfigError(t *testing.T) {
	_, err := parseConfig(bzStaticYAML([]string{"127.0.0.1:1"}, nil, "{algorithm: fastest}"))
	if err == nil {
		t.Fatal("want a config error for algorithm fastest, have none")
	}
	for _, want := range []string{"upstreams.svc.balance.algorithm", "fastest"} {
		if have := err.Error(); !strings.Contains(have, want) {
			t.Errorf("want the error to contain %q, have %q", want, have)
		}
	}
}
