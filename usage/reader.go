package usage

import (
	"bytes"
	"strings"
)

// Limits of a Reader.
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

// Reader reads the usage of an answer as its body passes through, in
// bounded memory whatever the body's size: a server-sent event stream's
// first 64 KiB line by line and its last lines once it ends (or is cut); a
// JSON answer of any size in one pass that keeps only the top-level members
// its usage is read from. What it reads depends on the body alone, never
// on how it was cut into pieces. It never fails; what it cannot read leaves
// Tokens unseen, and the call is charged its hold.
type Reader struct {
	format Format
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

// NewReader returns a reader of an answer of contentType in format.
func NewReader(format Format, contentType string) *Reader {
	return &Reader{format: format, sse: strings.HasPrefix(strings.TrimSpace(strings.ToLower(contentType)), "text/event-stream")}
}

// Write reads a piece of the body; it never fails.
func (u *Reader) Write(p []byte) (int, error) {
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
func (u *Reader) lines(p []byte) {
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
func (u *Reader) addTail(p []byte) {
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
func (u *Reader) keep(p []byte) {
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
func (u *Reader) Tokens() Tokens {
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
func (u *Reader) event(line []byte) {
	data, ok := bytes.CutPrefix(bytes.TrimRight(line, "\r"), []byte("data:"))
	if !ok {
		return
	}
	data = bytes.TrimSpace(data)
	if len(data) == 0 || data[0] != '{' {
		return // [DONE] and the like
	}
	// Only an event with a usage is worth decoding: in the formats read it
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

// read reads one JSON answer, or one event of a stream.
func (u *Reader) read(data []byte) { u.format.Read(data, &u.tokens) }
