package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/redis/go-redis/v9"
)

func TestServerSetGet(t *testing.T) {
	s := Start(t, Options{Args: []string{"--maxmemory-policy", "allkeys-lru"}})
	c := s.Client(t)
	ctx := context.Background()
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if got, err := c.Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Fatalf("GET k = %q, %v; want \"v\"", got, err)
	}
	for param, want := range map[string]string{"save": "", "appendonly": "no", "maxmemory-policy": "allkeys-lru", "dir": s.Dir} {
		got, err := c.ConfigGet(ctx, param).Result()
		if err != nil || got[param] != want {
			t.Errorf("CONFIG GET %s = %v, %v; want %q", param, got, err, want)
		}
	}
	if _, err := os.Stat(filepath.Join(s.Dir, logName)); err != nil {
		t.Errorf("log file: %v", err)
	}
}

func TestAppendOnlyKillRestart(t *testing.T) {
	s := Start(t, Options{AppendOnly: true})
	c := s.Client(t)
	ctx := context.Background()
	if err := c.Set(ctx, "durable", "yes", 0).Err(); err != nil {
		t.Fatal(err)
	}
	pid := s.cmd.Process.Pid
	addr := s.Addr

	s.Kill(t)
	if processAlive(pid) {
		t.Fatalf("pid %d still alive after Kill", pid)
	}
	if conn, err := net.Dial("tcp", addr); err == nil {
		conn.Close()
		t.Fatalf("%s still accepts connections after Kill", addr)
	}
	s.Kill(t) // killing a dead server is a no-op

	s.Restart(t)
	if s.Addr != addr {
		t.Fatalf("Addr changed from %s to %s on Restart", addr, s.Addr)
	}
	if got, err := c.Get(ctx, "durable").Result(); err != nil || got != "yes" {
		t.Fatalf("GET durable after restart = %q, %v; want \"yes\"", got, err)
	}
}

func TestCleanupKillsServer(t *testing.T) {
	var pid int
	var dir string
	t.Run("server", func(t *testing.T) {
		s := Start(t, Options{})
		if err := s.Client(t).Ping(context.Background()).Err(); err != nil {
			t.Fatal(err)
		}
		pid, dir = s.cmd.Process.Pid, s.Dir
	})
	if processAlive(pid) {
		t.Errorf("redis-server pid %d still alive after cleanup", pid)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("dir %s not removed after cleanup: %v", dir, err)
	}
	if runtime.GOOS == "linux" {
		if kids := redisChildren(t); len(kids) > 0 {
			t.Errorf("redis-server children left after cleanup: %v", kids)
		}
	}
}

func TestStartFailureShowsLog(t *testing.T) {
	msg := expectFatal(t, func(tb testing.TB) {
		Start(tb, Options{Args: []string{"--no-such-directive", "x"}})
	})
	if !strings.Contains(msg, "Bad directive") {
		t.Errorf("fatal message lacks the log tail:\n%s", msg)
	}
}

func TestPortInUse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	msg := expectFatal(t, func(tb testing.TB) {
		Start(tb, Options{Port: l.Addr().(*net.TCPAddr).Port})
	})
	if !strings.Contains(msg, "Address already in use") {
		t.Errorf("fatal message lacks the bind error:\n%s", msg)
	}
}

func TestMissingRedisServer(t *testing.T) {
	t.Setenv("PATH", "")
	msg := expectFatal(t, func(tb testing.TB) { Start(tb, Options{}) })
	if !strings.Contains(msg, "install redis-server") {
		t.Errorf("fatal message does not say to install redis-server:\n%s", msg)
	}
}

func TestKeySlot(t *testing.T) {
	if got := keySlot("123456789"); got != 12739 { // CRC16/XMODEM check value 0x31C3
		t.Fatalf("keySlot(123456789) = %d, want 12739", got)
	}
	// keyInSlots must terminate for every single-slot range.
	seen := make(map[int]bool)
	for i := 0; len(seen) < slotCount; i++ {
		if i > 1_000_000 {
			t.Fatalf("only %d slots reached by probe keys", len(seen))
		}
		seen[keySlot("redistest:probe:"+strconv.Itoa(i))] = true
	}
}

func TestCluster(t *testing.T) {
	t.Parallel()
	c := StartCluster(t, 3, 0)
	if len(c.Nodes) != 3 || len(c.Addrs) != 3 {
		t.Fatalf("got %d nodes, %d addrs; want 3", len(c.Nodes), len(c.Addrs))
	}
	cc := c.Client(t)
	ctx := context.Background()

	ranges, err := cc.ClusterSlots(ctx).Result()
	if err != nil || len(ranges) != 3 {
		t.Fatalf("CLUSTER SLOTS = %v, %v; want 3 ranges", ranges, err)
	}
	hit := make([]int, len(ranges))
	for i := range 100 {
		key := fmt.Sprintf("key:%d", i)
		slot, err := cc.ClusterKeySlot(ctx, key).Result()
		if err != nil || int(slot) != keySlot(key) {
			t.Fatalf("CLUSTER KEYSLOT %s = %d, %v; keySlot says %d", key, slot, err, keySlot(key))
		}
		for j, r := range ranges {
			if int(slot) >= r.Start && int(slot) <= r.End {
				hit[j]++
			}
		}
		if err := cc.Set(ctx, key, i, 0).Err(); err != nil {
			t.Fatalf("SET %s: %v", key, err)
		}
	}
	for j, n := range hit {
		if n == 0 {
			t.Fatalf("no key in slot range %d-%d", ranges[j].Start, ranges[j].End)
		}
	}
	for i := range 100 {
		key := fmt.Sprintf("key:%d", i)
		if got, err := cc.Get(ctx, key).Int(); err != nil || got != i {
			t.Fatalf("GET %s = %d, %v; want %d", key, got, err, i)
		}
	}
	// Each master holds some of the keys.
	err = cc.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
		if n, err := m.DBSize(ctx).Result(); err != nil || n == 0 {
			return fmt.Errorf("master %s: DBSIZE = %d, %v", m.Options().Addr, n, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestClusterWithReplicas(t *testing.T) {
	t.Parallel()
	c := StartCluster(t, 3, 1)
	if len(c.Nodes) != 6 {
		t.Fatalf("got %d nodes, want 6", len(c.Nodes))
	}
	cc := c.Client(t)
	ctx := context.Background()
	var replicas atomic.Int32
	err := cc.ForEachSlave(ctx, func(ctx context.Context, r *redis.Client) error {
		replicas.Add(1)
		return r.Ping(ctx).Err()
	})
	if err != nil || replicas.Load() != 3 {
		t.Fatalf("ForEachSlave visited %d replicas, err %v; want 3", replicas.Load(), err)
	}
	for i := range 20 {
		key := fmt.Sprintf("{user%d}:credits", i)
		if err := cc.IncrBy(ctx, key, 5).Err(); err != nil {
			t.Fatalf("INCRBY %s: %v", key, err)
		}
		if got, err := cc.Get(ctx, key).Int(); err != nil || got != 5 {
			t.Fatalf("GET %s = %d, %v; want 5", key, got, err)
		}
	}
}

// fatalTB records the message of a Fatal call instead of failing the test.
type fatalTB struct {
	testing.TB
	msg string
}

func (f *fatalTB) Fatal(args ...any) { f.msg = fmt.Sprint(args...); runtime.Goexit() }
func (f *fatalTB) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// expectFatal runs fn and returns the message it passed to t.Fatal.
func expectFatal(t *testing.T, fn func(testing.TB)) string {
	t.Helper()
	f := &fatalTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(f)
	}()
	<-done
	if f.msg == "" {
		t.Fatal("expected a call to t.Fatal")
	}
	return f.msg
}

func processAlive(pid int) bool {
	p, err := os.FindProcess(pid)
	if err != nil {
		return false
	}
	err = p.Signal(syscall.Signal(0))
	return err == nil || errors.Is(err, syscall.EPERM)
}

// redisChildren lists child processes of the test binary whose name starts
// with "redis", read from /proc.
func redisChildren(t *testing.T) []string {
	t.Helper()
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		t.Fatal(err)
	}
	var kids []string
	for _, path := range stats {
		b, err := os.ReadFile(path)
		if err != nil {
			continue // the process went away
		}
		// Format: "pid (comm) state ppid ...", and comm may contain spaces.
		s := string(b)
		open, closing := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || closing < open {
			continue
		}
		fields := strings.Fields(s[closing+1:])
		if len(fields) > 1 && fields[1] == strconv.Itoa(os.Getpid()) && strings.HasPrefix(s[open+1:closing], "redis") {
			kids = append(kids, strings.TrimSpace(s[:open])+" "+s[open+1:closing])
		}
	}
	return kids
}

// TestSentinelFailover starts a sentinel set over TLS with passwords and
// fails it over: the replica becomes the master the sentinels name.
func TestSentinelFailover(t *testing.T) {
	ca := NewCA(t, "test")
	s := StartSentinel(t, SentinelOptions{Master: "m1", Server: Options{TLS: ca.Server(t, true), Password: "pw"}, SentinelPassword: "spw"})
	before := s.MasterAddr(t)
	if before != s.Servers[0].Addr {
		t.Fatalf("the sentinels name %s, not the first master %s", before, s.Servers[0].Addr)
	}
	after := s.Failover(t)
	if after != s.Servers[1] {
		t.Fatalf("the new master is %s, want the replica %s", after.Addr, s.Servers[1].Addr)
	}
}
