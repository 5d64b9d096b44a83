package balance

import (
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
)

func headerReq(name, value string) *Request {
	r := httptest.NewRequest("GET", "http://svc/a/b?x=1", nil)
	if value != "" {
		r.Header.Set(name, value)
	}
	req := newReq()
	req.HTTP = r
	return req
}

func ipReq(i int) *Request {
	req := newReq()
	req.ClientIP = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
	return req
}

func TestHashKeepsKey(t *testing.T) {
	eps := endpoints(10)
	pk := picker(t, Config{Algorithm: "hash", Key: "header:x-user"}, eps)
	for k := range 20 {
		user := fmt.Sprintf("user-%d", k)
		first, err := pk.Pick(headerReq("X-User", user))
		if err != nil {
			t.Fatal(err)
		}
		req := headerReq("X-User", user)
		for i := range 10000 {
			e, err := pk.Pick(req)
			if err != nil || e != first {
				t.Fatalf("key %s lookup %d: want %s, have %v (err %v)", user, i, first.ID, e, err)
			}
		}
		if req.Reason != "hash header:x-user" {
			t.Errorf("reason: want %q, have %q", "hash header:x-user", req.Reason)
		}
		// A fresh picker over an equal list (another sidecar, or a rebuild)
		// agrees.
		other := picker(t, Config{Algorithm: "hash", Key: "header:x-user"}, endpoints(10))
		if e, _ := other.Pick(req); e.ID != first.ID {
			t.Errorf("key %s on a rebuilt picker: want %s, have %s", user, first.ID, e.ID)
		}
	}
}

// owners maps keys 0..n-1 to instance IDs.
func owners(t *testing.T, cfg Config, eps []*Endpoint, n int) []string {
	t.Helper()
	pk := picker(t, cfg, eps)
	out := make([]string, n)
	for k := range out {
		var req *Request
		if cfg.Algorithm == "ip_hash" {
			req = ipReq(k)
		} else {
			req = headerReq("X-User", fmt.Sprintf("user-%d", k))
		}
		e, err := pk.Pick(req)
		if err != nil {
			t.Fatal(err)
		}
		out[k] = e.ID
	}
	return out
}

func TestHashRemapFraction(t *testing.T) {
	const keys = 20000
	for _, cfg := range []Config{{Algorithm: "hash", Key: "header:x-user"}, {Algorithm: "ip_hash"}} {
		t.Run(cfg.Algorithm, func(t *testing.T) {
			all := endpoints(11)
			base := owners(t, cfg, all[:10], keys)
			added := owners(t, cfg, all, keys)
			removed := owners(t, cfg, append(append([]*Endpoint{}, all[:4]...), all[5:10]...), keys)
			limit := 1.0/10 + 0.05
			var movedAdd, movedRemove, onRemoved, collateral int
			for k := range keys {
				if added[k] != base[k] {
					movedAdd++
					if added[k] != "i10" {
						collateral++ // moved between old instances
					}
				}
				if base[k] != "i4" && removed[k] != base[k] {
					collateral++
				}
				if base[k] == "i4" {
					onRemoved++
				}
				if removed[k] != base[k] {
					movedRemove++
				}
			}
			fa, fr := float64(movedAdd)/keys, float64(movedRemove)/keys
			if fa > limit || fa < 0.05 {
				t.Errorf("adding 1 to 10 instances: want 0.05 <= moved fraction <= %.2f, have %.4f", limit, fa)
			}
			if fr > limit || movedRemove < onRemoved {
				t.Errorf("removing 1 of 10 instances: want moved fraction <= %.2f and at least the removed instance's %d keys, have %.4f (%d)", limit, onRemoved, fr, movedRemove)
			}
			// Maglev is close to minimal: keys that move between instances
			// that stayed put are a small fraction.
			if fc := float64(collateral) / keys; fc > 0.04 {
				t.Errorf("keys moved between unchanged instances (add and remove): want <= 0.04, have %.4f", fc)
			}
			t.Logf("moved: add %.4f, remove %.4f (removed instance held %.4f), collateral %.4f", fa, fr, float64(onRemoved)/keys, float64(collateral)/keys)
			// Keys are spread evenly: each of 10 instances holds 10% ± 1%.
			per := map[string]int{}
			for _, id := range base {
				per[id]++
			}
			for id, n := range per {
				if f := float64(n) / keys; math.Abs(f-0.1) > 0.01 {
					t.Errorf("instance %s holds %.4f of keys: want 0.10±0.01", id, f)
				}
			}
		})
	}
}

func TestHashRespectsWeights(t *testing.T) {
	eps := endpoints(3, 1, 2, 3)
	own := owners(t, Config{Algorithm: "hash", Key: "header:x-user"}, eps, 60000)
	per := map[string]int{}
	for _, id := range own {
		per[id]++
	}
	for i, w := range []int{1, 2, 3} {
		want := float64(w) / 6
		if f := float64(per[eps[i].ID]) / 60000; math.Abs(f-want) > 0.01 {
			t.Errorf("instance %d (weight %d): want key share %.3f±0.01, have %.4f", i, w, want, f)
		}
	}
}

func TestHashKeySources(t *testing.T) {
	mk := func(mod func(r *http.Request)) *http.Request {
		r := httptest.NewRequest("GET", "http://svc/p/q?a=1&sid=abc&b=", nil)
		if mod != nil {
			mod(r)
		}
		return r
	}
	cases := []struct {
		key     string
		r       *http.Request
		want    string // the value hashed; "" = missing
		wantURL bool
	}{
		{"header:x-user", mk(func(r *http.Request) { r.Header.Set("X-User", "u1") }), "u1", false},
		{"header:X-USER", mk(func(r *http.Request) { r.Header.Add("x-user", "u2"); r.Header.Add("x-user", "u3") }), "u2", false},
		{"header:x-user", mk(nil), "", false},
		{"header:host", mk(nil), "svc", false},
		{"cookie:sid", mk(func(r *http.Request) { r.Header.Set("Cookie", "a=1; sid=\"s-9\"; z=2") }), "s-9", false},
		{"cookie:sid", mk(func(r *http.Request) { r.Header.Add("Cookie", "a=1"); r.Header.Add("Cookie", "sid=x2") }), "x2", false},
		{"cookie:sid", mk(func(r *http.Request) { r.Header.Set("Cookie", "xsid=1; sid=") }), "", false},
		{"query:sid", mk(nil), "abc", false},
		{"query:b", mk(nil), "", false},
		{"query:zz", mk(nil), "", false},
		{"path", mk(nil), "/p/q", false},
		{"url", mk(nil), "", true},
	}
	for _, c := range cases {
		k, err := parseKey(c.key)
		if err != nil {
			t.Fatalf("parseKey(%q): %v", c.key, err)
		}
		req := newReq()
		req.HTTP = c.r
		h, ok := k.hash(req)
		switch {
		case c.wantURL:
			want := hashString(hashString(hashString(seedKey, "/p/q"), "?"), "a=1&sid=abc&b=")
			if !ok || h != want {
				t.Errorf("%s: want the hash of path and query, have %x (ok %v)", c.key, h, ok)
			}
		case c.want == "":
			if ok {
				t.Errorf("%s: want no key, have one", c.key)
			}
		default:
			if !ok || h != hashString(seedKey, c.want) {
				t.Errorf("%s: want the hash of %q, have %x (ok %v)", c.key, c.want, h, ok)
			}
		}
	}
	// No HTTP request at all: missing.
	k, _ := parseKey("path")
	if _, ok := k.hash(newReq()); ok {
		t.Error("nil HTTP request: want no key")
	}
}

func TestCookieAndQueryScan(t *testing.T) {
	cookies := []struct {
		lines []string
		name  string
		want  string
	}{
		{[]string{"sid=1"}, "sid", "1"},
		{[]string{"  sid=1 ;x=2"}, "sid", "1"},
		{[]string{"x=2;sid=\"q\""}, "sid", "q"},
		{[]string{"x=2;sid"}, "sid", ""},
		{[]string{"Sid=1"}, "sid", ""},
		{[]string{"a=b", "c=d; sid=e"}, "sid", "e"},
		{nil, "sid", ""},
	}
	for _, c := range cookies {
		if have := cookieValue(c.lines, c.name); have != c.want {
			t.Errorf("cookieValue(%q, %q): want %q, have %q", c.lines, c.name, c.want, have)
		}
	}
	queries := []struct{ raw, name, want string }{
		{"a=1&b=2", "b", "2"},
		{"b=&b=3", "b", "3"},
		{"ab=1&b", "b", ""},
		{"b=x%20y", "b", "x%20y"},
		{"", "b", ""},
	}
	for _, c := range queries {
		if have := queryValue(c.raw, c.name); have != c.want {
			t.Errorf("queryValue(%q, %q): want %q, have %q", c.raw, c.name, c.want, have)
		}
	}
}

func TestHashFallback(t *testing.T) {
	seedRand(t, 41)
	eps := endpoints(4)
	pk := picker(t, Config{Algorithm: "hash", Key: "cookie:sid"}, eps)
	req := headerReq("X-Other", "v")
	c := make([]int, 4)
	for range 400 {
		e, err := pk.Pick(req)
		if err != nil {
			t.Fatal(err)
		}
		c[index(eps, e)]++
	}
	// The default fallback, round_robin, spreads requests exactly.
	for i, n := range c {
		if n != 100 {
			t.Errorf("instance %d without key: want 100 of 400 (round robin), have %d", i, n)
		}
	}
	if want := "fallback: key missing (round_robin)"; req.Reason != want {
		t.Errorf("reason: want %q, have %q", want, req.Reason)
	}
	ip := picker(t, Config{Algorithm: "ip_hash", Fallback: "p2c"}, eps)
	req = newReq() // no ClientIP
	if _, err := ip.Pick(req); err != nil {
		t.Fatal(err)
	}
	if want := "fallback: client ip unknown (p2c)"; req.Reason != want {
		t.Errorf("reason: want %q, have %q", want, req.Reason)
	}
	req = ipReq(7)
	if _, err := ip.Pick(req); err != nil || req.Reason != "hash client ip" {
		t.Errorf("with client ip: want reason %q, have %q (err %v)", "hash client ip", req.Reason, err)
	}
}

func TestIPHashMappedAddressesAgree(t *testing.T) {
	eps := endpoints(10)
	pk := picker(t, Config{Algorithm: "ip_hash"}, eps)
	for i := range 200 {
		v4 := ipReq(i)
		v6 := newReq()
		v6.ClientIP = netip.AddrFrom16(v4.ClientIP.As16()) // ::ffff:10.x.y.z
		a, _ := pk.Pick(v4)
		b, _ := pk.Pick(v6)
		if a != b {
			t.Fatalf("%s and %s: want the same instance, have %s and %s", v4.ClientIP, v6.ClientIP, a.ID, b.ID)
		}
	}
}

func TestHashSkipsUnusableConsistently(t *testing.T) {
	eps := endpoints(10)
	pk := picker(t, Config{Algorithm: "hash", Key: "header:x-user"}, eps)
	moved := map[string]int{}
	for k := range 2000 {
		user := fmt.Sprintf("user-%d", k)
		home, _ := pk.Pick(headerReq("X-User", user))
		if home != eps[3] {
			continue
		}
		req := headerReq("X-User", user)
		req.Exclude(home)
		first, err := pk.Pick(req)
		if err != nil || first == home {
			t.Fatalf("key %s with its instance excluded: want another, have %v (err %v)", user, first, err)
		}
		if want := "hash header:x-user, next usable"; req.Reason != want {
			t.Errorf("reason: want %q, have %q", want, req.Reason)
		}
		for range 20 {
			if e, _ := pk.Pick(req); e != first {
				t.Fatalf("key %s: want the same second choice %s every time, have %s", user, first.ID, e.ID)
			}
		}
		moved[first.ID]++
	}
	// The displaced keys spread over the others rather than all landing on
	// one neighbour.
	if len(moved) < 6 {
		t.Errorf("keys of an unusable instance: want them spread over most others, have %v", moved)
	}
}

func TestMaglevSizes(t *testing.T) {
	for _, m := range maglevSizes {
		if nextPrime(m) != m {
			t.Errorf("table size %d: want a prime", m)
		}
	}
	// The size does not change with small membership changes.
	for _, n := range []int{1, 10, 200, 600, 1000, 5000, 10000} {
		if a, b := maglevSize(n), maglevSize(n+1); a != b {
			t.Errorf("n=%d: want the same table size for n and n+1, have %d and %d", n, a, b)
		}
		if m := maglevSize(n); m < 100*n {
			t.Errorf("n=%d: want >= %d slots, have %d", n, 100*n, m)
		}
	}
}

func TestHashRemapLarge(t *testing.T) {
	const keys = 20000
	cfg := Config{Algorithm: "hash", Key: "header:x-user"}
	all := endpoints(301)
	base := owners(t, cfg, all[:300], keys)
	added := owners(t, cfg, all, keys)
	moved := 0
	for k := range keys {
		if added[k] != base[k] {
			moved++
		}
	}
	if f := float64(moved) / keys; f > 1.0/300+0.05 {
		t.Errorf("adding 1 to 300 instances: want moved fraction <= %.4f, have %.4f", 1.0/300+0.05, f)
	}
}
