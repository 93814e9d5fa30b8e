package meter

import (
	_ "embed"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/redis/go-redis/v9"
)

// Every script starts with the parts of lib.lua it uses (withLib), whose
// ARGV[1..7] are the same for all: now (unix ms), now as a month index, the
// default plan's allowance and month, the event lists' cap, the
// milliseconds added to Redis' clock (0 but in tests), and the seconds the
// call log is kept after the last call.
//
//go:embed lib.lua
var libLua string

// KEYS: account, request marker, call log, holds, kept response.
// ARGV[8..16]: feature, cost, overdraft (0/1), overdraft limit (-1: none),
// request id, marker seconds, attempt id, binding ('-': none), in-flight
// seconds.
//
//go:embed charge.lua
var chargeLua string

// KEYS: five per charge, as charge.lua's. ARGV[8..]: nine per charge, as
// charge.lua's ARGV[8..16].
//
//go:embed charges.lua
var chargesLua string

// KEYS: account, request marker, call log, holds. ARGV[8..10]: final cost,
// request id, 1 for a refund.
//
//go:embed settle.lua
var settleLua string

// KEYS: account, request marker, call log, holds. ARGV[8..10]: request id,
// attempt id, marker seconds.
//
//go:embed void.lua
var voidLua string

// KEYS: request marker, kept response. ARGV[8..11]: attempt id, marker
// seconds, 1 to keep the response (0: too large), the response.
//
//go:embed keep.lua
var keepLua string

// KEYS: account, call log, holds. ARGV[8..14]: lease id, sync number,
// credits wanted, credits to leave free, lifetime in ms, credits held
// unspent, the number n of spent pairs; then n feature and spent pairs, then
// feature, day, period and credits of each late correction.
//
//go:embed lease.lua
var leaseLua string

// KEYS: account, events, holds. ARGV[8..11]: hold id, amount, lifetime in
// ms, feature.
//
//go:embed hold.lua
var holdLua string

// KEYS: account, events, holds. ARGV[8..9]: hold id, credits to charge.
//
//go:embed capture.lua
var captureLua string

// KEYS: account, events, holds. ARGV[8..10]: hold id, 1 when a lease's
// gateway is gone, the reason.
//
//go:embed release.lua
var releaseLua string

// KEYS: account, events, holds.
//
//go:embed holds.lua
var holdsLua string

// KEYS: account, top-up references, events, holds, alerts. ARGV[8..11]: amount,
// reference, the most purchased credits an org may hold, how long a
// reference is kept in ms.
//
//go:embed topup.lua
var topUpLua string

// KEYS: account, top-up references, events, holds. ARGV[8..10]: amount,
// reference, how long a reference is kept in ms.
//
//go:embed voidtopup.lua
var voidTopUpLua string

// KEYS: account, references, events, holds, alerts. ARGV[8..12]: amount, reference,
// reason, the most purchased credits an org may hold, how long a reference
// is kept in ms.
//
//go:embed adjust.lua
var adjustLua string

// KEYS: account, events, holds, references, images. ARGV[8..12]:
// allowance, recharge month, reference, how long a reference is kept in ms,
// how long the images are kept in ms (0: none).
//
//go:embed plan.lua
var planLua string

// KEYS: account, alerts. ARGV[8..10]: thresholds, the check's time, org.
//
//go:embed alert.lua
var alertLua string

// KEYS: account, events, holds, references, images. ARGV[8..10]:
// reference, how long a reference is kept in ms, how long the images are
// kept in ms (0: none).
//
//go:embed recharge.lua
var rechargeLua string

// KEYS: account, events, holds, references, images. ARGV[8..10]: the
// write's kind (plan or recharge), its reference, how long a reference is
// kept in ms.
//
//go:embed voidwrite.lua
var voidWriteLua string

// KEYS: account, events, holds. ARGV[8]: hold id.
//
//go:embed voidhold.lua
var voidHoldLua string

// KEYS: account, events, holds.
//
//go:embed account.lua
var accountLua string

var (
	chargeScript    = redis.NewScript(withLib(chargeLua))
	chargesScript   = redis.NewScript(withLib(chargesLua))
	settleScript    = redis.NewScript(withLib(settleLua))
	voidScript      = redis.NewScript(withLib(voidLua))
	keepScript      = redis.NewScript(withLib(keepLua))
	leaseScript     = redis.NewScript(withLib(leaseLua))
	holdScript      = redis.NewScript(withLib(holdLua))
	captureScript   = redis.NewScript(withLib(captureLua))
	releaseScript   = redis.NewScript(withLib(releaseLua))
	holdsScript     = redis.NewScript(withLib(holdsLua))
	topUpScript     = redis.NewScript(withLib(topUpLua))
	voidTopUpScript = redis.NewScript(withLib(voidTopUpLua))
	adjustScript    = redis.NewScript(withLib(adjustLua))
	alertScript     = redis.NewScript(withLib(alertLua))
	planScript      = redis.NewScript(withLib(planLua))
	rechargeScript  = redis.NewScript(withLib(rechargeLua))
	voidWriteScript = redis.NewScript(withLib(voidWriteLua))
	voidHoldScript  = redis.NewScript(withLib(voidHoldLua))
	accountScript   = redis.NewScript(withLib(accountLua))
)

// A libPart is one top-level local of lib.lua (a function, or a list of
// names), with the comment above it.
type libPart struct {
	text  string
	names []string // what it defines
	uses  map[string]bool
}

var (
	luaIdent    = regexp.MustCompile(`[A-Za-z_][A-Za-z0-9_]*`)
	luaFunction = regexp.MustCompile(`^local function ([A-Za-z_][A-Za-z0-9_]*)`)
	luaLocals   = regexp.MustCompile(`^local ([A-Za-z_][A-Za-z0-9_]*(?:, *[A-Za-z_][A-Za-z0-9_]*)*)`)
	libParts    = splitLib(libLua)
)

// splitLib cuts lib.lua into its top-level locals. Every part starts at a
// line that begins with "local"; the comment lines right above it go with
// it, and lines before the first part (the file's own comment) go nowhere.
func splitLib(lib string) []libPart {
	lines := strings.SplitAfter(lib, "\n")
	var parts []libPart
	start := -1 // first line of the part being read
	comment := -1
	flush := func(end int) {
		if start < 0 {
			return
		}
		text := strings.Join(lines[start:end], "")
		head := lines[start]
		for i := start; i < end; i++ {
			if strings.HasPrefix(lines[i], "local ") {
				head = lines[i]
				break
			}
		}
		var names []string
		if m := luaFunction.FindStringSubmatch(head); m != nil {
			names = []string{m[1]}
		} else if m := luaLocals.FindStringSubmatch(head); m != nil {
			for _, n := range strings.Split(m[1], ",") {
				names = append(names, strings.TrimSpace(n))
			}
		}
		uses := map[string]bool{}
		for _, id := range luaIdent.FindAllString(code(text), -1) {
			uses[id] = true
		}
		parts = append(parts, libPart{text: text, names: names, uses: uses})
	}
	for i, line := range lines {
		switch {
		case strings.HasPrefix(line, "--"):
			if comment < 0 {
				comment = i
			}
		case strings.HasPrefix(line, "local "):
			from := i
			if comment >= 0 {
				from = comment
			}
			flush(from)
			start, comment = from, -1
		default:
			comment = -1
		}
	}
	flush(len(lines))
	return parts
}

// code is Lua text without its comment lines (a comment after code on the
// same line stays: it can only bring in a part that is not needed).
func code(text string) string {
	var b strings.Builder
	for line := range strings.Lines(text) {
		if !strings.HasPrefix(strings.TrimSpace(line), "--") {
			b.WriteString(line)
		}
	}
	return b.String()
}

// withLib returns body preceded by the parts of lib.lua that it names, and
// the parts those name, in lib.lua's order. Every part a script carries is
// built again on each call, so a charge that carried the whole library
// would spend Redis time on every call defining functions it never runs. A
// name found anywhere in the code brings its part in: a part is never
// missing, at worst one is carried that is not needed.
func withLib(body string) string {
	need := map[string]bool{}
	for _, id := range luaIdent.FindAllString(code(body), -1) {
		need[id] = true
	}
	keep := make([]bool, len(libParts))
	for changed := true; changed; {
		changed = false
		for i := len(libParts) - 1; i >= 0; i-- {
			p := libParts[i]
			if keep[i] {
				continue
			}
			for _, n := range p.names {
				if need[n] {
					keep[i], changed = true, true
					for id := range p.uses {
						need[id] = true
					}
					break
				}
			}
		}
	}
	var b strings.Builder
	for i, p := range libParts {
		if keep[i] {
			b.WriteString(p.text)
		}
	}
	b.WriteString(body)
	return b.String()
}

// Script return codes, the first element of every reply; lib.lua names
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
