package discovery

import (
	"errors"
	"testing"
)

func TestMailboxCoalescesBursts(t *testing.T) {
	m := NewMailbox()
	for i := 1; i <= 100; i++ {
		m.Put(Update{Index: uint64(i), Instances: make([]Instance, i)})
	}
	select {
	case <-m.Ready():
	default:
		t.Fatal("no signal after Put")
	}
	select {
	case <-m.Ready():
		t.Fatal("100 Puts signalled more than once before a Take")
	default:
	}
	u, st, changed := m.Take()
	if u == nil || u.Index != 100 || len(u.Instances) != 100 || !changed || !st.Answered || st.Err != nil {
		t.Fatalf("want the newest set (index 100), have %+v %+v %v", u, st, changed)
	}
	if u, _, changed := m.Take(); u != nil || changed {
		t.Fatalf("second Take: want nothing, have %+v %v", u, changed)
	}
}

func TestMailboxFailKeepsThePendingSet(t *testing.T) {
	m := NewMailbox()
	m.Put(Update{Index: 7, Instances: []Instance{{ID: "a"}}})
	boom := errors.New("boom")
	m.Fail(boom)
	m.Fail(errors.New("again"))
	u, st, _ := m.Take()
	if u == nil || u.Index != 7 {
		t.Fatalf("a failure after a Put lost the set: %+v", u)
	}
	if st.Err == nil || st.Err.Error() != "again" || st.Since.IsZero() {
		t.Fatalf("status: want the last error with its start time, have %+v", st)
	}
	first := st.Since
	m.Fail(errors.New("third"))
	_, st, _ = m.Take()
	if !st.Since.Equal(first) {
		t.Fatal("Since moved during one run of failures")
	}
	m.Put(Update{Index: 8})
	if _, st, _ = m.Take(); st.Err != nil {
		t.Fatalf("a Put must clear the error, have %v", st.Err)
	}
}
