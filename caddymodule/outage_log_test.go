package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/creditsgw/caddy-credits/internal/redistest"
	"github.com/creditsgw/caddy-credits/meter"
)

// logLine is one JSON line of Caddy's log.
type logLine struct {
	Level  string  `json:"level"`
	TS     float64 `json:"ts"`
	Logger string  `json:"logger"`
	Msg    string  `json:"msg"`
	Count  *int    `json:"count"`
}

// stands returns how many lines l stands for: its count, else itself.
func (l logLine) stands() int {
	if l.Count == nil {
		return 1
	}
	return *l.Count
}

// heldSuffix ends a line that stands for the lines held back in a window.
var heldSuffix = regexp.MustCompile(` \(\d+ more like this in 10s\)$`)

// warnings reads the credits modules' warnings and errors in a log file,
// by kind (the logger's name and the message without its held-back
// count).
func warnings(t *testing.T, file string) map[string][]logLine {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string][]logLine{}
	for line := range strings.Lines(string(data)) {
		var l logLine
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatalf("a log line is not JSON: %s", line)
		}
		if (l.Level != "warn" && l.Level != "error") || !strings.Contains(l.Logger, "credits") {
			continue
		}
		kind := l.Logger + ": " + heldSuffix.ReplaceAllString(l.Msg, "")
		kinds[kind] = append(kinds[kind], l)
	}
	return kinds
}

// TestOutageLogsQuiet stops Redis for 10 seconds under calls from a busy,
// leased org (on a fail-closed, a fail-open and an overdraft route). The
// log has at most two lines of each kind in any 10 seconds, and their
// counts add up: the refusals' counts to the calls answered 503.
func TestOutageLogsQuiet(t *testing.T) {
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	g := startGateway(t, gatewayOptions{redis: redistest.Options{AppendOnly: true},
		options: "log {\n\t\toutput file " + logFile + "\n\t\tformat json\n\t}"})
	orgs := setupFaultOrgs(g, 1)
	stop := make(chan struct{})
	res, wait := runLoad(g, orgs, 4, stop)
	res.waitDone(t, 300)
	g.redis.Kill(t)
	// A load balancer's readiness probe asks /health all along.
	probes, probed := make(chan struct{}), make(chan int)
	go func() {
		failed := 0
		for {
			select {
			case <-probes:
				probed <- failed
				return
			case <-time.After(100 * time.Millisecond):
			}
			if r := g.do(http.MethodGet, g.adminURL+"/health", nil, ""); r.status == http.StatusServiceUnavailable {
				failed++
			}
		}
	}()
	// The outage is the scenario: 10 seconds of calls against no Redis.
	time.Sleep(10 * time.Second)
	close(probes)
	unhealthy := <-probed
	g.redis.Restart(t)
	res.waitDone(t, 100)
	close(stop)
	wait()
	drained(t)
	checkExact(t, g, orgs)

	refused := res.count(http.StatusServiceUnavailable)
	if refused == 0 {
		t.Fatalf("no call was refused during the outage: %v", res)
	}
	const refusing = "http.handlers.credits: store could not take the charge now; refusing"
	// The lines held back are written at the end of their window.
	eventuallyWithin(t, 30*time.Second, "the refusals' counts add up to the 503 answers", func() bool {
		n := 0
		for _, l := range warnings(t, logFile)[refusing] {
			n += l.stands()
		}
		return n == refused
	})
	const health = "http.handlers.credits_admin: health check: the store did not answer"
	eventuallyWithin(t, 30*time.Second, "the failed health checks' counts add up to the 503 answers", func() bool {
		n := 0
		for _, l := range warnings(t, logFile)[health] {
			n += l.stands()
		}
		return n == unhealthy && unhealthy > 0
	})
	kinds := warnings(t, logFile)
	var names []string
	for kind, lines := range kinds {
		names = append(names, kind)
		for i := range lines {
			if lines[i].Count == nil || *lines[i].Count < 1 {
				t.Errorf("a line of %q without its count", kind)
			}
			if i >= 2 && lines[i].TS-lines[i-2].TS < 10 {
				t.Errorf("%q: 3 lines within %.1fs (%d lines in all)", kind, lines[i].TS-lines[i-2].TS, len(lines))
				break
			}
		}
	}
	sort.Strings(names)
	total := 0
	for _, kind := range names {
		n := 0
		for _, l := range kinds[kind] {
			n += l.stands()
		}
		total += len(kinds[kind])
		t.Logf("%d lines for %d: %s", len(kinds[kind]), n, kind)
	}
	if _, ok := kinds["credits.lease: lease sync failed; its report goes again with the next one"]; !ok {
		t.Errorf("the failed lease syncs are not in the log")
	}
	t.Logf("%d lines of warnings and errors; answers %v", total, res)
}

// TestQuietLogs paces a kind of warning: the first is written at once with
// a count of 1, the others of the window as one line with their count at
// its end; another kind, and info lines, are not held back by it; errors
// that need an operator (an org's corrupt data) are each written.
func TestQuietLogs(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	q := newQuietLogs(200 * time.Millisecond)
	log := q.logger(zap.New(core).Named("credits"))
	for range 5 {
		log.Warn("store could not take the charge now; refusing", zap.Error(errors.New("dial tcp: connection refused")))
	}
	log.Warn("lease sync failed")
	for range 3 {
		log.Error("the org's ledger data cannot be used", zap.Error(fmt.Errorf("account: %w", meter.ErrCorrupt)))
	}
	log.Info("store checked")
	log.Error("ledger calls lost at shutdown", zap.Int64("count", 7))
	counts := func(msg string) []int64 {
		var out []int64
		for _, e := range logs.All() {
			if strings.HasPrefix(e.Message, msg) {
				n, _ := e.ContextMap()["count"].(int64)
				out = append(out, n)
			}
		}
		return out
	}
	if got := fmt.Sprint(counts("store could not take")); got != "[1]" {
		t.Errorf("refusals written at once: counts %s, want [1]", got)
	}
	if got := fmt.Sprint(counts("lease sync failed")); got != "[1]" {
		t.Errorf("another kind: counts %s, want [1]", got)
	}
	if got := len(counts("the org's ledger data")); got != 3 {
		t.Errorf("%d corrupt-data errors written, want 3", got)
	}
	if got := fmt.Sprint(counts("ledger calls lost")); got != "[7]" {
		t.Errorf("a line with its own count: counts %s, want [7]", got)
	}
	if got := len(counts("store checked")); got != 1 {
		t.Errorf("%d info lines written, want 1", got)
	}
	eventually(t, "the held refusals are written with their count", func() bool {
		return fmt.Sprint(counts("store could not take")) == "[1 4]"
	})
	held := logs.FilterMessage("store could not take the charge now; refusing (4 more like this in 200ms)").All()
	if len(held) != 1 {
		t.Errorf("the held line's message: %v", logs.All())
	}
	// A window with none held ends the kind: the next one is written at
	// once.
	eventually(t, "every kind is quiet again", func() bool {
		q.mu.Lock()
		defer q.mu.Unlock()
		return len(q.kinds) == 0
	})
	log.Warn("store could not take the charge now; refusing")
	if got := fmt.Sprint(counts("store could not take")); got != "[1 4 1]" {
		t.Errorf("after a quiet window: counts %s, want [1 4 1]", got)
	}
}
