//go:build unix

package h1

import "syscall"

// alive reports whether an idle pooled connection still looks usable: the
// instance has not closed it (no end of stream waiting to be read) and has
// sent nothing unasked. It costs one non-blocking system call, made before
// every request sent on a pooled connection.
func (c *conn) alive() bool {
	if c.br.Buffered() > 0 {
		return false
	}
	sc, ok := c.nc.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	ok = true
	var b [1]byte
	rerr := rc.Read(func(fd uintptr) bool {
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		// Nothing to read yet is the one healthy answer; an end of
		// stream (0, nil), data, or an error all mean the connection
		// is done.
		ok = n <= 0 && (err == syscall.EAGAIN || err == syscall.EWOULDBLOCK)
		return true
	})
	return ok && rerr == nil
}
