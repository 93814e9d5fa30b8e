// Package redisproc has what the test harness and the load benchmark both
// need to tell that a redis-server they started is up: a probe that asks it
// for its process id, and a reader of INFO fields.
package redisproc

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// PingOwn sends PING and INFO server over a plain connection (a go-redis
// client backs off after failed dials, which slows polling down) and checks
// the reported process_id, so that another server that happens to listen on
// the same port is not mistaken for the one with pid. It gives up after
// timeout.
func PingOwn(addr string, pid int, timeout time.Duration) error {
	return PingOwnWith(addr, pid, timeout, nil, "")
}

// PingOwnWith is PingOwn over TLS with tlsConf (nil is plain TCP), after
// AUTH with password when it is not empty.
func PingOwnWith(addr string, pid int, timeout time.Duration, tlsConf *tls.Config, password string) error {
	dialer := &net.Dialer{Timeout: min(250*time.Millisecond, timeout)}
	var conn net.Conn
	var err error
	if tlsConf != nil {
		conn, err = tls.DialWithDialer(dialer, "tcp", addr, tlsConf)
	} else {
		conn, err = dialer.Dial("tcp", addr)
	}
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	r := bufio.NewReader(conn)
	if password != "" {
		if _, err := fmt.Fprintf(conn, "*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n", len(password), password); err != nil {
			return err
		}
		if line, err := r.ReadString('\n'); err != nil || line != "+OK\r\n" {
			return fmt.Errorf("AUTH: %q %v", strings.TrimSpace(line), err)
		}
	}
	if _, err := conn.Write([]byte("PING\r\nINFO server\r\n")); err != nil {
		return err
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" { // e.g. "-LOADING ..." while the AOF is read
		return fmt.Errorf("PING: %s", strings.TrimSpace(line))
	}
	if line, err = r.ReadString('\n'); err != nil {
		return err
	}
	n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "$")))
	if !strings.HasPrefix(line, "$") || err != nil {
		return fmt.Errorf("INFO: %s", strings.TrimSpace(line))
	}
	info := make([]byte, n)
	if _, err := io.ReadFull(r, info); err != nil {
		return err
	}
	if got := InfoField(string(info), "process_id"); got != strconv.Itoa(pid) {
		return fmt.Errorf("%s is served by pid %s, not by pid %d", addr, got, pid)
	}
	return nil
}

// InfoField returns the value of "key:value" in INFO or CLUSTER INFO output
// (or any text of such lines).
func InfoField(info, key string) string {
	for line := range strings.Lines(info) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), key+":"); ok {
			return v
		}
	}
	return ""
}
