package sidecar

import (
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"
)

// writeTimer bounds each write to a client connection by
// proxy.write_timeout, read from the config in force at each write: a
// write that has not finished that long after it began fails, and the
// connection is closed. It bounds writes, not answers: a slow reader that
// keeps reading is served to the end. A timeout too long to express as a
// deadline sets none.
//
// The deadline is moved only when it would fall more than a sixteenth of
// the timeout short of a full one, so that writes in quick succession do
// not each re-arm the connection's timer; a write gets at least 15/16 of
// the timeout. Safe for writes from more than one goroutine in turn, as
// HTTP/2's server makes them.
type writeTimer struct {
	s        *Sidecar
	dl       atomic.Int64 // the write deadline set, unix nanoseconds; 0 for none
	timedOut atomic.Bool  // a write failed on the deadline
}

// next returns the deadline a write beginning now should have, and
// whether it is one at all.
func (t *writeTimer) next() (int64, bool) {
	d := t.s.cfg.Load().Proxy.WriteTimeout
	if d <= 0 {
		return 0, false
	}
	now := time.Now().UnixNano()
	want := now + int64(d)
	if want < now {
		return 0, false // past what a deadline can say
	}
	if set := t.dl.Load(); set != 0 && set <= want && want-set < int64(d/16) {
		return 0, false
	}
	return want, true
}

// arm sets c's write deadline for a write about to begin.
func (t *writeTimer) arm(c net.Conn) {
	if want, ok := t.next(); ok {
		t.dl.Store(want)
		c.SetWriteDeadline(time.Unix(0, want))
	}
}

// done notes how a write ended.
func (t *writeTimer) done(err error) {
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		t.timedOut.Store(true)
	}
}

// timedWriter is a fast-path connection as its response writer sees it.
type timedWriter struct {
	c  net.Conn
	wt writeTimer
}

func (w *timedWriter) Write(p []byte) (int, error) {
	w.wt.arm(w.c)
	n, err := w.c.Write(p)
	w.wt.done(err)
	return n, err
}

// timedConn is a connection net/http serves, its writes bounded by the
// write timeout, including those of a tunnel it is hijacked for.
type timedConn struct {
	net.Conn
	wt     writeTimer
	closed atomic.Bool
}

func newTimedConn(s *Sidecar, c net.Conn) *timedConn {
	tc := &timedConn{Conn: c}
	tc.wt.s = s
	return tc
}

func (c *timedConn) Write(p []byte) (int, error) {
	c.wt.arm(c.Conn)
	n, err := c.Conn.Write(p)
	c.wt.done(err)
	return n, err
}

// ReadFrom copies r to the connection as Write would, a chunk per
// deadline, through the connection's own ReadFrom when it has one (which
// splices from a TCP connection: a CONNECT tunnel's instance).
func (c *timedConn) ReadFrom(r io.Reader) (int64, error) {
	rf, ok := c.Conn.(io.ReaderFrom)
	if !ok {
		return io.Copy(struct{ io.Writer }{c}, r)
	}
	var n int64
	for {
		c.wt.arm(c.Conn)
		k, err := rf.ReadFrom(io.LimitReader(r, 64<<10))
		n += k
		c.wt.done(err)
		if err != nil || k == 0 {
			return n, err
		}
	}
}

// SetWriteDeadline sets the deadline as asked (net/http clears it after
// each request and at a hijack); the next write sets its own.
func (c *timedConn) SetWriteDeadline(t time.Time) error {
	c.wt.dl.Store(0)
	return c.Conn.SetWriteDeadline(t)
}

// SetDeadline is SetWriteDeadline's, for reads too.
func (c *timedConn) SetDeadline(t time.Time) error {
	c.wt.dl.Store(0)
	return c.Conn.SetDeadline(t)
}

// CloseWrite shuts the sending side, when the connection has one to shut.
func (c *timedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Close closes the connection: reset if a write timed out. If the client
// has sent bytes no one read, which would make a plain close a reset that
// drops what the kernel still holds of the last answer, the sending side is
// shut at once and the rest read and dropped on a goroutine for up to
// lingerMax before the close, so that Close itself never waits (net/http's
// Server.Close closes its connections one after another). A second Close
// closes at once.
func (c *timedConn) Close() error {
	if c.closed.Swap(true) {
		return c.Conn.Close()
	}
	if c.wt.timedOut.Load() {
		resetOnClose(c.Conn)
		return c.Conn.Close()
	}
	if unreadConn(c.Conn) {
		if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
			go func() {
				c.Conn.SetReadDeadline(time.Now().Add(lingerMax))
				io.CopyN(io.Discard, c.Conn, 64<<20)
				c.Conn.Close()
			}()
			return nil
		}
	}
	return c.Conn.Close()
}

// resetOnClose makes closing c reset it rather than leave its unsent
// bytes for the kernel to go on offering a client that does not read
// (for minutes, and with up to a send buffer's memory).
func resetOnClose(c net.Conn) {
	for {
		switch cc := c.(type) {
		case *net.TCPConn:
			cc.SetLinger(0)
			return
		case *replayConn:
			c = cc.Conn
		case *timedConn:
			c = cc.Conn
		default:
			return
		}
	}
}

// timedListener hands net/http its connections as timedConns.
type timedListener struct {
	net.Listener
	s *Sidecar
}

func (l timedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return newTimedConn(l.s, c), nil
}

// streamTimer is writeTimer's for an HTTP/2 stream, whose writes wait for
// the client's flow-control window rather than on the connection: the
// deadline is the stream's, and the server resets the stream when it
// passes. Not safe for concurrent use; one handler writes.
type streamTimer struct {
	rc *http.ResponseController
	wt writeTimer
}

func newStreamTimer(s *Sidecar, w http.ResponseWriter) *streamTimer {
	st := &streamTimer{rc: http.NewResponseController(w)}
	st.wt.s = s
	return st
}

// arm sets the stream's write deadline for a write about to begin.
func (t *streamTimer) arm() {
	if want, ok := t.wt.next(); ok {
		t.wt.dl.Store(want)
		t.rc.SetWriteDeadline(time.Unix(0, want))
	}
}

// expired reports whether the deadline set has passed: a write that
// failed then failed on it.
func (t *streamTimer) expired() bool {
	dl := t.wt.dl.Load()
	return dl != 0 && time.Now().UnixNano() >= dl
}
