package meter

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
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

// TestWaitReplicasCluster: on a Redis Cluster, a ledger that waits for a
// replica waits for one of the master that ran the write. With the replica
// of one master killed, no charge or top-up of that master's orgs is
// answered (ErrNotReplicated); the other masters' orgs are charged, alone
// and in concurrent batches, and each charge answered is on its master's
// replica by the time its reply comes.
func TestWaitReplicasCluster(t *testing.T) {
	cluster := redistest.StartCluster(t, 3, 1)
	cc := cluster.Client(t)
	ctx := context.Background()
	const prefix = "wc"
	l, err := New(cc, Config{Prefix: prefix, DefaultPlan: Plan{Allowance: 1000}, Timeout: 300 * time.Millisecond, WaitReplicas: 1})
	if err != nil {
		t.Fatal(err)
	}
	keys, err := NewKeys(prefix)
	if err != nil {
		t.Fatal(err)
	}

	// Eight orgs on each master, and each master's replica.
	orgsOf := map[string][]string{}
	for i := 0; len(orgsOf) < 3 || len(orgsOf[minOrgs(orgsOf)]) < 8; i++ {
		org := fmt.Sprintf("org-%d", i)
		m, err := cc.MasterForKey(ctx, keys.Account(org))
		if err != nil {
			t.Fatal(err)
		}
		orgsOf[m.Options().Addr] = append(orgsOf[m.Options().Addr], org)
	}
	replicaOf := map[string]string{}
	shards, err := cc.ClusterShards(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, sh := range shards {
		var m, r string
		for _, n := range sh.Nodes {
			addr := fmt.Sprintf("%s:%d", n.IP, n.Port)
			if n.Role == "master" {
				m = addr
			} else {
				r = addr
			}
		}
		replicaOf[m] = r
	}
	masters := make([]string, 0, 3)
	for m := range orgsOf {
		if replicaOf[m] == "" {
			t.Fatalf("master %s has no replica: %v", m, replicaOf)
		}
		masters = append(masters, m)
	}
	sort.Strings(masters)
	down := masters[0]
	for _, n := range cluster.Nodes {
		if n.Addr == replicaOf[down] {
			n.Kill(t)
		}
	}

	// Calls for every org at once, twice over, so that charges go in
	// batches across the masters.
	type outcome struct {
		org string
		r   ChargeResult
		err error
	}
	var all []string
	for _, m := range masters {
		all = append(all, orgsOf[m][:8]...)
	}
	results := make(chan outcome, 2*len(all))
	var wg sync.WaitGroup
	for round := range 2 {
		for _, org := range all {
			wg.Go(func() {
				req := ChargeRequest{Org: org, Feature: "f", Cost: 3, RequestID: fmt.Sprintf("r%d", round), Attempt: "a"}
				r, err := l.Charge(ctx, req)
				results <- outcome{org, r, err}
			})
		}
	}
	wg.Wait()
	close(results)
	isDown := map[string]bool{}
	for _, org := range orgsOf[down][:8] {
		isDown[org] = true
	}
	replicas := map[string]*redis.Client{}
	for _, m := range masters[1:] {
		replicas[m] = redis.NewClient(&redis.Options{Addr: replicaOf[m], OnConnect: func(ctx context.Context, c *redis.Conn) error {
			return c.ReadOnly(ctx).Err()
		}})
		defer replicas[m].Close()
	}
	charged, notReplicated := map[string]int{}, 0
	for o := range results {
		if isDown[o.org] {
			// Not answered: no replica took it (its outcome is unknown),
			// or its deadline passed while it waited behind those that
			// were sent (it was not sent: nothing changed).
			if !(errors.Is(o.err, ErrNotReplicated) || errors.Is(o.err, context.DeadlineExceeded)) ||
				Classify(o.err) != Transient || (Unsent(o.err) && errors.Is(o.err, ErrNotReplicated)) {
				t.Errorf("org %s, whose master has no replica: %+v, %v; want ErrNotReplicated", o.org, o.r, o.err)
			}
			if !Unsent(o.err) {
				notReplicated++
			}
			continue
		}
		if o.err != nil || !o.r.Charged {
			t.Errorf("org %s: %+v, %v; want charged", o.org, o.r, o.err)
			continue
		}
		charged[o.org]++
	}
	if notReplicated == 0 {
		t.Error("no charge of the master without a replica was sent")
	}
	// What each charge answered is on the replica: none was answered
	// before its master's replica had it.
	for _, m := range masters[1:] {
		for _, org := range orgsOf[m][:8] {
			n, err := replicas[m].HLen(ctx, keys.Account(org)).Result()
			if err != nil || n == 0 || charged[org] != 2 {
				t.Errorf("org %s: account of %d fields on the replica (%v), %d charges answered; want both", org, n, err, charged[org])
			}
			for round := range 2 {
				if err := replicas[m].Get(ctx, keys.Request(org, fmt.Sprintf("r%d", round))).Err(); err != nil {
					t.Errorf("org %s: request r%d's marker is not on the replica: %v", org, round, err)
				}
			}
		}
	}
	if _, _, err := l.TopUp(ctx, orgsOf[down][0], 5, "t1"); !(errors.Is(err, ErrNotReplicated) || errors.Is(err, context.DeadlineExceeded)) {
		t.Fatalf("a top-up of an org whose master has no replica: %v", err)
	}
	if _, _, err := l.TopUp(ctx, orgsOf[masters[1]][0], 5, "t1"); err != nil {
		t.Fatalf("a top-up of an org whose master has its replica: %v", err)
	}
}

// minOrgs returns the master with the fewest orgs.
func minOrgs(orgsOf map[string][]string) string {
	best := ""
	for m, orgs := range orgsOf {
		if best == "" || len(orgs) < len(orgsOf[best]) {
			best = m
		}
	}
	return best
}

// TestWaitReplicasClusterMigration: a ledger that waits for a replica
// follows a slot that moves to another master, although each of its writes
// goes, with WAIT, to the one master its slot map names. While the slot
// migrates, a new org's charge is refused (Redis answers ASK, then
// TRYAGAIN: not all of its keys are on the importing master) and writes
// nothing; once the slot has moved, the old master answers the charge
// MOVED, and the ledger sends it, with WAIT, to the master named.
func TestWaitReplicasClusterMigration(t *testing.T) {
	cluster := redistest.StartCluster(t, 3, 1)
	cc := cluster.Client(t)
	ctx := context.Background()
	const prefix = "wm"
	l, err := New(cc, Config{Prefix: prefix, DefaultPlan: Plan{Allowance: 1000}, Timeout: time.Second, WaitReplicas: 1})
	if err != nil {
		t.Fatal(err)
	}
	keys, _ := NewKeys(prefix)
	const org = "mover"
	slot := int(cc.ClusterKeySlot(ctx, keys.Account(org)).Val())
	source, err := cc.MasterForKey(ctx, keys.Account(org))
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		addrs []string
	)
	if err := cc.ForEachMaster(ctx, func(_ context.Context, c *redis.Client) error {
		mu.Lock()
		defer mu.Unlock()
		if c.Options().Addr != source.Options().Addr {
			addrs = append(addrs, c.Options().Addr)
		}
		return nil
	}); err != nil || len(addrs) == 0 {
		t.Fatalf("no other master: %v", err)
	}
	// Own clients of both masters: cc's own would reload its slot map.
	src := redis.NewClient(&redis.Options{Addr: source.Options().Addr})
	dst := redis.NewClient(&redis.Options{Addr: addrs[0]})
	defer src.Close()
	defer dst.Close()
	srcID, dstID := src.ClusterMyID(ctx).Val(), dst.ClusterMyID(ctx).Val()
	if err := dst.Do(ctx, "CLUSTER", "SETSLOT", slot, "IMPORTING", srcID).Err(); err != nil {
		t.Fatal(err)
	}
	if err := src.Do(ctx, "CLUSTER", "SETSLOT", slot, "MIGRATING", dstID).Err(); err != nil {
		t.Fatal(err)
	}
	req := ChargeRequest{Org: org, Feature: "f", Cost: 3, RequestID: "r1", Attempt: "a"}
	if r, err := l.Charge(ctx, req); err == nil || !Unsent(err) || Classify(err) != Transient {
		t.Fatalf("a charge while the slot migrates: %+v, %v (unsent %v); want refused, nothing written", r, err, Unsent(err))
	}
	if n := src.DBSize(ctx).Val() + dst.DBSize(ctx).Val(); n != 0 {
		// dst counts the keys of its other slots too: none were written.
		t.Fatalf("%d keys written by a refused charge", n)
	}

	// The slot moves for good; cc's slot map still names the source.
	for _, c := range []*redis.Client{src, dst} {
		if err := c.Do(ctx, "CLUSTER", "SETSLOT", slot, "NODE", dstID).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if m, _ := cc.MasterForKey(ctx, keys.Account(org)); m.Options().Addr != source.Options().Addr {
		t.Fatalf("the ledger's slot map was reloaded before the charge: it names %s", m.Options().Addr)
	}
	for _, id := range []string{"r1", "r2"} {
		req.RequestID = id
		if r, err := l.Charge(ctx, req); err != nil || !r.Charged {
			t.Fatalf("charge %s after the slot moved: %+v, %v", id, r, err)
		}
	}
	if dst.HLen(ctx, keys.Account(org)).Val() == 0 || src.Exists(ctx, keys.Account(org)).Val() != 0 {
		t.Fatal("the account is not on the slot's new master alone")
	}
	if a, err := l.Balance(ctx, org); err != nil || a.Balance != 994 {
		t.Fatalf("the balance after both charges: %+v, %v; want 994", a, err)
	}
}
