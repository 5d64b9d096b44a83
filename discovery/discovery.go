// Package discovery finds the instances of the upstream services meshd routes to.
//
// A Source watches one service and delivers complete instance sets (never
// deltas) into a Mailbox. The static catalog (package discovery/static) is the
// embedded default; Consul (package discovery/consul) is the production source.
package discovery

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Instance is one network endpoint of a service.
type Instance struct {
	// ID is the stable key for per-instance state (breakers, latency averages);
	// an instance that reappears with the same ID keeps its state.
	ID string
	// Address is host:port to dial.
	Address string
	// Weight is the relative capacity used by weighted algorithms; 1 when unset.
	Weight int
	// Tags and Meta are copied from the source for display and selection.
	Tags []string
	Meta map[string]string
}

// Update is the complete, current instance set of one service.
type Update struct {
	Service   string
	Index     uint64
	Instances []Instance
	// Reason explains an empty set (for example "no passing instances in consul").
	Reason string
}

// ErrUnknownService is returned (wrapped) when a source has never heard of a service.
var ErrUnknownService = errors.New("unknown service")

// Source watches services. Implementations must be safe for concurrent use.
type Source interface {
	// Name is a short label for logs and /upstreams ("static", "consul").
	Name() string
	// Watch delivers the service's instance sets to box until ctx ends. It
	// reports transient failures with box.Fail (the consumer keeps the last good
	// set) and returns only when ctx is done or the watch cannot continue.
	Watch(ctx context.Context, service string, box *Mailbox) error
}

// Mailbox carries the latest instance set and health of one watch from a
// producer to a consumer without ever blocking the producer: bursts of changes
// coalesce into the newest one. Safe for one or more producers and one consumer.
type Mailbox struct {
	mu      sync.Mutex
	pending *Update
	status  Status
	dirty   bool
	ready   chan struct{}
}

// Status describes the health of a watch.
type Status struct {
	// Err is the last error, nil while the watch is healthy.
	Err error
	// Since is when the watch first failed in the current run of failures.
	Since time.Time
	// Answered reports whether the source has answered at least once.
	Answered bool
}

// NewMailbox returns an empty mailbox.
func NewMailbox() *Mailbox { return &Mailbox{ready: make(chan struct{}, 1)} }

// Put replaces any pending set with u and clears the error state. Never blocks.
func (m *Mailbox) Put(u Update) {
	m.mu.Lock()
	m.pending = &u
	m.status = Status{Answered: true}
	m.dirty = true
	m.mu.Unlock()
	m.signal()
}

// Fail records a transient error; a pending set, if any, is kept. Never blocks.
func (m *Mailbox) Fail(err error) {
	m.mu.Lock()
	if m.status.Err == nil {
		m.status.Since = time.Now()
	}
	m.status.Err = err
	m.dirty = true
	m.mu.Unlock()
	m.signal()
}

func (m *Mailbox) signal() {
	select {
	case m.ready <- struct{}{}:
	default:
	}
}

// Ready is signalled after Put or Fail; drain it with Take.
func (m *Mailbox) Ready() <-chan struct{} { return m.ready }

// Take returns the pending set (nil if none arrived since the last Take), the
// current status, and whether anything changed since the last Take.
func (m *Mailbox) Take() (u *Update, st Status, changed bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	u, m.pending = m.pending, nil
	changed, m.dirty = m.dirty, false
	return u, m.status, changed
}
