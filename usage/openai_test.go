package usage_test

import (
	"testing"

	"github.com/creditsgw/caddy-credits/usage"
)

// readAll reads body, of contentType, in format at once.
func readAll(format usage.Format, contentType, body string) usage.Tokens {
	u := usage.NewReader(format, contentType)
	u.Write([]byte(body))
	return u.Tokens()
}

func TestOpenAI(t *testing.T) {
	for _, tc := range []struct {
		name, contentType, body string
		want                    usage.Tokens
	}{
		{"JSON answer", "application/json",
			`{"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}`,
			usage.Tokens{Model: "gpt-4o", Input: 10, Output: 20, Seen: true}},
		{"stream with its usage chunk", "text/event-stream",
			`data: {"model":"gpt-4o","choices":[{"delta":{"content":"hi"}}],"usage":null}` + "\n\n" +
				`data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}` + "\n\ndata: [DONE]\n\n",
			usage.Tokens{Model: "gpt-4o", Input: 3, Output: 4, Seen: true}},
		{"stream without usage", "text/event-stream",
			`data: {"model":"gpt-4o","choices":[{"delta":{"content":"hi"}}],"usage":null}` + "\n\ndata: [DONE]\n\n",
			usage.Tokens{Model: ""}},
		{"Anthropic's names are not OpenAI's", "application/json",
			`{"model":"claude","usage":{"input_tokens":3,"output_tokens":4}}`,
			usage.Tokens{Model: "claude"}},
		{"a negative count counts as none", "application/json",
			`{"usage":{"prompt_tokens":-5,"completion_tokens":2}}`,
			usage.Tokens{Input: 0, Output: 2, Seen: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := readAll(usage.OpenAI{}, tc.contentType, tc.body); got != tc.want {
				t.Errorf("read %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestLookup(t *testing.T) {
	for _, name := range []string{"openai", "anthropic"} {
		if f, ok := usage.Lookup(name); !ok || f.Name() != name {
			t.Errorf("Lookup(%q) = %v, %v", name, f, ok)
		}
	}
	if f, ok := usage.Lookup("header"); ok {
		t.Errorf("Lookup(header) = %v: the header is no format of an answer", f)
	}
	if got := usage.Names(); got != "openai or anthropic" {
		t.Errorf("Names() = %q", got)
	}
}
