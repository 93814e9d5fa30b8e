package meter

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

func init() {
	ledgerCases = append(ledgerCases, holdCases...)
}

func (e *env) hold(org string, amount int64, ttl time.Duration, ref string) (Hold, Account, bool, error) {
	e.t.Helper()
	return e.ledger.CreateHold(e.ctx, HoldRequest{Org: org, Feature: "flows", Amount: amount, TTL: ttl, Reference: ref})
}

func (e *env) sync(s LeaseSync) LeaseState {
	e.t.Helper()
	st, err := e.ledger.SyncLease(e.ctx, s)
	if err != nil {
		e.t.Fatal(err)
	}
	return st
}

var holdCases = []ledgerCase{
	{name: "a hold sets credits aside until captured", cfg: plan10, run: func(e *env) {
		e.topUp("acme", 5, "inv-1")
		h, a, repeat, err := e.hold("acme", 12, time.Hour, "job-1")
		if err != nil || repeat || h.State != HoldLive || h.Amount != 12 || h.ID != HoldID("job-1") {
			e.t.Fatalf("hold: %+v %v %v", h, repeat, err)
		}
		if a.Balance != 15 || a.Held != 12 || a.Available != 3 || a.AllowanceRemaining != 10 || a.Purchased != 5 {
			e.t.Fatalf("account after the hold: %+v", a)
		}
		if r := e.charge("acme", 4); r.Charged {
			e.t.Fatalf("a charge spent held credits: %+v", r)
		}
		// The same reference answers the same hold and holds nothing more.
		if h2, a2, repeat, err := e.hold("acme", 12, time.Hour, "job-1"); err != nil || !repeat || h2.ID != h.ID || a2.Held != 12 {
			e.t.Fatalf("repeated hold: %+v %+v %v %v", h2, a2, repeat, err)
		}
		if _, _, _, err := e.hold("acme", 4, time.Hour, ""); !errors.Is(err, ErrInsufficient) {
			e.t.Fatalf("a hold past the available balance: %v", err)
		}
		// Capture 7 of 12: 7 charged (allowance first), 5 back.
		h, a, repeat, err = e.ledger.CaptureHold(e.ctx, "acme", h.ID, 7)
		if err != nil || repeat || h.State != HoldCaptured || h.Captured != 7 {
			e.t.Fatalf("capture: %+v %v %v", h, repeat, err)
		}
		e.wantBalance(a, 8, 3, 5)
		if a.Held != 0 || a.Used["flows"] != 7 {
			e.t.Fatalf("account after the capture: %+v", a)
		}
		// A repeated capture charges nothing more.
		if h, a, repeat, err = e.ledger.CaptureHold(e.ctx, "acme", h.ID, 9); err != nil || !repeat || h.Captured != 7 || a.Balance != 8 {
			e.t.Fatalf("repeated capture: %+v %+v %v %v", h, a, repeat, err)
		}
		if _, _, _, err := e.ledger.ReleaseHold(e.ctx, "acme", h.ID); !errors.Is(err, ErrHoldEnded) {
			e.t.Fatalf("release of a captured hold: %v", err)
		}
		if _, _, _, err := e.ledger.CaptureHold(e.ctx, "acme", "nope", 1); !errors.Is(err, ErrHoldNotFound) {
			e.t.Fatalf("capture of no hold: %v", err)
		}
		e.checkEvents("acme")
	}},
	{name: "a released or expired hold gives its credits back where they came from", cfg: plan10, run: func(e *env) {
		e.topUp("acme", 5, "inv-1")
		h, _, _, err := e.hold("acme", 14, time.Hour, "")
		if err != nil {
			e.t.Fatal(err)
		}
		_, a, repeat, err := e.ledger.ReleaseHold(e.ctx, "acme", h.ID)
		if err != nil || repeat {
			e.t.Fatalf("release: %v %v", repeat, err)
		}
		e.wantBalance(a, 15, 10, 5)
		if _, _, _, err := e.ledger.CaptureHold(e.ctx, "acme", h.ID, 1); !errors.Is(err, ErrHoldEnded) {
			e.t.Fatalf("capture of a released hold: %v", err)
		}
		// An expiry by Redis' clock gives back the same way; a gateway's
		// clock does not expire it.
		h, _, _, err = e.hold("acme", 14, time.Hour, "")
		if err != nil {
			e.t.Fatal(err)
		}
		e.clock.Add(2 * time.Hour)
		if a := e.account("acme"); a.Held != 14 {
			e.t.Fatalf("the gateway's clock ended a hold: %+v", a)
		}
		e.moveServerClock(2 * time.Hour)
		a = e.account("acme")
		e.wantBalance(a, 15, 10, 5)
		if a.Held != 0 {
			e.t.Fatalf("an expired hold still holds: %+v", a)
		}
		// An expired hold's capture is still charged, and says so.
		h, a, _, err = e.ledger.CaptureHold(e.ctx, "acme", h.ID, 3)
		if err != nil || h.Captured != 3 || a.Balance != 12 {
			e.t.Fatalf("capture of an expired hold: %+v %+v %v", h, a, err)
		}
		if ev := e.checkEvents("acme")[0]; ev.Kind != "capture" || ev.Delta != -3 || !strings.HasSuffix(ev.Ref, ":expired") {
			e.t.Fatalf("the capture's event: %+v", ev)
		}
	}},
	{name: "a hold taken before a recharge keeps its credits for that period", cfg: plan10, run: func(e *env) {
		h, _, _, err := e.hold("acme", 6, 24*time.Hour, "")
		if err != nil {
			e.t.Fatal(err)
		}
		e.clock.Set(midnight(2027, time.January, 1))
		a := e.account("acme")
		// 4 unheld credits of 2026 expired; the 6 held stay the hold's.
		if a.Balance != 16 || a.Held != 6 || a.Available != 10 || a.AllowanceRemaining != 10 {
			e.t.Fatalf("account after the recharge: %+v", a)
		}
		// Capturing 2 takes nothing from 2027's allowance; the 4 it
		// releases of 2026's are gone with their period.
		_, a, _, err = e.ledger.CaptureHold(e.ctx, "acme", h.ID, 2)
		if err != nil {
			e.t.Fatal(err)
		}
		e.wantBalance(a, 10, 10, 0)
		// Usage above the hold comes out of the new period.
		h, _, _, err = e.hold("acme", 3, time.Hour, "")
		if err != nil {
			e.t.Fatal(err)
		}
		if _, a, _, err = e.ledger.CaptureHold(e.ctx, "acme", h.ID, 5); err != nil {
			e.t.Fatal(err)
		}
		e.wantBalance(a, 5, 5, 0)
		e.checkEvents("acme")
	}},
	{name: "a leased call refunded after its report gives back to purchased credits", cfg: Config{DefaultPlan: Plan{Allowance: 0}}, run: func(e *env) {
		e.topUp("acme", 1000, "inv-1")
		e.sync(LeaseSync{Org: "acme", ID: "gw", Seq: 1, Want: 50, TTL: time.Minute})
		e.sync(LeaseSync{Org: "acme", ID: "gw", Seq: 2, Want: 50, TTL: time.Minute, Unspent: 40, Spent: map[string]int64{"f": 10}})
		e.sync(LeaseSync{Org: "acme", ID: "gw", Seq: 3, Want: 0, TTL: time.Minute, Spent: map[string]int64{"f": -10}})
		a := e.account("acme")
		e.wantBalance(a, 1000, 0, 1000)
		// A recharge erases nothing: nothing went to the allowance.
		e.clock.Set(midnight(2027, time.January, 1))
		e.wantBalance(e.account("acme"), 1000, 0, 1000)
		e.checkEvents("acme")
	}},
	{name: "a lease spends no credit that a plan change and a recharge took away", cfg: plan10, run: func(e *env) {
		e.setPlan("acme", 10000, 1)
		e.sync(LeaseSync{Org: "acme", ID: "gw", Seq: 1, Want: 200, TTL: time.Minute})
		e.setPlan("acme", 0, 1)
		if _, _, err := e.ledger.Recharge(e.ctx, "acme", ""); err != nil {
			e.t.Fatal(err)
		}
		// The lease spends the 200 it holds; the balance never goes below
		// zero.
		st := e.sync(LeaseSync{Org: "acme", ID: "gw", Seq: 2, Want: 0, TTL: time.Minute, Spent: map[string]int64{"f": 200}})
		if st.Held != 0 || st.Balance != 0 {
			e.t.Fatalf("sync: %+v", st)
		}
		e.wantBalance(e.account("acme"), 0, 0, 0)
		e.checkEvents("acme")
	}},
	{name: "a refused charge or an idle lease of an org with no credits writes nothing", cfg: Config{DefaultPlan: Plan{Allowance: 0}}, run: func(e *env) {
		ls := NewLeaser(e.ledger, LeaseConfig{Size: 50, Keep: 100, Flush: time.Millisecond, Idle: time.Millisecond, TTL: time.Minute}, zap.NewNop())
		defer ls.Close()
		for range leaseAfter + 2 {
			if _, ok, err := ls.Spend("one-off", "f", 1); ok || err != nil {
				e.t.Fatalf("leased an org with no credits: %v", err)
			}
			if r := e.charge("one-off", 1); r.Charged {
				e.t.Fatalf("charged an org with no credits: %+v", r)
			}
		}
		flushes := ls.flushes.Load()
		await(e.t, "three flushes", func() bool { return ls.flushes.Load() >= flushes+3 })
		if keys := e.keys(); len(keys) != 0 {
			e.t.Fatalf("an org with no credits left %v", keys)
		}
	}},
	{name: "a single call is not leased, however often the flush runs", cfg: plan10, run: func(e *env) {
		ls := NewLeaser(e.ledger, LeaseConfig{Size: 5, Keep: 0, Flush: time.Millisecond, Idle: time.Hour, TTL: time.Minute}, zap.NewNop())
		defer ls.Close()
		if _, ok, _ := ls.Spend("acme", "f", 1); ok {
			e.t.Fatal("the first call was leased")
		}
		flushes := ls.flushes.Load()
		await(e.t, "three flushes", func() bool { return ls.flushes.Load() >= flushes+3 })
		if keys := e.keys(); len(keys) != 0 {
			e.t.Fatalf("the flush leased an org after one call: %v", keys)
		}
	}},
	{name: "a key of another type stops a script before it writes", cfg: plan10, run: func(e *env) {
		e.charge("acme", 2)
		// Data an earlier version left: events in a stream.
		for _, events := range []string{e.ledger.Keys().Events("acme"), e.ledger.Keys().Calls("acme")} {
			if err := e.rdb.Del(e.ctx, events).Err(); err != nil {
				e.t.Fatal(err)
			}
			if err := e.rdb.XAdd(e.ctx, &redis.XAddArgs{Stream: events, Values: []string{"k", "v"}}).Err(); err != nil {
				e.t.Fatal(err)
			}
		}
		before := e.dump()
		calls := map[string]func() error{
			"charge": func() error {
				_, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "f", Cost: 1})
				return err
			},
			"top-up": func() error { _, _, err := e.ledger.TopUp(e.ctx, "acme", 5, ""); return err },
			"plan": func() error {
				_, _, err := e.ledger.SetPlan(e.ctx, "acme", Plan{Allowance: 5, RechargeMonth: 2}, "")
				return err
			},
			"hold": func() error { _, _, _, err := e.hold("acme", 1, time.Hour, ""); return err },
			"lease": func() error {
				_, err := e.ledger.SyncLease(e.ctx, LeaseSync{Org: "acme", ID: "gw", Seq: 1, Want: 5, TTL: time.Minute})
				return err
			},
		}
		for name, call := range calls {
			// A call's script names the call log; the others the events.
			events := e.ledger.Keys().Events("acme")
			if name == "charge" || name == "lease" {
				events = e.ledger.Keys().Calls("acme")
			}
			if err := call(); !errors.Is(err, ErrWrongType) || !strings.Contains(err.Error(), events) {
				e.t.Fatalf("%s: %v, want an error naming %s", name, err, events)
			}
		}
		if after := e.dump(); !equalDump(before, after) {
			e.t.Fatalf("a script wrote before it failed:\nbefore %v\nafter  %v", before, after)
		}
	}},
	{name: "top-up references are kept 400 days, and an earlier set is moved", cfg: plan10, run: func(e *env) {
		refs := e.ledger.Keys().TopUps("acme")
		// The earlier layout: a set, kept forever.
		e.topUp("acme", 1, "old-1")
		if err := e.rdb.Del(e.ctx, refs).Err(); err != nil {
			e.t.Fatal(err)
		}
		if err := e.rdb.SAdd(e.ctx, refs, "old-1").Err(); err != nil {
			e.t.Fatal(err)
		}
		if _, applied, err := e.ledger.TopUp(e.ctx, "acme", 1, "old-1"); err != nil || applied {
			e.t.Fatalf("a reference of the earlier set applied again: %v %v", applied, err)
		}
		e.topUp("acme", 1, "new-1")
		if typ := e.rdb.Type(e.ctx, refs).Val(); typ != "zset" {
			e.t.Fatalf("references are a %s", typ)
		}
		if ttl := e.rdb.PTTL(e.ctx, refs).Val(); ttl < 399*24*time.Hour || ttl > 400*24*time.Hour {
			e.t.Fatalf("references expire in %s", ttl)
		}
		if _, applied, err := e.ledger.TopUp(e.ctx, "acme", 1, "old-1"); err != nil || applied {
			e.t.Fatalf("a moved reference applied again: %v %v", applied, err)
		}
		// 401 days on, a reference is forgotten.
		e.moveServerClock(401 * 24 * time.Hour)
		if _, applied, err := e.ledger.TopUp(e.ctx, "acme", 1, "new-1"); err != nil || !applied {
			e.t.Fatalf("a reference 401 days old: %v %v", applied, err)
		}
		if n := e.rdb.ZCard(e.ctx, refs).Val(); n != 1 {
			e.t.Fatalf("%d references kept, want the newest alone", n)
		}
		e.wantBalance(e.account("acme"), 13, 10, 3)
	}},
}

// await polls cond until it holds, failing the test after 20 seconds.
func await(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting: %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestLeaseFlushDoesNotWait: an org whose sync hangs does not hold up
// another org's report.
func TestLeaseFlushDoesNotWait(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	rdb := mustClient(t, ClientOptions{URL: "redis://" + srv.Addr})
	defer rdb.Close()
	gate := &holdCommands{match: "{slow}", release: make(chan struct{})}
	rdb.AddHook(gate)
	e := newEnv(t, rdb, Config{DefaultPlan: Plan{Allowance: 1000}, Timeout: time.Minute})
	ls := NewLeaser(e.ledger, LeaseConfig{Size: 10, Flush: 5 * time.Millisecond, Idle: time.Hour, TTL: time.Minute}, zap.NewNop())
	for _, org := range []string{"busy", "slow"} {
		for range leaseAfter + 1 {
			if _, _, err := ls.Spend(org, "f", 1); err != nil {
				t.Fatal(err)
			}
		}
	}
	// From here on, every command for slow hangs until released.
	gate.on()
	ls.Spend("slow", "f", 1)
	for range 3 {
		if _, ok, err := ls.Spend("busy", "f", 1); !ok || err != nil {
			t.Fatalf("busy was not paid from its lease: %v", err)
		}
	}
	// busy's spending reaches the ledger while slow's sync still hangs.
	await(t, "busy's report", func() bool { return e.account("busy").Used["f"] == 4 })
	if !gate.holding() {
		t.Fatal("slow's sync was not held up: the test proves nothing")
	}
	close(gate.release)
	ls.Close()
	if a := e.account("slow"); a.Used["f"] != 2 || a.Held != 0 {
		t.Fatalf("slow after close: %+v", a)
	}
}

// holdCommands holds up, once on, every command that names match, until
// release is closed.
type holdCommands struct {
	redistest.CommandHook
	match   string
	release chan struct{}
	mu      sync.Mutex
	active  bool
	held    int
}

func (h *holdCommands) on() {
	h.mu.Lock()
	h.active = true
	h.mu.Unlock()
}

func (h *holdCommands) holding() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.held > 0
}

func (h *holdCommands) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.mu.Lock()
		hold := h.active && strings.Contains(strings.Join(cmdStrings(cmd), " "), h.match)
		if hold {
			h.held++
		}
		h.mu.Unlock()
		if hold {
			<-h.release
		}
		return next(ctx, cmd)
	}
}

func cmdStrings(cmd redis.Cmder) []string {
	out := make([]string, 0, len(cmd.Args()))
	for _, a := range cmd.Args() {
		if s, ok := a.(string); ok {
			out = append(out, s)
		}
	}
	return out
}
