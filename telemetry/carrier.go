package telemetry

import (
	"net/http"
	"net/textproto"

	"go.opentelemetry.io/otel/propagation"
)

// The baggage propagator reads every line of its field through Values.
var _ propagation.ValuesGetter = headerCarrier(nil)

// headerCarrier is propagation.HeaderCarrier with the canonical names of
// the trace fields looked up rather than computed: the propagators get and
// set them on every request, and canonicalising a name each time was a
// sixth of what propagation cost under load. Same contract as
// HeaderCarrier: not safe for concurrent use with writes to the header.
type headerCarrier http.Header

// Get returns the first value of the field key, or "".
func (h headerCarrier) Get(key string) string {
	if v := h[canonicalField(key)]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// Values returns every value of the field key.
func (h headerCarrier) Values(key string) []string {
	return h[canonicalField(key)]
}

// Set replaces the values of the field key with value.
func (h headerCarrier) Set(key, value string) {
	h[canonicalField(key)] = []string{value}
}

// Keys lists the fields' names.
func (h headerCarrier) Keys() []string {
	keys := make([]string, 0, len(h))
	for k := range h {
		keys = append(keys, k)
	}
	return keys
}

// canonicalField is textproto.CanonicalMIMEHeaderKey, with the names the
// propagators meshd offers answered from a table.
func canonicalField(key string) string {
	switch key {
	case "traceparent":
		return "Traceparent"
	case "tracestate":
		return "Tracestate"
	case "baggage":
		return "Baggage"
	case "b3":
		return "B3"
	case "x-b3-traceid":
		return "X-B3-Traceid"
	case "x-b3-spanid":
		return "X-B3-Spanid"
	case "x-b3-sampled":
		return "X-B3-Sampled"
	case "x-b3-flags":
		return "X-B3-Flags"
	case "x-b3-parentspanid":
		return "X-B3-Parentspanid"
	}
	return textproto.CanonicalMIMEHeaderKey(key)
}
