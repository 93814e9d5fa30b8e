package meter

import (
	"cmp"
	"errors"
	"flag"
	"fmt"
	"maps"
	"math"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"pgregory.net/rapid"
)

// model is the ledger's rules written plainly, without Redis, for the
// property test to compare against.
type model struct {
	plan      Plan
	accounts  map[string]*modelAccount
	charges   map[string]*modelCharge // by org + " " + request id
	refs      map[string]bool         // top-ups', by org + " " + reference
	grantRefs map[string]int          // grants' ids, by org + " " + reference
	holds     map[string]*modelHold   // by org + " " + hold id
	base      int64                   // Redis' clock when the case began, in ms
	srv       time.Duration           // how far the test moved Redis' clock
	// granted (allowances, grants, rollovers), topUps, charged and lost
	// (what expired or was voided unspent) add up, per org, to what the
	// balance must be.
	granted, topUps, charged, lost map[string]int64
	// repaidByGrants is the debt grants repaid, per org: a refund of the
	// charge that made it gives it back as purchased credits.
	repaidByGrants map[string]int64
	// budgets are the orgs' budgets, by org and subject ("": the
	// default); spent what each subject spent, in the window wid.
	budgets map[string]map[string]modelBudget
	spent   map[string]map[string]modelSpent
	// shares are the leases' shares of the subjects' budgets, by org +
	// " " + subject, then by the lease's hold key.
	shares map[string]map[string]modelShare
}

type modelShare struct {
	wid string
	n   int64
}

// keeps reports whether the hold with key keeps credits: live, or a lease
// not heard from.
func (m *model) keeps(key string) bool {
	h := m.holds[key]
	return h != nil && (h.state == 'l' || h.state == 'u')
}

// reserved is what the live leases' shares hold of subject's budget in
// org, in window wid, but for the lease with key except.
func (m *model) reserved(org, subject, wid, except string) int64 {
	var n int64
	for key, sh := range m.shares[org+" "+subject] {
		if key != except && sh.wid == wid && m.keeps(key) {
			n += sh.n
		}
	}
	return n
}

type modelBudget struct {
	limit  int64
	window string
}

type modelSpent struct {
	wid   string
	spent int64
}

// budgetOf is subject's budget in org: its own, else the default.
func (m *model) budgetOf(org, subject string) (b modelBudget, own, ok bool) {
	if subject == "" {
		return modelBudget{}, false, false
	}
	if b, ok := m.budgets[org][subject]; ok {
		return b, true, true
	}
	b, ok = m.budgets[org][""]
	return b, false, ok
}

// windowID names the window of kind w that now falls in, as the ledger
// does; a period by the org's period number (its account's, or a new
// one's).
func (m *model) windowID(org, w string, now time.Time) string {
	now = now.UTC()
	day := now.Truncate(24 * time.Hour)
	switch w {
	case WindowDay:
		return "d" + day.Format("20060102")
	case WindowWeek:
		return "w" + day.AddDate(0, 0, -(int(day.Weekday())+6)%7).Format("20060102")
	case WindowMonth:
		return "m" + day.Format("200601")
	}
	pn := 1
	if a := m.account(org, now, false); a != nil {
		pn = a.pn
	}
	return fmt.Sprintf("p%d", pn)
}

// spentNow is what subject spent in org in the window of kind w that runs
// now.
func (m *model) spentNow(org, subject, w string, now time.Time) int64 {
	if s, ok := m.spent[org][subject]; ok && s.wid == m.windowID(org, w, now) {
		return s.spent
	}
	return 0
}

type modelAccount struct {
	plan         Plan
	next         *Plan
	own          bool
	rem, pur     int64 // free: not held
	ha, ho, hp   int64 // held: this period's allowance, an ended one's, purchased
	hq           int64 // held of extra grants that have ended
	pn           int
	cd           int64 // debt carried into this period, not cancelled yet
	dp           int64 // debt of this period that credits granted since repaid
	periodStart  time.Time
	nextRecharge time.Time
	used         map[string]int64
	grants       []*modelGrant // the extra grants, by id - 1
}

// modelGrant is an extra grant: rollover, purchased with an expiry, or
// promotional.
type modelGrant struct {
	id                int
	kind              byte // r, p or o
	amount, rem, held int64
	prio              int
	eff, exp          int64 // ms, by Redis' clock (a rollover's by the gateway's); exp 0: never
	state             byte  // p, l, s, x or v
	ended             int64 // ms, when it ended
	pn                int   // a rollover's period
	dropped           bool  // ended long ago: no longer listed or known
}

var grantKinds = map[byte]string{'r': KindRollover, 'p': KindPurchased, 'o': KindPromotional}

var grantStates = map[byte]string{'p': GrantPending, 'l': GrantLive, 's': GrantSpent, 'x': GrantExpired, 'v': GrantVoided}

// parts is what a charge took: allowance, purchased credits, debt and extra
// grants (by id), in period pn.
type parts struct {
	fa, fp, fd int64
	pn         int
	g          map[int]int64
}

type modelCharge struct {
	feature  string
	subject  string // whose budget it counted against, and in which window
	wid      string
	cost     int64
	parts    parts
	settled  bool
	refunded bool // the call failed: its request id is free again
}

type modelHold struct {
	state         byte // l, u, x, c or r
	ofa, fa, fp   int64
	g             map[int]int64 // kept of extra grants, by id
	pn            int
	until         time.Duration // on the moved clock: expiry, or when the record goes
	seq           int64
	captured      int64
	cfa, cfp, cfd int64
	cg            map[int]int64 // captured of extra grants, by id
	feature       string
	rep           time.Duration // a lease's last report, on the moved clock
}

const holdKept = 24 * time.Hour

// unreportedKept is how long a lease keeps its credits after its last
// report, once its gateway stops reporting.
const unreportedKept = 24 * time.Hour

// endedKept is how long a grant that ended stays listed.
const endedKept = 90 * 24 * time.Hour

func nextMonthStart(after time.Time, month int) time.Time {
	t := time.Date(after.Year(), time.Month(month), 1, 0, 0, 0, 0, time.UTC)
	if !t.After(after) {
		t = t.AddDate(1, 0, 0)
	}
	return t
}

// now is Redis' clock, in ms, as the model knows it. The scripts read it a
// little later (the case's own run time, well under half an hour), so
// every grant's effective and expiry time falls half an hour off the
// whole hours Redis' clock moves by: both read the same side of it.
func (m *model) now() int64 { return m.base + m.srv.Milliseconds() }

func (m *model) newAccount(now time.Time) *modelAccount {
	d := defaultAccount("", m.plan, now)
	return &modelAccount{plan: m.plan, rem: m.plan.Allowance, pn: 1, periodStart: d.PeriodStart, nextRecharge: d.NextRecharge, used: map[string]int64{}}
}

// account is org's account as an operation finds it: grants that started
// or expired by Redis' clock, recharges that fell due by the gateway's,
// then holds whose time passed.
func (m *model) account(org string, now time.Time, create bool) *modelAccount {
	a := m.accounts[org]
	if a == nil {
		if !create {
			return nil
		}
		a = m.newAccount(now)
		m.accounts[org] = a
		m.granted[org] += a.rem
	}
	m.grantTimes(org, a)
	for !now.Before(a.nextRecharge) {
		m.startPeriod(org, a, a.nextRecharge, a.nextRecharge, nil)
	}
	m.sweep(org, a)
	m.endSpent(a)
	return a
}

// startPeriod starts a period at at, on plan (nil: the plan waiting, if
// any); the next recharge follows from. The live rollover grant expires;
// up to the ending plan's rollover of the unused allowance is the new
// period's rollover grant; the rest of it expires.
func (m *model) startPeriod(org string, a *modelAccount, at, from time.Time, plan *Plan) {
	for _, g := range a.grants {
		if g.kind == 'r' && g.state == 'l' {
			m.endGrant(org, a, g, 'x', at.UnixMilli())
		}
	}
	carry := min(max(a.rem, 0), a.plan.Rollover)
	if plan != nil {
		a.plan = *plan
	} else if a.next != nil {
		a.plan, a.next = *a.next, nil
	}
	m.lost[org] += max(a.rem, 0)
	a.cd, a.dp = max(-a.rem, 0), 0
	a.rem = a.plan.Allowance + min(a.rem, 0)
	m.granted[org] += a.plan.Allowance
	a.ho, a.ha = a.ho+a.ha, 0
	a.pn++
	for key, h := range m.holds {
		if strings.HasPrefix(key, org+" ") {
			h.ofa, h.fa, h.cfa, h.cfd, h.pn = h.ofa+h.fa, 0, 0, 0, a.pn
		}
	}
	a.periodStart = at
	a.nextRecharge = nextMonthStart(from, a.plan.RechargeMonth)
	a.used = map[string]int64{}
	if carry > 0 {
		g := a.newGrant('r', carry, DefaultPriority, at.UnixMilli(), a.nextRecharge.UnixMilli())
		g.pn = a.pn
		m.granted[org] += carry
	}
}

func (a *modelAccount) newGrant(kind byte, amount int64, prio int, eff, exp int64) *modelGrant {
	// A grant's times are whole seconds: it starts at the second it was
	// given, and expires at the end of the second asked for.
	eff = eff / 1000 * 1000
	if exp%1000 != 0 {
		exp = exp/1000*1000 + 1000
	}
	g := &modelGrant{id: len(a.grants) + 1, kind: kind, amount: amount, rem: amount, prio: prio, eff: eff, exp: exp, state: 'l'}
	a.grants = append(a.grants, g)
	return g
}

// grant is the extra grant with id, nil when there is none (or no longer).
func (a *modelAccount) grant(id int) *modelGrant {
	if id < 1 || id > len(a.grants) || a.grants[id-1].dropped {
		return nil
	}
	return a.grants[id-1]
}

// repay repays debt out of n credits just granted; it returns what is left.
func (a *modelAccount) repay(n int64) int64 {
	r := min(n, max(-a.rem, 0))
	a.rem, a.dp = a.rem+r, a.dp+r
	return n - r
}

// endGrant ends g: what remains of it is lost, what live holds took of it
// stays theirs.
func (m *model) endGrant(org string, a *modelAccount, g *modelGrant, state byte, at int64) {
	m.lost[org] += g.rem
	if g.state == 'l' {
		a.hq += g.held
	}
	g.state, g.rem, g.held, g.ended = state, 0, 0, at
}

// grantTimes makes live the pending grants whose time came, in the order
// they did (then by id), each repaying debt first, and expires the live
// ones whose time passed.
func (m *model) grantTimes(org string, a *modelAccount) {
	t := m.now()
	var due []*modelGrant
	for _, g := range a.grants {
		if g.state == 'p' && g.eff <= t {
			due = append(due, g)
		}
	}
	slices.SortStableFunc(due, func(x, y *modelGrant) int { return cmp.Compare(x.eff, y.eff) })
	for _, g := range due {
		g.state = 'l'
		g.rem = a.repay(g.rem)
		m.repaidByGrants[org] += g.amount - g.rem
		m.granted[org] += g.amount
	}
	for _, g := range a.grants {
		if g.state == 'l' && g.kind != 'r' && g.exp > 0 && g.exp <= t {
			m.endGrant(org, a, g, 'x', g.exp)
		}
	}
}

// endSpent ends the live grants with nothing left and nothing held.
func (m *model) endSpent(a *modelAccount) {
	for _, g := range a.grants {
		if g.state == 'l' && g.rem == 0 && g.held == 0 {
			g.state, g.ended = 's', m.now()
		}
	}
}

// source is one grant in the burn-down order: the allowance (w 'a'), the
// standing purchased grant (w 'p') or an extra grant (g).
type source struct {
	w           byte
	g           *modelGrant
	prio, paid  int
	exp, eff, n int64
}

// sources lists the grants that can give credits (with pending, those
// listed), in burn-down order: priority, the earliest expiry (none last),
// purchased after the others, the oldest, the allowance after a rollover
// as old as it.
func (a *modelAccount) sources(pending bool) []source {
	list := []source{
		{w: 'a', prio: DefaultPriority, exp: a.nextRecharge.UnixMilli(), eff: a.periodStart.UnixMilli(), n: math.MaxInt64},
		{w: 'p', prio: DefaultPriority, exp: math.MaxInt64, paid: 1, eff: math.MinInt64, n: 0},
	}
	for _, g := range a.grants {
		if (g.state == 'l' && (g.rem > 0 || pending)) || (pending && g.state == 'p') {
			s := source{g: g, prio: g.prio, exp: g.exp, eff: g.eff, n: int64(g.id)}
			if s.exp == 0 {
				s.exp = math.MaxInt64
			}
			if g.kind == 'p' {
				s.paid = 1
			}
			list = append(list, s)
		}
	}
	slices.SortFunc(list, func(x, y source) int {
		switch {
		case x.prio != y.prio:
			return x.prio - y.prio
		case x.exp != y.exp:
			return cmpInt(x.exp, y.exp)
		case x.paid != y.paid:
			return x.paid - y.paid
		case x.eff != y.eff:
			return cmpInt(x.eff, y.eff)
		}
		return cmpInt(x.n, y.n)
	})
	return list
}

func cmpInt(x, y int64) int {
	switch {
	case x < y:
		return -1
	case x > y:
		return 1
	}
	return 0
}

// take takes n credits in burn-down order, then into debt.
func (a *modelAccount) take(n int64) parts {
	p := parts{pn: a.pn, g: map[int]int64{}}
	for _, s := range a.sources(false) {
		if n == 0 {
			break
		}
		var x int64
		switch {
		case s.g != nil:
			x = min(n, s.g.rem)
			s.g.rem -= x
			p.g[s.g.id] += x
		case s.w == 'a':
			x = min(n, max(a.rem, 0))
			a.rem, p.fa = a.rem-x, p.fa+x
		default:
			x = min(n, max(a.pur, 0))
			a.pur, p.fp = a.pur-x, p.fp+x
		}
		n -= x
	}
	p.fd = n
	a.rem -= n
	return p
}

// alive says whether a spent grant may take credits back: a rollover
// while its period lasts, any other before its expiry.
func (m *model) alive(a *modelAccount, g *modelGrant) bool {
	if g.kind == 'r' {
		return g.pn == a.pn
	}
	return g.exp == 0 || g.exp > m.now()
}

// grantBack gives n credits back to extra grant id: a spent grant still
// alive is live again; an ended one gets nothing. It returns what it gave.
func (m *model) grantBack(a *modelAccount, id int, n int64) int64 {
	g := a.grant(id)
	if g == nil || n == 0 {
		return 0
	}
	if g.state == 's' && m.alive(a, g) {
		g.state, g.ended = 'l', 0
	}
	if g.state != 'l' {
		return 0
	}
	g.rem += n
	return n
}

// giveBack gives back up to n of what p took; it returns the change to the
// balance.
func (m *model) giveBack(a *modelAccount, p *parts, n int64) int64 {
	var back int64
	d := min(n, p.fd)
	p.fd, n = p.fd-d, n-d
	if p.pn != a.pn {
		d = min(d, a.cd)
		a.cd -= d
	}
	// Debt repaid since by credits granted goes back as purchased credits.
	c := min(d, max(-a.rem, 0))
	r := min(d-c, a.dp)
	a.rem, a.pur, a.dp, back = a.rem+d-r, a.pur+r, a.dp-r, back+d
	f := min(n, p.fp)
	p.fp, n = p.fp-f, n-f
	a.pur, back = a.pur+f, back+f
	ids := slices.Sorted(maps.Keys(p.g))
	slices.Reverse(ids)
	for _, id := range ids {
		x := min(n, p.g[id])
		p.g[id], n = p.g[id]-x, n-x
		if p.g[id] == 0 {
			delete(p.g, id)
		}
		back += m.grantBack(a, id, x)
	}
	al := min(n, p.fa)
	p.fa -= al
	if p.pn == a.pn {
		a.rem, back = a.rem+al, back+al
	}
	return back
}

// extra sums the live extra grants: free and held, and of each kind.
func (a *modelAccount) extra() (free, held int64, kinds map[byte]int64) {
	kinds = map[byte]int64{}
	for _, g := range a.grants {
		if g.state == 'l' {
			free, held = free+g.rem, held+g.held
			kinds[g.kind] += g.rem + g.held
		}
	}
	return free, held, kinds
}

func (a *modelAccount) held() int64 {
	_, gh, _ := a.extra()
	return a.ha + a.ho + a.hp + a.hq + gh
}

func (a *modelAccount) available() int64 {
	gf, _, _ := a.extra()
	return a.rem + a.pur + gf
}

func (a *modelAccount) balance() int64 { return a.available() + a.held() }

func (h *modelHold) amount() int64 {
	n := h.ofa + h.fa + h.fp
	for _, x := range h.g {
		n += x
	}
	return n
}

// holdGrants takes up to n of what h keeps of extra grants, those that
// ended first, then by id: a live grant's part goes back to it (back) or
// is spent; an ended grant's is gone either way. It returns what it took,
// of each grant.
func (m *model) holdGrants(org string, a *modelAccount, h *modelHold, n int64, back bool) (int64, map[int]int64) {
	ended := func(id int) bool { g := a.grant(id); return g == nil || g.state != 'l' }
	ids := slices.Sorted(maps.Keys(h.g))
	slices.SortStableFunc(ids, func(x, y int) int {
		if ended(x) != ended(y) {
			if ended(x) {
				return -1
			}
			return 1
		}
		return 0
	})
	var took int64
	out := map[int]int64{}
	for _, id := range ids {
		if n == 0 {
			break
		}
		x := min(n, h.g[id])
		if h.g[id] -= x; h.g[id] == 0 {
			delete(h.g, id)
		}
		if g := a.grant(id); g != nil && g.state == 'l' {
			g.held -= x
			if back {
				g.rem += x
			}
		} else {
			a.hq -= x
			if back {
				m.lost[org] += x
			}
		}
		out[id] = x
		n, took = n-x, took+x
	}
	return took, out
}

// holdLess gives back up to n of what h keeps (an ended period's allowance
// and ended grants' are gone).
func (m *model) holdLess(org string, a *modelAccount, h *modelHold, n int64) {
	o := min(n, h.ofa)
	h.ofa, a.ho, n = h.ofa-o, a.ho-o, n-o
	m.lost[org] += o
	took, _ := m.holdGrants(org, a, h, n, true)
	n -= took
	f := min(n, h.fp)
	h.fp, a.hp, a.pur, n = h.fp-f, a.hp-f, a.pur+f, n-f
	al := min(n, h.fa)
	h.fa, a.ha, a.rem = h.fa-al, a.ha-al, a.rem+al
}

func (m *model) holdMore(a *modelAccount, h *modelHold, n int64) {
	p := a.take(n)
	h.fa, h.fp = h.fa+p.fa, h.fp+p.fp
	a.ha, a.hp = a.ha+p.fa, a.hp+p.fp
	for id, x := range p.g {
		a.grant(id).held += x
		h.g[id] += x
	}
}

func (m *model) holdCapture(org string, a *modelAccount, h *modelHold, n int64) {
	m.charged[org] += n
	o := min(n, h.ofa)
	h.ofa, a.ho, n = h.ofa-o, a.ho-o, n-o
	took, g := m.holdGrants(org, a, h, n, false)
	n -= took
	for id, x := range g {
		h.cg[id] += x
	}
	al := min(n, h.fa)
	h.fa, a.ha, h.cfa, n = h.fa-al, a.ha-al, h.cfa+al, n-al
	f := min(n, h.fp)
	h.fp, a.hp, h.cfp, n = h.fp-f, a.hp-f, h.cfp+f, n-f
	if n > 0 {
		p := a.take(n)
		h.cfa, h.cfp, h.cfd = h.cfa+p.fa, h.cfp+p.fp, h.cfd+p.fd
		for id, x := range p.g {
			h.cg[id] += x
		}
	}
}

func newModelHold(state byte, pn int, until time.Duration, feature string) *modelHold {
	return &modelHold{state: state, pn: pn, until: until, feature: feature, g: map[int]int64{}, cg: map[int]int64{}}
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
// refunds, repeated charges, top-ups with repeated references (some
// expiring), promotional grants (of random priorities and expiries, some
// pending), voids of grants, plan changes (with rollover), recharges,
// holds, captures, releases, lease syncs (repeated ones too) and moves of
// the gateway's clock (periods) and of Redis' (expiries, grants that start),
// on each store, and checks after every step that the ledger agrees with
// the model, account and grants, that balance == granted + top-ups -
// captured - lost to expiries and voids, that available == balance - held,
// that allowance_remaining never exceeds the plan's allowance, that
// purchased credits never exceed the top-ups and the debt grants repaid,
// that the events add up to the balance, and that no request id was charged
// twice.
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
		refs: map[string]bool{}, grantRefs: map[string]int{}, holds: map[string]*modelHold{}, base: e.serverNow().UnixMilli(),
		granted: map[string]int64{}, repaidByGrants: map[string]int64{}, topUps: map[string]int64{}, charged: map[string]int64{}, lost: map[string]int64{},
		budgets: map[string]map[string]modelBudget{}, spent: map[string]map[string]modelSpent{},
		shares: map[string]map[string]modelShare{}}
	orgs := []string{"a", "b"}
	var ids []string
	holdIDs := []string{"nope"}
	// periods maps an org's period numbers, the ledger's (from its lease
	// syncs' answers) to the model's: {ledger, model} of the same period.
	periods := map[string][2]int64{}
	// ahead is a time of Redis' clock half an hour past a whole number of
	// hours from now (see model.now), in ms.
	ahead := func(label string, hours int64) int64 {
		return m.now() + (time.Duration(rapid.Int64Range(0, hours).Draw(rt, label))*time.Hour + 30*time.Minute).Milliseconds()
	}
	past := func() int64 { return m.now() - (30 * time.Minute).Milliseconds() }
	steps := rapid.IntRange(1, 60).Draw(rt, "steps")
	for range steps {
		org := rapid.SampledFrom(orgs).Draw(rt, "org")
		now := e.clock.Now()
		switch op := rapid.IntRange(0, 20).Draw(rt, "op"); op {
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
			subject := rapid.SampledFrom(budgetSubjects).Draw(rt, "subject")
			got, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: org, Feature: feature, Cost: cost, RequestID: id, Overdraft: overdraft,
				OverdraftLimit: limit, Subject: subject})
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
			b, _, budgeted := m.budgetOf(org, subject)
			var wid string
			var spent int64
			if budgeted {
				wid, spent = m.windowID(org, b.window, now), m.spentNow(org, subject, b.window, now)
			}
			over := ok && budgeted && !overdraft && b.limit-spent-m.reserved(org, subject, wid, "") < cost
			if got.Charged != (ok && !over) || got.Replay || got.OverBudget != over {
				rt.Fatalf("charge %d on %d available (overdraft %v, limit %d; budget %v %+v spent %d): %+v",
					cost, free, overdraft, limit, budgeted, b, spent, got)
			}
			if !ok || over {
				if over && (got.Budget == nil || got.Budget.Spent != spent || got.Budget.Limit != b.limit) {
					rt.Fatalf("refused by a budget of %+v, spent %d: %+v", b, spent, got.Budget)
				}
				break
			}
			a = m.account(org, now, true)
			p := a.take(cost)
			a.used[feature] += cost
			m.charged[org] += cost
			c := &modelCharge{feature: feature, cost: cost, parts: p}
			m.charges[key] = c
			if budgeted {
				if m.spent[org] == nil {
					m.spent[org] = map[string]modelSpent{}
				}
				wid = m.windowID(org, b.window, now)
				m.spent[org][subject] = modelSpent{wid: wid, spent: m.spentNow(org, subject, b.window, now) + cost}
				c.subject, c.wid = subject, wid
			}
			if budgeted != (got.Budget != nil) || (budgeted && (got.Budget.Spent != m.spent[org][subject].spent || got.Budget.Limit != b.limit)) {
				rt.Fatalf("charge counted against %+v (budgeted %v, spent %d): %+v", b, budgeted, m.spent[org][subject].spent, got.Budget)
			}
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
				for id, x := range q.g {
					c.parts.g[id] += x
				}
				delta = -diff
				m.charged[org] += diff
			} else if diff < 0 {
				delta = m.giveBack(a, &c.parts, -diff)
				// What is not given back expired with its period, or was
				// covered by a later period's grant.
				m.charged[org] += diff
				m.lost[org] -= delta + diff
			}
			if samePeriod {
				a.used[c.feature] += diff
			}
			if sp, ok := m.spent[org][c.subject]; ok && c.subject != "" && sp.wid == c.wid {
				m.spent[org][c.subject] = modelSpent{wid: sp.wid, spent: max(sp.spent+diff, 0)}
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
				a.pur += a.repay(amount)
				m.topUps[org] += amount
			}
		case 4: // plan
			p := Plan{Allowance: rapid.Int64Range(0, 50).Draw(rt, "allowance"), RechargeMonth: rapid.IntRange(1, 12).Draw(rt, "month")}
			p.Rollover = rapid.Int64Range(0, p.Allowance).Draw(rt, "rollover")
			if _, _, err := e.ledger.SetPlan(e.ctx, org, p, ""); err != nil {
				rt.Fatal(err)
			}
			a := m.accounts[org]
			switch {
			case a == nil:
				a = &modelAccount{plan: p, own: true, used: map[string]int64{}}
				m.accounts[org] = a
				m.startPeriod(org, a, now.Truncate(time.Second), monthStart(monthIndex(now)), nil)
			case !m.account(org, now, true).own:
				// The ending plan's rollover (the default plan's: none)
				// carries the unused allowance over.
				a.own = true
				m.startPeriod(org, a, now.Truncate(time.Second), monthStart(monthIndex(now)), &p)
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
			m.startPeriod(org, a, now.Truncate(time.Second), monthStart(monthIndex(now)), nil)
		case 6: // the gateway's clock moves: periods follow it
			e.clock.Add(time.Duration(rapid.Int64Range(0, 400*24).Draw(rt, "hours")) * time.Hour)
		case 7: // Redis' clock moves: holds and grants expire by it, pending grants start
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
			mh := newModelHold('l', a.pn, m.srv+ttl, "flows")
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
			// The subjects' budgets: spending of this window, of an ended
			// one or of no budget, and shares wanted and held.
			had := a != nil && mh != nil && (mh.state == 'l' || mh.state == 'u')
			// ledgerWid is the window of kind w as the ledger names it:
			// a period by the ledger's number, "" while it is not known.
			ledgerWid := func(w string) string {
				if w != WindowPeriod {
					return m.windowID(org, w, now)
				}
				if p, ok := periods[org]; ok && a != nil {
					return fmt.Sprintf("p%d", p[0]+int64(a.pn)-p[1])
				}
				return ""
			}
			for _, u := range budgetSubjects[1:] {
				if rapid.IntRange(0, 2).Draw(rt, "subject synced "+u) == 0 {
					continue
				}
				if s.Subjects == nil {
					s.Subjects = map[string]SubjectSync{}
				}
				b, _, budgeted := m.budgetOf(org, u)
				var w string
				switch rapid.IntRange(0, 2).Draw(rt, "share window "+u) {
				case 0:
					if budgeted {
						w = ledgerWid(b.window)
					}
				case 1:
					w = "d20000101"
				}
				mine := m.shares[org+" "+u][key].n
				s.Subjects[u] = SubjectSync{Window: w, Spent: rapid.Int64Range(-3, 10).Draw(rt, "share spent "+u),
					Want: rapid.Int64Range(0, 30).Draw(rt, "share want "+u), Unspent: rapid.Int64Range(0, mine+3).Draw(rt, "share unspent "+u)}
			}
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
			subjectSpends := false
			for _, b := range s.Subjects {
				subjectSpends = subjectSpends || b.Spent != 0
			}
			if a == nil {
				fresh := m.newAccount(now)
				if len(s.Spent) == 0 && !subjectSpends && min(s.Want, fresh.available()-s.Keep) <= 0 {
					if got.Repeat || got.Held != 0 {
						rt.Fatalf("sync of an org never seen: %+v", got)
					}
					break
				}
				a = m.account(org, now, true)
			}
			if mh == nil {
				mh = newModelHold('r', a.pn, m.srv-time.Hour, "lease")
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
					p := parts{mh.cfa, mh.cfp, mh.cfd, a.pn, mh.cg}
					back := m.giveBack(a, &p, -n)
					mh.cfa, mh.cfp, mh.cfd, mh.cg = p.fa, p.fp, p.fd, p.g
					m.charged[org] += n
					m.lost[org] -= back + n
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
			// Each subject's spending moves to its window, and its share is
			// what the lease wants, as far as half of what the budget
			// leaves beside the other live shares allows, and never less
			// than what it held unspent, as far as the limit leaves it.
			for u, sub := range s.Subjects {
				b, _, budgeted := m.budgetOf(org, u)
				r, answered := got.Shares[u]
				if !answered {
					rt.Fatalf("sync named %s, its answer did not: %+v", u, got.Shares)
				}
				if !budgeted {
					delete(m.shares, org+" "+u)
					if r.Held != NoBudget {
						rt.Fatalf("share of %s, who has no budget: %+v", u, r)
					}
					continue
				}
				wid := m.windowID(org, b.window, now)
				cur := sub.Window != "" && sub.Window == ledgerWid(b.window)
				mine := int64(0)
				if sh := m.shares[org+" "+u][key]; had && sh.wid == wid {
					mine = sh.n
				}
				others := m.reserved(org, u, wid, key)
				spent := m.spentNow(org, u, b.window, now)
				if sub.Spent != 0 && (cur || sub.Window == "") {
					spent = max(spent+sub.Spent, 0)
					if m.spent[org] == nil {
						m.spent[org] = map[string]modelSpent{}
					}
					m.spent[org][u] = modelSpent{wid: wid, spent: spent}
				}
				if cur {
					mine = max(mine-max(sub.Spent, 0), 0)
				} else {
					mine = 0
				}
				share := int64(0)
				if grant > 0 {
					free := b.limit - spent - others
					half := free / 2
					if free < 0 && free%2 != 0 {
						half-- // Lua's floor
					}
					share = max(min(sub.Unspent, mine), min(sub.Want, half), 0)
					share = min(share, max(free, 0))
				}
				next := map[string]modelShare{}
				for k, sh := range m.shares[org+" "+u] {
					if k != key && sh.wid == wid && m.keeps(k) && sh.n > 0 {
						next[k] = sh
					}
				}
				if share > 0 {
					next[key] = modelShare{wid: wid, n: share}
				}
				m.shares[org+" "+u] = next
				if lw := ledgerWid(b.window); r.Held != share || (lw != "" && r.Window != lw) || r.Limit != b.limit || r.Spent != spent {
					rt.Fatalf("share of %s (%+v, budget %+v, spent %d, others %d, mine %d): %+v, model %d", u, sub, b, spent, others, mine, r, share)
				}
			}
		case 13, 14: // a promotional grant: a random priority, sometimes pending, expiring or repeated
			req := GrantRequest{Amount: rapid.Int64Range(1, 40).Draw(rt, "grant amount"),
				Reference: rapid.SampledFrom([]string{"", "promo-1", "promo-2"}).Draw(rt, "grant ref")}
			prio := DefaultPriority
			switch rapid.IntRange(0, 3).Draw(rt, "priority from") {
			case 2:
				prio = rapid.IntRange(0, 100).Draw(rt, "priority")
				req.Priority = &prio
			case 3:
				prio = rapid.SampledFrom([]int{0, 49, 50, 51, 100}).Draw(rt, "priority")
				req.Priority = &prio
			}
			var eff, exp int64
			switch rapid.IntRange(0, 3).Draw(rt, "effective") {
			case 1:
				eff = past()
			case 2:
				eff = ahead("effective hours", 3)
			}
			switch rapid.IntRange(0, 5).Draw(rt, "expires") {
			case 2, 3, 4:
				exp = ahead("expiry hours", 5)
			case 5:
				exp = past()
			}
			if eff != 0 {
				req.Effective = time.UnixMilli(eff)
			}
			if exp != 0 {
				req.Expires = time.UnixMilli(exp)
			}
			g, acct, applied, err := e.ledger.Grant(e.ctx, org, req)
			start := eff
			if start == 0 {
				start = m.now()
			}
			id, seen := m.grantRefs[org+" "+req.Reference]
			switch {
			case exp != 0 && eff != 0 && exp <= eff:
				if !errors.Is(err, ErrExpiresPast) {
					rt.Fatalf("grant effective %d expiring %d: %+v %v", eff, exp, g, err)
				}
			case seen:
				a := m.account(org, now, false)
				want := ""
				if a.grant(id) != nil {
					want = fmt.Sprintf("g%d", id)
				}
				if err != nil || applied || g.ID != want || acct.Balance != a.balance() {
					rt.Fatalf("repeated grant %s: %+v %+v %v %v, first g%d", req.Reference, g, acct, applied, err, id)
				}
			case exp != 0 && (exp <= m.now() || exp <= start):
				if !errors.Is(err, ErrExpiresPast) {
					rt.Fatalf("grant expiring %d at %d: %+v %v", exp, m.now(), g, err)
				}
			default:
				if err != nil || !applied {
					rt.Fatalf("grant %+v: %+v %v %v", req, g, applied, err)
				}
				a := m.account(org, now, true)
				mg := a.newGrant('o', req.Amount, prio, start, exp)
				if start > m.now() {
					mg.state = 'p'
				} else {
					// A grant repays debt first.
					mg.rem = a.repay(mg.rem)
					m.repaidByGrants[org] += mg.amount - mg.rem
					m.granted[org] += mg.amount
				}
				m.endSpent(a)
				if req.Reference != "" {
					m.grantRefs[org+" "+req.Reference] = mg.id
				}
				if g.ID != fmt.Sprintf("g%d", mg.id) || g.State != grantStates[mg.state] || g.Remaining != mg.rem || acct.Balance != a.balance() {
					rt.Fatalf("grant %+v: %+v balance %d, model g%d %c remaining %d balance %d", req, g, acct.Balance, mg.id, mg.state, mg.rem, a.balance())
				}
			}
		case 15: // a void: of a live, pending, ended or unknown grant, or of the account's own
			a := m.account(org, now, false)
			n := 0
			if a != nil {
				n = len(a.grants)
			}
			k := rapid.IntRange(-1, n+1).Draw(rt, "void grant")
			id := fmt.Sprintf("g%d", k)
			switch k {
			case -1:
				id = AllowanceGrant
			case 0:
				id = PurchasedGrant
			}
			reason := rapid.SampledFrom([]string{"", "promotion withdrawn"}).Draw(rt, "void reason")
			acct, err := e.ledger.VoidGrant(e.ctx, org, id, reason)
			var g *modelGrant
			if a != nil {
				g = a.grant(k)
			}
			switch {
			case k < 1:
				if !errors.Is(err, ErrGrantFixed) {
					rt.Fatalf("void of %s: %v", id, err)
				}
			case g == nil:
				if !errors.Is(err, ErrGrantNotFound) {
					rt.Fatalf("void of unknown %s: %v", id, err)
				}
			case g.state == 's' || g.state == 'x':
				if !errors.Is(err, ErrGrantEnded) || acct.Balance != a.balance() {
					rt.Fatalf("void of %s, %c: %+v %v", id, g.state, acct, err)
				}
			default:
				if g.state == 'l' {
					m.endGrant(org, a, g, 'v', m.now())
				} else if g.state == 'p' {
					// It gave nothing, and lost nothing.
					g.state, g.ended, g.rem = 'v', m.now(), 0
				}
				if err != nil || acct.Balance != a.balance() {
					rt.Fatalf("void of %s: %+v %v, model balance %d", id, acct, err, a.balance())
				}
			}
		case 16: // a top-up whose credits expire, references repeat
			amount := rapid.Int64Range(1, 50).Draw(rt, "amount")
			ref := rapid.SampledFrom([]string{"inv-1", "inv-2", "inv-3", "inv-4"}).Draw(rt, "ref")
			exp := ahead("top-up expiry hours", 5)
			if rapid.IntRange(0, 4).Draw(rt, "top-up expired") == 0 {
				exp = past()
			}
			acct, applied, err := e.ledger.TopUpExpiring(e.ctx, org, amount, ref, time.UnixMilli(exp))
			switch {
			case m.refs[org+" "+ref]:
				if err != nil || applied {
					rt.Fatalf("top-up %s applied again: %v %v", ref, applied, err)
				}
			case exp <= m.now():
				if !errors.Is(err, ErrExpiresPast) {
					rt.Fatalf("top-up expiring %d at %d: %v %v", exp, m.now(), applied, err)
				}
			default:
				if err != nil || !applied {
					rt.Fatalf("top-up %s: %v %v", ref, applied, err)
				}
				m.refs[org+" "+ref] = true
				a := m.account(org, now, true)
				g := a.newGrant('p', amount, DefaultPriority, m.now(), exp)
				g.rem = a.repay(amount)
				m.topUps[org] += amount
				m.endSpent(a)
				if acct.Balance != a.balance() {
					rt.Fatalf("top-up expiring: balance %d, model %d", acct.Balance, a.balance())
				}
			}
		case 19, 20: // a budget set or removed: a subject's own, or the default
			subject := rapid.SampledFrom([]string{"", "u1", "u2"}).Draw(rt, "budget subject")
			if m.budgets[org] == nil {
				m.budgets[org] = map[string]modelBudget{}
				m.spent[org] = map[string]modelSpent{}
			}
			if rapid.IntRange(0, 2).Draw(rt, "remove") == 0 {
				was, had := m.budgets[org][subject]
				got, err := e.ledger.DeleteBudget(e.ctx, org, subject)
				if !had {
					if !errors.Is(err, ErrBudgetNotFound) {
						rt.Fatalf("removed a budget of %q that is not there: %+v %v", subject, got, err)
					}
					break
				}
				if err != nil || got.Limit != was.limit || got.Window != was.window {
					rt.Fatalf("removed %q's budget %+v: %+v %v", subject, was, got, err)
				}
				delete(m.budgets[org], subject)
				for u := range m.spent[org] {
					if _, own := m.budgets[org][u]; (subject == "" && !own) || (subject == u && m.budgets[org][""] == (modelBudget{})) {
						delete(m.spent[org], u)
					}
				}
				for _, u := range budgetSubjects[1:] {
					if _, own := m.budgets[org][u]; (subject == "" && !own) || (subject == u && m.budgets[org][""] == (modelBudget{})) {
						delete(m.shares, org+" "+u)
					}
				}
				break
			}
			b := modelBudget{limit: rapid.Int64Range(1, 40).Draw(rt, "budget limit"),
				window: rapid.SampledFrom([]string{WindowDay, WindowWeek, WindowMonth, WindowPeriod}).Draw(rt, "window")}
			got, err := e.ledger.SetBudget(e.ctx, org, subject, BudgetLimit{Limit: b.limit, Window: b.window})
			if err != nil {
				rt.Fatal(err)
			}
			m.budgets[org][subject] = b
			want := int64(0)
			if subject != "" {
				want = m.spentNow(org, subject, b.window, now)
			}
			if got.Limit != b.limit || got.Window != b.window || got.Spent != want {
				rt.Fatalf("budget of %q set to %+v: %+v, spent want %d", subject, b, got, want)
			}
		case 17, 18: // Redis' clock moves a little: some grants start, some expire
			d := time.Duration(rapid.Int64Range(1, 3).Draw(rt, "server hours, a few")) * time.Hour
			e.moveServerClock(d)
			m.srv += d
		}
		if a := m.accounts[org]; a != nil {
			m.endSpent(a)
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
	const format = "allowance %d purchased %d promotional %d rollover %d debt %d held %d available %d balance %d " +
		"next expiry %s plan %v next plan %s own %v start %s next %s used %v"
	_, _, kinds := ma.extra()
	want := fmt.Sprintf(format, ma.rem+ma.ha, ma.pur+ma.hp+kinds['p'], kinds['o'], kinds['r'], max(-ma.rem, 0),
		ma.held(), ma.available(), ma.balance(), ma.nextExpiry(), ma.plan, planString(ma.next), ma.own,
		ma.periodStart.Format(time.RFC3339), ma.nextRecharge.Format(time.RFC3339), nonZero(ma.used))
	have := fmt.Sprintf(format, got.AllowanceRemaining, got.Purchased, got.Promotional, got.Rollover, got.Debt,
		got.Held, got.Available, got.Balance, expiryString(got.NextExpiry), got.Plan, planString(got.NextPlan), got.OwnPlan,
		got.PeriodStart.Format(time.RFC3339), got.NextRecharge.Format(time.RFC3339), nonZero(got.Used))
	if want != have {
		rt.Fatalf("org %s at %s:\nledger %s\nmodel  %s", org, now, have, want)
	}
	if got.Balance != m.granted[org]+m.topUps[org]-m.charged[org]-m.lost[org] {
		rt.Fatalf("org %s: balance %d != granted %d + top-ups %d - captured %d - lost %d",
			org, got.Balance, m.granted[org], m.topUps[org], m.charged[org], m.lost[org])
	}
	list, _, err := e.ledger.Grants(e.ctx, org)
	if err != nil {
		rt.Fatal(err)
	}
	if have, want := grantLines(list), m.grantLines(ma); have != want {
		rt.Fatalf("org %s grants:\nledger %s\nmodel  %s", org, have, want)
	}
	if got.Available != got.Balance-got.Held {
		rt.Fatalf("org %s: available %d != balance %d - held %d", org, got.Available, got.Balance, got.Held)
	}
	if got.AllowanceRemaining > got.Plan.Allowance {
		rt.Fatalf("org %s: allowance remaining %d above the plan's %d", org, got.AllowanceRemaining, got.Plan.Allowance)
	}
	if got.Purchased > m.topUps[org]+m.repaidByGrants[org] {
		rt.Fatalf("org %s: %d purchased credits from %d of top-ups and %d of debt grants repaid",
			org, got.Purchased, m.topUps[org], m.repaidByGrants[org])
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
	for _, subject := range budgetSubjects[1:] {
		b, own, ok := m.budgetOf(org, subject)
		got, err := e.ledger.Budget(e.ctx, org, subject)
		if !ok {
			if !errors.Is(err, ErrBudgetNotFound) {
				rt.Fatalf("org %s: %s has no budget in the model: %+v %v", org, subject, got, err)
			}
			continue
		}
		if err != nil {
			rt.Fatal(err)
		}
		if spent := m.spentNow(org, subject, b.window, now); got.Limit != b.limit || got.Window != b.window ||
			got.Spent != spent || got.Default == own || got.Remaining != max(b.limit-spent, 0) {
			rt.Fatalf("org %s: %s's budget %+v, model %+v (own %v) spent %d", org, subject, got, b, own, spent)
		}
	}
	e.checkEvents(org)
}

// budgetSubjects are the charges' subjects: none, or one of two.
var budgetSubjects = []string{"", "u1", "u2"}

func nonZero(m map[string]int64) map[string]int64 {
	out := map[string]int64{}
	for k, v := range m {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}

// nextExpiry is the earliest expiry of a live extra grant, with what
// remains of those that expire then.
func (a *modelAccount) nextExpiry() string {
	var at, n int64
	for _, g := range a.grants {
		if g.state == 'l' && g.exp > 0 && (at == 0 || g.exp <= at) {
			if g.exp != at {
				n = 0
			}
			at, n = g.exp, n+g.rem
		}
	}
	if at == 0 {
		return "none"
	}
	return fmt.Sprintf("%d: %d", at, n)
}

func expiryString(x *Expiry) string {
	if x == nil {
		return "none"
	}
	return fmt.Sprintf("%d: %d", x.At.UnixMilli(), x.Amount)
}

func planString(p *Plan) string {
	if p == nil {
		return "none"
	}
	return fmt.Sprint(*p)
}

func grantLine(id, kind, state string, amount, remaining, held int64, prio int, expires int64) string {
	return fmt.Sprintf("%s %s %s %d remaining %d held %d priority %d expires %d", id, kind, state, amount, remaining, held, prio, expires)
}

// grantLines is the ledger's grants list, one line each: those live and
// pending in its order, then those ended by id.
func grantLines(list []Grant) string {
	var live []string
	ended := map[int]string{}
	for _, g := range list {
		var exp int64
		if g.Expires != nil {
			exp = g.Expires.UnixMilli()
		}
		line := grantLine(g.ID, g.Kind, g.State, g.Amount, g.Remaining, g.Held, g.Priority, exp)
		if g.State == GrantLive || g.State == GrantPending {
			live = append(live, line)
			continue
		}
		var n int
		fmt.Sscanf(g.ID, "g%d", &n)
		ended[n] = line
	}
	var lines []string
	for _, n := range slices.Sorted(maps.Keys(ended)) {
		lines = append(lines, ended[n])
	}
	return strings.Join(live, "; ") + " | " + strings.Join(lines, "; ")
}

// grantLines is what the ledger's grants list must be. Grants that ended
// more than endedKept ago are dropped from it, and from the ledger.
func (m *model) grantLines(a *modelAccount) string {
	var live, ended []string
	for _, s := range a.sources(true) {
		switch {
		case s.g != nil:
			g := s.g
			live = append(live, grantLine(fmt.Sprintf("g%d", g.id), grantKinds[g.kind], grantStates[g.state], g.amount, g.rem, g.held, g.prio, g.exp))
		case s.w == 'a':
			live = append(live, grantLine(AllowanceGrant, KindAllowance, GrantLive, a.plan.Allowance, max(a.rem, 0), a.ha, DefaultPriority, a.nextRecharge.UnixMilli()))
		case a.pur+a.hp > 0:
			live = append(live, grantLine(PurchasedGrant, KindPurchased, GrantLive, a.pur+a.hp, a.pur, a.hp, DefaultPriority, 0))
		}
	}
	for _, g := range a.grants {
		if g.dropped || g.state == 'l' || g.state == 'p' {
			continue
		}
		if g.ended+endedKept.Milliseconds() <= m.now() {
			g.dropped = true
			continue
		}
		ended = append(ended, grantLine(fmt.Sprintf("g%d", g.id), grantKinds[g.kind], grantStates[g.state], g.amount, g.rem, 0, g.prio, g.exp))
	}
	return strings.Join(live, "; ") + " | " + strings.Join(ended, "; ")
}
