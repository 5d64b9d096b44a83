// Package testenv starts the real external programs (Consul, Jaeger) that
// meshd's integration tests run against, on loopback addresses and free
// ports, and stops them when the test ends.
//
// A test that needs a program which is not installed is skipped, unless the
// environment variable MESHD_REQUIRE_INTEGRATION is "1" (as under `make
// test`), in which case it fails: a CI run must never pass by skipping.
//
// Helpers are safe for use from parallel tests; each returned object belongs
// to the test that created it.
package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RequireEnv is the environment variable that turns a missing integration
// dependency from a skip into a failure when set to "1".
const RequireEnv = "MESHD_REQUIRE_INTEGRATION"

// Integration reports whether integration dependencies are mandatory
// (MESHD_REQUIRE_INTEGRATION=1).
func Integration() bool { return os.Getenv(RequireEnv) == "1" }

// Require stops the calling test because something it needs, described by
// what, is unavailable. hint tells the reader how to provide it. The test is
// skipped, or failed when MESHD_REQUIRE_INTEGRATION=1. Require never returns.
func Require(t testing.TB, what, hint string) {
	t.Helper()
	msg := fmt.Sprintf("%s is not available (%s)", what, hint)
	if Integration() {
		t.Fatalf("%s; %s=1 makes this a failure", msg, RequireEnv)
	}
	t.Skipf("%s; skipping (set %s=1 to fail instead)", msg, RequireEnv)
}

// Binary finds an executable for a test: the path in the environment
// variable envVar if set, otherwise name in $HOME/.cache/meshd/bin, otherwise
// name on PATH. When none exists it calls Require with hint, so the test is
// skipped or failed.
func Binary(t testing.TB, envVar, name, hint string) string {
	t.Helper()
	var tried []string
	if p := os.Getenv(envVar); p != "" {
		if isExecutable(p) {
			return p
		}
		tried = append(tried, envVar+"="+p)
	}
	if home, err := os.UserHomeDir(); err == nil {
		p := filepath.Join(home, ".cache", "meshd", "bin", name)
		if isExecutable(p) {
			return p
		}
		tried = append(tried, p)
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	tried = append(tried, name+" on PATH")
	Require(t, name+" binary", fmt.Sprintf("tried %s; %s", strings.Join(tried, ", "), hint))
	return ""
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}

var freePorts struct {
	sync.Mutex
	handed map[int]bool
}

// FreePort returns a loopback port that is free for both TCP and UDP right
// now and that no earlier FreePort call in this process has returned,
// chosen below the kernel's ephemeral range (Linux), which no outgoing
// connection takes. There is an unavoidable window between this check and
// the caller binding it.
func FreePort(t testing.TB) int {
	t.Helper()
	freePorts.Lock()
	defer freePorts.Unlock()
	if freePorts.handed == nil {
		freePorts.handed = make(map[int]bool)
	}
	var last error
	below := belowEphemeral()
	for range 50 {
		addr := "127.0.0.1:0"
		if below > minPort {
			// Below the range the kernel hands out for ":0" and for
			// the local end of outgoing connections: a port taken from
			// that range can be given to some connection of this very
			// test before the program it is for binds it.
			addr = fmt.Sprintf("127.0.0.1:%d", minPort+rand.IntN(below-minPort))
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			last = err
			continue
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			l.Close()
			last = err
			continue
		}
		u.Close()
		l.Close()
		if freePorts.handed[port] {
			continue
		}
		freePorts.handed[port] = true
		return port
	}
	t.Fatalf("testenv: no free loopback port: %v", last)
	return 0
}

// minPort is the lowest port FreePort picks.
const minPort = 10000

// belowEphemeral returns the first port of the kernel's ephemeral range,
// 0 when it cannot be read (FreePort then asks the kernel for a port).
func belowEphemeral() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0
	}
	lo, err := strconv.Atoi(f[0])
	if err != nil {
		return 0
	}
	return lo
}

// Process is an external program started for a test. Its standard output
// and error go to a log file in the test's temporary directory; when the test
// fails, the log's tail is printed. Methods are safe for concurrent use.
type Process struct {
	name    string
	logPath string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
	err  error         // cmd.Wait result, valid after done
}

// StartProcess runs bin with args. name labels the log file and messages.
// The process is stopped (SIGINT, then SIGKILL after 10s) when the test
// ends, and the last lines of its output are printed if the test failed.
func StartProcess(t testing.TB, name, bin string, args ...string) *Process {
	t.Helper()
	p := &Process{name: name, logPath: filepath.Join(t.TempDir(), name+".log")}
	if err := p.start(bin, args); err != nil {
		t.Fatalf("testenv: start %s: %v", name, err)
	}
	t.Cleanup(func() {
		p.Stop(10 * time.Second)
		if t.Failed() {
			t.Logf("testenv: last lines of %s output (%s):\n%s", name, p.logPath, Tail(p.logPath, 40))
		}
	})
	return p
}

func (p *Process) start(bin string, args []string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		select {
		case <-p.done:
		default:
			return errors.New("already running")
		}
	}
	f, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	fmt.Fprintf(f, "==== %s: %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Stdout = f
	cmd.Stderr = f
	// A process group of its own, so a Ctrl-C on the test does not reach it
	// first and Stop can signal it alone.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return err
	}
	done := make(chan struct{})
	p.cmd, p.done = cmd, done
	go func() {
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

// Restart starts the program again with the same arguments after it has
// stopped. It fails if the process is still running.
func (p *Process) Restart() error {
	p.mu.Lock()
	if p.cmd == nil {
		p.mu.Unlock()
		return errors.New("never started")
	}
	bin, args := p.cmd.Path, p.cmd.Args[1:]
	p.mu.Unlock()
	return p.start(bin, args)
}

// Exited is closed when the current run of the process ends.
func (p *Process) Exited() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.done
}

// Pid returns the process id of the current run.
func (p *Process) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd.Process.Pid
}

// Stop sends SIGINT and waits up to grace for the process to exit, then
// kills it. It returns once the process is gone; stopping a stopped process
// does nothing.
func (p *Process) Stop(grace time.Duration) {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-done:
		return
	default:
	}
	_ = cmd.Process.Signal(os.Interrupt)
	select {
	case <-done:
	case <-time.After(grace):
		_ = cmd.Process.Kill()
		<-done
	}
}

// Kill ends the process at once with SIGKILL and waits for it to be gone.
func (p *Process) Kill() {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-done
}

// LogPath is the file holding the process's output (all runs, appended).
func (p *Process) LogPath() string { return p.logPath }

// Tail returns the last n lines of the file at path, or a note saying why it
// could not be read.
func Tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	b = bytes.TrimRight(b, "\n")
	lines := bytes.Split(b, []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// WaitFor polls cond every interval until it returns nil or timeout passes,
// and returns the last error from cond (nil on success). It is meant for
// conditions that have no event to wait on, such as a server becoming ready.
func WaitFor(timeout, interval time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %v: %w", timeout, err)
		}
		time.Sleep(interval)
	}
}
