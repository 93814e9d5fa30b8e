package meter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

func (l *Ledger) deadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if d, ok := ctx.Deadline(); ok && time.Until(d) <= l.timeout {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, l.timeout)
}

// chargeDeadline is deadline for a charge. A charge whose context never
// ends (a gateway's call's, whose client going away must not cut it) gets
// one its batcher shares with the charges whose deadline falls in the same
// millisecond: one timer for them all instead of one per charge.
func (l *Ledger) chargeDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if ctx.Done() != nil {
		return l.deadline(ctx)
	}
	if _, ok := ctx.Deadline(); ok {
		return l.deadline(ctx)
	}
	return l.charges.ends.at(time.Now().Add(l.timeout)), func() {}
}

// ints reads the first n fields of a script reply, which must be integers.
func ints(v []any, n int) ([]int64, error) {
	if len(v) < n {
		return nil, fmt.Errorf("script reply has %d fields, want %d", len(v), n)
	}
	out := make([]int64, n)
	for i := range out {
		x, ok := v[i].(int64)
		if !ok {
			return nil, fmt.Errorf("script reply field %d is %T, not an integer", i, v[i])
		}
		out[i] = x
	}
	return out, nil
}

// call runs b's script and decodes its reply. Every script is idempotent
// (by request id, reference, lease sequence number, or because it sets a
// state), so a call whose connection broke is sent again, on a fresh
// connection, while the deadline allows. err, prefixed with what, is the
// store's error or a broken reply; the reply's err is what its code means.
func (l *Ledger) call(ctx context.Context, what string, b binding) (reply, error) {
	s := b.script()
	keys := b.keys(l.keys)
	v, err := l.eval(ctx, s.Script, keys, b.args(l))
	var r reply
	if err == nil {
		r, err = s.decode(keys, v)
	}
	if err != nil {
		return reply{}, fmt.Errorf("%s: %w", what, err)
	}
	return r, nil
}

// eval runs script, after the head every script takes first.
func (l *Ledger) eval(ctx context.Context, script *redis.Script, keys []string, args []any) ([]any, error) {
	now := l.now()
	all := make([]any, 0, common+len(args))
	all = append(all, now.UnixMilli(), monthIndex(now), l.defaultPlan.Allowance, l.defaultPlan.RechargeMonth, l.eventsMax,
		l.serverSkew.Load(), l.markerTTL)
	all = append(all, args...)
	ctx, cancel := l.deadline(ctx)
	defer cancel()
	var raw any
	err := l.tries(ctx, nil, func(ctx context.Context) (err error) {
		raw, err = runScript(ctx, l.rdb, script, l.replicas, keys, all...).Result()
		return err
	})
	if err != nil {
		return nil, err
	}
	v, ok := raw.([]any)
	if !ok {
		return nil, fmt.Errorf("script reply is %T, not an array", raw)
	}
	return v, nil
}

// runCharge runs a charge, its first try through the ledger's batcher, and
// reads its reply into c.reply.
func (l *Ledger) runCharge(ctx context.Context, c *chargeCmd) error {
	ctx, cancel := l.chargeDeadline(ctx)
	defer cancel()
	return l.tries(ctx, func(ctx context.Context) (bool, error) {
		return l.charges.run(ctx, c)
	}, func(ctx context.Context) error {
		raw, err := runScript(ctx, l.rdb, chargeScript.Script, l.replicas, c.keys[:], c.args[:]...).Result()
		if err != nil {
			return err
		}
		return replyFromAny(raw, &c.reply)
	})
}

// tries runs a script within ctx's deadline: first, when not nil,
// for the first try (it reports whether the script may have reached
// Redis), and again for the first when it is nil, for a retry, and for a
// first try that found the script not loaded.
func (l *Ledger) tries(ctx context.Context, first func(context.Context) (bool, error), again func(context.Context) error) error {
	var err error
	sent := false // whether any try may have reached Redis
	for try, wait := 0, 5*time.Millisecond; ; try, wait = try+1, wait*2 {
		if try == 0 && first != nil {
			var s bool
			s, err = first(ctx)
			if s && err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
				// A pipeline sends the script's hash alone; Run loads it.
				err = again(ctx)
			}
			sent = s && (err == nil || !changedNothing(err))
		} else {
			err = again(ctx)
			sent = sent || (err == nil || !changedNothing(err))
		}
		if err == nil || try == maxTries-1 || !retryable(err) {
			break
		}
		select {
		case <-ctx.Done():
			err = ctx.Err()
		case <-time.After(wait):
			continue
		}
		break
	}
	if err != nil {
		if !sent {
			return classify(unsentError{err})
		}
		return classify(err)
	}
	return nil
}

// common is the number of arguments every script takes first (lua/lib/base.lua's
// ARGV[1..7]).
const common = 7

// maxTries bounds the tries of one store call within its deadline.
const maxTries = 4

// retryable reports whether err is a broken connection or a Redis that is
// loading, failing over or resharding: worth another try of an idempotent
// script. A deadline is not: there is no time left.
func retryable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return false
	}
	if errors.Is(err, ErrNotReplicated) {
		// The master may have failed over: the same script again applies
		// once, on whichever master answers now.
		return true
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, net.ErrClosed) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) && !ne.Timeout() {
		return true
	}
	msg := err.Error()
	// MOVED and ASK reach here only from a pipeline sent to one Cluster
	// node (see evalWait): the script did not run, and its next try goes
	// to the slot's master.
	for _, p := range []string{"LOADING", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "READONLY", "MOVED", "ASK"} {
		if strings.HasPrefix(msg, p) {
			return true
		}
	}
	return false
}

// unsentError is the error of a store call none of whose tries changed
// anything.
type unsentError struct{ err error }

func (e unsentError) Error() string { return e.err.Error() }

func (e unsentError) Unwrap() error { return e.err }

// Unsent reports whether a store call's error means it certainly changed
// nothing: it never reached Redis (no connection could be had), or Redis
// refused it before it wrote (out of memory, loading, a replica: see
// transientCodes). Any other error leaves the outcome unknown.
func Unsent(err error) bool {
	var u unsentError
	return errors.As(err, &u)
}

// changedNothing reports whether one try's error means it changed nothing.
func changedNothing(err error) bool {
	if errors.Is(err, redis.ErrPoolTimeout) || refused(err) {
		return true
	}
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}
