package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

// TestAdminAPI checks every admin call and its errors through a real Caddy
// and a real redis-server, and that no error changes anything.
func TestAdminAPI(t *testing.T) {
	g := startGateway(t, gatewayOptions{})

	decode := func(t *testing.T, r reply) map[string]any {
		t.Helper()
		var v map[string]any
		if err := json.Unmarshal(r.body, &v); err != nil {
			t.Fatalf("%s: %v", r.body, err)
		}
		return v
	}

	t.Run("account, plan, top-up, recharge, events", func(t *testing.T) {
		g.t = t
		r := g.admin(http.MethodGet, "/orgs/acme", "")
		wantStatus(t, r, http.StatusNotFound)
		r.problem(t)

		r = g.admin(http.MethodPut, "/orgs/acme/plan", `{"allowance": 100, "recharge_month": 4}`)
		wantStatus(t, r, http.StatusOK)
		a := decode(t, r)
		if a["org"] != "acme" || a["balance"] != float64(100) || a["allowance_remaining"] != float64(100) || a["purchased"] != float64(0) {
			t.Fatalf("account %v", a)
		}
		if p := a["plan"].(map[string]any); p["allowance"] != float64(100) || p["recharge_month"] != float64(4) {
			t.Fatalf("plan %v", p)
		}
		if !strings.HasSuffix(a["next_recharge"].(string), "-04-01T00:00:00Z") || a["period_start"] == "" {
			t.Fatalf("period %v to %v", a["period_start"], a["next_recharge"])
		}

		for range 3 {
			wantStatus(t, g.call("/rich-text/generate", "acme"), http.StatusOK)
		}
		r = g.admin(http.MethodPost, "/orgs/acme/topup", `{"amount": 50, "reference": "invoice-1"}`)
		wantStatus(t, r, http.StatusOK)
		if a := decode(t, r); a["balance"] != float64(147) || a["purchased"] != float64(50) {
			t.Fatalf("after top-up %v", a)
		}
		r = g.admin(http.MethodPost, "/orgs/acme/topup", `{"amount": 50, "reference": "invoice-1"}`)
		wantStatus(t, r, http.StatusOK)
		if a := decode(t, r); a["balance"] != float64(147) {
			t.Fatalf("a repeated reference applied again: %v", a)
		}
		a = g.account("acme")
		if a["used"].(map[string]any)["rich-text"] != float64(3) {
			t.Fatalf("used %v", a["used"])
		}

		r = g.admin(http.MethodPost, "/orgs/acme/recharge", "")
		wantStatus(t, r, http.StatusOK)
		if a := decode(t, r); a["balance"] != float64(150) || len(a["used"].(map[string]any)) != 0 {
			t.Fatalf("after recharge %v", a)
		}

		r = g.admin(http.MethodGet, "/orgs/acme/events?limit=3", "")
		wantStatus(t, r, http.StatusOK)
		var ev struct{ Events []map[string]any }
		if err := json.Unmarshal(r.body, &ev); err != nil {
			t.Fatal(err)
		}
		if len(ev.Events) != 3 || ev.Events[0]["kind"] != "recharge" || ev.Events[1]["kind"] != "topup" || ev.Events[1]["delta"] != float64(50) ||
			ev.Events[2]["kind"] != "charge" || ev.Events[2]["feature"] != "rich-text" {
			t.Fatalf("events %v", ev.Events)
		}
		r = g.admin(http.MethodGet, "/orgs/acme/events", "")
		if err := json.Unmarshal(r.body, &ev); err != nil || len(ev.Events) != 6 {
			t.Fatalf("all events: %d %v", len(ev.Events), err)
		}
		r = g.admin(http.MethodGet, "/orgs/never-seen/events", "")
		wantStatus(t, r, http.StatusOK)
		if string(r.body) != "{\"events\":[]}\n" {
			t.Fatalf("events of an unknown org: %s", r.body)
		}
	})

	t.Run("errors change nothing", func(t *testing.T) {
		g.t = t
		g.admin(http.MethodPut, "/orgs/stable/plan", `{"allowance": 10, "recharge_month": 1}`)
		before := g.account("stable")
		cases := []struct {
			method, path, body string
			status             int
		}{
			{http.MethodPut, "/orgs/stable/plan", `{"allowance": 10, "recharge_month": 13}`, 400},
			{http.MethodPut, "/orgs/stable/plan", `{"allowance": 10, "recharge_month": 0}`, 400},
			{http.MethodPut, "/orgs/stable/plan", `{"allowance": -1, "recharge_month": 1}`, 400},
			{http.MethodPut, "/orgs/stable/plan", `{"allowance": 10}`, 400},
			{http.MethodPut, "/orgs/stable/plan", `{"allowance": 10, "recharge_month": 1, "extra": 1}`, 400},
			{http.MethodPut, "/orgs/stable/plan", `{"allowance": 1.5, "recharge_month": 1}`, 400},
			{http.MethodPut, "/orgs/stable/plan", `not json`, 400},
			{http.MethodPut, "/orgs/stable/plan", `{"allowance": 10, "recharge_month": 1} {}`, 400},
			{http.MethodPost, "/orgs/stable/topup", `{"amount": 0}`, 400},
			{http.MethodPost, "/orgs/stable/topup", `{"amount": -5}`, 400},
			{http.MethodPost, "/orgs/stable/topup", `{"amount": 1000000000001}`, 400},
			{http.MethodPost, "/orgs/stable/topup", `{"amount": "5"}`, 400},
			{http.MethodPost, "/orgs/stable/topup", `{}`, 400},
			{http.MethodPost, "/orgs/stable/topup", `{"amount": 5, "reference": "has space"}`, 400},
			{http.MethodPost, "/orgs/stable/topup", `{"amount": 5, "refrence": "typo"}`, 400},
			{http.MethodPost, "/orgs/stable/topup", `{"amount": 5, "reference": "` + strings.Repeat("r", 70000) + `"}`, 400},
			{http.MethodPost, "/orgs/stable/recharge", `{"now": true}`, 400},
			{http.MethodPost, "/orgs/a%20b/topup", `{"amount": 5}`, 400},
			{http.MethodPost, "/orgs/{stable}/topup", `{"amount": 5}`, 400},
			{http.MethodPost, "/orgs/" + strings.Repeat("x", 300) + "/topup", `{"amount": 5}`, 400},
			{http.MethodGet, "/orgs/stable/events?limit=0", ``, 400},
			{http.MethodGet, "/orgs/stable/events?limit=1001", ``, 400},
			{http.MethodGet, "/orgs/stable/events?limit=x", ``, 400},
			{http.MethodGet, "/orgs/stable/topup", ``, 405},
			{http.MethodPost, "/orgs/stable", ``, 405},
			{http.MethodDelete, "/orgs/stable/plan", ``, 405},
			{http.MethodGet, "/orgs/stable/nothing", ``, 404},
			{http.MethodGet, "/accounts", ``, 404},
		}
		for _, c := range cases {
			r := g.admin(c.method, c.path, c.body)
			if r.status != c.status {
				t.Fatalf("%s %s %.60s: %d, want %d; %s", c.method, c.path, c.body, r.status, c.status, r.body)
			}
			if p := r.problem(t); p["title"] == "" {
				t.Fatalf("problem without title: %v", p)
			}
			if c.status == 405 && r.header.Get("Allow") == "" {
				t.Fatalf("%s %s: 405 without Allow", c.method, c.path)
			}
		}
		after := g.account("stable")
		b1, _ := json.Marshal(before)
		b2, _ := json.Marshal(after)
		if string(b1) != string(b2) {
			t.Fatalf("errors changed the account:\n%s\n%s", b1, b2)
		}
	})

	t.Run("header limit", func(t *testing.T) {
		g.t = t
		r := g.do(http.MethodGet, g.adminURL+"/orgs/stable", map[string]string{"Authorization": "Bearer s3cret", "X-Pad": strings.Repeat("p", 17<<10)}, "")
		wantStatus(t, r, http.StatusRequestHeaderFieldsTooLarge)
		r.problem(t)
	})

	t.Run("token", func(t *testing.T) {
		g.t = t
		for _, auth := range []string{"", "Bearer", "Bearer wrong", "Bearer s3cret2", "Basic s3cret", "bearer s3cre"} {
			r := g.do(http.MethodPost, g.adminURL+"/orgs/tok/topup", map[string]string{"Authorization": auth}, `{"amount": 5}`)
			wantStatus(t, r, http.StatusUnauthorized)
			if r.header.Get("WWW-Authenticate") == "" {
				t.Fatal("401 without WWW-Authenticate")
			}
		}
		r := g.admin(http.MethodGet, "/orgs/tok", "")
		wantStatus(t, r, http.StatusNotFound)
		r = g.do(http.MethodGet, g.adminURL+"/orgs/tok", map[string]string{"Authorization": "bearer s3cret"}, "")
		wantStatus(t, r, http.StatusNotFound)
	})
}

// TestAdminMethods checks that every admin route matches its method
// exactly: near misses and other methods answer 405 problem+json with the
// route's Allow, and change nothing. HEAD answers wherever GET does, and a
// path without a route, or one that is not clean, answers 404 problem+json,
// never the redirect of http.ServeMux.
func TestAdminMethods(t *testing.T) {
	// The metered site mounts the admin API at its root too, without
	// handle_path, whose prefix stripping cleans the path.
	g := startGateway(t, gatewayOptions{site: "route /orgs/* {\n\t\tcredits_admin {\n\t\t\ttoken s3cret\n\t\t}\n\t}"})
	wantStatus(t, g.admin(http.MethodPut, "/orgs/m/plan", `{"allowance": 100, "recharge_month": 1}`), http.StatusOK)
	r := g.admin(http.MethodPost, "/orgs/m/holds", `{"amount": 10, "feature": "long-job", "ttl": "1h", "reference": "m-1"}`)
	wantStatus(t, r, http.StatusCreated)
	hold := "/orgs/m/holds/" + decodeObject(t, r)["hold"].(string)
	before := g.ledgerState("m")

	// Each body would change the ledger if its route took it.
	routes := []struct{ path, allow, body string }{
		{"/orgs", "GET, HEAD", `{"amount": 5}`},
		{"/orgs/m", "GET, HEAD", ``},
		{"/orgs/m/plan", "PUT", `{"allowance": 7, "recharge_month": 2}`},
		{"/orgs/m/topup", "POST", `{"amount": 5}`},
		{"/orgs/m/recharge", "POST", ``},
		{"/orgs/m/events", "GET, HEAD", ``},
		{"/orgs/m/holds", "GET, HEAD, POST", `{"amount": 1, "feature": "long-job"}`},
		{hold + "/capture", "POST", `{"amount": 1}`},
		{hold, "DELETE", ``},
		{"/orgs/m/grants", "GET, HEAD, POST", `{"amount": 5}`},
		{"/orgs/m/grants/g1", "DELETE", ``},
	}
	// T, P, POS, E and G are what the old substring test let through.
	near := []string{"T", "P", "POS", "E", "G", "get", "post", "put", "delete", "head", "GETS", "POSTT", "PU", "DELET"}
	for _, route := range routes {
		methods := append([]string(nil), near...)
		for _, m := range []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete, http.MethodOptions} {
			if !strings.Contains(", "+route.allow+", ", ", "+m+", ") {
				methods = append(methods, m)
			}
		}
		for _, method := range methods {
			r := g.admin(method, route.path, route.body)
			if r.status != http.StatusMethodNotAllowed {
				t.Fatalf("%s %s: %d, want 405; %s", method, route.path, r.status, r.body)
			}
			if allow := r.header.Get("Allow"); allow != route.allow {
				t.Errorf("%s %s: Allow %q, want %q", method, route.path, allow, route.allow)
			}
			if method == http.MethodHead {
				if ct := r.header.Get("Content-Type"); ct != policy.ContentTypeProblem || len(r.body) != 0 {
					t.Errorf("HEAD %s: %q, %d bytes", route.path, ct, len(r.body))
				}
				continue
			}
			if p := r.problem(t); p["title"] != "Method Not Allowed" || !strings.Contains(p["detail"].(string), "method "+method+" is not allowed") {
				t.Errorf("%s %s: problem %v", method, route.path, p)
			}
		}
	}
	if after := g.ledgerState("m"); after != before {
		t.Fatalf("wrong methods changed the ledger:\n%s\n%s", before, after)
	}

	// HEAD wherever GET: the headers of the GET, no body.
	for _, path := range []string{"/orgs", "/orgs/m", "/orgs/m/events", "/orgs/m/holds", "/orgs/m/grants"} {
		r := g.admin(http.MethodHead, path, "")
		if r.status != http.StatusOK || r.header.Get("Content-Type") != "application/json" || len(r.body) != 0 {
			t.Errorf("HEAD %s: %d %q, %d bytes", path, r.status, r.header.Get("Content-Type"), len(r.body))
		}
	}

	for _, c := range []struct{ method, path string }{
		{http.MethodGet, "/orgs/m/"},
		{http.MethodGet, "/orgs/"},
		{http.MethodPost, "/"},
		{http.MethodGet, "/orgs/m/nothing"},
		{http.MethodPost, hold + "/capture/again"},
		{http.MethodGet, "/orgs/m/holds/"},
		{"T", "/orgs/m/nothing"},
	} {
		r := g.admin(c.method, c.path, `{"amount": 5}`)
		if r.status != http.StatusNotFound || r.header.Get("Location") != "" || r.header.Get("Allow") != "" {
			t.Fatalf("%s %s: %d, Location %q, Allow %q; want a plain 404", c.method, c.path, r.status, r.header.Get("Location"), r.header.Get("Allow"))
		}
		if p := r.problem(t); p["detail"] != "no admin call at "+c.path {
			t.Errorf("%s %s: problem %v", c.method, c.path, p)
		}
	}
	// Paths that are not clean reach the handler where no prefix is
	// stripped.
	for _, path := range []string{"/orgs//m", "/orgs/n/../m", "/orgs/m/./topup", "/orgs/m//topup"} {
		r := g.do(http.MethodPost, g.url+path, map[string]string{"Authorization": "Bearer s3cret"}, `{"amount": 5}`)
		if r.status != http.StatusNotFound || r.header.Get("Location") != "" {
			t.Fatalf("POST %s: %d, Location %q; want a 404", path, r.status, r.header.Get("Location"))
		}
		if p := r.problem(t); p["detail"] != "no admin call at "+path {
			t.Errorf("POST %s: problem %v", path, p)
		}
	}
	if r := g.do(http.MethodGet, g.url+"/orgs/m", map[string]string{"Authorization": "Bearer s3cret"}, ""); r.status != http.StatusOK {
		t.Fatalf("the admin API at the site's root: %d %s", r.status, r.body)
	}
	if after := g.ledgerState("m"); after != before {
		t.Fatalf("404s changed the ledger:\n%s\n%s", before, after)
	}

	// Without the token a wrong method is a 401 like any other call.
	r = g.do("POS", g.adminURL+"/orgs/m/topup", nil, `{"amount": 5}`)
	wantStatus(t, r, http.StatusUnauthorized)
}

// TestAdminOrgs lists the orgs through a real Caddy, page by page, on a
// redis-server and on a 3-node Cluster (whose orgs are spread over its
// masters); a bad page is a 400 that changes nothing.
func TestAdminOrgs(t *testing.T) {
	cluster := redistest.StartCluster(t, 3, 0)
	for _, store := range []struct{ name, line string }{
		{"redis", ""},
		{"cluster", "redis_cluster " + strings.Join(cluster.Addrs, " ")},
	} {
		t.Run(store.name, func(t *testing.T) {
			g := startGateway(t, gatewayOptions{store: store.line})
			names := []string{"delta", "alpha", "echo", "charlie", "bravo"}
			for i, org := range names {
				wantStatus(t, g.admin(http.MethodPost, "/orgs/"+org+"/topup", fmt.Sprintf(`{"amount": %d, "reference": "start"}`, i+1)), http.StatusOK)
			}
			var got []string
			after := ""
			for pages := 0; ; pages++ {
				r := g.admin(http.MethodGet, "/orgs?limit=2&after="+after, "")
				wantStatus(t, r, http.StatusOK)
				var page struct {
					Orgs []struct {
						Org     string `json:"org"`
						Balance int64  `json:"balance"`
					} `json:"orgs"`
					Next *string `json:"next"`
				}
				if err := json.Unmarshal(r.body, &page); err != nil || page.Next == nil || len(page.Orgs) > 2 || pages > 3 {
					t.Fatalf("page after %q: %s (%v)", after, r.body, err)
				}
				for _, o := range page.Orgs {
					got = append(got, fmt.Sprintf("%s=%d", o.Org, o.Balance))
				}
				if *page.Next == "" {
					break
				}
				after = *page.Next
			}
			// Each org has the default plan's 5 credits and its top-up.
			if want := "alpha=7 bravo=10 charlie=9 delta=6 echo=8"; strings.Join(got, " ") != want {
				t.Fatalf("orgs %s, want %s", strings.Join(got, " "), want)
			}
			before := g.ledgerState("alpha")
			for _, q := range []string{"limit=0", "limit=1001", "limit=x", "after=no/such", "after=" + strings.Repeat("a", 65)} {
				r := g.admin(http.MethodGet, "/orgs?"+q, "")
				wantStatus(t, r, http.StatusBadRequest)
				if p := r.problem(t); !strings.Contains(fmt.Sprint(p["detail"]), "invalid") {
					t.Errorf("GET /orgs?%s: problem %v", q, p)
				}
			}
			if after := g.ledgerState("alpha"); after != before {
				t.Fatalf("bad pages changed the ledger:\n%s\n%s", before, after)
			}
		})
	}
}

// TestAdminUsageAndAdjust reads the usage per day that real calls left,
// against what the upstream served, and corrects a balance through a real
// Caddy and a real redis-server.
func TestAdminUsageAndAdjust(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	g.topUp("acme", 100)
	for range 4 {
		wantStatus(t, g.call("/rich-text/generate", "acme"), http.StatusOK)
	}
	for range 2 {
		wantStatus(t, g.call("/image-studio/resize", "acme"), http.StatusOK)
	}
	// A call the upstream never answers is refunded: it counts nowhere.
	wantStatus(t, g.call("/dead/x", "acme"), http.StatusBadGateway)

	today := time.Now().UTC().Format(time.DateOnly)
	type usageAnswer struct {
		Org  string `json:"org"`
		Days []struct {
			Date string           `json:"date"`
			Used map[string]int64 `json:"used"`
		} `json:"days"`
	}
	read := func(query string) usageAnswer {
		t.Helper()
		r := g.admin(http.MethodGet, "/orgs/acme/usage"+query, "")
		wantStatus(t, r, http.StatusOK)
		var u usageAnswer
		if err := json.Unmarshal(r.body, &u); err != nil {
			t.Fatalf("%s: %v", r.body, err)
		}
		return u
	}
	// What the upstream served, at each route's cost, is today's usage
	// (leased calls reach the ledger at the lease's next sync).
	g.upstream.mu.Lock()
	want := map[string]int64{"rich-text": g.upstream.byOrg["acme rich-text"], "image-studio": 2 * g.upstream.byOrg["acme image-studio"]}
	g.upstream.mu.Unlock()
	if want["rich-text"] != 4 || want["image-studio"] != 4 {
		t.Fatalf("the upstream served %v", want)
	}
	awaitCondition(t, "today's usage", func() bool {
		u := read("")
		d := u.Days[len(u.Days)-1]
		return len(u.Days) == 30 && d.Date == today && len(d.Used) == 2 &&
			d.Used["rich-text"] == want["rich-text"] && d.Used["image-studio"] == want["image-studio"]
	})
	if u := read("?from=" + today + "&to=" + today); u.Org != "acme" || len(u.Days) != 1 || u.Days[0].Used["rich-text"] != 4 {
		t.Fatalf("today alone: %+v", u)
	}
	if u := read("?from=2026-01-01&to=2026-01-03"); len(u.Days) != 3 || u.Days[0].Date != "2026-01-01" || len(u.Days[0].Used) != 0 {
		t.Fatalf("days without usage: %+v", u)
	}

	before := g.ledgerState("acme")
	balance := g.balance("acme")
	for _, c := range []struct {
		method, path, body string
		status             int
	}{
		{http.MethodGet, "/orgs/acme/usage?from=2026-13-01", "", 400},
		{http.MethodGet, "/orgs/acme/usage?to=yesterday", "", 400},
		{http.MethodGet, "/orgs/acme/usage?from=2026-02-02&to=2026-02-01", "", 400},
		{http.MethodGet, "/orgs/acme/usage?from=2024-01-01&to=2026-01-01", "", 400},
		{http.MethodGet, "/orgs/no%20such/usage", "", 400},
		{http.MethodGet, "/orgs/nobody/usage", "", 404},
		{http.MethodPost, "/orgs/acme/usage", "", 405},
		{http.MethodPost, "/orgs/acme/adjust", `{"amount": -2, "reason": "double charge"}`, 400},
		{http.MethodPost, "/orgs/acme/adjust", `{"amount": 0, "reason": "x", "reference": "c1"}`, 400},
		{http.MethodPost, "/orgs/acme/adjust", `{"amount": 1000000000001, "reason": "x", "reference": "c1"}`, 400},
		{http.MethodPost, "/orgs/acme/adjust", `{"amount": 2, "reference": "c1"}`, 400},
		{http.MethodPost, "/orgs/acme/adjust", `{"amount": 2, "reason": "a\nb", "reference": "c1"}`, 400},
		{http.MethodPost, "/orgs/acme/adjust", `{"amount": 2, "reason": "x", "reference": "c1", "note": 1}`, 400},
		{http.MethodPost, "/orgs/acme/adjust", `{"amount": 2.5, "reason": "x", "reference": "c1"}`, 400},
		{http.MethodGet, "/orgs/acme/adjust", "", 405},
	} {
		r := g.admin(c.method, c.path, c.body)
		if r.status != c.status {
			t.Fatalf("%s %s %s: %d, want %d; %s", c.method, c.path, c.body, r.status, c.status, r.body)
		}
		r.problem(t)
	}
	if after := g.ledgerState("acme"); after != before {
		t.Fatalf("refused calls changed the ledger:\n%s\n%s", before, after)
	}

	r := g.admin(http.MethodPost, "/orgs/acme/adjust", `{"amount": -12, "reason": "charged twice by the old system", "reference": "case-7"}`)
	wantStatus(t, r, http.StatusOK)
	if a := decodeObject(t, r); a["balance"] != float64(balance-12) {
		t.Fatalf("after the adjustment %v, want balance %d", a, balance-12)
	}
	r = g.admin(http.MethodPost, "/orgs/acme/adjust", `{"amount": -12, "reason": "charged twice by the old system", "reference": "case-7"}`)
	wantStatus(t, r, http.StatusOK)
	if a := decodeObject(t, r); a["balance"] != float64(balance-12) || r.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("a repeated reference applied again: %v %v", a, r.header)
	}
	r = g.adminWith(http.MethodPost, "/orgs/acme/adjust", `{"amount": 20, "reason": "goodwill"}`, map[string]string{"Idempotency-Key": "case-8"})
	wantStatus(t, r, http.StatusOK)
	if g.balance("acme") != balance+8 {
		t.Fatalf("balance %d after both adjustments, want %d", g.balance("acme"), balance+8)
	}
	ev := g.events("acme")
	if ev[0]["kind"] != "adjust" || ev[0]["delta"] != float64(20) || ev[0]["reason"] != "goodwill" || ev[0]["ref"] != "case-8" ||
		ev[1]["kind"] != "adjust" || ev[1]["delta"] != float64(-12) || ev[1]["reason"] != "charged twice by the old system" {
		t.Fatalf("events %v", ev[:2])
	}
	// Adjustments are no usage.
	if u := read("?from=" + today + "&to=" + today); len(u.Days[0].Used) != 2 || u.Days[0].Used["rich-text"] != 4 {
		t.Fatalf("usage after adjustments: %+v", u)
	}
}

// TestAdminGrants gives, lists and voids grants through a real Caddy and
// redis-server: each status of the three calls, the exact JSON of a grant,
// the references of a grant, expiring top-ups and a plan's rollover, and
// that no refused call changes anything.
func TestAdminGrants(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	r := g.admin(http.MethodGet, "/orgs/acme/grants", "")
	wantStatus(t, r, http.StatusNotFound)
	if p := r.problem(t); p["detail"] != "Redis holds nothing for org acme" {
		t.Fatalf("grants of an unknown org: %v", p)
	}
	wantStatus(t, g.admin(http.MethodPut, "/orgs/acme/plan", `{"allowance": 100, "recharge_month": 1}`), http.StatusOK)

	// A promotional grant, and its exact JSON.
	expires := time.Now().Add(30 * 24 * time.Hour).UTC().Truncate(time.Second).Format(time.RFC3339)
	body := `{"amount": 30, "expires": "` + expires + `", "priority": 10, "reference": "promo-1", "reason": "welcome"}`
	r = g.admin(http.MethodPost, "/orgs/acme/grants", body)
	wantStatus(t, r, http.StatusCreated)
	var answer struct {
		Grant   json.RawMessage `json:"grant"`
		Account map[string]any  `json:"account"`
	}
	if err := json.Unmarshal(r.body, &answer); err != nil {
		t.Fatal(err)
	}
	var granted struct{ Effective time.Time }
	if err := json.Unmarshal(answer.Grant, &granted); err != nil || time.Since(granted.Effective).Abs() > 10*time.Second {
		t.Fatalf("the grant's effective time %v (%v), want now: %s", granted.Effective, err, answer.Grant)
	}
	want := fmt.Sprintf(`{"grant":"g1","kind":"promotional","amount":30,"remaining":30,"held":0,"priority":10,"effective":%q,"expires":%q,`+
		`"state":"live","reference":"promo-1","reason":"welcome"}`, granted.Effective.Format(time.RFC3339Nano), expires)
	if string(answer.Grant) != want {
		t.Fatalf("grant JSON:\n%s\nwant\n%s", answer.Grant, want)
	}
	wantAccount(t, answer.Account, map[string]int64{"balance": 130, "promotional": 30, "allowance_remaining": 100, "purchased": 0, "debt": 0})
	if ne, _ := answer.Account["next_expiry"].(map[string]any); ne["at"] != expires || ne["amount"] != float64(30) {
		t.Fatalf("next_expiry %v, want %s, 30", answer.Account["next_expiry"], expires)
	}

	// The same reference again: the same grant, 200, nothing applied.
	r = g.admin(http.MethodPost, "/orgs/acme/grants", `{"amount": 99, "reference": "promo-1"}`)
	wantStatus(t, r, http.StatusOK)
	if r.header.Get(headerReplayed) != "true" || !strings.Contains(string(r.body), `"grant":`+want) {
		t.Fatalf("a repeated reference: %q %s", r.header.Get(headerReplayed), r.body)
	}
	if b := g.balance("acme"); b != 130 {
		t.Fatalf("balance %d after a repeated grant, want 130", b)
	}

	// An Idempotency-Key is the reference without one in the body; with
	// neither, the gateway gives one of its own.
	key := map[string]string{"Authorization": "Bearer s3cret", "Idempotency-Key": "promo-key"}
	for i, status := range []int{http.StatusCreated, http.StatusOK} {
		r = g.do(http.MethodPost, g.adminURL+"/orgs/acme/grants", key, `{"amount": 5}`)
		wantStatus(t, r, status)
		if grant := decodeObject(t, r)["grant"].(map[string]any); grant["grant"] != "g2" || grant["reference"] != "promo-key" {
			t.Fatalf("grant %d with an Idempotency-Key: %v", i, grant)
		}
	}
	r = g.admin(http.MethodPost, "/orgs/acme/grants", `{"amount": 5}`)
	wantStatus(t, r, http.StatusCreated)
	if ref, _ := decodeObject(t, r)["grant"].(map[string]any)["reference"].(string); !strings.HasPrefix(ref, meter.OwnReferencePrefix) {
		t.Fatalf("a grant without a reference has the reference %q, want the gateway's own", ref)
	}

	// A pending grant adds nothing yet.
	effective := time.Now().Add(time.Hour).UTC().Truncate(time.Second).Format(time.RFC3339)
	r = g.admin(http.MethodPost, "/orgs/acme/grants", `{"amount": 8, "effective": "`+effective+`", "reference": "later"}`)
	wantStatus(t, r, http.StatusCreated)
	if grant := decodeObject(t, r)["grant"].(map[string]any); grant["state"] != "pending" || grant["effective"] != effective || grant["expires"] != nil {
		t.Fatalf("a grant effective in an hour: %v", grant)
	}
	wantAccount(t, g.account("acme"), map[string]int64{"balance": 140, "promotional": 40})

	// The list: live and pending in burn-down order (priority 10 first;
	// the allowance, expiring at the recharge, before grants that never
	// expire), then those that ended.
	list := func() []map[string]any {
		t.Helper()
		r := g.admin(http.MethodGet, "/orgs/acme/grants", "")
		wantStatus(t, r, http.StatusOK)
		var v struct{ Grants []map[string]any }
		if err := json.Unmarshal(r.body, &v); err != nil {
			t.Fatal(err)
		}
		return v.Grants
	}
	ids := func(gs []map[string]any) string {
		var out []string
		for _, g := range gs {
			out = append(out, fmt.Sprintf("%v:%v", g["grant"], g["state"]))
		}
		return strings.Join(out, " ")
	}
	if got := ids(list()); got != "g1:live allowance:live g2:live g3:live g4:pending" {
		t.Fatalf("grants %s", got)
	}

	// Refused grants, and what they say; none changes anything.
	before := adminState(g, "acme")
	for _, c := range []struct{ body, want string }{
		{`{"amount": 5, "kind": "purchased"}`, "top-ups make purchased grants, plans allowance and rollover"},
		{`{"amount": 5, "kind": "allowance"}`, "top-ups make purchased grants"},
		{`{"amount": 0}`, `invalid amount \"0\": must be 1 to 1000000000000`},
		{`{"amount": 1000000000001}`, `invalid amount \"1000000000001\"`},
		{`{"amount": -3}`, `invalid amount \"-3\"`},
		{`{"amount": 1.5}`, "bad JSON body"},
		{`{"reference": "no-amount"}`, "amount is required"},
		{`{"amount": 5, "priority": 101}`, `invalid priority \"101\": must be 0 to 100`},
		{`{"amount": 5, "priority": -1}`, `invalid priority \"-1\"`},
		{`{"amount": 5, "expires": "2020-01-01T00:00:00Z"}`, "expires must be after now and after effective"},
		{`{"amount": 5, "expires": "` + effective + `", "effective": "` + effective + `"}`, "expires must be after now and after effective"},
		{`{"amount": 5, "expires": "next week"}`, `invalid expires \"next week\": must be a time in RFC 3339`},
		{`{"amount": 5, "expires": ""}`, `invalid expires \"\"`},
		{`{"amount": 5, "effective": "2027-01-01"}`, `invalid effective \"2027-01-01\"`},
		{`{"amount": 5, "reference": "has space"}`, `invalid reference`},
		{`{"amount": 5, "reason": "two\nlines"}`, `invalid reason`},
		{`{"amount": 5, "Kind": "promotional"}`, `unknown field \"Kind\"`},
		{`{"amount": 5, "amount": 6}`, `field \"amount\" given twice`},
		{`{"amount": 5, "expiry": "2999-01-01T00:00:00Z"}`, `unknown field \"expiry\"`},
	} {
		r := g.admin(http.MethodPost, "/orgs/acme/grants", c.body)
		if r.status != http.StatusBadRequest || !strings.Contains(string(r.body), c.want) {
			t.Errorf("%s: %d %s; want 400 saying %s", c.body, r.status, r.body, c.want)
			continue
		}
		r.problem(t)
	}
	for _, c := range []struct {
		method, path, body string
		status             int
		want               string
	}{
		{http.MethodDelete, "/orgs/acme/grants/allowance", `{"reason": "x"}`, http.StatusConflict, "change the plan"},
		{http.MethodDelete, "/orgs/acme/grants/purchased", ``, http.StatusConflict, "negative adjustment"},
		{http.MethodDelete, "/orgs/acme/grants/g99", ``, http.StatusNotFound, "org acme has no grant g99"},
		{http.MethodDelete, "/orgs/acme/grants/x1", ``, http.StatusNotFound, "org acme has no grant x1"},
		{http.MethodDelete, "/orgs/ghost/grants/g1", ``, http.StatusNotFound, "org ghost has no grant g1"},
		{http.MethodDelete, "/orgs/acme/grants/g1", `{"reason": ""}`, http.StatusOK, ""}, // an empty reason is none; checked below
		{http.MethodDelete, "/orgs/acme/grants/g2", `{"reason": "\u0007"}`, http.StatusBadRequest, "invalid reason"},
		{http.MethodPost, "/orgs/acme/topup", `{"amount": 5, "expires": "2020-01-01T00:00:00Z", "reference": "old"}`, http.StatusBadRequest, "expires must be after now"},
		{http.MethodPost, "/orgs/acme/topup", `{"amount": 5, "expires": "soon"}`, http.StatusBadRequest, `invalid expires \"soon\"`},
		{http.MethodPut, "/orgs/acme/plan", `{"allowance": 100, "recharge_month": 1, "rollover": 101}`, http.StatusBadRequest, `invalid rollover \"101\": must be 0 to 100`},
		{http.MethodPut, "/orgs/acme/plan", `{"allowance": 100, "recharge_month": 1, "rollover": -1}`, http.StatusBadRequest, `invalid rollover \"-1\"`},
	} {
		if c.status == http.StatusOK {
			continue
		}
		r := g.admin(c.method, c.path, c.body)
		if r.status != c.status || !strings.Contains(string(r.body), c.want) {
			t.Errorf("%s %s %s: %d %s; want %d saying %s", c.method, c.path, c.body, r.status, r.body, c.status, c.want)
			continue
		}
		r.problem(t)
	}
	if after := adminState(g, "acme"); after != before {
		t.Fatalf("refused calls changed the org:\nbefore %s\nafter  %s", before, after)
	}

	// A void: what remains of the grant is gone, and the reason is kept in
	// the grant and its event. A repeat answers the account again.
	for range 2 {
		r = g.admin(http.MethodDelete, "/orgs/acme/grants/g1", `{"reason": "campaign cancelled"}`)
		wantStatus(t, r, http.StatusOK)
		wantAccount(t, decodeObject(t, r), map[string]int64{"balance": 110, "promotional": 10})
	}
	gs := list()
	if got := ids(gs); got != "allowance:live g2:live g3:live g4:pending g1:voided" {
		t.Fatalf("grants after a void: %s", got)
	}
	if v := gs[4]; v["reason"] != "campaign cancelled" || v["remaining"] != float64(0) || v["ended"] == nil {
		t.Fatalf("the voided grant: %v", v)
	}
	ev := g.events("acme")
	if ev[0]["kind"] != "void" || ev[0]["ref"] != "g1" || ev[0]["delta"] != float64(-30) || ev[0]["reason"] != "campaign cancelled" {
		t.Fatalf("the void's event: %v", ev[0])
	}
	if n := countEvents(t, g, "acme", "void"); n != 1 {
		t.Fatalf("%d void events, want 1: a repeat voids nothing", n)
	}
	// A pending grant is voided without a body; an ended one is a 409.
	wantStatus(t, g.admin(http.MethodDelete, "/orgs/acme/grants/g4", ""), http.StatusOK)
	r = g.admin(http.MethodDelete, "/orgs/acme/grants/g4", "")
	wantStatus(t, r, http.StatusOK)
	// A grant spent by calls: priority 0 goes first.
	wantStatus(t, g.admin(http.MethodPost, "/orgs/acme/grants", `{"amount": 2, "priority": 0, "reference": "two"}`), http.StatusCreated)
	for range 2 {
		wantStatus(t, g.call("/rich-text/generate", "acme"), http.StatusOK)
	}
	r = g.admin(http.MethodDelete, "/orgs/acme/grants/g5", `{"reason": "too late"}`)
	wantStatus(t, r, http.StatusConflict)
	if p := r.problem(t); !strings.Contains(p["detail"].(string), "grant g5 was spent or has expired") {
		t.Fatalf("void of a spent grant: %v", p)
	}
	wantAccount(t, g.account("acme"), map[string]int64{"balance": 110, "promotional": 10, "allowance_remaining": 100})

	// A top-up with an expiry is a purchased grant of its own; a plan's
	// rollover waits for the next recharge as the rest of the plan.
	r = g.admin(http.MethodPost, "/orgs/acme/topup", `{"amount": 20, "expires": "`+expires+`", "reference": "inv-exp"}`)
	wantStatus(t, r, http.StatusOK)
	wantAccount(t, decodeObject(t, r), map[string]int64{"balance": 130, "purchased": 20})
	var bought map[string]any
	for _, g := range list() {
		if g["reference"] == "inv-exp" {
			bought = g
		}
	}
	if bought["kind"] != "purchased" || bought["expires"] != expires || bought["amount"] != float64(20) {
		t.Fatalf("the expiring top-up's grant: %v", bought)
	}
	r = g.admin(http.MethodPut, "/orgs/acme/plan", `{"allowance": 100, "recharge_month": 1, "rollover": 40}`)
	wantStatus(t, r, http.StatusOK)
	if np, _ := decodeObject(t, r)["next_plan"].(map[string]any); np["rollover"] != float64(40) {
		t.Fatalf("next_plan %v, want a rollover of 40", np)
	}
	// The period that ends carries over what its own plan says: nothing at
	// the first recharge, 40 of the 100 unused at the second.
	for i, rollover := range []int64{0, 40} {
		r = g.admin(http.MethodPost, "/orgs/acme/recharge", "")
		wantStatus(t, r, http.StatusOK)
		a := decodeObject(t, r)
		if p := a["plan"].(map[string]any); p["rollover"] != float64(40) {
			t.Fatalf("plan after recharge %d: %v", i+1, p)
		}
		wantAccount(t, a, map[string]int64{"rollover": rollover, "allowance_remaining": 100, "promotional": 10, "purchased": 20, "balance": 130 + rollover})
	}
}

// TestAdminGrantsFull fills an org with the most grants live or pending it
// may have: one more is a 409 that changes nothing, and a void makes room.
func TestAdminGrantsFull(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	for i := range meter.MaxGrants {
		wantStatus(t, g.admin(http.MethodPost, "/orgs/full/grants", fmt.Sprintf(`{"amount": 1, "reference": "g-%d"}`, i)), http.StatusCreated)
	}
	before := adminState(g, "full")
	for _, c := range []struct{ path, body string }{
		{"/grants", `{"amount": 1, "reference": "one-more"}`},
		{"/topup", `{"amount": 1, "reference": "one-more", "expires": "2999-01-01T00:00:00Z"}`},
	} {
		r := g.admin(http.MethodPost, "/orgs/full"+c.path, c.body)
		wantStatus(t, r, http.StatusConflict)
		if p := r.problem(t); !strings.Contains(p["detail"].(string), fmt.Sprintf("has %d grants live or pending", meter.MaxGrants)) {
			t.Fatalf("%s: %v", c.path, p)
		}
	}
	if after := adminState(g, "full"); after != before {
		t.Fatalf("a grant over the limit changed the org:\nbefore %s\nafter  %s", before, after)
	}
	// A top-up that never expires adds to the standing purchased grant.
	wantStatus(t, g.admin(http.MethodPost, "/orgs/full/topup", `{"amount": 1, "reference": "standing"}`), http.StatusOK)
	wantStatus(t, g.admin(http.MethodDelete, "/orgs/full/grants/g1", ""), http.StatusOK)
	wantStatus(t, g.admin(http.MethodPost, "/orgs/full/grants", `{"amount": 1, "reference": "one-more"}`), http.StatusCreated)
}

// runDocCurls runs the curl commands of docs/admin.md's section, as written
// but for the address, against g's admin API, with CREDITS_ADMIN_TOKEN set:
// there must be want of them, each answered JSON with one of statuses. It
// returns their bodies.
func runDocCurls(t *testing.T, g *gateway, section string, want int, statuses ...string) []string {
	t.Helper()
	block := readmeBlock(t, "../docs/admin.md", section, "sh")
	const addr = "localhost:2020/admin"
	var commands []string
	for _, line := range strings.Split(strings.ReplaceAll(block, "\\\n", " "), "\n") {
		if line = strings.TrimSpace(line); line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !strings.HasPrefix(line, "curl -s ") || !strings.Contains(line, addr) {
			t.Fatalf("a command that is not curl -s to %s: %s", addr, line)
		}
		commands = append(commands, line)
	}
	if len(commands) != want {
		t.Fatalf("%s: %d commands, want %d:\n%s", section, len(commands), want, block)
	}
	var bodies []string
	for _, line := range commands {
		cmd := exec.Command("bash", "-euo", "pipefail", "-c", strings.Replace(line, addr, strings.TrimPrefix(g.adminURL, "http://"), 1)+" -w '\\n%{http_code}'")
		cmd.Env = append(os.Environ(), "CREDITS_ADMIN_TOKEN=s3cret")
		out, err := cmd.Output()
		text := strings.TrimSpace(string(out))
		body, status := text[:max(strings.LastIndex(text, "\n"), 0)], text[strings.LastIndex(text, "\n")+1:]
		if err != nil || !slices.Contains(statuses, status) || !json.Valid([]byte(body)) {
			t.Fatalf("%s: %v, status %s, want one of %v\n%s", line, err, status, statuses, out)
		}
		bodies = append(bodies, body)
	}
	return bodies
}

// TestAdminDocsGrants runs the curl commands of docs/admin.md's Grants
// section, as written but for the address, against a real Caddy and
// redis-server: each is answered 2xx, and together they leave the org as
// the comments say.
func TestAdminDocsGrants(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	runDocCurls(t, g, "## Grants", 5, "200", "201")
	a := g.account("acme")
	wantAccount(t, a, map[string]int64{"balance": 1500, "allowance_remaining": 1000, "purchased": 500, "promotional": 0})
	if p := a["plan"].(map[string]any); p["rollover"] != float64(200) {
		t.Errorf("plan %v, want a rollover of 200", p)
	}
	r := g.admin(http.MethodGet, "/orgs/acme/grants", "")
	wantStatus(t, r, http.StatusOK)
	var list struct{ Grants []meter.Grant }
	if err := json.Unmarshal(r.body, &list); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, g := range list.Grants {
		got = append(got, fmt.Sprintf("%s %s %s %d/%d %s", g.ID, g.Kind, g.State, g.Remaining, g.Amount, g.Reason))
	}
	if want := "[allowance allowance live 1000/1000  g1 purchased live 500/500  g2 promotional voided 0/100 Offer withdrawn]"; fmt.Sprint(got) != want {
		t.Errorf("grants %v\nwant %s", got, want)
	}
}

// TestAdminNamedTokens rotates the admin token with no downtime as
// docs/admin.md's Tokens says, its block as written, through a real Caddy,
// a real redis-server and the CLI's own process: two named tokens work at
// once, each call's events carry its token's name as by (the gateway's own
// events none), and once the config keeps only the new token the old one
// gets 401.
func TestAdminNamedTokens(t *testing.T) {
	const old, rotated = "s3cret", "n3w-t0ken"
	t.Setenv("CREDITS_ADMIN_TOKEN", old)
	t.Setenv("CREDITS_BILLING_TOKEN", rotated)
	g := startGateway(t, gatewayOptions{})
	block := readmeBlock(t, "../docs/admin.md", "### Tokens", "caddyfile")
	const admin = "credits_admin {\n\t\t\ttoken s3cret\n\t\t}"
	both := strings.Replace(g.config, admin, block, 1)
	if both == g.config || !strings.Contains(block, "token ops {env.CREDITS_ADMIN_TOKEN}\n") {
		t.Fatalf("the gateway's Caddyfile has no %q to replace, or the docs' block changed:\n%s", admin, block)
	}
	reloadCaddyfile(t, both)
	// The old config's servers closed their connections.
	g.client.CloseIdleConnections()
	with := func(token, method, path, body string) reply {
		return g.do(method, g.adminURL+path, map[string]string{"Authorization": "Bearer " + token}, body)
	}

	wantStatus(t, g.call("/rich-text/x", "rot"), http.StatusOK)
	wantStatus(t, with(old, http.MethodPost, "/orgs/rot/topup", `{"amount": 5, "reference": "t1"}`), http.StatusOK)
	wantStatus(t, with(rotated, http.MethodPost, "/orgs/rot/grants", `{"amount": 3, "reference": "g1"}`), http.StatusCreated)
	out, err := runCaddyEnv(t, []string{"CREDITS_ADMIN_TOKEN=" + rotated},
		"credits", "--endpoint", g.adminURL, "adjust", "rot", "--reason", "goodwill", "--reference", "a1", "--", "-2")
	if err != nil {
		t.Fatalf("the CLI with the second token: %v\n%s", err, out)
	}

	r := with(rotated, http.MethodGet, "/orgs/rot/events", "")
	wantStatus(t, r, http.StatusOK)
	var events struct {
		Events []struct {
			Kind, Ref string
			By        *string
		}
	}
	decodeJSON(t, r.body, &events)
	got := map[string]string{}
	for _, e := range events.Events {
		by := "(none)"
		if e.By != nil {
			by = *e.By
		}
		got[e.Kind+" "+e.Ref] = by
	}
	if len(got) != 5 || got["topup t1"] != "ops" || got["grant g1"] != "billing" || got["adjust a1"] != "billing" ||
		got["grant default-plan"] != "(none)" {
		t.Fatalf("events' by: %v", got)
	}
	for k, by := range got {
		if strings.HasPrefix(k, "charge ") && by != "(none)" {
			t.Fatalf("a charge carries by %q", by)
		}
	}

	// The rotation's end: only the new token is kept.
	reloadCaddyfile(t, strings.Replace(both, "token ops {env.CREDITS_ADMIN_TOKEN}\n", "", 1))
	g.client.CloseIdleConnections()
	r = with(old, http.MethodPost, "/orgs/rot/topup", `{"amount": 5, "reference": "t2"}`)
	wantStatus(t, r, http.StatusUnauthorized)
	r.problem(t)
	wantStatus(t, with(rotated, http.MethodGet, "/orgs/rot", ""), http.StatusOK)
	if n := len(g.eventsWith(rotated, "rot")); n != 5 {
		t.Fatalf("%d events after the refused top-up, want 5", n)
	}
}

// eventsWith lists an org's events through the admin API with token.
func (g *gateway) eventsWith(token, org string) []map[string]any {
	g.t.Helper()
	r := g.do(http.MethodGet, g.adminURL+"/orgs/"+org+"/events", map[string]string{"Authorization": "Bearer " + token}, "")
	wantStatus(g.t, r, http.StatusOK)
	var v struct{ Events []map[string]any }
	decodeJSON(g.t, r.body, &v)
	return v.Events
}

// reloadCaddyfile loads cfg into the Caddy that loadCaddyfile started, as
// caddy reload does.
func reloadCaddyfile(t *testing.T, cfg string) {
	t.Helper()
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err != nil {
		t.Fatalf("adapting the Caddyfile: %v\n%s", err, cfg)
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatalf("reloading the config: %v", err)
	}
}
