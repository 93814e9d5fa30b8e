// Package usage reads the tokens an AI backend's answer reports it used,
// as the answer streams past: a JSON answer of any size, or a server-sent
// event stream, in bounded memory. Each provider's way of reporting them is
// a Format, one file each.
//
// The formats read report their usage in a top-level member named usage,
// or in the usage of a top-level message; the reader keeps those members
// (and the model) of a JSON answer, and reads the events of a stream that
// carry a usage. A format that reports elsewhere extends those too.
package usage

import (
	"encoding/json"
	"strings"
)

// Tokens is the usage an answer reported.
type Tokens struct {
	// Model is the model the answer names, if any.
	Model string
	// Input and Output are the tokens reported.
	Input, Output int64
	// Seen is true once any usage was read.
	Seen bool
}

// Format is a provider's way of reporting the usage of an answer.
type Format interface {
	// Name is the format's name in a route's settings, e.g. openai.
	Name() string
	// Read reads what one JSON answer, or one event of a stream, reports
	// into t: the model it names and its usage. It is called in the
	// answer's order, so a later report overwrites an earlier one; data
	// that is not the format's leaves t as it is.
	Read(data []byte, t *Tokens)
}

// formats are the formats a route may name, in the order their names are
// listed in messages.
var formats = []Format{OpenAI{}, Anthropic{}}

// Lookup returns the format named name.
func Lookup(name string) (Format, bool) {
	for _, f := range formats {
		if f.Name() == name {
			return f, true
		}
	}
	return nil, false
}

// Names lists the formats' names: "openai or anthropic".
func Names() string {
	names := make([]string, len(formats))
	for i, f := range formats {
		names[i] = f.Name()
	}
	if len(names) < 2 {
		return strings.Join(names, "")
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

// setModel records the model an answer or event names, at its top or in
// its message (Anthropic's message_start): the message's wins.
func setModel(t *Tokens, model string, message *named) {
	if model != "" {
		t.Model = model
	}
	if message != nil && message.Model != "" {
		t.Model = message.Model
	}
}

// named is the model a message object names.
type named struct {
	Model string `json:"model"`
}

// count reads a token count; a negative one counts as none.
func count(n *int64) int64 {
	if n == nil || *n < 0 {
		return 0
	}
	return *n
}

// ModelOf returns the model a JSON request body names, or "".
func ModelOf(body []byte) string {
	var d struct {
		Model string `json:"model"`
	}
	if json.Unmarshal(body, &d) != nil {
		return ""
	}
	return d.Model
}
