package meter

import (
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestBindingsMatchScripts checks each script's Go binding against its Lua
// file: as many KEYS and ARGV as the script reads, and a reply code table
// that holds the codes the script returns, no more and no fewer.
func TestBindingsMatchScripts(t *testing.T) {
	l, err := New(nil, Config{})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		file string
		b    binding
	}{
		{"charge.lua", chargeCall{Org: "o", Feature: "f", Cost: 1, RequestID: "r", Attempt: "a"}},
		{"settle.lua", settleCall{org: "o", requestID: "r"}},
		{"keep.lua", keepCall{org: "o", requestID: "r", attempt: "a"}},
		{"void.lua", voidCall{org: "o", requestID: "r", attempt: "a"}},
		{"topup.lua", topUpCall{org: "o", amount: 1, reference: "ref"}},
		{"voidtopup.lua", voidTopUpCall{org: "o", amount: 1, reference: "ref"}},
		{"adjust.lua", adjustCall{org: "o", amount: 1, reason: "why", reference: "ref"}},
		{"plan.lua", planCall{org: "o", plan: Plan{Allowance: 1, RechargeMonth: 1}, reference: "ref"}},
		{"recharge.lua", rechargeCall{org: "o", reference: "ref"}},
		{"voidwrite.lua", voidWriteCall{org: "o", kind: "plan", reference: "ref"}},
		{"account.lua", accountCall{org: "o"}},
		{"hold.lua", holdCall{org: "o", id: "h", feature: "f", amount: 1, ttl: time.Minute}},
		{"capture.lua", captureCall{org: "o", id: "h"}},
		{"release.lua", releaseCall{org: "o", id: "h"}},
		{"voidhold.lua", voidHoldCall{org: "o", id: "h"}},
		{"holds.lua", holdsCall{org: "o"}},
		// A sync with no spending: the script's fixed ARGV alone.
		{"lease.lua", leaseCall{s: LeaseSync{Org: "o", ID: "l", Seq: 1, TTL: time.Second}}},
		{"alert.lua", alertCall{org: "o", thresholds: []int64{1}}},
		{"grant.lua", grantCall{org: "o", req: GrantRequest{Amount: 1}, reference: "ref"}},
		{"grants.lua", grantsCall{org: "o"}},
		{"voidgrant.lua", voidGrantCall{org: "o", num: "1"}},
		{"budget.lua", budgetCall{org: "o", subject: "s", limit: 1, window: "d"}},
		{"budgets.lua", budgetsCall{org: "o", subject: "s", list: true, limit: 1}},
	}
	bound := map[string]bool{"charges.lua": true} // the batcher's, with charge.lua's binding
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			bound[c.file] = true
			if got, want := c.b.script().Hash(), newScript(c.file).Hash(); got != want {
				t.Fatalf("the binding runs another script than %s", c.file)
			}
			code := luaCode(t, c.file)
			keys, args := maxIndex(code, "KEYS", ""), max(common, maxIndex(code, "ARGV", ""))
			// charge.lua runs lib/charge.lua's charge(0, 7): lib/quick.lua's
			// charge_start, then, for a charge that is not quick, lib/calls.lua's
			// charge_full.
			var charge string
			if c.file == "charge.lua" {
				charge = luaCode(t, "lib/quick.lua") + luaCode(t, "lib/calls.lua")
				keys, args = maxIndex(charge, "KEYS", "k + "), common+maxIndex(charge, "ARGV", "a + ")
			}
			if got := len(c.b.keys(l.keys)); got != keys {
				t.Errorf("binding passes %d KEYS, %s reads %d", got, c.file, keys)
			}
			if got := common + len(c.b.args(l)); got != args {
				t.Errorf("binding passes ARGV up to %d, %s reads up to %d", got, c.file, args)
			}
			code += charge
			returned := map[int64]bool{}
			for _, m := range regexp.MustCompile(`\b(OK|REFUSED|REPEAT|NOT_FOUND|LIMIT|VOIDED|ENDED|IN_FLIGHT|MISMATCH|LEASE|FULL|BUDGET)\b`).FindAllString(code, -1) {
				returned[luaCodes[m]] = true
			}
			got, want := slices.Sorted(maps.Keys(c.b.script().codes)), slices.Sorted(maps.Keys(returned))
			if !slices.Equal(got, want) {
				t.Errorf("binding decodes codes %v, %s returns %v", got, c.file, want)
			}
		})
	}
	entries, err := scripts.ReadDir("lua")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.IsDir() && !bound[e.Name()] {
			t.Errorf("%s has no binding in this test", e.Name())
		}
	}
}

// luaCodes are lua/lib/base.lua's names of the reply codes.
var luaCodes = map[string]int64{"OK": codeOK, "REFUSED": codeRefused, "REPEAT": codeRepeat, "NOT_FOUND": codeNotFound,
	"LIMIT": codeLimit, "VOIDED": codeVoided, "ENDED": codeEnded, "IN_FLIGHT": codeInFlight, "MISMATCH": codeMismatch,
	"LEASE": codeLease, "FULL": codeFull, "BUDGET": codeBudget}

// luaCode is file's text without its comments nor its includes.
func luaCode(t *testing.T, file string) string {
	t.Helper()
	raw, err := scripts.ReadFile("lua/" + file)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for line := range strings.Lines(string(raw)) {
		line, _, _ = strings.Cut(line, "--")
		b.WriteString(line + "\n")
	}
	return b.String()
}

// maxIndex is the highest n of name[<offset>n] in code.
func maxIndex(code, name, offset string) int {
	n := 0
	for _, m := range regexp.MustCompile(regexp.QuoteMeta(name+"["+offset)+`(\d+)\]`).FindAllStringSubmatch(code, -1) {
		i, _ := strconv.Atoi(m[1])
		n = max(n, i)
	}
	return n
}
