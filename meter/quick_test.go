package meter

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"pgregory.net/rapid"
)

// fullWay returns script name's text with the charge's quick way off.
func fullWay(t *testing.T, name string) *redis.Script {
	t.Helper()
	src, err := Script(name)
	if err != nil {
		t.Fatal(err)
	}
	const on, off = "local QUICK = true\n", "local QUICK = false\n"
	if strings.Count(src, on) != 1 {
		t.Fatalf("%s: %q is not there once", name, on)
	}
	return redis.NewScript(strings.Replace(src, on, off, 1))
}

// TestQuickChargeSameAsFull runs random histories on two orgs of one
// ledger, q and f: every charge of q takes the charge scripts as they ship,
// every charge of f the same scripts with the quick way off (so each runs
// the full way), and every other step (top-ups, expiring and pending
// grants, holds, refunds, settles, plans, and both clocks moving) is the
// same for both. After each step the two orgs' replies and every key they
// have, with its contents and lifetime, must be the same: the quick way
// writes what the full way would, whatever it takes or hands over.
func TestQuickChargeSameAsFull(t *testing.T) {
	full := map[bool]*redis.Script{false: fullWay(t, "charge.lua"), true: fullWay(t, "charges.lua")}
	for _, s := range stores(t) {
		t.Run(s.name, func(t *testing.T) {
			rapid.Check(t, func(rt *rapid.T) { checkQuick(t, rt, s, full) })
		})
	}
}

func checkQuick(t *testing.T, rt *rapid.T, s store, full map[bool]*redis.Script) {
	e := newEnv(t, s.rdb, Config{DefaultPlan: Plan{Allowance: 200, RechargeMonth: rapid.IntRange(1, 12).Draw(rt, "month")}})
	e.clock.Set(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(rapid.Int64Range(0, 365*24).Draw(rt, "hour")) * time.Hour))
	l := e.ledger
	_, single := s.rdb.(*redis.Client)
	var ids []string
	for step := range rapid.IntRange(1, 40).Draw(rt, "steps") {
		// Each step is drawn once, then applied to both orgs.
		var apply func(org string) string
		switch op := rapid.IntRange(0, 10).Draw(rt, "op"); {
		case op <= 4:
			c := chargeCall{Feature: rapid.SampledFrom([]string{"rich-text", "alt-text"}).Draw(rt, "feature"),
				Cost: rapid.Int64Range(0, 150).Draw(rt, "cost"), Attempt: NewRequestID(), OverdraftLimit: NoLimit,
				Overdraft: rapid.Bool().Draw(rt, "overdraft")}
			if c.Overdraft && rapid.Bool().Draw(rt, "limited") {
				c.OverdraftLimit = rapid.Int64Range(0, 300).Draw(rt, "limit")
			}
			c.RequestID = fmt.Sprintf("r%d", step)
			if len(ids) > 0 && rapid.IntRange(0, 4).Draw(rt, "again") == 0 {
				c.RequestID = rapid.SampledFrom(ids).Draw(rt, "request id")
			} else {
				ids = append(ids, c.RequestID)
			}
			many := single && rapid.Bool().Draw(rt, "batch")
			apply = func(org string) string {
				c.Org = org
				script := chargeScript.Script
				if many {
					script = chargesScript
				}
				if org == "f" {
					script = full[many]
				}
				now := e.clock.Now()
				head := []any{now.UnixMilli(), monthIndex(now), l.defaultPlan.Allowance, l.defaultPlan.RechargeMonth,
					l.eventsMax, l.serverSkew.Load(), l.markerTTL}
				raw, err := script.Run(e.ctx, s.rdb, c.keys(l.keys), append(head, c.args(l)...)...).Result()
				if many && err == nil {
					raw = raw.([]any)[0]
				}
				return fmt.Sprintf("charge %s %d: %v %v", c.RequestID, c.Cost, raw, err)
			}
		case op == 5:
			n := rapid.Int64Range(1, 300).Draw(rt, "top-up")
			apply = func(org string) string {
				a, _, err := l.TopUp(e.ctx, org, n, fmt.Sprintf("t%d", step))
				return fmt.Sprintf("top-up %s %v", show(a), err)
			}
		case op == 6:
			req := GrantRequest{Amount: rapid.Int64Range(1, 300).Draw(rt, "grant"), Reference: fmt.Sprintf("g%d", step)}
			p := rapid.IntRange(0, 100).Draw(rt, "priority")
			req.Priority = &p
			if rapid.Bool().Draw(rt, "expires") {
				req.Expires = e.clock.Now().Add(time.Duration(rapid.IntRange(1, 90).Draw(rt, "days")) * 24 * time.Hour)
			}
			if rapid.IntRange(0, 3).Draw(rt, "pending") == 0 {
				req.Effective = time.Now().Add(time.Duration(l.serverSkew.Load())*time.Millisecond +
					time.Duration(rapid.IntRange(1, 48).Draw(rt, "starts in hours"))*time.Hour)
			}
			apply = func(org string) string {
				g, a, _, err := l.Grant(e.ctx, org, req)
				return fmt.Sprintf("grant %s %s %v", show(g), show(a), err)
			}
		case op == 7:
			ref, n := fmt.Sprintf("h%d", step), rapid.Int64Range(1, 100).Draw(rt, "hold")
			capture := rapid.IntRange(-1, 100).Draw(rt, "captured")
			apply = func(org string) string {
				_, a, _, err := l.CreateHold(e.ctx, HoldRequest{Org: org, Feature: "image", Amount: n, Reference: ref})
				if err == nil && capture >= 0 {
					_, a, _, err = l.CaptureHold(e.ctx, org, HoldID(ref), int64(capture))
				}
				return fmt.Sprintf("hold %s %v", show(a), err)
			}
		case op == 8 && len(ids) > 0:
			id := rapid.SampledFrom(ids).Draw(rt, "settled")
			actual := rapid.Int64Range(-1, 200).Draw(rt, "actual")
			apply = func(org string) string {
				var r SettleResult
				var err error
				if actual < 0 {
					r, err = l.Refund(e.ctx, org, id)
				} else {
					r, err = l.Settle(e.ctx, org, id, actual)
				}
				return fmt.Sprintf("settle %s %s %v", id, show(r), err)
			}
		case op == 9:
			e.clock.Add(time.Duration(rapid.IntRange(1, 24*100).Draw(rt, "gateway hours")) * time.Hour)
			continue
		default:
			e.moveServerClock(time.Duration(rapid.IntRange(1, 24*100).Draw(rt, "redis hours")) * time.Hour)
			continue
		}
		q, f := apply("q"), apply("f")
		if !sameButClock(q, strings.NewReplacer("{f}", "{q}", `"org":"f"`, `"org":"q"`).Replace(f)) {
			t.Fatalf("step %d: the quick way answered\n%s\nthe full way\n%s", step, q, f)
		}
		qs, qt := quickState(e, "q")
		fs, ft := quickState(e, "f")
		if !sameButClock(qs, fs) {
			t.Fatalf("step %d (%s): the quick way left\n%s\nthe full way\n%s", step, q, qs, fs)
		}
		for i := range qt {
			if d := qt[i] - ft[i]; d > 5*time.Second || d < -5*time.Second {
				t.Fatalf("step %d (%s): key %d of\n%s\nlives %v with the quick way, %v with the full way", step, q, i, qs, qt[i], ft[i])
			}
		}
	}
}

// sameButClock reports whether a and b are the same text but for times
// read from Redis' clock (holds and grants run by it), which the two orgs'
// steps read a moment apart: a number of 10 digits or more (unix seconds
// or ms) may differ by up to 5 s.
func sameButClock(a, b string) bool {
	a, b = unixTimes(a), unixTimes(b)
	ta, tb := digits.FindAllString(a, -1), digits.FindAllString(b, -1)
	if len(ta) != len(tb) {
		return false
	}
	for i := range ta {
		if ta[i] == tb[i] {
			continue
		}
		x, errx := strconv.ParseInt(ta[i], 10, 64)
		y, erry := strconv.ParseInt(tb[i], 10, 64)
		if errx != nil || erry != nil || len(ta[i]) < 10 || len(ta[i]) != len(tb[i]) {
			return false
		}
		slack := int64(5)
		if len(ta[i]) >= 13 {
			slack = 5000
		}
		if x-y > slack || y-x > slack {
			return false
		}
	}
	return true
}

var digits = regexp.MustCompile(`\d+|\D+`)

// unixTimes writes the RFC 3339 times in s (the JSON answers') as unix
// seconds, which sameButClock compares.
func unixTimes(s string) string {
	return rfc3339.ReplaceAllStringFunc(s, func(x string) string {
		t, err := time.Parse(time.RFC3339, x)
		if err != nil {
			return x
		}
		return strconv.FormatInt(t.Unix(), 10)
	})
}

var rfc3339 = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)`)

// show is v in JSON: its times as times, not pointers.
func show(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

// quickState is every key of org with its contents, the org's name taken
// out, and its lifetime.
func quickState(e *env, org string) (string, []time.Duration) {
	var b strings.Builder
	var ttls []time.Duration
	dump := e.dump()
	for _, k := range e.keys() {
		if !strings.Contains(k, "{"+org+"}") {
			continue
		}
		ttl, err := e.rdb.PTTL(e.ctx, k).Result()
		if err != nil {
			e.t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s %s\n", strings.ReplaceAll(k, "{"+org+"}", "{}"), dump[k])
		ttls = append(ttls, ttl)
	}
	return b.String(), ttls
}
