package resilience

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"syscall"
	"testing"
	"time"
)

func get(t *testing.T, ctx context.Context, tr http.RoundTripper, addr string) (*http.Response, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/", nil)
	if err != nil {
		t.Fatalf("new request: %v", err)
	}
	return tr.RoundTrip(req)
}

type wantOutcome struct {
	kind    string
	failure bool
	reached bool
}

func checkOutcome(t *testing.T, o Outcome, want wantOutcome) {
	t.Helper()
	if have := o.Kind(); have != want.kind {
		t.Errorf("kind: want %q, have %q (err %v)", want.kind, have, o.Err)
	}
	if have := o.Failure(); have != want.failure {
		t.Errorf("failure: want %v, have %v (err %v)", want.failure, have, o.Err)
	}
	if have := o.ReachedUpstream(); have != want.reached {
		t.Errorf("reached upstream: want %v, have %v (err %v)", want.reached, have, o.Err)
	}
}

func TestClassifyConnectRefused(t *testing.T) {
	fc := Defaults().Failure
	resp, err := get(t, context.Background(), plainTransport(t), closedAddr(t))
	if err == nil {
		resp.Body.Close()
		t.Fatal("want a dial error from a closed port, have a response")
	}
	o := Classify(context.Background(), err, 0, fc)
	checkOutcome(t, o, wantOutcome{kind: KindConnect, failure: true, reached: false})
}

func TestClassifyResetDuringHeaders(t *testing.T) {
	addr := rawServer(t, func(c *net.TCPConn) {
		// Complete header lines, but not the blank line ending them.
		resetAfter(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
	})
	resp, err := get(t, context.Background(), plainTransport(t), addr)
	if err == nil {
		resp.Body.Close()
		t.Fatal("want an error from a connection reset in the headers, have a response")
	}
	t.Logf("error: %v", err)
	o := Classify(context.Background(), err, 0, Defaults().Failure)
	checkOutcome(t, o, wantOutcome{kind: KindReset, failure: true, reached: true})
}

func TestClassifyResetDuringBody(t *testing.T) {
	addr := rawServer(t, func(c *net.TCPConn) {
		resetAfter(c, "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial body")
	})
	resp, err := get(t, context.Background(), plainTransport(t), addr)
	if err != nil {
		// The reset may overtake the headers; that is a reset too.
		checkOutcome(t, Classify(context.Background(), err, 0, Defaults().Failure),
			wantOutcome{kind: KindReset, failure: true, reached: true})
		return
	}
	_, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil {
		t.Fatal("want an error reading a body cut short by a reset, have none")
	}
	t.Logf("body error: %v", err)
	o := Classify(context.Background(), err, resp.StatusCode, Defaults().Failure)
	checkOutcome(t, o, wantOutcome{kind: KindReset, failure: true, reached: true})
	if o.Status != http.StatusOK {
		t.Errorf("status: want 200, have %d", o.Status)
	}
}

// hangServer accepts requests and never answers until the test ends; every
// request that arrives is announced on the returned channel.
func hangServer(t *testing.T) (addr string, arrived <-chan struct{}) {
	t.Helper()
	ch := make(chan struct{}, 16)
	stop := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ch <- struct{}{}
		select {
		case <-r.Context().Done():
		case <-stop:
		}
	}))
	t.Cleanup(func() {
		close(stop)
		srv.Close()
	})
	return srv.Listener.Addr().String(), ch
}

func TestClassifyTryDeadline(t *testing.T) {
	addr, _ := hangServer(t)
	caller := context.Background()
	try, cancel := context.WithTimeout(caller, 50*time.Millisecond)
	defer cancel()
	resp, err := get(t, try, plainTransport(t), addr)
	if err == nil {
		resp.Body.Close()
		t.Fatal("want a deadline error from a hanging server, have a response")
	}
	checkOutcome(t, Classify(caller, err, 0, Defaults().Failure), wantOutcome{kind: KindTimeout, failure: true, reached: true})
	// The try's own context (expired, not canceled) gives the same answer.
	checkOutcome(t, Classify(try, err, 0, Defaults().Failure), wantOutcome{kind: KindTimeout, failure: true, reached: true})
}

func TestClassifyResponseHeaderTimeout(t *testing.T) {
	addr, _ := hangServer(t)
	tr := plainTransport(t)
	tr.ResponseHeaderTimeout = 50 * time.Millisecond
	resp, err := get(t, context.Background(), tr, addr)
	if err == nil {
		resp.Body.Close()
		t.Fatal("want a response header timeout from a hanging server, have a response")
	}
	checkOutcome(t, Classify(context.Background(), err, 0, Defaults().Failure), wantOutcome{kind: KindTimeout, failure: true, reached: true})
}

func TestClassifyCallerCancel(t *testing.T) {
	addr, arrived := hangServer(t)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-arrived
		cancel()
	}()
	resp, err := get(t, ctx, plainTransport(t), addr)
	if err == nil {
		resp.Body.Close()
		t.Fatal("want an error from a canceled request, have a response")
	}
	o := Classify(ctx, err, 0, Defaults().Failure)
	checkOutcome(t, o, wantOutcome{kind: KindCanceled, failure: false, reached: true})
	if !o.Canceled() {
		t.Error("Canceled: want true, have false")
	}
	g := newTestGuard(t, Defaults())
	if retry, cause := g.RetryDecision(http.MethodGet, 1, o, true); retry || cause != NoRetryCanceled {
		t.Errorf("retry decision: want (false, %q), have (%v, %q)", NoRetryCanceled, retry, cause)
	}
}

func TestClassifyStatuses(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var code int
		fmt.Sscan(r.URL.Query().Get("code"), &code)
		w.WriteHeader(code)
	}))
	defer srv.Close()
	tr := plainTransport(t)
	status := func(code int) int {
		req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("%s/?code=%d", srv.URL, code), nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatalf("round trip: %v", err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	with429 := Defaults().Failure
	with429.Statuses = append(with429.Statuses, 429)
	for _, tc := range []struct {
		code    int
		fc      FailureConfig
		failure bool
	}{
		{200, Defaults().Failure, false},
		{404, Defaults().Failure, false},
		{500, Defaults().Failure, false},
		{503, Defaults().Failure, true},
		{502, Defaults().Failure, true},
		{429, Defaults().Failure, false},
		{429, with429, true},
		{503, FailureConfig{}, false},
	} {
		have := status(tc.code)
		if have != tc.code {
			t.Fatalf("server status: want %d, have %d", tc.code, have)
		}
		o := Classify(context.Background(), nil, have, tc.fc)
		if o.Failure() != tc.failure || o.Kind() != KindNone || !o.ReachedUpstream() || o.Status != tc.code {
			t.Errorf("status %d with %v: want failure=%v kind=none reached, have failure=%v kind=%s reached=%v status=%d",
				tc.code, tc.fc.Statuses, tc.failure, o.Failure(), o.Kind(), o.ReachedUpstream(), o.Status)
		}
	}
}

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

// Errors that a loopback test cannot provoke reliably, built as the net
// package builds them.
func TestClassifySyntheticErrors(t *testing.T) {
	bg := context.Background()
	cases := []struct {
		name string
		err  error
		want wantOutcome
	}{
		{"dial timeout", &net.OpError{Op: "dial", Net: "tcp", Err: timeoutErr{}}, wantOutcome{KindConnect, true, false}},
		{"dns", &net.OpError{Op: "dial", Net: "tcp", Err: &net.DNSError{Err: "no such host", Name: "x.invalid", IsNotFound: true}}, wantOutcome{KindConnect, true, false}},
		{"read timeout", &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}, wantOutcome{KindTimeout, true, true}},
		{"unexpected eof", fmt.Errorf("wrapped: %w", io.ErrUnexpectedEOF), wantOutcome{KindReset, true, true}},
		{"idle close", errors.New("http: server closed idle connection"), wantOutcome{KindReset, true, true}},
		{"malformed", fmt.Errorf("net/http: HTTP/1.x transport connection broken: %w", errors.New(`malformed HTTP status code "abc"`)), wantOutcome{KindOther, true, true}},
		{"broken by reset", fmt.Errorf("net/http: HTTP/1.x transport connection broken: %w", &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}), wantOutcome{KindReset, true, true}},
		{"canceled error with live caller", fmt.Errorf("try: %w", context.Canceled), wantOutcome{KindCanceled, false, true}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			checkOutcome(t, Classify(bg, tc.err, 0, Defaults().Failure), tc.want)
		})
	}
	var zero Outcome
	if zero.Kind() != KindNone || zero.Failure() || zero.ReachedUpstream() {
		t.Errorf("zero outcome: want none/not failure/not reached, have %s/%v/%v", zero.Kind(), zero.Failure(), zero.ReachedUpstream())
	}
}
