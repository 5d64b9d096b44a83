package sidecar

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/internal/testenv"
)

// These tests drive the real sidecar against real loopback backends that
// fail the way instances fail in production: refused connections, hung
// handlers, connections reset mid-response and bursts of 503.

// rzClient is a keep-alive client that uses the sidecar as forward proxy.
func rzClient(s *Sidecar, conns int) *http.Client {
	u, _ := url.Parse("http://" + s.Addr("outbound"))
	return &http.Client{
		Transport: &http.Transport{Proxy: http.ProxyURL(u), MaxIdleConnsPerHost: conns},
		Timeout:   30 * time.Second,
	}
}

// rzDo sends one request and returns its status and body; an error when the
// response broke off or never came.
func rzDo(ctx context.Context, c *http.Client, method, target, body string, hdr map[string]string) (int, string, error) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, target, rd)
	if err != nil {
		return 0, "", err
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// rzInstance returns the status of the instance of upstream at addr.
func rzInstance(t testing.TB, s *Sidecar, upstream, addr string) InstanceStatus {
	t.Helper()
	for _, u := range s.Status() {
		if u.Name != upstream {
			continue
		}
		for _, in := range u.Instances {
			if in.Address == addr {
				return in
			}
		}
	}
	t.Fatalf("instance %s of %q not in the sidecar's status", addr, upstream)
	return InstanceStatus{}
}

// rzEventually polls cond until it holds, failing the test after timeout.
func rzEventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached within %v", what, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// rzClosedAddr returns a loopback address on which nothing listens, so that
// connections to it are refused.
func rzClosedAddr(t testing.TB) string {
	t.Helper()
	// A port closed after a listen on ":0" goes back to the kernel's
	// ephemeral range, where another test's listener or any outgoing
	// connection may take it, and the "dead" instance then answers.
	// FreePort's ports lie below that range and are handed out once.
	return fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
}

// rzHangBackend starts a backend that never answers: its handler returns
// only when the caller goes away or the test ends. arrived, when not nil,
// receives a value (without blocking) for every request that reached it.
func rzHangBackend(t testing.TB, name string, arrived chan<- struct{}) *backend {
	t.Helper()
	release := make(chan struct{})
	b := newBackend(t, name, func(w http.ResponseWriter, r *http.Request) {
		if arrived != nil {
			select {
			case arrived <- struct{}{}:
			default:
			}
		}
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	// Cleanups run last-in first-out: this one runs before the backend's
	// Close, which waits for its handlers to return.
	t.Cleanup(func() { close(release) })
	return b
}

// rzResetter is a raw TCP backend that reads each request, writes part of a
// response and resets the connection.
type rzResetter struct {
	ln   net.Listener
	hits atomic.Int64
	wg   sync.WaitGroup
}

// rzNewResetter starts a resetter. When midBody is false it breaks off in
// the middle of the response headers, otherwise in the middle of the body.
func rzNewResetter(t testing.TB, midBody bool) *rzResetter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rs := &rzResetter{ln: ln}
	partial := "HTTP/1.1 200 OK\r\nContent-Type: text/pl"
	if midBody {
		partial = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\nonly a few bytes"
	}
	rs.wg.Add(1)
	go func() {
		defer rs.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			rs.wg.Add(1)
			go func() {
				defer rs.wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				io.Copy(io.Discard, req.Body)
				rs.hits.Add(1)
				io.WriteString(c, partial)
				if tc, ok := c.(*net.TCPConn); ok {
					tc.SetLinger(0) // Close sends RST
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		rs.wg.Wait()
	})
	return rs
}

func (rs *rzResetter) addr() string { return rs.ln.Addr().String() }

// rzFault is one way an instance fails, with the way to count what reached it.
type rzFault struct {
	name string
	// setup starts the faulty instance and returns its address and a
	// counter of the requests that reached it (nil when nothing can reach it).
	setup func(t *testing.T) (addr string, hits func() int64)
}

var rzFaults = []rzFault{
	{"refused", func(t *testing.T) (string, func() int64) { return rzClosedAddr(t), nil }},
	{"hang", func(t *testing.T) (string, func() int64) {
		b := rzHangBackend(t, "hung", nil)
		return b.addr(), b.hits.Load
	}},
	{"reset-in-headers", func(t *testing.T) (string, func() int64) {
		rs := rzNewResetter(t, false)
		return rs.addr(), rs.hits.Load
	}},
	{"reset-in-body", func(t *testing.T) (string, func() int64) {
		rs := rzNewResetter(t, true)
		return rs.addr(), rs.hits.Load
	}},
	{"503", func(t *testing.T) (string, func() int64) {
		b := newBackend(t, "sick", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "overloaded", http.StatusServiceUnavailable)
		})
		return b.addr(), b.hits.Load
	}},
}

// TestRZBreakerOpensOnEachFault checks, for every kind of failure, that the
// breaker opens after exactly consecutive_failures tries and that the
// instance then gets no traffic while the healthy one serves everything.
func TestRZBreakerOpensOnEachFault(t *testing.T) {
	for _, f := range rzFaults {
		t.Run(f.name, func(t *testing.T) {
			bad, badHits := f.setup(t)
			good := newBackend(t, "good", nil)
			s := start(t, fmt.Sprintf(`
discovery: {static: {svc: [%s, %s]}}
upstreams:
  svc:
    balance: {algorithm: round_robin}
    breaker: {consecutive_failures: 3, open_for: 1m}
    retry: {disabled: true}
    timeouts: {per_try: 100ms}
`, bad, good.addr()))
			c := rzClient(s, 2)
			ctx := context.Background()

			sent := 0
			for ; sent < 40 && rzInstance(t, s, "svc", bad).Breaker != "open"; sent++ {
				rzDo(ctx, c, "GET", "http://svc/", "", nil)
				// The breaker hears of the outcome after the response was
				// written; let the try settle before looking again.
				rzEventually(t, 2*time.Second, "try settled", func() bool { return rzInstance(t, s, "svc", bad).InFlight == 0 })
			}
			in := rzInstance(t, s, "svc", bad)
			if in.Breaker != "open" {
				t.Fatalf("breaker after %d requests: want open, have %s (tries %d, failures %d)", sent, in.Breaker, in.Requests, in.Failures)
			}
			if in.Requests != 3 || in.Failures != 3 {
				t.Fatalf("tries to the faulty instance before its breaker opened: want 3 (all failures), have %d tries, %d failures", in.Requests, in.Failures)
			}
			var hitsAtOpen int64
			if badHits != nil {
				hitsAtOpen = badHits()
				if hitsAtOpen != 3 {
					t.Fatalf("requests that reached the faulty instance: want 3, have %d", hitsAtOpen)
				}
			}
			goodBefore := good.hits.Load()
			for i := 0; i < 20; i++ {
				st, body, err := rzDo(ctx, c, "GET", "http://svc/", "", nil)
				if err != nil || st != 200 || body != "good" {
					t.Fatalf("request %d with the faulty instance ejected: want 200 good, have %d %q %v", i, st, body, err)
				}
			}
			if n := good.hits.Load() - goodBefore; n != 20 {
				t.Errorf("healthy instance while the other is ejected: want 20 requests, have %d", n)
			}
			if in := rzInstance(t, s, "svc", bad); in.Requests != 3 {
				t.Errorf("tries to the ejected instance: want still 3, have %d", in.Requests)
			}
			if badHits != nil && badHits() != hitsAtOpen {
				t.Errorf("requests reaching the ejected instance: want still %d, have %d", hitsAtOpen, badHits())
			}
		})
	}
}

// rzAdminBreaker reads the instance's breaker state from the admin /upstreams JSON.
func rzAdminBreaker(t testing.TB, s *Sidecar, upstream, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + s.Addr("admin") + "/upstreams")
	if err != nil {
		t.Fatalf("GET /upstreams: %v", err)
	}
	defer resp.Body.Close()
	var doc struct {
		Upstreams []UpstreamStatus `json:"upstreams"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatalf("decoding /upstreams: %v", err)
	}
	for _, u := range doc.Upstreams {
		for _, in := range u.Instances {
			if u.Name == upstream && in.Address == addr {
				return in.Breaker
			}
		}
	}
	t.Fatalf("/upstreams lacks instance %s of %q", addr, upstream)
	return ""
}

// TestRZBreakerProbesAndOpenPeriodGrows follows one instance through a 503
// storm: the breaker opens after three failures, the instance sees exactly
// one probe per open period, a failed probe doubles the open period, and a
// successful one closes the breaker and brings traffic back.
func TestRZBreakerProbesAndOpenPeriodGrows(t *testing.T) {
	const openFor = 200 * time.Millisecond
	var sick atomic.Bool
	sick.Store(true)
	var mu sync.Mutex
	var hitTimes []time.Time
	bad := newBackend(t, "bad", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		hitTimes = append(hitTimes, time.Now())
		mu.Unlock()
		if sick.Load() {
			http.Error(w, "overloaded", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprint(w, "bad")
	})
	good := newBackend(t, "good", nil)
	s := start(t, fmt.Sprintf(`
discovery: {static: {svc: [%s, %s]}}
upstreams:
  svc:
    balance: {algorithm: round_robin}
    breaker: {consecutive_failures: 3, open_for: %v, open_multiplier: 2, open_max: 10s}
    retry: {disabled: true}
`, bad.addr(), good.addr(), openFor))
	c := rzClient(s, 2)
	ctx := context.Background()
	hitAt := func(i int) time.Time {
		mu.Lock()
		defer mu.Unlock()
		return hitTimes[i]
	}
	// drive sends paced requests until bad has seen want requests; bounded
	// by the deadline.
	drive := func(want int64, timeout time.Duration) {
		t.Helper()
		deadline := time.Now().Add(timeout)
		for bad.hits.Load() < want {
			if time.Now().After(deadline) {
				t.Fatalf("want %d requests at the sick instance within %v, have %d", want, timeout, bad.hits.Load())
			}
			rzDo(ctx, c, "GET", "http://svc/", "", nil)
			time.Sleep(2 * time.Millisecond) // pace the load, not a synchronisation
		}
		if n := bad.hits.Load(); n != want {
			t.Fatalf("requests at the sick instance: want exactly %d, have %d", want, n)
		}
	}
	state := func() string { return rzInstance(t, s, "svc", bad.addr()).Breaker }

	// The storm: three failures open the breaker.
	drive(3, 2*time.Second)
	rzEventually(t, 2*time.Second, "breaker open after 3 failures", func() bool { return state() == "open" })
	if have := rzAdminBreaker(t, s, "svc", bad.addr()); have != "open" {
		t.Fatalf("/upstreams breaker: want open, have %s", have)
	}

	// First open period: the next request to reach it is the probe; it fails.
	drive(4, 5*time.Second)
	first := hitAt(3).Sub(hitAt(2))
	rzEventually(t, 2*time.Second, "breaker reopened after the failed probe", func() bool { return state() == "open" })

	// Second open period, twice as long; the instance has recovered, so
	// this probe succeeds and closes the breaker.
	sick.Store(false)
	drive(5, 5*time.Second)
	second := hitAt(4).Sub(hitAt(3))
	rzEventually(t, 2*time.Second, "breaker closed after the successful probe", func() bool { return state() == "closed" })
	t.Logf("open periods measured at the instance: first %v, second %v (open_for %v)", first, second, openFor)

	if first < openFor {
		t.Errorf("first open period: want ≥ %v, have %v", openFor, first)
	}
	if second < 2*openFor {
		t.Errorf("second open period: want ≥ %v (open_for × open_multiplier), have %v", 2*openFor, second)
	}
	if second <= first {
		t.Errorf("open period after a failed probe: want longer than the first (%v), have %v", first, second)
	}

	// Closed again: round robin gives it its share at once.
	before := bad.hits.Load()
	for i := 0; i < 10; i++ {
		if st, _, err := rzDo(ctx, c, "GET", "http://svc/", "", nil); err != nil || st != 200 {
			t.Fatalf("request %d after recovery: want 200, have %d %v", i, st, err)
		}
	}
	if n := bad.hits.Load() - before; n != 5 {
		t.Errorf("recovered instance's share of 10 round-robin requests: want 5, have %d", n)
	}
}

// TestRZSteadyLoadSurvivesKilledInstance kills one of three instances in
// the middle of a steady load; with no resilience keys configured the app
// must not see a single failed GET.
func TestRZSteadyLoadSurvivesKilledInstance(t *testing.T) {
	const (
		workers   = 4
		perWorker = 2000
		maxRun    = 10 * time.Second
	)
	a := newBackend(t, "a", nil)
	b := newBackend(t, "b", nil)
	victim := newBackend(t, "c", nil)
	victimAddr := victim.addr()
	s := start(t, fmt.Sprintf(`
discovery: {static: {svc: [%s, %s, %s]}}
upstreams: {svc: {}}
`, a.addr(), b.addr(), victimAddr))
	c := rzClient(s, workers)

	var done, failed atomic.Int64
	var firstErr atomic.Value
	stop := time.Now().Add(maxRun)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < perWorker && time.Now().Before(stop); i++ {
				st, body, err := rzDo(context.Background(), c, "GET", "http://svc/load", "", nil)
				if err != nil || st != 200 || (body != "a" && body != "b" && body != "c") {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("%d %q %v", st, body, err))
				}
				done.Add(1)
			}
		}()
	}
	// Kill the victim a third of the way through (by count, or by time when
	// the machine is slow).
	killAt := time.Now().Add(maxRun / 3)
	for done.Load() < workers*perWorker/3 && time.Now().Before(killAt) {
		time.Sleep(5 * time.Millisecond)
	}
	victimBefore := victim.hits.Load()
	atKill := done.Load()
	victim.Close()
	wg.Wait()

	total := done.Load()
	var tries uint64
	for _, u := range s.Status() {
		for _, in := range u.Instances {
			tries += in.Requests
		}
	}
	t.Logf("%d requests (%d after the kill), %d failed; %d tries to instances, so %d retries; victim served %d before dying",
		total, total-atKill, failed.Load(), tries, int64(tries)-total, victimBefore)
	if failed.Load() != 0 {
		t.Fatalf("failed GETs seen by the app: want 0, have %d of %d (first: %v)", failed.Load(), total, firstErr.Load())
	}
	if victimBefore == 0 {
		t.Fatalf("the victim served no request before it was killed: the test proves nothing")
	}
	if total-atKill < 100 {
		t.Fatalf("requests after the kill: want at least 100 to exercise the failover, have %d", total-atKill)
	}
	if st := rzInstance(t, s, "svc", victimAddr).Breaker; st == "closed" {
		t.Errorf("breaker of the killed instance: want open (or half-open while probed), have %s", st)
	}
}

// TestRZPostNotRetriedOnceSent checks that a POST that reached an instance
// and got 503 is not sent again, while a GET in the same situation is.
func TestRZPostNotRetriedOnceSent(t *testing.T) {
	sick := func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		http.Error(w, "overloaded", http.StatusServiceUnavailable)
	}
	b1 := newBackend(t, "s1", sick)
	b2 := newBackend(t, "s2", sick)
	s := start(t, fmt.Sprintf(`
discovery: {static: {svc: [%s, %s]}}
upstreams: {svc: {balance: {algorithm: round_robin}}}
`, b1.addr(), b2.addr()))
	c := rzClient(s, 1)
	hits := func() int64 { return b1.hits.Load() + b2.hits.Load() }

	st, _, err := rzDo(context.Background(), c, "POST", "http://svc/orders", `{"id":1}`, nil)
	if err != nil || st != 503 {
		t.Fatalf("POST to a sick upstream: want 503, have %d %v", st, err)
	}
	if n := hits(); n != 1 {
		t.Fatalf("POST that reached an instance and got 503: want 1 upstream request, have %d", n)
	}
	// The same situation with a GET is retried: the policy really decides
	// by method.
	st, _, err = rzDo(context.Background(), c, "GET", "http://svc/orders", "", nil)
	if err != nil || st != 503 {
		t.Fatalf("GET to a sick upstream: want 503, have %d %v", st, err)
	}
	if n := hits() - 1; n < 2 {
		t.Fatalf("GET that got 503: want at least 2 upstream requests (retried), have %d", n)
	}
}

// TestRZPostRetriedAfterConnectFailure checks that a POST refused at connect
// goes to another instance with its body intact.
func TestRZPostRetriedAfterConnectFailure(t *testing.T) {
	dead := rzClosedAddr(t)
	echo := newBackend(t, "echo", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(w, r.Body)
	})
	s := start(t, fmt.Sprintf(`
discovery: {static: {svc: [%s, %s]}}
upstreams: {svc: {balance: {algorithm: round_robin}}}
`, dead, echo.addr()))
	c := rzClient(s, 1)
	const n = 4
	for i := 0; i < n; i++ {
		body := fmt.Sprintf(`{"order":%d}`, i)
		st, got, err := rzDo(context.Background(), c, "POST", "http://svc/orders", body, nil)
		if err != nil || st != 200 || got != body {
			t.Fatalf("POST %d with one instance refusing connections: want 200 %q, have %d %q %v", i, body, st, got, err)
		}
	}
	if have := echo.hits.Load(); have != n {
		t.Errorf("POSTs at the healthy instance: want %d, have %d", n, have)
	}
	if d := rzInstance(t, s, "svc", dead); d.Requests == 0 || d.Failures != d.Requests {
		t.Errorf("tries to the refusing instance: want ≥ 1, all failures, have %d tries, %d failures", d.Requests, d.Failures)
	}
}

// TestRZRetryBudgetBoundsOutageLoad checks that during a full outage retries
// add no more than the budget allows to the upstream's load.
func TestRZRetryBudgetBoundsOutageLoad(t *testing.T) {
	const (
		requests   = 240
		workers    = 4
		percent    = 20.0
		minPerSec  = 10 // the default budget_min_per_second
		maxRetries = 3  // the default attempts
	)
	sick := func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "overloaded", http.StatusServiceUnavailable)
	}
	bs := []*backend{newBackend(t, "s1", sick), newBackend(t, "s2", sick), newBackend(t, "s3", sick)}
	s := start(t, fmt.Sprintf(`
discovery: {static: {svc: [%s, %s, %s]}}
upstreams: {svc: {retry: {budget_percent: %v}}}
`, bs[0].addr(), bs[1].addr(), bs[2].addr(), percent))
	c := rzClient(s, workers)

	var next, ok atomic.Int64
	began := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= requests {
				if st, _, err := rzDo(context.Background(), c, "GET", "http://svc/", "", nil); err == nil && st == 200 {
					ok.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(began)
	var attempts int64
	for _, b := range bs {
		attempts += b.hits.Load()
	}
	// The budget grants percent of the requests plus minPerSec in every
	// second the run touched.
	seconds := int64(math.Ceil(elapsed.Seconds())) + 1
	bound := int64(requests*(1+percent/100)) + minPerSec*seconds
	t.Logf("outage: %d requests in %v made %d upstream attempts (bound %d)", requests, elapsed.Round(time.Millisecond), attempts, bound)
	if ok.Load() != 0 {
		t.Fatalf("requests answered 200 during a full outage: want 0, have %d", ok.Load())
	}
	if attempts > bound {
		t.Fatalf("upstream attempts during the outage: want ≤ requests×(1+%v%%) + %d/s×%ds = %d, have %d (unbudgeted would be up to %d)",
			percent, minPerSec, seconds, bound, attempts, requests*maxRetries)
	}
	if attempts <= requests {
		t.Fatalf("upstream attempts during the outage: want more than %d (some retries granted), have %d", requests, attempts)
	}
}

// TestRZHungInstanceCostsOnePerTry checks that a hung instance costs a
// request at most the per-try timeout.
func TestRZHungInstanceCostsOnePerTry(t *testing.T) {
	const perTry = 200 * time.Millisecond
	const margin = 300 * time.Millisecond
	run := func(t *testing.T, retryOn string, wantRecovered bool) {
		hung := rzHangBackend(t, "hung", nil)
		good := newBackend(t, "good", nil)
		s := start(t, fmt.Sprintf(`
discovery: {static: {svc: [%s, %s]}}
upstreams:
  svc:
    balance: {algorithm: round_robin}
    timeouts: {per_try: %v}
%s`, hung.addr(), good.addr(), perTry, retryOn))
		c := rzClient(s, 1)
		var slowest time.Duration
		hitHung := 0
		for i := 0; i < 12; i++ {
			t0 := time.Now()
			st, body, err := rzDo(context.Background(), c, "GET", "http://svc/", "", nil)
			d := time.Since(t0)
			slowest = max(slowest, d)
			if d >= perTry+margin {
				t.Errorf("request %d took %v: want < per_try + %v = %v", i, d, margin, perTry+margin)
			}
			switch {
			case err == nil && st == 200 && body == "good":
			case !wantRecovered && err == nil && st == 504:
				hitHung++
			default:
				want := "200 good"
				if !wantRecovered {
					want += " or 504"
				}
				t.Errorf("request %d: want %s, have %d %q %v", i, want, st, body, err)
			}
		}
		t.Logf("slowest request %v; hung instance got %d requests", slowest, hung.hits.Load())
		if hung.hits.Load() == 0 {
			t.Fatalf("the hung instance was never tried: the test proves nothing")
		}
		if slowest < perTry {
			t.Errorf("slowest request %v: want ≥ per_try %v, since the hung instance was tried", slowest, perTry)
		}
		if !wantRecovered && int64(hitHung) != hung.hits.Load() {
			t.Errorf("504s: want one per request to the hung instance (%d), have %d", hung.hits.Load(), hitHung)
		}
	}
	t.Run("retry-on-timeout", func(t *testing.T) {
		run(t, "    retry: {on: [connect-failure, reset, timeout, gateway-error]}\n", true)
	})
	// Timeouts are not retried by default: the try's 504 still comes within per_try.
	t.Run("default-retry", func(t *testing.T) { run(t, "", false) })
}

// TestRZTimeoutHeader checks that X-Meshd-Timeout shortens the request's
// budget and that a malformed value is refused before anything is sent.
func TestRZTimeoutHeader(t *testing.T) {
	slow := rzHangBackend(t, "slow", nil)
	s := start(t, fmt.Sprintf(`
discovery: {static: {svc: [%s]}}
upstreams: {svc: {timeout: 10s}}
`, slow.addr()))
	c := rzClient(s, 1)
	const budget = 100 * time.Millisecond
	t0 := time.Now()
	st, body, err := rzDo(context.Background(), c, "GET", "http://svc/", "", map[string]string{"X-Meshd-Timeout": "100ms"})
	d := time.Since(t0)
	if err != nil || st != http.StatusGatewayTimeout {
		t.Fatalf("X-Meshd-Timeout: 100ms against a hung backend: want 504, have %d %q %v", st, body, err)
	}
	if d < budget || d > budget+400*time.Millisecond {
		t.Errorf("X-Meshd-Timeout: 100ms answered after %v: want between %v and %v", d, budget, budget+400*time.Millisecond)
	}
	if slow.hits.Load() != 1 {
		t.Errorf("requests at the backend: want 1, have %d", slow.hits.Load())
	}
	for _, v := range []string{"soon", "-5ms", "0"} {
		st, body, err := rzDo(context.Background(), c, "GET", "http://svc/", "", map[string]string{"X-Meshd-Timeout": v})
		if err != nil || st != http.StatusBadRequest {
			t.Errorf("X-Meshd-Timeout: %q: want 400, have %d %q %v", v, st, body, err)
		}
	}
	if slow.hits.Load() != 1 {
		t.Errorf("requests at the backend after malformed timeouts: want still 1, have %d", slow.hits.Load())
	}
}

// TestRZCallerCancellationIsNotAFailure checks that callers giving up on a
// hung instance do not trip its breaker, while real timeouts do.
func TestRZCallerCancellationIsNotAFailure(t *testing.T) {
	arrived := make(chan struct{}, 1)
	b := rzHangBackend(t, "hung", arrived)
	s := start(t, fmt.Sprintf(`
discovery: {static: {svc: [%s]}}
upstreams: {svc: {breaker: {consecutive_failures: 3, open_for: 1m}}}
`, b.addr()))
	c := rzClient(s, 1)
	settled := func() bool { return rzInstance(t, s, "svc", b.addr()).InFlight == 0 }

	const cancels = 5
	for i := 0; i < cancels; i++ {
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			_, _, err := rzDo(ctx, c, "GET", "http://svc/", "", nil)
			errc <- err
		}()
		select {
		case <-arrived:
		case <-time.After(5 * time.Second):
			t.Fatalf("request %d never reached the backend", i)
		}
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("canceled request %d: want context.Canceled, have %v", i, err)
		}
		rzEventually(t, 5*time.Second, "canceled try settled", settled)
	}
	in := rzInstance(t, s, "svc", b.addr())
	if in.Breaker != "closed" || in.Failures != 0 {
		t.Fatalf("after %d canceled requests (consecutive_failures 3): want breaker closed with 0 failures, have %s with %d failures", cancels, in.Breaker, in.Failures)
	}
	if in.Requests != cancels {
		t.Errorf("tries recorded: want %d, have %d", cancels, in.Requests)
	}
	// Real failures against the same instance do trip it.
	for i := 0; i < 3; i++ {
		if st, _, err := rzDo(context.Background(), c, "GET", "http://svc/", "", map[string]string{"X-Meshd-Timeout": "50ms"}); err != nil || st != 504 {
			t.Fatalf("timed-out request %d: want 504, have %d %v", i, st, err)
		}
	}
	rzEventually(t, 2*time.Second, "breaker open after 3 timeouts", func() bool { return rzInstance(t, s, "svc", b.addr()).Breaker == "open" })
}

// A request whose streamed body stalls (the client stops sending but keeps
// its connection) still ends at its timeout: meshd stops waiting on the
// client and answers 504 instead of holding the request and the instance's
// connection until the client gives up.
func TestRZStalledUploadEndsAtItsTimeout(t *testing.T) {
	// meshd's own HTTP/1.1 client, and net/http's Transport (which a
	// connection cap selects), which may still read the body after its
	// RoundTrip returned.
	for _, upstream := range []string{"{}", "{max_conns_per_instance: 4}"} {
		t.Run(upstream, func(t *testing.T) { rzStalledUpload(t, upstream) })
	}
}

func rzStalledUpload(t *testing.T, upstream string) {
	got := make(chan int64, 1)
	b := newBackend(t, "sink", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		got <- n
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: %s}\n", b.addr(), upstream))
	c, br := rawConn(t, s)
	// 1 MB announced (past the 64 KiB that would be buffered), 100 KiB sent.
	fmt.Fprintf(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000000\r\nX-Meshd-Timeout: 300ms\r\n\r\n")
	c.Write(make([]byte, 100<<10))
	began := time.Now()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("no answer while the upload stalls: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusGatewayTimeout {
		dump, _ := httputil.DumpResponse(resp, false)
		t.Fatalf("want 504, have %d %s", resp.StatusCode, dump)
	}
	if d := time.Since(began); d > 3*time.Second {
		t.Fatalf("answered only after %v", d)
	}
	if !resp.Close {
		t.Fatal("the 504 after an aborted upload must close the connection (its read was cut short)")
	}
	select {
	case n := <-got:
		if n >= 1000000 {
			t.Fatalf("the instance read the whole body (%d bytes)", n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the instance's request was not ended")
	}
	// The caller stalled, not the instance.
	rzEventually(t, 5*time.Second, "the try settled", func() bool { return rzInstance(t, s, "svc", b.addr()).InFlight == 0 })
	if in := rzInstance(t, s, "svc", b.addr()); in.Failures != 0 {
		t.Fatalf("a stalled caller counted as %d instance failures", in.Failures)
	}
}

// A streamed upload to an instance that refuses connections gets its 502 at
// once: the body the transport never started to send is settled at once.
func TestRZStreamedUploadToDeadInstanceFailsFast(t *testing.T) {
	dead := rzClosedAddr(t)
	for _, upstream := range []string{"{}", "{max_conns_per_instance: 4}"} {
		t.Run(upstream, func(t *testing.T) {
			s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: %s}\n", dead, upstream))
			c := rzClient(s, 1)
			body := strings.Repeat("x", 200<<10) // past the 64 KiB buffered for retries
			began := time.Now()
			st, _, err := rzDo(context.Background(), c, "POST", "http://svc/", body, nil)
			if err != nil || st != http.StatusBadGateway {
				t.Fatalf("want 502, have %d %v", st, err)
			}
			if d := time.Since(began); d > 2*time.Second {
				t.Fatalf("the 502 took %v", d)
			}
		})
	}
}

// When the budget ends after a streamed body was sent in full, the answer
// is a 504 and the client's connection stays good for its next request:
// nothing is aborted on it.
func TestRZTimeoutAfterStreamedUploadKeepsTheConnection(t *testing.T) {
	for _, upstream := range []string{"{}", "{max_conns_per_instance: 4}"} {
		for _, chunked := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/chunked=%v", upstream, chunked), func(t *testing.T) {
				release := make(chan struct{})
				var once sync.Once
				unblock := func() { once.Do(func() { close(release) }) }
				t.Cleanup(unblock)
				b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
					io.Copy(io.Discard, r.Body)
					if r.Method == http.MethodPost {
						select { // answers only after the budget
						case <-release:
						case <-r.Context().Done():
						}
						return
					}
					io.WriteString(w, "ok")
				})
				s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: %s}\n", b.addr(), upstream))
				c, br := rawConn(t, s)
				body := strings.Repeat("x", 200<<10)
				if chunked {
					fmt.Fprintf(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nX-Meshd-Timeout: 300ms\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", len(body), body)
				} else {
					fmt.Fprintf(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\nX-Meshd-Timeout: 300ms\r\n\r\n%s", len(body), body)
				}
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusGatewayTimeout || resp.Close {
					t.Fatalf("first: want a kept-alive 504, have %d (close %v)", resp.StatusCode, resp.Close)
				}
				fmt.Fprintf(c, "GET http://svc/ HTTP/1.1\r\nHost: svc\r\n\r\n")
				resp, err = http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("second request on the kept-alive connection: %v", err)
				}
				got, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(got) != "ok" {
					t.Fatalf("second: want 200 %q, have %d %q", "ok", resp.StatusCode, got)
				}
			})
		}
	}
}

// A caller that hangs up in the middle of a streamed upload does not count
// against the instance.
func TestRZHangUpMidUploadIsNotAFailure(t *testing.T) {
	for _, upstream := range []string{"{}", "{max_conns_per_instance: 4}"} {
		t.Run(upstream, func(t *testing.T) {
			reading := make(chan struct{}, 1)
			b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
				if r.Method != http.MethodPost {
					return
				}
				buf := make([]byte, 1024)
				r.Body.Read(buf)
				select {
				case reading <- struct{}{}:
				default:
				}
				io.Copy(io.Discard, r.Body)
			})
			s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: %s}\n", b.addr(), upstream))
			settled := func() bool { return rzInstance(t, s, "svc", b.addr()).InFlight == 0 }
			const hangups = 6
			for i := 0; i < hangups; i++ {
				// A GET first, so that the upload may take a pooled
				// connection to the instance.
				if st, _, err := rzDo(context.Background(), rzClient(s, 1), "GET", "http://svc/", "", nil); err != nil || st != 200 {
					t.Fatalf("GET: %d %v", st, err)
				}
				c, err := net.Dial("tcp", s.Addr("outbound"))
				if err != nil {
					t.Fatal(err)
				}
				fmt.Fprintf(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000000\r\n\r\n")
				c.Write(make([]byte, 100<<10))
				<-reading
				c.Close()
				rzEventually(t, 5*time.Second, "the abandoned try settled", settled)
			}
			in := rzInstance(t, s, "svc", b.addr())
			if in.Failures != 0 || in.Breaker != "closed" {
				t.Fatalf("after %d hang-ups mid-upload: want 0 failures and a closed breaker, have %d and %s", hangups, in.Failures, in.Breaker)
			}
		})
	}
}

// A streamed body that turns out malformed (a bad chunk size past the
// buffered part) is the caller's error: a 400, not an empty answer, and not
// held against the instance.
func TestRZMalformedStreamedBodyIsA400(t *testing.T) {
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	c, br := rawConn(t, s)
	chunk := strings.Repeat("x", 200<<10)
	fmt.Fprintf(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\nZZZZ\r\n", len(chunk), chunk)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("no answer to a malformed body: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("want 400, have %d", resp.StatusCode)
	}
	rzEventually(t, 5*time.Second, "the try settled", func() bool { return rzInstance(t, s, "svc", b.addr()).InFlight == 0 })
	if in := rzInstance(t, s, "svc", b.addr()); in.Failures != 0 {
		t.Fatalf("a malformed body counted as %d instance failures", in.Failures)
	}
}

// A small body (one meshd buffers for retries) that stalls is bounded by the
// request's timeout as well: a 504 that closes the connection, no try sent,
// and nothing held against the instance.
func TestRZStalledBufferedBodyEndsAtItsTimeout(t *testing.T) {
	for _, chunked := range []bool{false, true} {
		t.Run(fmt.Sprintf("chunked=%v", chunked), func(t *testing.T) {
			var hits atomic.Int64
			b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) { hits.Add(1) })
			s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
			c, br := rawConn(t, s)
			if chunked {
				fmt.Fprintf(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nX-Meshd-Timeout: 300ms\r\n\r\n3e8\r\n%s", strings.Repeat("x", 100))
			} else {
				fmt.Fprintf(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000\r\nX-Meshd-Timeout: 300ms\r\n\r\n%s", strings.Repeat("x", 100))
			}
			began := time.Now()
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("no answer while the small body stalls: %v", err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusGatewayTimeout {
				t.Fatalf("want 504, have %d", resp.StatusCode)
			}
			if d := time.Since(began); d > 3*time.Second {
				t.Fatalf("answered only after %v", d)
			}
			if !resp.Close {
				t.Fatal("the 504 after a cut-short body must close the connection")
			}
			in := rzInstance(t, s, "svc", b.addr())
			if hits.Load() != 0 || in.Failures != 0 || in.InFlight != 0 {
				t.Fatalf("a stalled caller reached the instance: %d requests, %d failures, %d in flight", hits.Load(), in.Failures, in.InFlight)
			}
		})
	}
}

// A caller that hangs up while meshd buffers its small body is a 499 in the
// access log (the caller left), not a 400 (a bad request).
func TestRZHangUpDuringBufferedBodyIs499(t *testing.T) {
	var hits atomic.Int64
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) { hits.Add(1) })
	logs := &syncBuf{}
	s := startLogged(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()), logs)
	c, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "POST http://svc/upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000\r\n\r\n%s", strings.Repeat("x", 100))
	c.Close()
	waitFor(t, "the abandoned request in the access log", func() bool {
		return strings.Contains(logs.String(), "path=/upload")
	})
	line := ""
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "path=/upload") {
			line = l
		}
	}
	if !strings.Contains(line, "status=499") {
		t.Fatalf("want status=499, have %s", line)
	}
	if hits.Load() != 0 {
		t.Fatalf("the instance saw %d requests", hits.Load())
	}
}

// rzRaw sends raw on a new connection to the outbound listener (after
// which, if halfClose, it closes its sending side) and reads one response.
func rzRaw(t *testing.T, s *Sidecar, raw string, halfClose bool) *http.Response {
	t.Helper()
	c, br := rawConn(t, s)
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	if halfClose {
		c.(*net.TCPConn).CloseWrite()
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	resp.Body.Close()
	return resp
}

// A body that is broken, or that ends before its declared length while the
// caller still listens, gets a 400 that closes the connection: never the
// server's default empty 200, and never a request to the instance.
func TestRZBrokenOrShortBodyIsA400(t *testing.T) {
	var seen sync.Map // paths the instance was asked for
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) { seen.Store(r.URL.Path, true) })
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	big := strings.Repeat("x", 100<<10) // streamed, past the 64 KiB buffered
	for _, tc := range []struct {
		name, path, raw string
		halfClose       bool
		fastOnly        bool // net/http's server reads on after a bare LF: a stall there
	}{
		{"bare LF after the last chunk", "/lf", "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\n", false, true},
		{"bare LF after a streamed body", "/lf-streamed", fmt.Sprintf("Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\n", len(big), big), false, true},
		{"trailer line too long", "/long-trailer", "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Long: " + strings.Repeat("a", 8<<10) + "\r\n\r\n", false, false},
		{"short body, half-closed", "/short", "Content-Length: 1000\r\n\r\n" + strings.Repeat("x", 100), true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.fastOnly && os.Getenv("MESHD_TEST_FAST_PATH") == "off" {
				t.Skip("net/http's server waits for more trailer after a bare LF: a stalled body, tested elsewhere")
			}
			resp := rzRaw(t, s, "POST http://svc"+tc.path+" HTTP/1.1\r\nHost: svc\r\n"+tc.raw, tc.halfClose)
			if resp.StatusCode != http.StatusBadRequest || !resp.Close {
				t.Fatalf("want a 400 that closes the connection, have %d (close %v)", resp.StatusCode, resp.Close)
			}
		})
	}
	rzEventually(t, 5*time.Second, "the tries settled", func() bool { return rzInstance(t, s, "svc", b.addr()).InFlight == 0 })
	for _, p := range []string{"/lf", "/long-trailer", "/short"} {
		if _, ok := seen.Load(p); ok {
			t.Errorf("the instance saw %s, whose body was broken before any try", p)
		}
	}
	if in := rzInstance(t, s, "svc", b.addr()); in.Failures != 0 {
		t.Fatalf("broken bodies counted as %d instance failures", in.Failures)
	}
}

// With only a per-try timeout, a streamed body of unknown length whose
// caller stalls is still cut when the try ends, on both transports.
func TestRZPerTryTimeoutCutsAStalledChunkedUpload(t *testing.T) {
	for _, upstream := range []string{"{timeouts: {per_try: 300ms}}", "{timeouts: {per_try: 300ms}, max_conns_per_instance: 4}"} {
		t.Run(upstream, func(t *testing.T) {
			b := newBackend(t, "sink", func(w http.ResponseWriter, r *http.Request) { io.Copy(io.Discard, r.Body) })
			s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: %s}\n", b.addr(), upstream))
			c, br := rawConn(t, s)
			chunk := strings.Repeat("x", 100<<10)
			fmt.Fprintf(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n", len(chunk), chunk)
			began := time.Now()
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("no answer while the upload stalls: %v", err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusGatewayTimeout || !resp.Close {
				t.Fatalf("want a 504 that closes the connection, have %d (close %v)", resp.StatusCode, resp.Close)
			}
			if d := time.Since(began); d > 3*time.Second {
				t.Fatalf("answered only after %v", d)
			}
		})
	}
}

// When the budget ends while meshd is not reading the caller's body (the
// instance does not take it and meshd waits to write), the rest of the
// body is not read either: the 504 closes the connection instead of meshd
// waiting on the caller to discard what is left.
func TestRZBudgetEndingBetweenBodyReadsClosesTheConnection(t *testing.T) {
	release := make(chan struct{})
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		<-release // never reads the body (so its context never ends)
	})
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	t.Cleanup(func() { close(release) }) // first of the cleanups
	c, br := rawConn(t, s)
	const total = 64 << 20
	fmt.Fprintf(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\nX-Meshd-Timeout: 300ms\r\n\r\n", total)
	// Far more than the socket buffers between the caller, meshd and the
	// instance hold, but less than announced: meshd ends up blocked writing
	// to the instance, not reading from the caller.
	go func() {
		buf := make([]byte, 1<<20)
		for sent := 0; sent < total/2; sent += len(buf) {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusGatewayTimeout || !resp.Close {
		t.Fatalf("want a 504 that closes the connection, have %d (close %v)", resp.StatusCode, resp.Close)
	}
}

// An instance that answers while the upload is still coming (full duplex,
// through net/http's Transport: meshd's own HTTP/1.1 client sends the whole
// body first) does not take the blame when the caller's body then turns
// out broken, or the caller leaves, and the response is cut short because
// of it. The answer ends broken, and the access log says whose doing it was.
func TestRZBrokenBodyAfterResponseHeadersIsNotAFailure(t *testing.T) {
	for _, tc := range []struct {
		name, status string
		breakIt      func(c net.Conn)
	}{
		{"malformed chunk", "status=400", func(c net.Conn) { io.WriteString(c, "ZZZZ\r\n") }},
		// A reset is noticed either on the body (499) or first on writing
		// the answer, which then logs the status already sent, as for any
		// caller that leaves mid-answer.
		{"reset", "status=499|status=200", func(c net.Conn) { c.(*net.TCPConn).SetLinger(0); c.Close() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
				http.NewResponseController(w).EnableFullDuplex()
				w.WriteHeader(200)
				w.(http.Flusher).Flush()
				io.Copy(w, r.Body) // echoes until the body ends or breaks
			})
			logs := &syncBuf{}
			s := startLogged(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {max_conns_per_instance: 4}}\n", b.addr()), logs)
			c, br := rawConn(t, s)
			chunk := strings.Repeat("x", 100<<10)
			fmt.Fprintf(c, "POST http://svc/duplex HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n", len(chunk), chunk)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("no answer while the upload goes on: %v", err)
			}
			// Some of the echo, then the break.
			if _, err := io.ReadFull(resp.Body, make([]byte, 1024)); err != nil {
				t.Fatalf("no echo: %v", err)
			}
			tc.breakIt(c)
			if tc.name == "malformed chunk" {
				if _, err := io.Copy(io.Discard, resp.Body); err == nil {
					t.Fatal("the answer cut short with the caller's body ended as if complete")
				}
			}
			waitFor(t, "the request in the access log", func() bool { return strings.Contains(logs.String(), "path=/duplex") })
			for _, l := range strings.Split(logs.String(), "\n") {
				if strings.Contains(l, "path=/duplex") && !slices.ContainsFunc(strings.Split(tc.status, "|"), func(st string) bool { return strings.Contains(l, st+" ") }) {
					t.Fatalf("want %s, have %s", tc.status, l)
				}
			}
			rzEventually(t, 5*time.Second, "the try settled", func() bool { return rzInstance(t, s, "svc", b.addr()).InFlight == 0 })
			if in := rzInstance(t, s, "svc", b.addr()); in.Failures != 0 {
				t.Fatalf("the caller's broken body counted as %d instance failures", in.Failures)
			}
		})
	}
}

// A caller that sends its request and half-closes has gone as far as the
// server can tell: the request is cancelled and recorded as 499, and the
// caller gets no answer at all, never a default empty 200 that would pass
// for success.
func TestRZHalfClosedCallerGetsNoFalseSuccess(t *testing.T) {
	release := make(chan struct{})
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	logs := &syncBuf{}
	s := startLogged(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()), logs)
	t.Cleanup(func() { close(release) })
	for _, body := range []string{"", "hello"} {
		t.Run(fmt.Sprintf("body=%q", body), func(t *testing.T) {
			c, br := rawConn(t, s)
			fmt.Fprintf(c, "POST http://svc/halfclose HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
			c.(*net.TCPConn).CloseWrite()
			resp, err := http.ReadResponse(br, nil)
			if err == nil {
				got, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				t.Fatalf("want no answer for a cancelled request, have %d %q", resp.StatusCode, got)
			}
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatalf("the connection was neither answered nor closed: %v", err)
			}
		})
	}
	waitFor(t, "both requests in the access log", func() bool { return strings.Count(logs.String(), "path=/halfclose") == 2 })
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "path=/halfclose") && !strings.Contains(l, "status=499") {
			t.Fatalf("want status=499, have %s", l)
		}
	}
}

// A caller whose connection resets in the middle of a chunked trailer has
// gone (499), it did not send a malformed body (400).
func TestRZResetDuringTrailerIs499(t *testing.T) {
	var hits atomic.Int64
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) { hits.Add(1) })
	logs := &syncBuf{}
	s := startLogged(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()), logs)
	c, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "POST http://svc/trailer HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-A: b")
	// Once the handler runs, the reset lands in (or before) its read of
	// the trailer: either way the read fails on the connection.
	waitFor(t, "the request to reach the forwarder", func() bool { return status(t, s, "svc").Requests == 1 })
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	waitFor(t, "the request in the access log", func() bool { return strings.Contains(logs.String(), "path=/trailer") })
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "path=/trailer") && !strings.Contains(l, "status=499") {
			t.Fatalf("want status=499, have %s", l)
		}
	}
	if hits.Load() != 0 {
		t.Fatalf("the instance saw %d requests", hits.Load())
	}
}

// An error answer that leaves more of the body unread than a server
// discards says that the connection closes, as it then does.
func TestRZErrorAnswerOverALargeUnreadBodySaysClose(t *testing.T) {
	dead := rzClosedAddr(t)
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", dead))
	c, br := rawConn(t, s)
	const size = 1 << 20
	fmt.Fprintf(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n", size)
	go c.Write(make([]byte, size)) // may be cut off by the close
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway || !resp.Close {
		t.Fatalf("want a 502 that says close, have %d (close %v)", resp.StatusCode, resp.Close)
	}
}

// A client that sends its whole upload before reading (as Go's and most
// HTTP clients do) still gets the error answer when meshd closes the
// connection over a large unread body: meshd stops sending and lets the
// rest arrive for a moment instead of resetting the connection under it.
func TestRZLargeUploadToDeadInstanceGetsItsAnswer(t *testing.T) {
	dead := rzClosedAddr(t)
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", dead))
	body := strings.Repeat("x", 2<<20) // past what a server discards
	for i := 0; i < 5; i++ {
		st, _, err := rzDo(context.Background(), rzClient(s, 1), "POST", "http://svc/", body, nil)
		if err != nil || st != http.StatusBadGateway {
			t.Fatalf("upload %d: want 502, have %d %v", i, st, err)
		}
	}
}

// A connection that closes after its answer while the rest of the body has
// already arrived has nothing to wait for: it closes at once, it does not
// linger for the client to stop sending.
func TestFastPathNoLingerWhenTheRestIsBuffered(t *testing.T) {
	if os.Getenv("MESHD_TEST_FAST_PATH") == "off" {
		t.Skip("the fast path's own close")
	}
	old := lingerMax
	lingerMax = 10 * time.Second
	t.Cleanup(func() { lingerMax = old })
	b := newBackend(t, "b", nil)
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", b.addr()))
	c, br := rawConn(t, s)
	// A malformed timeout header: answered 400 before the body is read.
	io.WriteString(c, "POST http://svc/ HTTP/1.1\r\nHost: svc\r\nConnection: close\r\nX-Meshd-Timeout: bogus\r\nContent-Length: 3\r\n\r\nabc")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("want 400, have %d", resp.StatusCode)
	}
	// The client keeps its end open; a lingering server would hold the
	// connection (and Shutdown) for lingerMax.
	ctx, cancel := contextWithTimeout(5 * time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown waited on a connection with nothing left to read: %v", err)
	}
}

// A POST on a pooled connection that the instance closes after reading it
// may have been acted on: it is not sent again, neither by meshd's HTTP/1.1
// client nor by the retry policy (POST is not in retry.methods). A GET is.
func TestRZNonIdempotentNotResentAfterAStaleConnection(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var got sync.Map // method -> *atomic.Int64
	count := func(m string) *atomic.Int64 {
		v, _ := got.LoadOrStore(m, new(atomic.Int64))
		return v.(*atomic.Int64)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				br := bufio.NewReader(c)
				// The first request of a connection is answered; the
				// second is read whole, then the connection closes
				// unanswered (a crash, a deploy).
				for n := 0; ; n++ {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					count(req.Method).Add(1)
					if n > 0 && req.URL.Path != "/warm" {
						return
					}
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
				}
			}(c)
		}
	}()
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ln.Addr()))
	c := rzClient(s, 1)
	for _, tc := range []struct {
		method string
		status int
		sent   int64
	}{
		{"POST", http.StatusBadGateway, 1}, // reached the instance once; not again
		{"GET", http.StatusOK, 2},          // safe to repeat: sent again, answered
	} {
		// Warm a pooled connection, then send on it. (A request like
		// the one tested, so that the same client pools it: the event
		// loops send GETs without a body, the goroutine path the rest.)
		if st, _, err := rzDo(context.Background(), c, tc.method, "http://svc/warm", `{"id":1}`, nil); err != nil || st != 200 {
			t.Fatalf("warm-up: %d %v", st, err)
		}
		before := count(tc.method).Load()
		st, body, err := rzDo(context.Background(), c, tc.method, "http://svc/do", `{"id":1}`, nil)
		if err != nil || st != tc.status {
			t.Errorf("%s: want %d, have %d %q %v", tc.method, tc.status, st, body, err)
		}
		if n := count(tc.method).Load() - before; n != tc.sent {
			t.Errorf("%s: reached the instance %d times, want %d", tc.method, n, tc.sent)
		}
	}
}

// retry.on decides which statuses are retried, whether or not the breaker
// counts them (failure.statuses): a 500 or a 429 listed there is retried
// on the other instance.
func TestRZRetryOnStatusesTheBreakerIgnores(t *testing.T) {
	for _, tc := range []struct {
		on   string
		code int
	}{{"5xx", 500}, {`"429"`, 429}} {
		t.Run(tc.on, func(t *testing.T) {
			bad := newBackend(t, "bad", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "no", tc.code) })
			good := newBackend(t, "good", nil)
			s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s, %s]}}\nupstreams: {svc: {balance: {algorithm: round_robin}, retry: {on: [connect-failure, %s]}}}\n", bad.addr(), good.addr(), tc.on))
			c := rzClient(s, 1)
			for i := 0; i < 4; i++ {
				if st, body, err := rzDo(context.Background(), c, "GET", "http://svc/", "", nil); err != nil || st != 200 || body != "good" {
					t.Errorf("GET %d: want 200 from good, have %d %q %v", i, st, body, err)
				}
			}
			if bad.hits.Load() == 0 {
				t.Error("round robin never reached the bad instance: nothing was tested")
			}
			if st := rzInstance(t, s, "svc", bad.addr()).Breaker; st != "closed" {
				t.Errorf("the bad instance's breaker: want closed (%d is not in failure.statuses), have %s", tc.code, st)
			}
		})
	}
}

// A retry that finds no other instance passes on the answer it was
// retrying, instead of meshd's own 503 claiming every breaker is open; and
// when the retry had no answer to pass on, meshd's 503 says what it met.
func TestRZRetryWithNowhereToGo(t *testing.T) {
	dead := rzClosedAddr(t)
	var failing atomic.Bool
	sick := newBackend(t, "sick", func(w http.ResponseWriter, r *http.Request) {
		if !failing.Load() {
			io.WriteString(w, "fine")
			return
		}
		w.Header().Set("Retry-After", "7")
		http.Error(w, "maintenance until noon", http.StatusServiceUnavailable)
	})
	s := start(t, fmt.Sprintf(`
discovery: {static: {svc: [%s, %s]}}
upstreams: {svc: {balance: {algorithm: round_robin}, breaker: {consecutive_failures: 2, open_for: 1m}, retry: {backoff_base: 1ms, backoff_max: 1ms}}}
`, dead, sick.addr()))
	c := rzClient(s, 1)
	rzEventually(t, 5*time.Second, "the dead instance ejected", func() bool {
		rzDo(context.Background(), c, "GET", "http://svc/", "", nil)
		return rzInstance(t, s, "svc", dead).Breaker == "open"
	})
	failing.Store(true)
	resp, err := c.Get("http://svc/")
	if err != nil {
		t.Fatal(err)
	}
	body := readAll(t, resp)
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") != "7" || !strings.Contains(body, "maintenance until noon") {
		t.Errorf("want the instance's own 503 with Retry-After 7, have %d %q %q", resp.StatusCode, resp.Header.Get("Retry-After"), body)
	}
}

// A backoff that would outlast the request's budget is not waited out: the
// failure is answered at once, the instance's answer or the error itself.
func TestRZBackoffLongerThanTheBudgetIsNotWaited(t *testing.T) {
	dead := rzClosedAddr(t)
	sick := newBackend(t, "sick", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "sick", 503) })
	for _, tc := range []struct {
		name, addr string
		status     int
		body       string
	}{{"refused", dead, 502, "connect"}, {"503", sick.addr(), 503, "sick"}} {
		t.Run(tc.name, func(t *testing.T) {
			s := start(t, fmt.Sprintf(`
discovery: {static: {svc: [%s]}}
upstreams: {svc: {timeout: 2s, retry: {backoff_base: 1m, backoff_max: 1m}}}
`, tc.addr))
			c := rzClient(s, 1)
			t0 := time.Now()
			st, body, err := rzDo(context.Background(), c, "GET", "http://svc/", "", nil)
			if err != nil || st != tc.status || !strings.Contains(body, tc.body) {
				t.Errorf("want %d with %q, have %d %q %v", tc.status, tc.body, st, body, err)
			}
			// (Whatever the backoff draws, a wait is taken only when it
			// is shorter than what is left, so the answer comes within
			// the budget; waiting out the budget is the failure.)
			if d := time.Since(t0); d >= 2*time.Second {
				t.Errorf("answered after %v: the backoff was waited out to the end of the budget", d)
			}
		})
	}
}

// meshd's own 503 says why no instance was left: open breakers, instances
// tried already, or both, not "every circuit breaker is open" regardless.
func TestUnavailableWhy(t *testing.T) {
	eps := func(states ...balance.BreakerState) []*balance.Endpoint {
		var out []*balance.Endpoint
		for _, st := range states {
			s := &balance.Stats{}
			s.SetBreaker(st, time.Now().Add(time.Minute))
			out = append(out, &balance.Endpoint{Stats: s})
		}
		return out
	}
	open, closed := balance.BreakerOpen, balance.BreakerClosed
	for _, tc := range []struct {
		eps   []*balance.Endpoint
		tried int
		want  string
	}{
		{eps(open, open), 0, "every circuit breaker is open"},
		{eps(open, open), 1, "every circuit breaker is open"},
		{eps(open, closed), 1, "1 of 2 circuit breakers open, 1 instance(s) tried already"},
		{eps(closed, closed), 2, "0 of 2 circuit breakers open, 2 instance(s) tried already"},
	} {
		if have := unavailableWhy(tc.eps, tc.tried); have != tc.want {
			t.Errorf("want %q, have %q", tc.want, have)
		}
	}
}

// /upstreams counts an upstream's errors once per request, however many
// of its tries failed.
func TestUpstreamErrorsCountRequests(t *testing.T) {
	dead1, dead2, dead3 := rzClosedAddr(t), rzClosedAddr(t), rzClosedAddr(t)
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s, %s, %s]}}\nupstreams: {svc: {breaker: {disabled: true}, retry: {backoff_base: 1ms, backoff_max: 1ms}}}\n", dead1, dead2, dead3))
	c := rzClient(s, 1)
	st, body, err := rzDo(context.Background(), c, "GET", "http://svc/", "", nil)
	if err != nil || st != http.StatusBadGateway {
		t.Fatalf("want 502, have %d %q %v", st, body, err)
	}
	u := status(t, s, "svc")
	var tries uint64
	for _, in := range u.Instances {
		tries += in.Failures
	}
	if u.Requests != 1 || u.Errors != 1 || tries < 2 {
		t.Errorf("want 1 request, 1 error over %d failed tries (at least 2), have requests %d errors %d", tries, u.Requests, u.Errors)
	}
}
