package caddymodule

import (
	"bufio"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestUsageLog routes the usage log to a file of its own with Caddy's log
// option, as the README shows, and checks its lines against what the
// upstream served and what the ledger charged.
func TestUsageLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "usage.log")
	g := startGateway(t, gatewayOptions{options: `log usage {
		output file ` + path + `
		include ` + UsageLogger + `
		level DEBUG
		format json
	}`})
	g.topUp("acme", 20)
	for range 3 {
		wantStatus(t, g.call("/rich-text/generate", "acme"), http.StatusOK)
	}
	wantStatus(t, g.call("/image-studio/resize", "acme"), http.StatusOK)
	wantStatus(t, g.call("/dead/x", "acme"), http.StatusBadGateway)
	// broke has the default plan's 5 credits: a cost of 9 is refused.
	wantStatus(t, g.call("/background-removal/x", "broke", "X-Cost", "9"), http.StatusPaymentRequired)
	// No org: no metered call, no line.
	wantStatus(t, g.call("/rich-text/generate", ""), http.StatusUnauthorized)

	type line struct {
		Logger    string `json:"logger"`
		Msg       string `json:"msg"`
		Org       string `json:"org"`
		Feature   string `json:"feature"`
		Cost      int64  `json:"cost"`
		Charged   int64  `json:"charged"`
		RequestID string `json:"request_id"`
		Paid      string `json:"paid"`
		Outcome   string `json:"outcome"`
	}
	var lines []line
	awaitCondition(t, "the usage log's lines", func() bool {
		f, err := os.Open(path)
		if err != nil {
			return false
		}
		defer f.Close()
		lines = lines[:0]
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var l line
			if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
				t.Fatalf("a line of the usage log is no JSON: %s", sc.Text())
			}
			lines = append(lines, l)
		}
		return len(lines) >= 6
	})
	charged := map[string]int64{}
	outcomes := map[string]int{}
	for _, l := range lines {
		if l.Logger != UsageLogger || l.Msg != "metered call" || l.Feature == "" || l.Outcome == "" {
			t.Fatalf("a line of another logger or without its fields: %+v", l)
		}
		if l.Paid == "charge" && !strings.HasPrefix(l.RequestID, "g:") {
			t.Fatalf("a charged call's line without its request id: %+v", l)
		}
		charged[l.Org+" "+l.Feature] += l.Charged
		outcomes[l.Org+" "+l.Feature+" "+l.Outcome]++
	}
	if len(lines) != 6 {
		t.Fatalf("%d lines, want 6: %+v", len(lines), lines)
	}
	g.upstream.mu.Lock()
	served := map[string]int64{"acme rich-text": g.upstream.byOrg["acme rich-text"], "acme image-studio": 2 * g.upstream.byOrg["acme image-studio"]}
	g.upstream.mu.Unlock()
	for k, n := range served {
		if charged[k] != n {
			t.Fatalf("%s: the usage log says %d charged, the upstream served %d credits' worth", k, charged[k], n)
		}
	}
	if outcomes["acme dead refunded"] != 1 || charged["acme dead"] != 0 || outcomes["broke background-removal blocked"] != 1 {
		t.Fatalf("outcomes %v, charged %v", outcomes, charged)
	}
	// What the lines say was charged is what the ledger holds.
	a := g.account("acme")
	used := a["used"].(map[string]any)
	if used["rich-text"] != float64(charged["acme rich-text"]) || used["image-studio"] != float64(charged["acme image-studio"]) {
		t.Fatalf("the ledger's usage %v, the usage log's %v", used, charged)
	}
}
