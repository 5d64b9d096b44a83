// Package config loads and validates meshd's YAML configuration.
//
// Decoding is strict: an unknown key, a duplicate key, a value of the wrong
// type or a bad duration is an error that names the file, line and key, and
// Load reports every problem in the file at once. Load returns a Config with
// defaults applied; a Config is immutable once loaded and safe to share.
package config

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/telemetry"
)

// Defaults.
const (
	DefaultOutbound        = "127.0.0.1:15001"
	DefaultAdmin           = "127.0.0.1:15000"
	DefaultDrain           = 20 * time.Second
	DefaultReadHeader      = 10 * time.Second
	DefaultIdleTimeout     = 90 * time.Second
	DefaultWriteTimeout    = 60 * time.Second
	DefaultMaxHeaderBytes  = 64 << 10
	DefaultMaxIdlePerHost  = 256
	DefaultIdleConnTimeout = 90 * time.Second
)

// Config is the whole file.
type Config struct {
	Service   Service             `yaml:"service"`
	Listen    Listen              `yaml:"listen"`
	Discovery Discovery           `yaml:"discovery"`
	Upstreams map[string]Upstream `yaml:"upstreams"`
	Proxy     Proxy               `yaml:"proxy"`
	Telemetry Telemetry           `yaml:"telemetry"`
	Log       Log                 `yaml:"log"`

	// File is the path the config was loaded from ("" for in-memory).
	File string `yaml:"-"`
	// Static is the merged static catalog: discovery.static plus discovery.static_file.
	Static map[string][]StaticEntry `yaml:"-"`
	// StaticFileData is the content of discovery.static_file that Static was
	// built from (nil without a static file). The file watcher compares
	// against it, so a change made while the config was loading is not missed.
	StaticFileData []byte `yaml:"-"`
}

// Service describes the app beside the sidecar (inbound proxy and registration).
type Service struct {
	Name     string            `yaml:"name"`
	Port     int               `yaml:"port"`
	Address  string            `yaml:"address"`  // the app's host, default 127.0.0.1
	Register bool              `yaml:"register"` // register in Consul
	ID       string            `yaml:"id"`
	Tags     []string          `yaml:"tags"`
	Meta     map[string]string `yaml:"meta"`
	Weights  *Weights          `yaml:"weights"`
	// RegisterAddress is the address:port registered in Consul; default the
	// inbound listener when there is one, else the app's own address.
	RegisterAddress string `yaml:"register_address"`
	Check           Check  `yaml:"check"`
}

// Weights are Consul service weights. Warning defaults to 1, as in Consul;
// 0 takes the instance out of rotation while its checks warn.
type Weights struct {
	Passing int  `yaml:"passing"`
	Warning *int `yaml:"warning"`
}

// Check is the health check registered with the service.
type Check struct {
	HTTP            string        `yaml:"http"` // URL; default: TCP check when neither is set
	TCP             string        `yaml:"tcp"`
	Interval        time.Duration `yaml:"interval"`
	Timeout         time.Duration `yaml:"timeout"`
	DeregisterAfter time.Duration `yaml:"deregister_after"`
}

// Listen holds the sidecar's own listeners.
type Listen struct {
	Outbound string `yaml:"outbound"` // forward proxy and Host routing; default 127.0.0.1:15001
	Inbound  string `yaml:"inbound"`  // reverse proxy to the local app; off when empty
	Admin    string `yaml:"admin"`    // health, readiness, /upstreams, /metrics, pprof; default 127.0.0.1:15000
}

// Discovery configures where instances come from.
type Discovery struct {
	Static     map[string][]StaticEntry `yaml:"static"`
	StaticFile string                   `yaml:"static_file"`
	Consul     *Consul                  `yaml:"consul"`
	// OnDemand starts a Consul watch for a forward-proxy name that is not a
	// configured upstream; default true when Consul is configured.
	OnDemand *bool `yaml:"discover_on_demand"`
	// OnDemandAllow lists name patterns (path.Match syntax) allowed on demand; default ["*"].
	OnDemandAllow []string `yaml:"on_demand_allow"`
	// OnDemandIdle stops an on-demand watch unused for this long; default 10m.
	OnDemandIdle time.Duration `yaml:"on_demand_idle"`
}

// Consul is the Consul client section; empty fields fall back to the CONSUL_* variables.
type Consul struct {
	Address    string        `yaml:"address"`
	Scheme     string        `yaml:"scheme"`
	Datacenter string        `yaml:"datacenter"`
	Token      string        `yaml:"token"`
	TokenFile  string        `yaml:"token_file"`
	CAFile     string        `yaml:"ca_file"`
	CertFile   string        `yaml:"cert_file"`
	KeyFile    string        `yaml:"key_file"`
	WaitTime   time.Duration `yaml:"wait_time"`
	AllowStale *bool         `yaml:"allow_stale"`
	// BackoffBase and BackoffMax bound the wait between failed queries
	// (exponential with jitter); defaults 250ms and 30s.
	BackoffBase time.Duration `yaml:"backoff_base"`
	BackoffMax  time.Duration `yaml:"backoff_max"`
}

// StaticEntry is one instance in the static catalog: either "host:port" or
// {address: host:port, weight: N, id: NAME, tags: [...]}.
type StaticEntry struct {
	Address string   `yaml:"address"`
	Weight  int      `yaml:"weight"`
	ID      string   `yaml:"id"`
	Tags    []string `yaml:"tags"`
	line    int
	// weightSet tells a weight of 0 written out (refused) from none (1).
	weightSet bool
}

func (s *StaticEntry) decodeNode(d *decoder, n *yaml.Node, path string) {
	s.line = n.Line
	if n.Kind == yaml.ScalarNode {
		s.Address = n.Value
		return
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == "weight" {
			s.weightSet = true
		}
	}
	d.decodeStruct(n, reflectValue(s), path)
}

// Upstream is one service meshd routes to.
type Upstream struct {
	// Discovery is "static" or "consul"; default static when the name is in the
	// static catalog, else consul.
	Discovery string `yaml:"discovery"`
	// Listen is a dedicated listener whose every request goes to this upstream.
	Listen string `yaml:"listen"`
	// H2C speaks cleartext HTTP/2 to the instances (gRPC).
	H2C      bool           `yaml:"h2c"`
	Balance  Balance        `yaml:"balance"`
	Breaker  Breaker        `yaml:"breaker"`
	Retry    Retry          `yaml:"retry"`
	Timeout  time.Duration  `yaml:"timeout"` // whole request, shorthand for timeouts.request
	Timeouts Timeouts       `yaml:"timeouts"`
	Failure  Failure        `yaml:"failure"`
	Consul   UpstreamConsul `yaml:"consul"`
	// MaxIdlePerInstance bounds pooled keep-alive connections per instance; default 256.
	MaxIdlePerInstance int `yaml:"max_idle_per_instance"`
	// MaxConnsPerInstance bounds all connections per instance; 0 = no limit.
	MaxConnsPerInstance int `yaml:"max_conns_per_instance"`
	// WaitForAnswer, set by meshd for the inbound upstream (not in YAML),
	// drops the response-header timeout: the local app is waited on as
	// long as the caller's budget allows, which its sidecar sets.
	WaitForAnswer bool `yaml:"-"`
}

// Balance selects the algorithm.
type Balance struct {
	Algorithm string        `yaml:"algorithm"`
	Key       string        `yaml:"key"`
	Fallback  string        `yaml:"fallback"`
	Decay     time.Duration `yaml:"decay"`
	SlowStart time.Duration `yaml:"slow_start"`
}

// BalanceConfig converts the section for package balance.
func (b Balance) BalanceConfig() balance.Config {
	return balance.Config{Algorithm: b.Algorithm, Key: b.Key, Fallback: b.Fallback, Decay: b.Decay, SlowStart: b.SlowStart}
}

// Breaker configures the per-instance circuit breakers; zero values take defaults.
type Breaker struct {
	ConsecutiveFailures uint32        `yaml:"consecutive_failures"`
	FailureRatio        float64       `yaml:"failure_ratio"`
	MinRequests         uint32        `yaml:"min_requests"`
	Window              time.Duration `yaml:"window"`
	OpenFor             time.Duration `yaml:"open_for"`
	OpenMultiplier      float64       `yaml:"open_multiplier"`
	OpenMax             time.Duration `yaml:"open_max"`
	HalfOpenProbes      uint32        `yaml:"half_open_probes"`
	MaxEjectionPercent  *int          `yaml:"max_ejection_percent"`
	FailOpen            *bool         `yaml:"fail_open"`
	Disabled            bool          `yaml:"disabled"`
}

// Retry configures retries; zero values take defaults.
type Retry struct {
	Attempts           int           `yaml:"attempts"`
	On                 []string      `yaml:"on"`
	Methods            []string      `yaml:"methods"`
	RetryNonIdempotent bool          `yaml:"retry_non_idempotent"`
	BackoffBase        time.Duration `yaml:"backoff_base"`
	BackoffMax         time.Duration `yaml:"backoff_max"`
	BufferBody         int64         `yaml:"buffer_body"`
	BudgetPercent      *float64      `yaml:"budget_percent"`
	BudgetMinPerSecond *int          `yaml:"budget_min_per_second"`
	Disabled           bool          `yaml:"disabled"`
}

// Timeouts per upstream.
type Timeouts struct {
	Connect        time.Duration `yaml:"connect"`
	ResponseHeader time.Duration `yaml:"response_header"`
	Request        time.Duration `yaml:"request"`
	PerTry         time.Duration `yaml:"per_try"`
	Header         string        `yaml:"header"`
}

// Failure says which responses count against an instance.
type Failure struct {
	Statuses []int `yaml:"statuses"`
}

// UpstreamConsul selects instances within Consul.
type UpstreamConsul struct {
	Service        string   `yaml:"service"` // Consul name when it differs from the upstream's
	Tags           []string `yaml:"tags"`
	Datacenter     string   `yaml:"datacenter"`
	Filter         string   `yaml:"filter"`
	IncludeWarning bool     `yaml:"include_warning"`
}

// Proxy holds data-path settings shared by all listeners.
type Proxy struct {
	// XForwarded sets X-Forwarded-For and X-Forwarded-Proto; default true.
	XForwarded *bool `yaml:"x_forwarded"`
	// TrustForwardedFor takes the client address for ip_hash from the first
	// X-Forwarded-For hop instead of the connection; default false.
	TrustForwardedFor bool          `yaml:"trust_forwarded_for"`
	ReadHeaderTimeout time.Duration `yaml:"read_header_timeout"`
	IdleTimeout       time.Duration `yaml:"idle_timeout"`
	// WriteTimeout is how long one write to a client may wait to finish;
	// a client that stops reading its answer is then cut off (reset), and
	// the instance's connection closed with it. It bounds each write (the
	// event loops: each spell with none of the answer taken), not a whole
	// answer, so a slow reader that keeps reading is served to the end.
	// Applies to tunnels and HTTP/2 streams too. Default 60s; a value too
	// long to be a deadline sets none; a reload applies it at once.
	WriteTimeout   time.Duration `yaml:"write_timeout"`
	MaxHeaderBytes int           `yaml:"max_header_bytes"`
	// Drain is how long shutdown waits for in-flight requests; default 20s.
	Drain time.Duration `yaml:"drain"`
	// AllowConnect enables CONNECT tunnels to upstreams; default true.
	AllowConnect *bool `yaml:"allow_connect"`
	// FastPath serves plain HTTP/1.1 on proxy listeners with meshd's own
	// server loop instead of net/http's; default true.
	FastPath *bool `yaml:"fast_path"`
	// EventLoop serves the fast path's common requests (GET and HEAD
	// answered by a plain success) on one epoll loop per core, on Linux,
	// handing every other request to the goroutine path; default true.
	// Only with fast_path.
	EventLoop *bool `yaml:"event_loop"`
	// EventLoopBatch lets a loop that is busy (its last batch of events
	// held two or more, within the last 100 ms) run as SCHED_BATCH: woken,
	// it waits for the processor rather than preempting whatever runs
	// there, and takes more events per wake-up. Linux only; default true.
	EventLoopBatch *bool `yaml:"event_loop_batch"`
}

// Telemetry configures traces and metrics; OTEL_* variables also apply.
type Telemetry struct {
	ServiceName string            `yaml:"service_name"`
	Traces      string            `yaml:"traces"`   // otlp, otlp-grpc, otlp-http, console, none
	Exporter    string            `yaml:"exporter"` // the same as traces, by its OpenTelemetry name
	Endpoint    string            `yaml:"endpoint"`
	Protocol    string            `yaml:"protocol"`
	Insecure    *bool             `yaml:"insecure"`
	Headers     map[string]string `yaml:"headers"`
	SampleRatio *float64          `yaml:"sample_ratio"`
	Propagators []string          `yaml:"propagators"`
	Metrics     string            `yaml:"metrics"` // prometheus (default) or none
	RecordQuery bool              `yaml:"record_query"`
}

// Log configures logging.
type Log struct {
	Format string `yaml:"format"` // auto (default), text, json
	Level  string `yaml:"level"`  // debug, info (default), warn, error
	Access *bool  `yaml:"access"` // one line per request; default true
}

// Load reads, decodes, defaults and validates the file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(path, data)
}

// Parse is Load for bytes already read; file names the source in errors.
func Parse(file string, data []byte) (*Config, error) {
	c := &Config{File: file}
	d := &decoder{file: file, lines: map[string]int{}}
	var root yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&root); err != nil {
		if errors.Is(err, errEOF(err)) {
			return nil, Errors{{File: file, Msg: "empty config"}}
		}
		return nil, Errors{{File: file, Line: yamlLine(err), Msg: "not valid YAML: " + err.Error()}}
	}
	var more yaml.Node
	if err := dec.Decode(&more); err == nil {
		// Silently reading only the first would drop the rest.
		return nil, Errors{{File: file, Line: more.Line, Msg: "a second YAML document (after ---): put the whole config in one"}}
	} else if !errors.Is(err, errEOF(err)) {
		return nil, Errors{{File: file, Line: yamlLine(err), Msg: "not valid YAML: " + err.Error()}}
	}
	d.decode(&root, reflectValue(c), "")
	c.loadStaticFile(d)
	c.resolvePaths()
	c.applyDefaults()
	c.validate(d)
	if len(d.errs) > 0 {
		sort.SliceStable(d.errs, func(i, j int) bool {
			if d.errs[i].File != d.errs[j].File {
				return d.errs[i].File == file
			}
			return d.errs[i].Line < d.errs[j].Line
		})
		return nil, d.errs
	}
	return c, nil
}

// ParseStatic decodes a static catalog file: a mapping of service name to a
// list of instances, as under discovery.static.
func ParseStatic(file string, data []byte) (map[string][]StaticEntry, error) {
	d := &decoder{file: file, lines: map[string]int{}}
	out := map[string][]StaticEntry{}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, Errors{{File: file, Line: yamlLine(err), Msg: "not valid YAML: " + err.Error()}}
	}
	if len(root.Content) > 0 {
		d.decode(&root, reflectValue(&out), "")
	}
	validateStatic(d, out, "")
	if len(d.errs) > 0 {
		return nil, d.errs
	}
	return out, nil
}

func (c *Config) loadStaticFile(d *decoder) {
	c.Static = map[string][]StaticEntry{}
	for k, v := range c.Discovery.Static {
		c.Static[k] = v
	}
	if c.Discovery.StaticFile == "" {
		return
	}
	p := c.StaticFilePath()
	data, err := ReadStaticFile(p)
	if err != nil {
		d.fail(nil, "discovery.static_file", "%v", err)
		d.errs[len(d.errs)-1].Line = d.lines["discovery.static_file"]
		return
	}
	c.StaticFileData = data
	m, err := ParseStatic(p, data)
	if err != nil {
		var es Errors
		if errors.As(err, &es) {
			d.errs = append(d.errs, es...)
		}
		return
	}
	c.mergeStatic(d, c.Static, m, p)
}

// mergeStatic adds the services of the catalog file p to into, which holds
// discovery.static; a service in both is an error, every one reported.
func (c *Config) mergeStatic(d *decoder, into, file map[string][]StaticEntry, p string) {
	names := make([]string, 0, len(file))
	for k := range file {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		if _, dup := into[k]; dup {
			d.fail(nil, "discovery.static_file", "service %q is in both discovery.static and %s", k, p)
			d.errs[len(d.errs)-1].Line = d.lines["discovery.static_file"]
			continue
		}
		into[k] = file[k]
	}
}

// ReadStaticFile reads a catalog file. Anything but a regular file (a FIFO
// would block the read forever) is an error.
func ReadStaticFile(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file (%s)", path, fi.Mode().Type())
	}
	return os.ReadFile(path)
}

// StaticWithFile returns the catalog c would have with data as the content
// of its discovery.static_file, checked as Load checks it: a file that does
// not parse, names a service discovery.static lists, or leaves an upstream
// that uses the static catalog without instances is an error (Errors). c is
// only read; the result is a new map.
func (c *Config) StaticWithFile(data []byte) (map[string][]StaticEntry, error) {
	p := c.StaticFilePath()
	m, err := ParseStatic(p, data)
	if err != nil {
		return nil, err
	}
	d := &decoder{file: c.File, lines: map[string]int{}}
	merged := make(map[string][]StaticEntry, len(c.Discovery.Static)+len(m))
	for k, v := range c.Discovery.Static {
		merged[k] = v
	}
	c.mergeStatic(d, merged, m, p)
	names := make([]string, 0, len(c.Upstreams))
	for n, u := range c.Upstreams {
		if u.Discovery == "static" {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		if in, ok := merged[n]; !ok {
			d.fail(nil, "upstreams."+n, "no instances: %q is not in %s nor in discovery.static", n, p)
		} else if len(in) == 0 {
			d.fail(nil, "upstreams."+n, "no instances: %q is listed in %s or discovery.static with none", n, p)
		}
	}
	if len(d.errs) > 0 {
		return nil, d.errs
	}
	return merged, nil
}

// resolvePaths makes the Consul section's file paths (token_file, ca_file,
// cert_file, key_file) relative to the config file, as static_file is, so
// that meshd reads the same files whatever directory it starts in.
func (c *Config) resolvePaths() {
	cc := c.Discovery.Consul
	if cc == nil {
		return
	}
	for _, p := range []*string{&cc.TokenFile, &cc.CAFile, &cc.CertFile, &cc.KeyFile} {
		*p = c.relative(*p)
	}
}

// relative resolves p against the config file's directory.
func (c *Config) relative(p string) string {
	if p == "" || filepath.IsAbs(p) || c.File == "" {
		return p
	}
	return filepath.Join(filepath.Dir(c.File), p)
}

// StaticFilePath resolves discovery.static_file relative to the config file.
func (c *Config) StaticFilePath() string { return c.relative(c.Discovery.StaticFile) }

func (c *Config) applyDefaults() {
	if c.Listen.Outbound == "" {
		c.Listen.Outbound = DefaultOutbound
	}
	if c.Listen.Admin == "" {
		c.Listen.Admin = DefaultAdmin
	}
	if c.Proxy.ReadHeaderTimeout == 0 {
		c.Proxy.ReadHeaderTimeout = DefaultReadHeader
	}
	if c.Proxy.IdleTimeout == 0 {
		c.Proxy.IdleTimeout = DefaultIdleTimeout
	}
	if c.Proxy.WriteTimeout == 0 {
		c.Proxy.WriteTimeout = DefaultWriteTimeout
	}
	if c.Proxy.MaxHeaderBytes == 0 {
		c.Proxy.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	if c.Proxy.Drain == 0 {
		c.Proxy.Drain = DefaultDrain
	}
	if c.Service.Address == "" {
		c.Service.Address = "127.0.0.1"
	}
	if c.Discovery.OnDemandIdle == 0 {
		c.Discovery.OnDemandIdle = 10 * time.Minute
	}
	if len(c.Discovery.OnDemandAllow) == 0 {
		c.Discovery.OnDemandAllow = []string{"*"}
	}
	if c.Log.Format == "" {
		c.Log.Format = "auto"
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	for name, u := range c.Upstreams {
		if u.Discovery == "" {
			if _, ok := c.Static[name]; ok || c.Discovery.Consul == nil {
				u.Discovery = "static"
			} else {
				u.Discovery = "consul"
			}
		}
		if u.MaxIdlePerInstance == 0 {
			u.MaxIdlePerInstance = DefaultMaxIdlePerHost
		}
		if u.Timeout != 0 && u.Timeouts.Request == 0 {
			u.Timeouts.Request = u.Timeout
		}
		c.Upstreams[name] = u
	}
}

// TelemetryConfig converts the telemetry section; unset keys stay empty so
// that the OTEL_* variables apply.
func (c *Config) TelemetryConfig() telemetry.Config {
	t := c.Telemetry
	tc := telemetry.Config{
		ServiceName: t.ServiceName, Exporter: cmp.Or(t.Traces, t.Exporter), Endpoint: t.Endpoint, Protocol: t.Protocol,
		Headers: t.Headers, SampleRatio: t.SampleRatio, Propagators: t.Propagators,
		Metrics: t.Metrics != "none", RecordQuery: t.RecordQuery,
	}
	if t.Insecure != nil {
		tc.Insecure = *t.Insecure
	}
	return tc
}

// DefaultUpstream is an upstream with every default, for names discovered on demand.
func DefaultUpstream(source string) Upstream {
	return Upstream{Discovery: source, MaxIdlePerInstance: DefaultMaxIdlePerHost}
}

// XForwarded reports whether X-Forwarded-* headers are set.
func (p Proxy) XForwardedOn() bool { return p.XForwarded == nil || *p.XForwarded }

// FastPathOn reports whether proxy listeners use meshd's own HTTP/1.1 loop.
func (p Proxy) FastPathOn() bool { return p.FastPath == nil || *p.FastPath }

// EventLoopOn reports whether the fast path uses event loops where it can.
func (p Proxy) EventLoopOn() bool {
	return p.FastPathOn() && (p.EventLoop == nil || *p.EventLoop)
}

// EventLoopBatchOn reports whether busy event loops run as SCHED_BATCH.
func (p Proxy) EventLoopBatchOn() bool { return p.EventLoopBatch == nil || *p.EventLoopBatch }

// ConnectOn reports whether CONNECT tunnels are allowed.
func (p Proxy) ConnectOn() bool { return p.AllowConnect == nil || *p.AllowConnect }

// AccessOn reports whether access lines are logged.
func (l Log) AccessOn() bool { return l.Access == nil || *l.Access }

// OnDemandOn reports whether unknown forward-proxy names may start Consul watches.
func (d Discovery) OnDemandOn() bool {
	return d.Consul != nil && (d.OnDemand == nil || *d.OnDemand)
}

var serviceName = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9_-]{0,62})$`)

// upstreamName is serviceName in lower case: requests name upstreams by
// host, which meshd matches in lower case (host names know no case), so an
// upstream named with a capital could never be reached.
var upstreamName = regexp.MustCompile(`^[a-z0-9]([a-z0-9_-]{0,62})$`)

func (c *Config) validate(d *decoder) {
	at := func(key, format string, args ...any) {
		line := d.lineOf(key)
		d.errs = append(d.errs, &Error{File: c.File, Line: line, Key: key, Msg: fmt.Sprintf(format, args...)})
	}
	addrs := map[string]string{}
	checkListen := func(key, addr string, required bool) {
		if addr == "" {
			if required {
				at(key, "an address is required")
			}
			return
		}
		if err := checkHostPort(addr); err != nil {
			at(key, "%v", err)
			return
		}
		if other, dup := addrs[addr]; dup && !strings.HasSuffix(addr, ":0") {
			at(key, "address %s is already used by %s", addr, other)
			return
		}
		addrs[addr] = key
	}
	checkListen("listen.outbound", c.Listen.Outbound, true)
	checkListen("listen.admin", c.Listen.Admin, true)
	checkListen("listen.inbound", c.Listen.Inbound, false)

	validateStatic(d, c.Discovery.Static, "discovery.static")
	if c.Discovery.Consul != nil {
		cc := c.Discovery.Consul
		if cc.Address != "" {
			if err := checkHostPort(cc.Address); err != nil {
				at("discovery.consul.address", "%v", err)
			}
		}
		if cc.Scheme != "" && cc.Scheme != "http" && cc.Scheme != "https" {
			at("discovery.consul.scheme", "want http or https, have %q", cc.Scheme)
		}
		if cc.Token != "" && cc.TokenFile != "" {
			at("discovery.consul.token_file", "set token or token_file, not both")
		}
		if (cc.CertFile == "") != (cc.KeyFile == "") {
			at("discovery.consul.cert_file", "set cert_file and key_file together (a client certificate needs its key)")
		}
	}
	for i, pat := range c.Discovery.OnDemandAllow {
		if _, err := matchPattern(pat, "x"); err != nil {
			at(fmt.Sprintf("discovery.on_demand_allow[%d]", i), "bad pattern %q: %v", pat, err)
		}
	}

	names := make([]string, 0, len(c.Upstreams))
	for n := range c.Upstreams {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		u := c.Upstreams[name]
		p := "upstreams." + name
		if !upstreamName.MatchString(name) {
			at(p, "upstream names are lower-case letters, digits, '-' and '_' (at most 63; hosts are matched in lower case), have %q", name)
		}
		switch u.Discovery {
		case "static":
			if in, ok := c.Static[name]; !ok {
				at(p, "no instances: %q is not in the static catalog and no discovery.consul is configured", name)
			} else if len(in) == 0 {
				at("discovery.static."+name, "no instances: the static upstream %q lists none", name)
			}
		case "consul":
			if c.Discovery.Consul == nil {
				at(p+".discovery", "consul discovery needs a discovery.consul section")
			}
		default:
			at(p+".discovery", "want static or consul, have %q", u.Discovery)
		}
		checkListen(p+".listen", u.Listen, false)
		// A 0 written out where 0 stands for "the default" would silently
		// become that default; it is more likely meant as "off".
		for _, z := range []struct {
			key   string
			isSet bool
			def   any
		}{
			{"breaker.consecutive_failures", u.Breaker.ConsecutiveFailures == 0, "5"},
			{"breaker.min_requests", u.Breaker.MinRequests == 0, "20"},
			{"breaker.window", u.Breaker.Window == 0, "10s"},
			{"breaker.open_for", u.Breaker.OpenFor == 0, "5s"},
			{"breaker.open_multiplier", u.Breaker.OpenMultiplier == 0, "2"},
			{"breaker.open_max", u.Breaker.OpenMax == 0, "60s"},
			{"breaker.half_open_probes", u.Breaker.HalfOpenProbes == 0, "1"},
			{"retry.attempts", u.Retry.Attempts == 0, "3 (1 means no retry)"},
			{"retry.backoff_base", u.Retry.BackoffBase == 0, "25ms"},
			{"retry.backoff_max", u.Retry.BackoffMax == 0, "250ms"},
			{"retry.buffer_body", u.Retry.BufferBody == 0, "65536"},
			{"timeouts.connect", u.Timeouts.Connect == 0, "1s"},
			{"timeouts.response_header", u.Timeouts.ResponseHeader == 0, "15s"},
		} {
			key := p + "." + z.key
			if _, written := d.lines[key]; written && z.isSet {
				at(key, "0 here is read as the default, %v: write the value meant, or leave the key out", z.def)
			}
		}
		if u.Timeout != 0 && u.Timeouts.Request != u.Timeout {
			at(p+".timeout", "timeout is short for timeouts.request, and they disagree (%s, %s): keep one", u.Timeout, u.Timeouts.Request)
		}
		if _, err := balance.New(u.Balance.BalanceConfig()); err != nil {
			var fe *balance.FieldError
			if errors.As(err, &fe) {
				key := p + ".balance." + fe.Field
				if _, ok := d.lines[key]; !ok {
					key = p + ".balance"
				}
				at(key, "%v", fe.Err)
			} else {
				at(p+".balance", "%v", err)
			}
		}
		// (failure.statuses are checked with the rest of resilience below.)
		if u.MaxIdlePerInstance < 0 {
			at(p+".max_idle_per_instance", "must not be negative")
		}
		if u.MaxConnsPerInstance < 0 {
			at(p+".max_conns_per_instance", "must not be negative")
		}
		for _, e := range validateResilience(u) {
			key := p
			if e.key != "" {
				key += "." + e.key
			}
			at(key, "%s", e.msg)
		}
	}

	if s := c.Service; s.Register || s.Name != "" || s.Port != 0 || c.Listen.Inbound != "" {
		if s.Port <= 0 || s.Port > 65535 {
			at("service.port", "the app's port is required (1-65535) for the inbound listener and registration, have %d", s.Port)
		}
		if s.Register && s.Name == "" {
			at("service.name", "a name is required to register the service")
		}
		if s.Register && c.Discovery.Consul == nil {
			at("service.register", "registration needs a discovery.consul section")
		}
		if s.Check.HTTP != "" && s.Check.TCP != "" {
			at("service.check", "set http or tcp, not both")
		}
		if s.RegisterAddress != "" {
			if err := checkHostPort(s.RegisterAddress); err != nil {
				at("service.register_address", "%v", err)
			}
		}
		if s.Weights != nil && (s.Weights.Passing < 1 || s.Weights.Warning != nil && *s.Weights.Warning < 0) {
			at("service.weights", "passing must be at least 1 and warning at least 0")
		}
	}
	switch c.Log.Format {
	case "auto", "text", "json":
	default:
		at("log.format", "want auto, text or json, have %q", c.Log.Format)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		at("log.level", "want debug, info, warn or error, have %q", c.Log.Level)
	}
	if t := c.Telemetry; t.Traces != "" && t.Exporter != "" && t.Traces != t.Exporter {
		at("telemetry.exporter", "traces and exporter name the same setting and disagree (%q, %q)", t.Traces, t.Exporter)
	}
	for _, k := range []struct{ key, v string }{{"telemetry.traces", c.Telemetry.Traces}, {"telemetry.exporter", c.Telemetry.Exporter}} {
		switch k.v {
		case "", "otlp", "otlp-grpc", "otlp-http", "console", "none":
		default:
			at(k.key, "want otlp, otlp-grpc, otlp-http, console or none, have %q", k.v)
		}
	}
	switch c.Telemetry.Protocol {
	case "", "grpc", "http/protobuf":
	default:
		at("telemetry.protocol", "want grpc or http/protobuf, have %q", c.Telemetry.Protocol)
	}
	switch c.Telemetry.Metrics {
	case "", "prometheus", "none":
	default:
		at("telemetry.metrics", "want prometheus or none, have %q", c.Telemetry.Metrics)
	}
	if r := c.Telemetry.SampleRatio; r != nil && (*r < 0 || *r > 1) {
		at("telemetry.sample_ratio", "want a number from 0 to 1, have %v", *r)
	}
	for i, p := range c.Telemetry.Propagators {
		switch p {
		case "tracecontext", "baggage", "b3", "b3multi", "none":
		default:
			at(fmt.Sprintf("telemetry.propagators[%d]", i), "want tracecontext, baggage, b3, b3multi or none, have %q", p)
		}
	}
	// What telemetry itself would refuse at start (an endpoint that is no
	// address, propagators that cannot combine), so that validate and a
	// reload refuse it too, with its line; keys reported above are not
	// reported twice.
	for _, err := range c.TelemetryConfig().Validate() {
		key, msg, ok := strings.Cut(err.Error(), ": ")
		if !ok || !strings.HasPrefix(key, "telemetry") {
			key, msg = "telemetry", err.Error()
		}
		if !reportedUnder(d.errs, key) {
			at(key, "%s", msg)
		}
	}
	if c.Proxy.MaxHeaderBytes < 0 {
		at("proxy.max_header_bytes", "must not be negative")
	}
	for _, d := range []struct {
		key string
		v   time.Duration
	}{
		{"proxy.read_header_timeout", c.Proxy.ReadHeaderTimeout},
		{"proxy.idle_timeout", c.Proxy.IdleTimeout},
		{"proxy.write_timeout", c.Proxy.WriteTimeout},
		{"proxy.drain", c.Proxy.Drain},
	} {
		if d.v < 0 {
			at(d.key, "must not be negative, have %s", d.v)
		}
	}
}

// reportedUnder reports whether errs hold one for key or a key under it.
func reportedUnder(errs Errors, key string) bool {
	for _, e := range errs {
		if e.Key == key || strings.HasPrefix(e.Key, key+".") || strings.HasPrefix(e.Key, key+"[") {
			return true
		}
	}
	return false
}

func validateStatic(d *decoder, m map[string][]StaticEntry, prefix string) {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		p := join(prefix, name)
		if !upstreamName.MatchString(name) {
			d.fail(nil, p, "service names are lower-case letters, digits, '-' and '_' (hosts are matched in lower case), have %q", name)
			d.errs[len(d.errs)-1].Line = d.lines[p]
		}
		if len(m[name]) == 0 {
			// Routing to it could only fail: refused here, an edit of the
			// catalog file that empties a service is refused and logged.
			d.fail(nil, p, "lists no instance: give %q one, or remove it", name)
			d.errs[len(d.errs)-1].Line = d.lines[p]
		}
		ids := map[string]bool{}
		for i, e := range m[name] {
			ep := fmt.Sprintf("%s[%d]", p, i)
			line := e.line
			fail := func(key, format string, args ...any) {
				d.errs = append(d.errs, &Error{File: d.file, Line: line, Key: key, Msg: fmt.Sprintf(format, args...)})
			}
			if err := checkHostPort(e.Address); err != nil {
				fail(ep+".address", "%v", err)
			}
			if e.Weight < 0 || e.Weight == 0 && e.weightSet {
				fail(ep+".weight", "must be at least 1 (to take an instance out, remove it), have %d", e.Weight)
			}
			id := e.ID
			if id == "" {
				id = e.Address
			}
			if ids[id] {
				fail(ep, "instance %q is listed twice", id)
			}
			ids[id] = true
		}
	}
}

func checkHostPort(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("want host:port, have %q", addr)
	}
	if host == "" {
		return fmt.Errorf("want host:port with a host, have %q", addr)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("bad port in %q", addr)
	}
	return nil
}

// UpstreamNames returns the configured upstream names, sorted.
func (c *Config) UpstreamNames() []string {
	out := make([]string, 0, len(c.Upstreams))
	for n := range c.Upstreams {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// AllowedOnDemand reports whether name may be discovered on demand.
func (c *Config) AllowedOnDemand(name string) bool {
	if !c.Discovery.OnDemandOn() || !serviceName.MatchString(name) {
		return false
	}
	for _, p := range c.Discovery.OnDemandAllow {
		if ok, _ := matchPattern(p, name); ok {
			return true
		}
	}
	return false
}

func matchPattern(pattern, name string) (bool, error) {
	return filepath.Match(pattern, strings.ToLower(name))
}

// lineOf is the line of key, or of its nearest parent present in the file
// (a missing key is reported where its section is).
func (d *decoder) lineOf(key string) int {
	for key != "" {
		if l, ok := d.lines[key]; ok && l > 0 {
			return l
		}
		i := strings.LastIndexAny(key, ".[")
		if i < 0 {
			break
		}
		key = key[:i]
	}
	return 0
}
