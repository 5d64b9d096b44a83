//go:build linux

package sidecar

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"testing"
)

// BenchmarkEventLoop measures a whole exchange the event loop serves: a
// client's GET on a keep-alive connection to the outbound listener, routed,
// picked, sent to a real loopback instance and answered (128 B), metrics
// off, access log off. The client and the instance allocate nothing per
// request, so allocs/op is the sidecar's.
func BenchmarkEventLoop(b *testing.B) {
	addr := rawBackend(b)
	s := start(b, fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nlog: {access: false}\n", addr))
	c, err := net.Dial("tcp", s.Addr("outbound"))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	req := []byte("GET /items?id=1 HTTP/1.1\r\nHost: p\r\n\r\n")
	br := bufio.NewReaderSize(c, 4096)
	body := make([]byte, 128)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		cl := -1
		for {
			line, err := br.ReadSlice('\n')
			if err != nil {
				b.Fatal(err)
			}
			if len(line) <= 2 {
				break
			}
			if len(line) > 16 && (line[0] == 'C' || line[0] == 'c') && string(line[:16]) == "Content-Length: " {
				cl = 128
			}
		}
		if cl < 0 {
			b.Fatal("answer without Content-Length")
		}
		if _, err := io.ReadFull(br, body); err != nil {
			b.Fatal(err)
		}
	}
}
