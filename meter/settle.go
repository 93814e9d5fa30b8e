package meter

import (
	"context"
	"fmt"

	"github.com/creditsgw/caddy-credits/policy"
)

// SettleResult is the ledger's answer to a settle.
type SettleResult struct {
	// Balance is the balance after the settle.
	Balance int64
	// Delta is the change the settle made to the balance: positive for a
	// refund, negative for an extra charge, zero for a repeat.
	Delta int64
	// Repeat is true when the request was settled before; nothing changed.
	Repeat bool
}

// Settle sets the final cost of a charged request to what the upstream
// reported it used: a lower cost gives the difference back, a higher one
// charges it (as overdraft: the call has happened). A request is settled
// once; settling it again changes nothing. A settle to 0 leaves the request
// id taken: the call succeeded (Refund is for a call that failed).
func (l *Ledger) Settle(ctx context.Context, org, requestID string, actual int64) (SettleResult, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return SettleResult{}, err
	}
	if err := validateRequestID(requestID); err != nil {
		return SettleResult{}, err
	}
	if actual < 0 || actual > policy.MaxCost {
		return SettleResult{}, rangeError("actual cost", actual, 0, policy.MaxCost)
	}
	return l.settle(ctx, settleCall{org: org, requestID: requestID, actual: actual})
}

// Refund gives back all a charged request took, because the call failed:
// its request id is free for a new charge. A request is settled or refunded
// once; a repeat changes nothing.
func (l *Ledger) Refund(ctx context.Context, org, requestID string) (SettleResult, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return SettleResult{}, err
	}
	if err := validateRequestID(requestID); err != nil {
		return SettleResult{}, err
	}
	return l.settle(ctx, settleCall{org: org, requestID: requestID, refund: true})
}

// SettleAttempt is Settle, or Refund when refund is set, of one attempt's
// charge: when a retry with the same request id has charged since (the
// attempt was refunded first), it returns ErrUnknownRequest and changes
// nothing, so a settle that waited never touches another call's charge.
func (l *Ledger) SettleAttempt(ctx context.Context, org, requestID, attempt string, actual int64, refund bool) (SettleResult, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return SettleResult{}, err
	}
	if err := validateRequestID(requestID); err != nil {
		return SettleResult{}, err
	}
	if err := validateRequestID(attempt); err != nil {
		return SettleResult{}, err
	}
	if actual < 0 || actual > policy.MaxCost {
		return SettleResult{}, rangeError("actual cost", actual, 0, policy.MaxCost)
	}
	if refund {
		actual = 0
	}
	return l.settle(ctx, settleCall{org: org, requestID: requestID, attempt: attempt, actual: actual, refund: refund})
}

func (l *Ledger) settle(ctx context.Context, c settleCall) (SettleResult, error) {
	r, err := l.call(ctx, "settle", c)
	if err != nil {
		return SettleResult{}, err
	}
	if r.err != nil {
		return SettleResult{}, r.err
	}
	v, err := ints(r.v, 3)
	if err != nil {
		return SettleResult{}, fmt.Errorf("settle: %w", err)
	}
	if r.code == codeRepeat {
		return SettleResult{Balance: v[1], Repeat: true}, nil
	}
	return SettleResult{Balance: v[1], Delta: v[2]}, nil
}

// settleScript, lua/settle.lua, sets a charged request's final cost.
// KEYS: account, request marker, call log, holds, budgets.
// ARGV[8] the final cost (0 for a refund), ARGV[9] request id, ARGV[10] 1 to
// refund (the call failed; its request id is free again), ARGV[11] the
// attempt whose charge it settles ('-': whichever stands).
// Reply: {code, balance, delta}.
var settleScript = bind("settle.lua", replyCodes{codeOK: nil, codeRepeat: nil, codeNotFound: ErrUnknownRequest})

// settleCall is a settle, or with refund a refund, of a request's charge;
// of one attempt's charge when attempt is set.
type settleCall struct {
	org, requestID, attempt string
	actual                  int64
	refund                  bool
}

func (settleCall) script() *luaScript { return settleScript }

func (c settleCall) keys(k Keys) []string {
	return []string{k.Account(c.org), k.Request(c.org, c.requestID), k.Calls(c.org), k.Holds(c.org), k.Budgets(c.org)}
}

func (c settleCall) args(*Ledger) []any {
	refund, attempt := "0", c.attempt
	if c.refund {
		refund = "1"
	}
	if attempt == "" {
		attempt = "-"
	}
	return []any{c.actual, c.requestID, refund, attempt}
}

// Keep marks a call with an Idempotency-Key done once its response has gone
// out, keeping response (nil when it was too large to keep) for the retries
// that come with the key. Only the attempt that charged may; it returns
// ErrUnknownRequest when that charge no longer stands.
func (l *Ledger) Keep(ctx context.Context, org, requestID, attempt string, response []byte) error {
	if err := policy.ValidateOrg(org); err != nil {
		return err
	}
	if err := validateRequestID(requestID); err != nil {
		return err
	}
	r, err := l.call(ctx, "keep", keepCall{org: org, requestID: requestID, attempt: attempt, response: response})
	if err != nil {
		return err
	}
	return r.err
}

// keepScript, lua/keep.lua, marks a call with an Idempotency-Key done.
// KEYS: request marker, the request's kept response.
// ARGV[8] attempt id, ARGV[9] the marker's lifetime in seconds, ARGV[10] 1
// to keep ARGV[11] (the response), 0 when it was too large to keep.
// Reply: {code}.
var keepScript = bind("keep.lua", replyCodes{codeOK: nil, codeRepeat: nil, codeNotFound: ErrUnknownRequest})

// keepCall keeps response (nil: too large to keep) for a request's retries.
type keepCall struct {
	org, requestID, attempt string
	response                []byte
}

func (keepCall) script() *luaScript { return keepScript }

func (c keepCall) keys(k Keys) []string {
	return []string{k.Request(c.org, c.requestID), k.Kept(c.org, c.requestID)}
}

func (c keepCall) args(l *Ledger) []any {
	keep := "1"
	if c.response == nil {
		keep = "0"
	}
	return []any{c.attempt, l.keyTTL, keep, c.response}
}

// Void makes sure the charge of one attempt at a call does not stand, when
// the gateway could not learn whether it happened (a timeout, a lost reply)
// and answered the call as failed. A charge that ran is refunded; one still
// on its way to Redis will find the void and charge nothing. A charge that a
// later attempt with the same request id was answered with as a replay
// stands. It returns the credits given back.
func (l *Ledger) Void(ctx context.Context, org, requestID, attempt string) (int64, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return 0, err
	}
	if err := validateRequestID(requestID); err != nil {
		return 0, err
	}
	if err := validateRequestID(attempt); err != nil {
		return 0, err
	}
	r, err := l.call(ctx, "void", voidCall{org: org, requestID: requestID, attempt: attempt})
	if err != nil {
		return 0, err
	}
	v, err := ints(r.v, 2)
	if err != nil {
		return 0, fmt.Errorf("void: %w", err)
	}
	return v[1], nil
}

// voidScript, lua/void.lua, makes sure an attempt's charge does not stand.
// KEYS: account, request marker, call log, holds, budgets.
// ARGV[8] request id, ARGV[9] attempt id, ARGV[10] the marker's lifetime in
// seconds.
// Reply: {code, delta}: the credits given back.
var voidScript = bind("void.lua", replyCodes{codeOK: nil, codeRepeat: nil})

// voidCall voids one attempt's charge.
type voidCall struct{ org, requestID, attempt string }

func (voidCall) script() *luaScript { return voidScript }

func (c voidCall) keys(k Keys) []string {
	return []string{k.Account(c.org), k.Request(c.org, c.requestID), k.Calls(c.org), k.Holds(c.org), k.Budgets(c.org)}
}

func (c voidCall) args(l *Ledger) []any { return []any{c.requestID, c.attempt, l.markerTTL} }
