package caddymodule

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/internal/faultproxy"
	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// The randomized request path: a few thousand calls of every kind, from a
// seeded source, through two gateways on one redis-server (this process's
// Caddy and a built caddy process), each through a fault proxy that cuts
// one reply of Redis' in two to five, after Redis ran the command, for the
// middle three fifths of the calls. Afterwards, from outside, every
// org must have been charged exactly what the upstream's successful answers
// cost, and no Idempotency-Key may have reached the upstream twice for one
// charge.

const (
	randomizedCalls   = 2000
	randomizedWorkers = 16
	// randomizedBudget bounds the time spent sending calls; what is not
	// sent by then is left out (and logged).
	randomizedBudget = 40 * time.Second
	// randomizedSeedEnv names the environment variable that replays a mix.
	randomizedSeedEnv = "RANDOMIZED_PATH_SEED"
)

// rndMetricsSite serves the gateway's metrics, for its store errors.
const rndMetricsSite = "handle /metrics {\n\t\tmetrics\n\t}"

// rndSettleLimit bounds the wait for the ledger to settle after the calls.
const rndSettleLimit = 15 * time.Second

// rndRoutes are the routes of gatewayCaddyfile the mix calls.
var rndRoutes = []struct {
	name string
	// cost is what a call costs; 0 means the X-Cost header's value.
	cost int64
	// closed: a charge the store does not take is answered 503.
	closed bool
	// unlimited: overdraft without a limit, so never a 402.
	unlimited bool
	// streamed: usage openai; the upstream streams its answer with the
	// usage last, and cost is the hold.
	streamed bool
}{
	{"rich-text", 1, true, false, false},          // notice
	{"background-removal", 0, true, false, false}, // block, cost from X-Cost
	{"image-studio", 2, false, false, false},      // block, fail_mode open
	{"flows", 1, true, false, false},              // overdraft to -10, fail_mode closed
	{"templates", 1, false, true, false},          // overdraft, fail_mode open
	{"chat", 3, true, false, true},                // block, rndChatSite
}

// rndRouteCost is the cost of a call on route with the X-Cost header xcost,
// as gatewayCaddyfile sets it; -1 for a route the mix does not call.
func rndRouteCost(route, xcost string) int64 {
	for _, rt := range rndRoutes {
		if rt.name != route {
			continue
		}
		if rt.cost != 0 {
			return rt.cost
		}
		n, err := strconv.ParseInt(xcost, 10, 64)
		if err != nil {
			return -1
		}
		return n
	}
	return -1
}

// rndKind is how the upstream answers a call, and how its client behaves.
type rndKind int

const (
	rndOK     rndKind = iota // 200, the route's cost
	rndUsage                 // 200 with Credits-Usage: n
	rndFail                  // 500: refunded
	rndSlow                  // 200 after half a second
	rndHang                  // no answer; the client gives up mid-call: refunded
	rndStream                // 200 and a body that trickles; the client goes away after the headers: charged
	// rndLeave, on the streamed route: the client goes away after the
	// first event, and the upstream goes on to the usage: charged it.
	rndLeave
)

var rndKindNames = [...]string{"ok", "usage", "fail", "slow", "hang", "stream", "leave"}

func (k rndKind) String() string { return rndKindNames[k] }

// rndCall is one call of the mix.
type rndCall struct {
	id     int
	via    int // the gateway it goes through
	org    string
	route  int
	kind   rndKind
	usage  int64 // the Credits-Usage of rndUsage; the tokens of a streamed answer
	xcost  int64 // the X-Cost header, on a route whose cost it sets
	key    string
	repeat bool          // the key is an earlier call's, and so is the rest of the call
	cancel time.Duration // rndHang: when the client gives up
}

func (c rndCall) path() string {
	name := rndRoutes[c.route].name
	switch c.kind {
	case rndOK, rndLeave:
		if rndRoutes[c.route].streamed {
			return fmt.Sprintf("/%s/sse/%d", name, c.usage)
		}
	case rndUsage:
		return fmt.Sprintf("/%s/usage/%d", name, c.usage)
	case rndFail:
		return "/" + name + "/fail"
	case rndSlow:
		return "/" + name + "/slow"
	case rndHang:
		return "/" + name + "/hang"
	case rndStream:
		return "/" + name + "/stream"
	}
	return "/" + name + "/generate"
}

// cost is what the call is charged when the upstream answers it.
func (c rndCall) cost() int64 {
	if c.kind == rndUsage || rndRoutes[c.route].streamed {
		return c.usage
	}
	if rndRoutes[c.route].cost == 0 {
		return c.xcost
	}
	return rndRoutes[c.route].cost
}

// body is the whole body the upstream answers the call with.
func (c rndCall) body() string {
	switch c.kind {
	case rndFail:
		return "backend failed\n"
	case rndHang:
		return "(no answer)"
	case rndStream:
		return "streamed\nend\n"
	}
	if rndRoutes[c.route].streamed {
		return strings.Join(rndSSE(c.usage), "")
	}
	return "ai answer for " + c.path() + "\n"
}

// planCalls draws n calls: about 40% with a fresh Idempotency-Key and 20%
// repeating an earlier call's key (half of them a recent one, so that some
// run while the first is in flight).
func planCalls(rng *rand.Rand, n int, orgs []string, gateways int) []rndCall {
	calls := make([]rndCall, 0, n)
	var keyed []int
	hangFor := func() time.Duration { return time.Duration(5+rng.IntN(115)) * time.Millisecond }
	for i := range n {
		if len(keyed) > 0 && rng.IntN(100) < 20 {
			j := keyed[rng.IntN(len(keyed))]
			if rng.IntN(2) == 0 {
				j = keyed[len(keyed)-1-rng.IntN(min(len(keyed), 16))]
			}
			c := calls[j]
			c.id, c.via, c.repeat, c.cancel = i, rng.IntN(gateways), true, hangFor()
			calls = append(calls, c)
			continue
		}
		c := rndCall{id: i, via: rng.IntN(gateways), org: orgs[rng.IntN(len(orgs))], route: rng.IntN(len(rndRoutes))}
		switch p := rng.IntN(100); {
		case p < 12:
			c.kind = rndFail
		case p < 20:
			c.kind, c.cancel = rndHang, hangFor()
		case p < 24:
			c.kind = rndSlow
		case p < 29:
			c.kind = rndStream
		case p < 45:
			c.kind, c.usage = rndUsage, rng.Int64N(6)
		}
		if rndRoutes[c.route].cost == 0 {
			c.xcost = 1 + rng.Int64N(3)
		}
		if rndRoutes[c.route].streamed && c.kind != rndFail && c.kind != rndHang {
			c.kind, c.usage = rndOK, 1+rng.Int64N(8)
			if rng.IntN(2) == 0 {
				c.kind = rndLeave
			}
		}
		if rng.IntN(100) < 40 {
			c.key = fmt.Sprintf("rk-%d", i)
			keyed = append(keyed, i)
		}
		calls = append(calls, c)
	}
	return calls
}

// outcome is how an upstream call ended.
type outcome int

const (
	pending    outcome = iota
	answered           // a 2xx went out: the gateway charges it
	failed             // a 5xx went out: the gateway refunds it
	unanswered         // no answer went out: the gateway refunds it
)

var outcomeNames = [...]string{"pending", "answered", "failed", "unanswered"}

func (o outcome) String() string { return outcomeNames[o] }

// arrival is one call the upstream received.
type arrival struct {
	call                  int // the client's X-Call-Id
	org, route, key, path string
	// at and done are ticks of the shared clock: when the call arrived,
	// and when its outcome was settled (just before a 5xx went out, just
	// after a 2xx did).
	at, done int64
	outcome  outcome
	cost     int64 // what an answered call is charged
}

// ledgerUpstream answers by path as startUpstream does (/fail 500,
// /usage/<n> Credits-Usage: n, /slow later, /hang never), plus /stream: the
// headers and a first line at once, the rest once the caller goes away. It
// keeps an exact record of every call: for which org and key, and whether
// an answer the gateway charges went out, and at what cost.
type ledgerUpstream struct {
	*httptest.Server
	clock  *atomic.Int64
	active atomic.Int64

	mu       sync.Mutex
	arrivals []*arrival
	working  map[int]string // call id -> path, of the calls in progress
}

// upstreamGiveUp bounds how long a /hang or /stream call is held.
const upstreamGiveUp = 10 * time.Second

func startLedgerUpstream(t *testing.T, clock *atomic.Int64) *ledgerUpstream {
	t.Helper()
	u := &ledgerUpstream{clock: clock, working: map[int]string{}}
	u.Server = httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(u.Close)
	return u
}

func (u *ledgerUpstream) serve(w http.ResponseWriter, r *http.Request) {
	u.active.Add(1)
	defer u.active.Add(-1)
	// Read to the end of the body: only then does the server watch the
	// connection, and cancel the context when the gateway goes away.
	io.Copy(io.Discard, r.Body)
	route, rest, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	id, _ := strconv.Atoi(r.Header.Get("X-Call-Id"))
	a := &arrival{call: id, org: r.Header.Get("X-Org-Id"), route: route, key: r.Header.Get("Idempotency-Key"), path: r.URL.Path,
		cost: rndRouteCost(route, r.Header.Get("X-Cost"))}
	if n, ok := strings.CutPrefix(rest, "usage/"); ok {
		a.cost, _ = strconv.ParseInt(n, 10, 64)
		w.Header().Set("Credits-Usage", n)
	}
	u.mu.Lock()
	a.at = u.clock.Add(1)
	u.arrivals = append(u.arrivals, a)
	u.working[id] = r.URL.Path
	u.mu.Unlock()
	defer func() {
		u.mu.Lock()
		delete(u.working, id)
		u.mu.Unlock()
	}()
	end := func(o outcome) {
		u.mu.Lock()
		defer u.mu.Unlock()
		a.outcome, a.done = o, u.clock.Add(1)
	}
	// An upstream's own Credits headers never reach the client.
	w.Header().Set("Credits-Remaining", "upstream")
	w.Header().Set("Credits-Notice", "upstream")
	w.Header().Set("Content-Type", "text/plain")
	ctx := r.Context()
	if n, ok := strings.CutPrefix(rest, "sse/"); ok {
		u.stream(ctx, w, a, n, end)
		return
	}
	switch rest {
	case "fail":
		end(failed)
		w.WriteHeader(http.StatusInternalServerError)
		io.WriteString(w, "backend failed\n")
		return
	case "hang":
		select {
		case <-ctx.Done():
		case <-time.After(upstreamGiveUp):
		}
		end(unanswered)
		panic(http.ErrAbortHandler)
	case "slow":
		select {
		case <-ctx.Done():
			end(unanswered)
			panic(http.ErrAbortHandler)
		case <-time.After(500 * time.Millisecond):
		}
	case "stream":
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, "streamed\n")
		if err := http.NewResponseController(w).Flush(); err != nil {
			end(unanswered)
			panic(http.ErrAbortHandler)
		}
		end(answered)
		select {
		case <-ctx.Done():
			return
		case <-time.After(upstreamGiveUp):
		}
		io.WriteString(w, "end\n")
		return
	}
	w.WriteHeader(http.StatusOK)
	fmt.Fprintf(w, "ai answer for %s\n", r.URL.Path)
	if err := http.NewResponseController(w).Flush(); err != nil {
		end(unanswered)
		panic(http.ErrAbortHandler)
	}
	end(answered)
}

// stream answers a call of the streamed route: its events one by one, a
// little apart. The call is answered, and charged the hold, once the first
// event went out, and charged its usage once the usage event did.
func (u *ledgerUpstream) stream(ctx context.Context, w http.ResponseWriter, a *arrival, tokens string, end func(outcome)) {
	n, _ := strconv.ParseInt(tokens, 10, 64)
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	for i, event := range rndSSE(n) {
		if i > 0 {
			select {
			case <-ctx.Done():
				panic(http.ErrAbortHandler)
			case <-time.After(15 * time.Millisecond):
			}
		}
		_, err := io.WriteString(w, event)
		if err == nil {
			err = rc.Flush()
		}
		if err != nil {
			if i == 0 {
				end(unanswered)
			}
			panic(http.ErrAbortHandler)
		}
		switch i {
		case 0:
			end(answered)
		case rndSSEUsage:
			u.mu.Lock()
			a.cost = n
			u.mu.Unlock()
		}
	}
}

// inProgress returns the calls the upstream works on, by call id.
func (u *ledgerUpstream) inProgress() map[int]string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return maps.Clone(u.working)
}

// snapshot returns copies of the arrivals so far.
func (u *ledgerUpstream) snapshot() []arrival {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := make([]arrival, len(u.arrivals))
	for i, a := range u.arrivals {
		out[i] = *a
	}
	return out
}

// rndResult is what a client saw of its call.
type rndResult struct {
	err      error
	status   int
	header   http.Header
	body     string
	replayed bool
	left     bool // the client went away before the end of the answer
	// began and ended bound the call, for an error on a connection that
	// a reload closed.
	began, ended time.Time
}

// rndClients sends the calls and keeps, for the calls whose client gave up,
// the clock's tick just before it did.
type rndClients struct {
	client *http.Client
	urls   []string
	clock  *atomic.Int64
	leave  bool // rndLeave's clients go away after the first event

	mu      sync.Mutex
	gaveUp  map[int]int64
	results []rndResult
}

func (cl *rndClients) do(c rndCall) rndResult {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, cl.urls[c.via]+c.path(), strings.NewReader("{}"))
	if err != nil {
		return rndResult{err: err}
	}
	req.Header.Set("X-Org-Id", c.org)
	req.Header.Set("X-Call-Id", strconv.Itoa(c.id))
	if c.xcost != 0 {
		req.Header.Set("X-Cost", strconv.FormatInt(c.xcost, 10))
	}
	if c.key != "" {
		req.Header.Set("Idempotency-Key", c.key)
	}
	if c.kind == rndHang {
		timer := time.AfterFunc(c.cancel, func() {
			cl.mu.Lock()
			cl.gaveUp[c.id] = cl.clock.Add(1)
			cl.mu.Unlock()
			cancel()
		})
		defer timer.Stop()
	}
	resp, err := cl.client.Do(req)
	if err != nil {
		return rndResult{err: err}
	}
	defer resp.Body.Close()
	res := rndResult{status: resp.StatusCode, header: resp.Header, replayed: resp.Header.Get("Idempotent-Replayed") == "true"}
	if c.kind == rndStream && resp.StatusCode == http.StatusOK && !res.replayed {
		// Gone after the headers: the upstream has answered, the call is
		// charged.
		cl.mu.Lock()
		cl.gaveUp[c.id] = cl.clock.Add(1)
		cl.mu.Unlock()
		cancel()
		res.left = true
		return res
	}
	if c.kind == rndLeave && cl.leave && resp.StatusCode == http.StatusOK && !res.replayed {
		// Gone after the first event, before the usage.
		rd := bufio.NewReader(resp.Body)
		for {
			line, err := rd.ReadString('\n')
			if err != nil {
				res.err = err
				return res
			}
			if line == "\n" {
				break
			}
		}
		cl.mu.Lock()
		cl.gaveUp[c.id] = cl.clock.Add(1)
		cl.mu.Unlock()
		cancel()
		res.left = true
		return res
	}
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		res.err = err
	}
	res.body = string(data)
	return res
}

// check returns what is wrong with a call's answer, or "".
func (c rndCall) check(r rndResult) string {
	rt := rndRoutes[c.route]
	if r.err != nil {
		if c.kind == rndHang && errors.Is(r.err, context.Canceled) {
			return ""
		}
		return fmt.Sprintf("error %v", r.err)
	}
	if r.header.Get("Credits-Notice") == "upstream" || len(r.header.Values("Credits-Remaining")) > 1 ||
		r.header.Get("Credits-Remaining") == "upstream" || r.header.Get("Credits-Usage") != "" {
		return fmt.Sprintf("the upstream's Credits headers reached the client: %v", r.header)
	}
	charged := r.header.Get("Credits-Charged")
	switch r.status {
	case http.StatusOK:
		if r.replayed {
			switch {
			case c.key == "":
				return "a replay for a call without a key"
			case charged != "0":
				return fmt.Sprintf("a replay with Credits-Charged %q", charged)
			case r.body != c.body():
				return fmt.Sprintf("replayed body %q, want %q", r.body, c.body())
			}
			return ""
		}
		if c.kind == rndFail || c.kind == rndHang {
			return "answered 200 without a replay"
		}
		if charged != "" && charged != strconv.FormatInt(c.cost(), 10) {
			return fmt.Sprintf("Credits-Charged %s, want %d", charged, c.cost())
		}
		if !r.left && r.body != c.body() {
			return fmt.Sprintf("body %q, want %q", r.body, c.body())
		}
	case http.StatusPaymentRequired:
		if rt.unlimited {
			return "402 on a route with unlimited overdraft"
		}
		if charged != "0" {
			return fmt.Sprintf("402 with Credits-Charged %q", charged)
		}
	case http.StatusConflict:
		if c.key == "" {
			return "409 without a key"
		}
	case http.StatusInternalServerError:
		if c.kind != rndFail {
			return "500 from an upstream that answered 200"
		}
		if charged != "" && charged != "0" {
			return fmt.Sprintf("a refunded call with Credits-Charged %q", charged)
		}
	case http.StatusServiceUnavailable:
		// A call with an Idempotency-Key is never forwarded blind, even on
		// a fail_mode open route.
		if !rt.closed && c.key == "" {
			return "503 on a fail_mode open route"
		}
		if r.header.Get("Retry-After") != "1" {
			return "503 without Retry-After: 1"
		}
	default:
		return fmt.Sprintf("status %d", r.status)
	}
	return ""
}

// keyViolation is a key that reached the upstream once too often.
type keyViolation struct {
	org, key, what string
}

// keyViolations returns the pairs of upstream calls with one key that the
// gateway let through together.
//
// A call holds its key from its charge until its refund frees it, or for
// good once it was answered. Its refund comes after its 5xx went out, or
// after its client gave up: the call's "freed" tick, which is never for an
// answered call. Of two calls that held the key one after the other, the
// first was freed before the second was charged, so before the second
// reached the upstream. A call whose client gave up before it reached the
// upstream may still get there after the next call did: it was freed
// first, and that is allowed.
func keyViolations(arrivals []arrival, gaveUp map[int]int64) []keyViolation {
	byKey := map[[2]string][]arrival{}
	for _, a := range arrivals {
		if a.key != "" {
			k := [2]string{a.org, a.key}
			byKey[k] = append(byKey[k], a)
		}
	}
	freed := func(a arrival) int64 {
		switch a.outcome {
		case answered:
			return math.MaxInt64
		case failed:
			return a.done
		}
		if tick, ok := gaveUp[a.call]; ok {
			return min(tick, a.done)
		}
		return a.done // the gateway gave up on its own
	}
	var out []keyViolation
	for k, as := range byKey {
		slices.SortFunc(as, func(a, b arrival) int { return cmp.Compare(a.at, b.at) })
		for i, a := range as {
			for _, b := range as[i+1:] {
				if freed(a) < b.at || freed(b) < a.at {
					continue
				}
				what := "while call %d still held it"
				if a.outcome == answered {
					what = "after call %d was answered and charged"
				}
				out = append(out, keyViolation{org: k[0], key: k[1],
					what: fmt.Sprintf("call %d reached the upstream "+what, b.call, a.call)})
			}
		}
	}
	slices.SortFunc(out, func(a, b keyViolation) int { return strings.Compare(a.org+" "+a.key, b.org+" "+b.key) })
	return out
}

// randomizedSeed is the seed from the environment, or a fresh one.
func randomizedSeed(t *testing.T) uint64 {
	t.Helper()
	if s := os.Getenv(randomizedSeedEnv); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", randomizedSeedEnv, s, err)
		}
		return seed
	}
	return rand.Uint64()
}

// TestRandomizedPath: see the top of the file. RANDOMIZED_PATH_SEED=<seed>
// draws the same mix again; the interleaving of the concurrent calls, and
// which replies are cut, differ from run to run.
func TestRandomizedPath(t *testing.T) {
	seed := randomizedSeed(t)
	edges := randomizedEdges(t)
	t.Logf("seed %d, edges %s (rerun with %s=%d %s=%s)", seed, edges, randomizedSeedEnv, seed, randomizedEdgesEnv, edges)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))

	// Orgs on plans from tiny (402s within the first calls) to plenty,
	// one with purchased credits only, and two that the corrupt edge may
	// corrupt.
	orgs := []string{"rnd-tiny", "rnd-small", "rnd-mid", "rnd-big", "rnd-plenty", "rnd-bought", "rnd-frail-1", "rnd-frail-2"}
	allowances := []int64{15, 120, 600, 1_000_000, 1_000_000, 0, 1_000_000, 1_000_000}
	const gateways = 2
	calls := planCalls(rng, randomizedCalls, orgs, gateways)
	cutFrom, cutTo := len(calls)/5, len(calls)*4/5
	// Heavy enough that now and then all four tries of one store call lose
	// their replies, so that the gateway must void, defer or resend.
	cutEvery := []int{3 + rng.IntN(3), 2 + rng.IntN(2)}
	plan := planEdges(rng, cutFrom, cutTo, orgs[6:])

	buildCaddy(t) // before the clocks are set: the first build takes a while
	var offset time.Duration
	var midnight time.Time
	if edges.Midnight {
		offset, midnight = rndMidnight(plan.midnightIn)
		t.Setenv(clockOffsetEnv, offset.String())
		t.Logf("the gateways' clocks are %s ahead: UTC midnight %s comes in %s", offset, midnight.Format(time.DateOnly), plan.midnightIn)
	}
	gatewayNow := func() time.Time { return time.Now().UTC().Add(offset) }

	srv := redistest.Start(t, redistest.Options{})
	rdb := srv.Client(t)
	proxies := []*faultproxy.Proxy{faultproxy.Start(t, srv.Addr), faultproxy.Start(t, srv.Addr)}
	var clock atomic.Int64
	up := startLedgerUpstream(t, &clock)

	// The first gateway runs in this process; startGateway's own upstream
	// is replaced by the recording one with a config reload.
	site := rndMetricsSite + "\n\t" + strings.ReplaceAll(rndChatSite, "{UPSTREAM}", up.URL)
	g := startGateway(t, gatewayOptions{store: "redis redis://" + proxies[0].Addr, site: site})
	g.redis = srv
	g.config = strings.ReplaceAll(g.config, g.upstream.URL, up.URL)
	loadCaddyfile(t, g.config)
	reloadInProcess, err := inProcessReload(g.config)
	if err != nil {
		t.Fatal(err)
	}
	// The second is a caddy process of its own, with Caddy's admin
	// endpoint for its reloads.
	port, adminPort, caddyAdmin := freePort(t), freePort(t), freePort(t)
	cfg := strings.NewReplacer(
		"{STORE}", "redis redis://"+proxies[1].Addr, "{TIMEOUT}", "300ms", "{PORT}", fmt.Sprint(port),
		"{ADMINPORT}", fmt.Sprint(adminPort), "{DEADPORT}", fmt.Sprint(freePort(t)), "{UPSTREAM}", up.URL,
		"{GLOBAL}", "", "{OPTIONS}", "", "{SITE}", site,
	).Replace(gatewayCaddyfile)
	cfg = strings.Replace(cfg, "admin off", fmt.Sprintf("admin 127.0.0.1:%d\n\tpersist_config off", caddyAdmin), 1)
	startCaddyProcess(t, cfg, fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("127.0.0.1:%d", caddyAdmin))
	urls := []string{g.url, fmt.Sprintf("http://127.0.0.1:%d", port)}

	for _, u := range urls {
		r := g.do(http.MethodPost, u+"/rich-text/generate", map[string]string{"X-Org-Id": "rnd-warmup"}, "{}")
		wantStatus(t, r, http.StatusOK)
	}
	if n := len(up.snapshot()); n != 2 {
		t.Fatalf("the recording upstream received %d of the 2 warm-up calls", n)
	}

	month := int(gatewayNow().Month()) // the next recharge is a year away
	for i, allowance := range allowances {
		r := g.admin(http.MethodPut, "/orgs/"+orgs[i]+"/plan", fmt.Sprintf(`{"allowance": %d, "recharge_month": %d}`, allowance, month))
		wantStatus(t, r, http.StatusOK)
	}
	g.topUp("rnd-bought", 300)
	start := map[string]int64{}
	for _, org := range orgs {
		start[org] = g.balance(org)
	}

	t.Logf("cutting one reply in %d to the in-process gateway and one in %d to the caddy process during calls %d to %d",
		cutEvery[0], cutEvery[1], cutFrom, cutTo)
	if edges.Reload {
		t.Logf("reloading the in-process gateway before calls %v and the caddy process before calls %v", plan.reloadAt[0], plan.reloadAt[1])
	}
	if edges.Partition {
		t.Logf("cutting gateway %d off from Redis for %s from call %d", plan.partitioned, plan.partitionFor, plan.partitionAt)
	}
	if edges.OOM {
		t.Logf("Redis out of memory for %s from call %d", plan.oomFor, plan.oomAt)
	}
	// corrupted are the orgs the corrupt edge corrupts: their answers and
	// charges are not checked, every other org's are, exactly.
	corrupted := map[string]rndCorruption{}
	if edges.Corrupt {
		for _, c := range plan.corrupt {
			corrupted[c.org] = c
			t.Logf("corrupting %s's %s (to a %s) before call %d", c.org, c.key(), c.wrongType(), plan.corruptAt)
		}
	}
	checked := slices.DeleteFunc(slices.Clone(orgs), func(org string) bool { _, ok := corrupted[org]; return ok })

	reloaders := []*rndReloader{
		startReloader("the in-process gateway", reloadInProcess),
		startReloader("the caddy process", processReload(&http.Client{Timeout: time.Minute}, fmt.Sprintf("127.0.0.1:%d", caddyAdmin), cfg)),
	}
	cl := &rndClients{
		client: &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 2 * randomizedWorkers}},
		urls:   urls, clock: &clock, leave: edges.Leave, gaveUp: map[int]int64{}, results: make([]rndResult, len(calls)),
	}
	defer cl.client.CloseIdleConnections()
	began := time.Now()
	gatewayBegan := gatewayNow()
	work := make(chan int)
	var wg sync.WaitGroup
	for range randomizedWorkers {
		wg.Go(func() {
			for i := range work {
				began := time.Now()
				res := cl.do(calls[i])
				res.began, res.ended = began, time.Now()
				cl.mu.Lock()
				cl.results[i] = res
				cl.mu.Unlock()
			}
		})
	}
	var partition *rndPartition
	var oom *rndOOM
	sent := 0
	// The middle calls are spread over rndMiddle, one every slot.
	slot := rndMiddle / time.Duration(cutTo-cutFrom)
	var middle time.Time
	for i := range calls {
		if time.Since(began) > randomizedBudget {
			t.Logf("time is up after %d calls", i)
			break
		}
		switch i {
		case cutFrom:
			middle = time.Now()
			for j, p := range proxies {
				p.CutReplyEvery(cutEvery[j])
			}
		case cutTo:
			for _, p := range proxies {
				p.CutReplyEvery(0)
			}
		}
		if i >= cutFrom && i < cutTo {
			time.Sleep(time.Until(middle.Add(time.Duration(i-cutFrom) * slot))) // pacing, not a wait
		}
		if edges.Reload {
			for j, at := range plan.reloadAt {
				if slices.Contains(at, i) {
					reloaders[j].ch <- i
				}
			}
		}
		if edges.Partition && i == plan.partitionAt {
			partition = startPartition(proxies[plan.partitioned], plan.partitionFor)
		}
		if edges.OOM && i == plan.oomAt {
			oom = startOOM(rdb, plan.oomFor)
		}
		if edges.Corrupt && i == plan.corruptAt {
			for _, c := range plan.corrupt {
				// Redis refuses the writes while it is out of memory (the
				// OOM edge may still run): try until it takes them.
				deadline := time.Now().Add(10 * time.Second)
				for {
					err := c.apply(t.Context(), rdb)
					if err == nil {
						break
					}
					if time.Now().After(deadline) || !strings.Contains(err.Error(), "OOM") && !strings.Contains(err.Error(), "EXECABORT") {
						t.Fatalf("corrupting %s: %v", c.org, err)
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
		}
		work <- i
		sent++
	}
	close(work)
	wg.Wait()
	gatewayEnded := gatewayNow()
	for _, p := range proxies {
		p.CutReplyEvery(0)
	}
	for _, r := range reloaders {
		r.stop(t)
	}
	if partition != nil {
		<-partition.done
	}
	if oom != nil {
		<-oom.done
		if oom.err != nil {
			t.Errorf("Redis out of memory: %v", oom.err)
		}
		t.Logf("Redis at maxmemory %d for %s refused %d calls", oom.limit, plan.oomFor, oom.refused)
		if oom.refused == 0 {
			t.Errorf("Redis at its memory limit refused no call: the OOM edge did not happen")
		}
	}
	if edges.Midnight {
		t.Logf("the calls ran from %s to %s on the gateways' clocks", gatewayBegan.Format(time.TimeOnly+".000"), gatewayEnded.Format(time.TimeOnly+".000"))
		if !gatewayBegan.Before(midnight) || !gatewayEnded.After(midnight) {
			t.Errorf("UTC midnight %s of the gateways' clocks did not fall during the calls", midnight)
		}
	}
	callsTook := time.Since(began)

	// Let the dust settle: no upstream call in progress, and for longer
	// than a backlog's longest wait between tries (2s), no org's balance
	// changing and no store call failing on either gateway (every failed
	// try of a deferred call counts as a store error). That this process's
	// backlog is empty is checked last.
	settled := time.Now()
	logged := false
	eventuallyWithin(t, 15*time.Second, "the upstream has no call in progress", func() bool {
		if n := up.active.Load(); n != 0 && !logged && time.Since(settled) > time.Second {
			logged = true
			t.Logf("the upstream still works on %v", up.inProgress())
		}
		return up.active.Load() == 0
	})
	var last map[string]int64
	changed := map[string]time.Time{}
	lastChange := time.Now()
	for deadline := time.Now().Add(rndSettleLimit); ; {
		now := map[string]int64{}
		for _, org := range checked {
			now[org] = g.balance(org)
		}
		for i, u := range urls {
			now[fmt.Sprintf("store errors of gateway %d", i)] = storeErrors(t, u)
		}
		for k, v := range now {
			if w, ok := last[k]; ok && w != v {
				changed[k] = time.Now()
			}
		}
		if !maps.Equal(now, last) {
			last, lastChange = now, time.Now()
		} else if time.Since(lastChange) > 2500*time.Millisecond {
			break
		}
		if time.Now().After(deadline) {
			var still []string
			for k, at := range changed {
				if time.Since(at) < 5*time.Second {
					still = append(still, k)
				}
			}
			slices.Sort(still)
			t.Errorf("%s after the last call, these still change: %s (a deferred call that never succeeds?); now %v",
				rndSettleLimit, strings.Join(still, ", "), now)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	settleTook := time.Since(settled)

	// What the clients saw.
	arrivals := up.snapshot()
	cl.mu.Lock()
	results := slices.Clone(cl.results[:sent])
	gaveUp := maps.Clone(cl.gaveUp)
	cl.mu.Unlock()
	var problems []string
	statuses := [2]map[int]int{{}, {}}
	clientOK, clientFail := map[string]int64{}, map[string]int64{}
	replays, reloadCut := 0, 0
	for i, r := range results {
		c := calls[i]
		if _, ok := corrupted[c.org]; ok {
			continue
		}
		// A reload closes its old server's idle connections: a call sent on
		// one as it closes fails without an answer (Go's client resends only
		// idempotent requests). Whatever reached the upstream is counted
		// there.
		if r.err != nil && !errors.Is(r.err, context.Canceled) && reloaders[c.via].during(r.began, r.ended) {
			reloadCut++
			continue
		}
		if p := c.check(r); p != "" {
			problems = append(problems, fmt.Sprintf("call %d (%s %s via %d, key %q): %s", c.id, c.org, c.path(), c.via, c.key, p))
		}
		status := r.status
		if r.err != nil {
			status = 0
		}
		statuses[c.via][status]++
		switch {
		case r.err != nil:
		case r.status == http.StatusOK && r.replayed:
			replays++
		case r.status == http.StatusOK:
			clientOK[c.org]++
		case r.status == http.StatusInternalServerError:
			clientFail[c.org]++
		}
	}
	for i, p := range problems {
		if i == 30 {
			t.Errorf("... and %d more", len(problems)-30)
			break
		}
		t.Error(p)
	}

	// history logs what happened to every call with org's key.
	history := func(org, key string) {
		for j, c := range calls[:sent] {
			if c.org != org || c.key != key {
				continue
			}
			r := results[j]
			var story []string
			if tick, ok := gaveUp[c.id]; ok {
				story = append(story, fmt.Sprintf("its client gave up at tick %d", tick))
			}
			for _, a := range arrivals {
				if a.call == c.id {
					story = append(story, fmt.Sprintf("it reached the upstream at tick %d, %s at tick %d", a.at, a.outcome, a.done))
				}
			}
			t.Logf("  call %d via gateway %d, %s: status %d, replayed %v, Credits-Charged %q, error %v; %s",
				c.id, c.via, c.path(), r.status, r.replayed, r.header.Get("Credits-Charged"), r.err, strings.Join(story, "; "))
		}
	}

	// What the upstream saw against what the ledger holds.
	type tally struct {
		answered, failed, hung int64
		cost                   int64
		byRoute                map[string]int64
	}
	tallies := map[string]*tally{}
	for _, org := range checked {
		tallies[org] = &tally{byRoute: map[string]int64{}}
	}
	for _, a := range arrivals {
		tl := tallies[a.org]
		if tl == nil {
			continue // the warm-up, or a corrupted org
		}
		switch a.outcome {
		case answered:
			tl.answered++
			tl.cost += a.cost
			tl.byRoute[a.route] += a.cost
		case failed:
			tl.failed++
		case unanswered:
			tl.hung++
		default:
			t.Errorf("call %d of %s: no outcome at the upstream", a.call, a.org)
		}
	}
	leftCharged := 0 // clients that left a streamed answer, charged its usage
	for i, r := range results {
		if c := calls[i]; r.left && c.kind == rndLeave && tallies[c.org] != nil {
			for _, a := range arrivals {
				if a.call == c.id && a.outcome == answered && a.cost == c.usage && c.usage != rndRoutes[c.route].cost {
					leftCharged++
				}
			}
		}
	}
	bothDays := 0 // orgs with usage on both sides of midnight
	for _, org := range checked {
		tl := tallies[org]
		a := g.account(org)
		final := int64(a["balance"].(float64))
		off := false // the ledger disagrees with the upstream
		if charged := start[org] - final; charged != tl.cost {
			off = true
			t.Errorf("org %s: charged %d (balance %d to %d), but the upstream answered %d calls costing %d",
				org, charged, start[org], final, tl.answered, tl.cost)
		}
		used, _ := a["used"].(map[string]any)
		for _, rt := range rndRoutes {
			got, _ := used[rt.name].(float64)
			if int64(got) != tl.byRoute[rt.name] {
				off = true
				t.Errorf("org %s: used %s %v, but the upstream's answers on it cost %d", org, rt.name, got, tl.byRoute[rt.name])
			}
		}
		if edges.Midnight {
			// The days add up to the period's usage.
			sum, days := dayUsage(t, g, org, midnight)
			for _, rt := range rndRoutes {
				got, _ := used[rt.name].(float64)
				if sum[rt.name] != int64(got) {
					off = true
					t.Errorf("org %s: its days' usage of %s adds up to %d, but used is %v; days %v", org, rt.name, sum[rt.name], got, days)
				}
			}
			var before, after int64
			for _, d := range days {
				for _, n := range d.Used {
					if d.Date < midnight.Format(time.DateOnly) {
						before += n
					} else {
						after += n
					}
				}
			}
			if before > 0 && after > 0 {
				bothDays++
			}
		}
		if held, _ := a["held"].(float64); held != 0 {
			t.Errorf("org %s: %v credits held, with no hold or lease; holds %v", org, held, g.holds(org))
		}
		if clientOK[org] != tl.answered || clientFail[org] != tl.failed {
			t.Errorf("org %s: the clients got %d answers and %d 5xx from the upstream, which sent %d and %d",
				org, clientOK[org], clientFail[org], tl.answered, tl.failed)
		}
		sum, byRef, n := eventsCharged(t, g, org)
		if n < maxEvents && sum != tl.cost {
			off = true
			t.Errorf("org %s: its %d events charge %d, the upstream's answers cost %d", org, n, sum, tl.cost)
		}
		if !off || n == maxEvents {
			continue
		}
		// Which keys were charged other than their answers cost (calls
		// without a key have request ids the upstream does not see).
		keyCost := map[string]int64{}
		for _, a := range arrivals {
			if a.org == org && a.key != "" && a.outcome == answered {
				keyCost[a.key] += a.cost
			}
		}
		var keys []string
		for _, c := range calls[:sent] {
			if c.org == org && c.key != "" && !c.repeat {
				keys = append(keys, c.key)
			}
		}
		shown := 0
		for _, key := range keys {
			if got := byRef["i:"+key]; got != keyCost[key] && shown < 3 {
				shown++
				t.Errorf("org %s, key %s: charged %d, the upstream's answers cost %d; the key's calls:", org, key, got, keyCost[key])
				history(org, key)
			}
		}
	}
	violations := keyViolations(arrivals, gaveUp)
	for i, v := range violations {
		if i == 10 {
			t.Errorf("... and %d more", len(violations)-10)
			break
		}
		t.Errorf("org %s, key %s: %s; the key's calls:", v.org, v.key, v.what)
		history(v.org, v.key)
	}

	// The mix did what it is for.
	hungAtUpstream := int64(0)
	for _, tl := range tallies {
		hungAtUpstream += tl.hung
	}
	for name, n := range map[string]int64{
		"replies cut to the in-process gateway": proxies[0].Cuts(),
		"replies cut to the caddy process":      proxies[1].Cuts(),
		"replays":                               int64(replays),
		"402s":                                  int64(statuses[0][http.StatusPaymentRequired] + statuses[1][http.StatusPaymentRequired]),
		"5xx from the upstream":                 int64(statuses[0][http.StatusInternalServerError] + statuses[1][http.StatusInternalServerError]),
		"calls abandoned at the upstream":       hungAtUpstream,
	} {
		if n == 0 {
			t.Errorf("no %s: the mix did not exercise them", name)
		}
	}
	if edges.Leave && leftCharged == 0 {
		t.Errorf("no client that left a streamed answer was charged its usage: the mix did not exercise them")
	}
	if edges.Midnight && bothDays == 0 {
		t.Errorf("no org used credits on both days of midnight: the mix did not exercise it")
	}
	// The corrupt keys are still what the edge made them: no gateway wrote
	// over them.
	for _, c := range corrupted {
		if typ, err := rdb.Type(t.Context(), c.key()).Result(); err != nil || typ != c.wrongType() {
			t.Errorf("%s is now a %q (%v), not the %s it was corrupted to", c.key(), typ, err, c.wrongType())
		}
	}
	t.Logf("%d calls failed on a connection a reload closed", reloadCut)
	t.Logf("%d clients left a streamed answer and were charged its usage; %d orgs used credits on both days of midnight", leftCharged, bothDays)
	kinds := map[string]int{}
	for _, c := range calls[:sent] {
		name := c.kind.String()
		if c.repeat {
			name += " (repeat)"
		} else if c.key != "" {
			name += " (key)"
		}
		kinds[name]++
	}
	t.Logf("%d calls in %s, settled in %s; kinds %v", sent, callsTook.Round(time.Millisecond), settleTook.Round(time.Millisecond), kinds)
	t.Logf("answers by status (0: the client gave up): in-process %v, caddy process %v; %d replays", statuses[0], statuses[1], replays)
	t.Logf("%d upstream calls; replies cut: %d and %d", len(arrivals), proxies[0].Cuts(), proxies[1].Cuts())
	for _, org := range checked {
		tl := tallies[org]
		t.Logf("org %s: start %d, charged %d for %d answered calls (%d failed, %d abandoned at the upstream)",
			org, start[org], tl.cost, tl.answered, tl.failed, tl.hung)
	}
	if !t.Failed() {
		drained(t)
	}
	if t.Failed() {
		t.Logf("seed %d, edges %s (rerun with %s=%d %s=%s)", seed, edges, randomizedSeedEnv, seed, randomizedEdgesEnv, edges)
	}
}

// storeErrors reads caddy_credits_store_errors_total from a gateway's
// metrics.
func storeErrors(t *testing.T, url string) int64 {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("metrics of %s: %d %v", url, resp.StatusCode, err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "caddy_credits_store_errors_total "); ok {
			n, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metrics of %s: %q", url, line)
			}
			return int64(n)
		}
	}
	return 0 // no store call has failed yet
}

// eventsCharged sums what org's charge, settle and refund events took, in
// all and by request id, and returns how many events it read.
func eventsCharged(t *testing.T, g *gateway, org string) (charged int64, byRef map[string]int64, n int) {
	t.Helper()
	r := g.admin(http.MethodGet, fmt.Sprintf("/orgs/%s/events?limit=%d", org, maxEvents), "")
	wantStatus(t, r, http.StatusOK)
	var body struct {
		Events []struct {
			Kind  string `json:"kind"`
			Delta int64  `json:"delta"`
			Ref   string `json:"ref"`
		} `json:"events"`
	}
	if err := json.Unmarshal(r.body, &body); err != nil {
		t.Fatalf("events of %s: %v", org, err)
	}
	byRef = map[string]int64{}
	for _, e := range body.Events {
		switch e.Kind {
		case "charge", "settle", "refund":
			charged -= e.Delta
			byRef[e.Ref] -= e.Delta
		}
	}
	return charged, byRef, len(body.Events)
}
