package meter

import (
	"errors"
	"strings"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/policy"
)

// Class is what a store call's error says about making the call again.
// Every caller that must choose between waiting and giving up (the backlog,
// the request path's fail_mode, the admin API's 500 or 503) asks Classify.
type Class uint8

const (
	// NoError is the class of a nil error.
	NoError Class = iota
	// Transient is a store that could not do it now: unreachable, slow,
	// out of memory (OOM under noeviction), loading, busy with a script,
	// a replica, failing over or resharding. The same call may succeed
	// later. An error of unknown kind is transient too: giving up on a
	// call that might succeed loses credits.
	Transient
	// Corrupt is an org's ledger data the scripts cannot use: a key of
	// another type, a field that is not a number, a record that does not
	// parse. The script stopped before writing; no retry cures it, an
	// operator must look.
	Corrupt
	// Refused is the ledger's own answer: bad input, a request id with no
	// charge, a voided attempt, a key in flight or bound to another call, a
	// deferred charge too old to send again. No retry changes it.
	Refused
)

// String names the class in logs.
func (c Class) String() string {
	switch c {
	case NoError:
		return "none"
	case Transient:
		return "transient"
	case Corrupt:
		return "corrupt"
	case Refused:
		return "refused"
	}
	return "unknown"
}

var (
	// ErrTransient matches (errors.Is) a store call's error of class
	// Transient.
	ErrTransient = errors.New("the store could not do it now")
	// ErrCorrupt matches (errors.Is) a store call's error of class Corrupt;
	// ErrWrongType errors match it too.
	ErrCorrupt = errors.New("an org's ledger data cannot be used")
)

// classed is a store call's error with its class, so that errors.Is finds
// ErrTransient or ErrCorrupt in it.
type classed struct {
	class Class
	err   error
}

func (e *classed) Error() string { return e.err.Error() }
func (e *classed) Unwrap() error { return e.err }
func (e *classed) Is(target error) bool {
	return (target == ErrTransient && e.class == Transient) || (target == ErrCorrupt && e.class == Corrupt)
}

// classify wraps a store call's error with its class; nil stays nil.
func classify(err error) error {
	if err == nil {
		return nil
	}
	var c *classed
	if errors.As(err, &c) {
		return err
	}
	return &classed{class: Classify(err), err: err}
}

// refusals are the ledger's own answers: no retry changes them.
var refusals = []error{ErrNotFound, ErrUnknownRequest, ErrTooLate, ErrVoided, ErrPurchasedLimit, ErrInFlight,
	ErrMismatch, ErrInsufficient, ErrHoldNotFound, ErrHoldEnded, errOverdraftRefused, policy.ErrOrgMissing,
	ErrGrantsFull, ErrExpiresPast, ErrGrantNotFound, ErrGrantEnded, ErrGrantFixed}

// Classify says what err, the error of a store call, means for making the
// call again. It is the one place that reads Redis' error replies.
func Classify(err error) Class {
	if err == nil {
		return NoError
	}
	var c *classed
	if errors.As(err, &c) {
		return c.class
	}
	if errors.Is(err, ErrWrongType) || errors.Is(err, ErrCorrupt) {
		return Corrupt
	}
	if errors.Is(err, ErrTransient) {
		return Transient
	}
	var inputErr *policy.InputError
	if errors.As(err, &inputErr) {
		return Refused
	}
	for _, r := range refusals {
		if errors.Is(err, r) {
			return Refused
		}
	}
	var re redis.Error
	if errors.As(err, &re) {
		return classifyReply(re.Error())
	}
	// A broken connection, a dial refused, a timeout, a deadline, a pool
	// exhausted, or anything unforeseen.
	return Transient
}

// Permanent reports whether no retry of the call can cure err: corrupt
// data, or the ledger's own refusal.
func Permanent(err error) bool {
	c := Classify(err)
	return c == Corrupt || c == Refused
}

// transientCodes are the error codes of a Redis that refuses a command
// now and would take it later. A script is refused with them before it
// runs, or at its first write (OOM, READONLY, MISCONF, NOREPLICAS: Redis
// lets a script that has written go on), so such a reply changed nothing.
var transientCodes = []string{"OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN",
	"NOSCRIPT", "MISCONF", "NOREPLICAS", "MOVED", "ASK"}

// classifyReply classifies an error reply of Redis, or of one charge of a
// batch (charges.lua's message of the error it caught).
func classifyReply(msg string) Class {
	if transientCode(msg) {
		return Transient
	}
	if strings.HasPrefix(msg, "WRONGTYPE") {
		return Corrupt
	}
	// An error a script raised (lua/lib/account.lua's "account field ... is not a
	// number", "corrupt hold record", or a Lua error on data it could not
	// read): Redis names the script's line, "user_script:<n>:".
	if strings.Contains(msg, "user_script:") {
		return Corrupt
	}
	// Another refusal of Redis' (too many clients, a missing password, a
	// proxy that does not know a command): the store's, not the org's.
	return Transient
}

// transientCode reports whether an error reply is one of transientCodes:
// at its start, as Redis 7 passes a script's failed command's error on,
// or quoted as "-CODE " inside, as Redis 6 wraps it.
func transientCode(msg string) bool {
	code, _, _ := strings.Cut(msg, " ")
	for _, c := range transientCodes {
		if code == c || strings.Contains(msg, "-"+c+" ") {
			return true
		}
	}
	return false
}

// refused reports whether err is an error reply with which Redis refused
// a script before it wrote anything (see transientCodes): the call
// certainly changed nothing.
func refused(err error) bool {
	var re redis.Error
	return errors.As(err, &re) && transientCode(re.Error())
}

// scriptError is the error one charge of a batch raised (charges.lua
// catches it and returns its message): a Redis error reply of its own, so
// that it is classified as the same error of a charge sent alone.
type scriptError string

func (e scriptError) Error() string { return string(e) }
func (scriptError) RedisError()     {}

// errOverdraftRefused is a deferred charge refused although it may go as
// deep as it must: only an inconsistent ledger answers so.
var errOverdraftRefused = errors.New("deferred overdraft charge refused")
