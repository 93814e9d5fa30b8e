package meter

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
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
// hash tag.
//
//	go test -run '^$' -bench Charge -benchtime 5s ./meter/
func BenchmarkCharge(b *testing.B) {
	srv := redistest.Start(b, redistest.Options{})
	cluster := redistest.StartCluster(b, 3, 0)
	var n atomic.Int64
	for _, store := range []struct {
		name string
		opts ClientOptions
	}{
		{"redis", ClientOptions{URL: "redis://" + srv.Addr}},
		{"cluster", ClientOptions{Cluster: cluster.Addrs}},
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
				chargeLoad(b, rdb, fmt.Sprintf("b%d", n.Add(1)), bc.callers, bc.orgs)
			})
		}
	}
}

// chargeLoad runs b.N charges of 1 credit from callers goroutines, spread
// over orgs orgs, and reports charges/s.
func chargeLoad(b *testing.B, rdb redis.UniversalClient, prefix string, callers, orgs int) {
	l, err := New(rdb, Config{Prefix: prefix, DefaultPlan: Plan{Allowance: MaxAmount}, Timeout: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	names := make([]string, orgs)
	for i := range names {
		names[i] = fmt.Sprintf("org-%d", i)
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
	b.ReportMetric((redisCPU(b, rdb)-cpu0).Seconds()*1e6/float64(b.N), "redis-cpu-µs/charge")
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
