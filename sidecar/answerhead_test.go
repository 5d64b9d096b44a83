package sidecar

import (
	"errors"
	"net/http"
	"net/textproto"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/meshd/meshd/sidecar/h1"
)

func TestScanAnswer(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		res      scanResult
		status   int
		length   int64
		close    bool
		lines    string
	}{
		{name: "usual", in: "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 5\r\nConnection: keep-alive\r\nETag: \"x\"\r\n\r\nhello",
			res: scanOK, status: 200, length: 5, lines: "Server: nginx\r\nETag: \"x\"\r\n"},
		{name: "spelling and spaces kept, values trimmed", in: "HTTP/1.1 302 Found\r\nx-Odd-CASE:\t a b \t\r\nLocation:/x\r\ncontent-length:0\r\n\r\n",
			res: scanOK, status: 302, length: 0, lines: "x-Odd-CASE: a b\r\nLocation: /x\r\n"},
		{name: "no reason", in: "HTTP/1.1 204\r\n\r\n", res: scanOK, status: 204, length: -1},
		{name: "close", in: "HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 1\r\n\r\nx", res: scanOK, status: 200, length: 1, close: true},
		{name: "hop fields dropped", in: "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nUpgrade: h2c\r\nTE: trailers\r\nProxy-Authenticate: Basic\r\nA: 1\r\nContent-Length: 0\r\n\r\n",
			res: scanOK, status: 200, length: 0, lines: "A: 1\r\n"},
		{name: "duplicates kept in order", in: "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
			res: scanOK, status: 200, length: 0, lines: "Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n"},
		{name: "in pieces", in: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", res: scanIncomplete},
		{name: "nothing yet", in: "", res: scanIncomplete},
		{name: "bare LF", in: "HTTP/1.1 200 OK\nContent-Length: 0\n\n", res: scanOther},
		{name: "bare LF in a line", in: "HTTP/1.1 200 OK\r\nA: 1\nB: 2\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "bare LF in the status line", in: "HTTP/1.1 200 OK\nA: 1\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "bare CR", in: "HTTP/1.1 200 OK\r\nA: 1\rB: 2\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "folded", in: "HTTP/1.1 200 OK\r\nA: 1\r\n 2\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "space before colon", in: "HTTP/1.1 200 OK\r\nA : 1\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "empty name", in: "HTTP/1.1 200 OK\r\n: 1\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "control in value", in: "HTTP/1.1 200 OK\r\nA: 1\x00\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "chunked", in: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", res: scanOther},
		{name: "trailer", in: "HTTP/1.1 200 OK\r\nTrailer: X\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "two lengths", in: "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", res: scanOther},
		{name: "signed length", in: "HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx", res: scanOther},
		{name: "Connection names a field", in: "HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "HTTP/1.0", in: "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "bad status", in: "HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "status 099", in: "HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "four-digit status", in: "HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "a line longer than h1 reads", in: "HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("a", h1.MaxLine) + "\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "a line longer than h1 reads, not all there", in: "HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("a", h1.MaxLine), res: scanOther},
		{name: "the longest line h1 reads", in: "HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", h1.MaxLine-5) + "\r\n\r\n", res: scanOK, status: 200, length: -1, lines: "X: " + strings.Repeat("a", h1.MaxLine-5) + "\r\n"},
		{name: "a field named Close", in: "HTTP/1.1 200 OK\r\nConnection: close\r\nClose: 1\r\nContent-Length: 0\r\n\r\n", res: scanOther},
		{name: "too long", in: "HTTP/1.1 200 OK\r\n" + strings.Repeat("A: "+strings.Repeat("a", 1000)+"\r\n", maxAnswerHead/1000+1) + "\r\n", res: scanOther},
		{name: "too long, not all there", in: "HTTP/1.1 200 OK\r\nA: " + strings.Repeat("a", maxAnswerHead), res: scanOther},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prefix := []byte("kept")
			h, out, res := scanAnswer([]byte(tc.in), prefix)
			if res != tc.res {
				t.Fatalf("result %d, want %d", res, tc.res)
			}
			if string(out[:4]) != "kept" {
				t.Fatalf("out lost what it held: %q", out)
			}
			if res != scanOK {
				if len(out) != 4 {
					t.Fatalf("out grew on %d: %q", res, out)
				}
				return
			}
			if h.status != tc.status || h.length != tc.length || h.close != tc.close {
				t.Fatalf("head %+v, want status %d length %d close %v", h, tc.status, tc.length, tc.close)
			}
			if got := string(out[4:]); got != tc.lines {
				t.Fatalf("lines %q, want %q", got, tc.lines)
			}
			if want := strings.Index(tc.in, "\r\n\r\n") + 4; h.size != want {
				t.Fatalf("size %d, want %d", h.size, want)
			}
		})
	}
}

// FuzzScanAnswer holds the loop's scanner to the h1 client's parser, which
// the goroutine path uses on the same bytes: a head the scanner passes must
// parse there to the same status, framing and end-to-end fields, and one
// it calls incomplete must be incomplete there too.
func FuzzScanAnswer(f *testing.F) {
	for _, seed := range []string{
		"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: x\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
		"HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\n\r\n",
		"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nConnection: x-a\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nA: 1\r\n b\r\n\r\n",
		"HTTP/1.1 200 OK\nA: 1\n\n",
		"HTTP/1.1 200 OK\r\nA: 1\r\n\n",
		"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
		"HTTP/1.1 200 OK\r\nX: \xff\xfe\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n",
		"HTTP/1.1 200",
		"HTTP/1.1 200 OK\r\nConnection: close\r\nClose: 1\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("a", h1.MaxLine) + "\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("a", h1.MaxLine-20),
	} {
		f.Add(seed)
	}
	req := &http.Request{Method: http.MethodGet}
	f.Fuzz(func(t *testing.T, in string) {
		var p h1.HeadParser
		h, out, res := scanAnswer([]byte(in), nil)
		resp, n, err := p.Parse(req, []byte(in))
		switch res {
		case scanIncomplete:
			if !errors.Is(err, h1.ErrIncomplete) {
				t.Fatalf("scanner waits for more, h1 says %v", err)
			}
		case scanOK:
			if err != nil {
				t.Fatalf("scanner passed a head h1 refuses: %v", err)
			}
			if n != h.size || resp.StatusCode != h.status || resp.ProtoMinor != 1 {
				t.Fatalf("scanner: size %d status %d; h1: size %d status %d HTTP/1.%d", h.size, h.status, n, resp.StatusCode, resp.ProtoMinor)
			}
			for _, k := range []string{"Transfer-Encoding", "Trailer"} {
				if _, ok := resp.Header[k]; ok {
					t.Fatalf("scanner passed a head with %s", k)
				}
			}
			cl := resp.Header["Content-Length"]
			if h.length < 0 && len(cl) != 0 || h.length >= 0 && (len(cl) != 1 || cl[0] != strconv.FormatInt(h.length, 10)) {
				t.Fatalf("scanner length %d, h1 Content-Length %q", h.length, cl)
			}
			close := false
			for _, v := range resp.Header["Connection"] {
				close = close || containsToken(v, "close")
			}
			if close != h.close {
				t.Fatalf("scanner close %v, h1 header %q", h.close, resp.Header["Connection"])
			}
			want := http.Header{}
			copyEndToEnd(want, resp.Header)
			delete(want, "Content-Length")
			got := http.Header{}
			for _, line := range strings.SplitAfter(string(out), "\r\n") {
				if line == "" {
					continue
				}
				k, v, ok := strings.Cut(strings.TrimSuffix(line, "\r\n"), ": ")
				if !ok {
					t.Fatalf("line %q has no separator", line)
				}
				k = textproto.CanonicalMIMEHeaderKey(k)
				got[k] = append(got[k], v)
			}
			if len(want) == 0 && len(got) == 0 {
				return
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("scanner fields %q, h1 end-to-end fields %q", got, want)
			}
		}
	})
}
