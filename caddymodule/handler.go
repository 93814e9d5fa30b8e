package caddymodule

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
	"github.com/creditsgw/caddy-credits/usage"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Handler meters each request against an org's credits: it pays for the
// call before it goes on, refuses it when the credits are gone (as the route
// says), and settles the payment from the response: a refund when the
// upstream fails, the upstream's Credits-Usage when it sets one.
type Handler struct {
	// Org is the org to charge; placeholders are allowed, e.g.
	// {http.request.header.X-Org-Id}. Take it from an authenticated source.
	Org string `json:"org"`
	// Feature is the usage label, e.g. rich-text or background-removal.
	Feature string `json:"feature"`
	// Cost is the credits a call costs: an integer from 1 to 1000000, or a
	// placeholder that yields one. Default 1.
	Cost string `json:"cost,omitempty"`
	// OnExhausted is what a call gets when the credits are gone: block (a
	// 402 error), notice (a 402 with Credits-Notice: exhausted, for a UI to
	// show) or overdraft (forwarded; the balance goes below zero). Default
	// block.
	OnExhausted string `json:"on_exhausted,omitempty"`
	// OverdraftLimit, on overdraft routes, is the deepest the balance may
	// go: 500 lets it reach -500. Default: no limit.
	OverdraftLimit *int64 `json:"overdraft_limit,omitempty"`
	// LowBalance, on notice routes, adds Credits-Notice: low while the
	// balance after a charge is below it.
	LowBalance int64 `json:"low_balance,omitempty"`
	// FailMode is what a call gets when the store does not answer in time:
	// closed (503) or open (forwarded, charged once the store answers).
	// Default closed, open on overdraft routes.
	FailMode string `json:"fail_mode,omitempty"`
	// Usage is where a call's real cost comes from: header (the upstream's
	// Credits-Usage header or trailer), openai (the usage object of an
	// OpenAI-style JSON answer or of the stream's event that carries it)
	// or anthropic (the usage of Anthropic's message events). With openai
	// or anthropic, Cost is what the call holds before it goes upstream,
	// and what it is charged when the answer reports no usage. Default
	// header.
	Usage string `json:"usage,omitempty"`
	// Prices, with usage openai or anthropic, price the tokens an answer
	// reports: credits per 1,000,000 input and output tokens for models
	// matching a glob; the first match wins. A model with no price is
	// charged Cost.
	Prices []policy.Price `json:"prices,omitempty"`
	// Budget, when set, names whose budget in the org each call also
	// counts against: a user, an API key, a team. Placeholders are
	// allowed, e.g. {http.request.header.X-User-Id}; take it from an
	// authenticated source. A subject with no budget of its own and no
	// default budget in the org has no limit.
	Budget string `json:"budget,omitempty"`

	app       *App
	route     policy.Route
	org       placeholder
	costValue placeholder
	subject   placeholder
	logger    *zap.Logger
	usageLog  *zap.Logger
	outcomes  [policy.NumOutcomes]prometheus.Counter
	charged   prometheus.Counter
	via       ledgerAccess // what this route's payments settle through
}

// placeholder is a setting that may hold placeholders. The common case, a
// whole request header such as {http.request.header.X-Org-Id}, is read
// without the replacer.
type placeholder struct {
	text   string
	header string // canonical header name, when text is exactly one
}

func newPlaceholder(text string) placeholder {
	p := placeholder{text: text}
	if name, ok := strings.CutPrefix(text, "{http.request.header."); ok && strings.HasSuffix(name, "}") {
		name = strings.TrimSuffix(name, "}")
		if name != "" && !strings.ContainsAny(name, "{}:") {
			p.header = textproto.CanonicalMIMEHeaderKey(name)
		}
	}
	return p
}

func (p placeholder) value(r *http.Request) string {
	if p.header != "" {
		return headerValue(r.Header, p.header)
	}
	repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	return repl.ReplaceAll(p.text, "")
}

// headerValue is h.Get(name) for a name already in canonical form.
func headerValue(h http.Header, name string) string {
	if v := h[name]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// count counts a call's outcome.
func (h *Handler) count(o policy.Outcome) { h.outcomes[o].Inc() }

// UsageLogger is the name of the usage log's logger: one line per metered
// call, at debug level, so that only a log that includes it pays for it.
const UsageLogger = "http.handlers.credits.usage"

// usageLogged reports whether a log takes the usage log's lines, so that
// the request path reads nothing for a line no log takes.
func (h *Handler) usageLogged() bool { return h.usageLog.Core().Enabled(zap.DebugLevel) }

// logUsage writes a metered call's line of the usage log: the org, the
// feature, the route's cost, the credits charged, the request id (for a
// call paid by a charge), how it was paid and its outcome.
func (h *Handler) logUsage(o policy.Outcome, org string, cost, charged int64, requestID, paid string) {
	ce := h.usageLog.Check(zap.DebugLevel, "metered call")
	if ce == nil {
		return
	}
	ce.Write(zap.String("org", org), zap.String("feature", h.Feature), zap.Int64("cost", cost),
		zap.Int64("charged", charged), zap.String("request_id", requestID), zap.String("paid", paid),
		zap.String("outcome", o.String()))
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.credits",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision checks the route's settings and finds the credits app.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	h.usageLog = h.logger.Named("usage")
	app, err := appFrom(ctx)
	if err != nil {
		return err
	}
	h.app = app
	// An outage repeats the same few lines call after call: paced.
	h.logger = app.quiet.logger(h.logger)
	settings := h.settings()
	settings.TopUpURL = app.TopUpURL
	h.route, err = policy.NewRoute(settings)
	if err != nil {
		return fmt.Errorf("credits: %w", err)
	}
	h.org, h.costValue, h.subject = newPlaceholder(h.Org), newPlaceholder(h.Cost), newPlaceholder(h.Budget)
	for o := range h.outcomes {
		h.outcomes[o] = app.metrics.requests.WithLabelValues(h.Feature, policy.Outcome(o).String())
	}
	h.charged = app.metrics.charged.WithLabelValues(h.Feature)
	h.via = ledgerAccess{ledger: app.ledger, later: app.store.later, logger: h.logger, observe: app.metrics.observeStore}
	return nil
}

// settings are the route's settings, for policy.NewRoute to check.
func (h *Handler) settings() policy.RouteSettings {
	return policy.RouteSettings{Feature: h.Feature, Cost: h.Cost, OnExhausted: h.OnExhausted,
		OverdraftLimit: h.OverdraftLimit, LowBalance: h.LowBalance, FailMode: h.FailMode,
		Usage: h.Usage, Prices: h.Prices}
}

// Validate checks what Provision could not: an org to charge, and a
// budget's subject when it is written out.
func (h *Handler) Validate() error {
	if err := checkOrg(h.Org); err != nil {
		return fmt.Errorf("credits: %w", err)
	}
	if err := checkSubject(h.Budget); err != nil {
		return fmt.Errorf("credits: %w", err)
	}
	return nil
}

// checkSubject checks a budget's subject when it is written out (one with
// a placeholder is checked on each request).
func checkSubject(subject string) error {
	if subject == "" || policy.HasPlaceholder(subject) {
		return nil
	}
	return policy.ValidateSubject(subject)
}

// errOrgRequired is the error of a handler with no org.
var errOrgRequired = &settingError{fields: []string{"org"}, msg: "org is required"}

// checkOrg checks a handler's org: required, and valid when it is written
// out (one with a placeholder is checked on each request).
func checkOrg(org string) error {
	if org == "" {
		return errOrgRequired
	}
	if policy.HasPlaceholder(org) {
		return nil
	}
	return policy.ValidateOrg(org)
}

// call is one metered call, resolved from its request.
type call struct {
	org  string
	cost int64
	// key is the call's Idempotency-Key, or empty.
	key string
	// subject is whose budget the call counts against, or empty.
	subject string
}

// ServeHTTP resolves the call, obtains one payment for it (or an answer
// that needs no upstream call), and passes it on through the one writer
// that settles the payment.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	stripCreditsHeaders(r.Header)
	if headerValue(r.Header, "Origin") != "" {
		w.Header().Add("Access-Control-Expose-Headers", policy.ExposeHeaders)
	}
	if policy.IsPreflight(r.Method, r.Header) {
		// A browser sends no credentials with a preflight: it names no
		// org, and the call it asks about pays for itself.
		h.count(policy.Preflight)
		return next.ServeHTTP(w, r)
	}
	c, o, p := h.resolve(r)
	if p != nil {
		return h.refuse(w, r, o, p)
	}
	cw := newCreditsWriter(w, h, c)
	pay, ans := h.pay(r, c, &cw.kinds)
	if ans != nil {
		return ans(w, r)
	}
	cw.pay = pay
	if h.route.Usage != nil {
		cw.model = peekModel(r)
	}
	return cw.serve(next, r)
}

// maxPeek is the most of a request body read for the model it names.
const maxPeek = 64 << 10

// peekModel returns the model a JSON request body names, reading at most
// maxPeek bytes of it and leaving the body whole for the upstream.
func peekModel(r *http.Request) string {
	if r.Body == nil || r.Body == http.NoBody {
		return ""
	}
	buf := make([]byte, maxPeek)
	n, _ := io.ReadFull(r.Body, buf)
	buf = buf[:n]
	r.Body = struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(buf), r.Body), r.Body}
	if n == maxPeek {
		return ""
	}
	return usage.ModelOf(buf)
}

// resolve reads the call's org, cost and Idempotency-Key, or the problem
// with them.
func (h *Handler) resolve(r *http.Request) (call, policy.Outcome, *policy.Problem) {
	c := call{org: h.org.value(r), cost: h.route.Cost}
	if err := policy.ValidateOrg(c.org); err != nil {
		if errors.Is(err, policy.ErrOrgMissing) {
			return call{}, policy.Unauthenticated, policy.OrgMissing()
		}
		return call{}, policy.BadInput, policy.Invalid(err)
	}
	if h.Budget != "" {
		c.subject = h.subject.value(r)
		if err := policy.ValidateSubject(c.subject); err != nil {
			if errors.Is(err, policy.ErrSubjectMissing) {
				return call{}, policy.Unauthenticated, policy.SubjectMissing()
			}
			return call{}, policy.BadInput, policy.Invalid(err)
		}
	}
	if c.cost == 0 {
		var err error
		if c.cost, err = policy.ParseCost(h.costValue.value(r)); err != nil {
			return call{}, policy.BadInput, policy.Invalid(err)
		}
	}
	if c.key = headerValue(r.Header, "Idempotency-Key"); c.key != "" {
		if err := policy.ValidateIdempotencyKey(c.key); err != nil {
			return call{}, policy.BadInput, policy.Invalid(err)
		}
	}
	return c, 0, nil
}

// answer writes a response that needs no upstream call.
type answer func(http.ResponseWriter, *http.Request) error

// pay obtains the call's payment: from this gateway's lease, by a charge,
// or, on a fail_mode open route whose store does not answer, deferred to
// the backlog. Where the call must not go upstream (refused, a replay of a
// completed call, a key in flight, the store down) it returns the answer
// instead. The payment is one of into's, so that it costs no allocation of
// its own.
func (h *Handler) pay(r *http.Request, c call, into *payments) (payment, answer) {
	var storeErr error
	// A lease pays for the org's credits and, for a call with a subject,
	// from its share of the subject's budget: the ledger set both aside for
	// it, so neither is overspent.
	if ls := h.app.leaser; ls != nil && c.key == "" {
		rc, ok, err := ls.SpendAs(c.org, c.subject, h.Feature, c.cost)
		if ok {
			into.leased = leasedPayment{leaser: ls, org: c.org, feature: h.Feature, cost: c.cost, receipt: rc}
			if rc.Budgeted {
				into.budgetVal = rc.BudgetRemaining
				into.budgetLeft = &into.budgetVal
			}
			return &into.leased, nil
		}
		storeErr = err
	}

	// The attempt id tells this call apart from a client's retry of it with
	// the same Idempotency-Key.
	attempt := meter.NewRequestID()
	charge := meter.ChargeRequest{
		Org: c.org, Feature: h.Feature, Cost: c.cost, RequestID: "g:" + attempt, Attempt: attempt,
		Overdraft: h.route.Mode == policy.Overdraft, OverdraftLimit: h.route.OverdraftLimit, Subject: c.subject,
	}
	if c.key != "" {
		charge.RequestID = "i:" + c.key
		charge.Binding = meter.Binding(r.Method, r.URL.Path, h.Feature, c.cost)
	}
	if storeErr != nil {
		// The lease needed the store and it did not answer in time: the
		// call is answered as when a charge does not get through.
		h.app.metrics.storeErrors.Inc()
		if meter.Permanent(storeErr) {
			return nil, h.broken(charge, storeErr)
		}
		return h.storeDown(charge, storeErr, into)
	}

	// The client going away must not cut a charge or a settle in half: the
	// store calls run to their own deadline.
	ctx := context.WithoutCancel(r.Context())
	start := time.Now()
	res, err := h.app.ledger.Charge(ctx, charge)
	h.app.metrics.observeStore(start, err)
	switch {
	case errors.Is(err, meter.ErrInFlight):
		return nil, h.conflict(policy.InFlight, policy.KeyInFlight())
	case errors.Is(err, meter.ErrMismatch):
		return nil, h.conflict(policy.KeyMismatch, policy.KeyMismatched())
	case meter.Permanent(err):
		return nil, h.broken(charge, err)
	case err != nil:
		return h.storeDown(charge, err, into)
	case res.Replay && res.Kept == nil:
		return nil, h.conflict(policy.Replayed, policy.KeyNotKept())
	case res.Replay:
		return nil, h.replay(res)
	}
	answer := policy.Answer{Charged: res.Charged, Balance: res.Balance, Cost: c.cost, OverBudget: res.OverBudget}
	if res.Budget != nil {
		answer.Budget = &policy.Budget{Subject: c.subject, Limit: res.Budget.Limit, Spent: res.Budget.Spent,
			Resets: res.Budget.Resets}
	}
	d := policy.Decide(h.route, c.org, answer)
	if !d.Forward {
		h.app.observe(c.org, res.Balance)
		return nil, func(w http.ResponseWriter, r *http.Request) error {
			setCreditsHeaders(w.Header(), d, nil)
			return h.refuse(w, r, d.Outcome, d.Problem)
		}
	}
	into.charged = chargedPayment{via: &h.via, ctx: ctx, org: c.org, requestID: charge.RequestID, attempt: attempt,
		cost: c.cost, balance: res.Balance, keyed: c.key != ""}
	into.budgetLeft = d.BudgetRemaining
	return &into.charged, nil
}

// broken answers a call whose charge failed for a reason no retry cures
// (the org's ledger data is corrupt): 500, not forwarded on any fail_mode,
// since no later charge could bill it. The script wrote nothing.
func (h *Handler) broken(charge meter.ChargeRequest, err error) answer {
	h.logger.Error("the org's ledger data cannot be used; refusing the call", zap.String("org", charge.Org),
		zap.String("feature", h.Feature), zap.String("request_id", charge.RequestID),
		zap.Stringer("class", meter.Classify(err)), zap.Error(err))
	return func(w http.ResponseWriter, r *http.Request) error {
		return h.refuse(w, r, policy.StoreDown, policy.Status(http.StatusInternalServerError,
			"the credit ledger's data of org "+charge.Org+" cannot be used; nothing was charged, and a retry cannot help until an operator fixes it"))
	}
}

// storeDown pays for a call whose charge the store did not take: when
// failing open, the call goes on and its charge waits in the backlog; when
// failing closed, it is answered 503.
func (h *Handler) storeDown(charge meter.ChargeRequest, err error, into *payments) (payment, answer) {
	// A call with an Idempotency-Key is never forwarded blind: whether its
	// key is free, in flight or answered is in Redis, and a key must never
	// reach the upstream twice for one charge.
	if h.route.FailOpen && charge.Binding == "" {
		charge.Overdraft, charge.OverdraftLimit = true, meter.NoLimit
		later := meter.LaterCharge{Ledger: h.app.ledger, Charge: charge}
		if !meter.Unsent(err) {
			later.Sent = time.Now()
		}
		if h.app.store.later(later) {
			h.app.metrics.unmetered.Inc()
			h.logger.Warn("store could not take the charge now; forwarding and charging later",
				zap.String("feature", h.Feature), zap.String("request_id", charge.RequestID), zap.Error(err))
			into.deferred = deferredPayment{via: &h.via, charge: charge}
			return &into.deferred, nil
		}
		h.logger.Error("store did not answer and the fail-open backlog is full; refusing", zap.String("feature", h.Feature))
	} else {
		h.logger.Warn("store could not take the charge now; refusing", zap.String("feature", h.Feature), zap.Error(err))
	}
	// The charge may have run even so (a lost reply, a timeout after Redis
	// took it): void it, so a refused call is never left charged.
	if !meter.Unsent(err) && !h.app.store.later(meter.LaterVoid{Ledger: h.app.ledger, Org: charge.Org, RequestID: charge.RequestID, Attempt: charge.Attempt}) {
		h.logger.Error("could not queue the void of a charge with an unknown outcome; the backlog is full",
			zap.String("request_id", charge.RequestID))
	}
	return nil, func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Retry-After", "1")
		return h.refuse(w, r, policy.StoreDown, policy.Unavailable())
	}
}

// conflict answers a call whose Idempotency-Key cannot be used now.
func (h *Handler) conflict(o policy.Outcome, p *policy.Problem) answer {
	return func(w http.ResponseWriter, r *http.Request) error {
		if p.Status == http.StatusConflict {
			w.Header().Set("Retry-After", "1")
		}
		return h.refuse(w, r, o, p)
	}
}

// replay answers a call whose Idempotency-Key's first call completed: its
// kept response, without an upstream call.
func (h *Handler) replay(res meter.ChargeResult) answer {
	return func(w http.ResponseWriter, r *http.Request) error {
		kept, err := parseKept(res.Kept)
		if err != nil {
			h.logger.Error("a kept response does not parse", zap.String("request_id", res.RequestID), zap.Error(err))
			return h.refuse(w, r, policy.Replayed, policy.KeyNotKept())
		}
		h.count(policy.Replayed)
		if h.usageLogged() {
			h.logUsage(policy.Replayed, h.org.value(r), res.Cost, 0, res.RequestID, "replay")
		}
		hdr := w.Header()
		for k, v := range kept.header {
			hdr[k] = v
		}
		hdr.Set(policy.HeaderReplayed, "true")
		setCreditsHeaders(hdr, policy.Decision{Remaining: res.Balance}, nil)
		w.WriteHeader(kept.status)
		if r.Method == http.MethodHead {
			return nil
		}
		_, err = w.Write(kept.body)
		return err
	}
}

// refuse answers a call the gateway does not forward.
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, o policy.Outcome, p *policy.Problem) error {
	h.count(o)
	if o != policy.BadInput && o != policy.Unauthenticated && h.usageLogged() {
		// A call without a valid org or cost is no metered call.
		cost := h.route.Cost
		if p.Cost != nil {
			cost = *p.Cost
		}
		h.logUsage(o, h.org.value(r), cost, 0, "", "refused")
	}
	if p.Feature == "" && p.Status != http.StatusUnauthorized && p.Status != http.StatusBadRequest {
		p.Feature = h.Feature
	}
	return writeProblem(w, r, p)
}

// writeProblem answers with an RFC 9457 problem, or, where the site has
// handle_errors, returns it as a caddyhttp.Error with its fields in
// {credits.problem.*} placeholders so the site can restyle it.
func writeProblem(w http.ResponseWriter, r *http.Request, p *policy.Problem) error {
	if srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && srv.Errors != nil && len(srv.Errors.Routes) > 0 {
		if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
			repl.Set("credits.problem.type", p.Type)
			repl.Set("credits.problem.title", p.Title)
			repl.Set("credits.problem.status", p.Status)
			repl.Set("credits.problem.detail", p.Detail)
			repl.Set("credits.problem.org", p.Org)
			repl.Set("credits.problem.feature", p.Feature)
			repl.Set("credits.problem.topup_url", p.TopUpURL)
			if p.Balance != nil {
				repl.Set("credits.problem.balance", *p.Balance)
			}
			if p.Cost != nil {
				repl.Set("credits.problem.cost", *p.Cost)
			}
			repl.Set("credits.problem.json", string(p.JSON()))
		}
		return caddyhttp.Error(p.Status, errors.New(p.Detail))
	}
	w.Header().Set("Content-Type", policy.ContentTypeProblem)
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(p.Status)
	_, err := w.Write(p.JSON())
	return err
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
