package resilience

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// ErrBadTimeout is wrapped by Budget when the caller's timeout header is
// malformed; the forwarder answers such a request with 400 Bad Request.
var ErrBadTimeout = errors.New("malformed timeout")

// Budget returns the time the whole request may take, every try included:
// Request, shortened (never lengthened) by the caller's Header when present.
// 0 means no limit. The header holds a positive Go duration ("500ms", "2s")
// or a bare number of milliseconds ("250"); a malformed, non-positive or
// repeated value is an error wrapping ErrBadTimeout. Budget only reads r.
func (c TimeoutConfig) Budget(r *http.Request) (time.Duration, error) {
	d := c.Request
	if c.Header == "" || r == nil {
		return d, nil
	}
	vals := r.Header.Values(c.Header)
	switch len(vals) {
	case 0:
		return d, nil
	case 1:
	default:
		return 0, fmt.Errorf("resilience: header %s: %w: given %d times", c.Header, ErrBadTimeout, len(vals))
	}
	h, err := parseTimeout(vals[0])
	if err != nil {
		return 0, fmt.Errorf("resilience: header %s: %w", c.Header, err)
	}
	if d == 0 || h < d {
		d = h
	}
	return d, nil
}

func parseTimeout(v string) (time.Duration, error) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, fmt.Errorf("%w: empty value", ErrBadTimeout)
	}
	var d time.Duration
	if ms, err := strconv.ParseInt(v, 10, 64); err == nil {
		if ms > math.MaxInt64/int64(time.Millisecond) {
			return 0, fmt.Errorf("%w: %q milliseconds is too long", ErrBadTimeout, v)
		}
		d = time.Duration(ms) * time.Millisecond
	} else {
		d, err = time.ParseDuration(v)
		if err != nil {
			return 0, fmt.Errorf("%w: %q is neither a duration (500ms, 2s) nor milliseconds", ErrBadTimeout, v)
		}
	}
	if d <= 0 {
		return 0, fmt.Errorf("%w: %q is not positive", ErrBadTimeout, v)
	}
	return d, nil
}

// TryTimeout returns how long the next try may take, its response body
// included: the smaller of remaining (the unspent whole-request budget; 0 or
// less means the request has no budget) and PerTry; 0 means no limit. The
// forwarder applies it as a context deadline (not a cancellation, so that
// Classify sees a timeout) and must itself stop retrying once the budget is
// spent. ResponseHeader is not part of it: it belongs to the transport
// (http.Transport.ResponseHeaderTimeout), so that a long response body is not
// cut off. The method is named TryTimeout because PerTry is a field.
func (c TimeoutConfig) TryTimeout(remaining time.Duration) time.Duration {
	switch {
	case remaining <= 0:
		return c.PerTry
	case c.PerTry > 0 && c.PerTry < remaining:
		return c.PerTry
	default:
		return remaining
	}
}
