package static

import (
	"context"
	"testing"
	"time"

	"github.com/meshd/meshd/discovery"
)

func take(t *testing.T, box *discovery.Mailbox) *discovery.Update {
	t.Helper()
	select {
	case <-box.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("no update within 5s")
	}
	u, _, _ := box.Take()
	if u == nil {
		t.Fatal("signalled without an update")
	}
	return u
}

func TestWatchDeliversAndFollowsReplace(t *testing.T) {
	c := New(map[string][]discovery.Instance{"a": {{ID: "1", Address: "127.0.0.1:1"}}})
	ctx, cancel := context.WithCancel(context.Background())
	box := discovery.NewMailbox()
	done := make(chan error, 1)
	go func() { done <- c.Watch(ctx, "a", box) }()
	u := take(t, box)
	if len(u.Instances) != 1 || u.Instances[0].Address != "127.0.0.1:1" {
		t.Fatalf("first update: have %+v", u.Instances)
	}
	// Unrelated change: no signal for "a".
	c.Replace(map[string][]discovery.Instance{"a": {{ID: "1", Address: "127.0.0.1:1"}}, "b": {{ID: "x", Address: "127.0.0.1:9"}}})
	select {
	case <-box.Ready():
		t.Fatal("watcher of a signalled for a change to b only")
	default:
	}
	c.Replace(map[string][]discovery.Instance{"a": {{ID: "1", Address: "127.0.0.1:1"}, {ID: "2", Address: "127.0.0.1:2"}}})
	if u := take(t, box); len(u.Instances) != 2 {
		t.Fatalf("after replace: want 2 instances, have %d", len(u.Instances))
	}
	c.Replace(map[string][]discovery.Instance{})
	if u := take(t, box); len(u.Instances) != 0 || u.Reason == "" {
		t.Fatalf("after removal: want empty set with a reason, have %+v", u)
	}
	cancel()
	if err := <-done; err != context.Canceled {
		t.Fatalf("Watch returned %v, want context.Canceled", err)
	}
}

func TestWatchUnknownService(t *testing.T) {
	c := New(nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	box := discovery.NewMailbox()
	go c.Watch(ctx, "nope", box)
	u := take(t, box)
	if len(u.Instances) != 0 || u.Reason != "not in the static catalog" {
		t.Fatalf("have %+v", u)
	}
	if c.Has("nope") {
		t.Fatal("Has(nope) = true")
	}
}
