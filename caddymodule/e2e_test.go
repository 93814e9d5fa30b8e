package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// upstream is a real HTTP server standing in for an AI backend. It records
// what it receives; the path tells it how to answer: /fail answers 500,
// /usage/<n> sets Credits-Usage: n, /usage-raw sends the X-Usage request
// header's values as Credits-Usage, /trailer/<n> sends Credits-Usage: n as a
// declared trailer, /undeclared/<n> as a trailer it did not announce, /hints sends a 103 with Credits headers first, /slow
// answers after a second, and /hang holds the call until the gateway or the client gives up.
type upstream struct {
	*httptest.Server
	mu       sync.Mutex
	received []*http.Request
	calls    atomic.Int64
	byOrg    map[string]int64 // "org route" -> calls received
	hung     chan struct{}    // a call to .../hang arrived
}

// forwarded returns how many calls for org on the route (the first path
// segment) reached the upstream.
func (u *upstream) forwarded(org, route string) int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.byOrg[org+" "+route]
}

func startUpstream(t *testing.T) *upstream {
	t.Helper()
	u := &upstream{byOrg: map[string]int64{}, hung: make(chan struct{}, 100)}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.calls.Add(1)
		route, _, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
		u.mu.Lock()
		if len(u.received) < 1000 {
			u.received = append(u.received, r.Clone(r.Context()))
		} else {
			u.received[len(u.received)-1] = r.Clone(r.Context())
		}
		u.byOrg[r.Header.Get("X-Org-Id")+" "+route]++
		u.mu.Unlock()
		// An upstream's own Credits headers never reach the client.
		w.Header().Set("Credits-Remaining", "999999")
		if _, n, ok := strings.Cut(r.URL.Path, "/usage/"); ok {
			w.Header().Set("Credits-Usage", n)
		}
		if strings.HasSuffix(r.URL.Path, "/usage-raw") {
			w.Header()["Credits-Usage"] = r.Header.Values("X-Usage")
		}
		if strings.HasSuffix(r.URL.Path, "/hints") {
			w.Header().Set("Credits-Notice", "exhausted")
			w.Header().Set("Link", "</style.css>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			w.Header().Del("Credits-Notice")
			w.Header().Del("Link")
		}
		if _, n, ok := strings.Cut(r.URL.Path, "/trailer/"); ok {
			w.Header().Set("Trailer", "Credits-Usage, X-Checksum")
			w.Header().Set("Content-Type", "text/plain")
			io.WriteString(w, "streamed answer\n")
			w.Header().Set("Credits-Usage", n)
			w.Header().Set("X-Checksum", "abc")
			w.Header().Set(http.TrailerPrefix+"Credits-Notice", "low")
			return
		}
		if _, n, ok := strings.Cut(r.URL.Path, "/undeclared/"); ok {
			w.Header().Set("Content-Type", "text/plain")
			io.WriteString(w, "streamed answer\n")
			// A flush makes the body chunked: trailers need it.
			http.NewResponseController(w).Flush()
			w.Header().Set(http.TrailerPrefix+"Credits-Usage", n)
			return
		}
		if strings.HasSuffix(r.URL.Path, "/slow") {
			// A second, as a generative call takes.
			select {
			case <-time.After(time.Second):
			case <-r.Context().Done():
				return
			}
		}
		if strings.HasSuffix(r.URL.Path, "/hang") {
			// Hold the call until the gateway gives up on it.
			u.hung <- struct{}{}
			<-r.Context().Done()
			return
		}
		if strings.HasSuffix(r.URL.Path, "/fail") {
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, "backend failed\n")
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "ai answer for %s\n", r.URL.Path)
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *upstream) last(t *testing.T) *http.Request {
	t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.received) == 0 {
		t.Fatal("the upstream received nothing")
	}
	return u.received[len(u.received)-1]
}

// freePort returns a port free at the moment, for a listener of a test.
//
// It picks from 15000-19999, below Linux's ephemeral range (32768 and up):
// a port the kernel hands out for :0 or for an outgoing connection of a
// test running meanwhile could be taken again before Caddy binds it, and
// the redis-servers of internal/redistest use 20000 and up. A port is
// handed out once per test binary, so two addresses of one Caddyfile (or
// of two tests in turn, while the first one's listener lingers) never
// share one.
func freePort(t testing.TB) int {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 1000 {
		port := 15000 + rand.IntN(5000)
		if portsGiven[port] {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		l.Close()
		portsGiven[port] = true
		return port
	}
	t.Fatal("no free port in 15000-19999")
	return 0
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{}
)

// gateway is Caddy, in this process, with the credits module in front of
// an upstream, metering against a real redis-server.
type gateway struct {
	t        *testing.T
	url      string // the metered site
	adminURL string // the credits_admin mount
	redis    *redistest.Server
	upstream *upstream
	client   *http.Client
	config   string // the Caddyfile it runs
}

// gatewayCaddyfile is the test site: one route per kind of product.
const gatewayCaddyfile = `{
	admin off
	{OPTIONS}
	credits {
		{STORE}
		timeout {TIMEOUT}
		default_plan 5
		topup_url https://billing.example/topup
		{GLOBAL}
	}
}
http://127.0.0.1:{PORT} {
	route /rich-text/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature rich-text
			on_exhausted notice
			low_balance 3
		}
		reverse_proxy {UPSTREAM}
	}
	route /background-removal/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature background-removal
			cost {http.request.header.X-Cost}
		}
		reverse_proxy {UPSTREAM}
	}
	route /image-studio/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature image-studio
			cost 2
			fail_mode open
		}
		reverse_proxy {UPSTREAM}
	}
	route /flows/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature flows
			on_exhausted overdraft
			overdraft_limit 10
			fail_mode closed
		}
		reverse_proxy {UPSTREAM}
	}
	route /templates/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature templates
			on_exhausted overdraft
		}
		reverse_proxy {UPSTREAM}
	}
	route /dead/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature dead
		}
		reverse_proxy 127.0.0.1:{DEADPORT}
	}
	handle /balance {
		credits_balance {
			org {http.request.header.X-Org-Id}
		}
	}
	{SITE}
}
http://127.0.0.1:{ADMINPORT} {
	handle_path /admin/* {
		credits_admin {
			token s3cret
		}
	}
}
`

type gatewayOptions struct {
	// options go into the global options, global into the credits block.
	options, global, site string
	redis                 redistest.Options
	// store, when set, replaces the redis line (e.g. a proxy's address or
	// redis_cluster), and no redis-server is started.
	store   string
	timeout string // default 300ms
}

func startGateway(t *testing.T, o gatewayOptions) *gateway {
	t.Helper()
	g := &gateway{t: t, upstream: startUpstream(t)}
	if o.store == "" {
		g.redis = redistest.Start(t, o.redis)
		o.store = "redis redis://" + g.redis.Addr
	}
	if o.timeout == "" {
		o.timeout = "300ms"
	}
	port, adminPort := freePort(t), freePort(t)
	g.url = fmt.Sprintf("http://127.0.0.1:%d", port)
	g.adminURL = fmt.Sprintf("http://127.0.0.1:%d/admin", adminPort)
	cfg := strings.NewReplacer(
		"{STORE}", o.store,
		"{TIMEOUT}", o.timeout,
		"{PORT}", fmt.Sprint(port),
		"{ADMINPORT}", fmt.Sprint(adminPort),
		"{DEADPORT}", fmt.Sprint(freePort(t)),
		"{UPSTREAM}", g.upstream.URL,
		"{GLOBAL}", o.global,
		"{OPTIONS}", o.options,
		"{SITE}", o.site,
	).Replace(gatewayCaddyfile)
	// A test's own site blocks may name the upstream too.
	cfg = strings.ReplaceAll(cfg, "{UPSTREAM}", g.upstream.URL)
	loadCaddyfile(t, cfg)
	g.config = cfg
	// Every admin answer the tests see is checked against openapi.json.
	g.client = &http.Client{Timeout: 10 * time.Second, Transport: openAPIChecked(t, g.adminURL, http.DefaultTransport)}
	return g
}

// loadCaddyfile runs Caddy in this process on the Caddyfile until the test
// ends.
func loadCaddyfile(t *testing.T, cfg string) {
	t.Helper()
	cfgJSON, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err != nil {
		t.Fatalf("adapting the Caddyfile: %v\n%s", err, cfg)
	}
	for _, w := range warnings {
		t.Logf("Caddyfile warning: %s", w)
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatalf("loading the config: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
	})
}

type reply struct {
	status int
	header http.Header
	body   []byte
}

func (r reply) problem(t *testing.T) map[string]any {
	t.Helper()
	if ct := r.header.Get("Content-Type"); ct != "application/problem+json" {
		t.Fatalf("Content-Type %q, want application/problem+json; body %s", ct, r.body)
	}
	var p map[string]any
	if err := json.Unmarshal(r.body, &p); err != nil {
		t.Fatalf("problem body %s: %v", r.body, err)
	}
	if p["status"] != float64(r.status) {
		t.Fatalf("problem status %v, response status %d", p["status"], r.status)
	}
	return p
}

func (g *gateway) do(method, url string, header map[string]string, body string) reply {
	g.t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		g.t.Fatal(err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := g.client.Do(req)
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		g.t.Fatal(err)
	}
	return reply{status: resp.StatusCode, header: resp.Header, body: data}
}

func (g *gateway) call(path, org string, header ...string) reply {
	g.t.Helper()
	h := map[string]string{}
	if org != "" {
		h["X-Org-Id"] = org
	}
	for i := 0; i+1 < len(header); i += 2 {
		h[header[i]] = header[i+1]
	}
	return g.do(http.MethodPost, g.url+path, h, "{}")
}

func (g *gateway) admin(method, path, body string) reply {
	g.t.Helper()
	return g.do(method, g.adminURL+path, map[string]string{"Authorization": "Bearer s3cret"}, body)
}

// account reads an org's account through the admin API.
func (g *gateway) account(org string) map[string]any {
	g.t.Helper()
	r := g.admin(http.MethodGet, "/orgs/"+org, "")
	if r.status != http.StatusOK {
		g.t.Fatalf("account of %s: %d %s", org, r.status, r.body)
	}
	var a map[string]any
	if err := json.Unmarshal(r.body, &a); err != nil {
		g.t.Fatal(err)
	}
	return a
}

func (g *gateway) balance(org string) int64 {
	g.t.Helper()
	return int64(g.account(org)["balance"].(float64))
}

func (g *gateway) topUp(org string, amount int64) {
	g.t.Helper()
	r := g.admin(http.MethodPost, "/orgs/"+org+"/topup", fmt.Sprintf(`{"amount": %d}`, amount))
	if r.status != http.StatusOK {
		g.t.Fatalf("top-up: %d %s", r.status, r.body)
	}
}

func wantHeaders(t *testing.T, r reply, want map[string]string) {
	t.Helper()
	for k, v := range want {
		got, present := r.header[http.CanonicalHeaderKey(k)]
		switch {
		case v == "" && present:
			t.Errorf("header %s: %q, want none", k, got)
		case v != "" && (len(got) != 1 || got[0] != v):
			t.Errorf("header %s: %q, want %q", k, got, v)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

func wantStatus(t *testing.T, r reply, status int) {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d; body %s", r.status, status, r.body)
	}
}

// TestWire checks each row of the wire table (SPEC section 4) through a real
// Caddy, a real upstream and a real redis-server.
func TestWire(t *testing.T) {
	g := startGateway(t, gatewayOptions{})

	t.Run("credits enough", func(t *testing.T) {
		g.t = t
		r := g.call("/background-removal/remove", "enough", "X-Cost", "2", "Credits-Remaining", "1000", "Idempotency-Key", "k-1")
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "3", "Credits-Charged": "2", "Credits-Notice": "", "Credits-Usage": ""})
		if string(r.body) != "ai answer for /background-removal/remove\n" {
			t.Fatalf("body %q", r.body)
		}
		got := g.upstream.last(t)
		for name := range got.Header {
			if strings.HasPrefix(strings.ToLower(name), "credits-") {
				t.Fatalf("the upstream received %s", name)
			}
		}
		if got.Header.Get("Idempotency-Key") != "k-1" || got.Header.Get("X-Org-Id") != "enough" {
			t.Fatalf("the upstream received %v", got.Header)
		}
		if b := g.balance("enough"); b != 3 {
			t.Fatalf("balance %d, want 3", b)
		}
	})

	t.Run("notice route, low balance", func(t *testing.T) {
		g.t = t
		r := g.call("/rich-text/generate", "low")
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "4", "Credits-Charged": "1", "Credits-Notice": ""})
		g.call("/rich-text/generate", "low")
		r = g.call("/rich-text/generate", "low")
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "2", "Credits-Charged": "1", "Credits-Notice": "low"})
	})

	t.Run("block route, balance below cost", func(t *testing.T) {
		g.t = t
		before := g.upstream.calls.Load()
		r := g.call("/background-removal/remove", "blocked", "X-Cost", "6")
		wantStatus(t, r, http.StatusPaymentRequired)
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "5", "Credits-Charged": "0", "Credits-Notice": ""})
		p := r.problem(t)
		for k, v := range map[string]any{"org": "blocked", "feature": "background-removal", "balance": float64(5), "cost": float64(6),
			"topup_url": "https://billing.example/topup", "status": float64(402)} {
			if p[k] != v {
				t.Errorf("problem %s: %v, want %v", k, p[k], v)
			}
		}
		if p["type"] == "" || p["title"] == "" || p["detail"] == "" {
			t.Errorf("problem without type, title or detail: %v", p)
		}
		if g.upstream.calls.Load() != before {
			t.Fatal("the upstream was called")
		}
		if r := g.admin(http.MethodGet, "/orgs/blocked", ""); r.status != http.StatusNotFound {
			t.Fatalf("a refused first call wrote an account: %d %s", r.status, r.body)
		}
	})

	t.Run("notice route, balance below cost", func(t *testing.T) {
		g.t = t
		for range 5 {
			wantStatus(t, g.call("/rich-text/generate", "out"), http.StatusOK)
		}
		before := g.upstream.calls.Load()
		r := g.call("/rich-text/generate", "out")
		wantStatus(t, r, http.StatusPaymentRequired)
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "0", "Credits-Notice": "exhausted"})
		if p := r.problem(t); p["detail"] == "" || p["feature"] != "rich-text" {
			t.Fatalf("problem %v", p)
		}
		if g.upstream.calls.Load() != before {
			t.Fatal("the upstream was called")
		}
	})

	t.Run("overdraft route below zero", func(t *testing.T) {
		g.t = t
		for _, want := range []string{"4", "3", "2", "1", "0", "-1", "-2"} {
			r := g.call("/templates/run", "od")
			wantStatus(t, r, http.StatusOK)
			wantHeaders(t, r, map[string]string{"Credits-Remaining": want, "Credits-Charged": "1", "Credits-Notice": ""})
		}
		if b := g.balance("od"); b != -2 {
			t.Fatalf("balance %d", b)
		}
	})

	t.Run("overdraft route past its limit", func(t *testing.T) {
		g.t = t
		for range 15 {
			wantStatus(t, g.call("/flows/run", "limit"), http.StatusOK)
		}
		before := g.upstream.calls.Load()
		r := g.call("/flows/run", "limit")
		wantStatus(t, r, http.StatusPaymentRequired)
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "-10", "Credits-Notice": ""})
		if p := r.problem(t); p["balance"] != float64(-10) {
			t.Fatalf("problem %v", p)
		}
		if g.upstream.calls.Load() != before {
			t.Fatal("the upstream was called")
		}
	})

	t.Run("org missing", func(t *testing.T) {
		g.t = t
		before := g.upstream.calls.Load()
		r := g.call("/rich-text/generate", "")
		wantStatus(t, r, http.StatusUnauthorized)
		r.problem(t)
		if g.upstream.calls.Load() != before {
			t.Fatal("the upstream was called")
		}
	})

	t.Run("org or cost invalid", func(t *testing.T) {
		g.t = t
		before := g.upstream.calls.Load()
		for _, c := range []struct{ org, cost string }{
			{"{acme}", "1"}, {"a b", "1"}, {strings.Repeat("x", 300), "1"}, {"a:b", "1"},
			{"acme", ""}, {"acme", "0"}, {"acme", "-1"}, {"acme", "two"}, {"acme", "1000001"}, {"acme", "1.5"},
		} {
			h := []string{"X-Cost", c.cost}
			if c.cost == "" {
				h = nil
			}
			r := g.call("/background-removal/remove", c.org, h...)
			wantStatus(t, r, http.StatusBadRequest)
			if p := r.problem(t); p["detail"] == "" {
				t.Fatalf("problem without detail: %v", p)
			}
		}
		if g.upstream.calls.Load() != before {
			t.Fatal("the upstream was called")
		}
		if r := g.admin(http.MethodGet, "/orgs/acme", ""); r.status != http.StatusNotFound {
			t.Fatalf("bad input wrote an account: %d", r.status)
		}
	})

	t.Run("upstream answers 5xx", func(t *testing.T) {
		g.t = t
		r := g.call("/rich-text/fail", "five")
		wantStatus(t, r, http.StatusInternalServerError)
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "5", "Credits-Charged": "0"})
		if string(r.body) != "backend failed\n" {
			t.Fatalf("body %q", r.body)
		}
		if b := g.balance("five"); b != 5 {
			t.Fatalf("balance %d after a refund", b)
		}
	})

	t.Run("upstream does not answer", func(t *testing.T) {
		g.t = t
		r := g.call("/dead/x", "dead")
		wantStatus(t, r, http.StatusBadGateway)
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "5", "Credits-Charged": "0"})
		if b := g.balance("dead"); b != 5 {
			t.Fatalf("balance %d after a refund", b)
		}
	})

	t.Run("upstream sets Credits-Usage", func(t *testing.T) {
		g.t = t
		g.topUp("usage", 10)
		r := g.call("/image-studio/usage/7", "usage")
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "8", "Credits-Charged": "7", "Credits-Usage": ""})
		r = g.call("/image-studio/usage/0", "usage")
		wantHeaders(t, r, map[string]string{"Credits-Remaining": "8", "Credits-Charged": "0"})
		a := g.account("usage")
		if a["balance"] != float64(8) || a["used"].(map[string]any)["image-studio"] != float64(7) {
			t.Fatalf("account %v", a)
		}
	})

	t.Run("Idempotency-Key charges once and replays the kept response", func(t *testing.T) {
		g.t = t
		before := g.upstream.calls.Load()
		first := g.call("/rich-text/generate", "idem", "Idempotency-Key", "order-42")
		wantHeaders(t, first, map[string]string{"Credits-Charged": "1", "Credits-Remaining": "4", "Idempotent-Replayed": ""})
		if g.upstream.calls.Load() != before+1 || g.upstream.last(t).Header.Get("Idempotency-Key") != "order-42" {
			t.Fatal("the first call did not reach the upstream with its key")
		}
		again := g.call("/rich-text/generate", "idem", "Idempotency-Key", "order-42")
		wantStatus(t, again, http.StatusOK)
		wantHeaders(t, again, map[string]string{"Credits-Charged": "0", "Idempotent-Replayed": "true", "Content-Type": "text/plain"})
		if !bytes.Equal(again.body, first.body) {
			t.Fatalf("replay body %q, first %q", again.body, first.body)
		}
		// The same key on another route, cost or method is another call.
		other := g.call("/background-removal/remove", "idem", "Idempotency-Key", "order-42", "X-Cost", "1")
		wantStatus(t, other, http.StatusUnprocessableEntity)
		if g.upstream.calls.Load() != before+1 {
			t.Fatal("a replay or a mismatched key reached the upstream")
		}
		if b := g.balance("idem"); b != 4 {
			t.Fatalf("balance %d, want 4", b)
		}
		long := g.call("/rich-text/generate", "idem", "Idempotency-Key", strings.Repeat("k", 256))
		wantStatus(t, long, http.StatusBadRequest)
	})

	t.Run("browser origin sees the headers", func(t *testing.T) {
		g.t = t
		r := g.call("/rich-text/generate", "cors", "Origin", "https://app.example")
		wantHeaders(t, r, map[string]string{"Access-Control-Expose-Headers": "Credits-Remaining, Credits-Charged, Credits-Notice, Credits-Hold, Credits-Budget-Remaining"})
		r = g.call("/rich-text/generate", "cors")
		wantHeaders(t, r, map[string]string{"Access-Control-Expose-Headers": ""})
	})

	t.Run("credits_balance", func(t *testing.T) {
		g.t = t
		r := g.do(http.MethodGet, g.url+"/balance", map[string]string{"X-Org-Id": "nobody-yet"}, "")
		wantStatus(t, r, http.StatusOK)
		var b map[string]any
		if err := json.Unmarshal(r.body, &b); err != nil {
			t.Fatal(err)
		}
		if b["org"] != "nobody-yet" || b["balance"] != float64(5) || b["next_recharge"] != fmt.Sprintf("%d-01-01T00:00:00Z", time.Now().UTC().Year()+1) {
			t.Fatalf("balance %v", b)
		}
		g.call("/rich-text/generate", "nobody-yet")
		r = g.do(http.MethodGet, g.url+"/balance", map[string]string{"X-Org-Id": "nobody-yet"}, "")
		if !bytes.Contains(r.body, []byte(`"balance":4`)) {
			t.Fatalf("balance after a charge: %s", r.body)
		}
		wantStatus(t, g.do(http.MethodHead, g.url+"/balance", map[string]string{"X-Org-Id": "x"}, ""), http.StatusOK)
		wantStatus(t, g.do(http.MethodGet, g.url+"/balance", nil, ""), http.StatusUnauthorized)
		wantStatus(t, g.do(http.MethodGet, g.url+"/balance", map[string]string{"X-Org-Id": "a b"}, ""), http.StatusBadRequest)
		r = g.do(http.MethodPost, g.url+"/balance", map[string]string{"X-Org-Id": "x"}, "")
		wantStatus(t, r, http.StatusMethodNotAllowed)
		wantHeaders(t, r, map[string]string{"Allow": "GET, HEAD"})
	})
}

// TestHandleErrors checks that a site with handle_errors gets the
// gateway's refusals as errors, with the problem's fields in placeholders.
func TestHandleErrors(t *testing.T) {
	g := startGateway(t, gatewayOptions{site: `handle_errors {
		header Content-Type text/plain
		respond "{err.status_code} {credits.problem.title}: balance {credits.problem.balance}, cost {credits.problem.cost}, {credits.problem.topup_url}" {err.status_code}
	}`})
	r := g.call("/background-removal/x", "styled", "X-Cost", "9")
	wantStatus(t, r, http.StatusPaymentRequired)
	if want := "402 Insufficient credits: balance 5, cost 9, https://billing.example/topup"; string(r.body) != want {
		t.Fatalf("body %q, want %q", r.body, want)
	}
	wantHeaders(t, r, map[string]string{"Credits-Remaining": "5", "Credits-Charged": "0"})
	r = g.call("/background-removal/x", "")
	wantStatus(t, r, http.StatusUnauthorized)
	if !strings.HasPrefix(string(r.body), "401 Organization missing") {
		t.Fatalf("body %q", r.body)
	}
}
