package telemetry

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestNewLoggerFormats(t *testing.T) {
	cases := []struct {
		format   string
		wantJSON bool
	}{
		{"", true}, // auto on a buffer: not a terminal
		{"auto", true},
		{"json", true},
		{"JSON", true},
		{"text", false},
	}
	for _, tc := range cases {
		var buf bytes.Buffer
		l, err := NewLogger(&buf, tc.format, "info")
		if err != nil {
			t.Fatalf("NewLogger(%q): %v", tc.format, err)
		}
		l.Info("hello", "k", "v")
		line := strings.TrimSpace(buf.String())
		var m map[string]any
		isJSON := json.Unmarshal([]byte(line), &m) == nil
		if isJSON != tc.wantJSON {
			t.Errorf("format %q: want JSON %v, have %q", tc.format, tc.wantJSON, line)
		}
		if !tc.wantJSON && !strings.Contains(line, "msg=hello") {
			t.Errorf("format %q: want text with msg=hello, have %q", tc.format, line)
		}
	}
}

func TestNewLoggerAutoOnRegularFile(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	l, err := NewLogger(f, "auto", "")
	if err != nil {
		t.Fatal(err)
	}
	l.Info("x")
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if !json.Valid(bytes.TrimSpace(b)) {
		t.Errorf("auto on a file: want JSON, have %q", b)
	}
}

func TestNewLoggerLevels(t *testing.T) {
	for level, want := range map[string][]string{
		"debug": {"d", "i", "w", "e"},
		"INFO":  {"i", "w", "e"},
		"":      {"i", "w", "e"},
		"warn":  {"w", "e"},
		"error": {"e"},
	} {
		var buf bytes.Buffer
		l, err := NewLogger(&buf, "json", level)
		if err != nil {
			t.Fatalf("NewLogger level %q: %v", level, err)
		}
		l.Debug("d")
		l.Info("i")
		l.Warn("w")
		l.Error("e")
		var have []string
		dec := json.NewDecoder(&buf)
		for dec.More() {
			var m map[string]any
			if err := dec.Decode(&m); err != nil {
				t.Fatal(err)
			}
			have = append(have, m["msg"].(string))
		}
		if strings.Join(have, ",") != strings.Join(want, ",") {
			t.Errorf("level %q: want %v, have %v", level, want, have)
		}
	}
}

func TestNewLoggerRejectsBadInput(t *testing.T) {
	if _, err := NewLogger(&bytes.Buffer{}, "xml", "info"); err == nil || !strings.Contains(err.Error(), "log format") {
		t.Errorf("format xml: want a log format error, have %v", err)
	}
	if _, err := NewLogger(&bytes.Buffer{}, "json", "loud"); err == nil || !strings.Contains(err.Error(), "log level") {
		t.Errorf("level loud: want a log level error, have %v", err)
	}
}

func TestAccessLogCarriesTraceIDs(t *testing.T) {
	p, _ := newRecorded(t, Config{})
	var buf bytes.Buffer
	l, err := NewLogger(&buf, "json", "info")
	if err != nil {
		t.Fatal(err)
	}
	ctx, span := p.StartServer(context.Background(), inbound(http.MethodGet, "/orders"), "payments")
	AccessLog(l, ctx, Access{
		Upstream: "payments", Instance: "n1/p1", Method: "GET", Path: "/orders", Status: 502,
		Duration: 1500 * time.Microsecond, Attempts: 2, Bytes: 17, Err: "reset",
	})
	EndServer(span, 502, "")
	AccessLog(l, context.Background(), Access{Upstream: "payments", Method: "GET", Path: "/", Status: 200})

	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("lines: want 2, have %d: %q", len(lines), buf.String())
	}
	var first, second map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &first); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(lines[1]), &second); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"msg": "access", "level": "INFO", "upstream": "payments", "instance": "n1/p1", "method": "GET",
		"path": "/orders", "status": 502.0, "duration_ms": 1.5, "attempts": 2.0, "bytes": 17.0, "error": "reset",
		"trace_id": span.SpanContext().TraceID().String(), "span_id": span.SpanContext().SpanID().String(),
	}
	for k, w := range want {
		if first[k] != w {
			t.Errorf("access line %s: want %v, have %v", k, w, first[k])
		}
	}
	for _, k := range []string{"trace_id", "span_id", "error"} {
		if v, ok := second[k]; ok {
			t.Errorf("line without span or error: want no %s, have %v", k, v)
		}
	}

	// Disabled level or nil logger: nothing written, no panic.
	buf.Reset()
	quiet, _ := NewLogger(&buf, "json", "warn")
	AccessLog(quiet, ctx, Access{})
	AccessLog(nil, ctx, Access{})
	if buf.Len() != 0 {
		t.Errorf("warn-level logger: want no access line, have %q", buf.String())
	}
}
