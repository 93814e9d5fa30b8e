package caddymodule

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
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

	usage    *usage.Reader // reads the answer's usage, on an openai or anthropic route
	model    string        // the request's model, when the answer names none
	writeErr error         // the client could not be written to

	// lingers: the call outlives its client, within bounds, to learn its
	// final usage or keep its response.
	lingers bool
	linger  linger

	vals [3]string // the Credits header values
}

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
			case !cw.settled:
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
// headers. A call whose upstream announced a Credits-Usage trailer is only
// refunded here, if it failed; its usage settles it after the body.
func (cw *creditsWriter) settle(status int) {
	cw.settled, cw.status = true, status
	hdr := cw.Header()
	reported, hasUsage := hdr[policy.HeaderUsage]
	cw.late = dropCreditsTrailers(hdr)
	stripCreditsHeaders(hdr)

	cw.refunded = status >= 500 || status == statusClientClosed
	cw.actual = cw.c.cost
	if f := cw.h.route.Usage; f != nil && !cw.refunded {
		// The usage is in the body: settled when the body has passed.
		cw.late, cw.usage = true, usage.NewReader(f, hdr.Get("Content-Type"))
	}
	if hasUsage && !cw.late {
		cw.actual, cw.byHeader = cw.usageOf(reported), true
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
	if cw.refunded {
		return
	}
	if cw.late {
		var t usage.Tokens
		if cw.usage != nil {
			t = cw.usage.Tokens()
		}
		if !t.Seen && !clientGone {
			cw.refunded = true
			cw.account(cw.pay.settle(0, true))
			return
		}
		cw.actual = cw.tokensCost(t)
		if clientGone {
			cw.actual = max(cw.actual, cw.c.cost)
		}
		cw.account(cw.pay.settle(cw.actual, false))
	}
	cw.pay.completed(nil)
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
	if !cw.settled {
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
	if !cw.settled {
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
