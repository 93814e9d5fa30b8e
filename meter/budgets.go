package meter

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/creditsgw/caddy-credits/policy"
)

// Budget windows: what a budget's limit is per.
const (
	WindowDay    = "day"    // a UTC day
	WindowWeek   = "week"   // a week from Monday 00:00 UTC
	WindowMonth  = "month"  // a calendar month in UTC
	WindowPeriod = "period" // the org's credit period, until its next recharge
)

// windowCodes are the windows as the scripts name them.
var windowCodes = map[string]string{WindowDay: "d", WindowWeek: "w", WindowMonth: "m", WindowPeriod: "p"}

// ErrBudgetNotFound means the subject has no budget of its own (or, for
// the default, the org has no default budget).
var ErrBudgetNotFound = errors.New("no budget")

// MaxBudgetsPage is the most budgets one page lists.
const MaxBudgetsPage = 1000

// BudgetLimit is what an operator sets: Limit credits per Window.
type BudgetLimit struct {
	Limit  int64
	Window string
}

// Validate checks the limit against 1..MaxAmount and the window against
// the four there are.
func (b BudgetLimit) Validate() error {
	if b.Limit < 1 || b.Limit > MaxAmount {
		return rangeError("limit", b.Limit, 1, MaxAmount)
	}
	if _, ok := windowCodes[b.Window]; !ok {
		return &policy.InputError{Field: "window", Value: b.Window, Reason: "must be day, week, month or period"}
	}
	return nil
}

// Budget is a subject's budget as it stands in the window that runs now.
type Budget struct {
	// Subject is whose budget it is; empty for the org's default.
	Subject string `json:"subject"`
	Limit   int64  `json:"limit"`
	Window  string `json:"window"`
	// Spent is what the subject spent in this window; above Limit on
	// overdraft routes, or after the limit was lowered.
	Spent int64 `json:"spent"`
	// Remaining is what it has left in this window, never below 0.
	Remaining int64 `json:"remaining"`
	// Resets is when this window ends.
	Resets time.Time `json:"resets"`
	// Default is true when the subject has no budget of its own and the
	// org's default applies.
	Default bool `json:"default"`
}

// BudgetPage is one page of an org's budgets.
type BudgetPage struct {
	// Default is the org's default budget (Spent 0), nil when there is none.
	Default *Budget
	// Budgets are the subjects' own budgets, in the order of their subjects.
	Budgets []Budget
	// Next is the subject to list after for the next page; empty at the end.
	Next string
}

// SetBudget sets subject's own budget in org, or the org's default budget
// when subject is empty. A new limit keeps what the current window spent.
func (l *Ledger) SetBudget(ctx context.Context, org, subject string, b BudgetLimit) (Budget, error) {
	if err := validateBudgetSubject(org, subject); err != nil {
		return Budget{}, err
	}
	if err := b.Validate(); err != nil {
		return Budget{}, err
	}
	r, err := l.call(ctx, "set budget", budgetCall{org: org, subject: subject, limit: b.Limit, window: windowCodes[b.Window]})
	if err != nil {
		return Budget{}, err
	}
	if r.err != nil {
		return Budget{}, r.err
	}
	return budgetView(r.v, 1, subject)
}

// DeleteBudget removes subject's own budget in org (the default applies to
// it then, if there is one), or the org's default when subject is empty,
// and returns it as it was. ErrBudgetNotFound when there was none.
func (l *Ledger) DeleteBudget(ctx context.Context, org, subject string) (Budget, error) {
	if err := validateBudgetSubject(org, subject); err != nil {
		return Budget{}, err
	}
	r, err := l.call(ctx, "delete budget", budgetCall{org: org, subject: subject, del: true})
	if err != nil {
		return Budget{}, err
	}
	if r.err != nil {
		return Budget{}, r.err
	}
	return budgetView(r.v, 1, subject)
}

// Budget reads subject's budget in org: its own, else the org's default
// (Default true); the default itself when subject is empty.
// ErrBudgetNotFound when there is neither.
func (l *Ledger) Budget(ctx context.Context, org, subject string) (Budget, error) {
	if err := validateBudgetSubject(org, subject); err != nil {
		return Budget{}, err
	}
	r, err := l.call(ctx, "budget", budgetsCall{org: org, subject: subject})
	if err != nil {
		return Budget{}, err
	}
	if r.err != nil {
		return Budget{}, r.err
	}
	return budgetView(r.v, 1, subject)
}

// Budgets lists org's budgets: the default, and up to limit subjects' own
// budgets after the subject after (from the first when empty), in order.
func (l *Ledger) Budgets(ctx context.Context, org, after string, limit int) (BudgetPage, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return BudgetPage{}, err
	}
	if after != "" {
		if err := policy.ValidateSubject(after); err != nil {
			return BudgetPage{}, err
		}
	}
	if limit < 1 || limit > MaxBudgetsPage {
		return BudgetPage{}, rangeError("limit", int64(limit), 1, MaxBudgetsPage)
	}
	r, err := l.call(ctx, "budgets", budgetsCall{org: org, subject: after, list: true, limit: limit})
	if err != nil {
		return BudgetPage{}, err
	}
	if r.err != nil {
		return BudgetPage{}, r.err
	}
	if len(r.v) < 4 {
		return BudgetPage{}, fmt.Errorf("budgets: script reply has %d fields, want 4", len(r.v))
	}
	var page BudgetPage
	if _, ok := r.v[1].([]any); ok {
		d, err := budgetView(r.v, 1, "")
		if err != nil {
			return BudgetPage{}, err
		}
		page.Default = &d
	}
	views, _ := r.v[2].([]any)
	page.Budgets = make([]Budget, 0, len(views))
	for i := range views {
		b, err := budgetView(views, i, "")
		if err != nil {
			return BudgetPage{}, err
		}
		page.Budgets = append(page.Budgets, b)
	}
	page.Next, _ = r.v[3].(string)
	return page, nil
}

func validateBudgetSubject(org, subject string) error {
	if err := policy.ValidateOrg(org); err != nil {
		return err
	}
	if subject != "" {
		return policy.ValidateSubject(subject)
	}
	return nil
}

// windowNames are the windows by the scripts' names.
var windowNames = map[string]string{"d": WindowDay, "w": WindowWeek, "m": WindowMonth, "p": WindowPeriod}

// budgetView reads v[i], lib/budgets.lua's budget_view: {subject, limit,
// window, spent, resets (unix ms), own}. The default's subject '-' reads as
// empty.
func budgetView(v []any, i int, subject string) (Budget, error) {
	if len(v) <= i {
		return Budget{}, fmt.Errorf("budget: script reply has %d fields, want %d", len(v), i+1)
	}
	f, ok := v[i].([]any)
	if !ok || len(f) != 6 {
		return Budget{}, fmt.Errorf("budget: script reply field %d is %T, not a budget", i, v[i])
	}
	s, _ := f[0].(string)
	w, ok := windowNames[fmt.Sprint(f[2])]
	if !ok {
		return Budget{}, fmt.Errorf("budget: unknown window %v", f[2])
	}
	n, err := ints([]any{f[1], f[3], f[4], f[5]}, 4)
	if err != nil {
		return Budget{}, fmt.Errorf("budget: %w", err)
	}
	if s == "-" {
		s = ""
	}
	b := Budget{Subject: s, Limit: n[0], Window: w, Spent: n[1], Remaining: max(n[0]-n[1], 0),
		Resets: time.UnixMilli(n[2]).UTC(), Default: n[3] == 0 && s != ""}
	return b, nil
}

// budgetScript, lua/budget.lua, sets or removes a budget.
// KEYS: account, budgets, budget index.
// ARGV[8] 'set' or 'del', ARGV[9] the subject ('-': the default), ARGV[10]
// the limit, ARGV[11] the window (d, w, m or p).
// Reply: {OK, budget}: as set, or as it was before its removal; NOT_FOUND
// nothing to remove.
var budgetScript = bind("budget.lua", replyCodes{codeOK: nil, codeNotFound: ErrBudgetNotFound})

type budgetCall struct {
	org, subject, window string
	limit                int64
	del                  bool
}

func (budgetCall) script() *luaScript { return budgetScript }

func (c budgetCall) keys(k Keys) []string {
	return []string{k.Account(c.org), k.Budgets(c.org), k.BudgetIndex(c.org)}
}

func (c budgetCall) args(*Ledger) []any {
	subject := c.subject
	if subject == "" {
		subject = "-"
	}
	if c.del {
		return []any{"del", subject, 0, "-"}
	}
	return []any{"set", subject, c.limit, c.window}
}

// budgetsScript, lua/budgets.lua, reads one budget or a page of them.
// KEYS: account, budgets, budget index.
// ARGV[8] 'get' or 'list', ARGV[9] the subject ('-': the default, or from
// the first), ARGV[10] the most to list.
// Reply: get {OK, budget}; list {OK, default or false, {budgets}, next}.
var budgetsScript = bind("budgets.lua", replyCodes{codeOK: nil, codeNotFound: ErrBudgetNotFound})

type budgetsCall struct {
	org, subject string
	list         bool
	limit        int
}

func (budgetsCall) script() *luaScript { return budgetsScript }

func (c budgetsCall) keys(k Keys) []string {
	return []string{k.Account(c.org), k.Budgets(c.org), k.BudgetIndex(c.org)}
}

func (c budgetsCall) args(*Ledger) []any {
	subject := c.subject
	if subject == "" {
		subject = "-"
	}
	if c.list {
		return []any{"list", subject, c.limit}
	}
	return []any{"get", subject, 0}
}
