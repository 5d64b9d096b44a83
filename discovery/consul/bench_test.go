package consul

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshd/meshd/discovery"
	"github.com/meshd/meshd/internal/testenv"
)

// sink is a minimal consumer: it keeps the newest update of one watch.
type sink struct {
	cur    atomic.Pointer[discovery.Update]
	notify chan struct{}
}

func newSink(ctx context.Context, box *discovery.Mailbox, wg *sync.WaitGroup) *sink {
	s := &sink{notify: make(chan struct{}, 1)}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-ctx.Done():
				return
			case <-box.Ready():
			}
			if u, _, _ := box.Take(); u != nil {
				s.cur.Store(u)
				select {
				case s.notify <- struct{}{}:
				default:
				}
			}
		}
	}()
	return s
}

// waitFor blocks until the newest update satisfies cond or timeout passes.
func (s *sink) waitFor(timeout time.Duration, cond func(*discovery.Update) bool) bool {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		if u := s.cur.Load(); u != nil && cond(u) {
			return true
		}
		select {
		case <-s.notify:
		case <-timer.C:
			return false
		}
	}
}

// BenchmarkWatch200x50 watches 200 services of 50 instances each at once.
// Setup (bulk registration, first sets) is reported separately; the idle
// window reports this process's resident memory and CPU while nothing
// changes; each iteration is one catalog write until the new set is in the
// watching Mailbox.
func BenchmarkWatch200x50(b *testing.B) {
	const services, perService = 200, 50
	isolateEnv(b)
	c := testenv.StartConsul(b)
	cl := c.Client(b)

	svcName := func(s int) string { return fmt.Sprintf("svc-%03d", s) }
	nodeName := func(n int) string { return fmt.Sprintf("bench-node-%02d", n) }
	instance := func(s, n int, gen string) api.AgentService {
		return api.AgentService{
			ID: fmt.Sprintf("%s-%02d", svcName(s), n), Service: svcName(s),
			Port: 20000 + n, Tags: []string{"bench"}, Meta: map[string]string{"gen": gen},
		}
	}

	setupStart := time.Now()
	var ops api.TxnOps
	flush := func() {
		if len(ops) == 0 {
			return
		}
		ok, resp, _, err := cl.Txn().Txn(ops, nil)
		if err != nil || !ok {
			b.Fatalf("bulk register: ok=%v err=%v resp=%+v", ok, err, resp)
		}
		ops = ops[:0]
	}
	for n := range perService {
		ops = append(ops, &api.TxnOp{Node: &api.NodeTxnOp{Verb: api.NodeSet,
			Node: api.Node{Node: nodeName(n), Address: fmt.Sprintf("127.0.%d.%d", n/200, 1+n%200)}}})
		for s := range services {
			ops = append(ops, &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceSet, Node: nodeName(n),
				Service: instance(s, n, "0")}})
			if len(ops) >= 64 {
				flush()
			}
		}
	}
	flush()
	registered := time.Since(setupStart)

	src, err := New(Config{Address: c.Addr(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	watchStart := time.Now()
	sinks := make([]*sink, services)
	for s := range services {
		box := discovery.NewMailbox()
		sinks[s] = newSink(ctx, box, &wg)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := src.WatchService(ctx, svcName(s), WatchOptions{}, box); err != nil {
				b.Errorf("watch %s: %v", svcName(s), err)
			}
		}()
	}
	for s, sk := range sinks {
		if !sk.waitFor(60*time.Second, func(u *discovery.Update) bool { return len(u.Instances) == perService }) {
			b.Fatalf("%s: want %d instances within 60s, have none or fewer", svcName(s), perService)
		}
	}
	firstSets := time.Since(watchStart)

	// Idle: nothing changes in Consul for a few seconds.
	const idle = 3 * time.Second
	runtime.GC()
	rss0, cpu0 := vmRSS(b, "self"), cpuTime(b)
	idleTimer := time.NewTimer(idle)
	<-idleTimer.C // a measurement window, not synchronisation
	rss1, cpu1 := vmRSS(b, "self"), cpuTime(b)
	agentRSS := vmRSS(b, strconv.Itoa(c.Pid()))

	var lat []time.Duration
	i := 0
	for b.Loop() {
		s, n := i%services, i%perService
		i++
		gen := strconv.Itoa(i)
		start := time.Now()
		inst := instance(s, n, gen)
		if _, err := cl.Catalog().Register(&api.CatalogRegistration{Node: nodeName(n), SkipNodeUpdate: true, Service: &inst}, nil); err != nil {
			b.Fatal(err)
		}
		if !sinks[s].waitFor(10*time.Second, func(u *discovery.Update) bool {
			for _, in := range u.Instances {
				if in.ID == nodeName(n)+"/"+inst.ID {
					return in.Meta["gen"] == gen
				}
			}
			return false
		}) {
			b.Fatalf("%s: change %s did not arrive within 10s", svcName(s), gen)
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	pct := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }

	b.ReportMetric(registered.Seconds(), "register-10k-s")
	b.ReportMetric(firstSets.Seconds(), "first-sets-s")
	b.ReportMetric(float64(rss1)/1024, "idle-rss-MiB")
	b.ReportMetric(float64(agentRSS)/1024, "agent-rss-MiB")
	b.ReportMetric(float64((cpu1-cpu0).Microseconds())/1000/idle.Seconds(), "idle-cpu-ms/s")
	b.ReportMetric(pct(0.5), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.Logf("setup: %d instances registered in %v, %d first sets in %v; idle %v: RSS %d→%d KiB, CPU %v; agent RSS %d KiB; %d changes p50 %.2fms p99 %.2fms",
		services*perService, registered.Round(time.Millisecond), services, firstSets.Round(time.Millisecond),
		idle, rss0, rss1, cpu1-cpu0, agentRSS, len(lat), pct(0.5), pct(0.99))
}

// vmRSS reads VmRSS in KiB from /proc/<pid>/status.
func vmRSS(b *testing.B, pid string) int64 {
	b.Helper()
	f, err := os.Open("/proc/" + pid + "/status")
	if err != nil {
		b.Skipf("no /proc: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				b.Fatalf("VmRSS %q: %v", rest, err)
			}
			return kb
		}
	}
	b.Fatalf("no VmRSS in /proc/%s/status", pid)
	return 0
}

// cpuTime is this process's user plus system CPU time so far.
func cpuTime(b *testing.B) time.Duration {
	b.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
