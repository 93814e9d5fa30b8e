package redisproc_test

import (
	"context"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/internal/redisproc"
	"github.com/creditsgw/caddy-credits/internal/redistest"
)

func TestPingOwn(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	info, err := srv.Client(t).Info(context.Background(), "server").Result()
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(redisproc.InfoField(info, "process_id"))
	if err != nil || pid <= 0 {
		t.Fatalf("process_id %q in INFO", redisproc.InfoField(info, "process_id"))
	}
	if err := redisproc.PingOwn(srv.Addr, pid, time.Second); err != nil {
		t.Fatalf("the server's own pid: %v", err)
	}
	if err := redisproc.PingOwn(srv.Addr, pid+1, time.Second); err == nil || !strings.Contains(err.Error(), "not by pid") {
		t.Fatalf("another pid: %v", err)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	if err := redisproc.PingOwn(addr, pid, time.Second); err == nil {
		t.Fatal("a port nobody listens on answered")
	}
}

func TestInfoField(t *testing.T) {
	info := "# Server\r\nredis_version:7.0.15\r\nprocess_id:42\r\n# Memory\r\nused_memory:1024\r\n"
	for key, want := range map[string]string{"redis_version": "7.0.15", "process_id": "42", "used_memory": "1024", "used": "", "missing": ""} {
		if got := redisproc.InfoField(info, key); got != want {
			t.Errorf("%s: %q, want %q", key, got, want)
		}
	}
}
