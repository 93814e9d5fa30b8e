package caddymodule

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/url"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"

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

// maxWaitReplicas is the most replicas wait_replicas may wait for: more
// than a master has makes every write time out.
const maxWaitReplicas = 16

// parseGlobal sets up the credits app from the credits global option.
//
// Syntax:
//
//	credits {
//		redis <url>
//		redis_cluster <host:port|url>...
//		redis_sentinel <master> <host:port>... {
//			username <user>
//			password <password>
//			sentinel_password <password>
//			db <n>
//		}
//		tls_ca <file>
//		tls_client <cert-file> <key-file>
//		key_prefix <prefix>
//		timeout <duration>
//		default_plan <allowance> [<recharge_month>]
//		topup_url <url>
//		backlog <n>
//		lease <n>|off
//		idempotency_store <size>
//		alerts <url> {
//			secret <secret>
//			thresholds <n>...
//		}
//	}
//
// Every subdirective is optional, and so is the block. redis takes a
// redis:// or rediss:// URL (user, password and db in it); redis_cluster
// takes the seed nodes of a Redis Cluster instead, as host:port or as URLs
// that give the cluster's user, password and TLS; redis_sentinel finds the
// master through Redis Sentinel (its block gives the master's credentials,
// the sentinels' password and the db). With none, the store is embedded
// in the Caddy process and balances are lost on restart. tls_ca verifies
// Redis' certificate, tls_client is the gateway's own; with
// redis_sentinel, either turns TLS on.
// default_plan is granted to every org that has no plan of its own; its
// recharge month defaults to 1 (January). backlog bounds the fail-open
// charges that may wait for the store at once; lease, the credits a gateway
// takes at a time to spend without a store call (100 by default).
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
	option := d.Token()
	if d.NextArg() {
		return d.ArgErr()
	}
	subs := newSubdirectives(d, "")
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := noNestedBlock(d, nesting); err != nil {
			return err
		}
		if err := subs.once(); err != nil {
			return err
		}
		switch d.Val() {
		case "alerts":
			al, err := parseAlerts(d)
			if err != nil {
				return err
			}
			a.Alerts = al
		case "redis":
			if d.CountRemainingArgs() == 0 {
				return d.Err("redis needs a redis:// or rediss:// URL; a {$VAR} that is empty where the Caddyfile is adapted leaves none")
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
			nodes := d.RemainingArgs()
			if len(nodes) == 0 {
				return d.ArgErr()
			}
			placeholders := false
			for _, node := range nodes {
				if err := checkNode(node); err != nil {
					return d.WrapErr(err)
				}
				placeholders = placeholders || policy.HasPlaceholder(node)
			}
			if !placeholders {
				// The URLs must agree on the cluster's credentials.
				if _, err := meter.ClusterOptions(nodes); err != nil {
					return d.WrapErr(err)
				}
			}
			a.RedisCluster = nodes
		case "redis_sentinel":
			sentinel, err := parseSentinel(d)
			if err != nil {
				return err
			}
			a.RedisSentinel = sentinel
		case "tls_ca":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			a.TLSCA = v
		case "tls_client":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.ArgErr()
			}
			a.TLSClient = &TLSClient{Cert: args[0], Key: args[1]}
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
			// 0 is how the JSON config asks for the default.
			if err != nil || dur == 0 {
				return d.WrapErr(timeoutError(v))
			}
			a.Timeout = caddy.Duration(dur)
		case "default_plan":
			args := d.RemainingArgs()
			if len(args) < 1 || len(args) > 2 {
				return d.ArgErr()
			}
			allowance, err := parseIntIn("allowance", args[0], 0, meter.MaxAmount)
			if err != nil {
				return d.WrapErr(err)
			}
			plan := &meter.Plan{Allowance: allowance, RechargeMonth: 1}
			if len(args) == 2 {
				month, err := parseIntIn("recharge_month", args[1], 1, 12)
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
		case "wait_replicas":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			n, err := parseIntIn("wait_replicas", v, 0, maxWaitReplicas)
			if err != nil {
				return d.WrapErr(err)
			}
			a.WaitReplicas = new(int(n))
		case "backlog":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			n, err := parseInt("backlog", v)
			if err != nil {
				return d.WrapErr(err)
			}
			// 0 is how the JSON config asks for the default; a number no
			// int holds (on a 32-bit platform) is out of range too.
			if n == 0 || int64(int(n)) != n {
				return d.WrapErr(backlogError(v))
			}
			a.Backlog = int(n)
		case "lease":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			var n int64
			if v != "off" {
				// 0 is how the JSON config says off.
				if n, err = strconv.ParseInt(v, 10, 64); err != nil || n == 0 {
					return d.WrapErr(leaseError(v))
				}
			}
			a.Lease = &n
		case "idempotency_store":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			n, err := humanize.ParseBytes(v)
			if err != nil || n > math.MaxInt64 {
				return d.WrapErr(idempotencyStoreError(v))
			}
			size := int64(n)
			a.IdempotencyStore = &size
		default:
			return subs.unknown()
		}
	}
	// The rules between settings, and their ranges, are the app's own.
	if err := a.Validate(); err != nil {
		return subs.errAt(err, option, "")
	}
	return nil
}

// parseSentinel reads the redis_sentinel option of the credits global
// option:
//
//	redis_sentinel <master> <host:port>... {
//		username <user>
//		password <password>
//		sentinel_password <password>
//		db <n>
//	}
func parseSentinel(d *caddyfile.Dispenser) (*Sentinel, error) {
	args := d.RemainingArgs()
	if len(args) < 2 {
		return nil, d.Errf("redis_sentinel needs the master's name and at least one sentinel's host:port")
	}
	s := &Sentinel{Master: args[0], Addrs: args[1:]}
	for _, addr := range s.Addrs {
		if policy.HasPlaceholder(addr) {
			continue
		}
		if host, port, err := net.SplitHostPort(addr); err != nil || host == "" || port == "" {
			return nil, d.WrapErr(inputError("redis_sentinel sentinel", addr, "must be host:port"))
		}
	}
	subs := newSubdirectives(d, "redis_sentinel: ")
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := noNestedBlock(d, nesting); err != nil {
			return nil, err
		}
		if err := subs.once(); err != nil {
			return nil, err
		}
		field := d.Val()
		switch field {
		case "username", "password", "sentinel_password":
			v, err := singleArg(d)
			if err != nil {
				return nil, err
			}
			switch field {
			case "username":
				s.Username = v
			case "password":
				s.Password = v
			default:
				s.SentinelPassword = v
			}
		case "db":
			v, err := singleArg(d)
			if err != nil {
				return nil, err
			}
			n, err := parseIntIn("db", v, 0, math.MaxInt32)
			if err != nil {
				return nil, d.WrapErr(err)
			}
			s.DB = int(n)
		default:
			return nil, subs.unknown()
		}
	}
	return s, nil
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
	subs := newSubdirectives(d, "alerts: ")
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := noNestedBlock(d, nesting); err != nil {
			return nil, err
		}
		if err := subs.once(); err != nil {
			return nil, err
		}
		switch d.Val() {
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
				n, err := parseInt("threshold", v)
				if err != nil {
					return nil, d.WrapErr(err)
				}
				al.Thresholds = append(al.Thresholds, n)
			}
			subs.alias("threshold")
		default:
			return nil, subs.unknown()
		}
	}
	if err := al.validate(); err != nil {
		// The message never quotes the secret.
		return nil, subs.errAt(err, d.Token(), "")
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
//		budget <subject>
//	}
//
// org and feature are required. org usually is a placeholder, e.g.
// {http.request.header.X-Org-Id}; take it from an authenticated source.
// cost defaults to 1 and is an integer from 1 to 1000000 or a placeholder
// that yields one. on_exhausted defaults to block. overdraft_limit is for
// overdraft routes only, low_balance for notice routes only. fail_mode
// defaults to closed, and to open on overdraft routes. usage defaults to
// header; price, repeatable, needs usage openai or anthropic. budget names
// whose budget in the org each call also counts against, usually a
// placeholder too.
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
	subs := newSubdirectives(d, "")
	var prices []caddyfile.Token
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := noNestedBlock(d, nesting); err != nil {
			return err
		}
		if d.Val() == "price" {
			// Repeatable: one line per model glob.
			prices = append(prices, d.Token())
			args := d.RemainingArgs()
			if len(args) != 3 {
				return d.ArgErr()
			}
			in, err := parseInt("price", args[1])
			if err != nil {
				return d.WrapErr(err)
			}
			out, err := parseInt("price", args[2])
			if err != nil {
				return d.WrapErr(err)
			}
			h.Prices = append(h.Prices, policy.Price{Model: args[0], In: in, Out: out})
			continue
		}
		if err := subs.once(); err != nil {
			return err
		}
		var err error
		switch d.Val() {
		case "org":
			h.Org, err = singleArg(d)
		case "feature":
			h.Feature, err = singleArg(d)
		case "cost":
			h.Cost, err = singleArg(d)
		case "on_exhausted":
			h.OnExhausted, err = singleArg(d)
		case "overdraft_limit":
			var n int64
			n, err = singleInt(d)
			h.OverdraftLimit = &n
		case "low_balance":
			h.LowBalance, err = singleInt(d)
			if err == nil && h.LowBalance == 0 {
				// 0 is how the JSON config says none.
				err = d.WrapErr(policy.RangeError("low_balance", "0", 1, policy.MaxAmount))
			}
		case "fail_mode":
			h.FailMode, err = singleArg(d)
		case "usage":
			h.Usage, err = singleArg(d)
		case "budget":
			h.Budget, err = singleArg(d)
		default:
			err = subs.unknown()
		}
		if err != nil {
			return err
		}
	}

	// Subdirectives come in any order, so the rules wait for the end of the
	// block: they are the handler's, as Provision and Validate check them.
	if err := checkOrg(h.Org); err != nil {
		return subs.errAt(err, directive, "credits: ")
	}
	if err := checkSubject(h.Budget); err != nil {
		return subs.errAt(err, directive, "credits: ")
	}
	if _, err := policy.NewRoute(h.settings()); err != nil {
		var ie *policy.InputError
		if errors.As(err, &ie) && strings.HasPrefix(ie.Field, "price") {
			return errAt(priceAt(h.Prices, prices), err.Error())
		}
		return subs.errAt(err, directive, "credits: ")
	}
	return nil
}

// priceAt returns the line of the price at fault: the first that its own
// rules refuse, else the first (a price on a route that takes none).
func priceAt(prices []policy.Price, at []caddyfile.Token) caddyfile.Token {
	for i, p := range prices {
		if p.Validate() != nil {
			return at[i]
		}
	}
	return at[0]
}

// parseCreditsBalance sets up the credits_balance handler.
//
// Syntax:
//
//	credits_balance [<matcher>] {
//		org <value>
//		budget <subject>
//	}
//
// It answers GET and HEAD with the org's balance as JSON and charges
// nothing. org is required; placeholders are allowed. budget adds the
// subject's budget to the answer.
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
	subs := newSubdirectives(d, "")
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := noNestedBlock(d, nesting); err != nil {
			return err
		}
		if err := subs.once(); err != nil {
			return err
		}
		switch d.Val() {
		case "org":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			b.Org = v
		case "budget":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			b.Budget = v
		default:
			return subs.unknown()
		}
	}
	if err := checkOrg(b.Org); err != nil {
		return subs.errAt(err, directive, "credits_balance: ")
	}
	if err := checkSubject(b.Budget); err != nil {
		return subs.errAt(err, directive, "credits_balance: ")
	}
	return nil
}

// parseCreditsAdmin sets up the credits_admin handler.
//
// Syntax:
//
//	credits_admin [<matcher>] [{
//		token [<name>] <value>
//	}]
//
// Mount it with handle_path <prefix>/*. With a token, every call needs
// Authorization: Bearer <token>; use a placeholder such as
// {env.CREDITS_ADMIN_TOKEN} to keep the token out of the config. token is
// repeatable, each with a name of its own (default admin) and a value of its
// own: any of them is accepted, so a token is rotated with no downtime, and
// a call's token's name is recorded as by in the events it writes. Without a
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
	names, values := map[string]bool{}, map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := noNestedBlock(d, nesting); err != nil {
			return err
		}
		switch d.Val() {
		case "token":
			// token is repeatable: several at once rotate a token with no
			// downtime.
			args := d.RemainingArgs()
			t := AdminToken{Name: defaultTokenName}
			switch len(args) {
			case 1:
				t.Value = args[0]
			case 2:
				t.Name, t.Value = args[0], args[1]
			default:
				return d.ArgErr()
			}
			// An empty token (an unset {$VAR}, say) would leave the API
			// open; refuse it rather than guess.
			if strings.TrimSpace(t.Value) == "" {
				return d.Errf("credits_admin: token %s is empty", t.Name)
			}
			if meter.ValidateBy(t.Name) != nil {
				return d.Errf("credits_admin: token name %q must match %s", t.Name, policy.IDPattern)
			}
			if names[t.Name] {
				return d.Errf("credits_admin: two tokens are named %s", t.Name)
			}
			if values[t.Value] {
				return d.Errf("credits_admin: token %s has the value of another token", t.Name)
			}
			names[t.Name], values[t.Value] = true, true
			if t.Name == defaultTokenName {
				t.Name = ""
			}
			a.Tokens = append(a.Tokens, t)
		default:
			return d.Errf("unrecognized subdirective '%s'", d.Val())
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

// subdirectives remembers where each subdirective of a block was given:
// none may be given twice, and a rule checked after the block points at
// the line of the setting it names.
type subdirectives struct {
	d *caddyfile.Dispenser
	// prefix starts each message, e.g. "alerts: " in a nested block.
	prefix string
	at     map[string]caddyfile.Token
}

func newSubdirectives(d *caddyfile.Dispenser, prefix string) *subdirectives {
	return &subdirectives{d: d, prefix: prefix, at: make(map[string]caddyfile.Token)}
}

// once records the current subdirective, and refuses it the second time.
func (s *subdirectives) once() error {
	sub := s.d.Val()
	if _, ok := s.at[sub]; ok {
		return s.d.Errf("%s%s is given twice", s.prefix, sub)
	}
	s.at[sub] = s.d.Token()
	return nil
}

// alias makes the errors about field point at the current subdirective,
// whose name is another (thresholds gives each threshold).
func (s *subdirectives) alias(field string) { s.at[field] = s.d.Token() }

// unknown refuses the current subdirective.
func (s *subdirectives) unknown() error {
	return s.d.Errf("%sunrecognized subdirective '%s'", s.prefix, s.d.Val())
}

// errAt reports a rule that the block breaks at the line of the setting it
// names (of the last given, for a rule between two), else at fallback with
// prefix before its message.
func (s *subdirectives) errAt(err error, fallback caddyfile.Token, prefix string) error {
	var fields []string
	var msg string
	var ie *policy.InputError
	var se *settingError
	if errors.As(err, &ie) {
		fields, msg = []string{ie.Field}, ie.Error()
	} else if errors.As(err, &se) {
		fields, msg = se.fields, se.Error()
	}
	var at *caddyfile.Token
	for _, f := range fields {
		if tok, ok := s.at[f]; ok && (at == nil || tok.Line > at.Line) {
			at = &tok
		}
	}
	if at != nil {
		return errAt(*at, msg)
	}
	return errAt(fallback, prefix+err.Error())
}

// settingError is a broken rule about settings that has no value to quote,
// e.g. a required one missing.
type settingError struct {
	// fields are the settings the rule is about.
	fields []string
	msg    string
}

func (e *settingError) Error() string { return e.msg }

// singleInt returns the one argument of the current subdirective, a
// decimal integer; its range is the setting's rule.
func singleInt(d *caddyfile.Dispenser) (int64, error) {
	field := d.Val()
	v, err := singleArg(d)
	if err != nil {
		return 0, err
	}
	n, err := parseInt(field, v)
	if err != nil {
		return 0, d.WrapErr(err)
	}
	return n, nil
}

// parseInt parses a decimal integer; its range is the setting's rule.
func parseInt(field, s string) (int64, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, inputError(field, s, "must be an integer")
	}
	return n, nil
}

// parseIntIn parses a decimal integer from lo to hi.
func parseIntIn(field, s string, lo, hi int64) (int64, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < lo || n > hi {
		return 0, policy.RangeError(field, s, lo, hi)
	}
	return n, nil
}

// inputError reports a rejected Caddyfile value in the words of
// policy.InputError: invalid <field> "<value>": <reason>.
func inputError(field, value, reason string) error {
	return &policy.InputError{Field: field, Value: value, Reason: reason}
}

// checkRedisURL checks a Redis URL as the store will parse it, unless it
// holds placeholders, which are replaced when the config loads.
func checkRedisURL(s string) error {
	if policy.HasPlaceholder(s) {
		return nil
	}
	_, err := meter.ParseURL(s)
	return err
}

// checkNode checks a Redis Cluster seed node: host:port, or a URL as
// checkRedisURL checks it.
func checkNode(node string) error {
	if strings.Contains(node, "://") || policy.HasPlaceholder(node) {
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
