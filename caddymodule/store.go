package caddymodule

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
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
	// where names the Redis in messages, never with its password.
	where string
	// probe lists the addresses the client dials first (the sentinels, a
	// Cluster's seeds, the server), and tls is its TLS config, if any: a
	// failed start is diagnosed with them.
	probe []string
	tls   *tls.Config
}

// openStore opens the Redis that o names, or the embedded store when o
// names none. The store outlives the config that opens it, and so does the
// pace of its outbox's lines.
func openStore(o meter.ClientOptions, backlog int, logger *zap.Logger) (*store, error) {
	s := &store{logger: newQuietLogs(quietWindow).logger(logger)}
	if o.URL == "" && len(o.Cluster) == 0 && o.Sentinel == nil {
		e, err := meter.NewEmbedded()
		if err != nil {
			return nil, err
		}
		s.embedded, s.rdb = e, e.Client()
	} else {
		rdb, err := meter.NewClient(o)
		if err != nil {
			return nil, fmt.Errorf("credits: %w", err)
		}
		s.rdb = rdb
		s.where = describeRedis(rdb, o.Sentinel)
		switch c := rdb.(type) {
		case *redis.ClusterClient:
			s.probe, s.tls = c.Options().Addrs, c.Options().TLSConfig
		case *redis.Client:
			s.probe, s.tls = []string{c.Options().Addr}, c.Options().TLSConfig
		}
		if o.Sentinel != nil {
			s.probe = o.Sentinel.Addrs
		}
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
	if refusedCredentials(err) {
		return fmt.Errorf("credits: Redis at %s refused the gateway's credentials (%v): check the user and password of the redis URL", s.where, err)
	}
	// A certificate that does not verify, or a handshake the server
	// refuses, fails every call the same way: it is the config's fault.
	if !refusedTLS(err) {
		err = s.probeTLS(err)
	}
	if refusedTLS(err) {
		hint := ""
		if len(s.tls.Certificates) == 0 {
			hint = "; a server with tls-auth-clients needs the gateway's certificate in tls_client"
		}
		return fmt.Errorf("credits: the TLS connection to Redis at %s failed (%v): check tls_ca, tls_client and the server's certificate%s", s.where, err, hint)
	}
	logger.Warn("cannot reach Redis at start; the routes follow their fail_mode until it answers",
		zap.String("redis", s.where), zap.Error(err))
	return nil
}

// probeTLS finds why a TLS connection failed, when the failure was
// err, a dropped connection: with TLS 1.3, a server that refuses the
// client's certificate (or its absence) does so after the client's side of
// the handshake, and the client may see only a reset. A TLS 1.2 handshake
// sees the server's refusal within the handshake itself. It returns the
// first refusal found, else err.
func (s *store) probeTLS(err error) error {
	if s.tls == nil {
		return err
	}
	c := s.tls.Clone()
	c.MaxVersion = tls.VersionTLS12
	for _, addr := range s.probe {
		conn, perr := tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", addr, c)
		if perr == nil {
			conn.Close()
			continue
		}
		// A server that takes TLS 1.3 only says nothing about certificates.
		if refusedTLS(perr) && !strings.Contains(perr.Error(), "protocol version") {
			return perr
		}
	}
	return err
}

// describeRedis names the Redis that rdb talks to, for messages.
func describeRedis(rdb redis.UniversalClient, sentinel *meter.SentinelOptions) string {
	if sentinel != nil {
		return fmt.Sprintf("master %s of sentinels %s", sentinel.Master, strings.Join(sentinel.Addrs, " "))
	}
	switch c := rdb.(type) {
	case *redis.ClusterClient:
		return strings.Join(c.Options().Addrs, " ")
	case *redis.Client:
		return c.Options().Addr
	}
	return ""
}

// refusedCredentials reports whether err is Redis refusing a connection's
// user or password. Through Sentinel, the refusal is one of several
// errors joined.
func refusedCredentials(err error) bool {
	msg := err.Error()
	for _, p := range []string{"WRONGPASS", "NOAUTH", "ERR invalid password", "ERR AUTH", "ERR Client sent AUTH"} {
		if strings.HasPrefix(msg, p) || strings.Contains(msg, ": "+p) || strings.Contains(msg, "\n"+p) {
			return true
		}
	}
	return false
}

// refusedTLS reports whether err is a TLS handshake that cannot succeed as
// configured: a certificate that does not verify, a server that is not
// TLS, or a server that refuses the client's certificate (or its absence).
func refusedTLS(err error) bool {
	var (
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		invalid  x509.CertificateInvalidError
		verify   *tls.CertificateVerificationError
		record   tls.RecordHeaderError
	)
	if errors.As(err, &unknown) || errors.As(err, &hostname) || errors.As(err, &invalid) ||
		errors.As(err, &verify) || errors.As(err, &record) {
		return true
	}
	// The server's alerts (certificate required, bad certificate, unknown
	// CA) reach the client as an unexported type.
	return strings.Contains(err.Error(), "remote error: tls: ")
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
