package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// The leasing suite: two built caddy processes, each with its own Caddyfile
// and admin endpoint, lease credits of one real redis-server in front of one
// real upstream, while the ledger is changed under them (recharges, a plan
// change), a gateway's clock is skewed, Redis stalls during a reload, or a
// gateway is killed. Afterwards the upstream's own count of the calls it
// answered must match what the ledger charged, within the bounds the README
// states.

// leasedRoute is the block route the load calls, of cost 1, and the route
// name the upstream counts its calls under.
const (
	leasedPath  = "/background-removal/x"
	leasedRoute = "background-removal"
	leasedToken = "s3cret"
)

// leasedCaddyfile is one gateway: a leased block route in front of the
// upstream, credits_admin on a port of its own, and Caddy's admin endpoint
// on another (for /load). Every answer carries X-Config, so that a reload
// shows in the answers.
const leasedCaddyfile = `{
	admin 127.0.0.1:{CADDYADMINPORT}
	credits {
		redis redis://{REDIS}
		timeout {TIMEOUT}
		default_plan 0
		lease {LEASE}
	}
}
http://127.0.0.1:{PORT} {
	header X-Config {GENERATION}
	route /background-removal/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature background-removal
			cost 1
			on_exhausted block
		}
		reverse_proxy {UPSTREAM}
	}
	route /budgeted/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature budgeted
			cost 1
			budget {http.request.header.X-User-Id}
		}
		reverse_proxy {UPSTREAM}
	}
}
http://127.0.0.1:{ADMINPORT} {
	handle_path /admin/* {
		credits_admin {
			token ` + leasedToken + `
		}
	}
}
`

// leasedConfig fills leasedCaddyfile.
type leasedConfig struct {
	redis, upstream, timeout        string
	lease                           int64
	port, adminPort, caddyAdminPort int
	generation                      int
}

func (c leasedConfig) caddyfile() string {
	return strings.NewReplacer(
		"{CADDYADMINPORT}", fmt.Sprint(c.caddyAdminPort),
		"{REDIS}", c.redis,
		"{TIMEOUT}", c.timeout,
		"{LEASE}", fmt.Sprint(c.lease),
		"{PORT}", fmt.Sprint(c.port),
		"{GENERATION}", fmt.Sprint(c.generation),
		"{UPSTREAM}", c.upstream,
		"{ADMINPORT}", fmt.Sprint(c.adminPort),
	).Replace(leasedCaddyfile)
}

// leasedGateway is the built caddy running leasedCaddyfile in its own
// process.
type leasedGateway struct {
	name     string
	proc     *caddyProcess
	cfg      leasedConfig
	url      string // the metered site
	adminURL string // the credits_admin mount
	client   *http.Client
}

// startLeasedGateway starts a gateway process on free ports, leasing lease
// credits at a time from the redis-server at redisAddr. The process inherits
// this process' environment (CREDITS_CLOCK_OFFSET included).
func startLeasedGateway(t *testing.T, name, redisAddr, upstreamURL string, lease int64, timeout string) *leasedGateway {
	t.Helper()
	cfg := leasedConfig{redis: redisAddr, upstream: upstreamURL, timeout: timeout, lease: lease,
		port: freePort(t), adminPort: freePort(t), caddyAdminPort: freePort(t), generation: 1}
	g := &leasedGateway{
		name:     name,
		cfg:      cfg,
		url:      fmt.Sprintf("http://127.0.0.1:%d", cfg.port),
		adminURL: fmt.Sprintf("http://127.0.0.1:%d/admin", cfg.adminPort),
		client:   &http.Client{Timeout: 10 * time.Second},
	}
	g.proc = startCaddyProcess(t, cfg.caddyfile(),
		fmt.Sprintf("127.0.0.1:%d", cfg.port),
		fmt.Sprintf("127.0.0.1:%d", cfg.adminPort),
		fmt.Sprintf("127.0.0.1:%d", cfg.caddyAdminPort))
	t.Cleanup(g.client.CloseIdleConnections)
	return g
}

// reload posts the gateway's Caddyfile, with the next generation, to
// Caddy's admin /load, and returns once Caddy has switched to it.
func (g *leasedGateway) reload(t *testing.T) {
	t.Helper()
	g.cfg.generation++
	req, err := http.NewRequest(http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/load", g.cfg.caddyAdminPort),
		strings.NewReader(g.cfg.caddyfile()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := g.client.Do(req)
	if err != nil {
		t.Fatalf("gateway %s: reload: %v", g.name, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("gateway %s: reload: %d %s", g.name, resp.StatusCode, body)
	}
}

// leasedAccount is the part of an account the leasing tests read.
type leasedAccount struct {
	Balance            int64 `json:"balance"`
	Held               int64 `json:"held"`
	Available          int64 `json:"available"`
	AllowanceRemaining int64 `json:"allowance_remaining"`
	Purchased          int64 `json:"purchased"`
}

// adminCall calls the gateway's credits_admin and decodes a 200 answer into
// out; it never calls t.Fatal, so that load goroutines may use it.
func (g *leasedGateway) adminCall(method, path, body string, out any) error {
	req, err := http.NewRequest(method, g.adminURL+path, strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+leasedToken)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := g.client.Do(req)
	if err != nil {
		return fmt.Errorf("gateway %s: %s %s: %w", g.name, method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("gateway %s: %s %s: %w", g.name, method, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("gateway %s: %s %s: %d %s", g.name, method, path, resp.StatusCode, data)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("gateway %s: %s %s: %s: %w", g.name, method, path, data, err)
	}
	return nil
}

// admin is adminCall for the test's own goroutine.
func (g *leasedGateway) admin(t *testing.T, method, path, body string) leasedAccount {
	t.Helper()
	var a leasedAccount
	if err := g.adminCall(method, path, body, &a); err != nil {
		t.Fatal(err)
	}
	return a
}

// leasedHold is one of an org's holds, as GET /holds lists it.
type leasedHold struct {
	ID         string `json:"hold"`
	State      string `json:"state"`
	Amount     int64  `json:"amount"`
	LastReport string `json:"last_report"`
}

func (g *leasedGateway) holds(t *testing.T, org string) []leasedHold {
	t.Helper()
	var out struct {
		Holds []leasedHold `json:"holds"`
	}
	if err := g.adminCall(http.MethodGet, "/orgs/"+org+"/holds", "", &out); err != nil {
		t.Fatal(err)
	}
	return out.Holds
}

func (g *leasedGateway) account(t *testing.T, org string) leasedAccount {
	t.Helper()
	return g.admin(t, http.MethodGet, "/orgs/"+org, "")
}

// settled polls org's account until no lease holds any of its credits and
// its balance has stayed the same for a second (two idle periods of the
// flush, and the backlog's retries), and returns it.
func (g *leasedGateway) settled(t *testing.T, org string, limit time.Duration) leasedAccount {
	t.Helper()
	start := time.Now()
	deadline := start.Add(limit)
	last := g.account(t, org)
	since := time.Now()
	for {
		a := g.account(t, org)
		if a != last {
			last, since = a, time.Now()
		}
		if a.Held == 0 && time.Since(since) >= time.Second {
			t.Logf("org %s settled %s after the load: %+v", org, time.Since(start).Round(time.Millisecond), a)
			return a
		}
		if time.Now().After(deadline) {
			t.Fatalf("org %s did not settle within %s (no lease holding credits, a balance that stays): last %+v", org, limit, a)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ledgerEvent is one entry of an org's event log.
type ledgerEvent struct {
	Kind    string `json:"kind"`
	Delta   int64  `json:"delta"`
	Balance int64  `json:"balance"`
	Ref     string `json:"ref"`
}

// events returns org's whole event log, oldest first; it fails the test if
// the log was cut (it keeps at most 1000 events).
func (g *leasedGateway) events(t *testing.T, org string) []ledgerEvent {
	t.Helper()
	var out struct {
		Events []ledgerEvent `json:"events"`
	}
	if err := g.adminCall(http.MethodGet, "/orgs/"+org+"/events?limit=1000", "", &out); err != nil {
		t.Fatal(err)
	}
	if len(out.Events) >= 1000 {
		t.Fatalf("org %s has %d events: the log may be cut, the test cannot add it up", org, len(out.Events))
	}
	slices.Reverse(out.Events)
	return out.Events
}

// leasedLoad calls the leased route for one org from workers spread over
// the gateways, until it is stopped, has sent its most calls, or has run its
// longest time.
type leasedLoad struct {
	begun time.Time

	mu        sync.Mutex
	statuses  map[int]int
	sent      []time.Duration // when each call was sent, since begun
	generated map[string]int  // answers by X-Config
	perGW     []map[int]int   // answers by status, per gateway
	errs      []string        // the first transport errors (status 0)

	ok        atomic.Int64
	done      atomic.Int64
	inARow402 []atomic.Int64 // per gateway: 402s since its last other answer
	minLeft   atomic.Int64   // the lowest Credits-Remaining seen
	ended     chan struct{}  // closed when the load ended on its own bounds
	workers   int64
	client    *http.Client

	stopOnce sync.Once
	stopCh   chan struct{}
	wg       sync.WaitGroup
}

func startLeasedLoad(t *testing.T, gws []*leasedGateway, org string, workers int, most int64, longest time.Duration) *leasedLoad {
	t.Helper()
	l := &leasedLoad{
		begun:     time.Now(),
		statuses:  map[int]int{},
		generated: map[string]int{},
		perGW:     make([]map[int]int, len(gws)),
		inARow402: make([]atomic.Int64, len(gws)),
		ended:     make(chan struct{}),
		stopCh:    make(chan struct{}),
		workers:   int64(workers),
	}
	for i := range l.perGW {
		l.perGW[i] = map[int]int{}
	}
	l.minLeft.Store(1 << 62)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: workers}}
	deadline := l.begun.Add(longest)
	var endOnce sync.Once
	for w := range workers {
		gi := w % len(gws)
		gw := gws[gi]
		l.wg.Go(func() {
			for {
				select {
				case <-l.stopCh:
					return
				default:
				}
				if l.done.Load() >= most || time.Now().After(deadline) {
					endOnce.Do(func() { close(l.ended) })
					return
				}
				req, _ := http.NewRequest(http.MethodPost, gw.url+leasedPath, nil)
				req.Header.Set("X-Org-Id", org)
				sent := time.Since(l.begun)
				status, generation := 0, ""
				var left int64
				remaining := false
				resp, err := client.Do(req)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					status, generation = resp.StatusCode, resp.Header.Get("X-Config")
					if v := resp.Header.Get("Credits-Remaining"); v != "" {
						_, serr := fmt.Sscan(v, &left)
						remaining = serr == nil
					}
				}
				if remaining {
					for m := l.minLeft.Load(); left < m && !l.minLeft.CompareAndSwap(m, left); m = l.minLeft.Load() {
					}
				}
				if status == http.StatusPaymentRequired {
					l.inARow402[gi].Add(1)
				} else {
					l.inARow402[gi].Store(0)
				}
				if status == http.StatusOK {
					l.ok.Add(1)
				}
				l.mu.Lock()
				l.statuses[status]++
				l.perGW[gi][status]++
				l.sent = append(l.sent, sent)
				if status != 0 {
					l.generated[generation]++
				} else if len(l.errs) < 5 {
					l.errs = append(l.errs, err.Error())
				}
				l.mu.Unlock()
				l.done.Add(1)
			}
		})
	}
	l.client = client
	t.Cleanup(l.stop)
	return l
}

// stop ends the load and waits for its calls to be answered.
func (l *leasedLoad) stop() {
	l.stopOnce.Do(func() { close(l.stopCh) })
	l.wg.Wait()
	l.client.CloseIdleConnections()
}

// waitOK waits until n more calls have been answered 200.
func (l *leasedLoad) waitOK(t *testing.T, n int64) {
	t.Helper()
	target := l.ok.Load() + n
	l.waitUntil(t, fmt.Sprintf("%d more calls are answered 200", n), func() bool { return l.ok.Load() >= target })
}

// waitDrained waits until every gateway has answered its last 20 calls 402.
func (l *leasedLoad) waitDrained(t *testing.T) {
	t.Helper()
	l.waitUntil(t, "every gateway answers 402 twenty times in a row", func() bool {
		for i := range l.inARow402 {
			if l.inARow402[i].Load() < 20 {
				return false
			}
		}
		return true
	})
}

// waitUntil polls cond while the load runs; the load's own bounds are its
// deadline.
func (l *leasedLoad) waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-l.ended:
			if cond() {
				return
			}
			t.Fatalf("the load reached its bounds (%d calls in %s) before %s; answers %s",
				l.done.Load(), time.Since(l.begun).Round(time.Millisecond), what, l)
		default:
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (l *leasedLoad) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := fmt.Sprintf("%v (per gateway %v)", l.statuses, l.perGW)
	if len(l.errs) > 0 {
		s += fmt.Sprintf("; transport errors %q", l.errs)
	}
	return s
}

func (l *leasedLoad) count(status int) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.statuses[status]
}

// wantOnly fails the test if the load got an answer with a status not in
// allowed.
func (l *leasedLoad) wantOnly(t *testing.T, allowed ...int) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	for status, n := range l.statuses {
		if !slices.Contains(allowed, status) {
			t.Errorf("%d answers with status %d; all: %v", n, status, l.statuses)
		}
	}
}

// sentIn returns how many calls were sent in (from, to], times since the
// load began.
func (l *leasedLoad) sentIn(from, to time.Duration) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	var n int64
	for _, s := range l.sent {
		if s > from && s <= to {
			n++
		}
	}
	return n
}

// lowestBalance polls org's balance through g while the load runs, and
// returns a function that stops polling and returns the lowest balance
// seen.
func lowestBalance(g *leasedGateway, org string) func() (int64, error) {
	lowest := int64(1 << 62)
	var firstErr error
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			var a leasedAccount
			if err := g.adminCall(http.MethodGet, "/orgs/"+org, "", &a); err != nil {
				if firstErr == nil {
					firstErr = err
				}
			} else {
				lowest = min(lowest, a.Balance, a.Available)
			}
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	var once sync.Once
	return func() (int64, error) {
		once.Do(func() { close(stop) })
		<-done
		return lowest, firstErr
	}
}

// leasedSpendingKinds are the events that charge calls or give their credits
// back; every other kind changes what the org has (a plan, a recharge,
// allowance of an ended period that a lease gives back or that expires).
var leasedSpendingKinds = []string{"charge", "refund", "settle", "capture"}

// TestTwoGatewaysLeasedRecharge runs load through two leasing gateways on
// one org while the org is recharged, then moved to a plan of 0 and
// recharged again, until it is drained. A recharge never lets held credits
// be spent twice: the calls the upstream answered are exactly what the org
// had (its start and what the recharges granted, less its final balance),
// never more than the allowances granted, and the balance never goes below
// zero.
func TestTwoGatewaysLeasedRecharge(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	up := startUpstream(t)
	a := startLeasedGateway(t, "A", srv.Addr, up.URL, 50, "1s")
	b := startLeasedGateway(t, "B", srv.Addr, up.URL, 50, "1s")
	const org = "recharged"
	const allowance = 2000
	month := int(time.Now().UTC().Month()) // no recharge falls due on its own
	acct := a.admin(t, http.MethodPut, "/orgs/"+org+"/plan", fmt.Sprintf(`{"allowance": %d, "recharge_month": %d}`, allowance, month))
	start := acct.Balance
	if start != allowance {
		t.Fatalf("balance %d after the plan, want %d", start, allowance)
	}

	lowest := lowestBalance(b, org)
	load := startLeasedLoad(t, []*leasedGateway{a, b}, org, 16, 40000, 40*time.Second)
	load.waitOK(t, 400)
	first := a.admin(t, http.MethodPost, "/orgs/"+org+"/recharge", "")
	load.waitOK(t, 400)
	b.admin(t, http.MethodPut, "/orgs/"+org+"/plan", fmt.Sprintf(`{"allowance": 0, "recharge_month": %d}`, month))
	second := b.admin(t, http.MethodPost, "/orgs/"+org+"/recharge", "")
	// From here on only the credits the leases held at the recharge can be
	// spent (the new period grants 0), and the calls already on their way.
	forwardedAtSecond := up.forwarded(org, leasedRoute)
	load.waitDrained(t)
	load.stop()
	low, err := lowest()
	if err != nil {
		t.Errorf("reading the balance during the load: %v", err)
	}
	final := a.settled(t, org, 40*time.Second)

	answered := up.forwarded(org, leasedRoute)
	events := b.events(t, org)
	var had, charged, sum int64
	for _, e := range events {
		sum += e.Delta
		if slices.Contains(leasedSpendingKinds, e.Kind) {
			charged -= e.Delta
		} else {
			had += e.Delta
		}
	}
	granted := had - start
	t.Logf("start %d, granted %d (net of expired allowance), answered %d, charged %d, final %+v; held at the recharges %d and %d; lowest balance seen %d, lowest Credits-Remaining %d; %d events; answers %s",
		start, granted, answered, charged, final, first.Held, second.Held, low, load.minLeft.Load(), len(events), load)

	if len(events) == 0 {
		t.Fatalf("org %s has no events", org)
	}
	if events[0].Kind != "plan" || events[0].Delta != start {
		t.Errorf("the oldest event is %+v, want the plan that granted %d", events[0], start)
	}
	if sum != final.Balance {
		t.Errorf("the events add up to %d, the balance is %d", sum, final.Balance)
	}
	// A recharge grants the whole new allowance and leaves the holds their
	// old period's credits: neither given back to the new period, nor lost.
	if first.AllowanceRemaining != allowance || first.Balance != allowance+first.Held {
		t.Errorf("account after the first recharge %+v: want allowance_remaining %d and a balance of it plus what is held", first, allowance)
	}
	if second.AllowanceRemaining != 0 || second.Balance != second.Held {
		t.Errorf("account after the recharge onto a plan of 0 %+v: want allowance_remaining 0 and a balance of what is held", second)
	}
	if after := answered - forwardedAtSecond; after > second.Held+load.workers {
		t.Errorf("after the recharge onto a plan of 0 the upstream answered %d calls, over the %d credits held then (and %d calls on their way)",
			after, second.Held, load.workers)
	}
	if first.Held == 0 && second.Held == 0 {
		t.Errorf("no lease held credits at either recharge: the test did not recharge under leases")
	}
	if answered != start+granted-final.Balance {
		t.Errorf("the upstream answered %d calls; the org had %d (start %d + granted %d - final balance %d)",
			answered, start+granted-final.Balance, start, granted, final.Balance)
	}
	if answered != charged {
		t.Errorf("the upstream answered %d calls, the ledger charged %d", answered, charged)
	}
	// The org was granted its allowance twice (at the plan and at the first
	// recharge) and 0 at the second: no more calls than that.
	if answered > 2*allowance {
		t.Errorf("the upstream answered %d calls, over the %d credits the org was ever granted", answered, 2*allowance)
	}
	if final.Balance != 0 || final.Held != 0 || final.AllowanceRemaining != 0 || final.Purchased != 0 {
		t.Errorf("a drained org on a plan of 0: account %+v, want all 0", final)
	}
	if low < 0 || load.minLeft.Load() < 0 {
		t.Errorf("the balance went below zero on a block route: lowest balance read %d, lowest Credits-Remaining %d", low, load.minLeft.Load())
	}
	if ok := int64(load.count(http.StatusOK)); ok != answered {
		t.Errorf("%d calls answered 200, the upstream answered %d", ok, answered)
	}
	load.wantOnly(t, http.StatusOK, http.StatusPaymentRequired, http.StatusServiceUnavailable)
}

// TestTwoGatewaysClockSkew runs two leasing gateways on one org, one of
// them with its clock a minute ahead: leases follow Redis' clock and each
// gateway spends a lease only within its own monotonic clock's window, so
// the skew changes nothing: exactly the org's 250 credits of calls reach
// the upstream, and the balance ends at 0, never below.
func TestTwoGatewaysClockSkew(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	up := startUpstream(t)
	a := startLeasedGateway(t, "A", srv.Addr, up.URL, 50, "1s")
	t.Setenv(clockOffsetEnv, "60s") // for gateway B only: A runs already
	b := startLeasedGateway(t, "B", srv.Addr, up.URL, 50, "1s")
	if !strings.Contains(b.proc.output(), clockOffsetEnv) {
		t.Fatalf("gateway B does not say its clock is moved:\n%s", b.proc.output())
	}
	const org = "skewed"
	const credits = 250
	month := int(time.Now().UTC().Month())
	if acct := a.admin(t, http.MethodPut, "/orgs/"+org+"/plan", fmt.Sprintf(`{"allowance": %d, "recharge_month": %d}`, credits, month)); acct.Balance != credits {
		t.Fatalf("balance %d after the plan, want %d", acct.Balance, credits)
	}

	lowest := lowestBalance(a, org)
	load := startLeasedLoad(t, []*leasedGateway{a, b}, org, 16, 20000, 30*time.Second)
	load.waitDrained(t)
	load.stop()
	low, err := lowest()
	if err != nil {
		t.Errorf("reading the balance during the load: %v", err)
	}
	final := b.settled(t, org, 40*time.Second)
	answered := up.forwarded(org, leasedRoute)
	t.Logf("answered %d, final %+v, lowest balance seen %d, lowest Credits-Remaining %d; answers %s",
		answered, final, low, load.minLeft.Load(), load)

	if answered != credits {
		t.Errorf("the upstream answered %d calls, want exactly the org's %d credits", answered, credits)
	}
	if final.Balance != 0 || final.Held != 0 {
		t.Errorf("account %+v after the org was drained, want a balance of 0 and nothing held", final)
	}
	if low < 0 || load.minLeft.Load() < 0 {
		t.Errorf("the balance went below zero on a block route: lowest balance read %d, lowest Credits-Remaining %d", low, load.minLeft.Load())
	}
	if ok := int64(load.count(http.StatusOK)); ok != answered {
		t.Errorf("%d calls answered 200, the upstream answered %d", ok, answered)
	}
	load.mu.Lock()
	for i, byStatus := range load.perGW {
		if byStatus[http.StatusOK] == 0 {
			t.Errorf("gateway %d forwarded no call: the org was not spent through both", i)
		}
	}
	load.mu.Unlock()
	load.wantOnly(t, http.StatusOK, http.StatusPaymentRequired, http.StatusServiceUnavailable)
}

// TestLeasedReloadDuringRedisStall reloads a leasing gateway's config while
// Redis is paused: the closing config cannot report its lease, hands the
// report to the store's backlog (which the new config shares), and the
// backlog applies it once Redis answers. No spending is lost: the balance
// ends at the start less every call the upstream answered.
func TestLeasedReloadDuringRedisStall(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	up := startUpstream(t)
	g := startLeasedGateway(t, "A", srv.Addr, up.URL, 50, "300ms")
	const org = "stalled"
	const start = 1_000_000
	if acct := g.admin(t, http.MethodPost, "/orgs/"+org+"/topup", fmt.Sprintf(`{"amount": %d, "reference": "start"}`, start)); acct.Balance != start {
		t.Fatalf("balance %d after the top-up, want %d", acct.Balance, start)
	}

	load := startLeasedLoad(t, []*leasedGateway{g}, org, 8, 40000, 40*time.Second)
	load.waitOK(t, 300)
	eventuallyWithin(t, 5*time.Second, "a lease holds credits of the org", func() bool { return g.account(t, org).Held > 0 })
	load.waitOK(t, 100)

	rdb := srv.Client(t)
	ctx := context.Background()
	pausedAt := time.Now()
	if err := rdb.Do(ctx, "CLIENT", "PAUSE", "2000", "ALL").Err(); err != nil {
		t.Fatalf("CLIENT PAUSE: %v", err)
	}
	g.reload(t)
	reloadTook := time.Since(pausedAt)
	if reloadTook >= 2*time.Second {
		t.Errorf("the reload took %s: it did not happen within the 2s pause", reloadTook)
	}
	// A command sent during the pause is answered once it ends.
	pingCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := rdb.Ping(pingCtx).Err(); err != nil {
		t.Fatalf("Redis does not answer after the pause: %v", err)
	}
	load.waitOK(t, 300)
	load.stop()

	final := g.settled(t, org, 40*time.Second)
	answered := up.forwarded(org, leasedRoute)
	handedOn := strings.Count(g.proc.output(), "lease report failed; it is kept")
	load.mu.Lock()
	generated := fmt.Sprint(load.generated)
	reloadedAnswers := load.generated["2"]
	load.mu.Unlock()
	t.Logf("reload took %s during the pause; %d lease reports handed to the backlog; answered %d, final %+v; answers %s, by config %s",
		reloadTook, handedOn, answered, final, load, generated)

	if reloadedAnswers == 0 {
		t.Errorf("no answer came from the reloaded config: %s", generated)
	}
	if want := start - answered; final.Balance != want {
		t.Errorf("balance %d, want %d (start %d less the %d calls the upstream answered): %d credits of spending lost",
			final.Balance, want, start, answered, final.Balance-want)
	}
	if final.Held != 0 {
		t.Errorf("account %+v: credits still held", final)
	}
	// The old config's server closes its idle keep-alive connections; a
	// call sent on one as it closes gets no answer (EOF, or a reset). That
	// happens about once per worker's connection, and the upstream's count
	// covers such calls; more would mean calls keep failing after it.
	if n := load.count(0); int64(n) > 2*load.workers {
		t.Errorf("%d calls got no answer, more than twice the %d connections the reload closes: %s", n, load.workers, load)
	}
	load.wantOnly(t, http.StatusOK, http.StatusServiceUnavailable, 0)
}

// TestLeasedGatewayKilled kills a leasing gateway mid-load without warning.
// Its lease outlives its lifetime in Redis as unreported, keeping its
// credits, until an operator who knows the gateway is gone releases it.
// What it lost is what it spent and had not reported: at least nothing (no
// credits are created), at most about one flush interval (250ms) of calls,
// plus one lease block for a report on its way.
func TestLeasedGatewayKilled(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	up := startUpstream(t)
	const block = 50
	victim := startLeasedGateway(t, "A", srv.Addr, up.URL, block, "1s")
	reader := startLeasedGateway(t, "B", srv.Addr, up.URL, block, "1s") // no load: reads the account
	const org = "killed"
	const start = 1_000_000
	if acct := reader.admin(t, http.MethodPost, "/orgs/"+org+"/topup", fmt.Sprintf(`{"amount": %d, "reference": "start"}`, start)); acct.Balance != start {
		t.Fatalf("balance %d after the top-up, want %d", acct.Balance, start)
	}

	load := startLeasedLoad(t, []*leasedGateway{victim}, org, 16, 40000, 20*time.Second)
	load.waitOK(t, 300)
	eventuallyWithin(t, 5*time.Second, "a lease holds credits of the org", func() bool { return reader.account(t, org).Held > 0 })
	// Long enough a load that a quarter second of it is a part of it.
	load.waitUntil(t, "the load has run for two seconds", func() bool { return time.Since(load.begun) >= 2*time.Second })
	killedAt := time.Since(load.begun)
	if err := victim.proc.cmd.Process.Kill(); err != nil {
		t.Fatalf("killing gateway A: %v", err)
	}
	load.stop()
	heldAtKill := reader.account(t, org).Held

	// Past its lifetime (30s), the lease is unreported and still keeps its
	// credits: the gateway may have spent them.
	var lease leasedHold
	eventuallyWithin(t, 40*time.Second, "the killed gateway's lease is unreported", func() bool {
		for _, h := range reader.holds(t, org) {
			if strings.HasPrefix(h.ID, "lease:") && h.State == "unreported" {
				lease = h
				return true
			}
		}
		return false
	})
	expired := time.Since(load.begun) - killedAt
	if held := reader.account(t, org).Held; held != lease.Amount || held == 0 {
		t.Fatalf("held %d, the unreported lease %+v: an unreported lease must keep its credits", held, lease)
	}
	// Releasing it without gateway_gone is refused; with it, it is done.
	if err := reader.adminCall(http.MethodDelete, "/orgs/"+org+"/holds/"+lease.ID, "", &struct{}{}); err == nil || !strings.Contains(err.Error(), "409") {
		t.Fatalf("release of an unreported lease without gateway_gone: %v", err)
	}
	final := reader.admin(t, http.MethodDelete, "/orgs/"+org+"/holds/"+lease.ID, `{"gateway_gone": true, "reason": "gateway A was killed"}`)
	answered := up.forwarded(org, leasedRoute)
	charged := start - final.Balance
	loss := answered - charged
	// The rate of the last second before the kill: a flush interval's
	// worth of calls is a quarter of it.
	rate := load.sentIn(killedAt-time.Second, killedAt)
	quarter := (rate + 3) / 4
	bound := quarter + block
	t.Logf("killed after %s of load at %d calls/s; the lease (%d held just after the kill) was unreported %s later and released; answered %d, charged %d: loss %d credits, bound %d (%d calls in 250ms + a block of %d); answers %s",
		killedAt.Round(time.Millisecond), rate, heldAtKill, expired.Round(time.Millisecond), answered, charged, loss, bound, quarter, block, load)

	if charged > answered {
		t.Errorf("the ledger charged %d for %d answered calls: %d credits created", charged, answered, charged-answered)
	}
	if loss > bound {
		t.Errorf("the kill lost %d credits, over the bound of %d (%d calls in 250ms at the rate before the kill, plus a block of %d)", loss, bound, quarter, block)
	}
	if final.Balance < 0 || final.Held != 0 {
		t.Errorf("account %+v after the lease was released", final)
	}
	load.wantOnly(t, http.StatusOK, http.StatusServiceUnavailable, 0)
}
