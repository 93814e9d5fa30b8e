package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/faultproxy"
	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/meter"
)

// adminState is what an org's account, holds, grants and events read
// through the admin API, to tell whether a call changed anything.
func adminState(g *gateway, org string) string {
	g.t.Helper()
	var b strings.Builder
	for _, path := range []string{"", "/holds", "/grants", "/events?limit=1000"} {
		r := g.admin(http.MethodGet, "/orgs/"+org+path, "")
		wantStatus(g.t, r, http.StatusOK)
		b.Write(r.body)
	}
	return b.String()
}

// TestAdminExactJSON sends every write route a field named with another
// case, a key given twice, and a key given twice in a nested object: each
// is a 400 problem that names the field, and changes nothing.
func TestAdminExactJSON(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	wantStatus(t, g.admin(http.MethodPost, "/orgs/acme/topup", `{"amount": 1000, "reference": "start"}`), http.StatusOK)
	r := g.admin(http.MethodPost, "/orgs/acme/holds", `{"amount": 50, "feature": "jobs", "reference": "job-1"}`)
	wantStatus(t, r, http.StatusCreated)
	var hold struct{ Hold string }
	if err := json.Unmarshal(r.body, &hold); err != nil {
		t.Fatal(err)
	}
	// Each route's first field and two values of it, then the rest of a
	// good body.
	routes := []struct{ method, path, field, value, other, rest string }{
		{http.MethodPut, "/plan", "allowance", "100", "200", `, "recharge_month": 1`},
		{http.MethodPost, "/topup", "amount", "5", "6", `, "reference": "t-1"`},
		{http.MethodPost, "/recharge", "reference", `"rc-1"`, `"rc-2"`, ``},
		{http.MethodPost, "/adjust", "amount", "5", "6", `, "reason": "fix", "reference": "a-1"`},
		{http.MethodPost, "/holds", "amount", "5", "6", `, "feature": "jobs", "reference": "h-1"`},
		{http.MethodPost, "/holds/" + hold.Hold + "/capture", "amount", "5", "6", ``},
		{http.MethodPost, "/grants", "amount", "5", "6", `, "reference": "gr-1"`},
		{http.MethodPost, "/grants", "expires", `"2999-01-01T00:00:00Z"`, `"2998-01-01T00:00:00Z"`, `, "amount": 5, "reference": "gr-2"`},
		{http.MethodPost, "/topup", "expires", `"2999-01-01T00:00:00Z"`, `"2998-01-01T00:00:00Z"`, `, "amount": 5, "reference": "t-2"`},
		{http.MethodPut, "/plan", "rollover", "1", "2", `, "allowance": 100, "recharge_month": 1`},
	}
	wantStatus(t, g.admin(http.MethodPost, "/orgs/acme/grants", `{"amount": 7, "reference": "gr-0"}`), http.StatusCreated)
	before := adminState(g, "acme")
	for _, rt := range routes {
		upper := strings.ToUpper(rt.field[:1]) + rt.field[1:]
		bodies := []struct{ body, want string }{
			{fmt.Sprintf(`{"%s": %s%s}`, upper, rt.value, rt.rest), fmt.Sprintf(`unknown field \"%s\"`, upper)},
			{fmt.Sprintf(`{"%s": %s, "%s": %s%s}`, rt.field, rt.value, rt.field, rt.other, rt.rest), fmt.Sprintf(`field \"%s\" given twice`, rt.field)},
			{fmt.Sprintf(`{"%s": {"n": 1, "n": 2}%s}`, rt.field, rt.rest), `field \"n\" given twice`},
			{fmt.Sprintf(`{"%s": [{"n": 1, "n": 2}]%s}`, rt.field, rt.rest), `field \"n\" given twice`},
		}
		for _, b := range bodies {
			r := g.admin(rt.method, "/orgs/acme"+rt.path, b.body)
			if r.status != http.StatusBadRequest || !bytes.Contains(r.body, []byte(b.want)) {
				t.Errorf("%s %s %s: %d %s; want 400 naming %s", rt.method, rt.path, b.body, r.status, r.body, b.want)
				continue
			}
			r.problem(t)
		}
	}
	r = g.admin(http.MethodDelete, "/orgs/acme/holds/"+hold.Hold, `{"Reason": "x"}`)
	if r.status != http.StatusBadRequest || !bytes.Contains(r.body, []byte(`unknown field \"Reason\"`)) {
		t.Errorf("release with an unknown field: %d %s", r.status, r.body)
	}
	for _, body := range []string{`{"Reason": "x"}`, `{"reason": "x", "reason": "y"}`, `{"reason": "x", "amount": 1}`} {
		r = g.admin(http.MethodDelete, "/orgs/acme/grants/g1", body)
		if r.status != http.StatusBadRequest {
			t.Errorf("a grant's void with %s: %d %s; want 400", body, r.status, r.body)
		}
	}
	if after := adminState(g, "acme"); after != before {
		t.Errorf("refused calls changed the org:\nbefore %s\nafter  %s", before, after)
	}
	// The names the routes take, exactly, still work.
	wantStatus(t, g.admin(http.MethodPost, "/orgs/acme/topup", `{"amount": 5, "reference": "t-1"}`), http.StatusOK)
}

// TestAdminWriteReferences checks that a plan and a recharge take a
// reference, in the body or as an Idempotency-Key, and that a repeat
// answers the account again, marked as a replay, and applies nothing.
func TestAdminWriteReferences(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	r := g.admin(http.MethodPut, "/orgs/acme/plan", `{"allowance": 100, "recharge_month": 1, "reference": "plan-1"}`)
	wantStatus(t, r, http.StatusOK)
	if r.header.Get(headerReplayed) != "" {
		t.Fatalf("a first plan marked as a replay")
	}
	r = g.admin(http.MethodPut, "/orgs/acme/plan", `{"allowance": 7, "recharge_month": 3, "reference": "plan-1"}`)
	wantStatus(t, r, http.StatusOK)
	if r.header.Get(headerReplayed) != "true" {
		t.Fatalf("a repeated plan not marked as a replay")
	}
	if p := g.account("acme")["plan"].(map[string]any); p["allowance"] != float64(100) {
		t.Fatalf("a repeated plan reference applied again: %v", p)
	}
	for range 3 {
		wantStatus(t, g.call("/rich-text/generate", "acme"), http.StatusOK)
	}
	key := map[string]string{"Authorization": "Bearer s3cret", "Idempotency-Key": "rc-1"}
	for i, want := range []string{"", "true", "true"} {
		r := g.do(http.MethodPost, g.adminURL+"/orgs/acme/recharge", key, "")
		wantStatus(t, r, http.StatusOK)
		if r.header.Get(headerReplayed) != want {
			t.Fatalf("recharge %d: Idempotent-Replayed %q, want %q", i, r.header.Get(headerReplayed), want)
		}
	}
	wantStatus(t, g.call("/rich-text/generate", "acme"), http.StatusOK)
	if b := g.balance("acme"); b != 99 {
		t.Fatalf("balance %d, want 99: one recharge, then one call", b)
	}
	if n := countEvents(t, g, "acme", "recharge"); n != 1 {
		t.Fatalf("%d recharge events, want 1", n)
	}
}

// countEvents counts an org's events of kind.
func countEvents(t *testing.T, g *gateway, org, kind string) int {
	t.Helper()
	r := g.admin(http.MethodGet, "/orgs/"+org+"/events?limit=1000", "")
	wantStatus(t, r, http.StatusOK)
	var v struct{ Events []struct{ Kind, Ref string } }
	if err := json.Unmarshal(r.body, &v); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range v.Events {
		if e.Kind == kind && e.Ref != "start" {
			n++
		}
	}
	return n
}

// TestAdminUnknownOutcome stalls Redis (2s behind a proxy, with a 200ms
// timeout) under each kind of admin write, with and without a reference of
// the caller's. Each answers 503, and each write reaches Redis after its
// answer. With a reference, the 503 says the outcome is unknown, and the
// same write sent again once the store answers applies exactly once. Without
// one, the 503 says it was not applied, and once the store answers the
// gateway's void leaves the account as it was.
func TestAdminUnknownOutcome(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	proxy := faultproxy.Start(t, srv.Addr)
	g := startGateway(t, gatewayOptions{store: "redis redis://" + proxy.Addr, timeout: "200ms"})
	g.redis = srv
	rdb := srv.Client(t)
	// Each script is loaded into Redis first: a stalled EVALSHA of one that
	// is not would be answered NOSCRIPT once its caller is gone, and never
	// sent as EVAL.
	for _, w := range [][3]string{
		{http.MethodPost, "/topup", `{"amount": 1000}`},
		{http.MethodPost, "/holds", `{"amount": 1, "feature": "jobs", "reference": "w"}`},
		{http.MethodPost, "/holds/" + meter.HoldID("w") + "/capture", `{"amount": 1}`},
		{http.MethodPost, "/adjust", `{"amount": 1, "reason": "warm", "reference": "w"}`},
		{http.MethodPut, "/plan", `{"allowance": 5, "recharge_month": 1}`},
		{http.MethodPost, "/recharge", ``},
		{http.MethodPost, "/grants", `{"amount": 1, "reference": "w"}`},
		{http.MethodDelete, "/grants/g1", ``},
		{http.MethodPost, "/topup", `{"amount": 1, "expires": "2999-01-01T00:00:00Z"}`},
	} {
		if r := g.admin(w[0], "/orgs/warm"+w[1], w[2]); r.status >= 300 {
			t.Fatalf("%s %s: %d %s", w[0], w[1], r.status, r.body)
		}
	}

	type write struct {
		kind         string // the event it writes
		method, path string
		body         string
		ref          string // the caller's reference; "" for none
		header       map[string]string
	}
	cases := []write{
		{"topup", http.MethodPost, "/topup", `{"amount": 50, "reference": "inv-1"}`, "inv-1", nil},
		{"topup", http.MethodPost, "/topup", `{"amount": 50}`, "", nil},
		{"hold", http.MethodPost, "/holds", `{"amount": 300, "feature": "jobs", "reference": "job-9"}`, "job-9", nil},
		{"hold", http.MethodPost, "/holds", `{"amount": 300, "feature": "jobs"}`, "", nil},
		{"capture", http.MethodPost, "/holds/{hold}/capture", `{"amount": 120}`, "{hold}", nil},
		{"adjust", http.MethodPost, "/adjust", `{"amount": -40, "reason": "refund of a dispute"}`, "adj-1", map[string]string{"Idempotency-Key": "adj-1"}},
		{"plan", http.MethodPut, "/plan", `{"allowance": 100, "recharge_month": 1, "reference": "plan-9"}`, "plan-9", nil},
		{"plan", http.MethodPut, "/plan", `{"allowance": 100, "recharge_month": 1}`, "", nil},
		{"recharge", http.MethodPost, "/recharge", ``, "rc-9", map[string]string{"Idempotency-Key": "rc-9"}},
		{"recharge", http.MethodPost, "/recharge", ``, "", nil},
		{"grant", http.MethodPost, "/grants", `{"amount": 50, "expires": "2999-01-01T00:00:00Z", "reference": "promo-9"}`, "promo-9", nil},
		{"grant", http.MethodPost, "/grants", `{"amount": 50, "priority": 0}`, "", nil},
		{"grant", http.MethodPost, "/grants", `{"amount": 50, "reason": "promo"}`, "promo-10", map[string]string{"Idempotency-Key": "promo-10"}},
		{"topup", http.MethodPost, "/topup", `{"amount": 50, "expires": "2999-01-01T00:00:00Z"}`, "", nil},
	}
	for i, c := range cases {
		own := "caller's reference"
		if c.ref == "" {
			own = "no reference"
		}
		t.Run(c.kind+", "+own, func(t *testing.T) {
			g.t = t
			org := fmt.Sprintf("stall-%d", i)
			wantStatus(t, g.admin(http.MethodPost, "/orgs/"+org+"/topup", `{"amount": 1000, "reference": "start"}`), http.StatusOK)
			wantStatus(t, g.call("/rich-text/generate", org), http.StatusOK)
			path := c.path
			if strings.Contains(path, "{hold}") {
				r := g.admin(http.MethodPost, "/orgs/"+org+"/holds", `{"amount": 300, "feature": "jobs", "reference": "job-1"}`)
				wantStatus(t, r, http.StatusCreated)
				var h struct{ Hold string }
				if err := json.Unmarshal(r.body, &h); err != nil {
					t.Fatal(err)
				}
				path = strings.ReplaceAll(path, "{hold}", h.Hold)
			}
			before := g.account(org)
			events, stored := countEvents(t, g, org, c.kind), eventsOf(t, rdb, org, c.kind)
			header := map[string]string{"Authorization": "Bearer s3cret"}
			for k, v := range c.header {
				header[k] = v
			}
			send := func() reply { return g.do(c.method, g.adminURL+"/orgs/"+org+path, header, c.body) }

			proxy.SetLatency(2 * time.Second)
			defer proxy.SetLatency(0)
			r := send()
			wantStatus(t, r, http.StatusServiceUnavailable)
			if r.header.Get("Retry-After") == "" {
				t.Errorf("a 503 without Retry-After")
			}
			detail, _ := r.problem(t)["detail"].(string)
			switch {
			case c.kind == "capture":
				if !strings.Contains(detail, "is unknown") || !strings.Contains(detail, "a hold ends once") {
					t.Errorf("detail %q: want the outcome unknown, and a hold ends once", detail)
				}
			case c.ref != "":
				if !strings.Contains(detail, "is unknown") || !strings.Contains(detail, fmt.Sprintf("%q", c.ref)) || !strings.Contains(detail, "exactly once") {
					t.Errorf("detail %q: want the outcome unknown, the reference, and that a retry applies exactly once", detail)
				}
			default:
				if !strings.Contains(detail, "was not applied") || !strings.Contains(detail, "never applies later") {
					t.Errorf("detail %q: want not applied, never later", detail)
				}
			}
			// The write reaches Redis after its 503.
			eventually(t, "the stalled "+c.kind+" reaches Redis", func() bool { return eventsOf(t, rdb, org, c.kind) > stored })
			proxy.SetLatency(0)
			drained(t)

			if c.ref == "" {
				if after := g.account(org); !reflect.DeepEqual(after, before) {
					t.Errorf("a %s without a reference stands after its 503:\nbefore %v\nafter  %v", c.kind, before, after)
				}
				return
			}
			r = send()
			if r.status != http.StatusOK && r.status != http.StatusCreated || r.header.Get(headerReplayed) != "true" {
				t.Fatalf("the same %s sent again: %d %s %q; want 200, a replay", c.kind, r.status, r.body, r.header.Get(headerReplayed))
			}
			if n := countEvents(t, g, org, c.kind) - events; n != 1 {
				t.Errorf("%d %s events, want 1: applied exactly once", n, c.kind)
			}
			after := g.account(org)
			b := func(a map[string]any, k string) int64 { return int64(a[k].(float64)) }
			want := map[string][2]int64{ // balance, held: the change
				"topup": {50, 0}, "grant": {50, 0}, "hold": {0, 300}, "capture": {-120, -300}, "adjust": {-40, 0}, "plan": {96, 0}, "recharge": {1, 0},
			}[c.kind]
			if b(after, "balance")-b(before, "balance") != want[0] || b(after, "held")-b(before, "held") != want[1] {
				t.Errorf("balance %d, held %d; before %d, %d; want a change of %v", b(after, "balance"), b(after, "held"), b(before, "balance"), b(before, "held"), want)
			}
		})
	}
}

// eventsOf counts an org's account events of kind, read from Redis
// itself, other than a top-up of reference "start".
func eventsOf(t *testing.T, rdb *redis.Client, org, kind string) int {
	t.Helper()
	lines, err := rdb.LRange(t.Context(), "credits:{"+org+"}:e", 0, -1).Result()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range lines {
		// A kind is followed by @<by> for an admin token's call.
		if f := strings.Fields(l); len(f) > 5 && strings.Split(f[1], "@")[0] == kind && f[5] != "start" {
			n++
		}
	}
	return n
}
