package telemetry

import (
	"net/http"
	"net/textproto"
	"testing"
)

// The table gives what canonicalising gives, for every field the
// propagators meshd offers read or write.
func TestCanonicalFieldMatchesTextproto(t *testing.T) {
	p, err := buildPropagator([]string{"tracecontext", "baggage", "b3", "b3multi"})
	if err != nil {
		t.Fatal(err)
	}
	names := p.Fields()
	names = append(names, "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags", "x-b3-parentspanid", "X-Other", "content-type")
	for _, n := range names {
		if got, want := canonicalField(n), textproto.CanonicalMIMEHeaderKey(n); got != want {
			t.Errorf("canonicalField(%q) = %q, want %q", n, got, want)
		}
	}
	h := http.Header{}
	c := headerCarrier(h)
	c.Set("traceparent", "v")
	if h.Get("Traceparent") != "v" || c.Get("traceparent") != "v" || c.Get("TRACEPARENT") != "v" || len(c.Keys()) != 1 {
		t.Errorf("carrier and header disagree: %v", h)
	}
}
