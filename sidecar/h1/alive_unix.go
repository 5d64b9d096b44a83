//go:build unix

package h1

import "syscall"

// alive reports whether an idle pooled connection still looks usable: the
// instance has not closed it (no end of stream waiting to be read) and has
// sent nothing unasked. It costs one non-blocking system call, made before
// every request sent on a pooled connection. The look ignores the read
// deadline a pooled connection keeps from its last exchange.
func (c *conn) alive() bool {
	if c.leftover() {
		return false
	}
	nc := c.nc
	if p, ok := nc.(*prefixConn); ok {
		nc = p.Conn // its prefix is used up (leftover)
	}
	if c.raw == nil {
		sc, ok := nc.(syscall.Conn)
		if !ok {
			return true
		}
		rc, err := sc.SyscallConn()
		if err != nil {
			return true
		}
		c.raw = rc
	}
	c.peekOK = false
	if c.peek == nil {
		c.peek = c.peekIdle // bound once per connection
	}
	if err := c.raw.Control(c.peek); err != nil {
		return false
	}
	return c.peekOK
}

// peekIdle looks at fd without reading: nothing to read yet is the one
// healthy answer; an end of stream (0, nil), data, or an error all mean
// the connection is done.
func (c *conn) peekIdle(fd uintptr) {
	var b [1]byte
	n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	c.peekOK = n <= 0 && (err == syscall.EAGAIN || err == syscall.EWOULDBLOCK)
}
