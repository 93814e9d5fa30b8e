package policy

import (
	"errors"
	"strconv"
	"strings"

	"github.com/creditsgw/caddy-credits/usage"
)

// UsageHeader is the usage setting of a route whose real cost is the
// upstream's Credits-Usage header or trailer.
const UsageHeader = "header"

// HasPlaceholder reports whether a setting holds a placeholder, such as
// {http.request.header.X-Org-Id}: its value is known only per request (or
// at load, for {env.*}), so it is checked then.
func HasPlaceholder(s string) bool {
	return strings.IndexByte(s, '{') >= 0
}

var errFeatureMissing = errors.New("feature is required")

// MaxAmount is the largest overdraft limit or low-balance threshold.
const MaxAmount = 1_000_000_000_000

// RouteSettings are a metered route's settings as configured, in the
// Caddyfile or its JSON, before they are checked.
type RouteSettings struct {
	// Feature is the usage label; required.
	Feature string
	// Cost is the cost of a call: empty for 1, an integer from MinCost to
	// MaxCost, or text with a placeholder, resolved per request.
	Cost string
	// OnExhausted is block, notice or overdraft; empty for block.
	OnExhausted string
	// OverdraftLimit, for overdraft routes only, is the deepest the balance
	// may go; nil for no limit.
	OverdraftLimit *int64
	// LowBalance, for notice routes only, warns while the balance is below
	// it; 0 never warns.
	LowBalance int64
	// FailMode is open or closed; empty for closed, open on overdraft
	// routes.
	FailMode string
	// TopUpURL goes into refusals' problem bodies.
	TopUpURL string
	// Usage is header, or the name of a usage.Format (openai,
	// anthropic); empty for header.
	Usage string
	// Prices price the tokens of a route whose usage is openai or
	// anthropic; the first whose glob matches the model wins.
	Prices []Price
}

// NewRoute checks a route's settings against each other and returns the
// route. Its errors are *InputError, naming the setting at fault, so the
// Caddyfile parser can point at its line; Provision reports the same.
func NewRoute(s RouteSettings) (Route, error) {
	if s.Feature == "" {
		return Route{}, errFeatureMissing
	}
	if err := ValidateFeature(s.Feature); err != nil {
		return Route{}, err
	}
	r := Route{Feature: s.Feature, Mode: Block, OverdraftLimit: -1, LowBalance: s.LowBalance, TopUpURL: s.TopUpURL, Cost: 1}
	if s.OnExhausted != "" {
		m, err := ParseMode(s.OnExhausted)
		if err != nil {
			return Route{}, &InputError{Field: "on_exhausted", Value: s.OnExhausted, Reason: modeReason}
		}
		r.Mode = m
	}
	switch {
	case s.Cost == "":
	case HasPlaceholder(s.Cost):
		r.Cost = 0 // resolved per request
	default:
		n, err := ParseCost(s.Cost)
		if err != nil {
			return Route{}, err
		}
		r.Cost = n
	}
	if s.OverdraftLimit != nil {
		if r.Mode != Overdraft {
			return Route{}, &InputError{Field: "overdraft_limit", Value: strconv.FormatInt(*s.OverdraftLimit, 10),
				Reason: "needs on_exhausted overdraft; this route is " + r.Mode.String()}
		}
		if *s.OverdraftLimit < 0 || *s.OverdraftLimit > MaxAmount {
			return Route{}, RangeError("overdraft_limit", strconv.FormatInt(*s.OverdraftLimit, 10), 0, MaxAmount)
		}
		r.OverdraftLimit = *s.OverdraftLimit
	}
	if s.LowBalance != 0 {
		if r.Mode != Notice {
			return Route{}, &InputError{Field: "low_balance", Value: strconv.FormatInt(s.LowBalance, 10),
				Reason: "needs on_exhausted notice; this route is " + r.Mode.String()}
		}
		if s.LowBalance < 1 || s.LowBalance > MaxAmount {
			return Route{}, RangeError("low_balance", strconv.FormatInt(s.LowBalance, 10), 1, MaxAmount)
		}
	}
	if s.Usage != "" && s.Usage != UsageHeader {
		f, ok := usage.Lookup(s.Usage)
		if !ok {
			return Route{}, &InputError{Field: "usage", Value: s.Usage, Reason: "must be " + UsageHeader + ", " + usage.Names()}
		}
		r.Usage = f
	}
	if len(s.Prices) > 0 && r.Usage == nil {
		return Route{}, &InputError{Field: "price", Value: s.Prices[0].Model, Reason: "needs usage " + usage.Names()}
	}
	for _, p := range s.Prices {
		if err := p.Validate(); err != nil {
			return Route{}, err
		}
	}
	r.Prices = s.Prices
	switch s.FailMode {
	case "":
		r.FailOpen = r.Mode == Overdraft
	case "open":
		r.FailOpen = true
	case "closed":
	default:
		return Route{}, &InputError{Field: "fail_mode", Value: s.FailMode, Reason: "must be open or closed"}
	}
	return r, nil
}
