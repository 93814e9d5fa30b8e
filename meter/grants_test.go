package meter

import (
	"errors"
	"fmt"
	"time"
)

func init() {
	ledgerCases = append(ledgerCases, grantCases...)
}

// grant gives org a promotional grant of amount, expiring after expiresIn
// of Redis' time (never when 0), with priority prio (the default when
// negative).
func (e *env) grant(org string, amount int64, expiresIn time.Duration, prio int, ref string) Grant {
	e.t.Helper()
	req := GrantRequest{Amount: amount, Reference: ref, Reason: "welcome"}
	if expiresIn > 0 {
		req.Expires = e.serverNow().Add(expiresIn)
	}
	if prio >= 0 {
		req.Priority = &prio
	}
	g, _, applied, err := e.ledger.Grant(e.ctx, org, req)
	if err != nil || !applied {
		e.t.Fatalf("grant %d to %s: applied %v, %v", amount, org, applied, err)
	}
	return g
}

// serverNow is Redis' clock as the scripts read it: grants start and
// expire by it.
func (e *env) serverNow() time.Time {
	return time.Now().Add(time.Duration(e.ledger.serverSkew.Load()) * time.Millisecond)
}

// grants lists org's grants, by id.
func (e *env) grants(org string) map[string]Grant {
	e.t.Helper()
	list, _, err := e.ledger.Grants(e.ctx, org)
	if err != nil {
		e.t.Fatal(err)
	}
	out := map[string]Grant{}
	for _, g := range list {
		out[g.ID] = g
	}
	return out
}

// wantGrant checks one grant's state and what remains of it.
func (e *env) wantGrant(org, id, state string, remaining int64) {
	e.t.Helper()
	g, ok := e.grants(org)[id]
	if !ok || g.State != state || g.Remaining != remaining {
		e.t.Fatalf("grant %s: %+v (found %v), want %s with %d remaining", id, g, ok, state, remaining)
	}
}

var grantCases = []ledgerCase{
	{name: "grants burn down by priority, then expiry, purchased last", cfg: plan10, run: func(e *env) {
		e.topUp("acme", 5, "t1")                           // standing purchased: priority 50, never expires
		late := e.grant("acme", 4, 0, -1, "p1")            // promotional, never expires
		soon := e.grant("acme", 3, 48*time.Hour, -1, "p2") // expires before the allowance
		first := e.grant("acme", 2, 0, 10, "p3")           // priority 10: first of all
		a := e.account("acme")
		e.wantBalance(a, 10+5+4+3+2, 10, 5)
		if a.Promotional != 9 || a.NextExpiry == nil || a.NextExpiry.Amount != 3 {
			e.t.Fatalf("account: %+v", a)
		}
		// 2 of priority 10, 3 expiring soonest, then 10 of allowance, then
		// the promotional grant without expiry, purchased credits last.
		steps := []struct {
			cost int64
			want map[string]int64
		}{
			{2, map[string]int64{first.ID: 0, soon.ID: 3, AllowanceGrant: 10, late.ID: 4}},
			{3, map[string]int64{soon.ID: 0, AllowanceGrant: 10}},
			{10, map[string]int64{AllowanceGrant: 0, late.ID: 4}},
			{4, map[string]int64{late.ID: 0, PurchasedGrant: 5}},
			{5, map[string]int64{}},
		}
		for i, s := range steps {
			e.charge("acme", s.cost)
			gs := e.grants("acme")
			for id, want := range s.want {
				if gs[id].Remaining != want {
					e.t.Fatalf("step %d: grant %s has %d, want %d (%+v)", i, id, gs[id].Remaining, want, gs)
				}
			}
		}
		if g := e.grants("acme")[first.ID]; g.State != GrantSpent || g.Ended == nil {
			e.t.Fatalf("a grant with nothing left: %+v", g)
		}
		e.wantBalance(e.account("acme"), 0, 0, 0)
		e.checkEvents("acme")
	}},
	{name: "a grant expires by Redis' clock and loses what remains", cfg: plan10, run: func(e *env) {
		g := e.grant("acme", 6, time.Hour, -1, "p1")
		e.charge("acme", 2) // from the grant: it expires before the allowance
		e.wantGrant("acme", g.ID, GrantLive, 4)
		e.moveServerClock(2 * time.Hour)
		a := e.account("acme")
		e.wantBalance(a, 10, 10, 0)
		if a.NextExpiry != nil || a.Promotional != 0 {
			e.t.Fatalf("after the expiry: %+v", a)
		}
		e.wantGrant("acme", g.ID, GrantExpired, 0)
		evs := e.checkEvents("acme")
		if evs[0].Kind != "expire" || evs[0].Delta != -4 || evs[0].Ref != g.ID {
			e.t.Fatalf("the newest event: %+v, want the expiry of 4", evs[0])
		}
	}},
	{name: "a grant effective later is pending and not in the balance", cfg: plan10, run: func(e *env) {
		req := GrantRequest{Amount: 7, Effective: e.serverNow().Add(time.Hour), Reference: "later"}
		g, a, _, err := e.ledger.Grant(e.ctx, "acme", req)
		if err != nil || g.State != GrantPending || a.Balance != 10 {
			e.t.Fatalf("pending grant: %+v %+v %v", g, a, err)
		}
		if _, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "x", Cost: 11}); !errors.Is(err, ErrInsufficient) && err != nil {
			e.t.Fatal(err)
		}
		e.moveServerClock(2 * time.Hour)
		e.wantBalance(e.account("acme"), 17, 10, 0)
		e.wantGrant("acme", g.ID, GrantLive, 7)
		e.checkEvents("acme")
	}},
	{name: "debt is repaid by the next grant", cfg: plan10, run: func(e *env) {
		if _, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "flows", Cost: 16, Overdraft: true, OverdraftLimit: NoLimit}); err != nil {
			e.t.Fatal(err)
		}
		if a := e.account("acme"); a.Debt != 6 || a.Balance != -6 {
			e.t.Fatalf("in debt: %+v", a)
		}
		g := e.grant("acme", 10, 0, -1, "p1")
		a := e.account("acme")
		if a.Debt != 0 || a.Balance != 4 || a.Promotional != 4 {
			e.t.Fatalf("after the grant: %+v", a)
		}
		e.wantGrant("acme", g.ID, GrantLive, 4)
		e.checkEvents("acme")
	}},
	{name: "unused allowance rolls over up to the plan's rollover", cfg: plan10, run: func(e *env) {
		if _, _, err := e.ledger.SetPlan(e.ctx, "acme", Plan{Allowance: 100, RechargeMonth: 1, Rollover: 30}, "plan1"); err != nil {
			e.t.Fatal(err)
		}
		e.charge("acme", 60) // 40 unused: 30 roll over
		e.clock.Set(midnight(2027, time.January, 1))
		a := e.account("acme")
		if a.Balance != 130 || a.Rollover != 30 || a.AllowanceRemaining != 100 || a.NextExpiry == nil ||
			!a.NextExpiry.At.Equal(midnight(2028, time.January, 1)) || a.NextExpiry.Amount != 30 {
			e.t.Fatalf("after the recharge: %+v %+v", a, a.NextExpiry)
		}
		// The rollover expires before the allowance: spent first.
		e.charge("acme", 35)
		a = e.account("acme")
		if a.Rollover != 0 || a.AllowanceRemaining != 95 {
			e.t.Fatalf("after a charge: %+v", a)
		}
		// At the next recharge nothing rolls over twice: 95 unused, 30 carried.
		e.clock.Set(midnight(2028, time.January, 1))
		a = e.account("acme")
		if a.Balance != 130 || a.Rollover != 30 {
			e.t.Fatalf("after the second recharge: %+v", a)
		}
		e.checkEvents("acme")
	}},
	{name: "a voided grant loses what remains; allowance and purchased are not voided so", cfg: plan10, run: func(e *env) {
		g := e.grant("acme", 8, 0, 10, "p1")
		e.charge("acme", 3)
		a, err := e.ledger.VoidGrant(e.ctx, "acme", g.ID, "sent by mistake")
		if err != nil || a.Balance != 10 || a.Promotional != 0 {
			e.t.Fatalf("void: %+v %v", a, err)
		}
		e.wantGrant("acme", g.ID, GrantVoided, 0)
		if _, err := e.ledger.VoidGrant(e.ctx, "acme", g.ID, "again"); err != nil {
			e.t.Fatalf("a repeated void: %v", err)
		}
		for _, id := range []string{AllowanceGrant, PurchasedGrant} {
			if _, err := e.ledger.VoidGrant(e.ctx, "acme", id, "x"); !errors.Is(err, ErrGrantFixed) {
				e.t.Fatalf("void of %s: %v", id, err)
			}
		}
		for _, id := range []string{"g99", "7", "g0", "g01"} {
			if _, err := e.ledger.VoidGrant(e.ctx, "acme", id, "x"); !errors.Is(err, ErrGrantNotFound) {
				e.t.Fatalf("void of %s: %v", id, err)
			}
		}
		evs := e.checkEvents("acme")
		if evs[0].Kind != "void" || evs[0].Delta != -5 || evs[0].Reason != "sent by mistake" {
			e.t.Fatalf("the void's event: %+v", evs[0])
		}
	}},
	{name: "a hold keeps what it took of a grant that expires", cfg: plan10, run: func(e *env) {
		g := e.grant("acme", 6, time.Hour, 10, "p1")
		h, _, _, err := e.ledger.CreateHold(e.ctx, HoldRequest{Org: "acme", Feature: "flows", Amount: 4, TTL: 24 * time.Hour})
		if err != nil {
			e.t.Fatal(err)
		}
		e.moveServerClock(2 * time.Hour)
		a := e.account("acme")
		// The grant's 2 free credits are gone; the hold keeps its 4.
		if a.Balance != 14 || a.Held != 4 || a.Available != 10 {
			e.t.Fatalf("after the expiry: %+v", a)
		}
		e.wantGrant("acme", g.ID, GrantExpired, 0)
		// Captured, they are charged: 3 of the 4, the rest is gone.
		if _, a, _, err = e.ledger.CaptureHold(e.ctx, "acme", h.ID, 3); err != nil || a.Balance != 10 || a.Held != 0 {
			e.t.Fatalf("capture: %+v %v", a, err)
		}
		e.checkEvents("acme")
	}},
	{name: "a release gives a live grant its credits back, an expired one nothing", cfg: plan10, run: func(e *env) {
		g1 := e.grant("acme", 5, 0, 10, "p1")
		h, _, _, err := e.ledger.CreateHold(e.ctx, HoldRequest{Org: "acme", Feature: "flows", Amount: 5})
		if err != nil {
			e.t.Fatal(err)
		}
		e.wantGrant("acme", g1.ID, GrantLive, 0)
		if _, a, _, err := e.ledger.ReleaseHold(e.ctx, "acme", h.ID); err != nil || a.Balance != 15 || a.Promotional != 5 {
			e.t.Fatalf("release: %+v %v", a, err)
		}
		e.wantGrant("acme", g1.ID, GrantLive, 5)
		e.checkEvents("acme")
	}},
	{name: "a refund gives a spent grant its credits back", cfg: plan10, run: func(e *env) {
		g := e.grant("acme", 4, 0, 10, "p1")
		r := e.charge("acme", 4)
		e.wantGrant("acme", g.ID, GrantSpent, 0)
		if _, err := e.ledger.Refund(e.ctx, "acme", r.RequestID); err != nil {
			e.t.Fatal(err)
		}
		e.wantGrant("acme", g.ID, GrantLive, 4)
		e.wantBalance(e.account("acme"), 14, 10, 0)
		e.checkEvents("acme")
	}},
	{name: "a top-up with an expiry is a purchased grant of its own", cfg: plan10, run: func(e *env) {
		a, applied, err := e.ledger.TopUpExpiring(e.ctx, "acme", 20, "t1", e.serverNow().Add(time.Hour))
		if err != nil || !applied || a.Purchased != 20 || a.NextExpiry == nil || a.NextExpiry.Amount != 20 {
			e.t.Fatalf("top-up: %+v %v %v", a, applied, err)
		}
		// It expires before the allowance: spent first.
		e.charge("acme", 5)
		if a = e.account("acme"); a.Purchased != 15 || a.AllowanceRemaining != 10 {
			e.t.Fatalf("after a charge: %+v", a)
		}
		if _, _, err := e.ledger.TopUpExpiring(e.ctx, "acme", 1, "t2", e.serverNow().Add(-time.Second)); !errors.Is(err, ErrExpiresPast) {
			e.t.Fatalf("an expiry in the past: %v", err)
		}
		e.moveServerClock(2 * time.Hour)
		e.wantBalance(e.account("acme"), 10, 10, 0)
		e.checkEvents("acme")
	}},
	{name: "an org has at most 100 grants live or pending", cfg: plan10, run: func(e *env) {
		for i := range MaxGrants {
			e.grant("acme", 1, 0, -1, fmt.Sprintf("p%d", i))
		}
		before := e.dump()
		_, _, _, err := e.ledger.Grant(e.ctx, "acme", GrantRequest{Amount: 1, Reference: "one-more"})
		if !errors.Is(err, ErrGrantsFull) {
			e.t.Fatalf("grant 101: %v", err)
		}
		if !equalDump(before, e.dump()) {
			e.t.Fatal("a refused grant wrote")
		}
		// A spent grant no longer counts.
		e.charge("acme", 11)
		e.grant("acme", 1, 0, -1, "one-more")
		e.checkEvents("acme")
	}},
	{name: "a grant of the gateway's own reference is voided, and never applies late", cfg: plan10, run: func(e *env) {
		ref := NewOwnReference()
		e.grant("acme", 5, 0, -1, ref)
		if err := e.ledger.VoidGrantRef(e.ctx, "acme", ref); err != nil {
			e.t.Fatal(err)
		}
		e.wantBalance(e.account("acme"), 10, 10, 0)
		// One voided before it arrived never applies.
		late := NewOwnReference()
		if err := e.ledger.VoidGrantRef(e.ctx, "acme", late); err != nil {
			e.t.Fatal(err)
		}
		if _, a, applied, err := e.ledger.Grant(e.ctx, "acme", GrantRequest{Amount: 5, Reference: late}); err != nil || applied || a.Balance != 10 {
			e.t.Fatalf("a grant after its void: applied %v, %+v, %v", applied, a, err)
		}
		e.checkEvents("acme")
		// So on an org Redis has never seen.
		if err := e.ledger.VoidGrantRef(e.ctx, "newco", late); err != nil {
			e.t.Fatal(err)
		}
		if _, _, applied, err := e.ledger.Grant(e.ctx, "newco", GrantRequest{Amount: 5, Reference: late}); err != nil || applied {
			e.t.Fatalf("a grant after its void, on a new org: applied %v, %v", applied, err)
		}
	}},
	{name: "a grant's reference is applied once", cfg: plan10, run: func(e *env) {
		g := e.grant("acme", 5, 0, -1, "p1")
		again, a, applied, err := e.ledger.Grant(e.ctx, "acme", GrantRequest{Amount: 5, Reference: "p1"})
		if err != nil || applied || again.ID != g.ID || a.Balance != 15 {
			e.t.Fatalf("repeat: %+v %+v %v %v", again, a, applied, err)
		}
		for _, bad := range []GrantRequest{
			{Amount: 0}, {Amount: MaxAmount + 1}, {Amount: 1, Kind: KindPurchased}, {Amount: 1, Priority: new(101)},
			{Amount: 1, Effective: time.Now().Add(time.Hour), Expires: time.Now()},
		} {
			if _, _, _, err := e.ledger.Grant(e.ctx, "acme", bad); err == nil {
				e.t.Fatalf("grant %+v: no error", bad)
			}
		}
		if _, _, _, err := e.ledger.Grant(e.ctx, "acme", GrantRequest{Amount: 1, Expires: e.serverNow().Add(-time.Minute)}); !errors.Is(err, ErrExpiresPast) {
			e.t.Fatalf("an expiry in the past: %v", err)
		}
		e.checkEvents("acme")
	}},
}
