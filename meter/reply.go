package meter

import (
	"errors"
	"fmt"
	"strconv"
)

// chargeReply is one charge script's reply, read field by field into typed
// values: {code, balance, charged, kept response[, limit, spent, resets]},
// {codeWrongType, key position, type}, or, from the batch script, {-1,
// message}. Fields past the seventh are counted and not kept.
type chargeReply struct {
	n int // fields in the reply
	f [7]replyField
}

// replyField is one field of a reply: an integer, a string, or nil.
type replyField struct {
	kind byte // 'i' integer, 's' string, 0 nil, 'x' anything else
	i    int64
	s    string
}

// int returns field i when it is an integer.
func (r *chargeReply) int(i int) (int64, error) {
	if i >= r.n || i >= len(r.f) || r.f[i].kind != 'i' {
		return 0, fmt.Errorf("script reply field %d of %d is not an integer", i, r.n)
	}
	return r.f[i].i, nil
}

// anys returns the fields kept as go-redis would have read them, for
// the rare replies read by code shared with every script (wrongType).
func (r *chargeReply) anys() []any {
	v := make([]any, min(r.n, len(r.f)))
	for i := range v {
		switch r.f[i].kind {
		case 'i':
			v[i] = r.f[i].i
		case 's':
			v[i] = r.f[i].s
		}
	}
	return v
}

// replyFromAny reads a reply go-redis parsed (a charge that went through
// it: a retry, or a Cluster's pipeline).
func replyFromAny(raw any, r *chargeReply) error {
	v, ok := raw.([]any)
	if !ok {
		return fmt.Errorf("script reply is %T, not an array", raw)
	}
	*r = chargeReply{n: len(v)}
	for i := range min(len(v), len(r.f)) {
		switch x := v[i].(type) {
		case int64:
			r.f[i] = replyField{kind: 'i', i: x}
		case string:
			r.f[i] = replyField{kind: 's', s: x}
		case nil:
		default:
			r.f[i] = replyField{kind: 'x'}
		}
	}
	return nil
}

// respReader reads the RESP2 or RESP3 text of a script's reply (a
// RawCmd's), with no allocation but the strings it keeps.
type respReader struct {
	b []byte
	i int
}

var errShortReply = errors.New("script reply cut short")

// line returns the next line's type byte and the rest of it.
func (rd *respReader) line() (byte, []byte, error) {
	for j := rd.i; j+1 < len(rd.b); j++ {
		if rd.b[j] == '\r' && rd.b[j+1] == '\n' {
			if j == rd.i {
				return 0, nil, errors.New("empty line in a script reply")
			}
			t, rest := rd.b[rd.i], rd.b[rd.i+1:j]
			rd.i = j + 2
			return t, rest, nil
		}
	}
	return 0, nil, errShortReply
}

// length reads the length of an array or a bulk string, -1 for nil.
func length(b []byte) (int, error) {
	n, err := strconv.Atoi(string(b))
	if err != nil || n < -1 {
		return 0, fmt.Errorf("script reply length %q", b)
	}
	return n, nil
}

// bulk reads n bytes and the line end after them.
func (rd *respReader) bulk(n int) ([]byte, error) {
	if rd.i+n+2 > len(rd.b) {
		return nil, errShortReply
	}
	s := rd.b[rd.i : rd.i+n]
	rd.i += n + 2
	return s, nil
}

// array reads an array's header: its length, or -1 for nil. An error reply
// is returned as the error of a reply of Redis' (scriptError).
func (rd *respReader) array() (int, error) {
	t, rest, err := rd.line()
	if err != nil {
		return 0, err
	}
	switch t {
	case '*':
		return length(rest)
	case '_':
		return -1, nil
	case '-':
		return 0, scriptError(rest)
	}
	return 0, fmt.Errorf("script reply is of RESP type %q, not an array", t)
}

// charge reads one charge's reply into r. A reply of the batch script's
// {-1, message} is returned as that charge's error.
func (rd *respReader) charge(r *chargeReply) error {
	n, err := rd.array()
	if err != nil {
		return err
	}
	if n < 0 {
		return errors.New("script reply is nil, not an array")
	}
	*r = chargeReply{n: n}
	for i := range n {
		t, rest, err := rd.line()
		if err != nil {
			return err
		}
		var f replyField
		switch t {
		case ':':
			x, err := strconv.ParseInt(string(rest), 10, 64)
			if err != nil {
				return fmt.Errorf("script reply integer %q", rest)
			}
			f = replyField{kind: 'i', i: x}
		case '$', '+':
			s := rest
			if t == '$' {
				size, err := length(rest)
				if err != nil {
					return err
				}
				if size < 0 {
					break
				}
				if s, err = rd.bulk(size); err != nil {
					return err
				}
			}
			f = replyField{kind: 's', s: string(s)}
		case '_':
		case '*':
			// Not a field of a charge's reply: skipped whole, so that the
			// replies after it still read.
			size, err := length(rest)
			if err != nil {
				return err
			}
			for range size {
				if err := rd.skipField(); err != nil {
					return err
				}
			}
			f = replyField{kind: 'x'}
		default:
			f = replyField{kind: 'x'}
		}
		if i < len(r.f) {
			r.f[i] = f
		}
	}
	if r.n == 2 && r.f[0].kind == 'i' && r.f[0].i == -1 && r.f[1].kind == 's' {
		return scriptError(r.f[1].s)
	}
	return nil
}

// skipField reads one field of any shape and drops it.
func (rd *respReader) skipField() error {
	t, rest, err := rd.line()
	if err != nil {
		return err
	}
	switch t {
	case '$':
		size, err := length(rest)
		if err != nil || size < 0 {
			return err
		}
		_, err = rd.bulk(size)
		return err
	case '*':
		size, err := length(rest)
		if err != nil {
			return err
		}
		for range size {
			if err := rd.skipField(); err != nil {
				return err
			}
		}
	}
	return nil
}
