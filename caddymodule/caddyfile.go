package caddymodule

import (
	"errors"
	"fmt"
	"github.com/dustin/go-humanize"
	"net"
	"net/url"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("credits", parseGlobal)

	httpcaddyfile.RegisterHandlerDirective("credits", parseCredits)
	// Authentication runs first: the org usually comes from what it proved.
	httpcaddyfile.RegisterDirectiveOrder("credits", httpcaddyfile.After, "forward_auth")

	// Both answer the request themselves, so they sit with the other
	// responding handlers and work directly inside handle and handle_path.
	httpcaddyfile.RegisterHandlerDirective("credits_balance", parseCreditsBalance)
	httpcaddyfile.RegisterDirectiveOrder("credits_balance", httpcaddyfile.Before, "respond")
	httpcaddyfile.RegisterHandlerDirective("credits_admin", parseCreditsAdmin)
	httpcaddyfile.RegisterDirectiveOrder("credits_admin", httpcaddyfile.Before, "respond")
}

// maxBacklog keeps a typo in backlog from allocating gigabytes at start:
// the backlog is a channel of that capacity.
const maxBacklog = 10_000_000

// parseGlobal sets up the credits app from the credits global option.
//
// Syntax:
//
//	credits {
//		redis <url>
//		redis_cluster <host:port|url>...
//		key_prefix <prefix>
//		timeout <duration>
//		default_plan <allowance> [<recharge_month>]
//		topup_url <url>
//		backlog <n>
//		lease <n>
//	}
//
// Every subdirective is optional, and so is the block. redis takes a
// redis:// or rediss:// URL (user, password and db in it); redis_cluster
// takes the seed nodes of a Redis Cluster instead, as host:port or as URLs
// that give the cluster's user, password and TLS. With neither, the store
// is embedded in the Caddy process and balances are lost on restart.
// default_plan is granted to every org that has no plan of its own; its
// recharge month defaults to 1 (January). backlog bounds the fail-open
// charges that may wait for the store at once; lease, the credits a gateway
// takes at a time to spend without a store call (off by default).
func parseGlobal(d *caddyfile.Dispenser, existingVal any) (any, error) {
	if existingVal != nil {
		// Caddy would silently keep only the last one.
		d.Next() // the error is at the option name
		return nil, d.Err("the credits global option is given twice; merge its blocks")
	}
	app := new(App)
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "credits", Value: caddyconfig.JSON(app, nil)}, nil
}

// UnmarshalCaddyfile sets up the app from the credits global option; see
// parseGlobal for the syntax.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume option name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if sub == "alerts" && !seen[sub] {
			seen[sub] = true
			al, err := parseAlerts(d)
			if err != nil {
				return err
			}
			a.Alerts = al
			continue
		}
		if err := noNestedBlock(d, nesting); err != nil {
			return err
		}
		if seen[sub] {
			return d.Errf("%s is given twice", sub)
		}
		seen[sub] = true
		switch sub {
		case "redis":
			if seen["redis_cluster"] {
				return d.Err("redis and redis_cluster are both given; choose one")
			}
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if err := checkRedisURL(v); err != nil {
				// The message never quotes the URL: it may hold a password.
				return d.WrapErr(err)
			}
			a.Redis = v
		case "redis_cluster":
			if seen["redis"] {
				return d.Err("redis and redis_cluster are both given; choose one")
			}
			nodes := d.RemainingArgs()
			if len(nodes) == 0 {
				return d.ArgErr()
			}
			placeholders := false
			for _, node := range nodes {
				if err := checkNode(node); err != nil {
					return d.WrapErr(err)
				}
				placeholders = placeholders || strings.Contains(node, "{")
			}
			if !placeholders {
				// The URLs must agree on the cluster's credentials.
				if _, err := meter.ClusterOptions(nodes); err != nil {
					return d.WrapErr(err)
				}
			}
			a.RedisCluster = nodes
		case "key_prefix":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if _, err := meter.NewKeys(v); err != nil || v == "" {
				return d.WrapErr(inputError("key_prefix", v, "must be 1 to 64 printable ASCII characters without spaces or braces"))
			}
			a.KeyPrefix = v
		case "timeout":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur <= 0 {
				return d.WrapErr(inputError("timeout", v, "must be a duration above 0, e.g. 100ms"))
			}
			a.Timeout = caddy.Duration(dur)
		case "default_plan":
			args := d.RemainingArgs()
			if len(args) < 1 || len(args) > 2 {
				return d.ArgErr()
			}
			allowance, err := parseInt("allowance", args[0], 0, meter.MaxAmount)
			if err != nil {
				return d.WrapErr(err)
			}
			plan := &meter.Plan{Allowance: allowance, RechargeMonth: 1}
			if len(args) == 2 {
				month, err := parseInt("recharge_month", args[1], 1, 12)
				if err != nil {
					return d.WrapErr(err)
				}
				plan.RechargeMonth = int(month)
			}
			a.DefaultPlan = plan
		case "topup_url":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			u, err := url.Parse(v)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				return d.WrapErr(inputError("topup_url", v, "must be an absolute http or https URL"))
			}
			a.TopUpURL = v
		case "backlog":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			n, err := parseInt("backlog", v, 1, maxBacklog)
			if err != nil {
				return d.WrapErr(err)
			}
			a.Backlog = int(n)
		case "lease":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			var n int64
			if v != "off" {
				if n, err = strconv.ParseInt(v, 10, 64); err != nil || n < 1 || n > policy.MaxCost {
					return d.WrapErr(inputError("lease", v, fmt.Sprintf("must be off or an integer from 1 to %d", policy.MaxCost)))
				}
			}
			a.Lease = &n
		case "idempotency_store":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			n, err := humanize.ParseBytes(v)
			if err != nil || n > maxIdempotencyStore {
				return d.WrapErr(inputError("idempotency_store", v, "must be a size such as 1MiB, at most 16MiB; 0 keeps none"))
			}
			size := int64(n)
			a.IdempotencyStore = &size
		default:
			return d.Errf("unrecognized subdirective '%s'", sub)
		}
	}
	return nil
}

// parseAlerts reads the alerts option of the credits global option:
//
//	alerts <url> {
//		secret <secret>
//		thresholds <n>...
//	}
func parseAlerts(d *caddyfile.Dispenser) (*Alerts, error) {
	args := d.RemainingArgs()
	if len(args) != 1 {
		return nil, d.ArgErr()
	}
	al := &Alerts{URL: args[0]}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := noNestedBlock(d, nesting); err != nil {
			return nil, err
		}
		sub := d.Val()
		if seen[sub] {
			return nil, d.Errf("alerts: %s is given twice", sub)
		}
		seen[sub] = true
		switch sub {
		case "secret":
			v, err := singleArg(d)
			if err != nil {
				return nil, err
			}
			al.Secret = v
		case "thresholds":
			vals := d.RemainingArgs()
			if len(vals) == 0 {
				return nil, d.ArgErr()
			}
			for _, v := range vals {
				n, err := parseInt("threshold", v, 1, meter.MaxAmount)
				if err != nil {
					return nil, d.WrapErr(err)
				}
				al.Thresholds = append(al.Thresholds, n)
			}
		default:
			return nil, d.Errf("alerts: unrecognized subdirective '%s'", sub)
		}
	}
	if err := al.validate(); err != nil {
		// The message never quotes the secret.
		return nil, d.WrapErr(err)
	}
	return al, nil
}

// parseCredits sets up the credits handler.
//
// Syntax:
//
//	credits [<matcher>] {
//		org <value>
//		feature <name>
//		cost <n>
//		on_exhausted block|notice|overdraft
//		overdraft_limit <n>
//		low_balance <n>
//		fail_mode open|closed
//		usage header|openai|anthropic
//		price <model-glob> <in> <out>
//	}
//
// org and feature are required. org usually is a placeholder, e.g.
// {http.request.header.X-Org-Id}; take it from an authenticated source.
// cost defaults to 1 and is an integer from 1 to 1000000 or a placeholder
// that yields one. on_exhausted defaults to block. overdraft_limit is for
// overdraft routes only, low_balance for notice routes only. fail_mode
// defaults to closed, and to open on overdraft routes. usage defaults to
// header; price, repeatable, needs usage openai or anthropic.
func parseCredits(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens; see
// parseCredits for the syntax.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	directive := d.Token()
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]caddyfile.Token)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := noNestedBlock(d, nesting); err != nil {
			return err
		}
		sub := d.Val()
		if _, ok := seen[sub]; ok && sub != "price" {
			return d.Errf("%s is given twice", sub)
		}
		seen[sub] = d.Token()
		switch sub {
		case "org":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if err := checkOrg(v); err != nil {
				return d.WrapErr(err)
			}
			h.Org = v
		case "feature":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if err := policy.ValidateFeature(v); err != nil {
				return d.WrapErr(err)
			}
			h.Feature = v
		case "cost":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			// A placeholder is checked on each request: a bad value is a 400.
			if !strings.Contains(v, "{") {
				if _, err := policy.ParseCost(v); err != nil {
					return d.WrapErr(err)
				}
			}
			h.Cost = v
		case "on_exhausted":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if _, err := policy.ParseMode(v); err != nil {
				return d.WrapErr(inputError("on_exhausted", v, "must be block, notice or overdraft"))
			}
			h.OnExhausted = v
		case "overdraft_limit":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			n, err := parseInt("overdraft_limit", v, 0, meter.MaxAmount)
			if err != nil {
				return d.WrapErr(err)
			}
			h.OverdraftLimit = &n
		case "low_balance":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			n, err := parseInt("low_balance", v, 1, meter.MaxAmount)
			if err != nil {
				return d.WrapErr(err)
			}
			h.LowBalance = n
		case "fail_mode":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if v != "open" && v != "closed" {
				return d.WrapErr(inputError("fail_mode", v, "must be open or closed"))
			}
			h.FailMode = v
		case "usage":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if _, err := policy.ParseUsageFormat(v); err != nil {
				return d.WrapErr(err)
			}
			h.Usage = v
		case "price":
			// Repeatable: one line per model glob.
			args := d.RemainingArgs()
			if len(args) != 3 {
				return d.ArgErr()
			}
			in, err := parseInt("price", args[1], 0, policy.MaxPrice)
			if err != nil {
				return d.WrapErr(err)
			}
			out, err := parseInt("price", args[2], 0, policy.MaxPrice)
			if err != nil {
				return d.WrapErr(err)
			}
			p := policy.Price{Model: args[0], In: in, Out: out}
			if err := p.Validate(); err != nil {
				return d.WrapErr(err)
			}
			h.Prices = append(h.Prices, p)
		default:
			return d.Errf("unrecognized subdirective '%s'", sub)
		}
	}

	// Subdirectives come in any order, so the rules between them wait for
	// the end of the block; they are the route's, as Provision checks them.
	if h.Org == "" {
		return errAt(directive, "credits: org is required")
	}
	if h.Feature == "" {
		return errAt(directive, "credits: feature is required")
	}
	_, err := policy.NewRoute(policy.RouteSettings{Feature: h.Feature, Cost: h.Cost, OnExhausted: h.OnExhausted,
		OverdraftLimit: h.OverdraftLimit, LowBalance: h.LowBalance, FailMode: h.FailMode, Usage: h.Usage, Prices: h.Prices})
	var ie *policy.InputError
	if errors.As(err, &ie) {
		if tok, ok := seen[ie.Field]; ok {
			return errAt(tok, err.Error())
		}
		return errAt(directive, "credits: "+err.Error())
	}
	return err
}

// parseCreditsBalance sets up the credits_balance handler.
//
// Syntax:
//
//	credits_balance [<matcher>] {
//		org <value>
//	}
//
// It answers GET and HEAD with the org's balance as JSON and charges
// nothing. org is required; placeholders are allowed.
func parseCreditsBalance(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Balance)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens; see
// parseCreditsBalance for the syntax.
func (b *Balance) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	directive := d.Token()
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := noNestedBlock(d, nesting); err != nil {
			return err
		}
		sub := d.Val()
		if seen[sub] {
			return d.Errf("%s is given twice", sub)
		}
		seen[sub] = true
		switch sub {
		case "org":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if err := checkOrg(v); err != nil {
				return d.WrapErr(err)
			}
			b.Org = v
		default:
			return d.Errf("unrecognized subdirective '%s'", sub)
		}
	}
	if b.Org == "" {
		return errAt(directive, "credits_balance: org is required")
	}
	return nil
}

// parseCreditsAdmin sets up the credits_admin handler.
//
// Syntax:
//
//	credits_admin [<matcher>] [{
//		token <value>
//	}]
//
// Mount it with handle_path <prefix>/*. With a token, every call needs
// Authorization: Bearer <token>; use a placeholder such as
// {env.CREDITS_ADMIN_TOKEN} to keep the token out of the config. Without a
// token the admin API is open to whoever reaches it: serve it then on a
// loopback-only address, e.g. http://127.0.0.1:2020 with bind 127.0.0.1.
func parseCreditsAdmin(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Admin)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens; see
// parseCreditsAdmin for the syntax.
func (a *Admin) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := noNestedBlock(d, nesting); err != nil {
			return err
		}
		sub := d.Val()
		if seen[sub] {
			return d.Errf("%s is given twice", sub)
		}
		seen[sub] = true
		switch sub {
		case "token":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			// An empty token (an unset {$VAR}, say) would leave the API
			// open; refuse it rather than guess.
			if strings.TrimSpace(v) == "" {
				return d.Err("credits_admin: token is empty")
			}
			a.Token = v
		default:
			return d.Errf("unrecognized subdirective '%s'", sub)
		}
	}
	return nil
}

// noNestedBlock refuses a block after a subdirective: none takes one, and
// NextBlock would walk into it and hand its braces and lines out as
// subdirectives.
func noNestedBlock(d *caddyfile.Dispenser, nesting int) error {
	if d.Nesting() > nesting+1 {
		return d.Err("unexpected '{': these subdirectives take no block")
	}
	return nil
}

// singleArg returns the one argument of the current subdirective.
func singleArg(d *caddyfile.Dispenser) (string, error) {
	if !d.NextArg() {
		return "", d.ArgErr()
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return v, nil
}

// parseInt parses a decimal integer from lo to hi.
func parseInt(field, s string, lo, hi int64) (int64, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < lo || n > hi {
		return 0, inputError(field, s, fmt.Sprintf("must be an integer from %d to %d", lo, hi))
	}
	return n, nil
}

// inputError reports a rejected Caddyfile value in the words of
// policy.InputError: invalid <field> "<value>": <reason>.
func inputError(field, value, reason string) error {
	return &policy.InputError{Field: field, Value: value, Reason: reason}
}

// checkOrg checks an org that is written out; one with a placeholder is
// checked on each request.
func checkOrg(org string) error {
	if strings.Contains(org, "{") {
		return nil
	}
	if err := policy.ValidateOrg(org); err != nil {
		if errors.Is(err, policy.ErrOrgMissing) {
			return errors.New("org is empty")
		}
		return err
	}
	return nil
}

// checkRedisURL checks a Redis URL as the store will parse it, unless it
// holds placeholders, which are replaced when the config loads.
func checkRedisURL(s string) error {
	if strings.Contains(s, "{") {
		return nil
	}
	_, err := meter.ParseURL(s)
	return err
}

// checkNode checks a Redis Cluster seed node: host:port, or a URL as
// checkRedisURL checks it.
func checkNode(node string) error {
	if strings.Contains(node, "://") || strings.Contains(node, "{") {
		return checkRedisURL(node)
	}
	host, port, err := net.SplitHostPort(node)
	if err == nil && host != "" {
		var p int64
		if p, err = strconv.ParseInt(port, 10, 32); err == nil && p >= 1 && p <= 65535 {
			return nil
		}
	}
	return inputError("redis_cluster node", node, "must be host:port or a redis:// or rediss:// URL")
}

// errAt reports an error at tok, as caddyfile.Dispenser.Errf does at the
// current token, for rules that can only be checked after the block.
func errAt(tok caddyfile.Token, msg string) error {
	return fmt.Errorf("%s, at %s:%d", msg, tok.File, tok.Line)
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*App)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*Balance)(nil)
	_ caddyfile.Unmarshaler = (*Admin)(nil)
)
