// Package caddymodule plugs the credits ledger into Caddy: the credits app,
// the credits, credits_balance and credits_admin handlers, their Caddyfile
// syntax, metrics and the caddy credits command.
package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

func init() {
	caddy.RegisterModule(App{})
	redis.SetLogger(redisLogger{quiet: newQuietLogs(quietWindow)})
}

// redisLogger sends go-redis' own messages (such as failed dials) to
// Caddy's log instead of standard error, each kind (its format) at most
// once per quietWindow, as the credits app's own lines during an outage.
type redisLogger struct{ quiet *quietLogs }

func (l redisLogger) Printf(_ context.Context, format string, v ...any) {
	l.quiet.logger(caddy.Log().Named("credits.redis")).Warn(format, zap.String("detail", fmt.Sprintf(format, v...)))
}

// App is the credits app: it owns the connection to the store that every
// credits handler uses. Configure it with the `credits` global option; with
// neither Redis nor RedisCluster set, the store is embedded in the Caddy
// process (for trying the gateway out: balances are lost on restart).
type App struct {
	// Redis is the URL of the Redis server: redis://[user:password@]host:port[/db],
	// or rediss:// for TLS. Placeholders such as {env.REDIS_URL} are replaced
	// when the config loads, so the password need not be in the config.
	Redis string `json:"redis,omitempty"`
	// RedisCluster lists seed nodes of a Redis Cluster, instead of Redis:
	// host:port, or redis:// or rediss:// URLs that give the cluster's user,
	// password and TLS (the URLs must agree on them; a host:port seed uses
	// them too). Placeholders are replaced as in Redis.
	RedisCluster []string `json:"redis_cluster,omitempty"`
	// RedisSentinel finds the Redis master through Redis Sentinel, instead
	// of Redis or RedisCluster: the client follows the master when the
	// sentinels fail it over.
	RedisSentinel *Sentinel `json:"redis_sentinel,omitempty"`
	// TLSCA is a PEM file of the CA that verifies Redis' certificate, for
	// rediss://, a Cluster or Sentinel over TLS; default: the system's
	// roots. With RedisSentinel, it turns TLS on.
	TLSCA string `json:"tls_ca,omitempty"`
	// TLSClient is the client certificate the gateway shows Redis, for a
	// Redis with tls-auth-clients. With RedisSentinel, it turns TLS on.
	TLSClient *TLSClient `json:"tls_client,omitempty"`
	// WaitReplicas is how many replicas must have each write (a batch of
	// charges, a lease report, an admin write) before its reply counts:
	// the gateway sends WAIT after it, on the connection of the master
	// that ran it (on a Cluster, the master of the org's slot). A write no
	// replica took within half its Timeout has an unknown outcome, as a
	// lost reply has. Default 1 with RedisSentinel, 0 otherwise; set 1 on a
	// Cluster whose masters have replicas, so that a failover loses no
	// write the gateway was answered. Not for the embedded store.
	WaitReplicas *int `json:"wait_replicas,omitempty"`
	// KeyPrefix starts every Redis key; default "credits".
	KeyPrefix string `json:"key_prefix,omitempty"`
	// Timeout is the deadline of one store call; default 100ms.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// DefaultPlan is granted to an org the first time it is seen; default
	// an allowance of 0 recharging in January.
	DefaultPlan *meter.Plan `json:"default_plan,omitempty"`
	// TopUpURL is where users buy credits; it is put into notices and 402
	// bodies.
	TopUpURL string `json:"topup_url,omitempty"`
	// Backlog is how many fail-open charges may wait for the store at once;
	// default 10000. A fail-open call that finds the backlog full is refused
	// as with fail_mode closed.
	Backlog int `json:"backlog,omitempty"`
	// Lease is how many of a busy org's credits this gateway takes at a
	// time, to spend them without a store call per request; default
	// DefaultLease, 0 for none (every call one script). The spending
	// reaches the ledger within a quarter second, and unused credits go
	// back after two idle seconds and at shutdown. An org is leased only
	// while its balance is well above what the leases hold (twice Lease is
	// always left free), so the last credits are charged call by call,
	// exactly. Calls with an Idempotency-Key are never leased.
	Lease *int64 `json:"lease,omitempty"`
	// IdempotencyStore is the largest response, in bytes, kept for the
	// retries of a call with an Idempotency-Key (they are answered it
	// without an upstream call); default 1 MiB, at most 16 MiB; 0 keeps none
	// (a retry of a completed call is then answered 409).
	IdempotencyStore *int64 `json:"idempotency_store,omitempty"`
	// Alerts, when set, sends a signed webhook when an org's balance falls
	// below a threshold or reaches zero.
	Alerts *Alerts `json:"alerts,omitempty"`

	notifier  *notifier
	quiet     *quietLogs
	ledger    *meter.Ledger
	leaser    *meter.Leaser
	keepLimit int64
	store     *store
	poolKey   string
	metrics   *metrics
	logger    *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "credits",
		New: func() caddy.Module { return new(App) },
	}
}

// Sentinel says how to find the Redis master through Redis Sentinel. Every
// field takes placeholders such as {env.REDIS_PASSWORD}.
type Sentinel struct {
	// Master is the name the sentinels know the master by.
	Master string `json:"master"`
	// Addrs are the sentinels' host:port addresses.
	Addrs []string `json:"addrs"`
	// Username is the master's ACL user, if any.
	Username string `json:"username,omitempty"`
	// Password is the master's (and its replicas') password.
	Password string `json:"password,omitempty"`
	// SentinelPassword is the sentinels' own password.
	SentinelPassword string `json:"sentinel_password,omitempty"`
	// DB is the database number on the master; default 0.
	DB int `json:"db,omitempty"`
}

// TLSClient is a client certificate and its key, PEM files.
type TLSClient struct {
	// Cert is the certificate file.
	Cert string `json:"cert"`
	// Key is the private key file.
	Key string `json:"key"`
}

// DefaultBacklog is the default size of the fail-open backlog.
const DefaultBacklog = 10000

// Limits of IdempotencyStore.
const (
	defaultIdempotencyStore = 1 << 20
	maxIdempotencyStore     = 16 << 20
)

// clockOffsetEnv names the environment variable that moves the gateway's
// clock by a duration, for tests of clock skew between gateways.
const clockOffsetEnv = "CREDITS_CLOCK_OFFSET"

// Provision connects to the store, or shares the connection of an earlier
// config that used the same store.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if a.Timeout == 0 {
		a.Timeout = caddy.Duration(meter.DefaultTimeout)
	}
	if a.Backlog == 0 {
		a.Backlog = DefaultBacklog
	}
	// Checked before the backlog is allocated.
	if err := a.Validate(); err != nil {
		return err
	}
	a.keepLimit = defaultIdempotencyStore
	if a.IdempotencyStore != nil {
		a.keepLimit = *a.IdempotencyStore
	}
	var plan meter.Plan
	if a.DefaultPlan != nil {
		plan = *a.DefaultPlan
	}
	var err error
	if a.metrics, err = newMetrics(ctx.GetMetricsRegistry()); err != nil {
		return err
	}

	// {env.*} placeholders keep a password out of the config itself.
	opts, err := a.clientOptions()
	if err != nil {
		return err
	}
	a.poolKey = "embedded"
	if opts.URL != "" || len(opts.Cluster) > 0 || opts.Sentinel != nil {
		// Every setting of the connection: a config that changes any opens
		// a new one.
		key, err := json.Marshal(opts)
		if err != nil {
			return err
		}
		a.poolKey = "redis " + string(key)
	}
	a.quiet = newQuietLogs(quietWindow)
	val, shared, err := stores.LoadOrNew(a.poolKey, func() (caddy.Destructor, error) {
		return openStore(opts, a.Backlog, a.logger)
	})
	if err != nil {
		return err
	}
	a.store = val.(*store)
	a.store.metrics.Store(a.metrics)
	// A store an earlier config opened has the same URL, checked then: a
	// reload that keeps it never waits for Redis (which may be stalled).
	if a.store.embedded == nil && !shared {
		if err := a.store.checkCredentials(a.logger); err != nil {
			return err
		}
	}
	now := time.Now
	if off := os.Getenv(clockOffsetEnv); off != "" {
		d, err := time.ParseDuration(off)
		if err != nil {
			return fmt.Errorf("credits: %s %q: %v", clockOffsetEnv, off, err)
		}
		a.logger.Warn("the gateway's clock is moved for testing", zap.String(clockOffsetEnv, off))
		now = func() time.Time { return time.Now().Add(d) }
	}
	// Behind Sentinel a master can fail over at any moment: a write counts
	// once a replica has it, so that the new master has every one the
	// gateway was answered.
	replicas := 0
	if a.RedisSentinel != nil {
		replicas = 1
	}
	if a.WaitReplicas != nil {
		replicas = *a.WaitReplicas
	}
	a.ledger, err = meter.New(a.store.rdb, meter.Config{
		Prefix:       a.KeyPrefix,
		DefaultPlan:  plan,
		Timeout:      time.Duration(a.Timeout),
		Now:          now,
		WaitReplicas: replicas,
		Batched:      func(n int) { a.metrics.batched.Add(float64(n)) },
	})
	if err != nil {
		return err
	}
	if a.Alerts != nil {
		a.notifier = newNotifier(a.Alerts, a.ledger, a.quiet.logger(a.logger).Named("alerts"))
		if len(a.notifier.secret) == 0 {
			return errors.New("credits: alerts: the secret is empty once its placeholders are replaced")
		}
	}
	if lease := a.lease(); lease > 0 {
		ledger, store := a.ledger, a.store
		a.leaser = meter.NewLeaser(a.ledger, meter.LeaseConfig{
			Size:  lease,
			Keep:  2 * lease,
			Flush: 250 * time.Millisecond,
			Idle:  2 * time.Second,
			TTL:   30 * time.Second,
			// A report a closing config cannot make waits in the store's
			// backlog, which the next config shares, until Redis takes it.
			Unreported: func(s meter.LeaseSync) {
				if !store.later(meter.LaterLeaseReport{Ledger: ledger, Sync: s}) {
					a.quiet.logger(a.logger).Error("lease report lost: the backlog is full", zap.String("org", s.Org))
				}
			},
		}, a.quiet.logger(a.logger).Named("lease"))
	}
	return nil
}

// clientOptions returns the Redis connection's settings with their
// placeholders replaced. A {env.*} placeholder that is empty is an error
// that names its variable: an empty password would otherwise show as
// Redis' NOAUTH, and an empty URL as the embedded store.
func (a *App) clientOptions() (meter.ClientOptions, error) {
	repl := caddy.NewReplacer()
	var bad error
	resolve := func(setting, v string) string {
		if bad == nil {
			bad = emptyEnv(setting, v)
		}
		return repl.ReplaceKnown(v, "")
	}
	o := meter.ClientOptions{URL: resolve("redis", a.Redis)}
	for _, n := range a.RedisCluster {
		o.Cluster = append(o.Cluster, resolve("redis_cluster", n))
	}
	if s := a.RedisSentinel; s != nil {
		o.Sentinel = &meter.SentinelOptions{
			Master:           resolve("redis_sentinel", s.Master),
			Username:         resolve("redis_sentinel username", s.Username),
			Password:         resolve("redis_sentinel password", s.Password),
			SentinelPassword: resolve("redis_sentinel sentinel_password", s.SentinelPassword),
			DB:               s.DB,
		}
		for _, addr := range s.Addrs {
			o.Sentinel.Addrs = append(o.Sentinel.Addrs, resolve("redis_sentinel", addr))
		}
	}
	o.TLS.CA = resolve("tls_ca", a.TLSCA)
	if a.TLSClient != nil {
		o.TLS.Cert = resolve("tls_client", a.TLSClient.Cert)
		o.TLS.Key = resolve("tls_client", a.TLSClient.Key)
	}
	if bad != nil {
		return o, fmt.Errorf("credits: %w", bad)
	}
	return o, nil
}

// envPlaceholder finds {env.NAME} placeholders.
var envPlaceholder = regexp.MustCompile(`\{env\.([^{}]+)\}`)

// emptyEnv returns an error naming the first {env.*} variable of v that is
// empty or unset in this process.
func emptyEnv(setting, v string) error {
	for _, m := range envPlaceholder.FindAllStringSubmatch(v, -1) {
		if os.Getenv(m[1]) == "" {
			return fmt.Errorf("%s: %s is empty: {env.%s} is read by the running Caddy process, whose environment does not set it "+
				"(write {$%s} to take it from the environment that adapts the Caddyfile, such as the shell that runs caddy reload)",
				setting, m[1], m[1], m[1])
		}
	}
	return nil
}

// DefaultLease is the lease size of a config that sets none: the credits a
// gateway takes of a busy org at a time.
const DefaultLease = 100

// lease is the lease size in effect; 0 is no leasing.
func (a *App) lease() int64 {
	if a.Lease == nil {
		return DefaultLease
	}
	return *a.Lease
}

// Validate checks the settings against each other.
func (a *App) Validate() error {
	err := a.validate()
	if err != nil {
		return fmt.Errorf("credits: %w", err)
	}
	return nil
}

// validate checks the settings; each error names the setting at fault, so
// that the Caddyfile parser can point at its line.
func (a *App) validate() error {
	var given []string
	if a.Redis != "" {
		given = append(given, "redis")
	}
	if len(a.RedisCluster) > 0 {
		given = append(given, "redis_cluster")
	}
	if a.RedisSentinel != nil {
		given = append(given, "redis_sentinel")
	}
	if len(given) > 1 {
		both := " are both given; choose one"
		if len(given) > 2 {
			both = " are all given; choose one"
		}
		return &settingError{fields: given, msg: strings.Join(given, " and ") + both}
	}
	if s := a.RedisSentinel; s != nil {
		if s.Master == "" || len(s.Addrs) == 0 {
			return &settingError{fields: []string{"redis_sentinel"}, msg: "redis_sentinel needs the master's name and at least one sentinel's host:port"}
		}
		if s.DB < 0 {
			return &policy.InputError{Field: "db", Value: strconv.Itoa(s.DB), Reason: "must be 0 or more"}
		}
	}
	if (a.TLSCA != "" || a.TLSClient != nil) && len(given) == 0 {
		return &settingError{fields: []string{"tls_ca", "tls_client"}, msg: "tls_ca and tls_client are for a Redis over TLS: give redis rediss://..., redis_cluster or redis_sentinel"}
	}
	if (a.TLSCA != "" || a.TLSClient != nil) && strings.HasPrefix(a.Redis, "redis://") {
		return &settingError{fields: []string{"redis", "tls_ca", "tls_client"}, msg: "tls_ca and tls_client need a rediss:// URL in redis"}
	}
	if c := a.TLSClient; c != nil && (c.Cert == "" || c.Key == "") {
		return &settingError{fields: []string{"tls_client"}, msg: "tls_client needs a certificate file and a key file"}
	}
	if r := a.WaitReplicas; r != nil {
		if *r < 0 || *r > maxWaitReplicas {
			return policy.RangeError("wait_replicas", strconv.Itoa(*r), 0, maxWaitReplicas)
		}
		if *r > 0 && len(given) == 0 {
			return &settingError{fields: []string{"wait_replicas"}, msg: "wait_replicas is for a Redis with replicas: give redis, redis_cluster or redis_sentinel"}
		}
	}
	// A zero timeout or backlog is the default, filled in by Provision.
	if a.Timeout < 0 {
		return timeoutError(time.Duration(a.Timeout).String())
	}
	if a.Lease != nil && (*a.Lease < 0 || *a.Lease > policy.MaxCost) {
		return leaseError(strconv.FormatInt(*a.Lease, 10))
	}
	if a.IdempotencyStore != nil && (*a.IdempotencyStore < 0 || *a.IdempotencyStore > maxIdempotencyStore) {
		return idempotencyStoreError(strconv.FormatInt(*a.IdempotencyStore, 10))
	}
	if a.Backlog < 0 || a.Backlog > maxBacklog {
		return backlogError(strconv.Itoa(a.Backlog))
	}
	if a.Alerts != nil {
		return a.Alerts.validate()
	}
	return nil
}

// The errors of the app's settings, one message per rule.
func timeoutError(v string) error {
	return &policy.InputError{Field: "timeout", Value: v, Reason: "must be a duration above 0, e.g. 100ms"}
}

func leaseError(v string) error {
	return &policy.InputError{Field: "lease", Value: v, Reason: fmt.Sprintf("must be off or an integer from 1 to %d", policy.MaxCost)}
}

func idempotencyStoreError(v string) error {
	return &policy.InputError{Field: "idempotency_store", Value: v, Reason: "must be a size such as 1MiB, at most 16MiB; 0 keeps none"}
}

func backlogError(v string) error {
	return policy.RangeError("backlog", v, 1, maxBacklog)
}

// observe tells the balance alerts, if any, the balance a call saw.
func (a *App) observe(org string, balance int64) {
	if a.notifier != nil {
		a.notifier.observe(org, balance)
	}
}

// Start starts the balance alerts, and warns about store settings that can
// lose credits.
func (a *App) Start() error {
	if a.notifier != nil {
		a.notifier.start()
	}
	if a.store.embedded != nil {
		a.logger.Warn("credits are kept in the embedded store, in this process only: balances are lost on restart; set redis or redis_cluster for production")
		return nil
	}
	go a.store.checkSettings(a.logger)
	return nil
}

// Stop stops the balance alerts (an alert not yet delivered stays pending
// in Redis for the next config's sweep). The store outlives a config
// reload, and Cleanup lets it go with the last config that uses it.
func (a *App) Stop() error {
	if a.notifier != nil {
		a.notifier.stop()
	}
	return nil
}

// Cleanup releases this config's use of the store. Caddy calls it after a
// failed Provision too, so every field may be unset.
func (a *App) Cleanup() error {
	if a.leaser != nil {
		// Reports the leases' spending and gives their credits back, while
		// the store is still open.
		a.leaser.Close()
	}
	if a.quiet != nil {
		// The counts of lines held back are written while the logs are open.
		a.quiet.close()
	}
	if a.store == nil {
		return nil
	}
	_, err := stores.Delete(a.poolKey)
	return err
}

// appFrom returns the credits app of the config being provisioned, creating
// it with its defaults when the Caddyfile has no credits global option.
func appFrom(ctx caddy.Context) (*App, error) {
	v, err := ctx.App("credits")
	if err != nil {
		return nil, fmt.Errorf("credits app: %w", err)
	}
	return v.(*App), nil
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.Validator    = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
