package caddymodule

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// TestREADMEProduction runs the README's production Caddyfile, as written
// but for its addresses and its log file, in a caddy process with a
// stand-in identity service, a real upstream, a real redis-server and an
// alert receiver. Each caller is charged to the org its token proves and a
// client's X-Org-Id is not trusted; the balance endpoint answers the
// caller's own org; the admin API needs its token; the alerts and the usage
// log say what the upstream served.
func TestREADMEProduction(t *testing.T) {
	block := readmeBlock(t, "../README.md", "## A production Caddyfile", "caddyfile")
	srv := redistest.Start(t, redistest.Options{})
	identity, ai, servedNow := startAuthStandIns(t)
	receiver := startAlertReceiver(t)
	usageLog := filepath.Join(t.TempDir(), "credits-usage.log")

	gw, admin := freePort(t), freePort(t)
	replace := []string{
		"127.0.0.1:6379", srv.Addr,
		"127.0.0.1:9000", strings.TrimPrefix(identity.URL, "http://"),
		"127.0.0.1:8000", strings.TrimPrefix(ai.URL, "http://"),
		"https://billing.example.com/hooks/credits", receiver.url(),
		"/var/log/caddy/credits-usage.log", usageLog,
		"api.example.com {", fmt.Sprintf("http://127.0.0.1:%d {", gw),
		":2020 {", fmt.Sprintf(":%d {", admin),
		"{\n\tcredits {", "{\n\tadmin off\n\tcredits {",
	}
	for i := 0; i < len(replace); i += 2 {
		if !strings.Contains(block, replace[i]) {
			t.Fatalf("the production Caddyfile does not have %q, which the test replaces:\n%s", replace[i], block)
		}
	}
	cfg := strings.NewReplacer(replace...).Replace(block)
	t.Setenv("CREDITS_ADMIN_TOKEN", "adm1n-token")
	t.Setenv("CREDITS_ALERTS_SECRET", alertSecret)
	gwAddr, adminAddr := fmt.Sprintf("127.0.0.1:%d", gw), fmt.Sprintf("127.0.0.1:%d", admin)
	startCaddyProcess(t, cfg, gwAddr, adminAddr)

	client := &http.Client{Timeout: 10 * time.Second}
	do := func(method, url, token, org, body string) (int, []byte) {
		t.Helper()
		req, _ := http.NewRequest(method, url, strings.NewReader(body))
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		if org != "" {
			req.Header.Set("X-Org-Id", org)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, data
	}
	adminURL := "http://" + adminAddr + "/admin"
	gwURL := "http://" + gwAddr

	// The admin API: its token, or nothing.
	if s, _ := do(http.MethodPost, adminURL+"/orgs/acme/topup", "", "", `{"amount": 102, "reference": "inv-a"}`); s != http.StatusUnauthorized {
		t.Fatalf("a top-up without the admin token: %d, want 401", s)
	}
	if s, _ := do(http.MethodPost, adminURL+"/orgs/acme/topup", "wrong", "", `{"amount": 102, "reference": "inv-a"}`); s != http.StatusUnauthorized {
		t.Fatalf("a top-up with a wrong admin token: %d, want 401", s)
	}
	for org, amount := range map[string]int{"acme": 102, "beta": 20} {
		if s, body := do(http.MethodPost, adminURL+"/orgs/"+org+"/topup", "adm1n-token", "", fmt.Sprintf(`{"amount": %d, "reference": "inv-%s"}`, amount, org)); s != http.StatusOK {
			t.Fatalf("%s's top-up with the admin token: %d %s", org, s, body)
		}
	}

	for range 3 {
		if s, body := do(http.MethodPost, gwURL+"/rich-text/generate", "tok-acme", "", ""); s != http.StatusOK {
			t.Fatalf("acme's call: %d %s", s, body)
		}
	}
	for range 2 {
		if s, body := do(http.MethodPost, gwURL+"/rich-text/generate", "tok-beta", "acme", ""); s != http.StatusOK {
			t.Fatalf("beta's call with a forged org: %d %s", s, body)
		}
	}
	if s, _ := do(http.MethodPost, gwURL+"/rich-text/generate", "", "acme", ""); s != http.StatusUnauthorized {
		t.Fatalf("a call without a token: %d, want the identity service's 401", s)
	}
	if s, _ := do(http.MethodPost, gwURL+"/rich-text/generate", "tok-anonymous", "acme", ""); s != http.StatusUnauthorized {
		t.Fatalf("a call the identity service gave no org: %d, want 401", s)
	}

	// The balance endpoint answers the org the token proves, whatever the
	// client's X-Org-Id says.
	balance := func(token, forged string) (int, map[string]any) {
		t.Helper()
		s, body := do(http.MethodGet, gwURL+"/credits/balance", token, forged, "")
		var b map[string]any
		if s == http.StatusOK {
			if err := json.Unmarshal(body, &b); err != nil {
				t.Fatalf("the balance is no JSON: %s", body)
			}
		}
		return s, b
	}
	if s, b := balance("tok-acme", "beta"); s != http.StatusOK || b["org"] != "acme" || b["balance"] != float64(99) {
		t.Fatalf("acme's balance, asked with X-Org-Id beta: %d %v, want acme's 99", s, b)
	}
	if s, b := balance("tok-beta", "acme"); s != http.StatusOK || b["org"] != "beta" || b["balance"] != float64(18) {
		t.Fatalf("beta's balance, asked with X-Org-Id acme: %d %v, want beta's 18", s, b)
	}
	if s, _ := balance("", "acme"); s != http.StatusUnauthorized {
		t.Fatalf("a balance without a token: %d, want 401", s)
	}

	served := servedNow()
	if served["acme"] != 3 || served["beta"] != 2 || len(served) != 2 {
		t.Fatalf("the AI backend served %v, want acme 3 and beta 2", served)
	}
	for org, want := range map[string]int64{"acme": 99, "beta": 18} {
		s, body := do(http.MethodGet, adminURL+"/orgs/"+org, "adm1n-token", "", "")
		var a struct {
			Balance int64            `json:"balance"`
			Used    map[string]int64 `json:"used"`
		}
		if s != http.StatusOK || json.Unmarshal(body, &a) != nil {
			t.Fatalf("%s's account: %d %s", org, s, body)
		}
		if a.Balance != want || a.Used["rich-text"] != served[org] {
			t.Fatalf("%s: the backend served %d calls; the ledger: balance %d, used %v", org, served[org], a.Balance, a.Used)
		}
	}

	// Both orgs fell below the threshold of 100: one signed alert each.
	awaitCondition(t, "an alert for each org", func() bool {
		receiver.mu.Lock()
		defer receiver.mu.Unlock()
		return len(receiver.accepted) >= 2
	})
	receiver.mu.Lock()
	got := map[string]string{}
	for _, a := range receiver.accepted {
		got[fmt.Sprint(a["org"])] = fmt.Sprintf("%v %v", a["type"], a["threshold"])
	}
	bad := receiver.badSigs
	receiver.mu.Unlock()
	if bad != 0 || len(got) != 2 || got["acme"] != "balance.below 100" || got["beta"] != "balance.below 100" {
		t.Fatalf("alerts %v (%d badly signed), want balance.below 100 for acme and beta", got, bad)
	}

	// The usage log: one line per metered call, each charged 1, to the org
	// the token proves.
	perOrg := map[string]int64{}
	awaitCondition(t, "five lines in the usage log", func() bool {
		f, err := os.Open(usageLog)
		if err != nil {
			return false
		}
		defer f.Close()
		clear(perOrg)
		n := 0
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var l struct {
				Org     string `json:"org"`
				Charged int64  `json:"charged"`
			}
			if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
				t.Fatalf("a line of the usage log is no JSON: %s", sc.Text())
			}
			perOrg[l.Org] += l.Charged
			n++
		}
		return n >= 5
	})
	if perOrg["acme"] != 3 || perOrg["beta"] != 2 || len(perOrg) != 2 {
		t.Fatalf("the usage log charged %v, want acme 3 and beta 2", perOrg)
	}
}

// TestDocLinks checks every relative link of the documentation: the file
// it names exists, and its #anchor is a heading of that file, slugged as
// GitHub does.
func TestDocLinks(t *testing.T) {
	files := []string{"../README.md", "../BENCHMARKS.md", "../CHANGELOG.md"}
	docs, err := filepath.Glob("../docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	if len(docs) < 4 {
		t.Fatalf("docs/ has %d Markdown files, want at least 4", len(docs))
	}
	files = append(files, docs...)
	anchors := map[string]map[string]bool{}
	anchorsOf := func(path string) map[string]bool {
		if a, ok := anchors[path]; ok {
			return a
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		a := headingSlugs(string(data))
		anchors[path] = a
		return a
	}
	links := 0
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		for _, link := range markdownLinks(string(data)) {
			if regexp.MustCompile(`^[a-z]+:`).MatchString(link) {
				continue // http:, https:, mailto:
			}
			links++
			target, anchor, _ := strings.Cut(link, "#")
			path := file
			if target != "" {
				path = filepath.Join(filepath.Dir(file), target)
				if _, err := os.Stat(path); err != nil {
					t.Errorf("%s: the link %q names no file", file, link)
					continue
				}
			}
			if anchor != "" && !anchorsOf(path)[anchor] {
				t.Errorf("%s: the link %q names no heading of %s", file, link, path)
			}
		}
	}
	if links < 50 {
		t.Fatalf("found %d relative links, want the documentation's many", links)
	}
}

// markdownLinks returns the targets of the inline links and images of a
// Markdown text, outside code blocks and code spans.
func markdownLinks(text string) []string {
	var links []string
	link := regexp.MustCompile(`\]\(([^)\s]+)\)`)
	span := regexp.MustCompile("`[^`]*`")
	for _, line := range proseLines(text) {
		for _, m := range link.FindAllStringSubmatch(span.ReplaceAllString(line, ""), -1) {
			links = append(links, m[1])
		}
	}
	return links
}

// headingSlugs returns the anchors GitHub gives the headings of a Markdown
// text: lower case, punctuation dropped, spaces made hyphens, and -1, -2...
// after a slug already given.
func headingSlugs(text string) map[string]bool {
	slugs := map[string]bool{}
	heading := regexp.MustCompile(`^#{1,6} (.*)$`)
	drop := regexp.MustCompile(`[^\p{L}\p{N} _-]`)
	for _, line := range proseLines(text) {
		m := heading.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		slug := strings.ReplaceAll(drop.ReplaceAllString(strings.ToLower(strings.TrimSpace(m[1])), ""), " ", "-")
		s := slug
		for i := 1; slugs[s]; i++ {
			s = fmt.Sprintf("%s-%d", slug, i)
		}
		slugs[s] = true
	}
	return slugs
}

// proseLines returns the lines of a Markdown text outside fenced code
// blocks.
func proseLines(text string) []string {
	var lines []string
	fenced := false
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			fenced = !fenced
			continue
		}
		if !fenced {
			lines = append(lines, line)
		}
	}
	return lines
}

func TestHeadingSlugs(t *testing.T) {
	got := headingSlugs("# A b\n## `credits.js`\n```sh\n# not a heading\n```\n## Where scenario c's time goes\n### From 0.3 to 0.4\n## A b\n")
	for _, want := range []string{"a-b", "creditsjs", "where-scenario-cs-time-goes", "from-03-to-04", "a-b-1"} {
		if !got[want] {
			t.Errorf("no slug %q in %v", want, got)
		}
	}
	if got["not-a-heading"] || len(got) != 5 {
		t.Errorf("slugs %v, want 5 and none from a code block", got)
	}
}

// TestCreditsJSTypes checks web/credits.d.ts against web/credits.js without
// a TypeScript toolchain: every name credits.js exports is declared, and
// nothing else; and web/package.json makes the pair an installable ES
// module.
func TestCreditsJSTypes(t *testing.T) {
	js, err := os.ReadFile("../web/credits.js")
	if err != nil {
		t.Fatal(err)
	}
	dts, err := os.ReadFile("../web/credits.d.ts")
	if err != nil {
		t.Fatal(err)
	}
	jsNames := exportedNames(string(js), false)
	dtsNames := exportedNames(string(dts), true)
	if len(jsNames) < 6 {
		t.Fatalf("credits.js exports %v, want its API", jsNames)
	}
	for name := range jsNames {
		if !dtsNames[name] {
			t.Errorf("credits.js exports %s, which credits.d.ts does not declare", name)
		}
	}
	for name := range dtsNames {
		if !jsNames[name] {
			t.Errorf("credits.d.ts declares %s, which credits.js does not export", name)
		}
	}
	// The object's members are the named exports, and format.
	obj := regexp.MustCompile(`(?s)export const Credits = \{(.*?)\};`).FindStringSubmatch(string(js))
	iface := regexp.MustCompile(`(?s)export interface CreditsAPI \{(.*?)\n\}`).FindStringSubmatch(string(dts))
	if obj == nil || iface == nil {
		t.Fatal("no Credits object in credits.js, or no CreditsAPI in credits.d.ts")
	}
	members := func(body string, re string) []string {
		var out []string
		for _, m := range regexp.MustCompile(re).FindAllStringSubmatch(body, -1) {
			out = append(out, m[1])
		}
		slices.Sort(out)
		return out
	}
	if a, b := members(obj[1], `(?m)^\s*(\w+)[,:]`), members(iface[1], `(?m)^\s*(\w+):`); fmt.Sprint(a) != fmt.Sprint(b) {
		t.Errorf("the Credits object has %v, CreditsAPI declares %v", a, b)
	}

	var pkg struct {
		Name    string `json:"name"`
		Version string `json:"version"`
		Type    string `json:"type"`
		Types   string `json:"types"`
		Exports map[string]json.RawMessage
		Files   []string `json:"files"`
	}
	data, err := os.ReadFile("../web/package.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &pkg); err != nil {
		t.Fatalf("web/package.json: %v", err)
	}
	var dot struct {
		Types   string `json:"types"`
		Default string `json:"default"`
	}
	if err := json.Unmarshal(pkg.Exports["."], &dot); err != nil {
		t.Fatalf("web/package.json's exports[\".\"]: %v", err)
	}
	if pkg.Name == "" || !regexp.MustCompile(`^\d+\.\d+\.\d+$`).MatchString(pkg.Version) || pkg.Type != "module" ||
		pkg.Types != "./credits.d.ts" || dot.Types != "./credits.d.ts" || dot.Default != "./credits.js" {
		t.Errorf("web/package.json: %+v, exports %+v", pkg, dot)
	}
	for _, f := range pkg.Files {
		if _, err := os.Stat(filepath.Join("../web", f)); err != nil {
			t.Errorf("web/package.json lists %s: %v", f, err)
		}
	}
}

// exportedNames returns the names a JavaScript module (or, with dts, a
// declaration file) exports: export function/class/const/let, export {a as
// b}, and "default" for export default. In a declaration file, types and
// interfaces are left out: credits.js cannot export them.
func exportedNames(src string, dts bool) map[string]bool {
	names := map[string]bool{}
	decl := regexp.MustCompile(`(?m)^export\s+(?:declare\s+)?(?:async\s+)?(function|class|const|let|var|type|interface)\s+(\w+)`)
	for _, m := range decl.FindAllStringSubmatch(src, -1) {
		if dts && (m[1] == "type" || m[1] == "interface") {
			continue
		}
		names[m[2]] = true
	}
	list := regexp.MustCompile(`(?m)^export\s*\{([^}]*)\}`)
	for _, m := range list.FindAllStringSubmatch(src, -1) {
		for _, part := range strings.Split(m[1], ",") {
			fields := strings.Fields(part)
			if len(fields) > 0 {
				names[fields[len(fields)-1]] = true
			}
		}
	}
	if regexp.MustCompile(`(?m)^export\s+default\s`).MatchString(src) {
		names["default"] = true
	}
	return names
}

// TestDocsBudgetsPerKey runs the "Budgets per API key" example of
// docs/caddyfile.md, its Caddyfile as written but for its addresses, and
// its caddy credits commands as written, in a caddy process with a
// stand-in identity service for API keys, a backend that answers each
// call's usage, and a real redis-server. A key's calls are refused with
// the budget-spent problem once its budget is spent, while another key of
// the same org goes on; a client's own X-Key-Id and X-Org-Id change
// nothing; and what the backend answered per key is what each key's budget
// spent, and in all what the ledger charged the org.
func TestDocsBudgetsPerKey(t *testing.T) {
	clearCreditsEnv(t)
	block := readmeBlock(t, "../docs/caddyfile.md", "## Budgets per API key", "caddyfile")
	commands := readmeBlock(t, "../docs/caddyfile.md", "## Budgets per API key", "sh")
	srv := redistest.Start(t, redistest.Options{})
	identity := startKeyIdentity(t, map[string][2]string{
		"sk-alice": {"acme", "key-alice"},
		"sk-batch": {"acme", "key-batch"},
	})
	backend := startUsageBackend(t)

	gw, admin := freePort(t), freePort(t)
	replace := []string{
		"127.0.0.1:6379", srv.Addr,
		"127.0.0.1:9000", strings.TrimPrefix(identity.URL, "http://"),
		"127.0.0.1:8000", strings.TrimPrefix(backend.URL, "http://"),
		"api.example.com {", fmt.Sprintf("http://127.0.0.1:%d {", gw),
		":2020 {", fmt.Sprintf(":%d {", admin),
		"{\n\tcredits {", "{\n\tadmin off\n\tcredits {",
	}
	for i := 0; i < len(replace); i += 2 {
		if !strings.Contains(block, replace[i]) {
			t.Fatalf("the example does not have %q, which the test replaces:\n%s", replace[i], block)
		}
	}
	t.Setenv("CREDITS_ADMIN_TOKEN", "adm1n-token")
	gwAddr, adminAddr := fmt.Sprintf("127.0.0.1:%d", gw), fmt.Sprintf("127.0.0.1:%d", admin)
	startCaddyProcess(t, strings.NewReplacer(replace...).Replace(block), gwAddr, adminAddr)
	adminURL := "http://" + adminAddr + "/admin"
	env := []string{"CREDITS_ADMIN_ENDPOINT=" + adminURL}

	client := &http.Client{Timeout: 10 * time.Second}
	do := func(method, url, body string, header ...string) (int, http.Header, []byte) {
		t.Helper()
		req, _ := http.NewRequest(method, url, strings.NewReader(body))
		for i := 0; i < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header, data
	}
	if s, _, body := do(http.MethodPost, adminURL+"/orgs/acme/topup", `{"amount": 1000, "reference": "inv-1"}`,
		"Authorization", "Bearer adm1n-token"); s != http.StatusOK {
		t.Fatalf("acme's top-up: %d %s", s, body)
	}

	// The docs' commands, as written.
	var lines []string
	for _, line := range strings.Split(commands, "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			lines = append(lines, line)
		}
	}
	if len(lines) != 3 {
		t.Fatalf("%d commands, want three:\n%s", len(lines), commands)
	}
	run := func(line string) string {
		t.Helper()
		args, ok := strings.CutPrefix(line, "caddy ")
		if !ok || strings.ContainsAny(args, `'"$\|;&`) {
			t.Fatalf("not a plain caddy command: %s", line)
		}
		out, err := runCaddyEnv(t, env, strings.Fields(args)...)
		if err != nil {
			t.Fatalf("%s: %v\n%s", line, err, out)
		}
		return out
	}
	for _, line := range lines {
		run(line)
	}
	list := func() []string {
		var rows []string
		for line := range strings.Lines(run(lines[2])) {
			rows = append(rows, strings.Join(strings.Fields(line), " "))
		}
		return rows
	}
	if rows := list(); len(rows) != 3 || !strings.HasPrefix(rows[1], "(default) 50 day - - ") || !strings.HasPrefix(rows[2], "key-batch 500 month 0 500 ") {
		t.Fatalf("the budgets after the docs' commands:\n%s", strings.Join(rows, "\n"))
	}

	gwURL := "http://" + gwAddr
	call := func(key, prompt string, forged ...string) (int, []byte) {
		t.Helper()
		s, _, body := do(http.MethodPost, gwURL+"/v1/chat/completions", prompt, append([]string{"Authorization", "Bearer " + key}, forged...)...)
		return s, body
	}
	// key-alice, under the default of 50 a day: six calls of 8 credits, one
	// of them claiming to be key-batch of another org.
	eight := "12345678"
	for i := range 6 {
		forged := []string{}
		if i == 2 {
			forged = []string{"X-Key-Id", "key-batch", "X-Org-Id", "beta"}
		}
		if s, body := call("sk-alice", eight, forged...); s != http.StatusOK {
			t.Fatalf("key-alice's call %d: %d %s", i+1, s, body)
		}
	}
	// 2 left, and a call holds 10: refused, naming key-alice, whatever
	// X-Key-Id the client sends.
	for _, forged := range [][]string{nil, {"X-Key-Id", "key-batch"}} {
		s, body := call("sk-alice", eight, forged...)
		var p map[string]any
		if s != http.StatusPaymentRequired || json.Unmarshal(body, &p) != nil || p["type"] != "https://creditsgw.dev/problems/budget-spent" ||
			p["subject"] != "key-alice" || p["limit"] != 50.0 || p["spent"] != 48.0 || p["resets"] == nil {
			t.Fatalf("key-alice's spent budget, X-Key-Id %v: %d %s", forged, s, body)
		}
	}
	// key-batch, of the same org, goes on.
	thirty := strings.Repeat("x", 30)
	for i := range 3 {
		if s, body := call("sk-batch", thirty); s != http.StatusOK {
			t.Fatalf("key-batch's call %d after key-alice's budget was spent: %d %s", i+1, s, body)
		}
	}
	if s, _ := call("sk-unknown", eight, "X-Org-Id", "acme", "X-Key-Id", "key-batch"); s != http.StatusUnauthorized {
		t.Fatalf("a call with an unknown key: %d, want the identity service's 401", s)
	}

	// The balance: the org's, and the key's own budget, once the gateway's
	// lease reported the calls it paid.
	for _, c := range []struct {
		key, subject, window string
		limit, spent         int64
	}{
		{"sk-alice", "key-alice", "day", 50, 48},
		{"sk-batch", "key-batch", "month", 500, 90},
	} {
		var last string
		ok := func() bool {
			s, h, body := do(http.MethodGet, gwURL+"/credits/balance", "", "Authorization", "Bearer "+c.key, "X-Key-Id", "key-other", "X-Org-Id", "beta")
			last = fmt.Sprintf("%d %s %s", s, h.Get("Credits-Budget-Remaining"), body)
			var bal struct {
				Org     string      `json:"org"`
				Balance int64       `json:"balance"`
				Budget  *budgetJSON `json:"budget"`
			}
			return s == http.StatusOK && json.Unmarshal(body, &bal) == nil && bal.Org == "acme" && bal.Balance == 1000-48-90 &&
				bal.Budget != nil && bal.Budget.Subject == c.subject && bal.Budget.Limit == c.limit && bal.Budget.Window == c.window &&
				bal.Budget.Spent == c.spent && h.Get("Credits-Budget-Remaining") == fmt.Sprint(c.limit-c.spent)
		}
		eventually(t, fmt.Sprintf("the balance of %s is its calls'", c.key), func() bool {
			if ok() {
				return true
			}
			t.Logf("the balance of %s: %s", c.key, last)
			return false
		})
	}
	if rows := list(); len(rows) != 3 || !strings.HasPrefix(rows[2], "key-batch 500 month 90 410 ") {
		t.Fatalf("the budgets after the calls:\n%s", strings.Join(rows, "\n"))
	}

	// From outside: what the backend answered, per key, against each
	// budget and the org's ledger.
	answered := backend.answeredNow()
	if len(answered) != 2 || answered[[2]string{"acme", "key-alice"}] != 48 || answered[[2]string{"acme", "key-batch"}] != 90 {
		t.Fatalf("the backend answered %v, want key-alice 48 and key-batch 90 of acme", answered)
	}
	var total int64
	for k, n := range answered {
		total += n
		s, _, body := do(http.MethodGet, adminURL+"/orgs/acme/budgets/"+k[1], "", "Authorization", "Bearer adm1n-token")
		var b budgetJSON
		if s != http.StatusOK || json.Unmarshal(body, &b) != nil || b.Spent != n {
			t.Errorf("%s: the backend answered %d credits; its budget: %d %s", k[1], n, s, body)
		}
	}
	s, _, body := do(http.MethodGet, adminURL+"/orgs/acme", "", "Authorization", "Bearer adm1n-token")
	var a struct {
		Balance int64            `json:"balance"`
		Used    map[string]int64 `json:"used"`
	}
	if s != http.StatusOK || json.Unmarshal(body, &a) != nil || 1000-a.Balance != total || a.Used["chat"] != total {
		t.Fatalf("the backend answered %d credits; the ledger: %d %s", total, s, body)
	}
}
