package policy

import (
	"net/http"
	"strconv"
	"time"

	"github.com/creditsgw/caddy-credits/usage"
)

// Mode is what a route does with a call when the organization's credits
// cannot pay for it (the Caddyfile's on_exhausted).
type Mode uint8

const (
	// Block refuses the call with a 402 problem. It is the default.
	Block Mode = iota
	// Notice refuses the call with a 402 problem and Credits-Notice:
	// exhausted, and warns with Credits-Notice: low while the balance is
	// below the route's LowBalance.
	Notice
	// Overdraft forwards the call anyway and lets the balance go below zero,
	// down to the route's OverdraftLimit. It never sets Credits-Notice.
	Overdraft
)

// modeNames holds each Mode's Caddyfile spelling, indexed by Mode.
var modeNames = [...]string{Block: "block", Notice: "notice", Overdraft: "overdraft"}

// ParseMode parses a Caddyfile on_exhausted value: "block", "notice" or
// "overdraft". Any other value is an *InputError.
func ParseMode(s string) (Mode, error) {
	for m, name := range modeNames {
		if s == name {
			return Mode(m), nil
		}
	}
	return Block, &InputError{Field: "mode", Value: s, Reason: modeReason}
}

// modeReason says what a valid mode looks like.
const modeReason = "must be block, notice or overdraft"

// String returns the mode's Caddyfile spelling, e.g. "notice".
func (m Mode) String() string {
	if int(m) < len(modeNames) {
		return modeNames[m]
	}
	return "Mode(" + strconv.Itoa(int(m)) + ")"
}

// Route is a route's settings, as configured in the Caddyfile.
type Route struct {
	// Feature is the usage label of the route's calls, e.g. "rich-text".
	Feature string
	// Mode is what the route does when the credits cannot pay for a call.
	Mode Mode
	// OverdraftLimit applies to Overdraft routes only: the deepest balance
	// allowed is -OverdraftLimit. A value below zero means no limit. The
	// ledger enforces it; Decide only reads the ledger's answer.
	OverdraftLimit int64
	// LowBalance applies to Notice routes only: a forwarded call warns with
	// Credits-Notice: low while the balance after its charge is below
	// LowBalance. Zero (or less) never warns.
	LowBalance int64
	// TopUpURL is where an organization adds credits. It goes into the
	// problem body of a refusal; it may be empty.
	TopUpURL string
	// Cost is the cost of a call, or 0 when a placeholder gives it per
	// request.
	Cost int64
	// FailOpen forwards a call whose charge the store did not take, and
	// charges it once the store answers.
	FailOpen bool
	// Usage is the format of the usage an answer reports, whose tokens
	// are the call's real cost; nil for the upstream's Credits-Usage.
	Usage usage.Format
	// Prices price the tokens of a route with a Usage.
	Prices []Price
}

// Answer is what the ledger answered for one charge.
type Answer struct {
	// Charged reports that the ledger took the credits.
	Charged bool
	// Balance is the balance after the charge, or the current balance when
	// the ledger refused it.
	Balance int64
	// Cost is the credits the call costs.
	Cost int64
	// Replay reports that the same idempotency key was charged before.
	// Charged is then true and the call is forwarded, but Credits-Charged
	// is 0.
	Replay bool
	// OverBudget reports that the ledger refused the call because the
	// caller's budget could not pay it (Charged is false).
	OverBudget bool
	// Budget is the caller's budget after the charge (or at the refusal);
	// nil when the route has none or none applies to the caller.
	Budget *Budget
}

// Budget is a caller's budget in the org, as a charge left it.
type Budget struct {
	// Subject is whose budget it is.
	Subject string
	// Limit is the credits the subject may spend per window.
	Limit int64
	// Spent is what it spent in this window.
	Spent int64
	// Resets is when the window ends.
	Resets time.Time
}

// Remaining is what the budget has left in its window, never below 0.
func (b *Budget) Remaining() int64 { return max(b.Limit-b.Spent, 0) }

// Outcome is how a metered call ended; its String is the outcome label of
// the gateway's metrics. Decide gives the first five; the handler the rest.
type Outcome uint8

const (
	// Forward means the call was paid for and goes upstream.
	Forward Outcome = iota
	// ForwardLow means the call goes upstream with Credits-Notice: low,
	// because a Notice route's balance fell below its LowBalance.
	ForwardLow
	// ForwardOverdraft means the call goes upstream on an Overdraft route
	// and left the balance below zero.
	ForwardOverdraft
	// Refuse means the call is refused with a 402 problem.
	Refuse
	// RefuseNotice means the call is refused on a Notice route, with a 402
	// problem and Credits-Notice: exhausted.
	RefuseNotice
	// Refunded means the upstream failed (5xx, no answer, or the client
	// went away first) and the call's charge was given back.
	Refunded
	// Replayed means a call with an Idempotency-Key that completed before
	// was answered its kept response, without an upstream call.
	Replayed
	// InFlight means a call with an Idempotency-Key whose first call has
	// not completed was refused with 409.
	InFlight
	// KeyMismatch means a call with an Idempotency-Key that an earlier,
	// different call used was refused with 422.
	KeyMismatch
	// Unmetered means the store did not answer and the call went upstream
	// on a fail_mode open route; it is charged once the store answers.
	Unmetered
	// StoreDown means the store did not answer and the call was refused
	// with 503.
	StoreDown
	// BadInput means the call's org, cost or Idempotency-Key was invalid.
	BadInput
	// Unauthenticated means the call named no org.
	Unauthenticated
	// Preflight means a CORS preflight went upstream uncharged.
	Preflight
	// RefuseBudget means the call is refused with a 402 problem because the
	// caller's budget cannot pay it (with Credits-Notice: budget on a
	// Notice route).
	RefuseBudget

	// NumOutcomes is the number of outcomes, for arrays indexed by them.
	NumOutcomes
)

// outcomeNames holds each Outcome's metrics label, indexed by Outcome.
var outcomeNames = [NumOutcomes]string{
	Forward:          "forwarded",
	ForwardLow:       "low",
	ForwardOverdraft: "overdraft",
	Refuse:           "blocked",
	RefuseNotice:     "notice",
	Refunded:         "refunded",
	Replayed:         "replay",
	InFlight:         "in_flight",
	KeyMismatch:      "key_mismatch",
	Unmetered:        "unmetered",
	StoreDown:        "unavailable",
	BadInput:         "invalid",
	Unauthenticated:  "unauthenticated",
	Preflight:        "preflight",
	RefuseBudget:     "budget",
}

// String returns the outcome's metrics label, e.g. "forwarded" or
// "blocked".
func (o Outcome) String() string {
	if o < NumOutcomes {
		return outcomeNames[o]
	}
	return "Outcome(" + strconv.Itoa(int(o)) + ")"
}

// Notice values of the Credits-Notice header.
const (
	// NoticeLow warns that a Notice route's balance is below its LowBalance.
	NoticeLow = "low"
	// NoticeExhausted says that a Notice route refused a call for want of
	// credits.
	NoticeExhausted = "exhausted"
	// NoticeBudget says that a Notice route refused a call because the
	// caller's budget is spent.
	NoticeBudget = "budget"
)

// Decision is what the gateway does with a call.
type Decision struct {
	// Outcome classifies the decision, for metrics and logs.
	Outcome Outcome
	// Forward reports that the call goes upstream.
	Forward bool
	// Status is 0 when the call is forwarded (the upstream answers) and
	// http.StatusPaymentRequired when it is refused.
	Status int
	// Remaining is the value of Credits-Remaining, set on every decision:
	// the balance after the charge, or the current balance on a refusal.
	Remaining int64
	// Charged is the value of Credits-Charged: 0 on a refusal and on a
	// replay.
	Charged int64
	// Notice is the value of Credits-Notice: "", NoticeLow or
	// NoticeExhausted. It is only ever set on Notice routes; an empty
	// Notice means no header.
	Notice string
	// Problem is the body of a refusal, nil when the call is forwarded.
	Problem *Problem
	// BudgetRemaining is the value of Credits-Budget-Remaining: what the
	// caller's budget has left; nil when no budget applies to the call.
	BudgetRemaining *int64
}

// Decide turns the ledger's answer for one charge into what the gateway does
// with the call, following the table of the contract's "On the wire":
//
//   - charged: forwarded, with the balance after and the cost;
//   - charged on a Notice route, balance after below LowBalance: ForwardLow,
//     Notice "low";
//   - charged on an Overdraft route, balance after below zero:
//     ForwardOverdraft, never a Notice;
//   - not charged on a Notice route: RefuseNotice, 402, Notice "exhausted";
//   - not charged otherwise (Block, or Overdraft past its limit): Refuse, 402;
//   - over the caller's budget (Block or Notice): RefuseBudget, 402, Notice
//     "budget" on a Notice route.
//
// Every decision of a call with a budget carries what the budget has left.
// A replay is classified as any charged call but reports Charged 0, since
// the credits were taken by the first call with the same key. An unknown
// Mode is treated as Block.
func Decide(r Route, org string, a Answer) Decision {
	d := decide(r, org, a)
	if a.Budget != nil {
		left := a.Budget.Remaining()
		d.BudgetRemaining = &left
	}
	return d
}

func decide(r Route, org string, a Answer) Decision {
	if a.OverBudget && a.Budget != nil {
		d := Decision{
			Outcome:   RefuseBudget,
			Status:    http.StatusPaymentRequired,
			Remaining: a.Balance,
			Problem:   BudgetSpent(r, org, a.Cost, a.Balance, *a.Budget),
		}
		if r.Mode == Notice {
			d.Notice = NoticeBudget
		}
		return d
	}
	if !a.Charged {
		d := Decision{
			Outcome:   Refuse,
			Status:    http.StatusPaymentRequired,
			Remaining: a.Balance,
			Problem:   Insufficient(r, org, a.Balance, a.Cost),
		}
		if r.Mode == Notice {
			d.Outcome = RefuseNotice
			d.Notice = NoticeExhausted
		}
		return d
	}
	d := Decision{
		Outcome:   Forward,
		Forward:   true,
		Remaining: a.Balance,
		Charged:   a.Cost,
	}
	if a.Replay {
		d.Charged = 0
	}
	switch r.Mode {
	case Notice:
		if r.LowBalance > 0 && a.Balance < r.LowBalance {
			d.Outcome = ForwardLow
			d.Notice = NoticeLow
		}
	case Overdraft:
		if a.Balance < 0 {
			d.Outcome = ForwardOverdraft
		}
	}
	return d
}
