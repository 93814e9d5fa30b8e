package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/meter"
)

// readmeBlock returns the first block of kind after the heading of file, a
// path from this package's directory (../README.md, ../docs/caddyfile.md).
func readmeBlock(t *testing.T, file, heading, kind string) string {
	t.Helper()
	doc, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(doc), "\n"+heading+"\n")
	if !ok {
		t.Fatalf("%s has no %q", file, heading)
	}
	_, block, ok := strings.Cut(section, "\n```"+kind+"\n")
	if !ok {
		t.Fatalf("%s's %q has no %s block", file, heading, kind)
	}
	block, _, _ = strings.Cut(block, "\n```\n")
	return block
}

// TestREADMEForwardAuth runs the forward_auth example of
// docs/operations.md, as written but for its addresses, with a real
// identity service, AI backend and redis-server: each caller is charged to the org its token proves, a
// forged X-Org-Id changes nothing, and a refused caller reaches nothing.
func TestREADMEForwardAuth(t *testing.T) {
	block := readmeBlock(t, "../docs/operations.md", "## The org from an identity service", "caddyfile")
	srv := redistest.Start(t, redistest.Options{})
	identity, ai, servedNow := startAuthStandIns(t)

	port := freePort(t)
	for _, addr := range []string{"127.0.0.1:6379", "127.0.0.1:9000", "127.0.0.1:8000", ":8080 {"} {
		if !strings.Contains(block, addr) {
			t.Fatalf("the example does not name %s, which the test replaces:\n%s", addr, block)
		}
	}
	cfg := strings.NewReplacer(
		"127.0.0.1:6379", srv.Addr,
		"127.0.0.1:9000", strings.TrimPrefix(identity.URL, "http://"),
		"127.0.0.1:8000", strings.TrimPrefix(ai.URL, "http://"),
		":8080 {", fmt.Sprintf("http://127.0.0.1:%d {", port),
	).Replace(block)
	cfg = strings.Replace(cfg, "{\n", "{\n\tadmin off\n", 1)
	loadCaddyfile(t, cfg)

	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { rdb.Close() })
	ledger, err := meter.New(rdb, meter.Config{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, org := range []string{"acme", "beta"} {
		if _, _, err := ledger.TopUp(ctx, org, 20, "start"); err != nil {
			t.Fatal(err)
		}
	}
	client := &http.Client{Timeout: 10 * time.Second}
	call := func(token, forged string) int {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/rich-text/generate", port), nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		if forged != "" {
			req.Header.Set("X-Org-Id", forged)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for range 3 {
		if s := call("tok-acme", ""); s != http.StatusOK {
			t.Fatalf("acme's call: %d", s)
		}
	}
	for range 2 {
		if s := call("tok-beta", "acme"); s != http.StatusOK {
			t.Fatalf("beta's call with a forged org: %d", s)
		}
	}
	if s := call("", "acme"); s != http.StatusUnauthorized {
		t.Fatalf("a call without a token: %d, want the identity service's 401", s)
	}
	if s := call("tok-anonymous", "acme"); s != http.StatusUnauthorized {
		t.Fatalf("a call the identity service gave no org: %d, want 401", s)
	}

	served := servedNow()
	if served["acme"] != 3 || served["beta"] != 2 || len(served) != 2 {
		t.Fatalf("the AI backend served %v, want acme 3 and beta 2", served)
	}
	for org, n := range served {
		a, err := ledger.Account(ctx, org)
		if err != nil {
			t.Fatal(err)
		}
		if a.Used["rich-text"] != n || a.Balance != 20-n {
			t.Fatalf("%s: the backend served %d calls; the ledger: used %v, balance %d", org, n, a.Used, a.Balance)
		}
	}
}

// TestDeployCaddyfile loads deploy/Caddyfile, the one compose.yaml runs,
// with the environment compose gives it and a real redis-server for the
// compose file's Redis.
func TestDeployCaddyfile(t *testing.T) {
	compose, err := os.ReadFile("../compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"./deploy/Caddyfile:/etc/caddy/Caddyfile", "dockerfile: xcaddy.Dockerfile", `"--appendonly", "yes"`, `"--maxmemory-policy", "noeviction"`, "redis-data:/data"} {
		if !strings.Contains(string(compose), want) {
			t.Errorf("compose.yaml does not have %s", want)
		}
	}
	input, err := os.ReadFile("../deploy/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	srv := redistest.Start(t, redistest.Options{})
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(input, nil)
	if err != nil {
		t.Fatalf("deploy/Caddyfile does not adapt: %v", err)
	}
	var cfg caddy.Config
	if err := json.Unmarshal([]byte(strings.ReplaceAll(string(cfgJSON), "redis://redis:6379", "redis://"+srv.Addr)), &cfg); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]string{"CREDITS_ADMIN_TOKEN": "s3cret", "CREDITS_TOPUP_URL": "https://billing.example/topup",
		"IDENTITY_ADDR": "127.0.0.1:9000", "AI_ADDR": "127.0.0.1:8000"} {
		t.Setenv(k, v)
	}
	if err := caddy.Validate(&cfg); err != nil {
		t.Fatalf("deploy/Caddyfile does not load: %v", err)
	}
	if _, err := url.Parse("redis://" + srv.Addr); err != nil {
		t.Fatal(err)
	}
}

// startAuthStandIns starts a stand-in identity service (GET /verify: the
// bearer tokens tok-acme and tok-beta, or the same in a "session" cookie,
// prove orgs acme and beta,
// tok-anonymous proves no org, any other is refused) and an AI backend
// that counts the calls it serves per X-Org-Id; servedNow returns a copy of
// those counts.
func startAuthStandIns(t *testing.T) (identity, ai *httptest.Server, servedNow func() map[string]int64) {
	t.Helper()
	identity = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/verify" {
			http.Error(w, "not here", http.StatusNotFound)
			return
		}
		// The token is a bearer's, else a session cookie's, as a frontend
		// on another origin sends with credentials: 'include'.
		token := r.Header.Get("Authorization")
		if c, err := r.Cookie("session"); err == nil && token == "" {
			token = "Bearer " + c.Value
		}
		switch token {
		case "Bearer tok-acme":
			w.Header().Set("X-Org-Id", "acme")
		case "Bearer tok-beta":
			w.Header().Set("X-Org-Id", "beta")
		case "Bearer tok-anonymous":
			// Authenticated, but no org.
		default:
			http.Error(w, "who are you?", http.StatusUnauthorized)
			return
		}
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(identity.Close)
	var mu sync.Mutex
	served := map[string]int64{}
	ai = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		served[r.Header.Get("X-Org-Id")]++
		mu.Unlock()
		fmt.Fprint(w, `{"html": "<p>ok</p>"}`)
	}))
	t.Cleanup(ai.Close)
	servedNow = func() map[string]int64 {
		mu.Lock()
		defer mu.Unlock()
		return maps.Clone(served)
	}
	return identity, ai, servedNow
}

// TestForwardAuthOrder shows the order Caddy gives forward_auth and
// request_header, which the docs warn of: in a handle block,
// request_header -X-Org-Id runs after forward_auth, whatever the order
// written, and removes the org it set (401: no org); in a route block
// the order written holds, and the balance is the caller's own. Either way
// a client's X-Org-Id reaches nothing.
func TestForwardAuthOrder(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	identity, _, _ := startAuthStandIns(t)
	port := freePort(t)
	auth := fmt.Sprintf(`request_header -X-Org-Id
		forward_auth %s {
			uri /verify
			copy_headers X-Org-Id
		}
		credits_balance {
			org {http.request.header.X-Org-Id}
		}`, strings.TrimPrefix(identity.URL, "http://"))
	loadCaddyfile(t, fmt.Sprintf(`{
	admin off
	credits {
		redis redis://%s
	}
}

http://127.0.0.1:%d {
	handle /handle/balance {
		%s
	}
	route /route/balance {
		%s
	}
}
`, srv.Addr, port, auth, auth))

	client := &http.Client{Timeout: 10 * time.Second}
	balance := func(path, token, forged string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d%s", port, path), nil)
		req.Header.Set("Authorization", "Bearer "+token)
		if forged != "" {
			req.Header.Set("X-Org-Id", forged)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body struct {
			Org    string `json:"org"`
			Detail string `json:"detail"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
			t.Fatalf("%s: %d with no JSON: %v", path, resp.StatusCode, err)
		}
		return resp.StatusCode, body.Org + body.Detail
	}
	for _, c := range []struct {
		path, token, forged string
		status              int
		says                string
	}{
		{"/handle/balance", "tok-acme", "", http.StatusUnauthorized, "does not say which organization"},
		{"/handle/balance", "tok-acme", "beta", http.StatusUnauthorized, "does not say which organization"},
		{"/route/balance", "tok-acme", "", http.StatusOK, "acme"},
		{"/route/balance", "tok-acme", "beta", http.StatusOK, "acme"},
		{"/route/balance", "tok-anonymous", "beta", http.StatusUnauthorized, "does not say which organization"},
	} {
		status, says := balance(c.path, c.token, c.forged)
		if status != c.status || !strings.Contains(says, c.says) {
			t.Errorf("%s as %s, X-Org-Id %q: %d %q, want %d %q", c.path, c.token, c.forged, status, says, c.status, c.says)
		}
	}
}

// startKeyIdentity starts a stand-in identity service for API keys: GET
// /verify-key with "Authorization: Bearer <key>" answers 200 with the
// key's org and id in X-Org-Id and X-Key-Id, as keys maps them, and 401
// for a key it does not know.
func startKeyIdentity(t *testing.T, keys map[string][2]string) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/verify-key" {
			http.Error(w, "not here", http.StatusNotFound)
			return
		}
		key, ok := keys[strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")]
		if !ok {
			http.Error(w, "unknown API key", http.StatusUnauthorized)
			return
		}
		w.Header().Set("X-Org-Id", key[0])
		w.Header().Set("X-Key-Id", key[1])
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// usageBackend is a stand-in AI backend that answers each call's cost in
// Credits-Usage, one credit per byte of the request's body, and adds up
// what it answered per org and X-Key-Id.
type usageBackend struct {
	*httptest.Server
	mu       sync.Mutex
	answered map[[2]string]int64
}

func startUsageBackend(t *testing.T) *usageBackend {
	t.Helper()
	b := &usageBackend{answered: map[[2]string]int64{}}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		b.mu.Lock()
		b.answered[[2]string{r.Header.Get("X-Org-Id"), r.Header.Get("X-Key-Id")}] += int64(len(body))
		b.mu.Unlock()
		w.Header().Set("Credits-Usage", strconv.Itoa(len(body)))
		fmt.Fprint(w, `{"choices": []}`)
	}))
	t.Cleanup(b.Close)
	return b
}

// answeredNow returns a copy of what the backend answered, per org and key.
func (b *usageBackend) answeredNow() map[[2]string]int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return maps.Clone(b.answered)
}
