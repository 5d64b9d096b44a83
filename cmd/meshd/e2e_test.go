package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

var binPath string

func TestMain(m *testing.M) {
	code := func() int {
		binPath = os.Getenv("MESHD_BIN")
		if binPath == "" {
			dir, err := os.MkdirTemp("", "meshd-bin")
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			defer os.RemoveAll(dir)
			binPath = filepath.Join(dir, "meshd")
			out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
			if err != nil {
				fmt.Fprintf(os.Stderr, "building meshd: %v\n%s", err, out)
				return 1
			}
		}
		return m.Run()
	}()
	os.Exit(code)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// proc is a running meshd binary whose log lines can be awaited.
type proc struct {
	cmd   *exec.Cmd
	mu    sync.Mutex
	lines []string
	grew  chan struct{}
	done  chan struct{}
	err   error
}

func startMeshd(t *testing.T, configPath string) *proc {
	t.Helper()
	p := &proc{grew: make(chan struct{}, 1), done: make(chan struct{})}
	p.cmd = exec.Command(binPath, "run", "--config", configPath, "--log-format", "json")
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
			select {
			case p.grew <- struct{}{}:
			default:
			}
		}
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			p.mu.Lock()
			t.Logf("meshd log:\n%s", strings.Join(p.lines, "\n"))
			p.mu.Unlock()
		}
	})
	return p
}

// waitLog waits until n log lines contain substr.
func (p *proc) waitLog(t *testing.T, substr string, n int) {
	t.Helper()
	deadline := time.After(15 * time.Second)
	for {
		p.mu.Lock()
		count := 0
		for _, l := range p.lines {
			if strings.Contains(l, substr) {
				count++
			}
		}
		p.mu.Unlock()
		if count >= n {
			return
		}
		select {
		case <-p.grew:
		case <-p.done:
			t.Fatalf("meshd exited (%v) before logging %q", p.err, substr)
		case <-deadline:
			t.Fatalf("meshd did not log %q %d times within 15s", substr, n)
		}
	}
}

func (p *proc) wait(t *testing.T) error {
	t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(30 * time.Second):
		t.Fatal("meshd did not exit within 30s")
		return nil
	}
}

func writeConfig(t *testing.T, path, outbound, admin string, backends []string, algorithm string) {
	t.Helper()
	cfg := fmt.Sprintf(`listen: {outbound: %s, admin: %s}
discovery:
  static:
    payments: [%s]
upstreams:
  payments:
    balance: {algorithm: %s}
proxy: {drain: 10s}
`, outbound, admin, strings.Join(backends, ", "), algorithm)
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
}

func waitReady(t *testing.T, admin string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get("http://" + admin + "/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("meshd not ready within 10s")
}

func proxyClient(outbound string) *http.Client {
	u, _ := url.Parse("http://" + outbound)
	return &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(u), MaxIdleConnsPerHost: 64}, Timeout: 20 * time.Second}
}

func TestSIGTERMDrainsInFlightRequests(t *testing.T) {
	const n = 20
	arrived := make(chan struct{}, n)
	release := make(chan struct{})
	b := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-release
		io.WriteString(w, "done")
	})}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	go b.Serve(ln)
	defer b.Close()

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "meshd.yaml")
	outbound, admin := freeAddr(t), freeAddr(t)
	writeConfig(t, cfgPath, outbound, admin, []string{ln.Addr().String()}, "round_robin")
	p := startMeshd(t, cfgPath)
	waitReady(t, admin)

	c := proxyClient(outbound)
	var wg sync.WaitGroup
	results := make(chan string, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := c.Get("http://payments/slow")
			if err != nil {
				results <- "error: " + err.Error()
				return
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			results <- fmt.Sprintf("%d %s", resp.StatusCode, body)
		}()
	}
	for i := 0; i < n; i++ {
		select {
		case <-arrived:
		case <-time.After(10 * time.Second):
			t.Fatalf("only %d of %d requests reached the backend", i, n)
		}
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	p.waitLog(t, `"msg":"draining"`, 1)
	// New connections are refused while draining.
	if conn, err := net.DialTimeout("tcp", outbound, time.Second); err == nil {
		conn.Close()
		t.Error("outbound listener still accepts connections while draining")
	}
	close(release)
	wg.Wait()
	close(results)
	for r := range results {
		if r != "200 done" {
			t.Errorf("in-flight request: want 200 done, have %s", r)
		}
	}
	if err := p.wait(t); err != nil {
		t.Fatalf("meshd exit: want 0, have %v", err)
	}
	p.waitLog(t, "all requests completed", 1)
}

func TestSIGHUPUnderLoadLosesNoRequest(t *testing.T) {
	var backends []string
	for i := 0; i < 3; i++ {
		name := fmt.Sprintf("b%d", i)
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, name) })}
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		go srv.Serve(ln)
		defer srv.Close()
		backends = append(backends, ln.Addr().String())
	}
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "meshd.yaml")
	outbound, admin := freeAddr(t), freeAddr(t)
	writeConfig(t, cfgPath, outbound, admin, backends[:2], "round_robin")
	p := startMeshd(t, cfgPath)
	waitReady(t, admin)

	c := proxyClient(outbound)
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	deadline := time.Now().Add(20 * time.Second)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 5000 && time.Now().Before(deadline); i++ {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := c.Get("http://payments/")
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, resp.Status)
					continue
				}
				ok.Add(1)
			}
		}()
	}
	// Reload five times under load, alternating the instance set, then once
	// with a broken file, which must be refused while traffic keeps flowing.
	for i := 1; i <= 5; i++ {
		set := backends[:2]
		if i%2 == 1 {
			set = backends
		}
		writeConfig(t, cfgPath, outbound, admin, set, "round_robin")
		before := ok.Load()
		p.cmd.Process.Signal(syscall.SIGHUP)
		p.waitLog(t, "config reloaded", i)
		waitProgress(t, &ok, before+50)
	}
	os.WriteFile(cfgPath, []byte("upstreams: {payments: {balance: {algorithm: nope}}}\n"), 0o644)
	p.cmd.Process.Signal(syscall.SIGHUP)
	p.waitLog(t, "reload refused", 1)
	before := ok.Load()
	waitProgress(t, &ok, before+50)
	close(stop)
	wg.Wait()
	t.Logf("%d requests succeeded across 6 reloads, %d failed", ok.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Fatalf("%d requests failed during reloads; first: %v", failed.Load(), firstErr.Load())
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := p.wait(t); err != nil {
		t.Fatalf("exit: %v", err)
	}
}

// waitProgress waits until the success counter reaches n, proving traffic flows.
func waitProgress(t *testing.T, ok *atomic.Int64, n int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for ok.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("traffic stalled at %d successful requests", ok.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestCommandsAndHelp(t *testing.T) {
	out, err := exec.Command(binPath, "version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "meshd ") || !strings.Contains(string(out), "go1.") {
		t.Fatalf("version: %v %q", err, out)
	}
	for _, cmd := range [][]string{{"--help"}, {"run", "--help"}, {"validate", "--help"}} {
		out, err := exec.Command(binPath, cmd...).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "Usage") {
			t.Errorf("%v: want usage and exit 0, have %v %q", cmd, err, out)
		}
	}
	if out, _ := exec.Command(binPath, "run", "--help").CombinedOutput(); !strings.Contains(string(out), "-config") {
		t.Errorf("run --help does not explain -config: %q", out)
	}
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("listen: {outbound: nowhere}\nupstreams: {x: {balance: {algorithm: magic}}}\nbogus: 1\n"), 0o644)
	cmd := exec.Command(binPath, "validate", "--config", bad)
	out, err = cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("validate of a bad file: want exit 1, have %v", err)
	}
	for _, want := range []string{"bad.yaml:1: listen.outbound", "bad.yaml:2: upstreams.x", "bad.yaml:3: bogus: unknown key", "problem(s)"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("validate output lacks %q:\n%s", want, out)
		}
	}
}
