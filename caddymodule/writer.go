package caddymodule

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/policy"
)

// creditsWriter settles a forwarded call's payment when the response's
// status is known, before its headers go to the client, so that the Credits
// headers tell the final truth; it keeps every Credits header of the
// upstream's from the client (in 1xx responses, headers and trailers), and,
// for a call with an Idempotency-Key, keeps its response for the retries.
type creditsWriter struct {
	caddyhttp.ResponseWriterWrapper
	h     *Handler
	c     call
	pay   payment // one of kinds
	kinds payments

	settled   bool // the final status was seen
	late      bool // the usage comes in a trailer: settled after the body
	refunded  bool
	outcome   policy.Outcome // set when the call was accounted for
	accounted bool
	status    int
	actual    int64
	byHeader  bool  // settled to a Credits-Usage header
	balance   int64 // the balance after the settle, when known
	known     bool

	keeping bool   // the body is kept, for a call with an Idempotency-Key
	kept    []byte // the body so far
	limit   int64

	usage    *policy.UsageReader // reads the answer's usage, on an openai or anthropic route
	model    string              // the request's model, when the answer names none
	writeErr error               // the client could not be written to

	vals [3]string // the Credits header values
}

func newCreditsWriter(w http.ResponseWriter, h *Handler, c call) *creditsWriter {
	return &creditsWriter{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: w},
		h: h, c: c, keeping: c.key != "" && h.app.keepLimit > 0, limit: h.app.keepLimit}
}

// serve passes the call on and settles it however it ends: with a response,
// with an error and no response (refunded as the error's status says), or
// with a panic further down (refunded, then the panic goes on).
func (cw *creditsWriter) serve(next caddyhttp.Handler, r *http.Request) (err error) {
	defer func() {
		if p := recover(); p != nil {
			switch {
			case !cw.settled:
				cw.settle(http.StatusInternalServerError)
			case p == http.ErrAbortHandler:
				// The response was cut after its headers: by the client
				// going away, or by the upstream.
				cw.abort(cw.writeErr != nil || r.Context().Err() != nil)
			}
			cw.record()
			panic(p)
		}
		cw.finish(err)
		cw.record()
	}()
	return next.ServeHTTP(cw, r)
}

// statusClientClosed is the status Caddy gives a call whose client went
// away before the upstream answered: the call did not complete.
const statusClientClosed = 499

func statusOf(err error) int {
	if err == nil {
		return http.StatusOK
	}
	var herr caddyhttp.HandlerError
	if errors.As(err, &herr) && herr.StatusCode != 0 {
		return herr.StatusCode
	}
	return http.StatusInternalServerError
}

// settle settles the payment on the final status, and sets the Credits
// headers. A call whose upstream announced a Credits-Usage trailer is only
// refunded here, if it failed; its usage settles it after the body.
func (cw *creditsWriter) settle(status int) {
	cw.settled, cw.status = true, status
	hdr := cw.Header()
	usage, hasUsage := hdr[policy.HeaderUsage]
	cw.late = dropCreditsTrailers(hdr)
	stripCreditsHeaders(hdr)

	cw.refunded = status >= 500 || status == statusClientClosed
	cw.actual = cw.c.cost
	if f := cw.h.route.Usage; f != policy.UsageHeader && !cw.refunded {
		// The usage is in the body: settled when the body has passed.
		cw.late, cw.usage = true, policy.NewUsageReader(f, hdr.Get("Content-Type"))
	}
	if hasUsage && !cw.late {
		cw.actual, cw.byHeader = cw.usageOf(usage), true
	}
	if cw.late && !cw.refunded {
		// Settled after the body: the headers say what the call holds.
		balance, known := cw.pay.paid()
		hdr[policy.HeaderHold] = []string{strconv.FormatInt(cw.c.cost, 10)}
		if known {
			cw.vals[0] = strconv.FormatInt(balance, 10)
			hdr[policy.HeaderRemaining] = cw.vals[0:1:1]
		}
		hdr.Add("Trailer", policy.HeaderCharged+", "+policy.HeaderRemaining)
		// Trailers need a chunked body (HTTP/1.1), not a known length.
		hdr.Del("Content-Length")
		return
	}
	cw.account(cw.pay.settle(cw.actual, cw.refunded))
}

// account takes in the settled call's outcome and sets its Credits
// headers: in the headers, or in the trailers when it settled after the
// body. It counts nothing: record does, once the response is done.
func (cw *creditsWriter) account(balance int64, known bool) {
	if cw.refunded {
		cw.actual = 0
	}
	d := cw.h.decide(cw.c.org, balance, cw.actual)
	switch {
	case cw.refunded:
		cw.outcome = policy.Refunded
	case !known:
		cw.outcome = policy.Unmetered
	default:
		cw.outcome = d.Outcome
	}
	cw.accounted, cw.balance, cw.known = true, balance, known
	if known {
		setCreditsHeaders(cw.Header(), d, &cw.vals)
	}
}

// record counts the call once, with its final charge, after it was settled
// and its response went out: its outcome, the credits charged (never
// negative, as a Prometheus counter needs), the balance for the alerts and
// its line of the usage log. Nothing here can stop a settle or cut a
// response: a counting that fails is logged and the call stands.
func (cw *creditsWriter) record() {
	if !cw.accounted {
		return
	}
	defer func() {
		if p := recover(); p != nil {
			cw.h.logger.Error("counting a settled call failed; its charge stands",
				zap.String("feature", cw.h.Feature), zap.Any("panic", p))
		}
	}()
	h := cw.h
	h.count(cw.outcome)
	if cw.actual > 0 {
		h.charged.Add(float64(cw.actual))
	}
	if cw.known {
		h.app.observe(cw.c.org, cw.balance)
	}
	id, how := cw.pay.how()
	h.logUsage(cw.outcome, cw.c.org, cw.c.cost, cw.actual, id, how)
}

// usage reads the upstream's Credits-Usage, or, when it is invalid, logs
// it and keeps the route's cost.
func (cw *creditsWriter) usageOf(values []string) int64 {
	n, err := policy.ParseUsage(values)
	if err != nil {
		cw.h.logger.Warn("ignoring an invalid Credits-Usage from the upstream; charging the route's cost",
			zap.Strings("value", values), zap.String("feature", cw.h.Feature))
		return cw.c.cost
	}
	return n
}

// finish settles a call that wrote no response, settles a call whose usage
// came in a trailer, keeps the upstream's Credits trailers from the client,
// and tells the payment how the call completed.
func (cw *creditsWriter) finish(err error) {
	if !cw.settled {
		cw.settle(statusOf(err))
	}
	hdr := cw.Header()
	usage, hasUsage := hdr[policy.HeaderUsage]
	if v, ok := hdr[http.TrailerPrefix+policy.HeaderUsage]; ok {
		usage, hasUsage = v, true
	}
	for k := range hdr {
		if name, ok := strings.CutPrefix(k, http.TrailerPrefix); ok && policy.IsCreditsHeader(name) {
			delete(hdr, k)
		}
	}
	delete(hdr, policy.HeaderUsage)
	switch {
	case cw.refunded:
	case cw.late && cw.usage != nil:
		cw.actual = cw.tokensCost(cw.usage.Tokens())
		cw.account(cw.pay.settle(cw.actual, false))
	case cw.late:
		cw.actual = cw.c.cost
		if hasUsage {
			cw.actual = cw.usageOf(usage)
		}
		cw.account(cw.pay.settle(cw.actual, false))
	case hasUsage && cw.byHeader:
		// Credits-Usage is sent once: the header settled the call.
		cw.h.logger.Warn("ignoring a Credits-Usage trailer after a Credits-Usage header",
			zap.Strings("value", usage), zap.String("feature", cw.h.Feature))
	case hasUsage:
		// An undeclared trailer: the headers are gone, the ledger is not.
		// The call settled at its headers to its cost, which moved
		// nothing, so this is its one settle.
		if n := cw.usageOf(usage); n != cw.actual {
			cw.balance, cw.known = cw.pay.settle(n, false)
			cw.actual = n
		}
	}
	if cw.refunded {
		return
	}
	var kept []byte
	if cw.keeping && err == nil {
		kept = encodeKept(cw.status, hdr, cw.kept)
	}
	cw.pay.completed(kept)
}

// tokensCost is what the tokens an answer reported cost at the route's
// prices; an answer without usage, or a model without a price, costs the
// hold.
func (cw *creditsWriter) tokensCost(t policy.Tokens) int64 {
	if !t.Seen {
		return cw.c.cost
	}
	model := t.Model
	if model == "" {
		model = cw.model
	}
	n, ok := policy.PriceOf(cw.h.route.Prices, model, t)
	if !ok {
		cw.h.logger.Warn("no price for the model; charging the route's cost", zap.String("model", model), zap.String("feature", cw.h.Feature))
		return cw.c.cost
	}
	return n
}

// abort settles a call whose response was cut after its headers. Cut by
// the upstream, it is charged the usage seen, and refunded when none was;
// with the client gone, it is charged the usage seen, else its hold. A call
// that had settled at its headers stands.
func (cw *creditsWriter) abort(clientGone bool) {
	if !cw.late || cw.refunded {
		return
	}
	var t policy.Tokens
	if cw.usage != nil {
		t = cw.usage.Tokens()
	}
	if !t.Seen && !clientGone {
		cw.refunded = true
		cw.account(cw.pay.settle(0, true))
		return
	}
	cw.actual = cw.tokensCost(t)
	cw.account(cw.pay.settle(cw.actual, false))
}

// dropCreditsTrailers takes the Credits headers out of the upstream's
// Trailer announcement, and reports whether it announced Credits-Usage.
func dropCreditsTrailers(hdr http.Header) (usage bool) {
	announced, ok := hdr["Trailer"]
	if !ok {
		return false
	}
	var keep []string
	for _, v := range announced {
		for name := range strings.SplitSeq(v, ",") {
			name = strings.TrimSpace(name)
			switch {
			case name == "":
			case policy.IsCreditsHeader(name):
				usage = usage || strings.EqualFold(name, policy.HeaderUsage)
			default:
				keep = append(keep, name)
			}
		}
	}
	if len(keep) == 0 {
		delete(hdr, "Trailer")
	} else {
		hdr["Trailer"] = []string{strings.Join(keep, ", ")}
	}
	return usage
}

// WriteHeader settles on the final status, then sends the headers. A 1xx
// goes out without the upstream's Credits headers.
func (cw *creditsWriter) WriteHeader(status int) {
	if status < 200 && status != http.StatusSwitchingProtocols {
		stripCreditsHeaders(cw.Header())
	} else if !cw.settled {
		cw.settle(status)
	}
	cw.ResponseWriter.WriteHeader(status)
}

// Write sends an implicit 200 through WriteHeader first, and keeps the body
// of a call with an Idempotency-Key, up to the limit.
func (cw *creditsWriter) Write(b []byte) (int, error) {
	if !cw.settled {
		cw.WriteHeader(http.StatusOK)
	}
	if cw.keeping {
		if int64(len(cw.kept)+len(b)) > cw.limit {
			cw.keeping, cw.kept = false, nil
		} else {
			cw.kept = append(cw.kept, b...)
		}
	}
	if cw.usage != nil {
		cw.usage.Write(b)
	}
	n, err := cw.ResponseWriter.Write(b)
	if err != nil && cw.writeErr == nil {
		cw.writeErr = err
	}
	return n, err
}

// ReadFrom keeps the wrapped writer's fast path without skipping the
// settle; a body being kept goes through Write.
func (cw *creditsWriter) ReadFrom(r io.Reader) (int64, error) {
	if !cw.settled {
		cw.WriteHeader(http.StatusOK)
	}
	if cw.keeping || cw.usage != nil {
		return io.Copy(writerOnly{cw}, r)
	}
	return cw.ResponseWriterWrapper.ReadFrom(r)
}

// writerOnly hides every method but Write, so io.Copy uses it.
type writerOnly struct{ io.Writer }

// FlushError settles before the first flush sends the headers;
// http.ResponseController finds it before unwrapping the writer.
func (cw *creditsWriter) FlushError() error {
	if !cw.settled {
		cw.WriteHeader(http.StatusOK)
	}
	return http.NewResponseController(cw.ResponseWriter).Flush()
}

// Flush is FlushError for callers that use http.Flusher.
func (cw *creditsWriter) Flush() { _ = cw.FlushError() }

// notKept are the response headers a kept response leaves out: they belong
// to one connection or one answer, or the replay sets them anew.
var notKept = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Transfer-Encoding": true, "Trailer": true, "Upgrade": true,
	"Content-Length": true, "Date": true, policy.HeaderHold: true,
}

// encodeKept writes a response to keep: its status on a line, its headers
// as on the wire, a blank line, its body.
func encodeKept(status int, hdr http.Header, body []byte) []byte {
	var b bytes.Buffer
	b.WriteString(strconv.Itoa(status))
	b.WriteString("\r\n")
	keep := make(http.Header, len(hdr))
	for k, v := range hdr {
		if !notKept[k] && !policy.IsCreditsHeader(k) && !strings.HasPrefix(k, http.TrailerPrefix) {
			keep[k] = v
		}
	}
	_ = keep.Write(&b)
	b.WriteString("\r\n")
	b.Write(body)
	return b.Bytes()
}

// keptResponse is a response encodeKept wrote.
type keptResponse struct {
	status int
	header http.Header
	body   []byte
}

func parseKept(data []byte) (keptResponse, error) {
	r := textproto.NewReader(bufio.NewReader(bytes.NewReader(data)))
	line, err := r.ReadLine()
	if err != nil {
		return keptResponse{}, err
	}
	status, err := strconv.Atoi(line)
	if err != nil || status < 200 || status > 599 {
		return keptResponse{}, fmt.Errorf("status line %q", line)
	}
	mh, err := r.ReadMIMEHeader()
	if err != nil {
		return keptResponse{}, err
	}
	body, err := io.ReadAll(r.R)
	if err != nil {
		return keptResponse{}, err
	}
	return keptResponse{status: status, header: http.Header(mh), body: body}, nil
}

func stripCreditsHeaders(h http.Header) {
	for name := range h {
		if policy.IsCreditsHeader(name) {
			delete(h, name)
		}
	}
}

// setCreditsHeaders sets the Credits headers of a decision. vals, when not
// nil, holds the values, so that a settled call allocates no slices for
// them; it must belong to this response alone.
func setCreditsHeaders(h http.Header, d policy.Decision, vals *[3]string) {
	if vals == nil {
		vals = new([3]string)
	}
	vals[0] = strconv.FormatInt(d.Remaining, 10)
	vals[1] = strconv.FormatInt(d.Charged, 10)
	h[policy.HeaderRemaining] = vals[0:1:1]
	h[policy.HeaderCharged] = vals[1:2:2]
	if d.Notice != "" {
		vals[2] = d.Notice
		h[policy.HeaderNotice] = vals[2:3:3]
	}
}

// Interface guards
var (
	_ http.Flusher  = (*creditsWriter)(nil)
	_ io.ReaderFrom = (*creditsWriter)(nil)
)
