package meter

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// laneGate holds, while it is shut, every charge that goes to Redis alone,
// so that the charges after them find every lane busy and queue. It counts
// the batches that go past it: runs of the batch script, and pipelines of
// charges.
type laneGate struct {
	redistest.CommandHook
	mu      sync.Mutex
	shut    chan struct{} // nil: open
	held    atomic.Int64
	batches atomic.Int64
	batched atomic.Int64
}

func (g *laneGate) close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.shut = make(chan struct{})
	g.held.Store(0)
	g.batches.Store(0)
	g.batched.Store(0)
}

func (g *laneGate) open() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.shut != nil {
		close(g.shut)
		g.shut = nil
	}
}

// script is the hash an EVALSHA runs, or "" for any other command.
func script(cmd redis.Cmder) string {
	if args := cmd.Args(); cmd.Name() == "evalsha" && len(args) > 2 {
		s, _ := args[1].(string)
		return s
	}
	return ""
}

func (g *laneGate) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		switch script(cmd) {
		case chargeScript.Hash():
			g.mu.Lock()
			shut := g.shut
			g.mu.Unlock()
			if shut != nil {
				g.held.Add(1)
				<-shut
			}
		case chargesScript.Hash():
			n, _ := strconv.Atoi(fmt.Sprint(cmd.Args()[2]))
			g.batches.Add(1)
			g.batched.Add(int64(n / len(chargeCall{}.keys(Keys{}))))
		}
		return next(ctx, cmd)
	}
}

func (g *laneGate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		n := 0
		for _, cmd := range cmds {
			if script(cmd) == chargeScript.Hash() {
				n++
			}
		}
		if n > 0 {
			g.batches.Add(1)
			g.batched.Add(int64(n))
		}
		return next(ctx, cmds)
	}
}

// batchEnv is a ledger whose lanes a gate can hold.
type batchEnv struct {
	*env
	gate *laneGate
}

// newBatchEnv is a ledger on rdb whose lanes gate holds. Its batcher opens
// a lane for every charge that finds one free, so that a test fills each
// lane with a charge of its own.
func newBatchEnv(t *testing.T, rdb redis.UniversalClient, gate *laneGate) *batchEnv {
	b := &batchEnv{env: newEnv(t, rdb, Config{DefaultPlan: Plan{Allowance: 10}}), gate: gate}
	b.ledger.charges.laneAfter = 0
	return b
}

// queue fills every lane with a charge the gate holds, then starts charge
// for each of orgs and returns once they all wait in the queue. wait opens
// the gate and returns each org's result and error, the lanes' first.
func (b *batchEnv) queue(orgs []string, charge func(org string) (ChargeResult, error)) (wait func() ([]ChargeResult, []error)) {
	b.t.Helper()
	b.gate.close()
	all := make([]string, 0, batchLanes+len(orgs))
	for i := range batchLanes {
		all = append(all, fmt.Sprintf("lane-%d", i))
	}
	all = append(all, orgs...)
	res, errs := make([]ChargeResult, len(all)), make([]error, len(all))
	var wg sync.WaitGroup
	start := func(i int) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i], errs[i] = charge(all[i])
		}()
	}
	for i := range batchLanes {
		start(i)
	}
	await(b.t, "every lane is held", func() bool { return b.gate.held.Load() == batchLanes })
	for i := range orgs {
		start(batchLanes + i)
	}
	await(b.t, "the charges queue", func() bool {
		b.ledger.charges.mu.Lock()
		defer b.ledger.charges.mu.Unlock()
		return len(b.ledger.charges.queue) == len(orgs)
	})
	return func() ([]ChargeResult, []error) {
		b.gate.open()
		wg.Wait()
		for i := range batchLanes {
			if errs[i] != nil || !res[i].Charged {
				b.t.Fatalf("lane %d: %+v %v", i, res[i], errs[i])
			}
		}
		return res[batchLanes:], errs[batchLanes:]
	}
}

// stored reads an org's free allowance straight from its account hash.
func (b *batchEnv) stored(org string) string {
	b.t.Helper()
	v, err := b.rdb.HGet(b.ctx, b.ledger.Keys().Account(org), "rem").Result()
	if errors.Is(err, redis.Nil) {
		return "none"
	}
	if err != nil {
		b.t.Fatal(err)
	}
	return v
}

func (b *batchEnv) charge(org string) (ChargeResult, error) {
	return b.ledger.Charge(b.ctx, ChargeRequest{Org: org, Feature: "rich-text", Cost: 3})
}

// TestBatchedCharges checks the charges that go together, on miniredis, a
// real redis-server (one script run per batch) and the 3-node Cluster (one
// pipeline per node): each is charged as it would be alone, with its own
// outcome, deadline and errors.
func TestBatchedCharges(t *testing.T) {
	for _, s := range stores(t) {
		gate := &laneGate{}
		s.rdb.AddHook(gate)
		t.Run(s.name, func(t *testing.T) {
			newBatch := func(t *testing.T) *batchEnv {
				return newBatchEnv(t, s.rdb, gate)
			}
			t.Run("queued charges go together, each charged once", func(t *testing.T) {
				b := newBatch(t)
				var orgs []string
				for i := range 40 {
					// Four charges of 3 on 10 credits: the fourth is refused.
					orgs = append(orgs, fmt.Sprintf("org-%d", i%10))
				}
				res, errs := b.queue(orgs, b.charge)()
				if n := b.gate.batches.Load(); n != 1 || b.gate.batched.Load() != 40 {
					t.Fatalf("%d batches of %d charges in all, want one of 40", n, b.gate.batched.Load())
				}
				charged := map[string]int64{}
				for i, org := range orgs {
					if errs[i] != nil {
						t.Fatalf("%s: %v", org, errs[i])
					}
					if res[i].Charged {
						charged[org] += res[i].Cost
					}
				}
				for i := range 10 {
					org := fmt.Sprintf("org-%d", i)
					a := b.account(org)
					if charged[org] != 9 || a.Used["rich-text"] != 9 || a.Balance != 1 || b.stored(org) != "1" {
						t.Fatalf("%s: charged %d, account %+v, stored rem %s; want 9 of 10 taken", org, charged[org], a, b.stored(org))
					}
					b.checkEvents(org)
				}
			})
			t.Run("a charge waits for the round trip in flight, and opens a lane behind a slow one", func(t *testing.T) {
				// The ledger's own batcher, as it runs.
				b := &batchEnv{env: newEnv(t, s.rdb, Config{DefaultPlan: Plan{Allowance: 10}}), gate: gate}
				if b.ledger.charges.laneAfter != batchLaneAfter || batchLanes < 2 {
					t.Fatalf("lane after %v, %d lanes", b.ledger.charges.laneAfter, batchLanes)
				}
				// However slow the machine, the second charge finds the first
				// in flight for less than that.
				b.ledger.charges.laneAfter = time.Hour
				b.gate.close()
				defer b.gate.open()
				type outcome struct {
					res ChargeResult
					err error
				}
				start := func(org string) chan outcome {
					out := make(chan outcome, 1)
					go func() {
						res, err := b.charge(org)
						out <- outcome{res, err}
					}()
					return out
				}
				queued := func(n int) func() bool {
					return func() bool {
						b.ledger.charges.mu.Lock()
						defer b.ledger.charges.mu.Unlock()
						return len(b.ledger.charges.queue) == n
					}
				}
				first := start("slow")
				await(t, "the first charge is in flight", func() bool { return b.gate.held.Load() == 1 })
				second := start("second")
				await(t, "the second charge waits in the queue", queued(1))
				if n := b.gate.held.Load(); n != 1 {
					t.Fatalf("%d charges went alone, want the first only", n)
				}
				// The round trip in flight has taken laneAfter: the next charge
				// opens a lane, which takes the queue.
				b.ledger.charges.mu.Lock()
				b.ledger.charges.last = time.Now().Add(-time.Hour)
				b.ledger.charges.mu.Unlock()
				third := start("third")
				for _, c := range []struct {
					org string
					out chan outcome
				}{{"second", second}, {"third", third}} {
					o := <-c.out
					if o.err != nil || !o.res.Charged || o.res.Balance != 7 {
						t.Fatalf("%s: %+v %v, want charged with 7 left while the first is held", c.org, o.res, o.err)
					}
				}
				if n, m := b.gate.batches.Load(), b.gate.batched.Load(); n != 1 || m != 2 {
					t.Fatalf("%d batches of %d charges, want one of the second and third", n, m)
				}
				b.gate.open()
				if o := <-first; o.err != nil || !o.res.Charged || o.res.Balance != 7 {
					t.Fatalf("slow: %+v %v", o.res, o.err)
				}
				for _, org := range []string{"slow", "second", "third"} {
					if a := b.account(org); a.Balance != 7 || a.Used["rich-text"] != 3 {
						t.Fatalf("%s: %+v, want 3 of 10 taken once", org, a)
					}
				}
			})
			t.Run("a charge whose deadline passes in the queue is not sent", func(t *testing.T) {
				b := newBatch(t)
				wait := b.queue([]string{"late"}, func(org string) (ChargeResult, error) {
					if org != "late" {
						return b.charge(org)
					}
					ctx, cancel := context.WithTimeout(b.ctx, 50*time.Millisecond)
					defer cancel()
					return b.ledger.Charge(ctx, ChargeRequest{Org: org, Feature: "rich-text", Cost: 3})
				})
				// The late charge gives up while the lanes are still held.
				await(t, "the late charge leaves the queue", func() bool {
					b.ledger.charges.mu.Lock()
					defer b.ledger.charges.mu.Unlock()
					return len(b.ledger.charges.queue) == 0
				})
				_, errs := wait()
				if !errors.Is(errs[0], context.DeadlineExceeded) || !Unsent(errs[0]) {
					t.Fatalf("late charge: %v (unsent %v), want an unsent deadline error", errs[0], Unsent(errs[0]))
				}
				if b.gate.batches.Load() != 0 || b.stored("late") != "none" {
					t.Fatalf("%d batches sent; the late org's account: %s", b.gate.batches.Load(), b.stored("late"))
				}
				for _, k := range b.keys() {
					if strings.Contains(k, "{late}") {
						t.Fatalf("the late charge wrote %s", k)
					}
				}
			})
			t.Run("an error of one charge in a batch is its own", func(t *testing.T) {
				b := newBatch(t)
				if _, err := b.charge("corrupt"); err != nil {
					t.Fatal(err)
				}
				if err := b.rdb.HSet(b.ctx, b.ledger.Keys().Account("corrupt"), "rem", "oops").Err(); err != nil {
					t.Fatal(err)
				}
				if err := b.rdb.Set(b.ctx, b.ledger.Keys().Calls("typed"), "not a list", 0).Err(); err != nil {
					t.Fatal(err)
				}
				before := b.dump()
				res, errs := b.queue([]string{"good-1", "corrupt", "typed", "good-2"}, b.charge)()
				if n := b.gate.batches.Load(); n != 1 {
					t.Fatalf("%d batches, want 1", n)
				}
				if errs[1] == nil || !strings.Contains(errs[1].Error(), "not a number") {
					t.Fatalf("corrupt org: %v, want its field's error", errs[1])
				}
				if !errors.Is(errs[2], ErrWrongType) {
					t.Fatalf("org with a wrong-type call log: %v", errs[2])
				}
				after := b.dump()
				for k, v := range before {
					if after[k] != v && (strings.Contains(k, "{corrupt}") || strings.Contains(k, "{typed}")) {
						t.Fatalf("%s changed: %s -> %s", k, v, after[k])
					}
				}
				for _, k := range b.keys() {
					if _, ok := before[k]; !ok && (strings.Contains(k, "{corrupt}") || strings.Contains(k, "{typed}")) {
						t.Fatalf("a failed charge wrote %s", k)
					}
				}
				for _, i := range []int{0, 3} {
					if errs[i] != nil || !res[i].Charged || res[i].Balance != 7 {
						t.Fatalf("charge %d: %+v %v", i, res[i], errs[i])
					}
				}
				for _, org := range []string{"good-1", "good-2"} {
					if b.stored(org) != "7" {
						t.Fatalf("%s: stored rem %s, want 7", org, b.stored(org))
					}
				}
			})
			t.Run("a batch after Redis forgot the scripts", func(t *testing.T) {
				b := newBatch(t)
				var orgs []string
				for i := range 10 {
					orgs = append(orgs, fmt.Sprintf("o%d", i))
				}
				wait := b.queue(orgs, b.charge)
				flush := func(ctx context.Context, c *redis.Client) error { return c.ScriptFlush(ctx).Err() }
				if err := b.ledger.eachNode(b.ctx, flush); err != nil {
					t.Fatal(err)
				}
				res, errs := wait()
				for i, org := range orgs {
					if errs[i] != nil || !res[i].Charged || b.stored(org) != "7" {
						t.Fatalf("%s: %+v %v, stored rem %s", org, res[i], errs[i], b.stored(org))
					}
				}
			})
		})
	}
}
