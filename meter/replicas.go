package meter

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// ErrNotReplicated is the error of a script that ran on the master but
// that no replica acknowledged within the deadline (Config.WaitReplicas):
// a failover now could lose it, so its outcome is unknown. Another try of
// the same script applies it once, on whichever master then answers.
var ErrNotReplicated = errors.New("the write reached no replica in time")

// runScript runs s as script.Run does (EVALSHA, then EVAL on NOSCRIPT),
// followed, when replicas is above 0, by WAIT on the same connection: the
// reply stands only once that many replicas have the script's writes.
func runScript(ctx context.Context, rdb redis.UniversalClient, s *redis.Script, replicas int, keys []string, args ...any) *redis.Cmd {
	if replicas <= 0 {
		return s.Run(ctx, rdb, keys, args...)
	}
	cmd, wait := evalWait(ctx, rdb, s.EvalSha, replicas, keys, args)
	if redis.HasErrorPrefix(cmd.Err(), "NOSCRIPT") {
		cmd, wait = evalWait(ctx, rdb, s.Eval, replicas, keys, args)
	}
	replicated(cmd, wait, replicas)
	return cmd
}

// evalWait sends eval and WAIT in one pipeline: one connection, so that
// WAIT counts the replicas that have eval's writes. On a Cluster that
// connection is to the master of the keys' slot (master). A script Redis
// sent elsewhere did not run: one answered MOVED (the slot has moved) goes
// once to the node named, WAIT with it; one answered ASK (the slot is
// moving) fails as a Redis that refuses a command now and takes it later.
func evalWait(ctx context.Context, rdb redis.UniversalClient, eval func(context.Context, redis.Scripter, []string, ...any) *redis.Cmd,
	replicas int, keys []string, args []any) (*redis.Cmd, *redis.Cmd) {
	node, err := master(ctx, rdb, keys)
	if err != nil {
		cmd, wait := redis.NewCmd(ctx), redis.NewCmd(ctx)
		cmd.SetErr(err)
		return cmd, wait
	}
	cmd, wait := evalWaitOn(ctx, node, eval, replicas, keys, args)
	cc, ok := rdb.(*redis.ClusterClient)
	if !ok {
		return cmd, wait
	}
	reloadOn(cc, cmd.Err())
	if addr, moved := redis.IsMovedError(cmd.Err()); moved {
		if to := clusterNode(ctx, cc, addr); to != nil {
			return evalWaitOn(ctx, to, eval, replicas, keys, args)
		}
	}
	return cmd, wait
}

// evalWaitOn sends eval and WAIT in one pipeline to node.
func evalWaitOn(ctx context.Context, node redis.UniversalClient, eval func(context.Context, redis.Scripter, []string, ...any) *redis.Cmd,
	replicas int, keys []string, args []any) (*redis.Cmd, *redis.Cmd) {
	pipe := node.Pipeline()
	cmd := eval(ctx, pipe, keys, args...)
	wait := waitCmd(ctx, pipe, replicas)
	_, _ = pipe.Exec(ctx)
	return cmd, wait
}

// master returns the client whose pipelines write keys and then WAIT on
// one connection: rdb itself, or on a Cluster the master of their slot. A
// Cluster client's own pipeline sends each command to the node of its first
// key, and WAIT, which names none, to any node: one that may have none of
// the writes it is meant to count, and counts its replicas at once.
func master(ctx context.Context, rdb redis.UniversalClient, keys []string) (redis.UniversalClient, error) {
	cc, ok := rdb.(*redis.ClusterClient)
	if !ok || len(keys) == 0 {
		return rdb, nil
	}
	return cc.MasterForKey(ctx, keys[0])
}

// clusterNode returns cc's client of the node at addr, or nil when its
// slot map has no such node.
func clusterNode(ctx context.Context, cc *redis.ClusterClient, addr string) *redis.Client {
	var (
		mu    sync.Mutex
		found *redis.Client
	)
	_ = cc.ForEachShard(ctx, func(_ context.Context, c *redis.Client) error {
		if c.Options().Addr == addr {
			mu.Lock()
			found = c
			mu.Unlock()
		}
		return nil
	})
	return found
}

// reloadOn has cc reload its slot map when err says it may be old: a
// MOVED or ASK reply, or no reply at all (the node may have failed over).
// cc's own commands follow such a reply and reload the map themselves; a
// pipeline sent to one node's client does neither. A write its master ran
// and no replica took (ErrNotReplicated) says nothing of the map.
func reloadOn(cc *redis.ClusterClient, err error) {
	if err == nil || errors.Is(err, ErrNotReplicated) {
		return
	}
	_, moved := redis.IsMovedError(err)
	_, ask := redis.IsAskError(err)
	var reply redis.Error
	if moved || ask || !errors.As(err, &reply) {
		cc.ReloadState(context.Background())
	}
}

// replicated sets ErrNotReplicated on cmd when it ran but wait saw fewer
// than replicas acknowledge it.
func replicated(cmd *redis.Cmd, wait *redis.Cmd, replicas int) {
	if cmd.Err() != nil {
		return
	}
	if n, err := wait.Int64(); err != nil || n < int64(replicas) {
		cmd.SetErr(fmt.Errorf("%w (%d of %d replicas; %v)", ErrNotReplicated, n, replicas, err))
	}
}

// waitCmd queues WAIT for replicas on pipe, within ctx's deadline.
func waitCmd(ctx context.Context, pipe redis.Pipeliner, replicas int) *redis.Cmd {
	return pipe.Do(ctx, "WAIT", replicas, waitTimeout(ctx).Milliseconds())
}

// waitTimeout is what WAIT may take: half the time left before ctx's
// deadline (the other half leaves time to try again on a master that
// failed over), at least a millisecond; a second without a deadline.
func waitTimeout(ctx context.Context) time.Duration {
	d, ok := ctx.Deadline()
	if !ok {
		return time.Second
	}
	return max(time.Until(d)/2, time.Millisecond)
}
