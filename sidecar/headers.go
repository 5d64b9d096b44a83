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

// connectionTokens returns the header names listed in Connection, canonical.
func connectionTokens(h http.Header) []string {
	var out []string
	for _, v := range h["Connection"] {
		for _, f := range strings.Split(v, ",") {
			if f = textproto.TrimString(f); f != "" {
				out = append(out, textproto.CanonicalMIMEHeaderKey(f))
			}
		}
	}
	return out
}

// copyEndToEnd copies src into dst without hop-by-hop headers, including
// those named by src's Connection header. Value slices are shared: neither
// side may be modified in place afterwards.
func copyEndToEnd(dst, src http.Header) {
	var listed []string
	if _, ok := src["Connection"]; ok {
		listed = connectionTokens(src)
	}
outer:
	for k, vv := range src {
		if isHop(k) {
			continue
		}
		for _, l := range listed {
			if k == l {
				continue outer
			}
		}
		dst[k] = vv
	}
}

// upgradeType returns the protocol a request or response asks to switch to.
func upgradeType(h http.Header) string {
	for _, t := range connectionTokens(h) {
		if t == "Upgrade" {
			return h.Get("Upgrade")
		}
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
