package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

func init() {
	for pattern, route := range map[string]adminRoute{
		"GET /orgs/{org}/budgets":              withOrg((*Admin).budgets),
		"GET /orgs/{org}/budgets/{subject}":    withOrg((*Admin).budget),
		"PUT /orgs/{org}/budgets/{subject}":    withOrg((*Admin).setBudget),
		"DELETE /orgs/{org}/budgets/{subject}": withOrg((*Admin).deleteBudget),
		"GET /orgs/{org}/default-budget":       withOrg((*Admin).budget),
		"PUT /orgs/{org}/default-budget":       withOrg((*Admin).setBudget),
		"DELETE /orgs/{org}/default-budget":    withOrg((*Admin).deleteBudget),
	} {
		adminRoutes[pattern] = route
		adminMux.Handle(pattern, route)
	}
}

// defaultBudgets is how many budgets a page lists when the call does not
// say.
const defaultBudgets = 100

// budgetJSON is a budget as the admin API answers it. The default budget
// has no subject, and spent 0: each subject it applies to spends apart.
type budgetJSON struct {
	Subject   string    `json:"subject,omitempty"`
	Limit     int64     `json:"limit"`
	Window    string    `json:"window"`
	Spent     int64     `json:"spent"`
	Remaining int64     `json:"remaining"`
	Resets    time.Time `json:"resets"`
	// Default is true for a subject with no budget of its own, whom the
	// org's default budget applies to.
	Default bool `json:"default,omitempty"`
}

func budgetAnswer(b meter.Budget) budgetJSON {
	return budgetJSON{Subject: b.Subject, Limit: b.Limit, Window: b.Window, Spent: b.Spent, Remaining: b.Remaining,
		Resets: b.Resets, Default: b.Default}
}

// budgetSubject is the path's subject, checked; empty on the default
// budget's path.
func budgetSubject(r *http.Request) (string, error) {
	s := r.PathValue("subject")
	if s == "" {
		return "", nil
	}
	if err := policy.ValidateSubject(s); err != nil {
		return "", invalid(err)
	}
	return s, nil
}

// budgets answers a page of the org's budgets, in the order of their
// subjects: {"default": {...} or null, "budgets": [...], "next": "..."}.
func (a *Admin) budgets(w http.ResponseWriter, r *http.Request, org string) error {
	q := r.URL.Query()
	after := q.Get("after")
	if after != "" {
		if err := policy.ValidateSubject(after); err != nil {
			return invalid(&policy.InputError{Field: "after", Value: after, Reason: "must be a subject, " + policy.IDPattern})
		}
	}
	limit := defaultBudgets
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > meter.MaxBudgetsPage {
			return invalid(&policy.InputError{Field: "limit", Value: s, Reason: fmt.Sprintf("must be 1 to %d", meter.MaxBudgetsPage)})
		}
		limit = n
	}
	page, err := a.app.ledger.Budgets(r.Context(), org, after, limit)
	if err != nil {
		return a.fail(w, r, org, "budgets", err)
	}
	out := struct {
		Default *budgetJSON  `json:"default"`
		Budgets []budgetJSON `json:"budgets"`
		Next    string       `json:"next"`
	}{Budgets: make([]budgetJSON, 0, len(page.Budgets)), Next: page.Next}
	if page.Default != nil {
		d := budgetAnswer(*page.Default)
		out.Default = &d
	}
	for _, b := range page.Budgets {
		out.Budgets = append(out.Budgets, budgetAnswer(b))
	}
	return writeJSON(w, r, http.StatusOK, out)
}

// budget answers one subject's budget (its own, else the default, then
// with "default": true), or the org's default budget; 404 when none.
func (a *Admin) budget(w http.ResponseWriter, r *http.Request, org string) error {
	subject, err := budgetSubject(r)
	if err != nil {
		return err
	}
	b, err := a.app.ledger.Budget(r.Context(), org, subject)
	if errors.Is(err, meter.ErrBudgetNotFound) {
		return writeProblem(w, r, policy.Status(http.StatusNotFound, noBudget(org, subject)))
	}
	if err != nil {
		return a.fail(w, r, org, "budget", err)
	}
	return writeJSON(w, r, http.StatusOK, budgetAnswer(b))
}

// setBudget sets a subject's budget, or the org's default: {"limit": n,
// "window": "day"|"week"|"month"|"period"}. A PUT sets a state: sent
// again, it changes nothing more, so a retry needs no reference.
func (a *Admin) setBudget(w http.ResponseWriter, r *http.Request, org string) error {
	subject, err := budgetSubject(r)
	if err != nil {
		return err
	}
	var body struct {
		Limit  *int64  `json:"limit"`
		Window *string `json:"window"`
	}
	if err := decodeBody(w, r, &body); err != nil {
		return invalid(err)
	}
	if body.Limit == nil || body.Window == nil {
		return invalid(errors.New(`a budget needs "limit" (1 to 1000000000000) and "window" (day, week, month or period)`))
	}
	set := meter.BudgetLimit{Limit: *body.Limit, Window: *body.Window}
	if err := set.Validate(); err != nil {
		return invalid(err)
	}
	b, err := a.app.ledger.SetBudget(context.WithoutCancel(r.Context()), org, subject, set)
	if err != nil {
		return a.fail(w, r, org, "set budget", err)
	}
	a.logger.Info("budget set", zap.String("org", org), zap.String("subject", subject), zap.Int64("limit", set.Limit),
		zap.String("window", set.Window))
	return writeJSON(w, r, http.StatusOK, budgetAnswer(b))
}

// deleteBudget removes a subject's own budget (the default applies to it
// then, if there is one), or the org's default; it answers the budget as
// it was, or 404 when there was none.
func (a *Admin) deleteBudget(w http.ResponseWriter, r *http.Request, org string) error {
	subject, err := budgetSubject(r)
	if err != nil {
		return err
	}
	b, err := a.app.ledger.DeleteBudget(context.WithoutCancel(r.Context()), org, subject)
	if errors.Is(err, meter.ErrBudgetNotFound) {
		return writeProblem(w, r, policy.Status(http.StatusNotFound, noBudget(org, subject)))
	}
	if err != nil {
		return a.fail(w, r, org, "delete budget", err)
	}
	a.logger.Info("budget removed", zap.String("org", org), zap.String("subject", subject))
	return writeJSON(w, r, http.StatusOK, budgetAnswer(b))
}

func noBudget(org, subject string) string {
	if subject == "" {
		return "org " + org + " has no default budget"
	}
	return "subject " + subject + " has no budget in org " + org + ", nor does the org have a default budget"
}
