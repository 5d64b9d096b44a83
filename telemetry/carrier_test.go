package telemetry

import (
	"context"
	"net/http"
	"net/textproto"
	"testing"

	"go.opentelemetry.io/otel/baggage"
	"go.opentelemetry.io/otel/propagation"
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

// A caller's baggage in several fields is read whole, as HeaderCarrier
// reads it.
func TestHeaderCarrierReadsEveryBaggageField(t *testing.T) {
	h := http.Header{"Baggage": {"a=1", "b=2"}}
	var prop propagation.Baggage
	want := baggage.FromContext(prop.Extract(context.Background(), propagation.HeaderCarrier(h)))
	got := baggage.FromContext(prop.Extract(context.Background(), headerCarrier(h)))
	if want.Len() != 2 || got.Len() != want.Len() || got.Member("a").Value() != "1" || got.Member("b").Value() != "2" {
		t.Errorf("headerCarrier extracted %q, propagation.HeaderCarrier %q", got.String(), want.String())
	}
}
