package config

import (
	"errors"

	"github.com/meshd/meshd/resilience"
)

// Resilience returns the upstream's breaker, retry, timeout and failure
// settings: resilience.Defaults() with every key the file sets laid over it.
func (u Upstream) Resilience() resilience.Config {
	rc := resilience.Defaults()
	b := u.Breaker
	if b.ConsecutiveFailures != 0 {
		rc.Breaker.ConsecutiveFailures = b.ConsecutiveFailures
	}
	if b.FailureRatio != 0 {
		rc.Breaker.FailureRatio = b.FailureRatio
	}
	if b.MinRequests != 0 {
		rc.Breaker.MinRequests = b.MinRequests
	}
	if b.Window != 0 {
		rc.Breaker.Window = b.Window
	}
	if b.OpenFor != 0 {
		rc.Breaker.OpenFor = b.OpenFor
		if b.OpenMax == 0 && rc.Breaker.OpenMax < b.OpenFor {
			rc.Breaker.OpenMax = b.OpenFor
		}
	}
	if b.OpenMultiplier != 0 {
		rc.Breaker.OpenMultiplier = b.OpenMultiplier
	}
	if b.OpenMax != 0 {
		rc.Breaker.OpenMax = b.OpenMax
	}
	if b.HalfOpenProbes != 0 {
		rc.Breaker.HalfOpenProbes = b.HalfOpenProbes
	}
	if b.MaxEjectionPercent != nil {
		rc.Breaker.MaxEjectionPercent = *b.MaxEjectionPercent
	}
	if b.FailOpen != nil {
		rc.Breaker.FailOpen = *b.FailOpen
	}
	rc.Breaker.Disabled = b.Disabled
	r := u.Retry
	if r.Attempts != 0 {
		rc.Retry.Attempts = r.Attempts
	}
	if r.On != nil {
		rc.Retry.On = r.On
	}
	if r.Methods != nil {
		rc.Retry.Methods = r.Methods
	}
	rc.Retry.RetryNonIdempotent = r.RetryNonIdempotent
	if r.BackoffBase != 0 {
		rc.Retry.BackoffBase = r.BackoffBase
		if r.BackoffMax == 0 && rc.Retry.BackoffMax < r.BackoffBase {
			rc.Retry.BackoffMax = r.BackoffBase
		}
	}
	if r.BackoffMax != 0 {
		rc.Retry.BackoffMax = r.BackoffMax
	}
	if r.BufferBody != 0 {
		rc.Retry.BufferBody = r.BufferBody
	}
	if r.BudgetPercent != nil {
		rc.Retry.BudgetPercent = *r.BudgetPercent
	}
	if r.BudgetMinPerSecond != nil {
		rc.Retry.BudgetMinPerSecond = *r.BudgetMinPerSecond
	}
	rc.Retry.Disabled = r.Disabled
	t := u.Timeouts
	if t.Connect != 0 {
		rc.Timeouts.Connect = t.Connect
	}
	if t.ResponseHeader != 0 {
		rc.Timeouts.ResponseHeader = t.ResponseHeader
	}
	if t.Request != 0 {
		rc.Timeouts.Request = t.Request
	}
	if t.PerTry != 0 {
		rc.Timeouts.PerTry = t.PerTry
	}
	if u.WaitForAnswer {
		rc.Timeouts.ResponseHeader = 0
	}
	if t.Header != "" {
		rc.Timeouts.Header = t.Header
	}
	if u.Failure.Statuses != nil {
		rc.Failure.Statuses = u.Failure.Statuses
	}
	return rc
}

type keyErr struct{ key, msg string }

// validateResilience checks the breaker, retry, timeout and failure sections
// of one upstream as package resilience will apply them.
func validateResilience(u Upstream) []keyErr {
	var out []keyErr
	for _, err := range u.Resilience().Validate() {
		var fe *resilience.FieldError
		if errors.As(err, &fe) {
			out = append(out, keyErr{fe.Key, fe.Err.Error()})
		} else {
			out = append(out, keyErr{"", err.Error()})
		}
	}
	return out
}
