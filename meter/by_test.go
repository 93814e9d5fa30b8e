package meter

import (
	"context"
	"errors"
	"maps"
	"slices"
	"time"

	"github.com/creditsgw/caddy-credits/policy"
)

func init() {
	ledgerCases = append(ledgerCases, byCases...)
}

var byCases = []ledgerCase{
	{name: "every operator's change is signed by its token's name, a call's charge by none", cfg: plan10, run: func(e *env) {
		ops, billing := WithBy(e.ctx, "ops"), WithBy(e.ctx, "billing-2")
		e.charge("acme", 1)
		must := func(err error) {
			e.t.Helper()
			if err != nil {
				e.t.Fatal(err)
			}
		}
		_, _, err := e.ledger.TopUp(ops, "acme", 5, "t1")
		must(err)
		_, _, err = e.ledger.Adjust(billing, "acme", -2, "a correction", "a1")
		must(err)
		_, _, err = e.ledger.SetPlan(ops, "acme", Plan{Allowance: 20, RechargeMonth: 1}, "p1")
		must(err)
		_, _, err = e.ledger.Recharge(billing, "acme", "r1")
		must(err)
		g, _, _, err := e.ledger.Grant(ops, "acme", GrantRequest{Amount: 3, Reason: "welcome"})
		must(err)
		_, err = e.ledger.VoidGrant(billing, "acme", g.ID, "a mistake")
		must(err)
		h, _, _, err := e.ledger.CreateHold(ops, HoldRequest{Org: "acme", Feature: "job", Amount: 4, Reference: "h1"})
		must(err)
		_, _, _, err = e.ledger.CaptureHold(billing, "acme", h.ID, 2)
		must(err)
		h2, _, _, err := e.ledger.CreateHold(billing, HoldRequest{Org: "acme", Feature: "job", Amount: 1, Reference: "h2"})
		must(err)
		_, _, _, err = e.ledger.ReleaseHold(ops, "acme", h2.ID)
		must(err)
		// A top-up without a name is the gateway's own call.
		_, _, err = e.ledger.TopUp(e.ctx, "acme", 1, "t2")
		must(err)

		events := e.checkEvents("acme")
		got := map[string][]string{}
		for _, ev := range events {
			got[ev.Kind+" "+ev.Ref] = append(got[ev.Kind+" "+ev.Ref], ev.By)
		}
		want := map[string][]string{
			"grant default-plan": {""}, "charge " + events[len(events)-2].Ref: {""},
			"topup t1": {"ops"}, "adjust a1": {"billing-2"}, "plan 20/1": {"ops"}, "recharge manual": {"billing-2"},
			"grant " + g.ID: {"ops"}, "void " + g.ID: {"billing-2"},
			"hold hold:" + h.ID: {"ops"}, "capture hold:" + h.ID: {"billing-2"},
			"hold hold:" + h2.ID: {"billing-2"}, "release hold:" + h2.ID: {"ops"},
			"topup t2": {""},
		}
		if !maps.EqualFunc(got, want, slices.Equal) {
			e.t.Fatalf("events' by:\n got %v\nwant %v\nevents %+v", got, want, events)
		}
	}},
	{name: "a name that is no id is refused and nothing is written", cfg: plan10, run: func(e *env) {
		e.topUp("acme", 1, "t0")
		before := e.dump()
		for _, name := range []string{"two words", "a@b", "-x"} {
			_, _, err := e.ledger.TopUp(WithBy(e.ctx, name), "acme", 5, "t1")
			var ie *policy.InputError
			if !errors.As(err, &ie) || ie.Field != "by" {
				e.t.Fatalf("by %q: %v, want an input error of by", name, err)
			}
		}
		if after := e.dump(); !maps.Equal(before, after) {
			e.t.Fatalf("a refused name wrote:\n%v\n%v", before, after)
		}
	}},
	{name: "an expiry that falls due in an operator's call is the ledger's own", cfg: plan10, run: func(e *env) {
		ops := WithBy(context.Background(), "ops")
		g, _, _, err := e.ledger.Grant(ops, "acme", GrantRequest{Amount: 3, Expires: time.Now().Add(time.Hour)})
		if err != nil {
			e.t.Fatal(err)
		}
		e.moveServerClock(2 * time.Hour)
		if _, _, err := e.ledger.TopUp(ops, "acme", 5, "t1"); err != nil {
			e.t.Fatal(err)
		}
		got := map[string]string{}
		for _, ev := range e.checkEvents("acme") {
			got[ev.Kind+" "+ev.Ref] = ev.By
		}
		want := map[string]string{"grant default-plan": "", "grant " + g.ID: "ops", "expire " + g.ID: "", "topup t1": "ops"}
		if !maps.Equal(got, want) {
			e.t.Fatalf("events' by: got %v, want %v", got, want)
		}
	}},
}
