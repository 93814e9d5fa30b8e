package caddymodule

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
)

// FuzzAdminAPI sends arbitrary methods, paths and bodies to the admin API:
// it never panics, always answers JSON with a status of the contract, and
// an answer other than 200 or 201 changes nothing in the store.
func FuzzAdminAPI(f *testing.F) {
	mini := miniredis.RunT(f)
	rdb := redis.NewClient(&redis.Options{Addr: mini.Addr(), MaxRetries: -1})
	f.Cleanup(func() { rdb.Close() })
	ledger, err := meter.New(rdb, meter.Config{DefaultPlan: meter.Plan{Allowance: 10, RechargeMonth: 1}})
	if err != nil {
		f.Fatal(err)
	}
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		f.Fatal(err)
	}
	outbox := meter.NewOutbox(100, zap.NewNop(), nil, nil)
	f.Cleanup(func() { outbox.Close(0) })
	admin := &Admin{app: &App{ledger: ledger, metrics: m, store: &store{rdb: rdb, outbox: outbox}}, logger: zap.NewNop()}
	if _, _, err := ledger.SetPlan(f.Context(), "acme", meter.Plan{Allowance: 100, RechargeMonth: 3}, ""); err != nil {
		f.Fatal(err)
	}

	methods := []string{http.MethodGet, http.MethodPut, http.MethodPost, http.MethodDelete, http.MethodHead, "PATCH"}
	for _, seed := range []struct {
		method     uint8
		path, body string
	}{
		{0, "/orgs/acme", ""},
		{0, "/", ""},
		{1, "/orgs/acme/plan", `{"allowance": 5, "recharge_month": 13}`},
		{2, "/orgs/acme/topup", `{"amount": -1}`},
		{2, "/orgs/acme/topup", `{"amount": 1, "reference": "x", "extra": 1}`},
		{2, "/orgs/acme/recharge", `[]`},
		{0, "/orgs/acme/events?limit=0", ""},
		{0, "/orgs?limit=2&after=acme", ""},
		{0, "/orgs?limit=-1&after=a%2Fb", ""},
		{2, "/orgs/acme/holds", `{"amount": 5, "feature": "flows", "ttl": "1m"}`},
		{2, "/orgs/acme/holds", `{"amount": 500, "feature": "flows"}`},
		{2, "/orgs/acme/holds/nope/capture", `{"amount": 1}`},
		{3, "/orgs/acme/holds/nope", ""},
		{0, "/orgs/acme/holds", ""},
		{1, "/orgs/a%20b/plan", `{"allowance": 1, "recharge_month": 1}`},
	} {
		f.Add(seed.method, seed.path, seed.body)
	}
	f.Fuzz(func(t *testing.T, method uint8, path, body string) {
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		req, err := http.NewRequestWithContext(t.Context(), methods[int(method)%len(methods)], "http://admin"+path, strings.NewReader(body))
		if err != nil {
			return // not a request a client could send
		}
		before := mini.Dump()
		rec := httptest.NewRecorder()
		if err := admin.ServeHTTP(rec, req, nil); err != nil {
			t.Fatalf("ServeHTTP: %v", err)
		}
		if (req.Method == http.MethodGet || req.Method == http.MethodHead) && consoleFiles[req.URL.Path] != nil {
			// The console's page and assets, not the API.
			if rec.Code != http.StatusOK || mini.Dump() != before {
				t.Fatalf("%s %s: console answered %d", req.Method, path, rec.Code)
			}
			return
		}
		switch rec.Code {
		case http.StatusOK, http.StatusCreated, http.StatusBadRequest, http.StatusPaymentRequired, http.StatusNotFound,
			http.StatusMethodNotAllowed, http.StatusConflict:
		default:
			t.Fatalf("%s %s %q: status %d", req.Method, path, body, rec.Code)
		}
		if req.Method != http.MethodHead && !json.Valid(rec.Body.Bytes()) {
			t.Fatalf("%s %s %q: body is not JSON: %q", req.Method, path, body, rec.Body.String())
		}
		if rec.Code != http.StatusOK && rec.Code != http.StatusCreated && mini.Dump() != before {
			t.Fatalf("%s %s %q answered %d and changed the store", req.Method, path, body, rec.Code)
		}
	})
}
