package meter

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

func TestClusterOptions(t *testing.T) {
	for _, tc := range []struct {
		name      string
		seeds     []string
		addrs     []string
		user, pwd string
		tls       bool
		err       string
	}{
		{name: "host:port seeds", seeds: []string{"10.0.0.1:7000", "[fd00::2]:7000"}, addrs: []string{"10.0.0.1:7000", "[fd00::2]:7000"}},
		{name: "a URL gives every seed its password", seeds: []string{"redis://:s3cret@10.0.0.1:7000", "10.0.0.2:7000"},
			addrs: []string{"10.0.0.1:7000", "10.0.0.2:7000"}, pwd: "s3cret"},
		{name: "TLS and a user", seeds: []string{"rediss://gw:s3cret@node1:7000", "rediss://gw:s3cret@node2:7000"},
			addrs: []string{"node1:7000", "node2:7000"}, user: "gw", pwd: "s3cret", tls: true},
		{name: "default port", seeds: []string{"redis://node1"}, addrs: []string{"node1:6379"}},
		{name: "two passwords", seeds: []string{"redis://:s3cret@a:1", "redis://:other@b:1"}, err: "seed 2: its user, password or scheme differs"},
		{name: "TLS on one seed only", seeds: []string{"rediss://:s3cret@a:1", "redis://:s3cret@b:1"}, err: "seed 2: its user, password or scheme differs"},
		{name: "a db", seeds: []string{"redis://:s3cret@a:1/3"}, err: "seed 1: a Redis Cluster has only db 0"},
		{name: "no port", seeds: []string{"a:1", "b"}, err: "seed 2: must be host:port"},
		{name: "another scheme", seeds: []string{"http://:s3cret@a:1"}, err: "seed 1: invalid redis URL: it must start with redis:// or rediss://"},
		{name: "none", err: "no Redis Cluster seed nodes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := ClusterOptions(tc.seeds)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || strings.Contains(err.Error(), "s3cret") {
					t.Fatalf("error %v, want one with %q and no password", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(o.Addrs) != fmt.Sprint(tc.addrs) || o.Username != tc.user || o.Password != tc.pwd || (o.TLSConfig != nil) != tc.tls {
				t.Fatalf("options: addrs %v, user %q, password %q, TLS %v", o.Addrs, o.Username, o.Password, o.TLSConfig != nil)
			}
			if o.TLSConfig != nil && o.TLSConfig.ServerName != "" {
				t.Fatalf("TLS server name %q for every node", o.TLSConfig.ServerName)
			}
		})
	}
}

// TestClusterWithPassword charges on a 3-node Redis Cluster that requires a
// password, with the password in one seed URL.
func TestClusterWithPassword(t *testing.T) {
	cluster := redistest.StartCluster(t, 3, 0)
	ctx := context.Background()
	for _, addr := range cluster.Addrs {
		rc := redis.NewClient(&redis.Options{Addr: addr})
		err := rc.ConfigSet(ctx, "requirepass", "s3cret").Err()
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	seeds := append([]string{"redis://:s3cret@" + cluster.Addrs[0]}, cluster.Addrs[1:]...)
	rdb := mustClient(t, ClientOptions{Cluster: seeds})
	defer rdb.Close()
	// A loaded machine is slow to load the scripts on three nodes.
	l, err := New(rdb, Config{DefaultPlan: Plan{Allowance: 10}, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	// Orgs in every node's slots.
	for i := range 30 {
		org := fmt.Sprintf("org-%d", i)
		r, err := l.Charge(ctx, ChargeRequest{Org: org, Feature: "f", Cost: 3})
		if err != nil || !r.Charged || r.Balance != 7 {
			t.Fatalf("%s: %+v %v", org, r, err)
		}
	}

	// Without the password, the cluster refuses.
	plain := mustClient(t, ClientOptions{Cluster: cluster.Addrs})
	defer plain.Close()
	l, err = New(plain, Config{DefaultPlan: Plan{Allowance: 10}, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Charge(ctx, ChargeRequest{Org: "org-0", Feature: "f", Cost: 1}); err == nil || !strings.Contains(err.Error(), "NOAUTH") {
		t.Fatalf("charge without the password: %v", err)
	}
}
