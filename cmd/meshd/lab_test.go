package main

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// labRow is one algorithm's row of the lab's table.
type labRow struct {
	algorithm string
	shares    []float64
	p50, p99  time.Duration
	errors    int
	cut       bool
}

// labParseTable reads the table cmdLab printed: the rows between the header
// (first field "algorithm") and the "share:" legend.
func labParseTable(t *testing.T, out string, instances int) []labRow {
	t.Helper()
	var rows []labRow
	in := false
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) > 0 && f[0] == "algorithm":
			in = true
			continue
		case strings.HasPrefix(line, "share:"):
			return rows
		case !in || len(f) == 0:
			continue
		}
		// name, one share per instance, p50, p99, errors, req/s
		if want, have := 1+instances+4, len(f); have != want {
			t.Fatalf("table row %q: want %d fields, have %d", line, want, have)
		}
		r := labRow{algorithm: strings.TrimSuffix(f[0], "*"), cut: strings.HasSuffix(f[0], "*")}
		for _, s := range f[1 : 1+instances] {
			v, err := strconv.ParseFloat(strings.TrimSuffix(s, "%"), 64)
			if err != nil || !strings.HasSuffix(s, "%") {
				t.Fatalf("table row %q: share %q is not a percentage", line, s)
			}
			r.shares = append(r.shares, v)
		}
		var err error
		if r.p50, err = time.ParseDuration(f[1+instances]); err != nil {
			t.Fatalf("table row %q: p50: %v", line, err)
		}
		if r.p99, err = time.ParseDuration(f[2+instances]); err != nil {
			t.Fatalf("table row %q: p99: %v", line, err)
		}
		if r.errors, err = strconv.Atoi(f[3+instances]); err != nil {
			t.Fatalf("table row %q: errors: %v", line, err)
		}
		rows = append(rows, r)
	}
	t.Fatalf("no end of table (\"share:\" line) in:\n%s", out)
	return nil
}

// labRect is one bar of the chart.
type labRect struct {
	class, algorithm, instance string
	height                     float64
}

// labParseSVG decodes the chart as XML (failing on any syntax error) and
// returns its bars.
func labParseSVG(t *testing.T, data []byte) []labRect {
	t.Helper()
	dec := xml.NewDecoder(bytes.NewReader(data))
	var rects []labRect
	root := ""
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("chart is not well-formed XML: %v", err)
		}
		se, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		if root == "" {
			root = se.Name.Local
		}
		if se.Name.Local != "rect" {
			continue
		}
		var r labRect
		for _, a := range se.Attr {
			switch a.Name.Local {
			case "class":
				r.class = a.Value
			case "data-algorithm":
				r.algorithm = a.Value
			case "data-instance":
				r.instance = a.Value
			case "height":
				r.height, _ = strconv.ParseFloat(a.Value, 64)
			}
		}
		if r.class != "" {
			rects = append(rects, r)
		}
	}
	if want, have := "svg", root; have != want {
		t.Fatalf("chart root element: want %q, have %q", want, have)
	}
	return rects
}

func TestLabComparesAlgorithms(t *testing.T) {
	chart := filepath.Join(t.TempDir(), "lab.svg")
	algs := []string{"round_robin", "least_response_time", "p2c", "hash"}
	var stdout, stderr bytes.Buffer
	code := cmdLab([]string{
		"-latency", "2ms,2ms,20ms", "-requests", "300", "-concurrency", "8",
		"-algorithms", strings.Join(algs, ","), "-chart", chart,
	}, &stdout, &stderr)
	out := stdout.String()
	if code != 0 {
		t.Fatalf("want exit 0, have %d\nstdout:\n%s\nstderr:\n%s", code, out, stderr.String())
	}
	t.Logf("\n%s", out)

	rows := labParseTable(t, out, 3)
	if want, have := len(algs), len(rows); have != want {
		t.Fatalf("want %d table rows, have %d", want, have)
	}
	byAlg := map[string]labRow{}
	for i, r := range rows {
		if want, have := algs[i], r.algorithm; have != want {
			t.Errorf("row %d: want algorithm %s, have %s", i, want, have)
		}
		sum := 0.0
		for _, s := range r.shares {
			sum += s
		}
		if sum < 99.5 || sum > 100.5 {
			t.Errorf("%s: shares %v sum to %.1f%%, want 100%%", r.algorithm, r.shares, sum)
		}
		if r.errors != 0 {
			t.Errorf("%s: want 0 errors (none injected), have %d", r.algorithm, r.errors)
		}
		if r.cut {
			t.Errorf("%s: row marked as cut short by -timeout", r.algorithm)
		}
		if r.p50 <= 0 || r.p99 < r.p50 {
			t.Errorf("%s: want 0 < p50 <= p99, have p50 %v p99 %v", r.algorithm, r.p50, r.p99)
		}
		byAlg[r.algorithm] = r
	}
	rr, lrt := byAlg["round_robin"], byAlg["least_response_time"]
	if have, rrShare := lrt.shares[2], rr.shares[2]; have >= rrShare {
		t.Errorf("slow instance b3: want least_response_time's share below round_robin's %.1f%%, have %.1f%%", rrShare, have)
	}
	for _, want := range []string{"What this shows:", "Here the slowest instance, b3 (20ms)", "chart written to " + chart} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}

	data, err := os.ReadFile(chart)
	if err != nil {
		t.Fatalf("chart: %v", err)
	}
	rects := labParseSVG(t, data)
	count := map[string]int{}
	height := map[string]float64{}
	for _, r := range rects {
		count[r.class+" "+r.algorithm]++
		height[r.class+" "+r.algorithm+" "+r.instance] = r.height
	}
	for _, alg := range algs {
		for class, want := range map[string]int{"share": 3, "p50": 1, "p99": 1} {
			if have := count[class+" "+alg]; have != want {
				t.Errorf("chart: want %d %s bar(s) for %s, have %d", want, class, alg, have)
			}
		}
	}
	// The chart draws the table's figures: b3's bar is lower for
	// least_response_time than for round_robin, and so is the p99 bar.
	if lo, hi := height["share least_response_time b3"], height["share round_robin b3"]; lo >= hi {
		t.Errorf("chart: b3 share bar: want least_response_time's (%.1f) lower than round_robin's (%.1f)", lo, hi)
	}
	if (lrt.p99 < rr.p99) != (height["p99 least_response_time "] < height["p99 round_robin "]) {
		t.Errorf("chart: p99 bars (lrt %.1f, rr %.1f) disagree with the table (lrt %v, rr %v)",
			height["p99 least_response_time "], height["p99 round_robin "], lrt.p99, rr.p99)
	}
}

// TestLabCountsInjectedErrors: round robin sends b3 exactly a third of 300
// requests, and b3 fails exactly every second one it gets; with retries off
// the client sees all 50.
func TestLabCountsInjectedErrors(t *testing.T) {
	wd := t.TempDir()
	t.Chdir(wd)
	var stdout, stderr bytes.Buffer
	code := cmdLab([]string{
		"-latency", "1ms,1ms,1ms", "-errors", "0,0,0.5", "-requests", "300",
		"-concurrency", "4", "-algorithms", "round_robin", "-chart", "",
	}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("want exit 0, have %d\n%s%s", code, stdout.String(), stderr.String())
	}
	rows := labParseTable(t, stdout.String(), 3)
	if len(rows) != 1 {
		t.Fatalf("want 1 row, have %d", len(rows))
	}
	if want, have := 50, rows[0].errors; have != want {
		t.Errorf("want %d errors, have %d\n%s", want, have, stdout.String())
	}
	if strings.Contains(stdout.String(), "chart written") {
		t.Errorf("-chart \"\": want no chart, have %q", stdout.String())
	}
	if _, err := os.Stat(filepath.Join(wd, "lab.svg")); err == nil {
		t.Errorf("-chart \"\": lab.svg written in %s", wd)
	}
}

// TestLabTimeoutMarksRow: a load that cannot finish within -timeout stops,
// and its row says so.
func TestLabTimeoutMarksRow(t *testing.T) {
	var stdout, stderr bytes.Buffer
	start := time.Now()
	code := cmdLab([]string{
		"-latency", "50ms", "-requests", "100000", "-concurrency", "2",
		"-algorithms", "p2c", "-timeout", "300ms", "-chart", "",
	}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("want exit 0, have %d\n%s%s", code, stdout.String(), stderr.String())
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("want the run stopped near -timeout 300ms, took %v", took)
	}
	rows := labParseTable(t, stdout.String(), 1)
	if len(rows) != 1 || !rows[0].cut {
		t.Errorf("want the p2c row marked as cut short, have %+v", rows)
	}
	if !strings.Contains(stdout.String(), "stopped by -timeout 300ms") {
		t.Errorf("output lacks the -timeout footnote:\n%s", stdout.String())
	}
}

func TestLabBadFlags(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"-requests", "0"}, "-requests"},
		{[]string{"-concurrency", "0"}, "-concurrency"},
		{[]string{"-latency", "fast"}, "-latency"},
		{[]string{"-latency", ""}, "-latency"},
		{[]string{"-errors", "1.5"}, "-errors"},
		{[]string{"-errors", "0,0"}, "-errors"},
		{[]string{"-weights", "0"}, "-weights"},
		{[]string{"-jitter", "2"}, "-jitter"},
		{[]string{"-workers", "-1"}, "-workers"},
		{[]string{"-keys", "0"}, "-keys"},
		{[]string{"-timeout", "0s"}, "-timeout"},
		{[]string{"-algorithms", "fastest"}, `unknown algorithm "fastest"`},
		{[]string{"-algorithms", "p2c,p2c"}, "listed twice"},
		{[]string{"-algorithms", ","}, "-algorithms"},
		{[]string{"-bogus"}, "flag provided but not defined: -bogus"},
		{[]string{"-requests", "many"}, "-requests"},
		{[]string{"extra"}, `unexpected argument "extra"`},
	}
	for _, c := range cases {
		var stdout, stderr bytes.Buffer
		chart := filepath.Join(t.TempDir(), "lab.svg")
		code := cmdLab(append([]string{"-chart", chart}, c.args...), &stdout, &stderr)
		if code != 2 {
			t.Errorf("%q: want exit 2, have %d", c.args, code)
		}
		if !strings.Contains(stderr.String(), c.want) {
			t.Errorf("%q: want a message containing %q, have %q", c.args, c.want, stderr.String())
		}
		if stdout.Len() != 0 {
			t.Errorf("%q: want nothing on stdout, have %q", c.args, stdout.String())
		}
		if _, err := os.Stat(chart); err == nil {
			t.Errorf("%q: chart written despite bad flags", c.args)
		}
	}
}

func TestLabHelpExplainsEveryFlag(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := cmdLab([]string{"--help"}, &stdout, &stderr); code != 0 {
		t.Fatalf("--help: want exit 0, have %d (%s)", code, stderr.String())
	}
	out := stdout.String()
	for _, flag := range []string{"-latency", "-errors", "-weights", "-jitter", "-workers", "-algorithms",
		"-requests", "-concurrency", "-keys", "-timeout", "-chart", "-resilience"} {
		if !strings.Contains(out, "\n  "+flag+" ") && !strings.Contains(out, "\n  "+flag+"\n") {
			t.Errorf("--help does not list %s:\n%s", flag, out)
		}
	}
	for _, want := range []string{"Usage: meshd lab", "fresh sidecar", "127.0.0.1"} {
		if !strings.Contains(out, want) {
			t.Errorf("--help lacks %q", want)
		}
	}
}
