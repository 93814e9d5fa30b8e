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

// TestRedisEnvPlaceholders: a {env.*} placeholder of the Redis settings
// that is empty in the Caddy process stops it at start, naming the
// variable (not Redis' NOAUTH, nor a silent embedded store); {$VAR} is
// read where the Caddyfile is adapted, so caddy reload from a shell with
// the variable works, where {env.VAR} does not.
func TestRedisEnvPlaceholders(t *testing.T) {
	const password = "env-pass-7d21"
	srv := redistest.Start(t, redistest.Options{})
	if err := srv.Client(t).ConfigSet(context.Background(), "requirepass", password).Err(); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"CREDITS_TEST_REDIS_URL", "CREDITS_TEST_REDIS_PASS"} {
		if os.Getenv(v) != "" {
			t.Fatalf("%s is set in the test's environment", v)
		}
	}
	dir := t.TempDir()
	write := func(name, store string) string {
		t.Helper()
		cfg := fmt.Sprintf(credentialsCaddyfile, "off", store, fmt.Sprintf("127.0.0.1:%d", freePort(t)))
		// The store line is the redis option's: others replace it whole.
		cfg = strings.Replace(cfg, "redis redis_sentinel", "redis_sentinel", 1)
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}

	for _, tc := range []struct {
		name, store, want string
	}{
		{"the whole URL", "{env.CREDITS_TEST_REDIS_URL}", "redis: CREDITS_TEST_REDIS_URL is empty"},
		{"the password in the URL", "redis://:{env.CREDITS_TEST_REDIS_PASS}@" + srv.Addr, "redis: CREDITS_TEST_REDIS_PASS is empty"},
		{"the sentinel password", fmt.Sprintf("redis_sentinel main %s {\n\t\t\tsentinel_password {env.CREDITS_TEST_REDIS_PASS}\n\t\t}", srv.Addr),
			"redis_sentinel sentinel_password: CREDITS_TEST_REDIS_PASS is empty"},
		{"{$VAR} empty", "{$CREDITS_TEST_REDIS_URL}", "redis needs a redis:// or rediss:// URL; a {$VAR} that is empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := write(strings.ReplaceAll(tc.name, " ", "-"), tc.store)
			out, err := runCaddyCommand(t, "run", "--config", path, "--adapter", "caddyfile")
			if exitErr, ok := errors.AsType[*exec.ExitError](err); !ok || exitErr.ExitCode() == 0 {
				t.Fatalf("caddy run: %v, want a non-zero exit\n%s", err, out)
			}
			if all := out + err.Error(); !strings.Contains(all, tc.want) || strings.Contains(all, "NOAUTH") {
				t.Errorf("the output does not say %q (or blames Redis):\n%s", tc.want, all)
			}
		})
	}

	t.Run("reload from a shell", func(t *testing.T) {
		site, admin := fmt.Sprintf("127.0.0.1:%d", freePort(t)), fmt.Sprintf("127.0.0.1:%d", freePort(t))
		cfg := func(redisURL string) string { return fmt.Sprintf(credentialsCaddyfile, admin, redisURL, site) }
		// The Caddy process starts without the variable.
		p := startCaddyProcess(t, cfg("redis://:"+password+"@"+srv.Addr), site, admin)
		t.Setenv("CREDITS_TEST_REDIS_PASS", password)
		dollar, env := filepath.Join(dir, "dollar"), filepath.Join(dir, "env")
		for path, url := range map[string]string{
			dollar: "redis://:{$CREDITS_TEST_REDIS_PASS}@" + srv.Addr + "/1",
			env:    "redis://:{env.CREDITS_TEST_REDIS_PASS}@" + srv.Addr + "/2",
		} {
			if err := os.WriteFile(path, []byte(cfg(url)), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if out, err := runCaddyCommand(t, "reload", "--config", dollar, "--adapter", "caddyfile", "--address", admin); err != nil {
			t.Fatalf("caddy reload with {$VAR} from a shell that sets it: %v\n%s", err, out)
		}
		req, _ := http.NewRequest(http.MethodGet, "http://"+site+"/", nil)
		req.Header.Set("X-Org-Id", "acme")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusPaymentRequired {
			t.Fatalf("a call after the reload: %d, want 402 (an org with no credits, read from Redis)", resp.StatusCode)
		}
		out, err := runCaddyCommand(t, "reload", "--config", env, "--adapter", "caddyfile", "--address", admin)
		if err == nil {
			t.Fatalf("caddy reload with {env.VAR}, which the Caddy process lacks, succeeded:\n%s", out)
		}
		if all := out + err.Error(); !strings.Contains(all, "CREDITS_TEST_REDIS_PASS is empty") || strings.Contains(all, password) {
			t.Errorf("caddy reload's output does not name the variable, or shows the password:\n%s", all)
		}
		if strings.Contains(p.output(), password) {
			t.Errorf("caddy's log shows the password")
		}
	})
}
