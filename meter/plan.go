package meter

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/creditsgw/caddy-credits/policy"
)

// ImagesTTL is how long a plan or a recharge of the gateway's own reference
// keeps the account's images for its void: a void waits for the store to
// answer again, which takes seconds or minutes, not a day.
const ImagesTTL = 24 * time.Hour

// imagesKept is how long a write of reference keeps its images, in ms: 0
// (none) for a caller's reference, which is never voided.
func imagesKept(reference string) int64 {
	if strings.HasPrefix(reference, OwnReferencePrefix) {
		return ImagesTTL.Milliseconds()
	}
	return 0
}

// SetPlan gives org a plan of its own. An org on the default plan (or new)
// starts a new period on it at once, as a recharge would; a change to an
// org's own plan takes effect at its next recharge. A reference is applied
// once per org: a repeat returns the account unchanged with applied false.
// An empty reference means a fresh random one.
func (l *Ledger) SetPlan(ctx context.Context, org string, plan Plan, reference string) (acct Account, applied bool, err error) {
	if err := policy.ValidateOrg(org); err != nil {
		return Account{}, false, err
	}
	if err := validatePlan(plan); err != nil {
		return Account{}, false, err
	}
	if reference, err = checkReference(reference); err != nil {
		return Account{}, false, err
	}
	keys := []string{l.keys.Account(org), l.keys.Events(org), l.keys.Holds(org), l.keys.TopUps(org), l.keys.Images(org, "plan:"+reference)}
	code, acct, err := l.runAccount(ctx, planScript, org, keys, plan.Allowance, plan.RechargeMonth, reference, l.refTTL, imagesKept(reference))
	if err != nil {
		return Account{}, false, fmt.Errorf("set plan: %w", err)
	}
	return appliedOnce("set plan", code, acct)
}

// Recharge starts a new period for org now: the allowance is granted again,
// unused allowance expires, debt carries over and usage restarts at zero.
// A reference is applied once per org, so a recharge sent again (by a
// client, the ledger or go-redis' cluster client) after a lost reply
// changes nothing: a repeat returns the account with applied false. An
// empty reference means a fresh random one.
func (l *Ledger) Recharge(ctx context.Context, org, reference string) (acct Account, applied bool, err error) {
	if err := policy.ValidateOrg(org); err != nil {
		return Account{}, false, err
	}
	if reference, err = checkReference(reference); err != nil {
		return Account{}, false, err
	}
	keys := []string{l.keys.Account(org), l.keys.Events(org), l.keys.Holds(org), l.keys.TopUps(org), l.keys.Images(org, "recharge:"+reference)}
	code, acct, err := l.runAccount(ctx, rechargeScript, org, keys, reference, l.refTTL, imagesKept(reference))
	if err != nil {
		return Account{}, false, fmt.Errorf("recharge: %w", err)
	}
	return appliedOnce("recharge", code, acct)
}

// checkReference checks a write's reference; an empty one becomes a fresh
// random one.
func checkReference(reference string) (string, error) {
	if reference == "" {
		return NewRequestID(), nil
	}
	return reference, validateReference(reference)
}

// VoidWrite makes sure a plan or a recharge (kind "plan" or "recharge")
// whose outcome could not be learned does not stand: never applied if it
// still arrives, and undone if it ran and nothing has changed the account
// since. When something has, no undo is exact: the write stands, the
// void's event says so, and stands is true. It is for references no client
// can send again (the gateway's own); a repeat changes nothing.
func (l *Ledger) VoidWrite(ctx context.Context, org, kind, reference string) (stands bool, err error) {
	if err := policy.ValidateOrg(org); err != nil {
		return false, err
	}
	if kind != "plan" && kind != "recharge" {
		return false, &policy.InputError{Field: "kind", Value: kind, Reason: "must be plan or recharge"}
	}
	if err := validateReference(reference); err != nil {
		return false, err
	}
	keys := []string{l.keys.Account(org), l.keys.Events(org), l.keys.Holds(org), l.keys.TopUps(org), l.keys.Images(org, kind+":"+reference)}
	code, _, err := l.runAccount(ctx, voidWriteScript, org, keys, kind, reference, l.refTTL)
	if err != nil {
		return false, fmt.Errorf("void %s: %w", kind, err)
	}
	switch code {
	case codeOK, codeRepeat:
		return false, nil
	case codeEnded:
		return true, nil
	}
	return false, fmt.Errorf("void %s: unexpected script code %d", kind, code)
}

func validatePlan(p Plan) error {
	if p.Allowance < 0 || p.Allowance > MaxAmount {
		return rangeError("allowance", p.Allowance, 0, MaxAmount)
	}
	if p.RechargeMonth < 1 || p.RechargeMonth > 12 {
		return rangeError("recharge month", int64(p.RechargeMonth), 1, 12)
	}
	return nil
}
