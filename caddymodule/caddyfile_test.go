package caddymodule

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

var updateCaddyfileGolden = flag.Bool("update-caddyfile", false,
	"rewrite testdata/caddyfile/*.json from the adapter's output; read the diff before committing it")

// caddyfileGoldens returns the Caddyfiles under testdata/caddyfile, each of
// which has its expected JSON beside it: x.caddyfile and x.json.
func caddyfileGoldens(tb testing.TB) []string {
	tb.Helper()
	files, err := filepath.Glob(filepath.Join("testdata", "caddyfile", "*.caddyfile"))
	if err != nil || len(files) == 0 {
		tb.Fatalf("no golden Caddyfiles under testdata/caddyfile (%v)", err)
	}
	return files
}

func adaptCaddyfile(input string) ([]byte, error) {
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), nil)
	return out, err
}

func TestCaddyfileAdapt(t *testing.T) {
	for _, file := range caddyfileGoldens(t) {
		name := strings.TrimSuffix(filepath.Base(file), ".caddyfile")
		t.Run(name, func(t *testing.T) {
			input, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			goldenPath := strings.TrimSuffix(file, ".caddyfile") + ".json"
			if *updateCaddyfileGolden {
				out, err := adaptCaddyfile(string(input))
				if err != nil {
					t.Fatalf("adapting %s: %v", file, err)
				}
				var pretty bytes.Buffer
				if err := json.Indent(&pretty, out, "", "\t"); err != nil {
					t.Fatal(err)
				}
				pretty.WriteByte('\n')
				if err := os.WriteFile(goldenPath, pretty.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(goldenPath)
			if err != nil {
				t.Fatal(err)
			}
			caddytest.AssertAdapt(t, string(input), "caddyfile", strings.TrimRight(string(want), "\n"))

			// The modules must accept what the adapter wrote: their
			// Provision and Validate agree with the Caddyfile parser.
			t.Setenv("CREDITS_ADMIN_TOKEN", "golden-test-token")
			t.Setenv("CREDITS_ALERTS_SECRET", "golden-test-secret")
			t.Setenv("REDIS_PASSWORD", "golden-test-password")
			var cfg caddy.Config
			if err := json.Unmarshal(want, &cfg); err != nil {
				t.Fatalf("%s: %v", goldenPath, err)
			}
			if err := caddy.Validate(&cfg); err != nil {
				t.Fatalf("%s does not provision: %v", goldenPath, err)
			}
		})
	}
}

// inSite puts the lines of a credits handler block in a site; its first
// line is line 3 of the Caddyfile.
func inSite(lines ...string) string {
	return ":8080 {\n\tcredits {\n\t\t" + strings.Join(lines, "\n\t\t") + "\n\t}\n\trespond ok\n}\n"
}

// inGlobal puts the lines of the credits global option's block in a
// Caddyfile; its first line is line 3.
func inGlobal(lines ...string) string {
	return "{\n\tcredits {\n\t\t" + strings.Join(lines, "\n\t\t") + "\n\t}\n}\n\n:8080 {\n\trespond ok\n}\n"
}

func TestCaddyfileParseErrors(t *testing.T) {
	route := []string{"org {header.X-Org-Id}", "feature rich-text"}
	with := func(extra ...string) []string { return append(append([]string{}, route...), extra...) }

	for _, tc := range []struct {
		name  string
		input string
		want  string // in the error
		at    string // the position in the error
		never string // never in the error
	}{
		// credits
		{"unknown subdirective", inSite(with("bogus 1")...), "unrecognized subdirective 'bogus'", "Caddyfile:5", ""},
		{"missing org", inSite("feature rich-text"), "org is required", "Caddyfile:2", ""},
		{"empty org", inSite(`org ""`, "feature rich-text"), "org is required", "Caddyfile:3", ""},
		{"invalid literal org", inSite(`org "acme corp"`, "feature rich-text"), `invalid org "acme corp"`, "Caddyfile:3", ""},
		{"missing feature", inSite("org acme"), "feature is required", "Caddyfile:2", ""},
		{"invalid feature", inSite("org acme", `feature "rich text"`), `invalid feature "rich text"`, "Caddyfile:4", ""},
		{"placeholder feature", inSite("org acme", "feature {header.X-Feature}"), "invalid feature", "Caddyfile:4", ""},
		{"cost 0", inSite(with("cost 0")...), `invalid cost "0"`, "Caddyfile:5", ""},
		{"cost negative", inSite(with("cost -1")...), `invalid cost "-1"`, "Caddyfile:5", ""},
		{"cost text", inSite(with("cost abc")...), `invalid cost "abc": must be an integer from 1 to 1000000`, "Caddyfile:5", ""},
		{"cost too high", inSite(with("cost 1000001")...), `invalid cost "1000001"`, "Caddyfile:5", ""},
		{"bad on_exhausted", inSite(with("on_exhausted never")...), `invalid on_exhausted "never": must be block, notice or overdraft`, "Caddyfile:5", ""},
		{"overdraft_limit on a default route", inSite(with("overdraft_limit 100")...), `invalid overdraft_limit "100": needs on_exhausted overdraft; this route is block`, "Caddyfile:5", ""},
		{"overdraft_limit before on_exhausted notice", inSite("overdraft_limit 100", "on_exhausted notice", "org acme", "feature f"), `invalid overdraft_limit "100": needs on_exhausted overdraft; this route is notice`, "Caddyfile:3", ""},
		{"overdraft_limit negative", inSite(with("on_exhausted overdraft", "overdraft_limit -1")...), `invalid overdraft_limit "-1": must be an integer from 0 to 1000000000000`, "Caddyfile:6", ""},
		{"overdraft_limit too deep", inSite(with("on_exhausted overdraft", "overdraft_limit 1000000000001")...), `invalid overdraft_limit "1000000000001"`, "Caddyfile:6", ""},
		{"overdraft_limit text", inSite(with("on_exhausted overdraft", "overdraft_limit lots")...), `invalid overdraft_limit "lots"`, "Caddyfile:6", ""},
		{"low_balance on a block route", inSite(with("on_exhausted block", "low_balance 10")...), `invalid low_balance "10": needs on_exhausted notice; this route is block`, "Caddyfile:6", ""},
		{"low_balance on an overdraft route", inSite(with("low_balance 10", "on_exhausted overdraft")...), `invalid low_balance "10": needs on_exhausted notice; this route is overdraft`, "Caddyfile:5", ""},
		{"low_balance 0", inSite(with("on_exhausted notice", "low_balance 0")...), `invalid low_balance "0": must be an integer from 1 to 1000000000000`, "Caddyfile:6", ""},
		{"bad fail_mode", inSite(with("fail_mode sometimes")...), `invalid fail_mode "sometimes": must be open or closed`, "Caddyfile:5", ""},
		{"price with a bad glob", inSite(with("usage openai", "price gpt-[4 1 1")...), `invalid price model "gpt-[4": must be a glob`, "Caddyfile:6", ""},
		{"price with a backward class", inSite(with("usage openai", "price o[9-1] 1 1")...), `invalid price model "o[9-1]": must be a glob`, "Caddyfile:6", ""},
		{"duplicated subdirective", inSite(with("cost 2", "cost 3")...), "cost is given twice", "Caddyfile:6", ""},
		{"extra argument", inSite("org acme extra", "feature rich-text"), "wrong argument count", "Caddyfile:3", ""},
		{"missing argument", inSite("org acme", "feature"), "wrong argument count", "Caddyfile:4", ""},
		{"nested block", inSite("org acme {", "}", "feature f"), "unexpected '{': these subdirectives take no block", "Caddyfile:3", ""},
		{"argument on the directive", ":8080 {\n\tcredits /api/* extra {\n\t\torg acme\n\t\tfeature f\n\t}\n}\n", "wrong argument count", "Caddyfile:2", ""},

		// credits_balance and credits_admin
		{"credits_balance without org", ":8080 {\n\tcredits_balance\n}\n", "credits_balance: org is required", "Caddyfile:2", ""},
		{"credits_balance with an empty block", ":8080 {\n\tcredits_balance {\n\t}\n}\n", "credits_balance: org is required", "Caddyfile:2", ""},
		{"credits_balance unknown subdirective", ":8080 {\n\tcredits_balance {\n\t\torg acme\n\t\tfeature f\n\t}\n}\n", "unrecognized subdirective 'feature'", "Caddyfile:4", ""},
		{"credits_balance extra argument", ":8080 {\n\tcredits_balance {\n\t\torg acme other\n\t}\n}\n", "wrong argument count", "Caddyfile:3", ""},
		{"credits_admin unknown subdirective", ":8080 {\n\tcredits_admin {\n\t\tpassword x\n\t}\n}\n", "unrecognized subdirective 'password'", "Caddyfile:3", ""},
		{"credits_admin empty token", ":8080 {\n\tcredits_admin {\n\t\ttoken \"\"\n\t}\n}\n", "credits_admin: token admin is empty", "Caddyfile:3", ""},
		{"credits_admin empty named token", ":8080 {\n\tcredits_admin {\n\t\ttoken ops \"\"\n\t}\n}\n", "credits_admin: token ops is empty", "Caddyfile:3", ""},
		{"credits_admin token from an unset variable", ":8080 {\n\tcredits_admin {\n\t\ttoken {$CREDITS_TEST_SURELY_UNSET_TOKEN}\n\t}\n}\n", "wrong argument count", "Caddyfile:3", ""},
		{"credits_admin nested block", ":8080 {\n\tcredits_admin {\n\t\ttoken a {\n\t\t}\n\t}\n}\n", "unexpected '{'", "Caddyfile:3", ""},
		{"credits_admin two tokens of the default name", ":8080 {\n\tcredits_admin {\n\t\ttoken a\n\t\ttoken b\n\t}\n}\n", "two tokens are named admin", "Caddyfile:4", ""},
		{"credits_admin two tokens of one name", ":8080 {\n\tcredits_admin {\n\t\ttoken ops a\n\t\ttoken ci b\n\t\ttoken ops c\n\t}\n}\n", "two tokens are named ops", "Caddyfile:5", ""},
		{"credits_admin two tokens of one value", ":8080 {\n\tcredits_admin {\n\t\ttoken ops hush-hush\n\t\ttoken ci hush-hush\n\t}\n}\n", "token ci has the value of another token", "Caddyfile:4", "hush-hush"},
		{"credits_admin token name not an id", ":8080 {\n\tcredits_admin {\n\t\ttoken \"o ps\" hush-hush\n\t}\n}\n", `token name "o ps" must match`, "Caddyfile:3", "hush-hush"},
		{"credits_admin token with three arguments", ":8080 {\n\tcredits_admin {\n\t\ttoken ops hush hush\n\t}\n}\n", "wrong argument count", "Caddyfile:3", ""},

		// the credits global option
		{"global unknown subdirective", inGlobal("redis_url redis://localhost"), "unrecognized subdirective 'redis_url'", "Caddyfile:3", ""},
		{"default_plan month 13", inGlobal("default_plan 100 13"), `invalid recharge_month "13": must be an integer from 1 to 12`, "Caddyfile:3", ""},
		{"default_plan month 0", inGlobal("default_plan 100 0"), `invalid recharge_month "0"`, "Caddyfile:3", ""},
		{"default_plan negative", inGlobal("default_plan -5"), `invalid allowance "-5": must be an integer from 0 to 1000000000000`, "Caddyfile:3", ""},
		{"default_plan too large", inGlobal("default_plan 1000000000001"), `invalid allowance "1000000000001"`, "Caddyfile:3", ""},
		{"default_plan no argument", inGlobal("default_plan"), "wrong argument count", "Caddyfile:3", ""},
		{"default_plan extra argument", inGlobal("default_plan 100 1 2"), "wrong argument count", "Caddyfile:3", ""},
		{"timeout soon", inGlobal("timeout soon"), `invalid timeout "soon"`, "Caddyfile:3", ""},
		{"timeout 0", inGlobal("timeout 0"), `invalid timeout "0": must be a duration above 0`, "Caddyfile:3", ""},
		{"timeout negative", inGlobal("timeout -1s"), `invalid timeout "-1s"`, "Caddyfile:3", ""},
		{"redis and redis_cluster", inGlobal("redis redis://localhost:6379", "redis_cluster 10.0.0.1:7000"), "redis and redis_cluster are both given; choose one", "Caddyfile:4", ""},
		{"redis_cluster and redis", inGlobal("redis_cluster 10.0.0.1:7000", "redis redis://localhost:6379"), "redis and redis_cluster are both given; choose one", "Caddyfile:4", ""},
		{"duplicated key_prefix", inGlobal("key_prefix a", "key_prefix b"), "key_prefix is given twice", "Caddyfile:4", ""},
		{"duplicated redis", inGlobal("redis redis://a:6379", "redis redis://b:6379"), "redis is given twice", "Caddyfile:4", ""},
		{"bad redis scheme", inGlobal("redis http://localhost:6379"), "invalid redis URL: it must start with redis:// or rediss://", "Caddyfile:3", ""},
		{"redis without scheme", inGlobal("redis localhost:6379"), "invalid redis URL", "Caddyfile:3", ""},
		{"redis unix socket", inGlobal("redis unix:///run/redis.sock"), "must start with redis:// or rediss://", "Caddyfile:3", ""},
		{"bad redis scheme with a password", inGlobal("redis http://app:hunter2secret@localhost:6379"), "must start with redis:// or rediss://", "Caddyfile:3", "hunter2secret"},
		{"bad redis db with a password", inGlobal("redis redis://app:hunter2secret@localhost:6379/notadb"), "invalid redis URL", "Caddyfile:3", "hunter2secret"},
		{"unparsable redis URL with a password", inGlobal("redis redis://app:hunter2secret@[::1"), "invalid redis URL", "Caddyfile:3", "hunter2secret"},
		{"redis extra argument", inGlobal("redis redis://localhost:6379 redis://other:6379"), "wrong argument count", "Caddyfile:3", ""},
		{"redis_cluster without nodes", inGlobal("redis_cluster"), "wrong argument count", "Caddyfile:3", ""},
		{"redis_cluster node without port", inGlobal("redis_cluster 10.0.0.1:7000 10.0.0.2"), `invalid redis_cluster node "10.0.0.2": must be host:port`, "Caddyfile:3", ""},
		{"redis_cluster node with a bad URL", inGlobal("redis_cluster http://:secret@10.0.0.1:7000"), "must start with redis:// or rediss://", "Caddyfile:3", "secret"},
		{"redis_cluster seeds with two passwords", inGlobal("redis_cluster redis://:secret1@10.0.0.1:7000 redis://:secret2@10.0.0.2:7000"), "seed 2: its user, password or scheme differs", "Caddyfile:3", "secret"},
		{"redis_cluster seeds with and without TLS", inGlobal("redis_cluster rediss://:secret@10.0.0.1:7000 redis://:secret@10.0.0.2:7000"), "seed 2: its user, password or scheme differs", "Caddyfile:3", "secret"},
		{"redis_cluster seed with a db", inGlobal("redis_cluster redis://:secret@10.0.0.1:7000/2"), "seed 1: a Redis Cluster has only db 0", "Caddyfile:3", "secret"},
		{"redis_cluster node bad port", inGlobal("redis_cluster 10.0.0.1:99999"), "must be host:port", "Caddyfile:3", ""},
		{"redis and redis_sentinel", inGlobal("redis redis://localhost:6379", "redis_sentinel main 10.0.0.1:26379"), "redis and redis_sentinel are both given; choose one", "Caddyfile:4", ""},
		{"redis_sentinel without sentinels", inGlobal("redis_sentinel main"), "redis_sentinel needs the master's name and at least one sentinel", "Caddyfile:3", ""},
		{"redis_sentinel sentinel without port", inGlobal("redis_sentinel main 10.0.0.1"), `invalid redis_sentinel sentinel "10.0.0.1": must be host:port`, "Caddyfile:3", ""},
		{"redis_sentinel unknown option", inGlobal("redis_sentinel main 10.0.0.1:26379 {", "\tpasword secret", "}"), "redis_sentinel: unrecognized subdirective 'pasword'", "Caddyfile:4", "secret"},
		{"redis_sentinel password twice", inGlobal("redis_sentinel main 10.0.0.1:26379 {", "\tpassword a", "\tpassword b", "}"), "redis_sentinel: password is given twice", "Caddyfile:5", ""},
		{"redis_sentinel bad db", inGlobal("redis_sentinel main 10.0.0.1:26379 {", "\tdb -1", "}"), "db", "Caddyfile:4", ""},
		{"tls_ca without Redis", inGlobal("tls_ca /etc/ca.pem"), "tls_ca and tls_client are for a Redis over TLS", "Caddyfile:3", ""},
		{"tls_ca with redis://", inGlobal("redis redis://localhost:6379", "tls_ca /etc/ca.pem"), "tls_ca and tls_client need a rediss:// URL in redis", "Caddyfile:4", ""},
		{"tls_client with one file", inGlobal("redis rediss://localhost:6379", "tls_client /etc/cert.pem"), "wrong argument count", "Caddyfile:4", ""},
		{"redis without its URL", inGlobal("redis"), "redis needs a redis:// or rediss:// URL", "Caddyfile:3", ""},
		{"key_prefix with a brace", inGlobal("key_prefix a{b}"), `invalid key_prefix "a{b}"`, "Caddyfile:3", ""},
		{"topup_url relative", inGlobal("topup_url /topup"), `invalid topup_url "/topup": must be an absolute http or https URL`, "Caddyfile:3", ""},
		{"topup_url other scheme", inGlobal("topup_url mailto:billing@example.com"), "must be an absolute http or https URL", "Caddyfile:3", ""},
		{"wait_replicas negative", inGlobal("redis redis://localhost:6379", "wait_replicas -1"), `invalid wait_replicas "-1": must be an integer from 0 to 16`, "Caddyfile:4", ""},
		{"wait_replicas text", inGlobal("redis redis://localhost:6379", "wait_replicas one"), `invalid wait_replicas "one"`, "Caddyfile:4", ""},
		{"wait_replicas without Redis", inGlobal("wait_replicas 1"), "wait_replicas is for a Redis with replicas: give redis, redis_cluster or redis_sentinel", "Caddyfile:3", ""},
		{"backlog 0", inGlobal("backlog 0"), `invalid backlog "0": must be an integer from 1 to 10000000`, "Caddyfile:3", ""},
		{"backlog text", inGlobal("backlog many"), `invalid backlog "many"`, "Caddyfile:3", ""},
		{"lease 0", inGlobal("lease 0"), `invalid lease "0": must be off or an integer from 1 to 1000000`, "Caddyfile:3", ""},
		{"lease twice", inGlobal("lease 5\n\t\tlease 6"), `lease is given twice`, "Caddyfile:4", ""},
		{"global nested block", inGlobal("redis redis://localhost:6379 {", "db 2", "}"), "unexpected '{'", "Caddyfile:3", ""},
		{"alerts without a URL", inGlobal("alerts {", "secret hush-hush", "}"), "wrong argument count", "Caddyfile:3", ""},
		{"alerts URL not http", inGlobal("alerts ftp://hooks.example {", "secret hush-hush", "}"), `alerts url "ftp://hooks.example": must be an absolute http or https URL`, "Caddyfile:5", "hush-hush"},
		{"alerts without a secret", inGlobal("alerts https://hooks.example {", "thresholds 10", "}"), "alerts: a secret is required", "Caddyfile:5", ""},
		{"alerts threshold 0", inGlobal("alerts https://hooks.example {", "secret hush-hush", "thresholds 10 0", "}"), `invalid threshold "0": must be an integer from 1 to 1000000000000`, "Caddyfile:5", "hush-hush"},
		{"alerts threshold twice", inGlobal("alerts https://hooks.example {", "secret hush-hush", "thresholds 10 10", "}"), "alerts threshold 10 is given twice", "Caddyfile:6", "hush-hush"},
		{"alerts unknown setting", inGlobal("alerts https://hooks.example {", "secret hush-hush", "retries 3", "}"), "alerts: unrecognized subdirective 'retries'", "Caddyfile:5", "hush-hush"},
		{"alerts twice", inGlobal("alerts https://a.example {", "secret s", "}", "alerts https://b.example {", "secret s", "}"), "alerts is given twice", "Caddyfile:6", ""},
		{"argument on the global option", "{\n\tcredits extra\n}\n\n:8080 {\n\trespond ok\n}\n", "wrong argument count", "Caddyfile:2", ""},
		{"global option twice", "{\n\tcredits {\n\t\tkey_prefix a\n\t}\n\tcredits {\n\t\ttimeout 1s\n\t}\n}\n\n:8080 {\n\trespond ok\n}\n", "the credits global option is given twice", "Caddyfile:5", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := adaptCaddyfile(tc.input)
			if err == nil {
				t.Fatalf("adapted without an error, want one containing %q; input:\n%s\noutput: %s", tc.want, tc.input, out)
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not contain %q", msg, tc.want)
			}
			if !strings.Contains(msg, ", at "+tc.at) {
				t.Errorf("error %q is not at %s", msg, tc.at)
			}
			if tc.never != "" && strings.Contains(msg, tc.never) {
				t.Errorf("error %q gives away %q", msg, tc.never)
			}
		})
	}
}

// TestCaddyfileAdminWithoutBlock checks that credits_admin stands alone and
// then has no token.
func TestCaddyfileAdminWithoutBlock(t *testing.T) {
	out, err := adaptCaddyfile("http://127.0.0.1:2020 {\n\tbind 127.0.0.1\n\tcredits_admin\n}\n")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(out, []byte(`{"handler":"credits_admin"}`)) {
		t.Errorf("no credits_admin without a token in %s", out)
	}
}

// creditsBlocks returns the body of each `credits ... {` block in a
// Caddyfile: the seeds for FuzzCaddyfile.
func creditsBlocks(caddyfile string) []string {
	var bodies []string
	lines := strings.Split(caddyfile, "\n")
	for i := 0; i < len(lines); i++ {
		head := strings.TrimSpace(lines[i])
		if !strings.HasPrefix(head, "credits ") || !strings.HasSuffix(head, "{") {
			continue
		}
		indent := lines[i][:len(lines[i])-len(strings.TrimLeft(lines[i], "\t "))]
		var body []string
		for i++; i < len(lines) && lines[i] != indent+"}"; i++ {
			body = append(body, strings.TrimSpace(lines[i]))
		}
		bodies = append(bodies, strings.Join(body, "\n"))
	}
	return bodies
}

// FuzzCaddyfile feeds arbitrary text to the credits handler's block and to
// the credits global option's block: the adapter must never panic, and what
// it adapts must be JSON.
func FuzzCaddyfile(f *testing.F) {
	for _, file := range caddyfileGoldens(f) {
		input, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		for _, body := range creditsBlocks(string(input)) {
			f.Add(body)
		}
	}
	for _, seed := range []string{
		"",
		"org a\nfeature b\ncost {header.X}\non_exhausted overdraft\noverdraft_limit 0",
		"org a\nfeature b\non_exhausted notice\nlow_balance 1\nfail_mode open",
		"redis redis://u:p@h:1/2\ndefault_plan 1 12\ntimeout 1ms",
		"org a\nfeature b\n}\n}\n:9090 {\ncredits {\norg c",
		"org `a b`\nfeature <<EOF\nx\nEOF",
		"org \"{\"\nfeature \"\\\"\"",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, body string) {
		// import reads files (even /dev/zero); it is Caddy's, not ours.
		if strings.Contains(body, "import") {
			t.Skip()
		}
		for _, input := range []string{
			":8080 {\n\tcredits {\n" + body + "\n\t}\n}\n",
			"{\n\tcredits {\n" + body + "\n\t}\n}\n\n:8080 {\n\trespond ok\n}\n",
		} {
			out, err := adaptCaddyfile(input)
			if err != nil {
				continue
			}
			var v any
			if err := json.Unmarshal(out, &v); err != nil {
				t.Fatalf("adapted to invalid JSON: %v\ninput:\n%s\noutput: %s", err, input, out)
			}
		}
	})
}

// TestREADMEJSONConfig loads the JSON config of docs/caddyfile.md as it
// is, on a real redis-server: every module and field in it exists, and its
// durations and placeholders are read.
func TestREADMEJSONConfig(t *testing.T) {
	block := readmeBlock(t, "../docs/caddyfile.md", "## JSON config", "json")
	srv := redistest.Start(t, redistest.Options{Password: "docs-pass"})
	if !strings.Contains(block, "127.0.0.1:6379") {
		t.Fatal("the JSON config does not name the Redis the test replaces")
	}
	block = strings.ReplaceAll(block, "127.0.0.1:6379", srv.Addr)
	t.Setenv("REDIS_PASSWORD", "docs-pass")
	t.Setenv("CREDITS_ADMIN_TOKEN", "s3cret")
	var cfg caddy.Config
	dec := json.NewDecoder(strings.NewReader(block))
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("the JSON config does not parse: %v\n%s", err, block)
	}
	if err := caddy.Validate(&cfg); err != nil {
		t.Fatalf("the JSON config does not load: %v", err)
	}
}

// TestConfigRulesOneMessage: a rule broken in a Caddyfile and the same rule
// broken in a JSON config give one message, the module's own: the
// Caddyfile's at the line of the setting at fault.
func TestConfigRulesOneMessage(t *testing.T) {
	route := func(fields string) string {
		return `{"apps":{"http":{"servers":{"s":{"listen":["127.0.0.1:0"],"routes":[{"handle":[{"handler":"credits",` + fields + `}]}]}}}}}`
	}
	app := func(fields string) string { return `{"apps":{"credits":{` + fields + `}}}` }
	for _, tc := range []struct {
		name      string
		caddyfile string
		at        string
		json      string
		want      string
	}{
		{"on_exhausted", inSite("org acme", "feature f", "on_exhausted never"), "Caddyfile:5",
			route(`"org":"acme","feature":"f","on_exhausted":"never"`), `invalid on_exhausted "never": must be block, notice or overdraft`},
		{"fail_mode", inSite("org acme", "feature f", "fail_mode sometimes"), "Caddyfile:5",
			route(`"org":"acme","feature":"f","fail_mode":"sometimes"`), `invalid fail_mode "sometimes": must be open or closed`},
		{"usage", inSite("org acme", "feature f", "usage gemini"), "Caddyfile:5",
			route(`"org":"acme","feature":"f","usage":"gemini"`), `invalid usage "gemini": must be header, openai or anthropic`},
		{"org empty", inSite(`org ""`, "feature f"), "Caddyfile:3",
			route(`"org":"","feature":"f"`), "org is required"},
		{"org written out", inSite(`org "acme corp"`, "feature f"), "Caddyfile:3",
			route(`"org":"acme corp","feature":"f"`), `invalid org "acme corp"`},
		{"lease", inGlobal("lease -5"), "Caddyfile:3",
			app(`"lease":-5`), `invalid lease "-5": must be off or an integer from 1 to 1000000`},
		{"backlog", inGlobal("backlog 10000001"), "Caddyfile:3",
			app(`"backlog":10000001`), `invalid backlog "10000001": must be an integer from 1 to 10000000`},
		{"wait_replicas", inGlobal("redis redis://127.0.0.1:6379", "wait_replicas 17"), "Caddyfile:4",
			app(`"redis":"redis://127.0.0.1:6379","wait_replicas":17`), `invalid wait_replicas "17": must be an integer from 0 to 16`},
		{"timeout", inGlobal("timeout -1s"), "Caddyfile:3",
			app(`"timeout":"-1s"`), `invalid timeout "-1s": must be a duration above 0`},
		{"redis and redis_cluster", inGlobal("redis redis://127.0.0.1:6379", "redis_cluster 127.0.0.1:7000"), "Caddyfile:4",
			app(`"redis":"redis://127.0.0.1:6379","redis_cluster":["127.0.0.1:7000"]`), "redis and redis_cluster are both given; choose one"},
		{"alerts threshold", inGlobal("alerts https://hooks.example {", "secret s", "thresholds 0", "}"), "Caddyfile:5",
			app(`"alerts":{"url":"https://hooks.example","secret":"s","thresholds":[0]}`), `invalid threshold "0": must be an integer from 1 to 1000000000000`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := adaptCaddyfile(tc.caddyfile)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), ", at "+tc.at) {
				t.Errorf("Caddyfile: %v; want %q at %s", err, tc.want, tc.at)
			}
			var cfg caddy.Config
			if err := json.Unmarshal([]byte(tc.json), &cfg); err != nil {
				t.Fatal(err)
			}
			if err := caddy.Validate(&cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("JSON: %v; want %q", err, tc.want)
			}
		})
	}
}
