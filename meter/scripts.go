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
// replaced by that file, the files it includes in turn in place, once per
// script (a file included again adds nothing: what it defines is in scope
// already). The assembled text is what Redis runs (Script prints it).
//
//go:embed lua
var scripts embed.FS

const includeLine = "--#include "

// newScript compiles lua/name.
func newScript(name string) *redis.Script {
	text, err := Script(name)
	if err != nil {
		panic(err)
	}
	return redis.NewScript(text)
}

// luaScript is a Lua file Redis runs, with what each code it replies means
// to its caller.
type luaScript struct {
	*redis.Script
	codes replyCodes
}

// bind compiles lua/name, whose reply codes are codes.
func bind(name string, codes replyCodes) *luaScript {
	return &luaScript{Script: newScript(name), codes: codes}
}

// A binding is one call of one script: it fixes the order of the script's
// KEYS and of its ARGV after the head every script takes first
// (lua/lib/base.lua's ARGV[1..7], which eval puts in). Each binding's
// script is declared with it, under a comment that lists its KEYS, ARGV and
// reply.
type binding interface {
	script() *luaScript
	keys(k Keys) []string
	args(l *Ledger) []any
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
	for line := range strings.Lines(string(raw)) {
		if dep, ok := strings.CutPrefix(line, includeLine); ok {
			if err := include(b, strings.TrimSpace(dep), seen, append(path, name)); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			continue
		}
		b.WriteString(line)
	}
	if !strings.HasSuffix(string(raw), "\n") {
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
	codeBudget    = 12
)

// replyCodes says what each code a script may reply means to its caller:
// nil when the script did as asked, or had before (the caller reads the
// rest of the reply, and the code where it tells more), or the typed error
// the caller returns, with what else the reply holds. A code missing from a
// script's table is a broken reply.
type replyCodes map[int64]error

// reply is a script's reply, its code decoded.
type reply struct {
	code int64
	// err is what code means to the caller (replyCodes): nil or a typed
	// error.
	err error
	// v is the whole reply, the code first.
	v []any
}

// decode reads the code of v, s's reply to a call with keys. Its error is a
// broken reply, or ErrWrongType: the script stopped before it wrote
// anything.
func (s *luaScript) decode(keys []string, v []any) (reply, error) {
	if len(v) == 0 {
		return reply{}, errors.New("empty script reply")
	}
	code, ok := v[0].(int64)
	if !ok {
		return reply{}, fmt.Errorf("script code is %T, not an integer", v[0])
	}
	if code == codeWrongType {
		return reply{}, classify(wrongType(keys, v))
	}
	err, known := s.codes[code]
	if !known {
		return reply{}, fmt.Errorf("unexpected script code %d", code)
	}
	return reply{code: code, err: err, v: v}, nil
}

// account reads the account that follows the code of an account script's
// reply.
func (r reply) account(org string) (Account, error) {
	return parseAccount(org, r.v[1:])
}

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
