package meter

import (
	_ "embed"

	"github.com/redis/go-redis/v9"
)

// Every script starts with lib.lua, whose ARGV[1..5] are the same for all:
// now (unix ms), now as a month index, the default plan's allowance and month,
// and the event list's cap.
//
//go:embed lib.lua
var libLua string

// KEYS: account, request marker, events, leases. ARGV[6..12]: feature, cost,
// overdraft (0/1), overdraft limit (-1: none), request id, marker seconds,
// attempt id.
//
//go:embed charge.lua
var chargeLua string

// KEYS: account, request marker, events. ARGV[6..7]: final cost, request id.
//
//go:embed settle.lua
var settleLua string

// KEYS: account, request marker, events. ARGV[6..8]: request id, attempt id,
// marker seconds.
//
//go:embed void.lua
var voidLua string

// KEYS: account, leases, events. ARGV[6..11]: lease id, sequence number,
// credits wanted, credits to leave free, lifetime in ms, credits held
// unspent; then feature and spent pairs.
//
//go:embed lease.lua
var leaseLua string

// KEYS: account, top-up references, events. ARGV[6..8]: amount, reference,
// the most purchased credits an org may hold.
//
//go:embed topup.lua
var topUpLua string

// KEYS: account, events. ARGV[6..7]: allowance, recharge month.
//
//go:embed plan.lua
var planLua string

// KEYS: account, events, the recharge's marker.
//
//go:embed recharge.lua
var rechargeLua string

// KEYS: account, events.
//
//go:embed account.lua
var accountLua string

var (
	chargeScript   = redis.NewScript(libLua + chargeLua)
	settleScript   = redis.NewScript(libLua + settleLua)
	voidScript     = redis.NewScript(libLua + voidLua)
	leaseScript    = redis.NewScript(libLua + leaseLua)
	topUpScript    = redis.NewScript(libLua + topUpLua)
	planScript     = redis.NewScript(libLua + planLua)
	rechargeScript = redis.NewScript(libLua + rechargeLua)
	accountScript  = redis.NewScript(libLua + accountLua)
)

// Script return codes, the first element of every reply.
const (
	codeOK       = 0
	codeRefused  = 1
	codeRepeat   = 2
	codeNotFound = 3
	codeLimit    = 4
	codeVoided   = 5
)
