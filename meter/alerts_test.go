package meter

import (
	"encoding/json"
	"sync"
	"time"
)

func init() {
	ledgerCases = append(ledgerCases, alertCases...)
}

// alertsOf checks org's alerts at thresholds 10 and 5 and returns them as
// "type threshold balance", checking each body and its id.
func (e *env) alertsOf(org string, seen map[string]bool) []string {
	e.t.Helper()
	alerts, err := e.ledger.CheckAlerts(e.ctx, org, []int64{10, 5})
	if err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for _, a := range alerts {
		var body struct {
			ID        string `json:"id"`
			Type      string `json:"type"`
			Org       string `json:"org"`
			Threshold int64  `json:"threshold"`
			Balance   int64  `json:"balance"`
			At        string `json:"at"`
		}
		if err := json.Unmarshal(a.Body, &body); err != nil {
			e.t.Fatalf("alert body %s: %v", a.Body, err)
		}
		if body.ID != a.ID || body.Org != org || a.Org != org || seen[a.ID] {
			e.t.Fatalf("alert %+v: body %+v (a repeated id?)", a, body)
		}
		if _, err := time.Parse(time.RFC3339, body.At); err != nil {
			e.t.Fatalf("alert time %q: %v", body.At, err)
		}
		seen[a.ID] = true
		out = append(out, body.Type+" "+itoa(body.Threshold)+" "+itoa(body.Balance))
	}
	return out
}

func itoa(n int64) string {
	b, _ := json.Marshal(n)
	return string(b)
}

var alertCases = []ledgerCase{
	{name: "balance alerts: once per crossing, armed again by credits added, also after a fall no check saw", cfg: Config{DefaultPlan: Plan{Allowance: 20}}, run: func(e *env) {
		seen := map[string]bool{}
		want := func(got []string, want ...string) {
			e.t.Helper()
			if len(got) != len(want) {
				e.t.Fatalf("alerts %q, want %q", got, want)
			}
			for i := range want {
				if got[i] != want[i] {
					e.t.Fatalf("alerts %q, want %q", got, want)
				}
			}
		}
		if got, err := e.ledger.CheckAlerts(e.ctx, "nobody", []int64{10}); err != nil || len(got) != 0 {
			e.t.Fatalf("an org Redis does not hold: %v %v", got, err)
		}
		if keys := e.keys(); len(keys) != 0 {
			e.t.Fatalf("a check of an unknown org wrote %v", keys)
		}
		e.charge("acme", 1) // 19
		want(e.alertsOf("acme", seen))
		e.charge("acme", 10) // 9
		want(e.alertsOf("acme", seen), "balance.below 10 9")
		want(e.alertsOf("acme", seen))
		e.charge("acme", 5) // 4
		e.charge("acme", 4) // 0: two crossings before one check
		want(e.alertsOf("acme", seen), "balance.below 5 0", "balance.exhausted 0 0")
		e.topUp("acme", 30, "r1") // 30: both armed again
		e.charge("acme", 25)      // 5
		want(e.alertsOf("acme", seen), "balance.below 10 5")
		if _, _, err := e.ledger.Adjust(e.ctx, "acme", -3, "correction", "c1"); err != nil {
			e.t.Fatal(err)
		}
		want(e.alertsOf("acme", seen), "balance.below 5 2") // a fall by an adjustment
		e.topUp("acme", 50, "r2")                           // 52
		want(e.alertsOf("acme", seen))
		e.charge("acme", 50)     // 2, no check
		e.topUp("acme", 4, "r3") // 6: the fall below 10 is still alerted
		want(e.alertsOf("acme", seen), "balance.below 10 6")

		// Each alert is pending until delivered; a sweep takes on the ones
		// nobody has tried within the time given.
		pending, err := e.ledger.StaleAlerts(e.ctx, 0)
		if err != nil || len(pending) != len(seen) {
			e.t.Fatalf("stale alerts: %d, %v; want %d", len(pending), err, len(seen))
		}
		if again, err := e.ledger.StaleAlerts(e.ctx, time.Hour); err != nil || len(again) != 0 {
			e.t.Fatalf("alerts just taken on are stale again: %d %v", len(again), err)
		}
		for _, a := range pending {
			if err := e.ledger.AlertDelivered(e.ctx, a); err != nil {
				e.t.Fatal(err)
			}
		}
		if left, err := e.ledger.StaleAlerts(e.ctx, 0); err != nil || len(left) != 0 {
			e.t.Fatalf("delivered alerts still pending: %d %v", len(left), err)
		}
	}},
	{name: "balance alerts: of checks at once, one records each alert", cfg: Config{DefaultPlan: Plan{Allowance: 20}}, run: func(e *env) {
		e.charge("acme", 1)
		if _, err := e.ledger.CheckAlerts(e.ctx, "acme", []int64{10, 5}); err != nil {
			e.t.Fatal(err)
		}
		e.charge("acme", 16) // 3: below 10 and 5
		var mu sync.Mutex
		var all []Alert
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				got, err := e.ledger.CheckAlerts(e.ctx, "acme", []int64{10, 5})
				if err != nil {
					e.t.Error(err)
					return
				}
				mu.Lock()
				all = append(all, got...)
				mu.Unlock()
			})
		}
		wg.Wait()
		if len(all) != 2 {
			e.t.Fatalf("%d alerts from 8 checks at once, want 2: %v", len(all), all)
		}
	}},
}
