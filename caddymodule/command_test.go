package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/meter"
)

// TestCommandCredits drives `caddy credits` against the demo Caddyfile, run
// by the built binary: plan, show, a top-up and its repeat, a call through
// the gateway, recharge, events, --json, the environment, and the errors.
func TestCommandCredits(t *testing.T) {
	clearCreditsEnv(t)
	cfg, gw, admin := demoCaddyfile(t)
	startCaddyProcess(t, cfg, gw, admin)
	endpoint := "http://" + admin + "/admin"
	credits := func(t *testing.T, args ...string) string {
		t.Helper()
		out, err := runCaddyCommand(t, append([]string{"credits", "--endpoint", endpoint}, args...)...)
		if err != nil {
			t.Fatalf("caddy credits %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}

	out := credits(t, "plan", "acme", "100", "4")
	wantFields(t, out, map[string]string{
		"org":       "acme",
		"balance":   "100",
		"allowance": "100 of 100 (recharges every year on month 4)",
		"purchased": "0",
		"used":      "nothing this period",
	})
	wantFields(t, credits(t, "show", "acme"), map[string]string{"org": "acme", "balance": "100"})
	out = credits(t, "plan", "month-one", "7")
	wantFields(t, out, map[string]string{"allowance": "7 of 7 (recharges every year on month 1)"})

	for i := range 2 {
		out = credits(t, "topup", "acme", "25", "--reference", "inv-1")
		wantFields(t, out, map[string]string{"balance": "125", "purchased": "25"})
		if t.Failed() {
			t.Fatalf("top-up %d:\n%s", i+1, out)
		}
	}

	req, _ := http.NewRequest(http.MethodPost, "http://"+gw+"/rich-text/generate", nil)
	req.Header.Set("X-Org-Id", "acme")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("call through the gateway: %d", resp.StatusCode)
	}
	out = credits(t, "show", "acme")
	wantFields(t, out, map[string]string{"balance": "124", "allowance": "99 of 100 (recharges every year on month 4)", "used": ""})
	if !strings.Contains(out, "\nused:\n  rich-text  1\n") {
		t.Errorf("show lists no usage of rich-text:\n%s", out)
	}

	// The orgs, a page at a time: acme, then month-one.
	if out := credits(t, "orgs", "--limit", "1"); out != "acme  124\nmore: caddy credits orgs --after acme\n" {
		t.Errorf("caddy credits orgs --limit 1:\n%s", out)
	}
	if out := credits(t, "orgs", "--after", "acme"); out != "month-one  7\n" {
		t.Errorf("caddy credits orgs --after acme:\n%s", out)
	}
	if out := credits(t, "orgs", "--after", "zzz"); out != "no orgs\n" {
		t.Errorf("caddy credits orgs --after zzz:\n%s", out)
	}

	out = credits(t, "recharge", "acme")
	wantFields(t, out, map[string]string{"balance": "125", "allowance": "100 of 100 (recharges every year on month 4)", "used": "nothing this period"})
	period := field(out, "period")
	if today := time.Now().UTC().Format(time.DateOnly); !strings.HasPrefix(period, today+"T") || !strings.HasSuffix(period, "-04-01") {
		t.Errorf("period after a recharge %q: want from now (%s) to April 1", period, today)
	}

	// Newest first; the repeated top-up left no event.
	events := eventLines(t, credits(t, "events", "acme"))
	var kinds []string
	for _, e := range events {
		kinds = append(kinds, e[1])
	}
	if want := []string{"recharge", "charge", "topup", "plan"}; !slices.Equal(kinds, want) {
		t.Fatalf("event kinds %v, want %v", kinds, want)
	}
	if topUp := strings.Join(events[2][2:], " "); topUp != "+25 balance 125 inv-1" {
		t.Errorf("top-up event %q", topUp)
	}
	if plan := strings.Join(events[3][2:5], " "); plan != "+100 balance 100" {
		t.Errorf("plan event %q", strings.Join(events[3], " "))
	}
	if charge := strings.Join(events[1][2:6], " "); charge != "-1 balance 124 rich-text" {
		t.Errorf("charge event %q", strings.Join(events[1], " "))
	}
	if limited := eventLines(t, credits(t, "events", "acme", "--limit", "1")); len(limited) != 1 || limited[0][1] != "recharge" {
		t.Errorf("events --limit 1: %v", limited)
	}

	var acct meter.Account
	out = credits(t, "show", "acme", "--json")
	if err := json.Unmarshal([]byte(out), &acct); err != nil {
		t.Fatalf("show --json: %v\n%s", err, out)
	}
	if acct.Org != "acme" || acct.Balance != 125 || acct.Purchased != 25 || acct.Plan != (meter.Plan{Allowance: 100, RechargeMonth: 4}) || !acct.OwnPlan {
		t.Errorf("show --json: %+v", acct)
	}
	var list struct {
		Events []meter.Event `json:"events"`
	}
	out = credits(t, "events", "acme", "--json", "--limit", "2")
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list.Events) != 2 || list.Events[1].Kind != "charge" {
		t.Errorf("events --json: %v %+v\n%s", err, list, out)
	}

	closed := fmt.Sprintf("http://127.0.0.1:%d/admin", freePort(t))
	t.Run("environment", func(t *testing.T) {
		out, err := runCaddyEnv(t, []string{"CREDITS_ADMIN_ENDPOINT=" + endpoint}, "credits", "show", "acme")
		if err != nil || field(out, "balance") != "125" {
			t.Errorf("endpoint from the environment: %v\n%s", err, out)
		}
		out, err = runCaddyEnv(t, []string{"CREDITS_ADMIN_ENDPOINT=" + closed}, "credits", "show", "acme", "--endpoint", endpoint)
		if err != nil || field(out, "balance") != "125" {
			t.Errorf("--endpoint over the environment: %v\n%s", err, out)
		}
	})

	// Cases with precall run against a closed port: their message, and not
	// a network error, shows that they stopped before any request.
	for _, tc := range []struct {
		name    string
		args    []string
		precall bool
		want    []string
	}{
		{"negative amount", []string{"topup", "acme", "--", "-5"}, true,
			[]string{`invalid amount "-5": must be 1 to 1000000000000`}},
		{"zero amount", []string{"topup", "acme", "0"}, true, []string{`invalid amount "0": must be 1 to 1000000000000`}},
		{"amount too big", []string{"topup", "acme", "1000000000001"}, true, []string{`invalid amount "1000000000001"`}},
		{"bad reference", []string{"topup", "acme", "5", "--reference", "has space"}, true, []string{`invalid reference "has space"`}},
		{"negative allowance", []string{"plan", "acme", "--", "-1"}, true, []string{`invalid allowance "-1": must be 0 to 1000000000000`}},
		{"allowance too big", []string{"plan", "acme", "1000000000001"}, true, []string{`invalid allowance "1000000000001"`}},
		{"negative amount without --", []string{"topup", "acme", "-5"}, true, []string{"put -- before a negative number"}},
		{"amount not a number", []string{"topup", "acme", "abc"}, true, []string{"invalid amount", "not a whole number"}},
		{"allowance not a number", []string{"plan", "acme", "lots"}, true, []string{"invalid allowance", "not a whole number"}},
		{"month not a number", []string{"plan", "acme", "100", "april"}, true, []string{"invalid recharge_month", "not a whole number"}},
		{"month out of range", []string{"plan", "acme", "100", "13"}, true, []string{`invalid recharge_month "13": must be 1 to 12`}},
		{"month zero", []string{"plan", "acme", "100", "0"}, true, []string{`invalid recharge_month "0": must be 1 to 12`}},
		{"limit zero", []string{"events", "acme", "--limit", "0"}, true, []string{`invalid limit "0": must be 1 to 1000`}},
		{"limit too big", []string{"events", "acme", "--limit", "1001"}, true, []string{`invalid limit "1001": must be 1 to 1000`}},
		{"limit not a number", []string{"events", "acme", "--limit", "abc"}, true, []string{"invalid argument", "--limit"}},
		{"amount missing", []string{"topup", "acme"}, true, []string{"wrong number of arguments", "usage: caddy credits topup <org> <amount>"}},
		{"org missing", []string{"show"}, true, []string{"wrong number of arguments", "usage: caddy credits show <org>"}},
		{"too many arguments", []string{"plan", "acme", "1", "2", "3"}, true, []string{"wrong number of arguments (4)"}},
		{"orgs limit out of range", []string{"orgs", "--limit", "1001"}, true, []string{`invalid limit "1001": must be 1 to 1000`}},
		{"adjust by 0", []string{"adjust", "acme", "0", "--reason", "x"}, true, []string{`invalid amount "0": must not be 0`}},
		{"adjust too far", []string{"adjust", "acme", "--reason", "x", "--", "-1000000000001"}, true, []string{`invalid amount "-1000000000001"`}},
		{"adjust without a reason", []string{"adjust", "acme", "5"}, true, []string{`invalid reason ""`}},
		{"usage bad date", []string{"usage", "acme", "--from", "2026-13-01"}, true, []string{`invalid from "2026-13-01": must be a date, YYYY-MM-DD`}},
		{"usage backwards", []string{"usage", "acme", "--from", "2026-02-02", "--to", "2026-02-01"}, true, []string{"must not be before --from"}},
		{"usage too long", []string{"usage", "acme", "--from", "2024-01-01", "--to", "2026-01-01"}, true, []string{"must be at most 449 days after --from"}},
		{"orgs after a bad org", []string{"orgs", "--after", "a/b"}, true, []string{"invalid org"}},
		{"empty org", []string{"recharge", ""}, true, []string{"org missing"}},
		{"bad org", []string{"show", "no/such org"}, true, []string{"invalid org"}},
		{"unknown subcommand", []string{"frobnicate", "acme"}, true, []string{"unknown command", "frobnicate"}},
		{"unknown org", []string{"show", "ghost"}, false, []string{"answered 404 Not Found", "Redis holds nothing for org ghost"}},
		{"not an endpoint", []string{"show", "acme", "--endpoint", "ftp://127.0.0.1/admin"}, true, []string{"endpoint must be an http or https URL"}},
		{"not a credits_admin mount", []string{"show", "acme", "--endpoint", "http://" + admin + "/"}, false, []string{"is not JSON", "credits_admin"}},
		{"unreachable endpoint", []string{"show", "acme", "--endpoint", closed}, false, []string{"cannot reach", closed}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ep := endpoint
			if tc.precall {
				ep = closed
			}
			out, err := runCaddyCommand(t, append([]string{"credits", "--endpoint", ep}, tc.args...)...)
			if exitErr, ok := errors.AsType[*exec.ExitError](err); !ok || exitErr.ExitCode() != 1 {
				t.Fatalf("caddy credits %s: %v, want exit status 1\n%s", strings.Join(tc.args, " "), err, out)
			}
			if out != "" {
				t.Errorf("standard output is not empty: %s", out)
			}
			// The message is a plain line, not a JSON log line.
			msg := err.Error()
			if strings.Contains(msg, `"level"`) || strings.Contains(msg, `\"`) {
				t.Errorf("the error is a log line, not a plain one: %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("standard error lacks %q: %v", w, err)
				}
			}
			if tc.precall && strings.Contains(err.Error(), "cannot reach") {
				t.Errorf("called the API: %v", err)
			}
		})
	}

	// Nothing above changed the account.
	wantFields(t, credits(t, "show", "acme"), map[string]string{"balance": "125", "purchased": "25"})

	// A correction, applied once per reference, with its reason in the
	// event; and the usage per day, which a recharge does not reset.
	for range 2 {
		wantFields(t, credits(t, "adjust", "acme", "--reason", "charged twice", "--reference", "case-1", "--", "-5"),
			map[string]string{"balance": "120"})
	}
	if e := credits(t, "events", "acme", "--limit", "1"); !strings.Contains(e, "adjust") || !strings.Contains(e, "-5") ||
		!strings.Contains(e, "case-1") || !strings.Contains(e, `"charged twice"`) {
		t.Errorf("the adjustment's event:\n%s", e)
	}
	today := time.Now().UTC().Format(time.DateOnly)
	if out := credits(t, "usage", "acme", "--from", today, "--to", today); out != today+"  1  rich-text 1\n" {
		t.Errorf("caddy credits usage:\n%q", out)
	}
	if out := credits(t, "usage", "acme", "--from", "2026-01-01", "--to", "2026-01-02"); out != "no usage from 2026-01-01 to 2026-01-02\n" {
		t.Errorf("caddy credits usage of days without usage:\n%q", out)
	}
}

// TestCommandCreditsToken runs a credits_admin with a token: the token from
// --token or from CREDITS_ADMIN_TOKEN opens it, and never shows in the
// output.
func TestCommandCreditsToken(t *testing.T) {
	clearCreditsEnv(t)
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	startCaddyProcess(t, fmt.Sprintf(`{
	admin off
	credits {
		default_plan 5
	}
}
:%d {
	bind 127.0.0.1
	handle_path /admin/* {
		credits_admin {
			token t0ken
		}
	}
}
`, port), addr)
	endpoint := "http://" + addr + "/admin"

	out, err := runCaddyCommand(t, "credits", "plan", "beta", "7", "--endpoint", endpoint, "--token", "t0ken")
	if err != nil || field(out, "balance") != "7" {
		t.Fatalf("plan with --token: %v\n%s", err, out)
	}
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		ok   bool
	}{
		{"flag", nil, []string{"--token", "t0ken"}, true},
		{"environment", []string{"CREDITS_ADMIN_TOKEN=t0ken"}, nil, true},
		{"flag over environment", []string{"CREDITS_ADMIN_TOKEN=wr0ng"}, []string{"--token", "t0ken"}, true},
		{"wrong flag", nil, []string{"--token", "wr0ng"}, false},
		{"wrong environment", []string{"CREDITS_ADMIN_TOKEN=wr0ng"}, nil, false},
		{"empty flag over environment", []string{"CREDITS_ADMIN_TOKEN=t0ken"}, []string{"--token", ""}, false},
		{"none", nil, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"credits", "show", "beta", "--endpoint", endpoint}, tc.args...)
			out, err := runCaddyEnv(t, tc.env, args...)
			if tc.ok && (err != nil || field(out, "balance") != "7") {
				t.Errorf("want the account: %v\n%s", err, out)
			}
			if !tc.ok && (err == nil || !strings.Contains(err.Error(), "answered 401 Unauthorized")) {
				t.Errorf("want a 401: %v\n%s", err, out)
			}
			all := out
			if err != nil {
				all += err.Error()
			}
			for _, token := range []string{"t0ken", "wr0ng"} {
				if strings.Contains(all, token) {
					t.Errorf("the output shows the token %s: %s", token, all)
				}
			}
		})
	}
}

// clearCreditsEnv hides the caller's own CREDITS_ADMIN_* settings from the
// commands the test runs; caddy credits treats an empty variable as unset.
func clearCreditsEnv(t *testing.T) {
	t.Helper()
	t.Setenv("CREDITS_ADMIN_ENDPOINT", "")
	t.Setenv("CREDITS_ADMIN_TOKEN", "")
}

// runCaddyEnv is runCaddyCommand with env, "NAME=value" strings, added to
// the environment.
func runCaddyEnv(t *testing.T, env []string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, buildCaddy(t), args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%w: %s", err, stderr.String())
	}
	return stdout.String(), nil
}

// field returns the value on the line "name: value" of an account as
// caddy credits prints it, or "(none)" when there is no such line.
func field(out, name string) string {
	for line := range strings.Lines(out) {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "(none)"
}

// wantFields checks the fields of an account as caddy credits prints it.
func wantFields(t *testing.T, out string, want map[string]string) {
	t.Helper()
	for name, v := range want {
		if got := field(out, name); got != v {
			t.Errorf("%s: %q, want %q in:\n%s", name, got, v, out)
		}
	}
}

// eventLines splits the events that caddy credits prints into their
// whitespace-separated fields, checking the time of each.
func eventLines(t *testing.T, out string) [][]string {
	t.Helper()
	var events [][]string
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) < 5 || f[3] != "balance" {
			t.Fatalf("event line %q: want time, kind, delta, balance n, feature and reference", line)
		}
		if _, err := time.Parse(time.RFC3339, f[0]); err != nil {
			t.Errorf("event time: %v", err)
		}
		events = append(events, f)
	}
	return events
}

// TestCommandHolds drives caddy credits holds against a real Caddy and
// redis-server: create with and without a reference, the repeat, the list,
// capture and its repeat, release, the API's refusals, and the argument
// checks, which stop before any call.
func TestCommandHolds(t *testing.T) {
	clearCreditsEnv(t)
	g := startGateway(t, gatewayOptions{})
	wantStatus(t, g.admin(http.MethodPut, "/orgs/cli/plan", `{"allowance": 100, "recharge_month": 1}`), http.StatusOK)
	env := []string{"CREDITS_ADMIN_TOKEN=s3cret"}
	credits := func(t *testing.T, args ...string) string {
		t.Helper()
		out, err := runCaddyEnv(t, env, append([]string{"credits", "--endpoint", g.adminURL}, args...)...)
		if err != nil {
			t.Fatalf("caddy credits %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}

	if out := credits(t, "holds", "cli"); out != "no holds\n" {
		t.Fatalf("holds of an org without any: %q", out)
	}
	id := meter.HoldID("job-1")
	for i := range 2 {
		out := credits(t, "holds", "cli", "create", "30", "--feature", "long-job", "--ttl", "10m", "--reference", "job-1")
		wantFields(t, out, map[string]string{
			"hold": id, "state": "held", "amount": "30", "feature": "long-job",
			"org": "cli", "balance": "100", "held": "30", "available": "70",
		})
		expires, err := time.Parse(time.RFC3339, field(out, "expires"))
		if err != nil || time.Until(expires) < 9*time.Minute || time.Until(expires) > 11*time.Minute {
			t.Errorf("create %d: expires %q (%v), want in 10m", i+1, field(out, "expires"), err)
		}
		if t.Failed() {
			t.FailNow()
		}
	}

	// Without --reference the CLI sends one of its own: --json shows the id.
	var created struct {
		meter.Hold
		Account meter.Account `json:"account"`
	}
	out := credits(t, "holds", "cli", "create", "20", "--feature", "long-job", "--json")
	if err := json.Unmarshal([]byte(out), &created); err != nil || created.State != meter.HoldLive || created.Amount != 20 || created.Account.Held != 50 {
		t.Fatalf("create --json: %v %+v\n%s", err, created, out)
	}
	id2 := created.ID

	lines := strings.Split(strings.TrimSpace(credits(t, "holds", "cli")), "\n")
	if len(lines) != 3 || strings.Join(strings.Fields(lines[0]), " ") != "HOLD STATE AMOUNT CAPTURED FEATURE UNTIL" {
		t.Fatalf("holds list:\n%s", strings.Join(lines, "\n"))
	}
	rows := map[string]string{}
	for _, line := range lines[1:] {
		f := strings.Fields(line)
		rows[f[0]] = strings.Join(f[1:6], " ")
	}
	if rows[id] != "held 30 0 long-job expires" || rows[id2] != "held 20 0 long-job expires" {
		t.Fatalf("holds list rows %v", rows)
	}

	for range 2 {
		out = credits(t, "holds", "cli", "capture", id, "12")
		wantFields(t, out, map[string]string{"hold": id, "state": "captured", "amount": "0", "captured": "12", "balance": "88", "held": "20", "available": "68"})
	}
	out = credits(t, "holds", "cli", "release", id2)
	wantFields(t, out, map[string]string{"hold": id2, "state": "released", "balance": "88", "held": "0", "available": "88"})
	if !strings.Contains(out, "kept until:") {
		t.Errorf("an ended hold shows no kept until:\n%s", out)
	}
	if t.Failed() {
		t.FailNow()
	}
	var list struct {
		Holds []meter.Hold `json:"holds"`
	}
	out = credits(t, "holds", "cli", "--json")
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list.Holds) != 2 {
		t.Fatalf("holds --json: %v\n%s", err, out)
	}

	g.t = t
	before := g.ledgerState("cli")
	closed := fmt.Sprintf("http://127.0.0.1:%d/admin", freePort(t))
	long := strings.Repeat("h", 65)
	for _, tc := range []struct {
		name    string
		args    []string
		precall bool
		want    []string
	}{
		{"release of a captured hold", []string{"holds", "cli", "release", id}, false, []string{"answered 409 Conflict", "hold " + id + " was captured"}},
		{"capture of a released hold", []string{"holds", "cli", "capture", id2, "1"}, false, []string{"answered 409 Conflict", "was released"}},
		{"capture of an unknown hold", []string{"holds", "cli", "capture", "nope", "1"}, false, []string{"answered 404 Not Found", "org cli has no hold nope"}},
		{"release of an unknown hold", []string{"holds", "cli", "release", "nope"}, false, []string{"answered 404 Not Found"}},
		{"holds of an unknown org", []string{"holds", "ghost"}, false, []string{"answered 404 Not Found", "Redis holds nothing for org ghost"}},
		{"short", []string{"holds", "cli", "create", "89", "--feature", "long-job"}, false, []string{"answered 402 Payment Required", "88 credits available"}},
		{"create amount zero", []string{"holds", "cli", "create", "0", "--feature", "f"}, true, []string{`invalid amount "0": must be 1 to 1000000000000`}},
		{"create amount too big", []string{"holds", "cli", "create", "1000000000001", "--feature", "f"}, true, []string{`invalid amount "1000000000001": must be 1 to 1000000000000`}},
		{"create amount negative", []string{"holds", "cli", "create", "--feature", "f", "--", "-1"}, true, []string{`invalid amount "-1"`}},
		{"create amount not a number", []string{"holds", "cli", "create", "lots", "--feature", "f"}, true, []string{`invalid amount "lots": not a whole number`}},
		{"create without feature", []string{"holds", "cli", "create", "5"}, true, []string{"--feature is required"}},
		{"create bad feature", []string{"holds", "cli", "create", "5", "--feature", "a b"}, true, []string{`invalid feature "a b"`}},
		{"create ttl 0s", []string{"holds", "cli", "create", "5", "--feature", "f", "--ttl", "0s"}, true, []string{`invalid ttl "0s": must be a duration from 1s to 24h`}},
		{"create ttl 25h", []string{"holds", "cli", "create", "5", "--feature", "f", "--ttl", "25h"}, true, []string{`invalid ttl "25h"`}},
		{"create ttl abc", []string{"holds", "cli", "create", "5", "--feature", "f", "--ttl", "abc"}, true, []string{`invalid ttl "abc"`}},
		{"create bad reference", []string{"holds", "cli", "create", "5", "--feature", "f", "--reference", "has space"}, true, []string{`invalid reference "has space"`}},
		{"create empty reference", []string{"holds", "cli", "create", "5", "--feature", "f", "--reference", ""}, true, []string{`invalid reference ""`}},
		{"capture negative", []string{"holds", "cli", "capture", id, "--", "-1"}, true, []string{`invalid amount "-1": must be 0 to 1000000000000`}},
		{"capture too big", []string{"holds", "cli", "capture", id, "1000000000001"}, true, []string{`invalid amount "1000000000001": must be 0 to 1000000000000`}},
		{"capture bad id", []string{"holds", "cli", "capture", "a/b", "1"}, true, []string{`invalid hold "a/b"`}},
		{"release bad id", []string{"holds", "cli", "release", "../../orgs"}, true, []string{`invalid hold "../../orgs"`}},
		{"release long id", []string{"holds", "cli", "release", long}, true, []string{`invalid hold`}},
		{"unknown action", []string{"holds", "cli", "freeze", "x"}, true, []string{`unknown holds action "freeze"`}},
		{"create without amount", []string{"holds", "cli", "create", "--feature", "f"}, true, []string{"wrong number of arguments (2)", "usage: caddy credits holds <org>"}},
		{"capture without amount", []string{"holds", "cli", "capture", id}, true, []string{"wrong number of arguments (3)"}},
		{"release too many", []string{"holds", "cli", "release", id, "x"}, true, []string{"wrong number of arguments (4)"}},
		{"list too many", []string{"holds", "cli", "create", "1", "2", "3"}, true, []string{"wrong number of arguments (5)"}},
		{"feature on release", []string{"holds", "cli", "release", id, "--feature", "f"}, true, []string{"--feature is only for caddy credits holds <org> create"}},
		{"gateway gone on a hold", []string{"holds", "cli", "release", id2, "--gateway-gone", "--reason", "gone"}, false, []string{"answered 400 Bad Request", "is not a gateway's lease"}},
		{"gateway gone without reason", []string{"holds", "cli", "release", id2, "--gateway-gone"}, true, []string{`invalid reason ""`}},
		{"reason without gateway gone", []string{"holds", "cli", "release", id2, "--reason", "x"}, true, []string{"--reason goes with --gateway-gone"}},
		{"gateway gone on capture", []string{"holds", "cli", "capture", id, "1", "--gateway-gone"}, true, []string{"--gateway-gone is only for caddy credits holds <org> release"}},
		{"ttl on list", []string{"holds", "cli", "--ttl", "1m"}, true, []string{"--ttl is only for"}},
		{"bad org", []string{"holds", "a b"}, true, []string{"invalid org"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ep := g.adminURL
			if tc.precall {
				ep = closed
			}
			out, err := runCaddyEnv(t, env, append([]string{"credits", "--endpoint", ep}, tc.args...)...)
			if exitErr, ok := errors.AsType[*exec.ExitError](err); !ok || exitErr.ExitCode() != 1 {
				t.Fatalf("caddy credits %s: %v, want exit status 1\n%s", strings.Join(tc.args, " "), err, out)
			}
			if out != "" {
				t.Errorf("standard output is not empty: %s", out)
			}
			// The message is a plain line, not a JSON log line.
			msg := err.Error()
			if strings.Contains(msg, `"level"`) || strings.Contains(msg, `\"`) {
				t.Errorf("the error is a log line, not a plain one: %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("standard error lacks %q: %v", w, err)
				}
			}
			if tc.precall && strings.Contains(err.Error(), "cannot reach") {
				t.Errorf("called the API: %v", err)
			}
		})
	}
	g.t = t
	if after := g.ledgerState("cli"); after != before {
		t.Fatalf("refused commands changed the ledger:\n%s\n%s", before, after)
	}
}

// TestCommandRetry puts a proxy between caddy credits and a real Caddy
// that loses the answer of a write after Caddy applied it: the CLI sends
// the write again with the same reference, and it applies once. When every
// answer is lost, the error names the reference to run the command again
// with.
func TestCommandRetry(t *testing.T) {
	clearCreditsEnv(t)
	g := startGateway(t, gatewayOptions{})
	wantStatus(t, g.admin(http.MethodPut, "/orgs/retry/plan", `{"allowance": 100, "recharge_month": 1}`), http.StatusOK)
	p := &lossyProxy{target: strings.TrimSuffix(g.adminURL, "/admin"), lose: 1}
	srv := httptest.NewServer(p)
	t.Cleanup(srv.Close)
	env := []string{"CREDITS_ADMIN_TOKEN=s3cret"}
	run := func(args ...string) (string, error) {
		t.Helper()
		return runCaddyEnv(t, env, append([]string{"credits", "--endpoint", srv.URL + "/admin"}, args...)...)
	}
	// sameBodies checks that the proxy saw n copies of one write, with a
	// reference, and returns the reference.
	sameBodies := func(path string, n int) string {
		t.Helper()
		bodies := p.bodiesOf(path)
		if len(bodies) != n {
			t.Fatalf("%s was sent %d times, want %d: %q", path, len(bodies), n, bodies)
		}
		var first struct{ Reference string }
		if err := json.Unmarshal([]byte(bodies[0]), &first); err != nil || !strings.HasPrefix(first.Reference, "cli-") {
			t.Fatalf("%s: body %s without a cli- reference (%v)", path, bodies[0], err)
		}
		for _, b := range bodies[1:] {
			if b != bodies[0] {
				t.Fatalf("%s: a retry sent %s, the first %s", path, b, bodies[0])
			}
		}
		return first.Reference
	}

	out, err := run("topup", "retry", "7")
	if err != nil || field(out, "purchased") != "7" || field(out, "balance") != "107" {
		t.Fatalf("top-up through a lost answer: %v\n%s", err, out)
	}
	ref := sameBodies("/admin/orgs/retry/topup", 2)
	wantAccount(t, g.account("retry"), map[string]int64{"purchased": 7, "balance": 107})
	if e := g.events("retry")[0]; e["kind"] != "topup" || e["ref"] != ref {
		t.Fatalf("top-up event %v, want the reference %s", e, ref)
	}

	out, err = run("holds", "retry", "create", "4", "--feature", "long-job")
	if err != nil || field(out, "held") != "4" {
		t.Fatalf("hold through a lost answer: %v\n%s", err, out)
	}
	ref = sameBodies("/admin/orgs/retry/holds", 2)
	if id := field(out, "hold"); id != meter.HoldID(ref) {
		t.Fatalf("hold %s, want the one of the reference %s", id, ref)
	}
	id := field(out, "hold")
	out, err = run("holds", "retry", "capture", id, "3")
	if err != nil || field(out, "balance") != "104" || field(out, "captured") != "3" {
		t.Fatalf("capture through a lost answer: %v\n%s", err, out)
	}
	if n := len(p.bodiesOf("/admin/orgs/retry/holds/" + id + "/capture")); n != 2 {
		t.Fatalf("the capture was sent %d times, want 2", n)
	}

	// A plan and a recharge are sent again with their reference, and apply
	// once.
	out, err = run("plan", "retry", "50", "2")
	if err != nil || !strings.HasPrefix(field(out, "next plan"), "50, recharging on month 2") {
		t.Fatalf("plan through a lost answer: %v\n%s", err, out)
	}
	sameBodies("/admin/orgs/retry/plan", 2)
	out, err = run("recharge", "retry")
	if err != nil {
		t.Fatalf("recharge through a lost answer: %v\n%s", err, out)
	}
	ref = sameBodies("/admin/orgs/retry/recharge", 2)
	recharges := 0
	for _, e := range g.events("retry") {
		if e["kind"] == "recharge" {
			recharges++
			if e["ref"] != "manual" {
				t.Errorf("recharge event %v", e)
			}
		}
	}
	if recharges != 1 {
		t.Fatalf("%d recharge events, want 1 (reference %s)", recharges, ref)
	}
	if p := g.account("retry")["plan"].(map[string]any); p["allowance"] != float64(50) {
		t.Fatalf("plan after the recharge %v, want the plan set, once", p)
	}

	// A grant and its void, likewise.
	out, err = run("grants", "retry", "give", "6", "--expires", "720h")
	if err != nil || field(out, "grant") != "g1" || field(out, "promotional") != "6" {
		t.Fatalf("grant through a lost answer: %v\n%s", err, out)
	}
	ref = sameBodies("/admin/orgs/retry/grants", 2)
	if field(out, "reference") != ref {
		t.Fatalf("grant of reference %s, want %s", field(out, "reference"), ref)
	}
	out, err = run("grants", "retry", "void", "g1", "--reason", "sent twice")
	if err != nil || field(out, "promotional") != "0" {
		t.Fatalf("void through a lost answer: %v\n%s", err, out)
	}
	if n := len(p.bodiesOf("/admin/orgs/retry/grants/g1")); n != 2 {
		t.Fatalf("the void was sent %d times, want 2", n)
	}
	grants, voids := 0, 0
	for _, e := range g.events("retry") {
		switch e["kind"] {
		case "grant":
			grants += map[bool]int{true: 1}[e["ref"] == "g1"]
		case "void":
			voids++
		}
	}
	if grants != 1 || voids != 1 {
		t.Fatalf("%d grant and %d void events of g1, want one each", grants, voids)
	}

	// Every answer lost: the top-up applied once, and the error says how to
	// finish it.
	p.setLose(maxAttempts)
	before := g.account("retry")["purchased"].(float64)
	_, err = run("topup", "retry", "5")
	ref = sameBodies("/admin/orgs/retry/topup", maxAttempts)
	if err == nil || !strings.Contains(err.Error(), "the outcome is unknown: run the same command with --reference "+ref+": it applies once") {
		t.Fatalf("a top-up with every answer lost: %v", err)
	}
	wantAccount(t, g.account("retry"), map[string]int64{"purchased": int64(before) + 5})
	p.setLose(0)
	out, err = run("topup", "retry", "5", "--reference", ref)
	if err != nil || field(out, "purchased") != fmt.Sprint(int64(before)+5) {
		t.Fatalf("the top-up run again with its reference: %v\n%s", err, out)
	}
}

// lossyProxy forwards admin calls to target and, for the first lose
// attempts of each write, drops the connection once target has answered:
// the write is applied, and its answer lost.
type lossyProxy struct {
	target string
	mu     sync.Mutex
	lose   int
	bodies map[string][]string
}

func (p *lossyProxy) setLose(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lose = n
	p.bodies = nil
}

func (p *lossyProxy) bodiesOf(path string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bodies[path]
}

func (p *lossyProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	p.mu.Lock()
	if p.bodies == nil {
		p.bodies = map[string][]string{}
	}
	p.bodies[r.URL.Path] = append(p.bodies[r.URL.Path], string(body))
	lost := r.Method != http.MethodGet && len(p.bodies[r.URL.Path]) <= p.lose
	p.mu.Unlock()

	req, err := http.NewRequestWithContext(r.Context(), r.Method, p.target+r.URL.RequestURI(), bytes.NewReader(body))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	req.Header = r.Header.Clone()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	answer, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if lost {
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
		return
	}
	for k, vs := range resp.Header {
		w.Header()[k] = vs
	}
	w.WriteHeader(resp.StatusCode)
	w.Write(answer)
}

// TestCommandGrants drives caddy credits grants, topup --expires and plan
// --rollover against a real Caddy and redis-server: give with and without
// a reference, the repeat, the list, void and its repeat, the API's
// refusals, and the argument checks, which stop before any call.
func TestCommandGrants(t *testing.T) {
	clearCreditsEnv(t)
	g := startGateway(t, gatewayOptions{})
	wantStatus(t, g.admin(http.MethodPut, "/orgs/cli/plan", `{"allowance": 100, "recharge_month": 1}`), http.StatusOK)
	env := []string{"CREDITS_ADMIN_TOKEN=s3cret"}
	credits := func(t *testing.T, args ...string) string {
		t.Helper()
		out, err := runCaddyEnv(t, env, append([]string{"credits", "--endpoint", g.adminURL}, args...)...)
		if err != nil {
			t.Fatalf("caddy credits %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	// rows are the grants listed, by id: each line's fields after the id,
	// up to the expiry.
	rows := func(t *testing.T) map[string]string {
		t.Helper()
		lines := strings.Split(strings.TrimSpace(credits(t, "grants", "cli")), "\n")
		if strings.Join(strings.Fields(lines[0]), " ") != "GRANT KIND STATE REMAINING PRIORITY EFFECTIVE EXPIRES REASON" {
			t.Fatalf("grants list:\n%s", strings.Join(lines, "\n"))
		}
		out := map[string]string{}
		for _, line := range lines[1:] {
			f := strings.Fields(line)
			out[f[0]] = strings.Join(f[1:], " ")
		}
		return out
	}
	if r := rows(t); len(r) != 1 || !strings.HasPrefix(r["allowance"], "allowance live 100/100 50 ") {
		t.Fatalf("the grants of an org with a plan: %v", r)
	}

	for i := range 2 {
		out := credits(t, "grants", "cli", "give", "30", "--expires", "720h", "--priority", "10", "--reason", "welcome", "--reference", "promo-1")
		wantFields(t, out, map[string]string{
			"grant": "g1", "kind": "promotional", "state": "live", "remaining": "30 of 30", "priority": "10", "reference": "promo-1",
			"org": "cli", "balance": "130", "promotional": "30", "purchased": "0", "debt": "0",
		})
		expires, err := time.Parse(time.RFC3339, field(out, "expires"))
		if err != nil || time.Until(expires) < 719*time.Hour || time.Until(expires) > 721*time.Hour {
			t.Errorf("give %d: expires %q (%v), want in 720h", i+1, field(out, "expires"), err)
		}
		if want := "30 on " + field(out, "expires"); field(out, "next expiry") != want {
			t.Errorf("give %d: next expiry %q, want %q", i+1, field(out, "next expiry"), want)
		}
		if t.Failed() {
			t.FailNow()
		}
	}
	// Without --reference the CLI sends one of its own; an RFC 3339 expiry
	// is sent as given.
	var given struct {
		Grant   meter.Grant   `json:"grant"`
		Account meter.Account `json:"account"`
	}
	out := credits(t, "grants", "cli", "give", "5", "--expires", "2999-01-01T00:00:00Z", "--json")
	if err := json.Unmarshal([]byte(out), &given); err != nil || given.Grant.ID != "g2" || !strings.HasPrefix(given.Grant.Reference, "cli-") ||
		given.Grant.Expires == nil || !given.Grant.Expires.Equal(time.Date(2999, 1, 1, 0, 0, 0, 0, time.UTC)) || given.Account.Balance != 135 {
		t.Fatalf("give --json: %v %+v\n%s", err, given, out)
	}
	r := rows(t)
	if !strings.HasPrefix(r["g1"], "promotional live 30/30 10 ") || !strings.HasSuffix(r["g1"], " welcome") ||
		!strings.HasPrefix(r["g2"], "promotional live 5/5 50 ") || !strings.HasSuffix(r["g2"], " 2999-01-01T00:00:00Z") {
		t.Fatalf("grants listed: %v", r)
	}

	for range 2 {
		wantFields(t, credits(t, "grants", "cli", "void", "g1", "--reason", "campaign cancelled"),
			map[string]string{"balance": "105", "promotional": "5"})
	}
	if r := rows(t); !strings.HasPrefix(r["g1"], "promotional voided 0/30 10 ") || !strings.HasSuffix(r["g1"], " campaign cancelled") {
		t.Fatalf("the voided grant listed: %q", r["g1"])
	}
	if e := credits(t, "events", "cli", "--limit", "1"); !strings.Contains(e, "void") || !strings.Contains(e, "-30") || !strings.Contains(e, `"campaign cancelled"`) {
		t.Errorf("the void's event:\n%s", e)
	}

	// A top-up that expires, and a plan's rollover.
	out = credits(t, "topup", "cli", "20", "--expires", "30d", "--reference", "inv-exp")
	wantFields(t, out, map[string]string{"balance": "125", "purchased": "20"})
	var bought string
	for id, row := range rows(t) {
		if strings.HasPrefix(row, "purchased live 20/20 ") {
			bought = id
		}
	}
	if bought == "" || bought == "purchased" {
		t.Fatalf("the expiring top-up is no grant of its own: %v", rows(t))
	}
	out = credits(t, "plan", "cli", "100", "1", "--rollover", "40")
	if got := field(out, "next plan"); got != "100, recharging on month 1, rolling over up to 40, from the next recharge" {
		t.Errorf("plan --rollover 40: next plan %q", got)
	}
	wantFields(t, credits(t, "recharge", "cli"), map[string]string{"rolls over": "up to 40", "rollover": "0"})
	wantFields(t, credits(t, "recharge", "cli"), map[string]string{"rolls over": "up to 40", "rollover": "40"})

	g.t = t
	before := g.ledgerState("cli") + adminState(g, "cli")
	closed := fmt.Sprintf("http://127.0.0.1:%d/admin", freePort(t))
	for _, tc := range []struct {
		name    string
		args    []string
		precall bool
		want    []string
	}{
		{"void of the allowance", []string{"grants", "cli", "void", "allowance"}, false, []string{"answered 409 Conflict", "change the plan"}},
		{"void of the purchased credits", []string{"grants", "cli", "void", "purchased"}, false, []string{"answered 409 Conflict", "negative adjustment"}},
		{"void of an unknown grant", []string{"grants", "cli", "void", "g99"}, false, []string{"answered 404 Not Found", "org cli has no grant g99"}},
		{"grants of an unknown org", []string{"grants", "ghost"}, false, []string{"answered 404 Not Found", "Redis holds nothing for org ghost"}},
		{"give zero", []string{"grants", "cli", "give", "0"}, true, []string{`invalid amount "0": must be 1 to 1000000000000`}},
		{"give too much", []string{"grants", "cli", "give", "1000000000001"}, true, []string{`invalid amount "1000000000001"`}},
		{"give not a number", []string{"grants", "cli", "give", "lots"}, true, []string{`invalid amount "lots": not a whole number`}},
		{"priority too high", []string{"grants", "cli", "give", "5", "--priority", "101"}, true, []string{`invalid priority "101": must be 0 to 100`}},
		{"priority negative", []string{"grants", "cli", "give", "5", "--priority=-1"}, true, []string{`invalid priority "-1"`}},
		{"expires not a time", []string{"grants", "cli", "give", "5", "--expires", "soon"}, true, []string{`invalid expires "soon": must be a time in RFC 3339`}},
		{"expires past", []string{"grants", "cli", "give", "5", "--expires", "2020-01-01T00:00:00Z"}, true, []string{`invalid expires "2020-01-01T00:00:00Z": must be after now`}},
		{"expires before effective", []string{"grants", "cli", "give", "5", "--expires", "1h", "--effective", "2h"}, true, []string{"expires must be after now and after effective"}},
		{"effective not a time", []string{"grants", "cli", "give", "5", "--effective", "2027-01-01"}, true, []string{`invalid effective "2027-01-01"`}},
		{"reason too long", []string{"grants", "cli", "give", "5", "--reason", strings.Repeat("r", 501)}, true, []string{"invalid reason"}},
		{"bad reference", []string{"grants", "cli", "give", "5", "--reference", "has space"}, true, []string{`invalid reference "has space"`}},
		{"void bad id", []string{"grants", "cli", "void", "a/b"}, true, []string{`invalid grant "a/b": must be a grant's id`}},
		{"void g0", []string{"grants", "cli", "void", "g0"}, true, []string{`invalid grant "g0"`}},
		{"expires on void", []string{"grants", "cli", "void", "g2", "--expires", "1h"}, true, []string{"--expires is only for caddy credits grants <org> give"}},
		{"reason on list", []string{"grants", "cli", "--reason", "x"}, true, []string{"--reason is for caddy credits grants <org> give or void"}},
		{"unknown action", []string{"grants", "cli", "take", "5"}, true, []string{`unknown grants action "take"`}},
		{"give without amount", []string{"grants", "cli", "give"}, true, []string{"wrong number of arguments (2)", "usage: caddy credits grants <org>"}},
		{"topup expires not a time", []string{"topup", "cli", "5", "--expires", "never"}, true, []string{`invalid expires "never"`}},
		{"topup expires past", []string{"topup", "cli", "5", "--expires", "2020-01-01T00:00:00Z"}, true, []string{"must be after now"}},
		{"rollover above the allowance", []string{"plan", "cli", "100", "--rollover", "101"}, true, []string{`invalid rollover "101": must be 0 to 100, the allowance`}},
		{"rollover negative", []string{"plan", "cli", "100", "--rollover=-1"}, true, []string{`invalid rollover "-1"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ep := g.adminURL
			if tc.precall {
				ep = closed
			}
			out, err := runCaddyEnv(t, env, append([]string{"credits", "--endpoint", ep}, tc.args...)...)
			if exitErr, ok := errors.AsType[*exec.ExitError](err); !ok || exitErr.ExitCode() != 1 {
				t.Fatalf("caddy credits %s: %v, want exit status 1\n%s", strings.Join(tc.args, " "), err, out)
			}
			if out != "" {
				t.Errorf("standard output is not empty: %s", out)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("standard error lacks %q: %v", w, err)
				}
			}
			if tc.precall && strings.Contains(err.Error(), "cannot reach") {
				t.Errorf("called the API: %v", err)
			}
		})
	}
	g.t = t
	if after := g.ledgerState("cli") + adminState(g, "cli"); after != before {
		t.Fatalf("refused commands changed the ledger:\n%s\n%s", before, after)
	}
}

// TestCommandFlagsAnywhere checks that flags are taken after -- too: a
// negative number after -- is a value, and the flags around it are flags,
// as they are before it.
func TestCommandFlagsAnywhere(t *testing.T) {
	clearCreditsEnv(t)
	g := startGateway(t, gatewayOptions{})
	wantStatus(t, g.admin(http.MethodPut, "/orgs/cli/plan", `{"allowance": 100, "recharge_month": 1}`), http.StatusOK)
	env := []string{"CREDITS_ADMIN_TOKEN=s3cret"}
	credits := func(args ...string) (string, error) {
		return runCaddyEnv(t, env, append([]string{"credits", "--endpoint", g.adminURL}, args...)...)
	}
	for _, tc := range []struct {
		args    []string
		balance string
	}{
		{[]string{"adjust", "cli", "--", "-14", "--reason", "after the dash", "--reference", "f1"}, "86"},
		{[]string{"adjust", "cli", "--reason", "before the dash", "--", "-6"}, "80"},
		{[]string{"adjust", "cli", "--reference", "f3", "--", "-3", "--reason=with an equals sign"}, "77"},
		{[]string{"adjust", "--reason", "around", "cli", "--", "5"}, "82"},
	} {
		out, err := credits(tc.args...)
		if err != nil {
			t.Fatalf("caddy credits %s: %v\n%s", strings.Join(tc.args, " "), err, out)
		}
		wantFields(t, out, map[string]string{"org": "cli", "balance": tc.balance})
	}
	// A boolean flag after the dash takes no value.
	out, err := credits("adjust", "cli", "--", "-2", "--json", "--reason", "as JSON")
	var acct meter.Account
	if err != nil || json.Unmarshal([]byte(out), &acct) != nil || acct.Balance != 80 {
		t.Fatalf("--json after the dash: %v %+v\n%s", err, acct, out)
	}
	var reasons []string
	for _, e := range g.eventsWith("s3cret", "cli") {
		if e["kind"] == "adjust" {
			reasons = append(reasons, e["reason"].(string))
		}
	}
	if want := []string{"as JSON", "around", "with an equals sign", "before the dash", "after the dash"}; !slices.Equal(reasons, want) {
		t.Fatalf("adjustments' reasons %q, want %q", reasons, want)
	}

	// The flags after the dash are checked as those before it, before any
	// call.
	before := g.ledgerState("cli")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"adjust", "cli", "--", "-14"}, "reason"},
		{[]string{"adjust", "cli", "--", "-14", "--bogus", "x"}, "unknown flag: --bogus"},
		{[]string{"adjust", "cli", "--", "-14", "7", "--reason", "x"}, "wrong number of arguments (3)"},
		{[]string{"adjust", "cli", "--", "-99999999999999999999", "--reason", "x"}, "amount"},
	} {
		out, err := credits(tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("caddy credits %s: %v, want an error naming %q\n%s", strings.Join(tc.args, " "), err, tc.want, out)
		}
	}
	if after := g.ledgerState("cli"); after != before {
		t.Fatalf("a refused command changed the ledger:\n%s\n%s", before, after)
	}
}

// TestCommandReplayed checks that a write sent again with its reference
// (and a capture or a release of a hold that had ended) says that it was
// applied before and that nothing was applied again, above the account it
// prints; the first says nothing of the kind.
func TestCommandReplayed(t *testing.T) {
	clearCreditsEnv(t)
	g := startGateway(t, gatewayOptions{})
	wantStatus(t, g.admin(http.MethodPut, "/orgs/cli/plan", `{"allowance": 100, "recharge_month": 1}`), http.StatusOK)
	env := []string{"CREDITS_ADMIN_TOKEN=s3cret"}
	credits := func(args ...string) string {
		t.Helper()
		out, err := runCaddyEnv(t, env, append([]string{"credits", "--endpoint", g.adminURL}, args...)...)
		if err != nil {
			t.Fatalf("caddy credits %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	hold := meter.HoldID("h1")
	for _, tc := range []struct {
		args []string
		said string
	}{
		{[]string{"topup", "cli", "5", "--reference", "r1"}, "reference r1 was applied before; nothing applied again"},
		{[]string{"adjust", "cli", "--reference", "r2", "--", "-14", "--reason", "x"}, "reference r2 was applied before; nothing applied again"},
		{[]string{"plan", "cli", "200", "--reference", "r3"}, "reference r3 was applied before; nothing applied again"},
		{[]string{"recharge", "cli", "--reference", "r4"}, "reference r4 was applied before; nothing applied again"},
		{[]string{"grants", "cli", "give", "7", "--reference", "r5"}, "reference r5 made this grant before; no new grant"},
		{[]string{"holds", "cli", "create", "3", "--feature", "job", "--reference", "h1"}, "reference h1 made this hold before; no new hold"},
		{[]string{"holds", "cli", "capture", hold, "2"}, "hold " + hold + " was captured before; nothing captured again"},
	} {
		first := credits(tc.args...)
		state := g.ledgerState("cli")
		again := credits(tc.args...)
		if strings.Contains(first, "before;") {
			t.Errorf("caddy credits %s, the first time, says:\n%s", strings.Join(tc.args, " "), first)
		}
		if line, rest, _ := strings.Cut(again, "\n"); line != tc.said || rest == "" {
			t.Errorf("caddy credits %s, again, says:\n%s\nwant first %q, then the account", strings.Join(tc.args, " "), again, tc.said)
		}
		if after := g.ledgerState("cli"); after != state {
			t.Errorf("caddy credits %s, again, changed the ledger:\n%s\n%s", strings.Join(tc.args, " "), state, after)
		}
	}
	// With --json the answer is JSON as it came, and the line goes to
	// standard error.
	out := credits("topup", "cli", "5", "--reference", "r1", "--json")
	if !json.Valid([]byte(out)) {
		t.Fatalf("a replayed top-up with --json printed:\n%s", out)
	}
}

// TestCommandBudgets drives caddy credits budgets against a real Caddy and
// redis-server: a subject's budget and the org's default, set, shown and
// listed as the gateway spends them, a limit lowered below what was spent,
// the pages, the removals, the API's refusals and the argument checks,
// which stop before any call. From outside, the ledger charged what the
// upstream answered, and each budget spent what the upstream answered for
// its subject.
func TestCommandBudgets(t *testing.T) {
	clearCreditsEnv(t)
	g := startBudgetGateway(t)
	const org = "cli"
	g.emptyOrg(org, 100, 0)
	env := []string{"CREDITS_ADMIN_TOKEN=s3cret"}
	credits := func(t *testing.T, args ...string) string {
		t.Helper()
		out, err := runCaddyEnv(t, env, append([]string{"credits", "--endpoint", g.adminURL}, args...)...)
		if err != nil {
			t.Fatalf("caddy credits %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	// table is the list of budgets, each line's fields joined by one space.
	table := func(t *testing.T, args ...string) []string {
		t.Helper()
		var lines []string
		for line := range strings.Lines(credits(t, append([]string{"budgets", org}, args...)...)) {
			lines = append(lines, strings.Join(strings.Fields(line), " "))
		}
		return lines
	}
	if out := credits(t, "budgets", org); out != "no budgets\n" {
		t.Fatalf("the budgets of an org without any: %q", out)
	}

	tomorrow := rfc(time.Now().UTC().Truncate(24 * time.Hour).Add(24 * time.Hour))
	monday := time.Now().UTC().Truncate(24 * time.Hour).Add(24 * time.Hour)
	for monday.Weekday() != time.Monday {
		monday = monday.Add(24 * time.Hour)
	}
	for range 2 {
		wantFields(t, credits(t, "budgets", org, "set", "alice", "5", "day"), map[string]string{
			"subject": "alice", "budget": "its own", "limit": "5 per day", "spent": "0", "remaining": "5", "resets": tomorrow,
		})
	}
	wantDefault := map[string]string{"budget": "the org's default, for each subject without its own", "limit": "3 per week", "resets": rfc(monday)}
	wantFields(t, credits(t, "budgets", org, "default", "3", "week"), wantDefault)
	wantFields(t, credits(t, "budgets", org, "default"), wantDefault)
	if t.Failed() {
		t.FailNow()
	}

	// The gateway spends them: alice her own, bob the default's.
	for range 2 {
		wantStatus(t, g.budgeted("budgeted", org, "alice", 2), http.StatusOK)
	}
	r := g.budgeted("budgeted", org, "alice", 2)
	wantStatus(t, r, http.StatusPaymentRequired)
	if p := r.problem(t); p["subject"] != "alice" || p["spent"] != 4.0 || p["limit"] != 5.0 {
		t.Fatalf("alice's refusal: %s", r.body)
	}
	wantStatus(t, g.budgeted("budgeted", org, "bob", 3), http.StatusOK)
	wantStatus(t, g.budgeted("budgeted", org, "bob", 1), http.StatusPaymentRequired)
	wantFields(t, credits(t, "budgets", org, "show", "alice"), map[string]string{"budget": "its own", "spent": "4", "remaining": "1"})
	wantFields(t, credits(t, "budgets", org, "show", "bob"), map[string]string{
		"subject": "bob", "budget": "the org's default", "limit": "3 per week", "spent": "3", "remaining": "0", "resets": rfc(monday),
	})
	if got, want := table(t), []string{
		"SUBJECT LIMIT WINDOW SPENT REMAINING RESETS",
		"(default) 3 week - - " + rfc(monday),
		"alice 5 day 4 1 " + tomorrow,
	}; !slices.Equal(got, want) {
		t.Fatalf("the list:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	g.wantBudgetsAnswered(org, 100, map[string]int64{"alice": 4, "bob": 3})

	// A limit lowered below what was spent refuses; raised, it pays again.
	wantFields(t, credits(t, "budgets", org, "set", "alice", "3", "day"), map[string]string{"limit": "3 per day", "spent": "4", "remaining": "0"})
	wantStatus(t, g.budgeted("budgeted", org, "alice", 1), http.StatusPaymentRequired)
	wantFields(t, credits(t, "budgets", org, "set", "alice", "6", "day"), map[string]string{"spent": "4", "remaining": "2"})
	wantStatus(t, g.budgeted("budgeted", org, "alice", 2), http.StatusOK)
	wantStatus(t, g.budgeted("budgeted", org, "alice", 1), http.StatusPaymentRequired)

	// --json prints the API's budget.
	var b budgetJSON
	out := credits(t, "budgets", org, "set", "carol", "7", "month", "--json")
	if err := json.Unmarshal([]byte(out), &b); err != nil || b.Subject != "carol" || b.Limit != 7 || b.Window != "month" || b.Remaining != 7 {
		t.Fatalf("set --json: %v %+v\n%s", err, b, out)
	}
	credits(t, "budgets", org, "set", "dave", "8", "period")
	if got := table(t, "--limit", "2"); len(got) != 5 || !strings.HasPrefix(got[1], "(default) 3 week") ||
		!strings.HasPrefix(got[2], "alice 6 day 6 0") || !strings.HasPrefix(got[3], "carol 7 month 0 7") ||
		got[4] != "more: caddy credits budgets cli --after carol --limit 2" {
		t.Fatalf("the first page of two:\n%s", strings.Join(got, "\n"))
	}
	if got := table(t, "--after", "carol", "--limit", "2"); len(got) != 3 || !strings.HasPrefix(got[2], "dave 8 period 0 8 ") {
		t.Fatalf("the page after carol:\n%s", strings.Join(got, "\n"))
	}

	g.t = t
	state := func() string {
		r := g.admin(http.MethodGet, "/orgs/"+org+"/budgets", "")
		return g.ledgerState(org) + fmt.Sprintf("%d %s", r.status, r.body)
	}
	before := state()
	closed := fmt.Sprintf("http://127.0.0.1:%d/admin", freePort(t))
	long := strings.Repeat("s", 65)
	for _, tc := range []struct {
		name    string
		args    []string
		precall bool
		want    []string
	}{
		{"rm of a subject without one", []string{"budgets", org, "rm", "ghost"}, false, []string{"answered 404 Not Found", "subject ghost has no budget in org cli"}},
		{"limit zero", []string{"budgets", org, "set", "erin", "0", "day"}, true, []string{`invalid limit "0": must be 1 to 1000000000000`}},
		{"limit too big", []string{"budgets", org, "set", "erin", "1000000000001", "day"}, true, []string{`invalid limit "1000000000001": must be 1 to 1000000000000`}},
		{"limit negative", []string{"budgets", org, "set", "erin", "--", "-5", "day"}, true, []string{`invalid limit "-5"`}},
		{"limit negative without --", []string{"budgets", org, "set", "erin", "-5", "day"}, true, []string{"put -- before a negative number"}},
		{"limit not a number", []string{"budgets", org, "set", "erin", "lots", "day"}, true, []string{`invalid limit "lots": not a whole number`}},
		{"unknown window", []string{"budgets", org, "set", "erin", "5", "year"}, true, []string{`invalid window "year": must be day, week, month or period`}},
		{"window in capitals", []string{"budgets", org, "default", "5", "Day"}, true, []string{`invalid window "Day"`}},
		{"default limit zero", []string{"budgets", org, "default", "0", "day"}, true, []string{`invalid limit "0"`}},
		{"bad subject", []string{"budgets", org, "set", "a/b", "5", "day"}, true, []string{`invalid subject "a/b"`}},
		{"long subject", []string{"budgets", org, "show", long}, true, []string{"invalid subject"}},
		{"empty subject", []string{"budgets", org, "rm", ""}, true, []string{"budget subject missing"}},
		{"subject of dots", []string{"budgets", org, "rm", ".."}, true, []string{`invalid subject ".."`}},
		{"set without window", []string{"budgets", org, "set", "erin", "5"}, true, []string{"wrong number of arguments (4)", "usage: caddy credits budgets <org>"}},
		{"default with a limit only", []string{"budgets", org, "default", "5"}, true, []string{"wrong number of arguments (3)"}},
		{"show without subject", []string{"budgets", org, "show"}, true, []string{"wrong number of arguments (2)"}},
		{"rm-default with a subject", []string{"budgets", org, "rm-default", "alice"}, true, []string{"wrong number of arguments (3)"}},
		{"unknown action", []string{"budgets", org, "freeze", "alice"}, true, []string{`unknown budgets action "freeze"`}},
		{"after on set", []string{"budgets", org, "set", "erin", "5", "day", "--after", "a"}, true, []string{"--after is only for the list"}},
		{"limit on show", []string{"budgets", org, "show", "alice", "--limit", "5"}, true, []string{"--limit is only for the list"}},
		{"list limit zero", []string{"budgets", org, "--limit", "0"}, true, []string{`invalid limit "0": must be 1 to 1000`}},
		{"list limit too big", []string{"budgets", org, "--limit", "1001"}, true, []string{`invalid limit "1001": must be 1 to 1000`}},
		{"list after a bad subject", []string{"budgets", org, "--after", "a b"}, true, []string{`invalid after "a b": must be a subject`}},
		{"bad org", []string{"budgets", "a b", "show", "alice"}, true, []string{"invalid org"}},
		{"org missing", []string{"budgets"}, true, []string{"wrong number of arguments (0)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ep := g.adminURL
			if tc.precall {
				ep = closed
			}
			out, err := runCaddyEnv(t, env, append([]string{"credits", "--endpoint", ep}, tc.args...)...)
			if exitErr, ok := errors.AsType[*exec.ExitError](err); !ok || exitErr.ExitCode() != 1 {
				t.Fatalf("caddy credits %s: %v, want exit status 1\n%s", strings.Join(tc.args, " "), err, out)
			}
			if out != "" {
				t.Errorf("standard output is not empty: %s", out)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("standard error lacks %q: %v", w, err)
				}
			}
			if tc.precall && strings.Contains(err.Error(), "cannot reach") {
				t.Errorf("called the API: %v", err)
			}
		})
	}
	g.t = t
	if after := state(); after != before {
		t.Fatalf("refused commands changed the ledger or the budgets:\n%s\n%s", before, after)
	}

	// Flags after the dash are flags.
	out = credits(t, "budgets", org, "set", "erin", "--", "9", "week", "--json")
	if err := json.Unmarshal([]byte(out), &b); err != nil || b.Subject != "erin" || b.Limit != 9 || b.Window != "week" {
		t.Fatalf("set with --json after the dash: %v\n%s", err, out)
	}

	// alice's own budget removed: the default applies to her. The default
	// removed: alice has no limit, and a call answers no budget header.
	wantFields(t, credits(t, "budgets", org, "rm", "alice"), map[string]string{"subject": "alice", "budget": "its own", "limit": "6 per day", "spent": "6"})
	wantFields(t, credits(t, "budgets", org, "show", "alice"), map[string]string{"budget": "the org's default", "limit": "3 per week"})
	wantFields(t, credits(t, "budgets", org, "rm-default"), wantDefault)
	for _, args := range [][]string{{"show", "alice"}, {"default"}, {"rm-default"}} {
		out, err := runCaddyEnv(t, env, append([]string{"credits", "--endpoint", g.adminURL, "budgets", org}, args...)...)
		if err == nil || !strings.Contains(err.Error(), "answered 404 Not Found") {
			t.Errorf("budgets %s after the removals: %v, want a 404\n%s", strings.Join(args, " "), err, out)
		}
	}
	r = g.budgeted("budgeted", org, "alice", 10)
	wantStatus(t, r, http.StatusOK)
	wantHeaders(t, r, map[string]string{"Credits-Budget-Remaining": ""})
	now := time.Now().UTC()
	nextMonth := rfc(time.Date(now.Year(), now.Month()+1, 1, 0, 0, 0, 0, time.UTC))
	if got := table(t); len(got) != 4 || got[1] != "carol 7 month 0 7 "+nextMonth || !strings.HasPrefix(got[2], "dave 8 period 0 8 ") ||
		got[3] != "erin 9 week 0 9 "+rfc(monday) {
		t.Fatalf("the list after the removals:\n%s", strings.Join(got, "\n"))
	}

	// Every page: more budgets than a page holds, listed by one command.
	for i := range meter.MaxBudgetsPage {
		wantStatus(t, g.admin(http.MethodPut, fmt.Sprintf("/orgs/%s/budgets/k%04d", org, i), `{"limit": 1, "window": "day"}`), http.StatusOK)
	}
	var all struct {
		Default *budgetJSON  `json:"default"`
		Budgets []budgetJSON `json:"budgets"`
		Next    string       `json:"next"`
	}
	out = credits(t, "budgets", org, "--json")
	if err := json.Unmarshal([]byte(out), &all); err != nil || all.Default != nil || all.Next != "" || len(all.Budgets) != meter.MaxBudgetsPage+3 {
		t.Fatalf("budgets --json of %d budgets: %v, %d listed, next %q", meter.MaxBudgetsPage+3, err, len(all.Budgets), all.Next)
	}
	for i, b := range all.Budgets[1:] {
		if prev := all.Budgets[i].Subject; b.Subject <= prev {
			t.Fatalf("budget %d, %s, listed after %s", i+1, b.Subject, prev)
		}
	}
	if got := table(t); len(got) != meter.MaxBudgetsPage+4 || got[len(got)-1] != "k0999 1 day 0 1 "+tomorrow {
		t.Fatalf("the list of every page: %d lines, the last %q", len(got), got[len(got)-1])
	}
	g.t = t
	a := g.acct(org)
	if answered := g.upstream.answeredBySubject(t, org); 100-a.Balance != answered["alice"]+answered["bob"] || answered["alice"] != 16 || answered["bob"] != 3 {
		t.Fatalf("the ledger charged %d, the upstream answered %v", 100-a.Balance, answered)
	}
}

// TestCommandBudgetsRetry puts a proxy that loses answers between caddy
// credits budgets and a real Caddy: a budget set twice is set once, and a
// removal whose answer was lost, sent again, finds the budget gone and
// says it is removed.
func TestCommandBudgetsRetry(t *testing.T) {
	clearCreditsEnv(t)
	g := startBudgetGateway(t)
	g.emptyOrg("retry", 100, 0)
	p := &lossyProxy{target: strings.TrimSuffix(g.adminURL, "/admin"), lose: 1}
	srv := httptest.NewServer(p)
	t.Cleanup(srv.Close)
	run := func(args ...string) (string, error) {
		t.Helper()
		return runCaddyEnv(t, []string{"CREDITS_ADMIN_TOKEN=s3cret"}, append([]string{"credits", "--endpoint", srv.URL + "/admin", "budgets", "retry"}, args...)...)
	}
	wantStatus(t, g.budgeted("budgeted", "retry", "alice", 2), http.StatusOK)
	out, err := run("set", "alice", "5", "day")
	if err != nil || field(out, "spent") != "0" || field(out, "remaining") != "5" {
		t.Fatalf("set through a lost answer: %v\n%s", err, out)
	}
	if n := len(p.bodiesOf("/admin/orgs/retry/budgets/alice")); n != 2 {
		t.Fatalf("the budget was sent %d times, want 2", n)
	}
	wantStatus(t, g.budgeted("budgeted", "retry", "alice", 4), http.StatusOK)
	wantStatus(t, g.budgeted("budgeted", "retry", "alice", 2), http.StatusPaymentRequired)
	if b, _ := g.getBudget("retry", "alice"); b.Spent != 4 || b.Limit != 5 {
		t.Fatalf("alice's budget after a set sent twice: %+v", b)
	}

	p.setLose(1)
	for _, tc := range []struct {
		args []string
		path string
		said string
	}{
		{[]string{"rm", "alice"}, "/admin/orgs/retry/budgets/alice", "subject alice's budget in org retry is removed\n"},
		{[]string{"rm-default"}, "/admin/orgs/retry/default-budget", "org retry's default budget is removed\n"},
	} {
		if tc.args[0] == "rm-default" {
			g.setBudget("retry", "", 9, "month")
		}
		out, err := run(tc.args...)
		if err != nil || out != tc.said {
			t.Fatalf("budgets retry %s through a lost answer: %v\n%q, want %q", strings.Join(tc.args, " "), err, out, tc.said)
		}
		if n := len(p.bodiesOf(tc.path)); n != 2 {
			t.Fatalf("%s was sent %d times, want 2", tc.path, n)
		}
	}
	if _, status := g.getBudget("retry", "alice"); status != http.StatusNotFound {
		t.Fatalf("alice's budget after its removal: %d, want 404", status)
	}
	// A removal that was never applied is no "removed": its 404 on the
	// first try is an error.
	p.setLose(0)
	if out, err := run("rm", "alice"); err == nil || !strings.Contains(err.Error(), "answered 404 Not Found") {
		t.Fatalf("rm of a budget already gone: %v\n%s", err, out)
	}
	// Every answer lost: the error says how to see what is left.
	p.setLose(maxAttempts)
	g.setBudget("retry", "bob", 3, "day")
	if _, err := run("rm", "bob"); err == nil || !strings.Contains(err.Error(), "the outcome is unknown: caddy credits budgets retry show bob says whether it has its own still") {
		t.Fatalf("rm with every answer lost: %v", err)
	}
	if _, status := g.getBudget("retry", "bob"); status != http.StatusNotFound {
		t.Fatalf("bob's budget after its removal: %d, want 404", status)
	}
	g.wantBudgetsAnswered("retry", 100, nil)
}
