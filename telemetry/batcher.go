package telemetry

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// batcher is meshd's span processor: it collects ended, sampled spans and
// hands them to the exporter in batches, as the SDK's batch processor does,
// with its settings (OTEL_BSP_*), but without a goroutine wake-up per span.
// The SDK's sends every span down a channel to its exporting goroutine,
// which wakes the goroutine for each one; under load that took a processor
// from an event loop for every sampled span. Here a span is pushed on a
// lock-free list, and the exporting goroutine wakes on its timer, when a
// batch is full, or when asked to flush.
//
// OnEnd is safe for concurrent use and takes no lock. A span that finds the
// queue full is dropped and counted (Dropped), as the SDK's are.
type batcher struct {
	exp  sdktrace.SpanExporter
	conf batchConfig

	head    atomic.Pointer[spanNode] // the latest span first
	queued  atomic.Int64
	dropped atomic.Int64
	stopped atomic.Bool

	kick    chan struct{}      // a batch is full (buffered: at most one wake-up pending)
	flushes chan chan struct{} // ForceFlush's requests
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

type spanNode struct {
	s    sdktrace.ReadOnlySpan
	next *spanNode
}

// batchConfig are the batching settings, with the defaults and the
// environment variables of OpenTelemetry's batch span processor.
type batchConfig struct {
	delay    time.Duration // OTEL_BSP_SCHEDULE_DELAY, ms (5000)
	timeout  time.Duration // OTEL_BSP_EXPORT_TIMEOUT, ms (30000)
	maxQueue int           // OTEL_BSP_MAX_QUEUE_SIZE (2048)
	maxBatch int           // OTEL_BSP_MAX_EXPORT_BATCH_SIZE (512, at most maxQueue)
}

// batchConfigFromEnv reads the OTEL_BSP_* variables. A value that is not a
// positive integer is an error naming the variable.
func batchConfigFromEnv() (batchConfig, error) {
	c := batchConfig{delay: 5 * time.Second, timeout: 30 * time.Second, maxQueue: 2048, maxBatch: 512}
	read := func(name string, set func(int)) error {
		v := strings.TrimSpace(os.Getenv(name))
		if v == "" {
			return nil
		}
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return fmt.Errorf("%s: %q is not a positive integer", name, v)
		}
		set(n)
		return nil
	}
	if err := errors.Join(
		read("OTEL_BSP_SCHEDULE_DELAY", func(n int) { c.delay = time.Duration(n) * time.Millisecond }),
		read("OTEL_BSP_EXPORT_TIMEOUT", func(n int) { c.timeout = time.Duration(n) * time.Millisecond }),
		read("OTEL_BSP_MAX_QUEUE_SIZE", func(n int) { c.maxQueue = n }),
		read("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", func(n int) { c.maxBatch = n }),
	); err != nil {
		return c, err
	}
	c.maxBatch = min(c.maxBatch, c.maxQueue)
	return c, nil
}

// newBatcher starts a batcher exporting to exp. Shut it down to stop its
// goroutine; that exports what is queued and shuts exp down.
func newBatcher(exp sdktrace.SpanExporter, conf batchConfig) *batcher {
	b := &batcher{
		exp:     exp,
		conf:    conf,
		kick:    make(chan struct{}, 1),
		flushes: make(chan chan struct{}),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	go b.run()
	return b
}

// OnStart does nothing: spans are handled when they end.
func (b *batcher) OnStart(context.Context, sdktrace.ReadWriteSpan) {}

// OnEnd queues s for export when it is sampled.
func (b *batcher) OnEnd(s sdktrace.ReadOnlySpan) {
	if b.stopped.Load() || !s.SpanContext().IsSampled() {
		return
	}
	n := b.queued.Add(1)
	if n > int64(b.conf.maxQueue) {
		b.queued.Add(-1)
		b.dropped.Add(1)
		return
	}
	node := &spanNode{s: s}
	for {
		old := b.head.Load()
		node.next = old
		if b.head.CompareAndSwap(old, node) {
			break
		}
	}
	if n%int64(b.conf.maxBatch) == 0 {
		select {
		case b.kick <- struct{}{}:
		default:
		}
	}
}

// Dropped returns how many spans found the queue full.
func (b *batcher) Dropped() int64 { return b.dropped.Load() }

// ForceFlush exports every span queued when it is called, and waits for
// that or for ctx.
func (b *batcher) ForceFlush(ctx context.Context) error {
	if b.stopped.Load() {
		return nil
	}
	done := make(chan struct{})
	select {
	case b.flushes <- done:
	case <-b.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Shutdown stops taking spans, exports what is queued and shuts the
// exporter down, within ctx. Later calls do nothing.
func (b *batcher) Shutdown(ctx context.Context) error {
	var err error
	b.once.Do(func() {
		b.stopped.Store(true)
		close(b.stop)
		select {
		case <-b.done:
		case <-ctx.Done():
			err = ctx.Err()
		}
		err = errors.Join(err, b.exp.Shutdown(ctx))
	})
	return err
}

func (b *batcher) run() {
	defer close(b.done)
	t := time.NewTicker(b.conf.delay)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			b.export()
		case <-b.kick:
			b.export()
			for b.queued.Load() >= int64(b.conf.maxBatch) {
				b.export() // more came while it exported
			}
		case done := <-b.flushes:
			b.export()
			close(done)
		case <-b.stop:
			b.export()
			return
		}
	}
}

// export sends every queued span, oldest first, in batches of at most
// maxBatch.
func (b *batcher) export() {
	list := b.head.Swap(nil)
	if list == nil {
		return
	}
	var spans []sdktrace.ReadOnlySpan
	for n := list; n != nil; n = n.next {
		spans = append(spans, n.s)
	}
	b.queued.Add(-int64(len(spans)))
	for i, j := 0, len(spans)-1; i < j; i, j = i+1, j-1 {
		spans[i], spans[j] = spans[j], spans[i]
	}
	for len(spans) > 0 {
		n := min(len(spans), b.conf.maxBatch)
		ctx, cancel := context.WithTimeout(context.Background(), b.conf.timeout)
		if err := b.exp.ExportSpans(ctx, spans[:n]); err != nil {
			otel.Handle(fmt.Errorf("export %d spans: %w", n, err))
		}
		cancel()
		spans = spans[n:]
	}
}
