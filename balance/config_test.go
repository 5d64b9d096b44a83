package balance

import (
	"errors"
	"slices"
	"testing"
	"time"
)

func TestConfigErrors(t *testing.T) {
	cases := []struct {
		cfg   Config
		field string
	}{
		{Config{Algorithm: "fastest"}, "algorithm"},
		{Config{Algorithm: "hash"}, "key"},
		{Config{Algorithm: "hash", Key: "header"}, "key"},
		{Config{Algorithm: "hash", Key: "header:"}, "key"},
		{Config{Algorithm: "hash", Key: "header:x user"}, "key"},
		{Config{Algorithm: "hash", Key: "cookie:a;b"}, "key"},
		{Config{Algorithm: "hash", Key: "query:a=b"}, "key"},
		{Config{Algorithm: "hash", Key: "query:"}, "key"},
		{Config{Algorithm: "hash", Key: "body:x"}, "key"},
		{Config{Algorithm: "hash", Key: "Path"}, "key"},
		{Config{Algorithm: "hash", Key: "path:x"}, "key"},
		{Config{Algorithm: "hash", Key: "path", Fallback: "nope"}, "fallback"},
		{Config{Algorithm: "hash", Key: "path", Fallback: "hash"}, "fallback"},
		{Config{Algorithm: "hash", Key: "path", Fallback: "ip_hash"}, "fallback"},
		{Config{Algorithm: "ip_hash", Fallback: "ip_hash"}, "fallback"},
		{Config{Algorithm: "ip_hash", Fallback: "unknown"}, "fallback"},
		{Config{Algorithm: "least_response_time", Decay: -time.Second}, "decay"},
		{Config{Algorithm: "weighted_round_robin", SlowStart: -time.Second}, "slow_start"},
		{Config{Algorithm: "hash", Key: "path", SlowStart: -1}, "slow_start"},
		// Settings the algorithm would ignore.
		{Config{Algorithm: "p2c", SlowStart: 30 * time.Second}, "slow_start"},
		{Config{SlowStart: 30 * time.Second}, "slow_start"},
		{Config{Algorithm: "round_robin", Key: "path"}, "key"},
		{Config{Algorithm: "ip_hash", Key: "path"}, "key"},
		{Config{Algorithm: "least_connections", Fallback: "random"}, "fallback"},
	}
	for _, c := range cases {
		p, err := New(c.cfg)
		var fe *FieldError
		if !errors.As(err, &fe) {
			t.Errorf("%+v: want a *FieldError on %q, have %v, %v", c.cfg, c.field, p, err)
			continue
		}
		if fe.Field != c.field {
			t.Errorf("%+v: want field %q, have %q (%v)", c.cfg, c.field, fe.Field, err)
		}
		if fe.Err == nil || fe.Error() == "" {
			t.Errorf("%+v: want an explanation, have none", c.cfg)
		}
	}
}

func TestConfigValid(t *testing.T) {
	weighted := weightedNames()
	if want := []string{"hash", "ip_hash", "least_response_time", "weighted_least_connections", "weighted_random", "weighted_round_robin"}; !slices.Equal(weighted, want) {
		t.Errorf("algorithms that take slow_start: want %v, have %v", want, weighted)
	}
	for _, cfg := range algorithmCases {
		cfg.Decay = 5 * time.Second
		if slices.Contains(weighted, cfg.Algorithm) {
			cfg.SlowStart = 30 * time.Second
		}
		p, err := New(cfg)
		if err != nil {
			t.Errorf("%+v: want no error, have %v", cfg, err)
			continue
		}
		if p.Name() != cfg.Algorithm {
			t.Errorf("name: want %q, have %q", cfg.Algorithm, p.Name())
		}
	}
	for _, key := range []string{"header:X-User", "cookie:session_id", "query:uid", "path", "url", "header:host"} {
		if _, err := New(Config{Algorithm: "hash", Key: key, Fallback: "least_response_time"}); err != nil {
			t.Errorf("key %q: want no error, have %v", key, err)
		}
	}
	p, err := New(Config{})
	if err != nil || p.Name() != "p2c" || DefaultAlgorithm != "p2c" {
		t.Errorf("default: want p2c, have %v (err %v)", p, err)
	}
	// Slow start is reported only by algorithms that use weights.
	for name, want := range map[string]time.Duration{"p2c": 0, "round_robin": 0, "weighted_random": time.Minute, "least_response_time": time.Minute} {
		tp := builtPolicy(t, Config{Algorithm: name, SlowStart: time.Minute}).(TimedPolicy)
		if tp.SlowStart() != want {
			t.Errorf("%s SlowStart: want %v, have %v", name, want, tp.SlowStart())
		}
	}
	// A hash with a weighted fallback warms up through it.
	tp := mustPolicy(t, Config{Algorithm: "hash", Key: "path", Fallback: "weighted_random", SlowStart: time.Minute}).(TimedPolicy)
	if tp.SlowStart() != time.Minute {
		t.Errorf("hash SlowStart: want 1m, have %v", tp.SlowStart())
	}
}
