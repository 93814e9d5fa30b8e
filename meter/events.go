package meter

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/creditsgw/caddy-credits/policy"
)

type byKey struct{}

// WithBy returns ctx naming who makes the ledger's writes done with it: the
// name of an admin token. Each event such a write makes for the change
// asked carries it as By; what falls due meanwhile (an expiry, a
// recharge) is the ledger's own and does not.
func WithBy(ctx context.Context, name string) context.Context {
	return context.WithValue(ctx, byKey{}, name)
}

// byOf is the name WithBy put in ctx, checked: empty when there is none.
func byOf(ctx context.Context) (string, error) {
	by, _ := ctx.Value(byKey{}).(string)
	if by == "" {
		return "", nil
	}
	return by, ValidateBy(by)
}

// ValidateBy checks the name of who makes a change: it is written into the
// org's event list, one word among others, so it has an org id's shape.
func ValidateBy(name string) error {
	if policy.ValidateOrg(name) != nil {
		return &policy.InputError{Field: "by", Value: name,
			Reason: "must match " + policy.IDPattern}
	}
	return nil
}

// Events returns up to limit of org's most recent events, newest first:
// its account events and its call events (kept a marker's lifetime after
// the org's last call), in the order they were written.
func (l *Ledger) Events(ctx context.Context, org string, limit int64) ([]Event, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return nil, err
	}
	if limit < 1 || limit > 1000 {
		return nil, rangeError("limit", limit, 1, 1000)
	}
	ctx, cancel := l.deadline(ctx)
	defer cancel()
	// Both lists are in the org's slot, so one pipeline reads them at once.
	pipe := l.rdb.Pipeline()
	account := pipe.LRange(ctx, l.keys.Events(org), 0, limit-1)
	calls := pipe.LRange(ctx, l.keys.Calls(org), 0, limit-1)
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, classify(fmt.Errorf("events: %w", err))
	}
	a, err := parseEvents(account.Val())
	if err != nil {
		return nil, &classed{class: Corrupt, err: fmt.Errorf("events: %w", err)}
	}
	c, err := parseEvents(calls.Val())
	if err != nil {
		return nil, &classed{class: Corrupt, err: fmt.Errorf("events: %w", err)}
	}
	return mergeEvents(a, c, int(limit)), nil
}

// mergeEvents merges the org's two lists, each newest first, into up to
// limit events, newest first: their numbers come from one sequence.
func mergeEvents(a, c []Event, limit int) []Event {
	events := make([]Event, 0, min(len(a)+len(c), limit))
	for len(events) < limit && (len(a) > 0 || len(c) > 0) {
		if len(c) == 0 || (len(a) > 0 && eventNumber(a[0]) > eventNumber(c[0])) {
			events, a = append(events, a[0]), a[1:]
		} else {
			events, c = append(events, c[0]), c[1:]
		}
	}
	return events
}

// eventNumber is an event's place in the org's sequence (parseEvent
// checked that its ID is a number).
func eventNumber(e Event) int64 {
	n, _ := strconv.ParseInt(e.ID, 10, 64)
	return n
}

func parseEvents(items []string) ([]Event, error) {
	events := make([]Event, 0, len(items))
	for _, item := range items {
		e, err := parseEvent(item)
		if err != nil {
			return nil, err
		}
		events = append(events, e)
	}
	return events, nil
}

// parseEvent reads one event of a list: "seq kind[@by] delta balance
// feature ref ms [reason]", with "-" for an empty feature or ref; the
// reason, when there is one, is the rest of the line. An operator's change
// carries the name of the admin token that made it after its kind.
func parseEvent(s string) (Event, error) {
	f := strings.SplitN(s, " ", 8)
	if len(f) < 7 {
		return Event{}, fmt.Errorf("event %q: %d fields, want 7", s, len(f))
	}
	var n [4]int64
	for i, idx := range []int{0, 2, 3, 6} {
		v, err := strconv.ParseInt(f[idx], 10, 64)
		if err != nil {
			return Event{}, fmt.Errorf("event %q: %w", s, err)
		}
		n[i] = v
	}
	dash := func(v string) string {
		if v == "-" {
			return ""
		}
		return v
	}
	kind, by, _ := strings.Cut(f[1], "@")
	e := Event{ID: f[0], Kind: kind, By: by, Delta: n[1], Balance: n[2], Feature: dash(f[4]), Ref: dash(f[5]),
		Time: time.UnixMilli(n[3]).UTC()}
	if len(f) == 8 {
		e.Reason = f[7]
	}
	return e, nil
}
