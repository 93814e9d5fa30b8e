package usage

import "encoding/json"

// Anthropic reads the usage of Anthropic's message_start and message_delta
// events, or of its JSON answer.
type Anthropic struct{}

// Name returns "anthropic".
func (Anthropic) Name() string { return "anthropic" }

// anthropicUsage is the usage object of an answer or event.
type anthropicUsage struct {
	InputTokens  *int64 `json:"input_tokens"`
	OutputTokens *int64 `json:"output_tokens"`
}

// Read reads the model and the input and output tokens. message_start
// carries the input and the first output tokens; each message_delta the
// output tokens so far; a JSON answer both.
func (Anthropic) Read(data []byte, t *Tokens) {
	var d struct {
		Model   string          `json:"model"`
		Usage   *anthropicUsage `json:"usage"`
		Message *struct {
			named
			Usage *anthropicUsage `json:"usage"`
		} `json:"message"`
	}
	if json.Unmarshal(data, &d) != nil {
		return
	}
	usage := d.Usage
	var message *named
	if d.Message != nil {
		message = &d.Message.named
		if d.Message.Usage != nil {
			usage = d.Message.Usage
		}
	}
	setModel(t, d.Model, message)
	if usage == nil {
		return
	}
	if usage.InputTokens != nil {
		t.Input, t.Seen = count(usage.InputTokens), true
	}
	if usage.OutputTokens != nil {
		t.Output, t.Seen = count(usage.OutputTokens), true
	}
}
