package resilience

import (
	"bufio"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"
)

// rawServer accepts loopback connections and hands each to handle.
func rawServer(t *testing.T, handle func(c *net.TCPConn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	return ln.Addr().String()
}

// readRequest reads one request's headers from c.
func readRequest(c net.Conn) error {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := http.ReadRequest(bufio.NewReader(c))
	return err
}

// resetAfter writes partial, then closes c with SO_LINGER 0 so that the
// kernel sends a reset instead of a clean close.
func resetAfter(c *net.TCPConn, partial string) {
	defer c.Close()
	if readRequest(c) != nil {
		return
	}
	c.Write([]byte(partial))
	c.SetLinger(0)
}

// closedAddr returns a loopback address on which nothing listens.
func closedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// plainTransport makes real errors: no keep-alive (every try dials) and no
// automatic retries hidden behind reused connections.
func plainTransport(t *testing.T) *http.Transport {
	tr := &http.Transport{
		DialContext:       (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
		DisableKeepAlives: true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return tr
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
