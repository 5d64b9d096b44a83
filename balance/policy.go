package balance

import (
	"time"
)

// policy is the common Policy of this package's algorithms: a name, the
// settings shared by all of them, and a function building the picker.
type policy struct {
	name  string
	decay time.Duration
	// slowStart is the ramp-up window, kept only by algorithms that use
	// weights (the others ignore the setting).
	slowStart time.Duration
	// build makes a picker from a non-empty list without nil entries; units
	// are the effective weights at now (see weightUnits), nil unless
	// weighted is set.
	build    func(eps []*Endpoint, units []uint64, now time.Time) Picker
	weighted bool
	// extraSlowStart lets hash report its fallback's window.
	extraSlowStart time.Duration
}

func (p *policy) Name() string { return p.name }

// Decay is the response-time decay constant (see DecayOf).
func (p *policy) Decay() time.Duration {
	if p.decay > 0 {
		return p.decay
	}
	return DefaultDecay
}

// SlowStart is the window over which the picker's weights change with time.
func (p *policy) SlowStart() time.Duration { return max(p.slowStart, p.extraSlowStart) }

// NewPicker builds a picker with the effective weights of the current time.
func (p *policy) NewPicker(eps []*Endpoint) Picker { return p.NewPickerAt(eps, time.Now()) }

// NewPickerAt builds a picker with the effective weights of time now.
func (p *policy) NewPickerAt(eps []*Endpoint, now time.Time) Picker {
	eps = compact(eps)
	if len(eps) == 0 {
		return emptyPicker{}
	}
	var units []uint64
	if p.weighted {
		units = weightUnits(eps, now, p.slowStart)
	}
	return p.build(eps, units, now)
}

// compact returns eps without nil entries, copying only when there are some.
func compact(eps []*Endpoint) []*Endpoint {
	for i, e := range eps {
		if e == nil || e.Stats == nil {
			out := make([]*Endpoint, 0, len(eps)-1)
			out = append(out, eps[:i]...)
			for _, e := range eps[i+1:] {
				if e != nil && e.Stats != nil {
					out = append(out, e)
				}
			}
			return out
		}
	}
	return eps
}

// Slow start.
const (
	// rampSteps quantises the slow-start factor so that weights are integers
	// (units) and consecutive rebuilds within one step build equal pickers.
	rampSteps = 20
	// rampFloor is the smallest factor, in steps (2/20 = 10%): a new instance
	// gets a little traffic at once, so that its latency becomes known.
	rampFloor = 2
)

// rampFactor is the slow-start factor of an instance added at added, in
// steps out of rampSteps: rampFloor right after it was added, rising linearly
// to rampSteps at the end of the window.
func rampFactor(added, now time.Time, window time.Duration) uint64 {
	if window <= 0 || added.IsZero() {
		return rampSteps
	}
	el := now.Sub(added)
	if el >= window {
		return rampSteps
	}
	if el < 0 {
		el = 0
	}
	f := float64(rampFloor) + float64(rampSteps-rampFloor)*float64(el)/float64(window)
	q := uint64(f + 0.5)
	return min(max(q, rampFloor), rampSteps)
}

// maxWeight bounds a configured weight so that products of weights in the
// schedules cannot overflow.
const maxWeight = 1 << 20

// weightOf returns e's configured weight clamped to [1, maxWeight].
func weightOf(e *Endpoint) uint64 {
	w := e.Weight
	if w < 1 {
		return 1
	}
	if w > maxWeight {
		return maxWeight
	}
	return uint64(w)
}

// weightUnits returns each endpoint's effective weight as weight × ramp
// factor (in 1/rampSteps) at now. All values are >= 1.
func weightUnits(eps []*Endpoint, now time.Time, window time.Duration) []uint64 {
	u := make([]uint64, len(eps))
	for i, e := range eps {
		u[i] = weightOf(e) * rampFactor(e.Added, now, window)
	}
	return u
}
