package usage_test

import (
	"fmt"
	"strings"
	"testing"

	"pgregory.net/rapid"

	"github.com/creditsgw/caddy-credits/usage"
)

// A stream far longer than the reader's head: its usage is read from its
// start (Anthropic's message_start) and its last events, the same however
// the stream is cut, in bounded memory; what lies in its middle is
// generated text, passed over.
func TestUsageReaderLongStream(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		var b strings.Builder
		b.WriteString("event: message_start\n" + `data: {"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":11,"output_tokens":1}}}` + "\n\n")
		lines := rapid.IntRange(100, 3000).Draw(t, "lines")
		for i := range lines {
			text := strings.Repeat("y", rapid.IntRange(0, 300).Draw(t, fmt.Sprint("len", i)))
			fmt.Fprintf(&b, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":%q}}\n\n", text)
		}
		b.WriteString("event: message_delta\n" + `data: {"type":"message_delta","usage":{"output_tokens":42}}` + "\n\n")
		b.WriteString("event: message_stop\n" + `data: {"type":"message_stop"}` + "\n\n")
		body := b.String()

		whole := usage.NewReader(usage.Anthropic{}, "text/event-stream")
		whole.Write([]byte(body))
		want := whole.Tokens()
		if body := len(body); body > 64<<10 && want != (usage.Tokens{Model: "claude-x", Input: 11, Output: 42, Seen: true}) {
			t.Fatalf("a %d-byte stream read whole: %+v", body, want)
		}
		pieces := usage.NewReader(usage.Anthropic{}, "text/event-stream")
		for rest := body; len(rest) > 0; {
			n := min(len(rest), rapid.IntRange(1, 100<<10).Draw(t, "piece"))
			pieces.Write([]byte(rest[:n]))
			rest = rest[n:]
		}
		if got := pieces.Tokens(); got != want {
			t.Fatalf("read whole %+v, in pieces %+v", want, got)
		}
	})

	// A usage in the middle of a long stream, followed by more text, is not
	// what the stream ends with: the one at its end is read.
	var b strings.Builder
	b.WriteString(strings.Repeat("data: {\"choices\":[{\"delta\":{\"content\":\"z\"}}],\"usage\":null}\n\n", 5000))
	b.WriteString(`data: {"model":"m","usage":{"prompt_tokens":999,"completion_tokens":999}}` + "\n\n")
	b.WriteString(strings.Repeat("data: {\"choices\":[{\"delta\":{\"content\":\"z\"}}],\"usage\":null}\n\n", 5000))
	b.WriteString(`data: {"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}` + "\n\ndata: [DONE]\n\n")
	u := usage.NewReader(usage.OpenAI{}, "text/event-stream")
	u.Write([]byte(b.String()))
	if got := u.Tokens(); got != (usage.Tokens{Model: "m", Input: 3, Output: 4, Seen: true}) {
		t.Errorf("read %+v, want the usage the stream ends with", got)
	}
}
