package caddymodule

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

var caddyBinary struct {
	once sync.Once
	dir  string
	path string
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if caddyBinary.dir != "" {
		os.RemoveAll(caddyBinary.dir)
	}
	os.Exit(code)
}

// buildCaddy builds ./cmd/caddy once per test run and returns its path.
func buildCaddy(t testing.TB) string {
	t.Helper()
	caddyBinary.once.Do(func() {
		caddyBinary.dir, caddyBinary.err = os.MkdirTemp("", "credits-caddy-")
		if caddyBinary.err != nil {
			return
		}
		caddyBinary.path = filepath.Join(caddyBinary.dir, "caddy")
		out, err := exec.Command("go", "build", "-o", caddyBinary.path, "../cmd/caddy").CombinedOutput()
		if err != nil {
			caddyBinary.err = fmt.Errorf("go build ./cmd/caddy: %v\n%s", err, out)
		}
	})
	if caddyBinary.err != nil {
		t.Fatal(caddyBinary.err)
	}
	return caddyBinary.path
}

// runCaddyCommand runs the built caddy with args and returns its standard
// output; an error carries its standard error.
func runCaddyCommand(t *testing.T, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, buildCaddy(t), args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%w: %s", err, stderr.String())
	}
	return stdout.String(), nil
}

// caddyProcess is the built caddy running a config in its own process.
type caddyProcess struct {
	cmd *exec.Cmd
	log *bytes.Buffer
	mu  *sync.Mutex
}

type lockedBuffer struct {
	mu  *sync.Mutex
	buf *bytes.Buffer
}

func (b lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// startCaddyProcess runs `caddy run` on a Caddyfile and waits until every
// address in ready accepts connections.
func startCaddyProcess(t testing.TB, caddyfile string, ready ...string) *caddyProcess {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(caddyfile), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &caddyProcess{log: &bytes.Buffer{}, mu: &sync.Mutex{}}
	p.cmd = exec.Command(buildCaddy(t), "run", "--config", path, "--adapter", "caddyfile")
	p.cmd.Dir = dir
	p.cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	p.cmd.Stdout = lockedBuffer{p.mu, p.log}
	p.cmd.Stderr = lockedBuffer{p.mu, p.log}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		p.cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("caddy log:\n%s", p.output())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for _, addr := range ready {
		for {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-exited:
				t.Fatalf("caddy exited: %s", p.output())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("caddy did not listen on %s: %s", addr, p.output())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return p
}

func (p *caddyProcess) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// demoCaddyfile is the repository's demo Caddyfile on free ports, with
// Caddy's own admin endpoint off so that tests do not collide.
func demoCaddyfile(t *testing.T) (cfg string, gateway, admin string) {
	t.Helper()
	data, err := os.ReadFile("../Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	// The demo serves web/ relative to the repository root; caddy runs in a
	// temporary directory here.
	web, err := filepath.Abs("../web")
	if err != nil {
		t.Fatal(err)
	}
	gw, backend, adm := freePort(t), freePort(t), freePort(t)
	cfg = strings.NewReplacer(
		":8080", fmt.Sprintf(":%d", gw),
		":9090", fmt.Sprintf(":%d", backend),
		":2020", fmt.Sprintf(":%d", adm),
		"127.0.0.1:9090", fmt.Sprintf("127.0.0.1:%d", backend),
		"root * web\n", fmt.Sprintf("root * %q\n", web),
	).Replace(string(data))
	if !strings.Contains(cfg, "{\n\tcredits {") {
		t.Fatal("the demo Caddyfile's global options do not start with credits")
	}
	cfg = strings.Replace(cfg, "{\n\tcredits {", "{\n\tadmin off\n\tcredits {", 1)
	return cfg, fmt.Sprintf("127.0.0.1:%d", gw), fmt.Sprintf("127.0.0.1:%d", adm)
}
