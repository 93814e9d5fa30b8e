package meter

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// BenchmarkCharge measures one charge against a real redis-server: one
// EVALSHA round trip. The parallel variant shows throughput with many
// gateways' worth of concurrent calls.
func BenchmarkCharge(b *testing.B) {
	srv := redistest.Start(b, redistest.Options{})
	rdb := mustClient(b, ClientOptions{URL: "redis://" + srv.Addr})
	defer rdb.Close()
	var n atomic.Int64
	run := func(b *testing.B, rdb redis.UniversalClient, orgs int) {
		l, err := New(rdb, Config{Prefix: fmt.Sprintf("b%d", n.Add(1)), DefaultPlan: Plan{Allowance: MaxAmount}})
		if err != nil {
			b.Fatal(err)
		}
		ctx := context.Background()
		names := make([]string, orgs)
		for i := range names {
			names[i] = fmt.Sprintf("org-%d", i)
		}
		b.ReportAllocs()
		b.ResetTimer()
		var i atomic.Int64
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				k := i.Add(1)
				r, err := l.Charge(ctx, ChargeRequest{Org: names[k%int64(orgs)], Feature: "rich-text", Cost: 1})
				if err != nil || !r.Charged {
					b.Fatalf("%+v %v", r, err)
				}
			}
		})
	}
	b.Run("serial", func(b *testing.B) {
		b.SetParallelism(1)
		run(b, rdb, 1)
	})
	b.Run("parallel-64", func(b *testing.B) {
		b.SetParallelism(32)
		run(b, rdb, 1)
	})
	b.Run("parallel-64-1000orgs", func(b *testing.B) {
		b.SetParallelism(32)
		run(b, rdb, 1000)
	})
}
