package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// The grants suite: the grants contract of SPEC sections 5 and 6 checked
// from outside, through Caddy's admin API and metered routes in front of a
// real upstream, against a real redis-server. Times of grants are by Redis'
// clock, which is this machine's: expiries and effective times are set a
// few seconds ahead, and the tests poll the admin API until they pass.
// Every test ends by checking, per org, what the upstream answered against
// what the ledger charged.

// grantJSON is a grant as the admin API answers it.
type grantJSON struct {
	ID        string     `json:"grant"`
	Kind      string     `json:"kind"`
	Amount    int64      `json:"amount"`
	Remaining int64      `json:"remaining"`
	Held      int64      `json:"held"`
	Priority  int        `json:"priority"`
	Effective time.Time  `json:"effective"`
	Expires   *time.Time `json:"expires"`
	State     string     `json:"state"`
	Reference string     `json:"reference"`
	Reason    string     `json:"reason"`
}

// accountJSON is the part of an account the grants tests read.
type accountJSON struct {
	Balance            int64 `json:"balance"`
	Held               int64 `json:"held"`
	Available          int64 `json:"available"`
	AllowanceRemaining int64 `json:"allowance_remaining"`
	Purchased          int64 `json:"purchased"`
	Promotional        int64 `json:"promotional"`
	Rollover           int64 `json:"rollover"`
	Debt               int64 `json:"debt"`
	Plan               struct {
		Allowance     int64 `json:"allowance"`
		RechargeMonth int   `json:"recharge_month"`
		Rollover      int64 `json:"rollover"`
	} `json:"plan"`
	NextRecharge time.Time `json:"next_recharge"`
	NextExpiry   *struct {
		At     time.Time `json:"at"`
		Amount int64     `json:"amount"`
	} `json:"next_expiry"`
	Used map[string]int64 `json:"used"`
}

// eventJSON is one entry of an org's event log.
type eventJSON struct {
	Kind    string `json:"kind"`
	Delta   int64  `json:"delta"`
	Balance int64  `json:"balance"`
	Feature string `json:"feature"`
	Ref     string `json:"ref"`
	Reason  string `json:"reason"`
}

// served fails the test when the admin API has no call at r's method and
// path (the mux's own 404 or 405), or does not take a field the grants
// contract adds to a call: an answer that says the contract is missing,
// not that the ledger refused.
func served(t testing.TB, r reply, call string, fields ...string) {
	t.Helper()
	if r.status == http.StatusMethodNotAllowed || (r.status == http.StatusNotFound && bytes.Contains(r.body, []byte("no admin call"))) {
		t.Fatalf("%s: %d %s: the admin API does not serve this call of SPEC section 6", call, r.status, bytes.TrimSpace(r.body))
	}
	for _, f := range fields {
		if r.status == http.StatusBadRequest && bytes.Contains(r.body, []byte(`unknown field \"`+f+`\"`)) {
			t.Fatalf("%s: %d %s: the admin API does not take %q (SPEC section 6)", call, r.status, bytes.TrimSpace(r.body), f)
		}
	}
}

// wantServed is served, then wantStatus.
func wantServed(t testing.TB, r reply, status int, call string, fields ...string) {
	t.Helper()
	served(t, r, call, fields...)
	if r.status != status {
		t.Fatalf("%s: status %d, want %d; body %s", call, r.status, status, r.body)
	}
}

func decodeJSON(t testing.TB, data []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(data, v); err != nil {
		t.Fatalf("%s: %v", data, err)
	}
}

// at is now plus d, to the second: RFC 3339 without fractions, and at
// least d less a second ahead.
func at(d time.Duration) time.Time {
	return time.Now().Add(d).Truncate(time.Second).UTC()
}

func rfc(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// thisMonth is a recharge month whose recharge is about a year away.
func thisMonth() int { return int(time.Now().UTC().Month()) }

// emptyOrg gives org a plan of its own of allowance (and rollover), so that
// it has only the credits the test gives it, and no recharge of its own
// before the test ends.
func (g *gateway) emptyOrg(org string, allowance, rollover int64) accountJSON {
	g.t.Helper()
	body := fmt.Sprintf(`{"allowance": %d, "recharge_month": %d}`, allowance, thisMonth())
	if rollover > 0 {
		body = fmt.Sprintf(`{"allowance": %d, "recharge_month": %d, "rollover": %d}`, allowance, thisMonth(), rollover)
	}
	r := g.admin(http.MethodPut, "/orgs/"+org+"/plan", body)
	wantServed(g.t, r, http.StatusOK, "PUT /orgs/"+org+"/plan", "rollover")
	var a accountJSON
	decodeJSON(g.t, r.body, &a)
	if a.Balance != allowance {
		g.t.Fatalf("org %s: balance %d after its plan, want %d", org, a.Balance, allowance)
	}
	return a
}

// grant gives org a grant of body through POST /orgs/{org}/grants and
// returns it and the account after, once it answered 201.
func (g *gateway) grant(org, body string) (grantJSON, accountJSON) {
	g.t.Helper()
	r := g.admin(http.MethodPost, "/orgs/"+org+"/grants", body)
	wantServed(g.t, r, http.StatusCreated, "POST /orgs/"+org+"/grants "+body)
	var v struct {
		Grant   *grantJSON   `json:"grant"`
		Account *accountJSON `json:"account"`
	}
	decodeJSON(g.t, r.body, &v)
	if v.Grant == nil || v.Account == nil || v.Grant.ID == "" {
		g.t.Fatalf("POST /orgs/%s/grants answered %s: want {\"grant\": {...}, \"account\": {...}}", org, r.body)
	}
	return *v.Grant, *v.Account
}

// grants lists org's grants through GET /orgs/{org}/grants.
func (g *gateway) grants(org string) []grantJSON {
	g.t.Helper()
	r := g.admin(http.MethodGet, "/orgs/"+org+"/grants", "")
	wantServed(g.t, r, http.StatusOK, "GET /orgs/"+org+"/grants")
	var v struct {
		Grants []grantJSON `json:"grants"`
	}
	decodeJSON(g.t, r.body, &v)
	return v.Grants
}

// grantOf is org's grant id, as GET /orgs/{org}/grants lists it.
func (g *gateway) grantOf(org, id string) grantJSON {
	g.t.Helper()
	for _, x := range g.grants(org) {
		if x.ID == id {
			return x
		}
	}
	g.t.Fatalf("org %s lists no grant %s: %+v", org, id, g.grants(org))
	return grantJSON{}
}

func (g *gateway) acct(org string) accountJSON {
	g.t.Helper()
	r := g.admin(http.MethodGet, "/orgs/"+org, "")
	wantStatus(g.t, r, http.StatusOK)
	var a accountJSON
	decodeJSON(g.t, r.body, &a)
	return a
}

// eventList is org's events, newest first.
func (g *gateway) eventList(org string) []eventJSON {
	g.t.Helper()
	r := g.admin(http.MethodGet, "/orgs/"+org+"/events?limit=1000", "")
	wantStatus(g.t, r, http.StatusOK)
	var v struct {
		Events []eventJSON `json:"events"`
	}
	decodeJSON(g.t, r.body, &v)
	if len(v.Events) >= 1000 {
		g.t.Fatalf("org %s has %d events: the log may be cut", org, len(v.Events))
	}
	return v.Events
}

// eventsOf is org's events of kind with ref.
func (g *gateway) eventsOf(org, kind, ref string) []eventJSON {
	g.t.Helper()
	var out []eventJSON
	for _, e := range g.eventList(org) {
		if e.Kind == kind && e.Ref == ref {
			out = append(out, e)
		}
	}
	return out
}

// grantsState is what a refused call must leave as it was: the account,
// holds and events (ledgerState), and the grants list.
func (g *gateway) grantsState(org string) string {
	g.t.Helper()
	r := g.admin(http.MethodGet, "/orgs/"+org+"/grants", "")
	served(g.t, r, "GET /orgs/"+org+"/grants")
	return g.ledgerState(org) + fmt.Sprintf("%d %s", r.status, r.body)
}

// spend makes one call of cost through the metered block route and wants
// it answered 200 with cost charged.
func (g *gateway) spend(org string, cost int64) reply {
	g.t.Helper()
	r := g.call("/background-removal/x", org, "X-Cost", fmt.Sprint(cost))
	wantStatus(g.t, r, http.StatusOK)
	wantHeaders(g.t, r, map[string]string{"Credits-Charged": fmt.Sprint(cost)})
	return r
}

// refused makes one call of cost through the block route and wants it
// refused 402 without reaching the upstream.
func (g *gateway) refused(org string, cost int64) reply {
	g.t.Helper()
	before := g.upstream.calls.Load()
	r := g.call("/background-removal/x", org, "X-Cost", fmt.Sprint(cost))
	wantStatus(g.t, r, http.StatusPaymentRequired)
	if g.upstream.calls.Load() != before {
		g.t.Fatalf("a call of cost %d refused 402 reached the upstream", cost)
	}
	return r
}

// answeredCredits is the credits of the calls the upstream answered for
// org, by what it received: the X-Cost of each call on background-removal,
// 1 for each on templates.
func (u *upstream) answeredCredits(t testing.TB, org string) int64 {
	t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.received) >= 1000 {
		t.Fatalf("the upstream kept only its last %d calls: the test cannot add them up", len(u.received))
	}
	var n int64
	for _, r := range u.received {
		if r.Header.Get("X-Org-Id") != org {
			continue
		}
		switch {
		case strings.HasPrefix(r.URL.Path, "/background-removal/"):
			var c int64
			if _, err := fmt.Sscan(r.Header.Get("X-Cost"), &c); err != nil {
				t.Fatalf("the upstream received a call without a cost: %v", r.Header)
			}
			n += c
		case strings.HasPrefix(r.URL.Path, "/templates/"):
			n++
		default:
			t.Fatalf("the upstream received a call on %s, which the test does not add up", r.URL.Path)
		}
	}
	return n
}

// wantChargedAnswered checks org from outside after the dust settled: the
// ledger charged (charge, refund, settle and capture events, and the
// period's usage when no recharge reset it) exactly the credits of the
// calls the upstream answered, plus captured, what capture events took
// (and, with usageToo, what captures added to usage); and the events add
// up to the balance from start.
func (g *gateway) wantChargedAnswered(org string, start, captured int64, usageToo bool) {
	g.t.Helper()
	answered := g.upstream.answeredCredits(g.t, org)
	events := g.eventList(org)
	var charged, sum int64
	for _, e := range events {
		sum += e.Delta
		if slices.Contains(leasedSpendingKinds, e.Kind) {
			charged -= e.Delta
		}
	}
	a := g.acct(org)
	g.t.Logf("org %s: the upstream answered %d credits of calls, the ledger charged %d (captured %d); balance %d",
		org, answered, charged, captured, a.Balance)
	if charged != answered+captured {
		g.t.Errorf("org %s: the ledger charged %d, the upstream answered %d credits of calls (and holds captured %d)", org, charged, answered, captured)
	}
	if usageToo {
		var used int64
		for _, n := range a.Used {
			used += n
		}
		if used != answered+captured {
			g.t.Errorf("org %s: used %v adds up to %d, the upstream answered %d (and holds captured %d)", org, a.Used, used, answered, captured)
		}
	}
	if start+sum != a.Balance {
		g.t.Errorf("org %s: the events add up to %d from %d, the balance is %d", org, sum, start, a.Balance)
	}
}

// wantGrant checks a grant's fields that want names.
func wantGrant(t testing.TB, got grantJSON, want grantJSON) {
	t.Helper()
	if got.ID != want.ID || got.State != want.State || got.Remaining != want.Remaining ||
		(want.Kind != "" && got.Kind != want.Kind) || (want.Amount != 0 && got.Amount != want.Amount) ||
		(want.Held != 0 && got.Held != want.Held) {
		t.Fatalf("grant %+v, want %+v", got, want)
	}
}

// TestGrantsBurnDownOrder gives an org grants of every priority and expiry
// and spends them through Caddy: each call's credits come from the grants
// in burn-down order (priority, then the earliest expiry, then purchased
// after the others), which GET /orgs/{org}/grants shows, remaining by
// remaining, after each call.
func TestGrantsBurnDownOrder(t *testing.T) {
	g := startGateway(t, gatewayOptions{global: "lease off"})
	const org = "burn"
	g.emptyOrg(org, 10, 0)
	g.topUp(org, 20)
	r := g.admin(http.MethodPost, "/orgs/"+org+"/topup", fmt.Sprintf(`{"amount": 6, "reference": "yearly", "expires": %q}`, rfc(at(48*time.Hour))))
	wantServed(t, r, http.StatusOK, "POST /orgs/"+org+"/topup with expires", "expires")
	expA := at(time.Hour)
	a, _ := g.grant(org, fmt.Sprintf(`{"amount": 5, "priority": 10, "expires": %q, "reference": "a"}`, rfc(expA)))
	b, _ := g.grant(org, fmt.Sprintf(`{"amount": 7, "expires": %q, "reason": "welcome"}`, rfc(at(24*time.Hour))))
	c, _ := g.grant(org, `{"amount": 4, "kind": "promotional"}`)
	d, acct := g.grant(org, fmt.Sprintf(`{"amount": 3, "priority": 90, "expires": %q}`, rfc(at(2*time.Hour))))
	if a.Priority != 10 || b.Priority != 50 || c.Priority != 50 || d.Priority != 90 || a.Kind != "promotional" || b.Reason != "welcome" ||
		a.Reference != "a" || a.Expires == nil || !a.Expires.Equal(expA) || c.Expires != nil || a.State != "live" {
		t.Fatalf("grants as given: %+v %+v %+v %+v", a, b, c, d)
	}
	const total = 10 + 20 + 6 + 5 + 7 + 4 + 3
	if acct.Balance != total || acct.Promotional != 19 || acct.Purchased != 26 || acct.AllowanceRemaining != 10 ||
		acct.NextExpiry == nil || !acct.NextExpiry.At.Equal(expA) || acct.NextExpiry.Amount != 5 {
		t.Fatalf("account after the grants: %+v, want balance %d, promotional 19, purchased 26, next expiry %s of 5", acct, total, expA)
	}

	// The expiring top-up is a purchased grant of its own.
	var e grantJSON
	for _, x := range g.grants(org) {
		if x.Kind == "purchased" && x.Expires != nil {
			e = x
		}
	}
	if e.ID == "" || e.Amount != 6 || e.ID == "purchased" {
		t.Fatalf("no purchased grant of 6 that expires among %+v", g.grants(org))
	}

	// Priority 10 first; then, of priority 50, the earliest expiry (B in a
	// day, the expiring top-up in two, the allowance at the recharge), the
	// promotional grant that never expires, and the purchased credits last
	// of them; priority 90 after all.
	order := []string{a.ID, b.ID, e.ID, "allowance", c.ID, "purchased", d.ID}
	left := map[string]int64{a.ID: 5, b.ID: 7, e.ID: 6, "allowance": 10, c.ID: 4, "purchased": 20, d.ID: 3}
	var live []string
	for _, x := range g.grants(org) {
		if x.State == "live" {
			live = append(live, x.ID)
		}
	}
	if !slices.Equal(live, order) {
		t.Fatalf("live grants listed %v, want the burn-down order %v", live, order)
	}

	spent := int64(0)
	for _, cost := range []int64{3, 4, 6, 8, 9, 5, 12, 6, 2} {
		r := g.spend(org, cost)
		spent += cost
		wantHeaders(t, r, map[string]string{"Credits-Remaining": fmt.Sprint(total - spent)})
		for n, i := cost, 0; n > 0; i++ {
			x := min(n, left[order[i]])
			left[order[i]] -= x
			n -= x
		}
		listed := map[string]grantJSON{}
		for _, x := range g.grants(org) {
			listed[x.ID] = x
		}
		for _, id := range order {
			x, ok := listed[id]
			switch {
			case id == "purchased" && left[id] == 0:
				if ok && x.Remaining != 0 {
					t.Fatalf("after %d spent: the standing purchased grant %+v, want none left", spent, x)
				}
			case !ok:
				t.Fatalf("after %d spent: no grant %s in %+v", spent, id, listed)
			case x.Remaining != left[id]:
				t.Fatalf("after %d spent: grant %s has %d left, want %d (burn-down order %v): %+v", spent, id, x.Remaining, left[id], order, listed)
			case left[id] == 0 && id != "allowance" && x.State != "spent":
				t.Fatalf("after %d spent: grant %s is %s, want spent", spent, id, x.State)
			}
		}
	}
	g.refused(org, 1)
	final := g.acct(org)
	if final.Balance != 0 || final.Promotional != 0 || final.Purchased != 0 || final.NextExpiry != nil {
		t.Fatalf("account after all was spent: %+v", final)
	}
	g.wantChargedAnswered(org, 0, 0, true)
}

// TestGrantsExpiryAndEffective gives an org a promotional grant that
// expires in a few seconds and one that becomes effective a little later.
// The first is spent from until it expires, then the balance loses what
// remained of it, with an expire event of that amount; the second is
// pending (not in the balance: a block route refuses a call it alone would
// pay) until its time, then live, with a grant event of its amount.
func TestGrantsExpiryAndEffective(t *testing.T) {
	g := startGateway(t, gatewayOptions{global: "lease off"})
	const org = "timed"
	g.emptyOrg(org, 0, 0)
	g.topUp(org, 5)
	expires := at(3 * time.Second)
	effective := expires.Add(2 * time.Second)
	p, _ := g.grant(org, fmt.Sprintf(`{"amount": 10, "expires": %q}`, rfc(expires)))
	q, acct := g.grant(org, fmt.Sprintf(`{"amount": 6, "effective": %q}`, rfc(effective)))
	if q.State != "pending" || !q.Effective.Equal(effective) || p.State != "live" {
		t.Fatalf("grants as given: %+v %+v", p, q)
	}
	if acct.Balance != 15 || acct.Promotional != 10 {
		t.Fatalf("account with a pending grant: %+v, want balance 15 (5 purchased + 10 live), promotional 10", acct)
	}
	if ev := g.eventsOf(org, "grant", q.ID); len(ev) != 1 || ev[0].Delta != 0 {
		t.Fatalf("the pending grant's events %+v, want one grant event of delta 0", ev)
	}
	for range 3 {
		g.spend(org, 1)
	}
	if time.Now().After(expires) {
		t.Fatalf("the calls before the expiry took until after it (%s)", expires)
	}
	acct = g.acct(org)
	if acct.Balance != 12 || acct.NextExpiry == nil || !acct.NextExpiry.At.Equal(expires) || acct.NextExpiry.Amount != 7 {
		t.Fatalf("account before the expiry: %+v, want balance 12, next expiry %s of 7", acct, expires)
	}
	wantGrant(t, g.grantOf(org, p.ID), grantJSON{ID: p.ID, State: "live", Remaining: 7})

	awaitCondition(t, "the promotional grant expires", func() bool { return g.grantOf(org, p.ID).State == "expired" })
	if time.Now().Before(expires) {
		t.Fatalf("the grant expired before %s", expires)
	}
	wantGrant(t, g.grantOf(org, p.ID), grantJSON{ID: p.ID, State: "expired", Remaining: 0})
	acct = g.acct(org)
	if acct.Balance != 5 || acct.Promotional != 0 || acct.NextExpiry != nil {
		t.Fatalf("account after the expiry: %+v, want balance 5 (the 7 left of the grant lost), promotional 0, no next expiry", acct)
	}
	if ev := g.eventsOf(org, "expire", p.ID); len(ev) != 1 || ev[0].Delta != -7 || ev[0].Balance != 5 {
		t.Fatalf("expire events of %s: %+v, want one of delta -7, balance 5", p.ID, ev)
	}

	// Pending: the 6 are not the org's yet.
	if time.Now().Before(effective) {
		if x := g.grantOf(org, q.ID); x.State != "pending" {
			t.Fatalf("before its effective time the grant is %+v, want pending", x)
		}
		r := g.call("/background-removal/x", org, "X-Cost", "6")
		if time.Now().Before(effective) {
			wantStatus(t, r, http.StatusPaymentRequired)
			wantHeaders(t, r, map[string]string{"Credits-Remaining": "5"})
		} else if r.status == http.StatusOK {
			t.Logf("the call of cost 6 came after the grant's effective time and was paid")
		}
	} else {
		t.Logf("the expiry was seen after %s: the pending state was not checked", effective)
	}
	awaitCondition(t, "the pending grant becomes live", func() bool { return g.grantOf(org, q.ID).State == "live" })
	if time.Now().Before(effective) {
		t.Fatalf("the grant became live before %s", effective)
	}
	if ev := g.eventsOf(org, "grant", q.ID); len(ev) != 2 || ev[0].Delta != 6 {
		t.Fatalf("grant events of %s: %+v, want a second one, of delta 6", q.ID, ev)
	}
	if g.upstream.forwarded(org, "background-removal") == 3 {
		acct = g.acct(org)
		if acct.Balance != 11 {
			t.Fatalf("account after the grant became live: %+v, want balance 11", acct)
		}
		g.spend(org, 6)
	}
	wantGrant(t, g.grantOf(org, q.ID), grantJSON{ID: q.ID, State: "spent", Remaining: 0})
	if acct = g.acct(org); acct.Balance != 5 || acct.Purchased != 5 {
		t.Fatalf("account after the call the new grant paid: %+v, want the 5 purchased left", acct)
	}
	g.wantChargedAnswered(org, 0, 0, true)
}

// TestGrantsRepayDebt runs an org into debt on an overdraft route, then
// gives it grants: each repays the debt first, a pending one when it
// becomes effective, and what is left of it remains to spend.
func TestGrantsRepayDebt(t *testing.T) {
	g := startGateway(t, gatewayOptions{global: "lease off"})
	const org = "indebted"
	g.emptyOrg(org, 0, 0)
	for range 7 {
		wantStatus(t, g.call("/templates/run", org), http.StatusOK)
	}
	if a := g.acct(org); a.Balance != -7 || a.Debt != 7 {
		t.Fatalf("account after 7 calls on nothing: %+v, want balance -7, debt 7", a)
	}
	small, acct := g.grant(org, `{"amount": 4}`)
	if acct.Balance != -3 || acct.Debt != 3 || small.Remaining != 0 || acct.Promotional != 0 {
		t.Fatalf("a grant of 4 on a debt of 7: grant %+v, account %+v; want all of it to the debt, debt 3", small, acct)
	}
	effective := at(3 * time.Second)
	big, acct := g.grant(org, fmt.Sprintf(`{"amount": 10, "effective": %q}`, rfc(effective)))
	if big.State != "pending" || acct.Debt != 3 || acct.Balance != -3 {
		t.Fatalf("a pending grant on a debt of 3: grant %+v, account %+v; want it pending and the debt as it was", big, acct)
	}
	awaitCondition(t, "the pending grant becomes live", func() bool { return g.grantOf(org, big.ID).State == "live" })
	wantGrant(t, g.grantOf(org, big.ID), grantJSON{ID: big.ID, State: "live", Remaining: 7, Amount: 10})
	if a := g.acct(org); a.Balance != 7 || a.Debt != 0 || a.Promotional != 7 || a.AllowanceRemaining != 0 {
		t.Fatalf("account once the grant of 10 is live: %+v, want the debt of 3 repaid first, balance 7", a)
	}
	for range 2 {
		wantStatus(t, g.call("/templates/run", org), http.StatusOK)
	}
	wantGrant(t, g.grantOf(org, big.ID), grantJSON{ID: big.ID, State: "live", Remaining: 5})
	if a := g.acct(org); a.Balance != 5 || a.Debt != 0 {
		t.Fatalf("account after two more calls: %+v, want balance 5", a)
	}
	g.wantChargedAnswered(org, 0, 0, true)
}

// TestGrantsRollover recharges an org on a plan with a rollover of 30:
// unused allowance up to 30 becomes a rollover grant that expires at the
// next recharge, is spent before the new allowance, and does not roll over
// again.
func TestGrantsRollover(t *testing.T) {
	g := startGateway(t, gatewayOptions{global: "lease off"})
	const org = "rolled"
	if a := g.emptyOrg(org, 100, 30); a.Plan.Rollover != 30 {
		t.Fatalf("plan %+v, want rollover 30", a.Plan)
	}
	recharge := func() accountJSON {
		t.Helper()
		r := g.admin(http.MethodPost, "/orgs/"+org+"/recharge", "")
		wantStatus(t, r, http.StatusOK)
		var a accountJSON
		decodeJSON(t, r.body, &a)
		return a
	}
	rolloverGrant := func() grantJSON {
		t.Helper()
		for _, x := range g.grants(org) {
			if x.Kind == "rollover" && x.State == "live" {
				return x
			}
		}
		return grantJSON{}
	}

	// 40 unused, 30 of them carried.
	g.spend(org, 60)
	a := recharge()
	if a.Balance != 130 || a.Rollover != 30 || a.AllowanceRemaining != 100 || a.NextExpiry == nil ||
		!a.NextExpiry.At.Equal(a.NextRecharge) || a.NextExpiry.Amount != 30 {
		t.Fatalf("account after a recharge with 40 unused: %+v, want rollover 30 (min(40, 30)) expiring at the next recharge, balance 130", a)
	}
	first := rolloverGrant()
	if first.Amount != 30 || first.Remaining != 30 || first.Expires == nil || !first.Expires.Equal(a.NextRecharge) {
		t.Fatalf("rollover grant %+v, want 30 expiring at %s", first, a.NextRecharge)
	}
	if ids := g.grants(org); len(ids) < 2 || ids[0].ID != first.ID || ids[1].ID != "allowance" {
		t.Fatalf("grants %+v: want the rollover first, then the allowance it expires with", ids)
	}

	// The rollover goes first; what is left of it at the next recharge is
	// gone, and the new rollover is of the allowance alone.
	g.spend(org, 10)
	wantGrant(t, g.grantOf(org, first.ID), grantJSON{ID: first.ID, State: "live", Remaining: 20})
	if a := g.acct(org); a.AllowanceRemaining != 100 || a.Balance != 120 {
		t.Fatalf("account after 10 spent: %+v, want them of the rollover", a)
	}
	a = recharge()
	if a.Balance != 130 || a.Rollover != 30 || a.AllowanceRemaining != 100 {
		t.Fatalf("account after a recharge with the allowance unused and 20 of rollover left: %+v, want rollover 30, balance 130", a)
	}
	if x := g.grantOf(org, first.ID); x.State != "expired" || x.Remaining != 0 {
		t.Fatalf("the first rollover grant after the recharge: %+v, want expired", x)
	}
	second := rolloverGrant()
	if second.ID == first.ID || second.Amount != 30 {
		t.Fatalf("second rollover grant %+v", second)
	}

	// 10 unused: 10 carried.
	g.spend(org, 120)
	wantGrant(t, g.grantOf(org, second.ID), grantJSON{ID: second.ID, State: "spent", Remaining: 0})
	a = recharge()
	third := rolloverGrant()
	if a.Balance != 110 || a.Rollover != 10 || third.Amount != 10 || third.Remaining != 10 {
		t.Fatalf("after a recharge with 10 unused: account %+v, rollover grant %+v; want a rollover of 10, balance 110", a, third)
	}
	g.wantChargedAnswered(org, 0, 0, false)
}

// TestGrantsVoid voids a grant with a reason: what remains of it is gone,
// with a void event of that amount and the reason; its repeat changes
// nothing; the allowance, the purchased credits and a spent grant are not
// voided (409), an unknown grant is a 404, and none of those changes
// anything.
func TestGrantsVoid(t *testing.T) {
	g := startGateway(t, gatewayOptions{global: "lease off"})
	const org = "voided"
	g.emptyOrg(org, 0, 0)
	g.topUp(org, 5)
	first, _ := g.grant(org, `{"amount": 2, "priority": 0}`)
	welcome, _ := g.grant(org, `{"amount": 10, "reason": "welcome"}`)
	g.spend(org, 2)
	g.spend(org, 4)
	wantGrant(t, g.grantOf(org, first.ID), grantJSON{ID: first.ID, State: "spent", Remaining: 0})
	wantGrant(t, g.grantOf(org, welcome.ID), grantJSON{ID: welcome.ID, State: "live", Remaining: 6})

	const reason = "abuse of the trial"
	for i := range 2 {
		r := g.admin(http.MethodDelete, "/orgs/"+org+"/grants/"+welcome.ID, fmt.Sprintf(`{"reason": %q}`, reason))
		wantServed(t, r, http.StatusOK, "DELETE /orgs/"+org+"/grants/"+welcome.ID)
		var a accountJSON
		decodeJSON(t, r.body, &a)
		if a.Balance != 5 || a.Promotional != 0 || a.Purchased != 5 {
			t.Fatalf("void %d: account %+v, want the 6 left of the grant gone, balance 5", i+1, a)
		}
	}
	if x := g.grantOf(org, welcome.ID); x.State != "voided" || x.Remaining != 0 || x.Amount != 10 {
		t.Fatalf("the voided grant: %+v", x)
	}
	if ev := g.eventsOf(org, "void", welcome.ID); len(ev) != 1 || ev[0].Delta != -6 || ev[0].Reason != reason || ev[0].Balance != 5 {
		t.Fatalf("void events %+v: want one, of delta -6, balance 5, reason %q", ev, reason)
	}

	before := g.grantsState(org)
	for _, c := range []struct {
		id     string
		status int
	}{
		{"allowance", http.StatusConflict},
		{"purchased", http.StatusConflict},
		{first.ID, http.StatusConflict},
		{"g99", http.StatusNotFound},
	} {
		r := g.admin(http.MethodDelete, "/orgs/"+org+"/grants/"+c.id, `{"reason": "no"}`)
		wantServed(t, r, c.status, "DELETE /orgs/"+org+"/grants/"+c.id)
		if p := r.problem(t); p["detail"] == "" {
			t.Fatalf("problem without detail: %v", p)
		}
		if after := g.grantsState(org); after != before {
			t.Fatalf("a refused void of %s changed the ledger:\n%s\n%s", c.id, before, after)
		}
	}

	// What was voided is not spent.
	g.spend(org, 5)
	g.refused(org, 1)
	g.wantChargedAnswered(org, 0, 0, true)
}

// TestGrantsHoldOfExpiredGrant holds credits of a promotional grant that
// then expires: the holds keep them (the expiry loses only what was free),
// a capture charges them, and what a capture or a release gives back of the
// ended grant is gone, not given to another.
func TestGrantsHoldOfExpiredGrant(t *testing.T) {
	g := startGateway(t, gatewayOptions{global: "lease off"})
	const org = "heldover"
	g.emptyOrg(org, 0, 0)
	g.topUp(org, 100)
	expires := at(3 * time.Second)
	p, _ := g.grant(org, fmt.Sprintf(`{"amount": 20, "priority": 0, "expires": %q}`, rfc(expires)))
	var ids []string
	for i, n := range []int64{15, 4} {
		r := g.admin(http.MethodPost, "/orgs/"+org+"/holds", fmt.Sprintf(`{"amount": %d, "feature": "long-job", "ttl": "10m", "reference": "job-%d"}`, n, i))
		wantStatus(t, r, http.StatusCreated)
		ids = append(ids, decodeObject(t, r)["hold"].(string))
	}
	wantGrant(t, g.grantOf(org, p.ID), grantJSON{ID: p.ID, State: "live", Remaining: 1, Held: 19})
	if a := g.acct(org); a.Balance != 120 || a.Held != 19 || a.Available != 101 || a.Purchased != 100 {
		t.Fatalf("account with 19 held of the grant: %+v", a)
	}
	if time.Now().After(expires) {
		t.Fatalf("the holds were taken after the grant's expiry (%s)", expires)
	}

	awaitCondition(t, "the held grant expires", func() bool { return g.grantOf(org, p.ID).State == "expired" })
	if ev := g.eventsOf(org, "expire", p.ID); len(ev) != 1 || ev[0].Delta != -1 {
		t.Fatalf("expire events of %s: %+v, want one of delta -1 (the credit no hold took)", p.ID, ev)
	}
	if a := g.acct(org); a.Balance != 119 || a.Held != 19 || a.Available != 100 || a.Purchased != 100 {
		t.Fatalf("account after the expiry: %+v, want the 19 held kept (balance 119, available 100)", a)
	}

	// Capture 10 of the 15: charged; the 5 released are of the ended grant.
	r := g.admin(http.MethodPost, "/orgs/"+org+"/holds/"+ids[0]+"/capture", `{"amount": 10}`)
	wantStatus(t, r, http.StatusOK)
	if a := g.acct(org); a.Balance != 104 || a.Held != 4 || a.Available != 100 || a.Purchased != 100 || a.Used["long-job"] != 10 {
		t.Fatalf("account after capturing 10 of 15: %+v, want 10 charged, 5 gone, balance 104", a)
	}
	r = g.admin(http.MethodDelete, "/orgs/"+org+"/holds/"+ids[1], "")
	wantStatus(t, r, http.StatusOK)
	if a := g.acct(org); a.Balance != 100 || a.Held != 0 || a.Available != 100 || a.Purchased != 100 || a.Promotional != 0 {
		t.Fatalf("account after releasing 4 of the expired grant: %+v, want them gone, balance 100", a)
	}
	// The capture's event takes the 10 charged and the 5 gone, the
	// release's the 4 gone.
	if ev := g.eventsOf(org, "capture", "hold:"+ids[0]); len(ev) != 1 || ev[0].Delta != -15 || ev[0].Balance != 104 {
		t.Fatalf("capture events %+v: want one of delta -15 (10 charged, 5 of the ended grant gone), balance 104", ev)
	}
	if ev := g.eventsOf(org, "release", "hold:"+ids[1]); len(ev) != 1 || ev[0].Delta != -4 || ev[0].Balance != 100 {
		t.Fatalf("release events %+v: want one of delta -4 (of the ended grant, gone), balance 100", ev)
	}
	wantGrant(t, g.grantOf(org, p.ID), grantJSON{ID: p.ID, State: "expired", Remaining: 0})
	g.spend(org, 100)
	g.refused(org, 1)
	g.wantChargedAnswered(org, 0, 15, false)
	if a := g.acct(org); a.Used["long-job"] != 10 || a.Used["background-removal"] != 100 || len(a.Used) != 2 {
		t.Fatalf("used %v, want long-job 10 (the capture), background-removal 100 (the calls)", a.Used)
	}
}

// TestGrantsBadInput sends every kind of bad grant, void, top-up expiry
// and plan rollover: each is a 400 problem, and the account, its holds,
// events and grants are as they were.
func TestGrantsBadInput(t *testing.T) {
	g := startGateway(t, gatewayOptions{global: "lease off"})
	const org = "careful"
	g.emptyOrg(org, 10, 0)
	given, _ := g.grant(org, `{"amount": 5, "reference": "first"}`)
	now := time.Now()
	past, soon, later := rfc(now.Add(-time.Hour)), rfc(now.Add(time.Hour)), rfc(now.Add(2*time.Hour))
	before := g.grantsState(org)
	for _, c := range []struct{ method, path, body string }{
		{"POST", "/grants", `{"amount": 5, "kind": "purchased"}`},
		{"POST", "/grants", `{"amount": 5, "kind": "allowance"}`},
		{"POST", "/grants", `{"amount": 5, "kind": "rollover"}`},
		{"POST", "/grants", `{"amount": 5, "kind": "gift"}`},
		{"POST", "/grants", `{"amount": 5, "priority": 101}`},
		{"POST", "/grants", `{"amount": 5, "priority": -1}`},
		{"POST", "/grants", `{"amount": 5, "priority": 1.5}`},
		{"POST", "/grants", `{"amount": 5, "priority": "high"}`},
		{"POST", "/grants", fmt.Sprintf(`{"amount": 5, "expires": %q}`, past)},
		{"POST", "/grants", fmt.Sprintf(`{"amount": 5, "effective": %q, "expires": %q}`, later, soon)},
		{"POST", "/grants", fmt.Sprintf(`{"amount": 5, "effective": %q, "expires": %q}`, soon, soon)},
		{"POST", "/grants", `{"amount": 5, "expires": "tomorrow"}`},
		{"POST", "/grants", `{"amount": 5, "effective": "2030-13-01T00:00:00Z"}`},
		{"POST", "/grants", `{"amount": 0}`},
		{"POST", "/grants", `{"amount": -5}`},
		{"POST", "/grants", `{"amount": 1000000000001}`},
		{"POST", "/grants", `{"amount": "5"}`},
		{"POST", "/grants", `{}`},
		{"POST", "/grants", `{"amount": 5, "colour": "red"}`},
		{"POST", "/grants", `{"Amount": 5}`},
		{"POST", "/grants", `{"amount": 5, "amount": 6}`},
		{"POST", "/grants", `{"amount": 5`},
		{"POST", "/grants", `[5]`},
		{"DELETE", "/grants/" + given.ID, `{"reason": "x", "colour": "red"}`},
		{"DELETE", "/grants/" + given.ID, `{"reason": 5}`},
		{"POST", "/topup", fmt.Sprintf(`{"amount": 5, "expires": %q}`, past)},
		{"POST", "/topup", `{"amount": 5, "expires": "soon"}`},
		{"PUT", "/plan", fmt.Sprintf(`{"allowance": 10, "recharge_month": %d, "rollover": 11}`, thisMonth())},
		{"PUT", "/plan", fmt.Sprintf(`{"allowance": 10, "recharge_month": %d, "rollover": -1}`, thisMonth())},
	} {
		r := g.admin(c.method, "/orgs/"+org+c.path, c.body)
		what := c.method + " /orgs/" + org + c.path + " " + c.body
		if c.path == "/grants" || strings.HasPrefix(c.path, "/grants/") {
			served(t, r, what)
		}
		wantStatus(t, r, http.StatusBadRequest)
		if p := r.problem(t); p["detail"] == "" {
			t.Fatalf("%s: problem without detail: %v", what, p)
		}
		if after := g.grantsState(org); after != before {
			t.Fatalf("%s changed the ledger:\n%s\n%s", what, before, after)
		}
	}
	// An org id that is not one.
	for _, bad := range []string{"a:b", "a%20b", "%7Bacme%7D", strings.Repeat("x", 300)} {
		r := g.admin(http.MethodPost, "/orgs/"+bad+"/grants", `{"amount": 5}`)
		served(t, r, "POST /orgs/"+bad+"/grants")
		wantStatus(t, r, http.StatusBadRequest)
		r = g.admin(http.MethodGet, "/orgs/"+bad+"/grants", "")
		wantServed(t, r, http.StatusBadRequest, "GET /orgs/"+bad+"/grants")
	}
	// The expires checks are against now: a grant of a second ago is
	// refused, of a minute ahead taken; the repeat of a reference answers
	// the same grant.
	r := g.admin(http.MethodPost, "/orgs/"+org+"/grants", `{"amount": 5, "reference": "first"}`)
	wantStatus(t, r, http.StatusOK)
	var v struct{ Grant grantJSON }
	decodeJSON(t, r.body, &v)
	if v.Grant.ID != given.ID {
		t.Fatalf("the repeat of a grant's reference answered %s, want the grant %+v", r.body, given)
	}
	if after := g.grantsState(org); after != before {
		t.Fatalf("the repeat of a grant changed the ledger:\n%s\n%s", before, after)
	}
	if a := g.acct(org); a.Balance != 15 {
		t.Fatalf("balance %d, want 15", a.Balance)
	}
}

// TestGrantsLimit gives an org 100 grants: the 101st is a 409 problem and
// changes nothing, as a repeat of one of them does not count; a grant
// spent or voided frees its slot.
func TestGrantsLimit(t *testing.T) {
	g := startGateway(t, gatewayOptions{global: "lease off"})
	const org = "crowded"
	g.emptyOrg(org, 0, 0)
	var first grantJSON
	for i := range 100 {
		x, a := g.grant(org, fmt.Sprintf(`{"amount": 1, "reference": "r%d"}`, i))
		if i == 0 {
			first = x
		}
		if a.Balance != int64(i+1) {
			t.Fatalf("grant %d: balance %d", i+1, a.Balance)
		}
	}
	full := func(what string) {
		t.Helper()
		before := g.grantsState(org)
		r := g.admin(http.MethodPost, "/orgs/"+org+"/grants", `{"amount": 7, "reference": "over"}`)
		wantServed(t, r, http.StatusConflict, what)
		if p := r.problem(t); p["detail"] == "" {
			t.Fatalf("problem without detail: %v", p)
		}
		if after := g.grantsState(org); after != before {
			t.Fatalf("a refused grant changed the ledger:\n%s\n%s", before, after)
		}
	}
	full("the 101st grant")
	r := g.admin(http.MethodPost, "/orgs/"+org+"/grants", `{"amount": 1, "reference": "r7"}`)
	wantStatus(t, r, http.StatusOK)
	if n := len(g.grants(org)); n != 101 {
		t.Fatalf("%d grants listed, want the allowance and 100", n)
	}

	// A call spends the oldest grant: its slot is free.
	g.spend(org, 1)
	wantGrant(t, g.grantOf(org, first.ID), grantJSON{ID: first.ID, State: "spent", Remaining: 0})
	g.grant(org, `{"amount": 7, "reference": "one-more"}`)
	full("a grant over 100 again")
	var victim string
	for _, x := range g.grants(org) {
		if x.Kind == "promotional" && x.State == "live" {
			victim = x.ID
			break
		}
	}
	r = g.admin(http.MethodDelete, "/orgs/"+org+"/grants/"+victim, `{"reason": "make room"}`)
	wantServed(t, r, http.StatusOK, "DELETE /orgs/"+org+"/grants/"+victim)
	g.grant(org, `{"amount": 3, "reference": "after-void"}`)
	full("a grant over 100 after the voided one's slot was taken")
	if a := g.acct(org); a.Balance != 99-1+7+3 {
		t.Fatalf("balance %d, want %d", a.Balance, 99-1+7+3)
	}
	g.wantChargedAnswered(org, 0, 0, true)
}

// leasedRaw is an admin call of a leasing gateway, answered as it is.
func (g *leasedGateway) leasedRaw(t *testing.T, method, path, body string) reply {
	t.Helper()
	req, err := http.NewRequest(method, g.adminURL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+leasedToken)
	resp, err := g.client.Do(req)
	if err != nil {
		t.Fatalf("gateway %s: %s %s: %v", g.name, method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return reply{status: resp.StatusCode, header: resp.Header, body: data}
}

func (g *leasedGateway) grantOf(t *testing.T, org, id string) grantJSON {
	t.Helper()
	r := g.leasedRaw(t, http.MethodGet, "/orgs/"+org+"/grants", "")
	wantServed(t, r, http.StatusOK, "GET /orgs/"+org+"/grants")
	var v struct{ Grants []grantJSON }
	decodeJSON(t, r.body, &v)
	for _, x := range v.Grants {
		if x.ID == id {
			return x
		}
	}
	t.Fatalf("org %s lists no grant %s: %s", org, id, r.body)
	return grantJSON{}
}

// TestGrantsLeasesAcrossExpiry drives calls through two leasing gateways
// (built caddy processes, the default lease) on an org whose credits are
// mostly a promotional grant that expires during the load; the rest are
// purchased credits. In one org the load goes on until those are spent
// too; in another it stops as soon as the expiry is seen, while leases
// still hold credits of the grant. In both, after the dust settled: the
// ledger charged exactly the calls the upstream answered; the balance never
// went below zero on the block route, and ends at what was granted less
// what was charged, what expired and what leases held of the grant and gave
// back after it ended; the expire event lost what the grant had left at its
// expiry; and after the expiry the upstream answered no more calls than the
// org had then.
func TestGrantsLeasesAcrossExpiry(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	up := startUpstream(t)
	a := startLeasedGateway(t, "A", srv.Addr, up.URL, DefaultLease, "1s")
	b := startLeasedGateway(t, "B", srv.Addr, up.URL, DefaultLease, "1s")
	for _, drain := range []bool{true, false} {
		org := map[bool]string{true: "promo-drained", false: "promo-stopped"}[drain]
		t.Run(org, func(t *testing.T) { leasesAcrossExpiry(t, a, b, up, org, drain) })
	}
}

func leasesAcrossExpiry(t *testing.T, a, b *leasedGateway, up *upstream, org string, drain bool) {
	const purchased = 500
	const promo = 1_000_000
	if acct := a.admin(t, http.MethodPost, "/orgs/"+org+"/topup", fmt.Sprintf(`{"amount": %d, "reference": "start"}`, purchased)); acct.Balance != purchased {
		t.Fatalf("balance %d after the top-up, want %d", acct.Balance, purchased)
	}
	expires := at(2500 * time.Millisecond)
	r := a.leasedRaw(t, http.MethodPost, "/orgs/"+org+"/grants", fmt.Sprintf(`{"amount": %d, "expires": %q, "reference": "promo"}`, promo, rfc(expires)))
	wantServed(t, r, http.StatusCreated, "POST /orgs/"+org+"/grants")
	var created struct{ Grant grantJSON }
	decodeJSON(t, r.body, &created)
	id := created.Grant.ID
	account := func() accountJSON {
		t.Helper()
		r := b.leasedRaw(t, http.MethodGet, "/orgs/"+org, "")
		wantStatus(t, r, http.StatusOK)
		var acct accountJSON
		decodeJSON(t, r.body, &acct)
		return acct
	}

	lowest := lowestBalance(b, org)
	load := startLeasedLoad(t, []*leasedGateway{a, b}, org, 16, 1_000_000, 30*time.Second)
	load.waitOK(t, 200)
	eventuallyWithin(t, 5*time.Second, "a lease holds credits of the org", func() bool { return b.account(t, org).Held > 0 })
	if time.Now().After(expires) {
		t.Fatalf("the load had not begun by the grant's expiry (%s)", expires)
	}
	// Read the account, then the upstream's count: calls answered between
	// the two were charged before the account was read.
	var atExpiry accountJSON
	var forwardedAtExpiry int64
	load.waitUntil(t, "the grant is seen expired", func() bool {
		if b.grantOf(t, org, id).State != "expired" {
			return false
		}
		atExpiry = account()
		forwardedAtExpiry = up.forwarded(org, leasedRoute)
		return true
	})
	if time.Now().Before(expires) {
		t.Fatalf("the grant expired before %s", expires)
	}
	if drain {
		load.waitDrained(t)
	}
	load.stop()
	low, err := lowest()
	if err != nil {
		t.Errorf("reading the balance during the load: %v", err)
	}
	settled := b.settled(t, org, 40*time.Second)
	final := account()
	// What live holds keep of the ended grant: the balance less the
	// purchased credits, the only live grant left.
	heldOfGrant := atExpiry.Balance - atExpiry.Purchased

	answered := up.forwarded(org, leasedRoute)
	// The usage of the period is what the ledger charged, net of refunds,
	// however many events the load wrote.
	charged := final.Used[leasedRoute]
	// The newest events, oldest first: the expiry is among them, and every
	// loss of leases' credits of the expired grant after it. The whole log
	// is added up when it holds fewer than 1000 events.
	r = b.leasedRaw(t, http.MethodGet, "/orgs/"+org+"/events?limit=1000", "")
	wantStatus(t, r, http.StatusOK)
	var log struct{ Events []eventJSON }
	decodeJSON(t, r.body, &log)
	events := log.Events
	slices.Reverse(events)
	complete := len(events) < 1000
	var chargedByEvents, sum, granted, expired, lostByHolds int64
	expireEvents := 0
	for _, e := range events {
		sum += e.Delta
		switch {
		case slices.Contains(leasedSpendingKinds, e.Kind):
			chargedByEvents -= e.Delta
		case e.Kind == "topup" || e.Kind == "grant":
			granted += e.Delta
		case e.Kind == "expire" && e.Ref == id:
			expired -= e.Delta
			expireEvents++
		case expireEvents > 0:
			// Leases' credits of the expired grant, given back after it
			// expired: gone.
			lostByHolds -= e.Delta
		case e.Delta != 0:
			t.Errorf("event %+v before the expiry changed the balance", e)
		}
	}
	g := b.grantOf(t, org, id)
	t.Logf("grant %s of %d expired at %s with %d left; purchased %d; answered %d, charged %d; lost with leases %d; "+
		"when the expiry was seen: balance %d, purchased %d, held %d (%d of the grant), %d answered; final %+v; lowest balance %d, lowest Credits-Remaining %d; %d events (whole log: %v); answers %s",
		id, promo, expires, expired, purchased, answered, charged, lostByHolds,
		atExpiry.Balance, atExpiry.Purchased, atExpiry.Held, heldOfGrant, forwardedAtExpiry, settled, low, load.minLeft.Load(), len(events), complete, load)

	if answered != charged {
		t.Errorf("the upstream answered %d calls, the ledger charged %d (used %v)", answered, charged, final.Used)
	}
	if ok := int64(load.count(http.StatusOK)); ok != answered {
		t.Errorf("%d calls answered 200, the upstream answered %d", ok, answered)
	}
	if complete {
		if chargedByEvents != charged || granted != purchased+promo || sum != final.Balance {
			t.Errorf("the events charged %d (usage %d), granted %d (want %d), add up to %d (balance %d)",
				chargedByEvents, charged, granted, purchased+promo, sum, final.Balance)
		}
	}
	if final.Balance != purchased+promo-charged-expired-lostByHolds || final.Balance < 0 {
		t.Errorf("final balance %d, want granted %d - charged %d - expired %d - lost with leases %d, and not below 0",
			final.Balance, purchased+promo, charged, expired, lostByHolds)
	}
	if final.Held != 0 || final.Balance != final.Purchased || final.Promotional != 0 {
		t.Errorf("account after the load %+v: want nothing held, and only purchased credits left", final)
	}
	if drain && final.Balance != 0 {
		t.Errorf("a drained org: balance %d, want 0", final.Balance)
	}
	if expireEvents != 1 || expired <= 0 || expired >= promo {
		t.Errorf("%d expire events of the grant, %d lost: want one, of what the load left of it", expireEvents, expired)
	}
	// Leases lose at most what they held of the grant when its expiry was
	// seen: later leases are of the purchased credits, which go back.
	if lostByHolds < 0 || lostByHolds > heldOfGrant {
		t.Errorf("leases lost %d credits of the expired grant; they held %d of it when its expiry was seen", lostByHolds, heldOfGrant)
	}
	// What the grant had at its expiry is what it gave less what calls took
	// of it (all charged but the purchased credits spent) and what leases
	// held of it then and did not spend.
	paid := purchased - final.Purchased
	if left := promo - (charged - paid) - lostByHolds; expired != left {
		t.Errorf("the expire event lost %d; the grant had %d left (%d less %d charged of it and %d held by leases)",
			expired, left, promo, charged-paid, lostByHolds)
	}
	if g.State != "expired" || g.Remaining != 0 || g.Amount != promo {
		t.Errorf("the grant after the load: %+v", g)
	}
	if after := answered - forwardedAtExpiry; after > atExpiry.Balance {
		t.Errorf("after the expiry was seen the upstream answered %d calls, over the %d credits the org had then", after, atExpiry.Balance)
	}
	if low < 0 || load.minLeft.Load() < 0 {
		t.Errorf("the balance went below zero on a block route: lowest balance read %d, lowest Credits-Remaining %d", low, load.minLeft.Load())
	}
	load.mu.Lock()
	for i, byStatus := range load.perGW {
		if byStatus[http.StatusOK] == 0 {
			t.Errorf("gateway %d forwarded no call: the org was not spent through both", i)
		}
	}
	load.mu.Unlock()
	allowed := []int{http.StatusOK, http.StatusServiceUnavailable}
	if drain {
		allowed = append(allowed, http.StatusPaymentRequired)
	}
	load.wantOnly(t, allowed...)
}
