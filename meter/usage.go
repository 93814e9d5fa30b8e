package meter

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/creditsgw/caddy-credits/policy"
)

// MaxUsageDays is the most days one usage read covers: more than the 13
// months kept, and the month they end in.
const MaxUsageDays = 450

// UsageMonths is how many months before the current one the usage per day
// is kept: a day's usage goes once the first of the month 13 months later
// has passed, at the org's next new day of usage.
const UsageMonths = 13

// DayUsage is the credits an org used on one UTC day, per feature, net of
// refunds (a refund counts on the day of the charge it gives back).
type DayUsage struct {
	// Date is the day, YYYY-MM-DD.
	Date string `json:"date"`
	// Used is the credits per feature; empty on a day without usage.
	Used map[string]int64 `json:"used"`
}

// Usage returns org's usage per day from the UTC day of from to that of to,
// both included, one entry a day. It returns ErrNotFound when Redis holds
// nothing for the org.
func (l *Ledger) Usage(ctx context.Context, org string, from, to time.Time) ([]DayUsage, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return nil, err
	}
	from, to = utcDay(from), utcDay(to)
	if to.Before(from) {
		return nil, &policy.InputError{Field: "to", Value: to.Format(time.DateOnly), Reason: "must not be before from"}
	}
	days := int(to.Sub(from)/(24*time.Hour)) + 1
	if days > MaxUsageDays {
		return nil, &policy.InputError{Field: "to", Value: to.Format(time.DateOnly),
			Reason: fmt.Sprintf("must be at most %d days after from", MaxUsageDays-1)}
	}
	ctx, cancel := l.deadline(ctx)
	defer cancel()
	fields, err := l.rdb.HGetAll(ctx, l.keys.Account(org)).Result()
	if err != nil {
		return nil, fmt.Errorf("usage: %w", err)
	}
	if len(fields) == 0 {
		return nil, ErrNotFound
	}
	first, last := from.Format("20060102"), to.Format("20060102")
	byDay := make(map[string]map[string]int64)
	for f, v := range fields {
		// <yyyymmdd>:<feature>: the only fields that start with a digit.
		if len(f) < 10 || f[0] < '0' || f[0] > '9' || f[8] != ':' {
			continue
		}
		day, feature := f[:8], f[9:]
		if day < first || day > last {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("usage: field %s is not a number", f)
		}
		if n == 0 {
			continue
		}
		if byDay[day] == nil {
			byDay[day] = make(map[string]int64)
		}
		byDay[day][feature] = n
	}
	out := make([]DayUsage, 0, days)
	for d := from; !d.After(to); d = d.AddDate(0, 0, 1) {
		used := byDay[d.Format("20060102")]
		if used == nil {
			used = map[string]int64{}
		}
		out = append(out, DayUsage{Date: d.Format(time.DateOnly), Used: used})
	}
	return out, nil
}

// UsageFeatures is the features of usage, sorted: what a chart's series are.
func UsageFeatures(days []DayUsage) []string {
	seen := make(map[string]bool)
	for _, d := range days {
		for f := range d.Used {
			seen[f] = true
		}
	}
	out := make([]string, 0, len(seen))
	for f := range seen {
		out = append(out, f)
	}
	sort.Strings(out)
	return out
}

func utcDay(t time.Time) time.Time {
	y, m, d := t.UTC().Date()
	return time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
}
