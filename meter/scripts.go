package meter

import (
	"embed"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/redis/go-redis/v9"
)

// scripts are the Lua files Redis runs, in lua/. A script shares code with
// others only by explicit includes: a line "--#include lib/<name>.lua" is
// replaced by that file, once per script, after the files it includes in
// turn. The assembled text is what Redis runs (Script prints it).
//
//go:embed lua
var scripts embed.FS

var (
	chargeScript    = newScript("charge.lua")
	chargesScript   = newScript("charges.lua")
	settleScript    = newScript("settle.lua")
	voidScript      = newScript("void.lua")
	keepScript      = newScript("keep.lua")
	leaseScript     = newScript("lease.lua")
	holdScript      = newScript("hold.lua")
	captureScript   = newScript("capture.lua")
	releaseScript   = newScript("release.lua")
	holdsScript     = newScript("holds.lua")
	topUpScript     = newScript("topup.lua")
	voidTopUpScript = newScript("voidtopup.lua")
	adjustScript    = newScript("adjust.lua")
	alertScript     = newScript("alert.lua")
	planScript      = newScript("plan.lua")
	rechargeScript  = newScript("recharge.lua")
	voidWriteScript = newScript("voidwrite.lua")
	voidHoldScript  = newScript("voidhold.lua")
	accountScript   = newScript("account.lua")
	grantScript     = newScript("grant.lua")
	grantsScript    = newScript("grants.lua")
	voidGrantScript = newScript("voidgrant.lua")
)

const includeLine = "--#include "

func newScript(name string) *redis.Script {
	text, err := Script(name)
	if err != nil {
		panic(err)
	}
	return redis.NewScript(text)
}

// Script returns the Lua text Redis runs for the script file name (in
// lua/, e.g. "charge.lua"), its includes in place.
func Script(name string) (string, error) {
	var b strings.Builder
	if err := include(&b, name, map[string]bool{}, nil); err != nil {
		return "", err
	}
	return b.String(), nil
}

// include writes file name to b, each file it includes first (once: seen
// holds those written or being written). path is the chain of includes
// that led here, to name a cycle.
func include(b *strings.Builder, name string, seen map[string]bool, path []string) error {
	if slices.Contains(path, name) {
		return fmt.Errorf("lua: include cycle %s", strings.Join(append(path, name), " -> "))
	}
	if seen[name] {
		return nil
	}
	seen[name] = true
	raw, err := scripts.ReadFile("lua/" + name)
	if err != nil {
		return fmt.Errorf("lua: %w", err)
	}
	var body strings.Builder
	for line := range strings.Lines(string(raw)) {
		if dep, ok := strings.CutPrefix(line, includeLine); ok {
			if err := include(b, strings.TrimSpace(dep), seen, append(path, name)); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			continue
		}
		body.WriteString(line)
	}
	b.WriteString(body.String())
	if !strings.HasSuffix(body.String(), "\n") {
		b.WriteString("\n")
	}
	return nil
}

// Script return codes, the first element of every reply; lua/lib/base.lua names
// them the same.
const (
	codeOK        = 0
	codeRefused   = 1
	codeRepeat    = 2
	codeNotFound  = 3
	codeLimit     = 4
	codeVoided    = 5
	codeWrongType = 6
	codeEnded     = 7
	codeInFlight  = 8
	codeMismatch  = 9
	codeLease     = 10
	codeFull      = 11
)

// ErrWrongType means a key the script needs holds another type of data
// (left by something else, or an incompatible version): the script stopped
// before writing anything.
var ErrWrongType = errors.New("a ledger key holds data of another type")

// wrongType reads the rest of a codeWrongType reply: the key's position and
// the type found.
func wrongType(keys []string, v []any) error {
	if len(v) >= 3 {
		if i, ok := v[1].(int64); ok && i >= 1 && int(i) <= len(keys) {
			return fmt.Errorf("%w: %s is a %v; nothing was written", ErrWrongType, keys[i-1], v[2])
		}
	}
	return fmt.Errorf("%w; nothing was written", ErrWrongType)
}
