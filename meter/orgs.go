package meter

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/redis/go-redis/v9"

	"github.com/creditsgw/caddy-credits/policy"
)

// MaxOrgsPage is the most orgs one page of Orgs lists.
const MaxOrgsPage = 1000

// OrgBalance is one org of a listing.
type OrgBalance struct {
	Org     string `json:"org"`
	Balance int64  `json:"balance"`
}

// Orgs lists the orgs Redis holds an account for, in byte order of their
// ids, from the first after `after` ("" for the start), at most limit of
// them (1..MaxOrgsPage), with their balances. next is the last org listed
// when more follow, else "". Every page scans the keyspace of every node
// (every Cluster master), so a page costs a pass over the keys: it is for
// billing systems and operators, not for the request path.
func (l *Ledger) Orgs(ctx context.Context, after string, limit int) (orgs []OrgBalance, next string, err error) {
	if after != "" {
		if err := policy.ValidateOrg(after); err != nil {
			return nil, "", err
		}
	}
	if limit < 1 || limit > MaxOrgsPage {
		return nil, "", &policy.InputError{Field: "limit", Value: fmt.Sprint(limit), Reason: fmt.Sprintf("must be 1 to %d", MaxOrgsPage)}
	}
	// The scan runs to the caller's deadline, not to the ledger's timeout
	// of one call; each balance is one call.
	pattern := globEscape(l.keys.prefix) + ":{*}:a"
	var mu sync.Mutex
	var ids []string // the smallest limit+1 ids after `after`
	scan := func(ctx context.Context, c *redis.Client) error {
		iter := c.Scan(ctx, 0, pattern, 1000).Iterator()
		for iter.Next(ctx) {
			org, ok := l.keys.orgOf(iter.Val(), "a")
			if !ok || org <= after || policy.ValidateOrg(org) != nil {
				continue
			}
			mu.Lock()
			ids = append(ids, org)
			if len(ids) > 4*(limit+1) {
				slices.Sort(ids)
				ids = slices.Compact(ids)
				ids = ids[:min(len(ids), limit+1)]
			}
			mu.Unlock()
		}
		return iter.Err()
	}
	if err := l.eachNode(ctx, scan); err != nil {
		return nil, "", fmt.Errorf("orgs: %w", err)
	}
	slices.Sort(ids)
	ids = slices.Compact(ids)
	if len(ids) > limit {
		ids, next = ids[:limit], ids[limit-1]
	}
	orgs = make([]OrgBalance, 0, len(ids))
	for _, org := range ids {
		acct, err := l.Account(ctx, org)
		if errors.Is(err, ErrNotFound) {
			continue // gone since the scan
		}
		if err != nil {
			return nil, "", err
		}
		orgs = append(orgs, OrgBalance{Org: org, Balance: acct.Balance})
	}
	return orgs, next, nil
}

// eachNode runs scan on the one Redis, or on every Cluster master: what a
// scan of the keyspace needs.
func (l *Ledger) eachNode(ctx context.Context, scan func(context.Context, *redis.Client) error) error {
	switch c := l.rdb.(type) {
	case *redis.ClusterClient:
		return c.ForEachMaster(ctx, scan)
	case *redis.Client:
		return scan(ctx, c)
	}
	return errors.New("cannot scan the keys of this kind of Redis client")
}

// orgOf returns the org of key, one of the org's keys of kind.
func (k Keys) orgOf(key, kind string) (string, bool) {
	rest, ok := strings.CutPrefix(key, k.prefix+":{")
	if !ok {
		return "", false
	}
	return strings.CutSuffix(rest, "}:"+kind)
}

// globEscape quotes the characters SCAN's MATCH reads as a pattern.
func globEscape(s string) string {
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune(`*?[]\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}
