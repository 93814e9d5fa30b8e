package meter

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/creditsgw/caddy-credits/policy"
)

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
	// Subject, when set, is whose budget in the org the call also counts
	// against (a user, an API key, a team); it matches the org id pattern.
	// A subject with no budget of its own and no default budget in the org
	// has no limit, and the charge writes nothing for it.
	Subject string
}

// BudgetState is a subject's budget in its window, as a charge left it.
type BudgetState struct {
	// Limit is the credits the subject may spend in a window.
	Limit int64
	// Spent is what it spent in this window; above Limit on overdraft
	// routes, or after the limit was lowered.
	Spent int64
	// Resets is when the window ends.
	Resets time.Time
}

// Remaining is what the budget has left in its window, never below 0.
func (b BudgetState) Remaining() int64 { return max(b.Limit-b.Spent, 0) }

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
	// OverBudget is true when the charge was refused because the
	// subject's budget could not pay it (nothing was charged).
	OverBudget bool
	// Budget is the subject's budget after the charge (or at the refusal),
	// nil when the call had no subject or the subject has no budget.
	Budget *BudgetState
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
	c := l.newChargeCmd(chargeCall(req))
	if err := l.runCharge(ctx, c); err != nil {
		return ChargeResult{}, fmt.Errorf("charge: %w", err)
	}
	return c.result(req)
}

// result reads the charge's reply.
func (c *chargeCmd) result(req ChargeRequest) (ChargeResult, error) {
	r := &c.reply
	code, err := r.int(0)
	if err != nil {
		return ChargeResult{}, fmt.Errorf("charge: %w", err)
	}
	if code == codeWrongType {
		return ChargeResult{}, fmt.Errorf("charge: %w", classify(wrongType(c.keys[:], r.anys())))
	}
	codeErr, known := chargeScript.codes[code]
	if !known {
		return ChargeResult{}, fmt.Errorf("charge: unexpected script code %d", code)
	}
	if codeErr != nil {
		return ChargeResult{}, codeErr
	}
	balance, err := r.int(1)
	if err != nil {
		return ChargeResult{}, fmt.Errorf("charge: %w", err)
	}
	cost, err := r.int(2)
	if err != nil {
		return ChargeResult{}, fmt.Errorf("charge: %w", err)
	}
	res := ChargeResult{Balance: balance, Cost: cost, RequestID: req.RequestID, Attempt: req.Attempt}
	if r.n >= 7 {
		var b [3]int64
		for i := range b {
			if b[i], err = r.int(4 + i); err != nil {
				return ChargeResult{}, fmt.Errorf("charge: budget: %w", err)
			}
		}
		res.Budget = &BudgetState{Limit: b[0], Spent: b[1], Resets: time.UnixMilli(b[2]).UTC()}
	}
	switch code {
	case codeOK:
		res.Charged = true
	case codeBudget:
		res.OverBudget = true
	case codeRepeat:
		res.Charged, res.Replay = true, true
		if r.n > 3 && r.f[3].kind == 's' {
			res.Kept = []byte(r.f[3].s)
		}
	}
	return res, nil
}

// chargeCmd is one charge's keys, arguments and reply, in one allocation:
// args points at its own fields and the ledger's, which go-redis writes as
// the values they point to, so that no argument is boxed on its own.
type chargeCmd struct {
	keys  [6]string
	args  [common + 10]any
	reply chargeReply
	// alone is the whole command when the charge goes alone: EVALSHA, the
	// hash, the number of keys, the keys and args.
	alone [3 + 6 + common + 10]any
	// queued is the charge in the batcher's queue, when it waits there.
	queued queued

	now, month, skew, cost int64
	feature, requestID     string
	attempt, binding       string
	subject, overdraft     string
	limit                  string
}

// newChargeCmd builds c's command: chargeCall's keys and arguments, after
// the head every script takes first.
func (l *Ledger) newChargeCmd(c chargeCall) *chargeCmd {
	now := l.now()
	cmd := &chargeCmd{now: now.UnixMilli(), month: monthIndex(now), skew: l.serverSkew.Load(), cost: c.Cost,
		feature: c.Feature, requestID: c.RequestID, attempt: c.Attempt, binding: "-", subject: "-",
		overdraft: "0", limit: "-1"}
	cmd.keys = chargeKeys(l.keys, c.Org, c.RequestID, c.Binding != "")
	if c.Overdraft {
		cmd.overdraft = "1"
		cmd.limit = strconv.FormatInt(c.OverdraftLimit, 10)
	}
	if c.Binding != "" {
		cmd.binding = c.Binding
	}
	if c.Subject != "" {
		cmd.subject = c.Subject
	}
	cmd.args = [...]any{&cmd.now, &cmd.month, &l.defaultPlan.Allowance, &l.defaultPlan.RechargeMonth, &l.eventsMax,
		&cmd.skew, &l.markerTTL,
		&cmd.feature, &cmd.cost, &cmd.overdraft, &cmd.limit, &cmd.requestID, &l.markerTTL, &cmd.attempt, &cmd.binding,
		inFlightTTL, &cmd.subject}
	return cmd
}

// chargeKeys returns chargeCall's keys, built in one string: the account,
// the request marker, the call log, the holds, the kept response (the
// marker again when the call has no binding) and the budgets.
func chargeKeys(k Keys, org, requestID string, kept bool) [6]string {
	base := len(k.prefix) + len(org) + 4 // prefix:{org}:
	kinds := [...]string{"a", "r:", "c", "h", "b", "k:"}
	n := len(kinds) - 1
	if kept {
		n++
	}
	size := n*base + 2*len(requestID)
	for _, kind := range kinds[:n] {
		size += len(kind)
	}
	var b strings.Builder
	b.Grow(size)
	var ends [6]int
	for i, kind := range kinds[:n] {
		b.WriteString(k.prefix)
		b.WriteString(":{")
		b.WriteString(org)
		b.WriteString("}:")
		b.WriteString(kind)
		if kind == "r:" || kind == "k:" {
			b.WriteString(requestID)
		}
		ends[i] = b.Len()
	}
	all := b.String()
	key := func(i int) string {
		start := 0
		if i > 0 {
			start = ends[i-1]
		}
		return all[start:ends[i]]
	}
	marker := key(1)
	keptKey := marker
	if kept {
		keptKey = key(5)
	}
	return [6]string{key(0), marker, key(2), key(3), keptKey, key(4)}
}

// chargeScript, lua/charge.lua, charges a call.
// KEYS: account, request marker, call log, holds, the request's kept
// response (the marker again for a call without a binding), budgets.
// ARGV[8] feature, ARGV[9] cost, ARGV[10] 1 for overdraft, ARGV[11]
// overdraft limit (-1: none), ARGV[12] request id, ARGV[13] marker lifetime
// in seconds, ARGV[14] attempt id, ARGV[15] the call's binding ('-': none),
// ARGV[16] how long a call with a binding may stay in flight, in seconds,
// ARGV[17] the budget's subject ('-': none).
// Reply: {code, balance, charged, kept response[, limit, spent, resets]};
// REFUSED and BUDGET charged nothing.
var chargeScript = bind("charge.lua", replyCodes{codeOK: nil, codeRefused: nil, codeRepeat: nil,
	codeInFlight: ErrInFlight, codeMismatch: ErrMismatch, codeVoided: ErrVoided, codeBudget: nil})

// chargesScript, lua/charges.lua, runs the charges of a batch (batch.go)
// one after another on a single Redis. KEYS: chargeCall's, six per charge.
// ARGV: the head once, then chargeCall's ten per charge. Reply: one
// charge's reply per charge, or {-1, message} for a charge that raised an
// error.
var chargesScript = newScript("charges.lua")

// chargesText is chargesScript's text, for a batch that finds it not
// loaded.
var chargesText, _ = Script("charges.lua")

// chargeCall is a validated charge whose request id and attempt are set.
type chargeCall ChargeRequest

func (chargeCall) script() *luaScript { return chargeScript }

func (c chargeCall) keys(k Keys) []string {
	marker := k.Request(c.Org, c.RequestID)
	// A call without a binding has no kept response: its marker stands in,
	// so that no key is built for nothing.
	kept := marker
	if c.Binding != "" {
		kept = k.Kept(c.Org, c.RequestID)
	}
	return []string{k.Account(c.Org), marker, k.Calls(c.Org), k.Holds(c.Org), kept, k.Budgets(c.Org)}
}

func (c chargeCall) args(l *Ledger) []any {
	overdraft, limit := "0", "-1"
	if c.Overdraft {
		overdraft = "1"
		limit = strconv.FormatInt(c.OverdraftLimit, 10)
	}
	var bind any = noBinding
	if c.Binding != "" {
		bind = c.Binding
	}
	var subject any = noBinding
	if c.Subject != "" {
		subject = c.Subject
	}
	return []any{c.Feature, c.Cost, overdraft, limit, c.RequestID, l.markerTTL, c.Attempt, bind, inFlightTTL, subject}
}

// inFlightTTL is DefaultInFlightTTL in seconds, as the charge script takes
// it; noBinding is the binding of a call without a key. Both are boxed once.
var (
	inFlightTTL any = strconv.FormatInt(int64(DefaultInFlightTTL/time.Second), 10)
	noBinding   any = "-"
)

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
	if req.Subject != "" {
		if err := policy.ValidateSubject(req.Subject); err != nil {
			return err
		}
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
