package meter

import (
	"fmt"
	"time"
)

func init() {
	ledgerCases = append(ledgerCases, rechargeCases...)
}

func midnight(y int, m time.Month, d int) time.Time {
	return time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
}

var rechargeCases = []ledgerCase{
	{name: "recharge Dec to Jan expires allowance, keeps purchased", cfg: plan10, run: func(e *env) {
		e.charge("acme", 4)
		e.topUp("acme", 5, "t1")
		e.clock.Set(midnight(2027, time.January, 1).Add(-time.Second))
		a := e.account("acme")
		e.wantBalance(a, 11, 6, 5)
		if a.Used["rich-text"] != 4 {
			e.t.Fatalf("used before the recharge: %v", a.Used)
		}
		e.clock.Set(midnight(2027, time.January, 1))
		a = e.account("acme")
		e.wantBalance(a, 15, 10, 5)
		if len(a.Used) != 0 || !a.PeriodStart.Equal(midnight(2027, time.January, 1)) ||
			!a.NextRecharge.Equal(midnight(2028, time.January, 1)) {
			e.t.Fatalf("after the recharge: %+v", a)
		}
		ev := e.checkEvents("acme")
		if ev[0].Kind != "recharge" || ev[0].Delta != 4 || !ev[0].Time.Equal(midnight(2027, time.January, 1)) {
			e.t.Fatalf("recharge event: %+v", ev[0])
		}
		// The recharge was written once: reading again changes nothing.
		before := e.dump()
		e.account("acme")
		if !equalDump(before, e.dump()) {
			e.t.Fatal("a second read wrote")
		}
	}},
	{name: "a charge that starts the period counts only its own usage", cfg: plan10, run: func(e *env) {
		// No read between the two charges: the second one applies the
		// recharge, and its feature's usage starts again from zero.
		e.charge("acme", 4)
		e.clock.Set(midnight(2027, time.January, 1))
		e.charge("acme", 1)
		a := e.account("acme")
		e.wantBalance(a, 9, 9, 0)
		if len(a.Used) != 1 || a.Used["rich-text"] != 1 {
			e.t.Fatalf("used after the recharge: %v, want rich-text 1", a.Used)
		}
		e.checkEvents("acme")
	}},
	{name: "debt carries over the recharge", cfg: plan10, run: func(e *env) {
		if _, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "flows", Cost: 25, Overdraft: true, OverdraftLimit: NoLimit}); err != nil {
			e.t.Fatal(err)
		}
		// A top-up repays debt first: 15 of debt, 3 paid, 12 left.
		e.topUp("acme", 3, "t1")
		e.wantBalance(e.account("acme"), -12, -12, 0)
		if a := e.account("acme"); a.Debt != 12 {
			e.t.Fatalf("debt %d, want 12", a.Debt)
		}
		// The new allowance repays the rest: 10 - 12.
		e.clock.Set(midnight(2027, time.January, 1))
		e.wantBalance(e.account("acme"), -2, -2, 0)
		// Two more recharges due at once: -2 -> 8 -> 10.
		e.clock.Set(midnight(2029, time.January, 1).Add(time.Hour))
		a := e.account("acme")
		e.wantBalance(a, 10, 10, 0)
		if !a.PeriodStart.Equal(midnight(2029, time.January, 1)) || !a.NextRecharge.Equal(midnight(2030, time.January, 1)) {
			e.t.Fatalf("period %s to %s", a.PeriodStart, a.NextRecharge)
		}
		e.checkEvents("acme")
	}},
	{name: "recharge on March 1 after Feb 29", cfg: plan10, run: func(e *env) {
		e.clock.Set(date(2028, time.February, 10))
		e.setPlan("leap", 30, 3)
		e.charge("leap", 30)
		e.clock.Set(midnight(2028, time.March, 1).Add(-time.Second)) // Feb 29, 23:59:59
		if a := e.account("leap"); a.Balance != 0 || !a.NextRecharge.Equal(midnight(2028, time.March, 1)) {
			e.t.Fatalf("on Feb 29: %+v", a)
		}
		e.clock.Set(midnight(2028, time.March, 1))
		e.wantBalance(e.account("leap"), 30, 30, 0)
	}},
	{name: "a February plan recharges on Feb 1, not on Feb 29", cfg: plan10, run: func(e *env) {
		e.clock.Set(date(2027, time.December, 1))
		e.setPlan("feb", 30, 2)
		e.charge("feb", 10)
		e.clock.Set(midnight(2028, time.February, 29))
		a := e.account("feb")
		e.wantBalance(a, 30, 30, 0)
		if !a.PeriodStart.Equal(midnight(2028, time.February, 1)) || !a.NextRecharge.Equal(midnight(2029, time.February, 1)) {
			e.t.Fatalf("period %s to %s", a.PeriodStart, a.NextRecharge)
		}
	}},
	{name: "recharge in every plan month", cfg: plan10, run: func(e *env) {
		for m := 1; m <= 12; m++ {
			e.clock.Set(date(2026, time.March, 10))
			org := fmt.Sprintf("month-%d", m)
			e.setPlan(org, 100, m)
			e.charge(org, 60)
			e.topUp(org, 7, "t")
			due := midnight(2026, time.Month(m), 1)
			if m <= 3 {
				due = midnight(2027, time.Month(m), 1)
			}
			if a := e.account(org); !a.NextRecharge.Equal(due) {
				e.t.Fatalf("month %d: next recharge %s, want %s", m, a.NextRecharge, due)
			}
			e.clock.Set(due.Add(-time.Second))
			e.wantBalance(e.account(org), 47, 40, 7)
			e.clock.Set(due)
			a := e.account(org)
			e.wantBalance(a, 107, 100, 7)
			if !a.PeriodStart.Equal(due) || !a.NextRecharge.Equal(due.AddDate(1, 0, 0)) {
				e.t.Fatalf("month %d: period %s to %s", m, a.PeriodStart, a.NextRecharge)
			}
			e.checkEvents(org)
		}
	}},
	{name: "a refund after the recharge leaves the new period's usage alone", cfg: plan10, run: func(e *env) {
		if _, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "alt-text", Cost: 4, RequestID: "late"}); err != nil {
			e.t.Fatal(err)
		}
		e.clock.Set(midnight(2027, time.January, 1))
		e.charge("acme", 1)
		// The 4 credits came out of 2026's allowance, which expired with
		// its period: the refund gives nothing back.
		s, err := e.ledger.Refund(e.ctx, "acme", "late")
		if err != nil || s.Delta != 0 {
			e.t.Fatalf("refund: %+v %v", s, err)
		}
		a := e.account("acme")
		if a.Used["alt-text"] != 0 || a.Used["rich-text"] != 1 || a.Balance != 9 || a.AllowanceRemaining != 9 {
			e.t.Fatalf("account: %+v", a)
		}
		e.checkEvents("acme")
	}},
	{name: "a refund after the recharge gives back purchased credits and cancels the debt it carried", cfg: plan10, run: func(e *env) {
		e.topUp("acme", 5, "inv-1")
		// 10 of allowance, 5 purchased, 3 of debt.
		r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "flows", Cost: 18, RequestID: "big", Overdraft: true, OverdraftLimit: NoLimit})
		if err != nil || !r.Charged || r.Balance != -3 {
			e.t.Fatalf("charge: %+v %v", r, err)
		}
		e.clock.Set(midnight(2027, time.January, 1))
		e.wantBalance(e.account("acme"), 7, 7, 0)
		s, err := e.ledger.Refund(e.ctx, "acme", "big")
		if err != nil || s.Delta != 8 {
			e.t.Fatalf("refund: %+v %v", s, err)
		}
		// As if the call had never been: 2027 starts with all 10, and the
		// 5 purchased credits are back.
		e.wantBalance(e.account("acme"), 15, 10, 5)
		e.checkEvents("acme")
	}},
	{name: "a refund across two recharges never lifts the allowance above the plan", cfg: Config{DefaultPlan: Plan{Allowance: 3}}, run: func(e *env) {
		r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "flows", Cost: 10, RequestID: "deep", Overdraft: true, OverdraftLimit: NoLimit})
		if err != nil || !r.Charged || r.Balance != -7 {
			e.t.Fatalf("charge: %+v %v", r, err)
		}
		e.clock.Set(midnight(2028, time.January, 2))
		e.wantBalance(e.account("acme"), -1, -1, 0) // 3 - 7, then 3 - 4
		if s, err := e.ledger.Refund(e.ctx, "acme", "deep"); err != nil || s.Delta != 4 {
			e.t.Fatalf("refund: %+v %v", s, err)
		}
		e.wantBalance(e.account("acme"), 3, 3, 0)
		e.checkEvents("acme")
	}},
}
