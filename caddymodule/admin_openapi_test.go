package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
)

// loadOpenAPI loads caddymodule/openapi.json, the document credits_admin
// serves, and validates it as OpenAPI 3.1.
func loadOpenAPI(t testing.TB) *openapi3.T {
	t.Helper()
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(openAPIDocument)
	if err != nil {
		t.Fatalf("loading openapi.json: %v", err)
	}
	if !doc.IsOpenAPI31OrLater() {
		t.Fatalf("openapi.json is OpenAPI %s, want 3.1", doc.OpenAPI)
	}
	if err := doc.Validate(loader.Context, openapi3.EnableExamplesValidation()); err != nil {
		t.Fatalf("openapi.json is not a valid OpenAPI document: %v", err)
	}
	return doc
}

// TestAdminOpenAPI checks the document itself: it loads and validates as
// OpenAPI 3.1, it has every route the admin handler serves and no other,
// each operation answers problems for its errors, and credits_admin serves
// it as it is, with no token.
func TestAdminOpenAPI(t *testing.T) {
	doc := loadOpenAPI(t)
	var inDoc []string
	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			inDoc = append(inDoc, method+" "+path)
			if _, ok := op.Responses.Map()["200"]; !ok && op.Responses.Status(201) == nil {
				t.Errorf("%s %s has no 2xx answer", method, path)
			}
			for status, r := range op.Responses.Map() {
				if status[0] == '4' || status[0] == '5' {
					if r.Value.Content.Get("application/problem+json") == nil {
						t.Errorf("%s %s answers %s without a problem body", method, path, status)
					}
				}
			}
		}
	}
	var served []string
	for pattern := range adminRoutes {
		served = append(served, pattern)
	}
	slices.Sort(inDoc)
	slices.Sort(served)
	if !slices.Equal(inDoc, served) {
		t.Fatalf("the document's operations differ from the handler's routes:\ndocument %q\nhandler  %q", inDoc, served)
	}

	g := startGateway(t, gatewayOptions{})
	r := g.do(http.MethodGet, g.adminURL+"/openapi.json", nil, "")
	wantStatus(t, r, http.StatusOK)
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("Content-Type %q", ct)
	}
	if !bytes.Equal(r.body, openAPIDocument) {
		t.Fatal("the document served is not openapi.json")
	}
}

// openAPIChecked wraps next so that every call under prefix (a
// credits_admin mount) is checked against the OpenAPI document: its answer's
// status, headers, content type and body, and, when the answer is a
// success, the request too (what the handler accepts, the document must
// allow). A mismatch fails t. The console's files are not of the API and
// pass unchecked.
func openAPIChecked(t testing.TB, prefix string, next http.RoundTripper) http.RoundTripper {
	doc := loadOpenAPI(t)
	// The document's server is the demo's mount; the test's is prefix.
	doc.Servers = openapi3.Servers{{URL: prefix}}
	router, err := legacy.NewRouter(doc)
	if err != nil {
		t.Fatalf("routing openapi.json: %v", err)
	}
	base, err := url.Parse(prefix)
	if err != nil {
		t.Fatal(err)
	}
	return &openAPITransport{t: t, doc: doc, router: router, base: base, next: next}
}

type openAPITransport struct {
	t      testing.TB
	doc    *openapi3.T
	router routers.Router
	base   *url.URL
	next   http.RoundTripper
}

func (c *openAPITransport) RoundTrip(req *http.Request) (*http.Response, error) {
	path, under := strings.CutPrefix(req.URL.Path, c.base.Path)
	if req.URL.Host != c.base.Host || !under {
		return c.next.RoundTrip(req)
	}
	var reqBody []byte
	if req.Body != nil {
		var err error
		if reqBody, err = io.ReadAll(req.Body); err != nil {
			return nil, err
		}
		req.Body.Close()
		req = req.Clone(req.Context())
		req.Body = io.NopCloser(bytes.NewReader(reqBody))
	}
	resp, err := c.next.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	respBody, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(respBody))
	if err != nil {
		return nil, err
	}
	if _, console := consoleFiles[path]; console && (req.Method == http.MethodGet || req.Method == http.MethodHead) {
		return resp, nil
	}
	if err := c.check(req, reqBody, resp, respBody); err != nil {
		c.t.Errorf("the admin answer to %s %s does not match openapi.json: %v\nrequest body: %s\nanswer: %d %s %s",
			req.Method, req.URL.Path, err, reqBody, resp.StatusCode, resp.Header.Get("Content-Type"), respBody)
	}
	return resp, nil
}

// check checks one call against the document.
func (c *openAPITransport) check(req *http.Request, reqBody []byte, resp *http.Response, respBody []byte) error {
	if err := problemMatches(resp, respBody); err != nil {
		return err
	}
	// HEAD answers wherever GET does, with GET's headers and no body.
	find := req.Clone(context.Background())
	head := req.Method == http.MethodHead
	if head {
		find.Method = http.MethodGet
		if len(respBody) > 0 {
			return errors.New("a HEAD answer has a body")
		}
	}
	route, params, err := c.router.FindRoute(find)
	// The router forgives a trailing slash and an empty last segment; the
	// handler does not. A call is the document's operation only when the
	// handler routes it to that very pattern.
	routed := strings.TrimPrefix(req.URL.Path, c.base.Path)
	muxReq := &http.Request{Method: find.Method, URL: &url.URL{Path: routed}, Header: http.Header{}}
	if h, pattern := adminMux.Handler(muxReq); err == nil && (!isAdminRoute(h) || pattern != route.Method+" "+route.Path) {
		err = fmt.Errorf("the handler routes %s %s to %q, the document to %s %s", find.Method, routed, pattern, route.Method, route.Path)
	}
	if err != nil {
		// A path or a method the document does not have: the handler
		// answers it 404 or 405 (or refuses the token or the headers
		// first), a problem.
		switch resp.StatusCode {
		case http.StatusNotFound, http.StatusMethodNotAllowed, http.StatusUnauthorized, http.StatusRequestHeaderFieldsTooLarge:
		default:
			return fmt.Errorf("answered %d to a call the document does not have (%v)", resp.StatusCode, err)
		}
		if resp.StatusCode == http.StatusMethodNotAllowed && resp.Header.Get("Allow") == "" {
			return errors.New("a 405 without Allow")
		}
		if resp.Header.Get("Content-Type") != "application/problem+json" {
			return fmt.Errorf("a %d of Content-Type %q, not a problem", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		if head {
			return nil
		}
		return c.doc.Components.Schemas["Problem"].Value.VisitJSON(decodeAny(respBody), openapi3.EnableJSONSchema2020())
	}
	opts := &openapi3filter.Options{
		IncludeResponseStatus: true,
		ExcludeResponseBody:   head,
		MultiError:            true,
		AuthenticationFunc:    openapi3filter.NoopAuthenticationFunc,
	}
	if len(reqBody) > 0 && find.Header.Get("Content-Type") == "" {
		// The handler reads a body as JSON whatever its content type.
		find.Header.Set("Content-Type", "application/json")
	}
	find.Body = io.NopCloser(bytes.NewReader(reqBody))
	in := &openapi3filter.RequestValidationInput{Request: find, PathParams: params, Route: route, Options: opts}
	if resp.StatusCode < 400 {
		if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
			return fmt.Errorf("the handler accepted a request the document refuses: %w", err)
		}
	}
	return openapi3filter.ValidateResponse(context.Background(), &openapi3filter.ResponseValidationInput{
		RequestValidationInput: in,
		Status:                 resp.StatusCode,
		Header:                 resp.Header,
		Body:                   io.NopCloser(bytes.NewReader(respBody)),
		Options:                opts,
	})
}

// problemMatches checks a problem answer's body against its status.
func problemMatches(resp *http.Response, body []byte) error {
	if resp.Header.Get("Content-Type") != "application/problem+json" || len(body) == 0 {
		return nil
	}
	var p struct{ Status int }
	if err := json.Unmarshal(body, &p); err != nil || p.Status != resp.StatusCode {
		return fmt.Errorf("a problem whose status is %d in an answer of %d (%v)", p.Status, resp.StatusCode, err)
	}
	return nil
}

func decodeAny(data []byte) any {
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		return string(data)
	}
	return v
}

// TestAdminOpenAPIChecksAnswers checks the check itself: answers that
// stray from the document fail the test that sees them, and one that
// keeps to it does not.
func TestAdminOpenAPIChecksAnswers(t *testing.T) {
	account := `{"org": "acme", "balance": 5, "held": 0, "available": 5, "allowance_remaining": 5, "purchased": 0,
		"promotional": 0, "rollover": 0, "debt": 0, "plan": {"allowance": 5, "recharge_month": 1, "rollover": 0},
		"own_plan": false, "period_start": "2026-01-01T00:00:00Z", "next_recharge": "2027-01-01T00:00:00Z",
		"next_expiry": null, "used": {}}`
	for _, tc := range []struct {
		name   string
		status int
		ct     string
		body   string
		fails  bool
	}{
		{"an account as documented", 200, "application/json", account, false},
		{"an account without its balance", 200, "application/json", strings.Replace(account, `"balance": 5,`, "", 1), true},
		{"an account with a field the document lacks", 200, "application/json", strings.Replace(account, `"debt": 0,`, `"debt": 0, "owed": 1,`, 1), true},
		{"a status the call does not answer", 202, "application/json", account, true},
		{"a problem as plain text", 404, "text/plain", "not found", true},
		{"a problem whose status is another", 404, "application/problem+json", `{"type": "about:blank", "title": "x", "status": 400, "detail": "x"}`, true},
		{"a problem as documented", 404, "application/problem+json", `{"type": "https://creditsgw.dev/problems/x", "title": "Not Found", "status": 404, "detail": "x"}`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", tc.ct)
				w.WriteHeader(tc.status)
				io.WriteString(w, tc.body)
			}))
			defer srv.Close()
			rec := &errorRecorder{TB: t}
			client := &http.Client{Transport: openAPIChecked(rec, srv.URL+"/admin", http.DefaultTransport)}
			resp, err := client.Get(srv.URL + "/admin/orgs/acme")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if failed := len(rec.errors) > 0; failed != tc.fails {
				t.Fatalf("the check failed the test: %v, want %v; errors %q", failed, tc.fails, rec.errors)
			}
		})
	}
}

// errorRecorder is a testing.TB whose Errorf is recorded, not reported.
type errorRecorder struct {
	testing.TB
	errors []string
}

func (r *errorRecorder) Errorf(format string, args ...any) {
	r.errors = append(r.errors, fmt.Sprintf(format, args...))
}
