package meter

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/policy"
)

// Deferred is a ledger call kept for later, while the store does not
// answer: each is safe to make again (by its request and attempt ids, its
// reference, or its sequence number), so a call whose first try did reach
// Redis changes nothing more.
type Deferred interface {
	// apply makes the call.
	apply(ctx context.Context) error
	// what names the call in logs.
	what() []zap.Field
}

// LaterCharge is a fail-open call's charge, applied as overdraft: the call
// has happened.
type LaterCharge struct {
	Ledger *Ledger
	Charge ChargeRequest
	// Sent is when the call's own charge was sent, if it may have reached
	// Redis (zero when it surely did not). Such a charge is sent again only
	// while its marker would still answer for it; later it is dropped
	// (ErrTooLate), as it could otherwise be charged twice.
	Sent time.Time
}

func (d LaterCharge) apply(ctx context.Context) error {
	if !d.Sent.IsZero() && !d.Ledger.remembers(d.Sent) {
		return ErrTooLate
	}
	res, err := d.Ledger.Charge(ctx, d.Charge)
	if err == nil && !res.Charged {
		return errors.New("deferred overdraft charge refused")
	}
	return err
}

func (d LaterCharge) what() []zap.Field {
	return []zap.Field{zap.String("call", "charge"), zap.String("org", d.Charge.Org), zap.String("request_id", d.Charge.RequestID)}
}

// LaterSettle settles one attempt's charge to its usage, or refunds it.
type LaterSettle struct {
	Ledger                  *Ledger
	Org, RequestID, Attempt string
	Actual                  int64
	Refund                  bool
}

func (d LaterSettle) apply(ctx context.Context) error {
	_, err := d.Ledger.SettleAttempt(ctx, d.Org, d.RequestID, d.Attempt, d.Actual, d.Refund)
	return err
}

func (d LaterSettle) what() []zap.Field {
	return []zap.Field{zap.String("call", "settle"), zap.String("org", d.Org), zap.String("request_id", d.RequestID)}
}

// LaterKeep keeps the response of a call with an Idempotency-Key, once the
// settle queued before it is applied.
type LaterKeep struct {
	Ledger                  *Ledger
	Org, RequestID, Attempt string
	Response                []byte
}

func (d LaterKeep) apply(ctx context.Context) error {
	return d.Ledger.Keep(ctx, d.Org, d.RequestID, d.Attempt, d.Response)
}

func (d LaterKeep) what() []zap.Field {
	return []zap.Field{zap.String("call", "keep"), zap.String("org", d.Org), zap.String("request_id", d.RequestID)}
}

// LaterVoid voids the charge of an attempt whose outcome was unknown and
// whose call was refused.
type LaterVoid struct {
	Ledger                  *Ledger
	Org, RequestID, Attempt string
}

func (d LaterVoid) apply(ctx context.Context) error {
	_, err := d.Ledger.Void(ctx, d.Org, d.RequestID, d.Attempt)
	return err
}

func (d LaterVoid) what() []zap.Field {
	return []zap.Field{zap.String("call", "void"), zap.String("org", d.Org), zap.String("request_id", d.RequestID)}
}

// LaterVoidTopUp voids a top-up answered 503.
type LaterVoidTopUp struct {
	Ledger         *Ledger
	Org, Reference string
	Amount         int64
}

func (d LaterVoidTopUp) apply(ctx context.Context) error {
	return d.Ledger.VoidTopUp(ctx, d.Org, d.Amount, d.Reference)
}

func (d LaterVoidTopUp) what() []zap.Field {
	return []zap.Field{zap.String("call", "void top-up"), zap.String("org", d.Org)}
}

// LaterVoidHold voids a hold answered 503 (of the gateway's own
// reference).
type LaterVoidHold struct {
	Ledger  *Ledger
	Org, ID string
}

func (d LaterVoidHold) apply(ctx context.Context) error {
	return d.Ledger.VoidHold(ctx, d.Org, d.ID)
}

func (d LaterVoidHold) what() []zap.Field {
	return []zap.Field{zap.String("call", "void hold"), zap.String("org", d.Org), zap.String("hold", d.ID)}
}

// LaterVoidWrite voids a plan or a recharge (Kind) answered 503 (of the
// gateway's own reference). Stands, when set, is told when the write had
// applied and could not be undone.
type LaterVoidWrite struct {
	Ledger               *Ledger
	Org, Kind, Reference string
	Stands               func()
}

func (d LaterVoidWrite) apply(ctx context.Context) error {
	stands, err := d.Ledger.VoidWrite(ctx, d.Org, d.Kind, d.Reference)
	if stands && d.Stands != nil {
		d.Stands()
	}
	return err
}

func (d LaterVoidWrite) what() []zap.Field {
	return []zap.Field{zap.String("call", "void "+d.Kind), zap.String("org", d.Org), zap.String("reference", d.Reference)}
}

// LaterLeaseReport is a lease's report that a closing leaser could not
// make.
type LaterLeaseReport struct {
	Ledger *Ledger
	Sync   LeaseSync
}

func (d LaterLeaseReport) apply(ctx context.Context) error {
	_, err := d.Ledger.SyncLease(ctx, d.Sync)
	return err
}

func (d LaterLeaseReport) what() []zap.Field {
	return []zap.Field{zap.String("call", "lease report"), zap.String("org", d.Sync.Org), zap.Int64("credits", sum(d.Sync.Spent))}
}

// Outbox applies deferred ledger calls in order, each until the store takes
// it, with backoff. It is bounded: Add refuses a call when it is full.
type Outbox struct {
	queue   chan Deferred
	waiting atomic.Int64
	logger  *zap.Logger
	// retry, if set, runs after each failed try (e.g. to reload a Cluster's
	// slot map); failed counts each.
	retry, failed func()

	stop      chan struct{}
	done      chan struct{}
	drained   chan struct{} // signalled when the queue empties
	closeOnce sync.Once
}

// NewOutbox starts an outbox of size calls.
func NewOutbox(size int, logger *zap.Logger, retry, failed func()) *Outbox {
	o := &Outbox{queue: make(chan Deferred, size), logger: logger, retry: retry, failed: failed,
		stop: make(chan struct{}), done: make(chan struct{}), drained: make(chan struct{}, 1)}
	go o.drain()
	return o
}

// Add queues d; false when the outbox is full.
func (o *Outbox) Add(d Deferred) bool {
	select {
	case o.queue <- d:
		o.waiting.Add(1)
		return true
	default:
		return false
	}
}

// Waiting returns how many calls wait.
func (o *Outbox) Waiting() int64 { return o.waiting.Load() }

func (o *Outbox) drain() {
	defer close(o.done)
	for {
		select {
		case <-o.stop:
			return
		case d := <-o.queue:
			if !o.apply(d) {
				return
			}
			if o.waiting.Add(-1) == 0 {
				select {
				case o.drained <- struct{}{}:
				default:
				}
			}
		}
	}
}

// apply makes d, retrying with backoff while the store fails. It returns
// false when the outbox is closing.
func (o *Outbox) apply(d Deferred) bool {
	wait := 50 * time.Millisecond
	for {
		err := d.apply(context.Background())
		if err == nil {
			return true
		}
		var inputErr *policy.InputError
		if errors.As(err, &inputErr) || errors.Is(err, ErrUnknownRequest) || errors.Is(err, ErrVoided) || errors.Is(err, ErrWrongType) ||
			errors.Is(err, ErrInFlight) || errors.Is(err, ErrMismatch) || errors.Is(err, ErrTooLate) {
			o.logger.Error("dropping a deferred ledger call", append(d.what(), zap.Error(err))...)
			return true
		}
		if o.failed != nil {
			o.failed()
		}
		if o.retry != nil {
			o.retry()
		}
		select {
		case <-o.stop:
			return false
		case <-time.After(wait):
		}
		wait = min(wait*2, 2*time.Second)
	}
}

// Close waits up to grace for the calls waiting to be applied, then stops.
// It returns how many were still waiting: they are lost.
func (o *Outbox) Close(grace time.Duration) int64 {
	timer := time.NewTimer(grace)
	defer timer.Stop()
	for o.waiting.Load() > 0 {
		select {
		case <-o.drained:
		case <-timer.C:
			return o.stopNow()
		}
	}
	return o.stopNow()
}

func (o *Outbox) stopNow() int64 {
	o.closeOnce.Do(func() { close(o.stop) })
	<-o.done
	return o.waiting.Load()
}
