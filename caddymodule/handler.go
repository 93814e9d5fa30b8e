package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Handler meters each request against an org's credits: it charges before
// the request goes on, refuses it when the credits are gone (as the route
// says), and settles the charge from the response: a refund when the
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

	app       *App
	route     policy.Route
	cost      int64
	org       placeholder
	costValue placeholder
	failOpen  bool
	logger    *zap.Logger
	outcomes  map[string]prometheus.Counter
	charged   prometheus.Counter
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
func (h *Handler) count(outcome string) {
	if c, ok := h.outcomes[outcome]; ok {
		c.Inc()
		return
	}
	h.app.metrics.requests.WithLabelValues(h.Feature, outcome).Inc()
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.credits",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision parses the route's settings and finds the credits app.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	mode := policy.Block
	if h.OnExhausted != "" {
		var err error
		if mode, err = policy.ParseMode(h.OnExhausted); err != nil {
			return err
		}
	}
	limit := int64(meter.NoLimit)
	if h.OverdraftLimit != nil {
		limit = *h.OverdraftLimit
	}
	if h.Cost == "" {
		h.cost = 1
	} else if !containsPlaceholder(h.Cost) {
		var err error
		if h.cost, err = policy.ParseCost(h.Cost); err != nil {
			return err
		}
	}
	switch h.FailMode {
	case "":
		h.failOpen = mode == policy.Overdraft
	case "open":
		h.failOpen = true
	case "closed":
	default:
		return fmt.Errorf("fail_mode %q: must be open or closed", h.FailMode)
	}
	app, err := appFrom(ctx)
	if err != nil {
		return err
	}
	h.app = app
	h.org, h.costValue = newPlaceholder(h.Org), newPlaceholder(h.Cost)
	h.outcomes = make(map[string]prometheus.Counter)
	for _, o := range []string{"forwarded", "low", "overdraft", "blocked", "notice", "refunded", "replay", "unmetered", "unavailable", "invalid", "unauthenticated"} {
		h.outcomes[o] = app.metrics.requests.WithLabelValues(h.Feature, o)
	}
	h.charged = app.metrics.charged.WithLabelValues(h.Feature)
	h.route = policy.Route{Feature: h.Feature, Mode: mode, OverdraftLimit: limit, LowBalance: h.LowBalance, TopUpURL: app.TopUpURL}
	return nil
}

// Validate checks the settings against each other.
func (h *Handler) Validate() error {
	if h.Org == "" {
		return errors.New("credits: org is required")
	}
	if err := policy.ValidateFeature(h.Feature); err != nil {
		return fmt.Errorf("credits: %w", err)
	}
	if h.OverdraftLimit != nil {
		if h.route.Mode != policy.Overdraft {
			return errors.New("credits: overdraft_limit needs on_exhausted overdraft")
		}
		if *h.OverdraftLimit < 0 || *h.OverdraftLimit > meter.MaxAmount {
			return fmt.Errorf("credits: overdraft_limit %d: must be 0 to %d", *h.OverdraftLimit, int64(meter.MaxAmount))
		}
	}
	if h.LowBalance != 0 {
		if h.route.Mode != policy.Notice {
			return errors.New("credits: low_balance needs on_exhausted notice")
		}
		if h.LowBalance < 0 || h.LowBalance > meter.MaxAmount {
			return fmt.Errorf("credits: low_balance %d: must be 1 to %d", h.LowBalance, int64(meter.MaxAmount))
		}
	}
	return nil
}

func containsPlaceholder(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == '{' {
			return true
		}
	}
	return false
}

// ServeHTTP charges, decides and, for a forwarded call, settles the charge
// before the response's headers go out.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	stripCreditsHeaders(r.Header)
	if headerValue(r.Header, "Origin") != "" {
		w.Header().Add("Access-Control-Expose-Headers", policy.ExposeHeaders)
	}
	org := h.org.value(r)
	if err := policy.ValidateOrg(org); err != nil {
		if errors.Is(err, policy.ErrOrgMissing) {
			return h.refuse(w, r, "unauthenticated", policy.OrgMissing())
		}
		return h.refuse(w, r, "invalid", policy.Invalid(err))
	}
	cost := h.cost
	if cost == 0 {
		var err error
		if cost, err = policy.ParseCost(h.costValue.value(r)); err != nil {
			return h.refuse(w, r, "invalid", policy.Invalid(err))
		}
	}
	key := headerValue(r.Header, "Idempotency-Key")
	if key != "" {
		if err := policy.ValidateIdempotencyKey(key); err != nil {
			return h.refuse(w, r, "invalid", policy.Invalid(err))
		}
	}

	var leaseErr error
	if ls := h.app.leaser; ls != nil && key == "" {
		balance, ok, err := ls.Spend(org, h.Feature, cost)
		if ok {
			d := policy.Decide(h.route, org, policy.Answer{Charged: true, Balance: balance, Cost: cost})
			sw := &settleWriter{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: w},
				h: h, org: org, cost: cost, decision: d, leased: true}
			return sw.serve(next, r)
		}
		leaseErr = err
	}

	// The client going away must not cut a charge or a settle in half: the
	// store calls run to their own deadline.
	ctx := context.WithoutCancel(r.Context())

	// The attempt id tells this call apart from a client's retry of it with
	// the same Idempotency-Key.
	attempt := meter.NewRequestID()
	requestID := "g:" + attempt
	if key != "" {
		requestID = "i:" + key
	}
	charge := meter.ChargeRequest{
		Org: org, Feature: h.Feature, Cost: cost, RequestID: requestID, Attempt: attempt,
		Overdraft: h.route.Mode == policy.Overdraft, OverdraftLimit: h.route.OverdraftLimit,
	}
	m := h.app.metrics
	if leaseErr != nil {
		// The lease needed the store and it did not answer in time: the
		// call is answered as when a charge does not get through.
		m.storeErrors.Inc()
		return h.storeDown(w, r, next, charge, leaseErr)
	}
	start := time.Now()
	res, err := h.app.ledger.Charge(ctx, charge)
	m.storeDuration.Observe(time.Since(start).Seconds())
	if err != nil {
		m.storeErrors.Inc()
		return h.storeDown(w, r, next, charge, err)
	}

	d := policy.Decide(h.route, org, policy.Answer{Charged: res.Charged, Balance: res.Balance, Cost: cost, Replay: res.Replay})
	if !d.Forward {
		setCreditsHeaders(w.Header(), d, nil)
		return h.refuse(w, r, d.Outcome.String(), d.Problem)
	}
	if res.Replay {
		// The first call with this Idempotency-Key paid; this one rides on it.
		setCreditsHeaders(w.Header(), d, nil)
		h.count("replay")
		return next.ServeHTTP(w, r)
	}

	sw := &settleWriter{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: w},
		h: h, ctx: ctx, org: org, requestID: requestID, cost: cost, decision: d}
	return sw.serve(next, r)
}

// serve passes the call on and settles it however it ends: with a response,
// with an error and no response (refunded as the error's status says), or
// with a panic further down (refunded, then the panic goes on).
func (sw *settleWriter) serve(next caddyhttp.Handler, r *http.Request) (err error) {
	defer func() {
		if sw.settled {
			return
		}
		if p := recover(); p != nil {
			sw.settle(http.StatusInternalServerError)
			panic(p)
		}
		sw.settle(statusOf(err))
	}()
	return next.ServeHTTP(sw, r)
}

// storeDown answers a call whose charge the store did not take: 503 when
// failing closed; when failing open, the call goes on and its charge waits
// in the backlog.
func (h *Handler) storeDown(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, charge meter.ChargeRequest, err error) error {
	if h.failOpen {
		charge.Overdraft, charge.OverdraftLimit = true, meter.NoLimit
		if h.app.store.later(deferred{ledger: h.app.ledger, charge: &charge}) {
			h.app.metrics.unmetered.Inc()
			h.count("unmetered")
			h.logger.Warn("store did not answer; forwarding and charging later",
				zap.String("feature", h.Feature), zap.String("request_id", charge.RequestID), zap.Error(err))
			sw := &settleWriter{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: w},
				h: h, org: charge.Org, requestID: charge.RequestID, cost: charge.Cost, deferredCharge: true}
			return sw.serve(next, r)
		}
		h.logger.Error("store did not answer and the fail-open backlog is full; refusing", zap.String("feature", h.Feature))
	} else {
		h.logger.Warn("store did not answer; refusing", zap.String("feature", h.Feature), zap.Error(err))
	}
	// The charge may have run even so (a lost reply, a timeout after Redis
	// took it): void it, so a refused call is never left charged.
	if !meter.Unsent(err) && !h.app.store.later(deferred{ledger: h.app.ledger, org: charge.Org, requestID: charge.RequestID, void: charge.Attempt}) {
		h.logger.Error("could not queue the void of a charge with an unknown outcome; the backlog is full",
			zap.String("request_id", charge.RequestID))
	}
	w.Header().Set("Retry-After", "1")
	return h.refuse(w, r, "unavailable", policy.Unavailable())
}

// statusClientClosed is the status Caddy gives a call whose client went
// away before the upstream answered: the call did not complete.
const statusClientClosed = 499

func statusOf(err error) int {
	if err == nil {
		return http.StatusOK
	}
	var herr caddyhttp.HandlerError
	if errors.As(err, &herr) && herr.StatusCode != 0 {
		return herr.StatusCode
	}
	return http.StatusInternalServerError
}

// refuse answers a call the gateway does not forward.
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, outcome string, p *policy.Problem) error {
	h.count(outcome)
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

func stripCreditsHeaders(h http.Header) {
	for name := range h {
		if policy.IsCreditsHeader(name) {
			delete(h, name)
		}
	}
}

// setCreditsHeaders sets the Credits headers of a decision. vals, when not
// nil, holds the values, so that a settled call allocates no slices for
// them; it must belong to this response alone.
func setCreditsHeaders(h http.Header, d policy.Decision, vals *[3]string) {
	if vals == nil {
		vals = new([3]string)
	}
	vals[0] = strconv.FormatInt(d.Remaining, 10)
	vals[1] = strconv.FormatInt(d.Charged, 10)
	h[policy.HeaderRemaining] = vals[0:1:1]
	h[policy.HeaderCharged] = vals[1:2:2]
	if d.Notice != "" {
		vals[2] = d.Notice
		h[policy.HeaderNotice] = vals[2:3:3]
	}
}

// settleWriter settles a charged call when the response's status is known,
// before its headers go to the client, so the Credits headers tell the
// final truth.
type settleWriter struct {
	caddyhttp.ResponseWriterWrapper
	h              *Handler
	ctx            context.Context
	org, requestID string
	cost           int64
	decision       policy.Decision
	deferredCharge bool // fail open: the charge waits in the backlog
	leased         bool // paid from this gateway's lease
	settled        bool
	headers        [3]string // the Credits header values
}

// settle refunds a failed call, applies the upstream's Credits-Usage, and
// sets the Credits headers. A settle the store does not take in time waits
// in the backlog.
func (sw *settleWriter) settle(status int) {
	sw.settled = true
	h := sw.h
	hdr := sw.Header()
	usage, hasUsage := hdr[policy.HeaderUsage]
	stripCreditsHeaders(hdr)

	actual := sw.cost
	switch {
	case status >= 500 || status == statusClientClosed:
		actual = 0
	case hasUsage && len(usage) > 0:
		n, err := strconv.ParseInt(usage[0], 10, 64)
		if err != nil || n < 0 || n > policy.MaxCost {
			h.logger.Warn("ignoring an invalid Credits-Usage from the upstream", zap.String("value", usage[0]), zap.String("feature", h.Feature))
		} else {
			actual = n
		}
	}

	m := h.app.metrics
	if sw.deferredCharge {
		if actual != sw.cost && !h.app.store.later(deferred{ledger: h.app.ledger, org: sw.org, requestID: sw.requestID, actual: actual}) {
			h.logger.Error("fail-open backlog full; settle lost", zap.String("request_id", sw.requestID))
		}
		h.charged.Add(float64(actual))
		return
	}

	d := sw.decision
	if sw.leased {
		if actual != sw.cost {
			balance := h.app.leaser.Adjust(sw.org, h.Feature, sw.cost, actual)
			d = policy.Decide(h.route, sw.org, policy.Answer{Charged: true, Balance: balance, Cost: actual})
		}
	} else if actual != sw.cost {
		start := time.Now()
		res, err := h.app.ledger.Settle(sw.ctx, sw.org, sw.requestID, actual)
		m.storeDuration.Observe(time.Since(start).Seconds())
		balance := d.Remaining + sw.cost - actual
		if err != nil {
			m.storeErrors.Inc()
			if !h.app.store.later(deferred{ledger: h.app.ledger, org: sw.org, requestID: sw.requestID, actual: actual}) {
				h.logger.Error("store did not take a settle and the backlog is full; settle lost",
					zap.String("request_id", sw.requestID), zap.Error(err))
			}
		} else {
			balance = res.Balance
		}
		d = policy.Decide(h.route, sw.org, policy.Answer{Charged: true, Balance: balance, Cost: actual})
	}
	outcome := d.Outcome.String()
	if actual == 0 && (status >= 500 || status == statusClientClosed) {
		outcome = "refunded"
	}
	h.count(outcome)
	h.charged.Add(float64(actual))
	setCreditsHeaders(hdr, d, &sw.headers)
}

// WriteHeader settles on the final status, then sends the headers.
func (sw *settleWriter) WriteHeader(status int) {
	if !sw.settled && (status >= 200 || status == http.StatusSwitchingProtocols) {
		sw.settle(status)
	}
	sw.ResponseWriter.WriteHeader(status)
}

// Write sends an implicit 200 through WriteHeader first.
func (sw *settleWriter) Write(b []byte) (int, error) {
	if !sw.settled {
		sw.WriteHeader(http.StatusOK)
	}
	return sw.ResponseWriter.Write(b)
}

// ReadFrom keeps the wrapped writer's fast path without skipping the
// settle.
func (sw *settleWriter) ReadFrom(r io.Reader) (int64, error) {
	if !sw.settled {
		sw.WriteHeader(http.StatusOK)
	}
	return sw.ResponseWriterWrapper.ReadFrom(r)
}

// FlushError settles before the first flush sends the headers;
// http.ResponseController finds it before unwrapping the writer.
func (sw *settleWriter) FlushError() error {
	if !sw.settled {
		sw.WriteHeader(http.StatusOK)
	}
	return http.NewResponseController(sw.ResponseWriter).Flush()
}

// Flush is FlushError for callers that use http.Flusher.
func (sw *settleWriter) Flush() { _ = sw.FlushError() }

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ http.Flusher                = (*settleWriter)(nil)
	_ io.ReaderFrom               = (*settleWriter)(nil)
)
