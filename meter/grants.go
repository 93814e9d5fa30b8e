package meter

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/creditsgw/caddy-credits/policy"
)

// Grant kinds.
const (
	KindAllowance   = "allowance"
	KindRollover    = "rollover"
	KindPurchased   = "purchased"
	KindPromotional = "promotional"
)

// Grant states.
const (
	GrantPending = "pending"
	GrantLive    = "live"
	GrantSpent   = "spent"
	GrantExpired = "expired"
	GrantVoided  = "voided"
)

// The ids of the two grants the account keeps in its own fields: this
// period's allowance, and the standing purchased grant that top-ups with
// no expiry and positive adjustments add to.
const (
	AllowanceGrant = "allowance"
	PurchasedGrant = "purchased"
)

// DefaultPriority is a grant's priority when none is given; lower is spent
// first.
const DefaultPriority = 50

var (
	// ErrGrantsFull means the org has MaxGrants grants live or pending.
	ErrGrantsFull = fmt.Errorf("the org has %d grants live or pending, the most it may", MaxGrants)
	// ErrGrantNotFound means the org has no grant with this id.
	ErrGrantNotFound = errors.New("no grant with this id")
	// ErrGrantEnded means the grant was spent or expired: there is nothing
	// to void.
	ErrGrantEnded = errors.New("the grant has ended")
	// ErrGrantFixed means the grant is not voided that way: the allowance
	// changes with the plan, purchased credits with an adjustment.
	ErrGrantFixed = errors.New("the grant cannot be voided")
	// ErrExpiresPast means a grant's expiry is not after now and after its
	// effective time.
	ErrExpiresPast = errors.New("expires must be after now and after effective")
)

// Grant is one grant of credits to an org.
type Grant struct {
	// ID is the grant's id: "allowance", "purchased", or g<n>.
	ID string `json:"grant"`
	// Kind is allowance, rollover, purchased or promotional.
	Kind string `json:"kind"`
	// Amount is what the grant gave.
	Amount int64 `json:"amount"`
	// Remaining is what it can still give: what live holds took from it is
	// theirs (Held).
	Remaining int64 `json:"remaining"`
	// Held is what live holds took from it.
	Held int64 `json:"held"`
	// Priority orders the burn-down: lower is spent first.
	Priority int `json:"priority"`
	// Effective is when it is spendable from.
	Effective time.Time `json:"effective"`
	// Expires is when what remains of it is lost; nil when never.
	Expires *time.Time `json:"expires"`
	// State is pending, live, spent, expired or voided.
	State string `json:"state"`
	// Ended is when it was spent, expired or voided.
	Ended *time.Time `json:"ended,omitempty"`
	// Reference is the reference it was made with.
	Reference string `json:"reference,omitempty"`
	// Reason is why it was given, or voided.
	Reason string `json:"reason,omitempty"`
}

// GrantRequest is a grant an operator gives.
type GrantRequest struct {
	// Amount is 1 to MaxAmount.
	Amount int64
	// Kind is promotional (the default); top-ups make purchased grants, and
	// plans allowance and rollover ones.
	Kind string
	// Priority is 0 to 100; nil means DefaultPriority.
	Priority *int
	// Effective is when it becomes spendable; zero means now.
	Effective time.Time
	// Expires is when what remains of it is lost; zero means never.
	Expires time.Time
	// Reference makes the grant applied once per org; empty means a fresh
	// random one.
	Reference string
	// Reason is kept with the grant and its event.
	Reason string
}

var kindLetters = map[string]string{"a": KindAllowance, "r": KindRollover, "p": KindPurchased, "o": KindPromotional}

var stateLetters = map[string]string{"p": GrantPending, "l": GrantLive, "s": GrantSpent, "x": GrantExpired, "v": GrantVoided}

// parseGrant reads a grant's record, as lua/lib/account.lua's grant_str
// writes it: "state kind amount remaining held priority effective expires
// ended ref [reason]".
func parseGrant(id, rec string) (Grant, error) {
	f := strings.SplitN(rec, " ", 11)
	if len(f) < 10 {
		return Grant{}, fmt.Errorf("%w: grant %s: %q", ErrCorrupt, id, rec)
	}
	var n [7]int64
	for i := range n {
		x, err := strconv.ParseInt(f[i+2], 10, 64)
		if err != nil {
			return Grant{}, fmt.Errorf("%w: grant %s: %q", ErrCorrupt, id, rec)
		}
		n[i] = x
	}
	state, ok1 := stateLetters[f[0]]
	kind, ok2 := kindLetters[f[1]]
	if !ok1 || !ok2 {
		return Grant{}, fmt.Errorf("%w: grant %s: %q", ErrCorrupt, id, rec)
	}
	g := Grant{
		ID: "g" + id, Kind: kind, Amount: n[0], Remaining: n[1], Held: n[2], Priority: int(n[3]),
		Effective: time.UnixMilli(n[4]).UTC(), State: state,
	}
	if n[5] > 0 {
		t := time.UnixMilli(n[5]).UTC()
		g.Expires = &t
	}
	if n[6] > 0 {
		t := time.UnixMilli(n[6]).UTC()
		g.Ended = &t
	}
	if f[9] != "-" {
		g.Reference = f[9]
	}
	if len(f) == 11 {
		g.Reason = f[10]
	}
	return g, nil
}

// ValidateGrant checks a grant request as the ledger would, before any
// call: amount, kind, priority, and an expiry after the effective time.
func ValidateGrant(req GrantRequest) error {
	if req.Amount < 1 || req.Amount > MaxAmount {
		return rangeError("amount", req.Amount, 1, MaxAmount)
	}
	if req.Kind != "" && req.Kind != KindPromotional {
		return fmt.Errorf("kind %q: grants given so are promotional (top-ups make purchased grants, plans allowance and rollover)", req.Kind)
	}
	if req.Priority != nil && (*req.Priority < 0 || *req.Priority > 100) {
		return rangeError("priority", int64(*req.Priority), 0, 100)
	}
	if !req.Expires.IsZero() && !req.Effective.IsZero() && !req.Expires.After(req.Effective) {
		return ErrExpiresPast
	}
	if req.Reference != "" {
		if err := validateReference(req.Reference); err != nil {
			return err
		}
	}
	if req.Reason != "" {
		return ValidateReason(req.Reason)
	}
	return nil
}

// unixMilli is t in Unix milliseconds, 0 for the zero time.
func unixMilli(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

// Grant gives org a promotional grant. A reference is applied once per
// org: a repeat answers the grant it made, with applied false.
func (l *Ledger) Grant(ctx context.Context, org string, req GrantRequest) (g Grant, acct Account, applied bool, err error) {
	if err := policy.ValidateOrg(org); err != nil {
		return Grant{}, Account{}, false, err
	}
	if err := ValidateGrant(req); err != nil {
		return Grant{}, Account{}, false, err
	}
	prio := DefaultPriority
	if req.Priority != nil {
		prio = *req.Priority
	}
	ref := req.Reference
	if ref == "" {
		ref = NewRequestID()
	}
	by, err := byOf(ctx)
	if err != nil {
		return Grant{}, Account{}, false, err
	}
	r, err := l.call(ctx, "grant", grantCall{org: org, req: req, priority: prio, reference: ref, by: by})
	if err != nil {
		return Grant{}, Account{}, false, err
	}
	if r.code == codeEnded {
		return Grant{}, Account{}, false, r.err
	}
	if len(r.v) < 3 {
		return Grant{}, Account{}, false, fmt.Errorf("grant: reply has %d fields", len(r.v))
	}
	id, _ := r.v[1].(string)
	rec, _ := r.v[2].(string)
	acct, err = parseAccount(org, r.v[3:])
	if err != nil {
		return Grant{}, Account{}, false, fmt.Errorf("grant: %w", err)
	}
	if id != "" {
		if g, err = parseGrant(id, rec); err != nil {
			return Grant{}, Account{}, false, err
		}
	}
	return g, acct, r.code == codeOK, r.err
}

// grantScript, lua/grant.lua, gives an org a grant.
// KEYS: account, references, events, holds, alerts, grant references.
// ARGV[8] amount, ARGV[9] kind letter, ARGV[10] priority, ARGV[11]
// effective, Redis ms (0: now), ARGV[12] expires, Redis ms (0: never),
// ARGV[13] reference, ARGV[14] reason, ARGV[15] the most grants an org may
// have live or pending, ARGV[16] who made it (empty for none).
// Reply: {code, id, record, account...} ({ENDED} alone).
var grantScript = bind("grant.lua", replyCodes{codeOK: nil, codeRepeat: nil, codeEnded: ErrExpiresPast,
	codeFull: ErrGrantsFull})

type grantCall struct {
	org       string
	req       GrantRequest
	priority  int
	reference string
	by        string
}

func (grantCall) script() *luaScript { return grantScript }

func (c grantCall) keys(k Keys) []string {
	return []string{k.Account(c.org), k.TopUps(c.org), k.Events(c.org), k.Holds(c.org), k.Alerts(c.org),
		k.GrantRefs(c.org)}
}

func (c grantCall) args(l *Ledger) []any {
	return []any{c.req.Amount, "o", c.priority, unixMilli(c.req.Effective), unixMilli(c.req.Expires), c.reference,
		c.req.Reason, MaxGrants, c.by}
}

// Grants lists org's grants: those live and pending in burn-down order
// (this period's allowance and the standing purchased grant among them),
// then those that ended in the last 90 days, the latest first.
func (l *Ledger) Grants(ctx context.Context, org string) ([]Grant, Account, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return nil, Account{}, err
	}
	r, err := l.call(ctx, "grants", grantsCall{org: org})
	if err != nil {
		return nil, Account{}, err
	}
	if r.err != nil {
		return nil, Account{}, r.err
	}
	v := r.v
	if len(v) < 2 {
		return nil, Account{}, fmt.Errorf("grants: reply has %d fields", len(v))
	}
	n, ok := v[1].(int64)
	if !ok || n < 0 || len(v) < 2+2*int(n) {
		return nil, Account{}, fmt.Errorf("grants: reply of %d fields for %v grants", len(v), v[1])
	}
	var grants []Grant
	for i := range int(n) {
		id, ok1 := v[2+2*i].(string)
		rec, ok2 := v[3+2*i].(string)
		if !ok1 || !ok2 {
			return nil, Account{}, fmt.Errorf("grants: grant %d is %T, %T", i, v[2+2*i], v[3+2*i])
		}
		g, err := parseGrant(id, rec)
		if err != nil {
			return nil, Account{}, err
		}
		grants = append(grants, g)
	}
	acct, err := parseAccount(org, v[2+2*int(n):])
	if err != nil {
		return nil, Account{}, fmt.Errorf("grants: %w", err)
	}
	return ordered(acct, grants), acct, nil
}

// grantsScript, lua/grants.lua, lists an org's grants.
// KEYS: account, events, holds, grant references.
// Reply: {code, n, n id and grant pairs, account...} ({NOT_FOUND} alone).
var grantsScript = bind("grants.lua", replyCodes{codeOK: nil, codeNotFound: ErrNotFound})

type grantsCall struct{ org string }

func (grantsCall) script() *luaScript { return grantsScript }

func (c grantsCall) keys(k Keys) []string {
	return []string{k.Account(c.org), k.Events(c.org), k.Holds(c.org), k.GrantRefs(c.org)}
}

func (grantsCall) args(*Ledger) []any { return nil }

// ordered is the grants of acct in the order Grants lists them, with the
// two grants the account keeps in its own fields.
func ordered(acct Account, extra []Grant) []Grant {
	expires := acct.NextRecharge
	allowance := Grant{
		ID: AllowanceGrant, Kind: KindAllowance, Amount: acct.Plan.Allowance,
		Remaining: acct.AllowanceRemaining - acct.allowanceHeld + acct.Debt, Held: acct.allowanceHeld,
		Priority: DefaultPriority, Effective: acct.PeriodStart, Expires: &expires, State: GrantLive,
	}
	var paidExtra int64
	for _, g := range extra {
		if g.Kind == KindPurchased && g.State == GrantLive {
			paidExtra += g.Remaining + g.Held
		}
	}
	live := []Grant{allowance}
	if standing := acct.Purchased - paidExtra; standing > 0 {
		live = append(live, Grant{
			ID: PurchasedGrant, Kind: KindPurchased, Amount: standing, Remaining: standing - acct.purchasedHeld,
			Held: acct.purchasedHeld, Priority: DefaultPriority, State: GrantLive,
		})
	}
	var ended []Grant
	for _, g := range extra {
		if g.State == GrantLive || g.State == GrantPending {
			live = append(live, g)
		} else {
			ended = append(ended, g)
		}
	}
	never := time.Unix(math.MaxInt32, 0)
	// The last key: the standing purchased grant is the oldest, the
	// allowance goes after the extra grants (a rollover, as old as it and
	// expiring with it, goes first), and extra grants by their number.
	rank := func(g Grant) int64 {
		switch g.ID {
		case PurchasedGrant:
			return -1
		case AllowanceGrant:
			return math.MaxInt64
		}
		n, _ := strconv.ParseInt(strings.TrimPrefix(g.ID, "g"), 10, 64)
		return n
	}
	slices.SortStableFunc(live, func(a, b Grant) int {
		ea, eb := never, never
		if a.Expires != nil {
			ea = *a.Expires
		}
		if b.Expires != nil {
			eb = *b.Expires
		}
		paid := func(g Grant) int {
			if g.Kind == KindPurchased {
				return 1
			}
			return 0
		}
		return cmp.Or(
			cmp.Compare(a.Priority, b.Priority),
			ea.Compare(eb),
			cmp.Compare(paid(a), paid(b)),
			a.Effective.Compare(b.Effective),
			cmp.Compare(rank(a), rank(b)),
		)
	})
	slices.SortStableFunc(ended, func(a, b Grant) int { return b.Ended.Compare(*a.Ended) })
	return append(live, ended...)
}

// VoidGrant voids org's grant id: what remains of it is gone, and the
// reason is kept in its event. A repeat changes nothing.
func (l *Ledger) VoidGrant(ctx context.Context, org, id, reason string) (Account, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return Account{}, err
	}
	if reason != "" {
		if err := ValidateReason(reason); err != nil {
			return Account{}, err
		}
	}
	if id == AllowanceGrant || id == PurchasedGrant {
		return Account{}, ErrGrantFixed
	}
	num, ok := strings.CutPrefix(id, "g")
	if n, err := strconv.ParseUint(num, 10, 32); !ok || err != nil || n == 0 || "g"+strconv.FormatUint(n, 10) != id {
		return Account{}, ErrGrantNotFound
	}
	return l.voidGrant(ctx, org, num, "", reason)
}

// VoidGrantRef makes sure a grant of the gateway's own reference, whose
// outcome could not be learned, does not stand: voided if it was made,
// never made if it still arrives. A repeat changes nothing.
func (l *Ledger) VoidGrantRef(ctx context.Context, org, reference string) error {
	if err := policy.ValidateOrg(org); err != nil {
		return err
	}
	if err := validateReference(reference); err != nil {
		return err
	}
	_, err := l.voidGrant(ctx, org, "", reference, "")
	if errors.Is(err, ErrGrantNotFound) || errors.Is(err, ErrGrantEnded) {
		return nil
	}
	return err
}

func (l *Ledger) voidGrant(ctx context.Context, org, num, reference, reason string) (Account, error) {
	by, err := byOf(ctx)
	if err != nil {
		return Account{}, err
	}
	r, err := l.call(ctx, "void grant", voidGrantCall{org: org, num: num, reference: reference, reason: reason, by: by})
	if err != nil {
		return Account{}, err
	}
	if r.code == codeNotFound {
		return Account{}, r.err
	}
	if len(r.v) < 2 {
		return Account{}, fmt.Errorf("void grant: reply has %d fields", len(r.v))
	}
	acct, err := parseAccount(org, r.v[2:])
	if err != nil {
		return Account{}, fmt.Errorf("void grant: %w", err)
	}
	return acct, r.err
}

// voidGrantScript, lua/voidgrant.lua, voids a grant.
// KEYS: account, events, holds, references, grant references.
// ARGV[8] grant number (” to find it by reference), ARGV[9] reason,
// ARGV[10] reference (” when found by number), ARGV[11] how long a
// reference is kept, in ms, ARGV[12] who voided it (empty for none).
// Reply: {code, state, account...} ({NOT_FOUND} alone).
var voidGrantScript = bind("voidgrant.lua", replyCodes{codeOK: nil, codeRepeat: nil, codeEnded: ErrGrantEnded,
	codeNotFound: ErrGrantNotFound})

type voidGrantCall struct {
	org, num, reference, reason string
	by                          string
}

func (voidGrantCall) script() *luaScript { return voidGrantScript }

func (c voidGrantCall) keys(k Keys) []string {
	return []string{k.Account(c.org), k.Events(c.org), k.Holds(c.org), k.TopUps(c.org), k.GrantRefs(c.org)}
}

func (c voidGrantCall) args(l *Ledger) []any {
	return []any{c.num, c.reason, c.reference, l.refTTL, c.by}
}
