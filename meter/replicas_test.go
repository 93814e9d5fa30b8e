package meter

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// TestWaitReplicas: a ledger that waits for a replica, on a Redis with
// none, answers no write: each is ErrNotReplicated (or its deadline passed
// while it tried again), of unknown outcome (it ran on the master), and a
// store error, not corrupt data. Sent again with the same request id once the wait is off, the
// charge stands once.
func TestWaitReplicas(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { rdb.Close() })
	l, err := New(rdb, Config{Prefix: "w", DefaultPlan: Plan{Allowance: 10}, Timeout: 200 * time.Millisecond, WaitReplicas: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	req := ChargeRequest{Org: "acme", Feature: "f", Cost: 3, RequestID: "r1", Attempt: "a1"}
	_, err = l.Charge(ctx, req)
	// Tried again until the deadline: the last try's error, or the deadline.
	if !(errors.Is(err, ErrNotReplicated) || errors.Is(err, context.DeadlineExceeded)) || Unsent(err) || Classify(err) != Transient {
		t.Fatalf("a charge no replica took: %v (unsent %v, class %v)", err, Unsent(err), Classify(err))
	}
	if _, _, err := l.TopUp(ctx, "acme", 5, "t1"); !(errors.Is(err, ErrNotReplicated) || errors.Is(err, context.DeadlineExceeded)) || Unsent(err) {
		t.Fatalf("a top-up no replica took: %v", err)
	}
	plain, err := New(rdb, Config{Prefix: "w", DefaultPlan: Plan{Allowance: 10}})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		r, err := plain.Charge(ctx, req)
		if err != nil || !r.Charged || r.Balance != 7 {
			t.Fatalf("the same charge again: %+v %v", r, err)
		}
	}
	if _, err := New(rdb, Config{WaitReplicas: -1}); err == nil {
		t.Fatal("a negative count of replicas was taken")
	}
}
