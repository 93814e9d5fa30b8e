package main

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/creditsgw/caddy-credits/internal/redisproc"
)

const (
	startTimeout = 30 * time.Second      // for a child to become ready
	pollInterval = 20 * time.Millisecond // between readiness checks
)

// redisArgs are the settings of every redis-server the benchmark starts:
// no persistence, so that disk writes do not blur the figures. Production
// runs with appendonly yes (see README.md); the output says which was used.
var redisArgs = []string{"--appendonly", "no", "--save", ""}

// startRedis starts a redis-server on a free loopback port and waits until
// it answers PING. It returns the server and its address.
func startRedis(ctx context.Context, ps *procs, name string) (*proc, string, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, "", fmt.Errorf("redis-server not found on PATH (%v): install it, e.g. apt-get install -y redis-server", err)
	}
	var lastErr error
	// A port found free can be taken before redis-server binds it; then
	// another one is tried.
	for range 5 {
		port, err := freePort()
		if err != nil {
			return nil, "", err
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		args := append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--protected-mode", "no",
			"--daemonize", "no", "--dir", ps.dir, "--dbfilename", name + ".rdb"}, redisArgs...)
		p, err := ps.start(name, exec.Command(bin, args...))
		if err != nil {
			return nil, "", err
		}
		err = awaitReady(ctx, p, func() error { return redisproc.PingOwn(addr, p.cmd.Process.Pid, time.Second) })
		if err == nil {
			return p, addr, nil
		}
		lastErr = p.failed(err)
		_ = p.stop()
		if !strings.Contains(p.logTail(), "Address already in use") {
			break
		}
	}
	return nil, "", lastErr
}

// awaitReady polls ready until it succeeds, the child exits, ctx ends or
// startTimeout passes.
func awaitReady(ctx context.Context, p *proc, ready func() error) error {
	deadline := time.Now().Add(startTimeout)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		if p.exited() {
			return fmt.Errorf("exited before it was ready (last check: %v)", err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready within %v: %w", startTimeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.done:
		case <-time.After(pollInterval):
		}
	}
}

// freePort returns a loopback port that is free at the moment.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
