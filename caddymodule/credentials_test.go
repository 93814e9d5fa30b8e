package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// credentialsCaddyfile has a metered route on a Redis at redisURL, and
// Caddy's admin endpoint at admin, for caddy reload.
const credentialsCaddyfile = `{
	admin %[1]s
	credits {
		redis %[2]s
	}
}
http://%[3]s {
	credits {
		org {header.X-Org-Id}
		feature rich-text
	}
	respond "ok"
}
`

// TestRedisCredentials: a Redis that refuses the URL's password fails
// caddy run, caddy validate and caddy reload (the old config goes on
// serving), with a message that names the problem and never the password;
// a Redis that does not answer at start is only a warning.
func TestRedisCredentials(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	if err := srv.Client(t).ConfigSet(context.Background(), "requirepass", "right-pass-6f1c").Err(); err != nil {
		t.Fatal(err)
	}
	const wrong = "wrong-pass-93ad"
	site, admin := fmt.Sprintf("127.0.0.1:%d", freePort(t)), fmt.Sprintf("127.0.0.1:%d", freePort(t))
	dir := t.TempDir()
	write := func(name, redisURL string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(fmt.Sprintf(credentialsCaddyfile, admin, redisURL, site)), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	wrongPath := write("wrong", "redis://:"+wrong+"@"+srv.Addr)
	noPassword := write("none", "redis://"+srv.Addr)

	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"run, wrong password", []string{"run", "--config", wrongPath, "--adapter", "caddyfile"}, "WRONGPASS"},
		{"validate, wrong password", []string{"validate", "--config", wrongPath, "--adapter", "caddyfile"}, "WRONGPASS"},
		{"run, no password", []string{"run", "--config", noPassword, "--adapter", "caddyfile"}, "NOAUTH"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := runCaddyCommand(t, tc.args...)
			if exitErr, ok := errors.AsType[*exec.ExitError](err); !ok || exitErr.ExitCode() == 0 {
				t.Fatalf("caddy %s: %v, want a non-zero exit\n%s", tc.args[0], err, out)
			}
			all := out + err.Error()
			if !strings.Contains(all, "refused the gateway's credentials") || !strings.Contains(all, tc.want) || !strings.Contains(all, srv.Addr) {
				t.Errorf("the output does not name the problem (%s at %s):\n%s", tc.want, srv.Addr, all)
			}
			if strings.Contains(all, wrong) || strings.Contains(all, "right-pass-6f1c") {
				t.Errorf("the output shows a password:\n%s", all)
			}
		})
	}

	t.Run("reload", func(t *testing.T) {
		good := fmt.Sprintf(credentialsCaddyfile, admin, "redis://:right-pass-6f1c@"+srv.Addr, site)
		p := startCaddyProcess(t, good, site, admin)
		call := func() int {
			req, _ := http.NewRequest(http.MethodGet, "http://"+site+"/", nil)
			req.Header.Set("X-Org-Id", "acme")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			return resp.StatusCode
		}
		// A new org has no credits (default_plan 0): refused, which takes Redis.
		if status := call(); status != http.StatusPaymentRequired {
			t.Fatalf("a call before the reload: %d, want 402", status)
		}
		out, err := runCaddyCommand(t, "reload", "--config", wrongPath, "--adapter", "caddyfile", "--address", admin)
		if err == nil {
			t.Fatalf("caddy reload to a wrong password succeeded:\n%s", out)
		}
		if all := out + err.Error(); strings.Contains(all, wrong) || !strings.Contains(all, "WRONGPASS") {
			t.Errorf("caddy reload's output shows the password, or does not name the problem:\n%s", all)
		}
		if status := call(); status != http.StatusPaymentRequired {
			t.Fatalf("a call after the refused reload: %d, want 402 from the old config", status)
		}
		if log := p.output(); strings.Contains(log, wrong) {
			t.Errorf("caddy's log shows the password:\n%s", log)
		}
	})

	t.Run("unreachable at start", func(t *testing.T) {
		dead := fmt.Sprintf("redis://127.0.0.1:%d", freePort(t))
		otherSite, otherAdmin := fmt.Sprintf("127.0.0.1:%d", freePort(t)), fmt.Sprintf("127.0.0.1:%d", freePort(t))
		p := startCaddyProcess(t, fmt.Sprintf(credentialsCaddyfile, otherAdmin, dead, otherSite), otherSite)
		eventually(t, "the warning is logged", func() bool {
			return strings.Contains(p.output(), `"level":"warn"`) && strings.Contains(p.output(), "cannot reach Redis at start")
		})
		resp, err := http.Get("http://" + otherSite + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		// No org header: 401 needs no store; the route is up.
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("a call while Redis is unreachable: %d, want 401", resp.StatusCode)
		}
	})
}
