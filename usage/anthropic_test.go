package usage_test

import (
	"testing"

	"github.com/creditsgw/caddy-credits/usage"
)

func TestAnthropic(t *testing.T) {
	for _, tc := range []struct {
		name, contentType, body string
		want                    usage.Tokens
	}{
		{"JSON answer", "application/json",
			`{"type":"message","model":"claude-3-5-sonnet-20241022","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":3,"output_tokens":4}}`,
			usage.Tokens{Model: "claude-3-5-sonnet-20241022", Input: 3, Output: 4, Seen: true}},
		{"stream: message_start, then message_delta", "text/event-stream",
			"event: message_start\n" + `data: {"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":11,"output_tokens":1}}}` + "\n\n" +
				"event: content_block_delta\n" + `data: {"type":"content_block_delta","delta":{"text":"hi"}}` + "\n\n" +
				"event: message_delta\n" + `data: {"type":"message_delta","usage":{"output_tokens":42}}` + "\n\n" +
				"event: message_stop\n" + `data: {"type":"message_stop"}` + "\n\n",
			usage.Tokens{Model: "claude-x", Input: 11, Output: 42, Seen: true}},
		{"stream cut after message_start", "text/event-stream",
			"event: message_start\n" + `data: {"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":11,"output_tokens":1}}}` + "\n\n",
			usage.Tokens{Model: "claude-x", Input: 11, Output: 1, Seen: true}},
		{"OpenAI's names are not Anthropic's", "application/json",
			`{"model":"gpt-4o","usage":{"prompt_tokens":10,"completion_tokens":20}}`,
			usage.Tokens{Model: "gpt-4o"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := readAll(usage.Anthropic{}, tc.contentType, tc.body); got != tc.want {
				t.Errorf("read %+v, want %+v", got, tc.want)
			}
		})
	}
}
