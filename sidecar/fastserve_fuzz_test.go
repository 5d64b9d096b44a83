package sidecar

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"testing"
)

// dirtyHead is a request a store holds before the one under test.
const dirtyHead = "GET /old/p%41th?x=1 HTTP/1.1\r\nHost: before\r\nX-Old: 1\r\nConnection: close\r\n\r\n"

// FuzzReadHead holds the fast parser to net/http's: whatever head the fast
// path accepts, net/http must accept too and read the same method, target,
// host, headers and body framing. Everything else must be handed off.
func FuzzReadHead(f *testing.F) {
	for _, seed := range []string{
		"GET / HTTP/1.1\r\nHost: p\r\n\r\n",
		"GET http://payments/x?q=1 HTTP/1.1\r\nHost: other\r\nX-A: 1\r\nX-A: 2\r\n\r\n",
		"POST /u HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n\r\nabc",
		"POST /u HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
		"POST /u HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
		"POST /u HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
		"POST /u HTTP/1.1\r\nHost: p\r\nContent-Length: +3\r\n\r\nabc",
		"GET / HTTP/1.1\r\nHost: p\r\nX: a\r\n b\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: p\r\nBad Name: x\r\n\r\n",
		"GET / HTTP/1.1\r\nhost: p\r\nhOsT: q\r\n\r\n",
		"GET / HTTP/1.0\r\nHost: p\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"CONNECT p:443 HTTP/1.1\r\nHost: p:443\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: p\r\nX: a\x00b\r\n\r\n",
		"GET /%zz HTTP/1.1\r\nHost: p\r\n\r\n",
		"G\tET / HTTP/1.1\r\nHost: p\r\n\r\n",
		"GET / HTTP/1.1\nHost: p\n\n",
		"GET / HTTP/1.1\r\nHost: p\r\nConnection: keep-alive, close\r\n\r\n",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in string) {
		var raw []byte
		fast, ok, err := readHead(bufio.NewReaderSize(strings.NewReader(in), 4096), &raw, 64<<10, new(http.Request), nil)
		if err != nil || !ok {
			// Handed off (or the input ended): raw must be a prefix of
			// the input so that net/http can be replayed the exact bytes.
			if !strings.HasPrefix(in, string(raw)) {
				t.Fatalf("replay bytes %q are not a prefix of the input", raw)
			}
			return
		}
		// Parsed again into a store that held another request, as a
		// client connection's next request is, it must come out the same.
		st := &reqStore{}
		var raw2 []byte
		if _, ok, _ := readHead(bufio.NewReaderSize(strings.NewReader(dirtyHead), 4096), &raw2, 64<<10, new(http.Request), st); !ok {
			t.Fatal("the store's first request was not taken")
		}
		raw2 = raw2[:0]
		again, ok, err := readHead(bufio.NewReaderSize(strings.NewReader(in), 4096), &raw2, 64<<10, new(http.Request), st)
		if err != nil || !ok {
			t.Fatalf("taken without a store, not with one (%v)", err)
		}
		if again != &st.req || !reflect.DeepEqual(again.Header, fast.Header) || *again.URL != *fast.URL ||
			again.Method != fast.Method || again.Host != fast.Host || again.RequestURI != fast.RequestURI ||
			again.ContentLength != fast.ContentLength || again.Close != fast.Close {
			t.Fatalf("in a used store: %+v\nwithout a store: %+v", again, fast)
		}
		std, serr := http.ReadRequest(bufio.NewReader(strings.NewReader(in)))
		if serr != nil {
			t.Fatalf("fast path accepted a head net/http rejects (%v):\n%q", serr, in)
		}
		if fast.Method != std.Method || fast.RequestURI != std.RequestURI || fast.Host != std.Host {
			t.Fatalf("method/target/host: fast %q %q %q, net/http %q %q %q", fast.Method, fast.RequestURI, fast.Host, std.Method, std.RequestURI, std.Host)
		}
		if fast.URL.String() != std.URL.String() {
			t.Fatalf("URL: fast %q, net/http %q", fast.URL, std.URL)
		}
		if fast.ContentLength != std.ContentLength || fast.Close != std.Close {
			t.Fatalf("framing: fast length %d close %v, net/http %d %v", fast.ContentLength, fast.Close, std.ContentLength, std.Close)
		}
		for k, vv := range std.Header {
			if k == "Host" || k == "Transfer-Encoding" {
				continue
			}
			if strings.Join(fast.Header[k], "\x00") != strings.Join(vv, "\x00") {
				t.Fatalf("header %s: fast %q, net/http %q", k, fast.Header[k], vv)
			}
		}
		for k := range fast.Header {
			if _, ok := std.Header[k]; !ok {
				t.Fatalf("header %s only in the fast parse", k)
			}
		}
		fb, ferr := io.ReadAll(fast.Body)
		sb, serr2 := io.ReadAll(std.Body)
		if (ferr == nil) != (serr2 == nil) || !bytes.Equal(fb, sb) {
			t.Fatalf("body: fast %q (%v), net/http %q (%v)", fb, ferr, sb, serr2)
		}
	})
}

// FuzzParseOrigin holds parseOrigin to url.ParseRequestURI: whatever target
// it takes, it must make the URL ParseRequestURI makes.
func FuzzParseOrigin(f *testing.F) {
	for _, seed := range []string{
		"/", "/small", "/a/b?c=d&e=f", "/a?", "/a??b", "/%41", "/a b", "/a#b", "/a?b#c",
		"//x/y", "/a;b=c,d:e@f$g&h+i~j", "/a!b", "/a*b", "/(x)", "/é", "/a?é", "http://p/x", "*", "",
		"/a?b\x7f", "/\x00",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, target string) {
		u := url.URL{Scheme: "stale", Host: "stale", Path: "/stale", RawPath: "/st%61le", ForceQuery: true, Fragment: "f"}
		if !parseOrigin(target, &u) {
			return
		}
		want, err := url.ParseRequestURI(target)
		if err != nil {
			t.Fatalf("parseOrigin took %q, ParseRequestURI refuses it: %v", target, err)
		}
		if u != *want {
			t.Fatalf("%q: parseOrigin %#v, ParseRequestURI %#v", target, u, *want)
		}
	})
}
