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
	return l.settle(ctx, org, requestID, "-", actual, "0")
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
	return l.settle(ctx, org, requestID, "-", 0, "1")
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
	flag := "0"
	if refund {
		flag, actual = "1", 0
	}
	return l.settle(ctx, org, requestID, attempt, actual, flag)
}

func (l *Ledger) settle(ctx context.Context, org, requestID, attempt string, actual int64, refund string) (SettleResult, error) {
	keys := []string{l.keys.Account(org), l.keys.Request(org, requestID), l.keys.Calls(org), l.keys.Holds(org)}
	v, err := l.run(ctx, settleScript, keys, 3, actual, requestID, refund, attempt)
	if err != nil {
		return SettleResult{}, fmt.Errorf("settle: %w", err)
	}
	switch v[0] {
	case codeOK:
		return SettleResult{Balance: v[1], Delta: v[2]}, nil
	case codeRepeat:
		return SettleResult{Balance: v[1], Repeat: true}, nil
	case codeNotFound:
		return SettleResult{}, ErrUnknownRequest
	}
	return SettleResult{}, fmt.Errorf("settle: unexpected script code %d", v[0])
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
	keep := "1"
	if response == nil {
		keep = "0"
	}
	keys := []string{l.keys.Request(org, requestID), l.keys.Kept(org, requestID)}
	v, err := l.run(ctx, keepScript, keys, 1, attempt, l.keyTTL, keep, response)
	if err != nil {
		return fmt.Errorf("keep: %w", err)
	}
	if v[0] == codeNotFound {
		return ErrUnknownRequest
	}
	return nil
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
	keys := []string{l.keys.Account(org), l.keys.Request(org, requestID), l.keys.Calls(org), l.keys.Holds(org)}
	v, err := l.run(ctx, voidScript, keys, 2, requestID, attempt, l.markerTTL)
	if err != nil {
		return 0, fmt.Errorf("void: %w", err)
	}
	return v[1], nil
}
