package meter

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/creditsgw/caddy-credits/policy"
)

// Limits of a hold's lifetime.
const (
	MinHoldTTL     = time.Second
	MaxHoldTTL     = 24 * time.Hour
	DefaultHoldTTL = 15 * time.Minute
)

var (
	// ErrInsufficient means the available balance cannot cover a hold.
	ErrInsufficient = errors.New("the available balance is short")
	// ErrHoldNotFound means the org has no hold with the id (it never
	// existed, or its record was dropped a day after it ended).
	ErrHoldNotFound = errors.New("no hold with this id")
	// ErrHoldEnded means a hold cannot be captured because it was
	// released, or released because it was captured.
	ErrHoldEnded = errors.New("the hold has ended")
	// ErrLease means the hold is a gateway's lease, which only its gateway
	// captures and releases; an operator releases an unreported one, once
	// its gateway is known to be gone (ReleaseLease).
	ErrLease = errors.New("the hold is a gateway's lease")
	// ErrNotLease means ReleaseLease was asked to release a hold that is
	// no gateway's lease.
	ErrNotLease = errors.New("the hold is not a gateway's lease")
)

// Hold states.
const (
	HoldLive     = "held"
	HoldCaptured = "captured"
	HoldReleased = "released"
	HoldExpired  = "expired"
	// HoldUnreported is a lease whose gateway did not report within its
	// lifetime: it keeps its credits, which the gateway may have spent,
	// until the gateway reports, an operator releases it, or a day after
	// its last report.
	HoldUnreported = "unreported"
)

var holdStates = map[string]string{"l": HoldLive, "c": HoldCaptured, "r": HoldReleased, "x": HoldExpired, "u": HoldUnreported}

// leasePrefix starts the id of every gateway's lease among an org's holds.
const leasePrefix = "lease:"

// IsLease reports whether a hold id names a gateway's lease.
func IsLease(id string) bool { return strings.HasPrefix(id, leasePrefix) }

// Hold is credits of an org's available balance set aside, for a long job
// or by a gateway's lease.
type Hold struct {
	// ID names the hold among the org's.
	ID string `json:"hold"`
	// State is held, captured, released or expired.
	State string `json:"state"`
	// Amount is the credits the hold keeps now; 0 once it has ended.
	Amount int64 `json:"amount"`
	// Captured is the credits charged when it was captured.
	Captured int64 `json:"captured,omitempty"`
	// Feature is the usage label its capture is counted under.
	Feature string `json:"feature"`
	// Expires is when a live hold expires, by Redis' clock; for an
	// unreported lease, when it is released anyway; for a hold that has
	// ended, when its record is dropped.
	Expires time.Time `json:"expires"`
	// LastReport is when a lease's gateway last reported to the ledger, by
	// Redis' clock; absent for other holds.
	LastReport *time.Time `json:"last_report,omitempty"`
}

// HoldRequest asks for a hold.
type HoldRequest struct {
	// Org is the org whose credits are held.
	Org string
	// Feature is the usage label the capture is counted under.
	Feature string
	// Amount is the credits to hold, 1 to MaxAmount.
	Amount int64
	// TTL is how long the hold lasts unless captured or released, from
	// MinHoldTTL to MaxHoldTTL; 0 means DefaultHoldTTL.
	TTL time.Duration
	// Reference makes the call safe to repeat: the same org and reference
	// answer the same hold. Empty means a fresh hold.
	Reference string
}

// HoldID returns the id of the hold an org's reference names: the same
// reference always names the same hold.
func HoldID(reference string) string {
	sum := sha256.Sum256([]byte(reference))
	return hex.EncodeToString(sum[:12])
}

// CreateHold sets req.Amount credits of the available balance aside, taken
// as a charge takes them: allowance first, then purchased credits. A repeat
// of the reference answers the hold it made, with repeat true. When the
// available balance is short it returns ErrInsufficient, with the account.
func (l *Ledger) CreateHold(ctx context.Context, req HoldRequest) (h Hold, acct Account, repeat bool, err error) {
	if err := policy.ValidateOrg(req.Org); err != nil {
		return Hold{}, Account{}, false, err
	}
	if err := policy.ValidateFeature(req.Feature); err != nil {
		return Hold{}, Account{}, false, err
	}
	if req.Amount < 1 || req.Amount > MaxAmount {
		return Hold{}, Account{}, false, rangeError("amount", req.Amount, 1, MaxAmount)
	}
	if req.TTL == 0 {
		req.TTL = DefaultHoldTTL
	}
	if req.TTL < MinHoldTTL || req.TTL > MaxHoldTTL {
		return Hold{}, Account{}, false, &policy.InputError{Field: "ttl", Value: req.TTL.String(), Reason: "must be 1s to 24h"}
	}
	id := NewRequestID()[:24]
	if req.Reference != "" {
		if err := validateReference(req.Reference); err != nil {
			return Hold{}, Account{}, false, err
		}
		id = HoldID(req.Reference)
	}
	by, err := byOf(ctx)
	if err != nil {
		return Hold{}, Account{}, false, err
	}
	r, h, acct, err := l.runHold(ctx, "hold", req.Org, id, holdCall{org: req.Org, id: id, feature: req.Feature,
		amount: req.Amount, ttl: req.TTL, by: by})
	if err != nil {
		return Hold{}, Account{}, false, err
	}
	if r.err != nil {
		return Hold{}, acct, false, r.err
	}
	return h, acct, r.code == codeRepeat, nil
}

// holdScript, lua/hold.lua, sets credits aside.
// KEYS: account, events, holds.
// ARGV[8] hold id, ARGV[9] amount, ARGV[10] lifetime in ms, ARGV[11]
// feature, ARGV[12] who made it (empty for none).
// Reply: {code, state, amount, until_ms, feature, account...}.
var holdScript = bind("hold.lua", replyCodes{codeOK: nil, codeRepeat: nil, codeRefused: ErrInsufficient})

type holdCall struct {
	org, id, feature string
	amount           int64
	ttl              time.Duration
	by               string
}

func (holdCall) script() *luaScript { return holdScript }

func (c holdCall) keys(k Keys) []string { return holdKeys(k, c.org) }

func (c holdCall) args(*Ledger) []any {
	return []any{c.id, c.amount, c.ttl.Milliseconds(), c.feature, c.by}
}

// holdKeys are the KEYS of every hold script: account, events, holds.
func holdKeys(k Keys, org string) []string {
	return []string{k.Account(org), k.Events(org), k.Holds(org)}
}

// VoidHold makes sure a hold whose outcome could not be learned does not
// stand: a live one is released, and one still on its way finds a released
// record of its id and sets nothing aside. A hold that ended is left as it
// is. It is for holds of references no client can send again (the
// gateway's own); a repeat changes nothing.
func (l *Ledger) VoidHold(ctx context.Context, org, id string) error {
	if err := validateHoldCall(org, id); err != nil {
		return err
	}
	if _, err := l.call(ctx, "void hold", voidHoldCall{org: org, id: id}); err != nil {
		return err
	}
	return nil
}

// voidHoldScript, lua/voidhold.lua, makes sure a hold does not stand.
// KEYS: account, events, holds.
// ARGV[8] hold id.
// Reply: {code}.
var voidHoldScript = bind("voidhold.lua", replyCodes{codeOK: nil, codeRepeat: nil})

type voidHoldCall struct{ org, id string }

func (voidHoldCall) script() *luaScript { return voidHoldScript }

func (c voidHoldCall) keys(k Keys) []string { return holdKeys(k, c.org) }

func (c voidHoldCall) args(*Ledger) []any { return []any{c.id} }

// CaptureHold charges amount credits from the hold and releases the rest.
// Usage above the hold is charged too, into debt if it must: the work was
// done. A hold that expired is charged all the same, from the available
// balance. A repeated capture changes nothing and answers as the first,
// with repeat true.
func (l *Ledger) CaptureHold(ctx context.Context, org, id string, amount int64) (h Hold, acct Account, repeat bool, err error) {
	if err := validateHoldCall(org, id); err != nil {
		return Hold{}, Account{}, false, err
	}
	if amount < 0 || amount > MaxAmount {
		return Hold{}, Account{}, false, rangeError("amount", amount, 0, MaxAmount)
	}
	by, err := byOf(ctx)
	if err != nil {
		return Hold{}, Account{}, false, err
	}
	r, h, acct, err := l.runHold(ctx, "capture", org, id, captureCall{org: org, id: id, amount: amount, by: by})
	if err != nil {
		return Hold{}, Account{}, false, err
	}
	return h, acct, r.code == codeRepeat, r.err
}

// captureScript, lua/capture.lua, charges credits from a hold and releases
// the rest.
// KEYS: account, events, holds.
// ARGV[8] hold id, ARGV[9] credits to charge, ARGV[10] who captured it
// (empty for none).
// Reply: {code, state, captured, until_ms, feature, account...}, or
// {NOT_FOUND}.
var captureScript = bind("capture.lua", replyCodes{codeOK: nil, codeRepeat: nil, codeNotFound: ErrHoldNotFound,
	codeEnded: ErrHoldEnded, codeLease: ErrLease})

type captureCall struct {
	org, id string
	amount  int64
	by      string
}

func (captureCall) script() *luaScript { return captureScript }

func (c captureCall) keys(k Keys) []string { return holdKeys(k, c.org) }

func (c captureCall) args(*Ledger) []any { return []any{c.id, c.amount, c.by} }

// ReleaseHold gives the hold's credits back. Releasing a hold that was
// released or expired changes nothing, with repeat true. A gateway's live
// or unreported lease is not released so: ErrLease.
func (l *Ledger) ReleaseHold(ctx context.Context, org, id string) (h Hold, acct Account, repeat bool, err error) {
	if err := validateHoldCall(org, id); err != nil {
		return Hold{}, Account{}, false, err
	}
	by, err := byOf(ctx)
	if err != nil {
		return Hold{}, Account{}, false, err
	}
	r, h, acct, err := l.runHold(ctx, "release", org, id, releaseCall{org: org, id: id, by: by})
	if err != nil {
		return Hold{}, Account{}, false, err
	}
	return h, acct, r.code == codeRepeat, r.err
}

// ReleaseLease gives back the credits of a lease whose gateway an operator
// knows is gone, with the reason in its event. Only an unreported lease is
// released so (a live one is its gateway's: ErrLease); a hold that is no
// lease is ErrNotLease. Credits the gateway spent and did not report are
// given back with the rest: if it comes back, its report is charged then,
// into debt if it must.
func (l *Ledger) ReleaseLease(ctx context.Context, org, id, reason string) (h Hold, acct Account, repeat bool, err error) {
	if err := validateHoldCall(org, id); err != nil {
		return Hold{}, Account{}, false, err
	}
	if err := ValidateReason(reason); err != nil {
		return Hold{}, Account{}, false, err
	}
	by, err := byOf(ctx)
	if err != nil {
		return Hold{}, Account{}, false, err
	}
	r, h, acct, err := l.runHold(ctx, "release", org, id, releaseCall{org: org, id: id, gone: true, reason: reason, by: by})
	if err != nil {
		return Hold{}, Account{}, false, err
	}
	return h, acct, r.code == codeRepeat, r.err
}

// releaseScript, lua/release.lua, gives a hold's credits back.
// KEYS: account, events, holds.
// ARGV[8] hold id, ARGV[9] 1 when an operator knows the gateway of a lease
// is gone, ARGV[10] the reason, ARGV[11] who released it (empty for none).
// Reply: {code, state, amount, until_ms, feature, account...}, or
// {NOT_FOUND}; REFUSED a hold that is no lease, for a gone gateway.
var releaseScript = bind("release.lua", replyCodes{codeOK: nil, codeRepeat: nil, codeNotFound: ErrHoldNotFound,
	codeEnded: ErrHoldEnded, codeLease: ErrLease, codeRefused: ErrNotLease})

// releaseCall releases a hold; with gone, an unreported lease whose gateway
// is gone.
type releaseCall struct {
	org, id string
	gone    bool
	reason  string
	by      string
}

func (releaseCall) script() *luaScript { return releaseScript }

func (c releaseCall) keys(k Keys) []string { return holdKeys(k, c.org) }

func (c releaseCall) args(*Ledger) []any {
	gone := "0"
	if c.gone {
		gone = "1"
	}
	return []any{c.id, gone, c.reason, c.by}
}

// Holds lists org's holds, gateways' leases included (their ids start with
// "lease:"), with those that ended in the last day.
func (l *Ledger) Holds(ctx context.Context, org string) ([]Hold, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return nil, err
	}
	r, err := l.call(ctx, "holds", holdsCall{org})
	if err != nil {
		return nil, err
	}
	if r.err != nil {
		return nil, r.err
	}
	v := r.v
	if len(v) < 2 {
		return nil, fmt.Errorf("holds: reply has %d fields", len(v))
	}
	n, ok := v[1].(int64)
	if !ok || n < 0 || len(v) != 2+7*int(n) {
		return nil, fmt.Errorf("holds: reply has %d fields for %v holds", len(v), v[1])
	}
	holds := make([]Hold, 0, n)
	for i := 2; i < len(v); i += 7 {
		h, err := parseHold(v[i : i+6])
		if err != nil {
			return nil, fmt.Errorf("holds: %w", err)
		}
		rep, ok := v[i+6].(int64)
		if !ok {
			return nil, fmt.Errorf("holds: hold %s: last report is %T, not an integer", h.ID, v[i+6])
		}
		if rep > 0 {
			t := time.UnixMilli(rep).UTC()
			h.LastReport = &t
		}
		holds = append(holds, h)
	}
	slices.SortFunc(holds, func(a, b Hold) int { return strings.Compare(a.ID, b.ID) })
	return holds, nil
}

// holdsScript, lua/holds.lua, lists an org's holds, writing what fell due.
// KEYS: account, events, holds. No ARGV after the head.
// Reply: {OK, n, then n times id, state, amount, captured, until_ms,
// feature, last report ms}, or {NOT_FOUND}.
var holdsScript = bind("holds.lua", replyCodes{codeOK: nil, codeNotFound: ErrNotFound})

type holdsCall struct{ org string }

func (holdsCall) script() *luaScript { return holdsScript }

func (c holdsCall) keys(k Keys) []string { return holdKeys(k, c.org) }

func (holdsCall) args(*Ledger) []any { return nil }

// runHold runs b, a script of org's hold id whose reply is {code, state,
// amount, until_ms, feature, account...}, or {code} alone.
func (l *Ledger) runHold(ctx context.Context, what, org, id string, b binding) (reply, Hold, Account, error) {
	r, err := l.call(ctx, what, b)
	if err != nil {
		return reply{}, Hold{}, Account{}, err
	}
	v := r.v
	if len(v) == 1 {
		return r, Hold{}, Account{}, nil
	}
	if len(v) < 5 {
		return reply{}, Hold{}, Account{}, fmt.Errorf("%s: hold reply has %d fields", what, len(v))
	}
	h, err := parseHold([]any{id, v[1], v[2], int64(0), v[3], v[4]})
	if err != nil {
		return reply{}, Hold{}, Account{}, fmt.Errorf("%s: %w", what, err)
	}
	if h.State == HoldCaptured {
		h.Captured, h.Amount = h.Amount, 0
	}
	acct, err := parseAccount(org, v[5:])
	if err != nil {
		return reply{}, Hold{}, Account{}, fmt.Errorf("%s: %w", what, err)
	}
	return r, h, acct, nil
}

// parseHold reads id, state, amount, captured, until_ms, feature.
func parseHold(v []any) (Hold, error) {
	id, ok1 := v[0].(string)
	st, ok2 := v[1].(string)
	amount, ok3 := v[2].(int64)
	captured, ok4 := v[3].(int64)
	until, ok5 := v[4].(int64)
	feature, ok6 := v[5].(string)
	if !ok1 || !ok2 || !ok3 || !ok4 || !ok5 || !ok6 {
		return Hold{}, fmt.Errorf("hold record %v: wrong field types", v)
	}
	h := Hold{ID: id, Amount: amount, Captured: captured, Feature: feature, Expires: time.UnixMilli(until).UTC()}
	if st != "-" {
		if h.State = holdStates[st]; h.State == "" {
			return Hold{}, fmt.Errorf("hold %s: unknown state %q", id, st)
		}
	}
	return h, nil
}

func validateHoldCall(org, id string) error {
	if err := policy.ValidateOrg(org); err != nil {
		return err
	}
	return ValidateHoldID(id)
}

// ValidateHoldID checks a hold id: 1 to 64 letters, digits, '-', '_', '.'
// or ':' (a lease's).
func ValidateHoldID(id string) error {
	ok := len(id) > 0 && len(id) <= 64
	for i := 0; ok && i < len(id); i++ {
		c := id[i]
		ok = c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == ':'
	}
	if !ok {
		return &policy.InputError{Field: "hold", Value: id, Reason: "must be 1 to 64 letters, digits, '-', '_', '.' or ':'"}
	}
	return nil
}
