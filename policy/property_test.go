package policy_test

import (
	"errors"
	"regexp"
	"strconv"
	"testing"

	"pgregory.net/rapid"

	"github.com/creditsgw/caddy-credits/policy"
)

var idRE = regexp.MustCompile(idPattern)

// idLike draws strings near the edge of the id pattern: valid ids, valid ids
// with one byte changed or added, ids around the 64-byte limit, and
// arbitrary strings and bytes.
func idLike() *rapid.Generator[string] {
	idByte := rapid.SampledFrom([]byte("aZ09._-"))
	anyByte := rapid.SampledFrom([]byte("aZ09._-" + " {}:/@[`\n\x00\x7f\xc3\xa9\xff"))
	return rapid.OneOf(
		rapid.StringMatching(idPattern),
		rapid.Custom(func(t *rapid.T) string {
			// A valid id with one byte replaced or inserted.
			b := []byte(rapid.StringMatching(idPattern).Draw(t, "id"))
			i := rapid.IntRange(0, len(b)).Draw(t, "at")
			c := anyByte.Draw(t, "byte")
			if i < len(b) && rapid.Bool().Draw(t, "replace") {
				b[i] = c
			} else {
				b = append(b[:i], append([]byte{c}, b[i:]...)...)
			}
			return string(b)
		}),
		rapid.Custom(func(t *rapid.T) string {
			// Lengths around the limit.
			n := rapid.SampledFrom([]int{63, 64, 65, 66}).Draw(t, "len")
			b := []byte{rapid.SampledFrom([]byte("aZ09")).Draw(t, "first")}
			return string(append(b, rapid.SliceOfN(idByte, n-1, n-1).Draw(t, "rest")...))
		}),
		rapid.StringN(0, 70, -1),
		rapid.Custom(func(t *rapid.T) string {
			return string(rapid.SliceOfN(rapid.Byte(), 0, 70).Draw(t, "bytes"))
		}),
	)
}

func TestValidateOrgMatchesPattern(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		s := idLike().Draw(t, "org")
		err := policy.ValidateOrg(s)
		if want := idRE.MatchString(s); (err == nil) != want {
			t.Fatalf("ValidateOrg(%q) = %v, regexp match = %v", s, err, want)
		}
		if s == "" && !errors.Is(err, policy.ErrOrgMissing) {
			t.Fatalf("ValidateOrg(\"\") = %v, want ErrOrgMissing", err)
		}
		if ferr := policy.ValidateFeature(s); (ferr == nil) != (err == nil) {
			t.Fatalf("ValidateFeature(%q) = %v but ValidateOrg = %v", s, ferr, err)
		}
	})
}

var costRE = regexp.MustCompile(`^[0-9]+$`)

func TestParseCostMatchesStrconv(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		s := rapid.OneOf(
			rapid.Map(rapid.Int64Range(-10, 2_000_000), func(n int64) string { return strconv.FormatInt(n, 10) }),
			rapid.StringOfN(rapid.SampledFrom([]rune("0123456789+- .e")), 0, 25, -1),
		).Draw(t, "cost")
		got, err := policy.ParseCost(s)
		n, perr := strconv.ParseInt(s, 10, 64)
		want := costRE.MatchString(s) && perr == nil && n >= policy.MinCost && n <= policy.MaxCost
		if (err == nil) != want {
			t.Fatalf("ParseCost(%q) = %d, %v; want ok = %v", s, got, err, want)
		}
		if err == nil && got != n {
			t.Fatalf("ParseCost(%q) = %d, want %d", s, got, n)
		}
	})
}

// TestValidateOrgEveryByte compares ValidateOrg with the pattern on every
// byte value, first and after a valid first byte, so that no byte is left to
// chance.
func TestValidateOrgEveryByte(t *testing.T) {
	for c := range 256 {
		for _, s := range []string{string([]byte{byte(c)}), "a" + string([]byte{byte(c)}), string([]byte{byte(c)}) + "a"} {
			if got, want := policy.ValidateOrg(s) == nil, idRE.MatchString(s); got != want {
				t.Errorf("ValidateOrg(%q) ok = %v, regexp match = %v", s, got, want)
			}
		}
	}
}
