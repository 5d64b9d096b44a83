package sidecar

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
)

// awaitSocketGone waits until no TCP socket from local to remote is left
// in the kernel's table (a reset one leaves none; a closed one with unsent
// bytes stays in FIN_WAIT1 while its peer does not read).
func awaitSocketGone(t *testing.T, local, remote string) {
	t.Helper()
	lp, rp := netip.MustParseAddrPort(local).Port(), netip.MustParseAddrPort(remote).Port()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := socketStates(t, lp, rp)
		if len(st) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("meshd's end of the connection is still there 10 s on (state, unsent bytes): %v", st)
		}
		time.Sleep(10 * time.Millisecond) // the kernel's table offers no event to wait on
	}
}

// socketStates lists "state/tx_queue" of the sockets from port lp to rp in
// /proc/net/tcp.
func socketStates(t *testing.T, lp, rp uint16) []string {
	t.Helper()
	raw, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	lsuf, rsuf := fmt.Sprintf(":%04X", lp), fmt.Sprintf(":%04X", rp)
	for _, line := range strings.Split(string(raw), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 5 || !strings.HasSuffix(f[1], lsuf) || !strings.HasSuffix(f[2], rsuf) {
			continue
		}
		tx, _, _ := strings.Cut(f[4], ":")
		out = append(out, f[3]+"/"+tx)
	}
	return out
}

// socketQueues lists the rx_queue (hex) of the sockets from port lp to rp
// in /proc/net/tcp.
func socketQueues(t *testing.T, lp, rp uint16) []string {
	t.Helper()
	raw, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	lsuf, rsuf := fmt.Sprintf(":%04X", lp), fmt.Sprintf(":%04X", rp)
	for _, line := range strings.Split(string(raw), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 5 || !strings.HasSuffix(f[1], lsuf) || !strings.HasSuffix(f[2], rsuf) {
			continue
		}
		_, rx, _ := strings.Cut(f[4], ":")
		out = append(out, rx)
	}
	return out
}
