package usage_test

import (
	"strings"
	"testing"

	"github.com/creditsgw/caddy-credits/policy"
	"github.com/creditsgw/caddy-credits/usage"
)

// FuzzUsageReader feeds arbitrary answers, in arbitrary pieces, to the SSE
// and JSON usage readers of both formats: they never panic, never hold more
// than their bounds, read the same usage however the body is cut, and a
// body they cannot read leaves the usage unseen (the call is charged its
// hold).
func FuzzUsageReader(f *testing.F) {
	for _, s := range []string{
		`data: {"model":"gpt-4o","usage":{"prompt_tokens":10,"completion_tokens":20}}` + "\n\ndata: [DONE]\n\n",
		"event: message_start\n" + `data: {"type":"message_start","message":{"model":"claude","usage":{"input_tokens":3,"output_tokens":1}}}` + "\n\n" +
			`data: {"type":"message_delta","usage":{"output_tokens":9}}` + "\n\n",
		`{"model":"gpt-4o","usage":{"prompt_tokens":1,"completion_tokens":2}}`,
		`data: {"usage":{"prompt_tokens":-5,"completion_tokens":1e30}}`,
		`data: ` + strings.Repeat(`{"a":`, 20000),
		`data: {"usage":` + strings.Repeat("[", 100000),
		"data: {\"usage\":{\"prompt_tokens\":7}}\r\n",
		// JSON answers: the usage after a long text, escapes, keys in
		// another case or spelled with escapes, a cut or trailing answer.
		`{"model":"meta-llama/Llama-3-70b","choices":[{"message":{"content":"` + strings.Repeat(`a\"{[`, 3000) + `"}}],"usage":{"prompt_tokens":1001,"completion_tokens":1001}}`,
		`{"type":"message","model":"claude-3-5-sonnet-20241022","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":3,"output_tokens":4}}`,
		`{"Usage":{"prompt_tokens":1},"us\u0061ge":{"completion_tokens":2},"MODEL":"openai/gpt-4o"}`,
		`{"usage":{"prompt_tokens":1,"completion_tokens":2}} {}`,
		`{"usage":{"prompt_tokens":1,"completion_tokens":2}`,
	} {
		f.Add(s, uint16(7), true)
		f.Add(s, uint16(1), false)
	}
	f.Fuzz(func(t *testing.T, body string, cut uint16, sse bool) {
		ct := "application/json"
		if sse {
			ct = "text/event-stream"
		}
		for _, format := range []usage.Format{usage.OpenAI{}, usage.Anthropic{}} {
			whole := usage.NewReader(format, ct)
			whole.Write([]byte(body))
			want := whole.Tokens()
			pieces := usage.NewReader(format, ct)
			step := int(cut)%64 + 1
			for i := 0; i < len(body); i += step {
				pieces.Write([]byte(body[i:min(i+step, len(body))]))
			}
			if got := pieces.Tokens(); got != want {
				t.Fatalf("%v: read whole %+v, in pieces of %d %+v", format.Name(), want, step, got)
			}
			if want.Input < 0 || want.Output < 0 || (!want.Seen && (want.Input != 0 || want.Output != 0)) {
				t.Fatalf("%v: tokens %+v", format.Name(), want)
			}
			n, _ := policy.PriceOf([]policy.Price{{Model: "*", In: policy.MaxPrice, Out: policy.MaxPrice}}, want.Model, want)
			if n < 0 || n > policy.MaxCost {
				t.Fatalf("%v: price %d of %+v", format.Name(), n, want)
			}
		}
	})
}
