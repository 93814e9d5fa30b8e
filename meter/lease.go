package meter

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/policy"
)

// LeaseSync is one sync of a lease with the ledger.
type LeaseSync struct {
	// Org is the org whose credits the lease holds.
	Org string
	// ID names the lease; one per org per gateway process.
	ID string
	// Seq numbers the syncs of the lease; a sync whose number was applied
	// before changes nothing.
	Seq int64
	// Want is the credits the lease wants to hold after the sync; 0 ends it.
	Want int64
	// Keep is the credits the lease must leave free for others.
	Keep int64
	// TTL is how long the lease holds its credits without another sync.
	TTL time.Duration
	// Spent is the credits spent per feature since the last sync, net of
	// refunds.
	Spent map[string]int64
}

// LeaseState is the ledger's answer to a sync.
type LeaseState struct {
	// Held is the credits the lease holds now.
	Held int64
	// Balance is the org's balance after the sync.
	Balance int64
	// Repeat is true when the sync's number was applied before.
	Repeat bool
}

// SyncLease charges what a lease spent and sets what it holds, in one
// script: the credits held are taken only from the balance that no other
// lease holds, so leases never spend more than the org has.
func (l *Ledger) SyncLease(ctx context.Context, s LeaseSync) (LeaseState, error) {
	if err := policy.ValidateOrg(s.Org); err != nil {
		return LeaseState{}, err
	}
	if err := validateRequestID(s.ID); err != nil {
		return LeaseState{}, err
	}
	if s.Want < 0 || s.Want > MaxAmount || s.Keep < 0 || s.Seq < 1 || s.TTL < time.Millisecond {
		return LeaseState{}, fmt.Errorf("lease sync: want %d, keep %d, seq %d, ttl %s out of range", s.Want, s.Keep, s.Seq, s.TTL)
	}
	features := make([]string, 0, len(s.Spent))
	for f := range s.Spent {
		if err := policy.ValidateFeature(f); err != nil {
			return LeaseState{}, err
		}
		features = append(features, f)
	}
	sort.Strings(features)
	args := make([]any, 0, 5+2*len(features))
	args = append(args, s.ID, s.Seq, s.Want, s.Keep, s.TTL.Milliseconds())
	for _, f := range features {
		args = append(args, f, s.Spent[f])
	}
	keys := []string{l.keys.Account(s.Org), l.keys.Leases(s.Org), l.keys.Events(s.Org)}
	v, err := l.run(ctx, leaseScript, keys, 3, args...)
	if err != nil {
		return LeaseState{}, fmt.Errorf("lease: %w", err)
	}
	return LeaseState{Held: v[1], Balance: v[2], Repeat: v[0] == codeRepeat}, nil
}

// LeaseConfig sets how a Leaser leases.
type LeaseConfig struct {
	// Size is the credits a lease asks for at a time.
	Size int64
	// Keep is the credits every lease leaves free, so that an org near the
	// end of its credits is charged call by call, exactly.
	Keep int64
	// Flush is how often spending is reported to the ledger.
	Flush time.Duration
	// Idle is how long an unused lease is kept before its credits go back.
	Idle time.Duration
	// TTL is how long a lease holds its credits without a sync.
	TTL time.Duration
}

// Leaser spends orgs' credits from leases held in this process, so that a
// call to a hot org with ample balance needs no round trip to Redis. Its
// spending reaches the ledger within Flush; unused credits go back after
// Idle and at Close.
type Leaser struct {
	ledger *Ledger
	cfg    LeaseConfig
	id     string
	logger *zap.Logger

	orgs   sync.Map // org -> *lease; read on every call without a lock
	closed atomic.Bool
	stop   chan struct{}
	done   chan struct{}
}

// lease is one org's lease in this process.
type lease struct {
	mu       sync.Mutex
	held     int64            // credits held and not yet spent
	balance  int64            // the org's balance: at the last sync, less spending since
	spent    map[string]int64 // since the last sync
	inFlight map[string]int64 // the spending of a sync whose answer is not known yet
	seq      int64
	synced   time.Time // the last successful sync
	used     time.Time
	calls    int  // calls seen before the first lease
	ended    bool // given back and out of the map: look the org up again
}

// leaseAfter is how many calls an org makes, within Idle of each other,
// before it is leased.
const leaseAfter = 3

// NewLeaser starts a leaser; Close ends its leases.
func NewLeaser(ledger *Ledger, cfg LeaseConfig, logger *zap.Logger) *Leaser {
	ls := &Leaser{ledger: ledger, cfg: cfg, id: "gw:" + NewRequestID()[:16], logger: logger,
		stop: make(chan struct{}), done: make(chan struct{})}
	go ls.loop()
	return ls
}

// Spend takes cost credits of org's from the lease, renewing it when it
// runs short. It returns false when the lease cannot cover the call (the
// balance is not ample, or the store did not answer): the call must then be
// charged on its own.
func (ls *Leaser) Spend(ctx context.Context, org, feature string, cost int64) (balance int64, ok bool) {
	le := ls.lock(org)
	if le == nil {
		return 0, false
	}
	defer le.mu.Unlock()
	now := time.Now()
	le.used = now
	// An org is leased once it is busy: a lease costs two store calls (take
	// and give back), a lone call one.
	if le.held == 0 && le.seq == 0 && le.calls < leaseAfter {
		le.calls++
		return 0, false
	}
	// A lease not synced for half its lifetime may have expired in Redis.
	if le.held < cost || now.Sub(le.synced) > ls.cfg.TTL/2 {
		if err := ls.sync(ctx, org, le, max(ls.cfg.Size, cost)); err != nil || le.held < cost {
			return 0, false
		}
	}
	le.held -= cost
	le.balance -= cost
	le.spent[feature] += cost
	return le.balance, true
}

// lock returns org's lease, locked, creating it when there is none.
func (ls *Leaser) lock(org string) *lease {
	for {
		if ls.closed.Load() {
			return nil
		}
		v, ok := ls.orgs.Load(org)
		if !ok {
			v, _ = ls.orgs.LoadOrStore(org, &lease{spent: map[string]int64{}})
		}
		le := v.(*lease)
		le.mu.Lock()
		if !le.ended {
			return le
		}
		// flush ended it between the lookup and the lock.
		le.mu.Unlock()
	}
}

// Adjust changes a leased call's cost after the fact: a refund (actual 0)
// or a settle to what the upstream reported. It returns the balance after.
func (ls *Leaser) Adjust(org, feature string, charged, actual int64) int64 {
	le := ls.lock(org)
	if le == nil {
		// Closed: report the change on its own, at once.
		ctx, cancel := context.WithTimeout(context.Background(), max(ls.ledger.timeout, time.Second))
		defer cancel()
		st, err := ls.ledger.SyncLease(ctx, LeaseSync{Org: org, ID: ls.id + ":" + NewRequestID()[:8], Seq: 1, TTL: time.Second,
			Spent: map[string]int64{feature: actual - charged}})
		if err != nil {
			ls.logger.Error("could not report a leased call's settle after the leases closed", zap.String("org", org), zap.Error(err))
		}
		return st.Balance
	}
	defer le.mu.Unlock()
	diff := actual - charged
	le.spent[feature] += diff
	le.balance -= diff
	// A refund returns its credits to the lease; an extra charge is taken
	// from it as far as it holds, and reported either way.
	le.held = max(le.held-diff, 0)
	return le.balance
}

// sync reports the lease's spending and asks to hold want credits. It runs
// with le.mu held.
func (ls *Leaser) sync(ctx context.Context, org string, le *lease, want int64) error {
	if le.inFlight == nil {
		le.inFlight, le.spent = le.spent, map[string]int64{}
		le.seq++
	}
	st, err := ls.ledger.SyncLease(ctx, LeaseSync{Org: org, ID: ls.id, Seq: le.seq, Want: want, Keep: ls.cfg.Keep, TTL: ls.cfg.TTL, Spent: le.inFlight})
	if err != nil {
		// The same sequence number and spending go again next time.
		return err
	}
	le.inFlight = nil
	if st.Repeat {
		// Applied before, its answer lost: sync again to learn the state.
		return ls.sync(ctx, org, le, want)
	}
	le.held, le.synced = st.Held, time.Now()
	le.balance = st.Balance
	for _, n := range le.spent {
		le.balance -= n
	}
	return nil
}

func (ls *Leaser) loop() {
	defer close(ls.done)
	tick := time.NewTicker(ls.cfg.Flush)
	defer tick.Stop()
	for {
		select {
		case <-ls.stop:
			ls.flush(true)
			return
		case <-tick.C:
			ls.flush(false)
		}
	}
}

// flush reports every lease's spending; leases idle for cfg.Idle (or all,
// at close) give their credits back.
func (ls *Leaser) flush(closing bool) {
	now := time.Now()
	ls.orgs.Range(func(k, v any) bool {
		org, le := k.(string), v.(*lease)
		le.mu.Lock()
		idle := closing || now.Sub(le.used) > ls.cfg.Idle
		busy := len(le.spent) > 0 || le.inFlight != nil
		if idle && !busy && le.held == 0 {
			// Nothing held, nothing to report: no store call.
			ls.orgs.CompareAndDelete(org, le)
			le.ended = true
		} else if idle || busy || (le.held > 0 && now.Sub(le.synced) > ls.cfg.TTL/4) {
			want := le.held
			if idle {
				want = 0
			}
			ctx, cancel := context.WithTimeout(context.Background(), max(ls.ledger.timeout, time.Second))
			err := ls.sync(ctx, org, le, want)
			cancel()
			if err != nil {
				ls.logger.Warn("lease sync failed; retrying", zap.String("org", org), zap.Error(err))
			} else if idle && le.held == 0 && len(le.spent) == 0 {
				ls.orgs.CompareAndDelete(org, le)
				le.ended = true
			}
		}
		le.mu.Unlock()
		return true
	})
}

// Close reports all spending and gives back every lease's credits. Spend
// answers false from then on.
func (ls *Leaser) Close() {
	close(ls.stop)
	<-ls.done
	ls.closed.Store(true)
	ls.flush(true)
}

// Pending returns the credits spent from leases and not yet reported.
func (ls *Leaser) Pending() int64 {
	var n int64
	ls.orgs.Range(func(_, v any) bool {
		le := v.(*lease)
		le.mu.Lock()
		for _, s := range le.spent {
			n += s
		}
		for _, s := range le.inFlight {
			n += s
		}
		le.mu.Unlock()
		return true
	})
	return n
}
