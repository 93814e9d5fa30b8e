package policy

import (
	"strconv"

	"github.com/creditsgw/caddy-credits/usage"
)

// MaxPrice is the most credits a price may ask per 1,000,000 tokens.
const MaxPrice = 1_000_000

// Price is what a model's tokens cost: credits per 1,000,000 input and
// output tokens, for models whose name matches the glob Model. In the glob,
// "*" matches any run of characters, "/" included, so "*" matches every
// model and "meta-llama/*" every model under meta-llama/.
type Price struct {
	// Model is a glob of model names, e.g. gpt-4o*, claude-3-5-* or
	// openai/*: * matches any run of characters, / included, ? one
	// character, [a-z] one of a class, [^a-z] one outside it, and \ quotes
	// the character after it.
	Model string `json:"model"`
	// In is the credits per 1,000,000 input tokens.
	In int64 `json:"in"`
	// Out is the credits per 1,000,000 output tokens.
	Out int64 `json:"out"`
}

// Validate checks the price's glob and amounts.
func (p Price) Validate() error {
	if p.Model == "" {
		return &InputError{Field: "price model", Value: p.Model, Reason: "must be a model name or glob"}
	}
	if !globOK(p.Model) {
		return &InputError{Field: "price model", Value: p.Model, Reason: "must be a glob: * any run of characters, ? one, [a-z] one of a class, \\ quotes the next"}
	}
	for _, n := range []int64{p.In, p.Out} {
		if n < 0 || n > MaxPrice {
			return &InputError{Field: "price", Value: strconv.FormatInt(n, 10), Reason: "must be 0 to " + strconv.Itoa(MaxPrice) + " credits per 1,000,000 tokens"}
		}
	}
	return nil
}

// maxTokens bounds the tokens counted, so that a price times them stays an
// exact integer.
const maxTokens = 1_000_000_000_000

// PriceOf returns the credits the tokens cost at the first price whose glob
// matches model: ceil((input*in + output*out) / 1,000,000), at most
// MaxCost. ok is false when no price matches.
func PriceOf(prices []Price, model string, t usage.Tokens) (credits int64, ok bool) {
	for _, p := range prices {
		if !matchGlob(p.Model, model) {
			continue
		}
		// Split to stay exact: tokens up to 10^12 times prices up to 10^6.
		in, out := min(t.Input, maxTokens), min(t.Output, maxTokens)
		whole := (in/1_000_000)*p.In + (out/1_000_000)*p.Out
		rest := (in%1_000_000)*p.In + (out%1_000_000)*p.Out
		credits = whole + (rest+999_999)/1_000_000
		return min(credits, MaxCost), true
	}
	return 0, false
}
