package sidecar

import (
	"net/http"
	"net/textproto"
	"strings"
)

// hopHeaders are meaningful only for one connection and never forwarded
// (RFC 9110 section 7.6.1, plus the de-facto Proxy-Connection and Keep-Alive).
var hopHeaders = [...]string{
	"Connection",
	"Proxy-Connection",
	"Keep-Alive",
	"Proxy-Authenticate",
	"Proxy-Authorization",
	"Te",
	"Trailer",
	"Transfer-Encoding",
	"Upgrade",
}

func isHop(k string) bool {
	for _, h := range hopHeaders {
		if k == h {
			return true
		}
	}
	return false
}

// copyEndToEnd copies src into dst without hop-by-hop headers, including
// those named by src's Connection header. Value slices are shared: neither
// side may be modified in place afterwards.
func copyEndToEnd(dst, src http.Header) {
	conn := src["Connection"]
	for k, vv := range src {
		if isHop(k) || len(conn) > 0 && listedIn(conn, k) {
			continue
		}
		dst[k] = vv
	}
}

// listedIn reports whether the Connection header values conn name the
// header k (canonical). Names compare ignoring ASCII case, which is what
// canonicalising them would do; it allocates nothing.
func listedIn(conn []string, k string) bool {
	for _, v := range conn {
		for v != "" {
			var f string
			f, v, _ = strings.Cut(v, ",")
			if asciiEqualFold(textproto.TrimString(f), k) {
				return true
			}
		}
	}
	return false
}

// asciiEqualFold is strings.EqualFold for ASCII only: header names are
// tokens, and Unicode folding (the Kelvin sign matching "k") would let a
// name that is not k remove it.
func asciiEqualFold[A, B string | []byte](a A, b B) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// upgradeType returns the protocol a request or response asks to switch to.
func upgradeType(h http.Header) string {
	if listedIn(h["Connection"], "Upgrade") {
		return h.Get("Upgrade")
	}
	return ""
}

// wantsTrailers reports whether the client announced it accepts trailers (TE: trailers).
func wantsTrailers(h http.Header) bool {
	for _, v := range h["Te"] {
		for _, f := range strings.Split(v, ",") {
			if strings.EqualFold(textproto.TrimString(f), "trailers") {
				return true
			}
		}
	}
	return false
}
