package meter

import (
	"context"
	"errors"
	"fmt"
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
// WAIT counts the replicas that have eval's writes.
func evalWait(ctx context.Context, rdb redis.UniversalClient, eval func(context.Context, redis.Scripter, []string, ...any) *redis.Cmd,
	replicas int, keys []string, args []any) (*redis.Cmd, *redis.Cmd) {
	pipe := rdb.Pipeline()
	cmd := eval(ctx, pipe, keys, args...)
	wait := waitCmd(ctx, pipe, replicas)
	_, _ = pipe.Exec(ctx)
	return cmd, wait
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
