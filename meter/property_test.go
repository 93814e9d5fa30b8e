package meter

import (
	"flag"
	"fmt"
	"testing"
	"time"

	"pgregory.net/rapid"
)

// model is the ledger's rules written plainly, without Redis, for the
// property test to compare against.
type model struct {
	plan     Plan
	accounts map[string]*modelAccount
	charges  map[string]*modelCharge // by org + " " + request id
	refs     map[string]bool         // by org + " " + reference
	// grants, topUps and charged add up, per org, to what the balance must be.
	grants, topUps, charged map[string]int64
}

type modelAccount struct {
	plan         Plan
	next         *Plan
	own          bool
	rem, pur     int64
	periodStart  time.Time
	nextRecharge time.Time
	used         map[string]int64
}

type modelCharge struct {
	feature       string
	cost          int64
	fromPurchased int64
	periodStart   time.Time
	settled       bool
}

func nextMonthStart(after time.Time, month int) time.Time {
	t := time.Date(after.Year(), time.Month(month), 1, 0, 0, 0, 0, time.UTC)
	if !t.After(after) {
		t = t.AddDate(1, 0, 0)
	}
	return t
}

func (m *model) account(org string, now time.Time, create bool) *modelAccount {
	a := m.accounts[org]
	if a == nil {
		if !create {
			return nil
		}
		d := defaultAccount(org, m.plan, now)
		a = &modelAccount{plan: m.plan, rem: m.plan.Allowance, periodStart: d.PeriodStart, nextRecharge: d.NextRecharge, used: map[string]int64{}}
		m.accounts[org] = a
		m.grants[org] += a.rem
	}
	for !now.Before(a.nextRecharge) {
		m.startPeriod(org, a, a.nextRecharge)
	}
	return a
}

func (m *model) startPeriod(org string, a *modelAccount, at time.Time) {
	if a.next != nil {
		a.plan, a.next = *a.next, nil
	}
	before := a.rem
	a.rem = a.plan.Allowance + min(a.rem, 0)
	m.grants[org] += a.rem - before
	a.periodStart = at
	a.nextRecharge = nextMonthStart(at, a.plan.RechargeMonth)
	a.used = map[string]int64{}
}

func (a *modelAccount) spend(n int64) int64 {
	fromAllowance := min(n, max(a.rem, 0))
	fromPurchased := min(n-fromAllowance, max(a.pur, 0))
	a.rem -= n - fromPurchased
	a.pur -= fromPurchased
	return fromPurchased
}

// TestLedgerMatchesModel runs random interleavings of charges, settles,
// refunds, repeated charges, top-ups with repeated references, plan changes,
// recharges and clock moves, on each store, and checks after every step that
// the ledger agrees with the model, that balance == grants + top-ups -
// charges, that the events add up to the balance, and that no request id was
// charged twice.
func TestLedgerMatchesModel(t *testing.T) {
	checks := map[string]string{"miniredis": "600", "redis": "400", "cluster": "100"}
	old := flag.Lookup("rapid.checks").Value.String()
	t.Cleanup(func() { flag.Set("rapid.checks", old) })
	for _, s := range stores(t) {
		t.Run(s.name, func(t *testing.T) {
			if err := flag.Set("rapid.checks", checks[s.name]); err != nil {
				t.Fatal(err)
			}
			rapid.Check(t, func(rt *rapid.T) {
				e := newEnv(t, s.rdb, Config{DefaultPlan: Plan{Allowance: 20, RechargeMonth: rapid.IntRange(1, 12).Draw(rt, "default month")}})
				e.clock.Set(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(rapid.Int64Range(0, 3*365*24).Draw(rt, "start hour")) * time.Hour))
				m := &model{plan: e.ledger.DefaultPlan(), accounts: map[string]*modelAccount{}, charges: map[string]*modelCharge{},
					refs: map[string]bool{}, grants: map[string]int64{}, topUps: map[string]int64{}, charged: map[string]int64{}}
				orgs := []string{"a", "b"}
				var ids []string
				steps := rapid.IntRange(1, 60).Draw(rt, "steps")
				for range steps {
					org := rapid.SampledFrom(orgs).Draw(rt, "org")
					now := e.clock.Now()
					switch op := rapid.IntRange(0, 7).Draw(rt, "op"); op {
					case 0, 1: // charge, sometimes repeating a request id
						id := fmt.Sprintf("r%d", len(ids))
						if len(ids) > 0 && rapid.Bool().Draw(rt, "repeat id") {
							id = rapid.SampledFrom(ids).Draw(rt, "id")
						} else {
							ids = append(ids, id)
						}
						cost := rapid.Int64Range(1, 30).Draw(rt, "cost")
						overdraft := rapid.Bool().Draw(rt, "overdraft")
						limit := int64(NoLimit)
						if overdraft && rapid.Bool().Draw(rt, "limited") {
							limit = rapid.Int64Range(0, 40).Draw(rt, "limit")
						}
						feature := rapid.SampledFrom([]string{"rich-text", "flows"}).Draw(rt, "feature")
						got, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: org, Feature: feature, Cost: cost, RequestID: id, Overdraft: overdraft, OverdraftLimit: limit})
						if err != nil {
							rt.Fatal(err)
						}
						key := org + " " + id
						if c := m.charges[key]; c != nil && (!c.settled || c.cost != 0) {
							if !got.Replay || !got.Charged || got.Cost != c.cost {
								rt.Fatalf("repeat of %s: %+v, first cost %d", key, got, c.cost)
							}
							break
						}
						a := m.account(org, now, false)
						bal := m.plan.Allowance
						if a != nil {
							bal = a.rem + a.pur
						}
						ok := (!overdraft && bal >= cost) || (overdraft && (limit < 0 || bal-cost >= -limit))
						if got.Charged != ok || got.Replay {
							rt.Fatalf("charge %d on %d (overdraft %v, limit %d): %+v", cost, bal, overdraft, limit, got)
						}
						if !ok {
							break
						}
						a = m.account(org, now, true)
						fp := a.spend(cost)
						a.used[feature] += cost
						m.charged[org] += cost
						m.charges[key] = &modelCharge{feature: feature, cost: cost, fromPurchased: fp, periodStart: a.periodStart}
						if got.Balance != a.rem+a.pur {
							rt.Fatalf("balance after charge %d, model %d", got.Balance, a.rem+a.pur)
						}
					case 2: // settle or refund, sometimes of an unknown or settled request
						if len(ids) == 0 {
							break
						}
						id := rapid.SampledFrom(ids).Draw(rt, "id")
						actual := rapid.SampledFrom([]int64{0, 0, 1, 5, 20, 40}).Draw(rt, "actual")
						got, err := e.ledger.Settle(e.ctx, org, id, actual)
						c := m.charges[org+" "+id]
						if c == nil {
							if err != ErrUnknownRequest {
								rt.Fatalf("settle of unknown %s: %+v %v", id, got, err)
							}
							break
						}
						if err != nil {
							rt.Fatal(err)
						}
						if c.settled {
							if !got.Repeat || got.Delta != 0 {
								rt.Fatalf("second settle: %+v", got)
							}
							break
						}
						a := m.account(org, now, true)
						diff := actual - c.cost
						if diff > 0 {
							c.fromPurchased += a.spend(diff)
						} else if diff < 0 {
							back := min(-diff, c.fromPurchased)
							a.pur += back
							a.rem += -diff - back
							c.fromPurchased -= back
						}
						if a.periodStart.Equal(c.periodStart) {
							a.used[c.feature] += diff
						}
						m.charged[org] += diff
						c.cost, c.settled = actual, true
						if got.Repeat || got.Delta != -diff || got.Balance != a.rem+a.pur {
							rt.Fatalf("settle to %d: %+v, model balance %d", actual, got, a.rem+a.pur)
						}
					case 3: // top-up, references repeat
						amount := rapid.Int64Range(1, 50).Draw(rt, "amount")
						ref := rapid.SampledFrom([]string{"inv-1", "inv-2", "inv-3", "inv-4"}).Draw(rt, "ref")
						_, applied, err := e.ledger.TopUp(e.ctx, org, amount, ref)
						if err != nil {
							rt.Fatal(err)
						}
						if applied == m.refs[org+" "+ref] {
							rt.Fatalf("top-up %s applied %v, applied before %v", ref, applied, m.refs[org+" "+ref])
						}
						if applied {
							m.refs[org+" "+ref] = true
							m.account(org, now, true).pur += amount
							m.topUps[org] += amount
						}
					case 4: // plan
						p := Plan{Allowance: rapid.Int64Range(0, 50).Draw(rt, "allowance"), RechargeMonth: rapid.IntRange(1, 12).Draw(rt, "month")}
						if _, err := e.ledger.SetPlan(e.ctx, org, p); err != nil {
							rt.Fatal(err)
						}
						a := m.accounts[org]
						switch {
						case a == nil:
							a = &modelAccount{plan: p, own: true, used: map[string]int64{}}
							m.accounts[org] = a
							m.startPeriod(org, a, now.Truncate(time.Second))
							a.nextRecharge = nextMonthStart(monthStart(monthIndex(now)), p.RechargeMonth)
						case !m.account(org, now, true).own:
							a.plan, a.own = p, true
							m.startPeriod(org, a, now.Truncate(time.Second))
							a.nextRecharge = nextMonthStart(monthStart(monthIndex(now)), p.RechargeMonth)
						case a.plan == p:
							a.next = nil
						default:
							a.next = &p
						}
					case 5: // recharge now
						if _, err := e.ledger.Recharge(e.ctx, org); err != nil {
							rt.Fatal(err)
						}
						a := m.account(org, now, true)
						m.startPeriod(org, a, now.Truncate(time.Second))
						a.nextRecharge = nextMonthStart(monthStart(monthIndex(now)), a.plan.RechargeMonth)
					case 6, 7: // the clock moves
						e.clock.Add(time.Duration(rapid.Int64Range(0, 400*24).Draw(rt, "hours")) * time.Hour)
					}
					now = e.clock.Now()
					for _, org := range orgs {
						ma := m.account(org, now, false)
						got, err := e.ledger.Account(e.ctx, org)
						if ma == nil {
							if err != ErrNotFound {
								rt.Fatalf("org %s: %+v %v, want not found", org, got, err)
							}
							continue
						}
						if err != nil {
							rt.Fatal(err)
						}
						want := fmt.Sprintf("rem %d pur %d plan %v own %v start %s next %s used %v",
							ma.rem, ma.pur, ma.plan, ma.own, ma.periodStart.Format(time.RFC3339), ma.nextRecharge.Format(time.RFC3339), nonZero(ma.used))
						have := fmt.Sprintf("rem %d pur %d plan %v own %v start %s next %s used %v",
							got.AllowanceRemaining, got.Purchased, got.Plan, got.OwnPlan, got.PeriodStart.Format(time.RFC3339), got.NextRecharge.Format(time.RFC3339), nonZero(got.Used))
						if want != have {
							rt.Fatalf("org %s at %s:\nledger %s\nmodel  %s", org, now, have, want)
						}
						if got.Balance != m.grants[org]+m.topUps[org]-m.charged[org] {
							rt.Fatalf("org %s: balance %d != grants %d + top-ups %d - charges %d",
								org, got.Balance, m.grants[org], m.topUps[org], m.charged[org])
						}
						e.checkEvents(org)
					}
				}
				// The ledger's own record: one charge event per request id.
				for _, org := range orgs {
					if m.accounts[org] == nil {
						continue
					}
					events := e.checkEvents(org)
					active := map[string]int{}
					for i := len(events) - 1; i >= 0; i-- {
						switch ev := events[i]; ev.Kind {
						case "charge":
							if active[ev.Ref]++; active[ev.Ref] > 1 {
								rt.Fatalf("org %s: request %s charged twice", org, ev.Ref)
							}
						case "refund":
							active[ev.Ref]--
						}
					}
				}
			})
		})
	}
}

func nonZero(m map[string]int64) map[string]int64 {
	out := map[string]int64{}
	for k, v := range m {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}
