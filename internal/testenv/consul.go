package testenv

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// ConsulEnv names the environment variable holding the consul binary's path.
const ConsulEnv = "MESHD_CONSUL_BIN"

// ConsulDatacenter is the datacenter a test agent runs in.
const ConsulDatacenter = "dc1"

// ConsulOption changes how StartConsul configures the agent.
type ConsulOption func(*consulSettings)

type consulSettings struct {
	acl   bool
	tls   *TLSFiles
	extra []string
}

// WithACL enables ACLs with default_policy "deny". The agent gets a random
// management token (see Consul.ManagementToken), which is also the agent's
// own token so that it can register its node and local services.
func WithACL() ConsulOption { return func(s *consulSettings) { s.acl = true } }

// WithTLS also serves the HTTP API over HTTPS (see Consul.HTTPSAddr) with
// f's server certificate, and requires a client certificate signed by f's CA
// there. The plain HTTP port stays open for the test's own client.
func WithTLS(f *TLSFiles) ConsulOption { return func(s *consulSettings) { s.tls = f } }

// WithHCL adds a fragment of agent configuration in HCL.
func WithHCL(hcl string) ConsulOption {
	return func(s *consulSettings) { s.extra = append(s.extra, hcl) }
}

// Consul is a single-node development agent (consul agent -dev) that listens
// on 127.0.0.1 only. Its state lives in memory: after Stop and Start the
// catalog is empty, as if the agent had forgotten every registration.
// Methods are safe for concurrent use; Start must run on the test goroutine.
type Consul struct {
	t       testing.TB
	node    string
	ports   map[string]int
	token   string
	proc    *Process
	startMu sync.Mutex
}

// StartConsul starts a Consul agent for t, waits until it has elected itself
// leader, registered its node and (with WithACL) bootstrapped its ACLs, and
// stops it when the test ends. A missing binary skips or fails the test (see
// Require).
func StartConsul(t testing.TB, opts ...ConsulOption) *Consul {
	t.Helper()
	bin := Binary(t, ConsulEnv, "consul", "run `make tools` or `.ci/install-tool consul`, or set "+ConsulEnv)
	var s consulSettings
	for _, o := range opts {
		o(&s)
	}
	c := &Consul{t: t, node: "meshd-test-" + randomHex(6), ports: map[string]int{}}
	for _, name := range []string{"http", "dns", "grpc", "grpc_tls", "serf_lan", "serf_wan", "server"} {
		c.ports[name] = FreePort(t)
	}
	// Blocking queries hold one connection each; the default of 200 per
	// client address is too low for tests that watch hundreds of services.
	hcl := []string{"limits { http_max_conns_per_client = 4096 }"}
	if s.acl {
		c.token = randomUUID()
		hcl = append(hcl, fmt.Sprintf(`acl {
  enabled = true
  default_policy = "deny"
  enable_token_persistence = false
  tokens {
    initial_management = %q
    agent = %q
  }
}`, c.token, c.token))
	}
	https := -1
	if s.tls != nil {
		https = FreePort(t)
		c.ports["https"] = https
		hcl = append(hcl, fmt.Sprintf(`tls {
  defaults {
    ca_file = %q
    cert_file = %q
    key_file = %q
  }
  https { verify_incoming = true }
}`, s.tls.CA, s.tls.ServerCert, s.tls.ServerKey))
	}
	hcl = append(hcl, s.extra...)
	args := []string{
		"agent", "-dev",
		"-node", c.node,
		"-datacenter", ConsulDatacenter,
		"-bind", "127.0.0.1",
		"-client", "127.0.0.1",
		"-advertise", "127.0.0.1",
		"-http-port", fmt.Sprint(c.ports["http"]),
		"-https-port", fmt.Sprint(https),
		"-dns-port", fmt.Sprint(c.ports["dns"]),
		"-grpc-port", fmt.Sprint(c.ports["grpc"]),
		"-grpc-tls-port", fmt.Sprint(c.ports["grpc_tls"]),
		"-serf-lan-port", fmt.Sprint(c.ports["serf_lan"]),
		"-serf-wan-port", fmt.Sprint(c.ports["serf_wan"]),
		"-server-port", fmt.Sprint(c.ports["server"]),
		"-log-level", "debug",
	}
	for _, h := range hcl {
		args = append(args, "-hcl", h)
	}
	c.proc = StartProcess(t, "consul", bin, args...)
	if err := c.waitReady(30 * time.Second); err != nil {
		t.Fatalf("testenv: consul agent did not become ready: %v\n%s", err, Tail(c.proc.LogPath(), 40))
	}
	return c
}

// Addr is the agent's HTTP address, "127.0.0.1:PORT".
func (c *Consul) Addr() string { return fmt.Sprintf("127.0.0.1:%d", c.ports["http"]) }

// HTTPSAddr is the agent's HTTPS address (with WithTLS), "127.0.0.1:PORT".
func (c *Consul) HTTPSAddr() string { return fmt.Sprintf("127.0.0.1:%d", c.ports["https"]) }

// URL is the agent's HTTP base URL.
func (c *Consul) URL() string { return "http://" + c.Addr() }

// NodeName is the agent's node name, unique per StartConsul call.
func (c *Consul) NodeName() string { return c.node }

// Datacenter is the agent's datacenter name.
func (c *Consul) Datacenter() string { return ConsulDatacenter }

// ManagementToken is the ACL management token, "" when ACLs are off.
func (c *Consul) ManagementToken() string { return c.token }

// Pid is the agent's current process id.
func (c *Consul) Pid() int { return c.proc.Pid() }

// LogPath is the file holding the agent's output.
func (c *Consul) LogPath() string { return c.proc.LogPath() }

// Client returns an API client for the agent, carrying the management token
// when ACLs are on.
func (c *Consul) Client(t testing.TB) *api.Client {
	t.Helper()
	cl, err := api.NewClient(&api.Config{
		Address:   c.Addr(),
		Scheme:    "http",
		Token:     c.token,
		Transport: &http.Transport{MaxIdleConnsPerHost: 16},
	})
	if err != nil {
		t.Fatalf("testenv: consul client: %v", err)
	}
	return cl
}

// Stop shuts the agent down gracefully (SIGINT, then SIGKILL after 10s) and
// waits for it to exit. Clients see connection errors until Start.
func (c *Consul) Stop() {
	c.startMu.Lock()
	defer c.startMu.Unlock()
	c.proc.Stop(10 * time.Second)
}

// Kill ends the agent at once with SIGKILL, as a crash would.
func (c *Consul) Kill() {
	c.startMu.Lock()
	defer c.startMu.Unlock()
	c.proc.Kill()
}

// Start runs the agent again after Stop or Kill, on the same ports, node
// name and token, and waits until it is ready. Its catalog starts empty.
// Call it from the test's goroutine: it fails the test if the agent does not
// come back.
func (c *Consul) Start() {
	c.t.Helper()
	c.startMu.Lock()
	defer c.startMu.Unlock()
	var err error
	// A port of the stopped agent may linger for a moment; retry briefly.
	for attempt := 0; attempt < 3; attempt++ {
		if err = c.proc.Restart(); err != nil {
			break
		}
		if err = c.waitReady(30 * time.Second); err == nil {
			return
		}
		c.proc.Stop(5 * time.Second)
	}
	c.t.Fatalf("testenv: consul agent restart: %v\n%s", err, Tail(c.proc.LogPath(), 40))
}

// waitReady polls until the agent has a leader, knows its own node in the
// catalog and, with ACLs, accepts the management token.
func (c *Consul) waitReady(timeout time.Duration) error {
	hc := &http.Client{Timeout: 2 * time.Second}
	get := func(path string) (string, error) {
		req, err := http.NewRequest(http.MethodGet, c.URL()+path, nil)
		if err != nil {
			return "", err
		}
		if c.token != "" {
			req.Header.Set("X-Consul-Token", c.token)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if resp.StatusCode != http.StatusOK {
			return "", fmt.Errorf("GET %s: %s: %s", path, resp.Status, strings.TrimSpace(string(body)))
		}
		return strings.TrimSpace(string(body)), nil
	}
	exited := c.proc.Exited()
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return errors.New("agent exited during start-up")
		default:
		}
		last = func() error {
			leader, err := get("/v1/status/leader")
			if err != nil {
				return err
			}
			if leader == "" || leader == `""` {
				return errors.New("no leader yet")
			}
			if c.token != "" {
				if _, err := get("/v1/acl/token/self"); err != nil {
					return err
				}
			}
			checks, err := get("/v1/health/node/" + c.node)
			if err != nil {
				return err
			}
			if !strings.Contains(checks, `"serfHealth"`) || !strings.Contains(checks, `"passing"`) {
				return errors.New("agent node not yet healthy in the catalog")
			}
			return nil
		}()
		if last == nil {
			return nil
		}
		select {
		case <-exited:
			return errors.New("agent exited during start-up")
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("after %v: %w", timeout, last)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func randomUUID() string {
	h := randomHex(16)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}
