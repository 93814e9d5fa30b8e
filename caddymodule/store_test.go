package caddymodule

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// eventually polls cond until it holds, failing the test after a deadline.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	eventuallyWithin(t, 15*time.Second, what, cond)
}

func eventuallyWithin(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
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
		`caddy_credits_store_errors_total`,
	} {
		if !strings.Contains(string(metrics), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// Every store call on the request path is timed: at least the two
	// charges before Redis went down, and the one that failed closed.
	m := regexp.MustCompile(`(?m)^caddy_credits_store_duration_seconds_count (\d+)$`).FindStringSubmatch(string(metrics))
	if m == nil {
		t.Error("metrics lack caddy_credits_store_duration_seconds_count")
	} else if n, _ := strconv.Atoi(m[1]); n < 3 {
		t.Errorf("caddy_credits_store_duration_seconds_count %d, want at least 3", n)
	}
	if strings.Contains(string(metrics), `org=`) {
		t.Error("a metric has an org label")
	}
}

// TestStartupChecks starts the gateway on a Redis that may evict keys and
// persists nothing: both warnings are logged.
func TestStartupChecks(t *testing.T) {
	cases := []struct {
		name  string
		redis redistest.Options
		want  []string
		not   []string
	}{
		{"evicting, not persisting", redistest.Options{Args: []string{"--maxmemory-policy", "allkeys-lru"}},
			[]string{"maxmemory-policy noeviction", `"maxmemory_policy":"allkeys-lru"`, "persistence is off"}, nil},
		{"as production wants it", redistest.Options{AppendOnly: true, Args: []string{"--maxmemory-policy", "noeviction"}},
			nil, []string{"maxmemory-policy noeviction", "persistence is off", "snapshots only"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			logFile := filepath.Join(t.TempDir(), "caddy.log")
			startGateway(t, gatewayOptions{redis: c.redis, options: "log {\n\t\toutput file " + logFile + "\n\t}"})
			// The check runs in the background at start; a call after it
			// has had its chance proves the log is complete.
			eventually(t, "the start-up check is logged", func() bool {
				data, _ := os.ReadFile(logFile)
				return strings.Contains(string(data), "store checked")
			})
			data, _ := os.ReadFile(logFile)
			for _, w := range c.want {
				if !strings.Contains(string(data), w) {
					t.Errorf("the log lacks %q:\n%s", w, data)
				}
			}
			for _, w := range c.not {
				if strings.Contains(string(data), w) {
					t.Errorf("the log has %q:\n%s", w, data)
				}
			}
		})
	}
}

// TestBacklogAcrossReloadAndShutdown queues fail-open charges while Redis is
// down; a config reload keeps them (the store and its backlog are shared by
// the configs that name it) and they are applied once Redis is back. At
// shutdown, what still waits is lost and counted in the log. Leasing is off,
// so that the backlog holds the charges alone (a lease's reports in the
// backlog: TestLeasedReloadDuringRedisStall).
func TestBacklogAcrossReloadAndShutdown(t *testing.T) {
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	opts := gatewayOptions{redis: redistest.Options{AppendOnly: true}, global: "lease off",
		options: "log {\n\t\toutput file " + logFile + "\n\t}"}
	g := startGateway(t, opts)
	wantStatus(t, g.call("/image-studio/x", "kept"), http.StatusOK)

	g.redis.Kill(t)
	for range 3 {
		wantStatus(t, g.call("/image-studio/x", "kept"), http.StatusOK)
	}
	if n := backlogLength(); n != 3 {
		t.Fatalf("%d calls wait in the backlog, want 3", n)
	}
	// Reload: the same store, another setting.
	loadCaddyfile(t, strings.Replace(g.config, "timeout 300ms", "timeout 250ms", 1))
	if n := backlogLength(); n != 3 {
		t.Fatalf("%d calls wait in the backlog after the reload, want 3", n)
	}
	g.redis.Restart(t)
	drained(t)
	if b := g.balance("kept"); b != 5-4*2 {
		t.Fatalf("balance %d, want -3", b)
	}

	// Shutdown with charges still waiting.
	g.redis.Kill(t)
	for range 2 {
		wantStatus(t, g.call("/image-studio/x", "lost"), http.StatusOK)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(logFile)
	if !strings.Contains(string(data), "ledger calls lost at shutdown") || !strings.Contains(string(data), `"count":2`) {
		t.Fatalf("the log does not count the 2 lost charges:\n%s", data)
	}
}

func backlogLength() int64 {
	var n int64
	stores.Range(func(_, v any) bool {
		n += v.(*store).outbox.Waiting()
		return true
	})
	return n
}
