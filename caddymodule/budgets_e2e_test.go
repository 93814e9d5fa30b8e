package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/meter"
)

// The budgets suite: the budgets contract of SPEC sections 4 to 6 checked
// from outside, through Caddy's admin API and budgeted routes in front of a
// real upstream, against a real redis-server. Each test ends by checking,
// per org and per subject, what the upstream answered against what the
// ledger charged and what the budgets counted.

// budgetSite holds the budgeted routes: block, notice and overdraft, a
// cost from X-Cost, the subject from X-User-Id; and the balance with the
// caller's budget.
const budgetSite = `
	route /budgeted/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature budgeted
			cost {http.request.header.X-Cost}
			budget {http.request.header.X-User-Id}
		}
		reverse_proxy {UPSTREAM}
	}
	route /budgeted-notice/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature budgeted
			cost {http.request.header.X-Cost}
			on_exhausted notice
			budget {http.request.header.X-User-Id}
		}
		reverse_proxy {UPSTREAM}
	}
	route /budgeted-flows/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature budgeted
			cost {http.request.header.X-Cost}
			on_exhausted overdraft
			budget {http.request.header.X-User-Id}
		}
		reverse_proxy {UPSTREAM}
	}
	handle /budget-balance {
		credits_balance {
			org {http.request.header.X-Org-Id}
			budget {http.request.header.X-User-Id}
		}
	}
`

func startBudgetGateway(t *testing.T) *gateway {
	t.Helper()
	return startGateway(t, gatewayOptions{site: budgetSite})
}

// budgeted makes one call of cost on route ("budgeted", "budgeted-notice"
// or "budgeted-flows", then path) for user in org.
func (g *gateway) budgeted(route, org, user string, cost int64, header ...string) reply {
	g.t.Helper()
	h := []string{"X-Cost", fmt.Sprint(cost)}
	if user != "" {
		h = append(h, "X-User-Id", user)
	}
	return g.call("/"+route+"/x", org, append(h, header...)...)
}

// setBudget sets user's budget (the default's, for user "") through the
// admin API and returns it.
func (g *gateway) setBudget(org, user string, limit int64, window string) budgetJSON {
	g.t.Helper()
	path := "/orgs/" + org + "/budgets/" + user
	if user == "" {
		path = "/orgs/" + org + "/default-budget"
	}
	r := g.admin(http.MethodPut, path, fmt.Sprintf(`{"limit": %d, "window": %q}`, limit, window))
	wantServed(g.t, r, http.StatusOK, "PUT "+path)
	var b budgetJSON
	decodeJSON(g.t, r.body, &b)
	return b
}

func (g *gateway) getBudget(org, user string) (budgetJSON, int) {
	g.t.Helper()
	r := g.admin(http.MethodGet, "/orgs/"+org+"/budgets/"+user, "")
	served(g.t, r, "GET /orgs/"+org+"/budgets/"+user)
	var b budgetJSON
	if r.status == http.StatusOK {
		decodeJSON(g.t, r.body, &b)
	}
	return b, r.status
}

// answeredBySubject is what the upstream answered on the budgeted routes
// for org, per subject: each call's X-Cost.
func (u *upstream) answeredBySubject(t testing.TB, org string) map[string]int64 {
	t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.received) >= 1000 {
		t.Fatalf("the upstream kept only its last %d calls: the test cannot add them up", len(u.received))
	}
	out := map[string]int64{}
	for _, r := range u.received {
		if r.Header.Get("X-Org-Id") != org || !strings.HasPrefix(r.URL.Path, "/budgeted") {
			continue
		}
		var c int64
		if _, err := fmt.Sscan(r.Header.Get("X-Cost"), &c); err != nil {
			t.Fatalf("the upstream received a call without a cost: %v", r.Header)
		}
		out[r.Header.Get("X-User-Id")] += c
	}
	return out
}

// wantBudgetsAnswered checks org from outside: the ledger charged what the
// upstream answered, and each subject's budget spent what the upstream
// answered for it (spent, for the subjects it names; the others have no
// budget).
func (g *gateway) wantBudgetsAnswered(org string, start int64, spent map[string]int64) {
	g.t.Helper()
	answered := g.upstream.answeredBySubject(g.t, org)
	var total int64
	for _, n := range answered {
		total += n
	}
	a := g.acct(org)
	if start-a.Balance != total {
		g.t.Errorf("org %s: the ledger charged %d, the upstream answered %d credits of calls (%v)", org, start-a.Balance, total, answered)
	}
	for user, want := range spent {
		if answered[user] != want {
			g.t.Errorf("subject %s: the upstream answered %d credits, want %d", user, answered[user], want)
		}
		b, status := g.getBudget(org, user)
		if status != http.StatusOK || b.Spent != want {
			g.t.Errorf("subject %s: budget %+v (%d), spent want %d", user, b, status, want)
		}
	}
}

// TestBudgetsLimitsAndHeaders: a subject's budget pays what it can, then
// refuses with a 402 problem that names it, without the upstream; every
// budgeted call says what the budget has left; a subject with no budget has
// no limit and nothing in Redis; the balance endpoint shows the caller's
// budget.
func TestBudgetsLimitsAndHeaders(t *testing.T) {
	g := startBudgetGateway(t)
	const org = "acme"
	g.emptyOrg(org, 100, 0)
	b := g.setBudget(org, "alice", 5, "day")
	tomorrow := time.Now().UTC().Truncate(24 * time.Hour).Add(24 * time.Hour)
	if b.Subject != "alice" || b.Limit != 5 || b.Window != "day" || b.Spent != 0 || b.Remaining != 5 || !b.Resets.Equal(tomorrow) {
		t.Fatalf("PUT budget answered %+v", b)
	}
	for _, left := range []string{"3", "1"} {
		r := g.budgeted("budgeted", org, "alice", 2)
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{"Credits-Charged": "2", "Credits-Budget-Remaining": left})
	}
	before := g.upstream.calls.Load()
	r := g.budgeted("budgeted", org, "alice", 2)
	wantStatus(t, r, http.StatusPaymentRequired)
	wantHeaders(t, r, map[string]string{"Credits-Budget-Remaining": "1", "Credits-Remaining": "96", "Credits-Notice": ""})
	p := r.problem(t)
	if p["type"] != "https://creditsgw.dev/problems/budget-spent" || p["subject"] != "alice" || p["limit"] != 5.0 ||
		p["spent"] != 4.0 || p["resets"] != rfc(tomorrow) || p["balance"] != 96.0 || p["cost"] != 2.0 {
		t.Fatalf("402 problem %s", r.body)
	}
	if g.upstream.calls.Load() != before {
		t.Fatal("a call refused by its budget reached the upstream")
	}
	// The same subject's last credit; on a notice route, the refusal says
	// budget.
	wantStatus(t, g.budgeted("budgeted", org, "alice", 1), http.StatusOK)
	r = g.budgeted("budgeted-notice", org, "alice", 1)
	wantStatus(t, r, http.StatusPaymentRequired)
	wantHeaders(t, r, map[string]string{"Credits-Notice": "budget", "Credits-Budget-Remaining": "0"})

	// Bob has no budget and the org no default: no limit, no header, and
	// nothing in Redis for him.
	r = g.budgeted("budgeted", org, "bob", 7)
	wantStatus(t, r, http.StatusOK)
	wantHeaders(t, r, map[string]string{"Credits-Budget-Remaining": ""})
	keys, _ := meter.NewKeys("credits")
	fields, err := g.redisClient().HKeys(t.Context(), keys.Budgets(org)).Result()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(strings.Join(fields, " "), "bob") {
		t.Fatalf("Redis holds %v for a subject with no budget", fields)
	}
	if _, status := g.getBudget(org, "bob"); status != http.StatusNotFound {
		t.Fatalf("GET bob's budget: %d, want 404", status)
	}

	// The balance endpoint shows the caller's budget, and none for bob.
	r = g.do(http.MethodGet, g.url+"/budget-balance", map[string]string{"X-Org-Id": org, "X-User-Id": "alice"}, "")
	wantStatus(t, r, http.StatusOK)
	wantHeaders(t, r, map[string]string{"Credits-Budget-Remaining": "0", "Credits-Remaining": "88"})
	var bal struct {
		Balance int64       `json:"balance"`
		Budget  *budgetJSON `json:"budget"`
	}
	decodeJSON(t, r.body, &bal)
	if bal.Balance != 88 || bal.Budget == nil || bal.Budget.Subject != "alice" || bal.Budget.Spent != 5 ||
		bal.Budget.Remaining != 0 || bal.Budget.Limit != 5 || !bal.Budget.Resets.Equal(tomorrow) {
		t.Fatalf("balance with a budget: %s", r.body)
	}
	r = g.do(http.MethodGet, g.url+"/budget-balance", map[string]string{"X-Org-Id": org, "X-User-Id": "bob"}, "")
	wantStatus(t, r, http.StatusOK)
	if strings.Contains(string(r.body), "budget") {
		t.Fatalf("balance of a subject with no budget: %s", r.body)
	}
	g.wantBudgetsAnswered(org, 100, map[string]int64{"alice": 5})
	if g.answered(org, "bob") != 7 {
		t.Fatal("bob's call was not answered")
	}
}

// answered is what the upstream answered for user of org on the budgeted
// routes.
func (g *gateway) answered(org, user string) int64 {
	return g.upstream.answeredBySubject(g.t, org)[user]
}

// TestBudgetsDefaultOverdraftAndRemoval: the default budget counts each
// subject apart; an overdraft route counts and never refuses; a limit
// lowered below what was spent refuses; a removed budget leaves the
// subject under the default, then with no limit.
func TestBudgetsDefaultOverdraftAndRemoval(t *testing.T) {
	g := startBudgetGateway(t)
	const org = "acme"
	g.emptyOrg(org, 100, 0)
	d := g.setBudget(org, "", 3, "week")
	if d.Subject != "" || d.Limit != 3 || d.Window != "week" {
		t.Fatalf("default budget %+v", d)
	}
	for _, user := range []string{"carol", "dave"} {
		wantStatus(t, g.budgeted("budgeted", org, user, 3), http.StatusOK)
		wantStatus(t, g.budgeted("budgeted", org, user, 1), http.StatusPaymentRequired)
	}
	b, status := g.getBudget(org, "carol")
	monday := time.Now().UTC().Truncate(24 * time.Hour)
	for monday.Weekday() != time.Monday {
		monday = monday.Add(24 * time.Hour)
	}
	if time.Now().UTC().Weekday() == time.Monday {
		monday = monday.Add(7 * 24 * time.Hour)
	}
	if status != http.StatusOK || !b.Default || b.Spent != 3 || !b.Resets.Equal(monday) {
		t.Fatalf("carol under the default: %+v (%d), resets want %s", b, status, monday)
	}
	// Overdraft counts past the limit and never refuses.
	for range 2 {
		r := g.budgeted("budgeted-flows", org, "carol", 2)
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{"Credits-Budget-Remaining": "0"})
	}
	// A budget of her own, lowered below what she spent.
	g.setBudget(org, "carol", 10, "week")
	wantStatus(t, g.budgeted("budgeted", org, "carol", 3), http.StatusOK)
	if b := g.setBudget(org, "carol", 4, "week"); b.Spent != 10 || b.Remaining != 0 {
		t.Fatalf("lowered below the spending: %+v", b)
	}
	wantStatus(t, g.budgeted("budgeted", org, "carol", 1), http.StatusPaymentRequired)
	// Removed: the default counts her again, with what she spent.
	r := g.admin(http.MethodDelete, "/orgs/"+org+"/budgets/carol", "")
	wantServed(t, r, http.StatusOK, "DELETE /orgs/"+org+"/budgets/carol")
	wantStatus(t, g.admin(http.MethodDelete, "/orgs/"+org+"/budgets/carol", ""), http.StatusNotFound)
	if b, _ := g.getBudget(org, "carol"); !b.Default || b.Spent != 10 {
		t.Fatalf("carol after her budget was removed: %+v", b)
	}
	wantStatus(t, g.admin(http.MethodDelete, "/orgs/"+org+"/default-budget", ""), http.StatusOK)
	r = g.budgeted("budgeted", org, "carol", 5)
	wantStatus(t, r, http.StatusOK)
	wantHeaders(t, r, map[string]string{"Credits-Budget-Remaining": ""})
	g.wantBudgetsAnswered(org, 100, nil)
	if got := g.answered(org, "carol"); got != 3+4+3+5 {
		t.Fatalf("carol: answered %d", got)
	}
}

// TestBudgetsRefundsReplaysAndBadInput: a call the upstream fails gives its
// credits back to the budget, a call settled to its usage counts its
// usage, a replay of an Idempotency-Key counts nothing again; a missing
// subject is 401 and an invalid one 400, and neither charges or writes.
func TestBudgetsRefundsReplaysAndBadInput(t *testing.T) {
	g := startBudgetGateway(t)
	const org = "acme"
	g.emptyOrg(org, 100, 0)
	g.setBudget(org, "alice", 10, "month")
	r := g.call("/budgeted/fail", org, "X-Cost", "4", "X-User-Id", "alice")
	wantStatus(t, r, http.StatusInternalServerError)
	if b, _ := g.getBudget(org, "alice"); b.Spent != 0 {
		t.Fatalf("after a failed call: %+v", b)
	}
	r = g.call("/budgeted/usage/6", org, "X-Cost", "2", "X-User-Id", "alice")
	wantStatus(t, r, http.StatusOK)
	wantHeaders(t, r, map[string]string{"Credits-Charged": "6"})
	if b, _ := g.getBudget(org, "alice"); b.Spent != 6 {
		t.Fatalf("after a call settled to 6: %+v", b)
	}
	for i := range 2 {
		r = g.call("/budgeted/x", org, "X-Cost", "3", "X-User-Id", "alice", "Idempotency-Key", "k1")
		wantStatus(t, r, http.StatusOK)
		if b, _ := g.getBudget(org, "alice"); b.Spent != 9 {
			t.Fatalf("call %d with one key: %+v", i, b)
		}
	}
	state := g.ledgerState(org)
	r = g.budgeted("budgeted", org, "", 1)
	wantStatus(t, r, http.StatusUnauthorized)
	if p := r.problem(t); p["type"] != "https://creditsgw.dev/problems/budget-subject-missing" {
		t.Fatalf("no subject: %s", r.body)
	}
	wantStatus(t, g.budgeted("budgeted", org, "a b", 1), http.StatusBadRequest)
	wantStatus(t, g.budgeted("budgeted", org, strings.Repeat("x", 65), 1), http.StatusBadRequest)
	for _, body := range []string{`{"limit": 0, "window": "day"}`, `{"limit": 5, "window": "year"}`, `{"limit": 5}`,
		`{"limit": 5, "window": "day", "extra": 1}`, `{"limit": 1000000000001, "window": "day"}`} {
		r := g.admin(http.MethodPut, "/orgs/"+org+"/budgets/alice", body)
		wantServed(t, r, http.StatusBadRequest, "PUT budget "+body)
	}
	wantServed(t, g.admin(http.MethodPut, "/orgs/"+org+"/budgets/a%20b", `{"limit": 5, "window": "day"}`),
		http.StatusBadRequest, "PUT a bad subject")
	if after := g.ledgerState(org); after != state {
		t.Fatalf("bad input changed the ledger:\n%s\nwant\n%s", after, state)
	}
	if b, _ := g.getBudget(org, "alice"); b.Spent != 9 || b.Limit != 10 {
		t.Fatalf("bad input changed the budget: %+v", b)
	}
	// The kept response of a replay was answered by the gateway: the
	// upstream answered one call of 3, one of 6 and the failed one.
	a := g.acct(org)
	if a.Balance != 100-9 {
		t.Fatalf("balance %d, want %d", a.Balance, 100-9)
	}
}

// TestBudgetsPaging lists budgets page by page, in order of their subjects.
func TestBudgetsPaging(t *testing.T) {
	g := startBudgetGateway(t)
	const org = "acme"
	for i := 7; i >= 1; i-- {
		g.setBudget(org, fmt.Sprintf("user-%02d", i), int64(i), "period")
	}
	g.setBudget(org, "", 50, "day")
	var got []string
	after := ""
	for pages := 0; ; pages++ {
		r := g.admin(http.MethodGet, "/orgs/"+org+"/budgets?limit=3&after="+after, "")
		wantServed(t, r, http.StatusOK, "GET budgets")
		var page struct {
			Default *budgetJSON  `json:"default"`
			Budgets []budgetJSON `json:"budgets"`
			Next    string       `json:"next"`
		}
		decodeJSON(t, r.body, &page)
		if page.Default == nil || page.Default.Limit != 50 || len(page.Budgets) > 3 || pages > 3 {
			t.Fatalf("page %d: %s", pages, r.body)
		}
		for _, b := range page.Budgets {
			got = append(got, fmt.Sprintf("%s:%d", b.Subject, b.Limit))
		}
		if page.Next == "" {
			break
		}
		after = page.Next
	}
	if want := "user-01:1 user-02:2 user-03:3 user-04:4 user-05:5 user-06:6 user-07:7"; strings.Join(got, " ") != want {
		t.Fatalf("pages: %s, want %s", strings.Join(got, " "), want)
	}
	for _, q := range []string{"limit=0", "limit=1001", "limit=x", "after=a%20b"} {
		wantServed(t, g.admin(http.MethodGet, "/orgs/"+org+"/budgets?"+q, ""), http.StatusBadRequest, "GET budgets?"+q)
	}
}

// TestBudgetsExactAcrossLeasingGateways: two leasing gateways take calls
// of ten subjects of one org at once, until every subject's budget is
// spent. The leases pay most calls from their shares of the budgets, and
// no budget is overspent: the upstream answered each subject exactly its
// limit, and the ledger charged the org what it answered.
func TestBudgetsExactAcrossLeasingGateways(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	up := startUpstream(t)
	gws := []*leasedGateway{
		startLeasedGateway(t, "a", srv.Addr, up.URL, 50, "1s"),
		startLeasedGateway(t, "b", srv.Addr, up.URL, 50, "1s"),
	}
	const org, subjects, limit = "busy", 10, 60
	gws[0].admin(t, http.MethodPut, "/orgs/"+org+"/plan", fmt.Sprintf(`{"allowance": 1000, "recharge_month": %d}`, thisMonth()))
	for i := range subjects {
		var b budgetJSON
		if err := gws[i%2].adminCall(http.MethodPut, fmt.Sprintf("/orgs/%s/budgets/u%d", org, i),
			fmt.Sprintf(`{"limit": %d, "window": "day"}`, limit), &b); err != nil {
			t.Fatal(err)
		}
	}
	var refused atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			gw := gws[w%2]
			// Each worker calls every subject until its budget refuses.
			for i := range subjects {
				for {
					req, _ := http.NewRequest(http.MethodPost, gw.url+"/budgeted/x", nil)
					req.Header.Set("X-Org-Id", org)
					req.Header.Set("X-User-Id", fmt.Sprintf("u%d", (i+w)%subjects))
					resp, err := gw.client.Do(req)
					if err != nil {
						errs <- err
						return
					}
					resp.Body.Close()
					if resp.StatusCode == http.StatusPaymentRequired {
						refused.Add(1)
						break
					}
					if resp.StatusCode != http.StatusOK {
						errs <- fmt.Errorf("gateway %s: status %d", gw.name, resp.StatusCode)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// Every lease reports and gives its credits and shares back.
	settled := gws[0].settled(t, org, 20*time.Second)
	perSubject := map[string]int64{}
	up.mu.Lock()
	for _, r := range up.received {
		if r.Header.Get("X-Org-Id") == org {
			perSubject[r.Header.Get("X-User-Id")]++
		}
	}
	up.mu.Unlock()
	var total int64
	for i := range subjects {
		user := fmt.Sprintf("u%d", i)
		total += perSubject[user]
		var b budgetJSON
		if err := gws[0].adminCall(http.MethodGet, "/orgs/"+org+"/budgets/"+user, "", &b); err != nil {
			t.Fatal(err)
		}
		t.Logf("subject %s: the upstream answered %d calls; budget spent %d of %d", user, perSubject[user], b.Spent, b.Limit)
		if perSubject[user] != limit || b.Spent != limit {
			t.Errorf("subject %s: answered %d, spent %d, want exactly %d", user, perSubject[user], b.Spent, limit)
		}
	}
	if 1000-settled.Balance != total || refused.Load() < 16*subjects {
		t.Fatalf("the ledger charged %d, the upstream answered %d; %d refusals", 1000-settled.Balance, total, refused.Load())
	}
	// The budgeted calls were leased: a charge of a call's own is one event
	// of its cost, a lease's sync one event for all the calls it reports.
	var leased, direct int64
	for _, e := range gws[0].events(t, org) {
		switch {
		case e.Kind == "charge" && strings.HasPrefix(e.Ref, "lease:"):
			leased -= e.Delta
		case e.Kind == "charge":
			direct -= e.Delta
		}
	}
	t.Logf("paid from leases: %d credits; charged call by call: %d; answered %d", leased, direct, total)
	if leased+direct != total || leased < total/2 {
		t.Errorf("leases paid %d credits and charges %d of the %d answered: budgeted calls must be leased", leased, direct, total)
	}
}

// TestAdminDocsBudgets runs the curl commands of docs/admin.md's Budgets
// section, as written but for the address, against a real Caddy and
// redis-server: each is answered 200, and together they leave the org's
// budgets as the comments say.
func TestAdminDocsBudgets(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	bodies := runDocCurls(t, g, "## Budgets", 4, "200")
	if !strings.Contains(bodies[2], `"subject":"alice","limit":50,"window":"day"`) || !strings.Contains(bodies[2], `"limit":200,"window":"month"`) {
		t.Fatalf("the page of budgets: %s", bodies[2])
	}
	b, status := g.getBudget("acme", "alice")
	if status != http.StatusOK || !b.Default || b.Limit != 200 || b.Window != "month" {
		t.Fatalf("alice after her budget was removed: %+v (%d)", b, status)
	}
}

// sharesHeld returns the credits of subject's budget in org that leases'
// shares hold, as Redis stores them ("<window> <lease>=<credits> ...").
func sharesHeld(t *testing.T, rdb *redis.Client, org, subject string) int64 {
	t.Helper()
	keys, err := meter.NewKeys("")
	if err != nil {
		t.Fatal(err)
	}
	v, err := rdb.HGet(context.Background(), keys.Budgets(org), "r:"+subject).Result()
	if errors.Is(err, redis.Nil) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, f := range strings.Fields(v) {
		if _, x, ok := strings.Cut(f, "="); ok {
			c, err := strconv.ParseInt(x, 10, 64)
			if err != nil {
				t.Fatalf("r:%s is %q: %v", subject, v, err)
			}
			n += c
		}
	}
	return n
}

// callsOf is how many calls of subject's in org the upstream received.
func (u *upstream) callsOf(org, subject string) int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	var n int64
	for _, r := range u.received {
		if r.Header.Get("X-Org-Id") == org && r.Header.Get("X-User-Id") == subject {
			n++
		}
	}
	return n
}

// callUntilRefused calls the budgeted route of gw as subject, one call
// after another, until the budget refuses one; it returns the calls
// answered 200.
func callUntilRefused(t *testing.T, gw *leasedGateway, org, subject string) int64 {
	t.Helper()
	var n int64
	for {
		req, _ := http.NewRequest(http.MethodPost, gw.url+"/budgeted/x", nil)
		req.Header.Set("X-Org-Id", org)
		req.Header.Set("X-User-Id", subject)
		resp, err := gw.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusOK:
			n++
		case http.StatusPaymentRequired:
			return n
		default:
			t.Fatalf("gateway %s: status %d", gw.name, resp.StatusCode)
		}
	}
}

// TestBudgetShareOfKilledGateway kills a gateway whose lease holds a share
// of a subject's budget. The share outlives the gateway by Redis' clock, as
// its lease does: the other gateway pays only what the budget has left
// beside it, also once the lease is unreported, and the rest once an
// operator releases the lease. The budget ends spent to the credit, and
// the upstream answered it at most what the killed gateway spent and could
// not report (or, at most a call per connection, fewer: calls the kill cut
// after they were charged).
func TestBudgetShareOfKilledGateway(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	rdb := srv.Client(t)
	up := startUpstream(t)
	victim := startLeasedGateway(t, "A", srv.Addr, up.URL, 50, "1s")
	other := startLeasedGateway(t, "B", srv.Addr, up.URL, 50, "1s")
	const org, subject, limit = "killed", "kim", 300
	other.admin(t, http.MethodPut, "/orgs/"+org+"/plan", fmt.Sprintf(`{"allowance": 100000, "recharge_month": %d}`, thisMonth()))
	var b budgetJSON
	if err := other.adminCall(http.MethodPut, "/orgs/"+org+"/budgets/"+subject, fmt.Sprintf(`{"limit": %d, "window": "day"}`, limit), &b); err != nil {
		t.Fatal(err)
	}

	// Calls on A until its lease holds a share of kim's budget.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	const workers = 4
	for range workers {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequest(http.MethodPost, victim.url+"/budgeted/x", nil)
				req.Header.Set("X-Org-Id", org)
				req.Header.Set("X-User-Id", subject)
				resp, err := victim.client.Do(req)
				if err != nil {
					return // killed
				}
				resp.Body.Close()
			}
		})
	}
	eventuallyWithin(t, 10*time.Second, "gateway A's lease holds a share of kim's budget", func() bool {
		return sharesHeld(t, rdb, org, subject) > 0
	})
	if err := victim.proc.cmd.Process.Kill(); err != nil {
		t.Fatalf("killing gateway A: %v", err)
	}
	close(stop)
	wg.Wait()
	reserved := sharesHeld(t, rdb, org, subject)
	if err := other.adminCall(http.MethodGet, "/orgs/"+org+"/budgets/"+subject, "", &b); err != nil {
		t.Fatal(err)
	}
	spentAtKill := b.Spent
	answeredByA := up.callsOf(org, subject)
	if reserved == 0 || spentAtKill+reserved > limit {
		t.Fatalf("after the kill: spent %d, shares %d of a budget of %d", spentAtKill, reserved, limit)
	}

	// B pays what the budget has left beside the killed lease's share.
	first := callUntilRefused(t, other, org, subject)
	if first != limit-spentAtKill-reserved {
		t.Fatalf("gateway B was answered %d calls, want %d: the budget of %d less %d spent and a share of %d",
			first, limit-spentAtKill-reserved, limit, spentAtKill, reserved)
	}
	// Past its lifetime the lease is unreported, and keeps its share.
	var lease leasedHold
	eventuallyWithin(t, 40*time.Second, "the killed gateway's lease is unreported", func() bool {
		for _, h := range other.holds(t, org) {
			if strings.HasPrefix(h.ID, "lease:") && h.State == "unreported" {
				lease = h
				return true
			}
		}
		return false
	})
	if n := callUntilRefused(t, other, org, subject); n != 0 {
		t.Fatalf("gateway B was answered %d calls beside an unreported lease's share", n)
	}
	other.admin(t, http.MethodDelete, "/orgs/"+org+"/holds/"+lease.ID, `{"gateway_gone": true, "reason": "gateway A was killed"}`)
	second := callUntilRefused(t, other, org, subject)
	if second != reserved {
		t.Fatalf("gateway B was answered %d calls once the lease was released, want its share of %d", second, reserved)
	}
	if err := other.adminCall(http.MethodGet, "/orgs/"+org+"/budgets/"+subject, "", &b); err != nil {
		t.Fatal(err)
	}
	answered := up.callsOf(org, subject)
	lost := answeredByA - spentAtKill
	t.Logf("A answered %d calls and reported %d before the kill, holding a share of %d; B answered %d, then %d after the release; budget spent %d of %d",
		answeredByA, spentAtKill, reserved, first, second, b.Spent, limit)
	// A's calls the upstream answered and A could not report are at most
	// its share; its calls charged and cut by the kill before the upstream
	// answered them, at most one per connection.
	if b.Spent != limit || lost < -workers || lost > reserved || answered != limit+lost {
		t.Errorf("budget spent %d of %d; the upstream answered %d, %d of A's calls unreported (its share was %d)", b.Spent, limit, answered, lost, reserved)
	}
}

// TestBudgetLoweredBelowShares lowers a subject's limit while a leasing
// gateway holds a share of its budget. The share was set aside under the
// old limit: spending may reach what was spent and set aside at the change,
// never more, and from the lease's next report on no call passes the new
// limit. The ledger charged the org what the upstream answered.
func TestBudgetLoweredBelowShares(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	rdb := srv.Client(t)
	up := startUpstream(t)
	gw := startLeasedGateway(t, "A", srv.Addr, up.URL, 50, "1s")
	const org, subject = "lowered", "lou"
	gw.admin(t, http.MethodPut, "/orgs/"+org+"/plan", fmt.Sprintf(`{"allowance": 100000, "recharge_month": %d}`, thisMonth()))
	var b budgetJSON
	if err := gw.adminCall(http.MethodPut, "/orgs/"+org+"/budgets/"+subject, `{"limit": 800, "window": "day"}`, &b); err != nil {
		t.Fatal(err)
	}
	call := func() int {
		req, _ := http.NewRequest(http.MethodPost, gw.url+"/budgeted/x", nil)
		req.Header.Set("X-Org-Id", org)
		req.Header.Set("X-User-Id", subject)
		resp, err := gw.client.Do(req)
		if err != nil {
			t.Error(err)
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	eventuallyWithin(t, 10*time.Second, "the lease holds a share of lou's budget", func() bool {
		call()
		return sharesHeld(t, rdb, org, subject) > 0
	})
	// What was spent and set aside at the change, read at once.
	keys, _ := meter.NewKeys("")
	v, err := rdb.HMGet(context.Background(), keys.Budgets(org), "s:"+subject).Result()
	if err != nil {
		t.Fatal(err)
	}
	reserved := sharesHeld(t, rdb, org, subject)
	var window string
	var spent int64
	fmt.Sscanf(v[0].(string), "%s %d", &window, &spent)
	lowered := spent + 1
	if err := gw.adminCall(http.MethodPut, "/orgs/"+org+"/budgets/"+subject, fmt.Sprintf(`{"limit": %d, "window": "day"}`, lowered), &b); err != nil {
		t.Fatal(err)
	}
	// Calls go on from 4 connections until each is refused 20 times in a
	// row: the lease's share is spent or shrunk, and then every call is
	// refused.
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for refused := 0; refused < 20; {
				switch call() {
				case http.StatusOK:
					refused = 0
				case http.StatusPaymentRequired:
					refused++
				default:
					t.Error("a call neither answered nor refused")
					return
				}
			}
		})
	}
	wg.Wait()
	settled := gw.settled(t, org, 20*time.Second)
	if err := gw.adminCall(http.MethodGet, "/orgs/"+org+"/budgets/"+subject, "", &b); err != nil {
		t.Fatal(err)
	}
	answered := up.callsOf(org, subject)
	t.Logf("at the change: spent %d, shares %d; limit lowered to %d; spent now %d, answered %d", spent, reserved, lowered, b.Spent, answered)
	if reserved < 2 || b.Spent > spent+reserved || b.Spent < lowered || answered != b.Spent || 100000-settled.Balance != answered {
		t.Errorf("spent %d (answered %d, charged %d) after the limit was lowered to %d, with %d spent and %d set aside at the change",
			b.Spent, answered, 100000-settled.Balance, lowered, spent, reserved)
	}
	if call() != http.StatusPaymentRequired || sharesHeld(t, rdb, org, subject) != 0 {
		t.Errorf("a call after the lowered limit was reached was not refused, or a share stays")
	}
}
