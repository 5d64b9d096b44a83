package sidecar

import (
	"net"
	"sync/atomic"
	"time"
)

// writeTimer bounds each write to a client connection by
// proxy.write_timeout, read from the config in force at each write: a
// write that has not finished that long after it began fails, and the
// connection is closed. It bounds writes, not answers: a slow reader that
// keeps reading is served to the end.
//
// The deadline is moved only when it would fall more than a sixteenth of
// the timeout short of a full one, so that writes in quick succession do
// not each re-arm the connection's timer; a write gets at least 15/16 of
// the timeout. Safe for writes from more than one goroutine in turn, as
// HTTP/2's server makes them.
type writeTimer struct {
	s  *Sidecar
	dl atomic.Int64 // the write deadline set, unix nanoseconds; 0 for none
}

// arm sets c's write deadline for a write about to begin.
func (t *writeTimer) arm(c net.Conn) {
	d := t.s.cfg.Load().Proxy.WriteTimeout
	if d <= 0 {
		return
	}
	want := time.Now().UnixNano() + int64(d)
	if set := t.dl.Load(); set != 0 && set <= want && want-set < int64(d/16) {
		return
	}
	t.dl.Store(want)
	c.SetWriteDeadline(time.Unix(0, want))
}

// timedWriter is a fast-path connection as its response writer sees it.
type timedWriter struct {
	c  net.Conn
	wt writeTimer
}

func (w *timedWriter) Write(p []byte) (int, error) {
	w.wt.arm(w.c)
	return w.c.Write(p)
}

// timedConn is a connection net/http serves, its writes bounded by the
// write timeout, including those of a tunnel it is hijacked for.
type timedConn struct {
	net.Conn
	wt writeTimer
}

func newTimedConn(s *Sidecar, c net.Conn) *timedConn {
	tc := &timedConn{Conn: c}
	tc.wt.s = s
	return tc
}

func (c *timedConn) Write(p []byte) (int, error) {
	c.wt.arm(c.Conn)
	return c.Conn.Write(p)
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
