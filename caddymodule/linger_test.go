package caddymodule

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// lingerUpstream streams slowly, as a generative backend does, and records
// what it sent each org: the credits of the usage it reported in its final
// event (at a credit a token), and whether it finished or was cut.
type lingerUpstream struct {
	*httptest.Server
	mu   sync.Mutex
	sent map[string]lingerSent
	done chan string // an org's call ended, either way
}

type lingerSent struct {
	usage    int64 // the credits of the final usage sent; 0 if none
	finished bool  // the answer went out to its end
	bytes    int64
	calls    int
}

func startLingerUpstream(t *testing.T) *lingerUpstream {
	t.Helper()
	u := &lingerUpstream{sent: map[string]lingerSent{}, done: make(chan string, 100)}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		org := r.Header.Get("X-Org-Id")
		var s lingerSent
		defer func() {
			u.mu.Lock()
			prev := u.sent[org]
			s.calls = prev.calls + 1
			u.sent[org] = s
			u.mu.Unlock()
			u.done <- org
		}()
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		send := func(event string) bool {
			n, err := io.WriteString(w, event+"\n\n")
			s.bytes += int64(n)
			if err != nil || http.NewResponseController(w).Flush() != nil {
				return false
			}
			select {
			case <-r.Context().Done():
				return false
			case <-time.After(40 * time.Millisecond):
				return true
			}
		}
		openai := func(text string) string {
			return fmt.Sprintf(`data: {"model":"gpt-4o","choices":[{"delta":{"content":%q}}],"usage":null}`, text)
		}
		anthropic := func(text string) string {
			return "event: content_block_delta\n" + fmt.Sprintf(`data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":%q}}`, text)
		}
		const start = "event: message_start\n" + `data: {"type":"message_start","message":{"id":"m","model":"claude-sonnet-4","usage":{"input_tokens":1,"output_tokens":1}}}`
		switch strings.TrimPrefix(r.URL.Path, "/ai/") {
		case "openai/slow":
			// 10,001 credits of tokens, reported after 20 text events.
			for range 20 {
				if !send(openai("some words ")) {
					return
				}
			}
			if !send(`data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":10000}}`) {
				return
			}
			s.usage = 10_001
			s.finished = send("data: [DONE]")
		case "anthropic/slow":
			// message_start reports 2 credits so far; message_delta
			// brings the answer to 15,001.
			if !send(start) {
				return
			}
			for range 20 {
				if !send(anthropic("some words ")) {
					return
				}
			}
			if !send("event: message_delta\n" + `data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15000}}`) {
				return
			}
			s.usage = 15_001
			s.finished = send("event: message_stop\n" + `data: {"type":"message_stop"}`)
		case "openai/hang", "anthropic/hang":
			// Some text, then nothing until the gateway gives up.
			if strings.HasPrefix(r.URL.Path, "/ai/anthropic") && !send(start) {
				return
			}
			for range 5 {
				if !send(openai("some words ")) {
					return
				}
			}
			<-r.Context().Done()
		case "openai/cut":
			// 100 credits of usage, then the connection drops.
			if !send(`data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":99}}`) {
				return
			}
			s.usage = 100
			panic(http.ErrAbortHandler)
		case "openai/endless":
			// Text without end, and no usage.
			chunk := openai(strings.Repeat("x", 1000))
			for send(chunk) {
			}
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *lingerUpstream) of(org string) lingerSent {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.sent[org]
}

// waitDone waits until the upstream's call for org ended.
func (u *lingerUpstream) waitDone(t *testing.T, org string, limit time.Duration) {
	t.Helper()
	deadline := time.After(limit)
	for {
		select {
		case o := <-u.done:
			if o == org {
				return
			}
		case <-deadline:
			t.Fatalf("the upstream's call for %s did not end within %s", org, limit)
		}
	}
}

const lingerCaddyfile = `{
	admin off
	credits {
		redis redis://{REDIS}
		timeout 2s
		default_plan 100
	}
}
http://127.0.0.1:{PORT} {
	route /ai/openai/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature chat
			cost 20
			usage openai
			price gpt-4o* 1000000 1000000
		}
		reverse_proxy {UPSTREAM} {
			flush_interval -1
		}
	}
	route /ai/anthropic/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature chat
			cost 20
			usage anthropic
			price claude-* 1000000 1000000
		}
		reverse_proxy {UPSTREAM} {
			flush_interval -1
		}
	}
	handle_path /admin/* {
		credits_admin
	}
}
`

// setLingerBounds shortens the bounds on a call whose client left, for
// one test.
func setLingerBounds(t *testing.T, d time.Duration, bytes int64) {
	t.Helper()
	oldTime, oldBytes := lingerBounds.time.Load(), lingerBounds.bytes.Load()
	lingerBounds.time.Store(int64(d))
	lingerBounds.bytes.Store(bytes)
	t.Cleanup(func() {
		lingerBounds.time.Store(oldTime)
		lingerBounds.bytes.Store(oldBytes)
	})
}

// TestClientLeavesMidStream: a client that reads a few events of a slow
// stream and hangs up never lowers the charge. Through a real Caddy, a real
// streaming upstream and a real redis-server, in OpenAI's format and in
// Anthropic's: the gateway reads the answer on to its final usage event and
// charges all of it; an upstream that never reports usage and hangs, or
// streams on without end, is cut at the bounds and charged the hold (20);
// and a call with an Idempotency-Key is kept for its retries.
func TestClientLeavesMidStream(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	up := startLingerUpstream(t)
	port := freePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	loadCaddyfile(t, strings.NewReplacer("{REDIS}", srv.Addr, "{PORT}", fmt.Sprint(port), "{UPSTREAM}", up.URL).Replace(lingerCaddyfile))
	g := &gateway{t: t, url: base, adminURL: base + "/admin", client: &http.Client{Timeout: 20 * time.Second}}

	// leave calls path for org, reads events data lines, and hangs up.
	leave := func(t *testing.T, path, org string, events int, header ...string) {
		t.Helper()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+path, strings.NewReader(`{"stream":true}`))
		req.Header.Set("X-Org-Id", org)
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := g.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Credits-Hold") != "20" {
			t.Fatalf("%s: %d, Credits-Hold %q", path, resp.StatusCode, resp.Header.Get("Credits-Hold"))
		}
		readEvents(t, resp.Body, events)
		cancel()
		resp.Body.Close()
	}
	const start = 100_000
	charged := func(org string) int64 { return start + 100 - g.balance(org) }

	for _, tc := range []struct {
		name, path string
		events     int
		want       int64 // the charge: the final usage the upstream sent, or the hold
		finished   bool  // the upstream sent its answer to the end
	}{
		{"OpenAI: the usage comes after the client left", "/ai/openai/slow", 3, 10_001, true},
		{"Anthropic: message_delta comes after the client left", "/ai/anthropic/slow", 21, 15_001, true},
		{"OpenAI: no usage, the upstream hangs past the time bound", "/ai/openai/hang", 3, 20, false},
		{"Anthropic: partial usage, the upstream hangs past the time bound", "/ai/anthropic/hang", 3, 20, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g.t = t
			setLingerBounds(t, time.Second, lingerBytes)
			org := strings.NewReplacer(" ", "-", ":", "", ",", "", "_", "").Replace(tc.name)[:30]
			g.topUp(org, start)
			began := time.Now()
			leave(t, tc.path, org, tc.events)
			up.waitDone(t, org, 15*time.Second)
			sent := up.of(org)
			if sent.finished != tc.finished || (tc.finished && sent.usage != tc.want) {
				t.Fatalf("the upstream sent %+v (charged %d); want finished %v with usage %d", sent, charged(org), tc.finished, tc.want)
			}
			if !tc.finished && time.Since(began) > 10*time.Second {
				t.Fatalf("the upstream was cut after %s, past the bound of 1s", time.Since(began))
			}
			waitFor(t, fmt.Sprintf("a charge of %d", tc.want), func() bool { return charged(org) == tc.want })
		})
	}

	t.Run("an answer without end is cut at the byte bound and charged the hold", func(t *testing.T) {
		g.t = t
		setLingerBounds(t, lingerTime, 256<<10)
		org := "endless"
		g.topUp(org, start)
		began := time.Now()
		leave(t, "/ai/openai/endless", org, 3)
		up.waitDone(t, org, 20*time.Second)
		if d := time.Since(began); d > 15*time.Second {
			t.Fatalf("the upstream was cut after %s: not by the byte bound", d)
		}
		if b := up.of(org).bytes; b < 256<<10 || b > 4<<20 {
			t.Fatalf("the upstream sent %d bytes (charged %d); want the 256 KiB bound and not much more", b, charged(org))
		}
		waitFor(t, "the hold", func() bool { return charged(org) == 20 })
	})

	t.Run("a keyed call whose client left is kept for its retries", func(t *testing.T) {
		g.t = t
		setLingerBounds(t, lingerTime, lingerBytes)
		org := "keyed-leaver"
		g.topUp(org, start)
		leave(t, "/ai/openai/slow", org, 3, "Idempotency-Key", "k-leave")
		up.waitDone(t, org, 15*time.Second)
		var r reply
		waitFor(t, "an answer other than 409 in flight", func() bool {
			r = g.call("/ai/openai/slow", org, "Idempotency-Key", "k-leave", "Content-Type", "application/json")
			return r.status != http.StatusConflict
		})
		wantStatus(t, r, http.StatusOK)
		wantHeaders(t, r, map[string]string{"Idempotent-Replayed": "true", "Credits-Charged": "0"})
		if !strings.Contains(string(r.body), `"completion_tokens":10000`) || !strings.Contains(string(r.body), "[DONE]") {
			t.Fatalf("the replay is not the whole answer: %q", r.body)
		}
		if s := up.of(org); s.calls != 1 || s.usage != 10_001 {
			t.Fatalf("the upstream sent %+v; want one call reporting 10001", s)
		}
		if c := charged(org); c != 10_001 {
			t.Fatalf("charged %d, want 10001", c)
		}
	})

	t.Run("a keyed call the upstream cut is done: its retries get 409 not kept, not in flight", func(t *testing.T) {
		g.t = t
		org := "keyed-cut"
		g.topUp(org, start)
		req, _ := http.NewRequest(http.MethodPost, base+"/ai/openai/cut", nil)
		req.Header.Set("X-Org-Id", org)
		req.Header.Set("Idempotency-Key", "k-cut")
		resp, err := g.client.Do(req)
		if err == nil {
			_, err = io.ReadAll(resp.Body)
			resp.Body.Close()
		}
		if err == nil {
			t.Fatal("the client did not see the cut")
		}
		waitFor(t, "the charge of the usage seen", func() bool { return charged(org) == 100 })
		r := g.call("/ai/openai/cut", org, "Idempotency-Key", "k-cut")
		wantStatus(t, r, http.StatusConflict)
		if p := r.problem(t); p["type"] != "https://creditsgw.dev/problems/idempotency-response-not-kept" {
			t.Fatalf("problem %v", p)
		}
		if s := up.of(org); s.calls != 1 || charged(org) != 100 {
			t.Fatalf("upstream calls %d, charged %d; want 1 call charged 100", s.calls, charged(org))
		}
	})
}
