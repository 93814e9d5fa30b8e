//go:build buildcommands

package caddymodule

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestREADMEBuild runs every command of the README's Build section in a
// fresh clone of the repository, as written, and checks what each built.
// The docker build needs a Docker daemon: its Dockerfile's xcaddy build
// must be the xcaddy line's, with the clone at /src.
func TestREADMEBuild(t *testing.T) {
	block := readmeBlock(t, "../README.md", "## Build", "sh")
	lines := strings.Split(strings.TrimSpace(block), "\n")
	if len(lines) != 3 {
		t.Fatalf("the Build section has %d commands, want 3: %q", len(lines), lines)
	}

	clone := filepath.Join(t.TempDir(), "caddy-credits")
	if out, err := exec.Command("git", "clone", "--quiet", "..", clone).CombinedOutput(); err != nil {
		t.Fatalf("git clone: %v\n%s", err, out)
	}
	run := func(line string) {
		t.Helper()
		cmd := exec.Command("bash", "-euo", "pipefail", "-c", line)
		cmd.Dir = clone
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", line, err, out)
		}
	}
	lists := func(binary string) {
		t.Helper()
		out, err := exec.Command(filepath.Join(clone, binary), "list-modules").CombinedOutput()
		if err != nil {
			t.Fatalf("%s list-modules: %v\n%s", binary, err, out)
		}
		for _, m := range []string{"credits", "http.handlers.credits", "http.handlers.credits_balance", "http.handlers.credits_admin"} {
			if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(m) + `$`).Match(out) {
				t.Errorf("%s does not list the module %s", binary, m)
			}
		}
	}

	if !strings.HasPrefix(lines[0], "go build -o caddy ") {
		t.Fatalf("the first command %q does not build ./caddy", lines[0])
	}
	run(lines[0])
	lists("caddy")

	xcaddy := lines[1]
	_, output, ok := strings.Cut(xcaddy, " --output ")
	if !ok || strings.Contains(output, " ") {
		t.Fatalf("the xcaddy command %q does not end with --output <file>", xcaddy)
	}
	run(xcaddy)
	lists(output)

	if lines[2] != "docker build -f xcaddy.Dockerfile -t caddy-credits ." {
		t.Fatalf("the docker command is %q", lines[2])
	}
	dockerfile, err := os.ReadFile(filepath.Join(clone, "xcaddy.Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?s)RUN xcaddy (build .*?)\n\n`).FindSubmatch(dockerfile)
	if m == nil {
		t.Fatalf("xcaddy.Dockerfile has no RUN xcaddy build:\n%s", dockerfile)
	}
	inImage := strings.Join(strings.Fields(strings.ReplaceAll(string(m[1]), "\\\n", " ")), " ")
	_, local, _ := strings.Cut(xcaddy, "xcaddy@v0.4.5 ")
	local, _, _ = strings.Cut(local, " --output ")
	if want := strings.ReplaceAll(local, "=.", "=/src"); inImage != want {
		t.Errorf("the Dockerfile builds %q; the README's xcaddy line, from /src, is %q", inImage, want)
	}
}
