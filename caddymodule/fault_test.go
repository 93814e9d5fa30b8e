package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/faultproxy"
	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// The fault suite: real redis-server processes behind a TCP proxy that adds
// latency, drops connections and cuts replies after Redis ran the command,
// a real Caddy in front of a real upstream, and load while the faults
// happen. Afterwards every org's balance must be exact: what it started
// with less the cost of every call the upstream received.

// faultRoutes are the gateway's routes the load uses, with their costs and
// fail modes: closed (block), open (block), open (overdraft).
var faultRoutes = []struct {
	path  string
	route string
	cost  int64
}{
	{"/background-removal/x", "background-removal", 1}, // fail_mode closed
	{"/image-studio/x", "image-studio", 2},             // fail_mode open
	{"/templates/x", "templates", 1},                   // overdraft: open
}

const faultStart = 5 + 1_000_000 // the default plan and a top-up

// loadResult counts the answers of a load by status.
type loadResult struct {
	mu       sync.Mutex
	statuses map[int]int
	done     atomic.Int64
}

func (l *loadResult) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return fmt.Sprint(l.statuses)
}

// runLoad calls the fault routes for orgs from workers goroutines until
// stop is closed.
func runLoad(g *gateway, orgs []string, workers int, stop <-chan struct{}, routes ...int) (*loadResult, func()) {
	res := &loadResult{statuses: map[int]int{}}
	if len(routes) == 0 {
		routes = []int{0, 1, 2}
	}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: workers}}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; ; i += workers {
				select {
				case <-stop:
					return
				default:
				}
				rt := faultRoutes[routes[i%len(routes)]]
				req, _ := http.NewRequest(http.MethodPost, g.url+rt.path, nil)
				req.Header.Set("X-Org-Id", orgs[i%len(orgs)])
				req.Header.Set("X-Cost", "1")
				status := 0
				if resp, err := client.Do(req); err == nil {
					status = resp.StatusCode
					resp.Body.Close()
				}
				res.mu.Lock()
				res.statuses[status]++
				res.mu.Unlock()
				res.done.Add(1)
			}
		})
	}
	return res, wg.Wait
}

// waitDone waits until the load has answered n more calls.
func (l *loadResult) waitDone(t *testing.T, n int64) {
	t.Helper()
	target := l.done.Load() + n
	eventually(t, fmt.Sprintf("%d calls are answered", n), func() bool { return l.done.Load() >= target })
}

// drained waits until no deferred call waits in any store's backlog.
func drained(t *testing.T) {
	t.Helper()
	eventuallyWithin(t, time.Minute, "the backlog is applied", func() bool {
		waiting := int64(0)
		stores.Range(func(_, v any) bool {
			waiting += v.(*store).outbox.Waiting()
			return true
		})
		return waiting == 0
	})
}

func setupFaultOrgs(g *gateway, n int) []string {
	orgs := make([]string, n)
	for i := range orgs {
		orgs[i] = fmt.Sprintf("fault-%d", i)
		r := g.admin(http.MethodPost, "/orgs/"+orgs[i]+"/topup", `{"amount": 1000000, "reference": "start"}`)
		if r.status != http.StatusOK {
			g.t.Fatalf("top-up: %d %s", r.status, r.body)
		}
	}
	return orgs
}

// checkExact asserts that each org's balance comes to its start less the
// cost of every call the upstream received for it, once the leases have
// reported their spending (within a few seconds: a report every quarter
// second, an idle lease given back after two).
func checkExact(t *testing.T, g *gateway, orgs []string) {
	t.Helper()
	g.t = t
	var wrong []string
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		wrong = wrong[:0]
		for _, org := range orgs {
			want := int64(faultStart)
			for _, rt := range faultRoutes {
				want -= g.upstream.forwarded(org, rt.route) * rt.cost
			}
			if got := g.balance(org); got != want {
				wrong = append(wrong, fmt.Sprintf("org %s: balance %d, want %d (start %d less the forwarded calls)", org, got, want, faultStart))
			}
		}
		if len(wrong) == 0 || time.Now().After(deadline) {
			break
		}
	}
	for _, w := range wrong {
		t.Error(w)
	}
}

func wantOnly(t *testing.T, res *loadResult, allowed ...int) {
	t.Helper()
	res.mu.Lock()
	defer res.mu.Unlock()
	for status, n := range res.statuses {
		ok := false
		for _, a := range allowed {
			ok = ok || status == a
		}
		if !ok {
			t.Errorf("%d answers with status %d; all: %v", n, status, res.statuses)
		}
	}
}

// TestFaultRedisRestart kills redis-server mid-load and restarts it from its
// append-only file. Call by call (lease off), calls are refused while it is
// down; with the default lease, they are paid from what the leases hold.
// Either way the balances come out exact.
func TestFaultRedisRestart(t *testing.T) {
	for _, mode := range []struct {
		name, global string
		refused      bool
	}{
		{"lease off", "lease off", true},
		{"default lease", "", false},
	} {
		t.Run(mode.name, func(t *testing.T) {
			g := startGateway(t, gatewayOptions{redis: redistest.Options{AppendOnly: true}, global: mode.global, site: metricsSite})
			orgs := setupFaultOrgs(g, 5)
			stop := make(chan struct{})
			res, wait := runLoad(g, orgs, 16, stop)
			res.waitDone(t, 300)
			batched := g.metric("caddy_credits_store_batched_total")
			g.redis.Kill(t)
			res.waitDone(t, 200)
			g.redis.Restart(t)
			res.waitDone(t, 300)
			batched = g.metric("caddy_credits_store_batched_total") - batched
			close(stop)
			wait()
			drained(t)
			wantOnly(t, res, http.StatusOK, http.StatusServiceUnavailable)
			if mode.refused && res.statuses[http.StatusServiceUnavailable] == 0 {
				t.Errorf("no call was refused while Redis was down: %v", res)
			}
			if mode.refused && batched == 0 {
				t.Errorf("no charges went in batches while Redis was killed and restarted")
			}
			checkExact(t, g, orgs)
			t.Logf("answers: %v, %v charges in batches around the restart", res, batched)
		})
	}
}

// TestFaultScriptFlush flushes Redis' script cache every few milliseconds
// during load: no 5xx, exact balances.
func TestFaultScriptFlush(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	orgs := setupFaultOrgs(g, 3)
	direct := g.redis.Client(t)
	stop := make(chan struct{})
	var flushes atomic.Int64
	var flusher sync.WaitGroup
	flusher.Go(func() {
		tick := time.NewTicker(3 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				direct.ScriptFlush(context.Background())
				direct.FunctionFlush(context.Background())
				flushes.Add(1)
			}
		}
	})
	res, wait := runLoad(g, orgs, 8, stop)
	res.waitDone(t, 1000)
	close(stop)
	wait()
	flusher.Wait()
	drained(t)
	wantOnly(t, res, http.StatusOK)
	checkExact(t, g, orgs)
	t.Logf("answers: %v with %d flushes", res, flushes.Load())
}

// TestFaultCutReplies cuts replies from Redis after it ran the command:
// every charged call was forwarded and every forwarded call was charged.
// Call by call (lease off) every 7th reply is cut; with the default lease,
// where a busy org's calls make few store calls, every 3rd.
func TestFaultCutReplies(t *testing.T) {
	for _, mode := range []struct {
		name, global string
		every, cuts  int64
	}{
		{"lease off", "lease off", 7, 50},
		{"default lease", "", 3, 20},
	} {
		t.Run(mode.name, func(t *testing.T) {
			srv := redistest.Start(t, redistest.Options{})
			proxy := faultproxy.Start(t, srv.Addr)
			g := startGateway(t, gatewayOptions{store: "redis redis://" + proxy.Addr, global: mode.global, site: metricsSite})
			g.redis = srv
			orgs := setupFaultOrgs(g, 3)
			batched := g.metric("caddy_credits_store_batched_total")
			proxy.CutReplyEvery(int(mode.every))
			stop := make(chan struct{})
			res, wait := runLoad(g, orgs, 16, stop)
			eventuallyWithin(t, time.Minute, fmt.Sprintf("%d replies are cut", mode.cuts), func() bool { return proxy.Cuts() >= mode.cuts })
			batched = g.metric("caddy_credits_store_batched_total") - batched
			close(stop)
			wait()
			proxy.CutReplyEvery(0)
			drained(t)
			wantOnly(t, res, http.StatusOK, http.StatusServiceUnavailable)
			if mode.global == "lease off" && batched == 0 {
				t.Errorf("no charges went in batches while replies were cut")
			}
			checkExact(t, g, orgs)
			t.Logf("answers: %v with %d replies cut, %v charges in batches", res, proxy.Cuts(), batched)
		})
	}
}

// TestFaultSlowRedis makes Redis 2s slow with a 200ms timeout: closed routes
// answer 503 at the timeout, not when Redis answers, nothing stays charged for them,
// and neither goroutines nor connections pile up.
func TestFaultSlowRedis(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	proxy := faultproxy.Start(t, srv.Addr)
	g := startGateway(t, gatewayOptions{store: "redis redis://" + proxy.Addr, timeout: "200ms"})
	g.redis = srv
	orgs := setupFaultOrgs(g, 2)
	wantStatus(t, g.call(faultRoutes[0].path, orgs[0], "X-Cost", "1"), http.StatusOK)
	var pool *store
	stores.Range(func(_, v any) bool {
		pool = v.(*store)
		return false
	})
	poolSize := pool.rdb.(*redis.Client).Options().PoolSize

	proxy.SetLatency(2 * time.Second)
	var slowest atomic.Int64
	var refused atomic.Int64
	wave := func() {
		var wg sync.WaitGroup
		for i := range 60 {
			wg.Go(func() {
				start := time.Now()
				r := g.call(faultRoutes[0].path, orgs[i%2], "X-Cost", "1")
				elapsed := time.Since(start)
				for {
					s := slowest.Load()
					if int64(elapsed) <= s || slowest.CompareAndSwap(s, int64(elapsed)) {
						break
					}
				}
				if r.status == http.StatusServiceUnavailable && r.header.Get("Retry-After") != "" {
					refused.Add(1)
				}
			})
		}
		wg.Wait()
		g.client.CloseIdleConnections()
		if conns := pool.rdb.PoolStats().TotalConns; int(conns) > poolSize {
			t.Errorf("%d connections to Redis, over the pool's %d", conns, poolSize)
		}
	}
	// The proxy's own goroutines sleep through the latency; leave them out.
	goroutines := func() int { return runtime.NumGoroutine() - proxy.Goroutines() }
	wave()
	afterOne := goroutines()
	wave()
	wave()
	// Each call in flight holds a few goroutines, and closing connections a
	// few more for a moment; none may stay behind while Redis still hangs.
	eventually(t, fmt.Sprintf("goroutines go back to %d, the number after one wave of calls", afterOne+10), func() bool {
		return goroutines() <= afterOne+10
	})
	if refused.Load() != 180 {
		t.Errorf("%d of 180 calls answered 503 with Retry-After", refused.Load())
	}
	// Answered at the timeout, not when Redis answers: well before the 2 s
	// it hangs (how close to 200 ms is for the benchmarks, not a test on a
	// loaded machine).
	if s := time.Duration(slowest.Load()); s >= time.Second {
		t.Errorf("the slowest 503 took %s: it waited for Redis, not the 200ms timeout", s)
	}

	proxy.SetLatency(0)
	drained(t)
	checkExact(t, g, orgs)
	t.Logf("slowest 503: %s", time.Duration(slowest.Load()))
}

// TestFaultClusterFailover kills a Redis Cluster master under load, with
// docs/operations.md's Cluster settings (wait_replicas 1); its replica takes
// over, and the killed master comes back as the new master's replica. Every
// write the gateway was answered had reached the replica, so none is lost
// to the failover: balances are exact afterwards.
func TestFaultClusterFailover(t *testing.T) {
	cluster := redistest.StartCluster(t, 3, 1)
	// The documented block's settings, but for its seeds.
	block := readmeBlock(t, "../docs/operations.md", "### A Redis Cluster", "caddyfile")
	var settings []string
	for _, line := range strings.Split(block, "\n") {
		line = strings.TrimSpace(line)
		if line != "" && !strings.HasPrefix(line, "redis_cluster ") && !strings.ContainsAny(line, "{}") {
			settings = append(settings, line)
		}
	}
	if !slices.Contains(settings, "wait_replicas 1") {
		t.Fatalf("docs/operations.md's Cluster block sets %q, want wait_replicas 1:\n%s", settings, block)
	}
	g := startGateway(t, gatewayOptions{store: "redis_cluster " + strings.Join(cluster.Addrs, " "), timeout: "500ms",
		global: strings.Join(settings, "\n\t\t")})
	orgs := setupFaultOrgs(g, 6)
	cc := cluster.Client(t)
	ctx := context.Background()

	stop := make(chan struct{})
	res, wait := runLoad(g, orgs, 8, stop)
	res.waitDone(t, 300)
	// Kill the master that holds the first org's slot.
	var victim *redistest.Server
	slot := cc.ClusterKeySlot(ctx, "{"+orgs[0]+"}").Val()
	shards, err := cc.ClusterShards(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, sh := range shards {
		inRange := false
		for _, r := range sh.Slots {
			inRange = inRange || (slot >= r.Start && slot <= r.End)
		}
		if !inRange {
			continue
		}
		for _, n := range sh.Nodes {
			if n.Role != "master" {
				continue
			}
			for _, s := range cluster.Nodes {
				if s.Addr == fmt.Sprintf("%s:%d", n.IP, n.Port) {
					victim = s
				}
			}
		}
	}
	if victim == nil {
		t.Fatalf("no master found for slot %d", slot)
	}
	victim.Kill(t)
	killed := time.Now()
	// The replica is promoted once the other masters agree the master
	// failed: every live node then names another master for the slot.
	eventuallyWithin(t, time.Minute, "a replica takes over the slot", func() bool {
		for _, s := range cluster.Nodes {
			if s == victim {
				continue
			}
			c := redis.NewClient(&redis.Options{Addr: s.Addr})
			info, err := c.ClusterInfo(ctx).Result()
			slots, err2 := c.ClusterSlots(ctx).Result()
			c.Close()
			if err != nil || err2 != nil || !strings.Contains(info, "cluster_state:ok") {
				return false
			}
			for _, r := range slots {
				if int64(r.Start) <= slot && slot <= int64(r.End) && (len(r.Nodes) == 0 || r.Nodes[0].Addr == victim.Addr) {
					return false
				}
			}
		}
		return true
	})
	promoted := time.Since(killed)
	// The new master has no replica: its writes count once the old master
	// is back as its replica, in sync.
	victim.Restart(t)
	eventuallyWithin(t, time.Minute, "the killed master is the new master's replica, in sync", func() bool {
		c := redis.NewClient(&redis.Options{Addr: victim.Addr})
		defer c.Close()
		info, err := c.Info(ctx, "replication").Result()
		return err == nil && strings.Contains(info, "role:slave") && strings.Contains(info, "master_link_status:up")
	})
	res.waitDone(t, 300)
	close(stop)
	wait()
	drained(t)
	wantOnly(t, res, http.StatusOK, http.StatusServiceUnavailable)
	checkExact(t, g, orgs)
	t.Logf("answers: %v; replica promoted %s after the kill, backlog applied %s after it", res, promoted, time.Since(killed))
}

// TestClientGoesAway cuts the client's connection while the upstream works
// on the call: the upstream's call is cancelled, and the charge is refunded
// although no one is left to answer.
func TestClientGoesAway(t *testing.T) {
	g := startGateway(t, gatewayOptions{})
	for _, path := range []string{"/background-removal/hang", "/image-studio/hang"} {
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.url+path, nil)
		req.Header.Set("X-Org-Id", "leaver")
		req.Header.Set("X-Cost", "3")
		errc := make(chan error, 1)
		go func() {
			resp, err := http.DefaultClient.Do(req)
			if err == nil {
				resp.Body.Close()
			}
			errc <- err
		}()
		<-g.upstream.hung
		if b := g.balance("leaver"); b >= 5 {
			t.Fatalf("%s: balance %d while the upstream works: not charged", path, b)
		}
		cancel()
		if err := <-errc; err == nil {
			t.Fatalf("%s: the cancelled call got an answer", path)
		}
		eventually(t, "the charge is refunded", func() bool { return g.balance("leaver") == 5 })
	}
}

// TestLeasedExactness sends 1,000 concurrent calls for one org with a
// balance of 500 through a gateway that leases credits (lease 50, and the
// default) and one that does not: exactly 500 are forwarded, and the admin
// API shows the exact balance within seconds.
func TestLeasedExactness(t *testing.T) {
	for _, mode := range []struct {
		name, global string
		leased       bool // the spending is charged by lease reports
	}{
		{"lease 50", "lease 50", true},
		{"default lease", "", true},
		{"lease off", "lease off", false},
	} {
		t.Run(mode.name, func(t *testing.T) {
			// A store call's deadline well above a loaded machine's
			// latency: this test is about exactness, not timeouts.
			g := startGateway(t, gatewayOptions{global: mode.global, timeout: "3s"})
			g.admin(http.MethodPut, "/orgs/leased/plan", `{"allowance": 500, "recharge_month": 1}`)
			counts := burst(1000, 64, func(int) *http.Request {
				req, _ := http.NewRequest(http.MethodPost, g.url+"/background-removal/x", nil)
				req.Header.Set("X-Org-Id", "leased")
				req.Header.Set("X-Cost", "1")
				return req
			})
			if counts[http.StatusOK] != 500 || counts[http.StatusPaymentRequired] != 500 || len(counts) != 2 || g.upstream.forwarded("leased", "background-removal") != 500 {
				t.Fatalf("answers by status %v, upstream calls %d; want 500 of 200 and 500 of 402, 500 calls", counts, g.upstream.forwarded("leased", "background-removal"))
			}
			eventually(t, "the admin API shows the exact balance", func() bool {
				a := g.account("leased")
				used, _ := a["used"].(map[string]any)
				return a["balance"] == float64(0) && used["background-removal"] == float64(500)
			})
			// Which way the calls were paid: by lease reports, or one
			// charge event each.
			r := g.admin(http.MethodGet, "/orgs/leased/events?limit=1000", "")
			var events struct {
				Events []struct{ Kind, Ref string } `json:"events"`
			}
			if err := json.Unmarshal([]byte(r.body), &events); err != nil {
				t.Fatal(err)
			}
			byLease, byCall := 0, 0
			for _, e := range events.Events {
				if e.Kind == "charge" && strings.HasPrefix(e.Ref, "lease:") {
					byLease++
				} else if e.Kind == "charge" {
					byCall++
				}
			}
			if mode.leased && byLease == 0 || !mode.leased && (byLease != 0 || byCall != 500) {
				t.Errorf("%d charge events from lease reports, %d of single calls", byLease, byCall)
			}
		})
	}
}

// TestFaultSlowRedisLeased is TestFaultSlowRedis with leasing on: while
// Redis hangs, a call is paid from what the lease still holds, or answered
// 503 within the timeout once the lease needs Redis; none waits for Redis
// longer, and the ledger is exact once Redis is back.
func TestFaultSlowRedisLeased(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	proxy := faultproxy.Start(t, srv.Addr)
	g := startGateway(t, gatewayOptions{store: "redis redis://" + proxy.Addr, timeout: "200ms", global: "lease 5"})
	g.redis = srv
	orgs := setupFaultOrgs(g, 1)
	for range 10 { // the org is leased from its fourth call
		wantStatus(t, g.call(faultRoutes[0].path, orgs[0], "X-Cost", "1"), http.StatusOK)
	}

	proxy.SetLatency(2 * time.Second)
	var slowest atomic.Int64
	counts := map[int]int{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range 60 {
		wg.Go(func() {
			start := time.Now()
			r := g.call(faultRoutes[0].path, orgs[0], "X-Cost", "1")
			elapsed := int64(time.Since(start))
			for s := slowest.Load(); elapsed > s && !slowest.CompareAndSwap(s, elapsed); s = slowest.Load() {
			}
			status := r.status
			if status == http.StatusServiceUnavailable && r.header.Get("Retry-After") == "" {
				status = -1 // a 503 without Retry-After
			}
			mu.Lock()
			counts[status]++
			mu.Unlock()
		})
	}
	wg.Wait()
	if counts[http.StatusOK]+counts[http.StatusServiceUnavailable] != 60 || counts[http.StatusServiceUnavailable] == 0 {
		t.Errorf("answers by status %v; want 200s from the lease, then 503s with Retry-After", counts)
	}
	if s := time.Duration(slowest.Load()); s >= time.Second {
		t.Errorf("the slowest answer took %s: it waited for Redis, not the 200ms timeout", s)
	}

	proxy.SetLatency(0)
	drained(t)
	want := int64(faultStart) - g.upstream.forwarded(orgs[0], faultRoutes[0].route)*faultRoutes[0].cost
	eventually(t, fmt.Sprintf("the balance is %d, the start less every forwarded call", want), func() bool {
		return g.balance(orgs[0]) == want
	})
	t.Logf("answers %v, slowest %s", counts, time.Duration(slowest.Load()))
}
