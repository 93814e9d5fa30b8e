package meter

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// A batcher sends concurrent charges together. A charge that finds a lane
// free goes at once, as one command; one that finds every lane busy waits in
// the queue, and the lane that frees up first sends the whole queue in one
// round trip: on a single Redis, one run of a script that runs each charge
// in turn; on a Cluster, whose orgs live in different slots, one pipeline
// per node. N concurrent charges then cost the gateway and Redis one call
// for all of them instead of one each.
//
// Each charge keeps its own deadline and its own outcome: one whose
// deadline passes while it waits leaves the queue unsent, having changed
// nothing; one whose deadline passes once it is sent is as a charge whose
// reply is late, and its request id resolves it as for any other. A charge
// is answered by its own reply, not the batch's: a script error is its
// alone.
//
// mu guards busy, queue and each queued command's sent.
type batcher struct {
	rdb redis.UniversalClient
	// many, when set, runs a batch in one script run instead of a
	// pipeline of one run each: where every key is on one Redis.
	many  *redis.Script
	lanes int // round trips in flight at once
	max   int // the most commands in one round trip
	// replicas is Config.WaitReplicas: how many replicas must have a
	// batch's writes before its replies stand.
	replicas int

	mu    sync.Mutex
	busy  int // lanes in flight
	queue []*queued
}

// queued is one command in, or on its way through, the batcher.
type queued struct {
	ctx    context.Context
	script *redis.Script
	keys   []string
	args   []any

	sent bool          // taken from the queue
	done chan struct{} // closed once raw and err are set
	raw  any
	err  error
}

// Lanes and batch size of the ledger's charges: a few round trips in flight
// keep Redis busy while the next batch forms; 128 commands are at most a
// few milliseconds of Redis' time.
const (
	batchLanes = 4
	batchMax   = 128
)

// newBatcher returns a batcher of the calls of one script, whose first
// common arguments are the same for every call of a batch. many, when not
// nil, runs a batch of them in one script run on a single Redis: with the
// common arguments once, then each call's keys and its other arguments, and
// one reply per call ({-1, message} for a call that raised an error).
func newBatcher(rdb redis.UniversalClient, lanes, max int, many *redis.Script, replicas int) *batcher {
	if _, single := rdb.(*redis.Client); !single {
		many = nil
	}
	return &batcher{rdb: rdb, lanes: lanes, max: max, many: many, replicas: replicas}
}

// run runs script once, alone or with other commands. sent reports whether
// the command may have reached Redis: false when its context ended while it
// waited.
func (b *batcher) run(ctx context.Context, script *redis.Script, keys []string, args []any) (raw any, sent bool, err error) {
	b.mu.Lock()
	if b.busy < b.lanes {
		// A free lane means an empty queue: the queue forms only while
		// every lane is busy.
		b.busy++
		b.mu.Unlock()
		raw, err = runScript(ctx, b.rdb, script, b.replicas, keys, args...).Result()
		b.next()
		return raw, true, err
	}
	q := &queued{ctx: ctx, script: script, keys: keys, args: args, done: make(chan struct{})}
	b.queue = append(b.queue, q)
	b.mu.Unlock()
	select {
	case <-q.done:
		return q.raw, true, q.err
	case <-ctx.Done():
	}
	b.mu.Lock()
	if !q.sent {
		if i := slices.Index(b.queue, q); i >= 0 {
			b.queue = slices.Delete(b.queue, i, i+1)
		}
		b.mu.Unlock()
		return nil, false, ctx.Err()
	}
	b.mu.Unlock()
	select {
	case <-q.done:
		// The reply came as the deadline passed: it is the outcome.
		return q.raw, true, q.err
	default:
		return nil, true, ctx.Err()
	}
}

// next frees a lane that has finished its round trip, or gives it the
// queue to send.
func (b *batcher) next() {
	b.mu.Lock()
	batch := b.take()
	b.mu.Unlock()
	if batch != nil {
		go b.drain(batch)
	}
}

// take takes up to max queued commands, or frees a lane when the queue is
// empty. Called with mu held.
func (b *batcher) take() []*queued {
	if len(b.queue) == 0 {
		b.busy--
		return nil
	}
	n := min(len(b.queue), b.max)
	batch := make([]*queued, n)
	copy(batch, b.queue)
	for _, q := range batch {
		q.sent = true
	}
	rest := copy(b.queue, b.queue[n:])
	clear(b.queue[rest:])
	b.queue = b.queue[:rest]
	return batch
}

// drain sends batches on one lane until the queue is empty.
func (b *batcher) drain(batch []*queued) {
	for batch != nil {
		b.send(batch)
		b.mu.Lock()
		batch = b.take()
		b.mu.Unlock()
	}
}

// send sends a batch in one pipeline, with the latest of its deadlines:
// each caller stops waiting at its own.
func (b *batcher) send(batch []*queued) {
	var last time.Time
	for _, q := range batch {
		d, ok := q.ctx.Deadline()
		if !ok {
			last = time.Time{}
			break
		}
		if d.After(last) {
			last = d
		}
	}
	ctx, cancel := context.Background(), context.CancelFunc(func() {})
	if !last.IsZero() {
		ctx, cancel = context.WithDeadline(ctx, last)
	}
	defer cancel()
	if b.many != nil && len(batch) > 1 {
		b.sendMany(ctx, batch)
		return
	}
	pipe := b.rdb.Pipeline()
	cmds := make([]*redis.Cmd, len(batch))
	for i, q := range batch {
		cmds[i] = q.script.EvalSha(ctx, pipe, q.keys, q.args...)
	}
	var wait *redis.Cmd
	if b.replicas > 0 {
		// One WAIT after the batch, on its connection, counts the
		// replicas that have every script's writes.
		wait = waitCmd(ctx, pipe, b.replicas)
	}
	_, _ = pipe.Exec(ctx)
	for i, q := range batch {
		if wait != nil {
			replicated(cmds[i], wait, b.replicas)
		}
		q.raw, q.err = cmds[i].Result()
		close(q.done)
	}
}

// sendMany sends a batch as one run of the many script.
func (b *batcher) sendMany(ctx context.Context, batch []*queued) {
	own := len(batch[0].args) - common
	keys := make([]string, 0, len(batch)*len(batch[0].keys))
	args := make([]any, 0, common+len(batch)*own)
	args = append(args, batch[0].args[:common]...)
	for _, q := range batch {
		keys = append(keys, q.keys...)
		args = append(args, q.args[common:]...)
	}
	raw, err := runScript(ctx, b.rdb, b.many, b.replicas, keys, args...).Result()
	replies, ok := raw.([]any)
	if err == nil && (!ok || len(replies) != len(batch)) {
		err = fmt.Errorf("batch of %d charges: reply is %T of %d", len(batch), raw, len(replies))
	}
	for i, q := range batch {
		if err != nil {
			q.err = err
		} else if r, ok := replies[i].([]any); ok && len(r) == 2 && r[0] == int64(-1) {
			q.err = scriptError(fmt.Sprint(r[1]))
		} else {
			q.raw = replies[i]
		}
		close(q.done)
	}
}
