package meter

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/creditsgw/caddy-credits/policy"
)

// TopUp adds amount purchased credits to org. A reference is applied once
// per org: a repeat returns the account unchanged with applied false. An
// empty reference means a fresh random one.
func (l *Ledger) TopUp(ctx context.Context, org string, amount int64, reference string) (acct Account, applied bool, err error) {
	if err := policy.ValidateOrg(org); err != nil {
		return Account{}, false, err
	}
	if amount < 1 || amount > MaxAmount {
		return Account{}, false, rangeError("amount", amount, 1, MaxAmount)
	}
	if reference == "" {
		reference = NewRequestID()
	} else if err := validateReference(reference); err != nil {
		return Account{}, false, err
	}
	keys := []string{l.keys.Account(org), l.keys.TopUps(org), l.keys.Events(org), l.keys.Holds(org), l.keys.Alerts(org)}
	code, acct, err := l.runAccount(ctx, topUpScript, org, keys, amount, reference, MaxPurchased, l.refTTL)
	if err != nil {
		return Account{}, false, fmt.Errorf("top-up: %w", err)
	}
	return appliedOnce("top-up", code, acct)
}

// appliedOnce reads the code of a write applied once per reference: OK
// applied, REPEAT applied before (the account unchanged), LIMIT refused at
// the purchased limit.
func appliedOnce(what string, code int64, acct Account) (Account, bool, error) {
	switch code {
	case codeOK:
		return acct, true, nil
	case codeRepeat:
		return acct, false, nil
	case codeLimit:
		return acct, false, ErrPurchasedLimit
	}
	return Account{}, false, fmt.Errorf("%s: unexpected script code %d", what, code)
}

// VoidTopUp makes sure a top-up whose outcome could not be learned does
// not stand: taken back if it ran, never applied if it still arrives. It is
// for references no client can send again (a random one the gateway gave a
// top-up without a reference); a repeat changes nothing.
func (l *Ledger) VoidTopUp(ctx context.Context, org string, amount int64, reference string) error {
	if err := policy.ValidateOrg(org); err != nil {
		return err
	}
	if amount < 1 || amount > MaxAmount {
		return rangeError("amount", amount, 1, MaxAmount)
	}
	if err := validateReference(reference); err != nil {
		return err
	}
	keys := []string{l.keys.Account(org), l.keys.TopUps(org), l.keys.Events(org), l.keys.Holds(org)}
	if _, _, err := l.runAccount(ctx, voidTopUpScript, org, keys, amount, reference, l.refTTL); err != nil {
		return fmt.Errorf("void top-up: %w", err)
	}
	return nil
}

// MaxReason is the longest reason an adjustment may carry, in bytes.
const MaxReason = 500

// Adjust is an operator's correction of org's credits: a positive amount
// adds purchased credits, a negative one takes credits as a charge does,
// into debt if it must. The reason is kept in the event. A reference is
// applied once per org (apart from top-ups' references): a repeat returns
// the account unchanged with applied false.
func (l *Ledger) Adjust(ctx context.Context, org string, amount int64, reason, reference string) (acct Account, applied bool, err error) {
	if err := policy.ValidateOrg(org); err != nil {
		return Account{}, false, err
	}
	if amount == 0 || amount < -MaxAmount || amount > MaxAmount {
		return Account{}, false, &policy.InputError{Field: "amount", Value: strconv.FormatInt(amount, 10),
			Reason: fmt.Sprintf("must be %d to %d, and not 0", -MaxAmount, MaxAmount)}
	}
	if err := ValidateReason(reason); err != nil {
		return Account{}, false, err
	}
	if err := validateReference(reference); err != nil {
		return Account{}, false, err
	}
	keys := []string{l.keys.Account(org), l.keys.TopUps(org), l.keys.Events(org), l.keys.Holds(org), l.keys.Alerts(org)}
	code, acct, err := l.runAccount(ctx, adjustScript, org, keys, amount, reference, reason, MaxPurchased, l.refTTL)
	if err != nil {
		return Account{}, false, fmt.Errorf("adjust: %w", err)
	}
	return appliedOnce("adjust", code, acct)
}

// ValidateReason checks an adjustment's reason: 1 to MaxReason bytes of
// UTF-8 text without control characters, so that it stays one line.
func ValidateReason(reason string) error {
	bad := reason == "" || len(reason) > MaxReason || !utf8.ValidString(reason) ||
		strings.IndexFunc(reason, unicode.IsControl) >= 0 || strings.TrimSpace(reason) == ""
	if bad {
		return &policy.InputError{Field: "reason", Value: reason,
			Reason: fmt.Sprintf("must be 1 to %d bytes of text without control characters", MaxReason)}
	}
	return nil
}
