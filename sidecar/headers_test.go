package sidecar

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"

	"github.com/meshd/meshd/resilience"
)

func TestCopyEndToEndDropsListedHeaders(t *testing.T) {
	src := http.Header{
		"Connection":   {"keep-alive, x-trace ,  X-DEBUG", "Upgrade"},
		"X-Trace":      {"1"},
		"X-Debug":      {"1"},
		"Upgrade":      {"websocket"},
		"Keep-Alive":   {"timeout=5"},
		"Content-Type": {"text/plain"},
		"Cookie":       {"a=b"},
		"X-Kept":       {"yes"},
	}
	// A token that matches "Cookie" only under Unicode folding (the Kelvin
	// sign) names no header.
	src["Connection"] = append(src["Connection"], "Coo\u212Aie")
	dst := http.Header{}
	copyEndToEnd(dst, src)
	want := map[string]bool{"Content-Type": true, "Cookie": true, "X-Kept": true}
	for k := range dst {
		if !want[k] {
			t.Errorf("copied %q, which is hop-by-hop or listed in Connection", k)
		}
	}
	for k := range want {
		if _, ok := dst[k]; !ok {
			t.Errorf("dropped end-to-end header %q", k)
		}
	}
	if upgradeType(src) != "websocket" {
		t.Errorf("upgradeType: want websocket, have %q", upgradeType(src))
	}
	if upgradeType(http.Header{"Upgrade": {"websocket"}}) != "" {
		t.Error("upgradeType: an Upgrade header not listed in Connection asks for nothing")
	}
}

// A body read refused because the budget ended is the request's timeout,
// for the transport's error and for the breaker alike.
func TestStoppedBodyIsATimeout(t *testing.T) {
	if !errors.Is(errBodyStopped, context.DeadlineExceeded) {
		t.Fatal("errBodyStopped should match context.DeadlineExceeded")
	}
	o := resilience.Classify(context.Background(), fmt.Errorf("h1: writing the request body: %w", errBodyStopped), 0, resilience.FailureConfig{})
	if o.Kind() != resilience.KindTimeout {
		t.Fatalf("classified as %q, want %q", o.Kind(), resilience.KindTimeout)
	}
}
