package config

type keyErr struct{ key, msg string }

// validateResilience checks the breaker, retry and timeout sections of one upstream.
func validateResilience(u Upstream) []keyErr {
	var out []keyErr
	b := u.Breaker
	if b.FailureRatio < 0 || b.FailureRatio > 1 {
		out = append(out, keyErr{"breaker.failure_ratio", "want a number from 0 to 1"})
	}
	if b.OpenMultiplier != 0 && b.OpenMultiplier < 1 {
		out = append(out, keyErr{"breaker.open_multiplier", "must be at least 1"})
	}
	if b.OpenMax != 0 && b.OpenFor > b.OpenMax {
		out = append(out, keyErr{"breaker.open_max", "must not be below open_for"})
	}
	if p := b.MaxEjectionPercent; p != nil && (*p < 0 || *p > 100) {
		out = append(out, keyErr{"breaker.max_ejection_percent", "want 0-100"})
	}
	r := u.Retry
	if r.Attempts < 0 {
		out = append(out, keyErr{"retry.attempts", "must not be negative"})
	}
	if p := r.BudgetPercent; p != nil && (*p < 0 || *p > 100) {
		out = append(out, keyErr{"retry.budget_percent", "want 0-100"})
	}
	if r.BackoffMax != 0 && r.BackoffBase > r.BackoffMax {
		out = append(out, keyErr{"retry.backoff_max", "must not be below backoff_base"})
	}
	if r.BufferBody < 0 {
		out = append(out, keyErr{"retry.buffer_body", "must not be negative"})
	}
	return out
}
