package meter

import (
	"fmt"
	"strings"
)

// DefaultPrefix is the key prefix used when none is configured.
const DefaultPrefix = "credits"

// Keys builds every Redis key the ledger uses. Each key carries the org in a
// hash tag, {org}, so all of an org's keys live in one Redis Cluster slot and
// one script can touch them all.
type Keys struct {
	prefix string
}

// NewKeys returns the key builder for prefix. The prefix must be 1 to 64
// printable ASCII characters without braces, so that the org's hash tag is
// the first one in every key.
func NewKeys(prefix string) (Keys, error) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if len(prefix) > 64 {
		return Keys{}, fmt.Errorf("key prefix %.70q: longer than 64 characters", prefix)
	}
	for i := 0; i < len(prefix); i++ {
		c := prefix[i]
		if c <= ' ' || c > '~' || c == '{' || c == '}' {
			return Keys{}, fmt.Errorf("key prefix %q: only printable ASCII without spaces or braces", prefix)
		}
	}
	return Keys{prefix: prefix}, nil
}

func (k Keys) key(org, kind string) string {
	var b strings.Builder
	b.Grow(len(k.prefix) + len(org) + len(kind) + 4)
	b.WriteString(k.prefix)
	b.WriteString(":{")
	b.WriteString(org)
	b.WriteString("}:")
	b.WriteString(kind)
	return b.String()
}

// Account is the hash holding the org's plan, balances and usage.
func (k Keys) Account(org string) string { return k.key(org, "a") }

// Events is the org's capped list of account events, newest first: what
// operators and recharges change. It is kept.
func (k Keys) Events(org string) string { return k.key(org, "e") }

// Calls is the org's capped list of call events, newest first: what calls,
// their settles and refunds, and gateways' leases change. It expires a
// marker's lifetime after the org's last call; the usage per day stays in
// the account.
func (k Keys) Calls(org string) string { return k.key(org, "c") }

// TopUps is the sorted set of the references of writes applied to the org
// (top-ups, adjustments, plans, recharges, and the voids of the gateway's
// own), each scored by when it may be forgotten. Each kind but top-ups
// keeps its references apart with a prefix of its own.
func (k Keys) TopUps(org string) string { return k.key(org, "t") }

// Images is the account as a write of the gateway's own reference found it
// and left it, kept for a while so that the write's void can undo it.
func (k Keys) Images(org, reference string) string { return k.key(org, "i:"+reference) }

// Holds is the hash of the org's holds, gateways' leases included.
func (k Keys) Holds(org string) string { return k.key(org, "h") }

// Kept is the response kept for a request with an Idempotency-Key, served
// to its retries.
func (k Keys) Kept(org, requestID string) string { return k.key(org, "k:"+requestID) }

// Request is the marker of one charged request, kept MarkerTTL (KeyTTL once
// a call with a key has completed), that makes a repeated charge or settle
// with the same request id a no-op.
func (k Keys) Request(org, requestID string) string { return k.key(org, "r:"+requestID) }

// GrantRefs is the hash of the references and reasons of the org's
// grants, by grant number: apart from the account, so that its fields stay
// short whatever they say.
func (k Keys) GrantRefs(org string) string { return k.key(org, "g") }

// Budgets is the hash of the org's budgets: the default budget, each
// subject's own, and what each subject spent in its window.
func (k Keys) Budgets(org string) string { return k.key(org, "b") }

// BudgetIndex is the sorted set of the subjects with a budget of their own,
// which pages them in order.
func (k Keys) BudgetIndex(org string) string { return k.key(org, "bi") }

// Alerts is the hash of the org's balance alerts: the balance at the last
// check, and the alerts recorded and not yet delivered.
func (k Keys) Alerts(org string) string { return k.key(org, "w") }
