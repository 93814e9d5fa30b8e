package meter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/policy"
)

// TestClassify is the classifier's table: each error a store call can
// return, with its class. Redis' replies are written as Redis 7 sends them
// (and one as Redis 6 wraps a script's failed command).
func TestClassify(t *testing.T) {
	dial := &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}
	cases := []struct {
		name string
		err  error
		want Class
	}{
		{"nil", nil, NoError},
		{"out of memory", scriptError("OOM command not allowed when used memory > 'maxmemory'. script: 1a2b, on @user_script:403."), Transient},
		{"loading", scriptError("LOADING Redis is loading the dataset in memory"), Transient},
		{"busy with a script", scriptError("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."), Transient},
		{"a replica", scriptError("READONLY You can't write against a read only replica."), Transient},
		{"master down", scriptError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."), Transient},
		{"resharding", scriptError("TRYAGAIN Multiple keys request during rehashing of slot"), Transient},
		{"cluster down", scriptError("CLUSTERDOWN The cluster is down"), Transient},
		{"scripts forgotten", scriptError("NOSCRIPT No matching script. Please use EVAL."), Transient},
		{"cannot persist", scriptError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk."), Transient},
		{"too few replicas", scriptError("NOREPLICAS Not enough good replicas to write."), Transient},
		{"Redis 6's wrapped OOM", scriptError("ERR Error running script (call to f_1a2b): @user_script:403: @user_script: 403: -OOM command not allowed when used memory > 'maxmemory'."), Transient},
		{"too many clients", scriptError("ERR max number of clients reached"), Transient},
		{"no password", scriptError("NOAUTH Authentication required."), Transient},
		{"deadline", fmt.Errorf("charge: %w", context.DeadlineExceeded), Transient},
		{"broken connection", io.EOF, Transient},
		{"dial refused", dial, Transient},
		{"pool exhausted", redis.ErrPoolTimeout, Transient},
		{"unforeseen", errors.New("something else"), Transient},
		{"wrong type, from Redis", scriptError("WRONGTYPE Operation against a key holding the wrong kind of value script: 1a2b, on @user_script:12."), Corrupt},
		{"wrong type, from a script's check", wrongType([]string{"k1", "k2", "calls"}, []any{int64(codeWrongType), int64(3), "string"}), Corrupt},
		{"a field that is not a number", scriptError("ERR user_script:199: account field rem is not a number script: 1a2b, on @user_script:199."), Corrupt},
		{"a corrupt marker, in a batch", scriptError("user_script:514: corrupt request marker"), Corrupt},
		{"bad input", &policy.InputError{Field: "cost", Value: "0", Reason: "must be 1 to 1000000"}, Refused},
		{"no org", policy.ErrOrgMissing, Refused},
		{"unknown request", fmt.Errorf("settle: %w", ErrUnknownRequest), Refused},
		{"voided", ErrVoided, Refused},
		{"too late", ErrTooLate, Refused},
		{"in flight", ErrInFlight, Refused},
		{"mismatch", ErrMismatch, Refused},
		{"not found", ErrNotFound, Refused},
		{"overdraft refused", errOverdraftRefused, Refused},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := Classify(c.err); got != c.want {
				t.Fatalf("Classify(%v) = %s, want %s", c.err, got, c.want)
			}
			if got := Permanent(c.err); got != (c.want == Corrupt || c.want == Refused) {
				t.Fatalf("Permanent(%v) = %v", c.err, got)
			}
			if c.err == nil {
				return
			}
			// Wrapped as the ledger returns it: errors.Is finds its class.
			w := fmt.Errorf("call: %w", classify(c.err))
			if errors.Is(w, ErrTransient) != (c.want == Transient) || errors.Is(w, ErrCorrupt) != (c.want == Corrupt) {
				t.Fatalf("%v: errors.Is transient %v, corrupt %v; want %s", w, errors.Is(w, ErrTransient), errors.Is(w, ErrCorrupt), c.want)
			}
			if !errors.Is(w, c.err) && c.err != io.EOF {
				t.Fatalf("%v no longer wraps %v", w, c.err)
			}
		})
	}
}

// TestStoreErrorsOnRedis classifies the errors a real redis-server gives:
// corrupt data is Corrupt; Redis at maxmemory with noeviction is Transient,
// changed nothing (Unsent), and is never taken for data of the wrong type,
// for a charge sent alone and for charges that go in a batch; once memory
// is back, the same charges are charged once.
func TestStoreErrorsOnRedis(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{Args: []string{"--maxmemory-policy", "noeviction"}})
	rdb := mustClient(t, ClientOptions{URL: "redis://" + srv.Addr})
	t.Cleanup(func() { rdb.Close() })
	gate := &laneGate{}
	rdb.AddHook(gate)
	b := newBatchEnv(t, rdb, gate)
	ctx := context.Background()

	t.Run("corrupt data", func(t *testing.T) {
		b.env.charge("corrupt", 3)
		if err := rdb.HSet(ctx, b.ledger.Keys().Account("corrupt"), "rem", "oops").Err(); err != nil {
			t.Fatal(err)
		}
		if err := rdb.Set(ctx, b.ledger.Keys().Account("typed"), "not a hash", 0).Err(); err != nil {
			t.Fatal(err)
		}
		for _, org := range []string{"corrupt", "typed"} {
			_, err := b.ledger.Charge(ctx, ChargeRequest{Org: org, Feature: "rich-text", Cost: 3})
			if Classify(err) != Corrupt || !errors.Is(err, ErrCorrupt) || errors.Is(err, ErrTransient) {
				t.Fatalf("%s: %v is %s, want corrupt", org, err, Classify(err))
			}
		}
	})

	t.Run("out of memory", func(t *testing.T) {
		// "calls" has a call log (a list) already: the error that was once
		// taken for a call log of the wrong type.
		b.env.charge("calls", 3)
		before := b.dump()
		setMaxMemory(t, rdb, "1")
		reqs := []ChargeRequest{
			{Org: "calls", Feature: "rich-text", Cost: 3, RequestID: "r-calls", Attempt: "a-calls", Overdraft: true, OverdraftLimit: NoLimit},
			{Org: "fresh", Feature: "rich-text", Cost: 3, RequestID: "r-fresh", Attempt: "a-fresh"},
		}
		for _, req := range reqs {
			_, err := b.ledger.Charge(ctx, req)
			if Classify(err) != Transient || !errors.Is(err, ErrTransient) || errors.Is(err, ErrWrongType) || !Unsent(err) ||
				!strings.Contains(err.Error(), "OOM command not allowed") {
				t.Fatalf("%s: %v is %s (unsent %v), want an OOM that is transient and changed nothing", req.Org, err, Classify(err), Unsent(err))
			}
		}
		if _, _, err := b.ledger.TopUp(ctx, "calls", 5, "oom-topup"); Classify(err) != Transient || !Unsent(err) {
			t.Fatalf("top-up: %v is %s", err, Classify(err))
		}
		if _, err := b.ledger.Void(ctx, "calls", "r-other", "a-other"); Classify(err) != Transient {
			t.Fatalf("void: %v is %s", err, Classify(err))
		}
		if after := b.dump(); fmt.Sprint(after) != fmt.Sprint(before) {
			t.Fatalf("a refused call wrote:\nbefore %v\nafter  %v", before, after)
		}
		setMaxMemory(t, rdb, "0")
		// Sent again (as the backlog does), each is charged once.
		for i, req := range reqs {
			want := []int64{4, 7}[i]
			for range 2 {
				if res, err := b.ledger.Charge(ctx, req); err != nil || !res.Charged || res.Balance != want {
					t.Fatalf("%s once memory is back: %+v %v, want charged to %d", req.Org, res, err, want)
				}
			}
		}
	})

	t.Run("out of memory in a batch", func(t *testing.T) {
		orgs := []string{"b-1", "b-2", "b-3"}
		for _, org := range orgs {
			b.env.charge(org, 3)
		}
		before := b.dump()
		b.gate.close()
		var all []string
		for i := range batchLanes {
			all = append(all, fmt.Sprintf("lane-%d", i))
		}
		errs := make([]error, batchLanes+len(orgs))
		var wg sync.WaitGroup
		for i := range all {
			wg.Go(func() { _, errs[i] = b.charge(all[i]) })
		}
		await(t, "every lane is held", func() bool { return b.gate.held.Load() == batchLanes })
		all = append(all, orgs...)
		for i := batchLanes; i < len(all); i++ {
			wg.Go(func() { _, errs[i] = b.charge(all[i]) })
		}
		await(t, "the charges queue", func() bool {
			b.ledger.charges.mu.Lock()
			defer b.ledger.charges.mu.Unlock()
			return len(b.ledger.charges.queue) == len(orgs)
		})
		setMaxMemory(t, rdb, "1")
		b.gate.open()
		wg.Wait()
		setMaxMemory(t, rdb, "0")
		if n := b.gate.batches.Load(); n != 1 {
			t.Fatalf("%d batches, want 1", n)
		}
		for i, err := range errs {
			if Classify(err) != Transient || errors.Is(err, ErrWrongType) || !Unsent(err) {
				t.Fatalf("%s: %v is %s (unsent %v), want a transient OOM", all[i], err, Classify(err), Unsent(err))
			}
		}
		if after := b.dump(); fmt.Sprint(after) != fmt.Sprint(before) {
			t.Fatalf("a refused batch wrote:\nbefore %v\nafter  %v", before, after)
		}
	})

	t.Run("no connection", func(t *testing.T) {
		down := newEnv(t, mustClient(t, ClientOptions{URL: fmt.Sprintf("redis://127.0.0.1:%d", closedPort(t))}), Config{Timeout: time.Second})
		_, err := down.ledger.Charge(ctx, ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 1})
		if Classify(err) != Transient || !errors.Is(err, ErrTransient) {
			t.Fatalf("%v is %s", err, Classify(err))
		}
	})
}

func setMaxMemory(t *testing.T, rdb redis.UniversalClient, v string) {
	t.Helper()
	if err := rdb.ConfigSet(context.Background(), "maxmemory", v).Err(); err != nil {
		t.Fatal(err)
	}
}

// closedPort returns a local port nothing listens on.
func closedPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return port
}
