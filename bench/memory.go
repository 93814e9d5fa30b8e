package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redisproc"
	"github.com/creditsgw/caddy-credits/meter"
)

// memoryResult is what Redis holds per org.
type memoryResult struct {
	Orgs int
	// WithMarker is used_memory per org while the request marker and the
	// call log of its one call live (15 minutes).
	WithMarker float64
	// Steady is used_memory per org once they have expired.
	Steady float64
	// BusyCalls is how many calls the busy org made, and Busy the bytes of
	// its keys once its markers and call log have expired.
	BusyCalls int
	Busy      int64
	// Grants is used_memory per grant given to the orgs, one round of one
	// grant per org at a time: Grants[0] the first (it starts the org's
	// account events and grant references), the others each more grant;
	// MoreGrant is their mean (the allocator grows each key by size
	// classes, so one round may cost more than the next).
	Grants    []float64
	MoreGrant float64
	// Keys is MEMORY USAGE of each key kind of one org.
	Keys []keyUsage
}

type keyUsage struct {
	kind, key string
	bytes     int64
	note      string
}

// orgName is the id of the i-th org of the memory run: 11 characters, as
// short ids are; longer ids (a UUID is 36) make every key longer.
func orgName(i int) string { return fmt.Sprintf("org-%07d", i) }

// requestID is the id of org i's charge: "g:" and 32 hex digits, the shape
// of the gateway's own ids, made from i so the marker can be found again.
func requestID(i int) string { return fmt.Sprintf("g:%032x", i) }

// runMemory creates n orgs through the ledger's charge script, one call
// each, on a fresh redis-server, and reports used_memory per org; then it
// makes busy calls to one org and reports what that org keeps.
func runMemory(ctx context.Context, w io.Writer, ps *procs, n, busy, workers int) (*memoryResult, error) {
	_, addr, err := startRedis(ctx, ps, "redis-memory")
	if err != nil {
		return nil, err
	}
	rdb, err := meter.NewClient(meter.ClientOptions{URL: "redis://" + addr, PoolSize: workers})
	if err != nil {
		return nil, err
	}
	defer rdb.Close()
	ledger, err := meter.New(rdb, meter.Config{DefaultPlan: meter.Plan{Allowance: meter.MaxAmount}, Timeout: 10 * time.Second})
	if err != nil {
		return nil, err
	}
	raw := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer raw.Close()

	fmt.Fprintf(w, "\n== memory: %d orgs, one call each, through the ledger's charge script ==\n", n)
	fmt.Fprintf(w, "redis-server %s %s, %d writers, org ids like %s (%d characters)\n",
		redisVersion(ctx, raw), strings.Join(quoteEmpty(redisArgs), " "), workers, orgName(1), len(orgName(1)))

	// Every writer's connection is opened, and the scripts loaded, before
	// the first reading: both are there once, whatever the number of orgs.
	if err := parallel(ctx, workers, workers, func(i int) error {
		_, err := ledger.Charge(ctx, meter.ChargeRequest{Org: "warmup", Feature: "bench", Cost: 1})
		return err
	}); err != nil {
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	before, err := usedMemory(ctx, raw)
	if err != nil {
		return nil, err
	}

	start := time.Now()
	var done atomic.Int64
	step := max(n/10, 1)
	var mu sync.Mutex
	err = parallel(ctx, workers, n, func(i int) error {
		res, err := ledger.Charge(ctx, meter.ChargeRequest{Org: orgName(i), Feature: "bench", Cost: 1, RequestID: requestID(i)})
		if err != nil {
			return err
		}
		if !res.Charged || res.Replay {
			return fmt.Errorf("org %s: charge not taken: %+v", orgName(i), res)
		}
		if k := done.Add(1); k%int64(step) == 0 {
			mu.Lock()
			fmt.Fprintf(w, "  %d/%d orgs, %.0f/s\n", k, n, float64(k)/time.Since(start).Seconds())
			mu.Unlock()
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	elapsed := time.Since(start)
	with, err := usedMemory(ctx, raw)
	if err != nil {
		return nil, err
	}

	res := &memoryResult{Orgs: n, BusyCalls: busy}
	keys := ledger.Keys()
	sample := orgName(0)
	for _, k := range []struct{ kind, key string }{
		{"account hash", keys.Account(sample)},
		{"call log (2 events)", keys.Calls(sample)},
		{"request marker", keys.Request(sample, requestID(0))},
	} {
		u, err := keyMemory(ctx, raw, k.key)
		if err != nil {
			return nil, err
		}
		u.kind = k.kind
		res.Keys = append(res.Keys, u)
	}

	// Markers and call logs expire after 15 minutes; deleting them shows
	// the orgs after that.
	var deleted atomic.Int64
	const batch = 100 // small pipelines keep Redis' query buffers small
	err = parallel(ctx, workers, (n+batch-1)/batch, func(b int) error {
		pipe := raw.Pipeline()
		var cmds []*redis.IntCmd
		for i := b * batch; i < min((b+1)*batch, n); i++ {
			cmds = append(cmds, pipe.Del(ctx, keys.Request(orgName(i), requestID(i)), keys.Calls(orgName(i))))
		}
		if _, err := pipe.Exec(ctx); err != nil {
			return err
		}
		for _, c := range cmds {
			deleted.Add(c.Val())
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("deleting markers: %w", err)
	}
	steady, err := usedMemory(ctx, raw)
	if err != nil {
		return nil, err
	}
	res.WithMarker = float64(with-before) / float64(n)
	res.Steady = float64(steady-before) / float64(n)
	fmt.Fprintf(w, "created %d orgs in %.1fs; deleted %d request markers and call logs to see the steady state\n", n, elapsed.Seconds(), deleted.Load())
	fmt.Fprintf(w, "used_memory less client buffers: %d before, %d with the orgs, %d once their markers and call logs are gone\n", before, with, steady)
	fmt.Fprintf(w, "bytes per org, with one call's request marker and call log (15 minutes): %.0f\n", res.WithMarker)
	fmt.Fprintf(w, "bytes per org, steady state (markers expired): %.0f\n", res.Steady)

	// Grants: a promotional grant for every org, five rounds, each with an
	// expiry and a reference as a billing system would send.
	last := steady
	expires := time.Now().Add(365 * 24 * time.Hour)
	for round := range 5 {
		err = parallel(ctx, workers, n, func(i int) error {
			req := meter.GrantRequest{Amount: 1000, Expires: expires, Reference: fmt.Sprintf("promo-%d-%07d", round, i)}
			_, _, applied, err := ledger.Grant(ctx, orgName(i), req)
			if err == nil && !applied {
				err = fmt.Errorf("org %s: grant %d not applied", orgName(i), round)
			}
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("grants: %w", err)
		}
		now, err := usedMemory(ctx, raw)
		if err != nil {
			return nil, err
		}
		res.Grants = append(res.Grants, float64(now-last)/float64(n))
		last = now
	}
	for _, b := range res.Grants[1:] {
		res.MoreGrant += b / float64(len(res.Grants)-1)
	}
	fmt.Fprintf(w, "bytes per grant (a promotional grant with an expiry and a 15-character reference, to every org, 5 rounds): first %.0f (it starts the org's account events and grant references), then %.0f: each more grant %.0f\n",
		res.Grants[0], res.Grants[1:], res.MoreGrant)
	for _, k := range []struct{ kind, key string }{
		{"account hash, 5 grants", keys.Account(sample)},
		{"grant references, 5 grants", keys.GrantRefs(sample)},
		{"account events, 5 grants", keys.Events(sample)},
	} {
		u, err := keyMemory(ctx, raw, k.key)
		if err != nil {
			return nil, err
		}
		u.kind = k.kind
		res.Keys = append(res.Keys, u)
	}

	// One busy org: its call log is at its cap, and then it expires with
	// the markers; what stays is the account with its usage per day.
	start = time.Now()
	err = parallel(ctx, workers, busy, func(i int) error {
		_, err := ledger.Charge(ctx, meter.ChargeRequest{Org: "busy", Feature: "bench", Cost: 1, RequestID: "g:busy" + strconv.Itoa(i)})
		return err
	})
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(w, "made %d calls to one org in %.1fs\n", busy, time.Since(start).Seconds())
	u, err := keyMemory(ctx, raw, keys.Calls("busy"))
	if err != nil {
		return nil, err
	}
	u.kind = fmt.Sprintf("call log after %d calls", busy)
	res.Keys = append(res.Keys, u)
	err = parallel(ctx, workers, (busy+batch-1)/batch, func(b int) error {
		pipe := raw.Pipeline()
		for i := b * batch; i < min((b+1)*batch, busy); i++ {
			pipe.Del(ctx, keys.Request("busy", "g:busy"+strconv.Itoa(i)))
		}
		_, err := pipe.Exec(ctx)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("deleting the busy org's markers: %w", err)
	}
	if err := raw.Del(ctx, keys.Calls("busy")).Err(); err != nil {
		return nil, err
	}
	var left []string
	iter := raw.Scan(ctx, 0, meter.DefaultPrefix+":{busy}:*", 1000).Iterator()
	for iter.Next(ctx) {
		left = append(left, iter.Val())
	}
	if err := iter.Err(); err != nil {
		return nil, err
	}
	for _, k := range left {
		u, err := keyMemory(ctx, raw, k)
		if err != nil {
			return nil, err
		}
		res.Busy += u.bytes
		u.kind = fmt.Sprintf("busy org's %s, after expiry", strings.TrimPrefix(k, meter.DefaultPrefix+":{busy}:"))
		res.Keys = append(res.Keys, u)
	}
	fmt.Fprintf(w, "bytes of the org after %d calls, once its markers and call log have expired: %d (%d keys)\n", busy, res.Busy, len(left))
	fmt.Fprintf(w, "MEMORY USAGE of one org's keys (without the keyspace's own tables):\n")
	for _, u := range res.Keys {
		fmt.Fprintf(w, "  %-44s %7d bytes  %s  %s\n", u.kind, u.bytes, u.key, u.note)
	}
	return res, nil
}

// parallel runs f(0..n-1) on workers goroutines and returns the first
// error; after one, the rest are not started.
func parallel(ctx context.Context, workers, n int, f func(i int) error) error {
	var next atomic.Int64
	var failed atomic.Bool
	errs := make(chan error, workers)
	for range workers {
		go func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || failed.Load() {
					errs <- nil
					return
				}
				if err := ctx.Err(); err != nil {
					failed.Store(true)
					errs <- err
					return
				}
				if err := f(i); err != nil {
					failed.Store(true)
					errs <- err
					return
				}
			}
		}()
	}
	var first error
	for range workers {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// usedMemory returns INFO memory's used_memory less the memory of client
// buffers (MEMORY STATS clients.normal), which grow with pipelines and are
// not the orgs'. It waits until the figure has settled: Redis grows its key
// tables by rehashing them a step at a time, and while it does, both the
// old and the new table are allocated.
func usedMemory(ctx context.Context, rdb *redis.Client) (int64, error) {
	const settled = 3 // equal readings in a row
	deadline := time.Now().Add(30 * time.Second)
	var last int64 = -1
	same := 0
	for {
		info, err := rdb.Info(ctx, "memory").Result()
		if err != nil {
			return 0, fmt.Errorf("INFO memory: %w", err)
		}
		v, err := strconv.ParseInt(redisproc.InfoField(info, "used_memory"), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("INFO memory: used_memory: %w", err)
		}
		clients, err := memoryStat(ctx, rdb, "clients.normal")
		if err != nil {
			return 0, err
		}
		v -= clients
		if v == last {
			same++
		} else {
			same = 0
		}
		last = v
		if same >= settled-1 || time.Now().After(deadline) {
			return v, nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// memoryStat returns one integer field of MEMORY STATS.
func memoryStat(ctx context.Context, rdb *redis.Client, field string) (int64, error) {
	raw, err := rdb.Do(ctx, "MEMORY", "STATS").Result()
	if err != nil {
		return 0, fmt.Errorf("MEMORY STATS: %w", err)
	}
	var v any
	switch stats := raw.(type) {
	case map[any]any: // RESP3
		v = stats[field]
	case []any: // RESP2: name, value, name, value...
		for i := 0; i+1 < len(stats); i += 2 {
			if stats[i] == field {
				v = stats[i+1]
			}
		}
	default:
		return 0, fmt.Errorf("MEMORY STATS: reply is %T", raw)
	}
	n, ok := v.(int64)
	if !ok {
		return 0, fmt.Errorf("MEMORY STATS: %s is %T, not an integer", field, v)
	}
	return n, nil
}

// keyMemory returns MEMORY USAGE of key, counting every element, with its
// type and encoding.
func keyMemory(ctx context.Context, rdb *redis.Client, key string) (keyUsage, error) {
	u := keyUsage{key: key}
	n, err := rdb.MemoryUsage(ctx, key, 0).Result()
	if errors.Is(err, redis.Nil) {
		u.note = "(no such key)"
		return u, nil
	}
	if err != nil {
		return u, fmt.Errorf("MEMORY USAGE %s: %w", key, err)
	}
	u.bytes = n
	typ, err := rdb.Type(ctx, key).Result()
	if err != nil {
		return u, err
	}
	enc, err := rdb.ObjectEncoding(ctx, key).Result()
	if err != nil {
		return u, err
	}
	u.note = typ + ", " + enc
	switch typ {
	case "stream":
		if l, err := rdb.XLen(ctx, key).Result(); err == nil {
			u.note += fmt.Sprintf(", %d events", l)
		}
	case "hash":
		if l, err := rdb.HLen(ctx, key).Result(); err == nil {
			u.note += fmt.Sprintf(", %d fields", l)
		}
	}
	if ttl, err := rdb.TTL(ctx, key).Result(); err == nil && ttl > 0 {
		u.note += fmt.Sprintf(", expires in %v", ttl.Round(time.Hour))
	}
	return u, nil
}

func redisVersion(ctx context.Context, rdb *redis.Client) string {
	info, err := rdb.Info(ctx, "server").Result()
	if err != nil {
		return "(unknown version)"
	}
	return redisproc.InfoField(info, "redis_version")
}

// quoteEmpty shows empty arguments as "", as a shell would need them.
func quoteEmpty(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if a == "" {
			a = `""`
		}
		out[i] = a
	}
	return out
}
