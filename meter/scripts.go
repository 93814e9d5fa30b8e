package meter

import (
	_ "embed"
	"errors"
	"fmt"

	"github.com/redis/go-redis/v9"
)

// Every script starts with lib.lua, whose ARGV[1..6] are the same for all:
// now (unix ms), now as a month index, the default plan's allowance and month,
// the event list's cap, and the milliseconds added to Redis' clock (0 but in
// tests).
//
//go:embed lib.lua
var libLua string

// KEYS: account, request marker, events, holds, kept response.
// ARGV[7..15]: feature, cost, overdraft (0/1), overdraft limit (-1: none),
// request id, marker seconds, attempt id, binding ('-': none), in-flight
// seconds.
//
//go:embed charge.lua
var chargeLua string

// KEYS: account, request marker, events, holds. ARGV[7..9]: final cost,
// request id, 1 for a refund.
//
//go:embed settle.lua
var settleLua string

// KEYS: account, request marker, events, holds. ARGV[7..9]: request id,
// attempt id, marker seconds.
//
//go:embed void.lua
var voidLua string

// KEYS: request marker, kept response. ARGV[7..10]: attempt id, marker
// seconds, 1 to keep the response (0: too large), the response.
//
//go:embed keep.lua
var keepLua string

// KEYS: account, events, holds. ARGV[7..12]: lease id, sync number, credits
// wanted, credits to leave free, lifetime in ms, credits held unspent; then
// feature and spent pairs.
//
//go:embed lease.lua
var leaseLua string

// KEYS: account, events, holds. ARGV[7..10]: hold id, amount, lifetime in
// ms, feature.
//
//go:embed hold.lua
var holdLua string

// KEYS: account, events, holds. ARGV[7..8]: hold id, credits to charge.
//
//go:embed capture.lua
var captureLua string

// KEYS: account, events, holds. ARGV[7]: hold id.
//
//go:embed release.lua
var releaseLua string

// KEYS: account, events, holds.
//
//go:embed holds.lua
var holdsLua string

// KEYS: account, top-up references, events, holds. ARGV[7..10]: amount,
// reference, the most purchased credits an org may hold, how long a
// reference is kept in ms.
//
//go:embed topup.lua
var topUpLua string

// KEYS: account, top-up references, events, holds. ARGV[7..9]: amount,
// reference, how long a reference is kept in ms.
//
//go:embed voidtopup.lua
var voidTopUpLua string

// KEYS: account, events, holds. ARGV[7..8]: allowance, recharge month.
//
//go:embed plan.lua
var planLua string

// KEYS: account, events, the recharge's marker, holds.
//
//go:embed recharge.lua
var rechargeLua string

// KEYS: account, events, holds.
//
//go:embed account.lua
var accountLua string

var (
	chargeScript    = redis.NewScript(libLua + chargeLua)
	settleScript    = redis.NewScript(libLua + settleLua)
	voidScript      = redis.NewScript(libLua + voidLua)
	keepScript      = redis.NewScript(libLua + keepLua)
	leaseScript     = redis.NewScript(libLua + leaseLua)
	holdScript      = redis.NewScript(libLua + holdLua)
	captureScript   = redis.NewScript(libLua + captureLua)
	releaseScript   = redis.NewScript(libLua + releaseLua)
	holdsScript     = redis.NewScript(libLua + holdsLua)
	topUpScript     = redis.NewScript(libLua + topUpLua)
	voidTopUpScript = redis.NewScript(libLua + voidTopUpLua)
	planScript      = redis.NewScript(libLua + planLua)
	rechargeScript  = redis.NewScript(libLua + rechargeLua)
	accountScript   = redis.NewScript(libLua + accountLua)
)

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
