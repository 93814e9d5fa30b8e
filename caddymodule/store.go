package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

// stores holds one store per Redis (or one embedded store), shared by every
// config that names it, so a config reload keeps its connections, its
// embedded data and its fail-open backlog.
var stores = caddy.NewUsagePool()

// store is a connection to Redis, or the embedded store, with the backlog
// of ledger calls that could not be made when the store did not answer.
type store struct {
	rdb      redis.UniversalClient
	embedded *meter.Embedded
	logger   *zap.Logger
	metrics  atomic.Pointer[metrics]

	backlog chan deferred
	waiting atomic.Int64
	stop    chan struct{}
	done    chan struct{}
}

// deferred is a ledger call kept for later: a fail-open charge, a settle
// whose store call failed, the void of a charge whose outcome is unknown, or
// a lease's report that a closing config could not make. Request and attempt
// ids, and a lease report's sequence number, make a replay safe.
type deferred struct {
	ledger *meter.Ledger
	charge *meter.ChargeRequest
	lease  *meter.LeaseSync
	// For a settle, a refund or a void:
	org, requestID string
	actual         int64
	refund         bool
	void           string // the attempt to void
}

func openStore(url string, cluster []string, backlog int, logger *zap.Logger) (*store, error) {
	s := &store{
		logger:  logger,
		backlog: make(chan deferred, backlog),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	if url == "" && len(cluster) == 0 {
		e, err := meter.NewEmbedded()
		if err != nil {
			return nil, err
		}
		s.embedded, s.rdb = e, e.Client()
	} else {
		rdb, err := meter.NewClient(meter.ClientOptions{URL: url, Cluster: cluster})
		if err != nil {
			return nil, err
		}
		s.rdb = rdb
	}
	go s.drain()
	return s, nil
}

// later queues d for the store; false when the backlog is full.
func (s *store) later(d deferred) bool {
	select {
	case s.backlog <- d:
		s.waiting.Add(1)
		return true
	default:
		return false
	}
}

// drain applies deferred calls in order, each until the store takes it.
func (s *store) drain() {
	defer close(s.done)
	for {
		select {
		case <-s.stop:
			return
		case d := <-s.backlog:
			if !s.apply(d) {
				return
			}
			s.waiting.Add(-1)
		}
	}
}

// apply makes the deferred call, retrying with backoff while the store
// fails. It returns false when the store is closing.
func (s *store) apply(d deferred) bool {
	wait := 50 * time.Millisecond
	for {
		err := s.call(d)
		if err == nil {
			return true
		}
		var inputErr *policy.InputError
		if errors.As(err, &inputErr) || errors.Is(err, meter.ErrUnknownRequest) || errors.Is(err, meter.ErrVoided) {
			s.logger.Error("dropping a deferred ledger call", zap.Error(err))
			return true
		}
		if m := s.metrics.Load(); m != nil {
			m.storeErrors.Inc()
		}
		// After a failover the slot map is stale until reloaded.
		if cc, ok := s.rdb.(*redis.ClusterClient); ok {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			cc.ReloadState(ctx)
			cancel()
		}
		select {
		case <-s.stop:
			return false
		case <-time.After(wait):
		}
		wait = min(wait*2, 2*time.Second)
	}
}

func (s *store) call(d deferred) error {
	ctx := context.Background()
	if d.lease != nil {
		_, err := d.ledger.SyncLease(ctx, *d.lease)
		if err == nil {
			s.logger.Info("applied a lease report that waited for the store", zap.String("org", d.lease.Org))
		}
		return err
	}
	if d.charge != nil {
		res, err := d.ledger.Charge(ctx, *d.charge)
		if err == nil && !res.Charged {
			return fmt.Errorf("deferred overdraft charge refused")
		}
		return err
	}
	if d.void != "" {
		refund, err := d.ledger.Void(ctx, d.org, d.requestID, d.void)
		if err == nil && refund > 0 {
			s.logger.Info("refunded a charge whose call was refused when its outcome was unknown",
				zap.String("request_id", d.requestID), zap.Int64("credits", refund))
		}
		return err
	}
	var err error
	if d.refund {
		_, err = d.ledger.Refund(ctx, d.org, d.requestID)
	} else {
		_, err = d.ledger.Settle(ctx, d.org, d.requestID, d.actual)
	}
	return err
}

// drainGrace is how long a closing store waits for its backlog to drain.
const drainGrace = 5 * time.Second

// Destruct closes the store when the last config using it is gone, once its
// backlog is applied or drainGrace has passed. Calls still waiting then are
// lost; how many is logged.
func (s *store) Destruct() error {
	deadline := time.Now().Add(drainGrace)
	for s.waiting.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	close(s.stop)
	<-s.done
	if n := s.waiting.Load(); n > 0 {
		s.logger.Error("ledger calls lost at shutdown: the store did not take them in time", zap.Int64("count", n))
	}
	if s.embedded != nil {
		return s.embedded.Close()
	}
	return s.rdb.Close()
}
