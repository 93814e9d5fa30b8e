package policy

import (
	"errors"
	"fmt"
	"strconv"
)

// IDPattern is the regular expression that org ids and feature names match.
// ValidateOrg and ValidateFeature implement it by hand, without regexp, so
// that a valid id costs no allocation on the request path.
const IDPattern = `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`

// maxIDLen is the longest org id or feature name, in bytes.
const maxIDLen = 64

// MinCost and MaxCost bound the credits one call may cost.
const (
	// MinCost is the smallest cost of a call.
	MinCost = 1
	// MaxCost is the largest cost of a call.
	MaxCost = 1_000_000
)

// maxIdempotencyKeyLen is the longest Idempotency-Key accepted, in bytes.
const maxIdempotencyKeyLen = 255

// maxShownValue is how many bytes of a rejected value an error message quotes.
const maxShownValue = 80

// ErrOrgMissing is returned when a request names no organization.
var ErrOrgMissing = errors.New("org missing")

// ErrSubjectMissing is returned when a budgeted request names no subject.
var ErrSubjectMissing = errors.New("budget subject missing")

// InputError reports a value that the gateway rejects: an org id, a feature
// name, a cost, an idempotency key or a mode.
type InputError struct {
	// Field names what the value is, e.g. "org" or "cost".
	Field string
	// Value is the rejected value, in full.
	Value string
	// Reason says what a valid value looks like.
	Reason string
}

// Error returns a message such as
// `invalid org "a b": must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`,
// quoting at most the first 80 bytes of the value.
func (e *InputError) Error() string {
	v := e.Value
	if len(v) > maxShownValue {
		v = v[:maxShownValue] + "..."
	}
	return fmt.Sprintf("invalid %s %q: %s", e.Field, v, e.Reason)
}

// RangeError is the error of an integer setting outside lo..hi, or of one
// that is not an integer: every integer range reads the same.
func RangeError(field, value string, lo, hi int64) *InputError {
	return &InputError{Field: field, Value: value,
		Reason: "must be an integer from " + strconv.FormatInt(lo, 10) + " to " + strconv.FormatInt(hi, 10)}
}

// ValidateOrg checks an org id against IDPattern. It returns ErrOrgMissing
// when org is empty, and an *InputError when org is otherwise invalid.
func ValidateOrg(org string) error {
	if org == "" {
		return ErrOrgMissing
	}
	if !validID(org) {
		return &InputError{Field: "org", Value: org, Reason: "must match " + IDPattern}
	}
	return nil
}

// ValidateSubject checks a budget's subject (a user, an API key, a team)
// against IDPattern. It returns ErrSubjectMissing when subject is empty, and
// an *InputError when it is invalid.
func ValidateSubject(subject string) error {
	if subject == "" {
		return ErrSubjectMissing
	}
	if !validID(subject) {
		return &InputError{Field: "subject", Value: subject, Reason: "must match " + IDPattern}
	}
	return nil
}

// ValidateFeature checks a feature name against IDPattern. It returns an
// *InputError when name is invalid, the empty name included.
func ValidateFeature(name string) error {
	if !validID(name) {
		return &InputError{Field: "feature", Value: name, Reason: "must match " + IDPattern}
	}
	return nil
}

// validID reports whether s matches IDPattern.
func validID(s string) bool {
	if len(s) == 0 || len(s) > maxIDLen || !isAlnum(s[0]) {
		return false
	}
	for i := 1; i < len(s); i++ {
		if c := s[i]; !isAlnum(c) && c != '.' && c != '_' && c != '-' {
			return false
		}
	}
	return true
}

// isAlnum reports whether c is an ASCII letter or digit. Bytes of a
// multi-byte UTF-8 sequence are all >= 0x80, so a non-ASCII rune never passes.
func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

// ParseCost parses the cost of a call: a decimal integer from MinCost to
// MaxCost, made of ASCII digits only (no sign, no spaces, no fraction).
// Leading zeros are accepted, as strconv.Atoi accepts them. Any other input,
// the empty string included, is an *InputError: a placeholder that yields no
// cost is an error, never the default.
func ParseCost(s string) (int64, error) {
	if s == "" {
		return 0, costError(s)
	}
	var n int64
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, costError(s)
		}
		n = n*10 + int64(c-'0')
		if n > MaxCost {
			// Stopping here also keeps n far from overflow on long input.
			return 0, costError(s)
		}
	}
	if n < MinCost {
		return 0, costError(s)
	}
	return n, nil
}

// costError is the error of a cost that ParseCost rejects.
func costError(s string) error {
	return RangeError("cost", s, MinCost, MaxCost)
}

// ValidateIdempotencyKey checks an Idempotency-Key header value: 1 to 255
// bytes, each printable ASCII from 0x21 to 0x7E (so no space). It returns an
// *InputError when k is invalid.
func ValidateIdempotencyKey(k string) error {
	ok := len(k) >= 1 && len(k) <= maxIdempotencyKeyLen
	for i := 0; ok && i < len(k); i++ {
		ok = k[i] >= 0x21 && k[i] <= 0x7E
	}
	if !ok {
		return &InputError{
			Field:  "idempotency key",
			Value:  k,
			Reason: "must be 1 to " + strconv.Itoa(maxIdempotencyKeyLen) + " printable ASCII characters without spaces",
		}
	}
	return nil
}
