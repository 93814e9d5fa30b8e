package meter

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// store is one kind of Redis the ledger cases run on.
type store struct {
	name string
	rdb  redis.UniversalClient
	real bool
}

// stores starts the three kinds of Redis: miniredis, a real redis-server on
// a free port, and a 3-node Redis Cluster.
func stores(t *testing.T) []store {
	t.Helper()
	mini := miniredis.RunT(t)
	single := redistest.Start(t, redistest.Options{})
	cluster := redistest.StartCluster(t, 3, 0)
	clients := []store{
		{name: "miniredis", rdb: redis.NewClient(&redis.Options{Addr: mini.Addr(), MaxRetries: -1, ContextTimeoutEnabled: true})},
		{name: "redis", rdb: mustClient(t, ClientOptions{URL: "redis://" + single.Addr}), real: true},
		{name: "cluster", rdb: mustClient(t, ClientOptions{Cluster: cluster.Addrs}), real: true},
	}
	for _, s := range clients {
		t.Cleanup(func() { s.rdb.Close() })
	}
	return clients
}

func mustClient(t testing.TB, o ClientOptions) redis.UniversalClient {
	t.Helper()
	rdb, err := NewClient(o)
	if err != nil {
		t.Fatal(err)
	}
	return rdb
}

// clock is a clock that tests move by hand.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock(t time.Time) *clock { return &clock{now: t} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// env is one case's ledger on one store, under a key prefix of its own.
type env struct {
	t      *testing.T
	rdb    redis.UniversalClient
	clock  *clock
	ledger *Ledger
	prefix string
	ctx    context.Context
}

var prefixes atomic.Int64

func date(y int, m time.Month, d int) time.Time {
	return time.Date(y, m, d, 12, 0, 0, 0, time.UTC)
}

func newEnv(t *testing.T, rdb redis.UniversalClient, cfg Config) *env {
	t.Helper()
	e := &env{t: t, rdb: rdb, clock: newClock(date(2026, time.March, 10)), ctx: context.Background()}
	e.prefix = fmt.Sprintf("t%d", prefixes.Add(1))
	cfg.Prefix = e.prefix
	if cfg.Now == nil {
		cfg.Now = e.clock.Now
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Second // the race detector and a loaded CI machine are slow
	}
	l, err := New(rdb, cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.ledger = l
	return e
}

// keys lists every key under the env's prefix, on every node.
func (e *env) keys() []string {
	e.t.Helper()
	var mu sync.Mutex
	var out []string
	scan := func(ctx context.Context, c *redis.Client) error {
		iter := c.Scan(ctx, 0, e.prefix+":*", 1000).Iterator()
		for iter.Next(ctx) {
			mu.Lock()
			out = append(out, iter.Val())
			mu.Unlock()
		}
		return iter.Err()
	}
	var err error
	switch c := e.rdb.(type) {
	case *redis.ClusterClient:
		err = c.ForEachMaster(e.ctx, scan)
	case *redis.Client:
		err = scan(e.ctx, c)
	default:
		e.t.Fatalf("cannot scan a %T", e.rdb)
	}
	if err != nil {
		e.t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// dump returns every key under the prefix with its contents, to compare
// before and after a call that must write nothing.
func (e *env) dump() map[string]string {
	e.t.Helper()
	out := map[string]string{}
	for _, k := range e.keys() {
		typ, err := e.rdb.Type(e.ctx, k).Result()
		if err != nil {
			e.t.Fatal(err)
		}
		var v any
		switch typ {
		case "hash":
			v, err = e.rdb.HGetAll(e.ctx, k).Result()
		case "string":
			v, err = e.rdb.Get(e.ctx, k).Result()
		case "set":
			v, err = e.rdb.SMembers(e.ctx, k).Result()
		case "list":
			v, err = e.rdb.LRange(e.ctx, k, 0, -1).Result()
		}
		if err != nil {
			e.t.Fatal(err)
		}
		out[k] = fmt.Sprintf("%s %v", typ, v)
	}
	return out
}

// moveServerClock moves the clock the ledger's scripts read from Redis,
// which holds and leases expire by.
func (e *env) moveServerClock(d time.Duration) {
	e.ledger.serverSkew.Add(d.Milliseconds())
}

func (e *env) charge(org string, cost int64) ChargeResult {
	e.t.Helper()
	r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: org, Feature: "rich-text", Cost: cost})
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

func (e *env) account(org string) Account {
	e.t.Helper()
	a, err := e.ledger.Account(e.ctx, org)
	if err != nil {
		e.t.Fatal(err)
	}
	return a
}

func (e *env) topUp(org string, amount int64, ref string) Account {
	e.t.Helper()
	a, _, err := e.ledger.TopUp(e.ctx, org, amount, ref)
	if err != nil {
		e.t.Fatal(err)
	}
	return a
}

func (e *env) setPlan(org string, allowance int64, month int) Account {
	e.t.Helper()
	a, _, err := e.ledger.SetPlan(e.ctx, org, Plan{Allowance: allowance, RechargeMonth: month}, "")
	if err != nil {
		e.t.Fatal(err)
	}
	return a
}

// checkEvents asserts that the org's events add up to its balance, so no
// change went unrecorded.
func (e *env) checkEvents(org string) []Event {
	e.t.Helper()
	var lists [2][]Event
	for i, key := range []string{e.ledger.Keys().Events(org), e.ledger.Keys().Calls(org)} {
		items, err := e.rdb.LRange(e.ctx, key, 0, -1).Result()
		if err != nil {
			e.t.Fatal(err)
		}
		if lists[i], err = parseEvents(items); err != nil {
			e.t.Fatal(err)
		}
	}
	events := mergeEvents(lists[0], lists[1], len(lists[0])+len(lists[1]))
	var sum int64
	for _, ev := range events {
		sum += ev.Delta
	}
	a := e.account(org)
	if sum != a.Balance {
		e.t.Fatalf("%d events add up to %d, balance is %d", len(events), sum, a.Balance)
	}
	if len(events) > 0 && events[0].Balance != a.Balance {
		e.t.Fatalf("newest event says balance %d, account says %d", events[0].Balance, a.Balance)
	}
	return events
}

func (e *env) wantBalance(a Account, balance, allowanceRemaining, purchased int64) {
	e.t.Helper()
	if a.Balance != balance || a.AllowanceRemaining != allowanceRemaining || a.Purchased != purchased {
		e.t.Fatalf("balance %d (allowance %d, purchased %d), want %d (%d, %d)",
			a.Balance, a.AllowanceRemaining, a.Purchased, balance, allowanceRemaining, purchased)
	}
}
