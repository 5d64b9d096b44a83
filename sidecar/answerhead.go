package sidecar

// An instance's answer head, read where it lies. The event loops serve the
// common answer (HTTP/1.1, 2xx or 3xx, framed by one Content-Length) with
// this scanner instead of building a header map and writing it out again:
// the header lines to pass on are copied once, as they came. Anything the
// scanner does not judge for itself (folded lines, a bare LF, a line longer
// than h1 reads, a Connection header naming other fields or a field named
// Close, chunked framing, trailers, HTTP/1.0) it
// reports as scanOther, and the goroutine path, which parses the same bytes
// with the h1 client, decides.

import (
	"bytes"

	"github.com/meshd/meshd/sidecar/h1"
)

// scanResult says what scanAnswer made of a buffer.
type scanResult uint8

const (
	scanIncomplete scanResult = iota // the head has not all arrived
	scanOK                           // the head is in answerHead and out
	scanOther                        // the goroutine path must judge it
)

// answerHead is what the loop needs of an answer head.
type answerHead struct {
	status int
	length int64 // the Content-Length, -1 if none
	close  bool  // Connection: close
	size   int   // bytes of the head, its blank line included
}

// maxAnswerHead is the longest head the loop reads itself; a longer one
// goes to the goroutine path, whose h1 client reads up to 1 MiB.
const maxAnswerHead = 64 << 10

// scanAnswer reads the answer head at the start of b. With scanOK, out has
// the end-to-end header lines appended, each as "Name: value\r\n" with the
// name as the instance spelt it and the value trimmed as h1 trims it;
// Content-Length and the hop-by-hop fields are left out (the writer frames
// the answer itself). It allocates nothing but out's growth.
func scanAnswer(b []byte, out []byte) (answerHead, []byte, scanResult) {
	h := answerHead{length: -1}
	mark := len(out)
	other := func() (answerHead, []byte, scanResult) { return h, out[:mark], scanOther }
	// Line by line, in h1's order, so that a head h1 refuses before its
	// end is not waited on as incomplete.
	nl := indexLine(b)
	switch {
	case nl == -2:
		if len(b) >= h1.MaxLine {
			return other() // h1 refuses a line this long
		}
		return h, out, scanIncomplete
	case nl < 0 || nl+2 > h1.MaxLine:
		return other()
	}
	// HTTP/1.1 200 OK
	line := b[:nl]
	if len(line) < 12 || string(line[:9]) != "HTTP/1.1 " || len(line) > 12 && line[12] != ' ' || bytes.IndexByte(line, '\r') >= 0 {
		return other()
	}
	for _, d := range line[9:12] {
		if d < '0' || d > '9' {
			return other()
		}
	}
	if line[9] == '0' {
		return other()
	}
	h.status = int(line[9]-'0')*100 + int(line[10]-'0')*10 + int(line[11]-'0')
	cls := 0
	pos := nl + 2
	for {
		nl := indexLine(b[pos:])
		switch {
		case nl == -2:
			if len(b) > maxAnswerHead || len(b)-pos >= h1.MaxLine {
				return other()
			}
			return h, out[:mark], scanIncomplete
		case nl < 0 || nl+2 > h1.MaxLine:
			return other()
		}
		line := b[pos : pos+nl]
		pos += nl + 2
		if pos > maxAnswerHead {
			return other()
		}
		if len(line) == 0 {
			break
		}
		colon := -1
		for i, c := range line {
			if c == ':' {
				colon = i
				break
			}
			if !isTokenByte(c) {
				return other() // folding, a space, a CR
			}
		}
		if colon <= 0 {
			return other()
		}
		name, value := line[:colon], trimOWS(line[colon+1:])
		for _, c := range value {
			if c < ' ' && c != '\t' || c == 0x7f {
				return other()
			}
		}
		switch hopField(name) {
		case fieldLength:
			n, ok := parseLength(string(value)) // (no copy: the conversion does not escape)
			if !ok || cls > 0 {
				return other()
			}
			cls++
			h.length = n
			continue
		case fieldHandOver:
			return other()
		case fieldConnection:
			close, ok := connectionTokens(value)
			if !ok {
				return other()
			}
			h.close = h.close || close
			continue
		case fieldHop:
			continue
		}
		out = append(out, name...)
		out = append(out, ": "...)
		out = append(out, value...)
		out = append(out, "\r\n"...)
	}
	h.size = pos
	return h, out, scanOK
}

// indexLine returns the length of the first line of b without its CRLF;
// -2 when no line ends in b, -1 when the line ends in a bare LF (h1 reads
// those; the loop leaves them to it). A bare CR inside stays in the line,
// where the name and value checks refuse it.
func indexLine(b []byte) int {
	i := bytes.IndexByte(b, '\n')
	switch {
	case i < 0:
		return -2
	case i == 0 || b[i-1] != '\r':
		return -1
	}
	return i - 1
}

func trimOWS[T string | []byte](b T) T {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}

// tokenBytes marks the bytes of an RFC 9110 token.
var tokenBytes = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

func isTokenByte(c byte) bool { return tokenBytes[c] }

type fieldKind uint8

const (
	fieldEndToEnd   fieldKind = iota
	fieldLength               // Content-Length
	fieldHandOver             // Transfer-Encoding, Trailer, Close: the goroutine path's
	fieldConnection           // Connection
	fieldHop                  // other hop-by-hop fields, dropped
)

// hopField classifies a header name, ignoring ASCII case.
func hopField(name []byte) fieldKind {
	switch len(name) {
	case 5:
		// A field named by "Connection: close" is dropped like any
		// field a Connection token names (copyEndToEnd): rare enough
		// to leave to the goroutine path.
		if foldEq(name, "close") {
			return fieldHandOver
		}
	case 2:
		if foldEq(name, "te") {
			return fieldHop
		}
	case 7:
		if foldEq(name, "trailer") {
			return fieldHandOver
		}
		if foldEq(name, "upgrade") {
			return fieldHop
		}
	case 10:
		if foldEq(name, "connection") {
			return fieldConnection
		}
		if foldEq(name, "keep-alive") {
			return fieldHop
		}
	case 14:
		if foldEq(name, "content-length") {
			return fieldLength
		}
	case 16:
		if foldEq(name, "proxy-connection") {
			return fieldHop
		}
	case 17:
		if foldEq(name, "transfer-encoding") {
			return fieldHandOver
		}
	case 18:
		if foldEq(name, "proxy-authenticate") {
			return fieldHop
		}
	case 19:
		if foldEq(name, "proxy-authorization") {
			return fieldHop
		}
	}
	return fieldEndToEnd
}

// foldEq reports whether b equals the lower-case ASCII lower, ignoring
// ASCII case in b.
func foldEq[T string | []byte](b T, lower string) bool {
	if len(b) != len(lower) {
		return false
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

// connectionTokens reads a Connection value: close says whether it holds
// "close"; ok is false when it names anything but close and keep-alive (a
// field to drop, which the goroutine path handles).
func connectionTokens[T string | []byte](v T) (close, ok bool) {
	for len(v) > 0 {
		i := 0
		for i < len(v) && v[i] != ',' {
			i++
		}
		tok := trimOWS(v[:i])
		switch {
		case len(tok) == 0:
		case foldEq(tok, "close"):
			close = true
		case foldEq(tok, "keep-alive"):
		default:
			return false, false
		}
		if i == len(v) {
			break
		}
		v = v[i+1:]
	}
	return close, true
}

// parseLength parses a Content-Length value as h1 does.
func parseLength(v string) (int64, bool) {
	if v == "" || len(v) > 18 {
		return 0, false
	}
	var n int64
	for i := 0; i < len(v); i++ {
		if v[i] < '0' || v[i] > '9' {
			return 0, false
		}
		n = n*10 + int64(v[i]-'0')
	}
	return n, true
}
