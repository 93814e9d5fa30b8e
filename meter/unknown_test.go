package meter

import (
	"reflect"
	"strings"
	"time"
)

func init() {
	ledgerCases = append(ledgerCases, unknownOutcomeCases...)
}

var unknownOutcomeCases = []ledgerCase{
	{name: "a plan's and a recharge's reference is applied once, apart from other writes'", cfg: plan10, run: func(e *env) {
		a, applied, err := e.ledger.SetPlan(e.ctx, "acme", Plan{Allowance: 100, RechargeMonth: 1}, "p1")
		if err != nil || !applied || a.Balance != 100 {
			e.t.Fatalf("plan: %+v %v %v", a, applied, err)
		}
		// The same reference with another plan is the same write: nothing changes.
		a, applied, err = e.ledger.SetPlan(e.ctx, "acme", Plan{Allowance: 7, RechargeMonth: 3}, "p1")
		if err != nil || applied || a.Plan.Allowance != 100 || a.NextPlan != nil {
			e.t.Fatalf("plan repeated: %+v %v %v", a, applied, err)
		}
		e.charge("acme", 30)
		for i, want := range []bool{true, false} {
			a, applied, err = e.ledger.Recharge(e.ctx, "acme", "p1")
			if err != nil || applied != want || a.Balance != 100 {
				e.t.Fatalf("recharge %d: %+v %v %v", i, a, applied, err)
			}
		}
		recharges := 0
		for _, ev := range e.checkEvents("acme") {
			if ev.Kind == "recharge" {
				recharges++
			}
		}
		if recharges != 1 {
			e.t.Fatalf("%d recharge events, want 1", recharges)
		}
	}},
	{name: "a plan of the gateway's own reference, voided, never stands", cfg: plan10, run: func(e *env) {
		e.charge("acme", 4)
		before := e.account("acme")
		// It ran before the void, and nothing changed since: undone exactly.
		if _, applied, err := e.ledger.SetPlan(e.ctx, "acme", Plan{Allowance: 100, RechargeMonth: 3}, "gw:1"); err != nil || !applied {
			e.t.Fatalf("plan: %v %v", applied, err)
		}
		for range 2 { // a void sent again changes nothing
			if stands, err := e.ledger.VoidWrite(e.ctx, "acme", "plan", "gw:1"); err != nil || stands {
				e.t.Fatalf("void: %v %v", stands, err)
			}
			sameAccount(e, before, e.account("acme"))
		}
		// It arrives after its void: nothing changes.
		if stands, err := e.ledger.VoidWrite(e.ctx, "acme", "plan", "gw:2"); err != nil || stands {
			e.t.Fatalf("void: %v %v", stands, err)
		}
		if _, applied, err := e.ledger.SetPlan(e.ctx, "acme", Plan{Allowance: 100, RechargeMonth: 3}, "gw:2"); err != nil || applied {
			e.t.Fatalf("a voided plan applied: %v %v", applied, err)
		}
		sameAccount(e, before, e.account("acme"))
		// It ran, then a call was charged: no undo is exact, it stands and its void says so.
		if _, _, err := e.ledger.SetPlan(e.ctx, "acme", Plan{Allowance: 100, RechargeMonth: 3}, "gw:3"); err != nil {
			e.t.Fatal(err)
		}
		e.charge("acme", 1)
		if stands, err := e.ledger.VoidWrite(e.ctx, "acme", "plan", "gw:3"); err != nil || !stands {
			e.t.Fatalf("void after a charge: %v %v", stands, err)
		}
		if a := e.account("acme"); a.Balance != 99 || a.Plan.Allowance != 100 {
			e.t.Fatalf("account: %+v", a)
		}
		events := e.checkEvents("acme")
		if events[0].Kind != "void" || !strings.Contains(events[0].Reason, "stands") {
			e.t.Fatalf("newest event: %+v", events[0])
		}
	}},
	{name: "a plan of the gateway's own reference on a new org, voided, leaves the default plan", cfg: plan10, run: func(e *env) {
		if _, _, err := e.ledger.SetPlan(e.ctx, "newco", Plan{Allowance: 500, RechargeMonth: 1}, "gw:n"); err != nil {
			e.t.Fatal(err)
		}
		if _, err := e.ledger.VoidWrite(e.ctx, "newco", "plan", "gw:n"); err != nil {
			e.t.Fatal(err)
		}
		if a := e.account("newco"); a.Balance != 10 || a.OwnPlan {
			e.t.Fatalf("account: %+v", a)
		}
		e.checkEvents("newco")
	}},
	{name: "a recharge of the gateway's own reference, voided, never stands", cfg: plan10, run: func(e *env) {
		e.topUp("acme", 5, "t1")
		e.charge("acme", 4)
		before := e.account("acme")
		e.clock.Add(time.Hour)
		if a, applied, err := e.ledger.Recharge(e.ctx, "acme", "gw:r1"); err != nil || !applied || a.Balance != 15 || len(a.Used) != 0 {
			e.t.Fatalf("recharge: %+v %v %v", a, applied, err)
		}
		if stands, err := e.ledger.VoidWrite(e.ctx, "acme", "recharge", "gw:r1"); err != nil || stands {
			e.t.Fatalf("void: %v %v", stands, err)
		}
		sameAccount(e, before, e.account("acme"))
		if stands, err := e.ledger.VoidWrite(e.ctx, "acme", "recharge", "gw:r2"); err != nil || stands {
			e.t.Fatalf("void: %v %v", stands, err)
		}
		if _, applied, err := e.ledger.Recharge(e.ctx, "acme", "gw:r2"); err != nil || applied {
			e.t.Fatalf("a voided recharge applied: %v %v", applied, err)
		}
		sameAccount(e, before, e.account("acme"))
		e.checkEvents("acme")
	}},
	{name: "a hold of the gateway's own reference, voided, never stands", cfg: plan10, run: func(e *env) {
		e.topUp("acme", 290, "t1")
		h, _, _, err := e.ledger.CreateHold(e.ctx, HoldRequest{Org: "acme", Feature: "jobs", Amount: 300, Reference: "gw:h1"})
		if err != nil || h.ID != HoldID("gw:h1") {
			e.t.Fatalf("hold: %+v %v", h, err)
		}
		for range 2 {
			if err := e.ledger.VoidHold(e.ctx, "acme", h.ID); err != nil {
				e.t.Fatal(err)
			}
			if a := e.account("acme"); a.Available != 300 || a.Held != 0 {
				e.t.Fatalf("after the void: %+v", a)
			}
		}
		// It arrives after its void, on this org and on one Redis knows nothing of.
		for _, org := range []string{"acme", "newco"} {
			id := HoldID("gw:h2")
			if err := e.ledger.VoidHold(e.ctx, org, id); err != nil {
				e.t.Fatal(err)
			}
			h, a, repeat, err := e.ledger.CreateHold(e.ctx, HoldRequest{Org: org, Feature: "jobs", Amount: 5, Reference: "gw:h2"})
			if err != nil || !repeat || h.State != HoldReleased || a.Held != 0 {
				e.t.Fatalf("%s: a voided hold applied: %+v %+v %v %v", org, h, a, repeat, err)
			}
		}
		if a := e.account("acme"); a.Available != 300 {
			e.t.Fatalf("account: %+v", a)
		}
		e.checkEvents("acme")
	}},
}

// sameAccount asserts that an undone write left the account as it was.
func sameAccount(e *env, want, got Account) {
	e.t.Helper()
	if !reflect.DeepEqual(want, got) {
		e.t.Fatalf("account\n got %+v\nwant %+v", got, want)
	}
}
