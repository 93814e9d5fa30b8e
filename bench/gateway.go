package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Paths of the two routes; both proxy to the same upstream.
const (
	meteredPath  = "/metered/v1/generate"
	budgetedPath = "/budgeted/v1/generate"
	plainPath    = "/plain/v1/generate"
)

// caddyfileTemplate is the gateway under test. Both routes keep as many
// idle upstream connections as the 2,000-connection scenario needs, so that
// neither measures TCP handshakes (Caddy keeps 32 per host by default).
const caddyfileTemplate = `{
	admin {ADMIN}
	credits {
		redis redis://{REDIS}
		timeout 1s
		default_plan 1000000000000{OPTIONS}
	}
}

http://127.0.0.1:{PORT} {
	route /metered/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature bench
		}
		reverse_proxy {UPSTREAM} {
			{TRANSPORT}
		}
	}
	route /budgeted/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature bench
			budget {http.request.header.X-User-Id}
		}
		reverse_proxy {UPSTREAM} {
			{TRANSPORT}
		}
	}
	route /plain/* {
		reverse_proxy {UPSTREAM} {
			{TRANSPORT}
		}
	}
}
`

const upstreamTransport = `transport http {
				keepalive_idle_conns 4096
				keepalive_idle_conns_per_host 4096
			}`

// moduleRoot returns the directory of the module the go command finds from
// the working directory: the project, for "go run ./bench" at its root and
// for "go test ./bench/".
func moduleRoot(ctx context.Context, goBin string) (string, error) {
	out, err := exec.CommandContext(ctx, goBin, "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the caddy-credits module: run the benchmark from the repository")
	}
	return filepath.Dir(gomod), nil
}

// buildBinaries builds the project's Caddy and the upstream into dir.
func buildBinaries(ctx context.Context, dir string) (caddyBin, upstreamBin string, err error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", "", fmt.Errorf("the go command is not on PATH: %w", err)
	}
	root, err := moduleRoot(ctx, goBin)
	if err != nil {
		return "", "", err
	}
	caddyBin, upstreamBin = filepath.Join(dir, "caddy"), filepath.Join(dir, "upstream")
	for pkg, out := range map[string]string{"./cmd/caddy": caddyBin, "./bench/upstream": upstreamBin} {
		cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, pkg)
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
		}
	}
	return caddyBin, upstreamBin, nil
}

// startUpstream starts the upstream on a free port and returns it and its
// address, which it prints once it listens.
func startUpstream(ctx context.Context, ps *procs, bin string) (*proc, string, error) {
	cmd := exec.Command(bin)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, "", err
	}
	p, err := ps.start("upstream", cmd)
	if err != nil {
		return nil, "", err
	}
	lines := make(chan string, 1)
	go func() {
		r := bufio.NewReader(stdout)
		line, _ := r.ReadString('\n')
		lines <- strings.TrimSpace(line)
		_, _ = io.Copy(io.Discard, r)
	}()
	select {
	case addr := <-lines:
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return p, "", p.failed(fmt.Errorf("it printed %q, not its address", addr))
		}
		return p, addr, nil
	case <-ctx.Done():
		return p, "", ctx.Err()
	case <-time.After(startTimeout):
		return p, "", p.failed(fmt.Errorf("no address printed within %v", startTimeout))
	}
}

// gateway is the running Caddy.
type gateway struct {
	proc *proc
	base string // http://127.0.0.1:port
	// admin is the admin endpoint's URL, where Caddy serves its pprof
	// profiles; empty when it is off.
	admin string
}

// profile writes a CPU profile of Caddy over the next d to path.
func (g *gateway) profile(ctx context.Context, d time.Duration, path string) error {
	url := fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", g.admin, int(d/time.Second))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("CPU profile: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("CPU profile: %s: %s", resp.Status, b)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return fmt.Errorf("CPU profile: %w", err)
	}
	return f.Close()
}

// startGateway writes the Caddyfile, with options as extra lines of the
// credits global option, and starts Caddy on it (with its admin endpoint
// on a free port when admin is set, for its CPU profiles), then waits
// until both routes answer, and checks that the metered one charges and
// the plain one does not.
func startGateway(ctx context.Context, ps *procs, bin, redisAddr, upstreamAddr string, options []string, admin bool) (*gateway, error) {
	var extra strings.Builder
	for _, o := range options {
		extra.WriteString("\n\t\t" + o)
	}
	var lastErr error
	// A port found free can be taken before Caddy binds it; then another
	// one is tried.
	for range 5 {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		adminAddr := "off"
		if admin {
			adminPort, err := freePort()
			if err != nil {
				return nil, err
			}
			adminAddr = "127.0.0.1:" + strconv.Itoa(adminPort)
		}
		cfg := strings.NewReplacer(
			"{ADMIN}", adminAddr,
			"{REDIS}", redisAddr,
			"{PORT}", strconv.Itoa(port),
			"{UPSTREAM}", upstreamAddr,
			"{TRANSPORT}", upstreamTransport,
			"{OPTIONS}", extra.String(),
		).Replace(caddyfileTemplate)
		cfgPath := filepath.Join(ps.dir, "Caddyfile")
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
			return nil, err
		}
		cmd := exec.Command(bin, "run", "--config", cfgPath, "--adapter", "caddyfile")
		// Caddy's own files (autosave, certificates) stay in the run's
		// directory, not in the user's home.
		cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+ps.dir, "XDG_CONFIG_HOME="+ps.dir)
		p, err := ps.start("caddy", cmd)
		if err != nil {
			return nil, err
		}
		g := &gateway{proc: p, base: "http://127.0.0.1:" + strconv.Itoa(port)}
		if admin {
			g.admin = "http://" + adminAddr
		}
		client := &http.Client{Timeout: 2 * time.Second}
		err = awaitReady(ctx, p, func() error {
			_, err := g.probe(client, plainPath)
			return err
		})
		if err == nil {
			return g, g.check(client)
		}
		lastErr = p.failed(err)
		_ = p.stop()
		if !strings.Contains(p.logTail(), "address already in use") {
			break
		}
	}
	return nil, lastErr
}

// probe sends one request as org bench-probe and returns its response
// headers; anything but a 200 is an error.
func (g *gateway) probe(client *http.Client, path string) (http.Header, error) {
	req, err := http.NewRequest(http.MethodGet, g.base+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("X-Org-Id", "bench-probe")
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", path, resp.Status, body)
	}
	return resp.Header, nil
}

// check makes sure the metered route meters and the plain one does not,
// so that neither figure is of the wrong thing.
func (g *gateway) check(client *http.Client) error {
	h, err := g.probe(client, meteredPath)
	if err != nil {
		return g.proc.failed(err)
	}
	if got := h.Get("Credits-Charged"); got != "1" {
		return g.proc.failed(fmt.Errorf("the metered route answered Credits-Charged %q, want 1", got))
	}
	if h, err = g.probe(client, plainPath); err != nil {
		return g.proc.failed(err)
	}
	if got := h.Get("Credits-Charged"); got != "" {
		return g.proc.failed(fmt.Errorf("the plain route answered Credits-Charged %q, want none", got))
	}
	return nil
}
