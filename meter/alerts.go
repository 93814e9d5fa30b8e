package meter

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/policy"
)

// Alert is one balance alert: recorded in the org's alerts hash by the
// check that found it due, and kept there until a gateway delivered it.
type Alert struct {
	// ID is the alert's unique id, which a receiver deduplicates by.
	ID string
	// Org is the org whose balance it is about.
	Org string
	// Body is the webhook's JSON body.
	Body []byte
}

// CheckAlerts records and returns the balance alerts of org that are due:
// balance.below for each threshold its balance fell below since the last
// check, balance.exhausted when it reached zero. Of any number of checks
// at once, on any number of gateways, one records each alert.
func (l *Ledger) CheckAlerts(ctx context.Context, org string, thresholds []int64) ([]Alert, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return nil, err
	}
	r, err := l.call(ctx, "alerts", alertCall{org: org, thresholds: thresholds})
	if err != nil {
		return nil, err
	}
	v := r.v
	var alerts []Alert
	for i := 1; i+1 < len(v); i += 2 {
		id, ok1 := v[i].(string)
		body, ok2 := v[i+1].(string)
		if !ok1 || !ok2 {
			return nil, fmt.Errorf("alerts: reply field %d is %T, %T", i, v[i], v[i+1])
		}
		alerts = append(alerts, Alert{ID: id, Org: org, Body: []byte(body)})
	}
	return alerts, nil
}

// alertScript, lua/alert.lua, records the balance alerts that are due.
// KEYS: account, alerts.
// ARGV[8] the thresholds, space-separated, ARGV[9] the time of the check
// (RFC 3339), ARGV[10] the org.
// Reply: {code, id, body, id, body...}.
var alertScript = bind("alert.lua", replyCodes{codeOK: nil})

type alertCall struct {
	org        string
	thresholds []int64
}

func (alertCall) script() *luaScript { return alertScript }

func (c alertCall) keys(k Keys) []string { return []string{k.Account(c.org), k.Alerts(c.org)} }

func (c alertCall) args(l *Ledger) []any {
	ts := make([]string, len(c.thresholds))
	for i, t := range c.thresholds {
		ts[i] = strconv.FormatInt(t, 10)
	}
	return []any{strings.Join(ts, " "), l.now().UTC().Format(time.RFC3339), c.org}
}

// AlertDelivered drops// AlertDelivered drops a delivered alert from the org's pending alerts.
func (l *Ledger) AlertDelivered(ctx context.Context, a Alert) error {
	ctx, cancel := l.deadline(ctx)
	defer cancel()
	if err := l.rdb.HDel(ctx, l.keys.Alerts(a.Org), "p:"+a.ID, "c:"+a.ID).Err(); err != nil {
		return fmt.Errorf("alert delivered: %w", err)
	}
	return nil
}

// StaleAlerts returns the pending alerts that no gateway took on within
// the last `stale` (left by a gateway that stopped before it delivered
// them), and takes them on: the next call leaves them alone for `stale`.
// It scans the keyspace of every node, so it is for a background sweep,
// not the request path.
func (l *Ledger) StaleAlerts(ctx context.Context, stale time.Duration) ([]Alert, error) {
	pattern := globEscape(l.keys.prefix) + ":{*}:w"
	var mu sync.Mutex
	var out []Alert
	scan := func(ctx context.Context, c *redis.Client) error {
		now, err := c.Time(ctx).Result()
		if err != nil {
			return err
		}
		cutoff := now.Add(-stale).UnixMilli()
		iter := c.Scan(ctx, 0, pattern, 1000).Iterator()
		for iter.Next(ctx) {
			key := iter.Val()
			org, ok := l.keys.orgOf(key, "w")
			if !ok {
				continue
			}
			fields, err := c.HGetAll(ctx, key).Result()
			if err != nil {
				return err
			}
			var took []any
			for f, body := range fields {
				id, ok := strings.CutPrefix(f, "p:")
				if !ok {
					continue
				}
				if since, err := strconv.ParseInt(fields["c:"+id], 10, 64); err == nil && since > cutoff {
					continue
				}
				took = append(took, "c:"+id, strconv.FormatInt(now.UnixMilli(), 10))
				mu.Lock()
				out = append(out, Alert{ID: id, Org: org, Body: []byte(body)})
				mu.Unlock()
			}
			if len(took) > 0 {
				if err := c.HSet(ctx, key, took...).Err(); err != nil {
					return err
				}
			}
		}
		return iter.Err()
	}
	if err := l.eachNode(ctx, scan); err != nil {
		return nil, fmt.Errorf("stale alerts: %w", err)
	}
	slices.SortFunc(out, func(a, b Alert) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}
