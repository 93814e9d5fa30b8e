package meter

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func init() {
	ledgerCases = append(ledgerCases, usageCases...)
}

// usageOf reads org's usage per day and fails the test on an error.
func (e *env) usageOf(org string, from, to time.Time) map[string]map[string]int64 {
	e.t.Helper()
	days, err := e.ledger.Usage(e.ctx, org, from, to)
	if err != nil {
		e.t.Fatal(err)
	}
	if want := int(utcDay(to).Sub(utcDay(from))/(24*time.Hour)) + 1; len(days) != want {
		e.t.Fatalf("%d days from %s to %s, want %d", len(days), from, to, want)
	}
	out := map[string]map[string]int64{}
	for i, d := range days {
		if want := utcDay(from).AddDate(0, 0, i).Format(time.DateOnly); d.Date != want {
			e.t.Fatalf("day %d is %s, want %s", i, d.Date, want)
		}
		if len(d.Used) > 0 {
			out[d.Date] = d.Used
		}
	}
	return out
}

func wantUsage(t *testing.T, got map[string]map[string]int64, want map[string]map[string]int64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("usage %v, want %v", got, want)
	}
	for day, used := range want {
		if len(got[day]) != len(used) {
			t.Fatalf("usage %v, want %v", got, want)
		}
		for f, n := range used {
			if got[day][f] != n {
				t.Fatalf("usage %v, want %v", got, want)
			}
		}
	}
}

var usageCases = []ledgerCase{
	{name: "usage per day counts each call on its day, a refund on its charge's day", cfg: Config{DefaultPlan: Plan{Allowance: 100}}, run: func(e *env) {
		// 2026-03-10, 12:00 UTC.
		e.charge("acme", 3)
		late, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "alt-text", Cost: 2})
		if err != nil {
			e.t.Fatal(err)
		}
		settled, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "alt-text", Cost: 4})
		if err != nil {
			e.t.Fatal(err)
		}
		e.clock.Set(time.Date(2026, time.March, 11, 0, 30, 0, 0, time.UTC))
		if _, err := e.ledger.Refund(e.ctx, "acme", late.RequestID); err != nil {
			e.t.Fatal(err)
		}
		if _, err := e.ledger.Settle(e.ctx, "acme", settled.RequestID, 7); err != nil {
			e.t.Fatal(err)
		}
		e.charge("acme", 1)
		// A lease's spending counts on the day of its sync, a hold's capture
		// on the day of the capture.
		e.sync(LeaseSync{Org: "acme", ID: "gw", Seq: 1, Want: 5, TTL: time.Minute})
		e.sync(LeaseSync{Org: "acme", ID: "gw", Seq: 2, TTL: time.Minute, Spent: map[string]int64{"flows": 5}})
		h, _, _, err := e.hold("acme", 10, time.Hour, "")
		if err != nil {
			e.t.Fatal(err)
		}
		if _, _, _, err := e.ledger.CaptureHold(e.ctx, "acme", h.ID, 6); err != nil {
			e.t.Fatal(err)
		}
		got := e.usageOf("acme", date(2026, time.March, 9), date(2026, time.March, 12))
		wantUsage(e.t, got, map[string]map[string]int64{
			"2026-03-10": {"rich-text": 3, "alt-text": 7},
			"2026-03-11": {"rich-text": 1, "flows": 11},
		})
		// The days add up to the period's usage.
		a := e.account("acme")
		for f, n := range a.Used {
			if sum := got["2026-03-10"][f] + got["2026-03-11"][f]; sum != n {
				e.t.Fatalf("%s: days add up to %d, the period's usage is %d", f, sum, n)
			}
		}
		// A refund reported by a lease a day later counts today, and no
		// day goes below zero.
		e.clock.Set(time.Date(2026, time.March, 12, 9, 0, 0, 0, time.UTC))
		e.sync(LeaseSync{Org: "acme", ID: "gw", Seq: 3, TTL: time.Minute, Spent: map[string]int64{"flows": -2}})
		got = e.usageOf("acme", date(2026, time.March, 12), date(2026, time.March, 12))
		wantUsage(e.t, got, map[string]map[string]int64{})
	}},
	{name: "usage per day is kept 13 months", cfg: Config{DefaultPlan: Plan{Allowance: 1000}}, run: func(e *env) {
		e.charge("acme", 1) // 2026-03-10
		e.clock.Set(date(2026, time.April, 2))
		e.charge("acme", 2)
		e.clock.Set(date(2027, time.April, 30))
		e.charge("acme", 4)
		kept := func() []string {
			fields, err := e.rdb.HKeys(e.ctx, e.ledger.Keys().Account("acme")).Result()
			if err != nil {
				e.t.Fatal(err)
			}
			var days []string
			for _, f := range fields {
				if f[0] >= '0' && f[0] <= '9' {
					days = append(days, f)
				}
			}
			return days
		}
		if days := kept(); len(days) != 3 {
			e.t.Fatalf("days kept on 2027-04-30: %v", days)
		}
		// 2027-05's first usage drops the days before 2026-04.
		e.clock.Set(date(2027, time.May, 1))
		e.charge("acme", 8)
		wantUsage(e.t, e.usageOf("acme", date(2026, time.March, 1), date(2027, time.May, 1)), map[string]map[string]int64{
			"2026-04-02": {"rich-text": 2},
			"2027-04-30": {"rich-text": 4},
			"2027-05-01": {"rich-text": 8},
		})
		if days := kept(); len(days) != 3 {
			e.t.Fatalf("days kept on 2027-05-01: %v", days)
		}
	}},
	{name: "a usage read of a bad range or an unknown org is an error", cfg: plan10, run: func(e *env) {
		if _, err := e.ledger.Usage(e.ctx, "nobody", date(2026, 3, 1), date(2026, 3, 2)); !errors.Is(err, ErrNotFound) {
			e.t.Fatalf("an unknown org: %v", err)
		}
		e.charge("acme", 1)
		before := e.dump()
		for _, r := range [][2]time.Time{
			{date(2026, 3, 2), date(2026, 3, 1)},
			{date(2025, 1, 1), date(2025, 1, 1).AddDate(0, 0, MaxUsageDays)},
		} {
			_, err := e.ledger.Usage(e.ctx, "acme", r[0], r[1])
			wantInputError(e.t, err, false)
		}
		_, err := e.ledger.Usage(e.ctx, "a b", date(2026, 3, 1), date(2026, 3, 2))
		wantInputError(e.t, err, false)
		if _, err := e.ledger.Usage(e.ctx, "acme", date(2025, 1, 1), date(2025, 1, 1).AddDate(0, 0, MaxUsageDays-1)); err != nil {
			e.t.Fatalf("the longest range: %v", err)
		}
		if !equalDump(before, e.dump()) {
			e.t.Fatal("a usage read wrote")
		}
	}},
	{name: "an adjustment adds purchased credits or takes credits into debt, once per reference", cfg: plan10, run: func(e *env) {
		e.topUp("acme", 5, "r1") // allowance 10, purchased 5
		a, applied, err := e.ledger.Adjust(e.ctx, "acme", 3, "goodwill for the outage", "r1")
		if err != nil || !applied {
			e.t.Fatalf("a reference of a top-up stopped an adjustment: %v %v", applied, err)
		}
		e.wantBalance(a, 18, 10, 8)
		if a, applied, err = e.ledger.Adjust(e.ctx, "acme", 3, "goodwill for the outage", "r1"); err != nil || applied {
			e.t.Fatalf("a repeat applied: %v %v", applied, err)
		}
		e.wantBalance(a, 18, 10, 8)
		a, _, err = e.ledger.Adjust(e.ctx, "acme", -20, "charged twice by the old system", "fix-2")
		if err != nil {
			e.t.Fatal(err)
		}
		e.wantBalance(a, -2, -2, 0)
		if len(a.Used) != 0 {
			e.t.Fatalf("an adjustment counted as usage: %v", a.Used)
		}
		ev := e.checkEvents("acme")
		if ev[0].Kind != "adjust" || ev[0].Delta != -20 || ev[0].Reason != "charged twice by the old system" || ev[0].Ref != "fix-2" ||
			ev[1].Kind != "adjust" || ev[1].Delta != 3 || ev[1].Reason != "goodwill for the outage" {
			e.t.Fatalf("events: %+v", ev[:2])
		}
		before := e.dump()
		for _, bad := range []struct {
			amount      int64
			reason, ref string
		}{
			{0, "x", "a"}, {MaxAmount + 1, "x", "a"}, {-MaxAmount - 1, "x", "a"},
			{1, "", "a"}, {1, "  ", "a"}, {1, "two\nlines", "a"}, {1, strings.Repeat("x", MaxReason+1), "a"}, {1, "\xff", "a"},
			{1, "x", ""}, {1, "x", "a b"},
		} {
			_, _, err := e.ledger.Adjust(e.ctx, "acme", bad.amount, bad.reason, bad.ref)
			wantInputError(e.t, err, false)
		}
		if !equalDump(before, e.dump()) {
			e.t.Fatal("a refused adjustment wrote")
		}
	}},
	{name: "call events expire with the markers, account events stay, and read as one log", cfg: Config{DefaultPlan: Plan{Allowance: 10}, MarkerTTL: time.Minute}, run: func(e *env) {
		e.charge("acme", 1)
		e.topUp("acme", 5, "r1")
		e.charge("acme", 2)
		ev := e.checkEvents("acme")
		kinds := make([]string, len(ev))
		for i, x := range ev {
			kinds[i] = x.Kind
		}
		if strings.Join(kinds, " ") != "charge topup charge grant" {
			e.t.Fatalf("events in order: %v", kinds)
		}
		calls, err := e.rdb.PTTL(e.ctx, e.ledger.Keys().Calls("acme")).Result()
		if err != nil || calls <= 0 || calls > time.Minute {
			e.t.Fatalf("the call log's lifetime: %s %v", calls, err)
		}
		account, err := e.rdb.PTTL(e.ctx, e.ledger.Keys().Events("acme")).Result()
		if err != nil || account >= 0 {
			e.t.Fatalf("the account events' lifetime: %s %v, want none", account, err)
		}
		// Once the call log is gone, the account events and the usage remain.
		if err := e.rdb.Del(e.ctx, e.ledger.Keys().Calls("acme")).Err(); err != nil {
			e.t.Fatal(err)
		}
		ev, err = e.ledger.Events(e.ctx, "acme", 10)
		if err != nil || len(ev) != 1 || ev[0].Kind != "topup" {
			e.t.Fatalf("events after the call log: %+v %v", ev, err)
		}
		wantUsage(e.t, e.usageOf("acme", date(2026, 3, 10), date(2026, 3, 10)), map[string]map[string]int64{
			"2026-03-10": {"rich-text": 3},
		})
	}},
}
