package redistest

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redisproc"
)

// sentinelTimeout is how long a sentinel set has to form or fail over.
const sentinelTimeout = 60 * time.Second

// SentinelOptions configures StartSentinel.
type SentinelOptions struct {
	// Master is the name the sentinels know the master by.
	Master string
	// Server configures the master and its replica (TLS, password, ...).
	Server Options
	// SentinelPassword, when set, is the sentinels' own requirepass.
	SentinelPassword string
}

// Sentinels is a master, its replica and three sentinels that watch them,
// each a redis-server process of one test.
type Sentinels struct {
	// Master is the name the sentinels know the master by.
	Master string
	// Servers are the master the set started with and its replica.
	Servers []*Server
	// Sentinels are the three sentinels; Addrs their addresses.
	Sentinels []*Server
	Addrs     []string

	opts    SentinelOptions
	clients []*redis.SentinelClient
}

// StartSentinel starts a master, a replica of it and three sentinels with a
// quorum of two, and waits until every sentinel knows the replica and the
// other sentinels, so that a failover can happen.
func StartSentinel(t testing.TB, o SentinelOptions) *Sentinels {
	t.Helper()
	s := &Sentinels{Master: o.Master, opts: o}
	master := Start(t, o.Server)
	_, port, _ := net.SplitHostPort(master.Addr)
	ro := o.Server
	ro.Args = append(slices.Clone(o.Server.Args), "--replicaof", "127.0.0.1", port)
	replica := Start(t, ro)
	s.Servers = []*Server{master, replica}
	ctx := context.Background()
	rc := replica.Client(t)
	waitFor(t, "the replica is in sync", func() bool {
		info, err := rc.Info(ctx, "replication").Result()
		return err == nil && redisproc.InfoField(info, "master_link_status") == "up"
	})

	conf := []string{
		fmt.Sprintf("sentinel monitor %s 127.0.0.1 %s 2", o.Master, port),
		// Low enough for quick tests, high enough that a loaded machine
		// does not make a master look down.
		fmt.Sprintf("sentinel down-after-milliseconds %s 2000", o.Master),
		fmt.Sprintf("sentinel failover-timeout %s 10000", o.Master),
	}
	if o.Server.Password != "" {
		conf = append(conf, fmt.Sprintf("sentinel auth-pass %s %s", o.Master, o.Server.Password))
	}
	if o.SentinelPassword != "" {
		conf = append(conf, "sentinel sentinel-pass "+o.SentinelPassword)
	}
	for range 3 {
		path := filepath.Join(t.TempDir(), "sentinel.conf")
		if err := os.WriteFile(path, []byte(strings.Join(conf, "\n")+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		sn := start(t, Options{TLS: o.Server.TLS, Password: o.SentinelPassword}, false, path)
		s.Sentinels = append(s.Sentinels, sn)
		s.Addrs = append(s.Addrs, sn.Addr)
		c := redis.NewSentinelClient(&redis.Options{Addr: sn.Addr, Password: o.SentinelPassword, TLSConfig: tlsOf(o.Server)})
		t.Cleanup(func() { _ = c.Close() })
		s.clients = append(s.clients, c)
	}
	waitFor(t, "every sentinel knows the replica and the two other sentinels", func() bool {
		for _, c := range s.clients {
			m, err := c.Master(ctx, o.Master).Result()
			if err != nil || m["num-slaves"] != "1" || m["num-other-sentinels"] != "2" {
				return false
			}
		}
		return true
	})
	return s
}

func tlsOf(o Options) *tls.Config {
	if o.TLS == nil {
		return nil
	}
	return o.TLS.Client
}

// MasterAddr returns the master's address as the first sentinel that
// answers names it.
func (s *Sentinels) MasterAddr(t testing.TB) string {
	t.Helper()
	for _, c := range s.clients {
		addr, err := c.GetMasterAddrByName(context.Background(), s.Master).Result()
		if err == nil {
			return net.JoinHostPort(addr[0], addr[1])
		}
	}
	t.Fatal("redistest: no sentinel names the master")
	return ""
}

// Server returns the master or replica at addr.
func (s *Sentinels) Server(t testing.TB, addr string) *Server {
	t.Helper()
	for _, srv := range s.Servers {
		if srv.Addr == addr {
			return srv
		}
	}
	t.Fatalf("redistest: no server at %s", addr)
	return nil
}

// KillMaster kills the master (SIGKILL) and waits until the sentinels have
// promoted its replica; then it starts the killed server again, and waits
// until it replicates from the new master. It returns the new master.
func (s *Sentinels) KillMaster(t testing.TB) *Server {
	t.Helper()
	old := s.Server(t, s.MasterAddr(t))
	old.Kill(t)
	master := s.waitNewMaster(t, old.Addr)
	// Back as a replica from its first moment: a server that came back as
	// a master, with what it had when killed, could be promoted by a
	// later failover before the sentinels turn it into a replica.
	old.replicaOf(master.Addr)
	old.Restart(t)
	oc := old.Client(t)
	waitFor(t, "the old master replicates from the new one", func() bool {
		info, err := oc.Info(context.Background(), "replication").Result()
		return err == nil && redisproc.InfoField(info, "role") == "slave" &&
			redisproc.InfoField(info, "master_port") == master.Addr[strings.LastIndexByte(master.Addr, ':')+1:] &&
			redisproc.InfoField(info, "master_link_status") == "up"
	})
	return master
}

// Failover asks a sentinel to fail the master over to its replica (SENTINEL
// FAILOVER), and waits until the replica is the master, every sentinel
// names it, and the old master replicates from it. It returns the new
// master.
func (s *Sentinels) Failover(t testing.TB) *Server {
	t.Helper()
	old := s.MasterAddr(t)
	ctx := context.Background()
	if err := s.clients[0].Failover(ctx, s.Master).Err(); err != nil {
		t.Fatalf("redistest: SENTINEL FAILOVER: %v", err)
	}
	return s.waitNewMaster(t, old)
}

// waitNewMaster waits until every sentinel names the same master, not old,
// and it answers as master.
func (s *Sentinels) waitNewMaster(t testing.TB, old string) *Server {
	t.Helper()
	ctx := context.Background()
	var now string
	waitFor(t, "the sentinels name a new master", func() bool {
		now = ""
		for _, c := range s.clients {
			addr, err := c.GetMasterAddrByName(ctx, s.Master).Result()
			if err != nil {
				return false
			}
			a := net.JoinHostPort(addr[0], addr[1])
			if a == old || (now != "" && a != now) {
				return false
			}
			now = a
		}
		return true
	})
	master := s.Server(t, now)
	mc := master.Client(t)
	waitFor(t, "the new master answers as master", func() bool {
		info, err := mc.Info(ctx, "replication").Result()
		return err == nil && redisproc.InfoField(info, "role") == "master"
	})
	return master
}

// replicaOf makes the server replicate from addr when it starts again.
func (s *Server) replicaOf(addr string) {
	host, port, _ := net.SplitHostPort(addr)
	s.mu.Lock()
	defer s.mu.Unlock()
	var args []string
	for i := 0; i < len(s.opts.Args); i++ {
		if s.opts.Args[i] == "--replicaof" {
			i += 2
			continue
		}
		args = append(args, s.opts.Args[i])
	}
	s.opts.Args = append(args, "--replicaof", host, port)
}

// waitFor polls cond until it holds, or fails the test after
// sentinelTimeout.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(sentinelTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("redistest: %s: not within %v", what, sentinelTimeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
