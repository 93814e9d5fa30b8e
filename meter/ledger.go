// Package meter is the credits ledger: every org's plan, balances, usage and
// events in Redis, changed only by atomic Lua scripts.
package meter

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

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
	// WaitReplicas, when above 0, makes every script's writes count only
	// once that many replicas have them (WAIT, on the script's connection,
	// within its deadline; on a Cluster, the connection to the master of
	// the org's slot): a master that fails over then loses nothing the
	// ledger answered. A write no replica took in time has an unknown
	// outcome (ErrNotReplicated), as a lost reply has. 0 waits for none.
	WaitReplicas int
	// Batched, when set, is told how many charges each round trip that
	// carried more than one sent together (a metric of how much the
	// batcher saves).
	Batched func(n int)
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
	// replicas is Config.WaitReplicas.
	replicas int
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
	if cfg.WaitReplicas < 0 {
		return nil, fmt.Errorf("replicas to wait for %d: must be 0 or more", cfg.WaitReplicas)
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
		charges:     newBatcher(rdb, batchLanes, batchLaneAfter, batchMax, chargesScript, cfg.WaitReplicas, cfg.Batched),
		replicas:    cfg.WaitReplicas,
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

// OwnReferencePrefix starts the references the gateway gives writes that
// come without one: no client sends them again, so a write of unknown
// outcome under one is voided (VoidTopUp, VoidHold, VoidWrite).
const OwnReferencePrefix = "gw:"

// NewOwnReference returns a fresh reference of the gateway's own.
func NewOwnReference() string { return OwnReferencePrefix + NewRequestID() }

// Ping reports whether the store answers within the ledger's timeout.
func (l *Ledger) Ping(ctx context.Context) error {
	ctx, cancel := l.deadline(ctx)
	defer cancel()
	return l.rdb.Ping(ctx).Err()
}

// NewRequestID returns a random request id.
func NewRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
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
