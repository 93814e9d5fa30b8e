package caddymodule

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/creditsgw/caddy-credits/meter"
	"github.com/creditsgw/caddy-credits/policy"
)

// Alerts sends a signed webhook when an org's balance falls below each of
// the thresholds, once per threshold until the balance is above it again,
// and when it reaches zero.
type Alerts struct {
	// URL receives each alert as a JSON POST.
	URL string `json:"url"`
	// Secret signs each body: Credits-Signature: sha256=<hex HMAC-SHA256>.
	// Placeholders such as {env.ALERTS_SECRET} are replaced at load.
	Secret string `json:"secret"`
	// Thresholds are the balances, each 1 to 10^12, below which an alert
	// is sent; balance.exhausted is sent at zero whatever they are.
	Thresholds []int64 `json:"thresholds,omitempty"`
}

// Delivery of alerts.
const (
	// alertQueue bounds the orgs waiting for a check of their alerts.
	alertQueue = 10000
	// alertCheckEvery is the most often one org's alerts are checked; a
	// call in between asks for a check at the end of the interval.
	alertCheckEvery = time.Second
	// alertTimeout bounds one delivery attempt.
	alertTimeout = 10 * time.Second
	// alertFirstRetry is the first wait after a failed attempt; it doubles
	// up to alertMaxRetry.
	alertFirstRetry = time.Second
	alertMaxRetry   = time.Minute
	// alertMaxAge is how long an alert is retried before it is dropped.
	alertMaxAge = 24 * time.Hour
	// alertStale is how long an alert no gateway is delivering stays
	// pending before the sweep takes it on; alertSweepEvery how often
	// the sweep runs.
	alertStale      = 2 * time.Minute
	alertSweepEvery = time.Minute
)

// validate checks the settings.
func (al *Alerts) validate() error {
	u, err := url.Parse(al.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("alerts url %q: must be an absolute http or https URL", al.URL)
	}
	if al.Secret == "" {
		return errors.New("alerts: a secret is required, to sign the webhooks")
	}
	seen := make(map[int64]bool)
	for _, t := range al.Thresholds {
		if t < 1 || t > meter.MaxAmount {
			return policy.RangeError("threshold", strconv.FormatInt(t, 10), 1, meter.MaxAmount)
		}
		if seen[t] {
			return fmt.Errorf("alerts threshold %d is given twice", t)
		}
		seen[t] = true
	}
	return nil
}

// notifier checks orgs' balance alerts when calls see a low balance, and
// delivers the alerts, away from the calls: a call only queues its org.
type notifier struct {
	ledger     *meter.Ledger
	url        string
	secret     []byte
	thresholds []int64
	top        int64 // the highest threshold; 0 with none
	client     *http.Client
	logger     *zap.Logger

	mu      sync.Mutex
	waiting map[string]bool      // orgs queued or timed for a check
	checked map[string]time.Time // when each org was last checked
	queue   chan string

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func newNotifier(al *Alerts, ledger *meter.Ledger, logger *zap.Logger) *notifier {
	repl := caddy.NewReplacer()
	n := &notifier{
		ledger:     ledger,
		url:        repl.ReplaceKnown(al.URL, ""),
		secret:     []byte(repl.ReplaceKnown(al.Secret, "")),
		thresholds: slices.Sorted(slices.Values(al.Thresholds)),
		client:     &http.Client{Timeout: alertTimeout},
		logger:     logger,
		waiting:    make(map[string]bool),
		checked:    make(map[string]time.Time),
		queue:      make(chan string, alertQueue),
	}
	if len(n.thresholds) > 0 {
		n.top = n.thresholds[len(n.thresholds)-1]
	}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	return n
}

// start runs the checks and the sweep of alerts that a stopped gateway
// left undelivered.
func (n *notifier) start() {
	n.wg.Add(2)
	go func() {
		defer n.wg.Done()
		for {
			select {
			case <-n.ctx.Done():
				return
			case org := <-n.queue:
				n.check(org)
			}
		}
	}()
	go func() {
		defer n.wg.Done()
		t := time.NewTicker(alertSweepEvery)
		defer t.Stop()
		for {
			n.sweep()
			select {
			case <-n.ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

// stop ends the checks and the deliveries. An alert not yet delivered
// stays pending in Redis, where the sweep of a gateway (this one's next
// config included) takes it on.
func (n *notifier) stop() {
	n.cancel()
	n.wg.Wait()
}

// observe is told the balance a call saw. Below the highest threshold, or
// at zero or below, it queues the org for a check; it never waits.
func (n *notifier) observe(org string, balance int64) {
	if balance >= n.top && balance > 0 {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.waiting[org] {
		return
	}
	if wait := alertCheckEvery - time.Since(n.checked[org]); wait > 0 {
		// Checked a moment ago: once more at the end of the interval, so
		// that the last calls of a burst are checked too.
		n.waiting[org] = true
		time.AfterFunc(wait, func() { n.enqueue(org) })
		return
	}
	n.waiting[org] = true
	n.enqueueLocked(org)
}

func (n *notifier) enqueue(org string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.enqueueLocked(org)
}

func (n *notifier) enqueueLocked(org string) {
	select {
	case n.queue <- org:
	default:
		delete(n.waiting, org)
		n.logger.Warn("balance alerts: too many orgs wait for a check; this one is checked at its next call", zap.String("org", org))
	}
}

// check records the org's due alerts in Redis and delivers them.
func (n *notifier) check(org string) {
	n.mu.Lock()
	delete(n.waiting, org)
	n.checked[org] = time.Now()
	if len(n.checked) > alertQueue {
		for o, at := range n.checked {
			if time.Since(at) > alertCheckEvery {
				delete(n.checked, o)
			}
		}
	}
	n.mu.Unlock()
	alerts, err := n.ledger.CheckAlerts(n.ctx, org, n.thresholds)
	if err != nil {
		if n.ctx.Err() == nil {
			n.logger.Warn("balance alerts: the check failed; it runs again at the org's next call", zap.String("org", org), zap.Error(err))
		}
		return
	}
	for _, a := range alerts {
		n.deliverLater(a)
	}
}

// sweep takes on the alerts that no gateway has been delivering.
func (n *notifier) sweep() {
	alerts, err := n.ledger.StaleAlerts(n.ctx, alertStale)
	if err != nil {
		if n.ctx.Err() == nil {
			n.logger.Warn("balance alerts: the sweep of undelivered alerts failed", zap.Error(err))
		}
		return
	}
	for _, a := range alerts {
		n.deliverLater(a)
	}
}

func (n *notifier) deliverLater(a meter.Alert) {
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		n.deliver(a)
	}()
}

// deliver posts the alert until the receiver takes it (any 2xx), waiting
// longer after each failure, for up to alertMaxAge.
func (n *notifier) deliver(a meter.Alert) {
	first := time.Now()
	wait := alertFirstRetry
	for attempt := 1; ; attempt++ {
		err := n.post(a)
		if err == nil {
			if err := n.ledger.AlertDelivered(context.WithoutCancel(n.ctx), a); err != nil {
				n.logger.Warn("balance alerts: delivered, but could not be marked so; it may be sent again", zap.String("id", a.ID), zap.Error(err))
			}
			return
		}
		if n.ctx.Err() != nil {
			return
		}
		if time.Since(first) > alertMaxAge {
			n.logger.Error("balance alert dropped: the receiver did not take it within a day",
				zap.String("id", a.ID), zap.String("org", a.Org), zap.Int("attempts", attempt), zap.Error(err))
			if err := n.ledger.AlertDelivered(context.WithoutCancel(n.ctx), a); err != nil {
				n.logger.Warn("balance alerts: could not drop the alert", zap.String("id", a.ID), zap.Error(err))
			}
			return
		}
		n.logger.Warn("balance alert not delivered; retrying", zap.String("id", a.ID), zap.String("org", a.Org),
			zap.Int("attempt", attempt), zap.Duration("retry_in", wait), zap.Error(err))
		select {
		case <-n.ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, alertMaxRetry)
	}
}

// post sends one attempt of the alert.
func (n *notifier) post(a meter.Alert) error {
	ctx, cancel := context.WithTimeout(n.ctx, alertTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, n.url, bytes.NewReader(a.Body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Credits-Signature", signature(n.secret, a.Body))
	resp, err := n.client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("the receiver answered %d", resp.StatusCode)
	}
	return nil
}

// signature is the Credits-Signature of body: sha256=<hex HMAC-SHA256>.
func signature(secret, body []byte) string {
	m := hmac.New(sha256.New, secret)
	m.Write(body)
	return "sha256=" + hex.EncodeToString(m.Sum(nil))
}
