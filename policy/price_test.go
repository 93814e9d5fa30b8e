package policy_test

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"pgregory.net/rapid"

	"github.com/creditsgw/caddy-credits/policy"
	"github.com/creditsgw/caddy-credits/usage"
)

// matches reports whether a price of the glob prices the model.
func matches(glob, model string) bool {
	_, ok := policy.PriceOf([]policy.Price{{Model: glob, In: 1, Out: 1}}, model, usage.Tokens{Seen: true})
	return ok
}

// TestPriceGlob: price globs match the model names of the providers the
// gateway meters. Those of OpenRouter, vLLM and Together hold a slash,
// which * and ? cross.
func TestPriceGlob(t *testing.T) {
	for _, tc := range []struct {
		glob  string
		match []string
		miss  []string
	}{
		{"*", []string{
			"gpt-4o", "gpt-4o-mini-2024-07-18", "o1", // OpenAI
			"claude-3-5-sonnet-20241022",                                                             // Anthropic
			"openai/gpt-4o", "anthropic/claude-3.5-sonnet", "meta-llama/llama-3.1-70b-instruct:free", // OpenRouter
			"meta-llama/Llama-3-70b", "/models/llama", // vLLM
			"meta-llama/Meta-Llama-3.1-70B-Instruct-Turbo", "mistralai/Mixtral-8x7B-Instruct-v0.1", // Together
			"",
		}, nil},
		{"gpt-4o*", []string{"gpt-4o", "gpt-4o-mini-2024-07-18"}, []string{"o1", "openai/gpt-4o", "gpt-4"}},
		{"o1", []string{"o1"}, []string{"o1-mini", "o", "openai/o1"}},
		{"claude-3-5-*", []string{"claude-3-5-sonnet-20241022"}, []string{"anthropic/claude-3.5-sonnet", "claude-3-opus"}},
		{"openai/*", []string{"openai/gpt-4o"}, []string{"gpt-4o", "anthropic/claude-3.5-sonnet", "openai"}},
		{"*/gpt-4o", []string{"openai/gpt-4o", "azure/eu/gpt-4o"}, []string{"gpt-4o", "openai/gpt-4o-mini"}},
		{"*gpt-4o*", []string{"gpt-4o", "openai/gpt-4o", "gpt-4o-mini-2024-07-18"}, []string{"o1"}},
		{"anthropic/claude-3.?-*", []string{"anthropic/claude-3.5-sonnet"}, []string{"claude-3-5-sonnet-20241022", "anthropic/claude-3.50-sonnet"}},
		{"meta-llama/*", []string{"meta-llama/Llama-3-70b", "meta-llama/llama-3.1-70b-instruct:free", "meta-llama/Meta-Llama-3.1-70B-Instruct-Turbo"},
			[]string{"mistralai/Mixtral-8x7B-Instruct-v0.1", "meta-llama", "/models/llama"}},
		{"*:free", []string{"meta-llama/llama-3.1-70b-instruct:free"}, []string{"meta-llama/Llama-3-70b"}},
		{"/models/*", []string{"/models/llama", "/models/llama/3/70b"}, []string{"models/llama", "meta-llama/Llama-3-70b"}},
		{"mistralai/Mixtral-*x7B-*", []string{"mistralai/Mixtral-8x7B-Instruct-v0.1"}, []string{"mistralai/Mixtral-8x22B-Instruct-v0.1"}},
		{"meta-llama/[Mm]eta-*", []string{"meta-llama/Meta-Llama-3.1-70B-Instruct-Turbo", "meta-llama/meta-x"}, []string{"meta-llama/Llama-3-70b"}},
		{"o[^/]", []string{"o1"}, []string{"o/", "o12"}},
		{"?", []string{"é", "/"}, []string{"", "ab"}},
		{`gpt\*`, []string{"gpt*"}, []string{"gpt-4o"}},
		{"a*b*c", []string{"abc", "a/b/c", "axxbyyc", "abcbc"}, []string{"acb", "abca"}},
	} {
		for _, m := range tc.match {
			if !matches(tc.glob, m) {
				t.Errorf("price %s does not price %q", tc.glob, m)
			}
		}
		for _, m := range tc.miss {
			if matches(tc.glob, m) {
				t.Errorf("price %s prices %q", tc.glob, m)
			}
		}
	}

	// The first matching price wins, a slash in the name or not.
	prices := []policy.Price{{Model: "meta-llama/*", In: 3000, Out: 0}, {Model: "*", In: 1000, Out: 0}}
	for model, want := range map[string]int64{"meta-llama/Llama-3-70b": 3, "openai/gpt-4o": 1, "o1": 1} {
		if got, ok := policy.PriceOf(prices, model, usage.Tokens{Input: 1000, Seen: true}); !ok || got != want {
			t.Errorf("%s: %d %v, want %d", model, got, ok, want)
		}
	}
}

// TestPriceGlobInvalid: a malformed glob is refused with one message, and
// a well-formed one is not.
func TestPriceGlobInvalid(t *testing.T) {
	for _, glob := range []string{"", "[", "gpt-[4", "[]", "[^]", "[a-]", "[-a]", "[z-a]", `gpt\`, `[a\`} {
		err := policy.Price{Model: glob}.Validate()
		if err == nil || !strings.Contains(err.Error(), "invalid price model") {
			t.Errorf("%q: %v, want an invalid price model", glob, err)
		}
	}
	for _, glob := range []string{"*", "a/b", "[a-z]*", `\[`, "[*]", "[[]", `[\]]`, "o?"} {
		if err := (policy.Price{Model: glob}).Validate(); err != nil {
			t.Errorf("%q: %v", glob, err)
		}
	}
}

// globRegexp is a reference: the regular expression that matches what
// the glob does, for a well-formed glob.
func globRegexp(glob string) *regexp.Regexp {
	var b strings.Builder
	b.WriteString(`(?s)\A`)
	for i := 0; i < len(glob); {
		r, w := utf8.DecodeRuneInString(glob[i:])
		switch r {
		case '*':
			b.WriteString(".*")
		case '?':
			b.WriteString(".")
		case '\\':
			r, n := utf8.DecodeRuneInString(glob[i+1:])
			b.WriteString(regexp.QuoteMeta(string(r)))
			w += n
		case '[':
			j := i + 1
			b.WriteString("[")
			if glob[j] == '^' {
				b.WriteString("^")
				j++
			}
			for glob[j] != ']' {
				c, n := utf8.DecodeRuneInString(glob[j:])
				if c == '\\' {
					c, n = utf8.DecodeRuneInString(glob[j+1:])
					n++
				} else if c == '-' {
					b.WriteString("-")
					j++
					continue
				}
				fmt.Fprintf(&b, `\x{%x}`, c)
				j += n
			}
			b.WriteString("]")
			w = j + 1 - i
		default:
			b.WriteString(regexp.QuoteMeta(string(r)))
		}
		i += w
	}
	b.WriteString(`\z`)
	return regexp.MustCompile(b.String())
}

// TestPriceGlobReference: price globs match exactly what the reference
// regular expression matches, over names and globs drawn from characters
// that model names hold, slashes included.
func TestPriceGlobReference(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		char := rapid.SampledFrom([]string{"a", "b", "/", "-", ".", ":", "é"})
		atom := rapid.OneOf(char, rapid.SampledFrom([]string{"*", "?", "**", `\*`, `\?`, "[ab]", "[^/]", "[a-b]", "[/-:]", `[\]\-]`}))
		glob := strings.Join(rapid.SliceOfN(atom, 1, 8).Draw(t, "glob"), "")
		name := strings.Join(rapid.SliceOfN(char, 0, 12).Draw(t, "name"), "")
		if err := (policy.Price{Model: glob}).Validate(); err != nil {
			t.Fatalf("%q refused: %v", glob, err)
		}
		if got, want := matches(glob, name), globRegexp(glob).MatchString(name); got != want {
			t.Fatalf("glob %q, name %q: matched %v, the reference %v", glob, name, got, want)
		}
	})
}

func TestPriceOf(t *testing.T) {
	prices := []policy.Price{{Model: "gpt-4o*", In: 2000, Out: 8000}, {Model: "*", In: 1, Out: 1}}
	for _, tc := range []struct {
		model   string
		in, out int64
		want    int64
	}{
		{"gpt-4o-mini", 1000, 2000, 18},
		{"gpt-4o", 1, 0, 1},               // rounded up
		{"gpt-4o", 0, 0, 0},               // nothing used
		{"other", 999_999, 1, 1},          // exactly 1
		{"other", 1_000_000, 1, 2},        // just over
		{"gpt-4o", 1e12, 1e12, 1_000_000}, // at most MaxCost
	} {
		got, ok := policy.PriceOf(prices, tc.model, usage.Tokens{Input: tc.in, Output: tc.out, Seen: true})
		if !ok || got != tc.want {
			t.Errorf("%s %d/%d: %d %v, want %d", tc.model, tc.in, tc.out, got, ok, tc.want)
		}
	}
	if _, ok := policy.PriceOf(prices[:1], "claude", usage.Tokens{Seen: true}); ok {
		t.Error("a model with no price was priced")
	}
}
