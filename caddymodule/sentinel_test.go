package caddymodule

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// TestSentinelFailover runs a gateway on redis_sentinel (a master with a
// password, its replica, three sentinels with a password of their own) and
// kills the master under load, twice: the sentinels promote the replica,
// the killed master comes back as its replica, and the second kill makes
// it the master again. Call by call and with leases, calls in flight during
// a switch answer as their fail_mode says (200 or 503, nothing else), and
// afterwards each org's balance is its start less the calls the upstream
// answered: nothing lost, nothing charged twice.
func TestSentinelFailover(t *testing.T) {
	for _, mode := range []struct{ name, global string }{
		{"lease off", "lease off"},
		{"default lease", ""},
	} {
		t.Run(mode.name, func(t *testing.T) {
			const password = "sentinel-master-pass-41c7"
			set := redistest.StartSentinel(t, redistest.SentinelOptions{Master: "credits-main",
				Server: redistest.Options{AppendOnly: true, Password: password}, SentinelPassword: "sentinels-pass-0b9d"})
			store := fmt.Sprintf("redis_sentinel credits-main %s {\n\t\t\tpassword %s\n\t\t\tsentinel_password sentinels-pass-0b9d\n\t\t}",
				strings.Join(set.Addrs, " "), password)
			g := startGateway(t, gatewayOptions{store: store, global: mode.global, timeout: "500ms"})
			g.redis = set.Servers[0]
			orgs := setupFaultOrgs(g, 4)
			stop := make(chan struct{})
			res, wait := runLoad(g, orgs, 8, stop)
			res.waitDone(t, 300)
			refusedBefore := res.count(http.StatusServiceUnavailable)
			for i, want := range []*redistest.Server{set.Servers[1], set.Servers[0]} {
				start := time.Now()
				if got := set.KillMaster(t); got != want {
					t.Fatalf("failover %d: the new master is %s, want %s", i+1, got.Addr, want.Addr)
				}
				t.Logf("failover %d took %s", i+1, time.Since(start))
				// Calls reach the new master: the load goes on answering 200.
				before := res.count(http.StatusOK)
				eventuallyWithin(t, 30*time.Second, "calls succeed on the new master", func() bool {
					return res.count(http.StatusOK) >= before+200
				})
			}
			close(stop)
			wait()
			drained(t)
			wantOnly(t, res, http.StatusOK, http.StatusServiceUnavailable)
			if mode.global == "lease off" && res.count(http.StatusServiceUnavailable) == refusedBefore {
				t.Errorf("no fail-closed call was refused while the master was down: %v", res)
			}
			checkExact(t, g, orgs)
			t.Logf("answers: %v", res)
		})
	}
}

// count returns how many calls answered status.
func (l *loadResult) count(status int) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.statuses[status]
}
