package meter

import (
	"context"
	"sync"
	"time"

	"go.uber.org/zap"
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
	// org is the org whose data the call changes: an org's calls are
	// applied in order, and apart from other orgs'.
	org() string
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
		return errOverdraftRefused
	}
	return err
}

func (d LaterCharge) org() string { return d.Charge.Org }

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

func (d LaterSettle) org() string { return d.Org }

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

func (d LaterKeep) org() string { return d.Org }

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

func (d LaterVoid) org() string { return d.Org }

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

func (d LaterVoidTopUp) org() string { return d.Org }

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

func (d LaterVoidHold) org() string { return d.Org }

func (d LaterVoidHold) what() []zap.Field {
	return []zap.Field{zap.String("call", "void hold"), zap.String("org", d.Org), zap.String("hold", d.ID)}
}

// LaterVoidGrant voids a grant answered 503 (of the gateway's own
// reference).
type LaterVoidGrant struct {
	Ledger         *Ledger
	Org, Reference string
}

func (d LaterVoidGrant) apply(ctx context.Context) error {
	return d.Ledger.VoidGrantRef(ctx, d.Org, d.Reference)
}

func (d LaterVoidGrant) org() string { return d.Org }

func (d LaterVoidGrant) what() []zap.Field {
	return []zap.Field{zap.String("call", "void grant"), zap.String("org", d.Org), zap.String("reference", d.Reference)}
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

func (d LaterVoidWrite) org() string { return d.Org }

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

func (d LaterLeaseReport) org() string { return d.Sync.Org }

func (d LaterLeaseReport) what() []zap.Field {
	return []zap.Field{zap.String("call", "lease report"), zap.String("org", d.Sync.Org), zap.Int64("credits", sum(d.Sync.Spent))}
}

// Outbox applies deferred ledger calls, each until the store takes it, with
// backoff. Calls of one org are applied in the order they came (a charge
// before its settle or void); orgs do not wait for each other: each org has
// its lane, and a few workers take the lanes in turn. A call that fails for
// a reason no retry cures (Permanent: an org's corrupt data, a charge too
// old to send again) leaves at once, logged and counted; one that fails
// because the store could not do it now (Transient: down, out of memory,
// failing over) waits at the head of its org's lane, and only that lane
// backs off. It is bounded: Add refuses a call when it is full.
type Outbox struct {
	size   int
	logger *zap.Logger
	// retry, if set, runs after each failed try that will be tried again
	// (e.g. to reload a Cluster's slot map); failed, if set, counts each
	// failed try, dropped true for a call that left unapplied.
	retry  func()
	failed func(dropped bool)

	// mu guards n, lanes, ready and stopped. A lane is in lanes while it
	// holds calls, and then in exactly one place: ready, taken by a worker,
	// or waiting out its backoff.
	mu      sync.Mutex
	n       int
	lanes   map[string]*lane
	ready   []*lane
	stopped bool

	wake      chan struct{} // a lane became ready
	drained   chan struct{} // the outbox became empty
	stop      chan struct{}
	workers   sync.WaitGroup
	closeOnce sync.Once
}

// lane holds one org's waiting calls, oldest first.
type lane struct {
	org   string
	calls []Deferred
	wait  time.Duration // backoff after its first call's last failure
}

// outboxWorkers is how many orgs' calls are tried at once: a few, so that
// one org's slow store (a Cluster node that does not answer) holds up no
// other org's.
const outboxWorkers = 4

// Backoff of a lane whose first call failed for a transient reason.
const (
	firstWait = 50 * time.Millisecond
	maxWait   = 2 * time.Second
)

// NewOutbox starts an outbox of size calls.
func NewOutbox(size int, logger *zap.Logger, retry func(), failed func(dropped bool)) *Outbox {
	o := &Outbox{size: size, logger: logger, retry: retry, failed: failed, lanes: map[string]*lane{},
		wake: make(chan struct{}, 1), drained: make(chan struct{}, 1), stop: make(chan struct{})}
	o.workers.Add(outboxWorkers)
	for range outboxWorkers {
		go o.work()
	}
	return o
}

// Add queues d behind its org's earlier calls; false when the outbox is
// full or closed.
func (o *Outbox) Add(d Deferred) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.n >= o.size || o.stopped {
		return false
	}
	o.n++
	org := d.org()
	l := o.lanes[org]
	if l == nil {
		l = &lane{org: org}
		o.lanes[org] = l
		o.readyLocked(l)
	}
	l.calls = append(l.calls, d)
	return true
}

// Waiting returns how many calls wait.
func (o *Outbox) Waiting() int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return int64(o.n)
}

// readyLocked puts l at the end of the ready lanes and wakes a worker.
// Called with mu held.
func (o *Outbox) readyLocked(l *lane) {
	o.ready = append(o.ready, l)
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

func (o *Outbox) work() {
	defer o.workers.Done()
	for {
		l, d := o.take()
		if l == nil {
			return
		}
		o.done(l, d, d.apply(context.Background()))
	}
}

// take waits for a ready lane and returns it with its first call; nil once
// the outbox stops.
func (o *Outbox) take() (*lane, Deferred) {
	for {
		select {
		case <-o.stop:
			return nil, nil
		default:
		}
		o.mu.Lock()
		if len(o.ready) > 0 {
			l := o.ready[0]
			o.ready[0] = nil
			o.ready = o.ready[1:]
			if len(o.ready) > 0 {
				// Another worker may take the next lane.
				select {
				case o.wake <- struct{}{}:
				default:
				}
			}
			d := l.calls[0]
			o.mu.Unlock()
			return l, d
		}
		o.mu.Unlock()
		select {
		case <-o.stop:
			return nil, nil
		case <-o.wake:
		}
	}
}

// done takes the outcome of a try of d, the first call of lane l: applied
// or failed for good, d leaves and the lane goes to the end of the ready
// ones; failed for now, the lane backs off.
func (o *Outbox) done(l *lane, d Deferred, err error) {
	class := Classify(err)
	if class == Transient {
		if o.failed != nil {
			o.failed(false)
		}
		if o.retry != nil {
			o.retry()
		}
		l.wait = min(max(l.wait*2, firstWait), maxWait)
		time.AfterFunc(l.wait, func() {
			o.mu.Lock()
			o.readyLocked(l)
			o.mu.Unlock()
		})
		return
	}
	if err != nil {
		o.logger.Error("dropping a deferred ledger call: no retry can apply it", append(d.what(),
			zap.String("class", class.String()), zap.Error(err))...)
		if o.failed != nil {
			o.failed(true)
		}
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	l.calls[0] = nil
	l.calls = l.calls[1:]
	l.wait = 0
	o.n--
	if len(l.calls) > 0 {
		o.readyLocked(l)
	} else {
		delete(o.lanes, l.org)
	}
	if o.n == 0 {
		select {
		case o.drained <- struct{}{}:
		default:
		}
	}
}

// Close waits up to grace for the calls waiting to be applied, then stops:
// it refuses new calls and waits for the tries under way. It returns how
// many calls were still waiting: they are lost.
func (o *Outbox) Close(grace time.Duration) int64 {
	timer := time.NewTimer(grace)
	defer timer.Stop()
	for o.Waiting() > 0 {
		select {
		case <-o.drained:
		case <-timer.C:
			return o.stopNow()
		}
	}
	return o.stopNow()
}

func (o *Outbox) stopNow() int64 {
	o.closeOnce.Do(func() {
		o.mu.Lock()
		o.stopped = true
		o.mu.Unlock()
		close(o.stop)
	})
	o.workers.Wait()
	return o.Waiting()
}
