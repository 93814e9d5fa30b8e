package usage

import (
	"bytes"
	"encoding/json"
)

// Limits of a JSON answer's scan.
const (
	// maxKept is the most bytes of an answer's members kept for its usage;
	// an answer whose kept members are larger is charged the hold.
	maxKept = 64 << 10
	// maxDepth is the deepest nesting read, encoding/json's own limit.
	maxDepth = 10000
	// maxKey is the longest key compared with the names kept: "message"
	// spelled with escapes (\u006d...) fits.
	maxKey = 64
)

// States of the scan, after encoding/json's scanner.
const (
	jsTop        uint8 = iota // before the answer: its top level must be an object
	jsValue                   // a value is due
	jsValueOrEnd              // after [: a value or ]
	jsKeyOrEnd                // after {: a key or }
	jsKey                     // after a comma in an object: a key
	jsColon                   // after a key
	jsEnd                     // after a value: a comma or the end of its container
	jsDone                    // after the answer: white space only
	jsString                  // in a string
	jsEsc                     // after a \ in a string
	jsHex                     // in the digits of a \u escape
	jsLiteral                 // in true, false or null
	jsMinus                   // after a number's minus
	jsZero                    // after a number's leading 0
	jsInt                     // in a number's integer digits
	jsDot                     // after its decimal point
	jsFrac                    // in its fraction's digits
	jsExp                     // after its e
	jsExpSign                 // after its exponent's sign
	jsExpInt                  // in its exponent's digits
)

// What a member's value is to the scan.
const (
	skipped = iota // passed over
	keptRaw        // kept as it is
	keptMsg        // the top-level message: only its model and usage are kept
)

// jsonScan reads a JSON answer as it streams past, in bounded memory: it
// checks the answer's syntax as encoding/json does and keeps, of the
// top-level object, only the members the usage is read from (model,
// usage, and message's model and usage). Decoding the kept members gives
// what decoding the whole answer would, however large the answer.
type jsonScan struct {
	state  uint8
	dead   bool   // the answer cannot give a usage: its syntax, depth or kept size
	stack  []byte // the open containers, '{' or '['
	inKey  bool   // the string read is a key
	left   int    // digits of a \u escape, or bytes of a literal, still due
	lit    string // the literal read
	key    []byte // the key read, raw, when keyOn
	keyOn  bool   // the key read may name a kept member
	next   int    // what the member whose key was read is to the scan
	rec    bool   // a kept value is being read
	recAt  int    // the depth of the object whose member is kept
	recOff int    // where the kept value starts in the piece read
	msg    bool   // in the top-level message object
	doc    []byte // the kept members, as a JSON object not yet closed
	outerN int    // members in doc
	msgN   int    // members in doc's message
}

// write reads a piece of the answer.
func (s *jsonScan) write(p []byte) {
	if s.dead {
		return
	}
	s.recOff = 0
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch s.state {
		case jsString:
			// The bulk of an answer is text: run to the string's end.
			j := i
			for j < len(p) && p[j] >= 0x20 && p[j] != '"' && p[j] != '\\' {
				j++
			}
			s.keyBytes(p[i:j])
			if i = j; i == len(p) {
				continue
			}
			switch c = p[i]; {
			case c == '"':
				if s.inKey {
					s.keyBytes(p[i : i+1])
					s.endKey()
					s.state = jsColon
				} else {
					s.endValue(p, i+1)
				}
			case c == '\\':
				s.keyBytes(p[i : i+1])
				s.state = jsEsc
			default:
				s.fail() // a control character
			}
		case jsEsc:
			s.keyBytes(p[i : i+1])
			switch c {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				s.state = jsString
			case 'u':
				s.state, s.left = jsHex, 4
			default:
				s.fail()
			}
		case jsHex:
			s.keyBytes(p[i : i+1])
			if !isHex(c) {
				s.fail()
			} else if s.left--; s.left == 0 {
				s.state = jsString
			}
		case jsLiteral:
			if c != s.lit[len(s.lit)-s.left] {
				s.fail()
			} else if s.left--; s.left == 0 {
				s.endValue(p, i+1)
			}
		case jsMinus:
			switch {
			case c == '0':
				s.state = jsZero
			case '1' <= c && c <= '9':
				s.state = jsInt
			default:
				s.fail()
			}
		case jsInt, jsZero:
			if s.state == jsInt && '0' <= c && c <= '9' {
				break
			}
			switch c {
			case '.':
				s.state = jsDot
			case 'e', 'E':
				s.state = jsExp
			default:
				s.endValue(p, i) // the byte after a number is read again
				i--
			}
		case jsDot:
			if '0' <= c && c <= '9' {
				s.state = jsFrac
			} else {
				s.fail()
			}
		case jsFrac:
			switch {
			case '0' <= c && c <= '9':
			case c == 'e' || c == 'E':
				s.state = jsExp
			default:
				s.endValue(p, i) // the byte after a number is read again
				i--
			}
		case jsExp:
			switch {
			case c == '+' || c == '-':
				s.state = jsExpSign
			case '0' <= c && c <= '9':
				s.state = jsExpInt
			default:
				s.fail()
			}
		case jsExpSign:
			if '0' <= c && c <= '9' {
				s.state = jsExpInt
			} else {
				s.fail()
			}
		case jsExpInt:
			if c < '0' || c > '9' {
				s.endValue(p, i) // the byte after a number is read again
				i--
			}
		default:
			if isSpace(c) {
				break
			}
			s.token(p, i)
		}
		if s.dead {
			return
		}
	}
	if s.rec {
		s.keep(p[s.recOff:])
	}
}

// token reads the byte at p[i], not white space, between tokens.
func (s *jsonScan) token(p []byte, i int) {
	c := p[i]
	switch s.state {
	case jsTop:
		if c != '{' {
			s.fail() // no usage on any other top level
			return
		}
		s.push(c)
		s.state = jsKeyOrEnd
	case jsValueOrEnd:
		if c == ']' {
			s.pop(p, i)
			return
		}
		s.value(p, i)
	case jsValue:
		s.value(p, i)
	case jsKeyOrEnd, jsKey:
		switch {
		case c == '}' && s.state == jsKeyOrEnd:
			s.pop(p, i)
		case c == '"':
			s.state, s.inKey = jsString, true
			d := len(s.stack)
			s.keyOn = d == 1 || (s.msg && d == 2)
			s.key = append(s.key[:0], c)
		default:
			s.fail()
		}
	case jsColon:
		if c != ':' {
			s.fail()
			return
		}
		s.state = jsValue
	case jsEnd:
		top := s.stack[len(s.stack)-1]
		switch {
		case c == ',' && top == '{':
			s.state = jsKey
		case c == ',':
			s.state = jsValue
		case c == '}' && top == '{', c == ']' && top == '[':
			s.pop(p, i)
		default:
			s.fail()
		}
	case jsDone:
		s.fail()
	}
}

// value starts the value at p[i].
func (s *jsonScan) value(p []byte, i int) {
	c := p[i]
	switch next := s.next; {
	case next == keptMsg && c == '{':
		s.doc = append(s.doc, '{')
		s.msg, s.msgN = true, 0
	case next != skipped:
		s.rec, s.recAt, s.recOff = true, len(s.stack), i
	}
	s.next = skipped
	switch {
	case c == '{' || c == '[':
		s.push(c)
		if c == '{' {
			s.state = jsKeyOrEnd
		} else {
			s.state = jsValueOrEnd
		}
	case c == '"':
		s.state, s.inKey = jsString, false
	case c == '-':
		s.state = jsMinus
	case c == '0':
		s.state = jsZero
	case '1' <= c && c <= '9':
		s.state = jsInt
	case c == 't':
		s.state, s.lit, s.left = jsLiteral, "true", 3
	case c == 'f':
		s.state, s.lit, s.left = jsLiteral, "false", 4
	case c == 'n':
		s.state, s.lit, s.left = jsLiteral, "null", 3
	default:
		s.fail()
	}
}

func (s *jsonScan) push(c byte) {
	if len(s.stack) == maxDepth {
		s.fail()
		return
	}
	s.stack = append(s.stack, c)
}

// pop closes the container whose last byte is p[i].
func (s *jsonScan) pop(p []byte, i int) {
	s.stack = s.stack[:len(s.stack)-1]
	if s.msg && len(s.stack) == 1 {
		s.doc = append(s.doc, '}')
		s.msg = false
	}
	s.endValue(p, i+1)
}

// endValue ends a value at p[:end], keeping it if it is a kept member's.
func (s *jsonScan) endValue(p []byte, end int) {
	if s.rec && len(s.stack) == s.recAt {
		s.keep(p[s.recOff:end])
		s.rec = false
	}
	if len(s.stack) == 0 {
		s.state = jsDone
	} else {
		s.state = jsEnd
	}
}

// endKey decides, once a key is read, whether its member is kept, and
// starts it in doc if so.
func (s *jsonScan) endKey() {
	s.inKey = false
	if !s.keyOn || len(s.key) > maxKey {
		return
	}
	names := []string{"model", "usage", "message"}
	if len(s.stack) == 2 {
		names = names[:2] // message's model and usage
	}
	// A key written with escapes is compared as read; encoding/json
	// matches names without case.
	name := s.key[1 : len(s.key)-1]
	if bytes.IndexByte(s.key, '\\') >= 0 {
		var v string
		if json.Unmarshal(s.key, &v) != nil {
			return
		}
		name = []byte(v)
	}
	for _, n := range names {
		if !bytes.EqualFold(name, []byte(n)) {
			continue
		}
		s.next = keptRaw
		if n == "message" {
			s.next = keptMsg
		}
		if s.doc == nil {
			s.doc = append(make([]byte, 0, 256), '{')
		}
		if outer := len(s.stack) == 1; outer && s.outerN > 0 || !outer && s.msgN > 0 {
			s.doc = append(s.doc, ',')
		}
		if len(s.stack) == 1 {
			s.outerN++
		} else {
			s.msgN++
		}
		s.keep(s.key)
		s.keep([]byte{':'})
		return
	}
}

// keyBytes adds bytes of a key being read, if it may name a kept member.
func (s *jsonScan) keyBytes(b []byte) {
	if !s.inKey || !s.keyOn || len(s.key) > maxKey {
		return
	}
	s.key = append(s.key, b[:min(len(b), maxKey+1-len(s.key))]...)
}

// keep adds bytes to the kept members, within maxKept.
func (s *jsonScan) keep(b []byte) {
	if len(s.doc)+len(b) > maxKept {
		s.fail()
		return
	}
	s.doc = append(s.doc, b...)
}

// fail gives up on the answer: it gives no usage.
func (s *jsonScan) fail() {
	s.dead, s.doc, s.stack, s.key = true, nil, nil, nil
}

// members returns the kept members as a JSON object, or nil if the answer
// was not a whole JSON object.
func (s *jsonScan) members() []byte {
	if s.dead || s.state != jsDone {
		return nil
	}
	if s.doc == nil {
		return []byte("{}")
	}
	return append(s.doc, '}')
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}
