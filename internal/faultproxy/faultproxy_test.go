package faultproxy

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

func TestProxy(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	p := Start(t, srv.Addr)
	rdb := redis.NewClient(&redis.Options{Addr: p.Addr, MaxRetries: -1})
	defer rdb.Close()
	ctx := context.Background()
	if err := rdb.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}

	t.Run("cut after the server acted", func(t *testing.T) {
		p.CutReplyEvery(1)
		err := rdb.Incr(ctx, "n").Err()
		p.CutReplyEvery(0)
		if err == nil {
			t.Fatal("a cut reply arrived")
		}
		if p.Cuts() != 1 {
			t.Fatalf("cuts %d", p.Cuts())
		}
		direct := srv.Client(t)
		if n, err := direct.Get(ctx, "n").Int(); err != nil || n != 1 {
			t.Fatalf("the server did not run the command: %d %v", n, err)
		}
	})

	t.Run("latency", func(t *testing.T) {
		p.SetLatency(300 * time.Millisecond)
		tctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		slow := redis.NewClient(&redis.Options{Addr: p.Addr, MaxRetries: -1, ContextTimeoutEnabled: true})
		defer slow.Close()
		err := slow.Get(tctx, "k").Err()
		p.SetLatency(0)
		if err == nil {
			t.Fatal("a 300ms reply beat a 100ms deadline")
		}
	})

	t.Run("refuse", func(t *testing.T) {
		p.Refuse(true)
		if err := rdb.Get(ctx, "k").Err(); err == nil {
			t.Fatal("a refused proxy answered")
		}
		p.Refuse(false)
		var v string
		var err error
		for range 5 { // the pool may hand out a connection closed by the refusal first
			if v, err = rdb.Get(ctx, "k").Result(); err == nil {
				break
			}
		}
		if v != "v" {
			t.Fatalf("after refusal: %q %v", v, err)
		}
	})
}
