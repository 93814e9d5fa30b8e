package policy_test

import (
	"fmt"

	"github.com/creditsgw/caddy-credits/policy"
	"github.com/creditsgw/caddy-credits/usage"
)

// A call that the credits pay for goes upstream; the response tells the
// client what is left and what the call cost.
func ExampleDecide() {
	route := policy.Route{Feature: "background-removal", Mode: policy.Block}
	d := policy.Decide(route, "acme", policy.Answer{Charged: true, Balance: 41, Cost: 1})
	fmt.Println("outcome:", d.Outcome, "forward:", d.Forward)
	fmt.Println(policy.HeaderRemaining+":", d.Remaining)
	fmt.Println(policy.HeaderCharged+":", d.Charged)
	// Output:
	// outcome: forwarded forward: true
	// Credits-Remaining: 41
	// Credits-Charged: 1
}

// On a block route, a call the credits cannot pay for is refused with a 402
// problem, and the upstream is not called.
func ExampleDecide_block() {
	route := policy.Route{Feature: "background-removal", Mode: policy.Block, TopUpURL: "https://example.com/topup"}
	d := policy.Decide(route, "acme", policy.Answer{Charged: false, Balance: 0, Cost: 1})
	fmt.Println("outcome:", d.Outcome, "forward:", d.Forward, "status:", d.Status)
	fmt.Println(policy.HeaderRemaining+":", d.Remaining)
	fmt.Print(string(d.Problem.JSON()))
	// Output:
	// outcome: blocked forward: false status: 402
	// Credits-Remaining: 0
	// {"type":"https://creditsgw.dev/problems/insufficient-credits","title":"Insufficient credits","status":402,"detail":"Your organization has 0 credits left; this action needs 1. Add credits at https://example.com/topup to continue.","org":"acme","feature":"background-removal","balance":0,"cost":1,"topup_url":"https://example.com/topup"}
}

// On a notice route, a refusal also carries Credits-Notice: exhausted, so
// that the UI shows the problem's detail as an upgrade notice.
func ExampleDecide_notice() {
	route := policy.Route{Feature: "rich-text", Mode: policy.Notice, LowBalance: 10}
	d := policy.Decide(route, "acme", policy.Answer{Charged: false, Balance: 0, Cost: 1})
	fmt.Println("outcome:", d.Outcome, "forward:", d.Forward, "status:", d.Status)
	fmt.Println(policy.HeaderNotice+":", d.Notice)
	fmt.Println("detail:", d.Problem.Detail)
	// Output:
	// outcome: notice forward: false status: 402
	// Credits-Notice: exhausted
	// detail: Your organization has 0 credits left; this action needs 1. Add credits to continue.
}

// On a notice route with low_balance, a call that leaves the balance below
// it goes upstream with a warning.
func ExampleDecide_lowBalance() {
	route := policy.Route{Feature: "rich-text", Mode: policy.Notice, LowBalance: 10}
	for _, balance := range []int64{10, 9} {
		d := policy.Decide(route, "acme", policy.Answer{Charged: true, Balance: balance, Cost: 1})
		fmt.Printf("balance after %d: %s, forward: %v, %s: %q\n", balance, d.Outcome, d.Forward, policy.HeaderNotice, d.Notice)
	}
	// Output:
	// balance after 10: forwarded, forward: true, Credits-Notice: ""
	// balance after 9: low, forward: true, Credits-Notice: "low"
}

// An overdraft route forwards calls that take the balance below zero, and
// never sets Credits-Notice. Past its overdraft_limit (the ledger does not
// charge), it refuses as a block route does.
func ExampleDecide_overdraft() {
	route := policy.Route{Feature: "flows", Mode: policy.Overdraft, OverdraftLimit: 500}
	answers := []policy.Answer{
		{Charged: true, Balance: 2, Cost: 3},
		{Charged: true, Balance: -1, Cost: 3},
		{Charged: false, Balance: -499, Cost: 3},
	}
	for _, a := range answers {
		d := policy.Decide(route, "acme", a)
		fmt.Printf("%-9s forward=%-5v status=%d remaining=%d charged=%d notice=%q\n",
			d.Outcome, d.Forward, d.Status, d.Remaining, d.Charged, d.Notice)
	}
	// Output:
	// forwarded forward=true  status=0 remaining=2 charged=3 notice=""
	// overdraft forward=true  status=0 remaining=-1 charged=3 notice=""
	// blocked   forward=false status=402 remaining=-499 charged=0 notice=""
}

// A retried call with an Idempotency-Key that was charged before goes
// upstream again but is not charged again.
func ExampleDecide_replay() {
	route := policy.Route{Feature: "alt-text", Mode: policy.Notice}
	d := policy.Decide(route, "acme", policy.Answer{Charged: true, Replay: true, Balance: 40, Cost: 1})
	fmt.Println("outcome:", d.Outcome, "forward:", d.Forward)
	fmt.Println(policy.HeaderRemaining+":", d.Remaining)
	fmt.Println(policy.HeaderCharged+":", d.Charged)
	// Output:
	// outcome: forwarded forward: true
	// Credits-Remaining: 40
	// Credits-Charged: 0
}

func ExampleValidateOrg() {
	for _, org := range []string{"acme", "Acme-Corp_1.x", "", "{acme}", "-lead"} {
		if err := policy.ValidateOrg(org); err != nil {
			fmt.Printf("%q: %v\n", org, err)
			continue
		}
		fmt.Printf("%q: ok\n", org)
	}
	// Output:
	// "acme": ok
	// "Acme-Corp_1.x": ok
	// "": org missing
	// "{acme}": invalid org "{acme}": must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$
	// "-lead": invalid org "-lead": must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$
}

func ExampleParseCost() {
	for _, s := range []string{"1", "1000000", "0", "+1", ""} {
		n, err := policy.ParseCost(s)
		fmt.Println(n, err)
	}
	// Output:
	// 1 <nil>
	// 1000000 <nil>
	// 0 invalid cost "0": must be an integer from 1 to 1000000
	// 0 invalid cost "+1": must be an integer from 1 to 1000000
	// 0 invalid cost "": must be an integer from 1 to 1000000
}

// The helpers build the other problems that the gateway answers itself.
func ExampleProblem_JSON() {
	fmt.Print(string(policy.OrgMissing().JSON()))
	fmt.Print(string(policy.Invalid(policy.ValidateIdempotencyKey("has space")).JSON()))
	fmt.Print(string(policy.Unavailable().JSON()))
	// Output:
	// {"type":"https://creditsgw.dev/problems/org-missing","title":"Organization missing","status":401,"detail":"The request does not say which organization it is for."}
	// {"type":"https://creditsgw.dev/problems/invalid-input","title":"Invalid input","status":400,"detail":"invalid idempotency key \"has space\": must be 1 to 255 printable ASCII characters without spaces"}
	// {"type":"https://creditsgw.dev/problems/store-unavailable","title":"Credit store unavailable","status":503,"detail":"The credit balance could not be checked just now; try again shortly."}
}

// A token-priced route charges the price of the first glob that matches
// the model. A * crosses the slash that OpenRouter's, vLLM's and Together's
// model names hold.
func ExamplePriceOf() {
	prices := []policy.Price{
		{Model: "gpt-4o*", In: 2500, Out: 10000},
		{Model: "meta-llama/*", In: 500, Out: 1000},
		{Model: "*", In: 1000, Out: 4000},
	}
	used := usage.Tokens{Input: 1000, Output: 2000, Seen: true}
	for _, model := range []string{"gpt-4o-mini-2024-07-18", "meta-llama/Llama-3-70b", "openai/gpt-4o"} {
		credits, _ := policy.PriceOf(prices, model, used)
		fmt.Println(model+":", credits)
	}
	// Output:
	// gpt-4o-mini-2024-07-18: 23
	// meta-llama/Llama-3-70b: 3
	// openai/gpt-4o: 9
}
