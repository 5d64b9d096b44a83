package h1

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"time"
)

// Resume takes over an exchange another sender began: req was written on
// nc at written, and buffered holds what the instance has answered so far.
// It reads the answer as RoundTrip would have, under req's context and the
// header timeout counted from written, and the connection joins the pool
// once the answer is read. reused says nc had served an exchange before:
// if the instance closes it without answering, a request safe to repeat is
// sent again on a new connection, as RoundTrip does. Safe for concurrent
// use; the caller gives up nc.
func (t *Transport) Resume(req *http.Request, nc net.Conn, buffered []byte, reused bool, written time.Time) (*http.Response, error) {
	if len(buffered) > 0 {
		nc = &prefixConn{Conn: nc, prefix: buffered}
	}
	br := readers.Get().(*bufio.Reader)
	br.Reset(nc)
	bw := writers.Get().(*bufio.Writer)
	bw.Reset(nc)
	c := &conn{nc: nc, br: br, bw: bw, t: t, addr: req.URL.Host, reused: reused}
	ctx := req.Context()
	if err := ctx.Err(); err != nil {
		c.close()
		return nil, err
	}
	c.watch(req)
	resp, err := c.await(req, written)
	if err == nil || !reused || !errors.Is(err, errStale) || ctx.Err() != nil || !replayable(req) || req.Body != nil && req.Body != http.NoBody {
		return resp, err
	}
	c, err = t.dialConn(ctx, req.URL.Host)
	if err != nil {
		return nil, err
	}
	return c.roundTrip(req)
}

// prefixConn is a connection whose first reads return bytes already received.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// HeadParser parses response heads held in memory with the rules RoundTrip
// applies to those it reads. Not safe for concurrent use. It reuses its
// response: what Parse returns, header values included, is valid only
// until the next Parse. A head's parse then costs one allocation.
type HeadParser struct {
	c  conn
	rd bytes.Reader
}

// ErrIncomplete is Parse's answer for bytes that end before the head does.
var ErrIncomplete = errors.New("h1: response head incomplete")

// Parse parses the response head at the start of b, the answer to req, and
// returns it (without a body) and the head's length. Interim (1xx) answers
// are returned like any other.
func (p *HeadParser) Parse(req *http.Request, b []byte) (*http.Response, int, error) {
	p.rd.Reset(b)
	if p.c.br == nil {
		p.c.reuse = new(respBlock)
		p.c.br = bufio.NewReaderSize(&p.rd, MaxLine)
	} else {
		p.c.br.Reset(&p.rd)
	}
	p.c.broken.Store(false)
	resp, err := p.c.readHead(req)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, errNothingRead) {
			return nil, 0, ErrIncomplete
		}
		return nil, 0, err
	}
	return resp, len(b) - p.rd.Len() - p.c.br.Buffered(), nil
}
