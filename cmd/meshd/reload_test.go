package main

import (
	"strings"
	"testing"

	"github.com/meshd/meshd/sidecar/config"
)

// A reload may change log.access, applied at once; the log's format and
// level and the telemetry are set up once at start, so a change to them is
// refused instead of reported reloaded and ignored.
func TestReloadable(t *testing.T) {
	parse := func(y string) *config.Config {
		t.Helper()
		c, err := config.Parse("meshd.yaml", []byte("discovery: {static: {svc: [127.0.0.1:1]}}\n"+y))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	running := parse("log: {format: text, level: info}\ntelemetry: {metrics: prometheus}\n")
	fileLog := running.Log
	running.Log.Level = "debug" // as --log-level would
	for _, tc := range []struct{ yaml, want string }{
		{"log: {format: text, level: info, access: false}\ntelemetry: {metrics: prometheus}\n", ""},
		{"log: {format: json, level: info}\ntelemetry: {metrics: prometheus}\n", "log.format or log.level changed"},
		{"log: {format: text, level: warn}\ntelemetry: {metrics: prometheus}\n", "log.format or log.level changed"},
		{"log: {format: text, level: info}\ntelemetry: {metrics: none}\n", "telemetry changed"},
	} {
		next := parse(tc.yaml)
		err := reloadable(next, running, fileLog)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%q: want it reloadable, have %v", tc.yaml, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%q: want %q, have %v", tc.yaml, tc.want, err)
		}
		if tc.want == "" && (next.Log.AccessOn() || next.Log.Level != "debug" || next.Log.Format != "text") {
			t.Errorf("%q: want access off, the running level (debug) and format kept, have %+v", tc.yaml, next.Log)
		}
	}
}
