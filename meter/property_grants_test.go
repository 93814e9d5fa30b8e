package meter

import "time"

func init() {
	ledgerCases = append(ledgerCases, propertyGrantCases...)
}

// propertyGrantCases are the grant cases the model test found.
var propertyGrantCases = []ledgerCase{
	{name: "a refund after a recharge gives nothing to the ended period's rollover", cfg: plan10, run: func(e *env) {
		// The gateway's clock agrees with Redis', as in production.
		e.clock.Set(e.serverNow())
		if _, _, err := e.ledger.SetPlan(e.ctx, "acme", Plan{Allowance: 10, RechargeMonth: 1, Rollover: 5}, ""); err != nil {
			e.t.Fatal(err)
		}
		if _, _, err := e.ledger.Recharge(e.ctx, "acme", ""); err != nil {
			e.t.Fatal(err)
		}
		// 5 carried over as a rollover grant, spent before the allowance.
		if r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 5, RequestID: "r1"}); err != nil || !r.Charged {
			e.t.Fatalf("charge: %+v %v", r, err)
		}
		if a := e.account("acme"); a.Rollover != 0 || a.Balance != 10 {
			e.t.Fatalf("after the charge: %+v", a)
		}
		e.clock.Add(time.Hour)
		if _, _, err := e.ledger.Recharge(e.ctx, "acme", ""); err != nil {
			e.t.Fatal(err)
		}
		// The spent rollover grant ended with its period, before its
		// expiry: the refund's credits are gone with it.
		got, err := e.ledger.Refund(e.ctx, "acme", "r1")
		a := e.account("acme")
		if err != nil || got.Delta != 0 || a.Balance != 15 || a.Rollover != 5 {
			e.t.Fatalf("refund: %+v %v; account %+v, want balance 15, 5 of it rollover", got, err, a)
		}
		e.checkEvents("acme")
	}},
}
