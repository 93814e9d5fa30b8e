package meter

import (
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

func init() {
	ledgerCases = append(ledgerCases, leaseBudgetCases...)
}

// spendAs makes n cost-1 calls of subject's on org from the leasers, at
// once, each charged on its own when its lease cannot pay it, as the
// gateway does; it returns how many were paid, and how many from a lease.
func spendAs(e *env, leasers []*Leaser, org, subject string, n int) (paid, leased int64) {
	var paidN, leasedN atomic.Int64
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if _, ok, err := leasers[i%len(leasers)].SpendAs(org, subject, "rich-text", 1); err != nil {
				e.t.Error(err)
				return
			} else if ok {
				paidN.Add(1)
				leasedN.Add(1)
				return
			}
			r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: org, Feature: "rich-text", Cost: 1, Subject: subject})
			if err != nil {
				e.t.Error(err)
				return
			}
			if r.Charged {
				paidN.Add(1)
			}
		})
	}
	wg.Wait()
	return paidN.Load(), leasedN.Load()
}

// spendOneByOne is spendAs with one call after another.
func spendOneByOne(e *env, ls *Leaser, org, subject string, n int) (paid, leased int64) {
	for range n {
		p, l := spendAs(e, []*Leaser{ls}, org, subject, 1)
		paid, leased = paid+p, leased+l
	}
	return paid, leased
}

// shareOf returns the share of subject's budget ls holds for org, and
// whether a sync answered for it.
func shareOf(ls *Leaser, org, subject string) (held int64, known bool) {
	v, ok := ls.orgs.Load(org)
	if !ok {
		return 0, false
	}
	le := v.(*lease)
	le.mu.Lock()
	defer le.mu.Unlock()
	sh := le.subjects[subject]
	if sh == nil {
		return 0, false
	}
	return sh.held, sh.known
}

// leaseShare makes org busy on ls, with calls of subject's, until ls holds
// a share of its budget (a lease gives a share back once its calls stop);
// it returns the calls paid meanwhile and the share.
func leaseShare(e *env, ls *Leaser, org, subject string) (paid, share int64) {
	e.t.Helper()
	paid, _ = spendOneByOne(e, ls, org, subject, leaseAfter+1)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if held, known := shareOf(ls, org, subject); known && held > 0 {
			return paid, held
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("the lease holds no share of %s's budget", subject)
		}
		time.Sleep(time.Millisecond)
		p, _ := spendOneByOne(e, ls, org, subject, 1)
		paid += p
	}
}

// kill stops a leaser as a killed gateway stops: no report, nothing given
// back.
func (ls *Leaser) kill() {
	ls.closed.Store(true)
	close(ls.stop)
	<-ls.done
}

// wantBudget checks subject's budget in org: spent, and, with the leases
// gone, the r: field of their shares gone too.
func (e *env) wantBudget(org, subject string, spent int64) {
	e.t.Helper()
	b, err := e.ledger.Budget(e.ctx, org, subject)
	if err != nil {
		e.t.Fatal(err)
	}
	if b.Spent != spent {
		e.t.Fatalf("%s's budget spent %d, want %d", subject, b.Spent, spent)
	}
}

// budgetSpent returns what subject's budget in org spent.
func (e *env) budgetSpent(org, subject string) int64 {
	e.t.Helper()
	b, err := e.ledger.Budget(e.ctx, org, subject)
	if err != nil {
		e.t.Fatal(err)
	}
	return b.Spent
}

// reserved returns the credits of subject's budget that leases' shares
// hold in Redis, live or not.
func (e *env) reserved(org, subject string) int64 {
	e.t.Helper()
	var n int64
	for _, f := range strings.Fields(e.shares(org, subject)) {
		if _, v, ok := strings.Cut(f, "="); ok {
			x, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				e.t.Fatal(err)
			}
			n += x
		}
	}
	return n
}

// shares returns the r: field of subject's budget in org, as Redis holds it.
func (e *env) shares(org, subject string) string {
	e.t.Helper()
	return e.rdb.HGet(e.ctx, e.ledger.keys.Budgets(org), "r:"+subject).Val()
}

var leaseBudgetCases = []ledgerCase{
	{name: "a subject's first call waits for its share, and one its share cannot pay gets the whole budget", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		for subject, limit := range map[string]int64{"fresh": 100, "newbie": 20} {
			if _, err := e.ledger.SetBudget(e.ctx, "busy", subject, BudgetLimit{Limit: limit, Window: WindowDay}); err != nil {
				e.t.Fatal(err)
			}
		}
		ls := NewLeaser(e.ledger, testLease, zap.NewNop())
		defer ls.Close()
		// The org is busy and leased, by calls without a subject.
		for i := 0; ; i++ {
			if _, ok, err := ls.Spend("busy", "rich-text", 1); err != nil || ok {
				if err != nil {
					e.t.Fatal(err)
				}
				break
			}
			if i > 10 {
				e.t.Fatal("the org is not leased after 10 calls")
			}
		}
		// A subject the lease has not seen: its call waits for a share,
		// and is paid from it.
		if rc, ok, err := ls.SpendAs("busy", "fresh", "rich-text", 1); err != nil || !ok || !rc.Budgeted || rc.BudgetRemaining != 99 {
			e.t.Fatalf("fresh's first call: %+v, leased %v, %v", rc, ok, err)
		}
		// One whose cost is more than the share the budget allows (at most
		// half of what it has left): the lease holds none of it when the
		// call is charged on its own, so the charge may take all 20.
		if rc, ok, err := ls.SpendAs("busy", "newbie", "rich-text", 12); err != nil || ok {
			e.t.Fatalf("newbie's call of 12 on a budget of 20: %+v, leased %v, %v", rc, ok, err)
		}
		if r := e.shares("busy", "newbie"); r != "" {
			e.t.Fatalf("the lease holds a share of newbie's budget while its call is charged on its own: %q", r)
		}
		r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "busy", Feature: "rich-text", Cost: 12, Subject: "newbie"})
		if err != nil || !r.Charged {
			e.t.Fatalf("newbie's call of 12, on its own: %+v %v", r, err)
		}
		e.wantBudget("busy", "newbie", 12)
	}},
	{name: "a lease pays a subject's calls from its share of the budget", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		if _, err := e.ledger.SetBudget(e.ctx, "busy", "alice", BudgetLimit{Limit: 40, Window: WindowDay}); err != nil {
			e.t.Fatal(err)
		}
		ls := NewLeaser(e.ledger, testLease, zap.NewNop())
		first, share := leaseShare(e, ls, "busy", "alice")
		if r := e.shares("busy", "alice"); r == "" {
			e.t.Fatal("Redis holds no share of alice's budget for the lease")
		}
		paid, leased := spendOneByOne(e, ls, "busy", "alice", 100)
		ls.Close()
		if first+paid != 40 || leased < 20 {
			e.t.Fatalf("paid %d calls on a budget of 40 (%d first, a share of %d), %d from the lease", first+paid, first, share, leased)
		}
		e.wantBudget("busy", "alice", 40)
		if a := e.account("busy"); a.Balance != 960 || a.Held != 0 {
			e.t.Fatalf("account %+v after 40 calls of 1000 credits", a)
		}
		if r := e.shares("busy", "alice"); r != "" {
			e.t.Fatalf("the lease was given back, its share stays: %q", r)
		}
		if p, _ := spendAs(e, []*Leaser{e.leaserNone()}, "busy", "alice", 1); p != 0 {
			e.t.Fatal("a spent budget paid a call")
		}
	}},
	{name: "refunds and settles of leased calls count in the budget's window", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		if _, err := e.ledger.SetBudget(e.ctx, "busy", "hana", BudgetLimit{Limit: 100, Window: WindowDay}); err != nil {
			e.t.Fatal(err)
		}
		ls := NewLeaser(e.ledger, testLease, zap.NewNop())
		first, _ := leaseShare(e, ls, "busy", "hana")
		var rcs []Receipt
		for len(rcs) < 4 {
			rc, ok, err := ls.SpendAs("busy", "hana", "rich-text", 2)
			if err != nil {
				e.t.Fatal(err)
			}
			if !ok {
				e.t.Fatal("a call with a share left was not leased")
			}
			if !rc.Budgeted || rc.BudgetRemaining < 0 || rc.BudgetRemaining > 100 {
				e.t.Fatalf("receipt %+v", rc)
			}
			rcs = append(rcs, rc)
		}
		// One refunded and one settled above its cost before any report,
		// the others after the lease reported them.
		ls.Adjust("busy", "rich-text", rcs[0], 2, 0)
		ls.Adjust("busy", "rich-text", rcs[1], 2, 5)
		flushes := ls.flushes.Load()
		for ls.flushes.Load() < flushes+3 {
			time.Sleep(time.Millisecond)
		}
		ls.Adjust("busy", "rich-text", rcs[2], 2, 0)
		ls.Adjust("busy", "rich-text", rcs[3], 2, 3)
		ls.Close()
		// 0 + 5 + 0 + 3 of the four calls.
		e.wantBudget("busy", "hana", first+8)
		if a := e.account("busy"); a.Balance != 1000-first-8 {
			e.t.Fatalf("balance %d, want %d", a.Balance, 1000-first-8)
		}
	}},
	{name: "leases and charges never overspend a budget", cfg: Config{DefaultPlan: Plan{Allowance: 1000}, EventsMax: 5000}, run: func(e *env) {
		if _, err := e.ledger.SetBudget(e.ctx, "busy", "", BudgetLimit{Limit: 100, Window: WindowMonth}); err != nil {
			e.t.Fatal(err)
		}
		a := NewLeaser(e.ledger, testLease, zap.NewNop())
		b := NewLeaser(e.ledger, testLease, zap.NewNop())
		pa, _ := leaseShare(e, a, "busy", "bob")
		pb, _ := leaseShare(e, b, "busy", "bob")
		before := pa + pb
		paid, leased := spendAs(e, []*Leaser{a, b}, "busy", "bob", 400)
		a.Close()
		b.Close()
		b1, err := e.ledger.Budget(e.ctx, "busy", "bob")
		if err != nil {
			e.t.Fatal(err)
		}
		e.t.Logf("%d calls paid at once, %d from leases; spent %d", paid, leased, b1.Spent)
		if b1.Spent > 100 || b1.Spent != paid+before || leased == 0 {
			e.t.Fatalf("spent %d of a budget of 100 (%d calls paid now, %d from leases)", b1.Spent, paid, leased)
		}
		// With the leases given back, what the budget has left is paid to
		// the credit, and no more.
		more, _ := spendAs(e, []*Leaser{e.leaserNone()}, "busy", "bob", 200)
		if b1.Spent+more != 100 {
			e.t.Fatalf("spent %d, then %d paid: want the budget of 100 to the credit", b1.Spent, more)
		}
		e.wantBudget("busy", "bob", 100)
		if acc := e.account("busy"); acc.Balance != 900 {
			e.t.Fatalf("balance %d after 100 calls", acc.Balance)
		}
	}},
	{name: "a killed gateway's share comes back when it is released", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		if _, err := e.ledger.SetBudget(e.ctx, "busy", "carol", BudgetLimit{Limit: 40, Window: WindowPeriod}); err != nil {
			e.t.Fatal(err)
		}
		ls := NewLeaser(e.ledger, testLease, zap.NewNop())
		leaseShare(e, ls, "busy", "carol")
		ls.kill()
		spent, reserved := e.budgetSpent("busy", "carol"), e.reserved("busy", "carol")
		if reserved == 0 {
			e.t.Fatal("the killed lease holds no share in Redis")
		}
		// The killed gateway may have spent its share: no one else may.
		paid, _ := spendOneByOne(e, e.leaserNone(), "busy", "carol", 50)
		if spent+paid+reserved != 40 {
			e.t.Fatalf("paid %d more while a killed lease holds %d of a budget of 40 (%d spent before)", paid, reserved, spent)
		}
		e.moveServerClock(testLease.TTL + time.Second)
		if p, _ := spendOneByOne(e, e.leaserNone(), "busy", "carol", 1); p != 0 {
			e.t.Fatal("an unreported lease's share was spent again")
		}
		// An operator who knows the gateway is gone gives the share back.
		holds, err := e.ledger.Holds(e.ctx, "busy")
		if err != nil || len(holds) != 1 || holds[0].State != HoldUnreported {
			e.t.Fatalf("holds %+v, %v", holds, err)
		}
		if _, _, _, err := e.ledger.ReleaseLease(e.ctx, "busy", holds[0].ID, "gateway killed"); err != nil {
			e.t.Fatal(err)
		}
		if p, _ := spendOneByOne(e, e.leaserNone(), "busy", "carol", 50); p != reserved {
			e.t.Fatalf("paid %d of carol's budget after the lease's release, want its share %d", p, reserved)
		}
		e.wantBudget("busy", "carol", 40)
	}},
	{name: "an unreported lease's share comes back after its bound", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		if _, err := e.ledger.SetBudget(e.ctx, "busy", "erin", BudgetLimit{Limit: 40, Window: WindowPeriod}); err != nil {
			e.t.Fatal(err)
		}
		ls := NewLeaser(e.ledger, testLease, zap.NewNop())
		leaseShare(e, ls, "busy", "erin")
		ls.kill()
		spent, reserved := e.budgetSpent("busy", "erin"), e.reserved("busy", "erin")
		e.moveServerClock(testLease.TTL + time.Second)
		if p, _ := spendOneByOne(e, e.leaserNone(), "busy", "erin", 50); p != 40-spent-reserved {
			e.t.Fatalf("paid %d of erin's budget beside an unreported lease's share of %d, want %d", p, reserved, 40-spent-reserved)
		}
		e.moveServerClock(24 * time.Hour)
		if p, _ := spendOneByOne(e, e.leaserNone(), "busy", "erin", 50); p != reserved {
			e.t.Fatalf("paid %d of erin's budget a day after the lease's last report, want its share %d", p, reserved)
		}
		e.wantBudget("busy", "erin", 40)
	}},
	{name: "a lowered limit shrinks the shares at the next sync", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		if _, err := e.ledger.SetBudget(e.ctx, "busy", "frank", BudgetLimit{Limit: 40, Window: WindowDay}); err != nil {
			e.t.Fatal(err)
		}
		sync := func(seq, spent, unspent int64, window string) Share {
			e.t.Helper()
			st, err := e.ledger.SyncLease(e.ctx, LeaseSync{Org: "busy", ID: "gw", Seq: seq, Want: 100, TTL: time.Minute,
				Subjects: map[string]SubjectSync{"frank": {Window: window, Spent: spent, Want: 50, Unspent: unspent}}})
			if err != nil {
				e.t.Fatal(err)
			}
			return st.Shares["frank"]
		}
		s := sync(1, 0, 0, "")
		if s.Held != 20 || s.Limit != 40 || s.Spent != 0 || s.Window != "d20260310" || s.Left != 12*time.Hour {
			e.t.Fatalf("first share %+v, want half of the budget of 40, of the day", s)
		}
		if _, err := e.ledger.SetBudget(e.ctx, "busy", "frank", BudgetLimit{Limit: 10, Window: WindowDay}); err != nil {
			e.t.Fatal(err)
		}
		// The lease's 20 are set aside: no call of frank's own is paid.
		if r := e.chargeAs("busy", "frank"); r.Charged {
			e.t.Fatalf("a charge was paid beside a share of 20 under a limit of 10: %+v", r)
		}
		// The next sync leaves the lease only what the new limit leaves,
		// though it held 20 unspent.
		if s = sync(2, 0, 20, s.Window); s.Held != 10 {
			e.t.Fatalf("share %+v after the limit was lowered to 10, want 10", s)
		}
		if s = sync(3, 10, 10, s.Window); s.Held != 0 || s.Spent != 10 {
			e.t.Fatalf("share %+v once 10 were spent of a limit of 10", s)
		}
		if r := e.chargeAs("busy", "frank"); r.Charged {
			e.t.Fatalf("a charge was paid past a lowered limit: %+v", r)
		}
		e.wantBudget("busy", "frank", 10)
	}},
	{name: "a window's end voids the shares", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		if _, err := e.ledger.SetBudget(e.ctx, "busy", "gina", BudgetLimit{Limit: 40, Window: WindowDay}); err != nil {
			e.t.Fatal(err)
		}
		st, err := e.ledger.SyncLease(e.ctx, LeaseSync{Org: "busy", ID: "gw", Seq: 1, Want: 100, TTL: time.Minute,
			Subjects: map[string]SubjectSync{"gina": {Want: 50}}})
		if err != nil || st.Shares["gina"].Held != 20 {
			e.t.Fatalf("share %+v, %v", st.Shares, err)
		}
		e.clock.Add(24 * time.Hour)
		for i := range 40 {
			if r := e.chargeAs("busy", "gina"); !r.Charged {
				e.t.Fatalf("call %d of a new day refused: the last day's share still counts", i+1)
			}
		}
		// What the lease spent of the last day's share stays with that day.
		st, err = e.ledger.SyncLease(e.ctx, LeaseSync{Org: "busy", ID: "gw", Seq: 2, Want: 100, TTL: time.Minute,
			Subjects: map[string]SubjectSync{"gina": {Window: "d20260310", Spent: 15, Want: 50, Unspent: 5}}})
		if err != nil || st.Shares["gina"].Held != 0 || st.Shares["gina"].Window != "d20260311" {
			e.t.Fatalf("share %+v, %v on a new day whose budget is spent", st.Shares, err)
		}
		e.wantBudget("busy", "gina", 40)
	}},
}

// leaserNone is a leaser that never leases: its calls are charged one by
// one (a gateway with an org not busy yet).
func (e *env) leaserNone() *Leaser {
	ls := NewLeaser(e.ledger, LeaseConfig{Size: 1, Flush: time.Hour, Idle: time.Hour, TTL: time.Hour}, zap.NewNop())
	ls.Close()
	return ls
}

// chargeAs charges a cost-1 call of subject's on org on its own.
func (e *env) chargeAs(org, subject string) ChargeResult {
	e.t.Helper()
	r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: org, Feature: "rich-text", Cost: 1, Subject: subject})
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}
