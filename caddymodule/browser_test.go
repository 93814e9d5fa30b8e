package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"
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
	pageWaitContains(t, console, "#status", "Added 10 credits to demo")

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
	checkTabOrder(t, ctx, "amount", "reference", "topup-submit", "allowance", "month", "plan-submit")

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
	pageWaitContains(t, ctx, "#error", negative)
	pageWaitText(t, ctx, "#balance", "94")

	// A top-up, and the same reference again.
	pageType(t, ctx, "#amount", "6")
	pageType(t, ctx, "#reference", "invoice-7")
	pageClick(t, ctx, "#topup-submit")
	pageWaitText(t, ctx, "#purchased", "6")
	pageWaitText(t, ctx, "#balance", "100")
	pageWaitText(t, ctx, "#error", "")
	pageType(t, ctx, "#amount", "6")
	pageType(t, ctx, "#reference", "invoice-7")
	pageClick(t, ctx, "#topup-submit")
	pageWaitContains(t, ctx, "#status", `Reference "invoice-7" was already applied`)
	pageWaitText(t, ctx, "#balance", "100")
	pageWaitText(t, ctx, "#events tbody tr:first-child td:nth-child(2)", "topup")

	// A bad plan: the API's error. A good one: from the next recharge, as
	// acme has a plan of its own.
	badPlan := api.problem(t, http.MethodPut, "/orgs/acme/plan", `{"allowance": -1, "recharge_month": 3}`)
	pageType(t, ctx, "#allowance", "-1")
	pageClick(t, ctx, "#plan-submit")
	pageWaitContains(t, ctx, "#error", badPlan)
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
