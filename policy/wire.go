package policy

import (
	"net/http"
	"strings"
)

// HeaderHold carries the credits a call whose usage is known only at the
// end of its body holds; its final Credits-Charged comes as a trailer.
const HeaderHold = "Credits-Hold"

// HeaderReplayed marks the kept response of an earlier call with the same
// Idempotency-Key.
const HeaderReplayed = "Idempotent-Replayed"

// IsPreflight reports whether a request is a CORS preflight: OPTIONS with
// Access-Control-Request-Method. A preflight carries no credentials, names
// no org and is never charged.
func IsPreflight(method string, h http.Header) bool {
	return method == http.MethodOptions && len(h["Access-Control-Request-Method"]) > 0
}

// ParseUsage reads an upstream's Credits-Usage values: exactly one value of
// plain decimal digits (no sign, no spaces), at most MaxCost. Anything else
// is an *InputError, and the call is charged its cost.
func ParseUsage(values []string) (int64, error) {
	if len(values) != 1 {
		return 0, &InputError{Field: "Credits-Usage", Value: strings.Join(values, ", "), Reason: "must be sent once"}
	}
	v := values[0]
	var n int64
	for i := 0; i < len(v) && n <= MaxCost; i++ {
		if v[i] < '0' || v[i] > '9' {
			n = -1
			break
		}
		n = n*10 + int64(v[i]-'0')
	}
	if len(v) == 0 || n < 0 || n > MaxCost {
		return 0, &InputError{Field: "Credits-Usage", Value: v, Reason: "must be plain digits, 0 to 1000000"}
	}
	return n, nil
}

// KeyInFlight returns the 409 problem of a call whose Idempotency-Key's
// first call has not completed.
func KeyInFlight() *Problem {
	return &Problem{
		Type:   TypeKeyInFlight,
		Title:  "Idempotency-Key in use",
		Status: http.StatusConflict,
		Detail: "A call with this Idempotency-Key is still in flight; retry once it has completed.",
	}
}

// KeyNotKept returns the 409 problem of a call whose Idempotency-Key's
// first call completed with a response too large to keep, or cut.
func KeyNotKept() *Problem {
	return &Problem{
		Type:   TypeKeyNotKept,
		Title:  "Idempotency-Key response not kept",
		Status: http.StatusConflict,
		Detail: "The call with this Idempotency-Key completed, and its response was too large to keep for a replay, or was cut before its end; use a new key for a new call.",
	}
}

// KeyMismatched returns the 422 problem of a call whose Idempotency-Key an
// earlier call with another method, path, feature or cost used.
func KeyMismatched() *Problem {
	return &Problem{
		Type:   TypeKeyMismatch,
		Title:  "Idempotency-Key reused",
		Status: http.StatusUnprocessableEntity,
		Detail: "This Idempotency-Key was used for another call (method, path, feature or cost); use a new key.",
	}
}
