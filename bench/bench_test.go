package main

import (
	"bytes"
	"context"
	"io"
	"math"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestQuick runs the whole benchmark once, briefly, against real wrk,
// redis-server, upstream and Caddy processes. It asserts no speed: only that
// it runs, that every scenario's calls were metered and successful, and
// that its report parses into finite, positive figures.
func TestQuick(t *testing.T) {
	o, err := parseFlags([]string{"-quick"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out bytes.Buffer
	rep, err := run(ctx, o, &out)
	t.Logf("report:\n%s", out.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	report := out.String()

	ratios := regexp.MustCompile(`(?m)^ratio metered/plain requests/s: (\S+) \(median of 1 rounds`).FindAllStringSubmatch(report, -1)
	added := regexp.MustCompile(`(?m)^p99 added by metering: ([+-][0-9.]+)ms `).FindAllStringSubmatch(report, -1)
	if len(ratios) != len(scenarios) || len(added) != len(scenarios) || len(rep.scenarios) != len(scenarios) {
		t.Fatalf("%d ratios, %d p99 figures and %d results in the report, want %d of each", len(ratios), len(added), len(rep.scenarios), len(scenarios))
	}
	for i, sc := range scenarios {
		ratio, err := strconv.ParseFloat(ratios[i][1], 64)
		if err != nil || !(ratio > 0) || math.IsInf(ratio, 0) {
			t.Errorf("scenario %s: ratio %q: want a finite positive number (%v)", sc.name, ratios[i][1], err)
		}
		if _, err := strconv.ParseFloat(added[i][1], 64); err != nil {
			t.Errorf("scenario %s: p99 added %q: %v", sc.name, added[i][1], err)
		}
		r := rep.scenarios[i]
		if sc.subjects > 0 && (!(r.Beside > 0) || math.IsInf(r.Beside, 0) || len(r.gaps) != 1 || !strings.Contains(report, "unbudgeted less budgeted ratio: ")) {
			t.Errorf("scenario %s: the unbudgeted route beside it: ratio %v, gaps %v", sc.name, r.Beside, r.gaps)
		}
		if sc.orgs > 1 && !(r.perRun >= 1) {
			t.Errorf("scenario %s: %v metered requests per script run, want at least 1: every cold call is charged", sc.name, r.perRun)
		}
		if r.sc.name != sc.name || r.non2xx != 0 || r.meteredServed == 0 || (sc.orgs == 1 && !r.ledgerOK) {
			t.Errorf("scenario %s: %d non-2xx, %d metered responses, ledger ok %v", sc.name, r.non2xx, r.meteredServed, r.ledgerOK)
		}
	}

	for _, re := range []string{
		`(?m)^bytes per org, with one call's request marker and call log \(15 minutes\): (\d+)$`,
		`(?m)^bytes per org, steady state \(markers expired\): (\d+)$`,
		`(?m)^bytes of the org after 2000 calls, once its markers and call log have expired: (\d+) \(1 keys\)$`,
	} {
		m := regexp.MustCompile(re).FindStringSubmatch(report)
		if m == nil {
			t.Errorf("no line matching %s in the report", re)
			continue
		}
		if n, err := strconv.Atoi(m[1]); err != nil || n <= 0 {
			t.Errorf("bytes per org %q: want a positive number", m[1])
		}
	}
	if rep.memory == nil || rep.memory.Orgs != 1000 {
		t.Fatalf("memory result %+v, want 1000 orgs", rep.memory)
	}
	if len(rep.memory.Grants) != 5 || rep.memory.MoreGrant <= 0 {
		t.Errorf("memory per grant: %v (each more %.0f), want five rounds", rep.memory.Grants, rep.memory.MoreGrant)
	}
	for _, k := range rep.memory.Keys {
		if k.bytes <= 0 {
			t.Errorf("MEMORY USAGE of the %s %s: %d bytes", k.kind, k.key, k.bytes)
		}
	}
}

func TestParseWrk(t *testing.T) {
	const clean = `Running 10s test @ http://127.0.0.1:8080/plain/v1/generate
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.35ms    1.02ms  25.64ms   81.33%
    Req/Sec    13.79k     1.10k   16.20k    70.50%
  Latency Distribution
     50%    2.21ms
     75%    2.78ms
     90%    3.45ms
     99%    6.13ms
  274473 requests in 10.00s, 47.64MB read
Requests/sec:  27446.25
Transfer/sec:      4.76MB
`
	const errors = `Running 1s test @ http://127.0.0.1:8080/metered/v1/generate
  2 threads and 2000 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   305.93ms  100.00ms    1.20s    70.00%
    Req/Sec     2.90k   500.00     3.50k    60.00%
  Latency Distribution
     50%  512.00us
     75%  400.00ms
     90%     1.10s
     99%     1.50m
  5760 requests in 1.00s, 1.00MB read
  Socket errors: connect 3, read 1, write 0, timeout 12
  Non-2xx or 3xx responses: 7
Requests/sec:   5760.50
Transfer/sec:      1.00MB
`
	tests := []struct {
		name    string
		out     string
		want    wrkResult
		wantErr bool
	}{
		{"clean", clean, wrkResult{Requests: 274473, RPS: 27446.25, P50: 2210 * time.Microsecond, P99: 6130 * time.Microsecond}, false},
		{"errors and every unit", errors, wrkResult{Requests: 5760, RPS: 5760.5, P50: 512 * time.Microsecond, P99: 90 * time.Second,
			Non2xx: 7, SocketErrors: 16}, false},
		{"no --latency", "  274473 requests in 10.00s, 47.64MB read\nRequests/sec:  27446.25\n", wrkResult{}, true},
		{"unknown unit", strings.Replace(clean, "99%    6.13ms", "99%    6.13xs", 1), wrkResult{}, true},
		{"empty", "", wrkResult{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseWrk(tt.out)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name      string
		args      []string
		scenarios string
		rounds    int
		duration  time.Duration
		orgs      int
		wantErr   bool
	}{
		{"defaults", nil, "abcd", 5, 10 * time.Second, 1_000_000, false},
		{"quick", []string{"-quick"}, "abcd", 1, time.Second, 1000, false},
		{"quick with explicit flags", []string{"-quick", "-rounds", "3", "-orgs", "50"}, "abcd", 3, time.Second, 50, false},
		{"names and letters", []string{"-scenario", "slow,a"}, "ba", 5, 10 * time.Second, 1_000_000, false},
		{"unknown scenario", []string{"-scenario", "e"}, "", 0, 0, 0, true},
		{"fractional duration", []string{"-duration", "1500ms"}, "", 0, 0, 0, true},
		{"no rounds", []string{"-rounds", "0"}, "", 0, 0, 0, true},
		{"stray argument", []string{"now"}, "", 0, 0, 0, true},
		{"credits option", []string{"-credits-option", "lease 100"}, "abcd", 5, 10 * time.Second, 1_000_000, false},
		{"credits option with a brace", []string{"-credits-option", "lease 100 }"}, "", 0, 0, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := parseFlags(tt.args, io.Discard)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if tt.wantErr {
				return
			}
			var names string
			for _, sc := range o.scenarios {
				names += sc.name
			}
			if names != tt.scenarios || o.rounds != tt.rounds || o.duration != tt.duration || o.orgs != tt.orgs {
				t.Errorf("scenarios %s, rounds %d, duration %v, orgs %d; want %s, %d, %v, %d",
					names, o.rounds, o.duration, o.orgs, tt.scenarios, tt.rounds, tt.duration, tt.orgs)
			}
		})
	}
}
