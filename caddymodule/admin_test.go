package caddymodule

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
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
