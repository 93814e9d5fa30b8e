package usage

import "encoding/json"

// OpenAI reads the usage object of an OpenAI-style JSON answer, or of the
// stream's event that carries it (stream_options: {"include_usage": true}).
type OpenAI struct{}

// Name returns "openai".
func (OpenAI) Name() string { return "openai" }

// Read reads the model and the prompt and completion tokens.
func (OpenAI) Read(data []byte, t *Tokens) {
	var d struct {
		Model   string `json:"model"`
		Message *named `json:"message"`
		Usage   *struct {
			PromptTokens     *int64 `json:"prompt_tokens"`
			CompletionTokens *int64 `json:"completion_tokens"`
		} `json:"usage"`
	}
	if json.Unmarshal(data, &d) != nil {
		return
	}
	setModel(t, d.Model, d.Message)
	if d.Usage != nil && (d.Usage.PromptTokens != nil || d.Usage.CompletionTokens != nil) {
		t.Input, t.Output = count(d.Usage.PromptTokens), count(d.Usage.CompletionTokens)
		t.Seen = true
	}
}
