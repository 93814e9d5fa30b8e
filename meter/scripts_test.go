package meter

import (
	"context"
	"io/fs"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// Every script in lua/ assembles, carries each file it includes once and no
// include line, and compiles on a real Redis.
func TestScripts(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { rdb.Close() })
	names, err := fs.Glob(scripts, "lua/*.lua")
	if err != nil || len(names) == 0 {
		t.Fatalf("no scripts in lua/: %v", err)
	}
	for _, path := range names {
		name := strings.TrimPrefix(path, "lua/")
		t.Run(name, func(t *testing.T) {
			text, err := Script(name)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(text, includeLine) {
				t.Errorf("an include line is left in the assembled script")
			}
			for _, lib := range []string{"base", "fields", "account", "marker", "holds", "refs", "images", "alerts", "calls", "quick", "charge"} {
				head, err := scripts.ReadFile("lua/lib/" + lib + ".lua")
				if err != nil {
					t.Fatal(err)
				}
				// Each library file's first definition is its own.
				var def string
				for line := range strings.Lines(string(head)) {
					if strings.HasPrefix(line, "local ") {
						def = line
						break
					}
				}
				if n := strings.Count(text, def); def == "" || n > 1 {
					t.Errorf("lib/%s.lua's first definition is carried %d times", lib, n)
				}
			}
			if err := rdb.ScriptLoad(context.Background(), text).Err(); err != nil {
				t.Errorf("Redis does not compile it: %v", err)
			}
		})
	}

	// A script carries only what it includes: keep touches no account.
	keep, err := Script("keep.lua")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(keep, "local function load(") || strings.Contains(keep, "local function sweep(") {
		t.Errorf("the keep script carries account functions it never calls")
	}
}

// A charge builds the full way's functions only when it takes it: a
// script's top level builds each function it defines at every run, and the
// full way's are most of the charge script's. An include goes where its
// line is, so the full way's files are inside the builder.
func TestChargeBuildsFullWayOnlyWhenTaken(t *testing.T) {
	for _, name := range []string{"charge.lua", "charges.lua"} {
		text, err := Script(name)
		if err != nil {
			t.Fatal(err)
		}
		start, end := strings.Index(text, "full = (function()\n"), strings.Index(text, "return charge_full\n")
		if start < 0 || end < start {
			t.Fatalf("%s: no builder of the full way (%d, %d)", name, start, end)
		}
		for _, def := range []string{"local function charge_full(", "local function load(", "local function take(",
			"local function sweep(", "local function load_budget("} {
			if at := strings.Index(text, def); at < start || at > end {
				t.Errorf("%s: %s is at %d, outside the builder (%d to %d)", name, def, at, start, end)
			}
		}
		for _, def := range []string{"local function quick_charge(", "local function charge_start(",
			"local function parse_marker(", "local function prune_days("} {
			if at := strings.Index(text, def); at < 0 || at > start {
				t.Errorf("%s: %s is at %d, not before the builder (%d)", name, def, at, start)
			}
		}
	}
}

// An include of a file that is missing, or one that includes itself, is
// an error that names it.
func TestScriptIncludeErrors(t *testing.T) {
	if _, err := Script("nothing.lua"); err == nil || !strings.Contains(err.Error(), "nothing.lua") {
		t.Errorf("a missing script: %v", err)
	}
}

// Every function and constant a script's files define is used only after
// its definition: a name used earlier would be a global, which Redis
// refuses when it runs.
func TestScriptsDefineBeforeUse(t *testing.T) {
	names, err := fs.Glob(scripts, "lua/*.lua")
	if err != nil {
		t.Fatal(err)
	}
	for _, path := range names {
		name := strings.TrimPrefix(path, "lua/")
		text, err := Script(name)
		if err != nil {
			t.Fatal(err)
		}
		defined := map[string]int{} // name -> line of its definition
		lines := strings.Split(text, "\n")
		for i, line := range lines {
			rest, ok := strings.CutPrefix(line, "local ")
			if !ok {
				continue
			}
			rest, fn := strings.CutPrefix(rest, "function ")
			decl, _, _ := strings.Cut(rest, "=")
			decl, _, _ = strings.Cut(decl, "(")
			for _, n := range strings.Split(decl, ",") {
				if n = strings.TrimSpace(n); n != "" && (fn || n == strings.ToUpper(n)) {
					if _, seen := defined[n]; !seen {
						defined[n] = i
					}
				}
			}
		}
		for i, line := range lines {
			code, _, _ := strings.Cut(line, "--")
			for _, word := range luaWords(code) {
				if at, ok := defined[word]; ok && at > i {
					t.Errorf("%s: line %d uses %s before its definition on line %d", name, i+1, word, at+1)
				}
			}
		}
	}
}

// luaWords are the identifiers of a line of Lua, outside its strings.
func luaWords(line string) []string {
	var words []string
	var quote byte
	start := -1
	for i := 0; i <= len(line); i++ {
		var c byte
		if i < len(line) {
			c = line[i]
		}
		if quote != 0 {
			if c == quote {
				quote = 0
			}
			continue
		}
		ident := c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' && start >= 0
		if ident {
			if start < 0 {
				start = i
			}
			continue
		}
		// A field (after a dot) or a table's key (before a single =) is
		// not a use of a local.
		after := strings.TrimLeft(line[i:], " ")
		key := strings.HasPrefix(after, "=") && !strings.HasPrefix(after, "==")
		if start >= 0 && (start == 0 || line[start-1] != '.') && !key {
			words = append(words, line[start:i])
		}
		start = -1
		if c == '\'' || c == '"' {
			quote = c
		}
	}
	return words
}
