//go:build linux

package sidecar

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sys/unix"

	"github.com/meshd/meshd/balance"
	"github.com/meshd/meshd/resilience"
	"github.com/meshd/meshd/sidecar/config"
	"github.com/meshd/meshd/sidecar/h1"
	"github.com/meshd/meshd/telemetry"
)

// engine serves the proxy listeners' common requests on event loops, one
// per core, shared by every proxy listener of a Sidecar: each loop waits on its connections with epoll and answers a GET or
// HEAD without goroutines or their wake-ups in between. That is where the
// goroutine-per-connection server spends most of its CPU beyond the
// kernel's share.
//
// A loop only does what it can do without blocking: it parses the head,
// routes, picks, admits, sends the request and, when the instance answers
// a plain success framed by Content-Length, streams the answer back. At
// every other turn it hands the request to the goroutine path (fastServer
// and forward) exactly where it stands, so that path's behaviour holds for
// everything else: request bodies, upgrades, CONNECT, h2c, failing answers
// and their retries, timeouts, and requests it does not parse. The
// connection returns to the loop once it is idle again.
//
// Loops own their connections; nothing but the inbox and the command flags
// is shared with other goroutines. engine's methods are safe for
// concurrent use.
type engine struct {
	s        *Sidecar
	loops    []*loop
	next     atomic.Uint32
	wg       sync.WaitGroup
	stopOnce sync.Once
	// batch: busy loops run as SCHED_BATCH (proxy.event_loop_batch).
	batch bool
	// yield is loopYield as it was when the engine started.
	yield func(why int)
	// native counts the answers the loops passed on themselves (counted
	// before the head goes out), handed the requests they gave to the
	// goroutine path (before it has them).
	native, handed atomic.Int64
}

// engineOn reports whether this platform has the event-loop engine.
const engineOn = true

// loopsPerEngine is the number of loops an engine runs: one per processor
// the runtime had. The first call also gives the runtime one processor
// more. A busy loop never gives up its processor, so with one loop per
// processor the goroutine path (requests handed over, the admin
// listener, discovery) would wait for preemption, and the network poller
// its connections need would run only every 10 ms: a request handed over
// under full load took 10 ms more (p99 10-11 ms against 4.4-5.0 ms for
// the same load with GOMAXPROCS=3 and two loops).
var loopsPerEngine = sync.OnceValue(func() int {
	n := runtime.GOMAXPROCS(0)
	runtime.GOMAXPROCS(n + 1)
	return n
})

// newEngine starts one loop per usable core.
func newEngine(s *Sidecar) (*engine, error) {
	e := &engine{s: s, batch: s.cfg.Load().Proxy.EventLoopBatchOn(), yield: loopYield}
	n := loopsPerEngine()
	for i := 0; i < n; i++ {
		l, err := newLoop(e)
		if err != nil {
			for _, l := range e.loops {
				unix.Close(l.ep)
				unix.Close(l.wake)
			}
			return nil, err
		}
		e.loops = append(e.loops, l)
	}
	for _, l := range e.loops {
		e.wg.Add(1)
		go l.run()
	}
	s.log.Info("event loops started", "loops", n, "gomaxprocs", runtime.GOMAXPROCS(0))
	return e, nil
}

// adopt gives the connection nc, of f's listener, to a loop, which takes
// a descriptor of its own: the caller closes nc. streak counts the
// requests in a row the connection's loop handed over before. False when
// f is closing, the engine stopped or the descriptor could not be had; nc
// is then the caller's to serve.
func (e *engine) adopt(nc net.Conn, f *fastServer, streak int) bool {
	if f.closing.Load() {
		return false
	}
	fd, err := dupConn(nc)
	if err != nil {
		e.s.log.Warn("event loop: cannot take a connection; serving it on a goroutine", "err", err)
		return false
	}
	l := e.loops[e.next.Add(1)%uint32(len(e.loops))]
	f.wg.Add(1)
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		f.wg.Done()
		unix.Close(fd)
		return false
	}
	l.inbox = append(l.inbox, adoptee{fd: fd, f: f, remote: nc.RemoteAddr().String(), streak: streak})
	l.pokeLocked()
	l.mu.Unlock()
	return true
}

// closeIdle asks every loop to close f's idle connections (its shutdown
// began); those busy close after their answer.
func (e *engine) closeIdle(f *fastServer) { e.command(loopCmd{f: f}) }

// closeAll asks every loop to drop all of f's connections, busy ones too.
func (e *engine) closeAll(f *fastServer) { e.command(loopCmd{f: f, all: true}) }

func (e *engine) command(c loopCmd) {
	for _, l := range e.loops {
		l.mu.Lock()
		l.cmds = append(l.cmds, c)
		l.pokeLocked()
		l.mu.Unlock()
	}
}

// loopCmd asks a loop to close the connections of one listener (its idle
// ones, or all), or to run fn.
type loopCmd struct {
	f   *fastServer
	all bool
	fn  func(*loop) // instead: run on the loop (tests look at its state)
}

// dropIdle asks every loop to close its idle connections to instances.
func (e *engine) dropIdle() {
	for _, l := range e.loops {
		l.cmdPool.Store(true)
		l.poke()
	}
}

// stop ends the loops, dropping what they hold, and waits for them.
func (e *engine) stop() {
	e.stopOnce.Do(func() {
		for _, l := range e.loops {
			l.cmdStop.Store(true)
			l.poke()
		}
		e.wg.Wait()
	})
}

// dupConn returns a new descriptor of nc's socket, non-blocking.
func dupConn(nc net.Conn) (int, error) {
	if rc, ok := nc.(*replayConn); ok {
		nc = rc.Conn
	}
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return -1, errors.New("connection has no descriptor")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := raw.Control(func(s uintptr) {
		fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, derr
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// fdConn turns a loop's descriptor into a net.Conn; fd is given up.
func fdConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "")
	nc, err := net.FileConn(f)
	f.Close()
	return nc, err
}

type adoptee struct {
	fd     int
	f      *fastServer
	remote string
	streak int
}

// loop is one event loop: an epoll set and the connections in it.
type loop struct {
	e    *engine
	ep   int
	wake int // eventfd

	mu      sync.Mutex
	inbox   []adoptee
	cmds    []loopCmd
	stopped bool

	cmdStop, cmdPool atomic.Bool
	// tid is the loop's thread while it runs locked to one (from just
	// before it becomes SCHED_BATCH to just after it is back, or for
	// good if going back failed); 0 otherwise, and once the loop ended.
	tid atomic.Int32

	// The rest belongs to the loop's goroutine.
	gen      uint32
	fds      []any // by descriptor: *econn or *upconn, nil when not the loop's
	clients  map[*econn]struct{}
	idle     map[string][]*upconn
	addrs    map[string]*unix.SockaddrInet4
	inflight []*etry
	free     []*etry
	hdrs     []http.Header
	now      int64     // when the batch of events at hand began (monoNow)
	clk      turnClock // the turn's time.Now, for what requests record (reset with now)
	nextDue  int64     // earliest handAt among inflight
	lastIdle int64
	busyAt   int64 // when a batch last held spinBatch events or more
	recent   bool  // busyAt is within batchQuiet
	batchOn  bool  // the loop's thread is SCHED_BATCH
	batchErr bool  // changing the policy failed: the loop stays as it is
	events   []unix.EpollEvent
	rbuf     []byte
	head     []byte // the header lines of the answer at hand (scanAnswer)
	reqLines []byte // the header lines of the request being sent (requestLines)
	rd       bytes.Reader
	br       *bufio.Reader
	bw       *bufio.Writer
	base     *http.Request
	raw      []byte
	reqBuf   bytes.Buffer
	reqW     *bufio.Writer
	preq     balance.Request // the pick's request, in begin
}

func newLoop(e *engine) (*loop, error) {
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	wake, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(ep)
		return nil, err
	}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}); err != nil {
		unix.Close(ep)
		unix.Close(wake)
		return nil, err
	}
	l := &loop{
		e: e, ep: ep, wake: wake,
		clients: map[*econn]struct{}{},
		idle:    map[string][]*upconn{},
		addrs:   map[string]*unix.SockaddrInet4{},
		events:  make([]unix.EpollEvent, 128),
		rbuf:    make([]byte, 64<<10),
		br:      bufio.NewReaderSize(nil, 4<<10),
		bw:      bufio.NewWriterSize(nil, 8<<10),
		base:    (&http.Request{}).WithContext(context.Background()),
		nextDue: maxTime,
	}
	l.reqW = bufio.NewWriterSize(&l.reqBuf, 4<<10)
	return l, nil
}

const maxTime = int64(1<<63 - 1)

// The loops keep time in nanoseconds on the monotonic clock, counted from
// monoEpoch and offset by monoBase so that 0 still means "never": a step
// of the wall clock (NTP, a VM resumed) must not expire every deadline or
// cut every connection at once, nor hold them past their time.
//
// monoNow reads the runtime's monotonic clock (nanotime) alone and counts
// from monoEpochNano, a reading taken just after monoEpoch's own;
// monoEpochSlack is the span of the two readings around that time.Now, a
// fraction of a microsecond. So monoNow runs behind mono(time.Now()) by
// at most that: a deadline is found a hair late, never early. (Package
// variables, not init: any variable whose initializer reads the loops'
// clock is then set after these.)
var monoEpoch, monoEpochNano, monoEpochSlack = monoStart()

func monoStart() (epoch time.Time, nano, slack int64) {
	before := nanotime()
	epoch = time.Now()
	nano = nanotime()
	return epoch, nano, nano - before
}

const monoBase = int64(1) << 40

// mono is t on the loops' clock; saturates at maxTime.
func mono(t time.Time) int64 {
	d := int64(t.Sub(monoEpoch))
	if d > maxTime-monoBase {
		return maxTime
	}
	return d + monoBase
}

// monoNow is the loops' clock now. time.Now would read the wall clock as
// well: two readings of about 33 ns each on the bench machine, where the
// loop takes this one four times a request at one connection.
func monoNow() int64 {
	d := nanotime() - monoEpochNano
	if d > maxTime-monoBase {
		return maxTime
	}
	return d + monoBase
}

// monoAfter is the loops' clock d from now, read afresh: a connect or
// response-header deadline counts from when the loop dials or writes, not
// from the turn clock's reading (see turnClock), which the turn's earlier
// work may have aged. Saturates at maxTime.
func monoAfter(d time.Duration) int64 { return monoAdd(monoNow(), d) }

// monoAdd is m+d on the loops' clock; saturates at maxTime.
func monoAdd(m int64, d time.Duration) int64 {
	if d > 0 && m > maxTime-int64(d) {
		return maxTime
	}
	return m + int64(d)
}

// monoTime is m as a time.Time whose monotonic reading is m's: fit for
// deadlines and spans against time.Now (which use that reading), not for
// showing (its wall part does not follow steps of the wall clock). It is
// behind time.Now by at most monoEpochSlack.
func monoTime(m int64) time.Time { return monoEpoch.Add(time.Duration(m - monoBase)) }

// nanotime is the runtime's monotonic clock, the one time.Time's
// monotonic readings hold (so that monoNow and mono agree). The runtime
// keeps it for use by linkname.
//
//go:linkname nanotime runtime.nanotime
func nanotime() int64

// poke wakes the loop, unless it has stopped (its eventfd is closed, and
// the number may belong to another file by now).
func (l *loop) poke() {
	l.mu.Lock()
	l.pokeLocked()
	l.mu.Unlock()
}

func (l *loop) pokeLocked() {
	if !l.stopped {
		var one = [8]byte{1}
		unix.Write(l.wake, one[:])
	}
}

// econn is a client connection the loop holds.
type econn struct {
	l        *loop
	f        *fastServer // the listener's server
	fd       int
	gen      uint32
	remote   string
	in       []byte // read, not yet consumed
	out      []byte // answered, not yet taken by the socket
	outOn    bool   // EPOLLOUT armed
	inOff    bool   // EPOLLIN disarmed
	x        *etry  // the request in progress
	lastUsed int64
	stuck    int64 // since when out has waited with the socket taking none of it
	streak   int
	eof      bool // the client shut its side
	dead     bool // writing failed
	closeNow bool // close once out is sent
	peerSet  bool
	peer     netip.Addr
	xff      []string // X-Forwarded-For naming this client alone
	w        fastWriter
	// store holds the request at hand (serveNext parses into it), and
	// the next one when this one has ended.
	store reqStore
}

// upconn is a connection to an instance.
type upconn struct {
	fd         int
	gen        uint32
	addr       string
	reused     bool
	connecting bool
	in         []byte
	out        []byte
	outOn      bool
	inOff      bool
	hup        bool // hung up while not read: parked until the client catches up
	idleSince  int64
	x          *etry
}

// etry is a request the loop serves natively.
type etry struct {
	c         *econn
	up        *upconn
	req       *http.Request
	ex        exchange
	span      trace.Span
	g         *resilience.Guard
	ot        openTry
	dedicated bool
	deadline  int64 // the request's and try's deadline on the loop clock (mono); maxTime for none
	handAt    int64 // when the loop gives the try to a goroutine if no answer came
	head      bool  // the answer's head went to the client
	left      int64 // body bytes still to come
	reuse     bool  // the instance's connection can serve again
	o         resilience.Outcome
	status    int
	idx       int // in l.inflight
	// lines: out.Header holds only what telemetry added; the client's
	// fields are copied from its head (requestLines). xf: the request
	// gets X-Forwarded-For and -Proto.
	lines, xf bool
	out       http.Request
	url       url.URL
	// lean holds the request's span and context when telemetry starts
	// them on its lean path (most requests, when tracing samples few):
	// no heap objects of their own. Reused with the try, so nothing may
	// hold them past endRequest; a try handed over never comes back.
	lean telemetry.LeanRoom
	// ticket is the try's report to its instance's breaker (ot.tk points
	// here): filled by admission, cleared with x, and handed over with ot.
	ticket resilience.Ticket
}

// spinPolls is how many times in a row a busy loop looks again, giving
// way to other threads between looks, before it blocks in the kernel.
// A loop that blocks costs a context switch and a wake-up when the next
// event comes, and under load the next event comes within microseconds:
// with meshd in a scheduling group of its own (as a service or container
// is), loops that blocked after every empty look left a quarter of a core
// idle, waiting on wake-ups, while 64 connections had requests out.
const spinPolls = 20

// spinBatch is the size of the last batch of events from which a loop
// spins rather than blocks. A loop that gets one event at a time is not
// busy: spinning would only burn the processor between requests (at one
// connection, 42% of a core became 64% with spinning after every batch).
const spinBatch = 2

// spinNext reports whether a loop whose last look found nothing looks
// again at once: last is the size of the last batch that held events,
// spun the empty looks since.
func spinNext(last, spun int) bool { return last >= spinBatch && spun < spinPolls }

// A loop gives way (see loopYield) on either of two rules, checked after
// every turn:
//
//   - busy: it has handled yieldBatches batches of events and gone
//     yieldEvery without waiting through the runtime (unix.EpollWait).
//     While a loop waits there, the runtime's monitor hands its processor
//     to another thread if goroutines are queued on it; a loop kept busy
//     waits raw or not at all, and its queue would wait for the spare
//     processor (the runtime has one more than there are loops) to steal
//     it. Counted in batches alone, and not reset by the waits, this fell
//     on one request in 16 at one connection; by time alone (2 ms) it
//     came three times as often as that under 64 connections.
//   - clock: quietYield has passed since it last gave way, whatever it
//     did meanwhile. A wait through the runtime is not a pass through the
//     scheduler, and the monitor preempts a goroutine that has not made
//     one for 10 ms, waits in the kernel included. On a loop serving a
//     connection or a few that costs more than giving way: a signal, the
//     processor taken from the loop and got back, and the monitor, woken
//     from its deep sleep by that, looking every 20 µs for a while. With
//     the loop giving way every 8 ms, at one connection, context switches
//     fell from 2.4-2.5 to 2.0 a request (HAProxy: 1.8-1.9).
//
// Giving way is dear on a loop locked to its thread (while SCHED_BATCH,
// see schedule): a hand-over to another thread and back, five futex calls.
const (
	yieldEvery   = 2 * time.Millisecond
	yieldBatches = 32
	quietYield   = 8 * time.Millisecond
)

// Why a loop gives way.
const (
	yieldNone = iota
	yieldBusy
	yieldClock
)

// yieldNext says whether, and why, a loop gives way at now: it last
// waited through the runtime at waitedAt and has handled batches of
// events since, and last gave way at gaveAt (times on the loops' clock).
func yieldNext(waitedAt, gaveAt, now int64, batches int) int {
	switch {
	case batches >= yieldBatches && now-waitedAt >= int64(yieldEvery):
		return yieldBusy
	case now-gaveAt >= int64(quietYield):
		return yieldClock
	}
	return yieldNone
}

// loopYield is what a loop gives way with, and why. Each engine takes the
// value when it starts; tests count the calls.
//
// A busy loop gives way with runtime.Gosched, which queues the loop on the
// runtime's global queue and wakes an idle processor's thread to look for
// work: that is the point, since goroutines wait behind the loop. The
// clock rule only has to take the loop through the scheduler, and there
// that wake-up is a thread woken for nothing: a futex call to wake it, one
// as it sleeps again, and on a two-core machine a core taken for a moment
// from the client or the instance. So it uses the runtime's goyield: the
// loop goes to its own processor's queue, behind anything already there,
// and no thread is woken. At one connection, futex calls fell from 0.037
// to 0.002 a request. (On a loop locked to its thread either is a
// hand-over, as above.)
var loopYield = func(why int) {
	if why == yieldClock {
		goyield()
		return
	}
	runtime.Gosched()
}

// goyield is runtime.goyield, which the runtime keeps for use by linkname
// (go.dev/issue/67401): runtime.Gosched without the wake-up, the goroutine
// queued on the current processor.
//
//go:linkname goyield runtime.goyield
func goyield()

// batchQuiet is how long a loop stays SCHED_BATCH after its last busy
// batch: long enough that a loop under load does not switch back and
// forth (each switch is a system call), short enough that one whose load
// has gone is soon woken as promptly as before.
const batchQuiet = 100 * time.Millisecond

// batchNext reports whether a loop's thread should be SCHED_BATCH at now,
// its last busy batch at busyAt (on the loops' clock; 0 for never).
func batchNext(busyAt, now int64) bool {
	return busyAt != 0 && now-busyAt < int64(batchQuiet)
}

// setBatch makes the calling thread SCHED_BATCH (on) or SCHED_OTHER,
// keeping its nice value, with SCHED_RESET_ON_FORK (which resets a child's
// negative nice value, not SCHED_BATCH: a thread the caller starts would
// inherit the policy). A thread may move between the two policies without
// privilege. The caller must be locked to its thread (LockOSThread): the
// runtime then starts no thread from it (it uses its template thread),
// and the thread goes back to the runtime only once unlocked.
func setBatch(on bool) error {
	policy := uintptr(unix.SCHED_NORMAL)
	if on {
		policy = unix.SCHED_BATCH
	}
	var param int32 // struct sched_param: priority 0, as both policies want
	_, _, e := unix.RawSyscall(unix.SYS_SCHED_SETSCHEDULER, 0, policy|unix.SCHED_RESET_ON_FORK, uintptr(unsafe.Pointer(&param)))
	if e != 0 {
		return e
	}
	return nil
}

// setPolicy is setBatch; tests make it fail.
var setPolicy = setBatch

// schedule puts the loop's thread in the policy its load asks for
// (l.recent). Only with the engine's batch.
//
// The policy belongs to the thread, so a loop is locked to its thread
// while it is SCHED_BATCH, and only then: no SCHED_BATCH thread goes back
// to the runtime or starts one (see setBatch), and a loop that is not
// busy gives way (loopYield) at the price of a goroutine switch, usually
// on its own thread. Locked, giving way
// is a hand-over to another thread and back: at one connection, locked
// loops made 800-850 futex calls a second against 270-300 unlocked, and
// took a tenth more CPU time per request.
func (l *loop) schedule() {
	want := l.recent
	if want == l.batchOn || l.batchErr {
		return
	}
	if want {
		runtime.LockOSThread()
		l.tid.Store(int32(unix.Gettid()))
	}
	if err := setPolicy(want); err != nil {
		// Seccomp profiles may refuse it: the loop serves as it is.
		// (A thread that stays SCHED_BATCH stays locked, and ends
		// with the loop.)
		l.batchErr = true
		l.e.s.log.Warn("event loop: cannot change its scheduling policy; staying as it is", "batch", want, "err", err)
		if want {
			l.tid.Store(0)
			runtime.UnlockOSThread()
		}
		return
	}
	l.batchOn = want
	if !want {
		l.tid.Store(0)
		runtime.UnlockOSThread()
	}
}

// run is the loop's goroutine: it waits for events and serves them until
// the engine stops it.
func (l *loop) run() {
	defer l.e.wg.Done()
	defer func() {
		if l.batchOn {
			// Before the engine counts the loop ended. The loop ends
			// locked to its thread (schedule), which takes the thread
			// with it whether this works or not.
			setBatch(false)
		}
		l.tid.Store(0)
	}()
	msec, last, spun := 0, 0, 0
	// When the loop last waited through the runtime, the batches of
	// events it has handled since, and when it last gave way.
	waitedAt, batches := monoNow(), 0
	gaveAt := waitedAt
	for {
		var n int
		var err error
		waited := false
		switch {
		case msec == 0:
			n, err = l.pollNow()
		case l.recent:
			n, err = l.waitRaw(msec)
		default:
			n, err = unix.EpollWait(l.ep, l.events, msec)
			waited = true
		}
		// The clock is read once a turn, after the wait, and again after
		// a batch of more than one event: a lone event takes microseconds,
		// and what the time is used for after it (timers, giving way,
		// the next wait's length) counts in milliseconds.
		now := monoNow()
		l.now = now
		l.clk.reset()
		if err != nil && err != unix.EINTR {
			l.e.s.log.Error("event loop stopped", "err", err)
			l.shutdown()
			return
		}
		if waited {
			waitedAt, batches = now, 0
		}
		for i := 0; i < n; i++ {
			ev := l.events[i]
			if int(ev.Fd) == l.wake {
				if l.woken() {
					return
				}
				continue
			}
			switch o := l.fdObj(ev.Fd).(type) {
			case *econn:
				if o.gen == uint32(ev.Pad) {
					l.clientEvent(o, ev.Events)
				}
			case *upconn:
				if o.gen == uint32(ev.Pad) {
					l.upEvent(o, ev.Events)
				}
			}
		}
		if n >= spinBatch {
			now = monoNow()
			l.now = now
			l.clk.reset()
		}
		if now >= l.nextDue {
			l.sweep(now)
		}
		if now-l.lastIdle >= int64(time.Second) {
			l.lastIdle = now
			l.sweepIdle(now)
		}
		if n >= spinBatch {
			l.busyAt = now
		}
		l.recent = batchNext(l.busyAt, now)
		if l.e.batch {
			l.schedule()
		}
		if n > 0 {
			batches++
		}
		if why := yieldNext(waitedAt, gaveAt, now, batches); why != yieldNone {
			l.e.yield(why)
			// Giving way may take a while: what comes next counts
			// from its end.
			now = monoNow()
			l.now = now
			l.clk.reset()
			waitedAt, gaveAt, batches = now, now, 0
		}
		switch {
		case n == 0 && msec == 0 && spinNext(last, spun):
			// Busy a moment ago: give way to other threads (the
			// client and the instance, when they share the core) and
			// look again, rather than sleep and be woken.
			spun++
			unix.RawSyscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
		case n >= spinBatch:
			// Look again at once, without the cost of a blocking
			// system call: more is likely ready.
			msec = 0
			last, spun = n, 0
		default:
			// A quiet moment, or a lone event (after which a look
			// without waiting finds nothing, as a rule, and would cost
			// a system call for nothing): wait in the kernel.
			if n > 0 {
				last, spun = n, 0
			}
			msec = 1000
			if l.nextDue != maxTime {
				msec = int(min((l.nextDue-now)/int64(time.Millisecond)+1, 1000))
			}
			if l.recent {
				// Wake when the quiet spell ends, to go back to the
				// usual policy and wait before the next request comes.
				msec = min(msec, max(int((l.busyAt+int64(batchQuiet)-now)/int64(time.Millisecond))+1, 1))
				// A raw wait is no pass through the scheduler
				// either: wake to give way (clock rule) before the
				// runtime's monitor would preempt the loop.
				msec = min(msec, int((quietYield-time.Duration(now-gaveAt))/time.Millisecond)+1)
			}
			// A timer due while the loop gave way: look at once (the
			// sweep at the top of the next turn sees to it); -1 would
			// wait for ever.
			msec = max(msec, 0)
		}
	}
}

// woken handles the inbox and commands; true when the loop must end.
func (l *loop) woken() bool {
	var b [8]byte
	unix.Read(l.wake, b[:])
	l.mu.Lock()
	in, cmds := l.inbox, l.cmds
	l.inbox, l.cmds = nil, nil
	l.mu.Unlock()
	for _, a := range in {
		l.addClient(a)
	}
	if l.cmdStop.Load() {
		l.shutdown()
		return true
	}
	for _, cmd := range cmds {
		if cmd.fn != nil {
			cmd.fn(l)
			continue
		}
		for c := range l.clients {
			switch {
			case c.f != cmd.f:
			case cmd.all:
				l.dropClient(c)
			case c.x == nil && len(c.out) == 0:
				l.closeClient(c)
			}
		}
	}
	if l.cmdPool.Swap(false) {
		for addr, ups := range l.idle {
			for _, u := range ups {
				l.closeUp(u)
			}
			delete(l.idle, addr)
		}
	}
	return false
}

func (l *loop) shutdown() {
	l.mu.Lock()
	l.stopped = true
	in := l.inbox
	l.inbox = nil
	l.mu.Unlock()
	for _, a := range in {
		unix.Close(a.fd)
		a.f.wg.Done()
	}
	for c := range l.clients {
		l.dropClient(c)
	}
	for _, ups := range l.idle {
		for _, u := range ups {
			l.closeUp(u)
		}
	}
	l.mu.Lock()
	unix.Close(l.ep)
	unix.Close(l.wake) // under the lock: poke checks stopped first
	l.mu.Unlock()
}

// fdObj returns what the loop registered under fd, or nil. A slice, not
// a map: it is looked up for every event, and descriptors are small
// numbers the kernel hands out lowest first. Descriptors are the
// process's, so each loop's slice grows to half again the highest number
// it has registered, and does not shrink: 16 bytes a descriptor a loop
// (2.4 MB a loop at 100,000 open connections, small beside their buffers).
func (l *loop) fdObj(fd int32) any {
	if uint(fd) < uint(len(l.fds)) {
		return l.fds[fd]
	}
	return nil
}

// dropFD forgets what the loop registered under fd.
func (l *loop) dropFD(fd int) {
	if uint(fd) < uint(len(l.fds)) {
		l.fds[fd] = nil
	}
}

func (l *loop) register(fd int, gen uint32, o any, events uint32) error {
	if fd >= len(l.fds) {
		l.fds = append(l.fds, make([]any, fd+1-len(l.fds)+len(l.fds)/2)...)
	}
	l.fds[fd] = o
	return unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: events, Fd: int32(fd), Pad: int32(gen)})
}

func (l *loop) rearm(fd int, gen uint32, events uint32) {
	ev := unix.EpollEvent{Events: events, Fd: int32(fd), Pad: int32(gen)}
	unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(l.ep), unix.EPOLL_CTL_MOD, uintptr(fd), uintptr(unsafe.Pointer(&ev)), 0, 0)
}

// The loop's reads and writes are on non-blocking sockets and return at
// once, so they are made as raw system calls: the runtime does not mark
// the goroutine as blocked in the kernel, and does not hand its processor
// to another thread when a write to a local peer takes a few dozen
// microseconds (which, at this rate, cost more than the writes). They are
// recvfrom and sendto rather than read and write, which go through the
// file layer first: 2-3% of the loop's CPU under load. MSG_NOSIGNAL: a
// peer gone is an EPIPE, without a signal to field.
func rawRead(fd int, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), 0, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

func rawWrite(fd int, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r, _, e := unix.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), unix.MSG_NOSIGNAL, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

// pollNow is epoll_wait without waiting, made raw like the reads.
func (l *loop) pollNow() (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(l.ep), uintptr(unsafe.Pointer(&l.events[0])), uintptr(len(l.events)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// waitRaw is epoll_wait made raw, for a loop busy a moment ago (see
// l.recent): the runtime does not see it block, and the loop keeps its
// processor. Through the runtime's system-call path, the monitor thread
// took the processor from a loop waiting longer than 20 µs, and handed it
// on; woken, the loop had to get one back, and the monitor, seeing
// system calls, kept looking every 20 µs: under load that was 0.07
// nanosleeps and 0.57 context switches per request, against 0.01 and 0.46
// with the raw wait (HAProxy: 0.45). Nothing waits for the processor
// kept: the runtime has one more than there are loops. The runtime's
// preemption signal (garbage collection, or a loop that has run 10 ms)
// ends the wait with EINTR. (With GODEBUG=asyncpreemptoff=1 there is no
// signal: a collection then waits for the wait to end, at most the rest
// of the loop's busy spell, 100 ms.) A loop with no load waits the usual
// way.
func (l *loop) waitRaw(msec int) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(l.ep), uintptr(unsafe.Pointer(&l.events[0])), uintptr(len(l.events)), uintptr(msec), 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

func (l *loop) unregister(fd int) {
	l.dropFD(fd)
	unix.EpollCtl(l.ep, unix.EPOLL_CTL_DEL, fd, nil)
}

func (l *loop) addClient(a adoptee) {
	if a.f.dropAll.Load() {
		// Its server gave up waiting while the connection was on its
		// way (and may already have told the loops to drop all).
		unix.Close(a.fd)
		a.f.wg.Done()
		return
	}
	l.gen++
	c := &econn{l: l, f: a.f, fd: a.fd, gen: l.gen, remote: a.remote, streak: a.streak, lastUsed: monoNow()}
	c.w.closing = &a.f.closing
	if err := l.register(a.fd, c.gen, c, unix.EPOLLIN); err != nil {
		l.dropFD(a.fd)
		unix.Close(a.fd)
		a.f.wg.Done()
		return
	}
	l.clients[c] = struct{}{}
}

// forgetClient takes c out of the loop; its descriptor is the caller's.
func (l *loop) forgetClient(c *econn) {
	l.unregister(c.fd)
	delete(l.clients, c)
}

// closeClient closes an idle client connection.
func (l *loop) closeClient(c *econn) {
	l.forgetClient(c)
	unix.Close(c.fd)
	c.f.wg.Done()
}

// closeAnswered closes c after the answer that ended its connection
// (Connection: close, or a shutdown draining). When the client has sent
// more than the loop read (requests pipelined behind that one), closing
// would reset the connection, and a reset drops what the kernel still
// holds of the answer. Then the connection leaves the loop for a
// goroutine that shuts its sending side and reads and drops what comes
// until the client closes or lingerMax passes, as the goroutine path does.
// The server counts the connection closed when it leaves, so that a
// shutdown does not wait for the linger; one that is dropping every
// connection closes it at once.
func (l *loop) closeAnswered(c *econn) {
	if c.f.dropAll.Load() || !unreadFD(c.fd) {
		l.closeClient(c)
		return
	}
	l.forgetClient(c)
	c.f.wg.Done()
	nc, err := fdConn(c.fd)
	if err != nil {
		return // (the descriptor is closed)
	}
	go func() {
		lingerConn(nc)
		nc.Close()
	}()
}

// unreadFD reports whether the socket fd holds bytes not read yet.
func unreadFD(fd int) bool {
	n, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
	return err == nil && n > 0
}

// unreadConn is unreadFD for a connection the goroutine path serves.
func unreadConn(nc net.Conn) bool {
	for {
		switch c := nc.(type) {
		case *replayConn:
			nc = c.Conn
			continue
		case syscall.Conn:
			rc, err := c.SyscallConn()
			if err != nil {
				return false
			}
			unread := false
			rc.Control(func(fd uintptr) { unread = unreadFD(int(fd)) })
			return unread
		}
		return false
	}
}

// dropClient closes c whatever it is doing; a request in progress is
// settled as one whose caller left.
func (l *loop) dropClient(c *econn) {
	if x := c.x; x != nil {
		l.settleGone(x)
	}
	l.closeClient(c)
}

func (l *loop) clientEvent(c *econn, ev uint32) {
	if ev&unix.EPOLLOUT != 0 {
		l.flushClient(c)
		if _, ok := l.clients[c]; !ok {
			return
		}
	}
	if c.inOff && ev&(unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		// Broken while the loop was not reading it. These are reported
		// whatever the loop asks for, so they must be dealt with now,
		// or every wait would return at once.
		l.clientBroke(c)
		return
	}
	if ev&(unix.EPOLLIN|unix.EPOLLHUP|unix.EPOLLERR) == 0 || c.inOff {
		return
	}
	n, err := rawRead(c.fd, l.rbuf)
	switch {
	case n > 0:
		c.in = append(c.in, l.rbuf[:n]...)
		c.lastUsed = l.now
		if c.x == nil && len(c.out) == 0 {
			l.serveNext(c)
		} else if len(c.in) > maxPipelined {
			// Pipelined far ahead while an answer is in progress or
			// still going out: read on once it is out (serveNext),
			// so that a client that sends without reading cannot make
			// the loop hold more than this.
			l.clientIn(c, false)
		}
	case err == unix.EAGAIN || err == unix.EINTR:
	default:
		// The client closed its side, or the connection broke.
		if c.x == nil && len(c.out) == 0 {
			l.closeClient(c)
			return
		}
		c.eof = true
		l.clientIn(c, false)
		if c.x != nil && !c.x.head {
			// Its request is still out: the goroutine path watches
			// for a caller that left, and settles the request so.
			l.handOver(c.x)
		}
	}
}

// clientBroke ends what c was doing: its connection is gone both ways.
func (l *loop) clientBroke(c *econn) {
	c.eof, c.dead = true, true
	c.out = c.out[:0]
	switch x := c.x; {
	case x == nil:
		l.closeClient(c)
	case x.head:
		l.clientFailed(x)
	default:
		// The request is still out: the goroutine path settles it as
		// one whose caller left.
		l.handOver(x)
	}
}

// clientIn arms or disarms reading c.
func (l *loop) clientIn(c *econn, on bool) {
	if c.inOff == !on {
		return
	}
	c.inOff = !on
	l.rearm(c.fd, c.gen, c.events())
}

func (c *econn) events() uint32 {
	var ev uint32
	if !c.inOff {
		ev |= unix.EPOLLIN
	}
	if c.outOn {
		ev |= unix.EPOLLOUT
	}
	return ev
}

// Write is the client connection's writer for the response: what the
// socket does not take at once waits in out.
func (c *econn) Write(p []byte) (int, error) {
	if c.dead {
		return 0, net.ErrClosed
	}
	n := len(p)
	if len(c.out) == 0 {
		for len(p) > 0 {
			k, err := rawWrite(c.fd, p)
			if k > 0 {
				p = p[k:]
				continue
			}
			if err == unix.EINTR {
				continue
			}
			if err == unix.EAGAIN {
				break
			}
			c.dead = true
			return 0, err
		}
		if len(p) == 0 {
			return n, nil
		}
	}
	if len(c.out) == 0 {
		c.stuck = c.l.now
	}
	c.out = append(c.out, p...)
	if !c.outOn {
		c.outOn = true
		c.l.rearm(c.fd, c.gen, c.events())
	}
	return n, nil
}

// flushClient sends what waits in c.out.
func (l *loop) flushClient(c *econn) {
	for len(c.out) > 0 {
		k, err := rawWrite(c.fd, c.out)
		if k > 0 {
			c.out = c.out[:copy(c.out, c.out[k:])]
			c.stuck = l.now
			continue
		}
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			break
		}
		c.dead = true
		c.out = c.out[:0]
		if c.x != nil {
			l.clientFailed(c.x)
		} else {
			l.closeClient(c)
		}
		return
	}
	if x := c.x; x != nil && x.up != nil && x.up.inOff && len(c.out) == 0 {
		l.upIn(x.up, true)
	}
	if len(c.out) > 0 {
		return
	}
	if cap(c.out) > 16<<10 {
		// Idle connections keep no large buffer.
		c.out = nil
	}
	if c.outOn {
		c.outOn = false
		l.rearm(c.fd, c.gen, c.events())
	}
	if c.x == nil {
		if c.closeNow && !c.dead {
			l.closeAnswered(c)
			return
		}
		if c.dead || c.eof && len(c.in) == 0 {
			l.closeClient(c)
			return
		}
		l.serveNext(c)
	}
}

// headEnd returns the length of the request head at the start of b, -1 if
// it is not all there.
func headEnd(b []byte) int {
	if i := bytes.Index(b, headEndCRLF); i >= 0 {
		if j := bytes.Index(b[:i+3], headEndLF); j >= 0 {
			return j + 2
		}
		return i + 3
	}
	if j := bytes.Index(b, headEndLF); j >= 0 {
		return j + 2
	}
	return -1
}

// maxPipelined is how much a client may send ahead of the answers it has
// not yet taken before the loop stops reading it.
const maxPipelined = 64 << 10

// serveNext starts the next request in c.in, if one is there. The answer
// before must be out: answers go in order.
func (l *loop) serveNext(c *econn) {
	if c.x != nil || len(c.out) > 0 || len(c.in) == 0 {
		return
	}
	if c.inOff && !c.eof {
		l.clientIn(c, true)
	}
	cfg := l.e.s.cfg.Load()
	end := headEnd(c.in)
	if end < 0 {
		// A head that comes in pieces, or too long: the goroutine path
		// applies the header timeout and the size limit.
		l.delegate(c, nil, nil, c.in)
		return
	}
	l.rd.Reset(c.in[:end])
	l.br.Reset(&l.rd)
	l.raw = l.raw[:0]
	req, ok, err := readHead(l.br, &l.raw, cfg.Proxy.MaxHeaderBytes, l.base, &c.store)
	if err != nil || !ok || l.br.Buffered() != 0 || l.rd.Len() != 0 {
		l.delegate(c, nil, nil, c.in)
		return
	}
	req.RemoteAddr = c.remote
	if req.Body != nil && req.Body != http.NoBody {
		l.delegate(c, nil, nil, c.in)
		return
	}
	rest := c.in[end:]
	x, st := l.begin(c, req, cfg)
	if x == nil {
		l.delegate(c, req, st, rest)
		return
	}
	c.in = c.in[:copy(c.in, rest)]
	c.streak = 0
	c.x = x
	l.send(x)
}

// delegate gives c to the goroutine path: req (nil: parse prefix) and st
// say how far the loop got with the request at hand.
func (l *loop) delegate(c *econn, req *http.Request, st *started, prefix []byte) {
	f := c.f
	l.e.handed.Add(1)
	l.forgetClient(c)
	nc, err := fdConn(c.fd)
	if err != nil {
		l.e.s.log.Error("event loop: cannot hand a connection over; closing it", "err", err)
		if st != nil {
			st.abandon(l.e.s, req)
		}
		f.wg.Done()
		return
	}
	fc := &fastConn{nc: &replayConn{Conn: nc, prefix: bytes.Clone(prefix)}, remote: c.remote, req: req, first: st}
	if req != nil {
		// A request is in hand: a shutdown must wait for it, not
		// close the connection as idle.
		fc.state.Store(connActive)
	}
	fc.ctx, fc.cancel = context.WithCancel(context.Background())
	if streak := c.streak + 1; streak < 4 {
		// Back to the loop when idle, unless the connection's requests
		// keep needing the goroutine path (uploads, say): then moving
		// it back and forth would cost more than it saves.
		fc.back = func(nc net.Conn) bool { return l.e.adopt(nc, f, streak) }
	}
	f.mu.Lock()
	f.conns[fc] = struct{}{}
	if f.dropAll.Load() {
		// closeAll has run, or runs now and finds it: either way it is
		// closed (set before closeAll takes f.mu, so one of the two
		// sees the other).
		fc.state.Store(connClosed)
		fc.nc.Close()
	}
	f.mu.Unlock()
	// The loop's count of the connection passes to the goroutine's.
	go f.serveConn(fc)
}

// begin starts req natively when the loop can: it routes, starts the
// span, picks and admits an instance and builds the request for it. nil
// means the goroutine path takes the request, with st (when not nil) for
// what was begun.
func (l *loop) begin(c *econn, req *http.Request, cfg *config.Config) (*etry, *started) {
	s := l.e.s
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		return nil, nil
	}
	var u *upstream
	dedicated := false
	if fixed := c.f.l.fixed.Load(); fixed != nil {
		u, dedicated = s.lookup(*fixed), true
	} else if name := targetName(req); name != "" {
		u = s.lookup(name)
	}
	if u == nil || u.inboundAddr != "" || upgradeType(req.Header) != "" || wantsTrailers(req.Header) {
		return nil, nil
	}
	set := u.settings.Load()
	if set.transport.fast == nil {
		return nil, nil
	}
	g := u.guard
	rc := g.Config()
	if _, ok := req.Header[http.CanonicalHeaderKey(rc.Timeouts.Header)]; ok {
		return nil, nil
	}
	snap := u.pool.Load()
	if len(snap.Endpoints) == 0 {
		return nil, nil
	}
	if stale, _, _ := u.stale(); stale {
		return nil, nil
	}
	budget, err := rc.Timeouts.Budget(req)
	if err != nil {
		return nil, nil
	}
	start := l.clk.now()
	u.requests.Add(1)
	u.lastUsed.Store(start.UnixNano())
	// The try is taken here, for its room for the span (x.lean). When the
	// request goes no further on the loop (no pick, no admission), the
	// goroutine path that answers takes the span and context along: x is
	// not reused if they live in it.
	x := l.newTry()
	ctx, span := s.tel.StartServerIn(context.Background(), req, "", &x.lean)
	// (A sampled request is served here too: its spans are started and
	// ended by the same calls forward makes.)
	begun := func() *started {
		if !x.lean.Holds(span) {
			l.putTry(x)
		}
		return &started{u: u, start: start, dedicated: dedicated, span: span, ctx: ctx}
	}
	hdr := l.header()
	if !c.peerSet {
		c.peer, c.peerSet = remoteIP(req), true
		c.xff = []string{peerHost(c.remote)}
	}
	peer := c.peer
	xf := cfg.Proxy.XForwardedOn()
	_, priorXFF := req.Header["X-Forwarded-For"]
	// The usual request's fields go to the instance as they came, copied
	// line by line from its head when it is sent (requestLines): hdr then
	// holds only what telemetry adds. (The timeout header is not there:
	// such requests are the goroutine path's.)
	lines := (!xf || !priorXFF && peer.IsValid()) && plainConnection(req.Header)
	if !lines {
		copyEndToEnd(hdr, req.Header)
		delete(hdr, http.CanonicalHeaderKey(rc.Timeouts.Header))
		if xf {
			setForwarded(hdr, req, peer, true)
		}
	}
	clientIP := peer
	if cfg.Proxy.TrustForwardedFor {
		if ip, ok := firstForwarded(req.Header); ok {
			clientIP = ip
		}
	}
	host := req.Host
	if dedicated {
		host = u.name
	}
	// The pick's request lives in the loop: through the Picker interface
	// a local one escaped, a heap object on every request.
	preq := &l.preq
	*preq = balance.Request{HTTP: req, ClientIP: clientIP, Now: start.UnixNano()}
	preq.IgnoreHealth = g.FailOpen(len(snap.Endpoints))
	ep, err := snap.Picker.Pick(preq)
	preq.HTTP = nil // not to hold the request until the next one
	if err != nil {
		return nil, begun()
	}
	if preq.IgnoreHealth {
		g.AdmitForcedTo(ep.Stats, &x.ticket)
	} else if err = g.AdmitTo(ep.Stats, &x.ticket); err != nil {
		return nil, begun()
	}
	g.RequestStarted()
	x.c, x.req, x.span, x.g, x.dedicated, x.deadline = c, req, span, g, dedicated, maxTime
	x.lines, x.xf = lines, xf
	x.ex = exchange{s: s, w: &c.w, r: req, u: u, start: start, ctx: ctx, snap: snap, tries: 1, instance: ep.ID, clk: &l.clk}
	ep.MarkPicked(preq.Now)
	var bd, td time.Time
	if budget > 0 {
		bd = start.Add(budget)
		x.deadline = mono(bd)
	}
	rem := time.Duration(0)
	if budget > 0 {
		rem = budget // what is left of it at start, where bd counts from
	}
	if tt := rc.Timeouts.TryTimeout(rem); tt > 0 {
		td = start.Add(tt)
		x.deadline = min(x.deadline, mono(td))
	}
	// The request for the instance, as outgoing builds it, in x. Its
	// context is set when a goroutine takes it over.
	x.url = url.URL{Scheme: "http", Host: ep.Address, Path: req.URL.Path, RawPath: req.URL.RawPath, RawQuery: req.URL.RawQuery, ForceQuery: req.URL.ForceQuery, Opaque: req.URL.Opaque}
	x.out = http.Request{Method: req.Method, URL: &x.url, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1, Header: hdr, Host: host}
	out := &x.out
	_, aspan := s.tel.StartAttempt(ctx, out, telemetry.Attempt{
		Upstream: u.name, Algorithm: set.algorithm, InstanceID: ep.ID, InstanceAddr: ep.Address,
		Candidates: preq.Candidates, Reason: preq.Reason, Score: preq.Score, HasScore: preq.Score != 0,
		Breaker: ep.Breaker().String(),
	})
	ep.InFlight.Add(1)
	metricsOf(s.tel).InFlight(u.name, 1)
	x.ot = openTry{ep: ep, h1: set.transport.fast, tk: &x.ticket, aspan: aspan, t0: start, deadline: td, out: out}
	// The try's deadline is forward's to enforce once handed over; the
	// request's own (bd) is forward's already, from start.
	return x, nil
}

// plainConnection reports whether the Connection fields h holds name
// nothing but close and keep-alive, so that no other field is dropped for
// them. (A field named Close, which "Connection: close" would drop, makes
// it false too.)
func plainConnection(h http.Header) bool {
	if _, ok := h["Close"]; ok {
		return false
	}
	for _, v := range h["Connection"] {
		if _, ok := connectionTokens(v); !ok {
			return false
		}
	}
	return true
}

// requestLines returns the header lines that go to the instance for x, a
// request begun with x.lines: the client's end-to-end fields as they came
// (l.raw holds its head, as readHead read it), less those telemetry set in
// out.Header, then the X-Forwarded fields. copyEndToEnd and setForwarded
// make the same choices for the header map.
func (l *loop) requestLines(x *etry) []byte {
	out := l.reqLines[:0]
	replaced := l.e.s.tel.Replaced()
	raw := l.raw
	if i := bytes.IndexByte(raw, '\n'); i >= 0 {
		raw = raw[i+1:] // the request line
	}
	for len(raw) > 0 {
		var line []byte
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			line, raw = raw[:i+1], raw[i+1:]
		} else {
			line, raw = raw, nil
		}
		line = trimCRLF(line)
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			break // the blank line (readHead checked every field)
		}
		name := line[:colon]
		if foldEq(name, "host") || hopField(name) != fieldEndToEnd || inHeader(x.out.Header, name) || inList(replaced, name) {
			continue
		}
		out = append(out, name...)
		out = append(out, ": "...)
		out = append(out, trimOWS(line[colon+1:])...)
		out = append(out, "\r\n"...)
	}
	if x.xf {
		out = append(out, "X-Forwarded-For: "...)
		out = append(out, x.c.xff[0]...)
		out = append(out, "\r\n"...)
		if _, ok := x.req.Header["X-Forwarded-Proto"]; !ok {
			out = append(out, "X-Forwarded-Proto: http\r\n"...)
		}
	}
	l.reqLines = out
	return out
}

// inHeader reports whether h has a field named name, ignoring ASCII case.
func inHeader(h http.Header, name []byte) bool {
	for k := range h {
		if asciiEqualFold(k, name) {
			return true
		}
	}
	return false
}

// inList reports whether names holds name, ignoring ASCII case.
func inList(names []string, name []byte) bool {
	for _, k := range names {
		if asciiEqualFold(k, name) {
			return true
		}
	}
	return false
}

// fullHeader gives x.out the header map begin would have built without
// x.lines, for the goroutine path taking the request over: the client's
// end-to-end fields and the X-Forwarded ones, under what telemetry set.
func fullHeader(x *etry) {
	h := make(http.Header, len(x.req.Header)+len(x.out.Header)+2)
	copyEndToEnd(h, x.req.Header)
	if x.xf {
		h["X-Forwarded-For"] = x.c.xff
		if _, ok := h["X-Forwarded-Proto"]; !ok {
			h["X-Forwarded-Proto"] = protoHTTP
		}
	}
	for _, k := range x.ex.s.tel.Replaced() {
		delete(h, k) // as StartAttempt did to the map it was given
	}
	for k, v := range x.out.Header {
		h[k] = v
	}
	x.out.Header, x.lines = h, false
}

// send writes x's request to a pooled or new connection to its instance.
func (l *loop) send(x *etry) {
	rc := x.g.Config()
	addr := x.ot.ep.Address
	l.track(x, monoAfter(rc.Timeouts.Connect))
	l.reqBuf.Reset()
	l.reqW.Reset(&l.reqBuf)
	var lines []byte
	if x.lines {
		lines = l.requestLines(x)
	}
	if err := h1.WriteHead(l.reqW, x.ot.out, lines); err != nil || l.reqW.Flush() != nil {
		l.handOver(x) // the goroutine path reports the bad request
		return
	}
	up := l.takeIdle(addr)
	if up == nil {
		var err error
		if up, err = l.dial(addr); err != nil {
			if up == nil && err == errNotLiteral {
				l.handOver(x)
				return
			}
			x.ot.err = &net.OpError{Op: "dial", Net: "tcp", Addr: tcpAddr(addr), Err: os.NewSyscallError("connect", err)}
			l.handOver(x)
			return
		}
	}
	up.x = x
	x.up = up
	up.in = up.in[:0]
	up.out = append(up.out[:0], l.reqBuf.Bytes()...)
	if !up.connecting {
		l.writeUp(up)
	}
}

var errNotLiteral = errors.New("address is not a literal IPv4 address and port")

func tcpAddr(addr string) net.Addr {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil
	}
	return net.TCPAddrFromAddrPort(ap)
}

// track puts x among the tries the loop watches for their deadlines.
func (l *loop) track(x *etry, connectBy int64) {
	x.handAt = min(x.deadline, connectBy)
	x.idx = len(l.inflight)
	l.inflight = append(l.inflight, x)
	l.nextDue = min(l.nextDue, x.handAt)
}

func (l *loop) untrack(x *etry) {
	if x.idx < 0 {
		return
	}
	last := l.inflight[len(l.inflight)-1]
	l.inflight[x.idx] = last
	last.idx = x.idx
	l.inflight[len(l.inflight)-1] = nil
	l.inflight = l.inflight[:len(l.inflight)-1]
	x.idx = -1
	if len(l.inflight) == 0 {
		l.nextDue = maxTime
	}
}

// sweep hands over the tries whose time is up: the goroutine path applies
// the timeouts themselves. An answer already under way is cut.
func (l *loop) sweep(now int64) {
	next := maxTime
	for i := 0; i < len(l.inflight); {
		x := l.inflight[i]
		if x.handAt > now {
			next = min(next, x.handAt)
			i++
			continue
		}
		switch {
		case x.head:
			l.upFailed(x, context.DeadlineExceeded)
		case x.up != nil && x.up.connecting && now < x.deadline:
			// The connect timeout, not the request's: a dial timeout,
			// as the goroutine path's dialer reports it.
			u := x.up
			x.up, u.x = nil, nil
			l.closeUp(u)
			x.ot.err = &net.OpError{Op: "dial", Net: "tcp", Addr: tcpAddr(u.addr), Err: os.ErrDeadlineExceeded}
			l.handOver(x)
		default:
			l.handOver(x)
		}
		// x left the list; i now holds another.
	}
	l.nextDue = next
}

// sweepIdle closes client connections idle past the idle timeout, those
// whose client has taken nothing of their answer for the write timeout,
// and pooled instance connections idle past theirs.
func (l *loop) sweepIdle(now int64) {
	p := &l.e.s.cfg.Load().Proxy
	idle, wt := int64(p.IdleTimeout), int64(p.WriteTimeout)
	for c := range l.clients {
		switch {
		case len(c.out) > 0:
			if wt > 0 && now-c.stuck > wt {
				l.stalled(c, time.Duration(now-c.stuck))
			}
		case c.x == nil && idle > 0 && now-c.lastUsed > idle:
			l.closeClient(c)
		}
	}
	for addr, ups := range l.idle {
		kept := ups[:0]
		for _, u := range ups {
			if now-u.idleSince > int64(config.DefaultIdleConnTimeout) {
				l.closeUp(u)
			} else {
				kept = append(kept, u)
			}
		}
		clear(ups[len(kept):])
		if len(kept) == 0 {
			delete(l.idle, addr)
		} else {
			l.idle[addr] = kept
		}
	}
}

func (l *loop) takeIdle(addr string) *upconn {
	ups := l.idle[addr]
	if len(ups) == 0 {
		return nil
	}
	u := ups[len(ups)-1]
	ups[len(ups)-1] = nil
	l.idle[addr] = ups[:len(ups)-1]
	u.reused = true
	return u
}

// dial opens a connection to addr without waiting for it.
func (l *loop) dial(addr string) (*upconn, error) {
	sa, ok := l.addrs[addr]
	if !ok {
		if len(l.addrs) >= 4096 {
			clear(l.addrs) // instances come and go; the cache must not grow for ever
		}
		if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().Is4() {
			sa = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
		}
		l.addrs[addr] = sa
	}
	if sa == nil {
		return nil, errNotLiteral
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 30)
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 30)
	err = unix.Connect(fd, sa)
	if err != nil && err != unix.EINPROGRESS && err != unix.EINTR {
		unix.Close(fd)
		return nil, err
	}
	l.gen++
	u := &upconn{fd: fd, gen: l.gen, addr: addr, connecting: err != nil}
	ev := uint32(unix.EPOLLIN)
	if u.connecting {
		ev |= unix.EPOLLOUT
		u.outOn = true
	}
	if err := l.register(fd, u.gen, u, ev); err != nil {
		l.dropFD(fd)
		unix.Close(fd)
		return nil, err
	}
	return u, nil
}

func (u *upconn) events() uint32 {
	if u.inOff && u.hup {
		// Parked: hang-ups are reported whatever is asked for, so the
		// one left is taken once and then the connection stays quiet.
		return unix.EPOLLONESHOT
	}
	var ev uint32
	if !u.inOff {
		ev |= unix.EPOLLIN
	}
	if u.outOn {
		ev |= unix.EPOLLOUT
	}
	return ev
}

func (l *loop) upIn(u *upconn, on bool) {
	if u.inOff == !on {
		return
	}
	u.inOff = !on
	l.rearm(u.fd, u.gen, u.events())
}

func (l *loop) closeUp(u *upconn) {
	l.unregister(u.fd)
	unix.Close(u.fd)
}

// writeUp sends what waits in u.out.
func (l *loop) writeUp(u *upconn) {
	x := u.x
	for len(u.out) > 0 {
		k, err := rawWrite(u.fd, u.out)
		if k > 0 {
			u.out = u.out[:copy(u.out, u.out[k:])]
			continue
		}
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			if !u.outOn {
				u.outOn = true
				l.rearm(u.fd, u.gen, u.events())
			}
			return
		}
		// The instance's connection is gone. A pooled one may have been
		// closed while idle: the goroutine path sends again on a new
		// one, as its client does; a new one failing is the
		// instance's failure.
		x.up = nil
		u.x = nil
		l.closeUp(u)
		if !u.reused {
			x.ot.err = &net.OpError{Op: "write", Net: "tcp", Addr: tcpAddr(u.addr), Err: os.NewSyscallError("write", err)}
		}
		l.handOver(x)
		return
	}
	if u.outOn {
		u.outOn = false
		l.rearm(u.fd, u.gen, u.events())
	}
	x.ot.sent = true
	// From here the response header timeout counts: from a fresh reading,
	// not the turn's, which the turn's work before this may have aged. The
	// goroutine path, if the try is handed over, counts from the same one.
	sent := monoNow()
	x.ot.written = monoTime(sent)
	if ht := x.g.Config().Timeouts.ResponseHeader; ht > 0 {
		x.handAt = min(x.deadline, monoAdd(sent, ht))
	} else {
		x.handAt = x.deadline
	}
	l.nextDue = min(l.nextDue, x.handAt)
}

func (l *loop) upEvent(u *upconn, ev uint32) {
	x := u.x
	if x == nil {
		// Pooled and idle: the instance closed it, or sent what no
		// request asked for. Either way it cannot serve again.
		l.dropIdle(u)
		return
	}
	if u.connecting {
		if ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) == 0 {
			return
		}
		u.connecting = false
		if serr, err := unix.GetsockoptInt(u.fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || serr != 0 {
			e := error(unix.Errno(serr))
			if err != nil {
				e = err
			}
			x.up, u.x = nil, nil
			l.closeUp(u)
			x.ot.err = &net.OpError{Op: "dial", Net: "tcp", Addr: tcpAddr(u.addr), Err: os.NewSyscallError("connect", e)}
			l.handOver(x)
			return
		}
		// Connected: the connect timeout no longer counts.
		x.handAt = x.deadline
		l.writeUp(u)
		return
	}
	if ev&unix.EPOLLOUT != 0 && len(u.out) > 0 {
		l.writeUp(u)
		if u.x == nil {
			return
		}
	}
	if u.inOff && ev&(unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		// Closed or reset while the loop waited for the client to
		// catch up. What the instance sent before is still there to
		// read, and may be the whole answer: park the connection until
		// the client has taken what is out (upIn), then read on to the
		// end or the error.
		if !u.hup {
			u.hup = true
			l.rearm(u.fd, u.gen, u.events())
		}
		return
	}
	if ev&(unix.EPOLLIN|unix.EPOLLHUP|unix.EPOLLERR) == 0 || u.inOff {
		return
	}
	n, err := rawRead(u.fd, l.rbuf)
	if n < 0 && (err == unix.EAGAIN || err == unix.EINTR) {
		return
	}
	if !x.head {
		if n <= 0 {
			// Closed before a whole head: the goroutine path reads the
			// end as its client would, and decides what it was.
			l.handOver(x)
			return
		}
		data := l.rbuf[:n]
		if len(u.in) > 0 {
			u.in = append(u.in, data...)
			data = u.in
		}
		l.answer(x, data)
		return
	}
	if n <= 0 {
		l.upFailed(x, io.ErrUnexpectedEOF)
		return
	}
	l.body(x, l.rbuf[:n])
}

// dropIdle closes a pooled connection and takes it out of the pool.
func (l *loop) dropIdle(u *upconn) {
	ups := l.idle[u.addr]
	for i, v := range ups {
		if v == u {
			ups[i] = ups[len(ups)-1]
			ups[len(ups)-1] = nil
			l.idle[u.addr] = ups[:len(ups)-1]
			break
		}
	}
	l.closeUp(u)
}

// answer looks at what the instance sent so far: a plain success framed
// by Content-Length goes out natively, anything else to the goroutine
// path, which sees it as its own client would have.
func (l *loop) answer(x *etry, data []byte) {
	u := x.up
	// data is the loop's read buffer when the head came in one read (the
	// usual case, parsed without a copy), u.in when it came in pieces.
	// What the goroutine path or the next read needs is kept in u.in.
	ah, lines, res := scanAnswer(data, l.head[:0])
	l.head = lines[:0]
	if res == scanIncomplete {
		keep(u, data)
		return
	}
	st := ah.status
	if res != scanOK || st < 200 || st >= 400 {
		// 1xx, failures, other framing, anything unusual: the goroutine
		// path parses the same bytes with the h1 client.
		keep(u, data)
		l.handOver(x)
		return
	}
	noBody := x.req.Method == http.MethodHead || st == http.StatusNoContent || st == http.StatusNotModified
	length := int64(0)
	if !noBody {
		if ah.length < 0 {
			keep(u, data)
			l.handOver(x)
			return
		}
		length = ah.length
	}
	o := x.g.Classify(context.Background(), nil, st)
	if o.Failure() {
		keep(u, data)
		l.handOver(x)
		return
	}
	now := l.clk.now()
	ep := x.ot.ep
	ep.ObserveLatencyAt(now.Sub(x.ot.t0), now.UnixNano(), balance.DecayOf(x.ex.snap.Policy))
	x.o, x.status, x.head, x.left = o, st, true, length
	l.e.native.Add(1)
	x.reuse = !ah.close
	x.handAt = x.deadline
	c := x.c
	w := &c.w
	w.bw = l.bw
	l.bw.Reset(c)
	w.reset(x.req)
	w.raw = lines
	w.WriteHeader(st)
	if ah.length >= 0 {
		w.declared = ah.length // as WriteHeader takes it from a header map
	}
	x.ex.status, x.ex.wire = st, st
	rest := data[ah.size:]
	u.in = u.in[:0]
	if cap(u.in) > 4<<10 {
		u.in = nil // a connection keeps no large buffer
	}
	if noBody {
		if len(rest) > 0 {
			x.reuse = false
		}
		l.complete(x)
		return
	}
	if len(rest) == 0 {
		// The head goes now: its lines live in l.head, which the next
		// answer reuses.
		w.Flush()
	}
	l.body(x, rest)
}

// keep makes sure u.in holds data.
func keep(u *upconn, data []byte) {
	if len(u.in) == 0 {
		u.in = append(u.in, data...)
	}
}

// body passes on part of the answer's body.
func (l *loop) body(x *etry, p []byte) {
	if int64(len(p)) > x.left {
		// More than the length said: the connection cannot be trusted.
		p = p[:x.left]
		x.reuse = false
	}
	if len(p) > 0 {
		w := &x.c.w
		l.bw.Reset(x.c)
		if _, err := w.Write(p); err != nil {
			l.clientFailed(x)
			return
		}
		x.left -= int64(len(p))
		x.ex.bytes += int64(len(p))
	}
	if x.left == 0 {
		l.complete(x) // flushes what the buffer holds, once settled
		return
	}
	if err := l.bw.Flush(); err != nil {
		l.clientFailed(x)
		return
	}
	if len(x.c.out) > 0 {
		// The client's socket is full: read no more from the instance
		// until it drains, so the kernel's buffers, not meshd's, hold
		// the answer.
		l.upIn(x.up, false)
	}
}

// complete ends a request whose answer came whole. The end of the answer
// may still wait in l.bw, which must be c's: it goes out once the request
// is settled and recorded, as on the goroutine path, so that whoever has
// the answer also finds it in the metrics.
func (l *loop) complete(x *etry) {
	c := x.c
	w := &c.w
	l.finishTry(x, x.o)
	if u := x.up; u != nil {
		x.up, u.x = nil, nil
		l.release(u, x)
	}
	l.endRequest(x)
	ferr := w.finish()
	if ferr != nil || c.dead {
		c.out = c.out[:0]
		l.closeClient(c)
		return
	}
	c.lastUsed = l.now
	if w.closeAfter || c.f.closing.Load() {
		c.closeNow = true
	}
	if len(c.out) > 0 {
		return // flushClient goes on
	}
	if c.closeNow {
		l.closeAnswered(c)
		return
	}
	if c.eof && len(c.in) == 0 {
		// (A client that has closed its side is still answered the
		// requests it sent before.)
		l.closeClient(c)
		return
	}
	l.serveNext(c)
}

// release pools u again, or closes it.
func (l *loop) release(u *upconn, x *etry) {
	if !x.reuse || u.hup || len(u.in) > 0 || u.inOff && !l.reenable(u) {
		l.closeUp(u)
		return
	}
	max := x.ex.u.settings.Load().cfg.MaxIdlePerInstance
	if max <= 0 {
		max = 64
	}
	if len(l.idle[u.addr]) >= max {
		l.closeUp(u)
		return
	}
	u.idleSince = l.now
	l.idle[u.addr] = append(l.idle[u.addr], u)
}

func (l *loop) reenable(u *upconn) bool {
	l.upIn(u, true)
	return true
}

// finishTry settles the try as forward's endTry does.
func (l *loop) finishTry(x *etry, o resilience.Outcome) {
	l.untrack(x)
	x.ex.endTry(x.ot.ep, x.ot.tk, o, x.ot.aspan, x.status, x.ot.t0, nil)
}

// endRequest records the request and frees its client for the next. x
// is reused: the caller must not touch it after.
func (l *loop) endRequest(x *etry) {
	x.ex.record(x.span)
	x.c.x = nil
	if h := x.out.Header; h != nil && len(l.hdrs) < 256 {
		clear(h)
		l.hdrs = append(l.hdrs, h)
	}
	l.putTry(x)
}

// putTry clears x and keeps it for newTry. Nothing may use x after.
func (l *loop) putTry(x *etry) {
	if len(l.free) < 256 {
		*x = etry{}
		l.free = append(l.free, x)
	}
}

// header returns an empty header map for a request to an instance, reused
// when one is free.
func (l *loop) header() http.Header {
	if n := len(l.hdrs); n > 0 {
		h := l.hdrs[n-1]
		l.hdrs[n-1] = nil
		l.hdrs = l.hdrs[:n-1]
		return h
	}
	return make(http.Header, 8)
}

// newTry returns a cleared etry, reused when one is free. (One handed
// over is the goroutine path's and never comes back.)
func (l *loop) newTry() *etry {
	if n := len(l.free); n > 0 {
		x := l.free[n-1]
		l.free[n-1] = nil
		l.free = l.free[:n-1]
		return x
	}
	return new(etry)
}

// clientFailed ends a request whose client can no longer be written to.
func (l *loop) clientFailed(x *etry) {
	o := x.g.Classify(context.Background(), context.Canceled, x.status)
	l.finishTry(x, o)
	if u := x.up; u != nil {
		x.up, u.x = nil, nil
		l.closeUp(u)
	}
	c := x.c
	l.endRequest(x)
	l.closeClient(c)
}

// stalled cuts off a client that has stopped reading its answer: what
// waits for it is dropped, and a request still answering ends as one whose
// caller left, its instance connection closed.
func (l *loop) stalled(c *econn, waited time.Duration) {
	l.e.s.log.Warn("client stopped reading its answer: connection closed", "client", c.remote, "listener", c.f.l.key, "waited", waited.Round(time.Millisecond), "unsent_bytes", len(c.out))
	c.dead = true
	c.out = c.out[:0]
	// Reset, not closed: the kernel would go on offering the unsent bytes
	// to a client that does not read, for minutes.
	unix.SetsockoptLinger(c.fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	if x := c.x; x != nil {
		l.clientFailed(x)
	} else {
		l.closeClient(c)
	}
}

// upFailed ends a request whose answer broke off after its head went out:
// the client's connection is closed, so it sees a cut answer, not a short one.
func (l *loop) upFailed(x *etry, rerr error) {
	l.e.s.log.Warn("upstream response broke off", "instance", x.ot.ep.ID, "err", rerr)
	o := x.g.Classify(context.Background(), rerr, x.status)
	x.ex.errType, x.ex.errMsg = o.Kind(), "response broke off: "+rerr.Error()
	l.finishTry(x, o)
	if u := x.up; u != nil {
		x.up, u.x = nil, nil
		l.closeUp(u)
	}
	c := x.c
	l.endRequest(x)
	c.dead = true
	c.out = c.out[:0]
	l.closeClient(c)
}

// settleGone settles a request whose connection the loop drops.
func (l *loop) settleGone(x *etry) {
	o := x.g.Classify(canceledCtx, context.Canceled, 0)
	l.finishTry(x, o)
	if u := x.up; u != nil {
		x.up, u.x = nil, nil
		l.closeUp(u)
	}
	x.ex.status, x.ex.errType = 499, telemetry.ErrTypeCanceled
	l.endRequest(x)
}

// handOver gives x, and its client connection, to the goroutine path,
// which takes the try where it stands.
func (l *loop) handOver(x *etry) {
	l.untrack(x)
	if x.lines {
		fullHeader(x)
	}
	if u := x.up; u != nil {
		x.up, u.x = nil, nil
		if x.ot.sent {
			l.unregister(u.fd)
			nc, err := fdConn(u.fd)
			if err != nil {
				// meshd's own trouble (out of descriptors, say), not
				// the instance's: the request, a GET or HEAD, is sent
				// again.
				l.e.s.log.Warn("event loop: cannot hand an instance connection over; the request is sent again", "err", err)
				x.ot.sent = false
			} else {
				x.ot.nc, x.ot.buffered, x.ot.reused = nc, bytes.Clone(u.in), u.reused
			}
		} else {
			l.closeUp(u)
		}
	}
	if x.ot.err != nil {
		x.ot.sent = false
	} else if x.ot.nc == nil {
		x.ot.sent = false
	}
	c := x.c
	c.x = nil
	st := &started{u: x.ex.u, start: x.ex.start, dedicated: x.dedicated, span: x.span, ctx: x.ex.ctx, try: &x.ot}
	l.delegate(c, x.req, st, c.in)
}
