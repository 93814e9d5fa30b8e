package meter

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redisproc"
	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// BenchmarkCharge measures the ledger's charges against a real
// redis-server and a real 3-node Redis Cluster, driven directly (no Caddy
// in the way): serial, one EVALSHA round trip at a time, and with 64 or 256
// concurrent callers over one org, 1,000 orgs and 100,000 orgs. charges/s
// is what one Redis (or the Cluster) takes from one client process, to size
// Redis for a call rate; the Cluster spreads orgs over its nodes by their
// hash tag. cluster-wait is a Cluster whose masters have a replica each,
// with wait_replicas 1: each batch waits for its master's replica (WAIT).
//
//	go test -run '^$' -bench Charge -benchtime 5s ./meter/
func BenchmarkCharge(b *testing.B) {
	srv := redistest.Start(b, redistest.Options{})
	cluster := redistest.StartCluster(b, 3, 0)
	replicated := redistest.StartCluster(b, 3, 1)
	var n atomic.Int64
	for _, store := range []struct {
		name     string
		opts     ClientOptions
		replicas int
	}{
		{"redis", ClientOptions{URL: "redis://" + srv.Addr}, 0},
		{"cluster", ClientOptions{Cluster: cluster.Addrs}, 0},
		{"cluster-wait", ClientOptions{Cluster: replicated.Addrs}, 1},
	} {
		rdb := mustClient(b, store.opts)
		defer rdb.Close()
		for _, bc := range []struct {
			name          string
			callers, orgs int
		}{
			{"serial", 1, 1},
			{"parallel-64", 64, 1},
			{"parallel-64-1000orgs", 64, 1000},
			{"parallel-256-100000orgs", 256, 100000},
		} {
			b.Run(store.name+"/"+bc.name, func(b *testing.B) {
				chargeLoad(b, rdb, fmt.Sprintf("b%d", n.Add(1)), bc.callers, bc.orgs, store.replicas)
			})
		}
	}
}

// chargeLoad runs b.N charges of 1 credit from callers goroutines, spread
// over orgs orgs that exist, each waiting for replicas replicas, and
// reports charges/s and Redis' CPU time per charge.
func chargeLoad(b *testing.B, rdb redis.UniversalClient, prefix string, callers, orgs, replicas int) {
	l, err := New(rdb, Config{Prefix: prefix, DefaultPlan: Plan{Allowance: MaxAmount}, Timeout: 5 * time.Second,
		WaitReplicas: replicas})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	names := make([]string, orgs)
	for i := range names {
		names[i] = fmt.Sprintf("org-%d", i)
	}
	// The orgs exist, as a busy Redis' do: what is measured is a charge
	// of an org called before, not the first of a new one.
	if orgs > 1 {
		var wg sync.WaitGroup
		next := make(chan string)
		for range callers {
			wg.Go(func() {
				for org := range next {
					if _, err := l.Charge(ctx, ChargeRequest{Org: org, Feature: "rich-text", Cost: 1}); err != nil {
						b.Error(err)
					}
				}
			})
		}
		for _, org := range names {
			next <- org
		}
		close(next)
		wg.Wait()
	}
	var i atomic.Int64
	charge := func() bool {
		k := i.Add(1)
		r, err := l.Charge(ctx, ChargeRequest{Org: names[k%int64(orgs)], Feature: "rich-text", Cost: 1})
		if err != nil || !r.Charged {
			b.Errorf("%+v %v", r, err)
			return false
		}
		return true
	}
	b.ReportAllocs()
	cpu0 := redisCPU(b, rdb)
	own0 := ownCPU(b)
	b.ResetTimer()
	start := time.Now()
	if callers == 1 {
		for range b.N {
			if !charge() {
				return
			}
		}
	} else {
		b.SetParallelism(max(callers/runtime.GOMAXPROCS(0), 1))
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() && charge() {
			}
		})
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "charges/s")
	b.ReportMetric((ownCPU(b)-own0).Seconds()*1e6/float64(b.N), "client-cpu-µs/charge")
	b.ReportMetric((redisCPU(b, rdb)-cpu0).Seconds()*1e6/float64(b.N), "redis-cpu-µs/charge")
}

// ownCPU is the CPU time (user and system) this process has used: the
// ledger client's side of the charges, which is the gateway's.
func ownCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// redisCPU is the CPU time the Redis server (every Cluster master) has
// used, from INFO cpu.
func redisCPU(b *testing.B, rdb redis.UniversalClient) time.Duration {
	var mu sync.Mutex
	var total float64
	read := func(ctx context.Context, c *redis.Client) error {
		info, err := c.Info(ctx, "cpu").Result()
		if err != nil {
			return err
		}
		var sum float64
		for _, f := range []string{"used_cpu_sys", "used_cpu_user"} {
			v, err := strconv.ParseFloat(redisproc.InfoField(info, f), 64)
			if err != nil {
				return fmt.Errorf("INFO %s: %w", f, err)
			}
			sum += v
		}
		mu.Lock()
		total += sum
		mu.Unlock()
		return nil
	}
	ctx := context.Background()
	var err error
	switch c := rdb.(type) {
	case *redis.ClusterClient:
		err = c.ForEachMaster(ctx, read)
	case *redis.Client:
		err = read(ctx, c)
	default:
		err = fmt.Errorf("a %T", rdb)
	}
	if err != nil {
		b.Fatal(err)
	}
	return time.Duration(total * float64(time.Second))
}

// BenchmarkChargeScript measures what one charge costs Redis inside the
// script, from INFO commandstats: the charges script's time per charge in
// batches of 100 charges of 100 orgs on a real redis-server, and the part
// of it its commands take (the rest is the script's own Lua). commands-only
// runs a script of the same seven commands per charge (TYPE, GET, HMGET,
// LPUSH, EXPIRE, HSET, SET) on the same keys with none of the charge's
// logic: what any charge script that reads and writes as this one does
// pays Redis, whatever its Lua.
//
//	go test -run '^$' -bench ChargeScript -benchtime 2000x ./meter/
func BenchmarkChargeScript(b *testing.B) {
	ctx := context.Background()
	const orgs = 100
	var rdb *redis.Client
	var l *Ledger
	prefix := "org"
	names := make([]string, orgs)
	batch := func(script *redis.Script) error {
		for i := range names {
			names[i] = fmt.Sprintf("%s-%d", prefix, i)
		}
		return runCharges(ctx, rdb, l, script, names)
	}
	for _, sc := range []struct {
		name   string
		script *redis.Script
		grants int // live promotional grants of each org, beside its allowance
		// after makes them expire after the allowance, which is then spent
		// first; else they expire before it, and are spent first.
		after bool
	}{
		{"charges", chargesScript, 0, false},
		{"charges-3-grants", chargesScript, 3, false},
		{"charges-3-grants-allowance-first", chargesScript, 3, true},
		{"commands-only", redis.NewScript(commandsOnlyLua), 0, false},
	} {
		b.Run(sc.name, func(b *testing.B) {
			// Each on a Redis of its own: the markers and call logs one
			// leaves (200,000 keys in 2,000 batches) would slow the next.
			srv := redistest.Start(b, redistest.Options{})
			rdb = redis.NewClient(&redis.Options{Addr: srv.Addr})
			defer rdb.Close()
			var err error
			if l, err = New(rdb, Config{Prefix: "s", DefaultPlan: Plan{Allowance: MaxAmount}, Timeout: 5 * time.Second}); err != nil {
				b.Fatal(err)
			}
			prefix = sc.name
			// The orgs exist, as a busy Redis' do.
			if err := batch(chargesScript); err != nil {
				b.Fatal(err)
			}
			for i := range orgs {
				for g := range sc.grants {
					// Grants that expire and never run out in the benchmark:
					// each charge reads them, and takes from the first of
					// them or from the allowance.
					expires := time.Now().Add(time.Duration(g+1) * 24 * time.Hour)
					if sc.after {
						expires = expires.AddDate(2, 0, 0)
					}
					req := GrantRequest{Amount: MaxAmount, Expires: expires}
					if _, _, _, err := l.Grant(ctx, fmt.Sprintf("%s-%d", prefix, i), req); err != nil {
						b.Fatal(err)
					}
				}
			}
			if err := batch(sc.script); err != nil {
				b.Fatal(err)
			}
			if err := rdb.ConfigResetStat(ctx).Err(); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for range b.N {
				if err := batch(sc.script); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			script, commands := scriptTime(b, rdb)
			n := float64(b.N * orgs)
			b.ReportMetric(script.Seconds()*1e6/n, "script-µs/charge")
			b.ReportMetric(commands.Seconds()*1e6/n, "commands-µs/charge")
		})
	}
}

// runCharges runs one charge of 1 credit of each of orgs in one run of
// script, which takes the charges script's keys and arguments, and checks
// that each was charged.
func runCharges(ctx context.Context, rdb *redis.Client, l *Ledger, script *redis.Script, orgs []string) error {
	return runChargesBy(l, func(keys []string, args []any) *redis.Cmd { return script.Run(ctx, rdb, keys, args...) }, orgs)
}

// runChargesBy is runCharges with the run's call made by run.
func runChargesBy(l *Ledger, run func(keys []string, args []any) *redis.Cmd, orgs []string) error {
	now := l.now()
	keys := make([]string, 0, len(orgs)*6)
	args := []any{now.UnixMilli(), monthIndex(now), l.defaultPlan.Allowance, l.defaultPlan.RechargeMonth, l.eventsMax,
		int64(0), l.markerTTL}
	for _, org := range orgs {
		id := NewRequestID()
		marker := l.keys.Request(org, id)
		keys = append(keys, l.keys.Account(org), marker, l.keys.Calls(org), l.keys.Holds(org), marker, l.keys.Budgets(org))
		args = append(args, "rich-text", int64(1), "0", "-1", id, l.markerTTL, NewRequestID(), noBinding, inFlightTTL,
			noBinding)
	}
	raw, err := run(keys, args).Slice()
	if err != nil {
		return err
	}
	if len(raw) != len(orgs) {
		return fmt.Errorf("%d replies to %d charges", len(raw), len(orgs))
	}
	for _, r := range raw {
		if v, ok := r.([]any); !ok || v[0] != int64(codeOK) {
			return fmt.Errorf("a charge answered %v", r)
		}
	}
	return nil
}

// BenchmarkChargeFloor measures what a quick charge costs Redis at the
// scale and batch size of load c (`go run ./bench -scenario c`: 100,000
// orgs that exist, called in turn, some 16 charges a run), and what its
// commands alone cost: Redis' CPU per charge (INFO cpu: reading the call,
// running the script, writing the reply) and its time inside the script
// (INFO commandstats). six-commands runs the six commands of a quick
// charge (GET and SET of the marker, HMGET and HSET of the account, LPUSH
// and EXPIRE of the call log) on the same keys with no logic: what any
// charge that keeps these records pays. five-commands reads and writes the
// marker in one SET NX GET (Redis 7): what one command fewer would save.
//
//	go test -run '^$' -bench ChargeFloor -benchtime 2000x ./meter/
func BenchmarkChargeFloor(b *testing.B) {
	ctx := context.Background()
	if strings.Count(sixCommandsLua, "redis.call(") != 6 || strings.Count(fiveCommandsLua, "redis.call(") != 5 ||
		!strings.Contains(sixCommandsLua, "'hx', 'gl')") || !strings.Contains(fiveCommandsLua, "'NX', 'GET'") {
		b.Fatalf("the floor scripts are not what they say:\n%s\n%s", sixCommandsLua, fiveCommandsLua)
	}
	for _, batch := range []int{16, 100} {
		for _, sc := range []struct {
			name   string
			script *redis.Script
		}{
			{"charges", chargesScript},
			{"six-commands", redis.NewScript(sixCommandsLua)},
			{"five-commands", redis.NewScript(fiveCommandsLua)},
		} {
			b.Run(fmt.Sprintf("%s/batch-%d", sc.name, batch), func(b *testing.B) {
				const orgs = 100_000
				srv := redistest.Start(b, redistest.Options{})
				rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
				defer rdb.Close()
				l, err := New(rdb, Config{Prefix: "f", DefaultPlan: Plan{Allowance: MaxAmount}, Timeout: 5 * time.Second})
				if err != nil {
					b.Fatal(err)
				}
				names := make([]string, orgs)
				for i := range names {
					names[i] = fmt.Sprintf("org-%06d", i)
				}
				// The orgs exist, each made by one charge.
				for i := 0; i < orgs; i += 100 {
					if err := runCharges(ctx, rdb, l, chargesScript, names[i:i+100]); err != nil {
						b.Fatal(err)
					}
				}
				if err := runCharges(ctx, rdb, l, sc.script, names[:batch]); err != nil {
					b.Fatal(err)
				}
				if err := rdb.ConfigResetStat(ctx).Err(); err != nil {
					b.Fatal(err)
				}
				cpu0 := redisCPU(b, rdb)
				next := 0
				b.ResetTimer()
				for range b.N {
					if next+batch > orgs {
						next = 0
					}
					if err := runCharges(ctx, rdb, l, sc.script, names[next:next+batch]); err != nil {
						b.Fatal(err)
					}
					next += batch
				}
				b.StopTimer()
				n := float64(b.N * batch)
				script, _ := scriptTime(b, rdb)
				b.ReportMetric((redisCPU(b, rdb)-cpu0).Seconds()*1e6/n, "redis-cpu-µs/charge")
				b.ReportMetric(script.Seconds()*1e6/n, "script-µs/charge")
			})
		}
	}
}

// BenchmarkChargeFunction compares the charges script run by EVALSHA with
// the same code loaded once as a Redis Function (FUNCTION LOAD, FCALL):
// Redis' time per run (INFO commandstats) of runs of 0, 1, 16 and 64 quick
// charges, on a redis-server with 1,000 orgs that exist. A script's top
// level runs at every EVALSHA, and builds each function it defines; a
// function library builds them once.
//
//	go test -run '^$' -bench ChargeFunction -benchtime 3000x ./meter/
func BenchmarkChargeFunction(b *testing.B) {
	ctx := context.Background()
	srv := redistest.Start(b, redistest.Options{})
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	defer rdb.Close()
	if err := rdb.FunctionLoadReplace(ctx, chargesFunction(b)).Err(); err != nil {
		b.Fatal(err)
	}
	l, err := New(rdb, Config{Prefix: "fn", DefaultPlan: Plan{Allowance: MaxAmount}, Timeout: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	names := make([]string, 1000)
	for i := range names {
		names[i] = fmt.Sprintf("org-%d", i)
	}
	for i := 0; i < len(names); i += 100 {
		if err := runCharges(ctx, rdb, l, chargesScript, names[i:i+100]); err != nil {
			b.Fatal(err)
		}
	}
	for _, n := range []int{0, 1, 16, 64} {
		for _, way := range []struct {
			name string
			run  func(keys []string, args []any) *redis.Cmd
		}{
			{"evalsha", func(keys []string, args []any) *redis.Cmd { return chargesScript.Run(ctx, rdb, keys, args...) }},
			{"fcall", func(keys []string, args []any) *redis.Cmd {
				return rdb.FCall(ctx, "credits_bench_charges", keys, args...)
			}},
		} {
			b.Run(fmt.Sprintf("%s/charges-%d", way.name, n), func(b *testing.B) {
				if err := rdb.ConfigResetStat(ctx).Err(); err != nil {
					b.Fatal(err)
				}
				next := 0
				b.ResetTimer()
				for range b.N {
					if next+n > len(names) {
						next = 0
					}
					if err := runChargesBy(l, way.run, names[next:next+n]); err != nil {
						b.Fatal(err)
					}
					next += n
				}
				b.StopTimer()
				script, _ := scriptTime(b, rdb)
				b.ReportMetric(script.Seconds()*1e6/float64(b.N), "script-µs/run")
				if n > 0 {
					b.ReportMetric(script.Seconds()*1e6/float64(b.N*n), "script-µs/charge")
				}
			})
		}
	}
}

// chargesFunction returns the charges script as a Redis Function library
// for BenchmarkChargeFunction: credits_bench_charges takes the script's
// keys and arguments. A library's top level runs at FUNCTION LOAD, where
// no Lua library but redis is in scope: the script's code is built at the
// first call, and base.lua's values of the call (from ARGV) are set at
// each. It is for quick charges only: the full way, once built, would keep
// what it holds between calls.
func chargesFunction(b *testing.B) string {
	text, err := Script("charges.lua")
	if err != nil {
		b.Fatal(err)
	}
	const perCall = `local now_ms = tonumber(ARGV[1])
local now_ym = tonumber(ARGV[2])
local def_allowance = tonumber(ARGV[3])
local def_month = tonumber(ARGV[4])
local events_max = ARGV[5]
local calls_ttl = ARGV[7]
`
	head, body, ok := strings.Cut(text, "\nlocal out = {}\n")
	if !ok || !strings.Contains(head, perCall) {
		b.Fatal("charges.lua is not as chargesFunction reads it")
	}
	head = strings.Replace(head, perCall, "local now_ms, now_ym, def_allowance, def_month, events_max, calls_ttl\n", 1)
	return "#!lua name=credits_bench\nlocal function build()\nlocal KEYS, ARGV\n" + head + `
return function(keys, args)
  KEYS, ARGV = keys, args
  now_ms, now_ym = tonumber(ARGV[1]), tonumber(ARGV[2])
  def_allowance, def_month = tonumber(ARGV[3]), tonumber(ARGV[4])
  events_max, calls_ttl = ARGV[5], ARGV[7]
  srv_ms, today_s = nil, nil
  local out = {}
` + body + `end
end
local run
redis.register_function('credits_bench_charges', function(keys, args)
  if not run then run = build() end
  return run(keys, args)
end)
`
}

// sixCommandsLua is BenchmarkChargeFloor's floor: commandsOnlyLua without
// its TYPE, and with the fields a quick charge reads (quick_charge's HMGET).
var sixCommandsLua = strings.Replace(strings.Replace(commandsOnlyLua, "  redis.call('TYPE', KEYS[k + 3])\n", "", 1),
	`'a', 'm', 'own', 'rem', 'pur', 'ps', 'nx', 'pn',
    'cd', 'seq', 'ha', 'ho', 'hp', 'hx', 'pa', 'pm'`, `'rem', 'pur', 'nx', 'pn', 'seq', 'ha', 'ho', 'hp', 'hx', 'gl'`, 1)

// fiveCommandsLua is sixCommandsLua with the marker's GET and SET as one
// SET NX GET.
var fiveCommandsLua = strings.Replace(strings.Replace(sixCommandsLua, "  redis.call('GET', KEYS[k + 2])\n", "", 1),
	"'EX', ARGV[a + 6])", "'NX', 'GET', 'EX', ARGV[a + 6])", 1)

// commandsOnlyLua is BenchmarkChargeScript's floor: the charges script's
// keys, arguments and reply, and per charge the commands a charge of an
// existing org runs, with fixed values and no logic.
const commandsOnlyLua = `
local out = {}
for i = 0, (#ARGV - 7) / 10 - 1 do
  local k, a = i * 6, 7 + i * 10
  redis.call('TYPE', KEYS[k + 3])
  redis.call('GET', KEYS[k + 2])
  redis.call('HMGET', KEYS[k + 1], 'u:rich-text', '20261201:rich-text', 'a', 'm', 'own', 'rem', 'pur', 'ps', 'nx', 'pn',
    'cd', 'seq', 'ha', 'ho', 'hp', 'hx', 'pa', 'pm')
  redis.call('LPUSH', KEYS[k + 3], '12 charge -1 999 rich-text ' .. ARGV[a + 5] .. ' ' .. ARGV[1])
  redis.call('EXPIRE', KEYS[k + 3], ARGV[7])
  redis.call('HSET', KEYS[k + 1], 'rem', '999', 'seq', '12', 'u:rich-text', '5', '20261201:rich-text', '5')
  redis.call('SET', KEYS[k + 2], '1 rich-text 1 0 0 999 c 0 ' .. ARGV[a + 7] .. ' 0 - 20261201', 'EX', ARGV[a + 6])
  out[i + 1] = {0, 999, 1}
end
return out
`

// scriptTime reads INFO commandstats: the time EVALSHA, EVAL and FCALL
// took, and the time of every other command (those the scripts ran).
func scriptTime(b *testing.B, rdb *redis.Client) (script, commands time.Duration) {
	info, err := rdb.Info(context.Background(), "commandstats").Result()
	if err != nil {
		b.Fatal(err)
	}
	for line := range strings.Lines(info) {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok || !strings.HasPrefix(name, "cmdstat_") {
			continue
		}
		var calls, usec int64
		if _, err := fmt.Sscanf(rest, "calls=%d,usec=%d", &calls, &usec); err != nil {
			b.Fatalf("INFO commandstats %q: %v", line, err)
		}
		d := time.Duration(usec) * time.Microsecond
		switch name {
		case "cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall":
			script += d
		case "cmdstat_config|resetstat", "cmdstat_info":
		default:
			commands += d
		}
	}
	if script == 0 {
		b.Fatal("INFO commandstats shows no script time")
	}
	return script, commands
}
