package consul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/hashicorp/consul/api"

	"github.com/meshd/meshd/discovery"
)

// Each watch may send queryBurst queries back to back, and then one per
// queryGap: a service whose instances change many times a second, or an index
// that does not advance, cannot turn the watch into a busy loop against
// Consul, while an occasional change is fetched without delay.
const (
	queryGap   = 50 * time.Millisecond
	queryBurst = 10
)

// limiter is a token bucket holding up to queryBurst queries, refilled at one
// per queryGap. Not safe for concurrent use.
type limiter struct {
	tokens float64
	last   time.Time
}

// wait returns how long to wait before the next query, which it accounts.
func (l *limiter) wait(now time.Time) time.Duration {
	if l.last.IsZero() {
		l.tokens = queryBurst
	} else {
		l.tokens = min(queryBurst, l.tokens+float64(now.Sub(l.last))/float64(queryGap))
	}
	l.last = now
	l.tokens--
	if l.tokens >= 0 {
		return 0
	}
	return time.Duration(-l.tokens * float64(queryGap))
}

// jitter returns a random value in [0, n); a variable so tests can pin it.
var jitter = rand.Int64N

// WatchOptions narrow what a watch of one service returns. The zero value
// means: every passing instance in the Config's datacenter.
type WatchOptions struct {
	// Tags an instance must all carry.
	Tags []string
	// Datacenter overrides Config.Datacenter for this service.
	Datacenter string
	// Filter is a Consul filter expression applied by Consul, for example
	// `Service.Meta.version == "2"`.
	Filter string
	// IncludeWarning keeps instances whose checks are in the warning state
	// (with their Weights.Warning); critical and maintenance ones are always
	// left out.
	IncludeWarning bool
}

func (o WatchOptions) clone() WatchOptions {
	o.Tags = slices.Clone(o.Tags)
	return o
}

func (o WatchOptions) validate() error {
	for _, t := range o.Tags {
		if t == "" {
			return errors.New("empty tag in options")
		}
	}
	return nil
}

// Source is the Consul discovery source. It is safe for concurrent use: any
// number of watches may run at once, each holding one blocking query (and so
// one HTTP connection) open to the agent. Note that the agent limits
// connections per client address (limits.http_max_conns_per_client, default
// 200), which bounds how many services one process can watch.
type Source struct {
	c *conn

	mu   sync.RWMutex
	opts map[string]WatchOptions
}

var _ discovery.Source = (*Source)(nil)

var errSourceNotConfigured = errors.New("consul: source not created with New")

// New returns a Source for cfg. It does not contact Consul.
func New(cfg Config) (*Source, error) {
	c, err := newConn(cfg)
	if err != nil {
		return nil, err
	}
	return &Source{c: c, opts: make(map[string]WatchOptions)}, nil
}

// Name returns "consul".
func (s *Source) Name() string { return "consul" }

// SetOptions sets the options that Watch and Known use for service. It
// affects watches started afterwards, not running ones.
func (s *Source) SetOptions(service string, o WatchOptions) {
	s.mu.Lock()
	if s.opts == nil {
		s.opts = make(map[string]WatchOptions)
	}
	s.opts[service] = o.clone()
	s.mu.Unlock()
}

func (s *Source) options(service string) WatchOptions {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.opts[service].clone()
}

// Watch is WatchService with the options set for service by SetOptions (the
// zero WatchOptions if none).
func (s *Source) Watch(ctx context.Context, service string, box *discovery.Mailbox) error {
	if s == nil || s.c == nil {
		return errSourceNotConfigured
	}
	return s.WatchService(ctx, service, s.options(service), box)
}

// WatchService follows service's healthy instances with blocking queries on
// /v1/health/service and puts each changed set into box; the first answer is
// always put, an empty set with a Reason. Instances are sorted by ID, which
// is "node/serviceID". Instances in node or service maintenance, critical
// ones, and ones without a usable address or port are left out.
//
// Errors are reported with box.Fail (the consumer keeps its last set) and
// retried with jittered exponential backoff; the first answer after errors is
// put even if unchanged, which clears the error state. An answer that ACLs
// emptied (the token lacks service:read or node:read) counts as an error. WatchService returns
// nil when ctx ends, and an error only when the watch cannot continue: an
// invalid service name or options, or a query Consul rejects as malformed
// (such as a filter expression it cannot parse). The Update's slices and maps
// are shared with the watch and must not be modified.
func (s *Source) WatchService(ctx context.Context, service string, o WatchOptions, box *discovery.Mailbox) error {
	if s == nil || s.c == nil {
		return errSourceNotConfigured
	}
	if err := checkServiceName(service); err != nil {
		return fmt.Errorf("consul: watch %q: %w", service, err)
	}
	if box == nil {
		return fmt.Errorf("consul: watch %q: nil mailbox", service)
	}
	o = o.clone()
	if err := o.validate(); err != nil {
		return fmt.Errorf("consul: watch %q: %w", service, err)
	}
	w := &watch{c: s.c, service: service, o: o, box: box}
	return w.run(ctx)
}

// Known reports whether Consul's catalog has any instance of service,
// healthy or not, in the datacenter of the service's options. It lets a
// caller tell an unknown name from one with no healthy instances. When ACLs
// hide every instance from the token, Known returns an error, not false.
func (s *Source) Known(ctx context.Context, service string) (bool, error) {
	if s == nil || s.c == nil {
		return false, errSourceNotConfigured
	}
	if err := checkServiceName(service); err != nil {
		return false, fmt.Errorf("consul: lookup %q: %w", service, err)
	}
	o := s.options(service)
	q := s.c.queryOptions(o.Datacenter).WithContext(ctx)
	entries, meta, err := s.c.client.Catalog().Service(service, "", q)
	if err == nil && len(entries) == 0 {
		err = s.c.hidden(meta)
	}
	if err != nil {
		return false, fmt.Errorf("consul: lookup %q: %w", service, s.c.redact(describe(err, needRead)))
	}
	return len(entries) > 0, nil
}

// Failures for an empty answer that ACLs may have emptied. Consul hides what
// a token may not read instead of refusing the query, and says so in a header
// except to the anonymous token.
var (
	errFiltered = errors.New("ACL permission denied: consul filtered every instance out of the answer (the token needs service:read and node:read)")
	errNoToken  = errors.New("ACL permission denied: consul denies by default and no ACL token is configured, so an empty answer cannot be trusted (configure a token with service:read and node:read)")
)

// hidden returns why an empty answer with meta may be an artefact of ACLs,
// or nil if it can be trusted. With no token and a default policy of deny an
// empty answer is never trusted, even where the anonymous token may read.
func (c *conn) hidden(meta *api.QueryMeta) error {
	switch {
	case meta == nil:
		return nil
	case meta.ResultsFilteredByACLs:
		return errFiltered
	case c.token == "" && meta.DefaultACLPolicy == "deny":
		return errNoToken
	}
	return nil
}

func checkServiceName(service string) error {
	if service == "" {
		return errors.New("empty service name")
	}
	if strings.ContainsAny(service, "/?#") || strings.ContainsFunc(service, unicode.IsSpace) ||
		strings.ContainsFunc(service, unicode.IsControl) {
		return errors.New("invalid service name")
	}
	return nil
}

// Permissions named in ACL errors.
const (
	needRead  = "service:read and node:read"
	needWrite = "service:write on the service and node:read"
)

// describe adds what a reader needs to act on well-known Consul answers;
// need names the ACL permissions the request requires.
func describe(err error, need string) error {
	var se api.StatusError
	if errors.As(err, &se) {
		switch se.Code {
		case http.StatusForbidden:
			return fmt.Errorf("ACL permission denied (the token needs %s): %w", need, err)
		}
		if permanent(err) {
			return fmt.Errorf("query rejected: %w", err)
		}
	}
	return err
}

// permanent reports whether Consul rejected the query itself, so that asking
// again cannot succeed: a 400, or a filter expression Consul cannot parse
// (which it answers with a 500).
func permanent(err error) bool {
	var se api.StatusError
	if !errors.As(err, &se) {
		return false
	}
	return se.Code == http.StatusBadRequest ||
		(se.Code == http.StatusInternalServerError && strings.Contains(se.Body, "Failed to create boolean expression evaluator"))
}

type watch struct {
	c       *conn
	service string
	o       WatchOptions
	box     *discovery.Mailbox

	index    uint64
	last     []discovery.Instance
	answered bool
	failures int
	filtered bool // the last answer was filtered by ACLs
}

func (w *watch) run(ctx context.Context) error {
	var lim limiter
	for {
		if ctx.Err() != nil {
			return nil
		}
		if d := lim.wait(time.Now()); d > 0 && !sleep(ctx, d) {
			return nil
		}
		lastQuery := time.Now()
		entries, meta, err := w.query(ctx)
		if err == nil && len(entries) == 0 {
			err = w.c.hidden(meta)
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			w.failures++
			// Start over with a non-blocking query, so that the first
			// answer after the failure comes at once and clears the error
			// even if nothing changed, and so that an agent restarted with
			// a lower index is not asked to wait for the old one.
			w.index = 0
			err = fmt.Errorf("consul: watch %q: %w", w.service, w.c.redact(describe(err, needRead)))
			w.box.Fail(err)
			if permanent(err) {
				w.c.log.Error("consul watch stopped", "service", w.service, "error", err)
				return err
			}
			delay := backoff(w.c.backoffBase, w.c.backoffMax, w.failures)
			// The first failure and every tenth after it are warnings; the
			// mailbox carries the current error for the rest.
			level := slog.LevelDebug
			if w.failures%10 == 1 {
				level = slog.LevelWarn
			}
			w.c.log.Log(ctx, level, "consul watch failed", "service", w.service, "attempt", w.failures,
				"retry_in", delay, "error", err)
			if !sleep(ctx, delay) {
				return nil
			}
			continue
		}
		recovered := w.failures > 0
		if recovered {
			w.c.log.Info("consul watch recovered", "service", w.service, "failed_attempts", w.failures)
			w.failures = 0
		}
		if meta.ResultsFilteredByACLs != w.filtered {
			w.filtered = meta.ResultsFilteredByACLs
			if w.filtered {
				w.c.log.Warn("consul hides some instances from this token (it needs service:read and node:read)",
					"service", w.service, "visible", len(entries))
			}
		}
		w.c.log.Debug("consul watch answer", "service", w.service, "index", meta.LastIndex,
			"entries", len(entries), "took", time.Since(lastQuery))
		w.index = nextIndex(w.index, meta.LastIndex)
		insts := w.instances(entries)
		if w.answered && !recovered && equalInstances(insts, w.last) {
			continue
		}
		w.answered, w.last = true, insts
		u := discovery.Update{Service: w.service, Index: meta.LastIndex, Instances: insts}
		if len(insts) == 0 {
			u.Reason = "no passing instances in consul"
			if w.o.IncludeWarning {
				u.Reason = "no passing or warning instances in consul"
			}
		}
		w.box.Put(u)
	}
}

func (w *watch) query(ctx context.Context) ([]*api.ServiceEntry, *api.QueryMeta, error) {
	q := w.c.queryOptions(w.o.Datacenter)
	q.WaitIndex = w.index
	q.WaitTime = w.c.wait
	q.Filter = w.o.Filter
	// A connection that hangs (a partitioned agent) must not stall the watch
	// forever: allow the wait, Consul's jitter of up to wait/16, and slack.
	rctx, cancel := context.WithTimeout(ctx, q.WaitTime+q.WaitTime/16+10*time.Second)
	defer cancel()
	return w.c.client.Health().ServiceMultipleTags(w.service, w.o.Tags, !w.o.IncludeWarning, q.WithContext(rctx))
}

// nextIndex applies Consul's rules for blocking-query indexes: an index that
// goes backwards restarts the loop from 0, and a zero index is replaced by 1
// so that the next query blocks.
func nextIndex(prev, got uint64) uint64 {
	switch {
	case got < prev:
		return 0
	case got == 0:
		return 1
	default:
		return got
	}
}

// instances maps health entries to instances, sorted by ID.
func (w *watch) instances(entries []*api.ServiceEntry) []discovery.Instance {
	out := make([]discovery.Instance, 0, len(entries))
	for _, e := range entries {
		if e == nil || e.Node == nil || e.Service == nil {
			continue
		}
		in, ok := toInstance(e, w.o.IncludeWarning)
		if ok {
			out = append(out, in)
		}
	}
	slices.SortFunc(out, func(a, b discovery.Instance) int { return strings.Compare(a.ID, b.ID) })
	return out
}

func toInstance(e *api.ServiceEntry, includeWarning bool) (discovery.Instance, bool) {
	var weight int
	// AggregatedStatus reports "maintenance" when the node or the service
	// carries a maintenance check, whatever the other checks say.
	switch e.Checks.AggregatedStatus() {
	case api.HealthPassing:
		weight = e.Service.Weights.Passing
	case api.HealthWarning:
		if !includeWarning {
			return discovery.Instance{}, false
		}
		weight = e.Service.Weights.Warning
		if weight <= 0 && e.Service.Weights.Passing > 0 {
			// Registered with a warning weight of 0: no traffic while
			// it warns. (Both 0 is an entry without weights: 1.)
			return discovery.Instance{}, false
		}
	default:
		return discovery.Instance{}, false
	}
	if weight <= 0 {
		weight = 1
	}
	host := e.Service.Address
	if host == "" {
		host = e.Node.Address
	}
	port := e.Service.Port
	if host == "" || port <= 0 || port > 65535 {
		return discovery.Instance{}, false
	}
	return discovery.Instance{
		ID:      e.Node.Node + "/" + e.Service.ID,
		Address: net.JoinHostPort(host, strconv.Itoa(port)),
		Weight:  weight,
		Tags:    e.Service.Tags,
		Meta:    e.Service.Meta,
	}, true
}

func equalInstances(a, b []discovery.Instance) bool {
	return slices.EqualFunc(a, b, func(x, y discovery.Instance) bool {
		return x.ID == y.ID && x.Address == y.Address && x.Weight == y.Weight &&
			slices.Equal(x.Tags, y.Tags) && maps.Equal(x.Meta, y.Meta)
	})
}

// backoff returns the delay before retry number attempt (1-based): base
// doubled per attempt up to max, of which the upper half is random.
func backoff(base, max time.Duration, attempt int) time.Duration {
	d := base
	for i := 1; i < attempt && d < max; i++ {
		d *= 2
	}
	d = min(d, max)
	half := d / 2
	return half + time.Duration(jitter(int64(d-half)+1))
}

// sleep waits for d or until ctx ends, reporting whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
