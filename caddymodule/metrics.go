package caddymodule

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the credits metrics on Caddy's registry. No metric has an org
// label: orgs are unbounded.
type metrics struct {
	requests      *prometheus.CounterVec
	charged       *prometheus.CounterVec
	storeDuration prometheus.Histogram
	storeErrors   prometheus.Counter
	unmetered     prometheus.Counter
	// dropped counts deferred ledger calls that left the backlog
	// unapplied, by reason: failed (a failure no retry cures, such as an
	// org's corrupt data), full (the backlog had no room for them) or
	// shutdown (still waiting when the store closed).
	dropped *prometheus.CounterVec
	// batched counts the charges that went to the store in one round trip
	// with others.
	batched prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	const ns, sub = "caddy", "credits"
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "requests_total",
			Help: "Metered requests by feature and outcome.",
		}, []string{"feature", "outcome"}),
		charged: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "charged_total",
			Help: "Credits charged by feature, net of refunds and settles.",
		}, []string{"feature"}),
		storeDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "store_duration_seconds",
			Help:    "Duration of store calls on the request path.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1},
		}),
		storeErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "store_errors_total",
			Help: "Store calls that failed or timed out.",
		}),
		unmetered: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "unmetered_total",
			Help: "Calls forwarded by fail_mode open while the store did not answer; their charges wait in the backlog.",
		}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "backlog_dropped_total",
			Help: "Deferred ledger calls that left the backlog unapplied: failed (no retry could apply them, e.g. an org's corrupt data), full (the backlog had no room for them) or shutdown (still waiting when the store closed).",
		}, []string{"reason"}),
		batched: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "store_batched_total",
			Help: "Charges sent to the store in one round trip with others (one script run on a single Redis, one pipeline per node on a Cluster).",
		}),
	}
	cs := []prometheus.Collector{m.requests, m.charged, m.storeDuration, m.storeErrors, m.unmetered, m.dropped, m.batched}
	for i, c := range cs {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return nil, err
			}
			cs[i] = are.ExistingCollector
		}
	}
	m.requests = cs[0].(*prometheus.CounterVec)
	m.charged = cs[1].(*prometheus.CounterVec)
	m.storeDuration = cs[2].(prometheus.Histogram)
	m.storeErrors = cs[3].(prometheus.Counter)
	m.unmetered = cs[4].(prometheus.Counter)
	m.dropped = cs[5].(*prometheus.CounterVec)
	m.batched = cs[6].(prometheus.Counter)
	return m, nil
}
