package meter

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
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
	// the refunds of those same calls.
	Spent map[string]int64
	// Late corrects calls that an earlier sync reported: a refund, or usage
	// above the cost. Each counts on the day and in the period that sync
	// charged them.
	Late []LateSpend
	// Subjects reports the spending of the subjects whose calls the lease
	// paid, and asks for shares of their budgets, by subject.
	Subjects map[string]SubjectSync
}

// SubjectSync is what a lease sync says of one subject's budget.
type SubjectSync struct {
	// Window is the budget window of the share the calls were paid from,
	// as the ledger named it (Share.Window); empty when the subject had no
	// budget.
	Window string
	// Spent is the credits the subject's calls spent from the lease since
	// the last sync, net of the refunds of those same calls.
	Spent int64
	// Want is the share of the subject's budget the lease wants to hold.
	Want int64
	// Unspent is the share the lease held unspent when it sent the sync: it
	// may spend it while the sync is on its way.
	Unspent int64
}

// Share is the share of a subject's budget a lease holds after a sync.
type Share struct {
	// Held is the credits of the budget the lease may spend; NoBudget when
	// the subject has no budget (its calls need no share).
	Held int64
	// Window names the budget window the share is of.
	Window string
	// Left is how long the window still runs: the share may not be spent
	// after it ends.
	Left time.Duration
	// Limit and Spent are the budget's, after the sync.
	Limit, Spent int64
}

// NoBudget is Share.Held of a subject that has no budget.
const NoBudget = -1

// LateSpend is a correction of calls an earlier sync of a lease reported.
type LateSpend struct {
	// Feature is the calls' feature.
	Feature string
	// Day is the UTC day the earlier sync charged them on, yyyymmdd; empty
	// when it is not known (then today).
	Day string
	// Period is the number of the credit period the earlier sync charged
	// them in (LeaseState.Period); -1 when it is not known (then this one).
	Period int64
	// Credits is charged when above zero, and given back when below.
	Credits int64
	// Subject and Window name the budget window the calls counted in;
	// empty for calls of no subject's budget.
	Subject, Window string
}

// LeaseState is the ledger's answer to a sync.
type LeaseState struct {
	// Held is the credits the lease holds now.
	Held int64
	// Balance is the org's balance after the sync.
	Balance int64
	// Repeat is true when the sync's number was applied before.
	Repeat bool
	// Day is the UTC day the sync's spending was charged on, yyyymmdd.
	Day string
	// Period is the number of the credit period it was charged in.
	Period int64
	// Shares are the shares of the subjects' budgets the lease holds now,
	// by subject; a subject the sync named and Shares does not hold none.
	Shares map[string]Share
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
	for _, c := range s.Late {
		if err := policy.ValidateFeature(c.Feature); err != nil {
			return LeaseState{}, err
		}
		if c.Subject != "" {
			if err := policy.ValidateSubject(c.Subject); err != nil {
				return LeaseState{}, err
			}
		}
		if !validDay(c.Day) || c.Period < -1 || c.Credits < -MaxAmount || c.Credits > MaxAmount || !validWindow(c.Window) {
			return LeaseState{}, fmt.Errorf("lease sync: late spending %+v out of range", c)
		}
	}
	subjects := make([]string, 0, len(s.Subjects))
	for subject, b := range s.Subjects {
		if err := policy.ValidateSubject(subject); err != nil {
			return LeaseState{}, err
		}
		if !validWindow(b.Window) || b.Spent < -MaxAmount || b.Spent > MaxAmount || b.Want < 0 || b.Want > MaxAmount ||
			b.Unspent < 0 || b.Unspent > MaxAmount {
			return LeaseState{}, fmt.Errorf("lease sync: subject %s: %+v out of range", subject, b)
		}
		subjects = append(subjects, subject)
	}
	sort.Strings(subjects)
	r, err := l.call(ctx, "lease", leaseCall{s: s, features: features, subjects: subjects})
	if err != nil {
		return LeaseState{}, err
	}
	v := r.v
	if len(v) < 5 {
		return LeaseState{}, fmt.Errorf("lease: reply has %d fields", len(v))
	}
	held, ok1 := v[1].(int64)
	balance, ok2 := v[2].(int64)
	day, ok3 := v[3].(string)
	period, ok4 := v[4].(int64)
	if !ok1 || !ok2 || !ok3 || !ok4 {
		return LeaseState{}, fmt.Errorf("lease: unexpected reply %v", v)
	}
	st := LeaseState{Held: held, Balance: balance, Repeat: r.code == codeRepeat, Day: day, Period: period}
	if len(v) > 5 {
		if len(v) != 5+5*len(subjects) {
			return LeaseState{}, fmt.Errorf("lease: reply has %d fields for %d subjects", len(v), len(subjects))
		}
		st.Shares = make(map[string]Share, len(subjects))
		for i, subject := range subjects {
			f := v[5+5*i : 10+5*i]
			n, ok1 := f[0].(int64)
			w, ok2 := f[1].(string)
			left, ok3 := f[2].(int64)
			limit, ok4 := f[3].(int64)
			spent, ok5 := f[4].(int64)
			if !ok1 || !ok2 || !ok3 || !ok4 || !ok5 {
				return LeaseState{}, fmt.Errorf("lease: unexpected share %v", f)
			}
			st.Shares[subject] = Share{Held: n, Window: w, Left: time.Duration(left) * time.Millisecond, Limit: limit, Spent: spent}
		}
	}
	return st, nil
}

// validWindow reports whether w is empty or names a budget window as the
// scripts do (d20261206, w20261130, m202612, p3).
func validWindow(w string) bool {
	if len(w) > 16 {
		return false
	}
	for i := 0; i < len(w); i++ {
		c := w[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// leaseScript, lua/lease.lua, charges what a lease spent and sets what it
// holds, of the org's credits and of its subjects' budgets.
// KEYS: account, call log, holds, budgets.
// ARGV[8] lease id, ARGV[9] sync number, ARGV[10] credits the lease wants
// to hold, ARGV[11] credits it must leave free for others, ARGV[12] its
// lifetime in ms, ARGV[13] the credits it held unspent when it sent the
// sync, ARGV[14] n, ARGV[15] m, ARGV[16] k, then n pairs of feature and
// credits spent since the last sync, then m sextuples of feature, day
// (yyyymmdd, or empty: today), period number (-1: this one), credits,
// subject and budget window: corrections of calls an earlier sync
// reported; then k quintuples of subject, window, spent, wanted share and
// unspent share.
// Reply: {code, held, balance, day, period, then per subject (in the
// order sent) share, window, ms left in it, limit, spent}.
var leaseScript = bind("lease.lua", replyCodes{codeOK: nil, codeRepeat: nil})

// leaseCall is a checked sync; features are its Spent's, sorted.
type leaseCall struct {
	s        LeaseSync
	features []string
	subjects []string
}

func (leaseCall) script() *luaScript { return leaseScript }

func (c leaseCall) keys(k Keys) []string {
	return []string{k.Account(c.s.Org), k.Calls(c.s.Org), k.Holds(c.s.Org), k.Budgets(c.s.Org)}
}

func (c leaseCall) args(*Ledger) []any {
	s := c.s
	args := make([]any, 0, 9+2*len(c.features)+6*len(s.Late)+5*len(c.subjects))
	args = append(args, leasePrefix+s.ID, s.Seq, s.Want, s.Keep, s.TTL.Milliseconds(), s.Unspent,
		len(c.features), len(s.Late), len(c.subjects))
	for _, f := range c.features {
		args = append(args, f, s.Spent[f])
	}
	for _, late := range s.Late {
		args = append(args, late.Feature, late.Day, late.Period, late.Credits, late.Subject, late.Window)
	}
	for _, subject := range c.subjects {
		b := s.Subjects[subject]
		args = append(args, subject, b.Window, b.Spent, b.Want, b.Unspent)
	}
	return args
}

// validDay reports whether day is empty or a yyyymmdd date.
func validDay(day string) bool {
	if day == "" {
		return true
	}
	_, err := time.Parse("20060102", day)
	return err == nil && len(day) == 8
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
	// TTL is how long a lease holds its credits without a sync, by Redis'
	// clock; the gateway spends from a lease only for TTL/2 after it sent
	// its last sync, by its own monotonic clock, so no clock skew matters.
	TTL time.Duration
	// Unreported takes the last report of a lease that could not be made
	// when the leaser closed (the store did not answer), so that it is made
	// later, once: its sequence number makes a resend safe. Without it, such
	// spending is logged as lost.
	Unreported func(LeaseSync)
}

// Leaser spends orgs' credits from leases held in this process, so that a
// call to a hot org with ample balance needs no round trip to Redis. Its
// spending reaches the ledger within Flush; unused credits go back after
// Idle and at Close.
//
// A call never waits for another org's sync, nor, but for the one call that
// finds its org's lease empty, for its own org's: syncs run outside the
// lease's lock, and the calls that come while one is on its way spend what
// the lease still holds, or are charged on their own. The flush sends every
// org's sync at once, so that no org's report waits for another's.
type Leaser struct {
	ledger *Ledger
	cfg    LeaseConfig
	id     string
	logger *zap.Logger

	orgs   sync.Map // org -> *lease; read on every call without a lock
	heat   heat     // the calls of orgs without a lease
	closed atomic.Bool
	// seq numbers the syncs across all of the leaser's leases: an org's
	// lease that ended and began again must not reuse a number the ledger
	// has applied, or it would be taken for a repeat.
	seq atomic.Int64
	// flushes counts the flushes run, for tests.
	flushes atomic.Int64
	// flushing bounds the flush's syncs on their way at once.
	flushing chan struct{}
	// syncs is read-held by every sync in flight; Close write-locks it to
	// wait for them.
	syncs sync.RWMutex
	stop  chan struct{}
	done  chan struct{}
	// closedAll is closed once Close has reported and given back every
	// lease.
	closedAll chan struct{}
	// after serializes the reports made after Close: the ledger applies a
	// lease's syncs in the order of their numbers, and skips one whose
	// number is below one it applied.
	after sync.Mutex
	// queued is set once a report was handed to cfg.Unreported: the reports
	// after it must follow it there, in order.
	queued atomic.Bool
}

// leaseState is what a lease may do.
type leaseState uint8

const (
	// counting: not leased yet; the org's calls are charged one by one
	// while they are counted.
	counting leaseState = iota
	// active: calls spend what the lease holds (which may be nothing, until
	// a renewal comes back).
	active
	// returning: the lease's credits are on their way back; calls are
	// charged one by one until the ledger has taken them.
	returning
	// ended: out of the map; a call looks its org up again.
	ended
)

// lease is one org's lease in this process. Its fields are guarded by mu;
// the methods that change its state run with mu held.
type lease struct {
	mu       sync.Mutex
	state    leaseState
	held     int64            // credits held and not yet spent
	balance  int64            // the org's balance: at the last sync, less spending since
	spent    spending         // since the last sync was sent
	open     *report          // what spent will be charged as; nil until a call spends
	late     []lateSpend      // corrections of calls an earlier sync reported, to send
	inFlight map[string]int64 // the spending of a sync whose answer is not known yet
	lateOut  []LateSpend      // the corrections of that sync
	sending  *report          // what inFlight is charged as
	unspent  int64            // what the lease held when inFlight was sent
	seq      int64            // of the last sync sent; 0 before the first
	block    int64            // the credits a renewal asks for: Size, more for an org that outruns it
	dry      bool             // a call found the lease empty while a renewal was on its way
	synced   time.Time        // when the last successful sync was sent
	starved  time.Time        // when a renewal last got nothing: the org's credits are near their end
	used     time.Time        // the last call
	calls    int              // calls counted before the first lease
	sync     *syncAnswer      // of the sync on its way; nil when none is
	given    bool             // the ledger holds nothing for the lease: never leased, or given back
	subjects map[string]*share
	subjOut  map[string]SubjectSync // what inFlight says of the subjects
	asked    bool                   // a call asked for a subject's share since the last sync was sent
}

// share is the lease's share of one subject's budget. Its fields are
// guarded by its lease's mu.
type share struct {
	known   bool      // a sync answered for the subject
	none    bool      // the subject has no budget: its calls need no share
	wid     string    // the budget window the share is of
	held    int64     // credits of the budget held and not yet spent
	granted int64     // what the last sync gave
	until   time.Time // the share is spent only before then: its window's end, or half the lease's lifetime after its sync
	left    int64     // what the budget had left at the last sync, less this lease's spending since
	spent   int64     // since the last sync was sent
	unspent int64     // held when the sync on its way was sent
	asked   bool      // a call wanted the share since the last sync was sent
	back    bool      // a call the share is too small for waits for it to go back
	need    int64     // the largest cost a call that waited for the sync on its way wanted
	starved time.Time // when a sync last gave less than a waiting call needed
	used    time.Time // the last call
	sent    int64     // the number of the last sync that reported its spending
}

// canPay reports whether the share may pay a call of cost now.
func (sh *share) canPay(cost int64, now time.Time) bool {
	return sh.known && now.Before(sh.until) && (sh.none || sh.held >= cost)
}

// share returns the lease's share of subject's budget, making it when there
// is none; it runs with le.mu held.
func (le *lease) share(subject string, now time.Time) *share {
	sh := le.subjects[subject]
	if sh == nil {
		if le.subjects == nil {
			le.subjects = make(map[string]*share)
		}
		sh = new(share)
		le.subjects[subject] = sh
	}
	sh.used = now
	return sh
}

// report is one sync's worth of a lease's spending: the calls spent between
// two syncs are charged together, on one day and in one period. A call
// keeps its report (in its Receipt), so that a refund or a settle of it
// later counts where it was charged, whatever happened to the lease since.
type report struct {
	day    string // yyyymmdd, once the ledger has charged it
	period int64
	done   bool
}

// late is where a correction of a call of report r counts: the day and
// period it was charged on, or, not known, today's.
func (r *report) late(feature string, n int64) LateSpend {
	if r == nil || !r.done {
		return LateSpend{Feature: feature, Period: -1, Credits: n}
	}
	return LateSpend{Feature: feature, Day: r.day, Period: r.period, Credits: n}
}

// lateSpend is a correction of a call that an earlier sync reported, or
// that a sync on its way reports.
type lateSpend struct {
	feature      string
	rep          *report
	n            int64
	subject, wid string
}

// Receipt is a call's spending from a lease: its balance after, and what
// Adjust needs to find the report that charges it.
type Receipt struct {
	// Balance is the org's balance after the call, as the lease knows it.
	Balance int64
	// Budgeted is true when the call counted against its subject's budget;
	// BudgetRemaining is then what the budget had left after it, as the
	// lease knows it.
	Budgeted        bool
	BudgetRemaining int64
	rep             *report
	subject, wid    string
	sent            int64 // its share's sent when the call spent it
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

// heat counts the recent calls of orgs that have no lease, so that an org
// is leased once it made leaseAfter calls within Idle of each other, and
// then one more. It is a fixed table: an org counts in one of two slots
// chosen by its hash, and takes over the one whose last call is older when
// neither is its own. An org that lost its slot to others counts again from
// its next call: it is leased a few calls later, never wrongly.
type heat struct {
	seed  maphash.Seed
	mu    sync.Mutex
	slots [heatSlots]heatSlot
}

type heatSlot struct {
	h     uint64 // the org's hash; 0: free
	calls int64  // within Idle of each other
	last  int64  // unix ns of the last
}

// heatSlots is the number of orgs heat counts at once.
const heatSlots = 4096

// busy counts a call of org at now, and reports whether it is the one
// after leaseAfter calls within idle of each other: the org is busy, and
// its slot is freed.
func (t *heat) busy(org string, now time.Time, idle time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.seed == (maphash.Seed{}) {
		t.seed = maphash.MakeSeed()
	}
	h := maphash.String(t.seed, org) | 1
	s := &t.slots[h%heatSlots]
	if o := &t.slots[(h>>32)%heatSlots]; s.h != h && (o.h == h || o.last < s.last) {
		s = o
	}
	ns := now.UnixNano()
	if s.h != h || ns-s.last > int64(idle) {
		*s = heatSlot{h: h, calls: 1, last: ns}
		return leaseAfter == 0
	}
	s.calls++
	s.last = ns
	if s.calls > leaseAfter {
		*s = heatSlot{}
		return true
	}
	return false
}

// maxGrowth is how many times Size a lease grows to at most, doubling each
// time its org spends what it holds faster than a renewal comes back.
const maxGrowth = 16

// forgetAfter is how many times Idle a lease that was given back stays in
// the map.
const forgetAfter = 30

// flushWorkers bounds the syncs one flush runs at once.
const flushWorkers = 32

// NewLeaser starts a leaser; Close ends its leases.
func NewLeaser(ledger *Ledger, cfg LeaseConfig, logger *zap.Logger) *Leaser {
	ls := &Leaser{ledger: ledger, cfg: cfg, id: "gw:" + NewRequestID()[:16], logger: logger,
		flushing: make(chan struct{}, flushWorkers), stop: make(chan struct{}), done: make(chan struct{}),
		closedAll: make(chan struct{})}
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
func (ls *Leaser) Spend(org, feature string, cost int64) (rc Receipt, ok bool, err error) {
	return ls.SpendAs(org, "", feature, cost)
}

// SpendAs is Spend for a call that also counts against subject's budget
// (none when subject is empty): the lease pays it only from its share of
// that budget, which the ledger set aside for it, so that no budget is
// overspent. A call of a subject the lease has not seen, or whose share is
// too small, waits for a sync that asks for a share (two at most); when the
// budget has too little left for a share, the lease gives back what it
// holds of it and the call is charged on its own.
func (ls *Leaser) SpendAs(org, subject, feature string, cost int64) (rc Receipt, ok bool, err error) {
	now := time.Now()
	if _, known := ls.orgs.Load(org); !known {
		// An org with no lease is counted apart, without one, until it is
		// busy: most orgs call now and then, and each would otherwise cost
		// a lease in the map and a visit of every flush.
		if !ls.heat.busy(org, now, ls.cfg.Idle) {
			return Receipt{}, false, nil
		}
	}
	le := ls.lock(org)
	if le == nil {
		return Receipt{}, false, nil
	}
	le.used = now
	if le.state == counting && le.calls == 0 {
		// New, for an org the heat table found busy: this call is the
		// one that leases it.
		le.calls = leaseAfter
	}
	if le.state == counting && !le.count() {
		// An org is leased once it is busy: a lease costs two store calls
		// (take and give back), a lone call one.
		le.mu.Unlock()
		return Receipt{}, false, nil
	}
	waits := 0 // for syncs, since the subject's share was short
	renewals := 0
spend:
	for {
		if le.canSpend(cost, now, ls.cfg.TTL) {
			var sh *share
			if subject != "" {
				sh = le.share(subject, now)
				if !sh.canPay(cost, now) {
					// A share too small for the call is given back before
					// the call is charged on its own: the ledger keeps what
					// the lease holds of the budget from every charge,
					// this gateway's too, and the call may need all of it.
					back := sh.known && !sh.none && sh.held > 0 && waits < 3 &&
						(waits == 2 || now.Sub(sh.starved) < ls.cfg.Flush)
					if back {
						sh.back = true
					} else if waits >= 2 || (sh.known && now.Sub(sh.starved) < ls.cfg.Flush) {
						// Charged on its own: the budget has too little
						// left for a share, and is paid exactly, call by
						// call.
						le.mu.Unlock()
						return Receipt{}, false, nil
					}
					// The share is spent, or the subject not seen yet:
					// wait for a sync that asks for a share, begun now,
					// or, one on its way (which may renew the org's
					// credits alone), and then one begun now. A call of a
					// subject not seen yet is not charged on its own
					// meanwhile: the share the sync takes could leave its
					// charge too little of the budget.
					sh.asked, le.asked, sh.need = true, true, max(sh.need, cost)
					waits++
					answer := le.sync
					var s LeaseSync
					if answer == nil {
						s = ls.begin(org, le, le.block, true)
					}
					le.mu.Unlock()
					if answer != nil {
						<-answer.done
						err = answer.err
					} else {
						err = ls.finish(le, s)
					}
					if err != nil {
						if errors.Is(err, errClosed) {
							return Receipt{}, false, nil
						}
						return Receipt{}, false, unsentError{fmt.Errorf("lease renewal: %w", err)}
					}
					if le = ls.lock(org); le == nil {
						return Receipt{}, false, nil
					}
					if le.state == counting {
						le.mu.Unlock()
						return Receipt{}, false, nil
					}
					now = time.Now()
					continue
				}
			}
			rc = le.take(feature, cost)
			if sh != nil {
				le.takeShare(&rc, sh, subject, cost)
			}
			low := sh != nil && !sh.none && sh.held < sh.granted/2
			renew := le.sync == nil && (le.held < le.block/2 || low)
			var s LeaseSync
			if renew {
				// With the subjects when a share runs low, or a call
				// asked for one.
				s = ls.begin(org, le, le.block, low || le.asked)
			}
			le.mu.Unlock()
			if renew {
				// A failure is logged; the next sync sends it again.
				go ls.finish(le, s)
			}
			return rc, true, nil
		}
		answer := le.sync
		if answer == nil {
			break
		}
		// A sync is on its way, and a renewal that comes back too late
		// for the calls asks for more next time.
		le.dry = le.dry || le.state == active
		// Wait for it: a renewal is quicker than a charge of this call's
		// own, and near the end of the org's credits a charge could be
		// refused credits the lease is getting or giving back. The sync
		// ends by its own deadline.
		le.mu.Unlock()
		<-answer.done
		if answer.err != nil && !errors.Is(answer.err, errClosed) {
			return Receipt{}, false, unsentError{fmt.Errorf("lease renewal: %w", answer.err)}
		}
		if le = ls.lock(org); le == nil {
			return Receipt{}, false, nil
		}
		if le.state == counting {
			// The lease was given back and forgotten meanwhile: this is a
			// new one, not leased yet, which must not sync before its org
			// is busy (a flush forgets a counting lease, holding nothing).
			le.mu.Unlock()
			return Receipt{}, false, nil
		}
		now = time.Now()
	}
	if le.state == returning || now.Sub(le.starved) < ls.cfg.Flush {
		// The lease's credits are on their way back and did not get
		// there, or the org has too few credits to lease: its calls are
		// charged on their own, and a renewal is tried again at most once
		// a Flush.
		le.mu.Unlock()
		return Receipt{}, false, nil
	}
	// The lease is empty or stale: this call waits for a renewal.
	s := ls.begin(org, le, max(le.block, cost), le.asked)
	le.mu.Unlock()
	if err := ls.finish(le, s); err != nil {
		if errors.Is(err, errClosed) {
			return Receipt{}, false, nil
		}
		return Receipt{}, false, unsentError{fmt.Errorf("lease renewal: %w", err)}
	}
	if le = ls.lock(org); le == nil {
		return Receipt{}, false, nil
	}
	now = time.Now()
	if !le.canSpend(cost, now, ls.cfg.TTL) {
		le.mu.Unlock()
		return Receipt{}, false, nil
	}
	if subject != "" {
		if renewals > 0 {
			le.mu.Unlock()
			return Receipt{}, false, nil
		}
		// The subject's share, as for a lease that could pay: its own
		// renewal, or its giving back before a charge of the call's own.
		renewals++
		goto spend
	}
	rc = le.take(feature, cost)
	le.mu.Unlock()
	return rc, true, nil
}

// count counts a call of an org not leased yet; it reports whether the org
// is busy enough to lease, and makes the lease active if so.
func (le *lease) count() bool {
	if le.calls < leaseAfter {
		le.calls++
		return false
	}
	le.state = active
	return true
}

// canSpend reports whether the lease may pay a call of cost now: it is
// active, holds enough, and was synced within half its lifetime (after that
// it may have expired in Redis).
func (le *lease) canSpend(cost int64, now time.Time, ttl time.Duration) bool {
	return le.state == active && le.held >= cost && now.Sub(le.synced) <= ttl/2
}

// take spends cost credits of the lease's.
func (le *lease) take(feature string, cost int64) Receipt {
	le.held -= cost
	le.balance -= cost
	le.spent.add(feature, cost)
	if le.open == nil {
		le.open = new(report)
	}
	return Receipt{Balance: le.balance, rep: le.open}
}

// takeShare spends cost credits of subject's budget from its share sh, for
// the call of receipt rc.
func (le *lease) takeShare(rc *Receipt, sh *share, subject string, cost int64) {
	sh.spent += cost
	rc.subject, rc.wid, rc.sent = subject, sh.wid, sh.sent
	if sh.none {
		return
	}
	sh.held -= cost
	sh.left -= cost
	rc.Budgeted, rc.BudgetRemaining = true, max(sh.left, 0)
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
			v, _ = ls.orgs.LoadOrStore(org, &lease{block: ls.cfg.Size, given: true})
		}
		le := v.(*lease)
		le.mu.Lock()
		if ls.closed.Load() {
			// Close's flush may have been here already.
			le.mu.Unlock()
			return nil
		}
		if le.state != ended {
			return le
		}
		// flush ended it between the lookup and the lock.
		le.mu.Unlock()
	}
}

// Adjust changes a leased call's cost after the fact: a refund (actual 0)
// or a settle to what the upstream reported. rc is the call's Receipt. It
// returns the balance after.
//
// The change is reported with the call's own report when that is still to
// be sent; otherwise it corrects the report that charged the call, on its
// day and in its period, under the same lease, so that a refund gives back
// what that lease captured. After Close, it waits for Close to report
// everything, then reports the change on its own, under the same lease id.
func (ls *Leaser) Adjust(org, feature string, rc Receipt, charged, actual int64) int64 {
	diff := actual - charged
	le := ls.lock(org)
	if le == nil {
		<-ls.closedAll
		ls.after.Lock()
		defer ls.after.Unlock()
		c := rc.rep.late(feature, diff)
		c.Subject, c.Window = rc.subject, rc.wid
		s := LeaseSync{Org: org, ID: ls.id, Seq: ls.seq.Add(1), TTL: time.Second, Late: []LateSpend{c}}
		if ls.queued.Load() {
			ls.unreported(s, errQueued)
			return rc.Balance - diff
		}
		st, err := ls.ledger.SyncLease(context.Background(), s)
		if err != nil {
			ls.unreported(s, err)
			return rc.Balance - diff
		}
		return st.Balance
	}
	defer le.mu.Unlock()
	// The subject's share, while it is of the window the call counted in.
	var sh *share
	if rc.subject != "" {
		if sh = le.subjects[rc.subject]; sh != nil && sh.wid != rc.wid {
			sh = nil
		}
	}
	// The call's spending of the budget may be still to report, though
	// its credits were reported (a sync of the org's credits alone).
	unsent := sh != nil && sh.sent == rc.sent
	if rc.rep != nil && rc.rep == le.open {
		le.spent.add(feature, diff)
	} else {
		c := lateSpend{feature: feature, rep: rc.rep, n: diff}
		if !unsent {
			c.subject, c.wid = rc.subject, rc.wid
		}
		le.late = append(le.late, c)
	}
	if unsent {
		sh.spent += diff
	}
	if sh != nil && diff > 0 {
		sh.held = max(sh.held-diff, 0)
		sh.left -= diff
	}
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

// owes reports whether the lease has spending or corrections to report.
func (le *lease) owes() bool {
	return len(le.spent) > 0 || len(le.late) > 0 || le.inFlight != nil || le.asked
}

// begin marks a sync of the lease as on its way, asking to hold want
// credits (0 gives them back), and returns it. It runs with le.mu held and
// no sync on its way. A sync whose answer was not known goes again with its
// sequence number and spending, so that the ledger applies it once. Only a
// sync with subjects reports the subjects' spending and renews their shares:
// a renewal of the org's credits alone skips them, which keeps it as cheap
// in Redis as without budgets (the shares hold what was spent of them until
// it is reported).
func (ls *Leaser) begin(org string, le *lease, want int64, subjects bool) LeaseSync {
	if le.inFlight == nil {
		le.inFlight = make(map[string]int64, len(le.spent))
		for _, f := range le.spent {
			le.inFlight[f.feature] += f.n
		}
		le.spent = le.spent[:0]
		le.sending, le.open = le.open, nil
		// Every report the corrections name was answered before this sync
		// began (a sync waits for the one before it), so its day is known.
		le.lateOut = nil
		for _, c := range le.late {
			late := c.rep.late(c.feature, c.n)
			late.Subject, late.Window = c.subject, c.wid
			le.lateOut = mergeLate(le.lateOut, late)
		}
		le.late = le.late[:0]
		le.unspent = le.held
		if want == 0 {
			// Giving the credits back: none may be spent until the ledger
			// has taken them.
			le.unspent, le.state = 0, returning
		}
		le.seq = ls.seq.Add(1)
		le.subjOut = nil
		if subjects || le.state == returning {
			le.subjOut = ls.subjectsOut(le, want)
		}
	}
	if le.state == returning {
		want = 0
	} else if le.dry && want > 0 {
		// Calls outran the last renewal: ask for more at a time, and leave
		// as much more free for others.
		le.block, le.dry = min(2*le.block, maxGrowth*ls.cfg.Size), false
		want = max(want, le.block)
	}
	le.sync = &syncAnswer{done: make(chan struct{})}
	return LeaseSync{Org: org, ID: ls.id, Seq: le.seq, Want: want, Keep: ls.keep(le), TTL: ls.cfg.TTL,
		Unspent: le.unspent, Spent: le.inFlight, Late: le.lateOut, Subjects: le.subjOut}
}

// subjectsOut is what a new sync says of the lease's subjects: what each
// spent, and the share it wants: a block while its calls want one, what it
// holds while they pause, none once they stopped for a Flush (or the lease
// is given back). It runs with le.mu held.
func (ls *Leaser) subjectsOut(le *lease, want int64) map[string]SubjectSync {
	le.asked = false
	if len(le.subjects) == 0 {
		return nil
	}
	out := make(map[string]SubjectSync, len(le.subjects))
	for subject, sh := range le.subjects {
		b := SubjectSync{Window: sh.wid, Spent: sh.spent}
		switch {
		case sh.none:
		case sh.back:
			// A call the share is too small for is charged on its own
			// once the share is back.
			sh.held, sh.back, sh.asked = 0, false, false
		case want > 0 && le.state != returning && (sh.asked || sh.spent > 0):
			b.Want, b.Unspent = le.block, max(sh.held, 0)
		case le.state != returning && time.Since(sh.used) <= ls.cfg.Flush:
			// Called lately, not since the last report: it keeps what it
			// holds, and asks for no more.
			b.Unspent = max(sh.held, 0)
		default:
			// Its calls stopped, or the lease is given back: the share
			// goes back, and none of it is spent from now on.
			sh.held = 0
		}
		sh.unspent, sh.spent, sh.asked, sh.sent = b.Unspent, 0, false, le.seq
		out[subject] = b
	}
	return out
}

// mergeLate adds c to out, summed with a correction of the same feature,
// day and period.
func mergeLate(out []LateSpend, c LateSpend) []LateSpend {
	for i := range out {
		if out[i].Feature == c.Feature && out[i].Day == c.Day && out[i].Period == c.Period &&
			out[i].Subject == c.Subject && out[i].Window == c.Window {
			out[i].Credits += c.Credits
			return out
		}
	}
	return append(out, c)
}

// keep is the credits le leaves free for others: Keep, as many times more as
// its block has grown.
func (ls *Leaser) keep(le *lease) int64 {
	return ls.cfg.Keep * (le.block / max(ls.cfg.Size, 1))
}

// finish runs a sync that begin returned, within the ledger's timeout, and
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
	le.applied(s, st, err, sent, ls.cfg.TTL)
	if err != nil && err != errClosed {
		ls.logger.Warn("lease sync failed; its report goes again with the next one", zap.String("org", s.Org), zap.Error(err))
	}
	return err
}

// applied takes in the answer to sync s, sent at sent: on success the lease
// holds what the ledger gave it (less what it spent meanwhile) and a lease
// given back is active again, holding nothing; on failure the same report
// goes again with the next sync.
func (le *lease) applied(s LeaseSync, st LeaseState, err error, sent time.Time, ttl time.Duration) {
	le.sync.err = err
	close(le.sync.done)
	le.sync = nil
	if err != nil {
		if err != errClosed && !Unsent(err) {
			// It may have reached Redis: the ledger may hold what it
			// asked for.
			le.given = false
		}
		return
	}
	// Applied now or, its answer lost, before: either way the ledger holds
	// st.Held for this lease, of which the lease has spent what it spent
	// since the sync was sent.
	le.inFlight, le.lateOut = nil, nil
	if le.sending != nil {
		le.sending.day, le.sending.period, le.sending.done = st.Day, st.Period, true
		le.sending = nil
	}
	if le.state == returning {
		le.state = active
	}
	le.held = min(max(le.held+st.Held-le.unspent, 0), st.Held)
	le.given = st.Held == 0
	if s.Want > 0 && st.Held == 0 {
		le.starved = sent
	}
	le.synced = sent
	le.balance = st.Balance - le.spent.total()
	le.subjOut = nil
	for subject := range s.Subjects {
		if sh := le.subjects[subject]; sh != nil {
			sh.applied(st.Shares[subject], sent, ttl)
		}
	}
	if st.Held == 0 {
		// The lease's hold ended, and with it every share it held.
		for _, sh := range le.subjects {
			if !sh.none {
				sh.held = 0
			}
		}
	}
}

// applied takes in what a sync sent at sent answered of the subject's
// budget (a zero Share when it answered nothing: the lease holds no share).
func (sh *share) applied(r Share, sent time.Time, ttl time.Duration) {
	sh.known = true
	if r.Held == NoBudget {
		// No budget: the lease pays the subject's calls, and counts their
		// spending, until the next sync says otherwise.
		sh.none, sh.wid, sh.held, sh.granted = true, "", 0, 0
		sh.until = sent.Add(ttl / 2)
		sh.need = 0
		return
	}
	if sh.wid != r.Window && !sh.none {
		// Spent since the sync was sent, of a window that has ended: it
		// stays with that window.
		sh.spent = 0
	}
	if sh.none {
		sh.held = 0
	}
	sh.none = false
	sh.held = min(max(sh.held+r.Held-sh.unspent, 0), r.Held)
	sh.granted, sh.wid = r.Held, r.Window
	sh.left = r.Limit - r.Spent - sh.spent
	sh.until = sent.Add(min(ttl/2, r.Left))
	if sh.need > 0 && sh.held < sh.need {
		sh.starved = sent
	}
	sh.need = 0
}

// end takes a lease that holds and owes nothing out of the map; it runs with
// le.mu held.
func (ls *Leaser) end(org string, le *lease) {
	ls.orgs.CompareAndDelete(org, le)
	le.state = ended
}

var (
	errClosed = errors.New("leases closed")
	errQueued = errors.New("an earlier report of the leases waits in the backlog")
)

func (ls *Leaser) loop() {
	defer close(ls.done)
	tick := time.NewTicker(ls.cfg.Flush)
	defer tick.Stop()
	for {
		select {
		case <-ls.stop:
			return
		case <-tick.C:
			ls.flush()
		}
	}
}

// flush reports every lease's spending, and leases idle for cfg.Idle give
// their credits back. Each sync runs on its own, a bounded number at once:
// a lease whose sync is still on its way is left for the next flush, and
// no org's report waits for another's.
func (ls *Leaser) flush() {
	defer ls.flushes.Add(1)
	now := time.Now()
	ls.orgs.Range(func(k, v any) bool {
		org, le := k.(string), v.(*lease)
		le.mu.Lock()
		s, ok := ls.due(org, le, now)
		le.mu.Unlock()
		if ok {
			go func() {
				ls.flushing <- struct{}{}
				defer func() { <-ls.flushing }()
				ls.finish(le, s)
			}()
		}
		return true
	})
}

// closeAll gives back every lease's credits, a bounded number at once, and
// returns when all are given back or handed on.
func (ls *Leaser) closeAll() {
	var wg sync.WaitGroup
	// Not ls.flushing: a flush's sync that still waits for a place there
	// is one that giveBack may wait for.
	sem := make(chan struct{}, flushWorkers)
	ls.orgs.Range(func(k, v any) bool {
		org, le := k.(string), v.(*lease)
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			ls.giveBack(org, le)
		})
		return true
	})
	wg.Wait()
}

// due decides what a flush does with a lease: nothing, take it out of the
// map, or send a sync (returned with ok). It runs with le.mu held.
func (ls *Leaser) due(org string, le *lease, now time.Time) (s LeaseSync, ok bool) {
	if le.sync != nil {
		// A sync is on its way: the next flush reports what was spent
		// meanwhile.
		return LeaseSync{}, false
	}
	idle := now.Sub(le.used) > ls.cfg.Idle
	if le.subjOut == nil {
		for subject, sh := range le.subjects {
			// A subject whose calls stopped, and whose share went back,
			// is forgotten: the map holds only the busy ones.
			if now.Sub(sh.used) > ls.cfg.Idle && sh.spent == 0 && sh.held == 0 && !sh.asked {
				delete(le.subjects, subject)
			}
		}
	}
	owes := le.owes()
	switch {
	case le.state == counting && le.given && !owes:
		// Never leased: a quiet org is charged call by call. (A counting
		// lease that holds credits goes on below, and gives them back.)
		if idle {
			ls.end(org, le)
		}
		return LeaseSync{}, false
	case idle && !owes && le.given && le.state == active:
		// It holds and owes nothing: no store call. A lease given back
		// stays in the map for a while, so that its org, back, is leased
		// at once and in blocks as big as before.
		if now.Sub(le.used) > forgetAfter*ls.cfg.Idle {
			ls.end(org, le)
		}
		return LeaseSync{}, false
	case !idle && !owes && now.Sub(le.synced) <= ls.cfg.TTL/4:
		// Renewed recently.
		return LeaseSync{}, false
	}
	want := le.block
	if idle {
		want = 0
	}
	return ls.begin(org, le, want, true), true
}

// giveBack reports a closed leaser's lease and gives its credits back,
// sync after sync until it owes and holds nothing; a report the store does
// not take is handed to cfg.Unreported, with one more that gives the
// credits back.
func (ls *Leaser) giveBack(org string, le *lease) {
	le.mu.Lock()
	defer le.mu.Unlock()
	for {
		for le.sync != nil {
			// A sync that started before Close refused new ones.
			answer := le.sync
			le.mu.Unlock()
			<-answer.done
			le.mu.Lock()
		}
		// Done once it owes nothing and the ledger holds nothing for it,
		// whatever the lease's own count says.
		if len(le.inFlight) == 0 && len(le.lateOut) == 0 && len(le.spent) == 0 && len(le.late) == 0 && le.given {
			ls.end(org, le)
			return
		}
		s := ls.begin(org, le, 0, true)
		le.mu.Unlock()
		err := ls.finish(le, s)
		le.mu.Lock()
		if err != nil {
			ls.unreported(s, err)
			// s may repeat a sync the ledger applied, whose repeat gives
			// nothing back: a last one after it gives back whatever the
			// ledger may hold for the lease, and reports what was spent
			// since.
			if !le.given || len(le.spent) > 0 || len(le.late) > 0 {
				le.inFlight, le.lateOut = nil, nil
				ls.unreported(ls.begin(org, le, 0, true), err)
				le.sync = nil
			}
			ls.end(org, le)
			return
		}
	}
}

// unreported hands a report that could not be made to cfg.Unreported, or
// logs it as lost.
func (ls *Leaser) unreported(s LeaseSync, err error) {
	ls.queued.Store(true)
	if ls.cfg.Unreported != nil {
		ls.logger.Warn("lease report failed; it is kept and sent again until the store takes it",
			zap.String("org", s.Org), zap.Int64("credits", sum(s.Spent)+lateSum(s.Late)), zap.Error(err))
		ls.cfg.Unreported(s)
		return
	}
	ls.logger.Error("lease report lost: the store did not take it", zap.String("org", s.Org),
		zap.Int64("credits", sum(s.Spent)+lateSum(s.Late)), zap.Error(err))
}

func lateSum(late []LateSpend) int64 {
	var n int64
	for _, c := range late {
		n += c.Credits
	}
	return n
}

func sum(spent map[string]int64) int64 {
	var n int64
	for _, v := range spent {
		n += v
	}
	return n
}

// Close reports all spending and gives back every lease's credits. Spend
// answers false from then on. A report the store does not take goes to
// cfg.Unreported.
func (ls *Leaser) Close() {
	close(ls.stop)
	<-ls.done
	ls.closed.Store(true)
	// Wait for the syncs on their way; those that start from now on are
	// refused, but for the flush's below.
	ls.syncs.Lock()
	ls.syncs.Unlock()
	ls.closeAll()
	close(ls.closedAll)
}

// Pending returns the credits spent from leases and not yet reported.
func (ls *Leaser) Pending() int64 {
	var n int64
	ls.orgs.Range(func(_, v any) bool {
		le := v.(*lease)
		le.mu.Lock()
		n += le.spent.total() + sum(le.inFlight)
		for _, c := range le.late {
			n += c.n
		}
		for _, c := range le.lateOut {
			n += c.Credits
		}
		le.mu.Unlock()
		return true
	})
	return n
}
