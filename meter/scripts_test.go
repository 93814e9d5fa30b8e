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
			for _, lib := range []string{"base", "account", "marker", "holds", "refs", "images", "alerts", "calls"} {
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

// An include of a file that is missing, or one that includes itself, is
// an error that names it.
func TestScriptIncludeErrors(t *testing.T) {
	if _, err := Script("nothing.lua"); err == nil || !strings.Contains(err.Error(), "nothing.lua") {
		t.Errorf("a missing script: %v", err)
	}
}
