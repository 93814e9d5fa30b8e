package policy

import (
	"bytes"
	"encoding/json"
	"strconv"
	"strings"
)

// UsageFormat is where a route's real cost comes from.
type UsageFormat uint8

const (
	// UsageHeader reads the upstream's Credits-Usage header or trailer.
	UsageHeader UsageFormat = iota
	// UsageOpenAI reads the usage object of an OpenAI-style JSON answer, or
	// of the server-sent event that carries it.
	UsageOpenAI
	// UsageAnthropic reads the usage of Anthropic's message_start and
	// message_delta events, or of its JSON answer.
	UsageAnthropic
)

var usageNames = [...]string{UsageHeader: "header", UsageOpenAI: "openai", UsageAnthropic: "anthropic"}

// ParseUsageFormat parses a Caddyfile usage value.
func ParseUsageFormat(s string) (UsageFormat, error) {
	for f, name := range usageNames {
		if s == name {
			return UsageFormat(f), nil
		}
	}
	return UsageHeader, &InputError{Field: "usage", Value: s, Reason: "must be header, openai or anthropic"}
}

// String returns the format's Caddyfile spelling.
func (f UsageFormat) String() string {
	if int(f) < len(usageNames) {
		return usageNames[f]
	}
	return "UsageFormat(" + strconv.Itoa(int(f)) + ")"
}

// MaxPrice is the most credits a price may ask per 1,000,000 tokens.
const MaxPrice = 1_000_000

// Price is what a model's tokens cost: credits per 1,000,000 input and
// output tokens, for models whose name matches the glob Model. In the glob,
// "*" matches any run of characters, "/" included, so "*" matches every
// model and "meta-llama/*" every model under meta-llama/.
type Price struct {
	// Model is a glob of model names, e.g. gpt-4o*, claude-3-5-* or
	// openai/*: * matches any run of characters, / included, ? one
	// character, [a-z] one of a class, [^a-z] one outside it, and \ quotes
	// the character after it.
	Model string `json:"model"`
	// In is the credits per 1,000,000 input tokens.
	In int64 `json:"in"`
	// Out is the credits per 1,000,000 output tokens.
	Out int64 `json:"out"`
}

// Validate checks the price's glob and amounts.
func (p Price) Validate() error {
	if p.Model == "" {
		return &InputError{Field: "price model", Value: p.Model, Reason: "must be a model name or glob"}
	}
	if !globOK(p.Model) {
		return &InputError{Field: "price model", Value: p.Model, Reason: "must be a glob: * any run of characters, ? one, [a-z] one of a class, \\ quotes the next"}
	}
	for _, n := range []int64{p.In, p.Out} {
		if n < 0 || n > MaxPrice {
			return &InputError{Field: "price", Value: strconv.FormatInt(n, 10), Reason: "must be 0 to " + strconv.Itoa(MaxPrice) + " credits per 1,000,000 tokens"}
		}
	}
	return nil
}

// Tokens is the usage an answer reported.
type Tokens struct {
	// Model is the model the answer names, if any.
	Model string
	// Input and Output are the tokens reported.
	Input, Output int64
	// Seen is true once any usage was read.
	Seen bool
}

// maxTokens bounds the tokens counted, so that a price times them stays an
// exact integer.
const maxTokens = 1_000_000_000_000

// PriceOf returns the credits the tokens cost at the first price whose glob
// matches model: ceil((input*in + output*out) / 1,000,000), at most
// MaxCost. ok is false when no price matches.
func PriceOf(prices []Price, model string, t Tokens) (credits int64, ok bool) {
	for _, p := range prices {
		if !matchGlob(p.Model, model) {
			continue
		}
		// Split to stay exact: tokens up to 10^12 times prices up to 10^6.
		in, out := min(t.Input, maxTokens), min(t.Output, maxTokens)
		whole := (in/1_000_000)*p.In + (out/1_000_000)*p.Out
		rest := (in%1_000_000)*p.In + (out%1_000_000)*p.Out
		credits = whole + (rest+999_999)/1_000_000
		return min(credits, MaxCost), true
	}
	return 0, false
}

// Limits of a UsageReader.
const (
	// maxUsageLine is the longest server-sent event line read; a longer
	// one is passed over.
	maxUsageLine = 64 << 10
	// usageHead is how much of the start of a stream is read line by line
	// (with the line it ends in), for Anthropic's message_start.
	usageHead = 64 << 10
	// tailLines is how many of a stream's last lines are read once it
	// ends, at most maxUsageLine bytes of them: the formats read send their
	// final usage in their last events (OpenAI's usage chunk before
	// [DONE], Anthropic's message_delta before message_stop). What lies
	// between the head and the tail is generated text, passed over without
	// a look.
	tailLines = 8
)

// UsageReader reads the usage of an answer as its body passes through, in
// bounded memory whatever the body's size: a server-sent event stream's
// first 64 KiB line by line and its last lines once it ends (or is cut); a
// JSON answer of any size in one pass that keeps only the top-level members
// its usage is read from. What it reads depends on the body alone, never
// on how it was cut into pieces. It never fails; what it cannot read leaves
// Tokens unseen, and the call is charged its hold.
type UsageReader struct {
	format UsageFormat
	sse    bool
	line   []byte   // the SSE line read so far
	skip   bool     // the current line is too long: pass it over
	json   jsonScan // a JSON answer's scan
	tokens Tokens

	offset   int64  // the stream's bytes so far
	headDone bool   // the head has been read
	tail     []byte // the stream's end: at most tailLines newlines, maxUsageLine bytes
	tailNL   int    // the newlines in tail
	tailCut  bool   // tail starts inside a line (cut by its size)
}

// NewUsageReader returns a reader for an answer of contentType.
func NewUsageReader(format UsageFormat, contentType string) *UsageReader {
	return &UsageReader{format: format, sse: strings.HasPrefix(strings.TrimSpace(strings.ToLower(contentType)), "text/event-stream")}
}

// Write reads a piece of the body; it never fails.
func (u *UsageReader) Write(p []byte) (int, error) {
	n := len(p)
	if !u.sse {
		u.json.write(p)
		return n, nil
	}
	if !u.headDone {
		n := int(max(0, min(int64(len(p)), usageHead-u.offset)))
		u.lines(p[:n])
		if rest := p[n:]; u.offset+int64(n) >= usageHead {
			// The head ends in the line in progress, if there is one: it
			// is read to its end.
			if len(u.line) == 0 && !u.skip {
				u.headDone = true
			} else if i := bytes.IndexByte(rest, '\n'); i >= 0 {
				u.lines(rest[:i+1])
				u.headDone = true
			} else {
				u.lines(rest)
			}
		}
	}
	u.offset += int64(len(p))
	u.addTail(p)
	return n, nil
}

// lines reads the head of a stream line by line.
func (u *UsageReader) lines(p []byte) {
	for len(p) > 0 {
		if len(u.line) == 0 && !u.skip && !hasUsage(p) {
			// No usage in the rest of this piece: only the line it ends in
			// the middle of is kept, for the next piece to finish.
			if i := bytes.LastIndexByte(p, '\n'); i >= 0 {
				p = p[i+1:]
			}
			u.keep(p)
			break
		}
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			u.keep(p)
			break
		}
		if len(u.line) == 0 && !u.skip {
			// A whole line in this piece: read in place, copied nowhere.
			if i <= maxUsageLine {
				u.event(p[:i])
			}
		} else {
			u.keep(p[:i])
			if !u.skip {
				u.event(u.line)
			}
			u.line, u.skip = u.line[:0], false
		}
		p = p[i+1:]
	}
}

// addTail adds a piece of a stream to its tail: the longest end of the
// stream with at most tailLines newlines, cut to its last maxUsageLine
// bytes. Only the piece's end is looked at, in windows that double until
// they hold enough lines, so a stream's middle costs a few lines per piece
// however large the pieces are. (Forward searches: Go's backward byte
// search is a byte at a time.)
func (u *UsageReader) addTail(p []byte) {
	lo := max(0, len(p)-maxUsageLine) // bytes before lo are never in the tail
	nl := 0
	for w := 4 << 10; ; w *= 2 {
		from := max(lo, len(p)-w)
		win := p[from:]
		nl = bytes.Count(win, []byte{'\n'})
		if nl > tailLines {
			// The tail starts after the piece's (tailLines+1)th last newline.
			i := 0
			for range nl - tailLines {
				i += bytes.IndexByte(win[i:], '\n') + 1
			}
			u.tail, u.tailNL, u.tailCut = append(u.tail[:0], win[i:]...), tailLines, false
			return
		}
		if from == lo {
			break
		}
	}
	if lo > 0 {
		u.tail, u.tailNL, u.tailCut = append(u.tail[:0], p[lo:]...), nl, p[lo-1] != '\n'
		return
	}
	u.tail, u.tailNL = append(u.tail, p...), u.tailNL+nl
	drop := 0
	for ; u.tailNL > tailLines; u.tailNL-- {
		drop += bytes.IndexByte(u.tail[drop:], '\n') + 1
		u.tailCut = false
	}
	if cut := len(u.tail) - maxUsageLine; cut > drop {
		u.tailNL -= bytes.Count(u.tail[drop:cut], []byte{'\n'})
		u.tailCut = u.tail[cut-1] != '\n'
		drop = cut
	}
	if drop > 0 {
		u.tail = u.tail[:copy(u.tail, u.tail[drop:])]
	}
}

// keep adds the start of a line that goes on in the next piece, passing
// over a line longer than maxUsageLine.
func (u *UsageReader) keep(p []byte) {
	if u.skip {
		return
	}
	if len(u.line)+len(p) > maxUsageLine {
		u.skip, u.line = true, u.line[:0]
		return
	}
	u.line = append(u.line, p...)
}

// Tokens returns the usage read; call it once the body has ended.
func (u *UsageReader) Tokens() Tokens {
	if u.sse {
		if len(u.line) > 0 && !u.skip {
			u.event(u.line)
			u.line = u.line[:0]
		}
		// The tail may hold lines the head read too: read again, in the
		// stream's order, they leave the usage as the stream's end has it.
		tail := u.tail
		if u.tailCut {
			_, tail, _ = bytes.Cut(tail, []byte{'\n'}) // the cut line is passed over
		}
		for len(tail) > 0 {
			line, rest, _ := bytes.Cut(tail, []byte{'\n'})
			u.event(line)
			tail = rest
		}
		u.tail, u.tailNL = u.tail[:0], 0
	} else if m := u.json.members(); m != nil {
		u.read(m)
	}
	return u.tokens
}

// event reads one SSE line: a data line's JSON.
func (u *UsageReader) event(line []byte) {
	data, ok := bytes.CutPrefix(bytes.TrimRight(line, "\r"), []byte("data:"))
	if !ok {
		return
	}
	data = bytes.TrimSpace(data)
	if len(data) == 0 || data[0] != '{' {
		return // [DONE] and the like
	}
	// Only an event with a usage is worth decoding: in both formats it
	// names the model too. The rest of a stream is passed over at the
	// speed of a byte search.
	if !hasUsage(data) {
		return
	}
	u.read(data)
}

// hasUsage reports whether an event's JSON may carry a usage: it names one
// that is not null (OpenAI's chunks say "usage":null until the last). The
// search starts at the key's 'u', rarer in JSON than its quote.
func hasUsage(data []byte) bool {
	key := []byte(`usage"`)
	for off := 0; ; {
		i := bytes.Index(data[off:], key)
		if i < 0 {
			return false
		}
		i += off
		off = i + len(key)
		if i == 0 || data[i-1] != '"' {
			continue
		}
		rest := bytes.TrimLeft(data[off:], " \t:")
		if !bytes.HasPrefix(rest, []byte("null")) {
			return true
		}
	}
}

// usageDoc is the part of an answer, or of one of its events, that names
// its model and usage, in the formats read.
type usageDoc struct {
	Type    string      `json:"type"`
	Model   string      `json:"model"`
	Usage   *usageCount `json:"usage"`
	Message *struct {
		Model string      `json:"model"`
		Usage *usageCount `json:"usage"`
	} `json:"message"`
}

type usageCount struct {
	PromptTokens     *int64 `json:"prompt_tokens"`
	CompletionTokens *int64 `json:"completion_tokens"`
	InputTokens      *int64 `json:"input_tokens"`
	OutputTokens     *int64 `json:"output_tokens"`
}

func (u *UsageReader) read(data []byte) {
	var d usageDoc
	if json.Unmarshal(data, &d) != nil {
		return
	}
	if d.Model != "" {
		u.tokens.Model = d.Model
	}
	if d.Message != nil && d.Message.Model != "" {
		u.tokens.Model = d.Message.Model
	}
	switch u.format {
	case UsageOpenAI:
		if d.Usage != nil && (d.Usage.PromptTokens != nil || d.Usage.CompletionTokens != nil) {
			u.tokens.Input, u.tokens.Output = count(d.Usage.PromptTokens), count(d.Usage.CompletionTokens)
			u.tokens.Seen = true
		}
	case UsageAnthropic:
		// message_start carries the input and the first output tokens;
		// each message_delta the output tokens so far; a JSON answer both.
		usage := d.Usage
		if d.Message != nil && d.Message.Usage != nil {
			usage = d.Message.Usage
		}
		if usage == nil {
			return
		}
		if usage.InputTokens != nil {
			u.tokens.Input, u.tokens.Seen = count(usage.InputTokens), true
		}
		if usage.OutputTokens != nil {
			u.tokens.Output, u.tokens.Seen = count(usage.OutputTokens), true
		}
	}
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
