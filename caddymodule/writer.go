package caddymodule

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/policy"
	"github.com/creditsgw/caddy-credits/usage"
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

	phase    phase
	outcome  policy.Outcome // set once the call is accounted for
	status   int
	actual   int64
	balance  int64 // the balance after the settle, when known
	known    bool
	writeErr error // the client could not be written to

	keeping bool   // the body is kept, for a call with an Idempotency-Key
	kept    []byte // the body so far
	limit   int64

	usage *usage.Reader // reads the answer's usage, on an openai or anthropic route
	model string        // the request's model, when the answer names none

	// lingers: the call outlives its client, within bounds, to learn its
	// final usage or keep its response.
	lingers bool
	linger  linger

	vals [3]string // the Credits header values
}

// phase is where a call is in its settling. Each change is one method:
//
//	forwarding --settle--> settled | settledByHeader | awaitingUsage | refunded
//	awaitingUsage --settleAfterBody--> settledAfterBody
//	awaitingUsage --refund--> refunded (cut before any usage was seen)
//	settled --correct--> settled (an undeclared Credits-Usage trailer, once)
//	settled | settledByHeader | settledAfterBody --complete--> done
type phase uint8

const (
	// phaseForwarding: no final status yet; nothing is settled.
	phaseForwarding phase = iota
	// phaseAwaitingUsage: the headers went out with the call's hold; its
	// usage comes after the body, in a trailer or in the body itself.
	phaseAwaitingUsage
	// phaseSettled: settled at the headers to the route's cost.
	phaseSettled
	// phaseSettledByHeader: settled at the headers to the upstream's
	// Credits-Usage header, which is sent once.
	phaseSettledByHeader
	// phaseSettledAfterBody: settled to the usage the body or a trailer
	// reported.
	phaseSettledAfterBody
	// phaseRefunded: the call failed, and its payment was given back.
	phaseRefunded
	// phaseDone: settled, and the payment was told how the call completed.
	phaseDone
)

// accounted reports whether the call's outcome and charge are known, for
// record to count.
func (p phase) accounted() bool { return p != phaseForwarding && p != phaseAwaitingUsage }

func newCreditsWriter(w http.ResponseWriter, h *Handler, c call) *creditsWriter {
	return &creditsWriter{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: w},
		h: h, c: c, keeping: c.key != "" && h.app.keepLimit > 0, limit: h.app.keepLimit,
		lingers: h.route.Usage != nil || c.key != ""}
}

// After its client left, a call whose usage comes at the end of its answer,
// or whose response is kept for an Idempotency-Key, goes on reading the
// upstream's answer: for lingerTime at least, and lingerBytes more of it.
// A client that leaves then never lowers the charge, and the key's retries
// get the kept response as soon as the upstream is done.
const (
	lingerTime        = 30 * time.Second
	lingerBytes int64 = 16 << 20
)

// lingerBounds are the bounds in force; tests shorten them.
var lingerBounds struct{ time, bytes atomic.Int64 }

func init() {
	lingerBounds.time.Store(int64(lingerTime))
	lingerBounds.bytes.Store(lingerBytes)
}

// linger gives the upstream call a context that the client's going does
// not cancel, and cancels it itself when a bound is reached.
type linger struct {
	cancel context.CancelFunc
	stop   func() bool // stops watching the client's context
	read   int64       // bytes of the answer read since the client left
	left   sync.Once
	timer  *time.Timer // set by left
}

// start returns the request to pass on, with the lingering context.
func (l *linger) start(r *http.Request) *http.Request {
	client := r.Context()
	var ctx context.Context
	ctx, l.cancel = context.WithCancel(context.WithoutCancel(client))
	l.stop = context.AfterFunc(client, l.leave)
	return r.WithContext(ctx)
}

// leave starts the time the call has left once its client is gone: when
// the client's context ends, or a write to the client fails.
func (l *linger) leave() {
	l.left.Do(func() { l.timer = time.AfterFunc(time.Duration(lingerBounds.time.Load()), l.cancel) })
}

// more counts n bytes read for no client, and cancels the upstream call
// past the bound.
func (l *linger) more(n int) {
	l.read += int64(n)
	if l.read > lingerBounds.bytes.Load() {
		l.cancel()
	}
}

// end releases the lingering context once the call is done.
func (l *linger) end() {
	l.stop()
	l.left.Do(func() {}) // no timer starts after this
	if l.timer != nil {
		l.timer.Stop()
	}
	l.cancel()
}

// serve passes the call on and settles it however it ends: with a response,
// with an error and no response (refunded as the error's status says), or
// with a panic further down (refunded, then the panic goes on).
func (cw *creditsWriter) serve(next caddyhttp.Handler, r *http.Request) (err error) {
	client := r.Context()
	if cw.lingers {
		r = cw.linger.start(r)
		defer cw.linger.end()
	}
	defer func() {
		if p := recover(); p != nil {
			switch {
			case cw.phase == phaseForwarding:
				cw.settle(http.StatusInternalServerError)
			case p == http.ErrAbortHandler:
				// The response was cut after its headers: by the client
				// going away, or by the upstream.
				cw.abort(cw.writeErr != nil || client.Err() != nil)
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
// headers: forwarding becomes refunded, settled at the headers, or, when
// the usage comes after the body (in the body on an openai or anthropic
// route, or in a Credits-Usage trailer the upstream announced), awaiting
// usage.
func (cw *creditsWriter) settle(status int) {
	cw.status = status
	hdr := cw.Header()
	reported, hasUsage := hdr[policy.HeaderUsage]
	trailer := dropCreditsTrailers(hdr)
	stripCreditsHeaders(hdr)

	f := cw.h.route.Usage
	switch {
	case status >= 500 || status == statusClientClosed:
		if hasUsage && !trailer {
			cw.usageOf(reported) // an invalid one is logged; a refund charges nothing
		}
		cw.refund()
	case f != nil:
		cw.awaitUsage(usage.NewReader(f, hdr.Get("Content-Type")))
	case trailer:
		cw.awaitUsage(nil)
	case hasUsage:
		cw.settleAt(phaseSettledByHeader, cw.usageOf(reported))
	default:
		cw.settleAt(phaseSettled, cw.c.cost)
	}
}

// settleAt settles the call at its headers to actual: forwarding becomes
// settled or settledByHeader.
func (cw *creditsWriter) settleAt(p phase, actual int64) {
	cw.phase, cw.actual = p, actual
	cw.account(cw.pay.settle(actual, false))
}

// refund gives the call's payment back in full: forwarding or
// awaitingUsage becomes refunded.
func (cw *creditsWriter) refund() {
	cw.phase, cw.actual = phaseRefunded, 0
	cw.account(cw.pay.settle(0, true))
}

// awaitUsage sends the headers with what the call holds, and leaves the
// settle for after the body: forwarding becomes awaitingUsage. r reads the
// usage in the body; nil, the usage comes in a trailer.
func (cw *creditsWriter) awaitUsage(r *usage.Reader) {
	cw.phase, cw.usage = phaseAwaitingUsage, r
	hdr := cw.Header()
	balance, known := cw.pay.paid()
	hdr[policy.HeaderHold] = []string{strconv.FormatInt(cw.c.cost, 10)}
	if known {
		cw.vals[0] = strconv.FormatInt(balance, 10)
		hdr[policy.HeaderRemaining] = cw.vals[0:1:1]
	}
	hdr.Add("Trailer", policy.HeaderCharged+", "+policy.HeaderRemaining)
	// Trailers need a chunked body (HTTP/1.1), not a known length.
	hdr.Del("Content-Length")
}

// settleAfterBody settles the call to the usage its body or trailer
// reported: awaitingUsage becomes settledAfterBody.
func (cw *creditsWriter) settleAfterBody(actual int64) {
	cw.phase, cw.actual = phaseSettledAfterBody, actual
	cw.account(cw.pay.settle(actual, false))
}

// correct settles a call settled at its cost again, to an undeclared
// Credits-Usage trailer: the headers are gone, the ledger is not. The
// settle at the cost moved nothing, so this is the call's one settle.
func (cw *creditsWriter) correct(actual int64) {
	if actual != cw.actual {
		cw.balance, cw.known = cw.pay.settle(actual, false)
		cw.actual = actual
	}
}

// complete tells the payment that the call's response went out (kept, for
// an Idempotency-Key's retries, or nil): a settled call becomes done.
func (cw *creditsWriter) complete(kept []byte) {
	cw.phase = phaseDone
	cw.pay.completed(kept)
}

// account takes in the settled call's outcome and sets its Credits
// headers: in the headers, or in the trailers when it settled after the
// body. It counts nothing: record does, once the response is done.
func (cw *creditsWriter) account(balance int64, known bool) {
	d := cw.h.decide(cw.c.org, balance, cw.actual)
	switch {
	case cw.phase == phaseRefunded:
		cw.outcome = policy.Refunded
	case !known:
		cw.outcome = policy.Unmetered
	default:
		cw.outcome = d.Outcome
	}
	cw.balance, cw.known = balance, known
	if known {
		d.BudgetRemaining = cw.kinds.budgetLeft
		setCreditsHeaders(cw.Header(), d, &cw.vals)
	}
}

// decide is the decision a payment's balance makes for a call of cost.
func (h *Handler) decide(org string, balance, cost int64) policy.Decision {
	return policy.Decide(h.route, org, policy.Answer{Charged: true, Balance: balance, Cost: cost})
}

// record counts the call once, with its final charge, after it was settled
// and its response went out: its outcome, the credits charged (never
// negative, as a Prometheus counter needs), the balance for the alerts and
// its line of the usage log. Nothing here can stop a settle or cut a
// response: a counting that fails is logged and the call stands.
func (cw *creditsWriter) record() {
	if !cw.phase.accounted() {
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
// came after the body, keeps the upstream's Credits trailers from the
// client, and tells the payment how the call completed.
func (cw *creditsWriter) finish(err error) {
	if cw.phase == phaseForwarding {
		cw.settle(statusOf(err))
	}
	hdr := cw.Header()
	reported, hasUsage := takeCreditsTrailers(hdr)
	switch cw.phase {
	case phaseRefunded:
		return
	case phaseAwaitingUsage:
		actual := cw.c.cost
		if cw.usage != nil {
			actual = cw.tokensCost(cw.usage.Tokens())
		} else if hasUsage {
			actual = cw.usageOf(reported)
		}
		cw.settleAfterBody(actual)
	case phaseSettledByHeader:
		if hasUsage {
			cw.h.logger.Warn("ignoring a Credits-Usage trailer after a Credits-Usage header",
				zap.Strings("value", reported), zap.String("feature", cw.h.Feature))
		}
	case phaseSettled:
		if hasUsage {
			cw.correct(cw.usageOf(reported))
		}
	}
	var kept []byte
	if cw.keeping && err == nil {
		kept = encodeKept(cw.status, hdr, cw.kept)
	}
	cw.complete(kept)
}

// tokensCost is what the tokens an answer reported cost at the route's
// prices; an answer without usage, or a model without a price, costs the
// hold.
func (cw *creditsWriter) tokensCost(t usage.Tokens) int64 {
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
// the upstream, it is charged the usage seen, and refunded when none was.
// With the client gone (and the rest of the answer not read within the
// bounds), it is charged the usage seen, and never less than its hold: a
// departing client never lowers the charge. A call that had settled at its
// headers stands. A charged call's key is done: its retries learn at once
// that there is no response to replay.
func (cw *creditsWriter) abort(clientGone bool) {
	switch cw.phase {
	case phaseRefunded:
		return
	case phaseAwaitingUsage:
		var t usage.Tokens
		if cw.usage != nil {
			t = cw.usage.Tokens()
		}
		if !t.Seen && !clientGone {
			cw.refund()
			return
		}
		actual := cw.tokensCost(t)
		if clientGone {
			actual = max(actual, cw.c.cost)
		}
		cw.settleAfterBody(actual)
	}
	cw.complete(nil)
}

// WriteHeader settles on the final status, then sends the headers. A 1xx
// goes out without the upstream's Credits headers.
func (cw *creditsWriter) WriteHeader(status int) {
	if status < 200 && status != http.StatusSwitchingProtocols {
		stripCreditsHeaders(cw.Header())
	} else if cw.phase == phaseForwarding {
		cw.settle(status)
	}
	cw.ResponseWriter.WriteHeader(status)
}

// Write sends an implicit 200 through WriteHeader first, and keeps the body
// of a call with an Idempotency-Key, up to the limit.
func (cw *creditsWriter) Write(b []byte) (int, error) {
	if cw.phase == phaseForwarding {
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
	if cw.lingers && cw.writeErr != nil {
		// The client is gone: the answer is read on, for no one.
		cw.linger.more(len(b))
		return len(b), nil
	}
	n, err := cw.ResponseWriter.Write(b)
	if err != nil && cw.writeErr == nil {
		cw.writeErr = err
	}
	if err != nil && cw.lingers {
		// Swallowed, so that reverse_proxy reads the answer to its end.
		cw.linger.leave()
		cw.linger.more(len(b) - n)
		return len(b), nil
	}
	return n, err
}

// ReadFrom keeps the wrapped writer's fast path without skipping the
// settle; a body being kept goes through Write.
func (cw *creditsWriter) ReadFrom(r io.Reader) (int64, error) {
	if cw.phase == phaseForwarding {
		cw.WriteHeader(http.StatusOK)
	}
	if cw.keeping || cw.usage != nil || cw.lingers {
		return io.Copy(writerOnly{cw}, r)
	}
	return cw.ResponseWriterWrapper.ReadFrom(r)
}

// writerOnly hides every method but Write, so io.Copy uses it.
type writerOnly struct{ io.Writer }

// FlushError settles before the first flush sends the headers;
// http.ResponseController finds it before unwrapping the writer.
func (cw *creditsWriter) FlushError() error {
	if cw.phase == phaseForwarding {
		cw.WriteHeader(http.StatusOK)
	}
	if cw.lingers && cw.writeErr != nil {
		return nil
	}
	err := http.NewResponseController(cw.ResponseWriter).Flush()
	if err != nil && cw.lingers && !errors.Is(err, http.ErrNotSupported) {
		// The client is gone: as in Write.
		cw.writeErr = err
		cw.linger.leave()
		return nil
	}
	return err
}

// Flush is FlushError for callers that use http.Flusher.
func (cw *creditsWriter) Flush() { _ = cw.FlushError() }

// Interface guards
var (
	_ http.Flusher  = (*creditsWriter)(nil)
	_ io.ReaderFrom = (*creditsWriter)(nil)
)
