package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/redis/go-redis/v9"
)

// scenario is one load shape, run on both routes.
type scenario struct {
	name, alias string // a and fast, b and slow, c and orgs
	title       string
	conns       int
	delay       time.Duration // the upstream's answer time
	orgs        int           // distinct orgs, in turn; 1 is one org
	// subjects, when above 0, runs the metered side on the budgeted route:
	// each call names the next of that many subjects, each with a budget.
	// Each round then also runs the unbudgeted metered route with the same
	// calls, so that the two compare within the same minute of the machine.
	subjects int
}

var scenarios = []scenario{
	{name: "a", alias: "fast", title: "64 connections, fast upstream, one org", conns: 64, orgs: 1},
	{name: "b", alias: "slow", title: "2,000 connections, upstream answers after 50 ms, one org", conns: 2000, delay: 50 * time.Millisecond, orgs: 1},
	{name: "c", alias: "orgs", title: "64 connections, fast upstream, 100,000 orgs in turn", conns: 64, orgs: 100_000},
	{name: "d", alias: "budgets", title: "64 connections, fast upstream, one org, 100 subjects with budgets", conns: 64, orgs: 1, subjects: 100},
}

// routeRun is one wrk run on one route.
type routeRun struct {
	round int
	route string // plain, metered, or (scenario d) unbudgeted
	res   wrkResult
	// caddyCPU and redisCPU are the CPU time each process used per
	// request served in the run; zero when unknown.
	caddyCPU, redisCPU time.Duration
	// perRun is the requests served per script run in Redis during the
	// run (a batch of charges is one run, and so is a lease's sync): 0 on
	// the plain route, or when there was none.
	perRun float64
}

// scenarioResult is a scenario's rounds and what they add up to.
type scenarioResult struct {
	sc   scenario
	runs []routeRun
	// Ratio is the median over rounds of metered/plain requests/s; each
	// round runs both routes back to back, so a drift in the machine's
	// speed touches both sides of a round's ratio alike.
	Ratio  float64
	ratios []float64
	// Beside is, for a budgeted scenario, the median over rounds of the
	// unbudgeted metered route's requests/s over plain's, and Gap the
	// median over rounds of Beside's ratio less Ratio's.
	Beside        float64
	Gap           float64
	besides, gaps []float64
	// P99Added is the median p99 of the metered runs minus that of the
	// plain runs.
	P99Added                time.Duration
	p50Plain, p50Metered    time.Duration
	p99Plain, p99Metered    time.Duration
	rpsPlain, rpsMetered    float64
	non2xx, socketErrors    int64
	meteredServed, charged  int64
	ledgerChecked, ledgerOK bool
	// The median CPU time per request of Caddy and of Redis, per route.
	caddyPlain, caddyMetered time.Duration
	redisPlain, redisMetered time.Duration
	// perRun is the median requests per script run of the metered runs.
	perRun float64
}

// loadEnv is what the load scenarios run against.
type loadEnv struct {
	wrk string
	pin *pinning // nil: not pinned
	// profiles is where Caddy's CPU profiles go; empty for none.
	profiles string
	gw       *gateway
	ledger   *meter.Ledger
	dir      string
	threads  int
	rounds   int
	d        time.Duration
	warmup   time.Duration
	// The processes whose CPU time per request is measured.
	caddyPid, redisPid int
	// rdb is the Redis the gateway uses, whose script runs are counted.
	rdb redis.UniversalClient
}

// scriptRuns returns how many scripts Redis has run (EVALSHA and EVAL)
// since it started, from INFO commandstats.
func (e *loadEnv) scriptRuns(ctx context.Context) (int64, error) {
	info, err := e.rdb.Info(ctx, "commandstats").Result()
	if err != nil {
		return 0, err
	}
	var runs int64
	for line := range strings.Lines(info) {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
		if name != "cmdstat_evalsha" && name != "cmdstat_eval" || !ok {
			continue
		}
		var calls int64
		if _, err := fmt.Sscanf(rest, "calls=%d,", &calls); err != nil {
			return 0, fmt.Errorf("INFO commandstats %q: %w", line, err)
		}
		runs += calls
	}
	return runs, nil
}

// cpuPerRequest runs f and returns the CPU time Caddy and Redis used
// meanwhile, each divided by n(), the requests f served.
func (e *loadEnv) cpuPerRequest(f func() error, n func() int64) (caddy, redis time.Duration, err error) {
	c0, okC := cpuTime(e.caddyPid)
	r0, okR := cpuTime(e.redisPid)
	if err := f(); err != nil {
		return 0, 0, err
	}
	c1, okC1 := cpuTime(e.caddyPid)
	r1, okR1 := cpuTime(e.redisPid)
	if reqs := n(); reqs > 0 && okC && okC1 && okR && okR1 {
		caddy, redis = (c1-c0)/time.Duration(reqs), (r1-r0)/time.Duration(reqs)
	}
	return caddy, redis, nil
}

// runScenario warms both routes up, then runs rounds of plain and metered
// back to back (a budgeted scenario's also with its calls unbudgeted), each
// going first in turn, and prints the table.
func (e *loadEnv) runScenario(ctx context.Context, w io.Writer, sc scenario) (*scenarioResult, error) {
	script, err := writeScript(e.dir, sc)
	if err != nil {
		return nil, err
	}
	r := &scenarioResult{sc: sc}
	fmt.Fprintf(w, "\n== scenario %s (%s): %s ==\n", sc.name, sc.alias, sc.title)
	if err := e.budgets(ctx, w, sc); err != nil {
		return nil, err
	}
	if err := e.orgs(ctx, w, sc); err != nil {
		return nil, err
	}

	usedBefore, err := e.used(ctx, sc)
	if err != nil {
		return nil, err
	}
	run := func(route string, d time.Duration) (wrkResult, string, error) {
		path := plainPath
		switch {
		case route == "metered" && sc.subjects > 0:
			path = budgetedPath
		case route == "metered", route == "unbudgeted":
			path = meteredPath
		}
		res, line, err := runWrk(ctx, e.pin, e.wrk, script, e.gw.base+path, e.threads, sc.conns, d)
		if err == nil && route != "plain" {
			r.meteredServed += res.Requests
		}
		return res, line, err
	}
	routes := []string{"plain", "metered"}
	if sc.subjects > 0 {
		routes = append(routes, "unbudgeted")
	}
	if e.warmup > 0 {
		for _, route := range routes {
			if _, _, err := run(route, e.warmup); err != nil {
				return nil, fmt.Errorf("warm-up: %w", err)
			}
		}
		fmt.Fprintf(w, "warm-up: %v per route, not counted\n", e.warmup)
	}
	fmt.Fprintf(w, "%-6s %-10s %10s %10s %10s %8s %8s %10s %10s %8s\n", "round", "route", "requests/s", "p50", "p99", "non-2xx", "sockerr",
		"caddy-cpu", "redis-cpu", "per-run")
	for round := 1; round <= e.rounds; round++ {
		// Each route goes first in turn.
		k := (round - 1) % len(routes)
		order := append(slices.Clone(routes[k:]), routes[:k]...)
		rps := map[string]float64{}
		for _, route := range order {
			var res wrkResult
			var line string
			runs0, err := e.scriptRuns(ctx)
			if err != nil {
				return nil, err
			}
			caddyCPU, redisCPU, err := e.cpuPerRequest(func() (err error) {
				if round == 1 && e.profiles != "" && e.d >= 2*time.Second {
					// The profile leaves out the run's first and last half
					// second, while wrk's connections open and close.
					path := filepath.Join(e.profiles, "caddy-"+sc.name+"-"+route+".pprof")
					profiled := make(chan error, 1)
					go func() {
						select {
						case <-time.After(500 * time.Millisecond):
							profiled <- e.gw.profile(ctx, e.d-time.Second, path)
						case <-ctx.Done():
							profiled <- ctx.Err()
						}
					}()
					defer func() {
						if perr := <-profiled; err == nil && perr != nil {
							err = perr
						} else if perr == nil {
							fmt.Fprintf(w, "CPU profile of Caddy: %s\n", path)
						}
					}()
				}
				res, line, err = run(route, e.d)
				return err
			}, func() int64 { return res.Requests })
			if err != nil {
				return nil, err
			}
			runs1, err := e.scriptRuns(ctx)
			if err != nil {
				return nil, err
			}
			var perRun float64
			if runs1 > runs0 && route != "plain" {
				perRun = float64(res.Requests) / float64(runs1-runs0)
			}
			if round == 1 && route == order[0] {
				fmt.Fprintf(w, "# %s\n", strings.Replace(line, e.gw.base+plainPath, e.gw.base+"/{plain,metered}/v1/generate", 1))
			}
			r.runs = append(r.runs, routeRun{round: round, route: route, res: res, caddyCPU: caddyCPU, redisCPU: redisCPU,
				perRun: perRun})
			r.non2xx += res.Non2xx
			r.socketErrors += res.SocketErrors
			rps[route] = res.RPS
			fmt.Fprintf(w, "%-6d %-10s %10.1f %10s %10s %8d %8d %10s %10s %8s\n", round, route, res.RPS, ms(res.P50), ms(res.P99), res.Non2xx,
				res.SocketErrors, us(caddyCPU), us(redisCPU), perRunString(perRun))
		}
		r.ratios = append(r.ratios, rps["metered"]/rps["plain"])
		if sc.subjects > 0 {
			beside := rps["unbudgeted"] / rps["plain"]
			r.besides = append(r.besides, beside)
			r.gaps = append(r.gaps, beside-r.ratios[len(r.ratios)-1])
		}
	}

	var p50s, p99s, rpss, caddys, rediss, perRuns [3][]float64 // plain, metered, unbudgeted
	for _, run := range r.runs {
		i := slices.Index(routes, run.route)
		p50s[i] = append(p50s[i], float64(run.res.P50))
		p99s[i] = append(p99s[i], float64(run.res.P99))
		rpss[i] = append(rpss[i], run.res.RPS)
		caddys[i] = append(caddys[i], float64(run.caddyCPU))
		rediss[i] = append(rediss[i], float64(run.redisCPU))
		perRuns[i] = append(perRuns[i], run.perRun)
	}
	r.perRun = median(perRuns[1])
	r.caddyPlain, r.caddyMetered = time.Duration(median(caddys[0])), time.Duration(median(caddys[1]))
	r.redisPlain, r.redisMetered = time.Duration(median(rediss[0])), time.Duration(median(rediss[1]))
	r.Ratio = median(r.ratios)
	r.rpsPlain, r.rpsMetered = median(rpss[0]), median(rpss[1])
	r.p50Plain, r.p50Metered = time.Duration(median(p50s[0])), time.Duration(median(p50s[1]))
	r.p99Plain, r.p99Metered = time.Duration(median(p99s[0])), time.Duration(median(p99s[1]))
	r.P99Added = r.p99Metered - r.p99Plain
	fmt.Fprintf(w, "median plain   %12.1f %10s %10s %17s %10s %10s\n", r.rpsPlain, ms(r.p50Plain), ms(r.p99Plain), "",
		us(r.caddyPlain), us(r.redisPlain))
	fmt.Fprintf(w, "median metered %12.1f %10s %10s %17s %10s %10s %8s\n", r.rpsMetered, ms(r.p50Metered), ms(r.p99Metered), "",
		us(r.caddyMetered), us(r.redisMetered), perRunString(r.perRun))
	if sc.subjects > 0 {
		fmt.Fprintf(w, "median unbudgeted %9.1f %10s %10s %17s %10s %10s\n", median(rpss[2]), ms(time.Duration(median(p50s[2]))),
			ms(time.Duration(median(p99s[2]))), "", us(time.Duration(median(caddys[2]))), us(time.Duration(median(rediss[2]))))
	}
	per := make([]string, len(r.ratios))
	for i, x := range r.ratios {
		per[i] = fmt.Sprintf("%.3f", x)
	}
	fmt.Fprintf(w, "ratio metered/plain requests/s: %.3f (median of %d rounds: %s)\n", r.Ratio, len(r.ratios), strings.Join(per, " "))
	if sc.subjects > 0 {
		r.Beside, r.Gap = median(r.besides), median(r.gaps)
		fmt.Fprintf(w, "beside it, unbudgeted/plain requests/s: %.3f (median of %d rounds: %s)\n", r.Beside, len(r.besides), floats(r.besides))
		fmt.Fprintf(w, "unbudgeted less budgeted ratio: %+.3f (median of %d rounds: %s)\n", r.Gap, len(r.gaps), floats(r.gaps))
	}
	fmt.Fprintf(w, "p99 added by metering: %s (median p99 metered %s - median p99 plain %s)\n", signedMS(r.P99Added), ms(r.p99Metered), ms(r.p99Plain))
	if r.non2xx > 0 {
		fmt.Fprintf(w, "INVALID: %d responses with a status of 400 or more; the figures are not of successful calls\n", r.non2xx)
	}
	if r.socketErrors > 0 {
		fmt.Fprintf(w, "note: %d socket errors (connect, read, write, timeout) in wrk\n", r.socketErrors)
	}
	if err := e.checkLedger(ctx, w, sc, r, usedBefore); err != nil {
		return nil, err
	}
	return r, nil
}

// budgets gives each of sc's subjects a budget no call of the run can
// spend, so that the budgeted route checks and counts each call against
// one and never refuses.
func (e *loadEnv) budgets(ctx context.Context, w io.Writer, sc scenario) error {
	for i := range sc.subjects {
		if _, err := e.ledger.SetBudget(ctx, "bench-org", subjectName(i), meter.BudgetLimit{Limit: meter.MaxAmount, Window: meter.WindowPeriod}); err != nil {
			return fmt.Errorf("setting the budgets: %w", err)
		}
	}
	if sc.subjects > 0 {
		fmt.Fprintf(w, "%d subjects, each with a budget of its own\n", sc.subjects)
	}
	return nil
}

// orgs makes each org of a many-orgs scenario by one charge through the
// ledger, as its first call would: the scenario measures orgs that call
// now and then, and an org's first charge, which makes its account, is
// once in its life.
func (e *loadEnv) orgs(ctx context.Context, w io.Writer, sc scenario) error {
	if sc.orgs <= 1 {
		return nil
	}
	start := time.Now()
	err := parallel(ctx, 32, sc.orgs, func(i int) error {
		_, err := e.ledger.Charge(ctx, meter.ChargeRequest{Org: wrkOrgName(i), Feature: "bench", Cost: 1,
			RequestID: fmt.Sprintf("g:bench-org-%d", i)})
		return err
	})
	if err != nil {
		return fmt.Errorf("making the orgs: %w", err)
	}
	fmt.Fprintf(w, "%d orgs made, each by one charge, in %v\n", sc.orgs, time.Since(start).Round(time.Second/10))
	return nil
}

// subjectName is the budgeted route's subject i, as the wrk script names it.
func subjectName(i int) string { return fmt.Sprintf("user-%03d", i) }

// used returns the credits the one org of sc has used, or 0 for a
// many-orgs scenario.
func (e *loadEnv) used(ctx context.Context, sc scenario) (int64, error) {
	if sc.orgs > 1 {
		return 0, nil
	}
	acct, err := e.ledger.Balance(ctx, "bench-org")
	if err != nil {
		return 0, fmt.Errorf("reading the ledger: %w", err)
	}
	return acct.Used["bench"], nil
}

// ledgerWait bounds how long the ledger may take to show the last charges.
const ledgerWait = 5 * time.Second

// checkLedger makes sure every metered response was charged: a route that
// answered without charging would make metering look free. Credits may run
// ahead of responses (calls still in flight when wrk stopped), never
// behind.
func (e *loadEnv) checkLedger(ctx context.Context, w io.Writer, sc scenario, r *scenarioResult, before int64) error {
	if sc.orgs > 1 {
		fmt.Fprintf(w, "ledger check: skipped (%d orgs)\n", sc.orgs)
		return nil
	}
	r.ledgerChecked = true
	deadline := time.Now().Add(ledgerWait)
	for {
		after, err := e.used(ctx, sc)
		if err != nil {
			return err
		}
		r.charged = after - before
		if r.charged >= r.meteredServed {
			r.ledgerOK = true
			fmt.Fprintf(w, "ledger check: %d credits charged for %d metered responses: ok\n", r.charged, r.meteredServed)
			return nil
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(w, "INVALID: ledger check: %d credits charged for %d metered responses\n", r.charged, r.meteredServed)
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// valid reports whether the scenario's figures are of metered, successful
// calls.
func (r *scenarioResult) valid() bool {
	return r.non2xx == 0 && (!r.ledgerChecked || r.ledgerOK) && r.Ratio > 0 && !math.IsInf(r.Ratio, 0) && !math.IsNaN(r.Ratio)
}

// floats prints xs to three decimals, separated by spaces.
func floats(xs []float64) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = fmt.Sprintf("%.3f", x)
	}
	return strings.Join(s, " ")
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// ms formats d in milliseconds, as wrk's latencies compare best.
func ms(d time.Duration) string {
	return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
}

// perRunString prints requests per script run, "-" for none.
func perRunString(x float64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", x)
}

// us prints a CPU time per request in µs, or "-" when it is unknown.
func us(d time.Duration) string {
	if d <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.0fµs", float64(d)/float64(time.Microsecond))
}

func signedMS(d time.Duration) string {
	if d >= 0 {
		return "+" + ms(d)
	}
	return ms(d)
}
