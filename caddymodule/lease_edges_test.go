package caddymodule

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/internal/faultproxy"
	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// Leases at their edges, with built caddy processes and a real
// redis-server: a reload while leased calls are in flight, a refund after
// UTC midnight, a gateway cut off from Redis past its lease's lifetime while
// another spends, and the admin API's hands off a gateway's lease. Each
// ends with the upstream's own count of what it answered against what the
// ledger charged.

// gatedUpstream answers the leased route's calls by their last path
// segment: "ok" at once; "fail" (500) and "usage0" (200 with Credits-Usage:
// 0) once the gate opens. It counts the calls it answered 2xx and charged
// something for ("ok").
type gatedUpstream struct {
	*httptest.Server
	arrived chan struct{} // a gated call arrived
	gate    chan struct{} // closed to let the gated calls answer

	mu  sync.Mutex
	ok  map[string]int64 // org -> calls answered "ok"
	all map[string]int64 // org -> calls received
}

func startGatedUpstream(t *testing.T) *gatedUpstream {
	t.Helper()
	u := &gatedUpstream{arrived: make(chan struct{}, 100), gate: make(chan struct{}),
		ok: map[string]int64{}, all: map[string]int64{}}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		org := r.Header.Get("X-Org-Id")
		u.mu.Lock()
		u.all[org]++
		u.mu.Unlock()
		last := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
		if last == "fail" || last == "usage0" {
			u.arrived <- struct{}{}
			select {
			case <-u.gate:
			case <-r.Context().Done():
				return
			}
		}
		switch last {
		case "fail":
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, "backend failed\n")
		case "usage0":
			w.Header().Set("Credits-Usage", "0")
			io.WriteString(w, "nothing done\n")
		default:
			u.mu.Lock()
			u.ok[org]++
			u.mu.Unlock()
			io.WriteString(w, "ai answer\n")
		}
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *gatedUpstream) answered(org string) int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.ok[org]
}

// callLeased calls the gateway's leased route for org at path's last
// segment, and returns the status (0 for no answer).
func (g *leasedGateway) callLeased(org, last string) int {
	req, _ := http.NewRequest(http.MethodGet, g.url+"/background-removal/"+last, nil)
	req.Header.Set("X-Org-Id", org)
	resp, err := g.client.Do(req)
	if err != nil {
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// leaseOf returns org's hold that is this gateway-facing Redis' only lease.
func leaseOf(t *testing.T, g *leasedGateway, org string) leasedHold {
	t.Helper()
	for _, h := range g.holds(t, org) {
		if strings.HasPrefix(h.ID, "lease:") && (h.State == "held" || h.State == "unreported") {
			return h
		}
	}
	t.Fatalf("org %s has no lease: %+v", org, g.holds(t, org))
	return leasedHold{}
}

// warmLease calls the leased route until org's calls are paid from a lease
// that holds credits.
func warmLease(t *testing.T, g *leasedGateway, org string) {
	t.Helper()
	eventuallyWithin(t, 10*time.Second, "a lease holds credits of org "+org, func() bool {
		if s := g.callLeased(org, "ok"); s != http.StatusOK {
			t.Fatalf("warm-up call: %d", s)
		}
		return g.account(t, org).Held > 0
	})
}

// TestLeasedRefundsAcrossReload: leased calls in flight when the config is
// reloaded fail (500) or settle to Credits-Usage: 0 after the old config's
// leases were given back. Their refunds find the charges they undo, under
// the lease that charged them: nothing is lost. The admin API cannot
// capture or release the gateway's lease meanwhile.
func TestLeasedRefundsAcrossReload(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t, redistest.Options{})
	up := startGatedUpstream(t)
	g := startLeasedGateway(t, "A", srv.Addr, up.URL, 50, "1s")
	const org = "reloaded"
	const start = 1000
	g.admin(t, http.MethodPost, "/orgs/"+org+"/topup", fmt.Sprintf(`{"amount": %d, "reference": "start"}`, start))
	warmLease(t, g, org)

	// A live lease is its gateway's alone.
	lease := leaseOf(t, g, org)
	before := g.account(t, org)
	for _, c := range []struct{ method, path, body, want string }{
		{http.MethodPost, "/capture", `{"amount": 5}`, "only its gateway can capture it"},
		{http.MethodDelete, "", "", "only its gateway can release it"},
		{http.MethodDelete, "", `{"gateway_gone": true, "reason": "decommissioned"}`, "only its gateway can release it"},
	} {
		err := g.adminCall(c.method, "/orgs/"+org+"/holds/"+lease.ID+c.path, c.body, &struct{}{})
		if err == nil || !strings.Contains(err.Error(), "409") || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("%s %s of the live lease %s: %v, want a 409 saying %q", c.method, c.path, lease.ID, err, c.want)
		}
	}
	if after := g.account(t, org); after != before {
		t.Fatalf("a refused capture or release changed the account: %+v, then %+v", before, after)
	}

	// Five calls that will fail and one that will be settled to 0, in
	// flight at the upstream, all paid from the lease.
	statuses := make(chan int, 6)
	for _, last := range []string{"fail", "fail", "fail", "fail", "fail", "usage0"} {
		go func() { statuses <- g.callLeased(org, last) }()
	}
	for range 6 {
		select {
		case <-up.arrived:
		case <-time.After(10 * time.Second):
			t.Fatal("the gated calls did not reach the upstream")
		}
	}
	g.reload(t)
	eventuallyWithin(t, 10*time.Second, "the old config gave its lease back", func() bool {
		// A kept-alive connection that the reload's old server closes may
		// fail one request: it is asked again.
		var a leasedAccount
		return g.adminCall(http.MethodGet, "/orgs/"+org, "", &a) == nil && a.Held == 0
	})
	close(up.gate)
	got := map[int]int{}
	for range 6 {
		got[<-statuses]++
	}
	if got[http.StatusInternalServerError] != 5 || got[http.StatusOK] != 1 {
		t.Fatalf("the gated calls answered %v, want five 500 and one 200", got)
	}

	final := g.settled(t, org, 20*time.Second)
	answered := up.answered(org)
	t.Logf("upstream answered %d calls ok; final %+v", answered, final)
	if want := start - answered; final.Balance != want {
		t.Errorf("balance %d, want %d (start %d less the %d calls answered ok): the refunds of the calls in flight at the reload were lost",
			final.Balance, want, start, answered)
	}
	// Every refund gave back the credit its call was charged.
	for _, e := range g.events(t, org) {
		t.Logf("event %+v", e)
		if e.Kind == "refund" && e.Delta != 1 {
			t.Errorf("refund event %+v gave back %d, want 1", e, e.Delta)
		}
		if strings.HasPrefix(e.Ref, "lease:lease:") {
			t.Errorf("event %+v: a lease's ref names it once", e)
		}
	}
}

// TestLeasedRefundAcrossMidnight: leased calls reported on one UTC day and
// refunded on the next correct the usage of the day they were charged on,
// so the days add up to the period's usage. The gateway's clock is moved
// to just before midnight.
func TestLeasedRefundAcrossMidnight(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	up := startGatedUpstream(t)
	buildCaddy(t)
	now := time.Now().UTC()
	midnight := now.Truncate(24 * time.Hour).Add(24 * time.Hour)
	offset := midnight.Sub(now) - 8*time.Second
	t.Setenv(clockOffsetEnv, offset.String())
	g := startLeasedGateway(t, "A", srv.Addr, up.URL, 50, "1s")
	clock := func() time.Time { return time.Now().UTC().Add(offset) }
	const org = "midnight"
	g.admin(t, http.MethodPost, "/orgs/"+org+"/topup", `{"amount": 1000, "reference": "start"}`)
	warmLease(t, g, org)

	statuses := make(chan int, 3)
	for range 3 {
		go func() { statuses <- g.callLeased(org, "fail") }()
	}
	for range 3 {
		<-up.arrived
	}
	day := clock().Format("2006-01-02")
	if clock().After(midnight.Add(-time.Second)) {
		t.Fatalf("the calls were in flight at %s, too close to midnight for the test", clock())
	}
	// The three charges are reported (a flush is 250ms) before midnight.
	usageOn := func(d string) int64 {
		var out struct {
			Days []struct {
				Date string           `json:"date"`
				Used map[string]int64 `json:"used"`
			} `json:"days"`
		}
		if err := g.adminCall(http.MethodGet, "/orgs/"+org+"/usage?from="+d+"&to="+d, "", &out); err != nil {
			t.Fatal(err)
		}
		for _, x := range out.Days {
			if x.Date == d {
				return x.Used[leasedRoute]
			}
		}
		return 0
	}
	warm := up.answered(org)
	eventuallyWithin(t, 3*time.Second, "the calls in flight are reported", func() bool { return usageOn(day) == warm+3 })
	eventuallyWithin(t, 10*time.Second, "the gateway's clock passes midnight", func() bool { return clock().After(midnight) })
	close(up.gate)
	for range 3 {
		if s := <-statuses; s != http.StatusInternalServerError {
			t.Fatalf("a failed call answered %d", s)
		}
	}
	final := g.settled(t, org, 20*time.Second)
	next := midnight.Format("2006-01-02")
	used := g.admin(t, http.MethodGet, "/orgs/"+org, "")
	var acct struct {
		Used map[string]int64 `json:"used"`
	}
	if err := g.adminCall(http.MethodGet, "/orgs/"+org, "", &acct); err != nil {
		t.Fatal(err)
	}
	answered := up.answered(org)
	t.Logf("day %s: %d, day %s: %d, used %v, answered %d, account %+v %+v", day, usageOn(day), next, usageOn(next), acct.Used, answered, final, used)
	if got := usageOn(day); got != answered {
		t.Errorf("day %s shows %d used, want the %d calls answered that day: the refunds after midnight did not correct it", day, got, answered)
	}
	if got := usageOn(next); got != 0 {
		t.Errorf("day %s shows %d used, want 0", next, got)
	}
	if acct.Used[leasedRoute] != answered || final.Balance != 1000-answered {
		t.Errorf("used %v, balance %d; the upstream answered %d", acct.Used, final.Balance, answered)
	}
}

// TestLeasedPartition: gateway A is cut off from Redis with a lease, and
// spends from it; gateway B spends the rest of the org's credits. Past A's
// lease's lifetime, the lease is unreported and keeps its credits: B cannot
// spend them again. Once A is back, it reports, and the block route never
// went below zero: the calls the upstream answered are what the org had.
func TestLeasedPartition(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t, redistest.Options{})
	proxy := faultproxy.Start(t, srv.Addr)
	up := startGatedUpstream(t)
	a := startLeasedGateway(t, "A", proxy.Addr, up.URL, 50, "300ms")
	b := startLeasedGateway(t, "B", srv.Addr, up.URL, 50, "300ms")
	const org = "partitioned"
	const start = 300
	b.admin(t, http.MethodPost, "/orgs/"+org+"/topup", fmt.Sprintf(`{"amount": %d, "reference": "start"}`, start))
	warmLease(t, a, org)
	aLease := leaseOf(t, b, org).ID

	proxy.Refuse(true)
	cutAt := time.Now()
	// A spends what its lease holds, for as long as it may (half the
	// lease's lifetime after its last sync), then answers 503.
	var servedA int
	for {
		s := a.callLeased(org, "ok")
		if s == http.StatusOK {
			servedA++
			continue
		}
		if s != http.StatusServiceUnavailable {
			t.Fatalf("gateway A cut off answered %d", s)
		}
		break
	}
	// B spends the rest, until refused.
	var servedB int
	for {
		s := b.callLeased(org, "ok")
		if s == http.StatusOK {
			servedB++
			continue
		}
		if s != http.StatusPaymentRequired {
			t.Fatalf("gateway B answered %d", s)
		}
		break
	}
	var state string
	eventuallyWithin(t, 45*time.Second, "A's lease is past its lifetime", func() bool {
		for _, h := range b.holds(t, org) {
			if h.ID == aLease {
				state = h.State
			}
		}
		return state != "held"
	})
	if state != "unreported" {
		t.Errorf("A's lease is %s past its lifetime, want unreported", state)
	}
	t.Logf("A served %d from its lease after the cut, B %d; A's lease unreported %s after the cut",
		servedA, servedB, time.Since(cutAt).Round(time.Second))
	for i := range 20 {
		if s := b.callLeased(org, "ok"); s != http.StatusPaymentRequired {
			t.Fatalf("call %d of B past A's lease's lifetime answered %d: credits A may have spent were spent again", i, s)
		}
	}

	proxy.Refuse(false)
	final := b.settled(t, org, 30*time.Second)
	answered := up.answered(org)
	t.Logf("answered %d; final %+v", answered, final)
	if final.Balance < 0 {
		t.Errorf("a block route went to %d", final.Balance)
	}
	if want := start - answered; final.Balance != want {
		t.Errorf("balance %d, want %d (start %d less the %d calls answered)", final.Balance, want, start, answered)
	}
}
