package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

func init() {
	caddy.RegisterModule(Balance{})
}

// Balance answers GET and HEAD with the org's balance as JSON, charging
// nothing: {"org": "acme", "balance": 41, "next_recharge": "2027-01-01T00:00:00Z"}.
// An org with no record answers what its default plan would give.
type Balance struct {
	// Org is the org whose balance to show; placeholders are allowed, e.g.
	// {http.request.header.X-Org-Id}.
	Org string `json:"org"`
	// Budget, when set, names the subject whose budget in the org the
	// answer also shows, as "budget" (absent when none applies to it);
	// placeholders are allowed.
	Budget string `json:"budget,omitempty"`

	app *App
}

// CaddyModule returns the Caddy module information.
func (Balance) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.credits_balance",
		New: func() caddy.Module { return new(Balance) },
	}
}

// Provision finds the credits app.
func (b *Balance) Provision(ctx caddy.Context) error {
	var err error
	b.app, err = appFrom(ctx)
	return err
}

// Validate checks that an org is configured.
func (b *Balance) Validate() error {
	if err := checkOrg(b.Org); err != nil {
		return fmt.Errorf("credits_balance: %w", err)
	}
	if err := checkSubject(b.Budget); err != nil {
		return fmt.Errorf("credits_balance: %w", err)
	}
	return nil
}

type balanceBody struct {
	Org          string    `json:"org"`
	Balance      int64     `json:"balance"`
	NextRecharge time.Time `json:"next_recharge"`
	// Budget is the subject's budget, on an endpoint with a budget;
	// absent when none applies to the subject.
	Budget *budgetBody `json:"budget,omitempty"`
}

// budgetBody is a subject's budget as the balance endpoint shows it.
type budgetBody struct {
	Subject   string    `json:"subject"`
	Limit     int64     `json:"limit"`
	Window    string    `json:"window"`
	Spent     int64     `json:"spent"`
	Remaining int64     `json:"remaining"`
	Resets    time.Time `json:"resets"`
}

// ServeHTTP answers the balance.
func (b *Balance) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Header.Get("Origin") != "" {
		w.Header().Add("Access-Control-Expose-Headers", policy.ExposeHeaders)
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return writeProblem(w, r, methodNotAllowed(r.Method))
	}
	repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	org := repl.ReplaceAll(b.Org, "")
	if err := policy.ValidateOrg(org); err != nil {
		if errors.Is(err, policy.ErrOrgMissing) {
			return writeProblem(w, r, policy.OrgMissing())
		}
		return writeProblem(w, r, policy.Invalid(err))
	}
	subject := ""
	if b.Budget != "" {
		subject = repl.ReplaceAll(b.Budget, "")
		if err := policy.ValidateSubject(subject); err != nil {
			if errors.Is(err, policy.ErrSubjectMissing) {
				return writeProblem(w, r, policy.SubjectMissing())
			}
			return writeProblem(w, r, policy.Invalid(err))
		}
	}
	acct, err := b.app.ledger.Balance(r.Context(), org)
	var budget *budgetBody
	if err == nil && subject != "" {
		var bu meter.Budget
		bu, err = b.app.ledger.Budget(r.Context(), org, subject)
		switch {
		case errors.Is(err, meter.ErrBudgetNotFound):
			err = nil
		case err == nil:
			budget = &budgetBody{Subject: subject, Limit: bu.Limit, Window: bu.Window, Spent: bu.Spent,
				Remaining: bu.Remaining, Resets: bu.Resets}
		}
	}
	if err != nil {
		b.app.metrics.storeErrors.Inc()
		if meter.Classify(err) == meter.Corrupt {
			// A retry cannot help: an operator must look.
			b.app.logger.Error("the org's ledger data cannot be used", zap.String("org", org), zap.Error(err))
			return writeProblem(w, r, policy.Status(http.StatusInternalServerError, "the credit ledger's data of org "+org+" cannot be used"))
		}
		w.Header().Set("Retry-After", "1")
		return writeProblem(w, r, policy.Unavailable())
	}
	body, err := json.Marshal(balanceBody{Org: org, Balance: acct.Balance, NextRecharge: acct.NextRecharge, Budget: budget})
	if err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set(policy.HeaderRemaining, itoa(acct.Balance))
	if budget != nil {
		w.Header().Set(policy.HeaderBudgetRemaining, itoa(budget.Remaining))
	}
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return nil
	}
	_, err = w.Write(append(body, '\n'))
	return err
}

// methodNotAllowed is the problem of a method the balance does not answer.
func methodNotAllowed(method string) *policy.Problem {
	return policy.Status(http.StatusMethodNotAllowed, "method "+method+" not allowed here")
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// Interface guards
var (
	_ caddy.Provisioner           = (*Balance)(nil)
	_ caddy.Validator             = (*Balance)(nil)
	_ caddyhttp.MiddlewareHandler = (*Balance)(nil)
)
