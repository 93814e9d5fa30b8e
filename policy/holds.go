package policy

import (
	"net/http"
	"strconv"
)

// HoldShort returns the 402 problem of a hold of amount credits that the
// available balance of org cannot cover. Balance is the org's balance, and
// Cost the amount asked for; the detail says how much of the balance is
// available, as credits that other holds keep cannot be held again.
func HoldShort(org, feature string, balance, available, amount int64, topUpURL string) *Problem {
	detail := "Organization " + org + " has " + credits(max(available, 0)) + " available (balance " +
		strconv.FormatInt(balance, 10) + ", held " + strconv.FormatInt(balance-available, 10) +
		"); the hold needs " + strconv.FormatInt(amount, 10) + "."
	if topUpURL != "" {
		detail += " Add credits at " + topUpURL + " to continue."
	} else {
		detail += " Add credits to continue."
	}
	return &Problem{
		Type:     TypeInsufficientCredits,
		Title:    "Insufficient credits",
		Status:   http.StatusPaymentRequired,
		Detail:   detail,
		Org:      org,
		Feature:  feature,
		Balance:  &balance,
		Cost:     &amount,
		TopUpURL: topUpURL,
	}
}
