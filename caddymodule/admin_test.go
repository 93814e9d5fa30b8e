package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/internal/redistest"
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
	for _, path := range []string{"/orgs", "/orgs/m", "/orgs/m/events", "/orgs/m/holds"} {
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
