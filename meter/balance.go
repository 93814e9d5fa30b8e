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
	r, err := l.call(ctx, "account", accountCall{org})
	if err != nil {
		return Account{}, err
	}
	if r.err != nil {
		return Account{}, r.err
	}
	acct, err := r.account(org)
	if err != nil {
		return Account{}, fmt.Errorf("account: %w", err)
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

// accountScript, lua/account.lua, reads an org's account, writing what fell
// due.
// KEYS: account, events, holds. No ARGV after the head.
// Reply: {code, account...}, or {NOT_FOUND}.
var accountScript = bind("account.lua", replyCodes{codeOK: nil, codeNotFound: ErrNotFound})

type accountCall struct{ org string }

func (accountCall) script() *luaScript { return accountScript }

func (c accountCall) keys(k Keys) []string {
	return []string{k.Account(c.org), k.Events(c.org), k.Holds(c.org)}
}

func (accountCall) args(*Ledger) []any { return nil }
