package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
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
		Usage: "show|plan|topup|recharge|events <org> [<args>]",
		Short: "Reads and changes orgs' credits through a credits_admin endpoint",
		Long: `
Calls the admin API that the credits_admin handler serves, and prints the
answer: an org's account, or its events.

  caddy credits show <org>
  caddy credits plan <org> <allowance> [<recharge_month>]
  caddy credits topup <org> <amount> [--reference <ref>]
  caddy credits recharge <org>
  caddy credits events <org> [--limit <n>]

--endpoint is the URL at which credits_admin is mounted; without the flag
it is $CREDITS_ADMIN_ENDPOINT, or else ` + defaultAdminEndpoint + `.
--token is the handler's bearer token; without the flag it is
$CREDITS_ADMIN_TOKEN. Prefer the environment variable: a flag shows in the
process list. --json prints the API's JSON answer as it came.

A negative number must follow --, or it is read as a flag; flags go before
the --: caddy credits topup acme --token ... -- -5.
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

			topUp := creditsCommand("topup <org> <amount> [--reference <ref>]", "Adds purchased credits; a reference is applied once", 2, 2, cmdCreditsTopUp)
			topUp.Flags().String("reference", "", "Reference of the payment; a repeat is not applied again")
			events := creditsCommand("events <org> [--limit <n>]", "Lists an org's events, newest first", 1, 1, cmdCreditsEvents)
			events.Flags().Int("limit", 0, "How many events to list (default: the API's, 50)")
			cmd.AddCommand(
				creditsCommand("show <org>", "Shows an org's account", 1, 1, cmdCreditsShow),
				creditsCommand("plan <org> <allowance> [<recharge_month>]", "Sets an org's plan; the month defaults to 1", 2, 3, cmdCreditsPlan),
				topUp,
				creditsCommand("recharge <org>", "Starts a new period for an org now", 1, 1, cmdCreditsRecharge),
				events,
			)
		},
	})
}

// creditsCommand is a subcommand of caddy credits that takes minArgs to
// maxArgs arguments.
func creditsCommand(use, short string, minArgs, maxArgs int, run caddycmd.CommandFunc) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		RunE: caddycmd.WrapCommandFuncForCobra(func(fl caddycmd.Flags) (int, error) {
			if n := fl.NArg(); n < minArgs || n > maxArgs {
				return caddy.ExitCodeFailedStartup, fmt.Errorf("wrong number of arguments (%d); usage: caddy credits %s", n, use)
			}
			if err := policy.ValidateOrg(fl.Arg(0)); err != nil {
				return caddy.ExitCodeFailedStartup, err
			}
			return run(fl)
		}),
	}
}

func cmdCreditsShow(fl caddycmd.Flags) (int, error) {
	return callAdmin(fl, http.MethodGet, nil, nil, printAccount, "orgs", fl.Arg(0))
}

func cmdCreditsPlan(fl caddycmd.Flags) (int, error) {
	allowance, err := intArg(fl, 1, "allowance")
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	month := int64(1)
	if fl.NArg() > 2 {
		if month, err = intArg(fl, 2, "recharge_month"); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
	}
	body := map[string]int64{"allowance": allowance, "recharge_month": month}
	return callAdmin(fl, http.MethodPut, nil, body, printAccount, "orgs", fl.Arg(0), "plan")
}

func cmdCreditsTopUp(fl caddycmd.Flags) (int, error) {
	amount, err := intArg(fl, 1, "amount")
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	body := map[string]any{"amount": amount}
	if ref := fl.String("reference"); ref != "" {
		body["reference"] = ref
	}
	return callAdmin(fl, http.MethodPost, nil, body, printAccount, "orgs", fl.Arg(0), "topup")
}

func cmdCreditsRecharge(fl caddycmd.Flags) (int, error) {
	return callAdmin(fl, http.MethodPost, nil, nil, printAccount, "orgs", fl.Arg(0), "recharge")
}

func cmdCreditsEvents(fl caddycmd.Flags) (int, error) {
	var query url.Values
	if fl.Changed("limit") {
		// The API checks the range, so that the CLI never disagrees with it.
		query = url.Values{"limit": {strconv.Itoa(fl.Int("limit"))}}
	}
	return callAdmin(fl, http.MethodGet, query, nil, printEvents, "orgs", fl.Arg(0), "events")
}

// intArg parses the i-th argument as a whole number.
func intArg(fl caddycmd.Flags, i int, name string) (int64, error) {
	n, err := strconv.ParseInt(fl.Arg(i), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid %s %q: not a whole number", name, fl.Arg(i))
	}
	return n, nil
}

// callAdmin makes one call to the admin API, at the path made of elems
// under the endpoint, and prints the answer: as it came with --json, else
// with human.
func callAdmin(fl caddycmd.Flags, method string, query url.Values, body any, human func(io.Writer, []byte) error, elems ...string) (int, error) {
	endpoint, err := adminEndpoint(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	timeout := fl.Duration("timeout")
	if timeout <= 0 {
		return caddy.ExitCodeFailedStartup, errors.New("the timeout must be above zero")
	}
	var reqBody io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		reqBody = bytes.NewReader(data)
	}
	u := endpoint.JoinPath(elems...)
	u.RawQuery = query.Encode()

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, u.String(), reqBody)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token := adminToken(fl); token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	// A redirect is reported, not followed: it would turn a POST into a GET
	// and could carry the token to another host.
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return caddy.ExitCodeFailedStartup, fmt.Errorf("no answer from the credits admin API at %s within %s", endpoint.Redacted(), timeout)
		}
		if urlErr, ok := errors.AsType[*url.Error](err); ok {
			err = urlErr.Err // its message repeats the URL
		}
		return caddy.ExitCodeFailedStartup, fmt.Errorf("cannot reach the credits admin API at %s: %v", endpoint.Redacted(), err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxAdminAnswer))
	if err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("reading the answer of %s: %v", endpoint.Redacted(), err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return caddy.ExitCodeFailedStartup, answerError(endpoint, resp, data)
	}
	if !json.Valid(data) {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("the answer of %s is not JSON; is it a credits_admin mount?", endpoint.Redacted())
	}
	if fl.Bool("json") {
		_, err = os.Stdout.Write(append(bytes.TrimSpace(data), '\n'))
		return 0, err
	}
	if err := human(os.Stdout, data); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("the answer of %s: %v", endpoint.Redacted(), err)
	}
	return 0, nil
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
	fmt.Fprintf(w, "allowance:    %d of %d (%s)\n", a.AllowanceRemaining, a.Plan.Allowance, plan)
	if a.NextPlan != nil {
		fmt.Fprintf(w, "next plan:    %d, recharging on month %d, from the next recharge\n", a.NextPlan.Allowance, a.NextPlan.RechargeMonth)
	}
	fmt.Fprintf(w, "purchased:    %d\n", a.Purchased)
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
		fmt.Fprintf(tw, "%s\t%s\t%+d\tbalance %d\t%s\t%s\n",
			e.Time.UTC().Format(time.RFC3339), e.Kind, e.Delta, e.Balance, e.Feature, e.Ref)
	}
	return tw.Flush()
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
