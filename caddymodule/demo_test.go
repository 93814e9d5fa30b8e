package caddymodule

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/meter"
)

// TestDemo runs the README's walk-through on the demo Caddyfile with the
// built binary: five calls succeed, the sixth shows the notice, a top-up
// makes the next one succeed.
func TestDemo(t *testing.T) {
	out, err := runCaddyCommand(t, "list-modules")
	if err != nil {
		t.Fatalf("list-modules: %v\n%s", err, out)
	}
	for _, id := range []string{"credits", "http.handlers.credits", "http.handlers.credits_balance", "http.handlers.credits_admin"} {
		found := false
		for _, line := range strings.Split(out, "\n") {
			found = found || strings.TrimSpace(line) == id
		}
		if !found {
			t.Errorf("list-modules lacks %s", id)
		}
	}
	out, err = runCaddyCommand(t, "adapt", "--config", "../Caddyfile", "--validate")
	if err != nil {
		t.Fatalf("adapt --validate of the demo Caddyfile: %v\n%s", err, out)
	}
	var adapted struct {
		Apps map[string]json.RawMessage `json:"apps"`
	}
	if err := json.Unmarshal([]byte(out), &adapted); err != nil {
		t.Fatalf("adapt output: %v\n%s", err, out)
	}
	if _, ok := adapted.Apps["credits"]; !ok {
		t.Fatalf("the adapted demo has no credits app: %s", out)
	}

	cfg, gw, admin := demoCaddyfile(t)
	p := startCaddyProcess(t, cfg, gw, admin)
	call := func(path string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, "http://"+gw+path, nil)
		req.Header.Set("X-Org-Id", "demo")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	for i := 4; i >= 0; i-- {
		resp := call("/rich-text/generate")
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Credits-Remaining") != fmt.Sprint(i) {
			t.Fatalf("call %d: %d, Credits-Remaining %q", 5-i, resp.StatusCode, resp.Header.Get("Credits-Remaining"))
		}
	}
	resp := call("/rich-text/generate")
	if resp.StatusCode != http.StatusPaymentRequired || resp.Header.Get("Credits-Notice") != "exhausted" {
		t.Fatalf("sixth call: %d, Credits-Notice %q", resp.StatusCode, resp.Header.Get("Credits-Notice"))
	}
	if resp := call("/background-removal/remove"); resp.StatusCode != http.StatusPaymentRequired || resp.Header.Get("Credits-Notice") != "" {
		t.Fatalf("block route: %d, Credits-Notice %q", resp.StatusCode, resp.Header.Get("Credits-Notice"))
	}
	if resp := call("/flows/run"); resp.StatusCode != http.StatusOK || resp.Header.Get("Credits-Remaining") != "-1" {
		t.Fatalf("overdraft route: %d, Credits-Remaining %q", resp.StatusCode, resp.Header.Get("Credits-Remaining"))
	}
	top, err := http.Post("http://"+admin+"/admin/orgs/demo/topup", "application/json", strings.NewReader(`{"amount": 10}`))
	if err != nil {
		t.Fatal(err)
	}
	top.Body.Close()
	if top.StatusCode != http.StatusOK {
		t.Fatalf("top-up: %d", top.StatusCode)
	}
	if resp := call("/rich-text/generate"); resp.StatusCode != http.StatusOK || resp.Header.Get("Credits-Remaining") != "8" {
		t.Fatalf("after the top-up: %d, Credits-Remaining %q", resp.StatusCode, resp.Header.Get("Credits-Remaining"))
	}
	// The streamed generation holds 3 and is charged the 1 its tokens cost.
	req, _ := http.NewRequest(http.MethodPost, "http://"+gw+"/rich-text/stream", nil)
	req.Header.Set("X-Org-Id", "streamer")
	stream, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(stream.Body)
	stream.Body.Close()
	if !strings.Contains(string(body), `"usage":{"prompt_tokens":300`) || stream.Header.Get("Credits-Hold") != "3" ||
		stream.Header.Get("Credits-Remaining") != "2" || stream.Trailer.Get("Credits-Charged") != "1" || stream.Trailer.Get("Credits-Remaining") != "4" {
		t.Fatalf("streamed call: headers %v, trailers %v, body %q", stream.Header, stream.Trailer, body)
	}
	if !strings.Contains(p.output(), "embedded store") {
		t.Errorf("no warning about the embedded store in the log:\n%s", p.output())
	}
}

// TestTwoGateways runs two Caddy processes on one redis-server: 800
// concurrent calls split across both, on a balance of 300, forward exactly
// 300.
func TestTwoGateways(t *testing.T) {
	for _, lease := range []string{"", "lease 40"} {
		t.Run("with "+cmpOr(lease, "no lease"), func(t *testing.T) { twoGateways(t, lease) })
	}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func twoGateways(t *testing.T, lease string) {
	srv := redistest.Start(t, redistest.Options{})
	var forwarded atomic.Int64
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		forwarded.Add(1)
		io.WriteString(w, "ok")
	}))
	defer up.Close()
	const site = `{
	admin off
	credits {
		redis redis://%s
		timeout 5s
		default_plan 300
		%s
	}
}
:%d {
	bind 127.0.0.1
	credits {
		org {http.request.header.X-Org-Id}
		feature image-studio
	}
	reverse_proxy %s
}
`
	var addrs []string
	for range 2 {
		port := freePort(t)
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		startCaddyProcess(t, fmt.Sprintf(site, srv.Addr, lease, port, up.URL), addr)
		addrs = append(addrs, addr)
	}
	counts := burst(800, 100, func(i int) *http.Request {
		req, _ := http.NewRequest(http.MethodPost, "http://"+addrs[i%2]+"/remove", nil)
		req.Header.Set("X-Org-Id", "shared")
		return req
	})
	if counts[http.StatusOK] != 300 || counts[http.StatusPaymentRequired] != 500 || len(counts) != 2 || forwarded.Load() != 300 {
		t.Fatalf("answers by status %v, upstream calls %d; want 300 of 200 and 500 of 402, 300 calls", counts, forwarded.Load())
	}
	// Leased spending reaches Redis within a quarter second.
	keys, _ := meter.NewKeys("")
	rdb := srv.Client(t)
	eventually(t, "Redis holds the exact balance", func() bool {
		bal, err := rdb.HGet(t.Context(), keys.Account("shared"), "rem").Result()
		used, err2 := rdb.HGet(t.Context(), keys.Account("shared"), "u:image-studio").Result()
		return err == nil && err2 == nil && bal == "0" && used == "300"
	})
}

// burst sends n calls, at most concurrency at once, and counts the answers
// by status (0: no answer).
func burst(n, concurrency int, newRequest func(i int) *http.Request) map[int]int {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: concurrency}}
	defer client.CloseIdleConnections()
	var mu sync.Mutex
	counts := map[int]int{}
	var wg sync.WaitGroup
	sem := make(chan struct{}, concurrency)
	for i := range n {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			status := 0
			if resp, err := client.Do(newRequest(i)); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				status = resp.StatusCode
			}
			mu.Lock()
			counts[status]++
			mu.Unlock()
		})
	}
	wg.Wait()
	return counts
}
