// Package redistest starts real redis-server processes for tests.
//
// Every server gets its own port and temporary directory, and it is killed
// when the test that started it finishes, whether the test passed or not.
// redis-server (and, for clusters, redis-cli) must be on PATH; on Debian or
// Ubuntu run "apt-get install -y redis-server redis-tools".
package redistest

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redisproc"
)

const (
	startTimeout   = 10 * time.Second // for one server to answer PING
	clusterTimeout = 30 * time.Second // for a cluster to be created and usable
	pollInterval   = 20 * time.Millisecond
	startAttempts  = 5 // tries with fresh ports when a picked port is taken
	logName        = "redis.log"
)

// Server is a redis-server process started for one test.
//
// Its methods are safe for concurrent use.
type Server struct {
	// Addr is the "127.0.0.1:port" address the server listens on.
	Addr string
	// Dir is the server's working directory. It holds the log file
	// (redis.log), the AOF files and, for cluster nodes, nodes.conf.
	Dir string

	bin      string
	opts     Options
	cluster  bool
	sentinel string // the sentinel's config file; empty for a server

	mu   sync.Mutex
	cmd  *exec.Cmd     // nil while the server is not running
	done chan struct{} // closed when cmd has exited
}

// Options configures a Server started with Start.
type Options struct {
	// AppendOnly turns on the append-only file with "appendfsync always",
	// so that every acknowledged write survives Kill and Restart.
	AppendOnly bool
	// Args are extra redis-server arguments, appended after the defaults
	// so they can override them, e.g. "--maxmemory-policy", "allkeys-lru".
	Args []string
	// Port is the port to listen on. Zero picks a free port.
	Port int
	// TLS, when set, makes the server listen with TLS only, on Port.
	TLS *TLSServer
	// Password, when set, is the server's requirepass (and a replica's
	// masterauth).
	Password string
}

// TLSServer is the TLS setting of a server: its files, and whether it
// asks clients for a certificate.
type TLSServer struct {
	// Cert and Key are the server's certificate and key; CA verifies the
	// clients' certificates.
	Cert, Key, CA string
	// AuthClients makes the server require a client certificate.
	AuthClients bool
	// Client is how the harness (and Client) connect: it trusts the
	// server, and has a client certificate when AuthClients is set.
	Client *tls.Config
}

// Start starts a redis-server and waits until it answers PING.
//
// It calls t.Fatal if the server cannot be started, with the tail of the
// server's log in the message. The server is killed and its directory
// removed when the test finishes.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	return start(t, opts, false, "")
}

// start starts a server, a cluster node or, with a config file, a
// sentinel.
func start(t testing.TB, opts Options, cluster bool, sentinelConf string) *Server {
	t.Helper()
	s := &Server{
		Dir:      t.TempDir(), // registered before the kill below, so removed after it
		bin:      lookPath(t, "redis-server"),
		opts:     opts,
		cluster:  cluster,
		sentinel: sentinelConf,
	}
	t.Cleanup(func() {
		if err := s.kill(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			t.Logf("redistest: log of redis-server %s (tail):\n%s", s.Addr, s.logTail())
		}
	})

	var err error
	for range startAttempts {
		port := opts.Port
		if port == 0 {
			if port, err = freePort(cluster); err != nil {
				t.Fatalf("redistest: %v", err)
			}
		}
		s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if err = s.launch(true); err == nil {
			return s
		}
		// A picked port can be taken between picking and binding; try
		// another one. Any other failure will not go away by retrying.
		if opts.Port != 0 || !strings.Contains(s.logTail(), "Address already in use") {
			break
		}
	}
	t.Fatalf("redistest: start %s: %v\n--- %s (tail) ---\n%s",
		strings.Join(append([]string{s.bin}, s.args()...), " "), err, filepath.Join(s.Dir, logName), s.logTail())
	return nil
}

// Kill sends SIGKILL to the server and waits until it has exited. Killing a
// server that is not running does nothing.
func (s *Server) Kill(t testing.TB) {
	t.Helper()
	if err := s.kill(); err != nil {
		t.Fatal(err)
	}
}

// Restart starts the server again on the same port and in the same
// directory, so that it reloads its append-only file (and, for a cluster
// node, its nodes.conf), and waits until it answers PING. A server that is
// still running is killed first.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	if err := s.kill(); err != nil {
		t.Fatal(err)
	}
	if err := s.launch(false); err != nil {
		t.Fatalf("redistest: restart redis-server %s: %v\n--- %s (tail) ---\n%s",
			s.Addr, err, filepath.Join(s.Dir, logName), s.logTail())
	}
}

// Client returns a go-redis client connected to the server. The client is
// closed when the test finishes.
func (s *Server) Client(t testing.TB) *redis.Client {
	t.Helper()
	o := &redis.Options{Addr: s.Addr, Password: s.opts.Password}
	if s.opts.TLS != nil {
		o.TLSConfig = s.opts.TLS.Client
	}
	c := redis.NewClient(o)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func (s *Server) args() []string {
	_, port, _ := net.SplitHostPort(s.Addr)
	var args []string
	if s.sentinel != "" {
		// The config file comes first, and a sentinel rewrites it.
		args = append(args, s.sentinel, "--sentinel")
	}
	if tl := s.opts.TLS; tl != nil {
		auth := "no"
		if tl.AuthClients {
			auth = "yes"
		}
		args = append(args, "--port", "0", "--tls-port", port,
			"--tls-cert-file", tl.Cert, "--tls-key-file", tl.Key, "--tls-ca-cert-file", tl.CA,
			"--tls-auth-clients", auth, "--tls-replication", "yes")
	} else {
		args = append(args, "--port", port)
	}
	if s.opts.Password != "" {
		args = append(args, "--requirepass", s.opts.Password)
		if s.sentinel == "" {
			args = append(args, "--masterauth", s.opts.Password)
		}
	}
	if s.sentinel != "" {
		return append(append(args, "--bind", "127.0.0.1", "--protected-mode", "no", "--daemonize", "no", "--dir", s.Dir), s.opts.Args...)
	}
	args = append(args,
		"--bind", "127.0.0.1",
		"--protected-mode", "no",
		"--daemonize", "no",
		"--save", "",
		"--dir", s.Dir,
		"--repl-diskless-sync-delay", "0", // replicas sync at once, not after 5s
	)
	if s.opts.AppendOnly {
		args = append(args, "--appendonly", "yes", "--appendfsync", "always")
	}
	if s.cluster {
		args = append(args, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000")
	}
	return append(args, s.opts.Args...)
}

// launch starts the process and waits until it answers PING. The log file
// is truncated first when fresh is set and appended to otherwise.
func (s *Server) launch(fresh bool) error {
	flags := os.O_CREATE | os.O_WRONLY | os.O_APPEND
	if fresh {
		flags |= os.O_TRUNC
	}
	logFile, err := os.OpenFile(filepath.Join(s.Dir, logName), flags, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(s.bin, s.args()...)
	cmd.Dir = s.Dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = sysProcAttr()
	err = cmd.Start()
	_ = logFile.Close() // the child has its own copy
	if err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()

	s.mu.Lock()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()

	var tlsConf *tls.Config
	if s.opts.TLS != nil {
		tlsConf = s.opts.TLS.Client
	}
	if err := waitReady(s.Addr, cmd.Process.Pid, done, tlsConf, s.opts.Password); err != nil {
		_ = s.kill()
		return err
	}
	return nil
}

func (s *Server) kill() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return nil
	}
	killProcess(s.cmd.Process)
	select {
	case <-s.done:
	case <-time.After(startTimeout):
		return fmt.Errorf("redistest: redis-server %s (pid %d) still running %v after SIGKILL",
			s.Addr, s.cmd.Process.Pid, startTimeout)
	}
	s.cmd, s.done = nil, nil
	return nil
}

// logTail returns the last lines of the server's log.
func (s *Server) logTail() string {
	b, err := os.ReadFile(filepath.Join(s.Dir, logName))
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// waitReady polls addr until the redis-server with the given pid answers
// PING, or until exited is closed or startTimeout has passed.
func waitReady(addr string, pid int, exited <-chan struct{}, tlsConf *tls.Config, password string) error {
	deadline := time.Now().Add(startTimeout)
	for {
		select {
		case <-exited:
			return errors.New("redis-server exited before answering PING")
		default:
		}
		err := redisproc.PingOwnWith(addr, pid, 500*time.Millisecond, tlsConf, password)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no PING reply within %v: %w", startTimeout, err)
		}
		select {
		case <-exited:
		case <-time.After(pollInterval):
		}
	}
}

func lookPath(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("redistest: %s not found on PATH (%v): install redis-server and redis-cli, "+
			"e.g. apt-get install -y redis-server redis-tools", name, err)
	}
	return p
}

// freePort returns a port that is free at the moment. Cluster nodes also
// need port+10000 for the cluster bus, so their ports come from 20000-45000.
func freePort(cluster bool) (int, error) {
	if !cluster {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, fmt.Errorf("pick a free port: %w", err)
		}
		defer l.Close()
		return l.Addr().(*net.TCPAddr).Port, nil
	}
	for range 100 {
		port := 20000 + rand.IntN(25001)
		if portFree(port) && portFree(port+10000) {
			return port, nil
		}
	}
	return 0, errors.New("no free port pair (port, port+10000) found in 20000-45000")
}

func portFree(port int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}
