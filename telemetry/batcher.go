package telemetry

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
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
// queue full, or ends once Shutdown has begun, is dropped and counted
// (Dropped), as the SDK's are. Every other span ended is exported before
// Shutdown shuts the exporter down, unless Shutdown's context ends first.
// Exports never overlap each other or the exporter's Shutdown.
type batcher struct {
	exp  sdktrace.SpanExporter
	conf batchConfig

	head    atomic.Pointer[spanNode] // the latest span first
	pushing atomic.Int64             // OnEnd calls past their look at stopped
	dropped atomic.Int64
	stopped atomic.Bool

	// ctx bounds every export; Shutdown cancels it when its own context
	// ends, so that an export in progress gives up.
	ctx    context.Context
	cancel context.CancelFunc

	// report is told of failed exports and, at most once a schedule
	// delay and at the end, of spans dropped since it was last told
	// (otel.Handle, which meshd logs). reported is the run goroutine's.
	report   func(error)
	reported int64

	kick    chan struct{}      // a batch is full (buffered: at most one wake-up pending)
	flushes chan chan struct{} // ForceFlush's requests
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

// spanNode is one queued span. n is the length of the list from this node
// down: the queue's depth when it was pushed, exact because a node's next
// never changes once it is on the list and the list is only ever taken
// whole.
type spanNode struct {
	s    sdktrace.ReadOnlySpan
	next *spanNode
	n    int
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
	ctx, cancel := context.WithCancel(context.Background())
	b := &batcher{
		ctx:     ctx,
		cancel:  cancel,
		exp:     exp,
		conf:    conf,
		report:  otel.Handle,
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
//
// Shutdown sets stopped and then waits until pushing is zero. With the
// atomics' single order, an OnEnd that read stopped as false incremented
// pushing before that read, so Shutdown sees it and waits for its push:
// no span is pushed after the final export.
func (b *batcher) OnEnd(s sdktrace.ReadOnlySpan) {
	if !s.SpanContext().IsSampled() {
		return
	}
	b.pushing.Add(1)
	defer b.pushing.Add(-1)
	if b.stopped.Load() {
		b.dropped.Add(1)
		return
	}
	node := &spanNode{s: s}
	for {
		old := b.head.Load()
		node.next, node.n = old, 1
		if old != nil {
			if old.n >= b.conf.maxQueue {
				b.dropped.Add(1)
				return
			}
			node.n = old.n + 1
		}
		if b.head.CompareAndSwap(old, node) {
			break
		}
	}
	if node.n%b.conf.maxBatch == 0 {
		select {
		case b.kick <- struct{}{}:
		default:
		}
	}
}

// depth is how many spans are queued.
func (b *batcher) depth() int {
	if h := b.head.Load(); h != nil {
		return h.n
	}
	return 0
}

// Dropped returns how many spans found the queue full, ended after Shutdown
// began, or were left unexported when Shutdown's context ended.
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

// Shutdown stops taking spans, exports what is queued and then shuts the
// exporter down. When ctx ends first it returns ctx's error, cancels the
// export in progress (what is left unexported is counted as dropped) and
// leaves the exporter's Shutdown to follow when that export has returned,
// never beside it. Later calls do nothing.
func (b *batcher) Shutdown(ctx context.Context) error {
	var err error
	b.once.Do(func() {
		b.stopped.Store(true)
		for b.pushing.Load() != 0 && ctx.Err() == nil {
			runtime.Gosched() // an OnEnd between its look at stopped and its push
		}
		close(b.stop)
		finished := make(chan error, 1)
		go func() {
			<-b.done
			b.reportDrops() // those ended while it stopped, too
			finished <- b.exp.Shutdown(ctx)
		}()
		select {
		case err = <-finished:
		case <-ctx.Done():
			b.cancel()
			err = ctx.Err()
		}
	})
	return err
}

func (b *batcher) run() {
	defer close(b.done)
	defer b.cancel()
	t := time.NewTicker(b.conf.delay)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			b.export()
			b.reportDrops()
		case <-b.kick:
			b.export()
			if b.depth() >= b.conf.maxBatch {
				// More came while it exported: go again, after any
				// flush or stop that is waiting.
				select {
				case b.kick <- struct{}{}:
				default:
				}
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

// reportDrops tells report how many spans were dropped since it last did,
// if any. Called by the run goroutine, or once it has ended.
func (b *batcher) reportDrops() {
	if d := b.dropped.Load(); d > b.reported {
		b.report(fmt.Errorf("trace export: dropped %d spans (queue of %d full, or a shutdown)", d-b.reported, b.conf.maxQueue))
		b.reported = d
	}
}

// export sends every queued span, oldest first, in batches of at most
// maxBatch.
func (b *batcher) export() {
	list := b.head.Swap(nil)
	if list == nil {
		return
	}
	spans := make([]sdktrace.ReadOnlySpan, list.n)
	i := list.n
	for n := list; n != nil; n = n.next {
		i--
		spans[i] = n.s
	}
	for len(spans) > 0 {
		if b.ctx.Err() != nil {
			b.dropped.Add(int64(len(spans))) // Shutdown gave up on them
			return
		}
		n := min(len(spans), b.conf.maxBatch)
		ctx, cancel := context.WithTimeout(b.ctx, b.conf.timeout)
		if err := b.exp.ExportSpans(ctx, spans[:n]); err != nil {
			b.report(fmt.Errorf("export %d spans: %w", n, err))
		}
		cancel()
		spans = spans[n:]
	}
}
