package meter

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/creditsgw/caddy-credits/policy"
)

// TopUp adds amount purchased credits to org. A reference is applied once
// per org: a repeat returns the account unchanged with applied false. An
// empty reference means a fresh random one.
func (l *Ledger) TopUp(ctx context.Context, org string, amount int64, reference string) (acct Account, applied bool, err error) {
	return l.TopUpExpiring(ctx, org, amount, reference, time.Time{})
}

// TopUpExpiring is TopUp whose credits expire at expires (zero: never).
// Credits that expire are a purchased grant of their own (one more of the
// org's MaxGrants); those that never do add to the org's standing
// purchased grant.
func (l *Ledger) TopUpExpiring(ctx context.Context, org string, amount int64, reference string, expires time.Time) (acct Account, applied bool, err error) {
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
	by, err := byOf(ctx)
	if err != nil {
		return Account{}, false, err
	}
	r, err := l.call(ctx, "top-up", topUpCall{org: org, amount: amount, reference: reference, expires: expires, by: by})
	if err != nil {
		return Account{}, false, err
	}
	return appliedOnce("top-up", org, r)
}

// topUpScript, lua/topup.lua, adds purchased credits.
// KEYS: account, references, events, holds, alerts, grant references.
// ARGV[8] amount, ARGV[9] reference, ARGV[10] the most purchased credits an
// org may hold, ARGV[11] how long a reference is kept, in ms, ARGV[12] when
// the credits expire, Redis ms (0: never), ARGV[13] the most grants an org
// may have live or pending, ARGV[14] who made it (empty for none).
// Reply: {code, account...}.
var topUpScript = bind("topup.lua", replyCodes{codeOK: nil, codeRepeat: nil, codeLimit: ErrPurchasedLimit,
	codeFull: ErrGrantsFull, codeEnded: ErrExpiresPast})

type topUpCall struct {
	org       string
	amount    int64
	reference string
	expires   time.Time
	by        string
}

func (topUpCall) script() *luaScript { return topUpScript }

func (c topUpCall) keys(k Keys) []string {
	return []string{k.Account(c.org), k.TopUps(c.org), k.Events(c.org), k.Holds(c.org), k.Alerts(c.org),
		k.GrantRefs(c.org)}
}

func (c topUpCall) args(l *Ledger) []any {
	return []any{c.amount, c.reference, MaxPurchased, l.refTTL, unixMilli(c.expires), MaxGrants, c.by}
}

// appliedOnce reads the reply of a write applied once per reference: the
// account, whether the write was applied now (OK) or before (REPEAT), and
// the error its code means.
func appliedOnce(what, org string, r reply) (Account, bool, error) {
	acct, err := r.account(org)
	if err != nil {
		return Account{}, false, fmt.Errorf("%s: %w", what, err)
	}
	return acct, r.code == codeOK, r.err
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
	r, err := l.call(ctx, "void top-up", voidTopUpCall{org: org, amount: amount, reference: reference})
	if err != nil {
		return err
	}
	if _, err := r.account(org); err != nil {
		return fmt.Errorf("void top-up: %w", err)
	}
	return nil
}

// voidTopUpScript, lua/voidtopup.lua, makes sure a top-up does not stand.
// KEYS: account, references, events, holds, grant references.
// ARGV[8] amount, ARGV[9] reference, ARGV[10] how long a reference is kept,
// in ms.
// Reply: {code, account...}.
var voidTopUpScript = bind("voidtopup.lua", replyCodes{codeOK: nil, codeRepeat: nil})

type voidTopUpCall struct {
	org       string
	amount    int64
	reference string
}

func (voidTopUpCall) script() *luaScript { return voidTopUpScript }

func (c voidTopUpCall) keys(k Keys) []string {
	return []string{k.Account(c.org), k.TopUps(c.org), k.Events(c.org), k.Holds(c.org), k.GrantRefs(c.org)}
}

func (c voidTopUpCall) args(l *Ledger) []any { return []any{c.amount, c.reference, l.refTTL} }

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
	by, err := byOf(ctx)
	if err != nil {
		return Account{}, false, err
	}
	r, err := l.call(ctx, "adjust", adjustCall{org: org, amount: amount, reason: reason, reference: reference, by: by})
	if err != nil {
		return Account{}, false, err
	}
	return appliedOnce("adjust", org, r)
}

// adjustScript, lua/adjust.lua, is an operator's correction.
// KEYS: account, references, events, holds, alerts.
// ARGV[8] amount (not 0), ARGV[9] reference, ARGV[10] reason, ARGV[11] the
// most purchased credits an org may hold, ARGV[12] how long a reference is
// kept, in ms, ARGV[13] who made it (empty for none).
// Reply: {code, account...}.
var adjustScript = bind("adjust.lua", replyCodes{codeOK: nil, codeRepeat: nil, codeLimit: ErrPurchasedLimit})

type adjustCall struct {
	org               string
	amount            int64
	reason, reference string
	by                string
}

func (adjustCall) script() *luaScript { return adjustScript }

func (c adjustCall) keys(k Keys) []string {
	return []string{k.Account(c.org), k.TopUps(c.org), k.Events(c.org), k.Holds(c.org), k.Alerts(c.org)}
}

func (c adjustCall) args(l *Ledger) []any {
	return []any{c.amount, c.reference, c.reason, MaxPurchased, l.refTTL, c.by}
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
