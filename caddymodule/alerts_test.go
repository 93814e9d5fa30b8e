package caddymodule

import (
	"crypto/hmac"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/meter"
)

const alertSecret = "s3cret-hook"

// alertReceiver is the webhook receiver of the alerts tests. It checks each
// signature, can answer the first attempt of each alert 500, and can be
// down: it then accepts connections and closes them unanswered.
type alertReceiver struct {
	ln  net.Listener
	srv *http.Server

	mu        sync.Mutex
	failFirst bool
	down      bool
	downTries int              // connections closed while down
	attempts  map[string]int   // attempts per alert id
	accepted  []map[string]any // the bodies answered 200, in order
	badSigs   int
}

func startAlertReceiver(t *testing.T) *alertReceiver {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &alertReceiver{ln: ln, attempts: map[string]int{}}
	r.srv = &http.Server{Handler: http.HandlerFunc(r.serve), ConnState: func(c net.Conn, s http.ConnState) {
		if s != http.StateNew {
			return
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.down {
			r.downTries++
			c.Close()
		}
	}}
	go r.srv.Serve(ln)
	t.Cleanup(func() { r.srv.Close() })
	return r
}

func (r *alertReceiver) url() string { return "http://" + r.ln.Addr().String() + "/hook" }

func (r *alertReceiver) serve(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.down {
		// A connection kept alive from before: cut it as a down receiver would.
		r.downTries++
		panic(http.ErrAbortHandler)
	}
	if !hmac.Equal([]byte(req.Header.Get("Credits-Signature")), []byte(signature([]byte(alertSecret), body))) {
		r.badSigs++
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	var a map[string]any
	if err := json.Unmarshal(body, &a); err != nil {
		http.Error(w, "no JSON", http.StatusBadRequest)
		return
	}
	id := fmt.Sprint(a["id"])
	r.attempts[id]++
	if r.failFirst && r.attempts[id] == 1 {
		http.Error(w, "try again", http.StatusInternalServerError)
		return
	}
	r.accepted = append(r.accepted, a)
	w.WriteHeader(http.StatusNoContent)
}

// kinds returns the accepted alerts as "type threshold", sorted, each id
// once, and how many ids were accepted more than once.
func (r *alertReceiver) kinds() (kinds []string, dup int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	seen := map[any]bool{}
	for _, a := range r.accepted {
		if seen[a["id"]] {
			dup++
			continue
		}
		seen[a["id"]] = true
		kinds = append(kinds, fmt.Sprintf("%v %v", a["type"], a["threshold"]))
	}
	// Deliveries run side by side, and retries interleave: in order of kind.
	slices.Sort(kinds)
	return kinds, dup
}

const alertsProcessCaddyfile = `{
	admin off
	credits {
		redis redis://{REDIS}
		default_plan 5
		alerts {HOOK} {
			secret ` + alertSecret + `
			thresholds 10 5
		}
	}
}
http://127.0.0.1:{PORT} {
	route /flows/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature flows
			on_exhausted overdraft
		}
		reverse_proxy {UPSTREAM}
	}
}
`

// TestAlerts runs two gateways (this process's Caddy and a caddy process)
// on one redis-server against a receiver the test runs: each threshold is
// sent once per crossing whichever gateway made it, signed, retried with
// the same id after the receiver's 500, and delivered after the receiver
// was down for a while.
func TestAlerts(t *testing.T) {
	recv := startAlertReceiver(t)
	recv.failFirst = true
	alerts := "alerts " + recv.url() + " {\n\t\t\tsecret " + alertSecret + "\n\t\t\tthresholds 10 5\n\t\t}"
	g := startGateway(t, gatewayOptions{global: alerts})
	port := freePort(t)
	startCaddyProcess(t, strings.NewReplacer("{REDIS}", g.redis.Addr, "{HOOK}", recv.url(),
		"{PORT}", fmt.Sprint(port), "{UPSTREAM}", g.upstream.URL).Replace(alertsProcessCaddyfile),
		fmt.Sprintf("127.0.0.1:%d", port))
	other := &gateway{t: t, url: fmt.Sprintf("http://127.0.0.1:%d", port), client: g.client}

	wantStatus(t, g.admin(http.MethodPut, "/orgs/acme/plan", `{"allowance": 20, "recharge_month": 1}`), http.StatusOK)
	// 20 calls of 1 credit, in turn through both gateways: the balance
	// goes from 20 to 0, below 10, below 5 and to zero.
	for i := range 20 {
		gw := g
		if i%2 == 1 {
			gw = other
		}
		wantStatus(t, gw.call("/flows/x", "acme"), http.StatusOK)
	}
	want := []string{"balance.below 10", "balance.below 5", "balance.exhausted 0"} // sorted
	awaitCondition(t, "the three alerts", func() bool {
		kinds, _ := recv.kinds()
		return len(kinds) >= len(want)
	})
	kinds, dup := recv.kinds()
	if strings.Join(kinds, ", ") != strings.Join(want, ", ") || dup != 0 {
		t.Fatalf("alerts %v (%d repeated), want %v", kinds, dup, want)
	}
	recv.mu.Lock()
	for _, a := range recv.accepted {
		if id := fmt.Sprint(a["id"]); recv.attempts[id] != 2 {
			t.Errorf("alert %s: %d attempts, want 2 (a 500, then the retry with the same id)", id, recv.attempts[id])
		}
		if a["org"] != "acme" || a["at"] == "" {
			t.Errorf("alert body %v", a)
		}
	}
	last := recv.accepted[len(recv.accepted)-1]
	if last["balance"] != float64(0) || recv.badSigs != 0 {
		t.Errorf("the exhausted alert %v; %d bad signatures", last, recv.badSigs)
	}
	recv.failFirst = false
	recv.down = true
	recv.mu.Unlock()

	// A top-up above both thresholds arms them again; the next crossing is
	// sent again once, after the receiver comes back.
	g.topUp("acme", 15)
	for i := range 6 { // 15 to 9
		gw := g
		if i%2 == 1 {
			gw = other
		}
		wantStatus(t, gw.call("/flows/x", "acme"), http.StatusOK)
	}
	awaitCondition(t, "two attempts while the receiver is down", func() bool {
		recv.mu.Lock()
		defer recv.mu.Unlock()
		return recv.downTries >= 2
	})
	pending, err := g.redisClient().HLen(t.Context(), meter.DefaultPrefix+":{acme}:w").Result()
	if err != nil || pending < 3 {
		t.Fatalf("the undelivered alert is not pending in Redis: %d fields, %v", pending, err)
	}
	recv.mu.Lock()
	recv.down = false
	recv.mu.Unlock()
	want = []string{"balance.below 10", "balance.below 10", "balance.below 5", "balance.exhausted 0"}
	awaitCondition(t, "the alert after the receiver came back", func() bool {
		kinds, _ := recv.kinds()
		return len(kinds) >= len(want)
	})
	if kinds, dup := recv.kinds(); strings.Join(kinds, ", ") != strings.Join(want, ", ") || dup != 0 {
		t.Fatalf("alerts %v (%d repeated), want %v", kinds, dup, want)
	}
	// Delivered alerts leave Redis.
	awaitCondition(t, "no alert pending", func() bool {
		fields, err := g.redisClient().HKeys(t.Context(), meter.DefaultPrefix+":{acme}:w").Result()
		if err != nil {
			return false
		}
		for _, f := range fields {
			if strings.HasPrefix(f, "p:") {
				return false
			}
		}
		return true
	})
	// What the upstream served is what the ledger charged: 26 calls.
	g.upstream.mu.Lock()
	served := g.upstream.byOrg["acme flows"]
	g.upstream.mu.Unlock()
	if a := g.account("acme"); served != 26 || a["used"].(map[string]any)["flows"] != float64(26) || a["balance"] != float64(9) {
		t.Fatalf("the upstream served %d calls; the account %v", served, a)
	}
}

// redisClient is a client of the gateway's redis-server, closed when the
// test ends.
func (g *gateway) redisClient() *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: g.redis.Addr})
	g.t.Cleanup(func() { c.Close() })
	return c
}
