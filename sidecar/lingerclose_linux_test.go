package sidecar

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A connection that closes after its answer (the request said
// Connection: close) while the client has sent more behind the request is
// closed gracefully on every serving path: the client gets the whole
// answer, not a reset that drops what the kernel still held of it.
func TestCloseAfterAnswerWithUnreadBytesKeepsTheAnswer(t *testing.T) {
	const size = 64 << 20 // more than every buffer on the way holds
	b := newBackend(t, "big", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		chunk := make([]byte, 64<<10)
		for sent := 0; sent < size; sent += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	})
	s := start(t, fmt.Sprintf("discovery: {static: {big: [%s]}}\nupstreams: {big: {}}\n", b.addr()))
	conn := dialSmallWindow(t, s.Addr("outbound"))
	io.WriteString(conn, "GET /big HTTP/1.1\r\nHost: big\r\nConnection: close\r\n\r\n")
	br := bufio.NewReader(conn)
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Requests pipelined behind the last one: more than meshd reads ahead
	// (64 KiB), so some stay unread in its socket.
	junk := strings.Repeat("GET /more HTTP/1.1\r\nHost: big\r\n\r\n", 8<<10)
	sent := make(chan error, 1)
	go func() { _, err := io.WriteString(conn, junk); sent <- err }()
	lp, rp := netip.MustParseAddrPort(s.Addr("outbound")).Port(), netip.MustParseAddrPort(conn.LocalAddr().String()).Port()
	for deadline := time.Now().Add(10 * time.Second); ; {
		if unreadAt(t, lp, rp) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("meshd's socket never held unread bytes; the test cannot show anything")
		}
		time.Sleep(5 * time.Millisecond) // the kernel's table offers no event to wait on
	}
	got, err := io.Copy(io.Discard, resp.Body)
	if err != nil || got != size {
		t.Fatalf("read %d of the answer's %d bytes, then %v: the close dropped its tail", got, size, err)
	}
	<-sent // written, or failed on the closed connection: either is fine
}

// unreadAt is the receive queue of the socket from port lp to rp.
func unreadAt(t *testing.T, lp, rp uint16) int64 {
	t.Helper()
	for _, st := range socketQueues(t, lp, rp) {
		if n, err := strconv.ParseInt(st, 16, 64); err == nil && n > 0 {
			return n
		}
	}
	return 0
}
