package meter

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// fakeCall is a deferred call whose outcome the test chooses: fail gives
// the error of each try (nil applies it); block, when set, holds each try
// until it is closed.
type fakeCall struct {
	o, id   string
	fail    func(try int) error
	block   chan struct{}
	tries   atomic.Int64
	applied *appliedLog
}

// appliedLog records the calls applied, in order.
type appliedLog struct {
	mu  sync.Mutex
	ids []string
}

func (l *appliedLog) add(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ids = append(l.ids, id)
}

func (l *appliedLog) list() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.ids)
}

func (c *fakeCall) apply(context.Context) error {
	try := int(c.tries.Add(1))
	if c.block != nil {
		<-c.block
	}
	if c.fail != nil {
		if err := c.fail(try); err != nil {
			return err
		}
	}
	c.applied.add(c.id)
	return nil
}

func (c *fakeCall) what() []zap.Field {
	return []zap.Field{zap.String("call", "fake"), zap.String("org", c.o), zap.String("request_id", c.id)}
}

func (c *fakeCall) org() string { return c.o }

// TestOutboxIsolatesOrgs fills the backlog with, first, the calls of an org
// the store cannot serve now (a dial refused, forever), of a corrupt org
// (no retry cures it), and of an org whose store hangs, then other orgs'
// calls: the corrupt org's calls leave at once, logged at error level with
// their org and request id, and counted; the other orgs' calls are applied
// without waiting for any of them, each org's in order, including an org
// whose first call fails twice before it goes; at close, the calls of the
// org that never recovered are what is lost.
func TestOutboxIsolatesOrgs(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	var dropped, failed atomic.Int64
	o := NewOutbox(100, zap.New(core), nil, func(d bool) {
		if d {
			dropped.Add(1)
		} else {
			failed.Add(1)
		}
	})
	applied := &appliedLog{}
	down := func(int) error { return &net.OpError{Op: "dial", Net: "tcp", Err: fmt.Errorf("connection refused")} }
	corrupt := func(int) error {
		return classify(fmt.Errorf("charge: %w", scriptError("ERR user_script:199: account field rem is not a number")))
	}
	wrongTyped := func(int) error {
		return classify(wrongType([]string{"a", "m", "c"}, []any{int64(codeWrongType), int64(3), "string"}))
	}
	flaky := func(try int) error {
		if try <= 2 {
			return classify(scriptError("OOM command not allowed when used memory > 'maxmemory'."))
		}
		return nil
	}
	hang := make(chan struct{})
	calls := []*fakeCall{
		{o: "stuck", id: "stuck-1", fail: down},
		{o: "bad", id: "bad-1", fail: corrupt},
		{o: "hung", id: "hung-1", block: hang},
		{o: "bad", id: "bad-2", fail: wrongTyped},
		{o: "stuck", id: "stuck-2"},
		{o: "good", id: "good-1"},
		{o: "flaky", id: "flaky-1", fail: flaky},
		{o: "good", id: "good-2"},
		{o: "flaky", id: "flaky-2"},
		{o: "bad", id: "bad-3", fail: corrupt},
		{o: "good", id: "good-3"},
		{o: "flaky", id: "flaky-3"},
	}
	for _, c := range calls {
		c.applied = applied
		if !o.Add(c) {
			t.Fatalf("%s refused", c.id)
		}
	}
	await(t, "the good and flaky orgs' calls are applied, and the corrupt one's dropped", func() bool {
		return len(applied.list()) == 6 && dropped.Load() == 3
	})
	var good, flakyOrder []string
	for _, id := range applied.list() {
		switch id[:4] {
		case "good":
			good = append(good, id)
		case "flak":
			flakyOrder = append(flakyOrder, id)
		}
	}
	if !slices.Equal(good, []string{"good-1", "good-2", "good-3"}) || !slices.Equal(flakyOrder, []string{"flaky-1", "flaky-2", "flaky-3"}) {
		t.Fatalf("applied %v: each org's calls must go in order", applied.list())
	}
	if n := calls[6].tries.Load(); n != 3 {
		t.Fatalf("flaky-1 tried %d times, want 3", n)
	}
	drops := logs.FilterMessage("dropping a deferred ledger call: no retry can apply it").All()
	if len(drops) != 3 {
		t.Fatalf("%d drops logged, want 3: %v", len(drops), logs.All())
	}
	for i, e := range drops {
		f := e.ContextMap()
		if e.Level != zapcore.ErrorLevel || f["org"] != "bad" || f["request_id"] != fmt.Sprintf("bad-%d", i+1) || f["class"] != "corrupt" {
			t.Fatalf("drop %d logged as %v %v", i, e.Level, f)
		}
	}
	// The stuck org's first call keeps being tried, its second never
	// before it; the hung org's first call is still under way.
	await(t, "stuck-1 is tried again", func() bool { return calls[0].tries.Load() >= 3 })
	if calls[4].tries.Load() != 0 || failed.Load() < 4 {
		t.Fatalf("stuck-2 tried %d times before stuck-1 went; %d failed tries counted", calls[4].tries.Load(), failed.Load())
	}
	if n := o.Waiting(); n != 3 {
		t.Fatalf("%d calls wait, want 3 (stuck-1, stuck-2, hung-1)", n)
	}
	close(hang)
	if lost := o.Close(200 * time.Millisecond); lost != 2 {
		t.Fatalf("%d calls lost at close, want 2 (the stuck org's)", lost)
	}
	if !slices.Contains(applied.list(), "hung-1") {
		t.Fatalf("hung-1 was not applied once its store answered: %v", applied.list())
	}
	if o.Add(&fakeCall{o: "late", id: "late-1", applied: applied}) {
		t.Fatal("a closed outbox took a call")
	}
}
