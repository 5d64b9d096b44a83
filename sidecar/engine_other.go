//go:build !linux

package sidecar

import (
	"errors"
	"net"
)

// engine is the event-loop server, which only Linux has; elsewhere proxy
// listeners are served by fastServer's goroutines alone.
type engine struct{}

const engineOn = false

func newEngine(*Sidecar) (*engine, error) {
	return nil, errors.New("event loops need Linux")
}

func (e *engine) adopt(net.Conn, *fastServer, int) bool { return false }
func (e *engine) closeIdle(*fastServer)                 {}
func (e *engine) closeAll(*fastServer)                  {}
func (e *engine) dropIdle()                             {}
func (e *engine) stop()                                 {}

// unreadConn reports false here: the unread bytes of a socket are only
// looked at on Linux.
func unreadConn(net.Conn) bool { return false }
