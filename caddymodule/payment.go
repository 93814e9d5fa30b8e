package caddymodule

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
)

// payment is how a forwarded call was paid for. Each kind settles through
// the same two methods, so the request path has one way to the upstream.
type payment interface {
	// paid is the balance after the payment, and whether it is known (a
	// deferred charge's is not).
	paid() (balance int64, known bool)
	// settle sets the call's final cost: refunded in full when the call
	// failed, else actual. It returns the balance after, and whether it is
	// known.
	settle(actual int64, refund bool) (balance int64, known bool)
	// completed is told that the call's response went out whole; kept is
	// the response to keep for the retries of a call with an
	// Idempotency-Key, nil when it was too large or did not complete.
	completed(kept []byte)
	// how is how the call was paid, for the usage log: its request id
	// with the ledger ("" for a leased call) and charge, lease or deferred.
	how() (requestID, kind string)
}

// ledgerAccess is what a payment settles through, and nothing more: the
// ledger, the store's outbox for the calls the store cannot take now, a
// logger, and the count of the store's errors. Each handler has one, which
// its calls' payments share.
type ledgerAccess struct {
	ledger  *meter.Ledger
	later   func(meter.Deferred) bool // queues a call in the outbox; false when it is full
	logger  *zap.Logger
	observe func(time.Time, error) // times a store call begun then, and counts its error
}

// payments holds one payment of each kind, for a call to use one of.
type payments struct {
	charged  chargedPayment
	leased   leasedPayment
	deferred deferredPayment
	// budgetLeft is what the caller's budget had left after the call's
	// charge; nil when no budget applies.
	budgetLeft *int64
	budgetVal  int64 // what budgetLeft points to for a leased call
}

// chargedPayment is a charge of the call's own in the ledger.
type chargedPayment struct {
	via                     *ledgerAccess
	ctx                     context.Context
	org, requestID, attempt string
	cost, balance           int64
	keyed                   bool // the call has an Idempotency-Key
	queued                  bool // its settle waits in the outbox
}

func (p *chargedPayment) paid() (int64, bool) { return p.balance, true }

func (p *chargedPayment) how() (string, string) { return p.requestID, "charge" }

func (p *chargedPayment) settle(actual int64, refund bool) (int64, bool) {
	if actual == p.cost && !refund {
		return p.balance, true
	}
	if refund {
		actual = 0
	}
	start := time.Now()
	res, err := p.via.ledger.SettleAttempt(p.ctx, p.org, p.requestID, p.attempt, actual, refund)
	p.via.observe(start, err)
	if err != nil {
		d := meter.LaterSettle{Ledger: p.via.ledger, Org: p.org, RequestID: p.requestID, Attempt: p.attempt, Actual: actual, Refund: refund}
		p.queued = true
		if !p.via.later(d) {
			p.via.logger.Error("store did not take a settle and the backlog is full; settle lost",
				zap.String("request_id", p.requestID), zap.Error(err))
		}
		return p.balance + p.cost - actual, false
	}
	return res.Balance, true
}

func (p *chargedPayment) completed(kept []byte) {
	if !p.keyed {
		return
	}
	if p.queued {
		// Kept after the settle that waits in the outbox, never before it:
		// a kept call can no longer be settled.
		d := meter.LaterKeep{Ledger: p.via.ledger, Org: p.org, RequestID: p.requestID, Attempt: p.attempt, Response: kept}
		if !p.via.later(d) {
			p.via.logger.Warn("could not queue the keeping of a response; the backlog is full", zap.String("request_id", p.requestID))
		}
		return
	}
	if err := p.via.ledger.Keep(p.ctx, p.org, p.requestID, p.attempt, kept); err != nil {
		// The key stays in flight until its marker's in-flight time runs
		// out; its charge stands either way.
		p.via.logger.Warn("could not keep a response for its Idempotency-Key", zap.String("request_id", p.requestID), zap.Error(err))
	}
}

// leasedPayment was paid from this gateway's lease. The lease's Leaser is
// the one that paid it, even after a reload closed it: a refund or a settle
// finds the charge it corrects there.
type leasedPayment struct {
	leaser       *meter.Leaser
	org, feature string
	cost         int64
	receipt      meter.Receipt
}

func (p *leasedPayment) paid() (int64, bool) { return p.receipt.Balance, true }

func (p *leasedPayment) how() (string, string) { return "", "lease" }

func (p *leasedPayment) settle(actual int64, refund bool) (int64, bool) {
	if refund {
		actual = 0
	}
	if actual == p.cost {
		return p.receipt.Balance, true
	}
	return p.leaser.Adjust(p.org, p.feature, p.receipt, p.cost, actual), true
}

func (p *leasedPayment) completed([]byte) {}

// deferredPayment is a fail-open call's charge, waiting in the backlog for
// the store.
type deferredPayment struct {
	via    *ledgerAccess
	charge meter.ChargeRequest
}

func (p *deferredPayment) paid() (int64, bool) { return 0, false }

func (p *deferredPayment) how() (string, string) { return p.charge.RequestID, "deferred" }

func (p *deferredPayment) settle(actual int64, refund bool) (int64, bool) {
	if refund {
		actual = 0
	}
	if actual != p.charge.Cost || refund {
		d := meter.LaterSettle{Ledger: p.via.ledger, Org: p.charge.Org, RequestID: p.charge.RequestID, Attempt: p.charge.Attempt,
			Actual: actual, Refund: refund}
		if !p.via.later(d) {
			p.via.logger.Error("fail-open backlog full; settle lost", zap.String("request_id", p.charge.RequestID))
		}
	}
	return 0, false
}

func (p *deferredPayment) completed([]byte) {}

// observeStore records a store call on the request path, begun at start:
// its duration, and its error (an in-flight or mismatched Idempotency-Key
// is the ledger's answer, not the store failing).
func (m *metrics) observeStore(start time.Time, err error) {
	m.storeDuration.Observe(time.Since(start).Seconds())
	if err != nil && !errors.Is(err, meter.ErrInFlight) && !errors.Is(err, meter.ErrMismatch) {
		m.storeErrors.Inc()
	}
}
