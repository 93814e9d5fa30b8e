package caddymodule

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestUsageAnyWay: on a route of cost 10, an upstream's Credits-Usage of 0,
// 3, 10 or 15, as a header, a declared trailer or a trailer it did not
// announce, settles each call to the usage, through a real Caddy, a real
// upstream and a real redis-server. The client gets every byte, and the
// ledger and caddy_credits_charged_total both add up to the usages.
func TestUsageAnyWay(t *testing.T) {
	g := startGateway(t, gatewayOptions{site: "handle /metrics {\n\t\tmetrics\n\t}"})
	var total int64
	for _, kind := range []struct{ name, path, body string }{
		{"header", "/usage/", "ai answer for /background-removal/usage/%d\n"},
		{"declared trailer", "/trailer/", "streamed answer\n"},
		{"undeclared trailer", "/undeclared/", "streamed answer\n"},
	} {
		t.Run(kind.name, func(t *testing.T) {
			g.t = t
			org := strings.ReplaceAll(kind.name, " ", "-")
			g.topUp(org, 95) // 100 in all
			balance := int64(100)
			for _, n := range []int64{0, 3, 10, 15} {
				req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("%s/background-removal%s%d", g.url, kind.path, n), nil)
				req.Header.Set("X-Org-Id", org)
				req.Header.Set("X-Cost", "10")
				resp, err := g.client.Do(req)
				if err != nil {
					t.Fatalf("usage %d: %v", n, err)
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				want := kind.body
				if strings.Contains(want, "%d") {
					want = fmt.Sprintf(want, n)
				}
				if err != nil || resp.StatusCode != http.StatusOK || string(body) != want {
					t.Fatalf("usage %d: %d %q %v; want 200 %q whole", n, resp.StatusCode, body, err, want)
				}
				switch kind.name {
				case "header":
					if c := resp.Header.Get("Credits-Charged"); c != fmt.Sprint(n) {
						t.Fatalf("usage %d: Credits-Charged %q", n, c)
					}
				case "declared trailer":
					if c := resp.Trailer.Get("Credits-Charged"); c != fmt.Sprint(n) {
						t.Fatalf("usage %d: trailer Credits-Charged %q", n, c)
					}
				}
				balance -= n
				total += n
				if b := g.balance(org); b != balance {
					t.Fatalf("usage %d: balance %d, want %d", n, b, balance)
				}
			}
		})
	}
	g.t = t
	metrics := g.do(http.MethodGet, g.url+"/metrics", nil, "")
	want := fmt.Sprintf(`caddy_credits_charged_total{feature="background-removal"} %d`, total)
	if !strings.Contains(string(metrics.body), want+"\n") {
		t.Fatalf("metrics lack %q:\n%s", want, grepLines(string(metrics.body), "caddy_credits_charged_total"))
	}
}

// grepLines returns the lines of text that contain s.
func grepLines(text, s string) string {
	var out []string
	for line := range strings.SplitSeq(text, "\n") {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
