package policy_test

import (
	"errors"
	"regexp"
	"strconv"
	"testing"

	"github.com/creditsgw/caddy-credits/policy"
)

// FuzzOrgAndCost feeds arbitrary text to the org, feature, cost,
// Idempotency-Key and Credits-Usage parsers: they never panic, accept
// exactly what the contract allows, and reject everything else with a typed
// error.
func FuzzOrgAndCost(f *testing.F) {
	for _, s := range []string{"acme", "Acme-1.x_y", "", "{acme}", "a:b", "a b", "0", "1", "1000000", "1000001", "-1", "+1", "007", "1e3", "é", "\x00", "-0", "0x1", " 1", "0000000", "9999999"} {
		f.Add(s)
	}
	ids := regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	f.Fuzz(func(t *testing.T, s string) {
		var ie *policy.InputError
		err := policy.ValidateOrg(s)
		switch {
		case s == "" && !errors.Is(err, policy.ErrOrgMissing):
			t.Fatalf("empty org: %v", err)
		case s != "" && ids.MatchString(s) != (err == nil):
			t.Fatalf("ValidateOrg(%q) = %v", s, err)
		case s != "" && err != nil && !errors.As(err, &ie):
			t.Fatalf("ValidateOrg(%q): untyped error %v", s, err)
		}
		if err := policy.ValidateFeature(s); ids.MatchString(s) != (err == nil) {
			t.Fatalf("ValidateFeature(%q) = %v", s, err)
		}

		cost, err := policy.ParseCost(s)
		n, perr := strconv.ParseUint(s, 10, 64)
		wantOK := perr == nil && n >= policy.MinCost && n <= policy.MaxCost
		if wantOK != (err == nil) {
			t.Fatalf("ParseCost(%q) = %d, %v", s, cost, err)
		}
		if err == nil && cost != int64(n) {
			t.Fatalf("ParseCost(%q) = %d", s, cost)
		}
		if err != nil && (!errors.As(err, &ie) || cost != 0) {
			t.Fatalf("ParseCost(%q) = %d, %v (%T)", s, cost, err, err)
		}

		err = policy.ValidateIdempotencyKey(s)
		printable := len(s) >= 1 && len(s) <= 255
		for i := 0; printable && i < len(s); i++ {
			printable = s[i] >= 0x21 && s[i] <= 0x7e
		}
		if printable != (err == nil) {
			t.Fatalf("ValidateIdempotencyKey(%q) = %v", s, err)
		}

		usage, err := policy.ParseUsage([]string{s})
		digits := len(s) >= 1
		for i := 0; digits && i < len(s); i++ {
			digits = s[i] >= '0' && s[i] <= '9'
		}
		wantOK = digits && perr == nil && n <= policy.MaxCost
		if wantOK != (err == nil) || (err == nil && usage != int64(n)) {
			t.Fatalf("ParseUsage(%q) = %d, %v", s, usage, err)
		}
		if err != nil && !errors.As(err, &ie) {
			t.Fatalf("ParseUsage(%q): untyped error %v", s, err)
		}
		if _, err := policy.ParseUsage([]string{s, s}); err == nil {
			t.Fatalf("ParseUsage of two values %q accepted", s)
		}
	})
}
