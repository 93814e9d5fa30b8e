package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// The budgets in Chromium: the console's Budgets section, and credits.js
// showing the caller's budget beside the balance, each against Caddy with
// the budgeted routes of budgetSite in front of a real upstream and a real
// redis-server.

// frontendSite serves, on the gateway's own address, what a frontend
// would: web/credits.js and a page with a badge and a notice.
const frontendSite = `
	handle /credits.js {
		root * ../web
		file_server
	}
	handle / {
		header Content-Type "text/html; charset=utf-8"
		respond <<HTML
			<!doctype html><html lang="en"><head><meta charset="utf-8"><title>A frontend</title></head>
			<body><span data-credits-badge></span><div data-credits-notice hidden></div></body></html>
			HTML 200
	}
`

// budgetPage is a page of GET /orgs/{org}/budgets.
type budgetPage struct {
	Default *budgetJSON  `json:"default"`
	Budgets []budgetJSON `json:"budgets"`
	Next    string       `json:"next"`
}

// budgetList is every budget of org, through the admin API.
func (g *gateway) budgetList(org string) budgetPage {
	g.t.Helper()
	r := g.admin(http.MethodGet, "/orgs/"+org+"/budgets?limit=1000", "")
	wantServed(g.t, r, http.StatusOK, "GET /orgs/"+org+"/budgets")
	var p budgetPage
	decodeJSON(g.t, r.body, &p)
	if p.Next != "" {
		g.t.Fatalf("org %s has more than 1000 budgets", org)
	}
	return p
}

// budgetRows is the budgets table as the console should show the API's
// budgets.
func budgetRows(bs []budgetJSON) [][]string {
	windows := map[string]string{"day": "day", "week": "week", "month": "month", "period": "credit period"}
	rows := [][]string{}
	for _, b := range bs {
		rows = append(rows, []string{b.Subject, fmt.Sprintf("%d of %d", b.Spent, b.Limit), fmt.Sprint(b.Remaining),
			windows[b.Window], b.Resets.UTC().Format(time.DateTime), "Remove"})
	}
	return rows
}

// TestBrowserConsoleBudgets sets budgets from the console and removes
// them, and checks what it lists against the admin API: a subject's budget
// with what a budgeted call through Caddy spent of it, the default budget,
// a bad limit refused with the API's words and nothing changed, and more
// budgets than a page, listed with More.
func TestBrowserConsoleBudgets(t *testing.T) {
	g := startGateway(t, gatewayOptions{site: budgetSite})
	const org = "acme"
	g.emptyOrg(org, 1000, 0)

	ctx := newBrowser(t)
	// checkBudgets compares the budgets table and the default with the
	// API's, and returns the API's.
	checkBudgets := func() budgetPage {
		t.Helper()
		want := g.budgetList(org)
		wantRows := budgetRows(want.Budgets)
		show := `JSON.stringify([...document.querySelectorAll("#budgets tbody tr")].map(tr => [...tr.cells].map(c => c.textContent)))`
		pageWait(t, ctx, fmt.Sprintf("the budgets table should be the API's %v", wantRows),
			show+" === "+jsQuote(mustJSON(t, wantRows)), show)
		text := "none"
		if want.Default != nil {
			text = fmt.Sprintf("%d credits a %s", want.Default.Limit, want.Default.Window)
		}
		pageWaitText(t, ctx, "#default-budget-text", text)
		if hidden := pageEval[bool](t, ctx, `document.getElementById("default-remove").hidden`); hidden != (want.Default == nil) {
			t.Errorf("the default's Remove hidden: %v, with the API's default %+v", hidden, want.Default)
		}
		return want
	}

	pageOpen(t, ctx, g.adminURL+"/", "Credits usage console")
	pageType(t, ctx, "#token", "s3cret")
	pageType(t, ctx, "#org", org)
	pageClick(t, ctx, "#show")
	pageWaitText(t, ctx, "#balance", "1,000")
	pageWaitVisible(t, ctx, "#budgets-empty")
	checkBudgets()

	// Alice may spend 50 a day; a call through Caddy spends 12 of it.
	tomorrow := time.Now().UTC().Truncate(24 * time.Hour).Add(24 * time.Hour).Format(time.DateTime)
	pageType(t, ctx, "#budget-subject", "alice")
	pageType(t, ctx, "#budget-limit", "50")
	pageDo(t, ctx, "choose a day", chromedp.SetValue(chromedp.CSS("#budget-window"), "day"))
	pageClick(t, ctx, "#budget-submit")
	pageWaitText(t, ctx, "#budget-status", "Budget of alice set: 50 credits a day; 0 spent, 50 credits left until "+tomorrow+" UTC.")
	checkNextTo(t, ctx, "#budget-status", "#budget-submit")
	checkBudgets()
	r := g.budgeted("budgeted", org, "alice", 12)
	wantStatus(t, r, http.StatusOK)
	wantHeaders(t, r, map[string]string{"Credits-Budget-Remaining": "38"})
	// Bob, at 10 a week, has spent it all; Carol has 200 a month.
	g.setBudget(org, "bob", 10, "week")
	g.setBudget(org, "carol", 200, "month")
	for range 2 {
		wantStatus(t, g.budgeted("budgeted", org, "bob", 5), http.StatusOK)
	}
	wantStatus(t, g.budgeted("budgeted", org, "carol", 35), http.StatusOK)
	// A subject's calls paid from the gateway's lease show in the ledger
	// once the lease reports them.
	awaitCondition(t, "the lease reports the subjects' spending", func() bool {
		spent := map[string]int64{}
		for _, b := range g.budgetList(org).Budgets {
			spent[b.Subject] = b.Spent
		}
		return spent["alice"] == 12 && spent["bob"] == 10 && spent["carol"] == 35
	})
	pageClick(t, ctx, "#show")
	pageWaitText(t, ctx, `#budgets tr[data-subject="alice"] td:nth-child(2)`, "12 of 50")
	list := checkBudgets()
	if a := list.Budgets[0]; a.Subject != "alice" || a.Spent != 12 || a.Remaining != 38 {
		t.Fatalf("alice's budget, as the API lists it: %+v", a)
	}
	if spentCell := pageEval[string](t, ctx, `document.querySelector('#budgets tr[data-subject="bob"] td:nth-child(3)').className`); !strings.Contains(spentCell, "budget-spent") {
		t.Errorf("bob's spent budget's remaining is not marked spent: class %q", spentCell)
	}

	// The default budget, for the subjects with none of their own.
	pageClick(t, ctx, "#budget-for-default")
	pageWait(t, ctx, "the subject's field hides for the default", `document.getElementById("budget-subject").closest(".field").hidden`, `""`)
	pageType(t, ctx, "#budget-limit", "20")
	pageDo(t, ctx, "choose a week", chromedp.SetValue(chromedp.CSS("#budget-window"), "week"))
	pageClick(t, ctx, "#budget-submit")
	pageWaitText(t, ctx, "#budget-status", "Default budget of acme set: 20 credits a week, for each subject with no budget of its own.")
	list = checkBudgets()
	if list.Default == nil || list.Default.Limit != 20 || list.Default.Window != "week" {
		t.Fatalf("the default budget, as the API answers it: %+v", list.Default)
	}
	pageDo(t, ctx, "scroll to the budgets", chromedp.Evaluate[chromedp.Void](`document.getElementById("budgets-title").scrollIntoView()`))
	checkAccessibility(t, ctx)
	pageScreenshot(t, ctx, "console-budgets.png")

	// Bad limits: the API's words next to the form, and nothing changed.
	pageClick(t, ctx, "#budget-for-subject")
	before := mustJSON(t, g.budgetList(org))
	for _, c := range []struct{ limit, body string }{
		{"0", `{"limit": 0, "window": "day"}`},
		{"ten", `{"limit": "ten", "window": "day"}`},
		{"1000000000001", `{"limit": 1000000000001, "window": "day"}`},
	} {
		r := g.admin(http.MethodPut, "/orgs/"+org+"/budgets/dave", c.body)
		wantStatus(t, r, http.StatusBadRequest)
		detail, _ := r.problem(t)["detail"].(string)
		pageType(t, ctx, "#budget-subject", "dave")
		pageType(t, ctx, "#budget-limit", c.limit)
		pageClick(t, ctx, "#budget-submit")
		pageWaitText(t, ctx, "#budget-error", strings.Join(strings.Fields("Budget refused: "+detail), " "))
		pageWaitText(t, ctx, "#budget-status", "")
		checkNextTo(t, ctx, "#budget-error", "#budget-submit")
	}
	if after := mustJSON(t, g.budgetList(org)); after != before {
		t.Fatalf("refused budgets changed the budgets:\n%s\nwant\n%s", after, before)
	}
	checkBudgets()

	// Alice's budget removed: the default applies to her now.
	pageClick(t, ctx, `#budgets tr[data-subject="alice"] button.remove`)
	pageWaitText(t, ctx, "#budgets-status", "Budget of alice removed: the default budget, 20 credits a week, applies to it now.")
	checkBudgets()
	if b, status := g.getBudget(org, "alice"); status != http.StatusOK || !b.Default || b.Limit != 20 {
		t.Fatalf("alice's budget after its removal: %d %+v, want the default's", status, b)
	}
	// The default removed: alice has no budget at all.
	pageClick(t, ctx, "#default-remove")
	pageWaitText(t, ctx, "#default-budget-status", "Default budget of acme removed: the subjects with no budget of their own have no limit now.")
	checkNextTo(t, ctx, "#default-budget-status", ".default-budget")
	checkBudgets()
	if _, status := g.getBudget(org, "alice"); status != http.StatusNotFound {
		t.Fatalf("alice's budget after the default's removal: %d, want 404", status)
	}

	// More budgets than a page: 50 listed, then the rest with More; a
	// removal keeps the list as long as it was.
	for i := range 53 {
		g.setBudget(org, fmt.Sprintf("user-%02d", i), int64(10+i), "month")
	}
	all := g.budgetList(org).Budgets
	if len(all) != 55 {
		t.Fatalf("the API lists %d budgets, want 55", len(all))
	}
	pageClick(t, ctx, "#show")
	rowsShown := `document.querySelectorAll("#budgets tbody tr").length`
	pageWait(t, ctx, "a page of 50 budgets", rowsShown+" === 50", rowsShown+" + ''")
	pageWaitText(t, ctx, "#budgets-count", "50 budgets listed; More lists the next ones.")
	pageWaitVisible(t, ctx, "#budgets-more")
	pageClick(t, ctx, "#budgets-more")
	pageWait(t, ctx, "all 55 budgets", rowsShown+" === 55", rowsShown+" + ''")
	pageWaitText(t, ctx, "#budgets-count", "55 budgets listed.")
	if !pageEval[bool](t, ctx, `document.getElementById("budgets-more").hidden`) {
		t.Error("More shows with every budget listed")
	}
	checkBudgets()
	last := all[len(all)-1].Subject
	pageClick(t, ctx, fmt.Sprintf(`#budgets tr[data-subject=%q] button.remove`, last))
	pageWaitText(t, ctx, "#budgets-status", "Budget of "+last+" removed: it has no limit now.")
	pageWait(t, ctx, "54 budgets after a removal", rowsShown+" === 54", rowsShown+" + ''")
	checkBudgets()
}

// TestBrowserCreditsBudget uses credits.js, imported as a module by a page
// on the gateway's address, with a budgeted route and a credits_balance
// with budget: the budget shows beside the balance from the balance
// endpoint and from each call's Credits-Budget-Remaining; a spent budget's
// 402 is a budget notice, without the top-up link, and leaves the org's
// state to its balance; the org's own 402 is still "exhausted".
func TestBrowserCreditsBudget(t *testing.T) {
	g := startGateway(t, gatewayOptions{site: budgetSite + frontendSite})
	const org = "acme"
	g.emptyOrg(org, 100, 0)
	b := g.setBudget(org, "alice", 5, "day")
	g.emptyOrg("poor", 1, 0)
	ctx := openFrontend(t, g.url)

	// badge is the badge's text, state and budget attributes, and the
	// notice's kind and text, and whether it links to a top-up.
	const badge = `(() => {
		const b = document.querySelector("[data-credits-badge]"), n = document.querySelector("[data-credits-notice]");
		return [b.textContent, b.dataset.creditsState, b.dataset.creditsBudgetRemaining ?? "-", b.dataset.creditsBudgetState ?? "-",
			n.hidden ? "no notice" : n.dataset.creditsNoticeKind + ": " + n.querySelector("p").textContent + (n.querySelector("a") ? " [Add credits]" : "")].join(" | ");
	})()`
	waitPage := func(what, want string) {
		t.Helper()
		pageWait(t, ctx, what+": "+want, badge+" === "+jsQuote(want), badge)
	}
	pageEval[bool](t, ctx, `(window.changes = [], document.addEventListener("credits:change", (e) => window.changes.push(e.detail)), true)`)
	run := func(what, body string) string {
		t.Helper()
		return pageAsync(t, ctx, what, body)
	}
	call := func(route, user string, cost int) string {
		return fmt.Sprintf(`const r = await Credits.fetch("/%s/x", {method: "POST", headers: {"X-Org-Id": "acme", "X-User-Id": %q, "X-Cost": "%d"}}); return r.status;`, route, user, cost)
	}

	// A call's header alone tells what is left, before any refresh.
	run("observe a budgeted answer", `await Credits.observe(new Response("{}", {headers: {"Credits-Remaining": "7", "Credits-Budget-Remaining": "3"}})); return "";`)
	waitPage("a budget known from a header alone", "7 credits · 3 left in your budget | ok | 3 | ok | no notice")

	// The balance endpoint's budget: the whole of it, as the API has it.
	got := run("refresh with a budget", `const body = await Credits.refresh("/budget-balance", {headers: {"X-Org-Id": "acme", "X-User-Id": "alice"}});
		return JSON.stringify([body.budget, Credits.current().budget]);`)
	wantBudget := fmt.Sprintf(`{"subject":"alice","limit":5,"window":"day","spent":0,"remaining":5,"resets":%q}`, rfc(b.Resets))
	if got != "["+wantBudget+","+wantBudget+"]" {
		t.Fatalf("the balance endpoint's budget and current()'s: %s, want %s twice", got, wantBudget)
	}
	waitPage("after a refresh", "100 credits · 5 of 5 left today | ok | 5 | ok | no notice")

	// Each call's Credits-Budget-Remaining counts down.
	for _, want := range []string{"98 credits · 3 of 5 left today | ok | 3", "96 credits · 1 of 5 left today | ok | 1"} {
		if status := run("a budgeted call", call("budgeted", "alice", 2)); status != "200" {
			t.Fatalf("a budgeted call: %s", status)
		}
		waitPage("after a budgeted call", want+" | ok | no notice")
	}
	last := run("the last change", `const d = window.changes.at(-1); return JSON.stringify([d.balance, d.state, d.budget.remaining, d.budget.spent, d.budget.limit]);`)
	if last != "[96,\"ok\",1,4,5]" {
		t.Errorf("credits:change after two calls of 2: %s, want balance 96, ok, budget 1 left, 4 spent of 5", last)
	}

	// A block route's budget 402: no notice, the org still ok, the budget
	// spent; the problem is in the event.
	if status := run("a call the budget refuses", call("budgeted", "alice", 2)); status != "402" {
		t.Fatalf("a call over the budget: %s, want 402", status)
	}
	waitPage("after a block route's budget 402", "96 credits · 1 of 5 left today | ok | 1 | spent | no notice")
	if got := run("the 402's event", `const d = window.changes.at(-1); return d.problem.type + " " + d.problem.subject;`); got != "https://creditsgw.dev/problems/budget-spent alice" {
		t.Errorf("credits:change of the budget's 402: %s", got)
	}

	// A notice route's: the budget notice, with the gateway's words, and
	// no link to add credits, which would not help.
	r := g.budgeted("budgeted-notice", org, "alice", 2)
	wantStatus(t, r, http.StatusPaymentRequired)
	wantHeaders(t, r, map[string]string{"Credits-Notice": "budget"})
	detail, _ := r.problem(t)["detail"].(string)
	if status := run("a notice route's budget 402", call("budgeted-notice", "alice", 2)); status != "402" {
		t.Fatalf("a notice call over the budget: %s, want 402", status)
	}
	waitPage("after a notice route's budget 402", "96 credits · 1 of 5 left today | ok | 1 | spent | budget: "+detail)
	if role := pageEval[string](t, ctx, `document.querySelector("[data-credits-notice]").getAttribute("role")`); role != "alert" {
		t.Errorf("the budget notice's role: %q, want alert", role)
	}

	// The last credit of the budget: the notice goes, nothing is left.
	if status := run("the budget's last credit", call("budgeted-notice", "alice", 1)); status != "200" {
		t.Fatalf("a call of the budget's last credit: %s", status)
	}
	waitPage("after the budget's last credit", "95 credits · 0 of 5 left today | ok | 0 | spent | no notice")
	got = run("refresh after spending", `await Credits.refresh("/budget-balance", {headers: {"X-Org-Id": "acme", "X-User-Id": "alice"}});
		return JSON.stringify(Credits.current());`)
	if want := fmt.Sprintf(`{"balance":95,"state":"ok","budget":{"subject":"alice","limit":5,"window":"day","spent":5,"remaining":0,"resets":%q}}`, rfc(b.Resets)); got != want {
		t.Errorf("current() after a refresh: %s, want %s", got, want)
	}

	// An org out of credits is still the org's notice, with its link; a
	// subject without a budget shows none.
	run("refresh an org without a budget", `await Credits.refresh("/budget-balance", {headers: {"X-Org-Id": "poor", "X-User-Id": "bob"}}); return "";`)
	waitPage("a subject without a budget", "1 credit | ok | - | - | no notice")
	r = g.call("/budgeted-notice/x", "poor", "X-User-Id", "bob", "X-Cost", "5")
	wantStatus(t, r, http.StatusPaymentRequired)
	exhausted, _ := r.problem(t)["detail"].(string)
	run("the org out of credits", `await Credits.fetch("/budgeted-notice/x", {method: "POST", headers: {"X-Org-Id": "poor", "X-User-Id": "bob", "X-Cost": "5"}}); return "";`)
	waitPage("the org out of credits", "1 credit | exhausted | - | - | exhausted: "+exhausted+" [Add credits]")

	// From outside: the ledger charged what the upstream answered, and
	// alice's budget spent it.
	g.wantBudgetsAnswered(org, 100, map[string]int64{"alice": 5})
}

// mustJSON is v as JSON.
func mustJSON(t *testing.T, v any) string {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}
