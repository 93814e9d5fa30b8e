package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"
	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/meter"
)

// The browser tests run the demo Caddyfile with the built binary and drive
// Debian's Chromium, headless, through the DevTools protocol: the demo page
// and credits.js, and the usage console. They write the screenshots that the
// README shows.

const chromiumPath = "/usr/bin/chromium"

// viewport is the size of every page, and of the screenshots.
const viewportWidth, viewportHeight = 1000, 700

// newBrowser starts Chromium with a fresh profile for one test and returns
// the context of its first tab.
func newBrowser(t *testing.T) context.Context {
	t.Helper()
	if _, err := os.Stat(chromiumPath); err != nil {
		t.Fatalf("the browser tests need Chromium at %s: install it with `apt-get install -y chromium` (%v)", chromiumPath, err)
	}
	parent, cancelParent := context.WithTimeout(context.Background(), 3*time.Minute)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(parent,
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		// Two tabs work side by side in a test: the one behind must not be
		// throttled.
		chromedp.Flag("disable-background-timer-throttling", true),
		chromedp.Flag("disable-renderer-backgrounding", true),
		chromedp.Flag("disable-backgrounding-occluded-windows", true),
		chromedp.Flag("force-color-profile", "srgb"),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(viewportWidth, viewportHeight),
	)
	ctx, cancel := chromedp.NewContext(allocCtx)
	t.Cleanup(func() {
		// Close the browser and wait for it, before its profile directory
		// is removed.
		closing, cancelClosing := context.WithTimeout(ctx, 10*time.Second)
		if err := chromedp.Cancel(closing); err != nil {
			t.Logf("closing Chromium: %v", err)
		}
		cancelClosing()
		cancel()
		cancelAlloc()
		cancelParent()
	})
	pageDo(t, ctx, "start Chromium", chromedp.EmulateViewport(viewportWidth, viewportHeight))
	return ctx
}

// newTab opens another tab in the browser of ctx.
func newTab(t *testing.T, ctx context.Context) context.Context {
	t.Helper()
	tab, cancel := chromedp.NewContext(ctx)
	t.Cleanup(cancel)
	pageDo(t, tab, "open a tab", chromedp.EmulateViewport(viewportWidth, viewportHeight))
	return tab
}

func pageDo(t *testing.T, ctx context.Context, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(ctx, actions...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// pageEval evaluates a JavaScript expression in the page.
func pageEval[T any](t *testing.T, ctx context.Context, expr string) T {
	t.Helper()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("evaluating %s: %v", expr, err)
	}
	return v
}

// jsQuote quotes s as a JavaScript string literal.
func jsQuote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// pageWait waits until the JavaScript expression cond is true in the page,
// then returns; otherwise it fails with what, and the value of show.
func pageWait(t *testing.T, ctx context.Context, what, cond, show string) {
	t.Helper()
	_, err := chromedp.Run(ctx, chromedp.Poll[chromedp.Void](cond,
		chromedp.WithPollingInterval(20*time.Millisecond),
		chromedp.WithPollingTimeout(10*time.Second)))
	if err != nil {
		got, _ := chromedp.Run(ctx, chromedp.Evaluate[string](show))
		t.Fatalf("%s: %v; the page shows %q", what, err, got)
	}
}

// pageWaitVisible waits until the element sel is visible.
func pageWaitVisible(t *testing.T, ctx context.Context, sel string) {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := chromedp.Do(wctx, chromedp.WaitVisible(chromedp.CSS(sel))); err != nil {
		t.Fatalf("%s should be visible: %v", sel, err)
	}
}

// pageOpen navigates to url and checks that the page is the one whose title
// is title.
func pageOpen(t *testing.T, ctx context.Context, url, title string) {
	t.Helper()
	pageDo(t, ctx, "open "+url, chromedp.Navigate(url))
	if got := pageEval[string](t, ctx, "document.title"); got != title {
		t.Fatalf("%s is %q, want the page %q: %s", url, got, title, pageEval[string](t, ctx, "document.body.innerText"))
	}
}

// pageText is an expression for the trimmed text of the element sel.
func pageText(sel string) string {
	return fmt.Sprintf(`(document.querySelector(%s)?.textContent ?? "<no element>").trim().replace(/\s+/g, " ")`, jsQuote(sel))
}

// pageWaitText waits until the element sel shows exactly want.
func pageWaitText(t *testing.T, ctx context.Context, sel, want string) {
	t.Helper()
	pageWait(t, ctx, fmt.Sprintf("%s should show %q", sel, want), pageText(sel)+" === "+jsQuote(want), pageText(sel))
}

// pageWaitContains waits until the text of the element sel contains want.
func pageWaitContains(t *testing.T, ctx context.Context, sel, want string) {
	t.Helper()
	pageWait(t, ctx, fmt.Sprintf("%s should contain %q", sel, want), pageText(sel)+".includes("+jsQuote(want)+")", pageText(sel))
}

// pageType types text into the input sel, as a user would, after clearing it.
func pageType(t *testing.T, ctx context.Context, sel, text string) {
	t.Helper()
	pageDo(t, ctx, "type into "+sel,
		// chromedp.SetValue cannot set an empty value.
		chromedp.Evaluate[chromedp.Void](fmt.Sprintf(`document.querySelector(%s).value = ""`, jsQuote(sel))),
		chromedp.SendKeys(chromedp.CSS(sel), text))
}

func pageClick(t *testing.T, ctx context.Context, sel string) {
	t.Helper()
	pageDo(t, ctx, "click "+sel, chromedp.Click(chromedp.CSS(sel)))
}

// pageScreenshot writes the viewport to docs/screenshots/name.
func pageScreenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	dir := filepath.Join("..", "docs", "screenshots")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), png, 0o644); err != nil {
		t.Fatal(err)
	}
}

// badgeText is what credits.js shows in the badge.
func badgeText(balance int, state string) string {
	s := fmt.Sprintf("%d credits", balance)
	if balance == 1 || balance == -1 {
		s = fmt.Sprintf("%d credit", balance)
	}
	if state == "low" {
		s += " (low)"
	}
	return s
}

// waitBadge waits until the demo page's badge shows balance in state.
func waitBadge(t *testing.T, ctx context.Context, balance int, state string) {
	t.Helper()
	const badge = "[data-credits-badge]"
	show := fmt.Sprintf(`%s + " / state " + document.querySelector(%s)?.dataset.creditsState`, pageText(badge), jsQuote(badge))
	cond := fmt.Sprintf(`%s === %s && document.querySelector(%s).dataset.creditsState === %s && document.querySelector(%s).dataset.creditsBalance === %s`,
		pageText(badge), jsQuote(badgeText(balance, state)), jsQuote(badge), jsQuote(state), jsQuote(badge), jsQuote(fmt.Sprint(balance)))
	pageWait(t, ctx, fmt.Sprintf("the badge should show %q (%s)", badgeText(balance, state), state), cond, show)
}

// problemBody is the part of an RFC 9457 problem the tests compare.
type problemBody struct {
	Status   int    `json:"status"`
	Detail   string `json:"detail"`
	TopUpURL string `json:"topup_url"`
}

// adminAPI calls the admin API from Go, for what the browser should show.
type adminAPI struct {
	base, token string
}

// call makes one admin call and decodes its JSON answer into out.
func (a adminAPI) call(t *testing.T, method, path, body string, out any) int {
	t.Helper()
	req, err := http.NewRequest(method, a.base+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if a.token != "" {
		req.Header.Set("Authorization", "Bearer "+a.token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s: %v: %s", method, path, err, data)
		}
	}
	return resp.StatusCode
}

// problem makes an admin call that must fail and returns its detail.
func (a adminAPI) problem(t *testing.T, method, path, body string) string {
	t.Helper()
	var p problemBody
	if status := a.call(t, method, path, body, &p); status < 400 || p.Detail == "" {
		t.Fatalf("%s %s %s: %d %+v, want a problem", method, path, body, status, p)
	}
	return p.Detail
}

type testAccount struct {
	Balance            int64            `json:"balance"`
	AllowanceRemaining int64            `json:"allowance_remaining"`
	Purchased          int64            `json:"purchased"`
	NextRecharge       string           `json:"next_recharge"`
	Used               map[string]int64 `json:"used"`
	NextPlan           *struct {
		Allowance     int64 `json:"allowance"`
		RechargeMonth int   `json:"recharge_month"`
	} `json:"next_plan"`
}

// meteredCall makes one call through the gateway as org.
func meteredCall(t *testing.T, gw, org, path string) (*http.Response, problemBody) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+gw+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Org-Id", org)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var p problemBody
	if resp.StatusCode >= 400 {
		if err := json.NewDecoder(resp.Body).Decode(&p); err != nil {
			t.Fatalf("%s: %d without a problem body: %v", path, resp.StatusCode, err)
		}
	}
	return resp, p
}

// TestBrowserDemo clicks Generate on the demo page until the credits run
// out, then tops up in the console and generates again.
func TestBrowserDemo(t *testing.T) {
	cfg, gw, admin := demoCaddyfile(t)
	// The notice shows the top-up URL: keep the demo's, not the test's
	// port, so that the screenshot is the same every run.
	_, port, _ := strings.Cut(gw, ":")
	cfg = strings.Replace(cfg, "topup_url http://localhost:"+port+"/", "topup_url http://localhost:8080/", 1)
	startCaddyProcess(t, cfg, gw, admin)
	ctx := newBrowser(t)

	pageOpen(t, ctx, "http://"+gw+"/", "Generative rich text: a credits.js demo")
	if path := pageEval[string](t, ctx, "location.pathname"); path != "/demo/" {
		t.Fatalf("the gateway's root led to %s, want /demo/", path)
	}
	const paragraphs = `document.querySelectorAll("#editor p.generated").length`
	const noticeHidden = `document.querySelector("[data-credits-notice]").hidden`

	// The badge starts from credits_balance, then counts down with each
	// call's Credits-Remaining; below 2 it says the credits are low.
	waitBadge(t, ctx, 5, "ok")
	checkTabOrder(t, ctx, "console-link", "prompt", "generate", "stream", "editor")
	for balance := 4; balance >= 0; balance-- {
		pageClick(t, ctx, "#generate")
		state := "ok"
		switch {
		case balance <= 0:
			state = "exhausted" // nothing left, though this call was paid
		case balance < 2:
			state = "low"
		}
		waitBadge(t, ctx, balance, state)
		pageWait(t, ctx, "a generated paragraph per call", fmt.Sprintf("%s === %d", paragraphs, 5-balance), paragraphs+" + ''")
		if !pageEval[bool](t, ctx, noticeHidden) {
			t.Fatalf("the notice shows after a call that succeeded: %s", pageEval[string](t, ctx, pageText("[data-credits-notice]")))
		}
	}

	// The credits are gone: the next Generate is refused, and the page shows
	// the gateway's own notice, with its top-up link, as an alert.
	resp, refused := meteredCall(t, gw, "demo", "/rich-text/generate")
	if resp.StatusCode != http.StatusPaymentRequired || resp.Header.Get("Credits-Notice") != "exhausted" {
		t.Fatalf("a call with no credits left: %d, Credits-Notice %q", resp.StatusCode, resp.Header.Get("Credits-Notice"))
	}
	pageClick(t, ctx, "#generate")
	pageWaitVisible(t, ctx, "[data-credits-notice]")
	pageWaitText(t, ctx, "[data-credits-notice] p", refused.Detail)
	waitBadge(t, ctx, 0, "exhausted")
	notice := pageEval[map[string]string](t, ctx, `(() => {
		const n = document.querySelector("[data-credits-notice]");
		const a = n.querySelector("a");
		return {role: n.getAttribute("role") ?? "", href: a ? a.href : "", link: a ? a.textContent : ""};
	})()`)
	if notice["role"] != "alert" || notice["href"] != refused.TopUpURL || notice["link"] == "" {
		t.Fatalf("the notice: %v; want role alert and a link to %s", notice, refused.TopUpURL)
	}
	if n := pageEval[int](t, ctx, paragraphs); n != 5 {
		t.Fatalf("%d generated paragraphs after a refused call, want 5", n)
	}
	pageWaitContains(t, ctx, "#status", "no credits left")
	checkAccessibility(t, ctx)
	pageScreenshot(t, ctx, "demo.png")

	// A top-up in the console, in another tab, makes the next call succeed:
	// the badge follows and the notice goes.
	console := newTab(t, ctx)
	pageOpen(t, console, "http://"+admin+"/admin/", "Credits usage console")
	pageType(t, console, "#org", "demo")
	pageClick(t, console, "#show")
	pageWaitText(t, console, "#balance", "0")
	pageWaitText(t, console, `#usage li[data-feature="rich-text"] .bar-value`, "5 credits")
	pageType(t, console, "#amount", "10")
	pageType(t, console, "#reference", "invoice-1")
	pageClick(t, console, "#topup-submit")
	pageWaitText(t, console, "#balance", "10")
	pageWaitText(t, console, "#purchased", "10")
	pageWaitContains(t, console, "#topup-status", "Added 10 credits to demo")

	pageClick(t, ctx, "#generate")
	waitBadge(t, ctx, 9, "ok")
	pageWait(t, ctx, "the notice should go once a call succeeds", noticeHidden, pageText("[data-credits-notice]"))
	if n := pageEval[int](t, ctx, paragraphs); n != 6 {
		t.Fatalf("%d generated paragraphs after the top-up, want 6", n)
	}

	// A streamed generation holds 3 and is charged 1: once the stream has
	// ended, the badge shows the balance after the real charge.
	pageClick(t, ctx, "#stream")
	pageWaitText(t, ctx, "#editor p.streamed", "A paragraph the AI wrote.")
	waitBadge(t, ctx, 8, "ok")
	pageWaitContains(t, ctx, "#status", "Streamed a paragraph")

	// The badge's state is the same after a call and after a refresh: a
	// block route's 402 (no notice) is exhausted and shows no notice; a
	// balance the gateway called low stays low on a refresh until it has
	// risen; a debt is exhausted.
	states := func(what, script string) string {
		t.Helper()
		pageEval[bool](t, ctx, `(window.creditsStates = null, (async () => {
			const { Credits } = await import("/credits.js");
			const state = () => document.querySelector("[data-credits-badge]").dataset.creditsState;
			const out = [];
			`+script+`
			window.creditsStates = out.join(", ");
		})(), true)`)
		pageWait(t, ctx, what, "window.creditsStates !== null", "String(window.creditsStates)")
		return pageEval[string](t, ctx, "window.creditsStates")
	}
	const refreshDemo = `await Credits.refresh("/credits/balance", {headers: {"X-Org-Id": "demo"}}); out.push(state());`
	got := states("the states of a block 402, a low answer and a refresh", `
		await Credits.observe(new Response('{"status":402}', {status: 402, headers: {"Credits-Remaining": "0", "Content-Type": "application/problem+json"}}));
		out.push(state() + (document.querySelector("[data-credits-notice]").hidden ? "" : " with the notice"));
		await Credits.observe(new Response("{}", {status: 200, headers: {"Credits-Remaining": "8", "Credits-Notice": "low"}}));
		out.push(state());
		`+refreshDemo)
	if want := "exhausted, low, low"; got != want {
		t.Errorf("badge states: %s, want %s (a block route's 402; an answer that says low at 8; a refresh at 8)", got, want)
	}
	api := adminAPI{base: "http://" + admin + "/admin"}
	if status := api.call(t, http.MethodPost, "/orgs/demo/topup", `{"amount": 1, "reference": "invoice-2"}`, nil); status != http.StatusOK {
		t.Fatalf("top-up: %d", status)
	}
	for range 6 { // 5 credits, then a debt of 1
		if resp, _ := meteredCall(t, gw, "indebted", "/flows/run"); resp.StatusCode != http.StatusOK {
			t.Fatalf("an overdraft call: %d", resp.StatusCode)
		}
	}
	got = states("the states after a top-up and of a debt", refreshDemo+`
		await Credits.observe(new Response("{}", {status: 200, headers: {"Credits-Remaining": "-1"}}));
		out.push(state());
		await Credits.refresh("/credits/balance", {headers: {"X-Org-Id": "indebted"}});
		out.push(state() + " " + document.querySelector("[data-credits-badge]").dataset.creditsBalance);`)
	if want := "ok, exhausted, exhausted -1"; got != want {
		t.Errorf("badge states: %s, want %s (a refresh at 9; a debt of 1 after a call; after a refresh)", got, want)
	}
}

// TestBrowserConsole uses the usage console of a credits_admin with a token:
// the account, usage per feature and events of an org, a top-up, a plan
// change, and the API's errors for bad input.
func TestBrowserConsole(t *testing.T) {
	const token = "console-test-token"
	cfg, gw, admin := demoCaddyfile(t)
	withToken := strings.Replace(cfg, "\t\tcredits_admin\n", "\t\tcredits_admin {\n\t\t\ttoken "+token+"\n\t\t}\n", 1)
	if withToken == cfg {
		t.Fatal("the demo Caddyfile has no bare credits_admin to give a token to")
	}
	startCaddyProcess(t, withToken, gw, admin)
	api := adminAPI{base: "http://" + admin + "/admin", token: token}

	// acme has a plan of its own and has used three features.
	if status := api.call(t, http.MethodPut, "/orgs/acme/plan", `{"allowance": 100, "recharge_month": 3}`, nil); status != http.StatusOK {
		t.Fatalf("setting acme's plan: %d", status)
	}
	for _, c := range []struct {
		path  string
		calls int
	}{{"/rich-text/generate", 3}, {"/background-removal/remove", 2}, {"/flows/run", 1}} {
		for range c.calls {
			if resp, p := meteredCall(t, gw, "acme", c.path); resp.StatusCode != http.StatusOK {
				t.Fatalf("%s: %d %s", c.path, resp.StatusCode, p.Detail)
			}
		}
	}
	var want testAccount
	api.call(t, http.MethodGet, "/orgs/acme", "", &want)
	if want.Balance != 94 {
		t.Fatalf("acme's balance after 6 calls: %d, want 94", want.Balance)
	}

	ctx := newBrowser(t)
	pageOpen(t, ctx, "http://"+admin+"/admin/", "Credits usage console")
	checkTabOrder(t, ctx, "token", "org", "show")

	// Without the token, the console shows the API's 401.
	unauthorized := adminAPI{base: api.base}.problem(t, http.MethodGet, "/orgs/acme", "")
	pageType(t, ctx, "#org", "acme")
	pageClick(t, ctx, "#show")
	pageWaitContains(t, ctx, "#error", unauthorized)

	// With it, acme's account, usage per feature, as bars, and events.
	pageType(t, ctx, "#token", token)
	pageClick(t, ctx, "#show")
	pageWaitText(t, ctx, "#balance", "94")
	pageWaitText(t, ctx, "#allowance-remaining", "94")
	pageWaitText(t, ctx, "#purchased", "0")
	if got := pageEval[string](t, ctx, `document.querySelector("#next-recharge time").dateTime`); got != want.NextRecharge {
		t.Errorf("next recharge: %q, want %q", got, want.NextRecharge)
	}
	pageWaitContains(t, ctx, "#plan", "100 credits a year, recharging on 1 March")
	type bar struct {
		Feature, Value, Width string
	}
	bars := pageEval[[]bar](t, ctx, `[...document.querySelectorAll("#usage li")].map(li => ({
		Feature: li.dataset.feature,
		Value: li.querySelector(".bar-value").textContent,
		Width: li.querySelector(".bar-fill").style.width,
	}))`)
	wantBars := []bar{
		{"rich-text", "3 credits", "100%"},
		{"background-removal", "2 credits", "66.7%"},
		{"flows", "1 credit", "33.3%"},
	}
	if fmt.Sprint(bars) != fmt.Sprint(wantBars) {
		t.Errorf("usage bars: %v, want %v", bars, wantBars)
	}
	if apiUsed := fmt.Sprint(want.Used); apiUsed != "map[background-removal:2 flows:1 rich-text:3]" {
		t.Errorf("the API's usage of acme: %s", apiUsed)
	}
	var events struct {
		Events []struct {
			Kind string `json:"kind"`
		} `json:"events"`
	}
	api.call(t, http.MethodGet, "/orgs/acme/events?limit=20", "", &events)
	rows := pageEval[[]string](t, ctx, `[...document.querySelectorAll("#events tbody tr")].map(tr => tr.cells[1].textContent)`)
	var kinds []string
	for _, ev := range events.Events {
		kinds = append(kinds, ev.Kind)
	}
	if fmt.Sprint(rows) != fmt.Sprint(kinds) {
		t.Errorf("events shown: %v, want the API's %v", rows, kinds)
	}
	pageScreenshot(t, ctx, "console.png")
	checkAccessibility(t, ctx)
	// From the chart's range: its table, then the forms, the adjustment's
	// between the top-up's and the plan's.
	pageDo(t, ctx, "focus the chart's range", chromedp.Evaluate[chromedp.Void](`document.querySelector("#chart-range input:checked").focus()`))
	checkTabOrder(t, ctx, "chart-table-toggle", "amount", "reference", "topup-submit", "adjust-amount", "adjust-reason", "adjust-submit", "allowance", "month", "plan-submit")

	// The token is kept for the tab, not beyond.
	pageDo(t, ctx, "reload the console", chromedp.Reload())
	if got := pageEval[string](t, ctx, `document.getElementById("token").value`); got != token {
		t.Errorf("the token after a reload: %q", got)
	}
	pageType(t, ctx, "#org", "acme")
	pageClick(t, ctx, "#show")
	pageWaitText(t, ctx, "#balance", "94")

	// A negative top-up: the API's error, and nothing changes.
	negative := api.problem(t, http.MethodPost, "/orgs/acme/topup", `{"amount": -5}`)
	pageType(t, ctx, "#amount", "-5")
	pageClick(t, ctx, "#topup-submit")
	pageWaitContains(t, ctx, "#topup-error", negative)
	pageWaitText(t, ctx, "#balance", "94")

	// A top-up, and the same reference again.
	pageType(t, ctx, "#amount", "6")
	pageType(t, ctx, "#reference", "invoice-7")
	pageClick(t, ctx, "#topup-submit")
	pageWaitText(t, ctx, "#purchased", "6")
	pageWaitText(t, ctx, "#balance", "100")
	// The form is done with the top-up once it says so.
	pageWaitText(t, ctx, "#topup-status", "Added 6 credits to acme. Balance: 100 credits.")
	pageWaitText(t, ctx, "#topup-error", "")
	pageType(t, ctx, "#amount", "6")
	pageType(t, ctx, "#reference", "invoice-7")
	pageClick(t, ctx, "#topup-submit")
	pageWaitContains(t, ctx, "#topup-status", `Reference "invoice-7" was already applied`)
	pageWaitText(t, ctx, "#balance", "100")
	pageWaitText(t, ctx, "#events tbody tr:first-child td:nth-child(2)", "topup")

	// A bad plan: the API's error. A good one: from the next recharge, as
	// acme has a plan of its own.
	badPlan := api.problem(t, http.MethodPut, "/orgs/acme/plan", `{"allowance": -1, "recharge_month": 3}`)
	pageType(t, ctx, "#allowance", "-1")
	pageClick(t, ctx, "#plan-submit")
	pageWaitContains(t, ctx, "#plan-error", badPlan)
	pageType(t, ctx, "#allowance", "50")
	pageDo(t, ctx, "choose July", chromedp.SetValue(chromedp.CSS("#month"), "7"))
	pageClick(t, ctx, "#plan-submit")
	pageWaitContains(t, ctx, "#plan", "From the next recharge: 50 credits a year, recharging on 1 July")
	var after testAccount
	api.call(t, http.MethodGet, "/orgs/acme", "", &after)
	if after.NextPlan == nil || after.NextPlan.Allowance != 50 || after.NextPlan.RechargeMonth != 7 || after.Balance != 100 {
		t.Errorf("acme after the console's calls: %+v", after)
	}

	// Bad orgs: an invalid id and an org Redis knows nothing of.
	for _, org := range []string{"a b", "nobody"} {
		detail := api.problem(t, http.MethodGet, "/orgs/"+url.PathEscape(org), "")
		pageType(t, ctx, "#org", org)
		pageClick(t, ctx, "#show")
		pageWaitContains(t, ctx, "#error", detail)
		if !pageEval[bool](t, ctx, `document.getElementById("account").hidden`) {
			t.Errorf("the account of the previous org stays on screen after %q failed", org)
		}
	}
}

// TestBrowserConsoleUsage uses the console's org list and its search, the
// chart of the credits used per day, and the adjust form, and checks what
// the page shows against what the admin API answers.
func TestBrowserConsoleUsage(t *testing.T) {
	const token = "usage-test-token"
	cfg, gw, admin := demoCaddyfile(t)
	withToken := strings.Replace(cfg, "\t\tcredits_admin\n", "\t\tcredits_admin {\n\t\t\ttoken "+token+"\n\t\t}\n", 1)
	if withToken == cfg {
		t.Fatal("the demo Caddyfile has no bare credits_admin to give a token to")
	}
	startCaddyProcess(t, withToken, gw, admin)
	api := adminAPI{base: "http://" + admin + "/admin", token: token}

	// Three orgs use two features each; acme has bought credits. More orgs
	// than one page of the list (50) make its More button needed.
	if status := api.call(t, http.MethodPost, "/orgs/acme/topup", `{"amount": 40, "reference": "invoice-1"}`, nil); status != http.StatusOK {
		t.Fatalf("top-up of acme: %d", status)
	}
	for _, c := range []struct {
		org, path string
		calls     int
	}{
		{"acme", "/rich-text/generate", 3}, {"acme", "/flows/run", 1},
		{"acme-labs", "/background-removal/remove", 1}, {"acme-labs", "/rich-text/generate", 2},
		{"beta", "/background-removal/remove", 2}, {"beta", "/flows/run", 1},
	} {
		for range c.calls {
			if resp, p := meteredCall(t, gw, c.org, c.path); resp.StatusCode != http.StatusOK {
				t.Fatalf("%s as %s: %d %s", c.path, c.org, resp.StatusCode, p.Detail)
			}
		}
	}
	for i := range 55 {
		org := fmt.Sprintf("zeta-%02d", i)
		if resp, p := meteredCall(t, gw, org, "/alt-text/describe"); resp.StatusCode != http.StatusOK {
			t.Fatalf("a call as %s: %d %s", org, resp.StatusCode, p.Detail)
		}
	}
	type orgBalance struct {
		Org     string `json:"org"`
		Balance int64  `json:"balance"`
	}
	type orgPage struct {
		Orgs []orgBalance `json:"orgs"`
		Next string       `json:"next"`
	}
	var all, first orgPage
	api.call(t, http.MethodGet, "/orgs?limit=1000", "", &all)
	api.call(t, http.MethodGet, "/orgs?limit=50", "", &first)
	if len(all.Orgs) != 58 || all.Next != "" || first.Next == "" {
		t.Fatalf("the API lists %d orgs (next %q), the first page of 50 ends at %q; want 58, and more than a page", len(all.Orgs), all.Next, first.Next)
	}
	balances := map[string]int64{}
	for _, o := range all.Orgs {
		balances[o.Org] = o.Balance
	}
	if balances["acme"] != 41 || balances["acme-labs"] != 2 || balances["beta"] != 2 {
		t.Fatalf("the API's balances: %v", balances)
	}

	ctx := newBrowser(t)
	pageOpen(t, ctx, "http://"+admin+"/admin/", "Credits usage console")
	// Without the token, the list says why it is empty.
	unauthorized := adminAPI{base: api.base}.problem(t, http.MethodGet, "/orgs", "")
	pageWaitContains(t, ctx, "#orgs-count", unauthorized)
	checkTabOrder(t, ctx, "token", "org", "show", "org-search", "org-open", "orgs-reload")

	// The list, a page at a time, is the API's, balances included.
	type listedOrg struct {
		Org, Balance, Text string
		Visible            bool
	}
	listedOrgs := func() []listedOrg {
		t.Helper()
		return pageEval[[]listedOrg](t, ctx, `[...document.querySelectorAll("#org-list .org-item")].map(b => ({
			Org: b.dataset.org, Balance: b.dataset.balance,
			Text: b.querySelector(".org-id").textContent + " " + b.querySelector(".org-balance").textContent,
			Visible: b.checkVisibility(),
		}))`)
	}
	wantListed := func(orgs []orgBalance) []listedOrg {
		var out []listedOrg
		for _, o := range orgs {
			text := fmt.Sprintf("%s %d credits", o.Org, o.Balance)
			if o.Balance == 1 || o.Balance == -1 {
				text = fmt.Sprintf("%s %d credit", o.Org, o.Balance)
			}
			out = append(out, listedOrg{o.Org, fmt.Sprint(o.Balance), text, true})
		}
		return out
	}
	const orgItems = `document.querySelectorAll("#org-list .org-item").length`
	pageType(t, ctx, "#token", token)
	pageClick(t, ctx, "#orgs-reload")
	pageWait(t, ctx, "the first page of orgs", orgItems+" === 50", orgItems+" + ''")
	if got, want := listedOrgs(), wantListed(first.Orgs); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("the first page listed:\n%v\nwant the API's\n%v", got, want)
	}
	pageWaitContains(t, ctx, "#orgs-count", "50 organizations listed; More lists the next ones.")
	pageWaitVisible(t, ctx, "#orgs-more")
	pageClick(t, ctx, "#orgs-more")
	pageWait(t, ctx, "all the orgs", orgItems+" === 58", orgItems+" + ''")
	pageWait(t, ctx, "More goes once all are listed", `document.getElementById("orgs-more").hidden`, pageText("#orgs-count"))
	pageWaitText(t, ctx, "#orgs-count", "58 organizations listed.")
	got := listedOrgs()
	if want := wantListed(all.Orgs); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("the orgs listed:\n%v\nwant the API's\n%v", got, want)
	}

	// The search filters the listed orgs by substring, in any case.
	visible := func() []string {
		t.Helper()
		var out []string
		for _, o := range listedOrgs() {
			if o.Visible {
				out = append(out, o.Org)
			}
		}
		return out
	}
	for _, c := range []struct {
		query string
		want  []string
		count string
	}{
		{"acme", []string{"acme", "acme-labs"}, "2 of 58 listed match \"acme\"."},
		{"LABS", []string{"acme-labs"}, "1 of 58 listed match \"LABS\"."},
		{"zeta-5", []string{"zeta-50", "zeta-51", "zeta-52", "zeta-53", "zeta-54"}, "5 of 58 listed match \"zeta-5\"."},
		{"nobody", nil, "0 of 58 listed match \"nobody\". Open goes to that id."},
	} {
		pageType(t, ctx, "#org-search", c.query)
		pageWaitText(t, ctx, "#orgs-count", c.count)
		if got := visible(); fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("searching %q shows %v, want %v", c.query, got, c.want)
		}
	}

	// Open goes to the exact id typed; clicking an org opens it.
	pageType(t, ctx, "#org-search", "beta")
	pageClick(t, ctx, "#org-open")
	pageWaitText(t, ctx, "#account-org", "beta")
	pageWaitText(t, ctx, "#balance", "2")
	pageType(t, ctx, "#org-search", "acme")
	pageWaitText(t, ctx, "#orgs-count", "2 of 58 listed match \"acme\".")
	pageClick(t, ctx, `#org-list .org-item[data-org="acme"]`)
	pageWaitText(t, ctx, "#account-org", "acme")
	pageWaitText(t, ctx, "#balance", "41")
	if got := pageEval[[]string](t, ctx, `[...document.querySelectorAll('#org-list [aria-current="true"]')].map(b => b.dataset.org)`); fmt.Sprint(got) != "[acme]" {
		t.Errorf("the org list marks %v as open, want [acme]", got)
	}
	// Cleared, as the search box's clear button does, it lists all again.
	pageDo(t, ctx, "clear the search", chromedp.Evaluate[chromedp.Void](`(() => {
		const e = document.getElementById("org-search");
		e.value = "";
		e.dispatchEvent(new Event("input", {bubbles: true}));
	})()`))
	pageWaitText(t, ctx, "#orgs-count", "58 organizations listed.")
	pageDo(t, ctx, "scroll to the org list", chromedp.Evaluate[chromedp.Void](`document.getElementById("orgs").scrollIntoView()`))
	pageScreenshot(t, ctx, "console-orgs.png")

	// The chart: a bar a day, each the API's usage of that day, for 30
	// days by default, then 90 and 13 months (396 days).
	type chartDay struct {
		Date  string           `json:"date"`
		Used  map[string]int64 `json:"used"`
		Total int64            `json:"total"`
	}
	type chart struct {
		From, To string
		Days     []chartDay
		Table    [][]string
		Legend   []string
	}
	readChart := func(days int) chart {
		t.Helper()
		ready := fmt.Sprintf(`document.querySelector('#chart[data-state="ready"] svg[data-days="%d"]') !== null`, days)
		pageWait(t, ctx, fmt.Sprintf("a chart of %d days", days), ready, `document.getElementById("chart").dataset.state + " " + document.getElementById("chart").textContent`)
		return pageEval[chart](t, ctx, `(() => {
			const svg = document.querySelector("#chart svg");
			return {
				From: svg.dataset.from, To: svg.dataset.to,
				Days: [...svg.querySelectorAll("g.chart-day")].map(g => ({
					date: g.dataset.date, total: +g.dataset.total,
					used: Object.fromEntries([...g.querySelectorAll("rect.chart-seg")].map(r => [r.dataset.feature, +r.dataset.used])),
				})),
				Table: [...document.querySelectorAll("#usage-table tr")].map(tr => [...tr.cells].map(c => c.textContent)),
				Legend: [...document.querySelectorAll("#chart-legend li")].map(li => li.dataset.feature),
			};
		})()`)
	}
	// checkChart compares the chart with the API's usage of its days, and
	// returns the API's answer.
	checkChart := func(c chart, days int) []chartDay {
		t.Helper()
		var usage struct {
			Org  string     `json:"org"`
			Days []chartDay `json:"days"`
		}
		if status := api.call(t, http.MethodGet, "/orgs/acme/usage?from="+c.From+"&to="+c.To, "", &usage); status != http.StatusOK {
			t.Fatalf("usage %s to %s: %d", c.From, c.To, status)
		}
		if len(usage.Days) != days || len(c.Days) != days {
			t.Fatalf("%d days charted, the API answers %d days from %s to %s; want %d", len(c.Days), len(usage.Days), c.From, c.To, days)
		}
		to, err := time.Parse(time.DateOnly, c.To)
		if err != nil {
			t.Fatal(err)
		}
		if want := to.AddDate(0, 0, -(days - 1)).Format(time.DateOnly); c.From != want {
			t.Errorf("the chart of %d days starts on %s, want %s", days, c.From, want)
		}
		features := map[string]bool{}
		header := []string{"Date (UTC)"}
		for i, d := range usage.Days {
			var total int64
			used := map[string]int64{}
			for f, n := range d.Used {
				total += n
				if n != 0 {
					used[f] = n
					features[f] = true
				}
			}
			if got := c.Days[i]; got.Date != d.Date || got.Total != total || fmt.Sprint(got.Used) != fmt.Sprint(used) {
				t.Errorf("day %d charted: %+v, want the API's %s: %v (%d)", i, got, d.Date, used, total)
			}
		}
		for _, f := range c.Legend {
			header = append(header, f)
		}
		header = append(header, "Total")
		if len(c.Legend) != len(features) {
			t.Errorf("legend %v, want the features %v", c.Legend, features)
		}
		if len(c.Table) != days+1 || fmt.Sprint(c.Table[0]) != fmt.Sprint(header) {
			t.Fatalf("the table has %d rows, header %v; want %d, %v", len(c.Table), c.Table[0], days+1, header)
		}
		for i, d := range usage.Days {
			row := []string{d.Date}
			var total int64
			for _, f := range c.Legend {
				row = append(row, fmt.Sprint(d.Used[f]))
				total += d.Used[f]
			}
			row = append(row, fmt.Sprint(total))
			if got := c.Table[i+1]; fmt.Sprint(got) != fmt.Sprint(row) {
				t.Errorf("table row %d: %v, want %v", i+1, got, row)
			}
		}
		return usage.Days
	}
	c := readChart(30)
	var byDefault struct {
		Days []chartDay `json:"days"`
	}
	api.call(t, http.MethodGet, "/orgs/acme/usage", "", &byDefault)
	if len(byDefault.Days) != 30 || c.From != byDefault.Days[0].Date || c.To != byDefault.Days[29].Date {
		t.Errorf("the chart shows %s to %s, want the API's default range of %d days", c.From, c.To, len(byDefault.Days))
	}
	days := checkChart(c, 30)
	if today := days[29]; today.Date != time.Now().UTC().Format(time.DateOnly) || fmt.Sprint(today.Used) != "map[flows:1 rich-text:3]" {
		t.Errorf("acme's usage today: %+v", today)
	}
	if fmt.Sprint(c.Legend) != "[rich-text flows]" {
		t.Errorf("legend %v, want the most used first", c.Legend)
	}
	pageWaitContains(t, ctx, "#chart-summary", "4 credits used from ")
	pageWaitContains(t, ctx, "#chart-summary", ": rich-text 3, flows 1.")
	checkAccessibility(t, ctx)
	for _, r := range []struct {
		value string
		days  int
	}{{"90", 90}, {"396", 396}, {"30", 30}} {
		pageClick(t, ctx, fmt.Sprintf(`#chart-range input[value="%s"]`, r.value))
		checkChart(readChart(r.days), r.days)
	}
	pageDo(t, ctx, "scroll to the chart", chromedp.Evaluate[chromedp.Void](`document.querySelector(".chart-head").scrollIntoView()`))
	pageScreenshot(t, ctx, "console-usage.png")

	// An adjustment with a negative amount: the balance falls by exactly
	// it, and the event keeps the reason.
	type event struct {
		Kind   string `json:"kind"`
		Delta  int64  `json:"delta"`
		Reason string `json:"reason"`
	}
	readEvents := func() []event {
		t.Helper()
		var events struct {
			Events []event `json:"events"`
		}
		api.call(t, http.MethodGet, "/orgs/acme/events?limit=20", "", &events)
		return events.Events
	}
	balance := func() int64 {
		t.Helper()
		var acct testAccount
		if status := api.call(t, http.MethodGet, "/orgs/acme", "", &acct); status != http.StatusOK {
			t.Fatalf("acme's account: %d", status)
		}
		return acct.Balance
	}
	before := balance()
	const reason = "Credit back a duplicate charge (ticket 4711)"
	pageType(t, ctx, "#adjust-amount", "-7")
	pageType(t, ctx, "#adjust-reason", reason)
	pageDo(t, ctx, "scroll to the adjust form", chromedp.Evaluate[chromedp.Void](`document.getElementById("adjust").scrollIntoView({block: "center"})`))
	pageScreenshot(t, ctx, "console-adjust.png")
	pageClick(t, ctx, "#adjust-submit")
	pageWaitContains(t, ctx, "#adjust-status", fmt.Sprintf("Adjusted acme by -7 credits: %q. Balance: %d credits.", reason, before-7))
	if after := balance(); after != before-7 {
		t.Errorf("acme's balance after an adjustment of -7: %d, was %d", after, before)
	}
	pageWaitText(t, ctx, "#balance", fmt.Sprint(before-7))
	pageWaitText(t, ctx, "#events tbody tr:first-child td:nth-child(2)", "adjust")
	pageWaitText(t, ctx, "#events tbody tr:first-child td:nth-child(4)", "-7")
	pageWaitText(t, ctx, "#events tbody tr:first-child td:nth-child(7)", reason)
	if ev := readEvents(); len(ev) == 0 || ev[0] != (event{"adjust", -7, reason}) {
		t.Errorf("acme's last event: %+v, want the adjustment", ev)
	}
	pageWaitText(t, ctx, `#org-list .org-item[data-org="acme"] .org-balance`, fmt.Sprintf("%d credits", before-7))
	if got := pageEval[string](t, ctx, `document.getElementById("adjust-amount").value + "|" + document.getElementById("adjust-reason").value`); got != "|" {
		t.Errorf("the adjust form after success: %q, want it empty", got)
	}
	checkChart(readChart(30), 30)

	// Bad adjustments are refused in the page with the API's own words,
	// and nothing is sent; one the API refuses shows its detail.
	eventsBefore := readEvents()
	balanceBefore := balance()
	for _, c := range []struct {
		amount, reason, field string
	}{
		{"0", "nothing", "adjust-amount"},
		{"-3", "", "adjust-reason"},
		{"1000000000001", "too much", "adjust-amount"},
		{"2.5", "half", "adjust-amount"},
		{"-3", "   ", "adjust-reason"},
	} {
		body, _ := json.Marshal(map[string]any{"amount": json.Number(c.amount), "reason": c.reason, "reference": "check-1"})
		detail := api.problem(t, http.MethodPost, "/orgs/acme/adjust", string(body))
		pageType(t, ctx, "#adjust-amount", c.amount)
		pageType(t, ctx, "#adjust-reason", c.reason)
		pageClick(t, ctx, "#adjust-submit")
		if c.amount == "2.5" {
			// The API fails to decode a fraction; the page says it as it
			// says any amount out of bounds.
			detail = `invalid amount "2.5": must be -1000000000000 to 1000000000000, and not 0`
		}
		// The page's text is compared with its spaces collapsed.
		pageWaitText(t, ctx, "#adjust-error", strings.Join(strings.Fields("Adjustment not sent: "+detail), " "))
		if got := pageEval[string](t, ctx, `document.activeElement.id + " " + document.activeElement.getAttribute("aria-invalid")`); got != c.field+" true" {
			t.Errorf("amount %q, reason %q: the focus is on %q, want %s, marked invalid", c.amount, c.reason, got, c.field)
		}
		pageType(t, ctx, "#adjust-amount", "")
		pageType(t, ctx, "#adjust-reason", "")
		pageClick(t, ctx, "#adjust-submit")
		pageWaitContains(t, ctx, "#adjust-error", "Adjustment not sent: invalid amount \"\"")
	}
	pageWaitText(t, ctx, "#balance", fmt.Sprint(balanceBefore))
	if after := balance(); after != balanceBefore {
		t.Errorf("acme's balance after refused adjustments: %d, want %d", after, balanceBefore)
	}
	if got := readEvents(); fmt.Sprint(got) != fmt.Sprint(eventsBefore) {
		t.Errorf("events after refused adjustments: %+v, want %+v", got, eventsBefore)
	}
	pageType(t, ctx, "#token", "wrong-token")
	pageType(t, ctx, "#adjust-amount", "-1")
	pageType(t, ctx, "#adjust-reason", "sent with a wrong token")
	pageClick(t, ctx, "#adjust-submit")
	pageWaitText(t, ctx, "#adjust-error", "Adjustment refused: "+unauthorized)
	if after := balance(); after != balanceBefore {
		t.Errorf("acme's balance after an adjustment the API refused: %d, want %d", after, balanceBefore)
	}
}

// TestConsoleFiles checks the console's HTTP side: served without the token
// (the API itself still needs it), with its security headers, revalidated
// by ETag.
func TestConsoleFiles(t *testing.T) {
	const token = "files-test-token"
	cfg, gw, admin := demoCaddyfile(t)
	cfg = strings.Replace(cfg, "\t\tcredits_admin\n", "\t\tcredits_admin {\n\t\t\ttoken "+token+"\n\t\t}\n", 1)
	startCaddyProcess(t, cfg, gw, admin)
	base := "http://" + admin + "/admin"

	for _, c := range []struct {
		method, path, contentType string
	}{
		{http.MethodGet, "/", "text/html; charset=utf-8"},
		{http.MethodHead, "/", "text/html; charset=utf-8"},
		{http.MethodGet, "/console.js", "text/javascript; charset=utf-8"},
		{http.MethodGet, "/console.css", "text/css; charset=utf-8"},
	} {
		t.Run(c.method+c.path, func(t *testing.T) {
			req, _ := http.NewRequest(c.method, base+c.path, nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			h := resp.Header
			if resp.StatusCode != http.StatusOK || h.Get("Content-Type") != c.contentType {
				t.Fatalf("%d %q", resp.StatusCode, h.Get("Content-Type"))
			}
			csp := h.Get("Content-Security-Policy")
			if !strings.Contains(csp, "default-src 'self'") || strings.Contains(csp, "unsafe-inline") ||
				h.Get("X-Content-Type-Options") != "nosniff" || h.Get("Cache-Control") == "" || h.Get("ETag") == "" {
				t.Errorf("headers: %v", h)
			}
			if (c.method == http.MethodHead) != (len(body) == 0) {
				t.Errorf("%s answered %d bytes", c.method, len(body))
			}
			req.Header.Set("If-None-Match", h.Get("ETag"))
			resp, err = http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusNotModified {
				t.Errorf("revalidation: %d, want 304", resp.StatusCode)
			}
		})
	}

	page, err := http.Get(base + "/")
	if err != nil {
		t.Fatal(err)
	}
	html, _ := io.ReadAll(page.Body)
	page.Body.Close()
	// Nothing from elsewhere, and no inline script for the CSP to block.
	for _, bad := range []string{"http://", "https://", "//cdn", "<script>", " on" + "click=", "style="} {
		if strings.Contains(string(html), bad) {
			t.Errorf("the console page contains %q", bad)
		}
	}

	// Everything else is the API's, behind the token.
	for _, c := range []struct{ method, path string }{
		{http.MethodPost, "/"}, {http.MethodGet, "/orgs/acme"}, {http.MethodGet, "/index.html"},
	} {
		req, _ := http.NewRequest(c.method, base+c.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("%s %s without the token: %d, want 401", c.method, c.path, resp.StatusCode)
		}
	}
}

// checkTabOrder presses Tab from where the focus is and checks the ids the
// focus visits, and that each shows a focus ring.
func checkTabOrder(t *testing.T, ctx context.Context, ids ...string) {
	t.Helper()
	var got []string
	for range ids {
		pageDo(t, ctx, "press Tab", chromedp.KeyEvent(kb.Tab))
		focus := pageEval[map[string]string](t, ctx, `(() => {
			const e = document.activeElement, s = getComputedStyle(e);
			return {id: e.id, outline: s.outlineStyle, width: s.outlineWidth};
		})()`)
		got = append(got, focus["id"])
		if focus["outline"] == "none" || focus["width"] == "0px" {
			t.Errorf("#%s has no visible focus: outline %s %s", focus["id"], focus["outline"], focus["width"])
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(ids) {
		t.Errorf("Tab visits %v, want %v", got, ids)
	}
}

// checkAccessibility checks the basics on the page as it is: a language and
// title, a name for every control, live regions, no positive tabindex, and
// WCAG AA contrast for all visible text.
func checkAccessibility(t *testing.T, ctx context.Context) {
	t.Helper()
	problems := pageEval[[]string](t, ctx, accessibilityCheck)
	for _, p := range problems {
		t.Errorf("accessibility: %s", p)
	}
}

const accessibilityCheck = `(() => {
	const problems = [];
	if (!document.documentElement.lang) problems.push("no lang on <html>");
	if (!document.title.trim()) problems.push("no <title>");

	const named = (e) => (e.labels && [...e.labels].some((l) => l.textContent.trim())) ||
		(e.getAttribute("aria-label") || "").trim() ||
		(e.getAttribute("aria-labelledby") || "").split(/\s+/).some((id) => document.getElementById(id)?.textContent.trim()) ||
		(e.tagName === "BUTTON" && e.textContent.trim());
	for (const e of document.querySelectorAll("input, select, textarea, button, [contenteditable], [role=textbox]")) {
		if (!named(e)) problems.push("no accessible name: " + e.outerHTML.slice(0, 80));
	}
	if (!document.querySelector("[role=status], [role=alert], [aria-live]")) problems.push("no live region");
	for (const e of document.querySelectorAll("[tabindex]")) {
		if (e.tabIndex > 0) problems.push("positive tabindex: " + e.outerHTML.slice(0, 80));
	}

	const rgb = (c) => {
		const m = c.match(/^rgba?\(([\d.]+),\s*([\d.]+),\s*([\d.]+)(?:,\s*([\d.]+))?\)$/);
		return m ? [+m[1], +m[2], +m[3], m[4] === undefined ? 1 : +m[4]] : null;
	};
	const channel = (v) => (v /= 255) <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
	const luminance = (c) => 0.2126 * channel(c[0]) + 0.7152 * channel(c[1]) + 0.0722 * channel(c[2]);
	const background = (e) => {
		for (; e; e = e.parentElement) {
			const c = rgb(getComputedStyle(e).backgroundColor);
			if (c && c[3] === 1) return c;
		}
		return [255, 255, 255, 1];
	};
	const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
	for (let n = walker.nextNode(); n; n = walker.nextNode()) {
		const e = n.parentElement, text = n.textContent.trim();
		if (!text || !e.checkVisibility() || e.closest(".visually-hidden, option")) continue;
		const s = getComputedStyle(e), fg = rgb(s.color), bg = background(e);
		if (!fg) { problems.push("colour not understood: " + s.color); continue; }
		const [hi, lo] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
		const ratio = (hi + 0.05) / (lo + 0.05);
		const size = parseFloat(s.fontSize), large = size >= 24 || (size >= 18.66 && +s.fontWeight >= 700);
		if (ratio < (large ? 3 : 4.5)) problems.push("contrast " + ratio.toFixed(2) + " of " + JSON.stringify(text.slice(0, 40)));
	}
	return problems;
})()`

// TestBrowserConsoleGrants gives a promotional grant from the console, sees
// it in the grants table with its expiry, voids it with a reason, and sees
// it voided and the balance back; the table and the figures are the admin
// API's.
func TestBrowserConsoleGrants(t *testing.T) {
	const token = "grants-test-token"
	cfg, gw, admin := demoCaddyfile(t)
	withToken := strings.Replace(cfg, "\t\tcredits_admin\n", "\t\tcredits_admin {\n\t\t\ttoken "+token+"\n\t\t}\n", 1)
	if withToken == cfg {
		t.Fatal("the demo Caddyfile has no bare credits_admin to give a token to")
	}
	startCaddyProcess(t, withToken, gw, admin)
	api := adminAPI{base: "http://" + admin + "/admin", token: token}
	if status := api.call(t, http.MethodPut, "/orgs/acme/plan", `{"allowance": 100, "recharge_month": 3}`, nil); status != http.StatusOK {
		t.Fatalf("setting acme's plan: %d", status)
	}
	if status := api.call(t, http.MethodPost, "/orgs/acme/topup", `{"amount": 40, "reference": "invoice-1"}`, nil); status != http.StatusOK {
		t.Fatalf("acme's top-up: %d", status)
	}

	// The browser, started once the closures below are defined.
	var browser context.Context
	type grant struct {
		Grant     string  `json:"grant"`
		Kind      string  `json:"kind"`
		State     string  `json:"state"`
		Amount    int64   `json:"amount"`
		Remaining int64   `json:"remaining"`
		Priority  int     `json:"priority"`
		Expires   *string `json:"expires"`
		Reason    string  `json:"reason"`
	}
	// checkGrants compares the grants table with the API's grants, row by
	// row, and returns the API's.
	checkGrants := func() []grant {
		t.Helper()
		var list struct {
			Grants []grant `json:"grants"`
		}
		if status := api.call(t, http.MethodGet, "/orgs/acme/grants", "", &list); status != http.StatusOK {
			t.Fatalf("acme's grants: %d", status)
		}
		var want [][]string
		for _, g := range list.Grants {
			expires := "never"
			if g.Expires != nil {
				expires = strings.TrimSuffix(strings.Replace(*g.Expires, "T", " ", 1), "Z")
			}
			void := ""
			if (g.State == "live" || g.State == "pending") && strings.HasPrefix(g.Grant, "g") {
				void = "Void"
			}
			want = append(want, []string{g.Grant, g.Kind, g.State, fmt.Sprintf("%d of %d", g.Remaining, g.Amount),
				fmt.Sprint(g.Priority), expires, g.Reason, void})
		}
		got := pageEval[[][]string](t, browser, `[...document.querySelectorAll("#grants tbody tr")].map(tr => [...tr.cells].map(c => c.textContent))`)
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("the grants table:\n%v\nwant the API's\n%v", got, want)
		}
		return list.Grants
	}
	// checkFigures compares the account's figures with the API's.
	checkFigures := func() testAccount {
		t.Helper()
		var acct struct {
			testAccount
			Available   int64 `json:"available"`
			Promotional int64 `json:"promotional"`
		}
		api.call(t, http.MethodGet, "/orgs/acme", "", &acct)
		for id, n := range map[string]int64{
			"balance": acct.Balance, "available": acct.Available, "allowance-remaining": acct.AllowanceRemaining,
			"purchased": acct.Purchased, "promotional": acct.Promotional,
		} {
			pageWaitText(t, browser, "#"+id, fmt.Sprint(n))
		}
		return acct.testAccount
	}

	browser = newBrowser(t)
	pageOpen(t, browser, "http://"+admin+"/admin/", "Credits usage console")
	pageType(t, browser, "#token", token)
	pageType(t, browser, "#org", "acme")
	pageClick(t, browser, "#show")
	pageWaitText(t, browser, "#balance", "140")
	checkGrants()

	// A promotional grant that expires in 60 days, at midnight UTC.
	day := time.Now().UTC().AddDate(0, 0, 60).Format(time.DateOnly)
	pageType(t, browser, "#grant-amount", "25")
	pageType(t, browser, "#grant-expires", day)
	pageType(t, browser, "#grant-reason", "Spring campaign")
	pageClick(t, browser, "#grant-submit")
	pageWaitContains(t, browser, "#grant-status", "Gave acme 25 credits as grant g1, expiring "+day+" 00:00:00 UTC. Balance: 165 credits.")
	pageWaitText(t, browser, `#grants tr[data-grant="g1"] td:nth-child(6)`, day+" 00:00:00")
	if a := checkFigures(); a.Balance != 165 {
		t.Fatalf("acme's balance after a grant of 25: %d, want 165", a.Balance)
	}
	gs := checkGrants()
	if g := gs[0]; g.Grant != "g1" || g.Kind != "promotional" || g.State != "live" || g.Expires == nil || *g.Expires != day+"T00:00:00Z" || g.Reason != "Spring campaign" {
		t.Fatalf("the grant given from the console, as the API lists it first: %+v", g)
	}
	pageWaitText(t, browser, "#events tbody tr:first-child td:nth-child(2)", "grant")
	pageWaitText(t, browser, "#events tbody tr:first-child td:nth-child(4)", "+25")
	if got := pageEval[string](t, browser, `["grant-amount", "grant-expires", "grant-reason"].map(id => document.getElementById(id).value).join("|")`); got != "||" {
		t.Errorf("the grant form after success: %q, want it empty", got)
	}

	// Void asks for a reason in a form of its own; without one nothing is
	// sent.
	pageClick(t, browser, `#grants tr[data-grant="g1"] button.void`)
	pageWaitVisible(t, browser, "#void-form")
	pageWaitText(t, browser, "#void-grant", "g1")
	if got := pageEval[string](t, browser, "document.activeElement.id"); got != "void-reason" {
		t.Errorf("the focus after Void is on %q, want the reason", got)
	}
	pageClick(t, browser, "#void-submit")
	pageWaitContains(t, browser, "#void-error", `Void not sent: invalid reason "": must be 1 to 500 bytes`)
	if a := checkFigures(); a.Balance != 165 {
		t.Fatalf("a void without a reason changed the balance: %d", a.Balance)
	}
	pageType(t, browser, "#void-reason", "Campaign withdrawn")
	pageDo(t, browser, "scroll to the grants", chromedp.Evaluate[chromedp.Void](`document.getElementById("grants-title").scrollIntoView()`))
	pageScreenshot(t, browser, "console-grants.png")
	checkAccessibility(t, browser)
	pageClick(t, browser, "#void-submit")
	pageWaitContains(t, browser, "#grants-status", `Grant g1 voided: "Campaign withdrawn". Balance: 140 credits.`)
	pageWait(t, browser, "the void form closes", `document.getElementById("void-form").hidden`, pageText("#void-form"))
	pageWaitText(t, browser, `#grants tr[data-grant="g1"] td:nth-child(3)`, "voided")
	if a := checkFigures(); a.Balance != 140 {
		t.Fatalf("acme's balance after the void: %d, want 140 as before the grant", a.Balance)
	}
	gs = checkGrants()
	if g := gs[len(gs)-1]; g.Grant != "g1" || g.State != "voided" || g.Remaining != 0 || g.Reason != "Campaign withdrawn" {
		t.Fatalf("the voided grant, as the API lists it last: %+v", g)
	}
	pageWaitText(t, browser, "#events tbody tr:first-child td:nth-child(2)", "void")
	pageWaitText(t, browser, "#events tbody tr:first-child td:nth-child(4)", "-25")
	pageWaitText(t, browser, "#events tbody tr:first-child td:nth-child(7)", "Campaign withdrawn")

	// Grants the API refuses show its words, and change nothing.
	for _, c := range []struct{ amount, expires, body string }{
		{"0", "", `{"amount": 0}`},
		{"5", "2020-01-01", `{"amount": 5, "expires": "2020-01-01T00:00:00Z"}`},
		{"5", "next week", `{"amount": 5, "expires": "next week"}`},
	} {
		detail := api.problem(t, http.MethodPost, "/orgs/acme/grants", c.body)
		pageType(t, browser, "#grant-amount", c.amount)
		pageType(t, browser, "#grant-expires", c.expires)
		pageType(t, browser, "#grant-reason", "")
		pageClick(t, browser, "#grant-submit")
		pageWaitText(t, browser, "#grant-error", strings.Join(strings.Fields("Grant refused: "+detail), " "))
	}
	if a := checkFigures(); a.Balance != 140 {
		t.Fatalf("refused grants changed the balance: %d", a.Balance)
	}
	checkGrants()
}

// startFrontendOrigin serves what a frontend on its own origin would:
// web/credits.js and a page with a badge and a notice. It answers the
// origin, http://127.0.0.1:<port>.
func startFrontendOrigin(t *testing.T) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /credits.js", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/javascript; charset=utf-8")
		http.ServeFile(w, r, "../web/credits.js")
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprint(w, `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>A frontend</title></head>
<body><span data-credits-badge></span><div data-credits-notice hidden></div></body></html>`)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL
}

// startPreflightCounter puts a proxy in front of the gateway at addr and
// counts the CORS preflights that reach it: the browser's, seen from the
// server. It answers the proxy's origin.
func startPreflightCounter(t *testing.T, addr string) (origin string, preflights func() int64) {
	t.Helper()
	var n atomic.Int64
	proxy := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: addr})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
			n.Add(1)
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.URL, n.Load
}

// pageAsync runs body, the body of an async JavaScript function, in the
// page and returns what it returns as a string, or "threw <name>: <message>".
func pageAsync(t *testing.T, ctx context.Context, what, body string) string {
	t.Helper()
	pageEval[bool](t, ctx, `(window.asyncResult = null, (async () => {`+body+`})().then(
		(r) => { window.asyncResult = String(r); },
		(e) => { window.asyncResult = "threw " + e.name + ": " + e.message; }), true)`)
	pageWait(t, ctx, what, "window.asyncResult !== null", "String(window.asyncResult)")
	return pageEval[string](t, ctx, "window.asyncResult")
}

// recipeConfig replaces in block, a Caddyfile of the docs, each of the
// pairs of replace, failing if the block lacks one, and puts the global
// options of a test in front: no admin endpoint, and the redis-server at
// redisAddr.
func recipeConfig(t *testing.T, block, redisAddr string, replace ...string) string {
	t.Helper()
	for i := 0; i < len(replace); i += 2 {
		if !strings.Contains(block, replace[i]) {
			t.Fatalf("the recipe does not have %q, which the test replaces:\n%s", replace[i], block)
		}
	}
	return "{\n\tadmin off\n\tcredits {\n\t\tredis redis://" + redisAddr + "\n\t}\n}\n\n" + strings.NewReplacer(replace...).Replace(block)
}

// openFrontend opens the frontend's page in a new browser, imports
// credits.js there as a module, and records the credits:error events in
// window.creditsErrors.
func openFrontend(t *testing.T, page string) context.Context {
	t.Helper()
	ctx := newBrowser(t)
	pageOpen(t, ctx, page+"/", "A frontend")
	if got := pageAsync(t, ctx, "import credits.js", `
		const m = await import("/credits.js");
		window.Credits = m.Credits;
		window.creditsErrors = [];
		document.addEventListener("credits:error", (e) => window.creditsErrors.push(e.detail.status + " " + e.detail.error.name));
		return [typeof m.fetch, typeof m.refresh, typeof m.observe, typeof m.watchFetch, typeof m.CreditsError, m.default === m.Credits].join(" ");`); got != "function function function function function true" {
		t.Fatalf("credits.js as a module exports %s", got)
	}
	return ctx
}

// checkLedger compares, per org, the calls the AI backend served with
// what the ledger at redisAddr used and left.
func checkLedger(t *testing.T, redisAddr string, served map[string]int64, topUps map[string]int64) {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr})
	t.Cleanup(func() { rdb.Close() })
	ledger, err := meter.New(rdb, meter.Config{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for org, top := range topUps {
		a, err := ledger.Account(context.Background(), org)
		if err != nil {
			t.Fatal(err)
		}
		if a.Used["rich-text"] != served[org] || a.Balance != top-served[org] {
			t.Errorf("%s: the backend served %d calls; the ledger used %v, balance %d of %d", org, served[org], a.Used, a.Balance, top)
		}
	}
}

// topUp gives orgs their credits in the ledger at redisAddr.
func topUp(t *testing.T, redisAddr string, orgs map[string]int64) {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr})
	defer rdb.Close()
	ledger, err := meter.New(rdb, meter.Config{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for org, n := range orgs {
		if _, _, err := ledger.TopUp(context.Background(), org, n, "start-"+org); err != nil {
			t.Fatal(err)
		}
	}
}

// TestBrowserCORS runs the CORS recipe of docs/frontend.md as it stands,
// but for its addresses, with the page on one origin and the gateway on
// another: the preflights happen, and the balance, the calls and the 402's
// notice reach credits.js. The same recipe with the org header left out of
// Access-Control-Allow-Headers fails, and the refresh says so.
func TestBrowserCORS(t *testing.T) {
	block := readmeBlock(t, "../docs/frontend.md", "### Cross-origin calls", "caddyfile")
	srv := redistest.Start(t, redistest.Options{})
	_, ai, servedNow := startAuthStandIns(t)
	page := startFrontendOrigin(t)
	topUp(t, srv.Addr, map[string]int64{"acme": 2})

	start := func(block string) (origin string, preflights func() int64) {
		t.Helper()
		gw := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		startCaddyProcess(t, recipeConfig(t, block, srv.Addr,
			"api.example.com {", "http://"+gw+" {",
			"https://app.example.com", page,
			"127.0.0.1:9000", strings.TrimPrefix(ai.URL, "http://"),
		), gw)
		return startPreflightCounter(t, gw)
	}
	gw, preflights := start(block)
	const allowed = `Access-Control-Allow-Headers "X-Org-Id, `
	if !strings.Contains(block, allowed) {
		t.Fatalf("the recipe's preflight does not allow X-Org-Id first:\n%s", block)
	}
	without, refused := start(strings.Replace(block, allowed, `Access-Control-Allow-Headers "`, 1))

	ctx := openFrontend(t, page)
	refresh := func(gw string) string {
		return fmt.Sprintf(`const b = await Credits.refresh(%s + "/credits/balance", {headers: {"X-Org-Id": "acme"}});
			return b.org + " " + b.balance + " / " + document.querySelector("[data-credits-badge]").textContent;`, jsQuote(gw))
	}

	// Without the org header in the preflight's answer, the browser stops
	// the call: the refresh rejects and credits:error says so.
	if got := pageAsync(t, ctx, "a refresh the preflight refuses", refresh(without)); got != "threw TypeError: Failed to fetch" {
		t.Errorf("a refresh whose preflight leaves out X-Org-Id: %s, want the browser's TypeError", got)
	}
	if got := pageEval[[]string](t, ctx, "window.creditsErrors"); fmt.Sprint(got) != "[0 TypeError]" || refused() == 0 {
		t.Errorf("credits:error %v, %d preflights; want one error of status 0 after a preflight", got, refused())
	}

	// The recipe as written: the balance, two calls, then the 402 and its
	// notice.
	if got := pageAsync(t, ctx, "the balance", refresh(gw)); got != "acme 2 / 2 credits" {
		t.Fatalf("the balance across origins: %s", got)
	}
	call := fmt.Sprintf(`const r = await Credits.fetch(%s + "/rich-text/generate", {
			method: "POST", headers: {"X-Org-Id": "acme", "Content-Type": "application/json"}, body: "{}"});
		const badge = document.querySelector("[data-credits-badge]");
		const notice = document.querySelector("[data-credits-notice]");
		const detail = r.status === 402 ? (await r.clone().json()).detail : "";
		return r.status + " " + badge.textContent + " " + badge.dataset.creditsState +
			(notice.hidden ? "" : " notice " + (notice.querySelector("p").textContent === detail));`, jsQuote(gw))
	for _, want := range []string{"200 1 credit ok", "200 0 credits exhausted", "402 0 credits exhausted notice true"} {
		if got := pageAsync(t, ctx, "a metered call", call); got != want {
			t.Errorf("a call across origins: %s, want %s", got, want)
		}
	}
	if n := preflights(); n < 2 {
		t.Errorf("%d preflights reached the gateway, want one for the balance and one for the calls", n)
	}
	if got := pageEval[[]string](t, ctx, "window.creditsErrors"); len(got) != 1 {
		t.Errorf("credits:error %v after the recipe's calls, want only the refused one", got)
	}
	served := servedNow()
	if served["acme"] != 2 || len(served) != 1 {
		t.Fatalf("the AI backend served %v, want acme 2", served)
	}
	checkLedger(t, srv.Addr, served, map[string]int64{"acme": 2})
}

// TestBrowserCORSCookies runs the recipe of docs/frontend.md with cookies
// as it stands, but for its addresses: a frontend on another origin, signed
// in with a session cookie that a stand-in identity service turns into the
// org, reads its balance and makes metered calls with credentials, after a
// preflight; signed out, the refresh rejects with the 401.
func TestBrowserCORSCookies(t *testing.T) {
	block := readmeBlock(t, "../docs/frontend.md", "### Cross-origin calls with cookies", "caddyfile")
	for _, want := range []string{"Access-Control-Allow-Credentials true", "request_header -X-Org-Id\n\t\tforward_auth"} {
		if strings.Count(block, want) < 1 {
			t.Fatalf("the recipe has no %q:\n%s", want, block)
		}
	}
	srv := redistest.Start(t, redistest.Options{})
	identity, ai, servedNow := startAuthStandIns(t)
	page := startFrontendOrigin(t)
	topUp(t, srv.Addr, map[string]int64{"acme": 2, "beta": 5})
	gwAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	startCaddyProcess(t, recipeConfig(t, block, srv.Addr,
		"api.example.com {", "http://"+gwAddr+" {",
		"https://app.example.com", page,
		"127.0.0.1:9000", strings.TrimPrefix(identity.URL, "http://"),
		"127.0.0.1:8000", strings.TrimPrefix(ai.URL, "http://"),
	), gwAddr)
	gw, preflights := startPreflightCounter(t, gwAddr)
	ctx := openFrontend(t, page)

	refresh := fmt.Sprintf(`const b = await Credits.refresh(%s + "/credits/balance", {credentials: "include"});
		return b.org + " " + b.balance + " / " + document.querySelector("[data-credits-badge]").textContent;`, jsQuote(gw))
	// Signed out: the identity service's 401, readable, and reported.
	if got := pageAsync(t, ctx, "a refresh signed out", refresh); !strings.HasPrefix(got, "threw CreditsError: the balance endpoint answered 401") {
		t.Errorf("a refresh without the session cookie: %s, want a CreditsError of status 401", got)
	}
	if got := pageEval[[]string](t, ctx, "window.creditsErrors"); fmt.Sprint(got) != "[401 CreditsError]" {
		t.Errorf("credits:error %v, want one of status 401", got)
	}

	// Signed in as acme: a cookie of the frontend's host, which the browser
	// sends to the gateway's port with credentials: 'include'.
	pageEval[string](t, ctx, `document.cookie = "session=tok-acme; path=/; SameSite=Lax"`)
	if got := pageAsync(t, ctx, "acme's balance", refresh); got != "acme 2 / 2 credits" {
		t.Fatalf("acme's balance with the cookie: %s", got)
	}
	call := fmt.Sprintf(`const r = await Credits.fetch(%s + "/rich-text/generate", {
			method: "POST", credentials: "include", headers: {"Content-Type": "application/json"}, body: "{}"});
		const badge = document.querySelector("[data-credits-badge]");
		const notice = document.querySelector("[data-credits-notice]");
		return r.status + " " + badge.textContent + (notice.hidden ? "" : " notice");`, jsQuote(gw))
	for _, want := range []string{"200 1 credit", "200 0 credits", "402 0 credits notice"} {
		if got := pageAsync(t, ctx, "a metered call", call); got != want {
			t.Errorf("a call with credentials: %s, want %s", got, want)
		}
	}
	if n := preflights(); n < 1 {
		t.Errorf("no preflight reached the gateway before the JSON calls")
	}
	// Signed in as beta, the same page reads beta's balance.
	pageEval[string](t, ctx, `document.cookie = "session=tok-beta; path=/; SameSite=Lax"`)
	if got := pageAsync(t, ctx, "beta's balance", refresh); got != "beta 5 / 5 credits" {
		t.Errorf("beta's balance with its cookie: %s", got)
	}

	// A client's own X-Org-Id names no other org.
	req, _ := http.NewRequest(http.MethodPost, gw+"/rich-text/generate", nil)
	req.Header.Set("Cookie", "session=tok-beta")
	req.Header.Set("X-Org-Id", "acme")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Credits-Remaining") != "4" {
		t.Errorf("beta's call naming acme: %d, Credits-Remaining %q", resp.StatusCode, resp.Header.Get("Credits-Remaining"))
	}
	served := servedNow()
	if served["acme"] != 2 || served["beta"] != 1 || len(served) != 2 {
		t.Fatalf("the AI backend served %v, want acme 2 and beta 1", served)
	}
	checkLedger(t, srv.Addr, served, map[string]int64{"acme": 2, "beta": 5})
}

// TestBrowserConsoleLayout checks the console's layout against the admin
// API: the account's figures come first, above the org list; a debt is
// shown as debt, not as a negative allowance; a top-up's and a capture's
// outcome show next to their buttons, in view; the gateways' leases are
// listed only behind their toggle; and the Actions columns line up with
// their headings.
func TestBrowserConsoleLayout(t *testing.T) {
	const token = "layout-test-token"
	cfg, gw, admin := demoCaddyfile(t)
	withToken := strings.Replace(cfg, "\t\tcredits_admin\n", "\t\tcredits_admin {\n\t\t\ttoken "+token+"\n\t\t}\n", 1)
	if withToken == cfg {
		t.Fatal("the demo Caddyfile has no bare credits_admin to give a token to")
	}
	startCaddyProcess(t, withToken, gw, admin)
	api := adminAPI{base: "http://" + admin + "/admin", token: token}

	// busy has bought credits and makes calls in a row: its gateway leases
	// some; it has a hold of its own too. indebted ran into debt.
	if status := api.call(t, http.MethodPost, "/orgs/busy/topup", `{"amount": 1000, "reference": "invoice-1"}`, nil); status != http.StatusOK {
		t.Fatalf("busy's top-up: %d", status)
	}
	type hold struct {
		Hold   string `json:"hold"`
		State  string `json:"state"`
		Amount int64  `json:"amount"`
	}
	holds := func() (own, leases []hold) {
		t.Helper()
		var list struct {
			Holds []hold `json:"holds"`
		}
		if status := api.call(t, http.MethodGet, "/orgs/busy/holds", "", &list); status != http.StatusOK {
			t.Fatalf("busy's holds: %d", status)
		}
		for _, h := range list.Holds {
			if strings.HasPrefix(h.Hold, "lease:") {
				leases = append(leases, h)
			} else {
				own = append(own, h)
			}
		}
		return own, leases
	}
	awaitCondition(t, "a lease of busy's credits", func() bool {
		if resp, p := meteredCall(t, gw, "busy", "/rich-text/generate"); resp.StatusCode != http.StatusOK {
			t.Fatalf("busy's call: %d %s", resp.StatusCode, p.Detail)
		}
		_, leases := holds()
		return len(leases) > 0
	})
	var created hold
	if status := api.call(t, http.MethodPost, "/orgs/busy/holds", `{"amount": 5, "feature": "rich-text", "reference": "job-1"}`, &created); status != http.StatusCreated {
		t.Fatalf("busy's hold: %d", status)
	}
	for range 6 { // 5 credits of the default plan, then a debt of 1
		if resp, _ := meteredCall(t, gw, "indebted", "/flows/run"); resp.StatusCode != http.StatusOK {
			t.Fatalf("an overdraft call: %d", resp.StatusCode)
		}
	}

	ctx := newBrowser(t)
	pageOpen(t, ctx, "http://"+admin+"/admin/", "Credits usage console")
	pageType(t, ctx, "#token", token)
	pageType(t, ctx, "#org", "indebted")
	pageClick(t, ctx, "#show")
	pageWaitText(t, ctx, "#balance", "-1")

	// The figures come first: before the org list in the page, in view
	// without scrolling, not below the list.
	first := pageEval[string](t, ctx, `(() => {
		const figures = document.querySelector("#account .figures").getBoundingClientRect();
		const orgs = document.getElementById("orgs").getBoundingClientRect();
		const before = document.getElementById("account").compareDocumentPosition(document.getElementById("orgs")) & Node.DOCUMENT_POSITION_FOLLOWING;
		return [scrollY === 0, figures.bottom <= innerHeight, figures.top < orgs.bottom, before !== 0].join(" ");
	})()`)
	if first != "true true true true" {
		t.Errorf("the figures (at the top, in view, not below the org list, before it in the page): %s", first)
	}
	// On a wide page the org list goes beside the account.
	pageDo(t, ctx, "widen the page", chromedp.EmulateViewport(1400, viewportHeight))
	beside := pageEval[string](t, ctx, `(() => {
		const figures = document.querySelector("#account .figures").getBoundingClientRect();
		const orgs = document.getElementById("orgs").getBoundingClientRect();
		return [orgs.left >= figures.right, orgs.top < figures.bottom].join(" ");
	})()`)
	if beside != "true true" {
		t.Errorf("on a page 1400 pixels wide, the org list (right of the figures, beside them): %s", beside)
	}
	pageDo(t, ctx, "narrow the page again", chromedp.EmulateViewport(viewportWidth, viewportHeight))

	// A debt is debt: the allowance's credits apart, the debt beside them.
	var acct struct {
		Balance            int64 `json:"balance"`
		AllowanceRemaining int64 `json:"allowance_remaining"`
		Purchased          int64 `json:"purchased"`
		Debt               int64 `json:"debt"`
	}
	api.call(t, http.MethodGet, "/orgs/indebted", "", &acct)
	if acct.Balance != -1 || acct.Debt != 1 || acct.AllowanceRemaining != -1 {
		t.Fatalf("indebted's account: %+v, want a debt of 1", acct)
	}
	pageWaitVisible(t, ctx, "#debt-figure")
	pageWaitText(t, ctx, "#debt", "1")
	pageWaitText(t, ctx, "#debt-figure .figure-note", "repaid first by the next credits")
	pageWaitText(t, ctx, "#allowance-remaining", fmt.Sprint(acct.AllowanceRemaining+acct.Debt))
	checkAccessibility(t, ctx)
	pageScreenshot(t, ctx, "console-debt.png")

	// A top-up repays the debt first; its outcome shows under its button,
	// in view.
	pageType(t, ctx, "#amount", "8")
	pageType(t, ctx, "#reference", "invoice-8")
	pageClick(t, ctx, "#topup-submit")
	pageWaitText(t, ctx, "#topup-status", "Added 8 credits to indebted, 1 of them to repay its debt. Balance: 7 credits.")
	api.call(t, http.MethodGet, "/orgs/indebted", "", &acct)
	if acct.Balance != 7 || acct.Debt != 0 || acct.Purchased != 7 {
		t.Fatalf("indebted after a top-up of 8: %+v", acct)
	}
	pageWait(t, ctx, "the debt goes once repaid", `document.getElementById("debt-figure").hidden`, pageText("#debt-figure"))
	pageWaitText(t, ctx, "#purchased", "7")
	checkNextTo(t, ctx, "#topup-status", "#topup-submit")

	// busy: its own hold listed, the leases behind the toggle.
	own, leases := holds()
	pageType(t, ctx, "#org", "busy")
	pageClick(t, ctx, "#show")
	pageWaitText(t, ctx, "#account-org", "busy")
	listedHolds := func() []string {
		t.Helper()
		return pageEval[[]string](t, ctx, `[...document.querySelectorAll("#holds tbody tr")].filter(tr => tr.checkVisibility()).map(tr => tr.dataset.hold)`)
	}
	holdIDs := func(hs ...[]hold) []string {
		var ids []string
		for _, l := range hs {
			for _, h := range l {
				ids = append(ids, h.Hold)
			}
		}
		slices.Sort(ids)
		return ids
	}
	sorted := func(s []string) []string { slices.Sort(s); return s }
	if got, want := sorted(listedHolds()), holdIDs(own); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("holds listed: %v, want busy's own %v without the leases", got, want)
	}
	pageWaitVisible(t, ctx, "#leases-toggle")
	pageWaitText(t, ctx, "#leases-toggle label", fmt.Sprintf("Show the gateways' leases (%d)", len(leases)))
	pageClick(t, ctx, "#show-leases")
	pageWait(t, ctx, "the leases listed", fmt.Sprintf(`document.querySelectorAll("#holds tbody tr.lease").length === %d`, len(leases)), `document.querySelector("#holds tbody").textContent`)
	if got, want := sorted(listedHolds()), holdIDs(own, leases); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("holds listed with the leases: %v, want %v", got, want)
	}
	if n := pageEval[int](t, ctx, `document.querySelectorAll("#holds tr.lease button").length`); n != 0 {
		t.Errorf("a lease has %d buttons, want none: it is the gateway's to end", n)
	}

	// The Actions columns line up with their headings.
	for _, table := range []string{"#holds", "#grants"} {
		bad := pageEval[[]string](t, ctx, `(() => {
			const table = document.querySelector(`+jsQuote(table)+`);
			const th = table.querySelector("thead th:last-child").getBoundingClientRect();
			const out = [];
			for (const td of table.querySelectorAll("tbody td:last-child")) {
				const r = td.getBoundingClientRect(), row = td.parentElement.getBoundingClientRect();
				if (getComputedStyle(td).display !== "table-cell" || Math.abs(r.left - th.left) > 0.5 || Math.abs(r.right - th.right) > 0.5 ||
					Math.abs(r.top - row.top) > 0.5 || Math.abs(r.bottom - row.bottom) > 0.5) {
					out.push(td.parentElement.dataset.hold || td.parentElement.dataset.grant);
				}
			}
			return out;
		})()`)
		if len(bad) != 0 {
			t.Errorf("%s: the Actions cells of %v are out of line with their heading", table, bad)
		}
	}
	pageDo(t, ctx, "scroll to the holds", chromedp.Evaluate[chromedp.Void](`document.getElementById("holds-title").scrollIntoView()`))
	checkAccessibility(t, ctx)
	pageScreenshot(t, ctx, "console-holds.png")
	pageClick(t, ctx, "#show-leases")
	pageWait(t, ctx, "the leases hidden again", `document.querySelectorAll("#holds tbody tr.lease").length === 0`, `document.querySelector("#holds tbody").textContent`)

	// A capture's outcome shows under the holds, in view.
	pageType(t, ctx, fmt.Sprintf(`#holds tr[data-hold=%q] .capture-amount`, created.Hold), "3")
	pageClick(t, ctx, fmt.Sprintf(`#holds tr[data-hold=%q] button.capture`, created.Hold))
	pageWaitContains(t, ctx, "#holds-status", "Hold "+created.Hold+" captured: 3 credits charged.")
	checkNextTo(t, ctx, "#holds-status", "#holds")
}

// checkNextTo checks that the element sel is in view, and just below the
// element near: an outcome shown where the admin is looking.
func checkNextTo(t *testing.T, ctx context.Context, sel, near string) {
	t.Helper()
	got := pageEval[string](t, ctx, `(() => {
		const e = document.querySelector(`+jsQuote(sel)+`).getBoundingClientRect();
		const n = document.querySelector(`+jsQuote(near)+`).getBoundingClientRect();
		return [e.top >= 0 && e.bottom <= innerHeight, e.top >= n.bottom - 1 && e.top - n.bottom < 80].join(" ");
	})()`)
	if got != "true true" {
		t.Errorf("%s (in view, just below %s): %s", sel, near, got)
	}
}
