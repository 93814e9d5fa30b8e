// Package policy holds the gateway's pure decisions: which input is valid,
// whether a call goes upstream, which status and Credits headers it answers,
// and which problem details body a refusal carries.
//
// Nothing here does I/O. The Caddy handler asks the ledger for a charge,
// hands the ledger's Answer to Decide, and writes what the Decision says.
package policy

import "strings"

// Header names the gateway sets on responses. Clients never set them: the
// handler removes any Credits-* header from a request before it goes upstream.
const (
	// HeaderRemaining carries the organization's balance after the call.
	HeaderRemaining = "Credits-Remaining"
	// HeaderCharged carries the credits this call was charged.
	HeaderCharged = "Credits-Charged"
	// HeaderNotice carries "low", "exhausted" or "budget", and only on
	// notice routes.
	HeaderNotice = "Credits-Notice"
	// HeaderBudgetRemaining carries what the caller's budget has left in
	// its window, on every call of a route with a budget that applies.
	HeaderBudgetRemaining = "Credits-Budget-Remaining"
	// HeaderUsage is set by an upstream to settle the call to the credits it
	// really used; the handler removes it before the response goes out.
	HeaderUsage = "Credits-Usage"
)

// ExposeHeaders is the value of Access-Control-Expose-Headers on a response
// to a request with an Origin, so that a browser frontend can read the
// Credits headers, the hold of a call settled after its body included.
const ExposeHeaders = HeaderRemaining + ", " + HeaderCharged + ", " + HeaderNotice + ", " + HeaderHold + ", " +
	HeaderBudgetRemaining

// creditsPrefix is the prefix every Credits header shares.
const creditsPrefix = "Credits-"

// IsCreditsHeader reports whether name is a Credits-* header, in any letter
// case. A client's Credits headers are never trusted nor passed upstream.
func IsCreditsHeader(name string) bool {
	return len(name) >= len(creditsPrefix) && strings.EqualFold(name[:len(creditsPrefix)], creditsPrefix)
}
