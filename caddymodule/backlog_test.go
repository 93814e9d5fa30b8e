package caddymodule

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/creditsgw/caddy-credits/internal/faultproxy"
	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/meter"
)

// metric reads one sample of the gateway's /metrics (the site must serve
// them): the value of the line that starts with series, 0 when none does.
func (g *gateway) metric(series string) float64 {
	g.t.Helper()
	resp, err := http.Get(g.url + "/metrics")
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		g.t.Fatal(err)
	}
	for line := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				g.t.Fatalf("metric %s: %q", series, line)
			}
			return f
		}
	}
	return 0
}

// logLines returns the lines of a log file that hold every one of parts.
func logLines(t *testing.T, file string, parts ...string) []string {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for line := range strings.Lines(string(data)) {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			out = append(out, line)
		}
	}
	return out
}

const metricsSite = "handle /metrics {\n\t\tmetrics\n\t}"

// TestBacklogCorruptOrg puts a corrupt org's fail-open charges first in the
// backlog, then two other orgs' fail-open calls (one of them a failed call,
// charged and refunded), and voids of their fail-closed calls, while the
// gateway cannot reach Redis; the corrupt org's account gets a field that
// is not a number meanwhile. Once Redis is reachable: the corrupt org's
// charges leave at once, logged with its org and request ids and counted in
// caddy_credits_backlog_dropped_total; the other orgs are charged exactly
// the calls the upstream answered; nothing is lost at shutdown. A call of
// the corrupt org then answers 500 on every fail_mode and is not forwarded.
func TestBacklogCorruptOrg(t *testing.T) {
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	srv := redistest.Start(t, redistest.Options{})
	proxy := faultproxy.Start(t, srv.Addr)
	g := startGateway(t, gatewayOptions{store: "redis redis://" + proxy.Addr, global: "lease off",
		options: "log {\n\t\toutput file " + logFile + "\n\t}", site: metricsSite})
	g.redis = srv
	good := []string{"good-a", "good-b"}
	for _, org := range append([]string{"corrupt"}, good...) {
		wantStatus(t, g.call("/image-studio/x", org), http.StatusOK)
	}

	proxy.Refuse(true)
	for range 3 {
		wantStatus(t, g.call("/image-studio/x", "corrupt"), http.StatusOK)
	}
	for range 5 {
		for _, org := range good {
			r := g.call("/image-studio/x", org)
			wantStatus(t, r, http.StatusOK)
			wantHeaders(t, r, map[string]string{"Credits-Remaining": ""})
			wantStatus(t, g.call("/background-removal/x", org, "X-Cost", "1"), http.StatusServiceUnavailable)
		}
	}
	for _, org := range good {
		wantStatus(t, g.call("/image-studio/fail", org), http.StatusInternalServerError)
	}
	keys, err := meter.NewKeys("credits")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Client(t).HSet(context.Background(), keys.Account("corrupt"), "rem", "oops").Err(); err != nil {
		t.Fatal(err)
	}
	if n := backlogLength(); n < 3+2*5+2*2 {
		t.Fatalf("%d calls wait in the backlog, want at least %d", n, 3+2*5+2*2)
	}

	proxy.Refuse(false)
	eventually(t, "the backlog is applied", func() bool { return backlogLength() == 0 })
	for _, org := range good {
		// Every call the upstream answered but the one that failed.
		want := int64(5) - 2*(g.upstream.forwarded(org, "image-studio")-1)
		if got := g.balance(org); got != want || want != 5-2*6 {
			t.Errorf("%s: balance %d, want %d: 5 less 2 for each of its 6 calls the upstream answered", org, got, want)
		}
		if n := g.upstream.forwarded(org, "background-removal"); n != 0 {
			t.Errorf("%s: %d fail-closed calls reached the upstream", org, n)
		}
	}
	if n := g.metric(`caddy_credits_backlog_dropped_total{reason="failed"}`); n != 3 {
		t.Errorf("caddy_credits_backlog_dropped_total{reason=\"failed\"} = %v, want 3", n)
	}
	dropped := logLines(t, logFile, "dropping a deferred ledger call", `"level":"error"`)
	if len(dropped) != 3 {
		t.Errorf("%d drops logged, want 3:\n%s", len(dropped), strings.Join(dropped, ""))
	}
	for _, line := range dropped {
		if !strings.Contains(line, `"org":"corrupt"`) || !strings.Contains(line, `"request_id":"g:`) || !strings.Contains(line, "not a number") {
			t.Errorf("a drop logged without the corrupt org, its request id or the cause: %s", line)
		}
	}

	// On the request path, the corrupt org's calls are refused with 500 on
	// both fail modes: no later charge could bill them.
	before := g.upstream.calls.Load()
	for _, path := range []string{"/image-studio/x", "/background-removal/x"} {
		r := g.call(path, "corrupt", "X-Cost", "1")
		wantStatus(t, r, http.StatusInternalServerError)
		wantHeaders(t, r, map[string]string{"Retry-After": ""})
		if p := r.problem(t); !strings.Contains(p["detail"].(string), "org corrupt cannot be used") {
			t.Errorf("%s: %v", path, p)
		}
	}
	if g.upstream.calls.Load() != before {
		t.Error("a call of the corrupt org reached the upstream")
	}

	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if lost := logLines(t, logFile, "lost at shutdown"); len(lost) != 0 {
		t.Errorf("calls lost at shutdown: %s", lost)
	}
}

// TestStoreOutOfMemory runs Redis at maxmemory with noeviction (maxmemory
// set far below what it uses): every write is refused with OOM. A fail-open
// route forwards its calls and charges them once memory is back; a
// fail-closed route answers 503 with Retry-After; the deferred charges wait
// (tried again and again, none dropped), and no log line takes OOM for
// corrupt data. Afterwards each org is charged exactly the calls the
// upstream answered.
func TestStoreOutOfMemory(t *testing.T) {
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	g := startGateway(t, gatewayOptions{redis: redistest.Options{Args: []string{"--maxmemory-policy", "noeviction"}},
		global: "lease off", options: "log {\n\t\toutput file " + logFile + "\n\t}", site: metricsSite})
	rdb := g.redis.Client(t)
	wantStatus(t, g.call("/image-studio/x", "oom-open"), http.StatusOK)
	wantStatus(t, g.call("/background-removal/x", "oom-closed", "X-Cost", "1"), http.StatusOK)

	if err := rdb.ConfigSet(context.Background(), "maxmemory", "1").Err(); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		r := g.call("/image-studio/x", "oom-open")
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "", "Credits-Charged": ""})
	}
	for range 3 {
		r := g.call("/background-removal/x", "oom-closed", "X-Cost", "1")
		wantStatus(t, r, http.StatusServiceUnavailable)
		wantHeaders(t, r, map[string]string{"Retry-After": "1"})
		r.problem(t)
	}
	// Redis refused those charges before they wrote: nothing to void.
	if n := backlogLength(); n != 5 {
		t.Fatalf("%d calls wait in the backlog, want the 5 fail-open charges", n)
	}
	errorsBefore := g.metric("caddy_credits_store_errors_total")
	eventually(t, "the backlog tries again", func() bool { return g.metric("caddy_credits_store_errors_total") >= errorsBefore+3 })
	if n := backlogLength(); n != 5 {
		t.Fatalf("%d calls wait in the backlog while Redis is out of memory, want 5", n)
	}

	if err := rdb.ConfigSet(context.Background(), "maxmemory", "0").Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the backlog is applied", func() bool { return backlogLength() == 0 })
	if got, want := g.balance("oom-open"), 5-2*g.upstream.forwarded("oom-open", "image-studio"); got != want || want != 5-2*6 {
		t.Errorf("oom-open: balance %d, want %d: 5 less 2 for each of its 6 calls the upstream answered", got, want)
	}
	if got, want := g.balance("oom-closed"), 5-g.upstream.forwarded("oom-closed", "background-removal"); got != want || want != 4 {
		t.Errorf("oom-closed: balance %d, want %d: 5 less its one call the upstream answered", got, want)
	}
	if n := g.metric(`caddy_credits_backlog_dropped_total{reason="failed"}`); n != 0 {
		t.Errorf("%v deferred calls dropped", n)
	}
	for _, bad := range []string{"nothing was written", "is a list", "corrupt", "dropping a deferred"} {
		if lines := logLines(t, logFile, bad); len(lines) != 0 {
			t.Errorf("the log says %q of an OOM:\n%s", bad, strings.Join(lines, ""))
		}
	}
	if lines := logLines(t, logFile, "OOM command not allowed"); len(lines) == 0 {
		t.Error("the log never names the OOM")
	}
}

// TestBacklogLostAtShutdownCounted closes a store whose Redis never
// answers, with two charges waiting: both are lost, and the log and
// caddy_credits_backlog_dropped_total{reason="shutdown"} count them.
func TestBacklogLostAtShutdownCounted(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	s, err := openStore(meter.ClientOptions{URL: fmt.Sprintf("redis://127.0.0.1:%d", freePort(t))}, 10, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	m, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	s.metrics.Store(m)
	ledger, err := meter.New(s.rdb, meter.Config{})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"g:lost-1", "g:lost-2"} {
		if !s.later(meter.LaterCharge{Ledger: ledger, Charge: meter.ChargeRequest{Org: "lost", Feature: "f", Cost: 1, RequestID: id,
			Attempt: id[2:], Overdraft: true, OverdraftLimit: meter.NoLimit}}) {
			t.Fatal("the backlog refused a call")
		}
	}
	if err := s.Destruct(); err != nil {
		t.Fatal(err)
	}
	if n := counterValue(t, reg, "caddy_credits_backlog_dropped_total", "reason", "shutdown"); n != 2 {
		t.Errorf(`caddy_credits_backlog_dropped_total{reason="shutdown"} = %v, want 2`, n)
	}
	lost := logs.FilterMessage("ledger calls lost at shutdown: the store did not take them in time").All()
	if len(lost) != 1 || lost[0].ContextMap()["count"] != int64(2) {
		t.Errorf("the loss is not logged with its count: %v", logs.All())
	}
}

// counterValue reads a counter of reg, by its name and one label.
func counterValue(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}
