package meter

import (
	"fmt"
	"time"
)

// Plan is an org's yearly bundle of credits.
type Plan struct {
	// Allowance is the number of credits granted at each recharge.
	Allowance int64 `json:"allowance"`
	// RechargeMonth is the month, 1 to 12, on whose first day (00:00 UTC)
	// the allowance recharges every year.
	RechargeMonth int `json:"recharge_month"`
	// Rollover is the most unused allowance carried into the next period,
	// as a rollover grant that expires at the recharge after; 0 to
	// Allowance.
	Rollover int64 `json:"rollover"`
}

// Account is an org's credits as the ledger holds them: the sums of its
// grants (see Grant).
type Account struct {
	// Org is the organization's id.
	Org string `json:"org"`
	// Balance is the org's credits: what its live grants have left, held
	// or not, what live holds keep of grants that have since ended, less
	// Debt.
	Balance int64 `json:"balance"`
	// Held is the credits live holds (gateways' leases included) set aside.
	Held int64 `json:"held"`
	// Available is Balance less Held: what a new charge or hold may take.
	Available int64 `json:"available"`
	// AllowanceRemaining is what is left of this period's allowance grant,
	// held or not, less Debt: below zero while the org is in debt.
	AllowanceRemaining int64 `json:"allowance_remaining"`
	// Purchased is what is left of the org's purchased grants, held or not.
	Purchased int64 `json:"purchased"`
	// Promotional is what is left of its live promotional grants, held or
	// not.
	Promotional int64 `json:"promotional"`
	// Rollover is what is left of its live rollover grant, held or not.
	Rollover int64 `json:"rollover"`
	// Debt is the overdraft no grant paid; the next credits granted repay
	// it first.
	Debt int64 `json:"debt"`
	// Plan is the plan of the current period.
	Plan Plan `json:"plan"`
	// NextPlan is a plan change that takes effect at the next recharge.
	NextPlan *Plan `json:"next_plan,omitempty"`
	// OwnPlan is false while the org is on the default plan.
	OwnPlan bool `json:"own_plan"`
	// PeriodStart is when the current period began.
	PeriodStart time.Time `json:"period_start"`
	// NextRecharge is when the allowance next recharges.
	NextRecharge time.Time `json:"next_recharge"`
	// NextExpiry is the earliest expiry of a live grant other than the
	// allowance, with what it will take away; nil when none expires.
	NextExpiry *Expiry `json:"next_expiry"`
	// Used is the credits spent per feature this period, net of refunds.
	Used map[string]int64 `json:"used"`

	// allowanceHeld and purchasedHeld are what live holds keep of the
	// allowance and of the standing purchased grant.
	allowanceHeld, purchasedHeld int64
}

// Expiry is when grants expire and what they take away then.
type Expiry struct {
	At     time.Time `json:"at"`
	Amount int64     `json:"amount"`
}

// Event is one change to an org's credits.
type Event struct {
	// ID is the event's number among the org's events.
	ID string `json:"id"`
	// Time is when the change happened, on the ledger's clock.
	Time time.Time `json:"time"`
	// Kind is grant, charge, settle, refund, topup, adjust, void, recharge,
	// plan, hold, capture, release or expire.
	Kind string `json:"kind"`
	// Delta is the change to the balance.
	Delta int64 `json:"delta"`
	// Balance is the balance after the change.
	Balance int64 `json:"balance"`
	// Feature is the feature charged, for charges, settles and refunds.
	Feature string `json:"feature,omitempty"`
	// Ref is the request id, top-up reference or plan of the change.
	Ref string `json:"ref,omitempty"`
	// Reason is an adjustment's reason.
	Reason string `json:"reason,omitempty"`
	// By is the name of the admin token whose call made the change; empty
	// for the gateway's own (charges, expiries, recharges that fell due).
	By string `json:"by,omitempty"`
}

// monthIndex numbers months from year 0: year*12 + month - 1.
func monthIndex(t time.Time) int64 {
	t = t.UTC()
	return int64(t.Year())*12 + int64(t.Month()) - 1
}

func monthStart(index int64) time.Time {
	return time.Date(int(index/12), time.Month(index%12+1), 1, 0, 0, 0, 0, time.UTC)
}

// accountFields is how many numbers start an account reply (lua/lib/
// account.lua's reply): rem, pur, a, m, pa, pm, own, ps, nx, ha, ho, hp, ro,
// pr, hq, the free and held credits of live promotional, rollover and
// purchased extra grants, the next expiry's time and amount; feature and
// used pairs follow.
const accountFields = 23

// parseAccount reads the account part of a script reply.
func parseAccount(org string, v []any) (Account, error) {
	if len(v) < accountFields || (len(v)-accountFields)%2 != 0 {
		return Account{}, fmt.Errorf("account reply has %d fields", len(v))
	}
	var n [accountFields]int64
	for i := range n {
		x, ok := v[i].(int64)
		if !ok {
			return Account{}, fmt.Errorf("account reply field %d is %T, not an integer", i, v[i])
		}
		n[i] = x
	}
	rem, pur := n[0], n[1]
	promoFree, promoHeld, rollFree, rollHeld, paidFree, paidHeld := n[15], n[16], n[17], n[18], n[19], n[20]
	held := n[9] + n[10] + n[11] + n[14] + promoHeld + rollHeld + paidHeld
	available := rem + pur + promoFree + rollFree + paidFree
	a := Account{
		Org:                org,
		Balance:            available + held,
		Held:               held,
		Available:          available,
		AllowanceRemaining: rem + n[9],
		Purchased:          pur + n[11] + paidFree + paidHeld,
		Promotional:        promoFree + promoHeld,
		Rollover:           rollFree + rollHeld,
		Debt:               max(-rem, 0),
		Plan:               Plan{Allowance: n[2], RechargeMonth: int(n[3]), Rollover: n[12]},
		OwnPlan:            n[6] == 1,
		PeriodStart:        time.Unix(n[7], 0).UTC(),
		NextRecharge:       monthStart(n[8]),
		Used:               make(map[string]int64, (len(v)-accountFields)/2),
		allowanceHeld:      n[9],
		purchasedHeld:      n[11],
	}
	if n[4] >= 0 {
		a.NextPlan = &Plan{Allowance: n[4], RechargeMonth: int(n[5]), Rollover: max(n[13], 0)}
	}
	if n[21] >= 0 {
		a.NextExpiry = &Expiry{At: time.UnixMilli(n[21]).UTC(), Amount: n[22]}
	}
	for i := accountFields; i < len(v); i += 2 {
		f, ok1 := v[i].(string)
		u, ok2 := v[i+1].(int64)
		if !ok1 || !ok2 {
			return Account{}, fmt.Errorf("account reply usage pair %d is %T, %T", (i-accountFields)/2, v[i], v[i+1])
		}
		a.Used[f] = u
	}
	return a, nil
}

// defaultAccount is what an org with no record would get from plan at now.
func defaultAccount(org string, plan Plan, now time.Time) Account {
	ym := monthIndex(now)
	start := ym - ((ym%12-int64(plan.RechargeMonth-1))%12+12)%12
	return Account{
		Org:                org,
		Balance:            plan.Allowance,
		Available:          plan.Allowance,
		AllowanceRemaining: plan.Allowance,
		Plan:               plan,
		PeriodStart:        monthStart(start),
		NextRecharge:       monthStart(start + 12),
		Used:               map[string]int64{},
	}
}
