package caddymodule

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

func init() {
	caddy.RegisterModule(Admin{})
}

// Admin serves the admin API, for a billing system or an operator: read an
// org's account and events, set its plan, top it up, recharge it, give and
// void promotional grants, and set credits aside with holds for long jobs. Mount it with handle_path
// <prefix>/* on an address only admins reach.
type Admin struct {
	// Tokens, if any, are the bearer tokens the API accepts: every call
	// then needs Authorization: Bearer <one of them>. Several at once let a
	// token be rotated with no downtime. A call's token's name is recorded
	// as by in every event the call writes.
	Tokens []AdminToken `json:"tokens,omitempty"`
	// Token is a token named "admin", as configs before named tokens gave
	// it; it may stand beside Tokens.
	Token string `json:"token,omitempty"`

	app    *App
	keys   []tokenKey
	logger *zap.Logger
	// outage logs what a Redis outage repeats call after call (the store
	// not answering), paced as the metered routes' lines are.
	outage *zap.Logger
}

// AdminToken is one bearer token of the admin API.
type AdminToken struct {
	// Name says whose token it is; it is recorded as by in the events of
	// the calls made with it. It matches an org id's pattern; default
	// "admin".
	Name string `json:"name,omitempty"`
	// Value is the token. Placeholders such as {env.CREDITS_ADMIN_TOKEN}
	// are replaced when the config loads.
	Value string `json:"value"`
}

// defaultTokenName names a token given without a name.
const defaultTokenName = "admin"

// tokenKey is a token as calls are checked against it: its name and the
// SHA-256 of its value.
type tokenKey struct {
	name string
	hash [32]byte
}

// CaddyModule returns the Caddy module information.
func (Admin) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.credits_admin",
		New: func() caddy.Module { return new(Admin) },
	}
}

// Provision finds the credits app and resolves the tokens.
func (a *Admin) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	tokens := a.Tokens
	if a.Token != "" {
		tokens = append([]AdminToken{{Name: defaultTokenName, Value: a.Token}}, tokens...)
	}
	var err error
	if a.keys, err = tokenKeys(tokens); err != nil {
		return fmt.Errorf("credits_admin: %w", err)
	}
	if a.app, err = appFrom(ctx); err != nil {
		return err
	}
	a.outage = a.app.quiet.logger(a.logger)
	return nil
}

// tokenKeys checks tokens and resolves their placeholders: each has a
// name of an org id's shape (default "admin"), no two share a name or a
// value, and none is empty once its placeholders are replaced. The errors
// name tokens by name, never by value.
func tokenKeys(tokens []AdminToken) ([]tokenKey, error) {
	repl := caddy.NewReplacer()
	keys := make([]tokenKey, 0, len(tokens))
	names := map[string]bool{}
	values := map[[32]byte]string{}
	for _, t := range tokens {
		name := t.Name
		if name == "" {
			name = defaultTokenName
		}
		if err := meter.ValidateBy(name); err != nil {
			return nil, fmt.Errorf("token name %q must match %s", name, policy.IDPattern)
		}
		if names[name] {
			return nil, fmt.Errorf("two tokens are named %q", name)
		}
		names[name] = true
		value := repl.ReplaceKnown(t.Value, "")
		if strings.TrimSpace(value) == "" {
			return nil, fmt.Errorf("token %q is empty once its placeholders are replaced", name)
		}
		hash := sha256.Sum256([]byte(value))
		if other, ok := values[hash]; ok {
			return nil, fmt.Errorf("tokens %q and %q have the same value", other, name)
		}
		values[hash] = name
		keys = append(keys, tokenKey{name: name, hash: hash})
	}
	return keys, nil
}

// Limits of an admin call.
const (
	maxAdminBody   = 64 << 10
	maxAdminHeader = 16 << 10
	maxEvents      = 1000
	// defaultEvents is how many events GET .../events answers without a limit.
	defaultEvents = 50
	// defaultOrgs is how many orgs GET /orgs answers without a limit.
	defaultOrgs = 100
)

// ServeHTTP answers an admin call: the console's files, then the limits
// and the token, then the one route of the call's method and path.
func (a *Admin) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	// The usage console's page holds no data: it needs no token (console.go).
	if serveConsole(w, r) {
		return nil
	}
	if headerBytes(r.Header) > maxAdminHeader {
		return writeProblem(w, r, policy.Status(http.StatusRequestHeaderFieldsTooLarge, fmt.Sprintf("request headers larger than %d bytes", maxAdminHeader)))
	}
	// A load balancer's readiness probe and a client generator carry no
	// token.
	if len(a.keys) > 0 && !needsNoToken(r) {
		name, ok := a.authorized(r)
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer realm="credits"`)
			return writeProblem(w, r, policy.Status(http.StatusUnauthorized, "a valid Authorization: Bearer token is required"))
		}
		r = r.WithContext(meter.WithBy(r.Context(), name))
	}
	// The mux answers a path it has no route for, or a wrong method, in
	// plain text, and redirects a path that is not clean: ask it first, so
	// that every such answer is a problem.
	if h, _ := adminMux.Handler(r); !isAdminRoute(h) {
		return unrouted(w, r, h)
	}
	call := &adminCall{admin: a}
	adminMux.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), adminCallKey{}, call)))
	return call.err
}

// adminRoute answers one admin call. It is an http.Handler of adminMux, so
// that the mux fills in the path's values; the Admin and the returned error
// travel in the request's context, in an adminCall. For bad input a route
// returns invalid(err), which its ServeHTTP answers 400.
type adminRoute func(a *Admin, w http.ResponseWriter, r *http.Request) error

// adminRoutes maps each admin call, a ServeMux pattern, to its route. A GET
// pattern answers HEAD too.
var adminRoutes = map[string]adminRoute{
	"GET /health":                         (*Admin).health,
	"GET /openapi.json":                   (*Admin).openAPI,
	"GET /orgs":                           (*Admin).orgs,
	"GET /orgs/{org}":                     withOrg((*Admin).account),
	"PUT /orgs/{org}/plan":                withOrg((*Admin).setPlan),
	"POST /orgs/{org}/topup":              withOrg((*Admin).topUp),
	"POST /orgs/{org}/recharge":           withOrg((*Admin).recharge),
	"GET /orgs/{org}/events":              withOrg((*Admin).events),
	"GET /orgs/{org}/usage":               withOrg((*Admin).usage),
	"POST /orgs/{org}/adjust":             withOrg((*Admin).adjust),
	"POST /orgs/{org}/holds":              withOrg((*Admin).createHold),
	"GET /orgs/{org}/holds":               withOrg((*Admin).holds),
	"POST /orgs/{org}/holds/{id}/capture": withOrg((*Admin).captureHold),
	"DELETE /orgs/{org}/holds/{id}":       withOrg((*Admin).releaseHold),
	"POST /orgs/{org}/grants":             withOrg((*Admin).createGrant),
	"GET /orgs/{org}/grants":              withOrg((*Admin).grants),
	"DELETE /orgs/{org}/grants/{id}":      withOrg((*Admin).voidGrant),
}

// adminMux matches a call's method exactly and its path to a route.
var adminMux = func() *http.ServeMux {
	mux := http.NewServeMux()
	for pattern, route := range adminRoutes {
		mux.Handle(pattern, route)
	}
	return mux
}()

type adminCallKey struct{}

// adminCall carries the Admin to a route, and the route's error back.
type adminCall struct {
	admin *Admin
	err   error
}

func (route adminRoute) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	call := r.Context().Value(adminCallKey{}).(*adminCall)
	err := route(call.admin, w, r)
	if bad, ok := err.(badInput); ok {
		err = writeProblem(w, r, policy.Invalid(bad.err))
	}
	call.err = err
}

// orgRoute answers an admin call on one org, the path's {org}, checked.
type orgRoute func(a *Admin, w http.ResponseWriter, r *http.Request, org string) error

// withOrg checks the path's org before route runs: an invalid one is
// answered 400, and route is not run.
func withOrg(route orgRoute) adminRoute {
	return func(a *Admin, w http.ResponseWriter, r *http.Request) error {
		org := r.PathValue("org")
		if err := policy.ValidateOrg(org); err != nil {
			return invalid(err)
		}
		return route(a, w, r, org)
	}
}

// badInput is a route's error for a call's bad input: the route's caller
// answers it 400 with err's words, so that no route writes that answer
// itself.
type badInput struct{ err error }

func (b badInput) Error() string { return b.err.Error() }

// invalid is the error a route returns for bad input.
func invalid(err error) error { return badInput{err} }

func isAdminRoute(h http.Handler) bool {
	_, ok := h.(adminRoute)
	return ok
}

// unrouted answers a call that no route takes: 405 with the mux's Allow
// when the path has routes for other methods, else 404. h is the mux's own
// answer, which is run only to learn its status and Allow header.
func unrouted(w http.ResponseWriter, r *http.Request, h http.Handler) error {
	probe := &probeWriter{header: http.Header{}}
	h.ServeHTTP(probe, r)
	if probe.status == http.StatusMethodNotAllowed {
		allow := probe.header.Get("Allow")
		w.Header().Set("Allow", allow)
		return writeProblem(w, r, policy.Status(http.StatusMethodNotAllowed,
			fmt.Sprintf("method %s is not allowed at %s; allowed: %s", r.Method, r.URL.Path, allow)))
	}
	return writeProblem(w, r, policy.Status(http.StatusNotFound, "no admin call at "+r.URL.Path))
}

// probeWriter keeps the status and headers of an answer and drops its body.
type probeWriter struct {
	header http.Header
	status int
}

func (p *probeWriter) Header() http.Header         { return p.header }
func (p *probeWriter) Write(b []byte) (int, error) { return len(b), nil }
func (p *probeWriter) WriteHeader(status int) {
	if p.status == 0 {
		p.status = status
	}
}

func (a *Admin) account(w http.ResponseWriter, r *http.Request, org string) error {
	acct, err := a.app.ledger.Account(r.Context(), org)
	if err != nil {
		return a.fail(w, r, org, "account", err)
	}
	return writeJSON(w, r, http.StatusOK, acct)
}

func (a *Admin) events(w http.ResponseWriter, r *http.Request, org string) error {
	limit := int64(defaultEvents)
	if s := r.URL.Query().Get("limit"); s != "" {
		var err error
		limit, err = strconv.ParseInt(s, 10, 64)
		if err != nil || limit < 1 || limit > maxEvents {
			return invalid(&policy.InputError{Field: "limit", Value: s, Reason: fmt.Sprintf("must be 1 to %d", maxEvents)})
		}
	}
	events, err := a.app.ledger.Events(r.Context(), org, limit)
	if err != nil {
		return a.fail(w, r, org, "events", err)
	}
	if events == nil {
		events = []meter.Event{}
	}
	return writeJSON(w, r, http.StatusOK, map[string][]meter.Event{"events": events})
}

// usageDays is how many days GET .../usage answers without a from: the
// last 30, today's included.
const usageDays = 30

// usage answers the org's usage per feature per UTC day, from..to (both
// YYYY-MM-DD, included; to defaults to today, from to 29 days before to):
// {"org": ..., "days": [{"date": ..., "used": {...}}, ...]}, every day of
// the range, in order.
func (a *Admin) usage(w http.ResponseWriter, r *http.Request, org string) error {
	q := r.URL.Query()
	to := time.Now().UTC()
	var err error
	if s := q.Get("to"); s != "" {
		if to, err = parseDate("to", s); err != nil {
			return invalid(err)
		}
	}
	from := to.AddDate(0, 0, -(usageDays - 1))
	if s := q.Get("from"); s != "" {
		if from, err = parseDate("from", s); err != nil {
			return invalid(err)
		}
	}
	days, err := a.app.ledger.Usage(r.Context(), org, from, to)
	if err != nil {
		return a.fail(w, r, org, "usage", err)
	}
	return writeJSON(w, r, http.StatusOK, struct {
		Org  string           `json:"org"`
		Days []meter.DayUsage `json:"days"`
	}{org, days})
}

// parseDate reads a query's YYYY-MM-DD.
func parseDate(field, s string) (time.Time, error) {
	t, err := time.Parse(time.DateOnly, s)
	if err != nil {
		return time.Time{}, &policy.InputError{Field: field, Value: s, Reason: "must be a date, YYYY-MM-DD"}
	}
	return t, nil
}

// orgs answers a page of the orgs Redis holds, in order:
// {"orgs": [{"org": ..., "balance": n}, ...], "next": "<org or empty>"}.
func (a *Admin) orgs(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	after := q.Get("after")
	if after != "" {
		if err := policy.ValidateOrg(after); err != nil {
			return invalid(&policy.InputError{Field: "after", Value: after, Reason: "must be an org id"})
		}
	}
	limit := defaultOrgs
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > meter.MaxOrgsPage {
			return invalid(&policy.InputError{Field: "limit", Value: s, Reason: fmt.Sprintf("must be 1 to %d", meter.MaxOrgsPage)})
		}
		limit = n
	}
	orgs, next, err := a.app.ledger.Orgs(r.Context(), after, limit)
	if err != nil {
		return a.fail(w, r, "", "orgs", err)
	}
	return writeJSON(w, r, http.StatusOK, struct {
		Orgs []meter.OrgBalance `json:"orgs"`
		Next string             `json:"next"`
	}{orgs, next})
}

func (a *Admin) setPlan(w http.ResponseWriter, r *http.Request, org string) error {
	var body struct {
		Allowance     *int64 `json:"allowance"`
		RechargeMonth *int   `json:"recharge_month"`
		Rollover      int64  `json:"rollover"`
		Reference     string `json:"reference"`
	}
	if err := decodeBody(w, r, &body); err != nil {
		return invalid(err)
	}
	if body.Allowance == nil || body.RechargeMonth == nil {
		return invalid(errors.New("allowance and recharge_month are required"))
	}
	ref, own, err := writeReference(r, body.Reference)
	if err != nil {
		return invalid(err)
	}
	plan := meter.Plan{Allowance: *body.Allowance, RechargeMonth: *body.RechargeMonth, Rollover: body.Rollover}
	acct, applied, err := a.app.ledger.SetPlan(context.WithoutCancel(r.Context()), org, plan, ref)
	if err != nil {
		return a.failWrite(w, r, org, "plan", ref, a.voidWrite(own, org, "plan", ref), err)
	}
	a.logger.Info("plan set", zap.String("org", org), zap.Int64("allowance", plan.Allowance), zap.Int("recharge_month", plan.RechargeMonth),
		zap.Int64("rollover", plan.Rollover), zap.String("reference", ref), zap.Bool("applied", applied))
	return answerWrite(w, r, http.StatusOK, applied || own, acct)
}

func (a *Admin) topUp(w http.ResponseWriter, r *http.Request, org string) error {
	var body struct {
		Amount    *int64  `json:"amount"`
		Reference string  `json:"reference"`
		Expires   *string `json:"expires"`
	}
	if err := decodeBody(w, r, &body); err != nil {
		return invalid(err)
	}
	if body.Amount == nil {
		return invalid(errors.New("amount is required"))
	}
	expires, err := optionalTime("expires", body.Expires)
	if err != nil {
		return invalid(err)
	}
	ref, own, err := writeReference(r, body.Reference)
	if err != nil {
		return invalid(err)
	}
	acct, applied, err := a.app.ledger.TopUpExpiring(context.WithoutCancel(r.Context()), org, *body.Amount, ref, expires)
	if err != nil {
		var void meter.Deferred
		if own {
			void = meter.LaterVoidTopUp{Ledger: a.app.ledger, Org: org, Reference: ref, Amount: *body.Amount}
		}
		return a.failWrite(w, r, org, "top-up", ref, void, err)
	}
	a.logger.Info("top-up", zap.String("org", org), zap.Int64("amount", *body.Amount), expiresField(expires),
		zap.String("reference", ref), zap.Bool("applied", applied))
	return answerWrite(w, r, http.StatusOK, applied || own, acct)
}

// adjust applies an operator's correction: {"amount": n (not 0), "reason":
// "...", "reference": "..."}. A reference (or the call's Idempotency-Key) is
// required, so that a retry after an unknown outcome applies it once.
func (a *Admin) adjust(w http.ResponseWriter, r *http.Request, org string) error {
	var body struct {
		Amount    *int64 `json:"amount"`
		Reason    string `json:"reason"`
		Reference string `json:"reference"`
	}
	if err := decodeBody(w, r, &body); err != nil {
		return invalid(err)
	}
	if body.Amount == nil {
		return invalid(errors.New("amount is required"))
	}
	ref, err := reference(r, body.Reference)
	if err != nil {
		return invalid(err)
	}
	if ref == "" {
		return invalid(errors.New("reference (or an Idempotency-Key) is required: it makes a retry apply the adjustment once"))
	}
	acct, applied, err := a.app.ledger.Adjust(context.WithoutCancel(r.Context()), org, *body.Amount, body.Reason, ref)
	if err != nil {
		return a.failWrite(w, r, org, "adjustment", ref, nil, err)
	}
	a.app.observe(org, acct.Balance)
	a.logger.Info("adjustment", zap.String("org", org), zap.Int64("amount", *body.Amount),
		zap.String("reason", body.Reason), zap.String("reference", ref), zap.Bool("applied", applied))
	return answerWrite(w, r, http.StatusOK, applied, acct)
}

func (a *Admin) recharge(w http.ResponseWriter, r *http.Request, org string) error {
	var body struct {
		Reference string `json:"reference"`
	}
	if err := decodeBody(w, r, &body); err != nil {
		return invalid(err)
	}
	ref, own, err := writeReference(r, body.Reference)
	if err != nil {
		return invalid(err)
	}
	acct, applied, err := a.app.ledger.Recharge(context.WithoutCancel(r.Context()), org, ref)
	if err != nil {
		return a.failWrite(w, r, org, "recharge", ref, a.voidWrite(own, org, "recharge", ref), err)
	}
	a.logger.Info("recharged", zap.String("org", org), zap.String("reference", ref), zap.Bool("applied", applied))
	return answerWrite(w, r, http.StatusOK, applied || own, acct)
}

// answerWrite answers a write applied once per reference: acct, marked as
// a replay when the reference had been applied before. A reference of the
// gateway's own is counted as applied: only the ledger's resend of this
// very call can have applied it before.
func answerWrite(w http.ResponseWriter, r *http.Request, status int, applied bool, acct meter.Account) error {
	if !applied {
		w.Header().Set(headerReplayed, "true")
	}
	return writeJSON(w, r, status, acct)
}

// voidWrite is the void of a plan or a recharge (kind) of the gateway's own
// reference, to queue when its outcome is unknown; nil for a caller's.
func (a *Admin) voidWrite(own bool, org, kind, ref string) meter.Deferred {
	if !own {
		return nil
	}
	return meter.LaterVoidWrite{Ledger: a.app.ledger, Org: org, Kind: kind, Reference: ref, Stands: func() {
		a.logger.Error("a "+kind+" answered 503 had applied, and the account changed before its void: it stands",
			zap.String("org", org), zap.String("reference", ref))
	}}
}

// heldAnswer is the answer of a new hold: the hold, and the account after.
type heldAnswer struct {
	meter.Hold
	Account meter.Account `json:"account"`
}

// endedAnswer is the answer of a capture or a release: the account after,
// and the hold.
type endedAnswer struct {
	meter.Account
	Hold meter.Hold `json:"hold"`
}

// headerReplayed marks an answer to a write that had been applied before:
// a repeated reference, capture or release.
const headerReplayed = "Idempotent-Replayed"

func (a *Admin) createHold(w http.ResponseWriter, r *http.Request, org string) error {
	var body struct {
		Amount    *int64  `json:"amount"`
		Feature   *string `json:"feature"`
		TTL       *string `json:"ttl"`
		Reference string  `json:"reference"`
	}
	if err := decodeBody(w, r, &body); err != nil {
		return invalid(err)
	}
	if body.Amount == nil || body.Feature == nil {
		return invalid(errors.New("amount and feature are required"))
	}
	req := meter.HoldRequest{Org: org, Feature: *body.Feature, Amount: *body.Amount, TTL: meter.DefaultHoldTTL}
	var err error
	if body.TTL != nil {
		if req.TTL, err = holdTTL(*body.TTL); err != nil {
			return invalid(err)
		}
	}
	var own bool
	if req.Reference, own, err = writeReference(r, body.Reference); err != nil {
		return invalid(err)
	}
	hold, acct, repeat, err := a.app.ledger.CreateHold(context.WithoutCancel(r.Context()), req)
	switch {
	case errors.Is(err, meter.ErrInsufficient):
		return writeProblem(w, r, policy.HoldShort(org, req.Feature, acct.Balance, acct.Available, req.Amount, a.app.TopUpURL))
	case err != nil:
		var void meter.Deferred
		if own {
			void = meter.LaterVoidHold{Ledger: a.app.ledger, Org: org, ID: meter.HoldID(req.Reference)}
		}
		return a.failWrite(w, r, org, "hold", req.Reference, void, err)
	}
	a.logger.Info("hold", zap.String("org", org), zap.String("hold", hold.ID), zap.String("feature", hold.Feature),
		zap.Int64("amount", req.Amount), zap.Duration("ttl", req.TTL), zap.String("reference", req.Reference), zap.Bool("repeat", repeat))
	status := http.StatusCreated
	if repeat && !own {
		status = http.StatusOK
		w.Header().Set(headerReplayed, "true")
	}
	return writeJSON(w, r, status, heldAnswer{Hold: hold, Account: acct})
}

// grantAnswer is the answer of a new grant: the grant (null when a
// repeated reference's grant is no longer kept), and the account after.
type grantAnswer struct {
	Grant   *meter.Grant  `json:"grant"`
	Account meter.Account `json:"account"`
}

// createGrant gives the org a promotional grant. Like a top-up, it is
// applied once per reference; a repeat answers the grant it made, 200.
func (a *Admin) createGrant(w http.ResponseWriter, r *http.Request, org string) error {
	var body struct {
		Amount    *int64  `json:"amount"`
		Kind      string  `json:"kind"`
		Expires   *string `json:"expires"`
		Effective *string `json:"effective"`
		Priority  *int    `json:"priority"`
		Reference string  `json:"reference"`
		Reason    string  `json:"reason"`
	}
	if err := decodeBody(w, r, &body); err != nil {
		return invalid(err)
	}
	if body.Amount == nil {
		return invalid(errors.New("amount is required"))
	}
	req := meter.GrantRequest{Amount: *body.Amount, Kind: body.Kind, Priority: body.Priority, Reason: body.Reason}
	var err error
	if req.Expires, err = optionalTime("expires", body.Expires); err != nil {
		return invalid(err)
	}
	if req.Effective, err = optionalTime("effective", body.Effective); err != nil {
		return invalid(err)
	}
	var own bool
	if req.Reference, own, err = writeReference(r, body.Reference); err != nil {
		return invalid(err)
	}
	// Checked before the call, so that a mistake is a 400 and never an
	// unknown outcome.
	if err := meter.ValidateGrant(req); err != nil {
		return invalid(err)
	}
	g, acct, applied, err := a.app.ledger.Grant(context.WithoutCancel(r.Context()), org, req)
	if err != nil {
		var void meter.Deferred
		if own {
			void = meter.LaterVoidGrant{Ledger: a.app.ledger, Org: org, Reference: req.Reference}
		}
		return a.failWrite(w, r, org, "grant", req.Reference, void, err)
	}
	a.logger.Info("grant", zap.String("org", org), zap.String("grant", g.ID), zap.Int64("amount", req.Amount),
		expiresField(req.Expires), zap.String("reference", req.Reference), zap.Bool("applied", applied))
	answer := grantAnswer{Account: acct}
	if g.ID != "" {
		answer.Grant = &g
	}
	status := http.StatusCreated
	if !applied && !own {
		status = http.StatusOK
		w.Header().Set(headerReplayed, "true")
	}
	return writeJSON(w, r, status, answer)
}

// grants answers the org's grants: {"grants": [...]}, live and pending in
// burn-down order, then those ended in the last 90 days.
func (a *Admin) grants(w http.ResponseWriter, r *http.Request, org string) error {
	grants, _, err := a.app.ledger.Grants(r.Context(), org)
	if err != nil {
		return a.fail(w, r, org, "grants", err)
	}
	if grants == nil {
		grants = []meter.Grant{}
	}
	return writeJSON(w, r, http.StatusOK, map[string][]meter.Grant{"grants": grants})
}

// voidGrant voids one of the org's grants, with an optional {"reason":
// "..."}: what remains of it is gone. A grant is voided once; a repeat
// answers the account.
func (a *Admin) voidGrant(w http.ResponseWriter, r *http.Request, org string) error {
	var body struct {
		Reason string `json:"reason"`
	}
	if err := decodeBody(w, r, &body); err != nil {
		return invalid(err)
	}
	if body.Reason != "" {
		if err := meter.ValidateReason(body.Reason); err != nil {
			return invalid(err)
		}
	}
	id := r.PathValue("id")
	acct, err := a.app.ledger.VoidGrant(context.WithoutCancel(r.Context()), org, id, body.Reason)
	switch {
	case errors.Is(err, meter.ErrGrantFixed) && id == meter.AllowanceGrant:
		return writeProblem(w, r, policy.Status(http.StatusConflict,
			"grant allowance is the plan's allowance: it is not voided; change the plan (PUT .../plan) instead"))
	case errors.Is(err, meter.ErrGrantFixed):
		return writeProblem(w, r, policy.Status(http.StatusConflict,
			"grant purchased is the org's purchased credits: it is not voided; take credits away with a negative adjustment (POST .../adjust) instead"))
	case errors.Is(err, meter.ErrGrantNotFound):
		return writeProblem(w, r, policy.Status(http.StatusNotFound, "org "+org+" has no grant "+id))
	case errors.Is(err, meter.ErrGrantEnded):
		return writeProblem(w, r, policy.Status(http.StatusConflict, "grant "+id+" was spent or has expired: there is nothing to void"))
	case err != nil:
		// The grant's id is the void's reference: a grant is voided once.
		return a.failWrite(w, r, org, "void", "", nil, err)
	}
	a.app.observe(org, acct.Balance)
	a.logger.Info("grant voided", zap.String("org", org), zap.String("grant", id), zap.String("reason", body.Reason))
	return writeJSON(w, r, http.StatusOK, acct)
}

// expiresField logs when credits expire: never, for the zero time.
func expiresField(t time.Time) zap.Field {
	if t.IsZero() {
		return zap.String("expires", "never")
	}
	return zap.Time("expires", t)
}

// optionalTime parses an optional RFC 3339 time of a body: the zero time
// when it is absent.
func optionalTime(field string, s *string) (time.Time, error) {
	if s == nil {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339, *s)
	if err != nil {
		return time.Time{}, &policy.InputError{Field: field, Value: *s, Reason: "must be a time in RFC 3339, such as 2027-01-31T00:00:00Z"}
	}
	return t, nil
}

// holdTTL parses the lifetime of a hold, a Go duration from
// meter.MinHoldTTL to meter.MaxHoldTTL. Unlike the ledger's zero, "0s" is
// an error here: the default is asked for by leaving ttl out.
func holdTTL(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil || d < meter.MinHoldTTL || d > meter.MaxHoldTTL {
		return 0, &policy.InputError{Field: "ttl", Value: s, Reason: "must be a duration from 1s to 24h, such as 15m"}
	}
	return d, nil
}

// writeReference is the reference of a write that takes one but does not
// require it: reference's, or else a fresh one of the gateway's own (own),
// which no client can send again, so a write of unknown outcome under it is
// voided.
func writeReference(r *http.Request, body string) (ref string, own bool, err error) {
	if ref, err = reference(r, body); err != nil || ref != "" {
		return ref, false, err
	}
	return meter.NewOwnReference(), true, nil
}

// reference is the body's reference of a write or, without one, the
// request's Idempotency-Key; empty when there is neither.
func reference(r *http.Request, ref string) (string, error) {
	if ref != "" {
		return ref, nil
	}
	key := r.Header.Get("Idempotency-Key")
	if key == "" {
		return "", nil
	}
	if err := policy.ValidateIdempotencyKey(key); err != nil {
		return "", err
	}
	return key, nil
}

func (a *Admin) holds(w http.ResponseWriter, r *http.Request, org string) error {
	holds, err := a.app.ledger.Holds(r.Context(), org)
	if err != nil {
		return a.fail(w, r, org, "holds", err)
	}
	if holds == nil {
		holds = []meter.Hold{}
	}
	return writeJSON(w, r, http.StatusOK, map[string][]meter.Hold{"holds": holds})
}

func (a *Admin) captureHold(w http.ResponseWriter, r *http.Request, org string) error {
	var body struct {
		Amount *int64 `json:"amount"`
	}
	if err := decodeBody(w, r, &body); err != nil {
		return invalid(err)
	}
	if body.Amount == nil {
		return invalid(errors.New("amount is required"))
	}
	id := r.PathValue("id")
	hold, acct, repeat, err := a.app.ledger.CaptureHold(context.WithoutCancel(r.Context()), org, id, *body.Amount)
	if err != nil {
		return a.failHold(w, r, org, id, "capture", hold, err)
	}
	a.logger.Info("capture", zap.String("org", org), zap.String("hold", id), zap.Int64("amount", *body.Amount), zap.Bool("repeat", repeat))
	if repeat {
		w.Header().Set(headerReplayed, "true")
	}
	a.app.observe(org, acct.Balance)
	return writeJSON(w, r, http.StatusOK, endedAnswer{Account: acct, Hold: hold})
}

func (a *Admin) releaseHold(w http.ResponseWriter, r *http.Request, org string) error {
	// A gateway's lease is released only by an operator who knows the
	// gateway is gone, and only once it is unreported.
	var body struct {
		GatewayGone bool   `json:"gateway_gone"`
		Reason      string `json:"reason"`
	}
	if err := decodeBody(w, r, &body); err != nil {
		return invalid(err)
	}
	id := r.PathValue("id")
	var (
		hold   meter.Hold
		acct   meter.Account
		repeat bool
		err    error
	)
	ctx := context.WithoutCancel(r.Context())
	switch {
	case body.GatewayGone:
		hold, acct, repeat, err = a.app.ledger.ReleaseLease(ctx, org, id, body.Reason)
	case body.Reason != "":
		return invalid(errors.New("reason is for a lease released with gateway_gone"))
	default:
		hold, acct, repeat, err = a.app.ledger.ReleaseHold(ctx, org, id)
	}
	if err != nil {
		return a.failHold(w, r, org, id, "release", hold, err)
	}
	a.logger.Info("release", zap.String("org", org), zap.String("hold", id), zap.String("state", hold.State), zap.Bool("repeat", repeat))
	if repeat {
		w.Header().Set(headerReplayed, "true")
	}
	return writeJSON(w, r, http.StatusOK, endedAnswer{Account: acct, Hold: hold})
}

// failHold answers the error of a capture or a release of hold id: 404 for
// a hold the org does not have, 409 for one that ended the other way.
func (a *Admin) failHold(w http.ResponseWriter, r *http.Request, org, id, call string, hold meter.Hold, err error) error {
	switch {
	case errors.Is(err, meter.ErrHoldNotFound):
		return writeProblem(w, r, policy.Status(http.StatusNotFound, "org "+org+" has no hold "+id))
	case errors.Is(err, meter.ErrLease) && hold.State == meter.HoldUnreported && call == "release":
		return writeProblem(w, r, policy.Status(http.StatusConflict, fmt.Sprintf(
			"hold %s is a gateway's unreported lease: release it with {\"gateway_gone\": true, \"reason\": \"...\"} once you know its gateway is gone", id)))
	case errors.Is(err, meter.ErrLease):
		return writeProblem(w, r, policy.Status(http.StatusConflict, fmt.Sprintf(
			"hold %s is a gateway's lease (%s): only its gateway can %s it", id, hold.State, call)))
	case errors.Is(err, meter.ErrNotLease):
		return invalid(fmt.Errorf("hold %s is not a gateway's lease: gateway_gone is for leases", id))
	case errors.Is(err, meter.ErrHoldEnded):
		return writeProblem(w, r, policy.Status(http.StatusConflict, fmt.Sprintf("hold %s was %s: it cannot be %s", id, hold.State, map[string]string{"capture": "captured", "release": "released"}[call])))
	}
	// The hold's id is the reference of its capture and its release: a
	// hold ends once.
	return a.failWrite(w, r, org, call, "", nil, err)
}

// failWrite answers the error of a write of reference ref. When its outcome
// is unknown (it may have reached Redis), the answer is a 503 that says
// what became of it. With the caller's reference (void nil), the outcome
// is unknown, and the same write sent again with the same reference applies
// once. With the gateway's own, void is queued: it makes sure the write
// never stands, so it may be sent again. A capture or a release (ref empty)
// names its hold, which ends once.
func (a *Admin) failWrite(w http.ResponseWriter, r *http.Request, org, call, ref string, void meter.Deferred, err error) error {
	if !unknownOutcome(err) {
		return a.fail(w, r, org, call, err)
	}
	a.app.metrics.storeErrors.Inc()
	var detail string
	switch {
	case ref == "":
		once := "a hold ends once"
		if call == "void" {
			once = "a grant is voided once"
		}
		detail = fmt.Sprintf("The credit store did not answer in time, so whether the %s was applied is unknown. "+
			"Send the same %s again: %s, and a repeat answers its result.", call, call, once)
	case void == nil:
		detail = fmt.Sprintf("The credit store did not answer in time, so whether the %s was applied is unknown. "+
			"Send the same %s again with the same reference, %q: it applies exactly once and answers its result.", call, call, ref)
	case a.app.store.later(void):
		detail = fmt.Sprintf("The credit store did not answer in time. The %s was not applied: the gateway voids it, so that it never applies later. "+
			"It may be sent again; with a reference (the body's reference, or an Idempotency-Key), a retry applies exactly once.", call)
		if call == "plan" || call == "recharge" {
			detail += fmt.Sprintf(" (Should the %s have applied and a call have been charged before the void, it stands: the org's events say so.)", call)
		}
	default:
		a.logger.Error("could not queue the void of a write with an unknown outcome; the backlog is full",
			zap.String("org", org), zap.String("call", call), zap.String("reference", ref))
		detail = fmt.Sprintf("The credit store did not answer in time, so whether the %s was applied is unknown, and the gateway could not void it. "+
			"Read the account before sending it again.", call)
	}
	a.logger.Error("admin write of unknown outcome", zap.String("org", org), zap.String("call", call),
		zap.String("reference", ref), zap.Bool("voided", void != nil), zap.Error(err))
	w.Header().Set("Retry-After", "1")
	return writeProblem(w, r, &policy.Problem{Type: policy.TypeStoreUnavailable, Title: "Credit store unavailable",
		Status: http.StatusServiceUnavailable, Detail: detail, Org: org})
}

// fail answers the error of a ledger call: 400 for bad input, 409 for an
// org with as many grants as it may have, 404 for an org Redis holds
// nothing for, 500 for an org's corrupt ledger data (a key
// of the wrong type, a field that is not a number: a retry cannot help; an
// operator must look), else 503 with Retry-After: the store could not do it
// now (down, slow, out of memory), as meter.Classify says.
func (a *Admin) fail(w http.ResponseWriter, r *http.Request, org, call string, err error) error {
	var inputErr *policy.InputError
	switch {
	case errors.As(err, &inputErr), errors.Is(err, policy.ErrOrgMissing), errors.Is(err, meter.ErrPurchasedLimit),
		errors.Is(err, meter.ErrExpiresPast):
		return invalid(err)
	case errors.Is(err, meter.ErrGrantsFull):
		return writeProblem(w, r, policy.Status(http.StatusConflict, fmt.Sprintf(
			"org %s has %d grants live or pending, the most it may: void one, or wait for one to be spent or to expire", org, meter.MaxGrants)))
	case errors.Is(err, meter.ErrNotFound):
		return writeProblem(w, r, policy.Status(http.StatusNotFound, "Redis holds nothing for org "+org))
	case meter.Classify(err) == meter.Refused:
		// A refusal the call's own handler did not answer: a retry gets
		// it again.
		a.logger.Error("admin call refused by the ledger", zap.String("org", org), zap.String("call", call), zap.Error(err))
		return writeProblem(w, r, policy.Status(http.StatusInternalServerError, "the ledger refused this call: "+err.Error()))
	case meter.Classify(err) == meter.Corrupt:
		a.app.metrics.storeErrors.Inc()
		a.logger.Error("admin call found corrupt ledger data", zap.String("org", org), zap.String("call", call), zap.Error(err))
		detail := "the ledger's data of org " + org + " is corrupt; nothing was written"
		if errors.Is(err, meter.ErrWrongType) {
			detail = "the ledger's data of org " + org + " is of the wrong type; nothing was written"
		}
		return writeProblem(w, r, policy.Status(http.StatusInternalServerError, detail))
	}
	a.app.metrics.storeErrors.Inc()
	a.outage.Error("admin call failed: the store could not do it now", zap.String("org", org), zap.String("call", call), zap.Error(err))
	w.Header().Set("Retry-After", "1")
	return writeProblem(w, r, policy.Unavailable())
}

// openAPIDocument is the OpenAPI 3.1 document of the admin API. The tests
// check every admin answer they see against it, so it stays the API's.
//
//go:embed openapi.json
var openAPIDocument []byte

// openAPI answers the OpenAPI document, for a billing team to generate a
// client with; it holds no data, so it needs no token.
func (a *Admin) openAPI(w http.ResponseWriter, r *http.Request) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return nil
	}
	_, err := w.Write(openAPIDocument)
	return err
}

// health answers 200 when the store answers within the timeout, else 503:
// for load balancers and readiness probes.
func (a *Admin) health(w http.ResponseWriter, r *http.Request) error {
	if err := a.app.ledger.Ping(r.Context()); err != nil {
		a.outage.Warn("health check: the store did not answer", zap.Error(err))
		w.Header().Set("Retry-After", "1")
		return writeProblem(w, r, policy.Unavailable())
	}
	return writeJSON(w, r, http.StatusOK, map[string]string{"status": "ok"})
}

// unknownOutcome reports whether a ledger write's error leaves unknown
// whether it was applied: it may have reached Redis and changed something
// (Redis refused none of it), and was no answer of the ledger's.
func unknownOutcome(err error) bool {
	return !meter.Unsent(err) && !meter.Permanent(err)
}

// writeJSON answers v as JSON with status; a HEAD gets the headers only.
func writeJSON(w http.ResponseWriter, r *http.Request, status int, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if r.Method == http.MethodHead {
		return nil
	}
	_, err = w.Write(append(body, '\n'))
	return err
}

// needsNoToken reports whether r is a call that needs no token: the health probe
// and the OpenAPI document.
func needsNoToken(r *http.Request) bool {
	return r.URL.Path == "/health" || r.URL.Path == "/openapi.json"
}

// authorized finds the name of the call's bearer token. It compares the
// token with every one in constant time, with no early exit: both sides are
// hashed first, so neither the length nor a prefix leaks, and the time
// taken does not tell which token matched.
func (a *Admin) authorized(r *http.Request) (name string, ok bool) {
	auth := r.Header.Get("Authorization")
	const scheme = "Bearer "
	if len(auth) < len(scheme) || !strings.EqualFold(auth[:len(scheme)], scheme) {
		return "", false
	}
	got := sha256.Sum256([]byte(auth[len(scheme):]))
	found, at := 0, 0
	for i, k := range a.keys {
		eq := subtle.ConstantTimeCompare(got[:], k.hash[:])
		at = subtle.ConstantTimeSelect(eq, i, at)
		found |= eq
	}
	if found == 0 {
		return "", false
	}
	return a.keys[at].name, true
}

// headerBytes is about how large a request's header block was.
func headerBytes(h http.Header) int {
	n := 0
	for k, vs := range h {
		for _, v := range vs {
			n += len(k) + len(v) + 4
		}
	}
	return n
}

// decodeBody reads one JSON object into the struct v points to, strictly:
// unknown fields, names that match a field's only without case, a key given
// twice in any object, trailing data and bodies over 64 KiB are errors. An
// empty body is an empty object.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxAdminBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return fmt.Errorf("body larger than %d bytes", maxAdminBody)
		}
		return fmt.Errorf("reading body: %w", err)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		data = []byte("{}")
	}
	// encoding/json matches names without case and keeps the last of two
	// equal keys: the keys are checked first, exactly.
	if err := exactKeys(data, v); err != nil {
		return fmt.Errorf("bad JSON body: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("bad JSON body: %w", err)
	}
	if dec.More() {
		return errors.New("bad JSON body: more than one value")
	}
	return nil
}

// exactKeys checks the keys of a JSON body: no object has a key twice, and
// each key of the top object is the JSON name of a field of the struct v
// points to, case included. Malformed JSON is left to the decoder to
// report.
func exactKeys(data []byte, v any) error {
	names := jsonNames(v)
	type object struct {
		seen    map[string]bool
		wantKey bool
	}
	var stack []*object // nil for an array
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	for {
		tok, err := dec.Token()
		if err != nil {
			return nil
		}
		var top *object
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		if key, ok := tok.(string); ok && top != nil && top.wantKey {
			if top.seen[key] {
				return fmt.Errorf("field %q given twice", key)
			}
			top.seen[key] = true
			top.wantKey = false
			if len(stack) == 1 && !names[key] {
				return unknownField(key, names)
			}
			continue
		}
		if d, ok := tok.(json.Delim); ok && (d == '}' || d == ']') {
			stack = stack[:len(stack)-1]
			continue
		}
		// A value: in an object, a key comes next.
		if top != nil {
			top.wantKey = true
		}
		switch tok {
		case json.Delim('{'):
			stack = append(stack, &object{seen: map[string]bool{}, wantKey: true})
		case json.Delim('['):
			stack = append(stack, nil)
		}
	}
}

// unknownField is the error of a key the call does not take.
func unknownField(key string, names map[string]bool) error {
	for name := range names {
		if strings.EqualFold(name, key) {
			return fmt.Errorf("unknown field %q: names match exactly, case included; did you mean %q?", key, name)
		}
	}
	return fmt.Errorf("unknown field %q", key)
}

// jsonNames is the set of JSON names of the fields of the struct v points
// to.
func jsonNames(v any) map[string]bool {
	names := map[string]bool{}
	t := reflect.TypeOf(v)
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return names
	}
	for f := range t.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		names[name] = true
	}
	return names
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Admin)(nil)
	_ caddyhttp.MiddlewareHandler = (*Admin)(nil)
)
