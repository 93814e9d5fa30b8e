package meter

import (
	"context"
	"errors"
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
	// Unspent is the credits the lease held and had not spent when it sent
	// the sync. It may spend them while the sync is on its way, so the sync
	// leaves it at least that many (as far as it held them): 0 when it
	// spends nothing meanwhile.
	Unspent int64
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
	if s.Want < 0 || s.Want > MaxAmount || s.Keep < 0 || s.Seq < 1 || s.TTL < time.Millisecond || s.Unspent < 0 || s.Unspent > MaxAmount {
		return LeaseState{}, fmt.Errorf("lease sync: want %d, keep %d, seq %d, ttl %s, unspent %d out of range", s.Want, s.Keep, s.Seq, s.TTL, s.Unspent)
	}
	features := make([]string, 0, len(s.Spent))
	for f := range s.Spent {
		if err := policy.ValidateFeature(f); err != nil {
			return LeaseState{}, err
		}
		features = append(features, f)
	}
	sort.Strings(features)
	args := make([]any, 0, 6+2*len(features))
	args = append(args, "lease:"+s.ID, s.Seq, s.Want, s.Keep, s.TTL.Milliseconds(), s.Unspent)
	for _, f := range features {
		args = append(args, f, s.Spent[f])
	}
	keys := []string{l.keys.Account(s.Org), l.keys.Events(s.Org), l.keys.Holds(s.Org)}
	v, err := l.run(ctx, leaseScript, keys, 3, args...)
	if err != nil {
		return LeaseState{}, fmt.Errorf("lease: %w", err)
	}
	return LeaseState{Held: v[1], Balance: v[2], Repeat: v[0] == codeRepeat}, nil
}

// LeaseConfig sets how a Leaser leases.
type LeaseConfig struct {
	// Size is the credits a lease asks for at a time. A lease is renewed,
	// in the background, once it holds less than half of that.
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
//
// A call never waits for another org's sync, nor, but for the one call that
// finds its org's lease empty, for its own org's: syncs run outside the
// lease's lock, and the calls that come while one is on its way spend what
// the lease still holds, or are charged on their own.
type Leaser struct {
	ledger *Ledger
	cfg    LeaseConfig
	id     string
	logger *zap.Logger

	orgs   sync.Map // org -> *lease; read on every call without a lock
	closed atomic.Bool
	// syncs is read-held by every sync in flight; Close write-locks it to
	// wait for them.
	syncs sync.RWMutex
	stop  chan struct{}
	done  chan struct{}
}

// lease is one org's lease in this process.
type lease struct {
	mu       sync.Mutex
	held     int64            // credits held and not yet spent
	balance  int64            // the org's balance: at the last sync, less spending since
	spent    spending         // since the last sync was sent
	inFlight map[string]int64 // the spending of a sync whose answer is not known yet
	unspent  int64            // what the lease held when inFlight was sent
	seq      int64
	block    int64     // the credits a renewal asks for: Size, more for an org that outruns it
	dry      bool      // a call found the lease empty while a renewal was on its way
	synced   time.Time // when the last successful sync was sent
	starved  time.Time // when a renewal last got nothing: the org's credits are near their end
	used     time.Time
	calls    int         // calls seen before the first lease
	answer   *syncAnswer // of the sync on its way; nil when none is
	ending   bool        // inFlight gives the credits back: spend none until it is applied
	ended    bool        // given back and out of the map: look the org up again
}

// syncAnswer is how a sync ended, for the calls that wait for it: err is
// set before done is closed.
type syncAnswer struct {
	done chan struct{}
	err  error
}

// leaseAfter is how many calls an org makes, within Idle of each other,
// before it is leased.
const leaseAfter = 3

// maxGrowth is how many times Size a lease grows to at most, doubling each
// time its org spends what it holds faster than a renewal comes back.
const maxGrowth = 16

// forgetAfter is how many times Idle a lease that was given back stays in
// the map.
const forgetAfter = 30

// NewLeaser starts a leaser; Close ends its leases.
func NewLeaser(ledger *Ledger, cfg LeaseConfig, logger *zap.Logger) *Leaser {
	ls := &Leaser{ledger: ledger, cfg: cfg, id: "gw:" + NewRequestID()[:16], logger: logger,
		stop: make(chan struct{}), done: make(chan struct{})}
	go ls.loop()
	return ls
}

// Spend takes cost credits of org's from the lease. ok is false when the
// lease cannot cover the call (the org is not busy yet, its balance is not
// ample, or the lease is being given back): the call must then be charged
// on its own. err is set when the lease needed the store and the store did
// not answer in time (the sync this call sent or waited for failed): a
// charge of the call's own would fare no better, and none was sent (Unsent
// reports true).
func (ls *Leaser) Spend(org, feature string, cost int64) (balance int64, ok bool, err error) {
	le := ls.lock(org)
	if le == nil {
		return 0, false, nil
	}
	now := time.Now()
	le.used = now
	// An org is leased once it is busy: a lease costs two store calls (take
	// and give back), a lone call one.
	if le.held == 0 && le.seq == 0 && le.calls < leaseAfter {
		le.calls++
		le.mu.Unlock()
		return 0, false, nil
	}
	for {
		// A lease not synced for half its lifetime may have expired in Redis.
		fresh := now.Sub(le.synced) <= ls.cfg.TTL/2
		if fresh && !le.ending && le.held >= cost {
			balance = le.take(feature, cost)
			renew := le.answer == nil && le.held < le.block/2
			var s LeaseSync
			if renew {
				s = ls.send(org, le, le.block)
			}
			le.mu.Unlock()
			if renew {
				// A failure is logged; the next sync sends it again.
				go ls.finish(le, s)
			}
			return balance, true, nil
		}
		answer := le.answer
		if answer == nil {
			break
		}
		// A sync is on its way, and a renewal that comes back too late
		// for the calls asks for more next time.
		le.dry = le.dry || !le.ending
		// Wait for it: a renewal is quicker than a charge of this call's
		// own, and near the end of the org's credits a charge could be
		// refused credits the lease is getting or giving back. The sync
		// ends by its own deadline.
		le.mu.Unlock()
		<-answer.done
		if answer.err != nil && !errors.Is(answer.err, errClosed) {
			return 0, false, unsentError{fmt.Errorf("lease renewal: %w", answer.err)}
		}
		if le = ls.lock(org); le == nil {
			return 0, false, nil
		}
		now = time.Now()
	}
	if le.ending || now.Sub(le.starved) < ls.cfg.Flush {
		// The lease's credits are on their way back and did not get
		// there, or the org has too few credits to lease: its calls are
		// charged on their own, and a renewal is tried again at most once
		// a Flush.
		le.mu.Unlock()
		return 0, false, nil
	}
	// The lease is empty or stale: this call waits for a renewal.
	s := ls.send(org, le, max(le.block, cost))
	le.mu.Unlock()
	if err := ls.finish(le, s); err != nil {
		if errors.Is(err, errClosed) {
			return 0, false, nil
		}
		return 0, false, unsentError{fmt.Errorf("lease renewal: %w", err)}
	}
	if le = ls.lock(org); le == nil {
		return 0, false, nil
	}
	defer le.mu.Unlock()
	if le.ending || le.held < cost || time.Since(le.synced) > ls.cfg.TTL/2 {
		return 0, false, nil
	}
	return le.take(feature, cost), true, nil
}

// take spends cost credits of the lease's; it runs with le.mu held.
func (le *lease) take(feature string, cost int64) int64 {
	le.held -= cost
	le.balance -= cost
	le.spent.add(feature, cost)
	return le.balance
}

// spending is credits spent per feature: a route has one feature, an org
// few, so a list is quicker to add to than a map.
type spending []featureSpent

type featureSpent struct {
	feature string
	n       int64
}

func (s *spending) add(feature string, n int64) {
	for i := range *s {
		if (*s)[i].feature == feature {
			(*s)[i].n += n
			return
		}
	}
	*s = append(*s, featureSpent{feature, n})
}

func (s spending) total() int64 {
	var n int64
	for _, f := range s {
		n += f.n
	}
	return n
}

// lock returns org's lease, locked, creating it when there is none.
func (ls *Leaser) lock(org string) *lease {
	for {
		if ls.closed.Load() {
			return nil
		}
		v, ok := ls.orgs.Load(org)
		if !ok {
			v, _ = ls.orgs.LoadOrStore(org, &lease{block: ls.cfg.Size})
		}
		le := v.(*lease)
		le.mu.Lock()
		if ls.closed.Load() {
			// Close's flush may have been here already.
			le.mu.Unlock()
			return nil
		}
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
		st, err := ls.ledger.SyncLease(context.Background(), LeaseSync{Org: org, ID: ls.id + ":" + NewRequestID()[:8], Seq: 1, TTL: time.Second,
			Spent: map[string]int64{feature: actual - charged}})
		if err != nil {
			ls.logger.Error("could not report a leased call's settle after the leases closed", zap.String("org", org), zap.Error(err))
		}
		return st.Balance
	}
	defer le.mu.Unlock()
	diff := actual - charged
	le.spent.add(feature, diff)
	le.balance -= diff
	// An extra charge is taken from what the lease holds, as far as it
	// holds it, and reported either way. A refund is reported and does not
	// go back into the lease: the lease holds only credits the ledger has
	// set aside for it.
	if diff > 0 {
		le.held = max(le.held-diff, 0)
	}
	return le.balance
}

// send marks a sync of the lease as on its way, asking to hold want
// credits, and returns it. It runs with le.mu held and no sync on its way.
// A sync whose answer was not known goes again with its sequence number
// and spending, so that the ledger applies it once.
func (ls *Leaser) send(org string, le *lease, want int64) LeaseSync {
	if le.inFlight == nil {
		le.inFlight = make(map[string]int64, len(le.spent))
		for _, f := range le.spent {
			le.inFlight[f.feature] += f.n
		}
		le.spent = le.spent[:0]
		le.unspent = le.held
		if want == 0 {
			// Giving the credits back: none may be spent until the ledger
			// has taken them.
			le.unspent, le.ending = 0, true
		}
		le.seq++
	}
	if le.dry && want > 0 {
		// Calls outran the last renewal: ask for more at a time, and leave
		// as much more free for others.
		le.block, le.dry = min(2*le.block, maxGrowth*ls.cfg.Size), false
		want = max(want, le.block)
	}
	le.answer = &syncAnswer{done: make(chan struct{})}
	return LeaseSync{Org: org, ID: ls.id, Seq: le.seq, Want: want, Keep: ls.keep(le), TTL: ls.cfg.TTL,
		Unspent: le.unspent, Spent: le.inFlight}
}

// keep is the credits le leaves free for others: Keep, as many times more as
// its block has grown.
func (ls *Leaser) keep(le *lease) int64 {
	return ls.cfg.Keep * (le.block / max(ls.cfg.Size, 1))
}

// finish runs a sync that send returned, within the ledger's timeout, and
// takes in its answer. It returns nil when the ledger applied the sync.
func (ls *Leaser) finish(le *lease, s LeaseSync) error {
	var (
		st  LeaseState
		err = errClosed
	)
	sent := time.Now()
	ls.syncs.RLock()
	if !ls.closed.Load() || s.Want == 0 {
		st, err = ls.ledger.SyncLease(context.Background(), s)
	}
	ls.syncs.RUnlock()

	le.mu.Lock()
	defer le.mu.Unlock()
	le.answer.err = err
	close(le.answer.done)
	le.answer = nil
	if err != nil {
		// The same sequence number and spending go again next time.
		if err != errClosed {
			ls.logger.Warn("lease sync failed; retrying", zap.String("org", s.Org), zap.Error(err))
		}
		return err
	}
	// Applied now or, its answer lost, before: either way the ledger holds
	// st.Held for this lease, of which the lease has spent what it spent
	// since the sync was sent.
	le.inFlight, le.ending = nil, false
	le.held = min(max(le.held+st.Held-le.unspent, 0), st.Held)
	if s.Want > 0 && st.Held == 0 {
		le.starved = sent
	}
	le.synced = sent
	le.balance = st.Balance - le.spent.total()
	return nil
}

var errClosed = errors.New("leases closed")

func (ls *Leaser) loop() {
	defer close(ls.done)
	tick := time.NewTicker(ls.cfg.Flush)
	defer tick.Stop()
	for {
		select {
		case <-ls.stop:
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
		for le.answer != nil {
			if !closing {
				// The next flush reports what was spent meanwhile.
				le.mu.Unlock()
				return true
			}
			answer := le.answer
			le.mu.Unlock()
			<-answer.done
			le.mu.Lock()
		}
		idle := closing || now.Sub(le.used) > ls.cfg.Idle
		busy := len(le.spent) > 0 || le.inFlight != nil
		if idle && !busy && le.held == 0 {
			// It holds and owes nothing: no store call. A lease given back
			// stays in the map for a while, so that its org, back, is
			// leased at once and in blocks as big as before.
			if closing || le.seq == 0 || now.Sub(le.used) > forgetAfter*ls.cfg.Idle {
				ls.end(org, le)
			}
			le.mu.Unlock()
			return true
		}
		if !idle && !busy && (le.seq == 0 || now.Sub(le.synced) <= ls.cfg.TTL/4) {
			// Not leased yet (a quiet org is charged call by call), or
			// renewed recently.
			le.mu.Unlock()
			return true
		}
		want := le.block
		if idle {
			want = 0
		}
		s := ls.send(org, le, want)
		le.mu.Unlock()
		ok := ls.finish(le, s) == nil
		le.mu.Lock()
		if closing && ok && le.answer == nil && le.held == 0 && len(le.spent) == 0 {
			ls.end(org, le)
		}
		le.mu.Unlock()
		return true
	})
}

// end takes a lease that holds and owes nothing out of the map; it runs with
// le.mu held.
func (ls *Leaser) end(org string, le *lease) {
	ls.orgs.CompareAndDelete(org, le)
	le.ended = true
}

// Close reports all spending and gives back every lease's credits. Spend
// answers false from then on.
func (ls *Leaser) Close() {
	close(ls.stop)
	<-ls.done
	ls.closed.Store(true)
	// Wait for the syncs on their way; those that start from now on are
	// refused, but for the flush's below.
	ls.syncs.Lock()
	ls.syncs.Unlock()
	ls.flush(true)
}

// Pending returns the credits spent from leases and not yet reported.
func (ls *Leaser) Pending() int64 {
	var n int64
	ls.orgs.Range(func(_, v any) bool {
		le := v.(*lease)
		le.mu.Lock()
		n += le.spent.total()
		for _, s := range le.inFlight {
			n += s
		}
		le.mu.Unlock()
		return true
	})
	return n
}
