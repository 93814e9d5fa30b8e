package caddymodule

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// eventually polls cond until it holds, failing the test after a deadline.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestStoreDown checks the two fail modes with the redis-server killed, and
// that the charges come out exact once it is back.
func TestStoreDown(t *testing.T) {
	g := startGateway(t, gatewayOptions{redis: redistest.Options{AppendOnly: true}, site: "handle /metrics {\n\t\tmetrics\n\t}"})
	wantStatus(t, g.call("/rich-text/generate", "down"), http.StatusOK)
	wantStatus(t, g.call("/image-studio/x", "down"), http.StatusOK) // cost 2
	if b := g.balance("down"); b != 2 {
		t.Fatalf("balance %d", b)
	}

	g.redis.Kill(t)
	before := g.upstream.calls.Load()
	start := time.Now()
	r := g.call("/rich-text/generate", "down")
	elapsed := time.Since(start)
	wantStatus(t, r, http.StatusServiceUnavailable)
	wantHeaders(t, r, map[string]string{"Retry-After": "1", "Credits-Remaining": "", "Credits-Charged": ""})
	r.problem(t)
	if elapsed > 2*time.Second {
		t.Fatalf("fail closed answered after %s with a 300ms timeout", elapsed)
	}
	if g.upstream.calls.Load() != before {
		t.Fatal("a fail-closed call reached the upstream")
	}

	// Fail open: forwarded, no Credits-Remaining, charged later.
	for range 2 {
		r = g.call("/image-studio/x", "down")
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "", "Credits-Charged": ""})
	}
	// The default fail mode of an overdraft route is open too.
	r = g.call("/templates/run", "down")
	wantStatus(t, r, http.StatusOK)
	if g.upstream.calls.Load() != before+3 {
		t.Fatalf("upstream calls %d, want %d", g.upstream.calls.Load(), before+3)
	}

	g.redis.Restart(t)
	// 2 - 2*2 (image-studio) - 1 (templates) = -3, as overdraft: the calls happened.
	eventually(t, "the backlog is applied", func() bool {
		r := g.admin(http.MethodGet, "/orgs/down", "")
		return r.status == http.StatusOK && strings.Contains(string(r.body), `"balance":-3,`)
	})

	resp, err := http.Get(g.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	metrics, _ := io.ReadAll(resp.Body)
	for _, want := range []string{
		`caddy_credits_unmetered_total 3`,
		`caddy_credits_requests_total{feature="rich-text",outcome="unavailable"} 1`,
		`caddy_credits_requests_total{feature="rich-text",outcome="forwarded"} 1`,
		`caddy_credits_charged_total{feature="image-studio"} 6`,
		`caddy_credits_store_duration_seconds_count`,
		`caddy_credits_store_errors_total`,
	} {
		if !strings.Contains(string(metrics), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if strings.Contains(string(metrics), `org=`) {
		t.Error("a metric has an org label")
	}
}
