package meter

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/creditsgw/caddy-credits/policy"
)

func init() {
	ledgerCases = append(ledgerCases, budgetCases...)
}

// spend charges org cost credits against subject's budget, on an
// overdraft route when overdraft is set.
func (e *env) spend(org, subject string, cost int64, overdraft bool) ChargeResult {
	e.t.Helper()
	r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: org, Feature: "rich-text", Cost: cost, Subject: subject,
		Overdraft: overdraft, OverdraftLimit: NoLimit})
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

func (e *env) setBudget(org, subject string, limit int64, window string) Budget {
	e.t.Helper()
	b, err := e.ledger.SetBudget(e.ctx, org, subject, BudgetLimit{Limit: limit, Window: window})
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

func (e *env) budget(org, subject string) Budget {
	e.t.Helper()
	b, err := e.ledger.Budget(e.ctx, org, subject)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// wantSpent checks what subject spent in its window and has left.
func (e *env) wantSpent(org, subject string, spent, remaining int64) {
	e.t.Helper()
	if b := e.budget(org, subject); b.Spent != spent || b.Remaining != remaining {
		e.t.Fatalf("budget of %s: %+v, want spent %d, remaining %d", subject, b, spent, remaining)
	}
}

// budgetFields lists the fields of org's budgets hash.
func (e *env) budgetFields(org string) []string {
	e.t.Helper()
	f, err := e.rdb.HKeys(e.ctx, e.ledger.Keys().Budgets(org)).Result()
	if err != nil {
		e.t.Fatal(err)
	}
	return f
}

var budgetCases = []ledgerCase{
	{name: "a budget refuses what it cannot pay, and the org's credits are not touched", cfg: plan10, run: func(e *env) {
		b := e.setBudget("acme", "alice", 5, WindowDay)
		if b.Subject != "alice" || b.Limit != 5 || b.Spent != 0 || b.Remaining != 5 || b.Default ||
			!b.Resets.Equal(time.Date(2026, time.March, 11, 0, 0, 0, 0, time.UTC)) {
			e.t.Fatalf("budget set: %+v", b)
		}
		for i, want := range []int64{3, 1} {
			r := e.spend("acme", "alice", 2, false)
			if !r.Charged || r.OverBudget || r.Budget == nil || r.Budget.Remaining() != want || r.Budget.Limit != 5 {
				e.t.Fatalf("charge %d: %+v (budget %+v)", i, r, r.Budget)
			}
		}
		r := e.spend("acme", "alice", 2, false)
		if r.Charged || !r.OverBudget || r.Budget == nil || r.Budget.Spent != 4 || r.Balance != 6 {
			e.t.Fatalf("a charge above the budget: %+v (budget %+v)", r, r.Budget)
		}
		e.wantBalance(e.account("acme"), 6, 6, 0)
		// The rest of the budget still pays a smaller call.
		if r := e.spend("acme", "alice", 1, false); !r.Charged || r.Budget.Remaining() != 0 {
			e.t.Fatalf("the last credit: %+v", r)
		}
		e.wantSpent("acme", "alice", 5, 0)
		// Bob has no budget, nor the org a default: no limit, and nothing
		// written for him.
		if r := e.spend("acme", "bob", 4, false); !r.Charged || r.Budget != nil {
			e.t.Fatalf("a subject with no budget: %+v", r)
		}
		for _, f := range e.budgetFields("acme") {
			if strings.Contains(f, "bob") {
				e.t.Fatalf("the budgets hold %s for a subject with no budget", f)
			}
		}
		if _, err := e.ledger.Budget(e.ctx, "acme", "bob"); !errors.Is(err, ErrBudgetNotFound) {
			e.t.Fatalf("bob's budget: %v", err)
		}
		e.wantBalance(e.account("acme"), 1, 1, 0)
		e.checkEvents("acme")
	}},
	{name: "the default budget counts each subject with none of its own apart", cfg: plan10, run: func(e *env) {
		e.setBudget("acme", "", 3, WindowWeek)
		e.setBudget("acme", "alice", 5, WindowDay)
		for _, s := range []string{"carol", "dave"} {
			if r := e.spend("acme", s, 3, false); !r.Charged || r.Budget.Remaining() != 0 {
				e.t.Fatalf("%s: %+v", s, r)
			}
			if r := e.spend("acme", s, 1, false); r.Charged || !r.OverBudget {
				e.t.Fatalf("%s above the default: %+v", s, r)
			}
		}
		if r := e.spend("acme", "alice", 4, false); !r.Charged || r.Budget.Remaining() != 1 {
			e.t.Fatalf("alice's own budget: %+v", r)
		}
		b := e.budget("acme", "carol")
		// March 10th 2026 is a Tuesday: the week ends on Monday the 16th.
		if !b.Default || b.Window != WindowWeek || b.Spent != 3 || !b.Resets.Equal(time.Date(2026, time.March, 16, 0, 0, 0, 0, time.UTC)) {
			e.t.Fatalf("carol's budget: %+v", b)
		}
		e.topUp("acme", 5, "t1")
		if r := e.spend("acme", "carol", 1, false); !r.OverBudget {
			e.t.Fatalf("the same week: %+v", r)
		}
		e.clock.Set(date(2026, time.March, 16))
		if r := e.spend("acme", "carol", 3, false); !r.Charged {
			e.t.Fatalf("a new week: %+v", r)
		}
		e.wantBalance(e.account("acme"), 2, 0, 2)
	}},
	{name: "an overdraft route counts spending and never refuses", cfg: plan10, run: func(e *env) {
		e.setBudget("acme", "alice", 2, WindowMonth)
		for range 3 {
			if r := e.spend("acme", "alice", 2, true); !r.Charged || r.OverBudget {
				e.t.Fatalf("overdraft: %+v", r)
			}
		}
		e.wantSpent("acme", "alice", 6, 0)
		if r := e.spend("acme", "alice", 1, false); !r.OverBudget {
			e.t.Fatalf("a block call past the spent budget: %+v", r)
		}
		if b := e.budget("acme", "alice"); !b.Resets.Equal(time.Date(2026, time.April, 1, 0, 0, 0, 0, time.UTC)) {
			e.t.Fatalf("a month's budget resets %s", b.Resets)
		}
	}},
	{name: "refunds and settles change the window the call was charged in", cfg: plan10, run: func(e *env) {
		e.setBudget("acme", "alice", 5, WindowDay)
		r := e.spend("acme", "alice", 3, false)
		if _, err := e.ledger.Refund(e.ctx, "acme", r.RequestID); err != nil {
			e.t.Fatal(err)
		}
		e.wantSpent("acme", "alice", 0, 5)
		r = e.spend("acme", "alice", 2, false)
		if _, err := e.ledger.Settle(e.ctx, "acme", r.RequestID, 4); err != nil {
			e.t.Fatal(err)
		}
		e.wantSpent("acme", "alice", 4, 1)
		late := e.spend("acme", "alice", 1, false)
		e.wantSpent("acme", "alice", 5, 0)
		// Charged yesterday, refunded today: today's window gets nothing.
		e.clock.Add(24 * time.Hour)
		if r := e.spend("acme", "alice", 1, false); !r.Charged {
			e.t.Fatalf("a new day: %+v", r)
		}
		if _, err := e.ledger.Refund(e.ctx, "acme", late.RequestID); err != nil {
			e.t.Fatal(err)
		}
		e.wantSpent("acme", "alice", 1, 4)
		e.wantBalance(e.account("acme"), 10-4-1, 10-4-1, 0)
	}},
	{name: "a period budget starts again at the recharge", cfg: plan10, run: func(e *env) {
		e.setBudget("acme", "alice", 4, WindowPeriod)
		e.spend("acme", "alice", 4, false)
		if r := e.spend("acme", "alice", 1, false); !r.OverBudget || !r.Budget.Resets.Equal(time.Date(2027, time.January, 1, 0, 0, 0, 0, time.UTC)) {
			e.t.Fatalf("spent: %+v", r.Budget)
		}
		if _, _, err := e.ledger.Recharge(e.ctx, "acme", "r1"); err != nil {
			e.t.Fatal(err)
		}
		e.wantSpent("acme", "alice", 0, 4)
		if r := e.spend("acme", "alice", 4, false); !r.Charged {
			e.t.Fatalf("after the recharge: %+v", r)
		}
	}},
	{name: "a lowered limit keeps the spending, and a removed budget leaves nothing", cfg: plan10, run: func(e *env) {
		e.setBudget("acme", "alice", 8, WindowDay)
		e.spend("acme", "alice", 5, false)
		b := e.setBudget("acme", "alice", 3, WindowDay)
		if b.Spent != 5 || b.Remaining != 0 {
			e.t.Fatalf("lowered below the spending: %+v", b)
		}
		if r := e.spend("acme", "alice", 1, false); !r.OverBudget {
			e.t.Fatalf("a call past a lowered limit: %+v", r)
		}
		if b, err := e.ledger.DeleteBudget(e.ctx, "acme", "alice"); err != nil || b.Limit != 3 || b.Spent != 5 {
			e.t.Fatalf("removed: %+v, %v", b, err)
		}
		if _, err := e.ledger.DeleteBudget(e.ctx, "acme", "alice"); !errors.Is(err, ErrBudgetNotFound) {
			e.t.Fatalf("removed twice: %v", err)
		}
		if f := e.budgetFields("acme"); len(f) != 0 {
			e.t.Fatalf("a removed budget leaves %v", f)
		}
		if r := e.spend("acme", "alice", 5, false); !r.Charged || r.Budget != nil {
			e.t.Fatalf("no budget: %+v", r)
		}
		// Under the default, then without it.
		e.topUp("acme", 10, "t1")
		e.setBudget("acme", "", 2, WindowDay)
		e.spend("acme", "carol", 2, false)
		e.setBudget("acme", "dave", 9, WindowDay)
		e.spend("acme", "dave", 1, false)
		if b, err := e.ledger.DeleteBudget(e.ctx, "acme", ""); err != nil || b.Limit != 2 || b.Subject != "" {
			e.t.Fatalf("the default removed: %+v, %v", b, err)
		}
		if f := strings.Join(e.budgetFields("acme"), " "); strings.Contains(f, "carol") || !strings.Contains(f, "s:dave") {
			e.t.Fatalf("the default removed, the budgets hold %s", f)
		}
		e.wantSpent("acme", "dave", 1, 8)
	}},
	{name: "budgets page in order of their subjects", cfg: plan10, run: func(e *env) {
		for i := 5; i >= 1; i-- {
			e.setBudget("acme", fmt.Sprintf("user-%d", i), int64(i), WindowDay)
		}
		e.spend("acme", "user-2", 1, false)
		var got []string
		after := ""
		for pages := 0; ; pages++ {
			p, err := e.ledger.Budgets(e.ctx, "acme", after, 2)
			if err != nil {
				e.t.Fatal(err)
			}
			if p.Default != nil || pages > 3 {
				e.t.Fatalf("page %d: %+v", pages, p)
			}
			for _, b := range p.Budgets {
				got = append(got, fmt.Sprintf("%s:%d/%d", b.Subject, b.Spent, b.Limit))
			}
			if p.Next == "" {
				break
			}
			after = p.Next
		}
		if want := "user-1:0/1 user-2:1/2 user-3:0/3 user-4:0/4 user-5:0/5"; strings.Join(got, " ") != want {
			e.t.Fatalf("pages: %s, want %s", strings.Join(got, " "), want)
		}
		e.setBudget("acme", "", 7, WindowPeriod)
		p, err := e.ledger.Budgets(e.ctx, "acme", "user-4", 10)
		if err != nil || p.Default == nil || p.Default.Limit != 7 || p.Default.Subject != "" || len(p.Budgets) != 1 || p.Next != "" {
			e.t.Fatalf("the last page with a default: %+v, %v", p, err)
		}
	}},
	{name: "bad budgets are refused and change nothing", cfg: plan10, run: func(e *env) {
		before := e.dump()
		for _, c := range []struct {
			subject string
			limit   BudgetLimit
		}{
			{"alice", BudgetLimit{0, WindowDay}},
			{"alice", BudgetLimit{MaxAmount + 1, WindowDay}},
			{"alice", BudgetLimit{5, "year"}},
			{"no spaces", BudgetLimit{5, WindowDay}},
			{"-dash", BudgetLimit{5, WindowDay}},
		} {
			_, err := e.ledger.SetBudget(e.ctx, "acme", c.subject, c.limit)
			var in *policy.InputError
			if !errors.As(err, &in) {
				e.t.Fatalf("SetBudget(%q, %+v) = %v, want an input error", c.subject, c.limit, err)
			}
		}
		if _, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "f", Cost: 1, Subject: "a b"}); err == nil {
			e.t.Fatal("a charge with a bad subject went through")
		}
		if after := e.dump(); fmt.Sprint(after) != fmt.Sprint(before) {
			e.t.Fatalf("bad input changed Redis: %v", after)
		}
	}},
}
