package meter

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// A batcher sends concurrent charges together. A charge that finds no round
// trip in flight goes at once, as one command; one that finds one waits in
// the queue, and the lane that frees up first sends the whole queue in one
// round trip: on a single Redis, one run of a script that runs each charge
// in turn; on a Cluster, whose orgs live in different slots, one pipeline
// per node. N concurrent charges then cost the gateway and Redis one call
// for all of them instead of one each, and a round trip's own cost (waking
// Redis, reading, running the script, writing back; waking the gateway) is
// shared by every charge that came while the one before was in flight.
//
// Another lane opens only when the last round trip sent has been in flight
// for laneAfter: its connection may be stuck (a reply lost on the way), and
// the charges behind it go on another, up to lanes at once. A batcher that
// opened a lane for every charge that found one free would send most
// charges alone under a steady load, at several times Redis' cost per
// charge.
//
// Each charge keeps its own deadline and its own outcome: one whose
// deadline passes while it waits leaves the queue unsent, having changed
// nothing; one whose deadline passes once it is sent is as a charge whose
// reply is late, and its request id resolves it as for any other. A charge
// is answered by its own reply, not the batch's: a script error is its
// alone.
//
// Where every key is on one Redis and no replica is waited for, a charge
// goes as a raw command (RawCmd): its arguments point at the charge's own
// fields, and its reply is read field by field into the charge's typed
// reply, so that neither costs an allocation per field.
//
// mu guards busy, queue and each queued command's sent.
type batcher struct {
	rdb redis.UniversalClient
	// many, when set, runs a batch in one script run instead of a
	// pipeline of one run each: where every key is on one Redis.
	many  *redis.Script
	lanes int // round trips in flight at once, at most
	// laneAfter is how long the last round trip sent is in flight before
	// a charge may open another lane rather than wait for it.
	laneAfter time.Duration
	max       int // the most commands in one round trip
	// replicas is Config.WaitReplicas: how many replicas must have a
	// batch's writes before its replies stand.
	replicas int
	// raw sends charges as raw commands: on a single Redis, with no WAIT
	// after them.
	raw bool
	// cluster is the Cluster client, on a Cluster that waits for replicas:
	// WAIT counts the writes sent before it on its own connection, so each
	// master's charges go through a batcher of their own (masters), whose
	// rdb is that master's client. A master whose replicas lag then holds
	// up its own charges only.
	cluster   *redis.ClusterClient
	mastersMu sync.Mutex
	masters   map[redis.UniversalClient]*batcher

	// batched is Config.Batched.
	batched func(int)

	mu    sync.Mutex
	busy  int       // lanes in flight
	last  time.Time // when the last round trip was sent
	queue []*queued

	// ends gives charges their shared deadlines.
	ends ends
}

// ends hands out contexts that end at a deadline, truncated to the
// millisecond: the charges whose deadlines fall in the same millisecond
// share one context and its one timer. None is canceled before its
// deadline, as others may hold it; its timer ends it and frees it.
type ends struct {
	mu     sync.Mutex
	last   time.Time
	ctx    context.Context
	cancel context.CancelFunc // kept: it is the timer's to call
}

// at returns a context that ends at deadline, or up to a millisecond
// before it.
func (e *ends) at(deadline time.Time) context.Context {
	deadline = deadline.Truncate(time.Millisecond)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ctx == nil || !deadline.Equal(e.last) {
		e.ctx, e.cancel = context.WithDeadline(context.Background(), deadline)
		e.last = deadline
	}
	return e.ctx
}

// queued is one charge in, or on its way through, the batcher.
type queued struct {
	ctx context.Context
	c   *chargeCmd

	sent bool          // taken from the queue
	done chan struct{} // closed once c.reply and err are set
	err  error
}

// Lanes and batch size of the ledger's charges: one round trip in flight,
// and more only behind one that takes batchLaneAfter (a reply that takes
// longer than that is lost or stuck: a batch of batchMax takes Redis about
// 3 ms); 128 commands are at most a few milliseconds of Redis' time.
const (
	batchLanes     = 4
	batchLaneAfter = 5 * time.Millisecond
	batchMax       = 128
)

// newBatcher returns a batcher of charges, whose first common arguments
// are the same for every charge of a batch. many, when not nil, runs a
// batch of them in one script run on a single Redis: with the common
// arguments once, then each charge's keys and its other arguments, and one
// reply per charge ({-1, message} for a charge that raised an error).
func newBatcher(rdb redis.UniversalClient, lanes int, laneAfter time.Duration, max int, many *redis.Script, replicas int,
	batched func(int)) *batcher {
	if _, single := rdb.(*redis.Client); !single {
		many = nil
	}
	b := &batcher{rdb: rdb, lanes: lanes, laneAfter: laneAfter, max: max, many: many, replicas: replicas,
		raw: many != nil && replicas <= 0, batched: batched}
	if cc, ok := rdb.(*redis.ClusterClient); ok && replicas > 0 {
		b.cluster = cc
	}
	return b
}

// master returns the batcher of the master that holds c's keys.
func (b *batcher) master(ctx context.Context, c *chargeCmd) (*batcher, error) {
	node, err := master(ctx, b.cluster, c.keys[:])
	if err != nil {
		return nil, err
	}
	b.mastersMu.Lock()
	defer b.mastersMu.Unlock()
	m := b.masters[node]
	if m == nil {
		m = newBatcher(node, b.lanes, b.laneAfter, b.max, nil, b.replicas, b.batched)
		if b.masters == nil {
			b.masters = make(map[redis.UniversalClient]*batcher)
		}
		b.masters[node] = m
	}
	return m, nil
}

// run runs charge c once, alone or with other charges, and reads its reply
// into c.reply. sent reports whether the charge may have reached Redis:
// false when its context ended while it waited.
func (b *batcher) run(ctx context.Context, c *chargeCmd) (sent bool, err error) {
	if b.cluster != nil {
		m, err := b.master(ctx, c)
		if err != nil {
			return false, err
		}
		sent, err = m.run(ctx, c)
		reloadOn(b.cluster, err)
		return sent, err
	}
	b.mu.Lock()
	now := time.Now()
	open := b.busy == 0 || (b.busy < b.lanes && now.Sub(b.last) >= b.laneAfter)
	if open && len(b.queue) == 0 {
		// No lane in flight means an empty queue: the queue forms only
		// while one is.
		b.busy++
		b.last = now
		b.mu.Unlock()
		err = b.one(ctx, c)
		b.next()
		return true, err
	}
	q := &c.queued
	*q = queued{ctx: ctx, c: c, done: make(chan struct{})}
	b.queue = append(b.queue, q)
	if open {
		// The lanes in flight are slow: a new one takes the queue, this
		// charge last.
		b.busy++
		batch := b.take()
		b.mu.Unlock()
		go b.drain(batch)
	} else {
		b.mu.Unlock()
	}
	select {
	case <-q.done:
		return true, q.err
	case <-ctx.Done():
	}
	b.mu.Lock()
	if !q.sent {
		if i := slices.Index(b.queue, q); i >= 0 {
			b.queue = slices.Delete(b.queue, i, i+1)
		}
		b.mu.Unlock()
		return false, ctx.Err()
	}
	b.mu.Unlock()
	select {
	case <-q.done:
		// The reply came as the deadline passed: it is the outcome.
		return true, q.err
	default:
		return true, ctx.Err()
	}
}

// one sends charge c alone.
func (b *batcher) one(ctx context.Context, c *chargeCmd) error {
	if !b.raw {
		raw, err := runScript(ctx, b.rdb, chargeScript.Script, b.replicas, c.keys[:], c.args[:]...).Result()
		if err != nil {
			return err
		}
		return replyFromAny(raw, &c.reply)
	}
	args := append(c.alone[:0], "evalsha", chargeScript.Hash(), len(c.keys))
	for i := range c.keys {
		args = append(args, &c.keys[i])
	}
	args = append(args, c.args[:]...)
	raw, err := b.process(ctx, args)
	if err != nil {
		return err
	}
	rd := respReader{b: raw}
	return rd.charge(&c.reply)
}

// process sends a raw command and returns its reply's text. An error
// reply is its error, as go-redis makes it of a command it parses.
func (b *batcher) process(ctx context.Context, args []any) ([]byte, error) {
	cmd := redis.NewRawCmd(ctx, args...)
	if err := b.rdb.Process(ctx, cmd); err != nil {
		return nil, err
	}
	raw := cmd.Val()
	if len(raw) > 2 && raw[0] == '-' {
		return nil, scriptError(raw[1 : len(raw)-2])
	}
	return raw, nil
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
	b.last = time.Now()
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

// send sends a batch in one round trip, with the latest of its deadlines:
// each caller stops waiting at its own.
func (b *batcher) send(batch []*queued) {
	if b.batched != nil && len(batch) > 1 {
		b.batched(len(batch))
	}
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
	switch {
	case b.raw:
		b.sendMany(ctx, batch)
		return
	case b.many != nil:
		b.sendScript(ctx, batch)
		return
	}
	pipe := b.rdb.Pipeline()
	cmds := make([]*redis.Cmd, len(batch))
	for i, q := range batch {
		cmds[i] = chargeScript.EvalSha(ctx, pipe, q.c.keys[:], q.c.args[:]...)
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
		raw, err := cmds[i].Result()
		if err == nil {
			err = replyFromAny(raw, &q.c.reply)
		}
		q.err = err
		close(q.done)
	}
}

// sendMany sends a batch as one run of the many script, as a raw command:
// its arguments point at each charge's keys and fields.
func (b *batcher) sendMany(ctx context.Context, batch []*queued) {
	head := batch[0].c.args[:common]
	own := len(batch[0].c.args) - common
	keys := len(batch[0].c.keys)
	args := make([]any, 0, 3+len(head)+len(batch)*(keys+own))
	args = append(args, "evalsha", b.many.Hash(), len(batch)*keys)
	for _, q := range batch {
		for i := range q.c.keys {
			args = append(args, &q.c.keys[i])
		}
	}
	args = append(args, head...)
	for _, q := range batch {
		args = append(args, q.c.args[common:]...)
	}
	raw, err := b.process(ctx, args)
	if redis.HasErrorPrefix(err, "NOSCRIPT") {
		// Nothing ran: the batch goes again with the script's text, as
		// Script.Run sends it.
		args[0], args[1] = "eval", chargesText
		raw, err = b.process(ctx, args)
	}
	rd := respReader{b: raw}
	if err == nil {
		var n int
		if n, err = rd.array(); err == nil && n != len(batch) {
			err = fmt.Errorf("batch of %d charges: reply of %d", len(batch), n)
		}
	}
	for _, q := range batch {
		if err != nil {
			q.err = err
		} else if q.err = rd.charge(&q.c.reply); q.err != nil && !isScriptError(q.err) {
			// A reply that does not read leaves the rest unread.
			err = q.err
		}
		close(q.done)
	}
}

// sendScript sends a batch as one run of the many script through go-redis,
// with WAIT after it.
func (b *batcher) sendScript(ctx context.Context, batch []*queued) {
	head := batch[0].c.args[:common]
	own := len(batch[0].c.args) - common
	keys := make([]string, 0, len(batch)*len(batch[0].c.keys))
	args := make([]any, 0, len(head)+len(batch)*own)
	args = append(args, head...)
	for _, q := range batch {
		keys = append(keys, q.c.keys[:]...)
		args = append(args, q.c.args[common:]...)
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
			q.err = replyFromAny(replies[i], &q.c.reply)
		}
		close(q.done)
	}
}

// isScriptError reports whether err is one charge's error in a batch's
// reply, after which the next charge's reply still reads.
func isScriptError(err error) bool {
	_, ok := err.(scriptError)
	return ok
}
