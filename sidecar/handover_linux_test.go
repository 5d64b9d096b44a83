//go:build linux

package sidecar

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/meshd/meshd/telemetry"
)

// A request the loop sent natively, whose answer it hands over (chunked),
// after a reload that gave the upstream a transport without the h1 client
// (max_conns_per_instance): forward must still read the answer.
func TestEventLoopHandOverAfterAReloadDroppedItsClient(t *testing.T) {
	arrived := make(chan struct{}, 1)
	release := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock)
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-release
		w.(http.Flusher).Flush() // chunked: not the loop's to pass on
		io.WriteString(w, "done")
	})
	conf := func(extra string) string {
		return fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {%s}}\n", b.addr(), extra)
	}
	s := start(t, conf(""))
	e := engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET /x HTTP/1.1\r\nHost: svc\r\n\r\n")
	<-arrived
	cfg, err := parseConfig(conf("max_conns_per_instance: 4"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	unblock()
	resp, err := http.ReadResponse(c.br, &http.Request{Method: "GET"})
	if err != nil {
		t.Fatalf("handed over %d; reading the answer: %v", e.handed.Load(), err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(body) != "done" {
		t.Fatalf("%d %q", resp.StatusCode, body)
	}
}

// A caller's b3 header that defers the sampling decision is passed on so
// by every attempt, the retry of a request the loop began included.
func TestEventLoopKeepsB3DeferredOnARetry(t *testing.T) {
	var mu sync.Mutex
	var seen []string
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("B3"))
		n := len(seen)
		mu.Unlock()
		if n == 1 {
			w.WriteHeader(503)
			return
		}
		io.WriteString(w, "ok")
	})
	rec := tracetest.NewSpanRecorder()
	tel, err := telemetry.NewTestProvider(rec, telemetry.Config{Propagators: []string{"b3"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tel.Shutdown(context.Background()) })
	cfg, err := parseConfig(fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {retry: {backoff_base: 1ms, backoff_max: 1ms}}}\n", b.addr()))
	if err != nil {
		t.Fatal(err)
	}
	s := startWithTelemetry(t, cfg, testLogger(t), tel)
	waitReady(t, s)
	if os.Getenv("MESHD_TEST_FAST_PATH") == "" {
		engineOf(t, s)
	}
	c := dialRaw(t, s)
	c.send("GET /x HTTP/1.1\r\nHost: svc\r\nB3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1\r\n\r\n")
	resp, body := c.answer("GET")
	mu.Lock()
	defer mu.Unlock()
	t.Logf("answer %d %q; b3 per attempt: %q", resp.StatusCode, body, seen)
	for i, v := range seen {
		if strings.HasSuffix(v, "-0") || strings.HasSuffix(v, "-1") {
			t.Errorf("attempt %d sent %q: the caller deferred the sampling decision", i+1, v)
		}
	}
}

// A request on a listener a reload retired is still in flight when
// Shutdown begins: Shutdown waits for it (or reports the drain cut), not
// return "all requests completed" while it runs.
func TestShutdownWaitsForAListenerAReloadRetired(t *testing.T) {
	arrived := make(chan struct{}, 1)
	release := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock)
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-release
		io.WriteString(w, "done")
	})
	conf := func(port string) string {
		return fmt.Sprintf("listen: {outbound: 127.0.0.1:%s, admin: 127.0.0.1:0}\ndiscovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", port, b.addr())
	}
	cfg, err := parseConfig(conf("0"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(cfg, testLogger(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	waitReady(t, s)
	c := dialRaw(t, s)
	c.send("GET /x HTTP/1.1\r\nHost: svc\r\n\r\n")
	<-arrived
	next, err := parseConfig(conf("00")) // another address string: rebound
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(next); err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(300*time.Millisecond, unblock) // the request ends while Shutdown runs
	ctx, cancel := contextWithTimeout(5 * time.Second)
	defer cancel()
	t0 := time.Now()
	err = s.Shutdown(ctx)
	took := time.Since(t0)
	select {
	case <-release:
	default:
		t.Errorf("Shutdown returned %v after %v while a request on the retired listener was still in flight", err, took)
	}
}

// A reload closes the loops' idle connections to instances, as it retires
// the h1 client's: new settings (a connection cap, h2c) must not find old
// connections still open.
func TestEventLoopReloadDropsIdleInstanceConnections(t *testing.T) {
	closed := make(chan struct{}, 4)
	b := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	b.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateClosed {
			closed <- struct{}{}
		}
	}
	b.Start()
	t.Cleanup(b.Close)
	conf := func(extra string) string {
		return fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {%s}}\n", b.Listener.Addr(), extra)
	}
	s := start(t, conf(""))
	engineOf(t, s)
	c := dialRaw(t, s)
	c.send("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("%d %q", resp.StatusCode, body)
	}
	cfg, err := parseConfig(conf("max_conns_per_instance: 4"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("the loop's idle connection to the instance is still open after the reload")
	}
}

// Every proxy listener, dedicated ones too, is served by the sidecar's one
// set of loops: more listeners do not mean more loops competing for the
// processors. A dedicated listener's requests name the upstream as Host.
func TestEventLoopsAreSharedByTheListeners(t *testing.T) {
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Host) })
	s := start(t, fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {listen: 127.0.0.1:0}}\n", b.addr()))
	e := engineOf(t, s)
	s.mu.Lock()
	dedicated := s.listeners["upstream:svc"]
	s.mu.Unlock()
	if dedicated == nil || dedicated.fast == nil || dedicated.fast.eng != e {
		t.Fatal("the dedicated listener is not served by the sidecar's loops")
	}
	for _, addr := range []string{s.Addr("outbound"), s.Addr("upstream:svc")} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		lc := &loopConn{t: t, c: c, br: bufio.NewReader(c)}
		lc.send("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
		if resp, body := lc.answer("GET"); resp.StatusCode != 200 || body != "svc" {
			t.Fatalf("via %s: %d %q", addr, resp.StatusCode, body)
		}
		c.Close()
	}
	if n := e.native.Load(); n != 2 {
		t.Errorf("the loops answered %d of the 2 requests", n)
	}
}

// When b3 is propagated, a caller's b3 fields of the other form do not
// reach the instance, whichever path sends the request: the loop copies
// the caller's fields from its head, so it must leave those out itself.
func TestCallersOtherB3FormIsNotPassedOn(t *testing.T) {
	for _, tc := range []struct {
		prop, send, gone, kept string
	}{
		{"b3multi", "b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1", "B3", "X-B3-Traceid"},
		{"b3", "X-B3-TraceId: 80f198ee56343ba864fe8b2a57d3eff7\r\nX-B3-SpanId: e457b5a2e4d86bd1\r\nX-B3-Sampled: 1", "X-B3-Traceid", "B3"},
	} {
		t.Run(tc.prop, func(t *testing.T) {
			ri := newRawInstance(t, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			tel, err := telemetry.NewTestProvider(tracetest.NewSpanRecorder(), telemetry.Config{Propagators: []string{tc.prop}})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { tel.Shutdown(context.Background()) })
			cfg, err := parseConfig(fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ri.ln.Addr()))
			if err != nil {
				t.Fatal(err)
			}
			s := startWithTelemetry(t, cfg, testLogger(t), tel)
			waitReady(t, s)
			c := dialRaw(t, s)
			c.send("GET /x HTTP/1.1\r\nHost: svc\r\n" + tc.send + "\r\nX-Other: 1\r\n\r\n")
			if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "ok" {
				t.Fatalf("%d %q", resp.StatusCode, body)
			}
			heads := ri.seen()
			if len(heads) != 1 {
				t.Fatalf("the instance saw %d requests", len(heads))
			}
			tp := textproto.NewReader(bufio.NewReader(strings.NewReader(heads[0])))
			tp.ReadLine()
			h, err := tp.ReadMIMEHeader()
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := h[tc.gone]; ok {
				t.Errorf("the caller's %s reached the instance: %q", tc.gone, heads[0])
			}
			if _, ok := h[tc.kept]; !ok || h.Get("X-Other") != "1" {
				t.Errorf("the instance did not get %s and X-Other: %q", tc.kept, heads[0])
			}
			if !strings.Contains(heads[0], "80f198ee56343ba864fe8b2a57d3eff7") {
				t.Errorf("the caller's trace was not continued: %q", heads[0])
			}
		})
	}
}

// A caller's baggage in two fields reaches the instance whole, whichever
// path sends the request (GET: the loop's; DELETE: the goroutine path's).
func TestBaggageInTwoFieldsIsPassedOnWhole(t *testing.T) {
	for _, method := range []string{"GET", "DELETE"} {
		t.Run(method, func(t *testing.T) {
			ri := newRawInstance(t, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			tel, err := telemetry.NewTestProvider(tracetest.NewSpanRecorder(), telemetry.Config{Propagators: []string{"tracecontext", "baggage"}})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { tel.Shutdown(context.Background()) })
			cfg, err := parseConfig(fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ri.ln.Addr()))
			if err != nil {
				t.Fatal(err)
			}
			s := startWithTelemetry(t, cfg, testLogger(t), tel)
			waitReady(t, s)
			c := dialRaw(t, s)
			c.send(method + " /x HTTP/1.1\r\nHost: svc\r\nbaggage: a=1\r\nbaggage: b=2\r\n\r\n")
			if resp, body := c.answer(method); resp.StatusCode != 200 || body != "ok" {
				t.Fatalf("%d %q", resp.StatusCode, body)
			}
			heads := ri.seen()
			if len(heads) != 1 {
				t.Fatalf("the instance saw %d requests", len(heads))
			}
			tp := textproto.NewReader(bufio.NewReader(strings.NewReader(heads[0])))
			tp.ReadLine()
			h, err := tp.ReadMIMEHeader()
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(h.Values("Baggage"), ","); !strings.Contains(got, "a=1") || !strings.Contains(got, "b=2") {
				t.Errorf("the instance got baggage %q, want a=1 and b=2:\n%q", got, heads[0])
			}
		})
	}
}

// A caller's tracestate goes on with its trace: kept beside a valid
// traceparent, dropped when meshd starts a new trace, on every path.
func TestCallersTracestateFollowsItsTrace(t *testing.T) {
	const parent = "00-80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-01"
	for _, tc := range []struct {
		name, send, state string
	}{
		{"valid parent", "traceparent: " + parent + "\r\ntracestate: k=v\r\n", "k=v"},
		{"no parent", "tracestate: k=v\r\n", ""},
		{"bad parent", "traceparent: 00-zz-e457b5a2e4d86bd1-01\r\ntracestate: k=v\r\n", ""},
	} {
		for _, method := range []string{"GET", "DELETE"} {
			t.Run(tc.name+"/"+method, func(t *testing.T) {
				ri := newRawInstance(t, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
				tel, err := telemetry.NewTestProvider(tracetest.NewSpanRecorder(), telemetry.Config{Propagators: []string{"tracecontext"}})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { tel.Shutdown(context.Background()) })
				cfg, err := parseConfig(fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\n", ri.ln.Addr()))
				if err != nil {
					t.Fatal(err)
				}
				s := startWithTelemetry(t, cfg, testLogger(t), tel)
				waitReady(t, s)
				c := dialRaw(t, s)
				c.send(method + " /x HTTP/1.1\r\nHost: svc\r\n" + tc.send + "\r\n")
				if resp, body := c.answer(method); resp.StatusCode != 200 || body != "ok" {
					t.Fatalf("%d %q", resp.StatusCode, body)
				}
				heads := ri.seen()
				if len(heads) != 1 {
					t.Fatalf("the instance saw %d requests", len(heads))
				}
				tp := textproto.NewReader(bufio.NewReader(strings.NewReader(heads[0])))
				tp.ReadLine()
				h, err := tp.ReadMIMEHeader()
				if err != nil {
					t.Fatal(err)
				}
				if got := strings.Join(h.Values("Tracestate"), ","); got != tc.state {
					t.Errorf("the instance got tracestate %q, want %q:\n%q", got, tc.state, heads[0])
				}
				if tp := h.Values("Traceparent"); len(tp) != 1 || tc.state != "" && !strings.Contains(tp[0], "80f198ee56343ba864fe8b2a57d3eff7") {
					t.Errorf("the instance got traceparent %q", tp)
				}
			})
		}
	}
}

// Requests the sampler drops keep their spans in the loop's try (see
// etry.lean), which the next request on the connection reuses: each must
// still go to the instance with a traceparent of its own, and be logged
// with that trace, not a later request's.
func TestEventLoopDroppedTracesInTheTry(t *testing.T) {
	ri := newRawInstance(t, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	zero := 0.0
	tel, err := telemetry.NewTestProvider(tracetest.NewSpanRecorder(), telemetry.Config{SampleRatio: &zero})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tel.Shutdown(context.Background()) })
	cfg, err := parseConfig(fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\nlog: {access: true}\n", ri.ln.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuf
	s := startWithTelemetry(t, cfg, slog.New(slog.NewTextHandler(&logs, nil)), tel)
	waitReady(t, s)
	engineOf(t, s)
	c := dialRaw(t, s)
	const n = 5
	for i := range n {
		c.send(fmt.Sprintf("GET /r%d HTTP/1.1\r\nHost: svc\r\n\r\n", i))
		if resp, body := c.answer("GET"); resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, body)
		}
	}
	heads := ri.seen()
	if len(heads) != n {
		t.Fatalf("the instance saw %d requests, want %d", len(heads), n)
	}
	traces := map[string]bool{}
	for i, h := range heads {
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(h)))
		if err != nil {
			t.Fatalf("request %d to the instance: %v", i, err)
		}
		tp := req.Header.Values("Traceparent")
		parts := strings.Split(strings.Join(tp, ""), "-")
		if len(tp) != 1 || len(parts) != 4 || parts[0] != "00" || len(parts[1]) != 32 || len(parts[2]) != 16 || parts[3] != "00" {
			t.Fatalf("request %d (%s) went with traceparent %q, want one, not sampled", i, req.URL.Path, tp)
		}
		if traces[parts[1]] {
			t.Fatalf("request %d went with trace %s, as an earlier one did", i, parts[1])
		}
		traces[parts[1]] = true
		// The access line is written when the request ends, before the
		// next one starts in the same try.
		if want := fmt.Sprintf("path=/r%d status=200", i); !strings.Contains(logs.String(), want) {
			t.Fatalf("no access line with %q in:\n%s", want, logs.String())
		}
		found := false
		for _, line := range strings.Split(logs.String(), "\n") {
			if strings.Contains(line, fmt.Sprintf("path=/r%d ", i)) {
				found = strings.Contains(line, "trace_id="+parts[1])
			}
		}
		if !found {
			t.Errorf("request %d's access line does not name its trace %s:\n%s", i, parts[1], logs.String())
		}
	}
}

// accessKeeper is a log handler that keeps what it is given: each access
// line's trace ID as logged, and the context, read again only later (as a
// handler that writes in the background would).
type accessKeeper struct {
	mu   sync.Mutex
	tids map[string][]string // path -> trace IDs logged
	ctxs map[string]context.Context
}

func (h *accessKeeper) Enabled(context.Context, slog.Level) bool { return true }
func (h *accessKeeper) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *accessKeeper) WithGroup(string) slog.Handler            { return h }
func (h *accessKeeper) Handle(ctx context.Context, r slog.Record) error {
	if r.Message != "access" {
		return nil
	}
	var path, tid string
	r.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "path":
			path = a.Value.String()
		case "trace_id":
			tid = a.Value.String()
		}
		return true
	})
	h.mu.Lock()
	h.tids[path] = append(h.tids[path], tid)
	h.ctxs[path] = ctx
	h.mu.Unlock()
	return nil
}

// Requests the sampler drops, some served on the loop and some handed to
// the goroutine path (a slow answer past the try's timeout, a 503 retried,
// a chunked answer, an instance whose breaker is open), pipelined on
// several connections: each is sent to the instance with its own trace and
// logged with that trace, and the context the log handler kept still names
// it after the loop has reused the request's memory for others.
func TestEventLoopDroppedTracesHandedOver(t *testing.T) {
	var mu sync.Mutex
	seen := map[string][]string{} // path -> trace IDs the instance got
	var retried sync.Map
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		tid := "none"
		if parts := strings.Split(r.Header.Get("Traceparent"), "-"); len(parts) == 4 {
			tid = parts[1]
		}
		mu.Lock()
		seen[r.URL.Path] = append(seen[r.URL.Path], tid)
		mu.Unlock()
		switch {
		case strings.HasPrefix(r.URL.Path, "/slow/"):
			time.Sleep(30 * time.Millisecond)
		case strings.HasPrefix(r.URL.Path, "/r503/"):
			if _, again := retried.LoadOrStore(r.URL.Path, true); !again {
				w.WriteHeader(503)
				return
			}
		case strings.HasPrefix(r.URL.Path, "/chunk/"):
			w.(http.Flusher).Flush()
		}
		io.WriteString(w, "ok")
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String() // refuses connections once closed
	ln.Close()
	zero := 0.0
	tel, err := telemetry.NewTestProvider(tracetest.NewSpanRecorder(), telemetry.Config{SampleRatio: &zero})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tel.Shutdown(context.Background()) })
	cfg, err := parseConfig(fmt.Sprintf(`discovery: {static: {svc: [%s], dead: [%s]}}
upstreams:
  svc: {timeouts: {per_try: 10ms}, retry: {backoff_base: 1ms, backoff_max: 1ms}}
  dead: {breaker: {consecutive_failures: 1, open_for: 10s}, retry: {disabled: true}}
log: {access: true}
`, b.addr(), dead))
	if err != nil {
		t.Fatal(err)
	}
	h := &accessKeeper{tids: map[string][]string{}, ctxs: map[string]context.Context{}}
	s := startWithTelemetry(t, cfg, slog.New(h), tel)
	waitReady(t, s)
	e := engineOf(t, s)
	kinds := []string{"ok", "ok", "ok", "slow", "r503", "chunk", "dead"}
	const conns, per, burst = 4, 28, 4
	var wg sync.WaitGroup
	for ci := range conns {
		c := dialRaw(t, s)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i += burst {
				var sb strings.Builder
				for j := i; j < i+burst; j++ {
					k := kinds[(ci+j)%len(kinds)]
					host := "svc"
					if k == "dead" {
						host = "dead"
					}
					fmt.Fprintf(&sb, "GET /%s/%d-%d HTTP/1.1\r\nHost: %s\r\n\r\n", k, ci, j, host)
				}
				if _, err := c.c.Write([]byte(sb.String())); err != nil {
					t.Errorf("connection %d: %v", ci, err)
					return
				}
				for range burst {
					resp, err := http.ReadResponse(c.br, &http.Request{Method: "GET"})
					if err != nil {
						t.Errorf("connection %d: %v", ci, err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}
		}()
	}
	wg.Wait()
	// Every answer is read, but a request's access line may follow its
	// answer: wait for all of them.
	deadline := time.Now().Add(5 * time.Second)
	for {
		h.mu.Lock()
		n := len(h.tids)
		h.mu.Unlock()
		if n == conns*per || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	mu.Lock()
	defer mu.Unlock()
	if len(h.tids) != conns*per {
		t.Fatalf("%d requests logged, want %d", len(h.tids), conns*per)
	}
	byTrace := map[string]string{}
	for path, logged := range h.tids {
		if len(logged) != 1 || len(logged[0]) != 32 {
			t.Errorf("%s logged with traces %q, want one", path, logged)
			continue
		}
		tid := logged[0]
		if other, dup := byTrace[tid]; dup {
			t.Errorf("%s and %s logged with the same trace %s", path, other, tid)
		}
		byTrace[tid] = path
		for _, got := range seen[path] {
			if got != tid {
				t.Errorf("%s: the instance got trace %s, the access line says %s", path, got, tid)
			}
		}
		if kept := trace.SpanContextFromContext(h.ctxs[path]).TraceID().String(); kept != tid {
			t.Errorf("%s: the context the log handler kept names trace %s now, %s when logged", path, kept, tid)
		}
	}
	if e.native.Load() == 0 || e.handed.Load() == 0 {
		t.Errorf("requests served on the loop: %d, handed over: %d; want both", e.native.Load(), e.handed.Load())
	}
}
