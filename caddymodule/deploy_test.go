package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.yaml.in/yaml/v3"

	"github.com/creditsgw/caddy-credits/internal/faultproxy"
	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/meter"
)

// The tests in this file check what Docker would run, without Docker:
// compose.yaml's services against each other and against the Caddyfiles
// they mount, xcaddy.Dockerfile's image against what those Caddyfiles
// serve, and .dockerignore with Docker's own matching rules. Then they run
// the compose demo as processes: each service on a free loopback port
// where compose gives it a host name.

// composeFile is the part of compose.yaml these tests read; a key they do
// not know fails the test, so that nothing in the file goes unchecked.
type composeFile struct {
	Services map[string]composeService `yaml:"services"`
	Volumes  map[string]any            `yaml:"volumes"`
}

type composeService struct {
	Build *struct {
		Context    string `yaml:"context"`
		Dockerfile string `yaml:"dockerfile"`
	} `yaml:"build"`
	Image       string            `yaml:"image"`
	DependsOn   []string          `yaml:"depends_on"`
	Ports       []string          `yaml:"ports"`
	Environment map[string]string `yaml:"environment"`
	Volumes     []string          `yaml:"volumes"`
	Command     []string          `yaml:"command"`
	Restart     string            `yaml:"restart"`
}

func readCompose(t *testing.T) composeFile {
	t.Helper()
	data, err := os.ReadFile("../compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var c composeFile
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("compose.yaml: %v", err)
	}
	return c
}

// interpolate does compose's variable substitution: ${VAR}, ${VAR:-default},
// ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$.
func interpolate(s string, env map[string]string) (string, error) {
	var err error
	re := regexp.MustCompile(`\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])([^}]*))?\}`)
	out := re.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		p := re.FindStringSubmatch(m)
		v, set := env[p[1]]
		missing := !set || (p[2] == ":" && v == "")
		switch {
		case !missing || p[3] == "":
			return v
		case p[3] == "-":
			return p[4]
		default:
			err = fmt.Errorf("%s: %s", p[1], p[4])
			return ""
		}
	})
	return out, err
}

func TestInterpolate(t *testing.T) {
	env := map[string]string{"SET": "v", "EMPTY": ""}
	for in, want := range map[string]string{
		"${SET}": "v", "${SET:-d}": "v", "${EMPTY:-d}": "d", "${EMPTY-d}": "", "${UNSET-d}": "d",
		"${UNSET:-host:9000}": "host:9000", "$${SET}": "${SET}", "a${SET}b": "avb",
	} {
		if got, err := interpolate(in, env); err != nil || got != want {
			t.Errorf("interpolate(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"${UNSET:?set it}", "${EMPTY:?set it}", "${UNSET?set it}"} {
		if _, err := interpolate(in, env); err == nil {
			t.Errorf("interpolate(%q) did not fail", in)
		}
	}
}

// mountedCaddyfile returns the repository path of the Caddyfile a service
// mounts at /etc/caddy/Caddyfile, where Caddy's image reads it.
func mountedCaddyfile(s composeService) string {
	for _, v := range s.Volumes {
		src, dst, _ := strings.Cut(v, ":")
		if dst, _, _ = strings.Cut(dst, ":"); dst == "/etc/caddy/Caddyfile" {
			return src
		}
	}
	return ""
}

// caddyfilePorts returns the ports the HTTP servers of a Caddyfile (a path
// relative to the repository root) listen on.
func caddyfilePorts(t *testing.T, file string) []string {
	t.Helper()
	input, err := os.ReadFile(filepath.Join("..", file))
	if err != nil {
		t.Fatal(err)
	}
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(input, map[string]any{"filename": file})
	if err != nil {
		t.Fatalf("%s does not adapt: %v", file, err)
	}
	var cfg struct {
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					Listen []string `json:"listen"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		t.Fatal(err)
	}
	var ports []string
	for _, s := range cfg.Apps.HTTP.Servers {
		for _, l := range s.Listen {
			ports = append(ports, l[strings.LastIndex(l, ":")+1:])
		}
	}
	slices.Sort(ports)
	return ports
}

// serviceAddr matches an address compose's network resolves: a service's
// name (no dot) and a port.
var serviceAddr = regexp.MustCompile(`^([a-z][a-z0-9_-]*):([0-9]+)$`)

// composeAddrs returns every service address (host:port) that a service
// reaches by its environment (the defaults compose gives) or its
// Caddyfile's URLs.
func composeAddrs(t *testing.T, name string, s composeService, env map[string]string) []string {
	t.Helper()
	var addrs []string
	for k, v := range s.Environment {
		v, err := interpolate(v, env)
		if err != nil {
			t.Fatalf("service %s, %s: %v", name, k, err)
		}
		if serviceAddr.MatchString(v) && !strings.HasPrefix(v, "localhost:") {
			addrs = append(addrs, v)
		}
	}
	if file := mountedCaddyfile(s); file != "" {
		data, err := os.ReadFile(filepath.Join("..", file))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range regexp.MustCompile(`[a-z]+://([a-z][a-z0-9_-]*:[0-9]+)\b`).FindAllStringSubmatch(string(data), -1) {
			if !strings.HasPrefix(m[1], "localhost:") {
				addrs = append(addrs, m[1])
			}
		}
	}
	slices.Sort(addrs)
	return slices.Compact(addrs)
}

// TestComposeFile checks compose.yaml as `docker compose up` would use it:
// every service it names exists and listens on the port it is reached at,
// every file it mounts or builds from is in the repository, every named
// volume is declared, and the stand-ins need no image but the one
// xcaddy.Dockerfile builds on.
func TestComposeFile(t *testing.T) {
	c := readCompose(t)
	env := map[string]string{"CREDITS_ADMIN_TOKEN": "s3cret"}
	if _, err := interpolate(c.Services["caddy"].Environment["CREDITS_ADMIN_TOKEN"], map[string]string{}); err == nil {
		t.Error("compose.yaml runs the admin API without CREDITS_ADMIN_TOKEN; it must refuse to start")
	}
	for _, want := range []string{"caddy", "redis", "identity", "ai"} {
		if _, ok := c.Services[want]; !ok {
			t.Errorf("compose.yaml has no service %s", want)
		}
	}
	base, _, _ := dockerfileFinalStage(t)
	usedVolumes := map[string]bool{}
	for name, s := range c.Services {
		for _, d := range s.DependsOn {
			if _, ok := c.Services[d]; !ok {
				t.Errorf("service %s depends on %s, which compose.yaml does not have", name, d)
			}
		}
		for _, addr := range composeAddrs(t, name, s, env) {
			m := serviceAddr.FindStringSubmatch(addr)
			target, ok := c.Services[m[1]]
			switch {
			case !ok:
				t.Errorf("service %s reaches %s, but compose.yaml has no service %s", name, addr, m[1])
			case target.Image == "redis:7":
				if m[2] != "6379" || len(target.Command) == 0 || target.Command[0] != "redis-server" || slices.Contains(target.Command, "--port") {
					t.Errorf("service %s reaches %s, where redis-server does not listen", name, addr)
				}
			case mountedCaddyfile(target) == "":
				t.Errorf("service %s reaches %s, whose listener these tests cannot check", name, addr)
			default:
				if ports := caddyfilePorts(t, mountedCaddyfile(target)); !slices.Contains(ports, m[2]) {
					t.Errorf("service %s reaches %s, but %s listens on %v", name, addr, mountedCaddyfile(target), ports)
				}
			}
		}
		if b := s.Build; b != nil {
			if st, err := os.Stat(filepath.Join("..", b.Context)); err != nil || !st.IsDir() {
				t.Errorf("service %s builds from %s, which is no directory: %v", name, b.Context, err)
			}
			if _, err := os.Stat(filepath.Join("..", b.Context, b.Dockerfile)); err != nil {
				t.Errorf("service %s builds with %s: %v", name, b.Dockerfile, err)
			}
		} else if s.Image == "" {
			t.Errorf("service %s has neither an image nor a build", name)
		}
		if s.Build == nil && strings.HasPrefix(s.Image, "caddy:") && s.Image != base {
			t.Errorf("service %s runs %s; xcaddy.Dockerfile's image is built on %s, which the stand-ins should reuse", name, s.Image, base)
		}
		for _, v := range s.Volumes {
			parts := strings.Split(v, ":")
			if len(parts) < 2 || len(parts) > 3 || !strings.HasPrefix(parts[1], "/") || (len(parts) == 3 && parts[2] != "ro" && parts[2] != "rw") {
				t.Errorf("service %s: volume %q is not source:/path[:ro|rw]", name, v)
				continue
			}
			if strings.HasPrefix(parts[0], ".") || strings.HasPrefix(parts[0], "/") {
				if _, err := os.Stat(filepath.Join("..", parts[0])); err != nil {
					t.Errorf("service %s mounts %s: %v", name, parts[0], err)
				}
				continue
			}
			usedVolumes[parts[0]] = true
			if _, ok := c.Volumes[parts[0]]; !ok {
				t.Errorf("service %s uses the volume %s, which compose.yaml does not declare", name, parts[0])
			}
		}
		var listens []string
		if file := mountedCaddyfile(s); file != "" {
			listens = caddyfilePorts(t, file)
		}
		for _, p := range s.Ports {
			parts := strings.Split(p, ":")
			if len(parts) < 2 || len(parts) > 3 {
				t.Errorf("service %s: port %q is not [ip:]host:container", name, p)
				continue
			}
			if container := parts[len(parts)-1]; !slices.Contains(listens, container) {
				t.Errorf("service %s publishes port %s, but its Caddyfile listens on %v", name, container, listens)
			}
			if parts[len(parts)-1] == "2020" && (len(parts) != 3 || parts[0] != "127.0.0.1") {
				t.Errorf("service %s publishes the admin API on %q: keep it on 127.0.0.1", name, p)
			}
		}
	}
	for v := range c.Volumes {
		if !usedVolumes[v] {
			t.Errorf("compose.yaml declares the volume %s, which no service uses", v)
		}
	}
	redisCmd := strings.Join(c.Services["redis"].Command, " ")
	for _, want := range []string{"--appendonly yes", "--maxmemory-policy noeviction"} {
		if !strings.Contains(redisCmd, want) {
			t.Errorf("compose.yaml's Redis runs %q, without %s", redisCmd, want)
		}
	}
}

// dockerfileFinalStage reads xcaddy.Dockerfile's last stage: the image it
// builds on, its working directory, and what it copies from the build
// context (not from another stage), each as its sources and destination.
func dockerfileFinalStage(t *testing.T) (base, workdir string, copies [][]string) {
	t.Helper()
	data, err := os.ReadFile("../xcaddy.Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(string(data), "\\\n", " ")
	for line := range strings.Lines(text) {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		switch strings.ToUpper(f[0]) {
		case "FROM":
			base, workdir, copies = f[1], "/", nil
		case "WORKDIR":
			workdir = path.Join(workdir, f[1])
		case "COPY", "ADD":
			args := f[1:]
			fromStage := false
			for len(args) > 0 && strings.HasPrefix(args[0], "--") {
				fromStage = fromStage || strings.HasPrefix(args[0], "--from=")
				args = args[1:]
			}
			if len(args) < 2 {
				t.Fatalf("xcaddy.Dockerfile: %q copies nothing", line)
			}
			if !fromStage {
				copies = append(copies, args)
			}
		}
	}
	return base, workdir, copies
}

// imageLayout lays out in a temporary directory the files xcaddy.Dockerfile
// copies into its image from the build context, as Docker would (a
// directory's contents go into the destination; .dockerignore applies),
// and returns that directory and the image's working directory.
func imageLayout(t *testing.T) (root, workdir string) {
	t.Helper()
	_, workdir, copies := dockerfileFinalStage(t)
	ignore := readDockerignore(t)
	root = t.TempDir()
	for _, c := range copies {
		srcs, dest := c[:len(c)-1], c[len(c)-1]
		if !path.IsAbs(dest) {
			dest = path.Join(workdir, dest) + map[bool]string{true: "/"}[strings.HasSuffix(dest, "/")]
		}
		for _, src := range srcs {
			src = path.Clean(src)
			err := filepath.WalkDir(filepath.Join("..", src), func(p string, d fs.DirEntry, err error) error {
				if err != nil || d.IsDir() {
					return err
				}
				rel, err := filepath.Rel("..", p)
				if err != nil || ignore.excludes(rel) {
					return err
				}
				var to string
				switch inSrc, _ := filepath.Rel(filepath.Join("..", src), p); {
				case inSrc != ".":
					to = path.Join(dest, filepath.ToSlash(inSrc))
				case strings.HasSuffix(dest, "/") || len(srcs) > 1:
					to = path.Join(dest, path.Base(src))
				default:
					to = dest
				}
				data, err := os.ReadFile(p)
				if err != nil {
					return err
				}
				to = filepath.Join(root, filepath.FromSlash(to))
				if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
					return err
				}
				return os.WriteFile(to, data, 0o644)
			})
			if err != nil {
				t.Fatalf("xcaddy.Dockerfile copies %s: %v", src, err)
			}
		}
	}
	return root, workdir
}

// demoFiles returns the demo page and every file it loads from the
// gateway, as URL paths.
func demoFiles(t *testing.T) []string {
	t.Helper()
	page, err := os.ReadFile("../web/demo/index.html")
	if err != nil {
		t.Fatal(err)
	}
	files := []string{"/demo/index.html"}
	for _, m := range regexp.MustCompile(`(?:src|href)="([^"#:]+)"`).FindAllStringSubmatch(string(page), -1) {
		if !strings.HasPrefix(m[1], "/") {
			m[1] = "/demo/" + m[1]
		}
		files = append(files, m[1])
	}
	// The page's module script imports credits.js as any frontend does.
	script, err := os.ReadFile("../web/demo/demo.js")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`(?m)^import .* from '([^']+)';`).FindAllStringSubmatch(string(script), -1) {
		files = append(files, m[1])
	}
	if len(files) < 4 {
		t.Fatalf("the demo page loads %v: want its script, its style and credits.js", files)
	}
	return files
}

// TestImageServesDemo: the image holds web/ where each Caddyfile it may
// run (deploy/Caddyfile, and the demo Caddyfile from the image's working
// directory) serves the demo page from, with every file the page loads.
func TestImageServesDemo(t *testing.T) {
	layout, workdir := imageLayout(t)
	for _, file := range []string{"../deploy/Caddyfile", "../Caddyfile"} {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		roots := regexp.MustCompile(`(?m)^\s*root \* (\S+)$`).FindAllStringSubmatch(string(data), -1)
		if len(roots) != 1 {
			t.Fatalf("%s has %d file_server roots, want the demo's one", file, len(roots))
		}
		root := roots[0][1]
		if !path.IsAbs(root) {
			root = path.Join(workdir, root)
		}
		for _, f := range demoFiles(t) {
			inImage := filepath.Join(layout, filepath.FromSlash(path.Join(root, f)))
			got, err := os.ReadFile(inImage)
			if err != nil {
				t.Errorf("%s serves %s from %s, which the image does not have", file, f, path.Join(root, f))
				continue
			}
			want, err := os.ReadFile(filepath.Join("../web", filepath.FromSlash(f)))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("the image's %s is not web%s", path.Join(root, f), f)
			}
		}
	}
}

// TestAIStandInIsTheDemos: compose's AI stand-in answers as the demo
// Caddyfile's stand-in backends do, so the compose demo and `go run` show
// the same page.
func TestAIStandInIsTheDemos(t *testing.T) {
	site := func(file, addr string) string {
		t.Helper()
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		_, rest, ok := strings.Cut(string(data), "\n"+addr+" {\n")
		if !ok {
			t.Fatalf("%s has no site %s", file, addr)
		}
		body, _, _ := strings.Cut(rest, "\n}\n")
		body = strings.Replace(body, "\tbind 127.0.0.1\n", "", 1)
		return body
	}
	if demo, standIn := site("../Caddyfile", ":9090"), site("../deploy/ai.Caddyfile", ":8000"); demo != standIn {
		t.Errorf("deploy/ai.Caddyfile's site is not the demo's stand-in backends:\n%s\nwant:\n%s", standIn, demo)
	}
}

// TestComposeDemo runs compose.yaml's services as processes, each on a
// free loopback port where compose gives it a host name: a real
// redis-server, the stand-ins' Caddyfiles in the built caddy, and the
// gateway with deploy/Caddyfile, the environment compose gives it, and the
// image's files. The demo page is served; calls are charged to the org the
// identity stand-in proves, never to one the caller names; a refused
// caller reaches nothing; the ledger, read from Redis, holds what the AI
// stand-in answered.
func TestComposeDemo(t *testing.T) {
	c := readCompose(t)
	layout, _ := imageLayout(t)
	srv := redistest.Start(t, redistest.Options{})

	addrs := map[string]string{} // compose's host:port -> loopback address
	for name, s := range c.Services {
		switch {
		case name == "caddy":
		case s.Image == "redis:7":
			addrs[name+":6379"] = srv.Addr
		default:
			file := mountedCaddyfile(s)
			data, err := os.ReadFile(filepath.Join("..", file))
			if err != nil {
				t.Fatal(err)
			}
			cfg := string(data)
			for _, p := range caddyfilePorts(t, file) {
				addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
				if !strings.Contains(cfg, "\n:"+p+" {") {
					t.Fatalf("%s: no site :%s", file, p)
				}
				cfg = strings.Replace(cfg, "\n:"+p+" {", "\nhttp://"+addr+" {", 1)
				addrs[name+":"+p] = addr
			}
			startCaddyProcess(t, cfg, slices.Collect(func(yield func(string) bool) {
				for k, v := range addrs {
					if strings.HasPrefix(k, name+":") && !yield(v) {
						return
					}
				}
			})...)
		}
	}

	gw := c.Services["caddy"]
	const token = "s3cret"
	for k, v := range gw.Environment {
		v, err := interpolate(v, map[string]string{"CREDITS_ADMIN_TOKEN": token})
		if err != nil {
			t.Fatal(err)
		}
		if a, ok := addrs[v]; ok {
			v = a
		}
		t.Setenv(k, v)
	}
	data, err := os.ReadFile(filepath.Join("..", mountedCaddyfile(gw)))
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(data)
	for from, to := range addrs {
		cfg = strings.ReplaceAll(cfg, "://"+from, "://"+to)
	}
	site, admin := fmt.Sprintf("127.0.0.1:%d", freePort(t)), fmt.Sprintf("127.0.0.1:%d", freePort(t))
	rootLine := regexp.MustCompile(`(?m)^(\s*root \* )(/\S+)$`)
	if !rootLine.MatchString(cfg) {
		t.Fatal("deploy/Caddyfile serves no absolute root, which the test would find in the image")
	}
	cfg = strings.NewReplacer("\n:8080 {", "\nhttp://"+site+" {", "\n:2020 {", "\nhttp://"+admin+" {",
		"{\n\tcredits {", "{\n\tadmin off\n\tcredits {").Replace(cfg)
	cfg = rootLine.ReplaceAllString(cfg, "${1}"+filepath.ToSlash(layout)+"${2}")
	if !strings.Contains(cfg, "admin off") || !strings.Contains(cfg, site) || !strings.Contains(cfg, admin) {
		t.Fatalf("deploy/Caddyfile no longer has the sites and options the test replaces:\n%s", cfg)
	}
	startCaddyProcess(t, cfg, site, admin)

	client := &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	do := func(method, url string, header ...string) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest(method, url, nil)
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp, string(body)
	}

	// The page, from the image's files.
	if resp, _ := do("GET", "http://"+site+"/"); resp.StatusCode/100 != 3 || resp.Header.Get("Location") != "/demo/" {
		t.Errorf("GET /: %d to %q, want a redirect to /demo/", resp.StatusCode, resp.Header.Get("Location"))
	}
	for _, f := range append([]string{"/demo/"}, demoFiles(t)...) {
		want, err := os.ReadFile(filepath.Join("../web", filepath.FromSlash(strings.TrimSuffix(f, "/")+map[bool]string{true: "/index.html"}[strings.HasSuffix(f, "/")])))
		if err != nil {
			t.Fatal(err)
		}
		if resp, body := do("GET", "http://"+site+f); resp.StatusCode != http.StatusOK || body != string(want) {
			t.Errorf("GET %s: %d, %d bytes; want 200 and web%s", f, resp.StatusCode, len(body), f)
		}
	}

	// Calls: served counts the AI stand-in's answers each caller got.
	served := map[string]int64{}
	call := func(path, org string, header ...string) *http.Response {
		t.Helper()
		resp, body := do("POST", "http://"+site+path, header...)
		switch {
		case resp.StatusCode != http.StatusOK:
		case path == "/rich-text/generate" && body == `{"html": "<p>A paragraph the AI wrote.</p>"}`,
			path == "/rich-text/stream" && strings.HasSuffix(body, "data: [DONE]\n"):
			served[org]++
		default:
			t.Fatalf("POST %s: 200 without the AI stand-in's answer: %q", path, body)
		}
		return resp
	}
	// The demo page sends no credentials: the identity stand-in makes it
	// the org demo, which the plan compose sets gives 5 credits.
	if r := call("/rich-text/generate", "demo", "X-Org-Id", "acme"); r.StatusCode != http.StatusOK || r.Header.Get("Credits-Remaining") != "4" {
		t.Fatalf("the demo's call: %d, Credits-Remaining %q; want 200 and 4", r.StatusCode, r.Header.Get("Credits-Remaining"))
	}
	if r := call("/rich-text/stream", "demo"); r.StatusCode != http.StatusOK || r.Header.Get("Credits-Hold") != "3" {
		t.Fatalf("the demo's stream: %d, Credits-Hold %q; want 200 and 3", r.StatusCode, r.Header.Get("Credits-Hold"))
	}
	if r, body := do("GET", "http://"+site+"/credits/balance", "X-Org-Id", "acme"); r.StatusCode != http.StatusOK || !strings.Contains(body, `"org":"demo","balance":3`) {
		t.Fatalf("the demo's balance: %d %s; want demo's 3 (a 1-credit call and a stream of 1)", r.StatusCode, body)
	}
	for range 2 {
		if r := call("/rich-text/generate", "acme", "Authorization", "Bearer tok-acme"); r.StatusCode != http.StatusOK {
			t.Fatalf("acme's call: %d", r.StatusCode)
		}
	}
	if r := call("/rich-text/generate", "beta", "Authorization", "Bearer tok-beta", "X-Org-Id", "demo"); r.StatusCode != http.StatusOK {
		t.Fatalf("beta's call naming demo: %d", r.StatusCode)
	}
	for _, path := range []string{"/rich-text/generate", "/credits/balance"} {
		if r := call(path, "", "Authorization", "Bearer forged", "X-Org-Id", "demo"); r.StatusCode != http.StatusUnauthorized {
			t.Fatalf("%s with unknown credentials: %d, want the identity stand-in's 401", path, r.StatusCode)
		}
	}

	// The admin API, with compose's token only.
	if r, _ := do("GET", "http://"+admin+"/admin/orgs/demo"); r.StatusCode != http.StatusUnauthorized {
		t.Errorf("the admin API without a token: %d, want 401", r.StatusCode)
	}
	if r, body := do("GET", "http://"+admin+"/admin/orgs/demo", "Authorization", "Bearer "+token); r.StatusCode != http.StatusOK || !strings.Contains(body, `"balance":3`) {
		t.Errorf("the admin API with the token: %d %s", r.StatusCode, body)
	}

	// The ledger, from Redis: each org charged for what it was served, and
	// no other org charged at all.
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { rdb.Close() })
	ledger, err := meter.New(rdb, meter.Config{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]struct{ served, used int64 }{"demo": {2, 2}, "acme": {2, 2}, "beta": {1, 1}}
	for org, w := range want {
		if served[org] != w.served {
			t.Errorf("%s was served %d calls, want %d", org, served[org], w.served)
		}
		a, err := ledger.Account(context.Background(), org)
		if err != nil {
			t.Fatal(err)
		}
		if a.Used["rich-text"] != w.used || a.Balance != 5-w.used {
			t.Errorf("%s: served %d calls; the ledger: used %v, balance %d; want used %d, balance %d", org, served[org], a.Used, a.Balance, w.used, 5-w.used)
		}
	}
	if len(served) != len(want) {
		t.Errorf("served %v: an org other than demo, acme and beta got an answer", served)
	}
}

// dockerignore is a .dockerignore file's rules, read and matched as Docker
// reads and matches them (moby/patternmatcher): a path is excluded when
// the last rule that matches it, or one of its parent directories, is not
// an exception (!).
type dockerignore []struct {
	pattern   string
	exception bool
}

func readDockerignore(t *testing.T) dockerignore {
	t.Helper()
	data, err := os.ReadFile("../.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	d, err := parseDockerignore(string(data))
	if err != nil {
		t.Fatalf(".dockerignore: %v", err)
	}
	return d
}

func parseDockerignore(text string) (dockerignore, error) {
	var d dockerignore
	for line := range strings.Lines(text) {
		p := strings.TrimSpace(line)
		if p == "" || strings.HasPrefix(p, "#") {
			continue
		}
		exception := strings.HasPrefix(p, "!")
		if exception {
			p = strings.TrimSpace(p[1:])
		}
		// Docker cleans each pattern and takes a leading / as the
		// context's root, which every pattern is relative to anyway.
		p = filepath.ToSlash(filepath.Clean(p))
		if len(p) > 1 && p[0] == '/' {
			p = p[1:]
		}
		if strings.Contains(p, "**") {
			return nil, fmt.Errorf("%q: ** matches across directories in Docker, which this reader does not do", line)
		}
		if _, err := path.Match(p, ""); err != nil {
			return nil, fmt.Errorf("%q: %v", line, err)
		}
		d = append(d, struct {
			pattern   string
			exception bool
		}{p, exception})
	}
	return d, nil
}

// excludes reports whether Docker leaves file (a path relative to the
// build context) out of the context.
func (d dockerignore) excludes(file string) bool {
	file = filepath.ToSlash(filepath.Clean(file))
	excluded := false
	for _, r := range d {
		for p := file; p != "." && p != "/"; p = path.Dir(p) {
			if ok, _ := path.Match(r.pattern, p); ok {
				excluded = !r.exception
				break
			}
		}
	}
	return excluded
}

func TestDockerignoreRules(t *testing.T) {
	d, err := parseDockerignore("# a comment\n/caddy\n*.test\ndocs/screenshots\nbuild\n!build/keep\n")
	if err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]bool{
		"caddy": true, "cmd/caddy/main.go": false, "caddy-xcaddy": false,
		"x.test": true, "caddymodule/x.test": false, // * does not cross /
		"docs/screenshots/a.png": true, "docs/admin.md": false,
		"build/a": true, "build/keep": false, "build/keep/b": false,
	} {
		if got := d.excludes(file); got != want {
			t.Errorf("excludes(%q) = %v, want %v", file, got, want)
		}
	}
}

// buildOutputs returns the files the README's Build section writes in the
// clone: each go build's binary (-o, or the package's name) and each
// xcaddy's --output.
func buildOutputs(t *testing.T) []string {
	t.Helper()
	var built []string
	for line := range strings.Lines(readmeBlock(t, "../README.md", "## Build", "sh")) {
		f := strings.Fields(line)
		out := ""
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "-o" || f[i] == "--output" {
				out = f[i+1]
			}
		}
		if out == "" && len(f) > 2 && f[0] == "go" && f[1] == "build" {
			out = path.Base(f[len(f)-1])
		}
		isXcaddy := slices.ContainsFunc(f, func(s string) bool { return s == "xcaddy" || strings.Contains(s, "/xcaddy@") })
		if out == "" && isXcaddy && slices.Contains(f, "build") {
			out = "caddy" // xcaddy build's default output
		}
		if out != "" {
			built = append(built, out)
		}
	}
	return built
}

// TestDockerignoreKeepsOutBinaries: every binary the README's Build
// section makes stays out of the image's build context, by Docker's rules,
// and every file the image's build needs stays in.
func TestDockerignoreKeepsOutBinaries(t *testing.T) {
	d := readDockerignore(t)
	built := buildOutputs(t)
	if len(built) < 2 {
		t.Fatalf("the Build section writes %v: want the go build and the xcaddy binaries", built)
	}
	for _, b := range built {
		if !d.excludes(b) {
			t.Errorf(".dockerignore does not keep out %s, which the Build section writes", b)
		}
	}
	out, err := exec.Command("git", "-C", "..", "ls-files").Output()
	if err != nil {
		t.Fatalf("git ls-files: %v", err)
	}
	needed := 0
	for _, f := range strings.Fields(string(out)) {
		ext := path.Ext(f)
		if ext == ".go" || ext == ".lua" || f == "go.mod" || f == "go.sum" || strings.HasPrefix(f, "web/") || strings.Contains(f, "/console/") {
			needed++
			if d.excludes(f) {
				t.Errorf(".dockerignore keeps out %s, which the image's build needs", f)
			}
		}
	}
	if needed < 50 {
		t.Fatalf("only %d files the build needs: git ls-files did not list the repository", needed)
	}
}

// TestBacklogFullCounted: a fail-open call whose refund finds the backlog
// full loses that refund, and caddy_credits_backlog_dropped_total counts it
// (reason full), as the alert CreditsBacklogLosingCalls needs. A charge
// the full backlog refuses loses nothing (its call is refused, not
// forwarded) and is not counted; the void of a charge that may have run
// is.
func TestBacklogFullCounted(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	proxy := faultproxy.Start(t, srv.Addr)
	g := startGateway(t, gatewayOptions{store: "redis redis://" + proxy.Addr, global: "lease off\n\t\tbacklog 1", site: metricsSite})
	g.redis = srv
	for _, org := range []string{"lost", "refused"} {
		wantStatus(t, g.call("/image-studio/x", org), http.StatusOK)
	}
	const full = `caddy_credits_backlog_dropped_total{reason="full"}`

	proxy.Refuse(true)
	// The charge takes the backlog's one place; the upstream fails, and the
	// refund finds no room.
	wantStatus(t, g.call("/image-studio/fail", "lost"), http.StatusInternalServerError)
	if n := g.metric(full); n != 1 {
		t.Errorf("%s = %v after a refund the full backlog refused, want 1", full, n)
	}
	// The next charge's reply is lost (the proxy drops the connection), so
	// it may have run: the call is refused, and the void that would undo
	// such a charge finds no room either. The void is counted, the charge
	// is not.
	wantStatus(t, g.call("/image-studio/x", "refused"), http.StatusServiceUnavailable)
	if n := g.metric(full); n != 2 {
		t.Errorf("%s = %v after a charge and its void the full backlog refused, want 2: the void only", full, n)
	}

	proxy.Refuse(false)
	eventually(t, "the backlog is applied", func() bool { return backlogLength() == 0 })
	// From outside: the upstream answered lost's second call 500 and was
	// never called for refused's; the ledger charged lost for it, the
	// refund the metric counted.
	if f, r := g.upstream.forwarded("lost", "image-studio"), g.upstream.forwarded("refused", "image-studio"); f != 2 || r != 1 {
		t.Fatalf("the upstream got %d of lost's calls and %d of refused's, want 2 and 1", f, r)
	}
	if b := g.balance("lost"); b != 5-2-2 {
		t.Errorf("lost's balance %d, want %d: its failed call charged, the refund lost", b, 5-2-2)
	}
	if b := g.balance("refused"); b != 5-2 {
		t.Errorf("refused's balance %d, want %d: the refused call not charged", b, 5-2)
	}
}

// TestAlertRules runs docs/operations.md's promtool commands (Debian's
// prometheus package): they check deploy/alerts.yml and run its unit tests
// (deploy/alerts_test.yml: input series, and the alerts they must fire and
// must not). It also checks that
// every metric and label the rules read is one the gateway exports, and
// that every alert is tested firing.
func TestAlertRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool is not installed: apt-get install -y prometheus (.ci/run does)")
	}
	// The commands of docs/operations.md, as written, from the repository.
	block := readmeBlock(t, "../docs/operations.md", "## Alerting", "sh")
	for _, want := range []string{"promtool check rules alerts.yml", "promtool test rules alerts_test.yml"} {
		if !strings.Contains(block, want) {
			t.Fatalf("docs/operations.md's Alerting does not run %s:\n%s", want, block)
		}
	}
	cmd := exec.Command("bash", "-euo", "pipefail", "-c", block)
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(promtool)+":"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil || strings.Count(string(out), "SUCCESS") != 2 {
		t.Errorf("%s: %v\n%s", block, err, out)
	}

	// What the gateway exports: each metric's name and labels.
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	exported := map[string][]string{}
	descs := make(chan *prometheus.Desc, 100)
	for _, c := range []prometheus.Collector{m.requests, m.charged, m.storeDuration, m.storeErrors, m.unmetered, m.dropped} {
		c.Describe(descs)
	}
	close(descs)
	descRE := regexp.MustCompile(`fqName: "([^"]+)".*variableLabels: \{([^}]*)\}`)
	for d := range descs {
		p := descRE.FindStringSubmatch(d.String())
		if p == nil {
			t.Fatalf("cannot read %s", d)
		}
		labels := append(strings.Split(p[2], ","), "job", "instance")
		exported[p[1]] = labels
		if p[1] == "caddy_credits_store_duration_seconds" {
			for _, s := range []string{"_bucket", "_count", "_sum"} {
				exported[p[1]+s] = append(labels, "le")
			}
		}
	}

	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	var tests struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string `yaml:"alertname"`
				ExpAlerts []any  `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	for file, into := range map[string]any{"../deploy/alerts.yml": &rules, "../deploy/alerts_test.yml": &tests} {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.Unmarshal(data, into); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
	}
	fires := map[string]bool{}
	for _, tc := range tests.Tests {
		for _, a := range tc.AlertRuleTest {
			fires[a.Alertname] = fires[a.Alertname] || len(a.ExpAlerts) > 0
		}
	}
	metricRE := regexp.MustCompile(`\bcaddy_credits_[a-z_]+`)
	byRE := regexp.MustCompile(`\b(?:by|without) \(([^)]*)\)`)
	alerts := 0
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			alerts++
			if !fires[r.Alert] {
				t.Errorf("alert %s: no test in alerts_test.yml expects it to fire", r.Alert)
			}
			names := metricRE.FindAllString(r.Expr, -1)
			if len(names) == 0 {
				t.Errorf("alert %s reads no credits metric: %s", r.Alert, r.Expr)
			}
			for _, name := range names {
				labels, ok := exported[name]
				if !ok {
					t.Errorf("alert %s reads %s, which the gateway does not export", r.Alert, name)
					continue
				}
				for _, by := range byRE.FindAllStringSubmatch(r.Expr, -1) {
					for _, l := range strings.Split(by[1], ",") {
						if l = strings.TrimSpace(l); !slices.Contains(labels, l) {
							t.Errorf("alert %s groups %s by %s, a label it does not have", r.Alert, name, l)
						}
					}
				}
			}
		}
	}
	if alerts < 3 {
		t.Errorf("alerts.yml has %d alerts, want the store failing, calls unmetered and the backlog losing calls", alerts)
	}
}
