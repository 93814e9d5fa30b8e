package caddymodule

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

// defaultAdminEndpoint is where the demo Caddyfile mounts credits_admin.
const defaultAdminEndpoint = "http://127.0.0.1:2020/admin"

// maxAdminAnswer bounds the answer read from the admin API: a thousand
// events are well under it.
const maxAdminAnswer = 16 << 20

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "credits",
		Usage: "show|plan|topup|adjust|recharge|events|usage|holds|grants|budgets <org> [<args>] | orgs",
		Short: "Reads and changes orgs' credits through a credits_admin endpoint",
		Long: `
Calls the admin API that the credits_admin handler serves, and prints the
answer: an org's account, its events, its usage per day, its holds, its
grants or its budgets, or a page of the orgs.

  caddy credits show <org>
  caddy credits plan <org> <allowance> [<recharge_month>] [--rollover <n>] [--reference <ref>]
  caddy credits topup <org> <amount> [--expires <time>] [--reference <ref>]
  caddy credits adjust <org> <amount> --reason <text> [--reference <ref>]
  caddy credits recharge <org> [--reference <ref>]
  caddy credits events <org> [--limit <n>]
  caddy credits usage <org> [--from <YYYY-MM-DD>] [--to <YYYY-MM-DD>]
  caddy credits holds <org>
  caddy credits holds <org> create <amount> --feature <f> [--ttl 15m] [--reference <ref>]
  caddy credits holds <org> capture <hold> <amount>
  caddy credits holds <org> release <hold> [--gateway-gone --reason <why>]
  caddy credits grants <org>
  caddy credits grants <org> give <amount> [--expires <time>] [--effective <time>] [--priority <n>] [--reason <why>] [--reference <ref>]
  caddy credits grants <org> void <grant> [--reason <why>]
  caddy credits budgets <org> [--after <subject>] [--limit <n>]
  caddy credits budgets <org> set <subject> <limit> <day|week|month|period>
  caddy credits budgets <org> show <subject>
  caddy credits budgets <org> rm <subject>
  caddy credits budgets <org> default [<limit> <day|week|month|period>]
  caddy credits budgets <org> rm-default
  caddy credits orgs [--after <org>] [--limit <n>]

Arguments are checked against the API's ranges before any call. A time
(--expires, --effective) is RFC 3339 (2027-01-31T00:00:00Z) or a duration
from now (720h, 30d). A plan, a top-up, an adjustment, a recharge, a new
hold or a grant without --reference gets a random one. A call that gets no
answer, or a 502, 503 or 504, is sent again, the same (four times in all at
most, within --timeout); a reference, or the hold's or grant's id, makes
the retry apply once. A budget set twice is set once, and a budget's
removal sent again that finds none says that the budget is removed. When the outcome stays
unknown, the error names the reference to run the command again with.

--endpoint is the URL at which credits_admin is mounted; without the flag
it is $CREDITS_ADMIN_ENDPOINT, or else ` + defaultAdminEndpoint + `.
--token is the handler's bearer token; without the flag it is
$CREDITS_ADMIN_TOKEN. Prefer the environment variable: a flag shows in the
process list. --json prints the API's JSON answer as it came.

caddy credits budgets <org> lists the org's default budget and every
subject's own budget, a page after another; --after or --limit lists one
page. A budget's limit is 1 to 1000000000000 credits per window: day,
week, month or period (the org's credit period).

A negative number must follow --, or it is read as a flag. Flags may come
anywhere, after the -- too: caddy credits adjust acme -- -14 --reason x and
caddy credits adjust acme --reason x -- -14 are the same.

A write whose reference was applied before (a capture or a release of a
hold that had ended) applies nothing again; the command says so above the
account.
`,
		CobraFunc: func(cmd *cobra.Command) {
			pf := cmd.PersistentFlags()
			pf.String("endpoint", defaultAdminEndpoint, "URL of the credits_admin mount; without the flag, $CREDITS_ADMIN_ENDPOINT or the default")
			pf.String("token", "", "Bearer token of credits_admin; without the flag, $CREDITS_ADMIN_TOKEN")
			pf.Bool("json", false, "Print the API's JSON answer instead of the human form")
			pf.Duration("timeout", 10*time.Second, "How long to wait for the answer")
			// Runnable, so that NoArgs rejects an unknown subcommand; cobra
			// would print the help and exit 0 otherwise.
			cmd.Args = cobra.NoArgs
			cmd.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
			cmd.SetFlagErrorFunc(negativeNumberHint)

			plan := creditsCommand("plan <org> <allowance> [<recharge_month>] [--rollover <n>] [--reference <ref>]", "Sets an org's plan; the month defaults to 1", 2, 3, cmdCreditsPlan)
			plan.Flags().String("reference", "", "Reference of the plan change; a repeat is not applied again (default: a random one)")
			plan.Flags().Int64("rollover", 0, "The most unused allowance carried into the next period, 0 to the allowance")
			recharge := creditsCommand("recharge <org> [--reference <ref>]", "Starts a new period for an org now", 1, 1, cmdCreditsRecharge)
			recharge.Flags().String("reference", "", "Reference of the recharge; a repeat is not applied again (default: a random one)")
			topUp := creditsCommand("topup <org> <amount> [--expires <time>] [--reference <ref>]", "Adds purchased credits; a reference is applied once", 2, 2, cmdCreditsTopUp)
			topUp.Flags().String("reference", "", "Reference of the payment; a repeat is not applied again (default: a random one)")
			topUp.Flags().String("expires", "", "When the credits expire: RFC 3339, or a duration from now such as 720h (default: never)")
			adjust := creditsCommand("adjust <org> <amount> --reason <text> [--reference <ref>]",
				"Corrects an org's credits: a positive amount adds purchased credits, a negative one takes credits", 2, 2, cmdCreditsAdjust)
			adjust.Flags().String("reason", "", "Why the correction is made; kept in its event (required)")
			adjust.Flags().String("reference", "", "Reference of the correction; a repeat is not applied again (default: a random one)")
			usage := creditsCommand("usage <org> [--from <YYYY-MM-DD>] [--to <YYYY-MM-DD>]", "Lists an org's usage per feature per UTC day", 1, 1, cmdCreditsUsage)
			usage.Flags().String("from", "", "First day (default: 29 days before --to)")
			usage.Flags().String("to", "", "Last day (default: today, UTC)")
			events := creditsCommand("events <org> [--limit <n>]", "Lists an org's events, newest first", 1, 1, cmdCreditsEvents)
			events.Flags().Int("limit", 0, "How many events to list, 1 to 1000 (default: the API's, 50)")
			holds := creditsCommand(holdsUsage, "Lists an org's holds, or creates, captures or releases one", 1, 4, cmdCreditsHolds)
			holds.Flags().String("feature", "", "create: the usage label its capture is counted under (required)")
			holds.Flags().String("ttl", "", "create: how long the hold lasts unless captured or released, 1s to 24h (default: the API's, 15m)")
			holds.Flags().String("reference", "", "create: the hold's reference; a repeat answers the same hold (default: a random one)")
			holds.Flags().Bool("gateway-gone", false, "release: release a gateway's unreported lease, whose gateway you know is gone")
			holds.Flags().String("reason", "", "release --gateway-gone: why the lease is released; kept in its event (required)")
			grants := creditsCommand(grantsUsage, "Lists an org's grants, or gives or voids a promotional grant", 1, 4, cmdCreditsGrants)
			grants.Flags().String("expires", "", "give: when what remains of it is lost: RFC 3339, or a duration from now such as 720h (default: never)")
			grants.Flags().String("effective", "", "give: when it becomes spendable: RFC 3339, or a duration from now (default: now)")
			grants.Flags().Int("priority", meter.DefaultPriority, "give: 0 to 100; lower is spent first")
			grants.Flags().String("reason", "", "give, void: why; kept with the grant and in its event")
			grants.Flags().String("reference", "", "give: the grant's reference; a repeat answers the same grant (default: a random one)")
			budgets := creditsCommand(budgetsUsage, "Lists an org's budgets, or sets, shows or removes one", 1, 5, cmdCreditsBudgets)
			budgets.Flags().String("after", "", "list: the budgets of the subjects after this one (the next page: the last subject listed)")
			budgets.Flags().Int("limit", 0, "list: how many budgets a page lists, 1 to 1000 (default: every budget, a page after another)")
			orgs := creditsCommand("orgs [--after <org>] [--limit <n>]", "Lists the orgs, in order, with their balances", 0, 0, cmdCreditsOrgs)
			orgs.Flags().String("after", "", "List the orgs after this one (the next page: the last org listed)")
			orgs.Flags().Int("limit", 0, "How many orgs to list, 1 to 1000 (default: the API's, 100)")
			cmd.AddCommand(
				orgs,
				creditsCommand("show <org>", "Shows an org's account", 1, 1, cmdCreditsShow),
				plan,
				topUp,
				adjust,
				recharge,
				events,
				usage,
				holds,
				grants,
				budgets,
			)
		},
	})
}

// creditsCommand is a subcommand of caddy credits that takes minArgs to
// maxArgs arguments. Its error is one plain line on standard error,
// "caddy credits: <error>", not a log line, and the exit status is 1.
func creditsCommand(use, short string, minArgs, maxArgs int, run caddycmd.CommandFunc) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fl := caddycmd.Flags{FlagSet: cmd.Flags()}
			err := func() error {
				if err := flagsAfterDash(cmd.Flags()); err != nil {
					return err
				}
				if n := fl.NArg(); n < minArgs || n > maxArgs {
					return fmt.Errorf("wrong number of arguments (%d); usage: caddy credits %s", n, use)
				}
				if minArgs > 0 {
					if err := policy.ValidateOrg(fl.Arg(0)); err != nil {
						return err
					}
				}
				_, err := run(fl)
				return err
			}()
			if err != nil {
				fmt.Fprintf(cmd.ErrOrStderr(), "caddy credits: %v\n", err)
				os.Exit(1)
			}
			return nil
		},
	}
}

const holdsUsage = "holds <org> [create <amount> --feature <f> [--ttl <d>] [--reference <ref>] | capture <hold> <amount> | release <hold> [--gateway-gone --reason <why>]]"

func cmdCreditsShow(fl caddycmd.Flags) (int, error) {
	return callAdmin(fl, cliCall{method: http.MethodGet, path: []string{"orgs", fl.Arg(0)}, retry: true}, printAccount)
}

func cmdCreditsPlan(fl caddycmd.Flags) (int, error) {
	allowance, err := rangeArg(fl, 1, "allowance", 0, meter.MaxAmount)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	month := int64(1)
	if fl.NArg() > 2 {
		if month, err = rangeArg(fl, 2, "recharge_month", 1, 12); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
	}
	rollover, err := fl.GetInt64("rollover")
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if rollover < 0 || rollover > allowance {
		return caddy.ExitCodeFailedStartup, &policy.InputError{Field: "rollover", Value: strconv.FormatInt(rollover, 10),
			Reason: fmt.Sprintf("must be 0 to %d, the allowance", allowance)}
	}
	ref, err := referenceFlag(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return callAdmin(fl, cliCall{
		method: http.MethodPut, path: []string{"orgs", fl.Arg(0), "plan"},
		body:  map[string]any{"allowance": allowance, "recharge_month": month, "rollover": rollover, "reference": ref},
		retry: true, again: "run the same command with --reference " + ref + ": it applies once", replayed: appliedBefore(ref),
	}, printAccount)
}

func cmdCreditsTopUp(fl caddycmd.Flags) (int, error) {
	amount, err := rangeArg(fl, 1, "amount", 1, meter.MaxAmount)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	expires, err := timeFlag(fl, "expires")
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	ref, err := referenceFlag(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	body := map[string]any{"amount": amount, "reference": ref}
	if !expires.IsZero() {
		if !expires.After(time.Now()) {
			return caddy.ExitCodeFailedStartup, &policy.InputError{Field: "expires", Value: fl.String("expires"), Reason: "must be after now"}
		}
		body["expires"] = expires.Format(time.RFC3339)
	}
	return callAdmin(fl, cliCall{
		method: http.MethodPost, path: []string{"orgs", fl.Arg(0), "topup"},
		body:  body,
		retry: true, again: "run the same command with --reference " + ref + ": it applies once", replayed: appliedBefore(ref),
	}, printAccount)
}

func cmdCreditsAdjust(fl caddycmd.Flags) (int, error) {
	amount, err := rangeArg(fl, 1, "amount", -meter.MaxAmount, meter.MaxAmount)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if amount == 0 {
		return caddy.ExitCodeFailedStartup, &policy.InputError{Field: "amount", Value: "0", Reason: "must not be 0"}
	}
	reason := fl.String("reason")
	if err := meter.ValidateReason(reason); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	ref, err := referenceFlag(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return callAdmin(fl, cliCall{
		method: http.MethodPost, path: []string{"orgs", fl.Arg(0), "adjust"},
		body:  map[string]any{"amount": amount, "reason": reason, "reference": ref},
		retry: true, again: "run the same command with --reference " + ref + ": it applies once", replayed: appliedBefore(ref),
	}, printAccount)
}

func cmdCreditsUsage(fl caddycmd.Flags) (int, error) {
	query := url.Values{}
	var dates [2]time.Time
	for i, name := range []string{"from", "to"} {
		if s := fl.String(name); s != "" {
			t, err := parseDate(name, s)
			if err != nil {
				return caddy.ExitCodeFailedStartup, err
			}
			dates[i] = t
			query.Set(name, s)
		}
	}
	if !dates[0].IsZero() && !dates[1].IsZero() {
		if dates[1].Before(dates[0]) {
			return caddy.ExitCodeFailedStartup, &policy.InputError{Field: "to", Value: fl.String("to"), Reason: "must not be before --from"}
		}
		if dates[1].Sub(dates[0]) >= meter.MaxUsageDays*24*time.Hour {
			return caddy.ExitCodeFailedStartup, &policy.InputError{Field: "to", Value: fl.String("to"),
				Reason: fmt.Sprintf("must be at most %d days after --from", meter.MaxUsageDays-1)}
		}
	}
	return callAdmin(fl, cliCall{method: http.MethodGet, path: []string{"orgs", fl.Arg(0), "usage"}, query: query, retry: true}, printUsage)
}

func cmdCreditsRecharge(fl caddycmd.Flags) (int, error) {
	ref, err := referenceFlag(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return callAdmin(fl, cliCall{
		method: http.MethodPost, path: []string{"orgs", fl.Arg(0), "recharge"}, body: map[string]string{"reference": ref},
		retry: true, again: "run the same command with --reference " + ref + ": it applies once", replayed: appliedBefore(ref),
	}, printAccount)
}

func cmdCreditsEvents(fl caddycmd.Flags) (int, error) {
	var query url.Values
	if fl.Changed("limit") {
		if n := fl.Int("limit"); n < 1 || n > maxEvents {
			return caddy.ExitCodeFailedStartup, &policy.InputError{Field: "limit", Value: strconv.Itoa(n), Reason: fmt.Sprintf("must be 1 to %d", maxEvents)}
		}
		query = url.Values{"limit": {strconv.Itoa(fl.Int("limit"))}}
	}
	return callAdmin(fl, cliCall{method: http.MethodGet, path: []string{"orgs", fl.Arg(0), "events"}, query: query, retry: true}, printEvents)
}

func cmdCreditsOrgs(fl caddycmd.Flags) (int, error) {
	query := url.Values{}
	if after := fl.String("after"); after != "" {
		if err := policy.ValidateOrg(after); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		query.Set("after", after)
	}
	if fl.Changed("limit") {
		if n := fl.Int("limit"); n < 1 || n > meter.MaxOrgsPage {
			return caddy.ExitCodeFailedStartup, &policy.InputError{Field: "limit", Value: strconv.Itoa(n), Reason: fmt.Sprintf("must be 1 to %d", meter.MaxOrgsPage)}
		}
		query.Set("limit", strconv.Itoa(fl.Int("limit")))
	}
	return callAdmin(fl, cliCall{method: http.MethodGet, path: []string{"orgs"}, query: query, retry: true}, printOrgs)
}

// cmdCreditsHolds lists an org's holds, or creates, captures or releases
// one. Every call is safe to send again: a new hold has a reference, and a
// capture or a release names its hold.
func cmdCreditsHolds(fl caddycmd.Flags) (int, error) {
	org, action := fl.Arg(0), fl.Arg(1)
	args := map[string]int{"": 1, "create": 3, "capture": 4, "release": 3}
	n, ok := args[action]
	if !ok {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("unknown holds action %q: want create, capture or release; usage: caddy credits %s", action, holdsUsage)
	}
	if fl.NArg() != n {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("wrong number of arguments (%d); usage: caddy credits %s", fl.NArg(), holdsUsage)
	}
	if action != "create" {
		for _, name := range []string{"feature", "ttl", "reference"} {
			if fl.Changed(name) {
				return caddy.ExitCodeFailedStartup, fmt.Errorf("--%s is only for caddy credits holds <org> create", name)
			}
		}
	}
	if action != "release" {
		for _, name := range []string{"gateway-gone", "reason"} {
			if fl.Changed(name) {
				return caddy.ExitCodeFailedStartup, fmt.Errorf("--%s is only for caddy credits holds <org> release", name)
			}
		}
	}
	switch action {
	case "create":
		amount, err := rangeArg(fl, 2, "amount", 1, meter.MaxAmount)
		if err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		feature := fl.String("feature")
		if feature == "" {
			return caddy.ExitCodeFailedStartup, errors.New("--feature is required: the usage label the capture is counted under")
		}
		if err := policy.ValidateFeature(feature); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		body := map[string]any{"amount": amount, "feature": feature}
		if fl.Changed("ttl") {
			ttl := fl.String("ttl")
			if _, err := holdTTL(ttl); err != nil {
				return caddy.ExitCodeFailedStartup, err
			}
			body["ttl"] = ttl
		}
		ref, err := referenceFlag(fl)
		if err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		body["reference"] = ref
		return callAdmin(fl, cliCall{
			method: http.MethodPost, path: []string{"orgs", org, "holds"}, body: body,
			retry: true, again: "run the same command with --reference " + ref + ": it makes one hold",
			replayed: "reference " + ref + " made this hold before; no new hold",
		}, printHeld)
	case "capture":
		id := fl.Arg(2)
		if err := meter.ValidateHoldID(id); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		amount, err := rangeArg(fl, 3, "amount", 0, meter.MaxAmount)
		if err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		return callAdmin(fl, cliCall{
			method: http.MethodPost, path: []string{"orgs", org, "holds", id, "capture"}, body: map[string]int64{"amount": amount},
			retry: true, again: "run it again: a hold is captured once",
			replayed: "hold " + id + " was captured before; nothing captured again",
		}, printEnded)
	case "release":
		id := fl.Arg(2)
		if err := meter.ValidateHoldID(id); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		call := cliCall{
			method: http.MethodDelete, path: []string{"orgs", org, "holds", id},
			retry: true, again: "run it again: a hold is released once",
			replayed: "hold " + id + " had ended before (released or expired); nothing released again",
		}
		if fl.Bool("gateway-gone") {
			reason := fl.String("reason")
			if err := meter.ValidateReason(reason); err != nil {
				return caddy.ExitCodeFailedStartup, err
			}
			call.body = map[string]any{"gateway_gone": true, "reason": reason}
		} else if fl.Changed("reason") {
			return caddy.ExitCodeFailedStartup, errors.New("--reason goes with --gateway-gone")
		}
		return callAdmin(fl, call, printEnded)
	}
	return callAdmin(fl, cliCall{method: http.MethodGet, path: []string{"orgs", org, "holds"}, retry: true}, printHolds)
}

const grantsUsage = "grants <org> [give <amount> [--expires <time>] [--effective <time>] [--priority <n>] [--reason <why>] [--reference <ref>] | void <grant> [--reason <why>]]"

// cmdCreditsGrants lists an org's grants, or gives or voids one. Every
// call is safe to send again: a new grant has a reference, and a void
// names its grant.
func cmdCreditsGrants(fl caddycmd.Flags) (int, error) {
	org, action := fl.Arg(0), fl.Arg(1)
	args := map[string]int{"": 1, "give": 3, "void": 3}
	n, ok := args[action]
	if !ok {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("unknown grants action %q: want give or void; usage: caddy credits %s", action, grantsUsage)
	}
	if fl.NArg() != n {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("wrong number of arguments (%d); usage: caddy credits %s", fl.NArg(), grantsUsage)
	}
	if action != "give" {
		for _, name := range []string{"expires", "effective", "priority", "reference"} {
			if fl.Changed(name) {
				return caddy.ExitCodeFailedStartup, fmt.Errorf("--%s is only for caddy credits grants <org> give", name)
			}
		}
	}
	if action == "" && fl.Changed("reason") {
		return caddy.ExitCodeFailedStartup, errors.New("--reason is for caddy credits grants <org> give or void")
	}
	reason := fl.String("reason")
	if reason != "" {
		if err := meter.ValidateReason(reason); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
	}
	switch action {
	case "give":
		amount, err := rangeArg(fl, 2, "amount", 1, meter.MaxAmount)
		if err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		req := meter.GrantRequest{Amount: amount, Reason: reason}
		if req.Expires, err = timeFlag(fl, "expires"); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		if req.Effective, err = timeFlag(fl, "effective"); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		if fl.Changed("priority") {
			p := fl.Int("priority")
			req.Priority = &p
		}
		if req.Reference, err = referenceFlag(fl); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		if err := meter.ValidateGrant(req); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		if !req.Expires.IsZero() && !req.Expires.After(time.Now()) {
			return caddy.ExitCodeFailedStartup, &policy.InputError{Field: "expires", Value: fl.String("expires"), Reason: "must be after now"}
		}
		body := map[string]any{"amount": amount, "reference": req.Reference}
		if !req.Expires.IsZero() {
			body["expires"] = req.Expires.Format(time.RFC3339)
		}
		if !req.Effective.IsZero() {
			body["effective"] = req.Effective.Format(time.RFC3339)
		}
		if req.Priority != nil {
			body["priority"] = *req.Priority
		}
		if reason != "" {
			body["reason"] = reason
		}
		return callAdmin(fl, cliCall{
			method: http.MethodPost, path: []string{"orgs", org, "grants"}, body: body,
			retry: true, again: "run the same command with --reference " + req.Reference + ": it makes one grant",
			replayed: "reference " + req.Reference + " made this grant before; no new grant",
		}, printGranted)
	case "void":
		id := fl.Arg(2)
		if !grantID.MatchString(id) {
			return caddy.ExitCodeFailedStartup, &policy.InputError{Field: "grant", Value: id, Reason: "must be a grant's id, such as g3"}
		}
		call := cliCall{
			method: http.MethodDelete, path: []string{"orgs", org, "grants", id},
			retry: true, again: "run it again: a grant is voided once",
		}
		if reason != "" {
			call.body = map[string]string{"reason": reason}
		}
		return callAdmin(fl, call, printAccount)
	}
	return callAdmin(fl, cliCall{method: http.MethodGet, path: []string{"orgs", org, "grants"}, retry: true}, printGrants)
}

// grantID matches the ids of grants: g<n>, and the two the account keeps
// in its own fields (which the API refuses to void, saying why).
var grantID = regexp.MustCompile(`^(g[1-9][0-9]{0,9}|` + meter.AllowanceGrant + `|` + meter.PurchasedGrant + `)$`)

const budgetsUsage = "budgets <org> [set <subject> <limit> <day|week|month|period> | show <subject> | rm <subject> | " +
	"default [<limit> <day|week|month|period>] | rm-default | [--after <subject>] [--limit <n>]]"

// cmdCreditsBudgets lists an org's budgets, or sets, shows or removes a
// subject's budget or the org's default. Every call is safe to send again:
// a PUT sets a state, and a removal sent again finds the budget gone.
func cmdCreditsBudgets(fl caddycmd.Flags) (int, error) {
	org, action := fl.Arg(0), fl.Arg(1)
	args := map[string][]int{"": {1}, "set": {5}, "show": {3}, "rm": {3}, "default": {2, 4}, "rm-default": {2}}
	n, ok := args[action]
	if !ok {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("unknown budgets action %q: want set, show, rm, default or rm-default; usage: caddy credits %s", action, budgetsUsage)
	}
	if !slices.Contains(n, fl.NArg()) {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("wrong number of arguments (%d); usage: caddy credits %s", fl.NArg(), budgetsUsage)
	}
	if action != "" {
		for _, name := range []string{"after", "limit"} {
			if fl.Changed(name) {
				return caddy.ExitCodeFailedStartup, fmt.Errorf("--%s is only for the list, caddy credits budgets <org>", name)
			}
		}
	}
	defaultPath := []string{"orgs", org, "default-budget"}
	switch action {
	case "":
		return listBudgets(fl, org)
	case "default":
		if fl.NArg() == 2 {
			return callAdmin(fl, cliCall{method: http.MethodGet, path: defaultPath, retry: true}, printBudget)
		}
		return setBudget(fl, defaultPath, 2)
	case "rm-default":
		return callAdmin(fl, cliCall{
			method: http.MethodDelete, path: defaultPath,
			retry: true, again: "caddy credits budgets " + org + " default says whether it is still there",
			gone: "org " + org + "'s default budget is removed",
		}, printBudget)
	}
	subject := fl.Arg(2)
	if err := policy.ValidateSubject(subject); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	path := []string{"orgs", org, "budgets", subject}
	switch action {
	case "set":
		return setBudget(fl, path, 3)
	case "rm":
		return callAdmin(fl, cliCall{
			method: http.MethodDelete, path: path,
			retry: true, again: "caddy credits budgets " + org + " show " + subject + " says whether it has its own still",
			gone: "subject " + subject + "'s budget in org " + org + " is removed",
		}, printBudget)
	}
	return callAdmin(fl, cliCall{method: http.MethodGet, path: path, retry: true}, printBudget)
}

// setBudget sets the budget at path to the limit and window of the
// arguments from i on.
func setBudget(fl caddycmd.Flags, path []string, i int) (int, error) {
	limit, err := rangeArg(fl, i, "limit", 1, meter.MaxAmount)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	set := meter.BudgetLimit{Limit: limit, Window: fl.Arg(i + 1)}
	if err := set.Validate(); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return callAdmin(fl, cliCall{
		method: http.MethodPut, path: path, body: map[string]any{"limit": set.Limit, "window": set.Window},
		retry: true, again: "run it again: a budget set twice is set once",
	}, printBudget)
}

// budgetsList is a page of budgets as the admin API answers it, each
// budget kept as it came.
type budgetsList struct {
	Default json.RawMessage   `json:"default"`
	Budgets []json.RawMessage `json:"budgets"`
	Next    string            `json:"next"`
}

// listBudgets prints one page of an org's budgets with --after or
// --limit, else all of them, a page after another.
func listBudgets(fl caddycmd.Flags, org string) (int, error) {
	path := []string{"orgs", org, "budgets"}
	query := url.Values{}
	if fl.Changed("after") {
		after := fl.String("after")
		if policy.ValidateSubject(after) != nil {
			return caddy.ExitCodeFailedStartup, &policy.InputError{Field: "after", Value: after, Reason: "must be a subject, " + policy.IDPattern}
		}
		query.Set("after", after)
	}
	if fl.Changed("limit") {
		if n := fl.Int("limit"); n < 1 || n > meter.MaxBudgetsPage {
			return caddy.ExitCodeFailedStartup, &policy.InputError{Field: "limit", Value: strconv.Itoa(n), Reason: fmt.Sprintf("must be 1 to %d", meter.MaxBudgetsPage)}
		}
		query.Set("limit", strconv.Itoa(fl.Int("limit")))
	}
	if len(query) > 0 {
		return callAdmin(fl, cliCall{method: http.MethodGet, path: path, query: query, retry: true}, printBudgets(org, query))
	}
	all := budgetsList{Budgets: []json.RawMessage{}}
	for after := ""; ; {
		query := url.Values{"limit": {strconv.Itoa(meter.MaxBudgetsPage)}}
		if after != "" {
			query.Set("after", after)
		}
		a, err := askAdmin(fl, cliCall{method: http.MethodGet, path: path, query: query, retry: true})
		if err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		var page budgetsList
		if err := json.Unmarshal(a.data, &page); err != nil || page.Budgets == nil {
			return caddy.ExitCodeFailedStartup, fmt.Errorf("the answer of %s: not a list of budgets: %v", a.endpoint.Redacted(), err)
		}
		// The default of the first page; a later one would be a change
		// made while the pages were read.
		if after == "" {
			all.Default = page.Default
		}
		all.Budgets = append(all.Budgets, page.Budgets...)
		if page.Next == "" {
			break
		}
		if page.Next == after || len(page.Budgets) == 0 {
			return caddy.ExitCodeFailedStartup, fmt.Errorf("the answer of %s: the next page starts where this one did (%q)", a.endpoint.Redacted(), page.Next)
		}
		after = page.Next
	}
	if all.Default == nil {
		all.Default = json.RawMessage("null")
	}
	data, err := json.Marshal(all)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if fl.Bool("json") {
		_, err = os.Stdout.Write(append(data, '\n'))
		return 0, err
	}
	return 0, printBudgets(org, nil)(os.Stdout, data)
}

// printBudgets prints one aligned line per budget under a header, the
// org's default first, then the command for the next page, if any.
func printBudgets(org string, query url.Values) func(io.Writer, []byte) error {
	return func(w io.Writer, data []byte) error {
		var answer struct {
			Default *meter.Budget  `json:"default"`
			Budgets []meter.Budget `json:"budgets"`
			Next    string         `json:"next"`
		}
		if err := json.Unmarshal(data, &answer); err != nil || answer.Budgets == nil {
			return fmt.Errorf("not a list of budgets: %v", err)
		}
		if answer.Default == nil && len(answer.Budgets) == 0 {
			fmt.Fprintln(w, "no budgets")
		} else {
			tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "SUBJECT\tLIMIT\tWINDOW\tSPENT\tREMAINING\tRESETS")
			if d := answer.Default; d != nil {
				// Each subject under the default spends apart: the default
				// itself has spent nothing.
				fmt.Fprintf(tw, "(default)\t%d\t%s\t-\t-\t%s\n", d.Limit, d.Window, d.Resets.UTC().Format(time.RFC3339))
			}
			for _, b := range answer.Budgets {
				fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d\t%s\n", b.Subject, b.Limit, b.Window, b.Spent, b.Remaining, b.Resets.UTC().Format(time.RFC3339))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
		}
		if answer.Next != "" {
			more := "more: caddy credits budgets " + org + " --after " + answer.Next
			if l := query.Get("limit"); l != "" {
				more += " --limit " + l
			}
			_, err := fmt.Fprintln(w, more)
			return err
		}
		return nil
	}
}

// printBudget prints a budget, one field a line: a subject's, its own or
// the org's default that applies to it, or the org's default itself.
func printBudget(w io.Writer, data []byte) error {
	var b meter.Budget
	if err := json.Unmarshal(data, &b); err != nil || b.Window == "" {
		return fmt.Errorf("not a budget: %v", err)
	}
	if b.Subject == "" {
		fmt.Fprintln(w, "budget:     the org's default, for each subject without its own")
		fmt.Fprintf(w, "limit:      %d per %s\n", b.Limit, b.Window)
		_, err := fmt.Fprintf(w, "resets:     %s\n", b.Resets.UTC().Format(time.RFC3339))
		return err
	}
	whose := "its own"
	if b.Default {
		whose = "the org's default"
	}
	fmt.Fprintf(w, "subject:    %s\n", b.Subject)
	fmt.Fprintf(w, "budget:     %s\n", whose)
	fmt.Fprintf(w, "limit:      %d per %s\n", b.Limit, b.Window)
	fmt.Fprintf(w, "spent:      %d\n", b.Spent)
	fmt.Fprintf(w, "remaining:  %d\n", b.Remaining)
	_, err := fmt.Fprintf(w, "resets:     %s\n", b.Resets.UTC().Format(time.RFC3339))
	return err
}

// timeFlag is the time of a flag: RFC 3339, or a duration from now (720h,
// 30d); the zero time when the flag is not given.
func timeFlag(fl caddycmd.Flags, name string) (time.Time, error) {
	if !fl.Changed(name) {
		return time.Time{}, nil
	}
	s := fl.String(name)
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	if d, err := caddy.ParseDuration(s); err == nil && d > 0 {
		return time.Now().Add(d).UTC().Truncate(time.Second), nil
	}
	return time.Time{}, &policy.InputError{Field: name, Value: s,
		Reason: "must be a time in RFC 3339 (2027-01-31T00:00:00Z) or a duration from now (720h, 30d)"}
}

// rangeArg parses the i-th argument as a whole number from lo to hi, the
// range the API takes.
func rangeArg(fl caddycmd.Flags, i int, name string, lo, hi int64) (int64, error) {
	n, err := strconv.ParseInt(fl.Arg(i), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid %s %q: not a whole number", name, fl.Arg(i))
	}
	if n < lo || n > hi {
		return 0, &policy.InputError{Field: name, Value: fl.Arg(i), Reason: fmt.Sprintf("must be %d to %d", lo, hi)}
	}
	return n, nil
}

// referenceFlag is --reference, checked as the API checks it, or a fresh
// random reference: every write is then safe to send again.
func referenceFlag(fl caddycmd.Flags) (string, error) {
	ref := fl.String("reference")
	if !fl.Changed("reference") {
		return "cli-" + rand.Text(), nil
	}
	if policy.ValidateIdempotencyKey(ref) != nil {
		return "", &policy.InputError{Field: "reference", Value: ref, Reason: "must be 1 to 255 printable ASCII characters without spaces"}
	}
	return ref, nil
}

// cliCall is one call of caddy credits to the admin API.
type cliCall struct {
	method string
	path   []string // the path's elements under the endpoint
	query  url.Values
	body   any // sent as JSON when not nil
	// retry says the call is safe to send again: a read, or a write that
	// its reference or its hold id applies once.
	retry bool
	// again tells the operator how to finish a write whose outcome is
	// unknown.
	again string
	// replayed tells the operator that the write had been applied before,
	// when the API answers it so (Idempotent-Replayed: true).
	replayed string
	// gone tells the operator that a removal is done when a retry of it
	// answers 404: the try whose answer was lost removed it.
	gone string
}

// appliedBefore is what a write of reference ref that the API answers as a
// replay prints.
func appliedBefore(ref string) string {
	return "reference " + ref + " was applied before; nothing applied again"
}

// Retries of a call that got no answer, or a 502, 503 or 504.
const (
	maxAttempts  = 4
	firstBackoff = 250 * time.Millisecond
	maxBackoff   = 2 * time.Second
)

// callAdmin makes one call to the admin API, sent again while it gets no
// answer if c.retry allows, and prints the answer: as it came with --json,
// else with human.
func callAdmin(fl caddycmd.Flags, c cliCall, human func(io.Writer, []byte) error) (int, error) {
	a, err := askAdmin(fl, c)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	note := ""
	switch {
	case a.gone:
		note = c.gone
	case a.replayed:
		note = c.replayed
	}
	if fl.Bool("json") {
		if note != "" {
			fmt.Fprintln(os.Stderr, note)
		}
		if a.gone {
			return 0, nil
		}
		_, err = os.Stdout.Write(append(bytes.TrimSpace(a.data), '\n'))
		return 0, err
	}
	if note != "" {
		fmt.Fprintln(os.Stdout, note)
	}
	if a.gone {
		return 0, nil
	}
	if err := human(os.Stdout, a.data); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("the answer of %s: %v", a.endpoint.Redacted(), err)
	}
	return 0, nil
}

// adminAnswer is a 2xx JSON answer of the admin API.
type adminAnswer struct {
	endpoint *url.URL
	data     []byte
	// replayed says the API answered a replay of this command's own first
	// try, whose answer was lost.
	replayed bool
	// gone says a retry of a removal found nothing to remove: the first
	// try, whose answer was lost, removed it.
	gone bool
}

// askAdmin makes one call to the admin API, sent again while it gets no
// answer if c.retry allows, and returns its answer when it is a 2xx with
// JSON.
func askAdmin(fl caddycmd.Flags, c cliCall) (adminAnswer, error) {
	endpoint, err := adminEndpoint(fl)
	if err != nil {
		return adminAnswer{}, err
	}
	timeout := fl.Duration("timeout")
	if timeout <= 0 {
		return adminAnswer{}, errors.New("the timeout must be above zero")
	}
	var reqBody []byte
	if c.body != nil {
		if reqBody, err = json.Marshal(c.body); err != nil {
			return adminAnswer{}, err
		}
	}
	u := endpoint.JoinPath(c.path...)
	u.RawQuery = c.query.Encode()
	token := adminToken(fl)

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// A redirect is reported, not followed: it would turn a POST into a GET
	// and could carry the token to another host.
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	var (
		resp  *http.Response
		data  []byte
		tries int
	)
	for attempt, backoff := 1, firstBackoff; ; attempt, backoff = attempt+1, min(2*backoff, maxBackoff) {
		tries = attempt
		resp, data, err = sendAdmin(ctx, client, c.method, u.String(), token, reqBody)
		if err == nil && !retryStatus(resp.StatusCode) || !c.retry || attempt == maxAttempts || ctx.Err() != nil {
			break
		}
		if err == nil {
			if s, perr := strconv.Atoi(resp.Header.Get("Retry-After")); perr == nil && s > 0 {
				backoff = max(backoff, min(time.Duration(s)*time.Second, maxBackoff))
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		if ctx.Err() != nil {
			break
		}
	}
	unknown := ""
	if c.again != "" && (err != nil || retryStatus(resp.StatusCode)) {
		unknown = "; the outcome is unknown: " + c.again
	}
	if err != nil {
		if ctx.Err() != nil {
			return adminAnswer{}, fmt.Errorf("no answer from the credits admin API at %s within %s%s", endpoint.Redacted(), timeout, unknown)
		}
		if urlErr, ok := errors.AsType[*url.Error](err); ok {
			err = urlErr.Err // its message repeats the URL
		}
		return adminAnswer{}, fmt.Errorf("cannot reach the credits admin API at %s: %v%s", endpoint.Redacted(), err, unknown)
	}
	if c.gone != "" && tries > 1 && resp.StatusCode == http.StatusNotFound {
		return adminAnswer{endpoint: endpoint, gone: true}, nil
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return adminAnswer{}, fmt.Errorf("%w%s", answerError(endpoint, resp, data), unknown)
	}
	if !json.Valid(data) {
		return adminAnswer{}, fmt.Errorf("the answer of %s is not JSON; is it a credits_admin mount?", endpoint.Redacted())
	}
	return adminAnswer{
		endpoint: endpoint, data: data,
		replayed: c.replayed != "" && tries == 1 && resp.Header.Get(headerReplayed) == "true",
	}, nil
}

// retryStatus reports whether an answer says the call may not have been
// applied, and a retry may succeed.
func retryStatus(status int) bool {
	return status == http.StatusBadGateway || status == http.StatusServiceUnavailable || status == http.StatusGatewayTimeout
}

// sendAdmin sends one request and reads its answer, up to maxAdminAnswer.
func sendAdmin(ctx context.Context, client *http.Client, method, u, token string, body []byte) (*http.Response, []byte, error) {
	var reqBody io.Reader
	if body != nil {
		reqBody = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, reqBody)
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxAdminAnswer))
	if err != nil {
		return nil, nil, fmt.Errorf("reading the answer: %w", err)
	}
	return resp, data, nil
}

// adminEndpoint is --endpoint, or $CREDITS_ADMIN_ENDPOINT when the flag is
// not given.
func adminEndpoint(fl caddycmd.Flags) (*url.URL, error) {
	s := fl.String("endpoint")
	if env := os.Getenv("CREDITS_ADMIN_ENDPOINT"); env != "" && !fl.Changed("endpoint") {
		s = env
	}
	u, err := url.Parse(s)
	// The message leaves the URL out: it may hold a password.
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, errors.New("the endpoint must be an http or https URL such as " + defaultAdminEndpoint)
	}
	return u, nil
}

// adminToken is --token, or $CREDITS_ADMIN_TOKEN when the flag is not given.
func adminToken(fl caddycmd.Flags) string {
	if fl.Changed("token") {
		return fl.String("token")
	}
	return os.Getenv("CREDITS_ADMIN_TOKEN")
}

// answerError reports a non-2xx answer: its status and the problem's
// detail, or title.
func answerError(endpoint *url.URL, resp *http.Response, data []byte) error {
	var p policy.Problem
	_ = json.Unmarshal(data, &p)
	why := p.Detail
	if why == "" {
		why = p.Title
	}
	if loc := resp.Header.Get("Location"); loc != "" && resp.StatusCode/100 == 3 {
		why = "redirected to " + loc
	}
	if why == "" {
		return fmt.Errorf("the credits admin API at %s answered %s", endpoint.Redacted(), resp.Status)
	}
	return fmt.Errorf("the credits admin API at %s answered %s: %s", endpoint.Redacted(), resp.Status, why)
}

// printAccount prints an account, one field a line.
func printAccount(w io.Writer, data []byte) error {
	var a meter.Account
	if err := json.Unmarshal(data, &a); err != nil {
		return fmt.Errorf("not an account: %v", err)
	}
	plan := fmt.Sprintf("recharges every year on month %d", a.Plan.RechargeMonth)
	if !a.OwnPlan {
		plan = "default plan, " + plan
	}
	fmt.Fprintf(w, "org:          %s\n", a.Org)
	fmt.Fprintf(w, "balance:      %d\n", a.Balance)
	fmt.Fprintf(w, "held:         %d\n", a.Held)
	fmt.Fprintf(w, "available:    %d\n", a.Available)
	fmt.Fprintf(w, "allowance:    %d of %d (%s)\n", a.AllowanceRemaining, a.Plan.Allowance, plan)
	if a.Plan.Rollover > 0 {
		fmt.Fprintf(w, "rolls over:   up to %d\n", a.Plan.Rollover)
	}
	if a.NextPlan != nil {
		fmt.Fprintf(w, "next plan:    %d, recharging on month %d, rolling over up to %d, from the next recharge\n",
			a.NextPlan.Allowance, a.NextPlan.RechargeMonth, a.NextPlan.Rollover)
	}
	fmt.Fprintf(w, "purchased:    %d\n", a.Purchased)
	fmt.Fprintf(w, "promotional:  %d\n", a.Promotional)
	fmt.Fprintf(w, "rollover:     %d\n", a.Rollover)
	fmt.Fprintf(w, "debt:         %d\n", a.Debt)
	if a.NextExpiry != nil {
		fmt.Fprintf(w, "next expiry:  %d on %s\n", a.NextExpiry.Amount, a.NextExpiry.At.UTC().Format(time.RFC3339))
	}
	fmt.Fprintf(w, "period:       %s to %s\n", day(a.PeriodStart), day(a.NextRecharge))
	if len(a.Used) == 0 {
		_, err := fmt.Fprintln(w, "used:         nothing this period")
		return err
	}
	fmt.Fprintln(w, "used:")
	features := slices.Sorted(maps.Keys(a.Used))
	width := 0
	for _, f := range features {
		width = max(width, len(f))
	}
	for _, f := range features {
		if _, err := fmt.Fprintf(w, "  %-*s  %d\n", width, f, a.Used[f]); err != nil {
			return err
		}
	}
	return nil
}

// printHeld prints a new hold, then the account after it.
func printHeld(w io.Writer, data []byte) error {
	var answer struct {
		meter.Hold
		Account meter.Account `json:"account"`
	}
	if err := json.Unmarshal(data, &answer); err != nil {
		return fmt.Errorf("not a hold: %v", err)
	}
	return printHoldAndAccount(w, answer.Hold, answer.Account)
}

// printEnded prints a captured or released hold, then the account after it.
func printEnded(w io.Writer, data []byte) error {
	var answer struct {
		meter.Account
		Hold meter.Hold `json:"hold"`
	}
	if err := json.Unmarshal(data, &answer); err != nil {
		return fmt.Errorf("not an account with its hold: %v", err)
	}
	return printHoldAndAccount(w, answer.Hold, answer.Account)
}

func printHoldAndAccount(w io.Writer, h meter.Hold, a meter.Account) error {
	if h.ID == "" {
		return errors.New("no hold in it")
	}
	fmt.Fprintf(w, "hold:         %s\n", h.ID)
	fmt.Fprintf(w, "state:        %s\n", h.State)
	fmt.Fprintf(w, "amount:       %d\n", h.Amount)
	if h.State == meter.HoldCaptured {
		fmt.Fprintf(w, "captured:     %d\n", h.Captured)
	}
	fmt.Fprintf(w, "feature:      %s\n", h.Feature)
	fmt.Fprintf(w, "%-14s%s\n\n", holdUntil(h)+":", h.Expires.UTC().Format(time.RFC3339))
	data, err := json.Marshal(a)
	if err != nil {
		return err
	}
	return printAccount(w, data)
}

// printGranted prints a new grant, then the account after it.
func printGranted(w io.Writer, data []byte) error {
	var answer struct {
		Grant   *meter.Grant  `json:"grant"`
		Account meter.Account `json:"account"`
	}
	if err := json.Unmarshal(data, &answer); err != nil {
		return fmt.Errorf("not a grant: %v", err)
	}
	if g := answer.Grant; g != nil {
		fmt.Fprintf(w, "grant:        %s\n", g.ID)
		fmt.Fprintf(w, "kind:         %s\n", g.Kind)
		fmt.Fprintf(w, "state:        %s\n", g.State)
		fmt.Fprintf(w, "remaining:    %d of %d\n", g.Remaining, g.Amount)
		fmt.Fprintf(w, "priority:     %d\n", g.Priority)
		fmt.Fprintf(w, "effective:    %s\n", g.Effective.UTC().Format(time.RFC3339))
		fmt.Fprintf(w, "expires:      %s\n", grantExpiry(*g))
		fmt.Fprintf(w, "reference:    %s\n\n", g.Reference)
	} else {
		fmt.Fprint(w, "grant:        (the reference's grant is no longer kept)\n\n")
	}
	acct, err := json.Marshal(answer.Account)
	if err != nil {
		return err
	}
	return printAccount(w, acct)
}

// grantExpiry is when a grant expires, or never.
func grantExpiry(g meter.Grant) string {
	if g.Expires == nil {
		return "never"
	}
	return g.Expires.UTC().Format(time.RFC3339)
}

// printGrants prints one aligned line per grant, under a header: id, kind,
// state, remaining of amount, priority, effective and expiry, then the
// reason of those with one.
func printGrants(w io.Writer, data []byte) error {
	var answer struct {
		Grants []meter.Grant `json:"grants"`
	}
	if err := json.Unmarshal(data, &answer); err != nil || answer.Grants == nil {
		return fmt.Errorf("not a list of grants: %v", err)
	}
	if len(answer.Grants) == 0 {
		_, err := fmt.Fprintln(w, "no grants")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "GRANT\tKIND\tSTATE\tREMAINING\tPRIORITY\tEFFECTIVE\tEXPIRES\tREASON")
	for _, g := range answer.Grants {
		effective := "-"
		if !g.Effective.IsZero() {
			effective = g.Effective.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%d\t%s\t%s\t%s\n",
			g.ID, g.Kind, g.State, g.Remaining, g.Amount, g.Priority, effective, grantExpiry(g), g.Reason)
	}
	return tw.Flush()
}

// holdUntil names what a hold's time is: when a live hold expires, or
// until when an ended one is kept.
func holdUntil(h meter.Hold) string {
	switch h.State {
	case meter.HoldLive:
		return "expires"
	case meter.HoldUnreported:
		return "released"
	}
	return "kept until"
}

// printHolds prints one aligned line per hold, under a header: id, state,
// amount held, amount captured, feature, and expiry.
func printHolds(w io.Writer, data []byte) error {
	var answer struct {
		Holds []meter.Hold `json:"holds"`
	}
	if err := json.Unmarshal(data, &answer); err != nil || answer.Holds == nil {
		return fmt.Errorf("not a list of holds: %v", err)
	}
	if len(answer.Holds) == 0 {
		_, err := fmt.Fprintln(w, "no holds")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "HOLD\tSTATE\tAMOUNT\tCAPTURED\tFEATURE\tUNTIL")
	for _, h := range answer.Holds {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s %s\n",
			h.ID, h.State, h.Amount, h.Captured, h.Feature, holdUntil(h), h.Expires.UTC().Format(time.RFC3339))
	}
	return tw.Flush()
}

// day shows t as a date, or in full when it is not midnight UTC (a period
// started by a recharge).
func day(t time.Time) string {
	t = t.UTC()
	if t.Equal(t.Truncate(24 * time.Hour)) {
		return t.Format(time.DateOnly)
	}
	return t.Format(time.RFC3339)
}

// printEvents prints one aligned line per event: time, kind, delta,
// balance, feature and reference.
func printEvents(w io.Writer, data []byte) error {
	var answer struct {
		Events []meter.Event `json:"events"`
	}
	if err := json.Unmarshal(data, &answer); err != nil {
		return fmt.Errorf("not a list of events: %v", err)
	}
	if len(answer.Events) == 0 {
		_, err := fmt.Fprintln(w, "no events")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, e := range answer.Events {
		fmt.Fprintf(tw, "%s\t%s\t%+d\tbalance %d\t%s\t%s",
			e.Time.UTC().Format(time.RFC3339), e.Kind, e.Delta, e.Balance, e.Feature, e.Ref)
		if e.Reason != "" {
			fmt.Fprintf(tw, "\t%q", e.Reason)
		}
		fmt.Fprintln(tw)
	}
	return tw.Flush()
}

// printUsage prints one aligned line per day with usage: the date, the
// day's total and each feature's credits.
func printUsage(w io.Writer, data []byte) error {
	var answer struct {
		Days []meter.DayUsage `json:"days"`
	}
	if err := json.Unmarshal(data, &answer); err != nil {
		return fmt.Errorf("not a list of days: %v", err)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	any := false
	for _, d := range answer.Days {
		if len(d.Used) == 0 {
			continue
		}
		any = true
		var total int64
		for _, n := range d.Used {
			total += n
		}
		fmt.Fprintf(tw, "%s\t%d", d.Date, total)
		for _, f := range slices.Sorted(maps.Keys(d.Used)) {
			fmt.Fprintf(tw, "\t%s %d", f, d.Used[f])
		}
		fmt.Fprintln(tw)
	}
	if !any {
		_, err := fmt.Fprintf(w, "no usage from %s to %s\n", answer.Days[0].Date, answer.Days[len(answer.Days)-1].Date)
		return err
	}
	return tw.Flush()
}

func printOrgs(w io.Writer, data []byte) error {
	var answer struct {
		Orgs []meter.OrgBalance `json:"orgs"`
		Next string             `json:"next"`
	}
	if err := json.Unmarshal(data, &answer); err != nil {
		return fmt.Errorf("not a list of orgs: %v", err)
	}
	if len(answer.Orgs) == 0 {
		_, err := fmt.Fprintln(w, "no orgs")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, o := range answer.Orgs {
		fmt.Fprintf(tw, "%s\t%d\n", o.Org, o.Balance)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if answer.Next != "" {
		_, err := fmt.Fprintf(w, "more: caddy credits orgs --after %s\n", answer.Next)
		return err
	}
	return nil
}

// negativeNumberHint explains the flag error of a negative number, which
// pflag reads as shorthand flags: -5 is "unknown shorthand flag '5'".
func negativeNumberHint(cmd *cobra.Command, err error) error {
	if notExist, ok := errors.AsType[*pflag.NotExistError](err); ok {
		if n := notExist.GetSpecifiedShortnames(); n != "" {
			if _, perr := strconv.ParseUint(n, 10, 64); perr == nil {
				return fmt.Errorf("%w; put -- before a negative number: %s ... -- -%s", err, cmd.CommandPath(), n)
			}
		}
	}
	return err
}

// flagsAfterDash parses the flags given after --. A negative number must
// follow -- so that it is not read as a flag, and the flags an operator
// adds after it (caddy credits adjust acme -- -14 --reason x) are still
// flags: everything after -- that starts with - and is not a number is one,
// with its value when it takes one.
func flagsAfterDash(fs *pflag.FlagSet) error {
	at := fs.ArgsLenAtDash()
	if at < 0 {
		return nil
	}
	args := fs.Args()
	var flags, values []string
	for i := at; i < len(args); i++ {
		a := args[i]
		if len(a) < 2 || a[0] != '-' || isNumber(a) {
			values = append(values, a)
			continue
		}
		flags = append(flags, a)
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		f := fs.Lookup(name)
		if f == nil && len(name) == 1 {
			f = fs.ShorthandLookup(name)
		}
		if f != nil && !hasValue && f.NoOptDefVal == "" && i+1 < len(args) {
			i++
			flags = append(flags, args[i])
		}
	}
	if len(flags) == 0 {
		return nil
	}
	// The flags of the first parse keep their values; this parse adds
	// those after the --, and the arguments are those before it, then the
	// values after it.
	return fs.Parse(append(append(flags, "--"), append(args[:at:at], values...)...))
}

// isNumber reports whether s is a negative whole number, such as -14, of
// any length: a number out of range is the argument's error, not a flag's.
func isNumber(s string) bool {
	return len(s) > 1 && s[0] == '-' && strings.Trim(s[1:], "0123456789") == ""
}
