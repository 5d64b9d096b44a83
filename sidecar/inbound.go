package sidecar

import (
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/discovery"
)

// serveInbound is the reverse proxy in front of the local app.
func (s *Sidecar) serveInbound(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	u := s.inboundUpstream()
	u.requests.Add(1)
	s.forward(w, r, u, start, false, nil)
}

// inboundUpstream returns the single-instance upstream of the local app,
// rebuilt when the service's address changes.
func (s *Sidecar) inboundUpstream() *upstream {
	cfg := s.cfg.Load()
	addr := net.JoinHostPort(cfg.Service.Address, strconv.Itoa(cfg.Service.Port))
	if u := s.inbound.Load(); u != nil && u.inboundAddr == addr {
		return u
	}
	policy, _ := balance.New(balance.Config{Algorithm: "round_robin"})
	u, err := newUpstream("inbound", "local", inboundSettings(), policy, s.log, s.tel)
	if err != nil {
		// The inbound settings are fixed and valid; this cannot happen.
		s.log.Error("inbound upstream", "err", err)
		return s.inbound.Load()
	}
	u.inboundAddr = addr
	close(u.done)
	u.pool.Update([]discovery.Instance{{ID: "local-app", Address: addr, Weight: 1}}, "")
	u.answered.Store(true)
	if s.inbound.CompareAndSwap(s.inbound.Load(), u) {
		return u
	}
	return s.inbound.Load()
}
