package caddymodule

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

func init() {
	caddy.RegisterModule(Admin{})
}

// Admin serves the admin API, for a billing system or an operator: read an
// org's account and events, set its plan, top it up, recharge it. Mount it
// with handle_path <prefix>/* on an address only admins reach.
type Admin struct {
	// Token, if set, is required of every call as Authorization: Bearer
	// <token>. Placeholders such as {env.CREDITS_ADMIN_TOKEN} are replaced
	// when the config loads.
	Token string `json:"token,omitempty"`

	app       *App
	tokenHash [32]byte
	logger    *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Admin) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.credits_admin",
		New: func() caddy.Module { return new(Admin) },
	}
}

// Provision finds the credits app and resolves the token.
func (a *Admin) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if a.Token != "" {
		token := caddy.NewReplacer().ReplaceKnown(a.Token, "")
		if token == "" {
			return errors.New("credits_admin: token is empty once its placeholders are replaced")
		}
		a.tokenHash = sha256.Sum256([]byte(token))
	}
	var err error
	a.app, err = appFrom(ctx)
	return err
}

// Limits of an admin call.
const (
	maxAdminBody   = 64 << 10
	maxAdminHeader = 16 << 10
	maxEvents      = 1000
	// defaultEvents is how many events GET .../events answers without a limit.
	defaultEvents = 50
)

// ServeHTTP routes an admin call.
func (a *Admin) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	// The usage console's page holds no data: it needs no token (console.go).
	if serveConsole(w, r) {
		return nil
	}
	if headerBytes(r.Header) > maxAdminHeader {
		return writeProblem(w, r, policy.Status(http.StatusRequestHeaderFieldsTooLarge, fmt.Sprintf("request headers larger than %d bytes", maxAdminHeader)))
	}
	if a.Token != "" && !a.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="credits"`)
		return writeProblem(w, r, policy.Status(http.StatusUnauthorized, "a valid Authorization: Bearer token is required"))
	}
	org, action, ok := splitAdminPath(r.URL.Path)
	if !ok {
		return writeProblem(w, r, policy.Status(http.StatusNotFound, "no admin call at "+r.URL.Path))
	}
	allow := map[string]string{"": "GET, HEAD", "plan": "PUT", "topup": "POST", "recharge": "POST", "events": "GET, HEAD"}[action]
	if allow == "" {
		return writeProblem(w, r, policy.Status(http.StatusNotFound, "no admin call at "+r.URL.Path))
	}
	if !strings.Contains(allow, r.Method) {
		w.Header().Set("Allow", allow)
		return writeProblem(w, r, methodNotAllowed(r.Method))
	}
	if err := policy.ValidateOrg(org); err != nil {
		return writeProblem(w, r, policy.Invalid(err))
	}

	ctx := r.Context()
	var (
		out any
		err error
	)
	switch action {
	case "":
		out, err = a.app.ledger.Account(ctx, org)
	case "events":
		limit := int64(defaultEvents)
		if s := r.URL.Query().Get("limit"); s != "" {
			limit, err = strconv.ParseInt(s, 10, 64)
			if err != nil || limit < 1 || limit > maxEvents {
				return writeProblem(w, r, policy.Invalid(&policy.InputError{Field: "limit", Value: s, Reason: fmt.Sprintf("must be 1 to %d", maxEvents)}))
			}
		}
		var events []meter.Event
		events, err = a.app.ledger.Events(ctx, org, limit)
		if events == nil {
			events = []meter.Event{}
		}
		out = map[string][]meter.Event{"events": events}
	case "plan":
		var body struct {
			Allowance     *int64 `json:"allowance"`
			RechargeMonth *int   `json:"recharge_month"`
		}
		if err := decodeBody(w, r, &body); err != nil {
			return writeProblem(w, r, policy.Invalid(err))
		}
		if body.Allowance == nil || body.RechargeMonth == nil {
			return writeProblem(w, r, policy.Invalid(errors.New("allowance and recharge_month are required")))
		}
		plan := meter.Plan{Allowance: *body.Allowance, RechargeMonth: *body.RechargeMonth}
		out, err = a.app.ledger.SetPlan(ctx, org, plan)
		if err == nil {
			a.logger.Info("plan set", zap.String("org", org), zap.Int64("allowance", plan.Allowance), zap.Int("recharge_month", plan.RechargeMonth))
		}
	case "topup":
		var body struct {
			Amount    *int64 `json:"amount"`
			Reference string `json:"reference"`
		}
		if err := decodeBody(w, r, &body); err != nil {
			return writeProblem(w, r, policy.Invalid(err))
		}
		if body.Amount == nil {
			return writeProblem(w, r, policy.Invalid(errors.New("amount is required")))
		}
		var applied bool
		out, applied, err = a.app.ledger.TopUp(ctx, org, *body.Amount, body.Reference)
		if err == nil {
			a.logger.Info("top-up", zap.String("org", org), zap.Int64("amount", *body.Amount),
				zap.String("reference", body.Reference), zap.Bool("applied", applied))
		}
	case "recharge":
		if err := decodeBody(w, r, &struct{}{}); err != nil {
			return writeProblem(w, r, policy.Invalid(err))
		}
		out, err = a.app.ledger.Recharge(ctx, org)
		if err == nil {
			a.logger.Info("recharged", zap.String("org", org))
		}
	}

	var inputErr *policy.InputError
	switch {
	case errors.Is(err, meter.ErrNotFound):
		return writeProblem(w, r, policy.Status(http.StatusNotFound, "Redis holds nothing for org "+org))
	case errors.As(err, &inputErr), errors.Is(err, meter.ErrPurchasedLimit):
		return writeProblem(w, r, policy.Invalid(err))
	case err != nil:
		a.app.metrics.storeErrors.Inc()
		a.logger.Error("admin call failed", zap.String("org", org), zap.String("call", action), zap.Error(err))
		w.Header().Set("Retry-After", "1")
		return writeProblem(w, r, policy.Unavailable())
	}
	body, err := json.Marshal(out)
	if err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return nil
	}
	_, err = w.Write(append(body, '\n'))
	return err
}

// authorized compares the bearer token in constant time: both sides are
// hashed first, so neither the length nor a prefix leaks.
func (a *Admin) authorized(r *http.Request) bool {
	auth := r.Header.Get("Authorization")
	const scheme = "Bearer "
	if len(auth) < len(scheme) || !strings.EqualFold(auth[:len(scheme)], scheme) {
		return false
	}
	got := sha256.Sum256([]byte(auth[len(scheme):]))
	return subtle.ConstantTimeCompare(got[:], a.tokenHash[:]) == 1
}

// headerBytes is about how large a request's header block was.
func headerBytes(h http.Header) int {
	n := 0
	for k, vs := range h {
		for _, v := range vs {
			n += len(k) + len(v) + 4
		}
	}
	return n
}

// splitAdminPath splits /orgs/{org}[/{action}].
func splitAdminPath(p string) (org, action string, ok bool) {
	rest, found := strings.CutPrefix(p, "/orgs/")
	if !found {
		return "", "", false
	}
	org, action, _ = strings.Cut(rest, "/")
	if strings.Contains(action, "/") {
		return "", "", false
	}
	return org, action, true
}

// decodeBody reads one JSON object, strictly: unknown fields, trailing data
// and bodies over 64 KiB are errors. An empty body is an empty object.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxAdminBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return fmt.Errorf("body larger than %d bytes", maxAdminBody)
		}
		return fmt.Errorf("reading body: %w", err)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		data = []byte("{}")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("bad JSON body: %w", err)
	}
	if dec.More() {
		return errors.New("bad JSON body: more than one value")
	}
	return nil
}

func methodNotAllowed(method string) *policy.Problem {
	return policy.Status(http.StatusMethodNotAllowed, "method "+method+" not allowed here")
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// Interface guards
var (
	_ caddy.Provisioner           = (*Admin)(nil)
	_ caddyhttp.MiddlewareHandler = (*Admin)(nil)
)
