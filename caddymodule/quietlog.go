package caddymodule

import (
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/creditsgw/caddy-credits/meter"
)

// quietWindow is how often a kind of warning may be written while it
// repeats: a Redis outage fails every call, lease and retry the same way.
const quietWindow = 10 * time.Second

// quietLogs paces warnings and errors: the first of a kind (a logger's name
// and message) is written at once with a count of 1; the others of the
// next window are counted, and the window's last is written at its end
// with that count, "(N more like this in 10s)". An error that no retry
// cures (an org's corrupt data, the ledger refusing a call) is not an
// outage: each is written, since each needs an operator. So is a line
// that carries its own count.
type quietLogs struct {
	window time.Duration

	mu     sync.Mutex
	kinds  map[string]*quietKind
	closed bool
}

// quietKind is a kind of line inside its window: the last one held back,
// the core to write it with, and how many were held back.
type quietKind struct {
	core   zapcore.Core
	entry  zapcore.Entry
	fields []zapcore.Field
	held   int
	timer  *time.Timer
}

func newQuietLogs(window time.Duration) *quietLogs {
	return &quietLogs{window: window, kinds: make(map[string]*quietKind)}
}

// logger returns l with its warnings and errors paced by q.
func (q *quietLogs) logger(l *zap.Logger) *zap.Logger {
	return l.WithOptions(zap.WrapCore(func(c zapcore.Core) zapcore.Core { return &quietCore{Core: c, logs: q} }))
}

// write writes a line through core, as a logger would (its level and
// name filters included).
func write(core zapcore.Core, ent zapcore.Entry, fields []zapcore.Field) {
	if ce := core.Check(ent, nil); ce != nil {
		ce.Write(fields...)
	}
}

// take decides about one line: true to write it now.
func (q *quietLogs) take(core zapcore.Core, ent zapcore.Entry, fields []zapcore.Field) bool {
	key := ent.LoggerName + "\x00" + ent.Message
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return true
	}
	if k, ok := q.kinds[key]; ok {
		k.core, k.entry, k.fields = core, ent, fields
		k.held++
		return false
	}
	k := &quietKind{}
	k.timer = time.AfterFunc(q.window, func() { q.flush(key, k) })
	q.kinds[key] = k
	return true
}

// flush ends the window of k: the lines held back are written as one, and
// a new window starts; with none held back, the kind is quiet again.
func (q *quietLogs) flush(key string, k *quietKind) {
	q.mu.Lock()
	if q.kinds[key] != k {
		q.mu.Unlock()
		return
	}
	held, core, ent, fields := k.held, k.core, k.entry, k.fields
	if held == 0 || q.closed {
		delete(q.kinds, key)
	} else {
		k.held, k.core, k.fields = 0, nil, nil
		k.timer = time.AfterFunc(q.window, func() { q.flush(key, k) })
	}
	q.mu.Unlock()
	if held > 0 {
		writeHeld(core, ent, fields, held, q.window)
	}
}

func writeHeld(core zapcore.Core, ent zapcore.Entry, fields []zapcore.Field, held int, window time.Duration) {
	ent.Time = time.Now()
	ent.Message = fmt.Sprintf("%s (%d more like this in %s)", ent.Message, held, window)
	write(core, ent, append(fields[:len(fields):len(fields)], zap.Int("count", held)))
}

// close writes what is held back, and lets every line through from then
// on (a closing config's last lines are few).
func (q *quietLogs) close() {
	q.mu.Lock()
	q.closed = true
	kinds := q.kinds
	q.kinds = make(map[string]*quietKind)
	q.mu.Unlock()
	for _, k := range kinds {
		k.timer.Stop()
		if k.held > 0 {
			writeHeld(k.core, k.entry, k.fields, k.held, q.window)
		}
	}
}

// quietCore is a logger's core whose warnings and errors go through its
// quietLogs.
type quietCore struct {
	zapcore.Core
	logs *quietLogs
}

func (c *quietCore) With(fields []zapcore.Field) zapcore.Core {
	return &quietCore{Core: c.Core.With(fields), logs: c.logs}
}

func (c *quietCore) Check(ent zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(ent.Level) {
		return ce.AddCore(ent, c)
	}
	return ce
}

func (c *quietCore) Write(ent zapcore.Entry, fields []zapcore.Field) error {
	if ent.Level < zapcore.WarnLevel || needsOperator(fields) || hasCount(fields) {
		write(c.Core, ent, fields)
		return nil
	}
	if c.logs.take(c.Core, ent, fields) {
		write(c.Core, ent, append(fields[:len(fields):len(fields)], zap.Int("count", 1)))
	}
	return nil
}

// hasCount reports whether a line counts what it stands for itself (such
// as the calls lost at shutdown): it is a summary already.
func hasCount(fields []zapcore.Field) bool {
	for _, f := range fields {
		if f.Key == "count" {
			return true
		}
	}
	return false
}

// needsOperator reports whether a line's error is one that no retry cures.
func needsOperator(fields []zapcore.Field) bool {
	for _, f := range fields {
		if err, ok := f.Interface.(error); ok && f.Type == zapcore.ErrorType {
			if c := meter.Classify(err); c == meter.Corrupt || c == meter.Refused {
				return true
			}
		}
	}
	return false
}
