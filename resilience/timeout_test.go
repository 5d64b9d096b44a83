package resilience

import (
	"errors"
	"net/http"
	"testing"
	"time"
)

func TestBudget(t *testing.T) {
	cfg := Defaults().Timeouts
	cfg.Request = 2 * time.Second
	noReq := Defaults().Timeouts
	custom := cfg
	custom.Header = "x-deadline"
	ignored := cfg
	ignored.Header = ""

	cases := []struct {
		name   string
		cfg    TimeoutConfig
		header string
		values []string
		want   time.Duration
		bad    bool
	}{
		{"no header", cfg, DefaultTimeoutHeader, nil, 2 * time.Second, false},
		{"no header, no limit", noReq, DefaultTimeoutHeader, nil, 0, false},
		{"shortens", cfg, DefaultTimeoutHeader, []string{"500ms"}, 500 * time.Millisecond, false},
		{"milliseconds", cfg, DefaultTimeoutHeader, []string{"250"}, 250 * time.Millisecond, false},
		{"spaces", cfg, DefaultTimeoutHeader, []string{" 1s "}, time.Second, false},
		{"never lengthens", cfg, DefaultTimeoutHeader, []string{"10s"}, 2 * time.Second, false},
		{"sets when no limit", noReq, DefaultTimeoutHeader, []string{"3s"}, 3 * time.Second, false},
		{"custom header name", custom, "X-Deadline", []string{"100ms"}, 100 * time.Millisecond, false},
		{"header ignored", ignored, DefaultTimeoutHeader, []string{"100ms"}, 2 * time.Second, false},
		{"malformed", cfg, DefaultTimeoutHeader, []string{"soon"}, 0, true},
		{"unit typo", cfg, DefaultTimeoutHeader, []string{"5 s"}, 0, true},
		{"negative", cfg, DefaultTimeoutHeader, []string{"-1s"}, 0, true},
		{"zero", cfg, DefaultTimeoutHeader, []string{"0"}, 0, true},
		{"empty", cfg, DefaultTimeoutHeader, []string{""}, 0, true},
		{"overflow", cfg, DefaultTimeoutHeader, []string{"99999999999999999"}, 0, true},
		{"repeated", cfg, DefaultTimeoutHeader, []string{"1s", "2s"}, 0, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, _ := http.NewRequest(http.MethodGet, "http://payments/", nil)
			for _, v := range tc.values {
				r.Header.Add(tc.header, v)
			}
			have, err := tc.cfg.Budget(r)
			if tc.bad {
				if !errors.Is(err, ErrBadTimeout) {
					t.Fatalf("want an error wrapping ErrBadTimeout, have %v (budget %s)", err, have)
				}
				return
			}
			if err != nil || have != tc.want {
				t.Fatalf("want %s, have %s (err %v)", tc.want, have, err)
			}
		})
	}
	if have, err := cfg.Budget(nil); err != nil || have != 2*time.Second {
		t.Errorf("Budget(nil): want 2s, have %s, %v", have, err)
	}
}

func TestTryTimeout(t *testing.T) {
	none := TimeoutConfig{}
	perTry := TimeoutConfig{PerTry: time.Second, ResponseHeader: 100 * time.Millisecond}
	for _, tc := range []struct {
		cfg       TimeoutConfig
		remaining time.Duration
		want      time.Duration
	}{
		{none, 0, 0},
		{none, 3 * time.Second, 3 * time.Second},
		{perTry, 0, time.Second},
		{perTry, -time.Second, time.Second},
		{perTry, 3 * time.Second, time.Second},
		{perTry, 300 * time.Millisecond, 300 * time.Millisecond},
	} {
		if have := tc.cfg.TryTimeout(tc.remaining); have != tc.want {
			t.Errorf("TryTimeout(%s) with per_try %s: want %s, have %s", tc.remaining, tc.cfg.PerTry, tc.want, have)
		}
	}
}
