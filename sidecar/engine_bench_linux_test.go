//go:build linux

package sidecar

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"testing"

	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/meshd/meshd/telemetry"
)

// BenchmarkEventLoop measures a whole exchange the event loop serves: a
// client's GET on a keep-alive connection to the outbound listener, routed,
// picked, sent to a real loopback instance and answered (128 B), metrics
// off, access log off. The client and the instance allocate nothing per
// request, so allocs/op is the sidecar's.
func BenchmarkEventLoop(b *testing.B) {
	benchEventLoop(b, nil)
}

// BenchmarkEventLoopTraced is BenchmarkEventLoop with tracing and metrics
// on and every trace dropped by the sampler (ratio 0), so that each request
// takes the lean path, as 99 in 100 do at 1%: a traceparent for the
// instance and no span for the SDK.
func BenchmarkEventLoopTraced(b *testing.B) {
	zero := 0.0
	// (A recorder, for tracing to be on; it records nothing at ratio 0.)
	tel, err := telemetry.NewTestProvider(tracetest.NewSpanRecorder(), telemetry.Config{SampleRatio: &zero})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tel.Shutdown(context.Background()) })
	benchEventLoop(b, tel)
}

func benchEventLoop(b *testing.B, tel *telemetry.Provider) {
	addr := rawBackend(b)
	cfg, err := parseConfig(fmt.Sprintf("discovery: {static: {p: [%s]}}\nupstreams: {p: {}}\nlog: {access: false}\n", addr))
	if err != nil {
		b.Fatal(err)
	}
	s := startWithTelemetry(b, cfg, testLogger(b), tel)
	waitReady(b, s)
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
