package meter

import (
	"context"
	"errors"
	"fmt"

	"github.com/creditsgw/caddy-credits/policy"
)

// Account reads org's account, with any recharge that fell due applied. It
// returns ErrNotFound when Redis holds nothing for the org.
func (l *Ledger) Account(ctx context.Context, org string) (Account, error) {
	if err := policy.ValidateOrg(org); err != nil {
		return Account{}, err
	}
	keys := []string{l.keys.Account(org), l.keys.Events(org), l.keys.Holds(org)}
	code, acct, err := l.runAccount(ctx, accountScript, org, keys)
	if err != nil {
		return Account{}, fmt.Errorf("account: %w", err)
	}
	if code == codeNotFound {
		return Account{}, ErrNotFound
	}
	return acct, nil
}

// Balance is Account, but for an org with no record it answers what the
// default plan would give, writing nothing.
func (l *Ledger) Balance(ctx context.Context, org string) (Account, error) {
	acct, err := l.Account(ctx, org)
	if errors.Is(err, ErrNotFound) {
		return defaultAccount(org, l.defaultPlan, l.now()), nil
	}
	return acct, err
}
