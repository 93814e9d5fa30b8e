package caddymodule

import (
	"context"
	"fmt"
	"strings"
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

// later queues d in the outbox; false when it is full (or closed). What
// it refuses is lost, and counted: a settle, a void, a lease report. A
// charge is not, since its call is refused rather than forwarded.
func (s *store) later(d meter.Deferred) bool {
	if s.outbox.Add(d) {
		return true
	}
	if _, charge := d.(meter.LaterCharge); !charge {
		if m := s.metrics.Load(); m != nil {
			m.dropped.WithLabelValues("full").Inc()
		}
	}
	return false
}

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

// checkCredentials fails a config whose Redis refuses its user or password
// (WRONGPASS, NOAUTH): such a config could never charge, so Caddy does not
// start with it, and a reload to it keeps the old config. A Redis that does
// not answer is no error: it may come up later, and the routes follow their
// fail_mode until it does. The message names the address, never the
// password.
func (s *store) checkCredentials(logger *zap.Logger) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := s.rdb.Ping(ctx).Err()
	if err == nil {
		return nil
	}
	var addrs []string
	switch c := s.rdb.(type) {
	case *redis.ClusterClient:
		addrs = c.Options().Addrs
	case *redis.Client:
		addrs = []string{c.Options().Addr}
	}
	where := strings.Join(addrs, " ")
	if refusedCredentials(err) {
		return fmt.Errorf("credits: Redis at %s refused the gateway's credentials (%v): check the user and password of the redis URL", where, err)
	}
	logger.Warn("cannot reach Redis at start; the routes follow their fail_mode until it answers",
		zap.String("redis", where), zap.Error(err))
	return nil
}

// refusedCredentials reports whether err is Redis refusing a connection's
// user or password.
func refusedCredentials(err error) bool {
	msg := err.Error()
	for _, p := range []string{"WRONGPASS", "NOAUTH", "ERR invalid password", "ERR AUTH", "ERR Client sent AUTH"} {
		if strings.HasPrefix(msg, p) {
			return true
		}
	}
	return false
}

// checkSettings warns when Redis can evict keys or lose writes on restart.
func (s *store) checkSettings(logger *zap.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	check := func(ctx context.Context, c *redis.Client) error {
		addr := c.Options().Addr
		policy, err := c.ConfigGet(ctx, "maxmemory-policy").Result()
		if err != nil {
			logger.Info("cannot read the Redis configuration to check it", zap.String("redis", addr), zap.Error(err))
			return nil
		}
		if p := policy["maxmemory-policy"]; p != "noeviction" {
			logger.Warn("Redis may evict credit keys under memory pressure: set maxmemory-policy noeviction",
				zap.String("redis", addr), zap.String("maxmemory_policy", p))
		}
		persist, err := c.ConfigGet(ctx, "appendonly").Result()
		if err != nil {
			return nil
		}
		save, err := c.ConfigGet(ctx, "save").Result()
		if err != nil {
			return nil
		}
		if persist["appendonly"] != "yes" && strings.TrimSpace(save["save"]) == "" {
			logger.Warn("Redis persistence is off: a Redis restart loses every balance; enable appendonly yes",
				zap.String("redis", addr))
		} else if persist["appendonly"] != "yes" {
			logger.Warn("Redis saves snapshots only: a Redis crash loses the charges and top-ups since the last one; enable appendonly yes",
				zap.String("redis", addr))
		}
		return nil
	}
	var err error
	switch c := s.rdb.(type) {
	case *redis.ClusterClient:
		err = c.ForEachShard(ctx, check)
	case *redis.Client:
		err = check(ctx, c)
	}
	if err != nil {
		logger.Warn("cannot reach Redis at start", zap.Error(err))
	}
	logger.Info("store checked")
}
