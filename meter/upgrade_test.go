package meter

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// The upgrade test: Redis as version 0.4.0 of the ledger left it, read and
// used by the ledger as it is now. The fixture was written by 0.4.0's code
// (go test ./meter -run TestUpgrade -write-upgrade); later versions must
// read it as 0.4.0 did, with no step by hand, and never rewrite it.

var writeUpgrade = flag.Bool("write-upgrade", false,
	"write "+upgradeFixture+" from the ledger's code as it is, then check it; only 0.4.0's code may write it")

const upgradeFixture = "testdata/upgrade-0.4.0.json"

// The ledger's settings the fixture was written with, which its reader
// uses too.
var upgradeDefaultPlan = Plan{Allowance: 500, RechargeMonth: 1}

// The call with an Idempotency-Key that the fixture keeps a response of.
const (
	keptRequest  = "idem:order-17"
	keptResponse = `{"id":"chat-17","text":"hello"}`
)

var keptBinding = Binding("POST", "/v1/chat", "rich-text", 7)

// The gateways' leases of org "leased": gw:live reported twice (sync 2 is
// its last), gw:gone once and then stopped reporting.
const (
	liveLease    = "gw:live"
	liveLeaseSeq = 2
	goneLease    = "gw:gone"
	goneLeaseSeq = 1
)

// upgradeData is the fixture: every key 0.4.0 left in Redis, and what 0.4.0
// read of each org once they were restored.
type upgradeData struct {
	// Version is the version of the ledger that wrote the keys.
	Version string `json:"version"`
	// Note says how the fixture was made.
	Note string `json:"note"`
	// Now is the ledger's clock when the keys were taken.
	Now time.Time `json:"now"`
	// ServerMS is Redis' clock (TIME plus the ledger's skew), in ms, when
	// the keys were taken: holds and leases expire by it.
	ServerMS int64 `json:"server_ms"`
	// DefaultPlan is the ledger's default plan.
	DefaultPlan Plan `json:"default_plan"`
	// Keys is every key, sorted.
	Keys []storedKey `json:"keys"`
	// Orgs is what 0.4.0 read of each org, in this order: its account,
	// its holds, its events and its usage per day.
	Orgs map[string]orgRecord `json:"orgs"`
}

// storedKey is one Redis key: its type, its value, and its time to live.
type storedKey struct {
	Key  string `json:"key"`
	Type string `json:"type"`
	// PTTL is the key's time to live in ms, or -1 for none.
	PTTL   int64             `json:"pttl"`
	String *string           `json:"string,omitempty"`
	Hash   map[string]string `json:"hash,omitempty"`
	List   []string          `json:"list,omitempty"`
	ZSet   []zMember         `json:"zset,omitempty"`
	Set    []string          `json:"set,omitempty"`
}

type zMember struct {
	Member string  `json:"member"`
	Score  float64 `json:"score"`
}

// orgRecord is what the ledger read of one org. Each part holds only the
// fields 0.4.0 had: a later version's new fields are checked by its own
// tests.
type orgRecord struct {
	Account accountView `json:"account"`
	Holds   []holdView  `json:"holds"`
	Events  []eventView `json:"events"`
	Usage   []DayUsage  `json:"usage"`
}

type planView struct {
	Allowance     int64 `json:"allowance"`
	RechargeMonth int   `json:"recharge_month"`
}

type accountView struct {
	Balance            int64            `json:"balance"`
	Held               int64            `json:"held"`
	Available          int64            `json:"available"`
	AllowanceRemaining int64            `json:"allowance_remaining"`
	Purchased          int64            `json:"purchased"`
	Plan               planView         `json:"plan"`
	NextPlan           *planView        `json:"next_plan"`
	OwnPlan            bool             `json:"own_plan"`
	PeriodStart        time.Time        `json:"period_start"`
	NextRecharge       time.Time        `json:"next_recharge"`
	Used               map[string]int64 `json:"used"`
}

func viewAccount(a Account) accountView {
	v := accountView{Balance: a.Balance, Held: a.Held, Available: a.Available, AllowanceRemaining: a.AllowanceRemaining,
		Purchased: a.Purchased, Plan: planView{a.Plan.Allowance, a.Plan.RechargeMonth}, OwnPlan: a.OwnPlan,
		PeriodStart: a.PeriodStart.UTC(), NextRecharge: a.NextRecharge.UTC(), Used: map[string]int64{}}
	if a.NextPlan != nil {
		v.NextPlan = &planView{a.NextPlan.Allowance, a.NextPlan.RechargeMonth}
	}
	for f, n := range a.Used {
		v.Used[f] = n
	}
	return v
}

type holdView struct {
	ID         string     `json:"hold"`
	State      string     `json:"state"`
	Amount     int64      `json:"amount"`
	Captured   int64      `json:"captured"`
	Feature    string     `json:"feature"`
	Expires    time.Time  `json:"expires"`
	LastReport *time.Time `json:"last_report"`
}

func viewHolds(hs []Hold) []holdView {
	out := make([]holdView, 0, len(hs))
	for _, h := range hs {
		v := holdView{ID: h.ID, State: h.State, Amount: h.Amount, Captured: h.Captured, Feature: h.Feature, Expires: h.Expires.UTC()}
		if h.LastReport != nil {
			t := h.LastReport.UTC()
			v.LastReport = &t
		}
		out = append(out, v)
	}
	return out
}

type eventView struct {
	ID      string    `json:"id"`
	Time    time.Time `json:"time"`
	Kind    string    `json:"kind"`
	Delta   int64     `json:"delta"`
	Balance int64     `json:"balance"`
	Feature string    `json:"feature,omitempty"`
	Ref     string    `json:"ref,omitempty"`
	Reason  string    `json:"reason,omitempty"`
}

func viewEvents(es []Event) []eventView {
	out := make([]eventView, 0, len(es))
	for _, e := range es {
		out = append(out, eventView{ID: e.ID, Time: e.Time.UTC(), Kind: e.Kind, Delta: e.Delta, Balance: e.Balance,
			Feature: e.Feature, Ref: e.Ref, Reason: e.Reason})
	}
	return out
}

// The days whose usage the fixture records.
var upgradeUsageFrom, upgradeUsageTo = date(2026, time.March, 29), date(2026, time.April, 1)

// readOrg reads org as the fixture records it: account, holds, events,
// usage, in this order (the first read writes what fell due: an expired
// hold's end).
func readOrg(e *env, org string) orgRecord {
	e.t.Helper()
	a := e.account(org)
	holds, err := e.ledger.Holds(e.ctx, org)
	if err != nil {
		e.t.Fatal(err)
	}
	events, err := e.ledger.Events(e.ctx, org, 1000)
	if err != nil {
		e.t.Fatal(err)
	}
	usage, err := e.ledger.Usage(e.ctx, org, upgradeUsageFrom, upgradeUsageTo)
	if err != nil {
		e.t.Fatal(err)
	}
	return orgRecord{Account: viewAccount(a), Holds: viewHolds(holds), Events: viewEvents(events), Usage: usage}
}

// upgradeEnv is a ledger with the fixture's settings over rdb, under the
// default key prefix, at now; its Redis clock reads serverMS now.
func upgradeEnv(t *testing.T, rdb redis.UniversalClient, now time.Time, serverMS int64) *env {
	t.Helper()
	e := &env{t: t, rdb: rdb, clock: newClock(now), prefix: DefaultPrefix, ctx: context.Background()}
	l, err := New(rdb, Config{DefaultPlan: upgradeDefaultPlan, Now: e.clock.Now, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	e.ledger = l
	e.setServerClock(serverMS)
	return e
}

// setServerClock sets the ledger's skew so that its scripts read Redis'
// clock as ms now.
func (e *env) setServerClock(ms int64) {
	e.t.Helper()
	now, err := e.rdb.Time(e.ctx).Result()
	if err != nil {
		e.t.Fatal(err)
	}
	e.ledger.serverSkew.Store(ms - now.UnixMilli())
}

// dumpKeys reads every key under the env's prefix.
func dumpKeys(e *env) []storedKey {
	e.t.Helper()
	var out []storedKey
	for _, k := range e.keys() {
		typ, err := e.rdb.Type(e.ctx, k).Result()
		if err != nil {
			e.t.Fatal(err)
		}
		sk := storedKey{Key: k, Type: typ}
		switch typ {
		case "string":
			var s string
			s, err = e.rdb.Get(e.ctx, k).Result()
			sk.String = &s
		case "hash":
			sk.Hash, err = e.rdb.HGetAll(e.ctx, k).Result()
		case "list":
			sk.List, err = e.rdb.LRange(e.ctx, k, 0, -1).Result()
		case "zset":
			var zs []redis.Z
			zs, err = e.rdb.ZRangeWithScores(e.ctx, k, 0, -1).Result()
			for _, z := range zs {
				sk.ZSet = append(sk.ZSet, zMember{Member: z.Member.(string), Score: z.Score})
			}
		case "set":
			sk.Set, err = e.rdb.SMembers(e.ctx, k).Result()
			sort.Strings(sk.Set)
		default:
			e.t.Fatalf("key %s: type %s", k, typ)
		}
		if err != nil {
			e.t.Fatal(err)
		}
		if sk.PTTL, err = e.rdb.Do(e.ctx, "PTTL", k).Int64(); err != nil {
			e.t.Fatal(err)
		}
		out = append(out, sk)
	}
	return out
}

// restoreKeys writes keys into rdb as they were, each with its time to
// live, and checks that Redis then holds them exactly.
func restoreKeys(e *env, keys []storedKey) {
	e.t.Helper()
	ctx := e.ctx
	for _, k := range keys {
		var err error
		if err = e.rdb.Del(ctx, k.Key).Err(); err != nil {
			e.t.Fatal(err)
		}
		switch k.Type {
		case "string":
			err = e.rdb.Set(ctx, k.Key, *k.String, 0).Err()
		case "hash":
			err = e.rdb.HSet(ctx, k.Key, k.Hash).Err()
		case "list":
			items := make([]any, len(k.List))
			for i, s := range k.List {
				items[i] = s
			}
			err = e.rdb.RPush(ctx, k.Key, items...).Err()
		case "zset":
			zs := make([]redis.Z, len(k.ZSet))
			for i, z := range k.ZSet {
				zs[i] = redis.Z{Member: z.Member, Score: z.Score}
			}
			err = e.rdb.ZAdd(ctx, k.Key, zs...).Err()
		case "set":
			items := make([]any, len(k.Set))
			for i, s := range k.Set {
				items[i] = s
			}
			err = e.rdb.SAdd(ctx, k.Key, items...).Err()
		default:
			e.t.Fatalf("key %s: type %s", k.Key, k.Type)
		}
		if err == nil && k.PTTL > 0 {
			err = e.rdb.PExpire(ctx, k.Key, time.Duration(k.PTTL)*time.Millisecond).Err()
		}
		if err != nil {
			e.t.Fatal(err)
		}
	}
	got := dumpKeys(e)
	if len(got) != len(keys) {
		e.t.Fatalf("restored %d keys, Redis holds %d", len(keys), len(got))
	}
	for i, k := range got {
		want := keys[i]
		// A time to live ticks down from the moment it is set.
		if (want.PTTL < 0) != (k.PTTL < 0) || k.PTTL > want.PTTL || want.PTTL-k.PTTL > 10_000 {
			e.t.Fatalf("key %s: time to live %d ms, want %d", k.Key, k.PTTL, want.PTTL)
		}
		k.PTTL = want.PTTL
		if !reflect.DeepEqual(k, want) {
			e.t.Fatalf("key %s restored as\n%+v\nwant\n%+v", k.Key, k, want)
		}
	}
}

// roundMS rounds a time in ms to the second.
func roundMS(ms int64) int64 { return (ms + 500) / 1000 * 1000 }

// canonical rounds to the second what 0.4.0 wrote by Redis' clock (which
// the writer keeps within a few ms of the ledger's, on whole minutes) and
// every time to live, so that the fixture written again is the same: the
// account's hx, each hold's expiry and last report, the references'
// scores.
func canonical(t *testing.T, keys []storedKey) {
	t.Helper()
	round := func(s string) string {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("%q: %v", s, err)
		}
		return strconv.FormatInt(roundMS(n), 10)
	}
	for i := range keys {
		k := &keys[i]
		if k.PTTL > 0 {
			k.PTTL = roundMS(k.PTTL)
		}
		switch {
		case strings.HasSuffix(k.Key, "}:a"):
			if hx, ok := k.Hash["hx"]; ok {
				k.Hash["hx"] = round(hx)
			}
		case strings.HasSuffix(k.Key, "}:h"):
			// "state ofa fa fp pn until seq cap cfa cfp cfd feature [rep]"
			for id, rec := range k.Hash {
				f := strings.Split(rec, " ")
				if len(f) < 12 {
					t.Fatalf("hold %s: %q", id, rec)
				}
				f[5] = round(f[5])
				if len(f) > 12 {
					f[12] = round(f[12])
				}
				k.Hash[id] = strings.Join(f, " ")
			}
		case strings.HasSuffix(k.Key, "}:t"):
			for j := range k.ZSet {
				k.ZSet[j].Score = float64(roundMS(int64(k.ZSet[j].Score)))
			}
			// Redis' order: by score, then by member.
			slices.SortFunc(k.ZSet, func(a, b zMember) int {
				if a.Score != b.Score {
					return cmp.Compare(a.Score, b.Score)
				}
				return strings.Compare(a.Member, b.Member)
			})
		}
	}
}

// writeUpgradeFixture writes the fixture with the ledger's code as it is:
// each org's history, the keys it left, and what the ledger reads of them.
// Times to live run on Redis' own clock, which the ledger clock's jumps of
// days do not move: the request markers and call logs of earlier days are
// still there, as they are for calls made minutes before an upgrade.
func writeUpgradeFixture(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	rdb := mustClient(t, ClientOptions{URL: "redis://" + srv.Addr})
	t.Cleanup(func() { rdb.Close() })
	e := upgradeEnv(t, rdb, time.Date(2026, time.March, 30, 10, 0, 0, 0, time.UTC), 0)
	l, ctx := e.ledger, e.ctx
	// Redis' clock is set to the ledger's before each write, so that what
	// it dates (holds, leases, references) falls on the same whole minutes.
	align := func() { e.setServerClock(e.clock.Now().UnixMilli()) }
	at := func(s string) {
		ts, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		e.clock.Set(ts)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	charge := func(org, feature, id string, cost int64, overdraft bool) {
		t.Helper()
		align()
		r, err := l.Charge(ctx, ChargeRequest{Org: org, Feature: feature, Cost: cost, RequestID: id, Attempt: "try-" + id,
			Overdraft: overdraft, OverdraftLimit: NoLimit})
		must(err)
		if !r.Charged {
			t.Fatalf("charge %s refused", id)
		}
	}
	plan := func(org string, allowance int64, month int, ref string) {
		t.Helper()
		align()
		_, _, err := l.SetPlan(ctx, org, Plan{Allowance: allowance, RechargeMonth: month}, ref)
		must(err)
	}
	topUp := func(org string, amount int64, ref string) {
		t.Helper()
		align()
		_, _, err := l.TopUp(ctx, org, amount, ref)
		must(err)
	}
	hold := func(org, feature string, amount int64, ttl time.Duration, ref string) {
		t.Helper()
		align()
		_, _, _, err := l.CreateHold(ctx, HoldRequest{Org: org, Feature: feature, Amount: amount, TTL: ttl, Reference: ref})
		must(err)
	}
	lease := func(s LeaseSync) {
		t.Helper()
		align()
		_, err := l.SyncLease(ctx, s)
		must(err)
	}

	// 2026-03-30, 10:00.
	at("2026-03-30T10:00:00Z")
	charge("plain", "rich-text", "plain-1", 10, false) // left in flight
	charge("plain", "summary", "plain-2", 25, false)
	align()
	_, err := l.Settle(ctx, "plain", "plain-2", 20)
	must(err)
	plan("owner", 1000, 3, "plan-owner")
	topUp("owner", 300, "inv-1001")
	topUp("owner", 200, "inv-1002")
	charge("owner", "rich-text", "owner-1", 600, false)
	charge("owner", "rich-text", "owner-2", 450, false) // 400 of allowance, 50 purchased
	plan("planned", 300, 6, "plan-planned-1")
	charge("planned", "summary", "planned-1", 20, false)
	plan("planned", 600, 9, "plan-planned-2") // waits for June's recharge

	// 2026-03-31, 10:00: a second day of usage.
	at("2026-03-31T10:00:00Z")
	charge("plain", "rich-text", "plain-3", 5, false)
	charge("owner", "summary", "owner-3", 50, false) // purchased credits

	// 2026-03-31, 23:00: an hour before April's recharge.
	at("2026-03-31T23:00:00Z")
	plan("carried", 100, 4, "plan-carried")
	charge("carried", "rich-text", "carried-1", 80, true)
	charge("carried", "rich-text", "carried-2", 70, true)
	charge("carried", "rich-text", "carried-3", 60, true) // 110 in debt
	plan("heldover", 200, 4, "plan-heldover")
	topUp("heldover", 100, "inv-2001")
	hold("heldover", "batch", 120, 4*time.Hour, "heldover-before") // of March's allowance

	// 2026-04-01, 00:30: April's recharge has happened.
	at("2026-04-01T00:30:00Z")
	charge("carried", "rich-text", "carried-4", 10, true)         // the debt carried over: 100 - 110 - 10
	hold("heldover", "batch", 250, 4*time.Hour, "heldover-after") // 200 of April's allowance, 50 purchased
	plan("debtor", 50, 1, "plan-debtor")
	charge("debtor", "rich-text", "debtor-1", 30, true)
	charge("debtor", "rich-text", "debtor-2", 45, true)
	topUp("debtor", 100, "inv-3001") // purchased credits beside the debt
	hold("holder", "gen", 100, time.Hour, "holder-live")
	hold("holder", "gen", 80, time.Hour, "holder-part")
	align()
	_, _, _, err = l.CaptureHold(ctx, "holder", HoldID("holder-part"), 50)
	must(err)
	hold("holder", "gen", 60, 5*time.Minute, "holder-lapsed") // expires at 00:35; nothing sweeps it
	lease(LeaseSync{Org: "leased", ID: goneLease, Seq: goneLeaseSeq, Want: 100, TTL: time.Minute})
	lease(LeaseSync{Org: "leased", ID: liveLease, Seq: 1, Want: 200, TTL: 30 * time.Minute})

	// 2026-04-01, 00:45.
	at("2026-04-01T00:45:00Z")
	// The live lease reports; its sweep finds gw:gone silent past its
	// lifetime: unreported.
	lease(LeaseSync{Org: "leased", ID: liveLease, Seq: liveLeaseSeq, Want: 200, TTL: 30 * time.Minute, Unspent: 170,
		Spent: map[string]int64{"rich-text": 30}})
	charge("calls", "rich-text", "call-inflight", 40, false)
	charge("calls", "rich-text", "call-settled", 15, false)
	align()
	_, err = l.Settle(ctx, "calls", "call-settled", 12)
	must(err)
	align()
	_, err = l.Charge(ctx, ChargeRequest{Org: "calls", Feature: "rich-text", Cost: 7, RequestID: keptRequest,
		Attempt: "try-" + keptRequest, Binding: keptBinding})
	must(err)
	must(l.Keep(ctx, "calls", keptRequest, "try-"+keptRequest, []byte(keptResponse)))
	align()
	_, _, err = l.Adjust(ctx, "adjusted", 250, "goodwill credit for the March outage", "adj-1")
	must(err)
	align()
	_, _, err = l.Adjust(ctx, "adjusted", -40, "usage billed outside the gateway", "adj-2")
	must(err)

	fx := upgradeData{
		Version: "0.4.0",
		Note: "Written by 0.4.0's ledger over redis-server with go test ./meter -run TestUpgrade -write-upgrade. " +
			"Times Redis' clock dates and times to live are rounded to the second. orgs holds what 0.4.0 read " +
			"once the keys were restored, in the order account, holds, events, usage.",
		Now:         e.clock.Now(),
		ServerMS:    e.clock.Now().UnixMilli(),
		DefaultPlan: upgradeDefaultPlan,
		Keys:        dumpKeys(e),
		Orgs:        map[string]orgRecord{},
	}
	canonical(t, fx.Keys)

	// What the ledger reads, from the keys as the fixture holds them.
	must(rdb.FlushAll(ctx).Err())
	r := upgradeEnv(t, rdb, fx.Now, fx.ServerMS)
	restoreKeys(r, fx.Keys)
	for _, c := range upgradeCases {
		rec := readOrg(r, c.org)
		// A hold the read ended is dated by Redis' clock as the read
		// found it.
		for i := range rec.Holds {
			rec.Holds[i].Expires = rec.Holds[i].Expires.Round(time.Second)
		}
		fx.Orgs[c.org] = rec
	}
	out, err := json.MarshalIndent(fx, "", " ")
	must(err)
	must(os.WriteFile(upgradeFixture, append(out, '\n'), 0o644))
	t.Logf("wrote %s: %d keys, %d bytes", upgradeFixture, len(fx.Keys), len(out))
}

func loadUpgradeFixture(t *testing.T) upgradeData {
	t.Helper()
	raw, err := os.ReadFile(upgradeFixture)
	if err != nil {
		t.Fatal(err)
	}
	var fx upgradeData
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&fx); err != nil {
		t.Fatalf("%s: %v", upgradeFixture, err)
	}
	if len(fx.Keys) == 0 || len(fx.Orgs) != len(upgradeCases) {
		t.Fatalf("%s: %d keys, %d orgs; want keys and the %d orgs of upgradeCases", upgradeFixture, len(fx.Keys), len(fx.Orgs), len(upgradeCases))
	}
	return fx
}

// upgraded is one org of the fixture, restored, with a ledger of its own.
type upgraded struct {
	*env
	org string
	rec orgRecord
}

func (u *upgraded) acct() Account {
	u.t.Helper()
	return u.account(u.org)
}

func (u *upgraded) holdOf(id string) holdView {
	u.t.Helper()
	for _, h := range u.rec.Holds {
		if h.ID == id {
			return h
		}
	}
	u.t.Fatalf("the fixture has no hold %s", id)
	return holdView{}
}

// chargeOf is the cost of a charge the fixture's events record.
func (u *upgraded) chargeOf(requestID string) int64 {
	u.t.Helper()
	for _, e := range u.rec.Events {
		if e.Kind == "charge" && e.Ref == requestID {
			return -e.Delta
		}
	}
	u.t.Fatalf("the fixture has no charge %s", requestID)
	return 0
}

// usedOn is the fixture's usage of feature on day (YYYY-MM-DD).
func (u *upgraded) usedOn(day, feature string) int64 {
	u.t.Helper()
	for _, d := range u.rec.Usage {
		if d.Date == day {
			return d.Used[feature]
		}
	}
	u.t.Fatalf("the fixture has no usage on %s", day)
	return 0
}

// want checks the account's figures, and the usage of the features named.
func (u *upgraded) want(what string, a Account, balance, held, allowance, purchased int64, used map[string]int64) {
	u.t.Helper()
	if a.Balance != balance || a.Held != held || a.Available != balance-held || a.AllowanceRemaining != allowance || a.Purchased != purchased {
		u.t.Fatalf("%s: balance %d, held %d, available %d, allowance %d, purchased %d; want %d, %d, %d, %d, %d", what,
			a.Balance, a.Held, a.Available, a.AllowanceRemaining, a.Purchased, balance, held, balance-held, allowance, purchased)
	}
	for f, n := range used {
		if a.Used[f] != n {
			u.t.Fatalf("%s: used %v, want %s %d", what, a.Used, f, n)
		}
	}
}

// upgradeCase is one org of the fixture: what it shows, and what the
// ledger must do with it after the upgrade. Every org then gets a new
// charge and a recharge (checkAfter).
type upgradeCase struct {
	org string
	// shows checks that the fixture holds the case it is for.
	shows func(t *testing.T, r orgRecord)
	// after runs operations on the upgraded org and checks their figures;
	// it ends every hold, so that checkAfter's figures need no split of
	// the held credits.
	after func(u *upgraded)
}

var upgradeCases = []upgradeCase{
	{org: "plain", shows: func(t *testing.T, r orgRecord) {
		// The default plan, partly used on two days, one charge settled
		// and one in flight.
		a := r.Account
		if a.OwnPlan || a.Plan.Allowance != 500 || a.AllowanceRemaining != 465 || a.Used["rich-text"] != 15 || a.Used["summary"] != 20 ||
			len(r.Usage) != 4 || r.Usage[1].Used["rich-text"] != 10 || r.Usage[2].Used["rich-text"] != 5 {
			t.Fatalf("plain: %+v %+v", a, r.Usage)
		}
	}, after: func(u *upgraded) {
		// plain-1 (10 credits of rich-text on 2026-03-30) is refunded: to
		// the allowance, this period's usage and its own day's.
		before := u.acct()
		cost := u.chargeOf("plain-1")
		res, err := u.ledger.Refund(u.ctx, u.org, "plain-1")
		if err != nil || res.Delta != cost || res.Balance != before.Balance+cost {
			u.t.Fatalf("refund: %+v %v; want %d back", res, err, cost)
		}
		u.want("refunded", u.acct(), before.Balance+cost, 0, before.AllowanceRemaining+cost, before.Purchased,
			map[string]int64{"rich-text": before.Used["rich-text"] - cost})
		days, err := u.ledger.Usage(u.ctx, u.org, date(2026, time.March, 30), date(2026, time.March, 31))
		if err != nil || days[0].Used["rich-text"] != u.usedOn("2026-03-30", "rich-text")-cost ||
			days[1].Used["rich-text"] != u.usedOn("2026-03-31", "rich-text") {
			u.t.Fatalf("usage after the refund: %+v %v", days, err)
		}
		if res, err := u.ledger.Refund(u.ctx, u.org, "plain-1"); err != nil || !res.Repeat || res.Balance != before.Balance+cost {
			u.t.Fatalf("second refund: %+v %v", res, err)
		}
		// plain-2 was settled: a settle again changes nothing.
		if res, err := u.ledger.Settle(u.ctx, u.org, "plain-2", 1); err != nil || !res.Repeat {
			u.t.Fatalf("settle again: %+v %v", res, err)
		}
	}},
	{org: "owner", shows: func(t *testing.T, r orgRecord) {
		// Its own plan, all spent, and purchased credits partly spent.
		a := r.Account
		if !a.OwnPlan || a.Plan != (planView{1000, 3}) || a.AllowanceRemaining != 0 || a.Purchased != 400 || a.Balance != 400 {
			t.Fatalf("owner: %+v", a)
		}
	}, after: func(u *upgraded) {
		// A top-up's reference stays applied.
		before := u.acct()
		a, applied, err := u.ledger.TopUp(u.ctx, u.org, 300, "inv-1001")
		if err != nil || applied || !reflect.DeepEqual(viewAccount(a), viewAccount(before)) {
			u.t.Fatalf("top-up again: applied %v, %v, %+v", applied, err, a)
		}
	}},
	{org: "planned", shows: func(t *testing.T, r orgRecord) {
		// A plan change waits for June's recharge.
		a := r.Account
		if a.NextPlan == nil || *a.NextPlan != (planView{600, 9}) || a.Plan != (planView{300, 6}) || a.AllowanceRemaining != 280 {
			t.Fatalf("planned: %+v", a)
		}
	}},
	{org: "carried", shows: func(t *testing.T, r orgRecord) {
		// 210 spent in debt in March's period; April's 100 repaid part of
		// it, and a charge since took the org deeper: 100 - 210 - 10.
		a := r.Account
		if a.AllowanceRemaining != -20 || a.Balance != -20 || !a.PeriodStart.Equal(time.Date(2026, time.April, 1, 0, 0, 0, 0, time.UTC)) {
			t.Fatalf("carried: %+v", a)
		}
	}, after: func(u *upgraded) {
		// carried-4 went wholly into this period's debt: its refund
		// cancels that much of it.
		before := u.acct()
		cost := u.chargeOf("carried-4")
		res, err := u.ledger.Refund(u.ctx, u.org, "carried-4")
		if err != nil || res.Delta != cost {
			u.t.Fatalf("refund: %+v %v; want %d back", res, err, cost)
		}
		u.want("refunded", u.acct(), before.Balance+cost, 0, before.AllowanceRemaining+cost, before.Purchased,
			map[string]int64{"rich-text": before.Used["rich-text"] - cost})
	}},
	{org: "debtor", shows: func(t *testing.T, r orgRecord) {
		// In debt, with purchased credits topped up since.
		a := r.Account
		if a.AllowanceRemaining != -25 || a.Purchased != 100 || a.Balance != 75 {
			t.Fatalf("debtor: %+v", a)
		}
	}},
	{org: "heldover", shows: func(t *testing.T, r orgRecord) {
		// Two live holds: 120 of March's allowance, taken before April's
		// recharge, and 250 taken after it (200 of April's allowance, 50
		// purchased).
		a := r.Account
		if len(r.Holds) != 2 || a.Held != 370 || a.Balance != 420 || a.AllowanceRemaining != 200 || a.Purchased != 100 || a.Available != 50 {
			t.Fatalf("heldover: %+v %+v", a, r.Holds)
		}
	}, after: func(u *upgraded) {
		// The hold of March's allowance, captured in part: its 120 credits
		// are all gone, the 100 captured charged and the 20 left expired
		// with March's period. April's allowance pays nothing of it.
		before := u.acct()
		old := u.holdOf(HoldID("heldover-before"))
		h, a, _, err := u.ledger.CaptureHold(u.ctx, u.org, old.ID, 100)
		if err != nil || h.State != HoldCaptured || h.Captured != 100 {
			u.t.Fatalf("capture: %+v %v", h, err)
		}
		u.want("captured", a, before.Balance-old.Amount, before.Held-old.Amount, before.AllowanceRemaining, before.Purchased,
			map[string]int64{"batch": before.Used["batch"] + 100})
		// The hold of April's allowance and purchased credits, released:
		// every credit back where it came from.
		after := u.holdOf(HoldID("heldover-after"))
		if _, a, _, err = u.ledger.ReleaseHold(u.ctx, u.org, after.ID); err != nil {
			u.t.Fatal(err)
		}
		u.want("released", a, before.Balance-old.Amount, before.Held-old.Amount-after.Amount, before.AllowanceRemaining,
			before.Purchased, nil)
	}},
	{org: "holder", shows: func(t *testing.T, r orgRecord) {
		// A live hold, one captured in part, and one that expired unswept
		// (the fixture's first read swept it).
		states := map[string]string{}
		for _, h := range r.Holds {
			states[h.ID] = h.State
		}
		want := map[string]string{HoldID("holder-live"): HoldLive, HoldID("holder-part"): HoldCaptured, HoldID("holder-lapsed"): HoldExpired}
		if !reflect.DeepEqual(states, want) || r.Account.Held != 100 || r.Account.Balance != 450 {
			t.Fatalf("holder: %+v %+v", r.Account, r.Holds)
		}
	}, after: func(u *upgraded) {
		before := u.acct()
		live := u.holdOf(HoldID("holder-live"))
		// A hold's reference answers the same hold.
		h, _, repeat, err := u.ledger.CreateHold(u.ctx, HoldRequest{Org: u.org, Feature: "gen", Amount: 1, Reference: "holder-live"})
		if err != nil || !repeat || h.ID != live.ID || h.Amount != live.Amount {
			u.t.Fatalf("hold again: %+v %v %v", h, repeat, err)
		}
		// The partly captured hold answers its capture again.
		part := u.holdOf(HoldID("holder-part"))
		h, _, repeat, err = u.ledger.CaptureHold(u.ctx, u.org, part.ID, 1)
		if err != nil || !repeat || h.Captured != part.Captured {
			u.t.Fatalf("capture again: %+v %v %v", h, repeat, err)
		}
		// The live hold captured in part: 70 charged, 30 back.
		_, a, _, err := u.ledger.CaptureHold(u.ctx, u.org, live.ID, 70)
		if err != nil {
			u.t.Fatal(err)
		}
		u.want("captured", a, before.Balance-70, before.Held-live.Amount, before.AllowanceRemaining-70, before.Purchased,
			map[string]int64{"gen": before.Used["gen"] + 70})
		// The expired hold's capture is charged all the same, from the
		// available balance.
		_, a, _, err = u.ledger.CaptureHold(u.ctx, u.org, HoldID("holder-lapsed"), 5)
		if err != nil {
			u.t.Fatal(err)
		}
		u.want("expired hold captured", a, before.Balance-75, 0, before.AllowanceRemaining-75, before.Purchased,
			map[string]int64{"gen": before.Used["gen"] + 75})
		ev, err := u.ledger.Events(u.ctx, u.org, 1)
		if err != nil || len(ev) != 1 || ev[0].Kind != "capture" || ev[0].Ref != "hold:"+HoldID("holder-lapsed")+":expired" {
			u.t.Fatalf("expired hold's capture: %+v %v", ev, err)
		}
	}},
	{org: "leased", shows: func(t *testing.T, r orgRecord) {
		// A live lease that reported 30 credits, and one whose gateway
		// stopped reporting.
		if len(r.Holds) != 2 || r.Holds[0].ID != leasePrefix+goneLease || r.Holds[0].State != HoldUnreported || r.Holds[0].Amount != 100 ||
			r.Holds[0].LastReport == nil || r.Holds[1].State != HoldLive || r.Holds[1].Amount != 200 || r.Account.Used["rich-text"] != 30 {
			t.Fatalf("leased: %+v %+v", r.Account, r.Holds)
		}
	}, after: func(u *upgraded) {
		before := u.acct()
		live, gone := u.holdOf(leasePrefix+liveLease), u.holdOf(leasePrefix+goneLease)
		if _, _, _, err := u.ledger.ReleaseHold(u.ctx, u.org, live.ID); !errors.Is(err, ErrLease) {
			u.t.Fatalf("release of a live lease: %v, want ErrLease", err)
		}
		// The operator knows gw:gone is gone: its credits come back.
		h, a, _, err := u.ledger.ReleaseLease(u.ctx, u.org, gone.ID, "gateway decommissioned")
		if err != nil || h.State != HoldReleased {
			u.t.Fatalf("release lease: %+v %v", h, err)
		}
		u.want("lease released", a, before.Balance, before.Held-gone.Amount, before.AllowanceRemaining, before.Purchased, nil)
		// gw:live reports 20 more and gives the rest back.
		s := LeaseSync{Org: u.org, ID: liveLease, Seq: liveLeaseSeq + 1, TTL: 30 * time.Minute, Spent: map[string]int64{"rich-text": 20}}
		st, err := u.ledger.SyncLease(u.ctx, s)
		if err != nil || st.Repeat || st.Held != 0 || st.Balance != before.Balance-20 {
			u.t.Fatalf("lease report: %+v %v", st, err)
		}
		if st, err := u.ledger.SyncLease(u.ctx, s); err != nil || !st.Repeat || st.Held != 0 {
			u.t.Fatalf("lease report again: %+v %v", st, err)
		}
		// gw:gone comes back and reports 10 it spent: charged now.
		st, err = u.ledger.SyncLease(u.ctx, LeaseSync{Org: u.org, ID: goneLease, Seq: goneLeaseSeq + 1, TTL: time.Minute,
			Spent: map[string]int64{"rich-text": 10}})
		if err != nil || st.Held != 0 || st.Balance != before.Balance-30 {
			u.t.Fatalf("late report: %+v %v", st, err)
		}
		u.want("leases ended", u.acct(), before.Balance-30, 0, before.AllowanceRemaining-30, before.Purchased,
			map[string]int64{"rich-text": before.Used["rich-text"] + 30})
	}},
	{org: "calls", shows: func(t *testing.T, r orgRecord) {
		// A charge in flight, one settled, one kept: 500 - 40 - 12 - 7.
		if r.Account.Balance != 441 || r.Account.Used["rich-text"] != 59 {
			t.Fatalf("calls: %+v", r.Account)
		}
	}, after: func(u *upgraded) {
		before := u.acct()
		cost := u.chargeOf("call-inflight")
		res, err := u.ledger.Refund(u.ctx, u.org, "call-inflight")
		if err != nil || res.Delta != cost || res.Balance != before.Balance+cost {
			u.t.Fatalf("refund: %+v %v; want %d back", res, err, cost)
		}
		if res, err := u.ledger.Refund(u.ctx, u.org, "call-inflight"); err != nil || !res.Repeat || res.Balance != before.Balance+cost {
			u.t.Fatalf("second refund: %+v %v", res, err)
		}
		u.want("refunded", u.acct(), before.Balance+cost, 0, before.AllowanceRemaining+cost, before.Purchased,
			map[string]int64{"rich-text": before.Used["rich-text"] - cost})
		if res, err := u.ledger.Settle(u.ctx, u.org, "call-settled", 1); err != nil || !res.Repeat {
			u.t.Fatalf("settle again: %+v %v", res, err)
		}
		// The kept call, sent again with its key: a repeat with the kept
		// response, charged nothing.
		r, err := u.ledger.Charge(u.ctx, ChargeRequest{Org: u.org, Feature: "rich-text", Cost: 7, RequestID: keptRequest, Binding: keptBinding})
		if err != nil || !r.Replay || string(r.Kept) != keptResponse || r.Cost != u.chargeOf(keptRequest) {
			u.t.Fatalf("repeat of the kept call: %+v %v", r, err)
		}
		_, err = u.ledger.Charge(u.ctx, ChargeRequest{Org: u.org, Feature: "rich-text", Cost: 8, RequestID: keptRequest,
			Binding: Binding("POST", "/v1/chat", "rich-text", 8)})
		if !errors.Is(err, ErrMismatch) {
			u.t.Fatalf("another call with the kept key: %v, want ErrMismatch", err)
		}
		if a := u.acct(); a.Balance != before.Balance+cost {
			u.t.Fatalf("balance %d after the repeats, want %d", a.Balance, before.Balance+cost)
		}
	}},
	{org: "adjusted", shows: func(t *testing.T, r orgRecord) {
		// +250 purchased, -40 of the allowance, each with its reason.
		a := r.Account
		if a.AllowanceRemaining != 460 || a.Purchased != 250 || len(r.Events) != 3 || r.Events[0].Reason == "" || r.Events[1].Reason == "" {
			t.Fatalf("adjusted: %+v %+v", a, r.Events)
		}
	}, after: func(u *upgraded) {
		before := u.acct()
		a, applied, err := u.ledger.Adjust(u.ctx, u.org, 250, "goodwill credit for the March outage", "adj-1")
		if err != nil || applied || !reflect.DeepEqual(viewAccount(a), viewAccount(before)) {
			u.t.Fatalf("adjust again: applied %v, %v, %+v", applied, err, a)
		}
	}},
}

// nextRecharge is the first start of month after t.
func nextRecharge(t time.Time, month int) time.Time {
	n := time.Date(t.Year(), time.Month(month), 1, 0, 0, 0, 0, time.UTC)
	if !n.After(t) {
		n = n.AddDate(1, 0, 0)
	}
	return n
}

// checkAfter charges the org anew and recharges it, checking the figures
// against the account before each.
// checkGrantsRead checks what 0.4.0's account reads as in grants: its
// allowance the current period's allowance grant, its purchased credits the
// standing purchased grant with no expiry, a negative allowance debt, and
// nothing else.
func checkGrantsRead(e *env, org string, rec accountView) {
	e.t.Helper()
	grants, a, err := e.ledger.Grants(e.ctx, org)
	if err != nil {
		e.t.Fatal(err)
	}
	if a.Promotional != 0 || a.Rollover != 0 || a.NextExpiry != nil || a.Plan.Rollover != 0 {
		e.t.Fatalf("grants of 0.4.0's account: %+v", a)
	}
	if rec.Held == 0 && a.Debt != max(-rec.AllowanceRemaining, 0) {
		e.t.Fatalf("debt %d of an allowance of %d", a.Debt, rec.AllowanceRemaining)
	}
	byID := map[string]Grant{}
	for _, g := range grants {
		byID[g.ID] = g
	}
	if len(byID) != len(grants) || len(grants) > 2 {
		e.t.Fatalf("grants %+v: want the allowance and at most the standing purchased grant", grants)
	}
	al, ok := byID[AllowanceGrant]
	if !ok || al.Kind != KindAllowance || al.State != GrantLive || al.Amount != rec.Plan.Allowance ||
		al.Expires == nil || !al.Expires.Equal(rec.NextRecharge) || !al.Effective.Equal(rec.PeriodStart) {
		e.t.Fatalf("allowance grant %+v of %+v", al, rec)
	}
	p, ok := byID[PurchasedGrant]
	if rec.Purchased > 0 && (!ok || p.Kind != KindPurchased || p.Expires != nil || p.Remaining+p.Held != rec.Purchased) {
		e.t.Fatalf("purchased grant %+v, want %d purchased credits that never expire", p, rec.Purchased)
	}
	if rec.Purchased == 0 && ok {
		e.t.Fatalf("a purchased grant %+v of an org with none", p)
	}
}

func checkAfter(u *upgraded) {
	u.t.Helper()
	before := u.acct()
	if before.Held != 0 {
		u.t.Fatalf("%d credits still held; the case's after must end its holds", before.Held)
	}
	// A new charge takes the allowance first, then purchased credits,
	// then (overdraft) debt.
	const cost = 3
	r, err := u.ledger.Charge(u.ctx, ChargeRequest{Org: u.org, Feature: "rich-text", Cost: cost, RequestID: "after-upgrade",
		Overdraft: true, OverdraftLimit: NoLimit})
	if err != nil || !r.Charged || r.Balance != before.Balance-cost {
		u.t.Fatalf("new charge: %+v %v", r, err)
	}
	fa := min(cost, max(before.AllowanceRemaining, 0))
	fp := min(cost-fa, max(before.Purchased, 0))
	a := u.acct()
	u.want("charged", a, before.Balance-cost, 0, before.AllowanceRemaining-(cost-fp), before.Purchased-fp,
		map[string]int64{"rich-text": before.Used["rich-text"] + cost})

	// The recharge: the plan (the waiting one, if any) grants its
	// allowance, debt repaid first; purchased credits stay; usage starts
	// at zero.
	before = a
	last, err := u.ledger.Events(u.ctx, u.org, 1)
	if err != nil {
		u.t.Fatal(err)
	}
	plan := before.Plan
	if before.NextPlan != nil {
		plan = *before.NextPlan
	}
	u.clock.Set(before.NextRecharge.Add(time.Hour))
	a = u.acct()
	allowance := plan.Allowance + min(before.AllowanceRemaining, 0)
	u.want("recharged", a, allowance+before.Purchased, 0, allowance, before.Purchased, nil)
	if a.Plan != plan || a.NextPlan != nil || a.OwnPlan != before.OwnPlan || len(a.Used) != 0 ||
		!a.PeriodStart.Equal(before.NextRecharge) || !a.NextRecharge.Equal(nextRecharge(before.NextRecharge, plan.RechargeMonth)) {
		u.t.Fatalf("recharged: %+v, from %+v", a, before)
	}
	events, err := u.ledger.Events(u.ctx, u.org, 100)
	if err != nil {
		u.t.Fatal(err)
	}
	var delta int64
	for _, ev := range events {
		if ev.ID == last[0].ID {
			break
		}
		delta += ev.Delta
	}
	if delta != a.Balance-before.Balance {
		u.t.Fatalf("the recharge's events add %d, the balance moved %d", delta, a.Balance-before.Balance)
	}
	u.checkEvents(u.org)
}

// storedSeq is the number of the last event 0.4.0 wrote for org, before
// the fixture's keys were taken.
func storedSeq(t *testing.T, fx upgradeData, org string) int64 {
	t.Helper()
	for _, k := range fx.Keys {
		if k.Key == DefaultPrefix+":{"+org+"}:a" {
			n, err := strconv.ParseInt(k.Hash["seq"], 10, 64)
			if err != nil {
				t.Fatalf("%s: seq %q", k.Key, k.Hash["seq"])
			}
			return n
		}
	}
	t.Fatalf("the fixture has no account for %s", org)
	return 0
}

// sameHolds compares holds, but for times by Redis' clock that a read
// wrote (an expired hold's), which may differ by the few ms the test took.
func sameHolds(got, want []holdView) error {
	if len(got) != len(want) {
		return fmt.Errorf("%d holds, want %d", len(got), len(want))
	}
	near := func(a, b time.Time) bool { return a.Sub(b).Abs() < 5*time.Second }
	for i := range got {
		g, w := got[i], want[i]
		if !near(g.Expires, w.Expires) || (g.LastReport == nil) != (w.LastReport == nil) ||
			(g.LastReport != nil && !near(*g.LastReport, *w.LastReport)) {
			return fmt.Errorf("hold %s: %+v, want %+v", g.ID, g, w)
		}
		g.Expires, g.LastReport, w.Expires, w.LastReport = time.Time{}, nil, time.Time{}, nil
		if g != w {
			return fmt.Errorf("hold %s: %+v, want %+v", g.ID, g, w)
		}
	}
	return nil
}

// TestUpgrade restores the keys 0.4.0 left in Redis and checks that the
// ledger reads every org as 0.4.0 did, then captures and releases its
// holds, refunds its charges in flight, serves its kept responses, hears
// from its leases' gateways, charges it anew and recharges it, with the
// figures 0.4.0's data gives.
func TestUpgrade(t *testing.T) {
	if *writeUpgrade {
		writeUpgradeFixture(t)
	}
	fx := loadUpgradeFixture(t)
	for _, c := range upgradeCases {
		rec, ok := fx.Orgs[c.org]
		if !ok {
			t.Fatalf("the fixture has no org %s", c.org)
		}
		c.shows(t, rec)
	}
	srv := redistest.Start(t, redistest.Options{})
	mini := miniredis.RunT(t)
	for _, s := range []struct {
		name string
		rdb  redis.UniversalClient
	}{
		{"redis", mustClient(t, ClientOptions{URL: "redis://" + srv.Addr})},
		{"miniredis", redis.NewClient(&redis.Options{Addr: mini.Addr(), MaxRetries: -1, ContextTimeoutEnabled: true})},
	} {
		t.Cleanup(func() { s.rdb.Close() })
		t.Run(s.name, func(t *testing.T) {
			restoreKeys(upgradeEnv(t, s.rdb, fx.Now, fx.ServerMS), fx.Keys)
			for _, c := range upgradeCases {
				t.Run(c.org, func(t *testing.T) {
					u := &upgraded{env: upgradeEnv(t, s.rdb, fx.Now, fx.ServerMS), org: c.org, rec: fx.Orgs[c.org]}
					got := readOrg(u.env, c.org)
					if !reflect.DeepEqual(got.Account, u.rec.Account) {
						t.Fatalf("account\n%+v\nwant\n%+v", got.Account, u.rec.Account)
					}
					if err := sameHolds(got.Holds, u.rec.Holds); err != nil {
						t.Fatal(err)
					}
					checkGrantsRead(u.env, c.org, u.rec.Account)
					// Every event 0.4.0 wrote is there, unchanged and in
					// order; a later version may add its own between them.
					// (What the reads wrote, the end of an expired hold,
					// is checked by the figures.)
					rest := got.Events
					for _, w := range u.rec.Events {
						if n, _ := strconv.ParseInt(w.ID, 10, 64); n > storedSeq(t, fx, c.org) {
							continue
						}
						i := slices.Index(rest, w)
						if i < 0 {
							t.Fatalf("event %+v is gone, or out of order, in %+v", w, got.Events)
						}
						rest = rest[i+1:]
					}
					if !reflect.DeepEqual(got.Usage, u.rec.Usage) {
						t.Fatalf("usage %+v, want %+v", got.Usage, u.rec.Usage)
					}
					if c.after != nil {
						c.after(u)
					}
					checkAfter(u)
				})
			}
		})
	}
}
