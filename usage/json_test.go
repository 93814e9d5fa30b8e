package usage

import (
	"fmt"
	"runtime"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

// wholeJSON is the reference: the usage a read of the whole answer at once
// finds, as encoding/json decodes it.
func wholeJSON(format Format, body []byte) Tokens {
	u := &Reader{format: format}
	u.read(body)
	return u.tokens
}

// streamJSON reads an answer in the pieces given.
func streamJSON(format Format, pieces [][]byte) Tokens {
	u := NewReader(format, "application/json")
	for _, p := range pieces {
		u.Write(p)
	}
	return u.Tokens()
}

// cutEvery cuts body into pieces of n bytes.
func cutEvery(body []byte, n int) [][]byte {
	var pieces [][]byte
	for len(body) > n {
		pieces = append(pieces, body[:n])
		body = body[n:]
	}
	return append(pieces, body)
}

// jsonValue draws a JSON value made of the names and values the usage is
// read from, at any depth, with the spellings encoding/json accepts
// (escapes, other cases, duplicates) and white space anywhere.
func jsonValue(t *rapid.T, depth int) string {
	ws := rapid.SampledFrom([]string{"", "", " ", "\n", "\t\r "})
	kind := rapid.IntRange(0, 5).Draw(t, "kind")
	if depth > 3 {
		kind = rapid.IntRange(0, 2).Draw(t, "leaf")
	}
	switch kind {
	case 0:
		return rapid.SampledFrom([]string{`"gpt-4o"`, `"meta-llama/Llama-3-70b"`, `""`, `"a\"b\\\/\n\u00e9"`, `"é"`, `"claude-3-5-sonnet-20241022"`}).Draw(t, "string")
	case 1:
		return rapid.SampledFrom([]string{"0", "7", "-1", "1000", "3003", "1.5", "1e3", "2E-2", "1e30", "-0", "123456789012"}).Draw(t, "number")
	case 2:
		return rapid.SampledFrom([]string{"true", "false", "null"}).Draw(t, "literal")
	case 3, 4:
		keys := rapid.SliceOfN(rapid.SampledFrom([]string{
			`"model"`, `"usage"`, `"message"`, `"type"`, `"Model"`, `"USAGE"`, `"us\u0061ge"`, `"meſſage"`,
			`"prompt_tokens"`, `"completion_tokens"`, `"input_tokens"`, `"output_tokens"`, `"choices"`, `"x"`,
		}), 0, 5).Draw(t, "keys")
		var b strings.Builder
		b.WriteString("{")
		for i, k := range keys {
			if i > 0 {
				b.WriteString(",")
			}
			b.WriteString(ws.Draw(t, "ws") + k + ws.Draw(t, "ws") + ":" + ws.Draw(t, "ws") + jsonValue(t, depth+1) + ws.Draw(t, "ws"))
		}
		return b.String() + ws.Draw(t, "ws") + "}"
	default:
		n := rapid.IntRange(0, 3).Draw(t, "items")
		items := make([]string, n)
		for i := range items {
			items[i] = ws.Draw(t, "ws") + jsonValue(t, depth+1) + ws.Draw(t, "ws")
		}
		return "[" + strings.Join(items, ",") + "]"
	}
}

// TestUsageJSONReference: the scan of a JSON answer finds what a read of
// the whole answer finds, however the answer is cut, for well-formed
// answers and for ones with a byte changed, dropped or added, or cut short.
func TestUsageJSONReference(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		body := []byte(jsonValue(t, 0))
		if rapid.Bool().Draw(t, "usage") {
			// Most answers drawn then carry a usage that can be read.
			body = []byte(`{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4,"input_tokens":5,"output_tokens":6},"rest":` + string(body) + "}")
		}
		if len(body) > 0 && rapid.IntRange(0, 3).Draw(t, "mangle") == 0 {
			i := rapid.IntRange(0, len(body)-1).Draw(t, "at")
			switch rapid.IntRange(0, 3).Draw(t, "how") {
			case 0:
				body[i] = rapid.SampledFrom([]byte(`{}[]":,\ 0ae-.tu`)).Draw(t, "byte")
			case 1:
				body = append(body[:i:i], body[i+1:]...)
			case 2:
				body = append(body[:i:i], append([]byte{rapid.SampledFrom([]byte(`{}[]":,\ 0x`)).Draw(t, "byte")}, body[i:]...)...)
			default:
				body = body[:i]
			}
		}
		for _, format := range []Format{OpenAI{}, Anthropic{}} {
			want := wholeJSON(format, body)
			n := rapid.IntRange(1, len(body)+1).Draw(t, "piece")
			if got := streamJSON(format, cutEvery(body, n)); got != want {
				t.Fatalf("%v, %q in pieces of %d: %+v, a whole read %+v", format.Name(), body, n, got, want)
			}
		}
	})
}

// FuzzUsageJSON: whatever the answer, the scan finds what a read of the
// whole answer finds, in pieces of any size.
func FuzzUsageJSON(f *testing.F) {
	for _, s := range []string{
		`{"model":"gpt-4o","usage":{"prompt_tokens":1,"completion_tokens":2}}`,
		`{"type":"message","model":"claude-3-5-sonnet-20241022","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":3,"output_tokens":4}}`,
		`{"message":{"model":"claude","usage":{"input_tokens":3,"output_tokens":1}},"message":null}`,
		` {"Usage":{"prompt_tokens":1},"us\u0061ge":{"completion_tokens":2}} ` + "\n",
		`{"usage":{"prompt_tokens":1.5}}`,
		`{"usage":{"prompt_tokens":1}} x`,
		`{"usage":{"prompt_tokens":1}`,
		`{"a":"` + "\x01" + `","usage":{"prompt_tokens":1}}`,
		`{"usage":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `}`,
		`{"usage":` + strings.Repeat("[", 9999) + strings.Repeat("]", 9999) + `}`,
		`[{"usage":{"prompt_tokens":1}}]`,
		`{"model":5,"usage":{"prompt_tokens":1}}`,
		`{"model":"m","message":{"model":{"x":1}}}`,
		`{"x":-01,"usage":{"prompt_tokens":1}}`,
		`{"x":1e+,"usage":{"prompt_tokens":1}}`,
		`{"x":"\u12g4"}`,
	} {
		f.Add(s, uint16(1))
		f.Add(s, uint16(7))
	}
	f.Fuzz(func(t *testing.T, body string, cut uint16) {
		for _, format := range []Format{OpenAI{}, Anthropic{}} {
			got := streamJSON(format, cutEvery([]byte(body), int(cut)%97+1))
			if len(body) <= maxKept {
				// The kept members cannot outgrow the answer.
				if want := wholeJSON(format, []byte(body)); got != want {
					t.Fatalf("%v: %+v, a whole read %+v", format.Name(), got, want)
				}
			} else if whole := streamJSON(format, [][]byte{[]byte(body)}); got != whole {
				t.Fatalf("%v: %+v in pieces, %+v whole", format.Name(), got, whole)
			}
		}
	})
}

// bigAnswer is an OpenAI chat answer of about size bytes: choices of
// generated text, with its usage first or last.
func bigAnswer(size int, usageFirst bool) []byte {
	const usage = `"usage":{"prompt_tokens":1001,"completion_tokens":1001,"total_tokens":2002}`
	b := make([]byte, 0, size+1024)
	b = append(b, `{"id":"chatcmpl-1","object":"chat.completion","model":"meta-llama/Llama-3-70b",`...)
	if usageFirst {
		b = append(b, usage+`,`...)
	}
	b = append(b, `"choices":[`...)
	text := strings.Repeat(`word \"quoted\" \u00e9 {not: [json]}\n`, 40)
	for i := 0; len(b) < size; i++ {
		if i > 0 {
			b = append(b, ',')
		}
		b = fmt.Appendf(b, `{"index":%d,"message":{"role":"assistant","content":"%s"},"logprobs":null,"finish_reason":"stop"}`, i, text)
	}
	b = append(b, ']')
	if !usageFirst {
		b = append(b, `,`+usage...)
	}
	return append(b, '}')
}

// TestUsageJSONMemory: a 50 MB JSON answer is read for its usage, at its
// start or at its end, allocating a few KiB whatever its size (a reader
// that kept the answer would take 50 MB; one that kept its first MiB, as
// before, charged the hold).
func TestUsageJSONMemory(t *testing.T) {
	for _, first := range []bool{true, false} {
		body := bigAnswer(50<<20, first)
		want := Tokens{Model: "meta-llama/Llama-3-70b", Input: 1001, Output: 1001, Seen: true}
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		u := NewReader(OpenAI{}, "application/json; charset=utf-8")
		for rest := body; len(rest) > 0; {
			n := min(len(rest), 32<<10)
			u.Write(rest[:n])
			rest = rest[n:]
		}
		got := u.Tokens()
		runtime.ReadMemStats(&after)
		if got != want {
			t.Fatalf("usage first %v: read %+v from %d bytes, want %+v", first, got, len(body), want)
		}
		allocated := after.TotalAlloc - before.TotalAlloc
		t.Logf("usage first %v: %d bytes allocated to read %d MiB", first, allocated, len(body)>>20)
		if allocated > 16<<10 {
			t.Fatalf("usage first %v: %d bytes allocated to read a %d MiB answer", first, allocated, len(body)>>20)
		}
		if kept := cap(u.json.doc) + cap(u.json.stack) + cap(u.json.key); kept > 4<<10 {
			t.Fatalf("usage first %v: %d bytes kept", first, kept)
		}
	}
}
