package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/meter"
)

// benchBody is the upstream's answer: small, like a short completion.
var benchBody = []byte(`{"text":"A paragraph the AI wrote."}` + "\n")

// benchParallelism times GOMAXPROCS is the number of concurrent callers:
// 64 on a 2-core machine, as in go run ./bench.
const benchParallelism = 32

// benchRequestPathCaddyfile has, on one port, a metered route and a plain
// one in front of the same upstream, as go run ./bench does.
const benchRequestPathCaddyfile = `{
	admin off
	log {
		level ERROR
	}
	credits {
		redis redis://%[1]s
		timeout 1s
		default_plan 1000000000000
		%[4]s
	}
}
http://127.0.0.1:%[2]d {
	route /metered/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature bench
		}
		reverse_proxy %[3]s
	}
	route /plain/* {
		reverse_proxy %[3]s
	}
}
`

// BenchmarkRequestPath measures a whole call through Caddy in this process
// over loopback HTTP, to a real upstream, with a real redis-server: plain
// is reverse_proxy alone, metered is credits in front of it with the
// default settings (which lease a busy org's credits), metered-lease-off
// the same with lease off, one charge script per call, and
// metered-alerts-down the default settings with balance alerts whose
// receiver is down (every call below the threshold). The difference is
// what metering costs a call;
// allocs/op counts the client's, Caddy's and
// the upstream's allocations together, alike on both.
func BenchmarkRequestPath(b *testing.B) {
	srv := redistest.Start(b, redistest.Options{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(benchBody)
	}))
	b.Cleanup(up.Close)
	port := freePort(b)
	client := &http.Client{Transport: &http.Transport{MaxIdleConns: 1024, MaxIdleConnsPerHost: 1024}}
	b.Cleanup(client.CloseIdleConnections)

	// Alerts to a receiver that is down: the org's balance is below the
	// threshold at every call, every check finds the receiver unreachable,
	// and the deliveries retry in the background.
	down := fmt.Sprintf("alerts http://127.0.0.1:%d/hook {\n\t\t\tsecret bench\n\t\t\tthresholds 1000000000000\n\t\t}", freePort(b))
	loaded := "none"
	for _, route := range []struct {
		name, path, charged, option string
	}{
		{"plain", "/plain/v1/generate", "", ""},
		{"metered", "/metered/v1/generate", "1", ""},
		{"metered-lease-off", "/metered/v1/generate", "1", "lease off"},
		{"metered-alerts-down", "/metered/v1/generate", "1", down},
	} {
		if route.option != loaded {
			loadBenchCaddyfile(b, fmt.Sprintf(benchRequestPathCaddyfile, srv.Addr, port, up.Listener.Addr(), route.option))
			loaded = route.option
		}
		b.Run(route.name, func(b *testing.B) {
			url := fmt.Sprintf("http://127.0.0.1:%d%s", port, route.path)
			newRequest := func() *http.Request {
				req, err := http.NewRequest(http.MethodGet, url, nil)
				if err != nil {
					b.Fatal(err)
				}
				req.Header.Set("X-Org-Id", "bench-org")
				return req
			}
			resp, err := client.Do(newRequest())
			if err != nil {
				b.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || resp.Header.Get("Credits-Charged") != route.charged {
				b.Fatalf("%s: %s with Credits-Charged %q, want 200 with %q", route.path, resp.Status, resp.Header.Get("Credits-Charged"), route.charged)
			}
			b.SetParallelism(benchParallelism)
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				req := newRequest()
				for pb.Next() {
					resp, err := client.Do(req)
					if err != nil {
						b.Error(err)
						return
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						b.Errorf("%s: %s", route.path, resp.Status)
						return
					}
				}
			})
		})
	}
}

// BenchmarkHandler measures the credits handler's own ServeHTTP, called
// directly (no HTTP, no Caddy server around it), provisioned by Caddy from
// a real config:
//
//   - next-only: the next handler alone, what the harness costs;
//   - stubbed-store: the handler with every script call answered in this
//     process by a go-redis hook, so it is the handler's and the ledger
//     client's own work, without the round trip;
//   - redis: the same with the charge script run by a real redis-server;
//   - leased: the handler with a lease of 100,000 credits (lease 100000 in the
//     global option), so nearly every call is paid without a store call.
//
// redis minus stubbed-store is the store call; stubbed-store minus
// next-only is the handler's own work.
func BenchmarkHandler(b *testing.B) {
	srv := redistest.Start(b, redistest.Options{})
	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{
			"credits": map[string]any{
				"redis":        "redis://" + srv.Addr,
				"timeout":      "1s",
				"default_plan": map[string]any{"allowance": meter.MaxAmount, "recharge_month": 1},
				"lease":        0, // leased below, on its own
			},
			"http": map[string]any{"servers": map[string]any{"bench": map[string]any{
				"listen": []string{fmt.Sprintf("127.0.0.1:%d", freePort(b))},
				"routes": []any{map[string]any{"handle": []any{
					map[string]any{"handler": "credits", "org": "{http.request.header.X-Org-Id}", "feature": "bench"},
				}}},
			}}},
		},
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		b.Fatal(err)
	}
	loadBenchConfig(b, cfgJSON)
	h := provisionedHandler(b)
	stub := &stubScripts{}
	h.app.store.rdb.AddHook(stub)

	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		_, err := w.Write(benchBody)
		return err
	})
	serve := map[string]func(w http.ResponseWriter, r *http.Request) error{
		"next-only": func(w http.ResponseWriter, r *http.Request) error { return next.ServeHTTP(w, r) },
		"handler":   func(w http.ResponseWriter, r *http.Request) error { return h.ServeHTTP(w, r, next) },
	}
	for _, bc := range []struct {
		name, serve string
		stubbed     bool
		leased      bool
		charged     string
	}{
		{"next-only", "next-only", false, false, ""},
		{"stubbed-store", "handler", true, false, "1"},
		{"redis", "handler", false, false, "1"},
		{"leased", "handler", false, true, "1"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			stub.on.Store(bc.stubbed)
			defer stub.on.Store(false)
			if bc.leased {
				h.app.leaser = meter.NewLeaser(h.app.ledger, meter.LeaseConfig{
					Size: 100000, Keep: 200000, Flush: 250 * time.Millisecond, Idle: 2 * time.Second, TTL: 30 * time.Second,
				}, zap.NewNop())
				defer func() {
					h.app.leaser.Close()
					h.app.leaser = nil
				}()
			}
			serve := serve[bc.serve]
			newRequest := func() (*http.Request, *benchWriter) {
				r := httptest.NewRequest(http.MethodGet, "/v1/generate", nil)
				r.Header.Set("X-Org-Id", "bench-org")
				caddyhttp.NewTestReplacer(r) // puts the replacer into r's context
				return r, &benchWriter{header: make(http.Header)}
			}
			r, w := newRequest()
			if err := serve(w, r); err != nil || w.status != http.StatusOK || w.header.Get("Credits-Charged") != bc.charged {
				b.Fatalf("status %d, Credits-Charged %q, error %v; want 200, %q", w.status, w.header.Get("Credits-Charged"), err, bc.charged)
			}
			b.SetParallelism(benchParallelism)
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				r, w := newRequest()
				for pb.Next() {
					clear(w.header)
					w.status = 0
					if err := serve(w, r); err != nil || w.status != http.StatusOK {
						b.Errorf("status %d, error %v", w.status, err)
						return
					}
				}
			})
		})
	}
}

// stubScripts answers every script call, while on, as a charge that was
// taken: code 0, a huge balance, cost 1. Anything else goes to Redis.
type stubScripts struct {
	redistest.CommandHook
	on atomic.Bool
}

func (s *stubScripts) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	one := []any{int64(0), int64(meter.MaxAmount), int64(1)}
	oneRaw := fmt.Sprintf("*3\r\n:0\r\n:%d\r\n:1\r\n", meter.MaxAmount)
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !s.on.Load() {
			return next(ctx, cmd)
		}
		switch cmd.Name() {
		case "evalsha", "eval", "evalsha_ro", "eval_ro":
		default:
			return next(ctx, cmd)
		}
		// The batch script answers one reply per charge, six keys each.
		args := cmd.Args()
		batch := fmt.Sprint(args[1]) == chargesHash
		n := 1
		if batch {
			keys, _ := strconv.Atoi(fmt.Sprint(args[2]))
			n = keys / 6
		}
		switch c := cmd.(type) {
		case *redis.Cmd:
			if !batch {
				c.SetVal(one)
				return nil
			}
			replies := make([]any, n)
			for i := range replies {
				replies[i] = one
			}
			c.SetVal(replies)
			return nil
		case *redis.RawCmd:
			if !batch {
				c.SetVal([]byte(oneRaw))
				return nil
			}
			c.SetVal([]byte(fmt.Sprintf("*%d\r\n", n) + strings.Repeat(oneRaw, n)))
			return nil
		}
		return next(ctx, cmd)
	}
}

// chargesHash is the hash of the ledger's batch script.
var chargesHash = func() string {
	text, err := meter.Script("charges.lua")
	if err != nil {
		panic(err)
	}
	return redis.NewScript(text).Hash()
}()

// benchWriter is a ResponseWriter that keeps the status and headers and
// drops the body.
type benchWriter struct {
	header http.Header
	status int
}

func (w *benchWriter) Header() http.Header { return w.header }

func (w *benchWriter) WriteHeader(status int) {
	if w.status == 0 {
		w.status = status
	}
}

func (w *benchWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	return len(p), nil
}

// provisionedHandler returns the credits handler of the running config.
func provisionedHandler(b *testing.B) *Handler {
	b.Helper()
	app, err := caddy.ActiveContext().App("http")
	if err != nil {
		b.Fatal(err)
	}
	for _, srv := range app.(*caddyhttp.App).Servers {
		for _, route := range srv.Routes {
			for _, mh := range route.Handlers {
				if h, ok := mh.(*Handler); ok {
					return h
				}
			}
		}
	}
	b.Fatal("no credits handler in the running config")
	return nil
}

// loadBenchCaddyfile runs Caddy in this process on the Caddyfile until the
// benchmark ends.
func loadBenchCaddyfile(b *testing.B, cfg string) {
	b.Helper()
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err != nil {
		b.Fatalf("adapting the Caddyfile: %v\n%s", err, cfg)
	}
	loadBenchConfig(b, cfgJSON)
}

func loadBenchConfig(b *testing.B, cfgJSON []byte) {
	b.Helper()
	if err := caddy.Load(cfgJSON, true); err != nil {
		b.Fatalf("loading the config: %v", err)
	}
	b.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			b.Errorf("stopping Caddy: %v", err)
		}
	})
}
