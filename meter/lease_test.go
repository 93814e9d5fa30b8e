package meter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/creditsgw/caddy-credits/internal/faultproxy"
	"github.com/creditsgw/caddy-credits/internal/redistest"
)

func init() {
	ledgerCases = append(ledgerCases, leaseCases...)
}

var testLease = LeaseConfig{Size: 50, Keep: 100, Flush: 20 * time.Millisecond, Idle: 100 * time.Millisecond, TTL: 10 * time.Second}

// spendAll makes n concurrent cost-1 calls on org from the leasers, falling
// back to a charge of its own when a lease cannot cover a call, as the
// gateway does; it returns how many calls were paid for, and how many of
// them from a lease.
func spendAll(e *env, leasers []*Leaser, org string, n int) (paid, leased int64) {
	return spendAs(e, leasers, org, "", n)
}

var leaseCases = []ledgerCase{
	{name: "a quiet org is not leased", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		ls := NewLeaser(e.ledger, testLease, zap.NewNop())
		defer ls.Close()
		for i := range leaseAfter {
			if _, ok, _ := ls.Spend("quiet", "f", 1); ok {
				e.t.Fatalf("call %d was leased", i+1)
			}
		}
		if keys := e.keys(); len(keys) != 0 {
			e.t.Fatalf("unleased calls wrote %v", keys)
		}
		if _, ok, _ := ls.Spend("quiet", "f", 1); !ok {
			e.t.Fatal("a busy org was not leased")
		}
	}},
	{name: "leases never spend more than the balance", cfg: Config{DefaultPlan: Plan{Allowance: 500}, EventsMax: 5000}, run: func(e *env) {
		a := NewLeaser(e.ledger, testLease, zap.NewNop())
		b := NewLeaser(e.ledger, testLease, zap.NewNop())
		if paid, _ := spendAll(e, []*Leaser{a, b}, "hot", 1000); paid != 500 {
			e.t.Fatalf("%d calls paid for on a balance of 500", paid)
		}
		a.Close()
		b.Close()
		acct := e.account("hot")
		if acct.Balance != 0 || acct.Used["rich-text"] != 500 {
			e.t.Fatalf("account %+v", acct)
		}
		e.checkEvents("hot")
		if n := e.leased("hot"); n != 0 {
			e.t.Fatalf("leases hold %d credits after close", n)
		}
	}},
	{name: "every leased call reaches the ledger once", cfg: Config{DefaultPlan: Plan{Allowance: 1000000}, EventsMax: 100000}, run: func(e *env) {
		// Small blocks and quick flushes: renewals, flushes and spending
		// overlap all the time.
		cfg := LeaseConfig{Size: 5, Keep: 10, Flush: time.Millisecond, Idle: 5 * time.Millisecond, TTL: 10 * time.Second}
		lg := zaptest.NewLogger(e.t, zaptest.Level(zap.WarnLevel))
		leasers := []*Leaser{NewLeaser(e.ledger, cfg, lg), NewLeaser(e.ledger, cfg, lg), NewLeaser(e.ledger, cfg, lg)}
		// Each leaser leases the org before the bursts, so that every
		// burst spends from leases as well as one by one.
		var paid, leased, alone int64
		for _, ls := range leasers {
			for ok := false; !ok; {
				if alone++; alone > 100 {
					e.t.Fatal("a busy org was not leased in 100 calls")
				}
				var err error
				if _, ok, err = ls.Spend("busy", "rich-text", 1); err != nil {
					e.t.Fatal(err)
				}
				if ok {
					leased++
				} else if r := e.charge("busy", 1); !r.Charged {
					e.t.Fatalf("charge: %+v", r)
				}
				paid++
			}
		}
		for range 4 {
			p, l := spendAll(e, leasers, "busy", 1500)
			paid, leased = paid+p, leased+l
		}
		for _, ls := range leasers {
			ls.Close()
		}
		total := 6000 + alone
		if paid != total {
			e.t.Fatalf("%d of %d calls paid for", paid, total)
		}
		acct := e.account("busy")
		if acct.Balance != 1000000-total || acct.Used["rich-text"] != total {
			e.t.Fatalf("account %+v after %d calls", acct, total)
		}
		if n := e.leased("busy"); n != 0 {
			e.t.Fatalf("leases hold %d credits after close", n)
		}
		// The ledger's record splits the calls as the gateway paid them:
		// the leases reported exactly the calls they paid, and the rest
		// were charged one by one.
		var fromLeases, oneByOne int64
		for _, ev := range e.checkEvents("busy") {
			switch {
			case ev.Kind != "charge" && ev.Kind != "refund":
			case strings.HasPrefix(ev.Ref, "lease:"):
				fromLeases -= ev.Delta
			default:
				oneByOne -= ev.Delta
			}
		}
		if fromLeases != leased || oneByOne != paid-leased {
			e.t.Fatalf("the ledger has %d credits from leases and %d charged one by one; the gateway paid %d and %d",
				fromLeases, oneByOne, leased, paid-leased)
		}
	}},
	{name: "orgs that call now and then get no lease, a busy one among them does", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		ls := NewLeaser(e.ledger, testLease, zap.NewNop())
		defer ls.Close()
		// 20,000 orgs called once each, and among them one called every
		// 50th call: the first are charged on their own and leave nothing
		// in the leaser; the busy one is leased at its call after
		// leaseAfter, however many others took slots of the heat table.
		leasedAt := -1
		for i := range 20_000 {
			org := fmt.Sprintf("cold-%d", i)
			if i%50 == 0 {
				org = "busy"
			}
			_, ok, err := ls.Spend(org, "alt-text", 1)
			if err != nil {
				e.t.Fatal(err)
			}
			if ok && org != "busy" {
				e.t.Fatalf("%s, called once, was paid by a lease", org)
			}
			if ok && leasedAt < 0 {
				leasedAt = i / 50
			}
		}
		if leasedAt != leaseAfter {
			e.t.Fatalf("the busy org was first paid by a lease at its call %d, want %d", leasedAt, leaseAfter)
		}
		n := 0
		ls.orgs.Range(func(k, _ any) bool {
			if k != "busy" {
				n++
			}
			return true
		})
		if n != 0 {
			e.t.Fatalf("the leaser keeps %d orgs that called once", n)
		}
	}},
	{name: "an idle lease gives its credits back", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		ls := NewLeaser(e.ledger, testLease, zap.NewNop())
		defer ls.Close()
		var rc Receipt
		var ok bool
		for range leaseAfter + 1 { // an org is leased once it is busy
			if rc, ok, _ = ls.Spend("acme", "alt-text", 3); ok {
				break
			}
		}
		if !ok || rc.Balance != 997 {
			e.t.Fatalf("spend: %d %v", rc.Balance, ok)
		}
		if got := ls.Adjust("acme", "alt-text", rc, 3, 0); got != 1000 {
			e.t.Fatalf("balance after a refund: %d", got)
		}
		ls.Spend("acme", "alt-text", 2)
		deadline := time.Now().Add(10 * time.Second)
		for {
			if e.leased("acme") == 0 && ls.Pending() == 0 {
				break
			}
			if time.Now().After(deadline) {
				e.t.Fatal("the idle lease was not given back")
			}
			time.Sleep(10 * time.Millisecond)
		}
		acct := e.account("acme")
		if acct.Balance != 998 || acct.Used["alt-text"] != 2 {
			e.t.Fatalf("account %+v", acct)
		}
		// The whole balance is free for a charge again.
		r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "f", Cost: 998})
		if err != nil || !r.Charged {
			e.t.Fatalf("charge of the whole balance: %+v %v", r, err)
		}
		e.checkEvents("acme")
	}},
	{name: "a repeated lease sync changes nothing", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		sync := LeaseSync{Org: "acme", ID: "gw1", Seq: 1, Want: 100, Keep: 0, TTL: time.Minute}
		if st, err := e.ledger.SyncLease(e.ctx, sync); err != nil || st.Held != 100 || st.Balance != 1000 {
			e.t.Fatalf("%+v %v", st, err)
		}
		sync.Seq, sync.Spent = 2, map[string]int64{"flows": 40}
		if st, err := e.ledger.SyncLease(e.ctx, sync); err != nil || st.Balance != 960 {
			e.t.Fatalf("%+v %v", st, err)
		}
		before := e.dump()
		st, err := e.ledger.SyncLease(e.ctx, sync)
		if err != nil || !st.Repeat || st.Balance != 960 {
			e.t.Fatalf("repeat: %+v %v", st, err)
		}
		if !equalDump(before, e.dump()) {
			e.t.Fatal("a repeated sync wrote")
		}
		// The lease holds 100: a charge may use only the rest.
		if r := e.charge("acme", 861); r.Charged {
			e.t.Fatalf("a charge spent credits a lease holds: %+v", r)
		}
		if r := e.charge("acme", 860); !r.Charged {
			e.t.Fatalf("charge: %+v", r)
		}
		e.checkEvents("acme")
	}},
	{name: "a repeated sync that gives a lease back changes nothing", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		sync := LeaseSync{Org: "acme", ID: "gw1", Seq: 1, Want: 100, TTL: time.Minute}
		if _, err := e.ledger.SyncLease(e.ctx, sync); err != nil {
			e.t.Fatal(err)
		}
		// The last sync of a lease reports its spending and holds nothing
		// after; its reply is lost and it goes again.
		sync.Seq, sync.Want, sync.Spent = 2, 0, map[string]int64{"flows": 30}
		for i, repeat := range []bool{false, true} {
			st, err := e.ledger.SyncLease(e.ctx, sync)
			if err != nil || st.Repeat != repeat || st.Held != 0 || st.Balance != 970 {
				e.t.Fatalf("sync %d: %+v %v", i+1, st, err)
			}
		}
		if acct := e.account("acme"); acct.Balance != 970 || acct.Used["flows"] != 30 {
			e.t.Fatalf("account %+v", acct)
		}
		// The ended lease's record goes a day after it ended.
		if ttl := e.rdb.PTTL(e.ctx, e.ledger.Keys().Holds("acme")).Val(); ttl <= 0 || ttl > 25*time.Hour {
			e.t.Fatalf("holds key expires in %s", ttl)
		}
		e.checkEvents("acme")
	}},
	{name: "a sync leaves a lease what it may be spending", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		a := LeaseSync{Org: "acme", ID: "a", Seq: 1, Want: 300, TTL: time.Minute}
		if st, err := e.ledger.SyncLease(e.ctx, a); err != nil || st.Held != 300 {
			e.t.Fatalf("%+v %v", st, err)
		}
		b := LeaseSync{Org: "acme", ID: "b", Seq: 1, Want: 700, TTL: time.Minute}
		if st, err := e.ledger.SyncLease(e.ctx, b); err != nil || st.Held != 700 {
			e.t.Fatalf("%+v %v", st, err)
		}
		// a spent 100 and holds 200, which it may spend while its sync is
		// on its way: it must leave 100 free, so only 100 is free for it,
		// yet it keeps the 200.
		a.Seq, a.Keep, a.Unspent, a.Spent = 2, 100, 200, map[string]int64{"f": 100}
		if st, err := e.ledger.SyncLease(e.ctx, a); err != nil || st.Held != 200 || st.Balance != 900 {
			e.t.Fatalf("%+v %v", st, err)
		}
		// It cannot keep more than it held, less what it spent.
		a.Seq, a.Unspent, a.Spent = 3, 500, map[string]int64{"f": 150}
		if st, err := e.ledger.SyncLease(e.ctx, a); err != nil || st.Held != 50 || st.Balance != 750 {
			e.t.Fatalf("%+v %v", st, err)
		}
		if r := e.charge("acme", 1); r.Charged {
			e.t.Fatalf("a charge spent credits the leases hold: %+v", r)
		}
		e.checkEvents("acme")
	}},
	{name: "a lease whose gateway stopped reporting keeps its credits for a day", cfg: Config{DefaultPlan: Plan{Allowance: 100}}, run: func(e *env) {
		if _, err := e.ledger.SyncLease(e.ctx, LeaseSync{Org: "acme", ID: "gone", Seq: 1, Want: 80, TTL: time.Minute}); err != nil {
			e.t.Fatal(err)
		}
		if r := e.charge("acme", 21); r.Charged {
			e.t.Fatalf("charged past a live lease: %+v", r)
		}
		// A gateway's clock far ahead ends no lease: leases expire by
		// Redis' clock.
		e.clock.Add(2 * time.Minute)
		if r := e.charge("acme", 21); r.Charged {
			e.t.Fatalf("a gateway's clock ended a lease: %+v", r)
		}
		// Past its lifetime by Redis' clock, the lease is unreported: its
		// gateway may have spent its credits, so no one else may.
		e.moveServerClock(2 * time.Minute)
		if r := e.charge("acme", 21); r.Charged {
			e.t.Fatalf("an unreported lease's credits were spent again: %+v", r)
		}
		holds, err := e.ledger.Holds(e.ctx, "acme")
		if err != nil || len(holds) != 1 || holds[0].State != HoldUnreported || holds[0].Amount != 80 || holds[0].LastReport == nil {
			e.t.Fatalf("holds: %+v %v", holds, err)
		}
		if _, _, _, err := e.ledger.CaptureHold(e.ctx, "acme", "lease:gone", 5); !errors.Is(err, ErrLease) {
			e.t.Fatalf("capture of a lease: %v", err)
		}
		if _, _, _, err := e.ledger.ReleaseHold(e.ctx, "acme", "lease:gone"); !errors.Is(err, ErrLease) {
			e.t.Fatalf("release of a lease: %v", err)
		}
		// A day after its last report it is released anyway.
		e.moveServerClock(24 * time.Hour)
		if r := e.charge("acme", 100); !r.Charged {
			e.t.Fatalf("a lease unreported for a day still holds credits: %+v", r)
		}
		events := e.checkEvents("acme")
		if ev := events[1]; ev.Kind != "expire" || ev.Ref != "lease:gone" || ev.Delta != 0 {
			e.t.Fatalf("the expiry's event: %+v", ev)
		}
	}},
	{name: "a gateway cut off reports to its unreported lease", cfg: Config{DefaultPlan: Plan{Allowance: 100}}, run: func(e *env) {
		if _, err := e.ledger.SyncLease(e.ctx, LeaseSync{Org: "acme", ID: "gw", Seq: 1, Want: 50, TTL: time.Minute}); err != nil {
			e.t.Fatal(err)
		}
		e.moveServerClock(time.Hour)
		if r := e.charge("acme", 51); r.Charged {
			e.t.Fatalf("an unreported lease's credits were spent again: %+v", r)
		}
		// Back, the gateway reports the 30 it spent and gives the rest back.
		st, err := e.ledger.SyncLease(e.ctx, LeaseSync{Org: "acme", ID: "gw", Seq: 2, TTL: time.Minute, Spent: map[string]int64{"f": 30}})
		if err != nil || st.Held != 0 || st.Balance != 70 {
			e.t.Fatalf("sync: %+v %v", st, err)
		}
		acct := e.account("acme")
		if acct.Available != 70 || acct.Used["f"] != 30 {
			e.t.Fatalf("account %+v", acct)
		}
		e.checkEvents("acme")
	}},
	{name: "an operator releases an unreported lease whose gateway is gone", cfg: Config{DefaultPlan: Plan{Allowance: 100}}, run: func(e *env) {
		if _, err := e.ledger.SyncLease(e.ctx, LeaseSync{Org: "acme", ID: "gw", Seq: 1, Want: 50, TTL: time.Minute}); err != nil {
			e.t.Fatal(err)
		}
		if _, _, _, err := e.ledger.ReleaseLease(e.ctx, "acme", "lease:gw", "host decommissioned"); !errors.Is(err, ErrLease) {
			e.t.Fatalf("release of a live lease: %v", err)
		}
		h, _, _, err := e.ledger.CreateHold(e.ctx, HoldRequest{Org: "acme", Feature: "f", Amount: 5})
		if err != nil {
			e.t.Fatal(err)
		}
		if _, _, _, err := e.ledger.ReleaseLease(e.ctx, "acme", h.ID, "not a lease"); !errors.Is(err, ErrNotLease) {
			e.t.Fatalf("gateway_gone on a hold: %v", err)
		}
		e.moveServerClock(2 * time.Minute)
		h, acct, _, err := e.ledger.ReleaseLease(e.ctx, "acme", "lease:gw", "host decommissioned")
		if err != nil || h.State != HoldReleased || acct.Available != 95 {
			e.t.Fatalf("release: %+v %+v %v", h, acct, err)
		}
		events := e.checkEvents("acme")
		if ev := events[0]; ev.Kind != "release" || ev.Ref != "lease:gw" || ev.Reason != "host decommissioned" {
			e.t.Fatalf("the release's event: %+v", ev)
		}
		// A gateway that comes back after all is charged what it spent,
		// into debt if it must: the bound the operator accepted.
		st, err := e.ledger.SyncLease(e.ctx, LeaseSync{Org: "acme", ID: "gw", Seq: 2, TTL: time.Minute, Spent: map[string]int64{"f": 20}})
		if err != nil || st.Balance != 80 {
			e.t.Fatalf("sync after the release: %+v %v", st, err)
		}
	}},
}

// leased returns the credits org's live leases hold in the ledger.
func (e *env) leased(org string) int64 {
	e.t.Helper()
	records, err := e.rdb.HGetAll(e.ctx, e.ledger.Keys().Holds(org)).Result()
	if err != nil {
		e.t.Fatal(err)
	}
	var sum int64
	for id, v := range records {
		var state string
		var ofa, fa, fp int64
		if _, err := fmt.Sscanf(v, "%s %d %d %d", &state, &ofa, &fa, &fp); err != nil {
			e.t.Fatalf("hold %s: record %q: %v", id, v, err)
		}
		if (state == "l" || state == "u") && strings.HasPrefix(id, "lease:") {
			sum += ofa + fa + fp
		}
	}
	return sum
}

func TestLeaseSpendIsLocal(t *testing.T) {
	mini := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mini.Addr()})
	defer rdb.Close()
	e := newEnv(t, rdb, Config{DefaultPlan: Plan{Allowance: 100000}})
	ls := NewLeaser(e.ledger, LeaseConfig{Size: 1000, Keep: 0, Flush: time.Hour, Idle: time.Hour, TTL: time.Hour}, zap.NewNop())
	defer ls.Close()
	for range leaseAfter + 1 {
		ls.Spend("acme", "f", 1)
	}
	allocs := testing.AllocsPerRun(100, func() { ls.Spend("acme", "f", 1) })
	if allocs > 0 {
		t.Fatalf("a leased spend allocates %v times", allocs)
	}
}

// TestLeaseSlowStore: once a lease needs Redis and Redis does not answer
// within the ledger's timeout, Spend says so then, without waiting for the
// reply, and sends no charge; with Redis back, leasing goes on, exactly.
func TestLeaseSlowStore(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	proxy := faultproxy.Start(t, srv.Addr)
	rdb := mustClient(t, ClientOptions{URL: "redis://" + proxy.Addr})
	defer rdb.Close()
	ledger, err := New(rdb, Config{DefaultPlan: Plan{Allowance: 100000}, Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ls := NewLeaser(ledger, LeaseConfig{Size: 5, Keep: 10, Flush: time.Hour, Idle: time.Hour, TTL: 10 * time.Second}, zap.NewNop())
	paid := int64(0)
	spend := func() (bool, error) {
		_, ok, err := ls.Spend("acme", "f", 1)
		if ok {
			paid++
		}
		return ok, err
	}
	for range leaseAfter {
		if ok, err := spend(); ok || err != nil {
			t.Fatalf("a quiet org was leased: %v", err)
		}
	}
	if ok, err := spend(); !ok || err != nil {
		t.Fatalf("the busy org was not leased: %v", err)
	}

	proxy.SetLatency(time.Second)
	var slowErr error
	for i := 0; slowErr == nil; i++ {
		if i > 10 {
			t.Fatal("a lease of 5 kept paying for calls with Redis hanging")
		}
		start := time.Now()
		ok, err := spend()
		if elapsed := time.Since(start); elapsed >= 700*time.Millisecond {
			t.Fatalf("Spend took %s: it waited for Redis (1 s), not the 200ms timeout", elapsed)
		}
		if !ok && err == nil {
			t.Fatal("Spend said to charge the call on its own while Redis hangs")
		}
		slowErr = err
	}
	if !Unsent(slowErr) {
		t.Fatalf("error %v: want one that says no charge was sent", slowErr)
	}

	proxy.SetLatency(0)
	for {
		ok, err := spend()
		if ok {
			break
		}
		if err == nil {
			t.Fatal("no lease after Redis came back")
		}
	}
	ls.Close()
	acct, err := ledger.Account(context.Background(), "acme")
	if err != nil || acct.Used["f"] != paid || acct.Balance != 100000-paid {
		t.Fatalf("account %+v (%v) after %d calls paid for", acct, err, paid)
	}
}

// TestLeaseNearTheEnd: an org with too few credits to lease is charged call
// by call, without a lease sync per call.
func TestLeaseNearTheEnd(t *testing.T) {
	mini := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mini.Addr()})
	defer rdb.Close()
	syncs := &watchCommands{match: func(cmd redis.Cmder) bool { return strings.Contains(fmt.Sprint(cmd.Args()), " lease:gw:") }}
	rdb.AddHook(syncs)
	e := newEnv(t, rdb, Config{DefaultPlan: Plan{Allowance: 100}})
	// Blocks of 50 leave 100 free: a balance of 100 cannot be leased.
	ls := NewLeaser(e.ledger, LeaseConfig{Size: 50, Keep: 100, Flush: time.Hour, Idle: time.Hour, TTL: time.Hour}, zap.NewNop())
	defer ls.Close()
	for i := range 100 {
		if _, ok, err := ls.Spend("acme", "f", 1); ok || err != nil {
			t.Fatalf("call %d: leased (%v) with %d credits: %v", i+1, ok, 100-i, err)
		}
		if r := e.charge("acme", 1); !r.Charged {
			t.Fatalf("call %d: %+v", i+1, r)
		}
	}
	if n := syncs.n.Load(); n != 1 {
		t.Fatalf("%d lease syncs for 100 calls; want the one that found nothing to lease", n)
	}
	if acct := e.account("acme"); acct.Balance != 0 {
		t.Fatalf("account %+v", acct)
	}
}

// loseLeaseReplies runs lease syncs in Redis and, while on, loses their
// replies (the command ran; the gateway hears EOF).
type loseLeaseReplies struct {
	redistest.CommandHook
	on atomic.Bool
}

func (h *loseLeaseReplies) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if err == nil && h.on.Load() && strings.Contains(fmt.Sprint(cmd.Args()), " lease:gw:") {
			cmd.SetErr(io.EOF)
			return io.EOF
		}
		return err
	}
}

// TestLeaseClosedAfterLostReply: a lease's first sync ran in Redis but its
// reply was lost, and the leaser closes while replies are still lost: the
// reports it hands on end with one that gives the lease's credits back, so
// once they are applied no lease holds credits of the org (a repeat of the
// lost sync alone would give nothing back, and the lease would stay
// unreported for a day).
func TestLeaseClosedAfterLostReply(t *testing.T) {
	mini := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mini.Addr(), MaxRetries: -1})
	lose := &loseLeaseReplies{}
	rdb.AddHook(lose)
	e := newEnv(t, rdb, Config{DefaultPlan: Plan{Allowance: 1000}, Timeout: time.Second})
	var handed []LeaseSync
	var mu sync.Mutex
	cfg := testLease
	cfg.Flush, cfg.Idle = time.Hour, time.Hour
	cfg.Unreported = func(s LeaseSync) {
		mu.Lock()
		handed = append(handed, s)
		mu.Unlock()
	}
	ls := NewLeaser(e.ledger, cfg, zap.NewNop())
	for range leaseAfter {
		if _, ok, _ := ls.Spend("acme", "f", 1); ok {
			t.Fatal("a quiet org was leased")
		}
	}
	lose.on.Store(true)
	if _, ok, err := ls.Spend("acme", "f", 1); ok || err == nil {
		t.Fatalf("a lease whose renewal's reply was lost paid a call: %v %v", ok, err)
	}
	if e.leased("acme") == 0 {
		t.Fatal("the lost sync did not run in Redis")
	}
	ls.Close()
	lose.on.Store(false)
	mu.Lock()
	defer mu.Unlock()
	for _, s := range handed {
		if _, err := e.ledger.SyncLease(e.ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	if n := e.leased("acme"); n != 0 {
		t.Fatalf("after the %d reports handed on, a lease still holds %d credits", len(handed), n)
	}
	if acct := e.account("acme"); acct.Held != 0 || acct.Balance != 1000 {
		t.Fatalf("account %+v", acct)
	}
}
