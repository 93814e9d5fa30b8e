package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

// TestHoldsAPI checks every holds call of the admin API and its errors
// through a real Caddy and a real redis-server: a hold, its repeat, the 402
// of a short balance, Idempotency-Key as the reference, capture and its
// repeat, the capture of an expired hold, release, the 409s and 404s, the
// 500 of ledger data of the wrong type, and bad input, which changes nothing.
func TestHoldsAPI(t *testing.T) {
	g := startGateway(t, gatewayOptions{})

	t.Run("create, repeat, list, capture, release", func(t *testing.T) {
		g.t = t
		wantStatus(t, g.admin(http.MethodPut, "/orgs/job/plan", `{"allowance": 100, "recharge_month": 1}`), http.StatusOK)
		r := g.admin(http.MethodPost, "/orgs/job/holds", `{"amount": 30, "feature": "long-job", "ttl": "10m", "reference": "job-1"}`)
		wantStatus(t, r, http.StatusCreated)
		wantHeaders(t, r, map[string]string{"Content-Type": "application/json", headerReplayed: ""})
		created := decodeObject(t, r)
		id := meter.HoldID("job-1")
		if created["hold"] != id || created["state"] != "held" || created["amount"] != float64(30) || created["feature"] != "long-job" {
			t.Fatalf("new hold %v, want hold %s held 30 long-job", created, id)
		}
		expires, err := time.Parse(time.RFC3339, created["expires"].(string))
		if err != nil || time.Until(expires) < 9*time.Minute || time.Until(expires) > 11*time.Minute {
			t.Fatalf("a 10m hold expires %v (%v)", created["expires"], err)
		}
		wantAccount(t, created["account"], map[string]int64{"balance": 100, "held": 30, "available": 70, "allowance_remaining": 100})

		// The same reference again: the same hold, held once.
		r = g.admin(http.MethodPost, "/orgs/job/holds", `{"amount": 30, "feature": "long-job", "ttl": "10m", "reference": "job-1"}`)
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{headerReplayed: "true"})
		repeat := decodeObject(t, r)
		if repeat["hold"] != id || repeat["expires"] != created["expires"] || repeat["state"] != "held" {
			t.Fatalf("repeated hold %v, want %v", repeat, created)
		}
		wantAccount(t, repeat["account"], map[string]int64{"balance": 100, "held": 30, "available": 70})
		wantAccount(t, g.account("job"), map[string]int64{"balance": 100, "held": 30, "available": 70})
		if holds := g.holds("job"); len(holds) != 1 || holds[0]["hold"] != id || holds[0]["state"] != "held" || holds[0]["amount"] != float64(30) {
			t.Fatalf("holds %v", holds)
		}

		// Capture 12 of the 30: 12 charged, 18 back; a repeat charges nothing.
		for i, body := range []string{`{"amount": 12}`, `{"amount": 12}`, `{"amount": 20}`} {
			r = g.admin(http.MethodPost, "/orgs/job/holds/"+id+"/capture", body)
			wantStatus(t, r, http.StatusOK)
			replayed := ""
			if i > 0 {
				replayed = "true"
			}
			wantHeaders(t, r, map[string]string{headerReplayed: replayed})
			captured := decodeObject(t, r)
			wantAccount(t, captured, map[string]int64{"balance": 88, "held": 0, "available": 88})
			if used := captured["used"].(map[string]any); used["long-job"] != float64(12) {
				t.Fatalf("capture %d: used %v", i+1, used)
			}
			if h := captured["hold"].(map[string]any); h["hold"] != id || h["state"] != "captured" || h["captured"] != float64(12) || h["amount"] != float64(0) {
				t.Fatalf("capture %d: hold %v", i+1, h)
			}
		}

		// A captured hold cannot be released.
		before := g.ledgerState("job")
		r = g.admin(http.MethodDelete, "/orgs/job/holds/"+id, "")
		wantStatus(t, r, http.StatusConflict)
		if p := r.problem(t); !strings.Contains(p["detail"].(string), "was captured") {
			t.Fatalf("409 of a release: %v", p)
		}
		if after := g.ledgerState("job"); after != before {
			t.Fatalf("a refused release changed the ledger:\n%s\n%s", before, after)
		}

		// Release a second hold; its repeat answers the same; it cannot be
		// captured.
		r = g.admin(http.MethodPost, "/orgs/job/holds", `{"amount": 50, "feature": "long-job", "reference": "job-2"}`)
		wantStatus(t, r, http.StatusCreated)
		second := decodeObject(t, r)
		if expires, _ := time.Parse(time.RFC3339, second["expires"].(string)); time.Until(expires) < 14*time.Minute || time.Until(expires) > 16*time.Minute {
			t.Fatalf("a hold without ttl expires %v, want in 15m", second["expires"])
		}
		wantAccount(t, second["account"], map[string]int64{"balance": 88, "held": 50, "available": 38})
		id2 := second["hold"].(string)
		for i := range 2 {
			r = g.admin(http.MethodDelete, "/orgs/job/holds/"+id2, "")
			wantStatus(t, r, http.StatusOK)
			released := decodeObject(t, r)
			wantAccount(t, released, map[string]int64{"balance": 88, "held": 0, "available": 88})
			if h := released["hold"].(map[string]any); h["hold"] != id2 || h["state"] != "released" || h["amount"] != float64(0) {
				t.Fatalf("release %d: hold %v", i+1, h)
			}
			if (r.header.Get(headerReplayed) == "true") != (i == 1) {
				t.Fatalf("release %d: %s %q", i+1, headerReplayed, r.header.Get(headerReplayed))
			}
		}
		before = g.ledgerState("job")
		r = g.admin(http.MethodPost, "/orgs/job/holds/"+id2+"/capture", `{"amount": 1}`)
		wantStatus(t, r, http.StatusConflict)
		if p := r.problem(t); !strings.Contains(p["detail"].(string), "was released") {
			t.Fatalf("409 of a capture: %v", p)
		}
		if after := g.ledgerState("job"); after != before {
			t.Fatalf("a refused capture changed the ledger:\n%s\n%s", before, after)
		}

		holds := g.holds("job")
		if len(holds) != 2 {
			t.Fatalf("holds after capture and release: %v", holds)
		}
		events := g.events("job")
		var kinds []string
		for _, e := range events[:4] {
			kinds = append(kinds, fmt.Sprint(e["kind"], " ", e["ref"], " ", e["delta"]))
		}
		want := []string{"release hold:" + id2 + " 0", "hold hold:" + id2 + " 0", "capture hold:" + id + " -12", "hold hold:" + id + " 0"}
		if fmt.Sprint(kinds) != fmt.Sprint(want) {
			t.Fatalf("events %v, want %v", kinds, want)
		}
	})

	t.Run("402 when the available balance is short", func(t *testing.T) {
		g.t = t
		wantStatus(t, g.admin(http.MethodPut, "/orgs/short/plan", `{"allowance": 10, "recharge_month": 1}`), http.StatusOK)
		wantStatus(t, g.admin(http.MethodPost, "/orgs/short/holds", `{"amount": 8, "feature": "long-job", "reference": "s-1"}`), http.StatusCreated)
		before := g.ledgerState("short")
		r := g.admin(http.MethodPost, "/orgs/short/holds", `{"amount": 5, "feature": "long-job", "reference": "s-2"}`)
		wantStatus(t, r, http.StatusPaymentRequired)
		p := r.problem(t)
		if p["type"] != policy.TypeInsufficientCredits || p["org"] != "short" || p["feature"] != "long-job" ||
			p["balance"] != float64(10) || p["cost"] != float64(5) || p["topup_url"] != "https://billing.example/topup" {
			t.Fatalf("402 problem %v", p)
		}
		if d := p["detail"].(string); !strings.Contains(d, "2 credits available") || !strings.Contains(d, "held 8") || !strings.Contains(d, "needs 5") {
			t.Fatalf("402 detail %q", d)
		}
		if after := g.ledgerState("short"); after != before {
			t.Fatalf("a refused hold changed the ledger:\n%s\n%s", before, after)
		}
		// What is available can still be held.
		r = g.admin(http.MethodPost, "/orgs/short/holds", `{"amount": 2, "feature": "long-job", "reference": "s-3"}`)
		wantStatus(t, r, http.StatusCreated)
		wantAccount(t, decodeObject(t, r)["account"], map[string]int64{"balance": 10, "held": 10, "available": 0})
	})

	t.Run("Idempotency-Key as the reference", func(t *testing.T) {
		g.t = t
		wantStatus(t, g.admin(http.MethodPut, "/orgs/idem/plan", `{"allowance": 40, "recharge_month": 1}`), http.StatusOK)
		key := map[string]string{"Idempotency-Key": "job-key-1"}
		for i := range 2 {
			r := g.adminWith(http.MethodPost, "/orgs/idem/holds", `{"amount": 6, "feature": "long-job"}`, key)
			wantStatus(t, r, []int{http.StatusCreated, http.StatusOK}[i])
			h := decodeObject(t, r)
			if h["hold"] != meter.HoldID("job-key-1") {
				t.Fatalf("hold %d: id %v, want the Idempotency-Key's %s", i+1, h["hold"], meter.HoldID("job-key-1"))
			}
			wantAccount(t, h["account"], map[string]int64{"held": 6, "available": 34})
		}
		// A reference in the body comes first.
		r := g.adminWith(http.MethodPost, "/orgs/idem/holds", `{"amount": 4, "feature": "long-job", "reference": "body-ref"}`, key)
		wantStatus(t, r, http.StatusCreated)
		if h := decodeObject(t, r); h["hold"] != meter.HoldID("body-ref") {
			t.Fatalf("hold with a body reference: %v", h["hold"])
		}

		for i := range 2 {
			r := g.adminWith(http.MethodPost, "/orgs/idem/topup", `{"amount": 5}`, map[string]string{"Idempotency-Key": "payment-9"})
			wantStatus(t, r, http.StatusOK)
			wantAccount(t, decodeObject(t, r), map[string]int64{"purchased": 5, "balance": 45})
			if (r.header.Get(headerReplayed) == "true") != (i == 1) {
				t.Fatalf("top-up %d: %s %q", i+1, headerReplayed, r.header.Get(headerReplayed))
			}
		}
		if e := g.events("idem")[0]; e["kind"] != "topup" || e["ref"] != "payment-9" {
			t.Fatalf("top-up event %v, want the Idempotency-Key as its ref", e)
		}

		before := g.ledgerState("idem")
		for _, c := range []struct{ path, body, key string }{
			{"/orgs/idem/holds", `{"amount": 1, "feature": "long-job"}`, "has space"},
			{"/orgs/idem/holds", `{"amount": 1, "feature": "long-job"}`, strings.Repeat("k", 256)},
			{"/orgs/idem/topup", `{"amount": 1}`, "has space"},
		} {
			r := g.adminWith(http.MethodPost, c.path, c.body, map[string]string{"Idempotency-Key": c.key})
			wantStatus(t, r, http.StatusBadRequest)
			if p := r.problem(t); !strings.Contains(p["detail"].(string), "invalid idempotency key") {
				t.Fatalf("bad Idempotency-Key: %v", p)
			}
		}
		if after := g.ledgerState("idem"); after != before {
			t.Fatalf("a bad Idempotency-Key changed the ledger:\n%s\n%s", before, after)
		}
	})

	t.Run("an expired hold's capture is still charged", func(t *testing.T) {
		g.t = t
		wantStatus(t, g.admin(http.MethodPut, "/orgs/exp/plan", `{"allowance": 50, "recharge_month": 1}`), http.StatusOK)
		r := g.admin(http.MethodPost, "/orgs/exp/holds", `{"amount": 20, "feature": "long-job", "ttl": "1s", "reference": "e-1"}`)
		wantStatus(t, r, http.StatusCreated)
		id := decodeObject(t, r)["hold"].(string)
		r = g.admin(http.MethodPost, "/orgs/exp/holds", `{"amount": 5, "feature": "long-job", "ttl": "1s", "reference": "e-2"}`)
		wantStatus(t, r, http.StatusCreated)
		id2 := decodeObject(t, r)["hold"].(string)
		wantAccount(t, g.account("exp"), map[string]int64{"held": 25, "available": 25})

		awaitCondition(t, "both holds expire", func() bool {
			holds := g.holds("exp")
			return len(holds) == 2 && holds[0]["state"] == "expired" && holds[1]["state"] == "expired"
		})
		wantAccount(t, g.account("exp"), map[string]int64{"balance": 50, "held": 0, "available": 50})

		r = g.admin(http.MethodPost, "/orgs/exp/holds/"+id+"/capture", `{"amount": 15}`)
		wantStatus(t, r, http.StatusOK)
		captured := decodeObject(t, r)
		wantAccount(t, captured, map[string]int64{"balance": 35, "held": 0, "available": 35})
		if h := captured["hold"].(map[string]any); h["state"] != "captured" || h["captured"] != float64(15) {
			t.Fatalf("capture of an expired hold: %v", h)
		}
		if e := g.events("exp")[0]; e["kind"] != "capture" || e["ref"] != "hold:"+id+":expired" || e["delta"] != float64(-15) {
			t.Fatalf("the capture event of an expired hold: %v", e)
		}
		// A repeat charges nothing more.
		r = g.admin(http.MethodPost, "/orgs/exp/holds/"+id+"/capture", `{"amount": 15}`)
		wantStatus(t, r, http.StatusOK)
		wantAccount(t, decodeObject(t, r), map[string]int64{"balance": 35})

		// Releasing an expired hold changes nothing, and says so.
		before := g.ledgerState("exp")
		r = g.admin(http.MethodDelete, "/orgs/exp/holds/"+id2, "")
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{headerReplayed: "true"})
		if h := decodeObject(t, r)["hold"].(map[string]any); h["state"] != "expired" {
			t.Fatalf("release of an expired hold: %v", h)
		}
		if after := g.ledgerState("exp"); after != before {
			t.Fatalf("releasing an expired hold changed the ledger:\n%s\n%s", before, after)
		}
	})

	t.Run("404s", func(t *testing.T) {
		g.t = t
		wantStatus(t, g.admin(http.MethodPut, "/orgs/known/plan", `{"allowance": 10, "recharge_month": 1}`), http.StatusOK)
		before := g.ledgerState("known")
		for _, c := range []struct{ method, path, body, detail string }{
			{http.MethodPost, "/orgs/known/holds/nope/capture", `{"amount": 1}`, "org known has no hold nope"},
			{http.MethodDelete, "/orgs/known/holds/nope", ``, "org known has no hold nope"},
			{http.MethodPost, "/orgs/ghost/holds/nope/capture", `{"amount": 1}`, "org ghost has no hold nope"},
			{http.MethodDelete, "/orgs/ghost/holds/nope", ``, "org ghost has no hold nope"},
			{http.MethodGet, "/orgs/ghost/holds", ``, "Redis holds nothing for org ghost"},
		} {
			r := g.admin(c.method, c.path, c.body)
			wantStatus(t, r, http.StatusNotFound)
			if p := r.problem(t); p["detail"] != c.detail {
				t.Fatalf("%s %s: %v, want detail %q", c.method, c.path, p, c.detail)
			}
		}
		if after := g.ledgerState("known"); after != before {
			t.Fatalf("404s changed the ledger:\n%s\n%s", before, after)
		}
		r := g.admin(http.MethodGet, "/orgs/ghost", "")
		wantStatus(t, r, http.StatusNotFound)
		if holds := g.holds("known"); len(holds) != 0 {
			t.Fatalf("holds of an org without any: %v", holds)
		}
	})

	t.Run("ledger data of the wrong type is a 500", func(t *testing.T) {
		g.t = t
		wantStatus(t, g.admin(http.MethodPut, "/orgs/corrupt/plan", `{"allowance": 10, "recharge_month": 1}`), http.StatusOK)
		keys, err := meter.NewKeys("credits")
		if err != nil {
			t.Fatal(err)
		}
		rdb := g.redis.Client(t)
		if err := rdb.Set(t.Context(), keys.Holds("corrupt"), "not a hash", 0).Err(); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct{ method, path, body string }{
			{http.MethodPost, "/orgs/corrupt/holds", `{"amount": 1, "feature": "long-job"}`},
			{http.MethodGet, "/orgs/corrupt/holds", ``},
			{http.MethodPost, "/orgs/corrupt/holds/x/capture", `{"amount": 1}`},
			{http.MethodDelete, "/orgs/corrupt/holds/x", ``},
		} {
			r := g.admin(c.method, c.path, c.body)
			wantStatus(t, r, http.StatusInternalServerError)
			if p := r.problem(t); !strings.Contains(p["detail"].(string), "of the wrong type; nothing was written") || r.header.Get("Retry-After") != "" {
				t.Fatalf("%s %s: %v, Retry-After %q", c.method, c.path, p, r.header.Get("Retry-After"))
			}
		}
		if typ, err := rdb.Type(t.Context(), keys.Holds("corrupt")).Result(); err != nil || typ != "string" {
			t.Fatalf("the corrupt key is now %q (%v)", typ, err)
		}
	})

	t.Run("bad input is a 400 and changes nothing", func(t *testing.T) {
		g.t = t
		wantStatus(t, g.admin(http.MethodPut, "/orgs/strict/plan", `{"allowance": 10, "recharge_month": 1}`), http.StatusOK)
		r := g.admin(http.MethodPost, "/orgs/strict/holds", `{"amount": 3, "feature": "long-job", "ttl": "1h", "reference": "strict-1"}`)
		wantStatus(t, r, http.StatusCreated)
		id := decodeObject(t, r)["hold"].(string)
		hold := "/orgs/strict/holds/" + id
		before := g.ledgerState("strict")
		for _, c := range []struct{ method, path, body, detail string }{
			{http.MethodPost, "/orgs/strict/holds", `not json`, "bad JSON body"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f"} {}`, "more than one value"},
			{http.MethodPost, "/orgs/strict/holds", `[]`, "bad JSON body"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "extra": 1}`, `unknown field "extra"`},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "refrence": "typo"}`, `unknown field "refrence"`},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 0, "feature": "f"}`, "invalid amount \"0\": must be 1 to 1000000000000"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": -1, "feature": "f"}`, "invalid amount \"-1\""},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1000000000001, "feature": "f"}`, "invalid amount \"1000000000001\""},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 99999999999999999999, "feature": "f"}`, "bad JSON body"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1.5, "feature": "f"}`, "bad JSON body"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": "1", "feature": "f"}`, "bad JSON body"},
			{http.MethodPost, "/orgs/strict/holds", `{"feature": "f"}`, "amount and feature are required"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1}`, "amount and feature are required"},
			{http.MethodPost, "/orgs/strict/holds", `{}`, "amount and feature are required"},
			{http.MethodPost, "/orgs/strict/holds", ``, "amount and feature are required"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": ""}`, "invalid feature"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "a b"}`, "invalid feature"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "ttl": "0s"}`, `invalid ttl "0s": must be a duration from 1s to 24h, such as 15m`},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "ttl": "25h"}`, `invalid ttl "25h"`},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "ttl": "abc"}`, `invalid ttl "abc"`},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "ttl": "999ms"}`, `invalid ttl "999ms"`},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "ttl": "-1m"}`, `invalid ttl "-1m"`},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "ttl": ""}`, `invalid ttl ""`},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "ttl": 60}`, "bad JSON body"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "reference": "has space"}`, "invalid reference"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "reference": "` + strings.Repeat("r", 256) + `"}`, "invalid reference"},
			{http.MethodPost, "/orgs/strict/holds", `{"amount": 1, "feature": "f", "reference": "` + strings.Repeat("r", 70000) + `"}`, "body larger than"},
			{http.MethodPost, "/orgs/a%20b/holds", `{"amount": 1, "feature": "f"}`, "invalid org"},
			{http.MethodPost, "/orgs/{strict}/holds", `{"amount": 1, "feature": "f"}`, "invalid org"},
			{http.MethodPost, "/orgs/" + strings.Repeat("x", 65) + "/holds", `{"amount": 1, "feature": "f"}`, "invalid org"},
			{http.MethodGet, "/orgs/a%20b/holds", ``, "invalid org"},
			{http.MethodPost, hold + "/capture", `not json`, "bad JSON body"},
			{http.MethodPost, hold + "/capture", `{}`, "amount is required"},
			{http.MethodPost, hold + "/capture", ``, "amount is required"},
			{http.MethodPost, hold + "/capture", `{"amount": -1}`, "invalid amount \"-1\": must be 0 to 1000000000000"},
			{http.MethodPost, hold + "/capture", `{"amount": 1000000000001}`, "invalid amount \"1000000000001\""},
			{http.MethodPost, hold + "/capture", `{"amount": 1, "extra": true}`, `unknown field "extra"`},
			{http.MethodPost, "/orgs/strict/holds/bad*id/capture", `{"amount": 1}`, "invalid hold"},
			{http.MethodPost, "/orgs/strict/holds/" + strings.Repeat("h", 65) + "/capture", `{"amount": 1}`, "invalid hold"},
			{http.MethodPost, "/orgs/a%20b/holds/" + id + "/capture", `{"amount": 1}`, "invalid org"},
			{http.MethodDelete, hold, `{"now": true}`, `unknown field "now"`},
			{http.MethodDelete, "/orgs/strict/holds/bad*id", ``, "invalid hold"},
			{http.MethodDelete, "/orgs/a%20b/holds/" + id, ``, "invalid org"},
		} {
			r := g.admin(c.method, c.path, c.body)
			if r.status != http.StatusBadRequest {
				t.Fatalf("%s %s %.80s: %d, want 400; %s", c.method, c.path, c.body, r.status, r.body)
			}
			p := r.problem(t)
			if p["type"] != policy.TypeInvalidInput || !strings.Contains(p["detail"].(string), c.detail) {
				t.Errorf("%s %s %.80s: %v, want detail with %q", c.method, c.path, c.body, p, c.detail)
			}
		}
		if after := g.ledgerState("strict"); after != before {
			t.Fatalf("bad input changed the ledger:\n%s\n%s", before, after)
		}
	})
}

// TestHoldsConsole uses the holds of the usage console in Chromium, against
// a real Caddy and redis-server: held and available, a capture and a
// release from the list, and a top-up without a reference, which the
// console gives one.
func TestHoldsConsole(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	wantStatus(t, g.admin(http.MethodPut, "/orgs/acme/plan", `{"allowance": 100, "recharge_month": 1}`), http.StatusOK)
	r := g.admin(http.MethodPost, "/orgs/acme/holds", `{"amount": 30, "feature": "long-job", "ttl": "1h", "reference": "c-1"}`)
	wantStatus(t, r, http.StatusCreated)
	id := decodeObject(t, r)["hold"].(string)
	r = g.admin(http.MethodPost, "/orgs/acme/holds", `{"amount": 20, "feature": "long-job", "ttl": "1h", "reference": "c-2"}`)
	wantStatus(t, r, http.StatusCreated)
	id2 := decodeObject(t, r)["hold"].(string)

	ctx := newBrowser(t)
	pageOpen(t, ctx, g.adminURL+"/", "Credits usage console")
	pageType(t, ctx, "#token", "s3cret")
	pageType(t, ctx, "#org", "acme")
	pageClick(t, ctx, "#show")
	pageWaitText(t, ctx, "#balance", "100")
	pageWaitText(t, ctx, "#held", "50")
	pageWaitText(t, ctx, "#available", "50")
	rows := pageEval[[]string](t, ctx, `[...document.querySelectorAll("#holds tbody tr")].map(tr => tr.dataset.hold + " " + tr.cells[1].textContent + " " + tr.cells[3].textContent)`)
	want := []string{id + " held 30", id2 + " held 20"}
	if id2 < id {
		want[0], want[1] = want[1], want[0]
	}
	if fmt.Sprint(rows) != fmt.Sprint(want) {
		t.Fatalf("holds shown: %v, want %v", rows, want)
	}
	checkAccessibility(t, ctx)

	row := fmt.Sprintf(`#holds tr[data-hold=%q]`, id)
	pageType(t, ctx, row+" .capture-amount", "12")
	pageClick(t, ctx, row+" .capture")
	pageWaitContains(t, ctx, "#holds-status", "Hold "+id+" captured: 12 credits charged")
	pageWaitText(t, ctx, "#balance", "88")
	pageWaitText(t, ctx, "#held", "20")
	pageWaitText(t, ctx, row+" td:nth-child(2)", "captured")
	if n := pageEval[int](t, ctx, `document.querySelectorAll(`+jsQuote(row+" button")+`).length`); n != 0 {
		t.Errorf("a captured hold still has %d buttons", n)
	}

	pageClick(t, ctx, fmt.Sprintf(`#holds tr[data-hold=%q] .release`, id2))
	pageWaitContains(t, ctx, "#holds-status", "Hold "+id2+" released")
	pageWaitText(t, ctx, "#held", "0")
	pageWaitText(t, ctx, "#available", "88")
	wantAccount(t, g.account("acme"), map[string]int64{"balance": 88, "held": 0, "available": 88})

	// A top-up without a reference: the console sends one of its own.
	pageType(t, ctx, "#amount", "7")
	pageClick(t, ctx, "#topup-submit")
	pageWaitContains(t, ctx, "#topup-status", "Added 7 credits to acme")
	pageWaitText(t, ctx, "#available", "95")
	if e := g.events("acme")[0]; e["kind"] != "topup" || !strings.HasPrefix(fmt.Sprint(e["ref"]), "console-") {
		t.Fatalf("the console's top-up event %v: want a console- reference", e)
	}
	if v := pageEval[string](t, ctx, `document.getElementById("reference").value`); v != "" {
		t.Errorf("the reference field after a top-up: %q", v)
	}
}

// adminWith is an admin call with extra headers.
func (g *gateway) adminWith(method, path, body string, header map[string]string) reply {
	g.t.Helper()
	h := map[string]string{"Authorization": "Bearer s3cret"}
	for k, v := range header {
		h[k] = v
	}
	return g.do(method, g.adminURL+path, h, body)
}

// holds lists an org's holds through the admin API.
func (g *gateway) holds(org string) []map[string]any {
	g.t.Helper()
	r := g.admin(http.MethodGet, "/orgs/"+org+"/holds", "")
	wantStatus(g.t, r, http.StatusOK)
	var v struct{ Holds []map[string]any }
	if err := json.Unmarshal(r.body, &v); err != nil || v.Holds == nil {
		g.t.Fatalf("holds of %s: %v %s", org, err, r.body)
	}
	return v.Holds
}

// events lists an org's events, newest first, through the admin API.
func (g *gateway) events(org string) []map[string]any {
	g.t.Helper()
	r := g.admin(http.MethodGet, "/orgs/"+org+"/events?limit=1000", "")
	wantStatus(g.t, r, http.StatusOK)
	var v struct{ Events []map[string]any }
	if err := json.Unmarshal(r.body, &v); err != nil {
		g.t.Fatalf("events of %s: %v %s", org, err, r.body)
	}
	return v.Events
}

// ledgerState is what the admin API answers of an org's account, holds and
// events: what a refused call must leave as it was.
func (g *gateway) ledgerState(org string) string {
	g.t.Helper()
	var b strings.Builder
	for _, p := range []string{"", "/holds", "/events?limit=1000"} {
		r := g.admin(http.MethodGet, "/orgs/"+org+p, "")
		fmt.Fprintf(&b, "%d %s", r.status, r.body)
	}
	return b.String()
}

func decodeObject(t *testing.T, r reply) map[string]any {
	t.Helper()
	var v map[string]any
	if err := json.Unmarshal(r.body, &v); err != nil {
		t.Fatalf("%s: %v", r.body, err)
	}
	return v
}

// wantAccount checks the numbers of an account as the admin API answers it.
func wantAccount(t *testing.T, acct any, want map[string]int64) {
	t.Helper()
	a, ok := acct.(map[string]any)
	if !ok {
		t.Fatalf("not an account: %v", acct)
	}
	for k, v := range want {
		if a[k] != float64(v) {
			t.Errorf("%s %v, want %d, in %v", k, a[k], v, a)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

// awaitCondition polls cond until it holds, and fails the test if it does
// not within 15 seconds.
func awaitCondition(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 15s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
