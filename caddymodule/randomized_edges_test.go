package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/faultproxy"
	"github.com/creditsgw/caddy-credits/meter"
)

// The edges of the request path the randomized mix runs into, besides the
// cut replies, each drawn from the mix's seeded source and each run during
// the middle three fifths of the calls.

// randomizedEdgesEnv names the environment variable that picks the edges
// to run: a comma-separated list of rndEdgeNames, or "none"; all by
// default. The edges' draws are made either way, so that a seed replays the
// same mix with fewer edges.
const randomizedEdgesEnv = "RANDOMIZED_PATH_EDGES"

// rndMiddle is how long the middle three fifths of the calls are spread
// over, so that an edge of a few seconds meets calls before, during and
// after it.
const rndMiddle = 8 * time.Second

// rndEdges switches the edges on.
type rndEdges struct {
	Reload    bool // configs reloaded with calls in flight, on both gateways
	Leave     bool // clients of a streamed usage openai route that leave after the first event
	Partition bool // one gateway's connections to Redis refused for a few seconds
	OOM       bool // Redis at maxmemory with noeviction for a second or two
	Corrupt   bool // one or two orgs get a ledger key of the wrong type
	Midnight  bool // the gateways' UTC midnight falls during the calls
}

var rndEdgeNames = []string{"reload", "leave", "partition", "oom", "corrupt", "midnight"}

func (e *rndEdges) fields() []*bool {
	return []*bool{&e.Reload, &e.Leave, &e.Partition, &e.OOM, &e.Corrupt, &e.Midnight}
}

func (e rndEdges) String() string {
	var on []string
	for i, f := range e.fields() {
		if *f {
			on = append(on, rndEdgeNames[i])
		}
	}
	if len(on) == 0 {
		return "none"
	}
	return strings.Join(on, ",")
}

// randomizedEdges reads the edges from the environment.
func randomizedEdges(t *testing.T) rndEdges {
	t.Helper()
	var e rndEdges
	s, set := os.LookupEnv(randomizedEdgesEnv)
	if !set {
		for _, f := range e.fields() {
			*f = true
		}
		return e
	}
	for name := range strings.SplitSeq(s, ",") {
		name = strings.TrimSpace(name)
		i := slices.Index(rndEdgeNames, name)
		switch {
		case name == "none" || name == "":
		case i < 0:
			t.Fatalf("%s=%q: %q is none of %v", randomizedEdgesEnv, s, name, rndEdgeNames)
		default:
			*e.fields()[i] = true
		}
	}
	return e
}

// rndCorruption is an org whose ledger key is replaced by one of the wrong
// type.
type rndCorruption struct {
	org string
	// calls: its call log becomes a hash; otherwise its account becomes a
	// string.
	calls bool
}

func (c rndCorruption) key() string {
	keys, _ := meter.NewKeys("")
	if c.calls {
		return keys.Calls(c.org)
	}
	return keys.Account(c.org)
}

func (c rndCorruption) wrongType() string {
	if c.calls {
		return "hash"
	}
	return "string"
}

// rndEdgePlan is when and how each edge happens, by call index.
type rndEdgePlan struct {
	reloadAt     [2][]int // the calls before which each gateway is reloaded
	partitioned  int      // the gateway cut off
	partitionAt  int
	partitionFor time.Duration
	oomAt        int
	oomFor       time.Duration
	corruptAt    int
	corrupt      []rndCorruption
	// midnightIn is how long after the gateways start their clocks reach
	// UTC midnight.
	midnightIn time.Duration
}

// planEdges draws the edges for calls from..to of the mix; corruptible are
// the orgs that may be corrupted.
func planEdges(rng *rand.Rand, from, to int, corruptible []string) rndEdgePlan {
	between := func(lo, hi float64) int {
		n := to - from
		return from + int(lo*float64(n)) + rng.IntN(max(1, int((hi-lo)*float64(n))))
	}
	var p rndEdgePlan
	for g := range p.reloadAt {
		for range 2 {
			p.reloadAt[g] = append(p.reloadAt[g], between(0.05, 0.9))
		}
		slices.Sort(p.reloadAt[g])
	}
	p.partitioned = rng.IntN(2)
	p.partitionAt = between(0.1, 0.5)
	p.partitionFor = time.Duration(2000+rng.IntN(1500)) * time.Millisecond
	p.oomAt = between(0.3, 0.7)
	p.oomFor = time.Duration(1000+rng.IntN(1000)) * time.Millisecond
	p.corruptAt = between(0.2, 0.8)
	n := 1 + rng.IntN(len(corruptible))
	for _, i := range rng.Perm(len(corruptible))[:n] {
		p.corrupt = append(p.corrupt, rndCorruption{org: corruptible[i], calls: rng.IntN(2) == 0})
	}
	// The gateways take a second or two to start and warm up; the middle
	// of the calls begins shortly after.
	p.midnightIn = time.Duration(4000+rng.IntN(3000)) * time.Millisecond
	return p
}

// rndMidnight returns the clock offset that brings the gateways' clocks to
// UTC midnight in, and that midnight. A midnight that starts a month is
// skipped, so that no plan's period ends during the calls.
func rndMidnight(in time.Duration) (time.Duration, time.Time) {
	at := time.Now().UTC().Add(in)
	midnight := at.Truncate(24 * time.Hour).Add(24 * time.Hour)
	if midnight.Day() == 1 {
		midnight = midnight.Add(24 * time.Hour)
	}
	return midnight.Sub(at), midnight
}

// rndReloader reloads one gateway's config, one reload at a time, off the
// path of the calls: a reload returns once the old config's calls are done.
type rndReloader struct {
	name   string
	reload func() error
	ch     chan int
	done   chan struct{}

	mu      sync.Mutex
	took    []time.Duration
	errs    []error
	windows [][2]time.Time // when each reload began and ended
}

// during reports whether a reload ran at some time between from and to.
func (r *rndReloader) during(from, to time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, w := range r.windows {
		if w[0].Before(to) && w[1].After(from) {
			return true
		}
	}
	return false
}

func startReloader(name string, reload func() error) *rndReloader {
	r := &rndReloader{name: name, reload: reload, ch: make(chan int, 8), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		for range r.ch {
			began := time.Now()
			err := r.reload()
			r.mu.Lock()
			r.took = append(r.took, time.Since(began).Round(time.Millisecond))
			r.windows = append(r.windows, [2]time.Time{began, time.Now()})
			if err != nil {
				r.errs = append(r.errs, err)
			}
			r.mu.Unlock()
		}
	}()
	return r
}

// stop waits for the reloads asked for, and reports their failures.
func (r *rndReloader) stop(t *testing.T) {
	t.Helper()
	close(r.ch)
	<-r.done
	for _, err := range r.errs {
		t.Errorf("reloading %s: %v", r.name, err)
	}
	if len(r.took) > 0 {
		t.Logf("%s reloaded %d times, taking %v", r.name, len(r.took), r.took)
	}
}

// inProcessReload loads cfg again into this process' Caddy.
func inProcessReload(cfg string) (func() error, error) {
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err != nil {
		return nil, err
	}
	return func() error { return caddy.Load(cfgJSON, true) }, nil
}

// processReload posts cfg to the caddy process' admin /load at adminAddr,
// forced, since the config is the same.
func processReload(client *http.Client, adminAddr, cfg string) func() error {
	return func() error {
		req, err := http.NewRequest(http.MethodPost, "http://"+adminAddr+"/load", strings.NewReader(cfg))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "text/caddyfile")
		req.Header.Set("Cache-Control", "must-revalidate")
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%d %s", resp.StatusCode, body)
		}
		return nil
	}
}

// rndPartition cuts a gateway off from Redis for a while.
type rndPartition struct {
	done chan struct{}
}

func startPartition(p *faultproxy.Proxy, d time.Duration) *rndPartition {
	part := &rndPartition{done: make(chan struct{})}
	p.Refuse(true)
	time.AfterFunc(d, func() {
		p.Refuse(false)
		close(part.done)
	})
	return part
}

// rndOOM puts Redis at its memory limit, with noeviction, for a while.
type rndOOM struct {
	done    chan struct{}
	limit   int64
	refused int64 // the OOM errors Redis answered meanwhile
	err     error
}

func startOOM(rdb *redis.Client, d time.Duration) *rndOOM {
	o := &rndOOM{done: make(chan struct{})}
	ctx := context.Background()
	stat := func(section, field string) int64 {
		info, err := rdb.Info(ctx, section).Result()
		if err != nil {
			o.err = err
			return 0
		}
		for line := range strings.SplitSeq(info, "\r\n") {
			if v, ok := strings.CutPrefix(line, field+":"); ok {
				// errorstat_OOM:count=n
				n, _ := strconv.ParseInt(strings.TrimPrefix(v, "count="), 10, 64)
				return n
			}
		}
		return 0
	}
	go func() {
		defer close(o.done)
		if o.err = rdb.ConfigSet(ctx, "maxmemory-policy", "noeviction").Err(); o.err != nil {
			return
		}
		rejected := stat("errorstats", "errorstat_OOM")
		o.limit = stat("memory", "used_memory") + 1024
		if o.err = rdb.ConfigSet(ctx, "maxmemory", strconv.FormatInt(o.limit, 10)).Err(); o.err != nil {
			return
		}
		time.Sleep(d) // the edge's length, not a wait for a condition
		if o.err = rdb.ConfigSet(ctx, "maxmemory", "0").Err(); o.err != nil {
			return
		}
		o.refused = stat("errorstats", "errorstat_OOM") - rejected
	}()
	return o
}

// corrupt replaces c's key by one of the wrong type.
func (c rndCorruption) apply(ctx context.Context, rdb *redis.Client) error {
	_, err := rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.Del(ctx, c.key())
		if c.calls {
			p.HSet(ctx, c.key(), "corrupt", "yes")
		} else {
			p.Set(ctx, c.key(), "corrupt", 0)
		}
		return nil
	})
	return err
}

// rndSSE is the answer of the streamed route to a call whose usage is
// tokens (a credit a token): three text events, the usage, and the end.
func rndSSE(tokens int64) []string {
	const text = `data: {"model":"gpt-4o","choices":[{"delta":{"content":%q}}],"usage":null}` + "\n\n"
	return []string{
		fmt.Sprintf(text, "some "),
		fmt.Sprintf(text, "streamed "),
		fmt.Sprintf(text, "words"),
		fmt.Sprintf(`data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":%d}}`+"\n\n", tokens-1),
		"data: [DONE]\n\n",
	}
}

// rndSSEUsage is the index of rndSSE's usage event.
const rndSSEUsage = 3

// rndChatSite is the streamed route, with a hold of 3 and a credit a token.
const rndChatSite = `route /chat/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature chat
			cost 3
			usage openai
			price gpt-4o* 1000000 1000000
		}
		reverse_proxy {UPSTREAM} {
			flush_interval -1
		}
	}`

// dayUsage sums org's usage per day, by feature, over the days around
// midnight.
func dayUsage(t *testing.T, g *gateway, org string, midnight time.Time) (sum map[string]int64, days []meter.DayUsage) {
	t.Helper()
	r := g.admin(http.MethodGet, fmt.Sprintf("/orgs/%s/usage?from=%s&to=%s", org,
		midnight.AddDate(0, 0, -2).Format(time.DateOnly), midnight.AddDate(0, 0, 1).Format(time.DateOnly)), "")
	wantStatus(t, r, http.StatusOK)
	var body struct {
		Days []meter.DayUsage `json:"days"`
	}
	if err := json.Unmarshal(r.body, &body); err != nil {
		t.Fatalf("usage of %s: %v", org, err)
	}
	sum = map[string]int64{}
	for _, d := range body.Days {
		for f, n := range d.Used {
			sum[f] += n
		}
	}
	return sum, body.Days
}
