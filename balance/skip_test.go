package balance

import (
	"errors"
	"fmt"
	"net/http/httptest"
	"testing"
)

// algorithmCases configures every registered algorithm, with requests that
// carry the keys the hash algorithms read.
var algorithmCases = []Config{
	{Algorithm: "round_robin"},
	{Algorithm: "weighted_round_robin"},
	{Algorithm: "least_connections"},
	{Algorithm: "weighted_least_connections"},
	{Algorithm: "least_response_time"},
	{Algorithm: "p2c"},
	{Algorithm: "random"},
	{Algorithm: "weighted_random"},
	{Algorithm: "hash", Key: "header:x-user"},
	{Algorithm: "ip_hash"},
}

func TestAlgorithmCasesCoverRegistry(t *testing.T) {
	have := map[string]bool{}
	for _, c := range algorithmCases {
		have[c.Algorithm] = true
	}
	for _, n := range Names() {
		if !have[n] {
			t.Errorf("registered algorithm %q: want it in the tests' algorithmCases", n)
		}
	}
	if len(Names()) != 10 {
		t.Errorf("registered algorithms: want 10, have %v", Names())
	}
}

// keyedRequests returns n requests with distinct hash keys and client IPs.
func keyedRequests(n int) []*Request {
	out := make([]*Request, n)
	for i := range out {
		r := httptest.NewRequest("GET", "http://svc/", nil)
		r.Header.Set("X-User", fmt.Sprintf("u%d", i))
		req := ipReq(i)
		req.HTTP = r
		out[i] = req
	}
	return out
}

func TestPickersSkipUnusable(t *testing.T) {
	reqs := keyedRequests(300)
	for _, cfg := range algorithmCases {
		for _, n := range []int{5, 100} {
			t.Run(fmt.Sprintf("%s/n=%d", cfg.Algorithm, n), func(t *testing.T) {
				seedRand(t, 51)
				eps := endpoints(n)
				pk := picker(t, cfg, eps)
				last := eps[n-1]
				retryAt := t0.Add(time1m)
				for _, e := range eps[:n-1] {
					e.SetBreaker(BreakerOpen, retryAt)
				}
				// Open breakers are skipped.
				for _, req := range reqs {
					req.Now = t0.UnixNano()
					e, err := pk.Pick(req)
					if err != nil || e != last {
						t.Fatalf("others open: want %s, have %v (err %v)", last.ID, e, err)
					}
					if req.Reason == "" || req.Candidates < 1 {
						t.Fatalf("want a reason and candidates, have %q, %d", req.Reason, req.Candidates)
					}
				}
				// Once the open period has passed they are candidates again.
				others := 0
				for _, req := range reqs {
					req.Now = retryAt.UnixNano()
					e, err := pk.Pick(req)
					if err != nil {
						t.Fatal(err)
					}
					if e != last {
						others++
					}
				}
				if others == 0 {
					t.Errorf("after retryAt: want the formerly open instances picked again, have only %s", last.ID)
				}
				// All unusable: ErrNoneAvailable; with IgnoreHealth: a pick.
				last.SetBreaker(BreakerOpen, retryAt)
				req := reqs[0]
				req.Now = t0.UnixNano()
				if e, err := pk.Pick(req); !errors.Is(err, ErrNoneAvailable) {
					t.Errorf("all open: want ErrNoneAvailable, have %v, %v", e, err)
				}
				req.IgnoreHealth = true
				if _, err := pk.Pick(req); err != nil {
					t.Errorf("all open, IgnoreHealth: want a pick, have %v", err)
				}
				req.IgnoreHealth = false
				// Half-open and closed breakers are usable.
				for _, e := range eps {
					e.SetBreaker(BreakerClosed, t0)
				}
				eps[0].SetBreaker(BreakerHalfOpen, retryAt)
				if _, err := pk.Pick(req); err != nil {
					t.Errorf("breakers closed: want a pick, have %v", err)
				}
			})
		}
	}
}

func TestPickersSkipExcluded(t *testing.T) {
	reqs := keyedRequests(100)
	for _, cfg := range algorithmCases {
		t.Run(cfg.Algorithm, func(t *testing.T) {
			seedRand(t, 52)
			eps := endpoints(6)
			pk := picker(t, cfg, eps)
			for _, req := range reqs {
				req.ClearExcluded()
				for _, e := range eps[:5] {
					req.Exclude(e)
				}
				if e, err := pk.Pick(req); err != nil || e != eps[5] {
					t.Fatalf("5 of 6 excluded: want %s, have %v (err %v)", eps[5].ID, e, err)
				}
				req.Exclude(eps[5])
				if e, err := pk.Pick(req); !errors.Is(err, ErrNoneAvailable) {
					t.Fatalf("all excluded: want ErrNoneAvailable, have %v, %v", e, err)
				}
				req.ClearExcluded()
			}
			// An excluded endpoint is never returned while others remain.
			req := reqs[1]
			for range 200 {
				req.ClearExcluded()
				first, err := pk.Pick(req)
				if err != nil {
					t.Fatal(err)
				}
				req.Exclude(first)
				second, err := pk.Pick(req)
				if err != nil || second == first {
					t.Fatalf("retry after excluding %s: want another instance, have %v (err %v)", first.ID, second, err)
				}
			}
		})
	}
}

func TestEmptyAndSingle(t *testing.T) {
	for _, cfg := range algorithmCases {
		p := mustPolicy(t, cfg)
		if _, err := p.NewPicker(nil).Pick(newReq()); !errors.Is(err, ErrNoInstances) {
			t.Errorf("%s with no endpoints: want ErrNoInstances, have %v", cfg.Algorithm, err)
		}
		eps := endpoints(1)
		req := keyedRequests(1)[0]
		if e, err := p.NewPicker(eps).Pick(req); err != nil || e != eps[0] {
			t.Errorf("%s with one endpoint: want it, have %v (err %v)", cfg.Algorithm, e, err)
		}
	}
}

func TestNewPickerRobustToBadInput(t *testing.T) {
	for _, cfg := range algorithmCases {
		eps := endpoints(4, -5, 0, 3, 1<<40)
		withNil := append([]*Endpoint{nil}, eps...)
		withNil = append(withNil, &Endpoint{})
		pk := mustPolicy(t, cfg).NewPicker(withNil)
		req := keyedRequests(1)[0]
		for range 50 {
			e, err := pk.Pick(req)
			if err != nil || e == nil || e.Stats == nil {
				t.Fatalf("%s with odd weights and nil entries: want an endpoint, have %v (err %v)", cfg.Algorithm, e, err)
			}
		}
	}
}

func TestPickDoesNotAllocate(t *testing.T) {
	for _, cfg := range append(algorithmCases,
		Config{Algorithm: "hash", Key: "cookie:sid"},
		Config{Algorithm: "hash", Key: "query:sid"},
		Config{Algorithm: "hash", Key: "path"},
		Config{Algorithm: "hash", Key: "url"},
		Config{Algorithm: "hash", Key: "header:x-none", Fallback: "least_response_time"},
	) {
		eps := endpoints(100)
		eps[3].SetBreaker(BreakerOpen, t0.Add(time1m))
		pk := picker(t, cfg, eps)
		r := httptest.NewRequest("GET", "http://svc/a/b?x=1&sid=q", nil)
		r.Header.Set("X-User", "alice")
		r.Header.Set("Cookie", "a=b; sid=s1")
		req := ipReq(9)
		req.HTTP = r
		allocs := testing.AllocsPerRun(1000, func() {
			req.ClearExcluded()
			e, err := pk.Pick(req)
			if err != nil {
				t.Fatal(err)
			}
			req.Exclude(e) // exercise the retry path too
			if _, err := pk.Pick(req); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%s key %q: want 0 allocations per pick, have %v", cfg.Algorithm, cfg.Key, allocs)
		}
	}
}
