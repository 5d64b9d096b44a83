// Command fault measures how meshd rides out the loss of an instance. It
// starts three HTTP backends in this process on 127.0.0.1, runs the meshd
// binary in front of them with the default resilience settings, sends a
// steady keep-alive load through meshd's outbound listener (routed by the
// Host header), kills one backend a third of the way through the run and
// brings it back on the same port at two thirds. It then prints the requests
// sent, the failures the application saw, the retries meshd made (from its
// /metrics), how long meshd took to eject the dead instance (its breaker
// open in /upstreams) and how long it took to use the instance again once
// it was back.
//
// Usage, from the repository root:
//
//	make build   # or: go build -o bin/meshd ./cmd/meshd
//	go run ./examples/bench/fault [-meshd bin/meshd] [-duration 10s] [-workers 8]
//
// The run lasts -duration; when the instance has not been used again by
// then, the load goes on for at most -recover-wait more. Everything the
// program starts is stopped before it exits. The exit status is 1 when meshd
// (or a backend) cannot be started, 2 for bad flags, 0 otherwise.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// upstream is the name the load addresses through meshd.
const upstream = "fault"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

type options struct {
	meshd       string
	duration    time.Duration
	workers     int
	recoverWait time.Duration
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("fault", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.StringVar(&o.meshd, "meshd", "bin/meshd", "path to the meshd binary (make build)")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "length of the load run")
	fs.IntVar(&o.workers, "workers", 8, "concurrent clients, each with one request in flight")
	fs.DurationVar(&o.recoverWait, "recover-wait", 30*time.Second, "how much longer the load may run while waiting for the restarted instance to be used again")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if o.duration < 300*time.Millisecond || o.workers < 1 || o.recoverWait < 0 {
		fmt.Fprintln(stderr, "fault: -duration must be at least 300ms, -workers at least 1, -recover-wait not negative")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	code, err := bench(ctx, o, stdout)
	if err != nil {
		fmt.Fprintf(stderr, "fault: %v\n", err)
	}
	return code
}

// backend is one in-process HTTP instance that can be killed and restarted
// on the same address. Its methods are called from the controlling
// goroutine only; hits is safe for concurrent use.
type backend struct {
	name string
	addr string
	hits atomic.Int64
	srv  *http.Server
}

// start listens on b.addr (a free port the first time) and serves.
func (b *backend) start() error {
	addr := b.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var ln net.Listener
	var err error
	// A just-closed port may take a moment to be free again.
	for deadline := time.Now().Add(2 * time.Second); ; {
		if ln, err = net.Listen("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("backend %s: listen %s: %w", b.name, addr, err)
	}
	b.addr = ln.Addr().String()
	body := []byte(b.name + "\n")
	b.srv = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b.hits.Add(1)
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.Write(body)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go b.srv.Serve(ln)
	return nil
}

// kill closes the listener and every connection at once, like a crashed process.
func (b *backend) kill() {
	if b.srv != nil {
		b.srv.Close()
		b.srv = nil
	}
}

// meshd is the running sidecar process.
type meshd struct {
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // set before exited is closed
	log    *lockedBuffer
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// tail returns the last n lines written.
func (l *lockedBuffer) tail(n int) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	lines := strings.Split(strings.TrimRight(l.b.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func startMeshd(path, config string) (*meshd, error) {
	m := &meshd{exited: make(chan struct{}), log: &lockedBuffer{}}
	m.cmd = exec.Command(path, "run", "--config", config)
	m.cmd.Stdout = m.log
	m.cmd.Stderr = m.log
	if err := m.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting meshd %s: %w", path, err)
	}
	go func() {
		m.err = m.cmd.Wait()
		close(m.exited)
	}()
	return m, nil
}

// stop asks meshd to drain and exit, and kills it if it has not after 10s.
func (m *meshd) stop() {
	select {
	case <-m.exited:
		return
	default:
	}
	m.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case <-m.exited:
	case <-t.C:
		m.cmd.Process.Kill()
		<-m.exited
	}
}

// waitReady polls /ready until meshd answers 200, exits, or timeout passes.
func (m *meshd) waitReady(ctx context.Context, admin string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	c := &http.Client{Timeout: time.Second}
	var last string
	for {
		select {
		case <-m.exited:
			return fmt.Errorf("meshd exited before it was ready (%v); its last output:\n%s", m.err, m.log.tail(20))
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		resp, err := c.Get("http://" + admin + "/ready")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(b)))
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("meshd not ready after %v (last answer: %s); its last output:\n%s", timeout, last, m.log.tail(20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// load is the application's side: workers sending GETs through meshd.
type load struct {
	requests atomic.Int64
	failures atomic.Int64
	mu       sync.Mutex
	firstErr []string
	lat      []time.Duration
}

func (l *load) worker(ctx context.Context, c *http.Client, outbound string) {
	lat := make([]time.Duration, 0, 4096)
	defer func() {
		l.mu.Lock()
		l.lat = append(l.lat, lat...)
		l.mu.Unlock()
	}()
	for ctx.Err() == nil {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+outbound+"/work", nil)
		if err != nil {
			l.fail(err.Error())
			return
		}
		req.Host = upstream
		t0 := time.Now()
		resp, err := c.Do(req)
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		if ctx.Err() != nil && err != nil {
			return // stopped by us: not a failure
		}
		lat = append(lat, time.Since(t0))
		l.requests.Add(1)
		switch {
		case err != nil:
			l.fail(err.Error())
		case resp.StatusCode != http.StatusOK:
			l.fail(fmt.Sprintf("status %d from %s", resp.StatusCode, resp.Header.Get("X-Meshd-Error")))
		}
	}
}

func (l *load) fail(msg string) {
	l.failures.Add(1)
	l.mu.Lock()
	if len(l.firstErr) < 5 {
		l.firstErr = append(l.firstErr, msg)
	}
	l.mu.Unlock()
}

// breakerOf reads the breaker state of the instance at addr from /upstreams.
func breakerOf(c *http.Client, admin, addr string) (string, error) {
	resp, err := c.Get("http://" + admin + "/upstreams")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var doc struct {
		Upstreams []struct {
			Name      string `json:"name"`
			Instances []struct {
				Address string `json:"address"`
				Breaker string `json:"breaker"`
			} `json:"instances"`
		} `json:"upstreams"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		return "", fmt.Errorf("decoding /upstreams: %w", err)
	}
	for _, u := range doc.Upstreams {
		for _, in := range u.Instances {
			if u.Name == upstream && in.Address == addr {
				return in.Breaker, nil
			}
		}
	}
	return "", fmt.Errorf("/upstreams lists no instance %s", addr)
}

// retries sums meshd_retries_total by cause from the admin /metrics.
func retries(c *http.Client, admin string) (total float64, byCause map[string]float64, err error) {
	resp, err := c.Get("http://" + admin + "/metrics")
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, nil, fmt.Errorf("/metrics answered %d", resp.StatusCode)
	}
	byCause = map[string]float64{}
	found := false
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "# TYPE meshd_retries_total ") {
			found = true
		}
		if !strings.HasPrefix(line, "meshd_retries_total{") && !strings.HasPrefix(line, "meshd_retries_total ") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, perr := strconv.ParseFloat(line[i+1:], 64)
		if perr != nil {
			continue
		}
		found = true
		total += v
		cause := "?"
		if _, rest, ok := strings.Cut(line, `meshd_retry_cause="`); ok {
			cause, _, _ = strings.Cut(rest, `"`)
		}
		byCause[cause] += v
	}
	if err := sc.Err(); err != nil {
		return 0, nil, fmt.Errorf("reading /metrics: %w", err)
	}
	if !found {
		return 0, nil, errors.New("/metrics has no meshd_retries_total")
	}
	return total, byCause, nil
}

func bench(ctx context.Context, o options, out io.Writer) (int, error) {
	if _, err := os.Stat(o.meshd); err != nil {
		return 1, fmt.Errorf("meshd binary: %w (build it with: make build)", err)
	}
	bs := []*backend{{name: "b1"}, {name: "b2"}, {name: "b3"}}
	defer func() {
		for _, b := range bs {
			b.kill()
		}
	}()
	for _, b := range bs {
		if err := b.start(); err != nil {
			return 1, err
		}
	}
	victim := bs[2]

	dir, err := os.MkdirTemp("", "meshd-fault")
	if err != nil {
		return 1, err
	}
	defer os.RemoveAll(dir)
	outbound, err := freePort()
	if err != nil {
		return 1, err
	}
	admin, err := freePort()
	if err != nil {
		return 1, err
	}
	config := fmt.Sprintf(`# written by examples/bench/fault
listen: {outbound: %s, admin: %s}
discovery:
  static:
    %s: [%s, %s, %s]
upstreams:
  %s: {}
log: {access: false}
`, outbound, admin, upstream, bs[0].addr, bs[1].addr, bs[2].addr, upstream)
	cfgPath := filepath.Join(dir, "meshd.yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		return 1, err
	}
	m, err := startMeshd(o.meshd, cfgPath)
	if err != nil {
		return 1, err
	}
	defer m.stop()
	if err := m.waitReady(ctx, admin, 10*time.Second); err != nil {
		return 1, err
	}

	admC := &http.Client{Timeout: 2 * time.Second}
	appC := &http.Client{
		Transport: &http.Transport{MaxIdleConns: o.workers * 2, MaxIdleConnsPerHost: o.workers * 2, IdleConnTimeout: time.Minute},
		Timeout:   30 * time.Second,
	}
	defer appC.CloseIdleConnections()

	var l load
	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	var wg sync.WaitGroup
	began := time.Now()
	for i := 0; i < o.workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.worker(loadCtx, appC, outbound)
		}()
	}

	// The fault timeline, driven from here and observed every 10ms.
	var (
		killAt, restartAt           time.Time
		ejectedAfter, servedAfter   time.Duration
		closedAfter                 time.Duration
		hitsAtRestart               int64
		killed, restarted           bool
		ejected, served, closedSeen bool
		pollErr                     error
	)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	hardStop := began.Add(o.duration + o.recoverWait)
loop:
	for {
		now := time.Now()
		el := now.Sub(began)
		if !killed && el >= o.duration/3 {
			victim.kill()
			killed, killAt = true, time.Now()
		}
		if killed && !restarted && el >= 2*o.duration/3 {
			hitsAtRestart = victim.hits.Load()
			if err := victim.start(); err != nil {
				stopLoad()
				wg.Wait()
				return 1, fmt.Errorf("restarting %s: %w", victim.name, err)
			}
			restarted, restartAt = true, time.Now()
		}
		if killed && (!ejected || (restarted && !closedSeen)) {
			st, err := breakerOf(admC, admin, victim.addr)
			if err != nil {
				pollErr = err
			}
			if !ejected && st == "open" {
				ejected, ejectedAfter = true, time.Since(killAt)
			}
			if restarted && ejected && !closedSeen && st == "closed" {
				closedSeen, closedAfter = true, time.Since(restartAt)
			}
		}
		if restarted && !served && victim.hits.Load() > hitsAtRestart {
			served, servedAfter = true, time.Since(restartAt)
		}
		if el >= o.duration && ((served && closedSeen) || now.After(hardStop)) {
			break
		}
		select {
		case <-ctx.Done():
			break loop
		case <-m.exited:
			stopLoad()
			wg.Wait()
			return 1, fmt.Errorf("meshd exited during the run (%v); its last output:\n%s", m.err, m.log.tail(20))
		case <-tick.C:
		}
	}
	stopLoad()
	wg.Wait()
	ran := time.Since(began)

	total, byCause, rerr := retries(admC, admin)
	reqs, fails := l.requests.Load(), l.failures.Load()
	sort.Slice(l.lat, func(i, j int) bool { return l.lat[i] < l.lat[j] })
	pct := func(p float64) time.Duration {
		if len(l.lat) == 0 {
			return 0
		}
		return l.lat[min(len(l.lat)-1, int(p*float64(len(l.lat))))]
	}

	fmt.Fprintf(out, "meshd fault benchmark: 3 backends, %d workers, %v load (default resilience settings)\n", o.workers, o.duration)
	fmt.Fprintf(out, "  run time            %v\n", ran.Round(time.Millisecond))
	fmt.Fprintf(out, "  requests            %d (%.0f/s)\n", reqs, float64(reqs)/ran.Seconds())
	fmt.Fprintf(out, "  failures (app)      %d\n", fails)
	for _, e := range l.firstErr {
		fmt.Fprintf(out, "                      e.g. %s\n", e)
	}
	fmt.Fprintf(out, "  latency             p50 %v  p99 %v  max %v\n", pct(0.50).Round(time.Microsecond), pct(0.99).Round(time.Microsecond), pct(1).Round(time.Microsecond))
	if rerr != nil {
		fmt.Fprintf(out, "  retries             unknown: %v\n", rerr)
	} else {
		causes := make([]string, 0, len(byCause))
		for c, v := range byCause {
			causes = append(causes, fmt.Sprintf("%s %.0f", c, v))
		}
		sort.Strings(causes)
		fmt.Fprintf(out, "  retries             %.0f (%s)\n", total, strings.Join(causes, ", "))
	}
	if killed {
		fmt.Fprintf(out, "  killed              %s (%s) at %v\n", victim.name, victim.addr, killAt.Sub(began).Round(time.Millisecond))
	}
	if ejected {
		fmt.Fprintf(out, "  time to eject       %v (kill -> /upstreams shows its breaker open)\n", ejectedAfter.Round(time.Millisecond))
	} else {
		fmt.Fprintf(out, "  time to eject       not observed (breaker never shown open)\n")
	}
	if restarted {
		fmt.Fprintf(out, "  restarted           at %v\n", restartAt.Sub(began).Round(time.Millisecond))
	}
	if served {
		fmt.Fprintf(out, "  time to recover     %v (restart -> first request served by it)\n", servedAfter.Round(time.Millisecond))
	} else {
		fmt.Fprintf(out, "  time to recover     not observed within the run\n")
	}
	if closedSeen {
		fmt.Fprintf(out, "  breaker closed      %v after the restart\n", closedAfter.Round(time.Millisecond))
	} else if restarted {
		fmt.Fprintf(out, "  breaker closed      not observed within the run\n")
	}
	if pollErr != nil {
		fmt.Fprintf(out, "  note                polling /upstreams failed at least once: %v\n", pollErr)
	}
	return 0, nil
}
