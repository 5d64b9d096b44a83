package sidecar

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/pprof"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// UpstreamStatus is one upstream in /upstreams.
type UpstreamStatus struct {
	Name      string           `json:"name"`
	Source    string           `json:"source"`
	Algorithm string           `json:"algorithm"`
	OnDemand  bool             `json:"on_demand,omitempty"`
	Ready     bool             `json:"ready"`
	Stale     bool             `json:"stale"`
	State     string           `json:"state"` // "ok", "stale" or "waiting"
	Since     *time.Time       `json:"stale_since,omitempty"`
	LastError string           `json:"last_error,omitempty"`
	Reason    string           `json:"reason,omitempty"`
	Requests  uint64           `json:"requests"`
	Errors    uint64           `json:"errors"`
	Instances []InstanceStatus `json:"instances"`
}

// InstanceStatus is one instance in /upstreams.
type InstanceStatus struct {
	ID        string   `json:"id"`
	Address   string   `json:"address"`
	Weight    int      `json:"weight"`
	Tags      []string `json:"tags,omitempty"`
	InFlight  int64    `json:"in_flight"`
	Requests  uint64   `json:"requests"`
	Failures  uint64   `json:"errors"`
	LatencyMS *float64 `json:"latency_ewma_ms,omitempty"`
	Breaker   string   `json:"breaker"`
}

// Status reports every upstream, sorted by name. Safe to call concurrently.
func (s *Sidecar) Status() []UpstreamStatus {
	ups := *s.upstreams.Load()
	out := make([]UpstreamStatus, 0, len(ups))
	for _, name := range s.upstreamNames() {
		u := ups[name]
		if u == nil {
			continue
		}
		snap := u.pool.Load()
		st := UpstreamStatus{
			Name: name, Source: u.source, Algorithm: u.settings.Load().algorithm, OnDemand: u.onDemand,
			Ready: u.answered.Load(), Reason: snap.Reason, Requests: u.requests.Load(), Errors: u.errors.Load(),
			Instances: make([]InstanceStatus, 0, len(snap.Endpoints)),
		}
		st.State = "ok"
		if !st.Ready {
			st.State = "waiting"
		}
		if stale, since, err := u.stale(); stale {
			st.Stale, st.State = true, "stale"
			st.Since = &since
			st.LastError = err.Error()
		}
		for _, e := range snap.Endpoints {
			is := InstanceStatus{
				ID: e.ID, Address: e.Address, Weight: e.Weight, Tags: e.Tags,
				InFlight: e.InFlight.Load(), Requests: e.Requests.Load(), Failures: e.Failures.Load(),
				Breaker: e.Breaker().String(),
			}
			if d, ok := e.Latency(); ok {
				ms := float64(d) / float64(time.Millisecond)
				is.LatencyMS = &ms
			}
			st.Instances = append(st.Instances, is)
		}
		sort.Slice(st.Instances, func(i, j int) bool { return st.Instances[i].ID < st.Instances[j].ID })
		out = append(out, st)
	}
	return out
}

// readiness says whether every configured upstream has had its first
// discovery answer, and if not, why.
func (s *Sidecar) readiness() (bool, []string) {
	if s.draining.Load() {
		return false, []string{"shutting down"}
	}
	var why []string
	cfg := s.cfg.Load()
	for _, name := range cfg.UpstreamNames() {
		u := s.lookup(name)
		if u == nil {
			why = append(why, name+": not started")
			continue
		}
		stale, since, err := u.stale()
		switch {
		case !u.answered.Load() && stale:
			why = append(why, name+": discovery failing: "+err.Error())
		case !u.answered.Load():
			why = append(why, name+": waiting for the first discovery answer")
		case stale:
			// Ready (we route to the last good set) but say so.
			why = append(why, name+": stale since "+since.Format(time.RFC3339)+": "+err.Error())
		}
	}
	ready := true
	for _, w := range why {
		if !strings.Contains(w, ": stale since ") {
			ready = false
		}
	}
	return ready, why
}

func (s *Sidecar) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, r *http.Request) {
		ready, why := s.readiness()
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !ready {
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte("not ready\n" + strings.Join(why, "\n") + "\n"))
			return
		}
		body := "ready\n"
		if len(why) > 0 {
			body += strings.Join(why, "\n") + "\n"
		}
		w.Write([]byte(body))
	})
	mux.HandleFunc("GET /upstreams", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("format") == "text" {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			writeStatusText(w, s.Status())
			return
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(map[string]any{"upstreams": s.Status()})
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	s.extendAdmin(mux)
	return mux
}

// extendAdmin adds endpoints provided by optional parts (metrics).
func (s *Sidecar) extendAdmin(mux *http.ServeMux) {
	if s.tel != nil && s.tel.MetricsHandler != nil {
		h := s.tel.MetricsHandler
		mux.Handle("GET /metrics", h)
	}
}

// writeStatusText renders /upstreams as a table for people.
func writeStatusText(w io.Writer, ups []UpstreamStatus) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "UPSTREAM\tALGORITHM\tSTATE\tINSTANCE\tWEIGHT\tIN-FLIGHT\tREQUESTS\tERRORS\tBREAKER")
	for _, u := range ups {
		state := u.State
		if u.Stale {
			state += " (" + u.LastError + ")"
		}
		if len(u.Instances) == 0 {
			fmt.Fprintf(tw, "%s\t%s\t%s\t-\t\t\t\t\t\n", u.Name, u.Algorithm, state)
		}
		for _, in := range u.Instances {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%s\n", u.Name, u.Algorithm, state, in.Address, in.Weight, in.InFlight, in.Requests, in.Failures, in.Breaker)
		}
	}
	tw.Flush()
}
