// Package meter is the credits ledger: every org's plan, balances, usage and
// events in Redis, changed only by atomic Lua scripts.
package meter

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/policy"
)

// MaxGrants is the most grants an org may have live or pending.
const MaxGrants = 100

// Limits of the amounts the ledger accepts.
const (
	// MaxAmount is the largest top-up, plan allowance or overdraft limit.
	MaxAmount = policy.MaxAmount
	// MaxPurchased is the most purchased credits an org may hold; it keeps
	// every count exact in Lua's double-precision numbers.
	MaxPurchased = 1_000_000_000_000_000
	// NoLimit as an overdraft limit lets the balance go as deep as it must.
	NoLimit = -1
)

// Defaults of Config.
const (
	DefaultTimeout   = 100 * time.Millisecond
	DefaultEventsMax = 1000
	// DefaultMarkerTTL is how long a call without an Idempotency-Key is
	// remembered by its request id: long enough for its retries, its
	// settle and a void that waited in the backlog, not for a day.
	DefaultMarkerTTL = 15 * time.Minute
	// DefaultKeyTTL is how long a call with an Idempotency-Key is
	// remembered, with its kept response, once it has completed.
	DefaultKeyTTL = 24 * time.Hour
	// DefaultInFlightTTL is how long a call with an Idempotency-Key may be
	// in flight: a gateway that died mid-call frees its key after it.
	DefaultInFlightTTL = time.Hour
	// DefaultReferenceTTL is how long a top-up reference is remembered:
	// longer than a year, so that a yearly invoice resent is applied once.
	DefaultReferenceTTL = 400 * 24 * time.Hour
)

var (
	// ErrNotFound means Redis holds nothing for the org.
	ErrNotFound = errors.New("no account for this org")
	// ErrUnknownRequest means no charge with the request id is on record
	// (it never happened, was refused, or its marker expired).
	ErrUnknownRequest = errors.New("no charge with this request id")
	// ErrTooLate means a deferred charge whose first try may have run was
	// not sent again: its request marker may be gone, and it could be
	// charged twice. The call is left unbilled.
	ErrTooLate = errors.New("a charge of unknown outcome is older than its request marker's lifetime")
	// ErrVoided means the charge's attempt was voided before it ran: it
	// charged nothing and the call must not go on.
	ErrVoided = errors.New("this attempt was voided")
	// ErrPurchasedLimit means a top-up would take the org's purchased credits
	// past MaxPurchased.
	ErrPurchasedLimit = errors.New("purchased credits would pass the limit")
	// ErrInFlight means an earlier call with the same request id has not
	// completed yet.
	ErrInFlight = errors.New("an earlier call with this request id is in flight")
	// ErrMismatch means an earlier call with the same request id was bound
	// to another method, path, feature or cost.
	ErrMismatch = errors.New("an earlier call with this request id was another call")
)

// Config holds the ledger's settings; the zero value of each field means its
// default.
type Config struct {
	// Prefix starts every key; default "credits".
	Prefix string
	// DefaultPlan is granted to an org the first time it is seen; its
	// RechargeMonth defaults to 1 (January).
	DefaultPlan Plan
	// Timeout bounds each store call whose context has no earlier deadline;
	// default 100ms.
	Timeout time.Duration
	// EventsMax is how many events each org's list keeps; default 1000.
	EventsMax int64
	// MarkerTTL is how long a charge without an Idempotency-Key is
	// remembered by request id; default 15 minutes.
	MarkerTTL time.Duration
	// KeyTTL is how long a completed call with an Idempotency-Key is
	// remembered, with its kept response; default 24h.
	KeyTTL time.Duration
	// ReferenceTTL is how long a top-up reference is remembered, so that
	// a repeat is applied once; default 400 days.
	ReferenceTTL time.Duration
	// Now is the ledger's clock; default time.Now. Recharges follow it;
	// holds and leases expire by Redis' clock instead.
	Now func() time.Time
}

// Ledger changes and reads orgs' credits. It is safe for concurrent use.
type Ledger struct {
	rdb         redis.UniversalClient
	keys        Keys
	defaultPlan Plan
	timeout     time.Duration
	eventsMax   string
	markerTTL   string
	markerLife  time.Duration
	keyTTL      string
	refTTL      int64 // ms
	now         func() time.Time
	// charges sends concurrent charges together.
	charges *batcher
	// serverSkew is milliseconds added to Redis' clock; tests move it.
	serverSkew atomic.Int64
}

// New returns a ledger over rdb, which may be a single Redis, a Sentinel
// failover client or a Cluster client. Use NewClient for settings that cannot
// charge twice.
func New(rdb redis.UniversalClient, cfg Config) (*Ledger, error) {
	keys, err := NewKeys(cfg.Prefix)
	if err != nil {
		return nil, err
	}
	if cfg.DefaultPlan.RechargeMonth == 0 {
		cfg.DefaultPlan.RechargeMonth = 1
	}
	if err := validatePlan(cfg.DefaultPlan); err != nil {
		return nil, fmt.Errorf("default plan: %w", err)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("timeout %s: must be positive", cfg.Timeout)
	}
	if cfg.EventsMax == 0 {
		cfg.EventsMax = DefaultEventsMax
	}
	if cfg.EventsMax < 1 {
		return nil, fmt.Errorf("events max %d: must be positive", cfg.EventsMax)
	}
	if cfg.MarkerTTL == 0 {
		cfg.MarkerTTL = DefaultMarkerTTL
	}
	if cfg.MarkerTTL < time.Second {
		return nil, fmt.Errorf("marker lifetime %s: must be at least a second", cfg.MarkerTTL)
	}
	if cfg.KeyTTL == 0 {
		cfg.KeyTTL = DefaultKeyTTL
	}
	if cfg.KeyTTL < time.Second {
		return nil, fmt.Errorf("Idempotency-Key lifetime %s: must be at least a second", cfg.KeyTTL)
	}
	if cfg.ReferenceTTL == 0 {
		cfg.ReferenceTTL = DefaultReferenceTTL
	}
	if cfg.ReferenceTTL < time.Second {
		return nil, fmt.Errorf("reference lifetime %s: must be at least a second", cfg.ReferenceTTL)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Ledger{
		rdb:         rdb,
		keys:        keys,
		defaultPlan: cfg.DefaultPlan,
		timeout:     cfg.Timeout,
		eventsMax:   strconv.FormatInt(cfg.EventsMax, 10),
		markerTTL:   strconv.FormatInt(int64(cfg.MarkerTTL/time.Second), 10),
		markerLife:  cfg.MarkerTTL,
		keyTTL:      strconv.FormatInt(int64(cfg.KeyTTL/time.Second), 10),
		refTTL:      cfg.ReferenceTTL.Milliseconds(),
		now:         cfg.Now,
		charges:     newBatcher(rdb, batchLanes, batchMax, chargesScript),
	}, nil
}

// remembers reports whether a charge sent at sent is still remembered by
// its request id, with a tenth of the marker's lifetime to spare: a charge
// sent again after its marker is gone could be charged twice.
func (l *Ledger) remembers(sent time.Time) bool {
	return time.Since(sent)+l.timeout < l.markerLife-l.markerLife/10
}

// Keys returns the ledger's key builder.
func (l *Ledger) Keys() Keys { return l.keys }

// DefaultPlan returns the plan granted to orgs seen for the first time.
func (l *Ledger) DefaultPlan() Plan { return l.defaultPlan }

// ChargeRequest is one call to charge.
type ChargeRequest struct {
	// Org is the org charged.
	Org string
	// Feature is the usage label.
	Feature string
	// Cost is the credits the call costs, 1 to policy.MaxCost.
	Cost int64
	// RequestID identifies the call: the same org and request id are charged
	// once for MarkerTTL, unless the charge was refunded in full, which frees
	// the id for a retry. Empty means a fresh random id.
	RequestID string
	// Overdraft lets the balance go below zero, down to -OverdraftLimit;
	// without it a charge the balance cannot cover is refused.
	Overdraft bool
	// OverdraftLimit is the deepest the balance may go, or NoLimit.
	OverdraftLimit int64
	// Attempt identifies this try at the call, as opposed to a client's
	// retry of it with the same RequestID: a charge repeated with the same
	// attempt (after a lost reply) answers as the first did, and Void takes
	// back only its own attempt's charge. Empty means a fresh random id.
	Attempt string
	// Binding, for a call with an Idempotency-Key, is what its method,
	// path, feature and cost hash to (see Binding): a later call with the
	// same request id and another binding gets ErrMismatch; one while the
	// first is in flight gets ErrInFlight; one after it completed, the
	// first's result and kept response. Empty for a call without a key.
	Binding string
}

// Binding returns the binding of a call with an Idempotency-Key.
func Binding(method, path, feature string, cost int64) string {
	sum := sha256.Sum256([]byte(method + " " + path + " " + feature + " " + strconv.FormatInt(cost, 10)))
	return hex.EncodeToString(sum[:12])
}

// ChargeResult is the ledger's answer to a charge.
type ChargeResult struct {
	// Charged is true when the credits were taken (now or by an earlier charge
	// with the same request id).
	Charged bool
	// Replay is true when an earlier call with the same request id
	// completed and its charge stands; Balance and Cost are then that
	// charge's, and Kept its kept response (nil when it was too large to
	// keep, or the call had no Idempotency-Key).
	Replay bool
	// Kept is the response Keep kept for the earlier call.
	Kept []byte
	// Balance is the balance after the charge, or the current balance when
	// the charge was refused.
	Balance int64
	// Cost is the credits taken.
	Cost int64
	// RequestID is the request id the charge was recorded under.
	RequestID string
	// Attempt is the attempt id the charge was made with.
	Attempt string
}

// Charge spends req.Cost credits of req.Org's, allowance first, then
// purchased credits. It is one script and one round trip; a refused charge
// writes nothing.
func (l *Ledger) Charge(ctx context.Context, req ChargeRequest) (ChargeResult, error) {
	if err := validateCharge(&req); err != nil {
		return ChargeResult{}, err
	}
	if req.RequestID == "" {
		req.RequestID = NewRequestID()
	}
	if req.Attempt == "" {
		req.Attempt = NewRequestID()
	}
	overdraft, limit := "0", "-1"
	if req.Overdraft {
		overdraft = "1"
		limit = strconv.FormatInt(req.OverdraftLimit, 10)
	}
	marker := l.keys.Request(req.Org, req.RequestID)
	// A call without a key has no kept response: its marker stands in, so
	// that no key is built for nothing.
	var bind any = noBinding
	kept := marker
	if req.Binding != "" {
		bind, kept = req.Binding, l.keys.Kept(req.Org, req.RequestID)
	}
	keys := []string{l.keys.Account(req.Org), marker, l.keys.Calls(req.Org), l.keys.Holds(req.Org), kept}
	raw, err := l.evalWith(ctx, l.charges, chargeScript, keys, []any{req.Feature, req.Cost, overdraft, limit, req.RequestID, l.markerTTL, req.Attempt,
		bind, inFlightTTL})
	if err != nil {
		return ChargeResult{}, fmt.Errorf("charge: %w", err)
	}
	v, err := ints(raw, 3)
	if err != nil {
		return ChargeResult{}, fmt.Errorf("charge: %w", err)
	}
	res := ChargeResult{Balance: v[1], Cost: v[2], RequestID: req.RequestID, Attempt: req.Attempt}
	switch v[0] {
	case codeOK:
		res.Charged = true
	case codeRefused:
	case codeRepeat:
		res.Charged, res.Replay = true, true
		if len(raw) > 3 {
			if kept, ok := raw[3].(string); ok {
				res.Kept = []byte(kept)
			}
		}
	case codeInFlight:
		return ChargeResult{}, ErrInFlight
	case codeMismatch:
		return ChargeResult{}, ErrMismatch
	case codeVoided:
		return ChargeResult{}, ErrVoided
	default:
		return ChargeResult{}, fmt.Errorf("charge: unexpected script code %d", v[0])
	}
	return res, nil
}

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
	keys := []string{l.keys.Account(org), l.keys.TopUps(org), l.keys.Events(org), l.keys.Holds(org), l.keys.Alerts(org)}
	code, acct, err := l.runAccount(ctx, topUpScript, org, keys, amount, reference, MaxPurchased, l.refTTL, unixMilli(expires), MaxGrants)
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
	case codeFull:
		return acct, false, ErrGrantsFull
	case codeEnded:
		return acct, false, ErrExpiresPast
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

// OwnReferencePrefix starts the references the gateway gives writes that
// come without one: no client sends them again, so a write of unknown
// outcome under one is voided (VoidTopUp, VoidHold, VoidWrite).
const OwnReferencePrefix = "gw:"

// NewOwnReference returns a fresh reference of the gateway's own.
func NewOwnReference() string { return OwnReferencePrefix + NewRequestID() }

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
	code, acct, err := l.runAccount(ctx, planScript, org, keys, plan.Allowance, plan.RechargeMonth, reference, l.refTTL, imagesKept(reference), plan.Rollover)
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

// Account reads org's account, with any recharge that fell due applied. It
// returns ErrNotFound when Redis holds nothing for the org.
func (l *Ledger) Account(ctx context.Context, org string) (Account, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return Account{}, err
	}
	keys := []string{l.keys.Account(org), l.keys.Events(org), l.keys.Holds(org)}
	code, acct, err := l.runAccount(ctx, accountScript, org, keys)
	if err != nil {
		return Account{}, fmt.Errorf("account: %w", err)
	}
	if code == codeNotFound {
		return Account{}, ErrNotFound
	}
	return acct, nil
}

// Balance is Account, but for an org with no record it answers what the
// default plan would give, writing nothing.
func (l *Ledger) Balance(ctx context.Context, org string) (Account, error) {
	acct, err := l.Account(ctx, org)
	if errors.Is(err, ErrNotFound) {
		return defaultAccount(org, l.defaultPlan, l.now()), nil
	}
	return acct, err
}

// Ping reports whether the store answers within the ledger's timeout.
func (l *Ledger) Ping(ctx context.Context) error {
	ctx, cancel := l.deadline(ctx)
	defer cancel()
	return l.rdb.Ping(ctx).Err()
}

// Events returns up to limit of org's most recent events, newest first:
// its account events and its call events (kept a marker's lifetime after
// the org's last call), in the order they were written.
func (l *Ledger) Events(ctx context.Context, org string, limit int64) ([]Event, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return nil, err
	}
	if limit < 1 || limit > 1000 {
		return nil, rangeError("limit", limit, 1, 1000)
	}
	ctx, cancel := l.deadline(ctx)
	defer cancel()
	// Both lists are in the org's slot, so one pipeline reads them at once.
	pipe := l.rdb.Pipeline()
	account := pipe.LRange(ctx, l.keys.Events(org), 0, limit-1)
	calls := pipe.LRange(ctx, l.keys.Calls(org), 0, limit-1)
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, classify(fmt.Errorf("events: %w", err))
	}
	a, err := parseEvents(account.Val())
	if err != nil {
		return nil, &classed{class: Corrupt, err: fmt.Errorf("events: %w", err)}
	}
	c, err := parseEvents(calls.Val())
	if err != nil {
		return nil, &classed{class: Corrupt, err: fmt.Errorf("events: %w", err)}
	}
	return mergeEvents(a, c, int(limit)), nil
}

// mergeEvents merges the org's two lists, each newest first, into up to
// limit events, newest first: their numbers come from one sequence.
func mergeEvents(a, c []Event, limit int) []Event {
	events := make([]Event, 0, min(len(a)+len(c), limit))
	for len(events) < limit && (len(a) > 0 || len(c) > 0) {
		if len(c) == 0 || (len(a) > 0 && eventNumber(a[0]) > eventNumber(c[0])) {
			events, a = append(events, a[0]), a[1:]
		} else {
			events, c = append(events, c[0]), c[1:]
		}
	}
	return events
}

// eventNumber is an event's place in the org's sequence (parseEvent
// checked that its ID is a number).
func eventNumber(e Event) int64 {
	n, _ := strconv.ParseInt(e.ID, 10, 64)
	return n
}

func parseEvents(items []string) ([]Event, error) {
	events := make([]Event, 0, len(items))
	for _, item := range items {
		e, err := parseEvent(item)
		if err != nil {
			return nil, err
		}
		events = append(events, e)
	}
	return events, nil
}

// parseEvent reads one event of a list: "seq kind delta balance feature ref
// ms [reason]", with "-" for an empty feature or ref; the reason, when there
// is one, is the rest of the line.
func parseEvent(s string) (Event, error) {
	f := strings.SplitN(s, " ", 8)
	if len(f) < 7 {
		return Event{}, fmt.Errorf("event %q: %d fields, want 7", s, len(f))
	}
	var n [4]int64
	for i, idx := range []int{0, 2, 3, 6} {
		v, err := strconv.ParseInt(f[idx], 10, 64)
		if err != nil {
			return Event{}, fmt.Errorf("event %q: %w", s, err)
		}
		n[i] = v
	}
	dash := func(v string) string {
		if v == "-" {
			return ""
		}
		return v
	}
	e := Event{ID: f[0], Kind: f[1], Delta: n[1], Balance: n[2], Feature: dash(f[4]), Ref: dash(f[5]),
		Time: time.UnixMilli(n[3]).UTC()}
	if len(f) == 8 {
		e.Reason = f[7]
	}
	return e, nil
}

func (l *Ledger) deadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if d, ok := ctx.Deadline(); ok && time.Until(d) <= l.timeout {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, l.timeout)
}

// run runs script with the common arguments followed by args, and checks the
// reply is at least n integers.
func (l *Ledger) run(ctx context.Context, script *redis.Script, keys []string, n int, args ...any) ([]int64, error) {
	v, err := l.eval(ctx, script, keys, args)
	if err != nil {
		return nil, err
	}
	return ints(v, n)
}

// ints reads the first n fields of a script reply, which must be integers.
func ints(v []any, n int) ([]int64, error) {
	if len(v) < n {
		return nil, fmt.Errorf("script reply has %d fields, want %d", len(v), n)
	}
	out := make([]int64, n)
	for i := range out {
		x, ok := v[i].(int64)
		if !ok {
			return nil, fmt.Errorf("script reply field %d is %T, not an integer", i, v[i])
		}
		out[i] = x
	}
	return out, nil
}

func (l *Ledger) runAccount(ctx context.Context, script *redis.Script, org string, keys []string, args ...any) (int64, Account, error) {
	v, err := l.eval(ctx, script, keys, args)
	if err != nil {
		return 0, Account{}, err
	}
	if len(v) == 0 {
		return 0, Account{}, errors.New("empty script reply")
	}
	code, ok := v[0].(int64)
	if !ok {
		return 0, Account{}, fmt.Errorf("script code is %T, not an integer", v[0])
	}
	if code == codeNotFound {
		return code, Account{}, nil
	}
	acct, err := parseAccount(org, v[1:])
	return code, acct, err
}

// eval runs script. Every script is idempotent (by request id, reference,
// lease sequence number, or because it sets a state), so a call whose
// connection broke is sent again, on a fresh connection, while the deadline
// allows.
func (l *Ledger) eval(ctx context.Context, script *redis.Script, keys []string, args []any) ([]any, error) {
	return l.evalWith(ctx, nil, script, keys, args)
}

// evalWith is eval whose first try goes through batcher b, when there is
// one, together with other concurrent calls.
func (l *Ledger) evalWith(ctx context.Context, b *batcher, script *redis.Script, keys []string, args []any) ([]any, error) {
	ctx, cancel := l.deadline(ctx)
	defer cancel()
	now := l.now()
	all := make([]any, 0, common+len(args))
	all = append(all, now.UnixMilli(), monthIndex(now), l.defaultPlan.Allowance, l.defaultPlan.RechargeMonth, l.eventsMax,
		l.serverSkew.Load(), l.markerTTL)
	all = append(all, args...)
	var raw any
	var err error
	sent := false // whether any try may have reached Redis
	for try, wait := 0, 5*time.Millisecond; ; try, wait = try+1, wait*2 {
		if try == 0 && b != nil {
			var s bool
			raw, s, err = b.run(ctx, script, keys, all)
			if s && redis.HasErrorPrefix(err, "NOSCRIPT") {
				// A pipeline sends the script's hash alone; Run loads it.
				raw, err = script.Run(ctx, l.rdb, keys, all...).Result()
			}
			sent = s && (err == nil || !changedNothing(err))
		} else {
			raw, err = script.Run(ctx, l.rdb, keys, all...).Result()
			sent = sent || (err == nil || !changedNothing(err))
		}
		if err == nil || try == maxTries-1 || !retryable(err) {
			break
		}
		select {
		case <-ctx.Done():
			err = ctx.Err()
		case <-time.After(wait):
			continue
		}
		break
	}
	if err != nil {
		if !sent {
			return nil, classify(unsentError{err})
		}
		return nil, classify(err)
	}
	v, ok := raw.([]any)
	if !ok {
		return nil, fmt.Errorf("script reply is %T, not an array", raw)
	}
	if len(v) > 0 && v[0] == int64(codeWrongType) {
		return nil, classify(wrongType(keys, v))
	}
	return v, nil
}

// common is the number of arguments every script takes first (lua/lib/base.lua's
// ARGV[1..7]).
const common = 7

// inFlightTTL is DefaultInFlightTTL in seconds, as the charge script takes
// it; noBinding is the binding of a call without a key. Both are boxed once.
var (
	inFlightTTL any = strconv.FormatInt(int64(DefaultInFlightTTL/time.Second), 10)
	noBinding   any = "-"
)

// maxTries bounds the tries of one store call within its deadline.
const maxTries = 4

// retryable reports whether err is a broken connection or a Redis that is
// loading, failing over or resharding: worth another try of an idempotent
// script. A deadline is not: there is no time left.
func retryable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return false
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, net.ErrClosed) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) && !ne.Timeout() {
		return true
	}
	msg := err.Error()
	for _, p := range []string{"LOADING", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "READONLY"} {
		if strings.HasPrefix(msg, p) {
			return true
		}
	}
	return false
}

// unsentError is the error of a store call none of whose tries changed
// anything.
type unsentError struct{ err error }

func (e unsentError) Error() string { return e.err.Error() }
func (e unsentError) Unwrap() error { return e.err }

// Unsent reports whether a store call's error means it certainly changed
// nothing: it never reached Redis (no connection could be had), or Redis
// refused it before it wrote (out of memory, loading, a replica: see
// transientCodes). Any other error leaves the outcome unknown.
func Unsent(err error) bool {
	var u unsentError
	return errors.As(err, &u)
}

// changedNothing reports whether one try's error means it changed nothing.
func changedNothing(err error) bool {
	if errors.Is(err, redis.ErrPoolTimeout) || refused(err) {
		return true
	}
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// NewRequestID returns a random request id.
func NewRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func validateCharge(req *ChargeRequest) error {
	if err := policy.ValidateOrg(req.Org); err != nil {
		return err
	}
	if err := policy.ValidateFeature(req.Feature); err != nil {
		return err
	}
	if req.Cost < policy.MinCost || req.Cost > policy.MaxCost {
		return rangeError("cost", req.Cost, policy.MinCost, policy.MaxCost)
	}
	if req.RequestID != "" {
		if err := validateRequestID(req.RequestID); err != nil {
			return err
		}
	}
	if req.Overdraft && req.OverdraftLimit != NoLimit && (req.OverdraftLimit < 0 || req.OverdraftLimit > MaxAmount) {
		return rangeError("overdraft limit", req.OverdraftLimit, 0, MaxAmount)
	}
	return nil
}

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

// MaxRequestIDLen is the longest request id: room for a 255-character
// Idempotency-Key with a short prefix.
const MaxRequestIDLen = 300

func validateRequestID(id string) error {
	ok := len(id) > 0 && len(id) <= MaxRequestIDLen
	for i := 0; ok && i < len(id); i++ {
		ok = id[i] > ' ' && id[i] <= '~'
	}
	if !ok {
		return &policy.InputError{Field: "request id", Value: id, Reason: "must be 1 to 300 printable ASCII characters"}
	}
	return nil
}

func validateReference(ref string) error {
	if err := policy.ValidateIdempotencyKey(ref); err != nil {
		return &policy.InputError{Field: "reference", Value: ref, Reason: "must be 1 to 255 printable ASCII characters"}
	}
	return nil
}

func rangeError(field string, v, lo, hi int64) error {
	return &policy.InputError{Field: field, Value: strconv.FormatInt(v, 10), Reason: fmt.Sprintf("must be %d to %d", lo, hi)}
}
