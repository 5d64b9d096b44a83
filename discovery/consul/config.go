// Package consul discovers upstream instances from Consul's health API with
// blocking queries, and registers the local service with the Consul agent.
//
// Every value the package needs that is not set in Config comes from the
// standard Consul environment variables (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN,
// CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_SSL, CONSUL_CACERT, CONSUL_CLIENT_CERT,
// CONSUL_CLIENT_KEY, ...), then from consul/api's defaults
// (http://localhost:8500).
//
// The ACL token is sent only in the X-Consul-Token header and is removed from
// every error and log line the package produces.
package consul

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
)

// Defaults used when the corresponding Config field is zero.
const (
	DefaultWaitTime    = 5 * time.Minute
	DefaultBackoffBase = 250 * time.Millisecond
	DefaultBackoffMax  = 30 * time.Second
)

// Consul caps a blocking query's wait at 10 minutes.
const maxWaitTime = 10 * time.Minute

// TLSConfig selects the files for HTTPS to the agent. Empty fields leave the
// CONSUL_CACERT, CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY variables in effect.
type TLSConfig struct {
	CAFile   string
	CertFile string
	KeyFile  string
	// InsecureSkipVerify disables certificate verification (tests only).
	InsecureSkipVerify bool
}

// Config is how to reach Consul. The zero value uses the agent named by the
// environment, or localhost:8500. A field that is set overrides its
// environment variable; an empty field leaves the variable in effect.
type Config struct {
	// Address is host:port, or a URL with http://, https:// or unix://.
	Address string
	// Scheme is "http" or "https".
	Scheme     string
	Datacenter string
	// Token is the ACL token. TokenFile, when set, wins over Token and is
	// read once, when the Source or Registrar is created.
	Token     string
	TokenFile string
	TLS       TLSConfig
	// WaitTime bounds each blocking query; default DefaultWaitTime, at most
	// 10 minutes.
	WaitTime time.Duration
	// AllowStale lets any Consul server answer reads, which spreads load and
	// keeps discovery working without a leader. nil means true.
	AllowStale *bool
	// BackoffBase and BackoffMax shape the retry delay after errors: it
	// doubles from BackoffBase up to BackoffMax, with random jitter.
	// Defaults DefaultBackoffBase and DefaultBackoffMax.
	BackoffBase time.Duration
	BackoffMax  time.Duration
	// Logger receives warnings about failures; default slog.Default().
	Logger *slog.Logger
}

// conn is a configured client and the resolved settings shared by Source and
// Registrar.
type conn struct {
	client      *api.Client
	token       string // effective ACL token, sent per request
	dc          string
	stale       bool
	wait        time.Duration
	backoffBase time.Duration
	backoffMax  time.Duration
	log         *slog.Logger
}

func newConn(cfg Config) (*conn, error) {
	c := &conn{
		dc:          cfg.Datacenter,
		stale:       cfg.AllowStale == nil || *cfg.AllowStale,
		wait:        cfg.WaitTime,
		backoffBase: cfg.BackoffBase,
		backoffMax:  cfg.BackoffMax,
		log:         cfg.Logger,
	}
	switch {
	case c.wait < 0:
		return nil, fmt.Errorf("consul: negative wait time %v", c.wait)
	case c.wait == 0:
		c.wait = DefaultWaitTime
	case c.wait > maxWaitTime:
		c.wait = maxWaitTime
	}
	if c.backoffBase < 0 || c.backoffMax < 0 {
		return nil, errors.New("consul: negative backoff")
	}
	if c.backoffBase == 0 {
		c.backoffBase = DefaultBackoffBase
	}
	if c.backoffMax == 0 {
		c.backoffMax = DefaultBackoffMax
	}
	if c.backoffMax < c.backoffBase {
		c.backoffMax = c.backoffBase
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	if cfg.Scheme != "" && cfg.Scheme != "http" && cfg.Scheme != "https" {
		return nil, fmt.Errorf("consul: scheme %q: want http or https", cfg.Scheme)
	}

	tok, err := resolveToken(cfg)
	if err != nil {
		return nil, err
	}
	c.token = tok

	ac := api.DefaultConfig() // applies the CONSUL_* environment variables
	if cfg.Address != "" {
		ac.Address = cfg.Address
	}
	if cfg.Scheme != "" {
		ac.Scheme = cfg.Scheme
	}
	if cfg.Datacenter != "" {
		ac.Datacenter = cfg.Datacenter
	}
	if cfg.TLS.CAFile != "" {
		ac.TLSConfig.CAFile = cfg.TLS.CAFile
	}
	if cfg.TLS.CertFile != "" {
		ac.TLSConfig.CertFile = cfg.TLS.CertFile
	}
	if cfg.TLS.KeyFile != "" {
		ac.TLSConfig.KeyFile = cfg.TLS.KeyFile
	}
	if cfg.TLS.InsecureSkipVerify {
		ac.TLSConfig.InsecureSkipVerify = true
	}
	// The token travels in each request's options; keep the client's own
	// copy identical so that no request goes out with a different one.
	ac.Token, ac.TokenFile = tok, ""
	if ac.Transport != nil {
		// Each watched service holds one connection in a blocking query;
		// keep them for reuse instead of re-dialling after every answer.
		ac.Transport.MaxIdleConnsPerHost = 1024
		// HTTP/1.1 over TLS too, as over plain HTTP: over HTTP/2 a
		// refused handshake (a missing client certificate, say) surfaces
		// only as "client conn could not be established", without why.
		ac.Transport.ForceAttemptHTTP2 = false
	}
	client, err := api.NewClient(ac)
	if err != nil {
		return nil, fmt.Errorf("consul: client: %w", c.redact(err))
	}
	c.client = client
	return c, nil
}

// resolveToken applies the precedence of the consul CLI: TokenFile, Token,
// CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_TOKEN.
func resolveToken(cfg Config) (string, error) {
	read := func(path string) (string, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			// The error names the file, never its content.
			return "", fmt.Errorf("consul: token file: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}
	switch {
	case cfg.TokenFile != "":
		return read(cfg.TokenFile)
	case cfg.Token != "":
		return cfg.Token, nil
	case os.Getenv(api.HTTPTokenFileEnvName) != "":
		return read(os.Getenv(api.HTTPTokenFileEnvName))
	default:
		return os.Getenv(api.HTTPTokenEnvName), nil
	}
}

// redact returns err with every occurrence of the ACL token replaced. It
// keeps the chain, so errors.As still finds api.StatusError.
func (c *conn) redact(err error) error {
	if err == nil || c.token == "" || !strings.Contains(err.Error(), c.token) {
		return err
	}
	return &redactedError{err: err, token: c.token}
}

type redactedError struct {
	err   error
	token string
}

func (e *redactedError) Error() string {
	return strings.ReplaceAll(e.err.Error(), e.token, "[redacted]")
}

func (e *redactedError) Unwrap() error { return e.err }

func (c *conn) queryOptions(dc string) *api.QueryOptions {
	if dc == "" {
		dc = c.dc
	}
	return &api.QueryOptions{Datacenter: dc, AllowStale: c.stale, Token: c.token}
}
