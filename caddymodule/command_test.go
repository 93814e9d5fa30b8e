package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
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
		{"negative amount reaches the API", []string{"topup", "acme", "--", "-5"}, false,
			[]string{"answered 400 Bad Request", "invalid amount", "must be 1 to"}},
		{"negative amount without --", []string{"topup", "acme", "-5"}, true, []string{"put -- before a negative number"}},
		{"amount not a number", []string{"topup", "acme", "abc"}, true, []string{"invalid amount", "not a whole number"}},
		{"allowance not a number", []string{"plan", "acme", "lots"}, true, []string{"invalid allowance", "not a whole number"}},
		{"month not a number", []string{"plan", "acme", "100", "april"}, true, []string{"invalid recharge_month", "not a whole number"}},
		{"month out of range", []string{"plan", "acme", "100", "13"}, false, []string{"answered 400 Bad Request", "recharge month"}},
		{"limit out of range", []string{"events", "acme", "--limit", "0"}, false, []string{"answered 400 Bad Request", "invalid limit"}},
		{"limit not a number", []string{"events", "acme", "--limit", "abc"}, true, []string{"invalid argument", "--limit"}},
		{"amount missing", []string{"topup", "acme"}, true, []string{"wrong number of arguments", "usage: caddy credits topup <org> <amount>"}},
		{"org missing", []string{"show"}, true, []string{"wrong number of arguments", "usage: caddy credits show <org>"}},
		{"too many arguments", []string{"plan", "acme", "1", "2", "3"}, true, []string{"wrong number of arguments (4)"}},
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

	// Nothing above changed the account.
	wantFields(t, credits(t, "show", "acme"), map[string]string{"balance": "125", "purchased": "25"})
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
