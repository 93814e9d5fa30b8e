// Command bench is the load benchmark of the credits gateway: the same
// Caddy binary serves a metered route (credits + reverse_proxy) and a plain
// one (reverse_proxy only) in front of the same upstream, and wrk drives them
// alternately; the figure that matters is the median ratio of their
// requests/s. It also measures Redis memory per org.
//
//	go run ./bench                          # scenarios a to d: 5 rounds of 10s per route
//	go run ./bench -scenario a -rounds 3    # one scenario
//	go run ./bench -memory -orgs 1000000    # Redis bytes per org
//	go run ./bench -quick                   # everything, briefly (CI)
//
// It needs wrk and redis-server on PATH (Debian: apt-get install wrk
// redis-server) and the go command; it builds ./cmd/caddy itself. Every
// process it starts is killed when it ends, also on an error or Ctrl-C.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/creditsgw/caddy-credits/internal/redisproc"
	"github.com/creditsgw/caddy-credits/meter"
)

// options are the benchmark's flags.
type options struct {
	scenarios []scenario
	rounds    int
	duration  time.Duration
	warmup    time.Duration
	threads   int
	memory    bool // the memory measurement instead of the load scenarios
	orgs      int
	workers   int
	quick     bool // both, briefly
	// pinRedis runs redis-server on a CPU of its own and everything
	// else on the others.
	pinRedis bool
	// profiles, when set, is the directory for Caddy's CPU profiles.
	profiles string
	// creditsOptions are extra lines for the credits global option, to
	// measure a setting such as lease.
	creditsOptions []string
}

// report is what a run measured.
type report struct {
	scenarios []*scenarioResult
	memory    *memoryResult
}

// fileLimit is the RLIMIT_NOFILE the children get: 2,000 client connections
// and as many upstream ones, with room to spare.
const fileLimit = 65536

func main() {
	o, err := parseFlags(os.Args[1:], os.Stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	_, err = run(ctx, o, os.Stdout)
	interrupted := ctx.Err() != nil
	stop()
	if interrupted {
		fmt.Fprintln(os.Stderr, "bench: interrupted; every process it started is stopped")
		os.Exit(130)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	scenarioFlag := fs.String("scenario", "all", "scenarios to run, comma-separated: a (fast), b (slow), c (orgs), d (budgets), or all")
	rounds := fs.Int("rounds", 5, "alternating rounds per scenario; each runs both routes")
	duration := fs.Duration("duration", 10*time.Second, "length of one wrk run, whole seconds")
	warmup := fs.Duration("warmup", 2*time.Second, "unmeasured wrk run per route before the rounds, whole seconds; 0 for none")
	threads := fs.Int("threads", 2, "wrk threads (wrk -t)")
	memory := fs.Bool("memory", false, "measure Redis memory per org instead of the load scenarios")
	orgs := fs.Int("orgs", 1_000_000, "orgs to create for -memory")
	workers := fs.Int("workers", 32, "concurrent ledger calls for -memory")
	var creditsOptions []string
	fs.Func("credits-option", "an extra line for the Caddyfile's credits global option, e.g. 'lease off'; repeatable", func(v string) error {
		if strings.ContainsAny(v, "{}\n") {
			return errors.New("one line without braces")
		}
		creditsOptions = append(creditsOptions, v)
		return nil
	})
	pinRedis := fs.Bool("pin-redis", false, "run redis-server on the first CPU this process may use and Caddy, the upstream and wrk on the others (taskset; Linux), as production gives Redis cores of its own")
	profiles := fs.String("profile", "", "write a CPU profile of Caddy during each scenario's first round of each route to this directory: caddy-<scenario>-<route>.pprof (go tool pprof)")
	quick := fs.Bool("quick", false, "run everything briefly: 1 round of 1s per route per scenario, no warm-up, and -memory with 1000 orgs")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	if fs.NArg() > 0 {
		return options{}, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	o := options{rounds: *rounds, duration: *duration, warmup: *warmup, threads: *threads,
		memory: *memory, orgs: *orgs, workers: *workers, quick: *quick, creditsOptions: creditsOptions,
		pinRedis: *pinRedis, profiles: *profiles}
	if o.quick {
		// Flags given explicitly win over -quick's.
		if !set["rounds"] {
			o.rounds = 1
		}
		if !set["duration"] {
			o.duration = time.Second
		}
		if !set["warmup"] {
			o.warmup = 0
		}
		if !set["orgs"] {
			o.orgs = 1000
		}
	}
	for _, name := range strings.Split(*scenarioFlag, ",") {
		name = strings.TrimSpace(name)
		found := false
		for _, sc := range scenarios {
			if name == "all" || name == sc.name || name == sc.alias {
				o.scenarios = append(o.scenarios, sc)
				found = true
			}
		}
		if !found {
			return options{}, fmt.Errorf("-scenario %q: want a (fast), b (slow), c (orgs), d (budgets) or all", name)
		}
	}
	switch {
	case o.rounds < 1:
		return options{}, fmt.Errorf("-rounds %d: must be at least 1", o.rounds)
	case o.duration < time.Second || o.duration%time.Second != 0:
		return options{}, fmt.Errorf("-duration %v: must be whole seconds, at least 1s (wrk's unit)", o.duration)
	case o.warmup < 0 || o.warmup%time.Second != 0:
		return options{}, fmt.Errorf("-warmup %v: must be whole seconds", o.warmup)
	case o.threads < 1:
		return options{}, fmt.Errorf("-threads %d: must be at least 1", o.threads)
	case o.orgs < 1:
		return options{}, fmt.Errorf("-orgs %d: must be at least 1", o.orgs)
	case o.workers < 1:
		return options{}, fmt.Errorf("-workers %d: must be at least 1", o.workers)
	}
	for _, sc := range o.scenarios {
		if sc.conns < o.threads {
			return options{}, fmt.Errorf("-threads %d: more than scenario %s's %d connections", o.threads, sc.name, sc.conns)
		}
	}
	return o, nil
}

// run runs the benchmark and writes its report to w. Every process it
// starts is gone when it returns.
func run(ctx context.Context, o options, w io.Writer) (rep *report, err error) {
	dir, err := os.MkdirTemp("", "credits-bench-")
	if err != nil {
		return nil, err
	}
	ps := &procs{dir: dir}
	defer func() {
		err = errors.Join(err, ps.stopAll())
		_ = os.RemoveAll(dir)
	}()
	rep = &report{}
	if o.pinRedis {
		allowed, err := cpusAllowed(0)
		if err != nil {
			return rep, fmt.Errorf("-pin-redis: %w", err)
		}
		if ps.pin, err = newPinning(allowed); err != nil {
			return rep, err
		}
	}

	fmt.Fprintf(w, "machine: %d CPUs (%s), GOOS/GOARCH %s/%s\n", runtime.NumCPU(), cpuModel(), runtime.GOOS, runtime.GOARCH)
	if la, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Fprintf(w, "load average at start: %s\n", strings.Join(strings.Fields(string(la))[:3], " "))
	}
	if o.quick || !o.memory {
		if err := runLoad(ctx, o, w, ps, rep); err != nil {
			return rep, err
		}
	}
	if o.quick || o.memory {
		busy := 1_000_000
		if o.quick {
			busy = 2000
		}
		if rep.memory, err = runMemory(ctx, w, ps, o.orgs, busy, o.workers); err != nil {
			return rep, err
		}
	}
	if ctx.Err() != nil {
		return rep, ctx.Err()
	}
	var invalid []string
	for _, r := range rep.scenarios {
		if !r.valid() {
			invalid = append(invalid, r.sc.name)
		}
	}
	if len(invalid) > 0 {
		return rep, fmt.Errorf("scenario %s: figures not of metered, successful calls (see INVALID above)", strings.Join(invalid, ", "))
	}
	return rep, nil
}

// runLoad starts Redis, the upstream and Caddy, runs the load scenarios,
// and prints their summary.
func runLoad(ctx context.Context, o options, w io.Writer, ps *procs, rep *report) error {
	wrk, err := lookWrk()
	if err != nil {
		return err
	}
	limit, err := raiseFileLimit(fileLimit)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "building ./cmd/caddy and ./bench/upstream\n")
	caddyBin, upstreamBin, err := buildBinaries(ctx, ps.dir)
	if err != nil {
		return err
	}
	redisProc, redisAddr, err := startRedis(ctx, ps, "redis")
	if err != nil {
		return err
	}
	upstreamProc, upstreamAddr, err := startUpstream(ctx, ps, upstreamBin)
	if err != nil {
		return err
	}
	if o.profiles != "" {
		if err := os.MkdirAll(o.profiles, 0o755); err != nil {
			return fmt.Errorf("-profile: %w", err)
		}
	}
	gw, err := startGateway(ctx, ps, caddyBin, redisAddr, upstreamAddr, o.creditsOptions, o.profiles != "")
	if err != nil {
		return err
	}
	rdb, err := meter.NewClient(meter.ClientOptions{URL: "redis://" + redisAddr})
	if err != nil {
		return err
	}
	defer rdb.Close()
	ledger, err := meter.New(rdb, meter.Config{DefaultPlan: meter.Plan{Allowance: meter.MaxAmount}, Timeout: 5 * time.Second})
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "redis-server on %s (%s), upstream on %s, Caddy on %s; open files limit %s\n",
		redisAddr, strings.Join(quoteEmpty(redisArgs), " "), upstreamAddr, gw.base, limitString(limit))
	if ps.pin != nil {
		var pinned []string
		for _, p := range []*proc{redisProc, upstreamProc, gw.proc} {
			cpus, err := ps.pin.check(p.name, p.cmd.Process.Pid)
			if err != nil {
				return err
			}
			pinned = append(pinned, fmt.Sprintf("%s on CPU %s", p.name, cpus))
		}
		fmt.Fprintf(w, "pinned (Cpus_allowed_list): %s; wrk on CPU %s\n", strings.Join(pinned, ", "), formatCPUList(ps.pin.rest))
	}
	if len(o.creditsOptions) > 0 {
		fmt.Fprintf(w, "credits global options added: %s\n", strings.Join(o.creditsOptions, "; "))
	}
	fmt.Fprintf(w, "%d rounds of %v per route per scenario, plain and metered back to back (d: and its calls unbudgeted), each going first in turn\n", o.rounds, o.duration)

	env := &loadEnv{wrk: wrk, pin: ps.pin, profiles: o.profiles, gw: gw, ledger: ledger, dir: ps.dir, threads: o.threads, rounds: o.rounds, d: o.duration, warmup: o.warmup,
		caddyPid: gw.proc.cmd.Process.Pid, redisPid: redisProc.cmd.Process.Pid, rdb: rdb}
	for _, sc := range o.scenarios {
		r, err := env.runScenario(ctx, w, sc)
		if err != nil {
			return err
		}
		rep.scenarios = append(rep.scenarios, r)
	}
	if gw.proc.exited() {
		return gw.proc.failed(errors.New("Caddy exited during the run"))
	}

	fmt.Fprintf(w, "\n== summary: metered/plain, median of %d rounds ==\n", o.rounds)
	fmt.Fprintf(w, "%-64s %8s %10s\n", "scenario", "ratio", "p99 added")
	for _, r := range rep.scenarios {
		fmt.Fprintf(w, "%-64s %8.3f %10s\n", r.sc.name+" "+r.sc.title, r.Ratio, signedMS(r.P99Added))
		if r.sc.subjects > 0 {
			fmt.Fprintf(w, "%-64s %8.3f %10s\n", "  beside it in the same rounds, its calls unbudgeted", r.Beside, "")
		}
	}
	return nil
}

func limitString(n uint64) string {
	if n == 0 {
		return "unchanged"
	}
	return fmt.Sprint(n)
}

// cpuModel returns the CPU's model name from /proc/cpuinfo.
func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "model unknown"
	}
	if v := redisproc.InfoField(strings.ReplaceAll(string(b), "\t", ""), "model name"); v != "" {
		return strings.TrimSpace(v)
	}
	return "model unknown"
}
