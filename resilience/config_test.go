package resilience

import (
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestDefaultsAreValid(t *testing.T) {
	if errs := Defaults().Validate(); len(errs) != 0 {
		t.Fatalf("Defaults().Validate: want no errors, have %v", errs)
	}
	d := Defaults()
	d.Retry.On[0] = "changed"
	if Defaults().Retry.On[0] != OnConnectFailure {
		t.Fatal("Defaults: want fresh slices on every call, have shared ones")
	}
	// A Guard keeps its own copy of the slices.
	cfg := Defaults()
	g := newTestGuard(t, cfg)
	cfg.Retry.Methods[0] = "POST"
	if ok, _ := g.RetryDecision("POST", 1, status(503), true); ok {
		t.Fatal("Guard: want its config unaffected by the caller's later edits")
	}
}

func TestValidateNamesEachKey(t *testing.T) {
	cases := []struct {
		key    string
		modify func(c *Config)
	}{
		{"breaker", func(c *Config) { c.Breaker.ConsecutiveFailures = 0 }},
		{"breaker.failure_ratio", func(c *Config) { c.Breaker.FailureRatio = 1.5 }},
		{"breaker.failure_ratio", func(c *Config) { c.Breaker.FailureRatio = -0.1 }},
		{"breaker.failure_ratio", func(c *Config) { c.Breaker.FailureRatio = math.NaN() }},
		{"breaker.min_requests", func(c *Config) { c.Breaker.FailureRatio = 0.5; c.Breaker.MinRequests = 0 }},
		{"breaker.window", func(c *Config) { c.Breaker.Window = 0 }},
		{"breaker.window", func(c *Config) { c.Breaker.Window = -time.Second }},
		{"breaker.open_for", func(c *Config) { c.Breaker.OpenFor = -time.Second }},
		{"breaker.open_multiplier", func(c *Config) { c.Breaker.OpenMultiplier = 0.5 }},
		{"breaker.open_multiplier", func(c *Config) { c.Breaker.OpenMultiplier = math.Inf(1) }},
		{"breaker.open_max", func(c *Config) { c.Breaker.OpenMax = time.Second }},
		{"breaker.half_open_probes", func(c *Config) { c.Breaker.HalfOpenProbes = 0 }},
		{"breaker.max_ejection_percent", func(c *Config) { c.Breaker.MaxEjectionPercent = 101 }},
		{"breaker.max_ejection_percent", func(c *Config) { c.Breaker.MaxEjectionPercent = -1 }},
		{"retry.attempts", func(c *Config) { c.Retry.Attempts = 0 }},
		{"retry.on[1]", func(c *Config) { c.Retry.On = []string{"reset", "sometimes"} }},
		{"retry.on[0]", func(c *Config) { c.Retry.On = []string{"200"} }},
		{"retry.on[0]", func(c *Config) { c.Retry.On = []string{"600"} }},
		{"retry.methods[0]", func(c *Config) { c.Retry.Methods = []string{"GE T"} }},
		{"retry.methods[1]", func(c *Config) { c.Retry.Methods = []string{"GET", ""} }},
		{"retry.backoff_base", func(c *Config) { c.Retry.BackoffBase = -time.Millisecond }},
		{"retry.backoff_max", func(c *Config) { c.Retry.BackoffMax = time.Millisecond }},
		{"retry.buffer_body", func(c *Config) { c.Retry.BufferBody = -1 }},
		{"retry.budget_percent", func(c *Config) { c.Retry.BudgetPercent = 120 }},
		{"retry.budget_percent", func(c *Config) { c.Retry.BudgetPercent = -1 }},
		{"retry.budget_min_per_second", func(c *Config) { c.Retry.BudgetMinPerSecond = -1 }},
		{"timeouts.connect", func(c *Config) { c.Timeouts.Connect = -time.Second }},
		{"timeouts.response_header", func(c *Config) { c.Timeouts.ResponseHeader = -time.Second }},
		{"timeouts.request", func(c *Config) { c.Timeouts.Request = -time.Second }},
		{"timeouts.per_try", func(c *Config) { c.Timeouts.PerTry = -time.Second }},
		{"timeouts.header", func(c *Config) { c.Timeouts.Header = "X Timeout" }},
		{"failure.statuses[1]", func(c *Config) { c.Failure.Statuses = []int{503, 99} }},
		{"failure.statuses[0]", func(c *Config) { c.Failure.Statuses = []int{600} }},
	}
	for _, tc := range cases {
		c := Defaults()
		tc.modify(&c)
		errs := c.Validate()
		var keys []string
		for _, err := range errs {
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("%s: want *FieldError, have %T %v", tc.key, err, err)
			}
			if !strings.HasPrefix(err.Error(), fe.Key+": ") {
				t.Errorf("%s: want the message to start with the key, have %q", tc.key, err)
			}
			keys = append(keys, fe.Key)
		}
		if !slices.Contains(keys, tc.key) {
			t.Errorf("want an error for %s, have %v", tc.key, errs)
		}
		if _, err := NewGuard("u", c, nil, nil); err == nil || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("NewGuard with bad %s: want an error naming it, have %v", tc.key, err)
		}
	}

	// Every problem at once.
	c := Defaults()
	c.Breaker.Window = -1
	c.Retry.Attempts = -3
	c.Timeouts.Connect = -1
	if have := len(c.Validate()); have != 3 {
		t.Errorf("three bad keys: want 3 errors, have %d: %v", have, c.Validate())
	}

	// Values that are valid although unusual.
	ok := Defaults()
	ok.Breaker.ConsecutiveFailures = 0
	ok.Breaker.FailureRatio = 1
	ok.Retry.On = []string{" 5XX ", "Gateway-Error", "429"}
	ok.Retry.BackoffBase, ok.Retry.BackoffMax = 0, 0
	ok.Timeouts = TimeoutConfig{}
	ok.Failure.Statuses = nil
	if errs := ok.Validate(); len(errs) != 0 {
		t.Errorf("unusual but valid config: want no errors, have %v", errs)
	}
	off := Defaults()
	off.Breaker = BreakerConfig{Disabled: true, Window: time.Second, OpenFor: time.Second, OpenMultiplier: 1, OpenMax: time.Second, HalfOpenProbes: 1}
	if errs := off.Validate(); len(errs) != 0 {
		t.Errorf("disabled breaker without trip condition: want no errors, have %v", errs)
	}
}
