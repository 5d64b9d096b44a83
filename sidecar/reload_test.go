package sidecar

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
)

// A reload that replaces an upstream's transport retires the old one: its
// idle connections close at once, and a request in flight on it finishes
// normally but its connection is closed, not pooled where nothing would
// ever use or close it.
func TestReloadRetiresTheOldTransport(t *testing.T) {
	arrived := make(chan struct{}, 1)
	release := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock) // runs before the backend's Close, which waits for /slow
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			arrived <- struct{}{}
			<-release
		}
		io.WriteString(w, "done "+r.URL.Path)
	})
	conf := func(header string) string {
		// The h1 client's pool is what is watched: the event loops,
		// which pool connections of their own, are off.
		return fmt.Sprintf("proxy: {event_loop: false}\ndiscovery: {static: {svc: [%s]}}\nupstreams: {svc: {timeouts: {response_header: %s}}}\n", b.addr(), header)
	}
	s := start(t, conf("15s"))
	c := proxyClient(s)
	get := func(path string) string {
		resp, err := c.Get("http://svc" + path)
		if err != nil {
			return err.Error()
		}
		return readAll(t, resp)
	}
	if have := get("/fast"); have != "done /fast" {
		t.Fatalf("before the reload: %q", have)
	}
	old := s.lookup("svc").settings.Load().transport
	if old.fast == nil || old.fast.Idle(b.addr()) != 1 {
		t.Fatal("want one pooled h1 connection before the reload")
	}
	slow := make(chan string, 1)
	go func() { slow <- get("/slow") }()
	<-arrived

	cfg, err := parseConfig(conf("10s")) // the same listeners

	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(cfg); err != nil {
		t.Fatalf("reload: %v", err)
	}
	if s.lookup("svc").settings.Load().transport == old {
		t.Fatal("a new response_header timeout should give the upstream a new transport")
	}
	if n := old.fast.Idle(b.addr()); n != 0 {
		t.Fatalf("old transport right after the reload: want no idle connection, have %d", n)
	}
	unblock()
	if have := <-slow; have != "done /slow" {
		t.Fatalf("the request in flight across the reload: %q", have)
	}
	if n := old.fast.Idle(b.addr()); n != 0 {
		t.Fatalf("old transport after its last request: want no idle connection, have %d", n)
	}
	if have := get("/fast"); have != "done /fast" {
		t.Fatalf("after the reload: %q", have)
	}
}

// Settings the listeners' servers were started with are not reloaded: a
// change to them is refused saying so, not reported reloaded and ignored.
func TestReloadRefusesServerSettings(t *testing.T) {
	b := newBackend(t, "b", nil)
	conf := func(proxy string) string {
		return fmt.Sprintf("discovery: {static: {svc: [%s]}}\nupstreams: {svc: {}}\nproxy: {%s}\n", b.addr(), proxy)
	}
	s := start(t, conf("idle_timeout: 90s"))
	cases := []struct{ proxy, want string }{
		{"idle_timeout: 90s", ""},
		{"idle_timeout: 90s, write_timeout: 5s", ""}, // applies at once: each write reads it
		{"idle_timeout: 30s", "proxy.idle_timeout changed"},
		{"idle_timeout: 90s, read_header_timeout: 1s", "proxy.read_header_timeout changed"},
		{"idle_timeout: 90s, max_header_bytes: 4096", "proxy.max_header_bytes changed"},
	}
	if engineOn && os.Getenv("MESHD_TEST_FAST_PATH") == "" {
		// (The other runs turn the loops off in every config.)
		cases = append(cases, struct{ proxy, want string }{"idle_timeout: 90s, event_loop: false", "proxy.event_loop changed"})
	}
	for _, tc := range cases {
		cfg, err := parseConfig(conf(tc.proxy))
		if err != nil {
			t.Fatal(err)
		}
		err = s.Reload(cfg)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: want the reload, have %v", tc.proxy, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: want the reload refused with %q, have %v", tc.proxy, tc.want, err)
		}
	}
}
