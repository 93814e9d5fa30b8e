package meter

import (
	"errors"
	"flag"
	"fmt"
	"sort"
	"strings"
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
	holds    map[string]*modelHold   // by org + " " + hold id
	srv      time.Duration           // how far the test moved Redis' clock
	// grants (expiries count as negative grants), topUps and charged add
	// up, per org, to what the balance must be.
	grants, topUps, charged map[string]int64
}

type modelAccount struct {
	plan         Plan
	next         *Plan
	own          bool
	rem, pur     int64 // free: not held
	ha, ho, hp   int64 // held: this period's allowance, an ended one's, purchased
	pn           int
	cd           int64 // debt carried into this period, not cancelled yet
	dp           int64 // debt of this period that top-ups repaid
	periodStart  time.Time
	nextRecharge time.Time
	used         map[string]int64
}

// parts is what a charge took: allowance, purchased credits and debt, in
// period pn.
type parts struct {
	fa, fp, fd int64
	pn         int
}

type modelCharge struct {
	feature  string
	cost     int64
	parts    parts
	settled  bool
	refunded bool // the call failed: its request id is free again
}

type modelHold struct {
	state         byte // l, u, x, c or r
	ofa, fa, fp   int64
	pn            int
	until         time.Duration // on the moved clock: expiry, or when the record goes
	seq           int64
	captured      int64
	cfa, cfp, cfd int64
	feature       string
	rep           time.Duration // a lease's last report, on the moved clock
}

const holdKept = 24 * time.Hour

// unreportedKept is how long a lease keeps its credits after its last
// report, once its gateway stops reporting.
const unreportedKept = 24 * time.Hour

func nextMonthStart(after time.Time, month int) time.Time {
	t := time.Date(after.Year(), time.Month(month), 1, 0, 0, 0, 0, time.UTC)
	if !t.After(after) {
		t = t.AddDate(1, 0, 0)
	}
	return t
}

func (m *model) newAccount(now time.Time) *modelAccount {
	d := defaultAccount("", m.plan, now)
	return &modelAccount{plan: m.plan, rem: m.plan.Allowance, pn: 1, periodStart: d.PeriodStart, nextRecharge: d.NextRecharge, used: map[string]int64{}}
}

func (m *model) account(org string, now time.Time, create bool) *modelAccount {
	a := m.accounts[org]
	if a == nil {
		if !create {
			return nil
		}
		a = m.newAccount(now)
		m.accounts[org] = a
		m.grants[org] += a.rem
	}
	for !now.Before(a.nextRecharge) {
		m.startPeriod(org, a, a.nextRecharge)
	}
	m.sweep(org, a)
	return a
}

func (m *model) startPeriod(org string, a *modelAccount, at time.Time) {
	if a.next != nil {
		a.plan, a.next = *a.next, nil
	}
	before := a.rem
	a.cd, a.dp = max(-a.rem, 0), 0
	a.rem = a.plan.Allowance + min(a.rem, 0)
	m.grants[org] += a.rem - before
	a.ho, a.ha = a.ho+a.ha, 0
	a.pn++
	for key, h := range m.holds {
		if strings.HasPrefix(key, org+" ") {
			h.ofa, h.fa, h.cfa, h.cfd, h.pn = h.ofa+h.fa, 0, 0, 0, a.pn
		}
	}
	a.periodStart = at
	a.nextRecharge = nextMonthStart(at, a.plan.RechargeMonth)
	a.used = map[string]int64{}
}

func (a *modelAccount) take(n int64) parts {
	fa := min(n, max(a.rem, 0))
	fp := min(n-fa, max(a.pur, 0))
	fd := n - fa - fp
	a.rem -= fa + fd
	a.pur -= fp
	return parts{fa, fp, fd, a.pn}
}

// giveBack returns the change to the balance.
func (a *modelAccount) giveBack(p *parts, n int64) int64 {
	var back int64
	d := min(n, p.fd)
	p.fd, n = p.fd-d, n-d
	if p.pn != a.pn {
		d = min(d, a.cd)
		a.cd -= d
	}
	// Debt repaid since by a top-up goes back as purchased credits.
	c := min(d, max(-a.rem, 0))
	r := min(d-c, a.dp)
	a.rem, a.pur, a.dp, back = a.rem+d-r, a.pur+r, a.dp-r, back+d
	f := min(n, p.fp)
	p.fp, n = p.fp-f, n-f
	a.pur, back = a.pur+f, back+f
	al := min(n, p.fa)
	p.fa -= al
	if p.pn == a.pn {
		a.rem, back = a.rem+al, back+al
	}
	return back
}

func (a *modelAccount) balance() int64   { return a.rem + a.pur + a.ha + a.ho + a.hp }
func (a *modelAccount) available() int64 { return a.rem + a.pur }

func (h *modelHold) amount() int64 { return h.ofa + h.fa + h.fp }

// holdLess gives back up to n of what h keeps; it returns the change to the
// balance (an ended period's allowance is gone).
func (m *model) holdLess(org string, a *modelAccount, h *modelHold, n int64) int64 {
	o := min(n, h.ofa)
	h.ofa, a.ho, n = h.ofa-o, a.ho-o, n-o
	f := min(n, h.fp)
	h.fp, a.hp, a.pur, n = h.fp-f, a.hp-f, a.pur+f, n-f
	al := min(n, h.fa)
	h.fa, a.ha, a.rem = h.fa-al, a.ha-al, a.rem+al
	m.grants[org] -= o
	return -o
}

func (m *model) holdMore(a *modelAccount, h *modelHold, n int64) {
	p := a.take(n)
	h.fa, h.fp = h.fa+p.fa, h.fp+p.fp
	a.ha, a.hp = a.ha+p.fa, a.hp+p.fp
}

func (m *model) holdCapture(org string, a *modelAccount, h *modelHold, n int64) {
	m.charged[org] += n
	o := min(n, h.ofa)
	h.ofa, a.ho, n = h.ofa-o, a.ho-o, n-o
	al := min(n, h.fa)
	h.fa, a.ha, h.cfa, n = h.fa-al, a.ha-al, h.cfa+al, n-al
	f := min(n, h.fp)
	h.fp, a.hp, h.cfp, n = h.fp-f, a.hp-f, h.cfp+f, n-f
	if n > 0 {
		p := a.take(n)
		h.cfa, h.cfp, h.cfd = h.cfa+p.fa, h.cfp+p.fp, h.cfd+p.fd
	}
}

// sweep ends the org's holds whose time has passed and drops the records
// whose time to be kept has passed. A lease past its time is unreported,
// keeping its credits for a day after its last report.
func (m *model) sweep(org string, a *modelAccount) {
	for key, h := range m.holds {
		if !strings.HasPrefix(key, org+" ") || h.until > m.srv {
			continue
		}
		if h.state == 'l' && strings.HasPrefix(key, org+" lease:") {
			h.state, h.until = 'u', h.rep+unreportedKept
			if h.until > m.srv {
				continue
			}
		}
		if h.state == 'l' || h.state == 'u' {
			m.holdLess(org, a, h, h.amount())
			h.state, h.until = 'x', m.srv+holdKept
		} else {
			delete(m.holds, key)
		}
	}
}

// TestLedgerMatchesModel runs random interleavings of charges, settles,
// refunds, repeated charges, top-ups with repeated references, plan changes,
// recharges, holds, captures, releases, lease syncs (repeated ones too) and
// moves of the gateway's clock (periods) and of Redis' (expiries), on each
// store, and checks after every step that the ledger agrees with the model,
// that balance == grants + top-ups - captured, that available == balance -
// held, that allowance_remaining never exceeds the plan's allowance, that
// purchased credits never exceed the top-ups, that the events add up to the
// balance, and that no request id was charged twice.
func TestLedgerMatchesModel(t *testing.T) {
	checks := map[string]string{"miniredis": "500", "redis": "300", "cluster": "80"}
	old := flag.Lookup("rapid.checks").Value.String()
	t.Cleanup(func() { flag.Set("rapid.checks", old) })
	for _, s := range stores(t) {
		t.Run(s.name, func(t *testing.T) {
			if err := flag.Set("rapid.checks", checks[s.name]); err != nil {
				t.Fatal(err)
			}
			rapid.Check(t, func(rt *rapid.T) { checkModel(t, rt, s) })
		})
	}
}

func checkModel(t *testing.T, rt *rapid.T, s store) {
	e := newEnv(t, s.rdb, Config{DefaultPlan: Plan{Allowance: 20, RechargeMonth: rapid.IntRange(1, 12).Draw(rt, "default month")}})
	e.clock.Set(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(rapid.Int64Range(0, 3*365*24).Draw(rt, "start hour")) * time.Hour))
	m := &model{plan: e.ledger.DefaultPlan(), accounts: map[string]*modelAccount{}, charges: map[string]*modelCharge{},
		refs: map[string]bool{}, holds: map[string]*modelHold{}, grants: map[string]int64{}, topUps: map[string]int64{}, charged: map[string]int64{}}
	orgs := []string{"a", "b"}
	var ids []string
	holdIDs := []string{"nope"}
	// periods maps an org's period numbers, the ledger's (from its lease
	// syncs' answers) to the model's: {ledger, model} of the same period.
	periods := map[string][2]int64{}
	steps := rapid.IntRange(1, 60).Draw(rt, "steps")
	for range steps {
		org := rapid.SampledFrom(orgs).Draw(rt, "org")
		now := e.clock.Now()
		switch op := rapid.IntRange(0, 12).Draw(rt, "op"); op {
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
			if c := m.charges[key]; c != nil && !c.refunded {
				if !got.Replay || !got.Charged || got.Cost != c.cost {
					rt.Fatalf("repeat of %s: %+v, first cost %d", key, got, c.cost)
				}
				break
			}
			a := m.account(org, now, false)
			if a == nil {
				a = m.newAccount(now)
			}
			free := a.available()
			ok := (!overdraft && free >= cost) || (overdraft && (limit < 0 || free-cost >= -limit))
			if got.Charged != ok || got.Replay {
				rt.Fatalf("charge %d on %d available (overdraft %v, limit %d): %+v", cost, free, overdraft, limit, got)
			}
			if !ok {
				break
			}
			a = m.account(org, now, true)
			p := a.take(cost)
			a.used[feature] += cost
			m.charged[org] += cost
			m.charges[key] = &modelCharge{feature: feature, cost: cost, parts: p}
			if got.Balance != a.balance() {
				rt.Fatalf("balance after charge %d, model %d", got.Balance, a.balance())
			}
		case 2: // settle to a usage, or refund, sometimes of an unknown or settled request
			if len(ids) == 0 {
				break
			}
			id := rapid.SampledFrom(ids).Draw(rt, "id")
			refund := rapid.Bool().Draw(rt, "refund")
			actual := int64(0)
			var got SettleResult
			var err error
			if refund {
				got, err = e.ledger.Refund(e.ctx, org, id)
			} else {
				actual = rapid.SampledFrom([]int64{0, 1, 5, 20, 40}).Draw(rt, "actual")
				got, err = e.ledger.Settle(e.ctx, org, id, actual)
			}
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
			samePeriod := c.parts.pn == a.pn
			var delta int64
			if diff > 0 {
				if !samePeriod {
					c.parts.fa, c.parts.pn = 0, a.pn
				}
				q := a.take(diff)
				c.parts.fa, c.parts.fp, c.parts.fd = c.parts.fa+q.fa, c.parts.fp+q.fp, c.parts.fd+q.fd
				delta = -diff
				m.charged[org] += diff
			} else if diff < 0 {
				delta = a.giveBack(&c.parts, -diff)
				// What is not given back expired with its period, or was
				// covered by a later period's grant.
				m.charged[org] += diff
				m.grants[org] += delta + diff
			}
			if samePeriod {
				a.used[c.feature] += diff
			}
			c.cost, c.settled, c.refunded = actual, true, refund
			if got.Repeat || got.Delta != delta || got.Balance != a.balance() {
				rt.Fatalf("settle to %d (refund %v): %+v, model delta %d balance %d", actual, refund, got, delta, a.balance())
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
				// A top-up repays debt first.
				a := m.account(org, now, true)
				repaid := min(amount, max(-a.rem, 0))
				a.rem += repaid
				a.dp += repaid
				a.pur += amount - repaid
				m.topUps[org] += amount
			}
		case 4: // plan
			p := Plan{Allowance: rapid.Int64Range(0, 50).Draw(rt, "allowance"), RechargeMonth: rapid.IntRange(1, 12).Draw(rt, "month")}
			if _, _, err := e.ledger.SetPlan(e.ctx, org, p, ""); err != nil {
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
			if _, _, err := e.ledger.Recharge(e.ctx, org, ""); err != nil {
				rt.Fatal(err)
			}
			a := m.account(org, now, true)
			m.startPeriod(org, a, now.Truncate(time.Second))
			a.nextRecharge = nextMonthStart(monthStart(monthIndex(now)), a.plan.RechargeMonth)
		case 6: // the gateway's clock moves: periods follow it
			e.clock.Add(time.Duration(rapid.Int64Range(0, 400*24).Draw(rt, "hours")) * time.Hour)
		case 7: // Redis' clock moves: holds expire by it
			d := time.Duration(rapid.Int64Range(0, 30).Draw(rt, "server hours")) * time.Hour
			e.moveServerClock(d)
			m.srv += d
		case 8: // hold, sometimes repeating a reference
			amount := rapid.Int64Range(1, 40).Draw(rt, "hold amount")
			ttl := time.Duration(rapid.Int64Range(1, 3).Draw(rt, "hold hours")) * time.Hour
			ref := rapid.SampledFrom([]string{"", "job-1", "job-2", "job-3"}).Draw(rt, "hold ref")
			h, _, repeat, err := e.ledger.CreateHold(e.ctx, HoldRequest{Org: org, Feature: "flows", Amount: amount, TTL: ttl, Reference: ref})
			var id string
			if ref != "" {
				id = HoldID(ref)
			}
			a := m.account(org, now, false)
			if mh := m.holds[org+" "+id]; id != "" && mh != nil && a != nil {
				if err != nil || !repeat || h.ID != id {
					rt.Fatalf("repeated hold %s: %+v %v %v", ref, h, repeat, err)
				}
				break
			}
			if a == nil {
				a = m.newAccount(now)
			}
			if a.available() < amount {
				if !errors.Is(err, ErrInsufficient) {
					rt.Fatalf("hold %d on %d available: %+v %v", amount, a.available(), h, err)
				}
				break
			}
			if err != nil || repeat || h.State != HoldLive || h.Amount != amount {
				rt.Fatalf("hold %d on %d available: %+v %v %v", amount, a.available(), h, repeat, err)
			}
			a = m.account(org, now, true)
			mh := &modelHold{state: 'l', pn: a.pn, until: m.srv + ttl, feature: "flows"}
			m.holdMore(a, mh, amount)
			m.holds[org+" "+h.ID] = mh
			holdIDs = append(holdIDs, h.ID)
		case 9: // capture
			id := rapid.SampledFrom(holdIDs).Draw(rt, "capture id")
			amount := rapid.Int64Range(0, 50).Draw(rt, "capture amount")
			h, _, repeat, err := e.ledger.CaptureHold(e.ctx, org, id, amount)
			a := m.account(org, now, false)
			mh := m.holds[org+" "+id]
			switch {
			case a == nil || mh == nil:
				if !errors.Is(err, ErrHoldNotFound) {
					rt.Fatalf("capture of unknown hold %s: %+v %v", id, h, err)
				}
			case mh.state == 'c':
				if err != nil || !repeat || h.Captured != mh.captured {
					rt.Fatalf("repeated capture: %+v %v %v, first %d", h, repeat, err, mh.captured)
				}
			case mh.state == 'r':
				if !errors.Is(err, ErrHoldEnded) {
					rt.Fatalf("capture of a released hold: %+v %v", h, err)
				}
			default:
				if err != nil || repeat || h.State != HoldCaptured || h.Captured != amount {
					rt.Fatalf("capture %d: %+v %v %v", amount, h, repeat, err)
				}
				m.holdCapture(org, a, mh, amount)
				m.holdLess(org, a, mh, mh.amount())
				a.used[mh.feature] += amount
				mh.state, mh.captured, mh.until = 'c', amount, m.srv+holdKept
			}
		case 10: // release
			id := rapid.SampledFrom(holdIDs).Draw(rt, "release id")
			h, _, repeat, err := e.ledger.ReleaseHold(e.ctx, org, id)
			a := m.account(org, now, false)
			mh := m.holds[org+" "+id]
			switch {
			case a == nil || mh == nil:
				if !errors.Is(err, ErrHoldNotFound) {
					rt.Fatalf("release of unknown hold %s: %+v %v", id, h, err)
				}
			case mh.state == 'c':
				if !errors.Is(err, ErrHoldEnded) {
					rt.Fatalf("release of a captured hold: %+v %v", h, err)
				}
			case mh.state != 'l':
				if err != nil || !repeat {
					rt.Fatalf("release of an ended hold: %+v %v %v", h, repeat, err)
				}
			default:
				if err != nil || repeat || h.State != HoldReleased {
					rt.Fatalf("release: %+v %v %v", h, repeat, err)
				}
				m.holdLess(org, a, mh, mh.amount())
				mh.state, mh.until = 'r', m.srv+holdKept
			}
		case 11, 12: // a lease sync, sometimes a repeat of the last
			gw := rapid.SampledFrom([]string{"g1", "g2"}).Draw(rt, "gateway")
			key := org + " lease:" + gw
			a := m.account(org, now, false)
			mh := m.holds[key]
			seq := int64(1)
			if mh != nil {
				seq = mh.seq + 1
				if rapid.IntRange(0, 4).Draw(rt, "repeat sync") == 0 {
					seq = mh.seq
				}
			}
			s := LeaseSync{Org: org, ID: gw, Seq: seq, Want: rapid.Int64Range(0, 40).Draw(rt, "want"),
				Keep: rapid.Int64Range(0, 10).Draw(rt, "keep"), TTL: time.Duration(rapid.Int64Range(1, 3).Draw(rt, "lease hours")) * time.Hour,
				Spent: map[string]int64{}}
			for _, f := range []string{"rich-text", "flows"} {
				if n := rapid.Int64Range(-10, 30).Draw(rt, "spent "+f); n != 0 {
					s.Spent[f] = n
				}
			}
			// Corrections of calls an earlier sync reported: in this
			// period, in the one before, or in one not known.
			if p, ok := periods[org]; ok && a != nil && rapid.IntRange(0, 2).Draw(rt, "late") == 0 {
				pn := p[0] + int64(a.pn) - p[1] - rapid.Int64Range(0, 1).Draw(rt, "late period")
				if rapid.IntRange(0, 3).Draw(rt, "late period unknown") == 0 {
					pn = -1
				}
				s.Late = append(s.Late, LateSpend{Feature: "flows", Period: pn, Credits: rapid.Int64Range(-10, 10).Draw(rt, "late credits")})
			}
			kept := int64(0)
			if a != nil && mh != nil && (mh.state == 'l' || mh.state == 'u') {
				kept = mh.amount()
			}
			s.Unspent = rapid.Int64Range(0, kept+5).Draw(rt, "unspent")
			got, err := e.ledger.SyncLease(e.ctx, s)
			if err != nil {
				rt.Fatal(err)
			}
			if a != nil && mh != nil && seq <= mh.seq {
				if !got.Repeat || got.Held != kept {
					rt.Fatalf("repeated sync: %+v, holds %d", got, kept)
				}
				break
			}
			if a == nil {
				fresh := m.newAccount(now)
				if len(s.Spent) == 0 && min(s.Want, fresh.available()-s.Keep) <= 0 {
					if got.Repeat || got.Held != 0 {
						rt.Fatalf("sync of an org never seen: %+v", got)
					}
					break
				}
				a = m.account(org, now, true)
			}
			if mh == nil {
				mh = &modelHold{state: 'r', pn: a.pn, until: m.srv - time.Hour, feature: "lease"}
				m.holds[key] = mh
			}
			features := make([]string, 0, len(s.Spent))
			for f := range s.Spent {
				features = append(features, f)
			}
			sort.Strings(features)
			spend := func(f string, n int64, thisPeriod bool) {
				if n > 0 {
					m.holdCapture(org, a, mh, n)
					if thisPeriod {
						a.used[f] += n
					}
				} else if n < 0 {
					p := parts{mh.cfa, mh.cfp, mh.cfd, a.pn}
					back := a.giveBack(&p, -n)
					mh.cfa, mh.cfp, mh.cfd = p.fa, p.fp, p.fd
					m.charged[org] += n
					m.grants[org] += back + n
					if thisPeriod {
						a.used[f] += max(n, -a.used[f])
					}
				}
			}
			for _, f := range features {
				spend(f, s.Spent[f], true)
			}
			for _, c := range s.Late {
				spend(c.Feature, c.Credits, c.Period == -1 || c.Period-periods[org][0] == int64(a.pn)-periods[org][1])
			}
			kept = 0
			if mh.state == 'l' || mh.state == 'u' {
				kept = mh.amount()
			}
			grant := max(min(s.Unspent, kept), min(s.Want, kept+a.available()-s.Keep))
			if grant > kept {
				m.holdMore(a, mh, grant-kept)
			} else if grant < kept {
				m.holdLess(org, a, mh, kept-grant)
			}
			mh.seq, mh.rep = seq, m.srv
			if grant > 0 {
				mh.state, mh.until = 'l', m.srv+s.TTL
			} else if mh.state == 'l' || mh.state == 'u' || mh.until < m.srv {
				mh.state, mh.until = 'r', m.srv+holdKept
			}
			periods[org] = [2]int64{got.Period, int64(a.pn)}
			if got.Repeat || got.Held != grant || got.Balance != a.balance() {
				rt.Fatalf("sync: %+v, model held %d balance %d", got, grant, a.balance())
			}
		}
		now = e.clock.Now()
		for _, org := range orgs {
			checkOrg(e, rt, m, org, now)
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
				if strings.HasPrefix(ev.Ref, "lease:") {
					continue
				}
				if active[ev.Ref]++; active[ev.Ref] > 1 {
					rt.Fatalf("org %s: request %s charged twice", org, ev.Ref)
				}
			case "refund":
				active[ev.Ref]--
			}
		}
	}
}

// checkOrg compares the ledger's account of org with the model's and checks
// the ledger's invariants.
func checkOrg(e *env, rt *rapid.T, m *model, org string, now time.Time) {
	ma := m.account(org, now, false)
	got, err := e.ledger.Account(e.ctx, org)
	if ma == nil {
		if err != ErrNotFound {
			rt.Fatalf("org %s: %+v %v, want not found", org, got, err)
		}
		return
	}
	if err != nil {
		rt.Fatal(err)
	}
	want := fmt.Sprintf("allowance %d purchased %d held %d available %d balance %d plan %v own %v start %s next %s used %v",
		ma.rem+ma.ha, ma.pur+ma.hp, ma.ha+ma.ho+ma.hp, ma.available(), ma.balance(), ma.plan, ma.own,
		ma.periodStart.Format(time.RFC3339), ma.nextRecharge.Format(time.RFC3339), nonZero(ma.used))
	have := fmt.Sprintf("allowance %d purchased %d held %d available %d balance %d plan %v own %v start %s next %s used %v",
		got.AllowanceRemaining, got.Purchased, got.Held, got.Available, got.Balance, got.Plan, got.OwnPlan,
		got.PeriodStart.Format(time.RFC3339), got.NextRecharge.Format(time.RFC3339), nonZero(got.Used))
	if want != have {
		rt.Fatalf("org %s at %s:\nledger %s\nmodel  %s", org, now, have, want)
	}
	if got.Balance != m.grants[org]+m.topUps[org]-m.charged[org] {
		rt.Fatalf("org %s: balance %d != grants %d + top-ups %d - captured %d",
			org, got.Balance, m.grants[org], m.topUps[org], m.charged[org])
	}
	if got.Available != got.Balance-got.Held {
		rt.Fatalf("org %s: available %d != balance %d - held %d", org, got.Available, got.Balance, got.Held)
	}
	if got.AllowanceRemaining > got.Plan.Allowance {
		rt.Fatalf("org %s: allowance remaining %d above the plan's %d", org, got.AllowanceRemaining, got.Plan.Allowance)
	}
	if got.Purchased > m.topUps[org] {
		rt.Fatalf("org %s: %d purchased credits from %d of top-ups", org, got.Purchased, m.topUps[org])
	}
	holds, err := e.ledger.Holds(e.ctx, org)
	if err != nil {
		rt.Fatal(err)
	}
	var listed int64
	for _, h := range holds {
		mh := m.holds[org+" "+h.ID]
		if mh == nil {
			rt.Fatalf("org %s: hold %+v not in the model", org, h)
		}
		if h.State != holdStates[string(mh.state)] || h.Amount != mh.amount() {
			rt.Fatalf("org %s: hold %+v, model %c holding %d", org, h, mh.state, mh.amount())
		}
		listed += h.Amount
	}
	if listed != got.Held {
		rt.Fatalf("org %s: holds listed keep %d, account says %d held", org, listed, got.Held)
	}
	e.checkEvents(org)
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
