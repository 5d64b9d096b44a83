package h1

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
)

// FuzzReadResponse holds this client's response parsing to net/http's:
// whatever it accepts, http.ReadResponse must accept with the same status,
// headers, length, body and reusability.
func FuzzReadResponse(f *testing.F) {
	for _, seed := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
		"HTTP/1.1 204 No Content\r\n\r\n",
		"HTTP/1.0 200 OK\r\n\r\nuntil close",
		"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close",
		"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
		"HTTP/1.1 299 Odd\r\nx-a:  1 \r\nX-A: 2\r\n\r\n",
	} {
		f.Add(seed, false)
		f.Add(seed, true)
	}
	f.Fuzz(func(t *testing.T, in string, head bool) {
		method := "GET"
		if head {
			method = "HEAD"
		}
		req, _ := http.NewRequest(method, "http://x/", nil)
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		c := &conn{nc: a, br: bufio.NewReader(strings.NewReader(in)), t: New(Options{}), addr: "x"}
		resp, err := c.readResponse(req)
		if err != nil {
			return
		}
		fastBody, ferr := io.ReadAll(resp.Body)
		// net/http's transport skips interim answers the same way: read
		// them one after another from the same stream.
		sbr := bufio.NewReader(strings.NewReader(in))
		std, serr := http.ReadResponse(sbr, req)
		for serr == nil && std.StatusCode >= 100 && std.StatusCode < 200 && std.StatusCode != 101 {
			std, serr = http.ReadResponse(sbr, req)
		}
		if serr != nil {
			t.Fatalf("accepted a response net/http rejects (%v):\n%q", serr, in)
		}
		stdBody, serr := io.ReadAll(std.Body)
		if resp.StatusCode != std.StatusCode {
			t.Fatalf("status: %d, net/http %d", resp.StatusCode, std.StatusCode)
		}
		if (ferr == nil) != (serr == nil) || !bytes.Equal(fastBody, stdBody) {
			t.Fatalf("body: %q (%v), net/http %q (%v)", fastBody, ferr, stdBody, serr)
		}
		if resp.ContentLength != std.ContentLength && !(head && std.ContentLength == -1) {
			t.Fatalf("length: %d, net/http %d", resp.ContentLength, std.ContentLength)
		}
		if resp.Close && !std.Close {
			// Closing when net/http would reuse is safe; the reverse is not.
		} else if !resp.Close && std.Close {
			t.Fatalf("reuses a connection net/http would close:\n%q", in)
		}
		for k, vv := range std.Header {
			if strings.Join(resp.Header[k], "\x00") != strings.Join(vv, "\x00") {
				t.Fatalf("header %s: %q, net/http %q", k, resp.Header[k], vv)
			}
		}
	})
}
