package policy

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strconv"
	"time"
)

// ContentTypeProblem is the media type of a problem details body (RFC 9457).
const ContentTypeProblem = "application/problem+json"

// Problem types: stable URIs that identify each kind of problem the gateway
// answers. Clients may switch on them; they never change.
const (
	// TypeInsufficientCredits identifies a 402: the credits cannot pay for
	// the call.
	TypeInsufficientCredits = "https://creditsgw.dev/problems/insufficient-credits"
	// TypeBudgetSpent identifies a 402: the caller's budget in the org
	// cannot pay for the call.
	TypeBudgetSpent = "https://creditsgw.dev/problems/budget-spent"
	// TypeSubjectMissing identifies a 401: a route with a budget found no
	// subject in the request.
	TypeSubjectMissing = "https://creditsgw.dev/problems/budget-subject-missing"
	// TypeOrgMissing identifies a 401: the request names no organization.
	TypeOrgMissing = "https://creditsgw.dev/problems/org-missing"
	// TypeInvalidInput identifies a 400: an org id, cost or other input is
	// invalid.
	TypeInvalidInput = "https://creditsgw.dev/problems/invalid-input"
	// TypeStoreUnavailable identifies a 503: the credit store did not answer
	// in time.
	TypeStoreUnavailable = "https://creditsgw.dev/problems/store-unavailable"
	// TypeKeyInFlight is the type of the 409 of a call whose
	// Idempotency-Key's first call is in flight.
	TypeKeyInFlight = "https://creditsgw.dev/problems/idempotency-key-in-flight"
	// TypeKeyNotKept is the type of the 409 of a call whose
	// Idempotency-Key's first call's response was too large to keep.
	TypeKeyNotKept = "https://creditsgw.dev/problems/idempotency-response-not-kept"
	// TypeKeyMismatch is the type of the 422 of a call whose
	// Idempotency-Key an earlier, different call used.
	TypeKeyMismatch = "https://creditsgw.dev/problems/idempotency-key-mismatch"
)

// Problem is an RFC 9457 problem details body.
type Problem struct {
	// Type is a URI that identifies the kind of problem, one of the Type
	// constants.
	Type string `json:"type"`
	// Title is a short summary of the kind of problem, the same for every
	// problem of a Type.
	Title string `json:"title"`
	// Status is the HTTP status code of the response.
	Status int `json:"status"`
	// Detail explains this occurrence of the problem; for insufficient
	// credits a UI can show it to an end user as is.
	Detail string `json:"detail"`
	// Org is the organization the call was for, if known.
	Org string `json:"org,omitempty"`
	// Feature is the usage label of the route, if known.
	Feature string `json:"feature,omitempty"`
	// Balance is the organization's current balance; a refusal always has it.
	Balance *int64 `json:"balance,omitempty"`
	// Cost is the credits the call needed; a refusal always has it.
	Cost *int64 `json:"cost,omitempty"`
	// TopUpURL is where the organization adds credits; omitted when none is
	// configured.
	TopUpURL string `json:"topup_url,omitempty"`
	// Subject, Limit, Spent and Resets describe the budget that refused
	// the call, for a budget-spent problem only.
	Subject string     `json:"subject,omitempty"`
	Limit   *int64     `json:"limit,omitempty"`
	Spent   *int64     `json:"spent,omitempty"`
	Resets  *time.Time `json:"resets,omitempty"`
}

// JSON returns the problem's body: compact JSON, with the fields in the
// order of the Problem type and a trailing newline. The same problem always
// yields the same bytes.
func (p *Problem) JSON() []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	// A top-up URL keeps its '&' readable; the body is never embedded in HTML.
	enc.SetEscapeHTML(false)
	if err := enc.Encode(p); err != nil {
		// Strings, ints and pointers to ints always encode; this is a
		// guard, not a path the gateway takes.
		return []byte(`{"type":"about:blank","title":"Internal Server Error","status":500,"detail":""}` + "\n")
	}
	return buf.Bytes()
}

// Insufficient returns the 402 problem of a call that the credits of org
// cannot pay for on route r. Its detail is a sentence a UI can show to an
// end user, and mentions the route's top-up URL when there is one.
func Insufficient(r Route, org string, balance, cost int64) *Problem {
	return &Problem{
		Type:     TypeInsufficientCredits,
		Title:    "Insufficient credits",
		Status:   http.StatusPaymentRequired,
		Detail:   insufficientDetail(balance, cost, r.TopUpURL),
		Org:      org,
		Feature:  r.Feature,
		Balance:  &balance,
		Cost:     &cost,
		TopUpURL: r.TopUpURL,
	}
}

// insufficientDetail words the detail of an insufficient-credits problem.
func insufficientDetail(balance, cost int64, topUpURL string) string {
	var s string
	if balance >= 0 {
		s = "Your organization has " + credits(balance) + " left; this action needs " + strconv.FormatInt(cost, 10) + "."
	} else {
		// Only an overdraft route past its limit refuses with a negative
		// balance.
		s = "Your organization has no credits left and is " + credits(-balance) +
			" overdrawn; this action needs " + strconv.FormatInt(cost, 10) + "."
	}
	if topUpURL != "" {
		return s + " Add credits at " + topUpURL + " to continue."
	}
	return s + " Add credits to continue."
}

// credits words n credits, e.g. "1 credit" or "0 credits".
func credits(n int64) string {
	if n == 1 {
		return "1 credit"
	}
	return strconv.FormatInt(n, 10) + " credits"
}

// BudgetSpent returns the 402 problem of a call that the caller's budget b
// cannot pay for on route r. Its detail is a sentence a UI can show.
func BudgetSpent(r Route, org string, cost, balance int64, b Budget) *Problem {
	left := b.Remaining()
	resets := b.Resets.UTC()
	return &Problem{
		Type:   TypeBudgetSpent,
		Title:  "Budget spent",
		Status: http.StatusPaymentRequired,
		Detail: "Your budget has " + credits(left) + " left until " + resets.Format(time.RFC3339) +
			"; this action needs " + strconv.FormatInt(cost, 10) + ".",
		Org:     org,
		Feature: r.Feature,
		Balance: &balance,
		Cost:    &cost,
		Subject: b.Subject,
		Limit:   &b.Limit,
		Spent:   &b.Spent,
		Resets:  &resets,
	}
}

// SubjectMissing returns the 401 problem of a call on a route with a
// budget whose request names no subject.
func SubjectMissing() *Problem {
	return &Problem{
		Type:   TypeSubjectMissing,
		Title:  "Budget subject missing",
		Status: http.StatusUnauthorized,
		Detail: "The request does not say whose budget it counts against.",
	}
}

// OrgMissing returns the 401 problem of a request that names no organization.
func OrgMissing() *Problem {
	return &Problem{
		Type:   TypeOrgMissing,
		Title:  "Organization missing",
		Status: http.StatusUnauthorized,
		Detail: "The request does not say which organization it is for.",
	}
}

// Invalid returns the 400 problem of a request with invalid input; its
// detail is err's message, e.g. one of an *InputError (empty if err is nil).
func Invalid(err error) *Problem {
	p := &Problem{
		Type:   TypeInvalidInput,
		Title:  "Invalid input",
		Status: http.StatusBadRequest,
	}
	if err != nil {
		p.Detail = err.Error()
	}
	return p
}

// Unavailable returns the 503 problem of a call that the credit store could
// not answer in time, under fail_mode closed.
func Unavailable() *Problem {
	return &Problem{
		Type:   TypeStoreUnavailable,
		Title:  "Credit store unavailable",
		Status: http.StatusServiceUnavailable,
		Detail: "The credit balance could not be checked just now; try again shortly.",
	}
}

// Status returns a problem that is no more than its HTTP status: type
// about:blank and the status text as title (RFC 9457, section 4.2.1), such
// as a 404 or 405 of the admin API.
func Status(status int, detail string) *Problem {
	return &Problem{Type: "about:blank", Title: http.StatusText(status), Status: status, Detail: detail}
}
