package sidecar

import (
	"net"
	"net/http"
	"strings"
)

// routeError is why a request could not be given an upstream.
type routeError struct {
	status int
	msg    string
}

// targetName extracts the service name a request is addressed to: the
// authority of a CONNECT, the host of an absolute-form (forward proxy)
// request, or the Host header. The port, a trailing dot and a
// ".service.consul" suffix are dropped; names are case-insensitive.
func targetName(r *http.Request) string {
	host := r.Host
	if r.Method != http.MethodConnect && r.URL != nil && r.URL.Host != "" {
		host = r.URL.Host
	}
	if strings.IndexByte(host, ':') >= 0 {
		// Only a name with a port can split; the check spares the error
		// value SplitHostPort allocates for a bare name.
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
	}
	host = strings.TrimSuffix(host, ".")
	if i := strings.Index(host, ".service."); i > 0 && strings.HasSuffix(host, ".consul") {
		host = host[:i]
	}
	return lower(host)
}

// lower is strings.ToLower without allocating for names already lower-case.
func lower(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; 'A' <= c && c <= 'Z' {
			return strings.ToLower(s)
		}
	}
	return s
}

// route finds the upstream for r on listener l.
func (s *Sidecar) route(r *http.Request, l *listener) (*upstream, *routeError) {
	if fixed := l.fixed.Load(); fixed != nil {
		if u := s.lookup(*fixed); u != nil {
			return u, nil
		}
		return nil, &routeError{http.StatusBadGateway, "upstream " + *fixed + " is no longer configured"}
	}
	name := targetName(r)
	if name == "" {
		return nil, &routeError{http.StatusBadRequest, "request names no upstream (no Host)"}
	}
	if u := s.lookup(name); u != nil {
		return u, nil
	}
	if u, rerr := s.onDemand(r.Context(), name); u != nil || rerr != nil {
		return u, rerr
	}
	return nil, &routeError{http.StatusForbidden, "unknown upstream " + quote(name) + ": meshd forwards only to configured services"}
}

func quote(s string) string {
	if len(s) > 64 {
		s = s[:64] + "..."
	}
	return `"` + s + `"`
}
