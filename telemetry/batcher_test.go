package telemetry

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// batchRecorder is an exporter that keeps every batch it is given, tells
// batches when one arrives, and holds ExportSpans while gate is closed.
type batchRecorder struct {
	mu       sync.Mutex
	got      [][]string    // span names, batch by batch
	batches  chan int      // the size of each batch, as it arrives
	entered  chan struct{} // told when ExportSpans is called, before the gate
	gate     chan struct{}
	shutdown bool
}

func newBatchRecorder() *batchRecorder {
	return &batchRecorder{batches: make(chan int, 100)}
}

func (r *batchRecorder) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	if r.entered != nil {
		r.entered <- struct{}{}
	}
	if r.gate != nil {
		<-r.gate
	}
	names := make([]string, len(spans))
	for i, s := range spans {
		names[i] = s.Name()
	}
	r.mu.Lock()
	r.got = append(r.got, names)
	r.mu.Unlock()
	r.batches <- len(spans)
	return nil
}

func (r *batchRecorder) Shutdown(context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.shutdown = true
	return nil
}

func (r *batchRecorder) batchesSoFar() [][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]string(nil), r.got...)
}

// await waits for the next batch and returns its size.
func (r *batchRecorder) await(t *testing.T) int {
	t.Helper()
	select {
	case n := <-r.batches:
		return n
	case <-time.After(10 * time.Second):
		t.Fatal("no batch exported within 10 s")
		return 0
	}
}

// spansThrough returns a tracer whose spans end in b, sampled by sampler.
func spansThrough(t *testing.T, b *batcher, sampler sdktrace.Sampler) trace.Tracer {
	t.Helper()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sampler), sdktrace.WithSpanProcessor(b))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	return tp.Tracer("test")
}

func endSpans(tr trace.Tracer, from, to int) {
	for i := from; i < to; i++ {
		_, s := tr.Start(context.Background(), fmt.Sprint(i))
		s.End()
	}
}

// A full batch is exported at once, in the order the spans ended, without
// waiting for the timer.
func TestBatcherExportsFullBatches(t *testing.T) {
	rec := newBatchRecorder()
	b := newBatcher(rec, batchConfig{delay: time.Hour, timeout: time.Second, maxQueue: 16, maxBatch: 4})
	tr := spansThrough(t, b, sdktrace.AlwaysSample())
	endSpans(tr, 0, 4)
	if n := rec.await(t); n != 4 {
		t.Fatalf("exported %d spans, want 4", n)
	}
	endSpans(tr, 4, 8)
	if n := rec.await(t); n != 4 {
		t.Fatalf("exported %d spans, want 4", n)
	}
	if have, want := fmt.Sprint(rec.batchesSoFar()), "[[0 1 2 3] [4 5 6 7]]"; have != want {
		t.Errorf("batches: want %s, have %s", want, have)
	}
}

// Spans not sampled (recorded only) are not exported; a lone span goes out
// when the timer fires.
func TestBatcherTimerAndUnsampled(t *testing.T) {
	rec := newBatchRecorder()
	b := newBatcher(rec, batchConfig{delay: 20 * time.Millisecond, timeout: time.Second, maxQueue: 16, maxBatch: 4})
	endSpans(spansThrough(t, b, recordOnly{}), 0, 3)
	endSpans(spansThrough(t, b, sdktrace.AlwaysSample()), 3, 4)
	if n := rec.await(t); n != 1 {
		t.Fatalf("first batch: %d spans, want the sampled one", n)
	}
	if have, want := fmt.Sprint(rec.batchesSoFar()), "[[3]]"; have != want {
		t.Errorf("batches: want %s, have %s", want, have)
	}
}

// recordOnly records every span without sampling it.
type recordOnly struct{}

func (recordOnly) ShouldSample(sdktrace.SamplingParameters) sdktrace.SamplingResult {
	return sdktrace.SamplingResult{Decision: sdktrace.RecordOnly}
}
func (recordOnly) Description() string { return "record only" }

// While the exporter is busy, the queue takes maxQueue spans and drops
// the rest, counting them; what it took goes out once the exporter is free.
func TestBatcherDropsWhenFull(t *testing.T) {
	rec := newBatchRecorder()
	rec.gate, rec.entered = make(chan struct{}), make(chan struct{}, 2)
	b := newBatcher(rec, batchConfig{delay: time.Hour, timeout: time.Second, maxQueue: 4, maxBatch: 4})
	var reported []string
	b.report = func(err error) { reported = append(reported, err.Error()) }
	tr := spansThrough(t, b, sdktrace.AlwaysSample())
	endSpans(tr, 0, 4) // a full batch: taken off the queue by the exporter, which waits at the gate
	select {
	case <-rec.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the first batch was not taken within 10 s")
	}
	endSpans(tr, 4, 10) // 4 fit, 2 do not
	if d := b.Dropped(); d != 2 {
		t.Errorf("dropped %d, want 2", d)
	}
	defer func() {
		// The drops are reported once, when the batcher stops.
		if err := b.Shutdown(context.Background()); err != nil {
			t.Fatal(err)
		}
		if have := fmt.Sprint(reported); have != "[trace export: dropped 2 spans (queue of 4 full, or a shutdown)]" {
			t.Errorf("reported %s", have)
		}
	}()
	close(rec.gate)
	if n := rec.await(t) + rec.await(t); n != 8 {
		t.Fatalf("exported %d, want 8", n)
	}
	if have, want := fmt.Sprint(rec.batchesSoFar()), "[[0 1 2 3] [4 5 6 7]]"; have != want {
		t.Errorf("batches: want %s, have %s", want, have)
	}
}

// ForceFlush sends what is queued now; Shutdown sends the rest, shuts the
// exporter down, and takes no more spans (counting them as dropped).
func TestBatcherFlushAndShutdown(t *testing.T) {
	rec := newBatchRecorder()
	b := newBatcher(rec, batchConfig{delay: time.Hour, timeout: time.Second, maxQueue: 16, maxBatch: 8})
	tr := spansThrough(t, b, sdktrace.AlwaysSample())
	endSpans(tr, 0, 3)
	if err := b.ForceFlush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if have, want := fmt.Sprint(rec.batchesSoFar()), "[[0 1 2]]"; have != want {
		t.Fatalf("after ForceFlush: want %s, have %s", want, have)
	}
	endSpans(tr, 3, 5)
	if err := b.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	endSpans(tr, 5, 6) // after the shutdown: not taken, counted
	if d := b.Dropped(); d != 1 {
		t.Errorf("dropped %d after Shutdown, want 1", d)
	}
	if have, want := fmt.Sprint(rec.batchesSoFar()), "[[0 1 2] [3 4]]"; have != want {
		t.Errorf("after Shutdown: want %s, have %s", want, have)
	}
	rec.mu.Lock()
	down := rec.shutdown
	rec.mu.Unlock()
	if !down {
		t.Error("the exporter was not shut down")
	}
	if err := b.Shutdown(context.Background()); err != nil {
		t.Errorf("second Shutdown: %v", err)
	}
	if err := b.ForceFlush(context.Background()); err != nil {
		t.Errorf("ForceFlush after Shutdown: %v", err)
	}
}

// Spans ended on many goroutines at once are each exported exactly once.
func TestBatcherConcurrentSpans(t *testing.T) {
	rec := newBatchRecorder()
	rec.batches = make(chan int, 10000)
	b := newBatcher(rec, batchConfig{delay: 5 * time.Millisecond, timeout: time.Second, maxQueue: 100000, maxBatch: 64})
	tr := spansThrough(t, b, sdktrace.AlwaysSample())
	const workers, each = 8, 500
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			endSpans(tr, w*each, (w+1)*each)
		}()
	}
	wg.Wait()
	if err := b.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, batch := range rec.batchesSoFar() {
		if len(batch) > 64 {
			t.Errorf("a batch of %d, over the maximum of 64", len(batch))
		}
		for _, n := range batch {
			seen[n]++
		}
	}
	if len(seen) != workers*each {
		t.Errorf("exported %d distinct spans, want %d", len(seen), workers*each)
	}
	for n, c := range seen {
		if c != 1 {
			t.Errorf("span %s exported %d times", n, c)
		}
	}
	if b.Dropped() != 0 {
		t.Errorf("dropped %d", b.Dropped())
	}
}

// A shutdown that cannot finish within its context says so.
func TestBatcherShutdownDeadline(t *testing.T) {
	rec := newBatchRecorder()
	rec.gate = make(chan struct{})
	defer close(rec.gate)
	b := newBatcher(rec, batchConfig{delay: time.Hour, timeout: time.Second, maxQueue: 16, maxBatch: 1})
	endSpans(spansThrough(t, b, sdktrace.AlwaysSample()), 0, 1) // the exporter holds it at the gate
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := b.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown: want the deadline, have %v", err)
	}
}

func TestBatchConfigFromEnv(t *testing.T) {
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "250")
	t.Setenv("OTEL_BSP_EXPORT_TIMEOUT", "")
	t.Setenv("OTEL_BSP_MAX_QUEUE_SIZE", "100")
	t.Setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512")
	c, err := batchConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	if want := (batchConfig{delay: 250 * time.Millisecond, timeout: 30 * time.Second, maxQueue: 100, maxBatch: 100}); c != want {
		t.Errorf("want %+v, have %+v", want, c)
	}
	t.Setenv("OTEL_BSP_MAX_QUEUE_SIZE", "lots")
	if _, err := batchConfigFromEnv(); err == nil || !strings.Contains(err.Error(), "OTEL_BSP_MAX_QUEUE_SIZE") {
		t.Errorf("want an error naming OTEL_BSP_MAX_QUEUE_SIZE, have %v", err)
	}
	t.Setenv("OTEL_BSP_MAX_QUEUE_SIZE", "0")
	if _, err := batchConfigFromEnv(); err == nil {
		t.Error("a queue of 0: want an error")
	}
}

// shutdownWatch is a batchRecorder that notes exports made during or after
// the exporter's Shutdown.
type shutdownWatch struct {
	*batchRecorder
	mu         sync.Mutex
	down       bool
	exporting  bool
	afterDown  int
	overlapped bool
	downCh     chan struct{} // closed by Shutdown
}

func (w *shutdownWatch) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	w.mu.Lock()
	if w.down {
		w.afterDown += len(spans)
	}
	w.exporting = true
	w.mu.Unlock()
	err := w.batchRecorder.ExportSpans(ctx, spans)
	w.mu.Lock()
	w.exporting = false
	w.mu.Unlock()
	return err
}

func (w *shutdownWatch) Shutdown(ctx context.Context) error {
	w.mu.Lock()
	w.down = true
	w.overlapped = w.exporting
	close(w.downCh)
	w.mu.Unlock()
	return w.batchRecorder.Shutdown(ctx)
}

// A shutdown whose context ends while an export hangs leaves the exporter's
// Shutdown until that export has returned: the exporter is never shut down
// beside an export, nor given spans after it; the spans still queued are
// counted as dropped.
func TestBatcherShutdownDeadlineWaitsForExport(t *testing.T) {
	w := &shutdownWatch{batchRecorder: newBatchRecorder(), downCh: make(chan struct{})}
	w.gate, w.entered = make(chan struct{}), make(chan struct{}, 4)
	b := newBatcher(w, batchConfig{delay: time.Hour, timeout: time.Minute, maxQueue: 16, maxBatch: 1})
	tr := spansThrough(t, b, sdktrace.AlwaysSample())
	endSpans(tr, 0, 1)
	<-w.entered // the exporter holds span 0 at the gate
	endSpans(tr, 1, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := b.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown: want the deadline, have %v", err)
	}
	w.mu.Lock()
	early := w.down
	w.mu.Unlock()
	if early {
		t.Error("the exporter was shut down while an export was still in progress")
	}
	close(w.gate)
	<-b.done
	select {
	case <-w.downCh:
	case <-time.After(10 * time.Second):
		t.Fatal("the exporter was not shut down within 10 s of the export's end")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.overlapped || w.afterDown != 0 {
		t.Errorf("exporter Shutdown beside an export: %v; spans exported after it: %d", w.overlapped, w.afterDown)
	}
	exported := 0
	for _, batch := range w.batchesSoFar() {
		exported += len(batch)
	}
	if exported != 1 || b.Dropped() != 2 {
		t.Errorf("exported %d and dropped %d, want 1 and 2", exported, b.Dropped())
	}
}

// Spans ending while Shutdown runs are each either exported or counted as
// dropped, never left on the queue: Shutdown waits for an OnEnd that has
// looked at the stop flag before it pushes.
func TestBatcherSpansRacingShutdownAreAccounted(t *testing.T) {
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{1}, TraceFlags: trace.FlagsSampled})
	span := tracetest.SpanStub{Name: "s", SpanContext: sc}.Snapshot()
	for run := 0; run < 100; run++ {
		rec := newBatchRecorder()
		rec.batches = make(chan int, 1<<16)
		b := newBatcher(rec, batchConfig{delay: time.Hour, timeout: time.Second, maxQueue: 1 << 20, maxBatch: 1 << 20})
		const pushers = 2
		var calls [pushers]int
		started := make(chan struct{}, pushers)
		var wg sync.WaitGroup
		for p := 0; p < pushers; p++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 1<<16 && !b.stopped.Load(); i++ {
					b.OnEnd(span)
					if calls[p]++; calls[p] == 10 {
						started <- struct{}{}
					}
				}
				b.OnEnd(span) // one at least after the stop
				calls[p]++
			}()
		}
		for p := 0; p < pushers; p++ {
			<-started
		}
		if err := b.Shutdown(context.Background()); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		exported := 0
		for _, batch := range rec.batchesSoFar() {
			exported += len(batch)
		}
		total := calls[0] + calls[1]
		if b.head.Load() != nil || int64(exported)+b.Dropped() != int64(total) {
			t.Fatalf("run %d: %d spans ended, %d exported, %d dropped, left on the queue: %v", run, total, exported, b.Dropped(), b.head.Load() != nil)
		}
	}
}

// Under a steady stream of full batches, a flush still gets its turn: here
// every export brings two spans more, so a full batch is always waiting.
func TestBatcherFlushUnderLoad(t *testing.T) {
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{1}, TraceFlags: trace.FlagsSampled})
	span := tracetest.SpanStub{Name: "s", SpanContext: sc}.Snapshot()
	f := &feeder{span: span, stop: make(chan struct{}), streaming: make(chan struct{})}
	f.b = newBatcher(f, batchConfig{delay: time.Hour, timeout: time.Second, maxQueue: 1 << 20, maxBatch: 1})
	f.b.OnEnd(span)
	<-f.streaming
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := f.b.ForceFlush(ctx)
	close(f.stop)
	if err != nil {
		t.Errorf("ForceFlush under a stream of full batches: %v (after %d exports)", err, f.exports.Load())
	}
	if err := f.b.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// feeder is an exporter that ends two spans more in its batcher with every
// export, up to 100 million (the cap only bounds a broken batcher), until
// stop is closed.
type feeder struct {
	b         *batcher
	span      sdktrace.ReadOnlySpan
	stop      chan struct{}
	streaming chan struct{} // closed at the tenth export
	exports   atomic.Int64
}

func (f *feeder) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error {
	select {
	case <-f.stop:
	default:
		n := f.exports.Add(1)
		if n == 10 {
			close(f.streaming)
		}
		if n < 100_000_000 {
			f.b.OnEnd(f.span)
			f.b.OnEnd(f.span)
		}
	}
	return nil
}

func (f *feeder) Shutdown(context.Context) error { return nil }
