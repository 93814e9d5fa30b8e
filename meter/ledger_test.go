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

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/policy"
)

type ledgerCase struct {
	name string
	cfg  Config
	run  func(e *env)
}

// TestLedger runs every ledger case on miniredis, a real redis-server and a
// 3-node Redis Cluster.
func TestLedger(t *testing.T) {
	for _, s := range stores(t) {
		t.Run(s.name, func(t *testing.T) {
			for _, c := range ledgerCases {
				t.Run(c.name, func(t *testing.T) {
					c.run(newEnv(t, s.rdb, c.cfg))
				})
			}
		})
	}
}

var plan10 = Config{DefaultPlan: Plan{Allowance: 10, RechargeMonth: 1}}

var ledgerCases = []ledgerCase{
	{name: "first charge grants the default plan", cfg: plan10, run: func(e *env) {
		r := e.charge("acme", 3)
		if !r.Charged || r.Replay || r.Balance != 7 || r.Cost != 3 || r.RequestID == "" {
			e.t.Fatalf("charge: %+v", r)
		}
		a := e.account("acme")
		e.wantBalance(a, 7, 7, 0)
		if a.Used["rich-text"] != 3 || a.OwnPlan || a.Plan != (Plan{10, 1, 0}) {
			e.t.Fatalf("account: %+v", a)
		}
		if !a.PeriodStart.Equal(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)) ||
			!a.NextRecharge.Equal(time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC)) {
			e.t.Fatalf("period %s to %s", a.PeriodStart, a.NextRecharge)
		}
		ev := e.checkEvents("acme")
		if len(ev) != 2 || ev[0].Kind != "charge" || ev[0].Delta != -3 || ev[0].Feature != "rich-text" ||
			ev[0].Ref != r.RequestID || ev[1].Kind != "grant" || ev[1].Delta != 10 {
			e.t.Fatalf("events: %+v", ev)
		}
		if !ev[0].Time.Equal(e.clock.Now().Truncate(time.Millisecond)) {
			e.t.Fatalf("event time %s, clock %s", ev[0].Time, e.clock.Now())
		}
	}},
	{name: "block refuses and writes nothing", cfg: plan10, run: func(e *env) {
		before := e.dump()
		r := e.charge("fresh", 11)
		if r.Charged || r.Balance != 10 || r.Cost != 0 {
			e.t.Fatalf("charge: %+v", r)
		}
		if after := e.dump(); len(after) != len(before) {
			e.t.Fatalf("a refused charge of a new org wrote %v", after)
		}
		e.charge("acme", 8)
		before = e.dump()
		if r := e.charge("acme", 3); r.Charged || r.Balance != 2 {
			e.t.Fatalf("charge: %+v", r)
		}
		if after := e.dump(); !equalDump(before, after) {
			e.t.Fatalf("a refused charge wrote:\nbefore %v\nafter  %v", before, after)
		}
		if r := e.charge("acme", 2); !r.Charged || r.Balance != 0 {
			e.t.Fatalf("charge of the whole balance: %+v", r)
		}
	}},
	{name: "overdraft goes below zero down to the limit", cfg: plan10, run: func(e *env) {
		od := func(cost, limit int64) ChargeResult {
			r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "flows", Feature: "flows", Cost: cost, Overdraft: true, OverdraftLimit: limit})
			if err != nil {
				e.t.Fatal(err)
			}
			return r
		}
		if r := od(15, NoLimit); !r.Charged || r.Balance != -5 {
			e.t.Fatalf("overdraft without limit: %+v", r)
		}
		if r := od(5, 10); !r.Charged || r.Balance != -10 {
			e.t.Fatalf("overdraft to the limit: %+v", r)
		}
		if r := od(1, 10); r.Charged || r.Balance != -10 {
			e.t.Fatalf("overdraft past the limit: %+v", r)
		}
		if r := od(1, 0); r.Charged {
			e.t.Fatalf("overdraft limit 0 let the balance go below zero: %+v", r)
		}
		e.wantBalance(e.account("flows"), -10, -10, 0)
		e.checkEvents("flows")
	}},
	{name: "allowance first then purchased, refunds in reverse", cfg: plan10, run: func(e *env) {
		e.topUp("acme", 5, "inv-1")
		r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "background-removal", Cost: 12, RequestID: "req-1"})
		if err != nil || !r.Charged || r.Balance != 3 {
			e.t.Fatalf("charge: %+v %v", r, err)
		}
		e.wantBalance(e.account("acme"), 3, 0, 3)
		s, err := e.ledger.Refund(e.ctx, "acme", "req-1")
		if err != nil || s.Delta != 12 || s.Balance != 15 || s.Repeat {
			e.t.Fatalf("refund: %+v %v", s, err)
		}
		a := e.account("acme")
		e.wantBalance(a, 15, 10, 5)
		if a.Used["background-removal"] != 0 {
			e.t.Fatalf("used after refund: %v", a.Used)
		}
		e.checkEvents("acme")
	}},
	{name: "same request id charges once", cfg: plan10, run: func(e *env) {
		req := ChargeRequest{Org: "acme", Feature: "alt-text", Cost: 4, RequestID: "idem-1"}
		first, err := e.ledger.Charge(e.ctx, req)
		if err != nil || !first.Charged || first.Replay {
			e.t.Fatalf("first: %+v %v", first, err)
		}
		e.charge("acme", 1)
		again, err := e.ledger.Charge(e.ctx, req)
		if err != nil || !again.Charged || !again.Replay || again.Balance != first.Balance || again.Cost != 4 {
			e.t.Fatalf("replay: %+v %v, first %+v", again, err, first)
		}
		e.wantBalance(e.account("acme"), 5, 5, 0)
		// Request ids are scoped to the org.
		other, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "other", Feature: "alt-text", Cost: 4, RequestID: "idem-1"})
		if err != nil || other.Replay || !other.Charged {
			e.t.Fatalf("same id, other org: %+v %v", other, err)
		}
		ttl, err := e.rdb.TTL(e.ctx, e.ledger.Keys().Request("acme", "idem-1")).Result()
		if err != nil || ttl <= DefaultMarkerTTL-time.Minute || ttl > DefaultMarkerTTL {
			e.t.Fatalf("marker lifetime %s %v", ttl, err)
		}
	}},
	{name: "orgs are listed in order, page by page", cfg: plan10, run: func(e *env) {
		names := []string{"c-org", "a-org", "b-org", "e-org", "d-org"}
		for i, org := range names {
			if r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: org, Feature: "rich-text", Cost: int64(i + 1)}); err != nil || !r.Charged {
				e.t.Fatalf("%s: %+v %v", org, r, err)
			}
		}
		var got []OrgBalance
		after := ""
		for pages := 0; ; pages++ {
			page, next, err := e.ledger.Orgs(e.ctx, after, 2)
			if err != nil || len(page) > 2 || pages > 3 {
				e.t.Fatalf("page after %q: %v, next %q, %v", after, page, next, err)
			}
			got = append(got, page...)
			if next == "" {
				break
			}
			after = next
		}
		want := []OrgBalance{{"a-org", 8}, {"b-org", 7}, {"c-org", 9}, {"d-org", 5}, {"e-org", 6}}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			e.t.Fatalf("orgs %v, want %v", got, want)
		}
		if page, next, err := e.ledger.Orgs(e.ctx, "e-org", 10); err != nil || len(page) != 0 || next != "" {
			e.t.Fatalf("after the last org: %v %q %v", page, next, err)
		}
		for _, bad := range []struct {
			after string
			limit int
		}{{"no/such", 10}, {"", 0}, {"", MaxOrgsPage + 1}} {
			var inputErr *policy.InputError
			if _, _, err := e.ledger.Orgs(e.ctx, bad.after, bad.limit); !errors.As(err, &inputErr) && !errors.Is(err, policy.ErrOrgMissing) {
				e.t.Errorf("after %q, limit %d: %v, want an input error", bad.after, bad.limit, err)
			}
		}
	}},
	{name: "settle charges or refunds the difference once", cfg: plan10, run: func(e *env) {
		if _, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "flows", Cost: 2, RequestID: "s1"}); err != nil {
			e.t.Fatal(err)
		}
		s, err := e.ledger.Settle(e.ctx, "acme", "s1", 7)
		if err != nil || s.Delta != -5 || s.Balance != 3 {
			e.t.Fatalf("settle up: %+v %v", s, err)
		}
		s, err = e.ledger.Refund(e.ctx, "acme", "s1")
		if err != nil || !s.Repeat || s.Delta != 0 || s.Balance != 3 {
			e.t.Fatalf("second settle: %+v %v", s, err)
		}
		if a := e.account("acme"); a.Used["flows"] != 7 || a.Balance != 3 {
			e.t.Fatalf("account: %+v", a)
		}
		// Settling past the balance runs into overdraft: the call happened.
		if _, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "flows", Cost: 1, RequestID: "s2"}); err != nil {
			e.t.Fatal(err)
		}
		s, err = e.ledger.Settle(e.ctx, "acme", "s2", 6)
		if err != nil || s.Balance != -3 {
			e.t.Fatalf("settle into debt: %+v %v", s, err)
		}
		if _, err := e.ledger.Refund(e.ctx, "acme", "never"); !errors.Is(err, ErrUnknownRequest) {
			e.t.Fatalf("settle of an unknown request: %v", err)
		}
		e.checkEvents("acme")
	}},
	{name: "a top-up reference applies once", cfg: plan10, run: func(e *env) {
		a, applied, err := e.ledger.TopUp(e.ctx, "acme", 100, "inv-7")
		if err != nil || !applied {
			e.t.Fatalf("top-up: %v %v", applied, err)
		}
		e.wantBalance(a, 110, 10, 100)
		a, applied, err = e.ledger.TopUp(e.ctx, "acme", 100, "inv-7")
		if err != nil || applied {
			e.t.Fatalf("repeat: %v %v", applied, err)
		}
		e.wantBalance(a, 110, 10, 100)
		a = e.topUp("acme", 1, "")
		a = e.topUp("acme", 1, "")
		e.wantBalance(a, 112, 10, 102)
		e.checkEvents("acme")
	}},
	{name: "purchased credits stop at the limit", cfg: plan10, run: func(e *env) {
		for i := range 1000 {
			e.topUp("rich", MaxAmount, "big-"+string(rune('a'+i%26))+strings.Repeat("x", i/26))
		}
		before := e.dump()
		_, _, err := e.ledger.TopUp(e.ctx, "rich", 1, "one-more")
		if !errors.Is(err, ErrPurchasedLimit) {
			e.t.Fatalf("top-up past the limit: %v", err)
		}
		if !equalDump(before, e.dump()) {
			e.t.Fatal("a refused top-up wrote")
		}
		e.wantBalance(e.account("rich"), MaxPurchased+10, 10, MaxPurchased)
	}},
	{name: "a plan for an org on the default plan starts at once", cfg: plan10, run: func(e *env) {
		e.charge("acme", 4)
		a := e.setPlan("acme", 100, 6)
		e.wantBalance(a, 100, 100, 0)
		if !a.OwnPlan || a.Plan != (Plan{100, 6, 0}) || a.NextPlan != nil || len(a.Used) != 0 ||
			!a.PeriodStart.Equal(e.clock.Now().Truncate(time.Second)) ||
			!a.NextRecharge.Equal(time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)) {
			e.t.Fatalf("account: %+v", a)
		}
		// A new org gets its plan without the default grant.
		a = e.setPlan("newco", 50, 3)
		e.wantBalance(a, 50, 50, 0)
		if !a.NextRecharge.Equal(time.Date(2027, 3, 1, 0, 0, 0, 0, time.UTC)) {
			e.t.Fatalf("next recharge %s", a.NextRecharge)
		}
		e.checkEvents("acme")
		e.checkEvents("newco")
	}},
	{name: "a change of an own plan waits for the recharge", cfg: plan10, run: func(e *env) {
		e.setPlan("acme", 100, 6)
		e.charge("acme", 30)
		a := e.setPlan("acme", 500, 9)
		e.wantBalance(a, 70, 70, 0)
		if a.Plan != (Plan{100, 6, 0}) || a.NextPlan == nil || *a.NextPlan != (Plan{500, 9, 0}) {
			e.t.Fatalf("account: %+v", a)
		}
		e.clock.Set(date(2026, time.June, 1))
		a = e.account("acme")
		e.wantBalance(a, 500, 500, 0)
		if a.Plan != (Plan{500, 9, 0}) || a.NextPlan != nil ||
			!a.NextRecharge.Equal(time.Date(2026, 9, 1, 0, 0, 0, 0, time.UTC)) {
			e.t.Fatalf("after recharge: %+v", a)
		}
		e.checkEvents("acme")
	}},
	{name: "recharge now keeps debt and purchased credits", cfg: plan10, run: func(e *env) {
		e.topUp("acme", 3, "t1")
		if _, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "flows", Cost: 20, Overdraft: true, OverdraftLimit: NoLimit}); err != nil {
			e.t.Fatal(err)
		}
		e.wantBalance(e.account("acme"), -7, -7, 0)
		a, _, err := e.ledger.Recharge(e.ctx, "acme", "")
		if err != nil {
			e.t.Fatal(err)
		}
		e.wantBalance(a, 3, 3, 0)
		if len(a.Used) != 0 || !a.PeriodStart.Equal(e.clock.Now().Truncate(time.Second)) {
			e.t.Fatalf("account: %+v", a)
		}
		e.checkEvents("acme")
	}},
	{name: "a recharge whose reply is lost is applied once", cfg: plan10, run: func(e *env) {
		e.charge("acme", 4)
		// The script runs; its reply is lost as if the connection broke,
		// so the recharge is sent again.
		lose := &watchCommands{loseFirst: true, match: func(cmd redis.Cmder) bool { return strings.Contains(fmt.Sprint(cmd.Args()), ":i:recharge:") }}
		e.rdb.AddHook(lose)
		a, _, err := e.ledger.Recharge(e.ctx, "acme", "")
		if err != nil || lose.n.Load() != 2 {
			e.t.Fatalf("recharge: %v; sent %d times, want twice (the first reply lost)", err, lose.n.Load())
		}
		e.wantBalance(a, 10, 10, 0)
		recharges := 0
		for _, ev := range e.checkEvents("acme") {
			if ev.Kind == "recharge" {
				recharges++
			}
		}
		if recharges != 1 {
			e.t.Fatalf("%d recharge events", recharges)
		}
	}},
	{name: "account of an unknown org", cfg: plan10, run: func(e *env) {
		if _, err := e.ledger.Account(e.ctx, "nobody"); !errors.Is(err, ErrNotFound) {
			e.t.Fatalf("account: %v", err)
		}
		b, err := e.ledger.Balance(e.ctx, "nobody")
		if err != nil || b.Balance != 10 || !b.NextRecharge.Equal(time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC)) {
			e.t.Fatalf("balance: %+v %v", b, err)
		}
		if keys := e.keys(); len(keys) != 0 {
			e.t.Fatalf("reads wrote %v", keys)
		}
	}},
	{name: "events are newest first and capped", cfg: Config{DefaultPlan: Plan{Allowance: 1000}, EventsMax: 10}, run: func(e *env) {
		for range 300 {
			e.charge("acme", 1)
		}
		events, err := e.ledger.Events(e.ctx, "acme", 5)
		if err != nil || len(events) != 5 {
			e.t.Fatalf("events: %d %v", len(events), err)
		}
		for i, ev := range events {
			if ev.Kind != "charge" || ev.Balance != int64(700+i) {
				e.t.Fatalf("event %d: %+v", i, ev)
			}
		}
		n, err := e.rdb.LLen(e.ctx, e.ledger.Keys().Calls("acme")).Result()
		if err != nil || n != 10 {
			e.t.Fatalf("%d call events kept, %v: want 10", n, err)
		}
		if events[0].ID != "301" {
			e.t.Fatalf("newest event number %s, want 301", events[0].ID)
		}
	}},
	{name: "bad input is a typed error and writes nothing", cfg: plan10, run: func(e *env) {
		e.charge("acme", 1)
		e.topUp("acme", 5, "r1")
		before := e.dump()
		badOrgs := []string{"", "{acme}", "ac}me", "a:b", "a b", strings.Repeat("a", 300), "-x", "é"}
		for _, org := range badOrgs {
			_, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: org, Feature: "f", Cost: 1})
			wantInputError(e.t, err, org == "")
			_, _, err = e.ledger.TopUp(e.ctx, org, 1, "x")
			wantInputError(e.t, err, org == "")
			_, _, err = e.ledger.SetPlan(e.ctx, org, Plan{1, 1, 0}, "")
			wantInputError(e.t, err, org == "")
			_, err = e.ledger.Refund(e.ctx, org, "r")
			wantInputError(e.t, err, org == "")
			_, _, err = e.ledger.Recharge(e.ctx, org, "")
			wantInputError(e.t, err, org == "")
			_, err = e.ledger.Events(e.ctx, org, 1)
			wantInputError(e.t, err, org == "")
		}
		charges := []ChargeRequest{
			{Org: "acme", Feature: "f", Cost: 0},
			{Org: "acme", Feature: "f", Cost: -5},
			{Org: "acme", Feature: "f", Cost: policy.MaxCost + 1},
			{Org: "acme", Feature: "f", Cost: 1 << 62},
			{Org: "acme", Feature: "", Cost: 1},
			{Org: "acme", Feature: "a b", Cost: 1},
			{Org: "acme", Feature: "f", Cost: 1, RequestID: strings.Repeat("r", 301)},
			{Org: "acme", Feature: "f", Cost: 1, RequestID: "has space"},
			{Org: "acme", Feature: "f", Cost: 1, Overdraft: true, OverdraftLimit: -2},
			{Org: "acme", Feature: "f", Cost: 1, Overdraft: true, OverdraftLimit: MaxAmount + 1},
		}
		for _, c := range charges {
			_, err := e.ledger.Charge(e.ctx, c)
			wantInputError(e.t, err, false)
		}
		for _, amount := range []int64{0, -1, MaxAmount + 1} {
			_, _, err := e.ledger.TopUp(e.ctx, "acme", amount, "r2")
			wantInputError(e.t, err, false)
		}
		for _, p := range []Plan{{-1, 1, 0}, {MaxAmount + 1, 1, 0}, {1, 0, 0}, {1, 13, 0}} {
			_, _, err := e.ledger.SetPlan(e.ctx, "acme", p, "")
			wantInputError(e.t, err, false)
		}
		for _, actual := range []int64{-1, policy.MaxCost + 1} {
			_, err := e.ledger.Settle(e.ctx, "acme", "r", actual)
			wantInputError(e.t, err, false)
		}
		for _, limit := range []int64{0, -1, 1001} {
			_, err := e.ledger.Events(e.ctx, "acme", limit)
			wantInputError(e.t, err, false)
		}
		if after := e.dump(); !equalDump(before, after) {
			e.t.Fatalf("bad input wrote:\nbefore %v\nafter  %v", before, after)
		}
	}},
	{name: "a flushed script cache is reloaded", cfg: plan10, run: func(e *env) {
		e.charge("acme", 1)
		if err := e.rdb.ScriptFlush(e.ctx).Err(); err != nil {
			e.t.Fatal(err)
		}
		if r := e.charge("acme", 1); !r.Charged || r.Balance != 8 {
			e.t.Fatalf("charge after SCRIPT FLUSH: %+v", r)
		}
	}},
}

func wantInputError(t *testing.T, err error, missing bool) {
	t.Helper()
	var ie *policy.InputError
	switch {
	case missing && !errors.Is(err, policy.ErrOrgMissing):
		t.Fatalf("got %v, want policy.ErrOrgMissing", err)
	case !missing && !errors.As(err, &ie):
		t.Fatalf("got %v (%T), want a *policy.InputError", err, err)
	}
}

func equalDump(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestConcurrentCharges checks exactness under load on real Redis: 1,000
// concurrent cost-1 charges on a balance of 500.
func TestConcurrentCharges(t *testing.T) {
	cases := []struct {
		name      string
		overdraft bool
		limit     int64
		charged   int
		balance   int64
	}{
		{"block", false, 0, 500, 0},
		{"overdraft", true, NoLimit, 1000, -500},
		{"overdraft limit 200", true, 200, 700, -200},
	}
	for _, s := range stores(t) {
		if !s.real {
			continue
		}
		t.Run(s.name, func(t *testing.T) {
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					e := newEnv(t, s.rdb, Config{DefaultPlan: Plan{Allowance: 500}, Timeout: 10 * time.Second, EventsMax: 5000})
					var wg sync.WaitGroup
					var mu sync.Mutex
					charged := 0
					errs := make(chan error, 1000)
					for range 1000 {
						wg.Go(func() {
							r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "hot", Feature: "f", Cost: 1, Overdraft: c.overdraft, OverdraftLimit: c.limit})
							if err != nil {
								errs <- err
								return
							}
							if r.Charged {
								mu.Lock()
								charged++
								mu.Unlock()
							}
						})
					}
					wg.Wait()
					close(errs)
					for err := range errs {
						t.Fatal(err)
					}
					if charged != c.charged {
						t.Fatalf("%d charged, want %d", charged, c.charged)
					}
					a := e.account("hot")
					if a.Balance != c.balance || a.Used["f"] != int64(c.charged) {
						t.Fatalf("balance %d used %d, want %d and %d", a.Balance, a.Used["f"], c.balance, c.charged)
					}
					e.checkEvents("hot")
				})
			}
		})
	}
}

func TestRefundFreesRequestID(t *testing.T) {
	for _, s := range stores(t) {
		t.Run(s.name, func(t *testing.T) {
			e := newEnv(t, s.rdb, plan10)
			req := ChargeRequest{Org: "acme", Feature: "alt-text", Cost: 3, RequestID: "retry-me"}
			if r, err := e.ledger.Charge(e.ctx, req); err != nil || !r.Charged {
				t.Fatalf("%+v %v", r, err)
			}
			if _, err := e.ledger.Refund(e.ctx, "acme", "retry-me"); err != nil {
				t.Fatal(err)
			}
			r, err := e.ledger.Charge(e.ctx, req)
			if err != nil || !r.Charged || r.Replay || r.Balance != 7 {
				t.Fatalf("retry after refund: %+v %v", r, err)
			}
			r, err = e.ledger.Charge(e.ctx, req)
			if err != nil || !r.Replay || r.Balance != 7 {
				t.Fatalf("replay of the retry: %+v %v", r, err)
			}
			e.wantBalance(e.account("acme"), 7, 7, 0)
		})
	}
}

// watchCommands counts the commands it matches that run (an EVALSHA that
// finds no script, sent again as EVAL, counts once). With loseFirst, the
// first of them loses its reply: it runs, and its caller sees a broken
// connection.
type watchCommands struct {
	redistest.CommandHook
	match     func(redis.Cmder) bool
	loseFirst bool
	n         atomic.Int64
}

func (h *watchCommands) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if err == nil && h.match(cmd) && h.n.Add(1) == 1 && h.loseFirst {
			cmd.SetErr(io.EOF)
			return io.EOF
		}
		return err
	}
}
