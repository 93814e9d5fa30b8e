package caddymodule

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
)

// stores holds one store per Redis (or one embedded store), shared by every
// config that names it, so a config reload keeps its connections, its
// embedded data and its outbox.
var stores = caddy.NewUsagePool()

// store is a connection to Redis, or the embedded store, with the outbox
// of ledger calls that could not be made when the store did not answer.
type store struct {
	rdb      redis.UniversalClient
	embedded *meter.Embedded
	logger   *zap.Logger
	metrics  atomic.Pointer[metrics]
	outbox   *meter.Outbox
}

func openStore(url string, cluster []string, backlog int, logger *zap.Logger) (*store, error) {
	s := &store{logger: logger}
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
	s.outbox = meter.NewOutbox(backlog, logger, s.reloadSlots, func(dropped bool) {
		if m := s.metrics.Load(); m != nil {
			m.storeErrors.Inc()
			if dropped {
				m.dropped.WithLabelValues("failed").Inc()
			}
		}
	})
	return s, nil
}

// later queues d in the outbox; false when it is full.
func (s *store) later(d meter.Deferred) bool { return s.outbox.Add(d) }

// reloadSlots reloads a Cluster's slot map, stale after a failover.
func (s *store) reloadSlots() {
	if cc, ok := s.rdb.(*redis.ClusterClient); ok {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		cc.ReloadState(ctx)
		cancel()
	}
}

// drainGrace is how long a closing store waits for its outbox to drain.
const drainGrace = 5 * time.Second

// Destruct closes the store when the last config using it is gone, once its
// outbox is applied or drainGrace has passed. Calls still waiting then are
// lost; how many is logged.
func (s *store) Destruct() error {
	if n := s.outbox.Close(drainGrace); n > 0 {
		s.logger.Error("ledger calls lost at shutdown: the store did not take them in time", zap.Int64("count", n))
		if m := s.metrics.Load(); m != nil {
			m.dropped.WithLabelValues("shutdown").Add(float64(n))
		}
	}
	if s.embedded != nil {
		return s.embedded.Close()
	}
	return s.rdb.Close()
}
