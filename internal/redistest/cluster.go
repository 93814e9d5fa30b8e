package redistest

import (
	"context"
	"crypto/tls"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redisproc"
)

// slotCount is the number of hash slots in a Redis Cluster.
const slotCount = 16384

// Cluster is a Redis Cluster of redis-server processes started for one test.
type Cluster struct {
	// Addrs are the addresses of all nodes, in the order given to
	// "redis-cli --cluster create".
	Addrs []string
	// Nodes are the node processes; Nodes[i] listens on Addrs[i]. Which of
	// them are masters and which are replicas is decided by redis-cli.
	Nodes []*Server

	tls *tls.Config // how the harness connects to a cluster over TLS
}

// StartCluster starts masters*(1+replicasPerMaster) cluster nodes, joins
// them with "redis-cli --cluster create", and waits until every node reports
// cluster_state:ok with all 16384 slots assigned, every replica is in sync
// with its master, a go-redis ClusterClient can SET and GET a key in every
// slot range, and every node lists all masters and replicas in CLUSTER SLOTS
// (so ClusterClient sees the replicas). Redis requires at least 3 masters.
// Nodes run with cluster-node-timeout 5000 (5s), which bounds how quickly
// a replica takes over after its master is killed.
//
// It calls t.Fatal on failure. The nodes are killed and their directories
// removed when the test finishes.
func StartCluster(t testing.TB, masters, replicasPerMaster int) *Cluster {
	t.Helper()
	return startCluster(t, masters, replicasPerMaster, nil)
}

// StartClusterTLS is StartCluster with every node on TLS only (tl's files;
// the cluster bus on TLS too).
func StartClusterTLS(t testing.TB, masters, replicasPerMaster int, tl *TLSServer) *Cluster {
	t.Helper()
	return startCluster(t, masters, replicasPerMaster, tl)
}

func startCluster(t testing.TB, masters, replicasPerMaster int, tl *TLSServer) *Cluster {
	t.Helper()
	if masters < 3 || replicasPerMaster < 0 {
		t.Fatalf("redistest: a cluster needs at least 3 masters and no negative replica count, got %d masters and %d replicas per master",
			masters, replicasPerMaster)
	}
	cli := lookPath(t, "redis-cli")
	c := &Cluster{}
	opts := Options{}
	if tl != nil {
		c.tls = tl.Client
		opts = Options{TLS: tl, Args: []string{"--tls-cluster", "yes"}}
	}
	for range masters * (1 + replicasPerMaster) {
		n := start(t, opts, true, "")
		c.Nodes = append(c.Nodes, n)
		c.Addrs = append(c.Addrs, n.Addr)
	}

	ctx, cancel := context.WithTimeout(context.Background(), clusterTimeout)
	defer cancel()
	args := append([]string{"--cluster", "create"}, c.Addrs...)
	args = append(args, "--cluster-replicas", strconv.Itoa(replicasPerMaster), "--cluster-yes")
	if tl != nil {
		// A server's certificate is a client certificate too.
		args = append(args, "--tls", "--cacert", tl.CA, "--cert", tl.Cert, "--key", tl.Key)
	}
	if out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput(); err != nil {
		t.Fatalf("redistest: redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}

	var err error
	for {
		if err = c.nodesReady(ctx, masters*replicasPerMaster); err == nil {
			// clientReady's writes also give the replicas the non-zero
			// replication offset Redis wants before listing them in
			// CLUSTER SLOTS, which slotsComplete checks.
			if err = c.clientReady(ctx); err == nil {
				if err = c.slotsComplete(ctx); err == nil {
					return c
				}
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("redistest: cluster %v not ready within %v: %v", c.Addrs, clusterTimeout, err)
		case <-time.After(5 * pollInterval):
		}
	}
}

// Client returns a go-redis cluster client connected to the cluster. The
// client is closed when the test finishes.
func (c *Cluster) Client(t testing.TB) *redis.ClusterClient {
	t.Helper()
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs, TLSConfig: c.tls})
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// nodesReady reports whether every node sees a healthy cluster of all nodes
// with all slots assigned, and whether all replicas are in sync.
func (c *Cluster) nodesReady(ctx context.Context, replicas int) error {
	want := map[string]string{
		"cluster_state":          "ok",
		"cluster_slots_assigned": strconv.Itoa(slotCount),
		"cluster_known_nodes":    strconv.Itoa(len(c.Nodes)),
	}
	synced := 0
	for _, addr := range c.Addrs {
		err := func() error {
			rc := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, TLSConfig: c.tls})
			defer rc.Close()
			info, err := rc.ClusterInfo(ctx).Result()
			if err != nil {
				return fmt.Errorf("%s: CLUSTER INFO: %w", addr, err)
			}
			for key, val := range want {
				if got := redisproc.InfoField(info, key); got != val {
					return fmt.Errorf("%s: %s is %q, want %q", addr, key, got, val)
				}
			}
			repl, err := rc.Info(ctx, "replication").Result()
			if err != nil {
				return fmt.Errorf("%s: INFO replication: %w", addr, err)
			}
			if redisproc.InfoField(repl, "role") == "slave" {
				if got := redisproc.InfoField(repl, "master_link_status"); got != "up" {
					return fmt.Errorf("%s: master_link_status is %q, want \"up\"", addr, got)
				}
				synced++
			}
			return nil
		}()
		if err != nil {
			return err
		}
	}
	if synced != replicas {
		return fmt.Errorf("%d replicas in sync, want %d", synced, replicas)
	}
	return nil
}

// clientReady checks with a fresh ClusterClient (so no stale slot map) that
// a key in every slot range can be written, read and deleted.
func (c *Cluster) clientReady(ctx context.Context) error {
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs, MaxRedirects: -1, TLSConfig: c.tls})
	defer cc.Close()
	ranges, err := cc.ClusterSlots(ctx).Result()
	if err != nil {
		return fmt.Errorf("CLUSTER SLOTS: %w", err)
	}
	covered := 0
	for _, r := range ranges {
		covered += r.End - r.Start + 1
		key := keyInSlots(r.Start, r.End)
		if err := cc.Set(ctx, key, "ok", 0).Err(); err != nil {
			return fmt.Errorf("SET %s (slots %d-%d): %w", key, r.Start, r.End, err)
		}
		if got, err := cc.Get(ctx, key).Result(); err != nil || got != "ok" {
			return fmt.Errorf("GET %s (slots %d-%d) = %q, %v", key, r.Start, r.End, got, err)
		}
		if err := cc.Del(ctx, key).Err(); err != nil {
			return fmt.Errorf("DEL %s (slots %d-%d): %w", key, r.Start, r.End, err)
		}
	}
	if covered != slotCount {
		return fmt.Errorf("CLUSTER SLOTS covers %d slots, want %d", covered, slotCount)
	}
	return nil
}

// slotsComplete reports whether every node lists every node in CLUSTER SLOTS.
func (c *Cluster) slotsComplete(ctx context.Context) error {
	for _, addr := range c.Addrs {
		rc := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, TLSConfig: c.tls})
		ranges, err := rc.ClusterSlots(ctx).Result()
		_ = rc.Close()
		if err != nil {
			return fmt.Errorf("%s: CLUSTER SLOTS: %w", addr, err)
		}
		listed := make(map[string]bool)
		for _, r := range ranges {
			for _, n := range r.Nodes {
				listed[n.ID] = true
			}
		}
		if len(listed) != len(c.Nodes) {
			return fmt.Errorf("%s: CLUSTER SLOTS lists %d nodes, want %d", addr, len(listed), len(c.Nodes))
		}
	}
	return nil
}

// keyInSlots returns a key whose hash slot is in [first, last].
func keyInSlots(first, last int) string {
	for i := 0; ; i++ {
		key := "redistest:probe:" + strconv.Itoa(i)
		if s := keySlot(key); s >= first && s <= last {
			return key
		}
	}
}

// keySlot returns the hash slot of a key without a {hash tag}: CRC16
// (XMODEM) of the key modulo 16384, as Redis Cluster computes it.
func keySlot(key string) int {
	var crc uint16
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc) % slotCount
}
