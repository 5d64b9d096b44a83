// Package static is meshd's embedded discovery source: a catalog of services
// and their instances given in the config file or a file of its own.
package static

import (
	"context"
	"slices"
	"sync"

	"github.com/meshd/meshd/discovery"
)

// Catalog is a discovery.Source over a fixed map that can be replaced as a
// whole (config reload, catalog file change). Safe for concurrent use.
type Catalog struct {
	mu       sync.Mutex
	services map[string][]discovery.Instance
	version  uint64
	subs     map[string]map[*discovery.Mailbox]struct{}
}

// New returns a catalog holding services (copied).
func New(services map[string][]discovery.Instance) *Catalog {
	c := &Catalog{subs: map[string]map[*discovery.Mailbox]struct{}{}}
	c.services = clone(services)
	return c
}

// Name implements discovery.Source.
func (c *Catalog) Name() string { return "static" }

// Has reports whether service is in the catalog.
func (c *Catalog) Has(service string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.services[service]
	return ok
}

// Lookup returns a copy of service's instances and whether the catalog
// has the service.
func (c *Catalog) Lookup(service string) ([]discovery.Instance, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	in, ok := c.services[service]
	return slices.Clone(in), ok
}

// Replace swaps in a new catalog and sends the new set to every watcher of a
// service whose instances changed.
func (c *Catalog) Replace(services map[string][]discovery.Instance) {
	next := clone(services)
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.services
	c.services = next
	c.version++
	for svc, boxes := range c.subs {
		if equal(old[svc], next[svc]) {
			continue
		}
		u := c.updateLocked(svc)
		for b := range boxes {
			b.Put(u)
		}
	}
}

func (c *Catalog) updateLocked(svc string) discovery.Update {
	insts, ok := c.services[svc]
	u := discovery.Update{Service: svc, Index: c.version, Instances: slices.Clone(insts)}
	switch {
	case !ok:
		u.Reason = "not in the static catalog"
	case len(insts) == 0:
		u.Reason = "the static catalog lists no instance"
	}
	return u
}

// Watch implements discovery.Source: it delivers the current set at once and
// every changed set after, until ctx ends.
func (c *Catalog) Watch(ctx context.Context, service string, box *discovery.Mailbox) error {
	c.mu.Lock()
	if c.subs[service] == nil {
		c.subs[service] = map[*discovery.Mailbox]struct{}{}
	}
	c.subs[service][box] = struct{}{}
	box.Put(c.updateLocked(service))
	c.mu.Unlock()
	<-ctx.Done()
	c.mu.Lock()
	delete(c.subs[service], box)
	if len(c.subs[service]) == 0 {
		delete(c.subs, service)
	}
	c.mu.Unlock()
	return ctx.Err()
}

func clone(m map[string][]discovery.Instance) map[string][]discovery.Instance {
	out := make(map[string][]discovery.Instance, len(m))
	for k, v := range m {
		out[k] = slices.Clone(v)
	}
	return out
}

func equal(a, b []discovery.Instance) bool {
	return slices.EqualFunc(a, b, func(x, y discovery.Instance) bool {
		return x.ID == y.ID && x.Address == y.Address && x.Weight == y.Weight && slices.Equal(x.Tags, y.Tags)
	})
}
