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
	by, err := byOf(ctx)
	if err != nil {
		return Account{}, false, err
	}
	r, err := l.call(ctx, "set plan", planCall{org: org, plan: plan, reference: reference, by: by})
	if err != nil {
		return Account{}, false, err
	}
	return appliedOnce("set plan", org, r)
}

// planScript, lua/plan.lua, gives an org a plan of its own.
// KEYS: account, events, holds, references, the write's images.
// ARGV[8] allowance, ARGV[9] recharge month, ARGV[10] reference, ARGV[11]
// how long a reference is kept, in ms, ARGV[12] how long the images are
// kept, in ms (0: none are kept), ARGV[13] rollover, ARGV[14] who made it
// (empty for none).
// Reply: {code, account...}.
var planScript = bind("plan.lua", replyCodes{codeOK: nil, codeRepeat: nil})

type planCall struct {
	org       string
	plan      Plan
	reference string
	by        string
}

func (planCall) script() *luaScript { return planScript }

func (c planCall) keys(k Keys) []string {
	return writeKeys(k, c.org, "plan", c.reference)
}

func (c planCall) args(l *Ledger) []any {
	return []any{c.plan.Allowance, c.plan.RechargeMonth, c.reference, l.refTTL, imagesKept(c.reference), c.plan.Rollover, c.by}
}

// writeKeys are the KEYS of a plan, a recharge and their void: account,
// events, holds, references, and the images of the write of kind and
// reference.
func writeKeys(k Keys, org, kind, reference string) []string {
	return []string{k.Account(org), k.Events(org), k.Holds(org), k.TopUps(org), k.Images(org, kind+":"+reference)}
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
	by, err := byOf(ctx)
	if err != nil {
		return Account{}, false, err
	}
	r, err := l.call(ctx, "recharge", rechargeCall{org: org, reference: reference, by: by})
	if err != nil {
		return Account{}, false, err
	}
	return appliedOnce("recharge", org, r)
}

// rechargeScript, lua/recharge.lua, starts a new period now.
// KEYS: account, events, holds, references, the write's images.
// ARGV[8] reference, ARGV[9] how long a reference is kept, in ms, ARGV[10]
// how long the images are kept, in ms (0: none are kept), ARGV[11] who
// made it (empty for none).
// Reply: {code, account...}.
var rechargeScript = bind("recharge.lua", replyCodes{codeOK: nil, codeRepeat: nil})

type rechargeCall struct{ org, reference, by string }

func (rechargeCall) script() *luaScript { return rechargeScript }

func (c rechargeCall) keys(k Keys) []string { return writeKeys(k, c.org, "recharge", c.reference) }

func (c rechargeCall) args(l *Ledger) []any {
	return []any{c.reference, l.refTTL, imagesKept(c.reference), c.by}
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
	what := "void " + kind
	r, err := l.call(ctx, what, voidWriteCall{org: org, kind: kind, reference: reference})
	if err != nil {
		return false, err
	}
	if _, err := r.account(org); err != nil {
		return false, fmt.Errorf("%s: %w", what, err)
	}
	return r.code == codeEnded, nil
}

// voidWriteScript, lua/voidwrite.lua, makes sure a plan or a recharge does
// not stand.
// KEYS: account, events, holds, references, the write's images.
// ARGV[8] the write's kind, plan or recharge, ARGV[9] its reference,
// ARGV[10] how long a reference is kept, in ms.
// Reply: {code, account...}: ENDED the write ran and stands.
var voidWriteScript = bind("voidwrite.lua", replyCodes{codeOK: nil, codeRepeat: nil, codeEnded: nil})

type voidWriteCall struct{ org, kind, reference string }

func (voidWriteCall) script() *luaScript { return voidWriteScript }

func (c voidWriteCall) keys(k Keys) []string { return writeKeys(k, c.org, c.kind, c.reference) }

func (c voidWriteCall) args(l *Ledger) []any { return []any{c.kind, c.reference, l.refTTL} }

func validatePlan(p Plan) error {
	if p.Allowance < 0 || p.Allowance > MaxAmount {
		return rangeError("allowance", p.Allowance, 0, MaxAmount)
	}
	if p.RechargeMonth < 1 || p.RechargeMonth > 12 {
		return rangeError("recharge month", int64(p.RechargeMonth), 1, 12)
	}
	if p.Rollover < 0 || p.Rollover > p.Allowance {
		return rangeError("rollover", p.Rollover, 0, p.Allowance)
	}
	return nil
}
