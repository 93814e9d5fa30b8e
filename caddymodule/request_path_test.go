package caddymodule

import (
	"context"
	"fmt"
	"github.com/creditsgw/caddy-credits/internal/faultproxy"
	"github.com/creditsgw/caddy-credits/internal/redistest"
	"io"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestIdempotencyKey: the rows of the contract's "On the wire" for calls
// with an Idempotency-Key, through a real Caddy, upstream and redis-server.
func TestIdempotencyKey(t *testing.T) {
	g := startGateway(t, gatewayOptions{global: "idempotency_store 200"})

	t.Run("a retry while the first is in flight is 409, and a key whose call failed is free", func(t *testing.T) {
		g.t = t
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan int, 1)
		go func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.url+"/rich-text/hang", nil)
			req.Header.Set("X-Org-Id", "flight")
			req.Header.Set("Idempotency-Key", "k-flight")
			resp, err := http.DefaultClient.Do(req)
			if err == nil {
				resp.Body.Close()
				done <- resp.StatusCode
				return
			}
			done <- 0
		}()
		<-g.upstream.hung
		before := g.upstream.calls.Load()
		r := g.call("/rich-text/hang", "flight", "Idempotency-Key", "k-flight")
		wantStatus(t, r, http.StatusConflict)
		wantHeaders(t, r, map[string]string{"Retry-After": "1"})
		if p := r.problem(t); p["type"] != "https://creditsgw.dev/problems/idempotency-key-in-flight" {
			t.Fatalf("problem %v", p)
		}
		if g.upstream.calls.Load() != before {
			t.Fatal("a retry in flight reached the upstream")
		}
		// The client of the first call goes away: the upstream is given
		// the linger time to answer; it does not, so the call is cut,
		// refunded, and its key free.
		setLingerBounds(t, 500*time.Millisecond, lingerBytes)
		cancel()
		<-done
		waitFor(t, "the refund of the abandoned call", func() bool { return g.balance("flight") == 5 })
		r = g.call("/rich-text/generate", "flight", "Idempotency-Key", "k-flight")
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{"Credits-Charged": "1", "Idempotent-Replayed": ""})
		if g.upstream.calls.Load() != before+1 || g.balance("flight") != 4 {
			t.Fatalf("the call after a refund: %d upstream calls, balance %d", g.upstream.calls.Load()-before, g.balance("flight"))
		}
	})

	t.Run("a key whose call the upstream failed is a new call", func(t *testing.T) {
		g.t = t
		before := g.upstream.calls.Load()
		for range 2 {
			r := g.call("/rich-text/fail", "failing", "Idempotency-Key", "k-fail")
			wantStatus(t, r, http.StatusInternalServerError)
			wantHeaders(t, r, map[string]string{"Credits-Charged": "0", "Idempotent-Replayed": ""})
		}
		if g.upstream.calls.Load() != before+2 || g.balance("failing") != 5 {
			t.Fatalf("%d upstream calls, balance %d", g.upstream.calls.Load()-before, g.balance("failing"))
		}
	})

	t.Run("a response too large to keep answers its retries 409", func(t *testing.T) {
		g.t = t
		path := "/rich-text/" + strings.Repeat("x", 300)
		wantStatus(t, g.call(path, "large", "Idempotency-Key", "k-large"), http.StatusOK)
		before := g.upstream.calls.Load()
		r := g.call(path, "large", "Idempotency-Key", "k-large")
		wantStatus(t, r, http.StatusConflict)
		if p := r.problem(t); p["type"] != "https://creditsgw.dev/problems/idempotency-response-not-kept" {
			t.Fatalf("problem %v", p)
		}
		if g.upstream.calls.Load() != before || g.balance("large") != 4 {
			t.Fatalf("%d upstream calls, balance %d", g.upstream.calls.Load()-before, g.balance("large"))
		}
	})

	t.Run("the kept response carries no Credits header of the upstream's", func(t *testing.T) {
		g.t = t
		first := g.call("/rich-text/generate", "kept", "Idempotency-Key", "k-kept")
		again := g.call("/rich-text/generate", "kept", "Idempotency-Key", "k-kept")
		wantHeaders(t, first, map[string]string{"Credits-Remaining": "4"})
		wantHeaders(t, again, map[string]string{"Credits-Remaining": "4", "Credits-Charged": "0", "Credits-Notice": "", "Idempotent-Replayed": "true"})
	})
}

// TestIdempotencyKeyTwoGateways: 50 concurrent calls with one new key,
// through two gateways on one Redis, an upstream that takes a second: the
// upstream is called once, the org charged once, every other call answered
// 409 or the kept response.
func TestIdempotencyKeyTwoGateways(t *testing.T) {
	// A loaded machine must not time a charge out: this test is about keys.
	a := startGateway(t, gatewayOptions{timeout: "2s"})
	// The second gateway is a Caddy process of its own, on the same Redis
	// and upstream.
	port, adminPort := freePort(t), freePort(t)
	cfg := strings.NewReplacer(
		"{STORE}", "redis redis://"+a.redis.Addr, "{TIMEOUT}", "2s", "{PORT}", fmt.Sprint(port),
		"{ADMINPORT}", fmt.Sprint(adminPort), "{DEADPORT}", fmt.Sprint(freePort(t)), "{UPSTREAM}", a.upstream.URL,
		"{GLOBAL}", "", "{OPTIONS}", "", "{SITE}", "",
	).Replace(gatewayCaddyfile)
	cfg = strings.Replace(cfg, "admin off", "admin off\n\tpersist_config off", 1)
	startCaddyProcess(t, cfg, fmt.Sprintf("127.0.0.1:%d", port))
	urls := []string{a.url, fmt.Sprintf("http://127.0.0.1:%d", port)}

	before := a.upstream.calls.Load()
	var mu sync.Mutex
	statuses := map[int]int{}
	replayed := 0
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			req, _ := http.NewRequest(http.MethodPost, urls[i%2]+"/rich-text/slow", nil)
			req.Header.Set("X-Org-Id", "race")
			req.Header.Set("Idempotency-Key", "one-key")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			mu.Lock()
			defer mu.Unlock()
			statuses[resp.StatusCode]++
			if resp.Header.Get("Idempotent-Replayed") == "true" {
				replayed++
			}
		})
	}
	wg.Wait()
	if n := a.upstream.calls.Load() - before; n != 1 {
		t.Fatalf("the upstream was called %d times for one key", n)
	}
	if b := a.balance("race"); b != 4 {
		t.Fatalf("balance %d, want 4: charged once", b)
	}
	if statuses[http.StatusOK] != 1+replayed || statuses[http.StatusOK]+statuses[http.StatusConflict] != 50 {
		t.Fatalf("statuses %v, %d replays", statuses, replayed)
	}
}

// TestUpstreamCreditsHeaders: no Credits header of the upstream's reaches
// the client, in a 1xx, the headers or the trailers; a Credits-Usage
// trailer settles the call after its body.
func TestUpstreamCreditsHeaders(t *testing.T) {
	g := startGateway(t, gatewayOptions{})

	t.Run("early hints", func(t *testing.T) {
		g.t = t
		var hints []textproto.MIMEHeader
		trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
			hints = append(hints, h)
			return nil
		}}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodPost, g.url+"/rich-text/hints", nil)
		req.Header.Set("X-Org-Id", "hints")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if len(hints) != 1 || hints[0].Get("Link") == "" {
			t.Fatalf("1xx responses %v: want the 103 with its Link", hints)
		}
		for k := range hints[0] {
			if strings.HasPrefix(k, "Credits-") {
				t.Fatalf("a 103 carried %s", k)
			}
		}
		if v := resp.Header.Values("Credits-Remaining"); len(v) != 1 || v[0] != "4" {
			t.Fatalf("Credits-Remaining %q", v)
		}
	})

	t.Run("a declared Credits-Usage trailer settles after the body", func(t *testing.T) {
		g.t = t
		req, _ := http.NewRequest(http.MethodPost, g.url+"/rich-text/trailer/3", nil)
		req.Header.Set("X-Org-Id", "trailers")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "streamed answer\n" {
			t.Fatalf("body %q", body)
		}
		if h := resp.Header.Get("Credits-Hold"); h != "1" {
			t.Fatalf("Credits-Hold %q", h)
		}
		if c, r := resp.Trailer.Get("Credits-Charged"), resp.Trailer.Get("Credits-Remaining"); c != "3" || r != "2" {
			t.Fatalf("trailers Credits-Charged %q, Credits-Remaining %q; all %v", c, r, resp.Trailer)
		}
		if resp.Trailer.Get("X-Checksum") != "abc" {
			t.Fatalf("the upstream's own trailer was lost: %v", resp.Trailer)
		}
		for k := range resp.Trailer {
			if k == "Credits-Usage" || k == "Credits-Notice" {
				t.Fatalf("the upstream's %s trailer reached the client", k)
			}
		}
		if b := g.balance("trailers"); b != 2 {
			t.Fatalf("balance %d, want 5 - 3", b)
		}
	})

	t.Run("Credits-Usage is plain digits, sent once", func(t *testing.T) {
		g.t = t
		for i, tc := range []struct {
			values []string
			charge int64
		}{
			{[]string{"2"}, 2},
			{[]string{"+5"}, 1},
			{[]string{"-0"}, 1},
			{[]string{"0x2"}, 1},
			{[]string{"2", "3"}, 1},
			{[]string{"1000001"}, 1},
			{[]string{"0"}, 0},
		} {
			org := fmt.Sprintf("usage-%d", i)
			g.admin(http.MethodPut, "/orgs/"+org+"/plan", `{"allowance": 100, "recharge_month": 1}`)
			before := g.balance(org)
			req, _ := http.NewRequest(http.MethodPost, g.url+"/rich-text/usage-raw", nil)
			req.Header.Set("X-Org-Id", org)
			for _, v := range tc.values {
				req.Header.Add("X-Usage", v)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if got := before - g.balance(org); got != tc.charge {
				t.Fatalf("Credits-Usage %q charged %d, want %d", tc.values, got, tc.charge)
			}
			if resp.Header.Get("Credits-Usage") != "" {
				t.Fatalf("Credits-Usage reached the client")
			}
		}
	})
}

// TestPreflight: a CORS preflight passes uncharged, without an org.
func TestPreflight(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	before := g.upstream.calls.Load()
	r := g.do(http.MethodOptions, g.url+"/rich-text/generate", map[string]string{
		"Origin": "https://app.example", "Access-Control-Request-Method": "POST", "X-Org-Id": "pre",
	}, "")
	wantStatus(t, r, http.StatusOK)
	if g.upstream.calls.Load() != before+1 {
		t.Fatal("the preflight did not reach the upstream")
	}
	if got := g.admin(http.MethodGet, "/orgs/pre", ""); got.status != http.StatusNotFound {
		t.Fatalf("a preflight wrote the org: %d %s", got.status, got.body)
	}
	// Without an org too; an OPTIONS that is no preflight is metered.
	r = g.do(http.MethodOptions, g.url+"/rich-text/generate", map[string]string{"Access-Control-Request-Method": "POST"}, "")
	wantStatus(t, r, http.StatusOK)
	r = g.do(http.MethodOptions, g.url+"/rich-text/generate", map[string]string{}, "")
	wantStatus(t, r, http.StatusUnauthorized)
}

// waitFor polls cond until it holds, failing the test after 10 seconds.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestAdminWriteUnknownOutcome: a top-up without a reference whose outcome
// the gateway could not learn (Redis 750 ms slow, timeout 250 ms) is
// answered 503 and never stands, though Redis ran it late; the same
// top-up with a reference, retried as the 503 invites, applies once.
func TestAdminWriteUnknownOutcome(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	proxy := faultproxy.Start(t, srv.Addr)
	g := startGateway(t, gatewayOptions{store: "redis redis://" + proxy.Addr, timeout: "250ms"})
	g.redis = srv
	g.topUp("late", 10)
	proxy.SetLatency(750 * time.Millisecond)
	r := g.admin(http.MethodPost, "/orgs/late/topup", `{"amount": 1000}`)
	wantStatus(t, r, http.StatusServiceUnavailable)
	r = g.admin(http.MethodPost, "/orgs/late/topup", `{"amount": 500, "reference": "inv-9"}`)
	wantStatus(t, r, http.StatusServiceUnavailable)
	proxy.SetLatency(0)
	drained(t)
	// The retry the 503 invites; a loaded machine may still be slow once.
	waitFor(t, "the retried top-up", func() bool {
		return g.admin(http.MethodPost, "/orgs/late/topup", `{"amount": 500, "reference": "inv-9"}`).status == http.StatusOK
	})
	waitFor(t, "an answer from the store", func() bool { return g.admin(http.MethodGet, "/orgs/late", "").status == http.StatusOK })
	if b := g.balance("late"); b != 5+10+500 {
		t.Fatalf("balance %d, want 515: the unreferenced top-up voided, the referenced one applied once", b)
	}
}

// TestHealth: GET /health answers 200 without a token while the store
// answers, and 503 once it does not.
func TestHealth(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	r := g.do(http.MethodGet, g.adminURL+"/health", nil, "")
	wantStatus(t, r, http.StatusOK)
	if string(r.body) != "{\"status\":\"ok\"}\n" {
		t.Fatalf("body %q", r.body)
	}
	wantStatus(t, g.do(http.MethodPost, g.adminURL+"/health", nil, ""), http.StatusMethodNotAllowed)
	// Anything else still needs the token.
	wantStatus(t, g.do(http.MethodGet, g.adminURL+"/orgs/acme", nil, ""), http.StatusUnauthorized)
	g.redis.Kill(t)
	r = g.do(http.MethodGet, g.adminURL+"/health", nil, "")
	wantStatus(t, r, http.StatusServiceUnavailable)
	wantHeaders(t, r, map[string]string{"Retry-After": "1"})
}
