package policy_test

import (
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/policy"
)

// idPattern is the contract's pattern, written out here rather than taken
// from policy.IDPattern, so that the tests check the package against the SPEC.
const idPattern = `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`

func TestIDPattern(t *testing.T) {
	if policy.IDPattern != idPattern {
		t.Fatalf("IDPattern = %q, want %q", policy.IDPattern, idPattern)
	}
}

// wantInputError checks that err is an *InputError about field and value.
func wantInputError(t *testing.T, err error, field, value string) {
	t.Helper()
	var ie *policy.InputError
	if !errors.As(err, &ie) {
		t.Fatalf("error = %v (%T), want *policy.InputError", err, err)
	}
	if ie.Field != field || ie.Value != value {
		t.Errorf("InputError{Field: %q, Value: %q}, want {%q, %q}", ie.Field, ie.Value, field, value)
	}
	if ie.Reason == "" {
		t.Error("InputError has no Reason")
	}
	msg := err.Error()
	if msg != strings.ToLower(msg[:1])+msg[1:] || strings.HasSuffix(msg, ".") {
		t.Errorf("error %q: want lower-case start and no final period", msg)
	}
}

func TestValidateOrg(t *testing.T) {
	valid := []struct{ name, org string }{
		{"one letter", "a"},
		{"one digit", "7"},
		{"word", "acme"},
		{"all kinds", "Acme-Corp_1.x"},
		{"64 chars", strings.Repeat("a", 64)},
		{"trailing punctuation", "a._-"},
	}
	for _, tc := range valid {
		t.Run("valid/"+tc.name, func(t *testing.T) {
			if err := policy.ValidateOrg(tc.org); err != nil {
				t.Fatalf("ValidateOrg(%q) = %v, want nil", tc.org, err)
			}
		})
	}

	t.Run("invalid/empty", func(t *testing.T) {
		if err := policy.ValidateOrg(""); !errors.Is(err, policy.ErrOrgMissing) {
			t.Fatalf("ValidateOrg(\"\") = %v, want ErrOrgMissing", err)
		}
	})
	invalid := []struct{ name, org string }{
		{"braces", "{acme}"},
		{"closing brace", "a}b"},
		{"colon", "a:b"},
		{"space", "a b"},
		{"300 chars", strings.Repeat("a", 300)},
		{"65 chars", strings.Repeat("a", 65)},
		{"leading dash", "-lead"},
		{"leading dot", ".lead"},
		{"leading underscore", "_lead"},
		{"unicode", "açme"},
		{"unicode first", "éacme"},
		{"trailing newline", "a\n"},
		{"slash", "a/b"},
		{"NUL", "a\x00"},
		{"invalid UTF-8", "a\xff"},
	}
	for _, tc := range invalid {
		t.Run("invalid/"+tc.name, func(t *testing.T) {
			err := policy.ValidateOrg(tc.org)
			wantInputError(t, err, "org", tc.org)
			if errors.Is(err, policy.ErrOrgMissing) {
				t.Errorf("ValidateOrg(%q) is ErrOrgMissing, want an input error", tc.org)
			}
		})
	}
}

func TestValidateFeature(t *testing.T) {
	for _, name := range []string{"rich-text", "alt-text", "background-removal", "image_studio", "flows.v2", strings.Repeat("f", 64)} {
		t.Run("valid/"+name[:min(len(name), 20)], func(t *testing.T) {
			if err := policy.ValidateFeature(name); err != nil {
				t.Fatalf("ValidateFeature(%q) = %v, want nil", name, err)
			}
		})
	}
	for _, name := range []string{"", "-x", "rich text", "a{b}", strings.Repeat("f", 65), "ünïcode"} {
		t.Run("invalid/"+name, func(t *testing.T) {
			wantInputError(t, policy.ValidateFeature(name), "feature", name)
		})
	}
}

func TestInputErrorMessage(t *testing.T) {
	err := policy.ValidateOrg("a b")
	want := `invalid org "a b": must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`
	if err.Error() != want {
		t.Errorf("Error() = %s, want %s", err, want)
	}

	long := strings.Repeat("x", 299) + "!"
	msg := policy.ValidateOrg(long).Error()
	if strings.Contains(msg, long) || !strings.Contains(msg, strings.Repeat("x", 80)+`..."`) {
		t.Errorf("Error() of a 300-byte value = %q, want it cut to 80 bytes", msg)
	}
	if len(msg) > 200 {
		t.Errorf("Error() is %d bytes long, want at most 200", len(msg))
	}
}

func TestValidateOrgAllocs(t *testing.T) {
	org := "Acme-Corp_1.x"
	allocs := testing.AllocsPerRun(1000, func() {
		if policy.ValidateOrg(org) != nil {
			t.Fatal("valid org rejected")
		}
	})
	if allocs != 0 {
		t.Fatalf("ValidateOrg on a valid id allocates %v times, want 0", allocs)
	}
}

func TestParseCost(t *testing.T) {
	good := []struct {
		in   string
		want int64
	}{
		{"1", 1},
		{"42", 42},
		{"1000000", 1000000},
		{"007", 7}, // leading zeros, as strconv.Atoi reads them
	}
	for _, tc := range good {
		t.Run("ok/"+tc.in, func(t *testing.T) {
			got, err := policy.ParseCost(tc.in)
			if err != nil || got != tc.want {
				t.Fatalf("ParseCost(%q) = %d, %v; want %d, nil", tc.in, got, err, tc.want)
			}
		})
	}
	for _, in := range []string{"0", "000", "-1", "+1", "1000001", "abc", "", " 1", "1 ", "1.5", "1e3", "0x10", "١", "99999999999999999999", "9223372036854775808"} {
		t.Run("bad/"+in, func(t *testing.T) {
			got, err := policy.ParseCost(in)
			if got != 0 {
				t.Errorf("ParseCost(%q) = %d, want 0 with the error", in, got)
			}
			wantInputError(t, err, "cost", in)
		})
	}
	if policy.MinCost != 1 || policy.MaxCost != 1_000_000 {
		t.Errorf("MinCost, MaxCost = %d, %d; want 1, 1000000", policy.MinCost, policy.MaxCost)
	}
}

func TestValidateIdempotencyKey(t *testing.T) {
	valid := []struct{ name, key string }{
		{"one char", "x"},
		{"uuid", "8e03978e-40d5-43e8-bc93-6894a57f9324"},
		{"every printable", "!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`{|}~AZaz"},
		{"255 chars", strings.Repeat("k", 255)},
	}
	for _, tc := range valid {
		t.Run("valid/"+tc.name, func(t *testing.T) {
			if err := policy.ValidateIdempotencyKey(tc.key); err != nil {
				t.Fatalf("ValidateIdempotencyKey(%q) = %v, want nil", tc.key, err)
			}
		})
	}
	invalid := []struct{ name, key string }{
		{"empty", ""},
		{"256 chars", strings.Repeat("k", 256)},
		{"space", "a b"},
		{"tab", "a\tb"},
		{"newline", "a\n"},
		{"DEL", "a\x7f"},
		{"NUL", "\x00"},
		{"unicode", "clé"},
	}
	for _, tc := range invalid {
		t.Run("invalid/"+tc.name, func(t *testing.T) {
			wantInputError(t, policy.ValidateIdempotencyKey(tc.key), "idempotency key", tc.key)
		})
	}
}

func TestParseMode(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want policy.Mode
	}{
		{"block", policy.Block},
		{"notice", policy.Notice},
		{"overdraft", policy.Overdraft},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := policy.ParseMode(tc.in)
			if err != nil || got != tc.want {
				t.Fatalf("ParseMode(%q) = %v, %v; want %v, nil", tc.in, got, err, tc.want)
			}
			if got.String() != tc.in {
				t.Errorf("%v.String() = %q, want %q", got, got.String(), tc.in)
			}
		})
	}
	for _, in := range []string{"", "Block", "NOTICE", " block", "open", "overdraft "} {
		t.Run("bad/"+in, func(t *testing.T) {
			_, err := policy.ParseMode(in)
			wantInputError(t, err, "mode", in)
		})
	}
	if policy.Block != 0 {
		t.Error("Block is not the zero Mode, so it is not the default")
	}
	if s := policy.Mode(9).String(); s != "Mode(9)" {
		t.Errorf("Mode(9).String() = %q", s)
	}
}

func TestOutcomeString(t *testing.T) {
	for o, want := range map[policy.Outcome]string{
		policy.Forward:          "forwarded",
		policy.ForwardLow:       "low",
		policy.ForwardOverdraft: "overdraft",
		policy.Refuse:           "blocked",
		policy.RefuseNotice:     "notice",
		policy.Outcome(99):      "Outcome(99)",
	} {
		if got := o.String(); got != want {
			t.Errorf("Outcome(%d).String() = %q, want %q", uint8(o), got, want)
		}
	}
}

func TestDecide(t *testing.T) {
	const topUp = "https://example.com/topup"
	block := policy.Route{Feature: "background-removal", Mode: policy.Block, TopUpURL: topUp}
	notice := policy.Route{Feature: "rich-text", Mode: policy.Notice, LowBalance: 10, TopUpURL: topUp}
	noticeNoLow := policy.Route{Feature: "alt-text", Mode: policy.Notice}
	overdraft := policy.Route{Feature: "flows", Mode: policy.Overdraft, OverdraftLimit: 500}

	tests := []struct {
		name  string
		route policy.Route
		ans   policy.Answer
		want  policy.Decision // Problem is checked apart, by refused
	}{
		{
			name:  "block/enough",
			route: block,
			ans:   policy.Answer{Charged: true, Balance: 41, Cost: 1},
			want:  policy.Decision{Outcome: policy.Forward, Forward: true, Remaining: 41, Charged: 1},
		},
		{
			name:  "block/last credit",
			route: block,
			ans:   policy.Answer{Charged: true, Balance: 0, Cost: 5},
			want:  policy.Decision{Outcome: policy.Forward, Forward: true, Remaining: 0, Charged: 5},
		},
		{
			name:  "block/exhausted",
			route: block,
			ans:   policy.Answer{Charged: false, Balance: 0, Cost: 1},
			want:  policy.Decision{Outcome: policy.Refuse, Status: http.StatusPaymentRequired, Remaining: 0},
		},
		{
			name:  "block/too few",
			route: block,
			ans:   policy.Answer{Charged: false, Balance: 3, Cost: 5},
			want:  policy.Decision{Outcome: policy.Refuse, Status: http.StatusPaymentRequired, Remaining: 3},
		},
		{
			name:  "notice/enough",
			route: notice,
			ans:   policy.Answer{Charged: true, Balance: 10, Cost: 1},
			want:  policy.Decision{Outcome: policy.Forward, Forward: true, Remaining: 10, Charged: 1},
		},
		{
			name:  "notice/low",
			route: notice,
			ans:   policy.Answer{Charged: true, Balance: 9, Cost: 1},
			want:  policy.Decision{Outcome: policy.ForwardLow, Forward: true, Remaining: 9, Charged: 1, Notice: "low"},
		},
		{
			name:  "notice/low at zero",
			route: notice,
			ans:   policy.Answer{Charged: true, Balance: 0, Cost: 1},
			want:  policy.Decision{Outcome: policy.ForwardLow, Forward: true, Remaining: 0, Charged: 1, Notice: "low"},
		},
		{
			name:  "notice/no low_balance never warns",
			route: noticeNoLow,
			ans:   policy.Answer{Charged: true, Balance: 0, Cost: 1},
			want:  policy.Decision{Outcome: policy.Forward, Forward: true, Remaining: 0, Charged: 1},
		},
		{
			name:  "notice/no low_balance never warns, even below zero",
			route: noticeNoLow,
			ans:   policy.Answer{Charged: true, Balance: -2, Cost: 1},
			want:  policy.Decision{Outcome: policy.Forward, Forward: true, Remaining: -2, Charged: 1},
		},
		{
			name:  "notice/exhausted",
			route: notice,
			ans:   policy.Answer{Charged: false, Balance: 0, Cost: 1},
			want:  policy.Decision{Outcome: policy.RefuseNotice, Status: http.StatusPaymentRequired, Remaining: 0, Notice: "exhausted"},
		},
		{
			name:  "overdraft/positive",
			route: overdraft,
			ans:   policy.Answer{Charged: true, Balance: 12, Cost: 3},
			want:  policy.Decision{Outcome: policy.Forward, Forward: true, Remaining: 12, Charged: 3},
		},
		{
			name:  "overdraft/at zero",
			route: overdraft,
			ans:   policy.Answer{Charged: true, Balance: 0, Cost: 3},
			want:  policy.Decision{Outcome: policy.Forward, Forward: true, Remaining: 0, Charged: 3},
		},
		{
			name:  "overdraft/below zero",
			route: overdraft,
			ans:   policy.Answer{Charged: true, Balance: -7, Cost: 10},
			want:  policy.Decision{Outcome: policy.ForwardOverdraft, Forward: true, Remaining: -7, Charged: 10},
		},
		{
			name:  "overdraft/past limit",
			route: overdraft,
			ans:   policy.Answer{Charged: false, Balance: -495, Cost: 10},
			want:  policy.Decision{Outcome: policy.Refuse, Status: http.StatusPaymentRequired, Remaining: -495},
		},
		{
			name:  "replay/block",
			route: block,
			ans:   policy.Answer{Charged: true, Replay: true, Balance: 40, Cost: 1},
			want:  policy.Decision{Outcome: policy.Forward, Forward: true, Remaining: 40, Charged: 0},
		},
		{
			name:  "replay/notice low",
			route: notice,
			ans:   policy.Answer{Charged: true, Replay: true, Balance: 2, Cost: 1},
			want:  policy.Decision{Outcome: policy.ForwardLow, Forward: true, Remaining: 2, Charged: 0, Notice: "low"},
		},
		{
			name:  "replay/overdraft below zero",
			route: overdraft,
			ans:   policy.Answer{Charged: true, Replay: true, Balance: -3, Cost: 4},
			want:  policy.Decision{Outcome: policy.ForwardOverdraft, Forward: true, Remaining: -3, Charged: 0},
		},
		{
			name:  "unknown mode acts as block",
			route: policy.Route{Feature: "x", Mode: policy.Mode(42)},
			ans:   policy.Answer{Charged: false, Balance: 0, Cost: 1},
			want:  policy.Decision{Outcome: policy.Refuse, Status: http.StatusPaymentRequired},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := policy.Decide(tc.route, "acme", tc.ans)
			p := got.Problem
			got.Problem = nil
			if got != tc.want {
				t.Fatalf("Decide() =\n\t%+v\nwant\n\t%+v", got, tc.want)
			}
			if got.Forward {
				if p != nil {
					t.Fatalf("forwarded call has a problem: %+v", p)
				}
				return
			}
			if p == nil {
				t.Fatal("refused call has no problem")
			}
			want := policy.Insufficient(tc.route, "acme", tc.ans.Balance, tc.ans.Cost)
			if string(p.JSON()) != string(want.JSON()) {
				t.Errorf("problem = %s, want %s", p.JSON(), want.JSON())
			}
		})
	}
}

// TestDecideInvariants checks the SPEC's rules on every decision of a grid
// of answers, whatever the route.
func TestDecideInvariants(t *testing.T) {
	routes := []policy.Route{
		{Feature: "b", Mode: policy.Block},
		{Feature: "n", Mode: policy.Notice, LowBalance: 5},
		{Feature: "n0", Mode: policy.Notice},
		{Feature: "o", Mode: policy.Overdraft, OverdraftLimit: -1},
		{Feature: "o", Mode: policy.Overdraft, OverdraftLimit: 100},
	}
	for _, r := range routes {
		for _, charged := range []bool{false, true} {
			for _, replay := range []bool{false, true} {
				for balance := int64(-10); balance <= 10; balance++ {
					a := policy.Answer{Charged: charged, Replay: replay && charged, Balance: balance, Cost: 3}
					d := policy.Decide(r, "acme", a)
					if d.Forward != charged || (d.Status == 0) != charged || (d.Problem == nil) != charged {
						t.Fatalf("%v %+v: Forward, Status, Problem = %v, %d, %v", r.Mode, a, d.Forward, d.Status, d.Problem)
					}
					if d.Remaining != balance {
						t.Fatalf("%v %+v: Remaining = %d, want %d", r.Mode, a, d.Remaining, balance)
					}
					if d.Notice != "" && r.Mode != policy.Notice {
						t.Fatalf("%v %+v: Notice %q on a %v route", r.Mode, a, d.Notice, r.Mode)
					}
					if (!charged || a.Replay) && d.Charged != 0 {
						t.Fatalf("%v %+v: Charged = %d, want 0", r.Mode, a, d.Charged)
					}
					if !charged && (d.Problem.Balance == nil || *d.Problem.Balance != balance || d.Problem.Cost == nil || *d.Problem.Cost != 3) {
						t.Fatalf("%v %+v: problem lacks balance or cost: %s", r.Mode, a, d.Problem.JSON())
					}
				}
			}
		}
	}
}

// problemJSON is the wire shape of a problem, read back with pointer fields
// so that the tests see which members are present.
type problemJSON struct {
	Type     *string `json:"type"`
	Title    *string `json:"title"`
	Status   *int    `json:"status"`
	Detail   *string `json:"detail"`
	Org      *string `json:"org"`
	Feature  *string `json:"feature"`
	Balance  *int64  `json:"balance"`
	Cost     *int64  `json:"cost"`
	TopUpURL *string `json:"topup_url"`
}

// decodeProblem unmarshals a problem body, rejecting unknown members.
func decodeProblem(t *testing.T, body []byte) (problemJSON, map[string]any) {
	t.Helper()
	if len(body) == 0 || body[len(body)-1] != '\n' {
		t.Fatalf("body %q lacks a trailing newline", body)
	}
	var p problemJSON
	if err := json.Unmarshal(body, &p); err != nil {
		t.Fatalf("unmarshal %s: %v", body, err)
	}
	var members map[string]any
	if err := json.Unmarshal(body, &members); err != nil {
		t.Fatalf("unmarshal %s: %v", body, err)
	}
	if p.Type == nil || p.Title == nil || p.Status == nil || p.Detail == nil {
		t.Fatalf("body %s lacks one of type, title, status, detail", body)
	}
	if *p.Title == "" || *p.Detail == "" {
		t.Errorf("body %s has an empty title or detail", body)
	}
	return p, members
}

func TestProblemJSON(t *testing.T) {
	t.Run("insufficient", func(t *testing.T) {
		r := policy.Route{Feature: "rich-text", Mode: policy.Notice, TopUpURL: "https://example.com/topup?org=acme&src=402"}
		body := policy.Insufficient(r, "acme", 0, 1).JSON()
		p, members := decodeProblem(t, body)
		if *p.Type != policy.TypeInsufficientCredits || *p.Status != 402 {
			t.Errorf("type, status = %q, %d", *p.Type, *p.Status)
		}
		if p.Org == nil || *p.Org != "acme" || p.Feature == nil || *p.Feature != "rich-text" {
			t.Errorf("org, feature wrong in %s", body)
		}
		if p.Balance == nil || *p.Balance != 0 || p.Cost == nil || *p.Cost != 1 {
			t.Errorf("balance 0 and cost 1 must be present in %s", body)
		}
		if p.TopUpURL == nil || *p.TopUpURL != r.TopUpURL {
			t.Errorf("topup_url wrong in %s", body)
		}
		if len(members) != 9 {
			t.Errorf("%d members in %s, want 9", len(members), body)
		}
		want := "Your organization has 0 credits left; this action needs 1. Add credits at " + r.TopUpURL + " to continue."
		if *p.Detail != want {
			t.Errorf("detail = %q, want %q", *p.Detail, want)
		}
		if strings.Contains(string(body), `\u0026`) {
			t.Errorf("body %s escapes '&' of the top-up URL", body)
		}
	})
	t.Run("insufficient without top-up URL", func(t *testing.T) {
		body := policy.Insufficient(policy.Route{Feature: "background-removal"}, "acme", 1, 2).JSON()
		p, _ := decodeProblem(t, body)
		if p.TopUpURL != nil {
			t.Errorf("empty topup_url present in %s", body)
		}
		if want := "Your organization has 1 credit left; this action needs 2. Add credits to continue."; *p.Detail != want {
			t.Errorf("detail = %q, want %q", *p.Detail, want)
		}
	})
	t.Run("insufficient overdrawn", func(t *testing.T) {
		body := policy.Insufficient(policy.Route{Feature: "flows", Mode: policy.Overdraft}, "acme", -495, 10).JSON()
		p, _ := decodeProblem(t, body)
		if *p.Balance != -495 || *p.Cost != 10 {
			t.Errorf("balance, cost wrong in %s", body)
		}
		if !strings.Contains(*p.Detail, "495 credits overdrawn") || strings.Contains(*p.Detail, "-") {
			t.Errorf("detail = %q", *p.Detail)
		}
	})

	for _, tc := range []struct {
		name    string
		p       *policy.Problem
		typ     string
		status  int
		members int
	}{
		{"org missing", policy.OrgMissing(), policy.TypeOrgMissing, 401, 4},
		{"invalid", policy.Invalid(policy.ValidateOrg("a b")), policy.TypeInvalidInput, 400, 4},
		{"unavailable", policy.Unavailable(), policy.TypeStoreUnavailable, 503, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := tc.p.JSON()
			p, members := decodeProblem(t, body)
			if *p.Type != tc.typ || *p.Status != tc.status {
				t.Errorf("type, status = %q, %d; want %q, %d", *p.Type, *p.Status, tc.typ, tc.status)
			}
			if len(members) != tc.members {
				t.Errorf("%d members in %s, want %d", len(members), body, tc.members)
			}
		})
	}

	t.Run("invalid detail", func(t *testing.T) {
		err := policy.ValidateOrg("a b")
		if d := policy.Invalid(err).Detail; d != err.Error() {
			t.Errorf("detail = %q, want %q", d, err.Error())
		}
	})

	t.Run("field order and determinism", func(t *testing.T) {
		p := policy.Insufficient(policy.Route{Feature: "f", TopUpURL: "u"}, "o", 2, 3)
		want := `{"type":"https://creditsgw.dev/problems/insufficient-credits","title":"Insufficient credits","status":402,` +
			`"detail":"Your organization has 2 credits left; this action needs 3. Add credits at u to continue.",` +
			`"org":"o","feature":"f","balance":2,"cost":3,"topup_url":"u"}` + "\n"
		for range 3 {
			if got := string(p.JSON()); got != want {
				t.Fatalf("JSON() =\n%s\nwant\n%s", got, want)
			}
		}
	})

	t.Run("types are distinct URIs", func(t *testing.T) {
		seen := map[string]bool{}
		for _, typ := range []string{policy.TypeInsufficientCredits, policy.TypeOrgMissing, policy.TypeInvalidInput, policy.TypeStoreUnavailable} {
			if !strings.HasPrefix(typ, "https://") || seen[typ] {
				t.Errorf("type %q is not a distinct https URI", typ)
			}
			seen[typ] = true
		}
	})
}

func TestHeaders(t *testing.T) {
	if policy.HeaderRemaining != "Credits-Remaining" || policy.HeaderCharged != "Credits-Charged" ||
		policy.HeaderNotice != "Credits-Notice" || policy.HeaderUsage != "Credits-Usage" ||
		policy.HeaderBudgetRemaining != "Credits-Budget-Remaining" {
		t.Error("a header name differs from the SPEC")
	}
	if policy.ExposeHeaders != "Credits-Remaining, Credits-Charged, Credits-Notice, Credits-Hold, Credits-Budget-Remaining" {
		t.Errorf("ExposeHeaders = %q", policy.ExposeHeaders)
	}
	if policy.ContentTypeProblem != "application/problem+json" {
		t.Errorf("ContentTypeProblem = %q", policy.ContentTypeProblem)
	}
	for name, want := range map[string]bool{
		"Credits-Remaining": true,
		"credits-usage":     true,
		"CREDITS-NOTICE":    true,
		"Credits-":          true,
		"Credits-X-Forged":  true,
		"Credits":           false,
		"Credit-Remaining":  false,
		"X-Credits-Charged": false,
		"":                  false,
		"Content-Type":      false,
	} {
		if got := policy.IsCreditsHeader(name); got != want {
			t.Errorf("IsCreditsHeader(%q) = %v, want %v", name, got, want)
		}
	}
	// The canonical form that net/http gives a client's header must match too.
	if !policy.IsCreditsHeader(http.CanonicalHeaderKey("credits-charged")) {
		t.Error("canonical credits-charged not recognized")
	}
}

func BenchmarkDecide(b *testing.B) {
	r := policy.Route{Feature: "rich-text", Mode: policy.Notice, LowBalance: 10}
	a := policy.Answer{Charged: true, Balance: 5, Cost: 1}
	b.ReportAllocs()
	for b.Loop() {
		d := policy.Decide(r, "acme", a)
		if !d.Forward {
			b.Fatal("refused")
		}
	}
}

func BenchmarkDecideRefuse(b *testing.B) {
	r := policy.Route{Feature: "background-removal", Mode: policy.Block, TopUpURL: "https://example.com/topup"}
	a := policy.Answer{Balance: 0, Cost: 1}
	b.ReportAllocs()
	for b.Loop() {
		if d := policy.Decide(r, "acme", a); d.Forward {
			b.Fatal("forwarded")
		}
	}
}

func BenchmarkValidateOrg(b *testing.B) {
	org := "Acme-Corp_1.x-" + strings.Repeat("z", 40)
	b.ReportAllocs()
	for b.Loop() {
		if policy.ValidateOrg(org) != nil {
			b.Fatal("rejected")
		}
	}
}

func TestStatusProblem(t *testing.T) {
	p := policy.Status(http.StatusMethodNotAllowed, "use GET")
	var got map[string]any
	if err := json.Unmarshal(p.JSON(), &got); err != nil {
		t.Fatal(err)
	}
	if got["type"] != "about:blank" || got["title"] != "Method Not Allowed" || got["status"] != float64(405) || got["detail"] != "use GET" {
		t.Fatalf("problem: %v", got)
	}
	if _, ok := got["balance"]; ok {
		t.Fatalf("a status problem has a balance: %v", got)
	}
}

func TestNewRoute(t *testing.T) {
	limit, deep := int64(10), int64(policy.MaxAmount+1)
	for _, tc := range []struct {
		name string
		in   policy.RouteSettings
		want string // the error, or "" for a route
	}{
		{"defaults", policy.RouteSettings{Feature: "f"}, ""},
		{"no feature", policy.RouteSettings{}, "feature is required"},
		{"bad feature", policy.RouteSettings{Feature: "a b"}, `invalid feature "a b"`},
		{"bad mode", policy.RouteSettings{Feature: "f", OnExhausted: "never"}, `invalid on_exhausted "never": must be block, notice or overdraft`},
		{"bad cost", policy.RouteSettings{Feature: "f", Cost: "0"}, `invalid cost "0"`},
		{"placeholder cost", policy.RouteSettings{Feature: "f", Cost: "{http.request.header.X-Cost}"}, ""},
		{"limit on a block route", policy.RouteSettings{Feature: "f", OverdraftLimit: &limit}, `invalid overdraft_limit "10": needs on_exhausted overdraft; this route is block`},
		{"limit too deep", policy.RouteSettings{Feature: "f", OnExhausted: "overdraft", OverdraftLimit: &deep}, `must be an integer from 0 to 1000000000000`},
		{"low balance on an overdraft route", policy.RouteSettings{Feature: "f", OnExhausted: "overdraft", LowBalance: 3}, `needs on_exhausted notice; this route is overdraft`},
		{"low balance below 1", policy.RouteSettings{Feature: "f", OnExhausted: "notice", LowBalance: -3}, `must be an integer from 1`},
		{"bad fail mode", policy.RouteSettings{Feature: "f", FailMode: "maybe"}, `invalid fail_mode "maybe": must be open or closed`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := policy.NewRoute(tc.in)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("error %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want %q", err, tc.want)
			}
		})
	}
	r, err := policy.NewRoute(policy.RouteSettings{Feature: "flows", OnExhausted: "overdraft", OverdraftLimit: &limit, Cost: "7"})
	if err != nil || r.Mode != policy.Overdraft || r.OverdraftLimit != 10 || r.Cost != 7 || !r.FailOpen {
		t.Fatalf("%+v %v", r, err)
	}
	r, _ = policy.NewRoute(policy.RouteSettings{Feature: "f", Cost: "{x}"})
	if r.Cost != 0 || r.FailOpen || r.OverdraftLimit != -1 {
		t.Fatalf("%+v", r)
	}
}

func TestDecideBudget(t *testing.T) {
	resets := time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC)
	b := &policy.Budget{Subject: "alice", Limit: 5, Spent: 4, Resets: resets}
	for _, mode := range []policy.Mode{policy.Block, policy.Notice} {
		r := policy.Route{Feature: "rich-text", Mode: mode, Cost: 2}
		d := policy.Decide(r, "acme", policy.Answer{Balance: 40, Cost: 2, OverBudget: true, Budget: b})
		if d.Forward || d.Outcome != policy.RefuseBudget || d.Status != 402 || d.BudgetRemaining == nil ||
			*d.BudgetRemaining != 1 || d.Remaining != 40 || d.Charged != 0 {
			t.Fatalf("%s: %+v", mode, d)
		}
		if want := map[policy.Mode]string{policy.Block: "", policy.Notice: policy.NoticeBudget}[mode]; d.Notice != want {
			t.Errorf("%s: notice %q, want %q", mode, d.Notice, want)
		}
		p := d.Problem
		if p.Type != policy.TypeBudgetSpent || p.Subject != "alice" || *p.Limit != 5 || *p.Spent != 4 ||
			!p.Resets.Equal(resets) || *p.Balance != 40 || *p.Cost != 2 {
			t.Fatalf("%s: problem %+v", mode, p)
		}
		if body := string(p.JSON()); !strings.Contains(body, `"subject":"alice","limit":5,"spent":4,"resets":"2026-12-07T00:00:00Z"`) {
			t.Errorf("problem body %s", body)
		}
	}
	// A charged call with a budget says what it has left; one without none.
	d := policy.Decide(policy.Route{Mode: policy.Block}, "acme", policy.Answer{Charged: true, Balance: 3, Cost: 1,
		Budget: &policy.Budget{Limit: 5, Spent: 7}})
	if !d.Forward || d.BudgetRemaining == nil || *d.BudgetRemaining != 0 {
		t.Fatalf("charged past a lowered limit: %+v", d)
	}
	if d := policy.Decide(policy.Route{}, "acme", policy.Answer{Charged: true}); d.BudgetRemaining != nil {
		t.Fatalf("no budget: %+v", d)
	}
	if policy.RefuseBudget.String() != "budget" {
		t.Errorf("outcome label %q", policy.RefuseBudget)
	}
}
