package caddymodule

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// streamUpstream is a real AI backend stand-in that streams: each path
// answers in one of the formats the gateway reads, flushing every chunk.
func streamUpstream(t *testing.T) *httptest.Server {
	t.Helper()
	sse := func(w http.ResponseWriter, events []string, gap time.Duration) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		for _, e := range events {
			io.WriteString(w, e+"\n\n")
			http.NewResponseController(w).Flush()
			time.Sleep(gap)
		}
	}
	chunk := func(model, text string) string {
		return fmt.Sprintf(`data: {"model":%q,"choices":[{"delta":{"content":%q}}],"usage":null}`, model, text)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		switch strings.TrimPrefix(r.URL.Path, "/ai/") {
		case "openai/json":
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"id":"x","model":"gpt-4o-mini","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":1000,"completion_tokens":2000,"total_tokens":3000}}`)
		case "openai/sse":
			sse(w, []string{chunk("gpt-4o-mini", "Hel"), chunk("gpt-4o-mini", "lo"),
				`data: {"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":2000}}`, "data: [DONE]"}, 100*time.Millisecond)
		case "openai/sse-other":
			sse(w, []string{chunk("mystery-1", "x"), `data: {"model":"mystery-1","usage":{"prompt_tokens":1000,"completion_tokens":1000}}`, "data: [DONE]"}, 0)
		case "openai/sse-noprice":
			sse(w, []string{`data: {"model":"llama-3","usage":{"prompt_tokens":1000,"completion_tokens":1000}}`, "data: [DONE]"}, 0)
		case "openai/sse-nomodel":
			sse(w, []string{`data: {"usage":{"prompt_tokens":1000,"completion_tokens":2000}}`, "data: [DONE]"}, 0)
		case "openai/sse-nousage":
			sse(w, []string{chunk("gpt-4o-mini", "no usage here"), "data: [DONE]"}, 0)
		case "openai/sse-cut":
			sse(w, []string{chunk("gpt-4o-mini", "half an ans")}, 0)
			panic(http.ErrAbortHandler) // the connection drops mid-stream
		case "openai/sse-cut-after-usage":
			sse(w, []string{`data: {"model":"gpt-4o-mini","usage":{"prompt_tokens":500,"completion_tokens":500}}`}, 0)
			panic(http.ErrAbortHandler)
		case "openai/sse-long":
			events := make([]string, 60)
			for i := range events {
				events[i] = chunk("gpt-4o-mini", "word ")
			}
			events[1] = `data: {"model":"gpt-4o-mini","usage":{"prompt_tokens":1000,"completion_tokens":1000}}`
			sse(w, events, 50*time.Millisecond)
		case "anthropic/sse":
			sse(w, []string{
				"event: message_start\n" + `data: {"type":"message_start","message":{"id":"m","model":"claude-3-5-haiku","usage":{"input_tokens":300,"output_tokens":1}}}`,
				"event: content_block_delta\n" + `data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}`,
				"event: message_delta\n" + `data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":500}}`,
				"event: message_stop\n" + `data: {"type":"message_stop"}`,
			}, 50*time.Millisecond)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

const streamCaddyfile = `{
	admin off
	servers {
		protocols h1 h2c
	}
	credits {
		redis redis://{REDIS}
		default_plan 100
	}
}
http://127.0.0.1:{PORT} {
	route /ai/openai/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature rich-text
			cost 5
			usage openai
			price gpt-4o* 2000 8000
			price mystery-* 1000 1000
		}
		reverse_proxy {UPSTREAM} {
			flush_interval -1
		}
	}
	route /ai/anthropic/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature rich-text
			cost 5
			usage anthropic
			price claude-* 3000 15000
		}
		reverse_proxy {UPSTREAM} {
			flush_interval -1
		}
	}
	route /ai/block/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature rich-text
			cost 50
			usage openai
			price * 1000 1000
		}
		rewrite * /ai/openai/sse
		reverse_proxy {UPSTREAM}
	}
	handle_path /admin/* {
		credits_admin
	}
}
`

// TestStreamedUsage: calls on usage openai|anthropic routes are charged the
// price of the tokens their answers report, read as the body streams
// through a real Caddy from a real streaming upstream, with the final
// charge in the trailers.
func TestStreamedUsage(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	up := streamUpstream(t)
	port := freePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	loadCaddyfile(t, strings.NewReplacer("{REDIS}", srv.Addr, "{PORT}", fmt.Sprint(port), "{UPSTREAM}", up.URL).Replace(streamCaddyfile))
	g := &gateway{t: t, url: base, adminURL: base + "/admin", client: &http.Client{Timeout: 20 * time.Second}}
	h2 := &http.Client{Timeout: 20 * time.Second, Transport: &http2.Transport{AllowHTTP: true,
		DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		}}}

	call := func(t *testing.T, client *http.Client, path, org, body string) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, base+path, strings.NewReader(body))
		req.Header.Set("X-Org-Id", org)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		return resp, string(data)
	}
	for _, tc := range []struct {
		name, path, body string
		client           *http.Client
		charged          int64
		wantBody         string
	}{
		// (1000*2000 + 2000*8000) / 1e6 = 18.
		{"OpenAI JSON", "/ai/openai/json", "", g.client, 18, `"total_tokens":3000`},
		{"OpenAI SSE over HTTP/1.1", "/ai/openai/sse", "", g.client, 18, "data: [DONE]"},
		{"OpenAI SSE over HTTP/2", "/ai/openai/sse", "", h2, 18, "data: [DONE]"},
		// (300*3000 + 500*15000) / 1e6 = 8.4, rounded up.
		{"Anthropic SSE", "/ai/anthropic/sse", "", g.client, 9, "message_stop"},
		{"the second price glob", "/ai/openai/sse-other", "", g.client, 2, "[DONE]"},
		{"a model with no price is charged the hold", "/ai/openai/sse-noprice", "", g.client, 5, "[DONE]"},
		{"the model named in the request", "/ai/openai/sse-nomodel", `{"model":"gpt-4o","stream":true}`, g.client, 18, "[DONE]"},
		{"no usage is charged the hold", "/ai/openai/sse-nousage", "", g.client, 5, "no usage here"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g.t = t
			org := strings.NewReplacer(" ", "-", "/", "-", ".", "").Replace(tc.name)
			resp, body := call(t, tc.client, tc.path, org, tc.body)
			if resp.StatusCode != http.StatusOK || !strings.Contains(body, tc.wantBody) {
				t.Fatalf("%d %q", resp.StatusCode, body)
			}
			if h := resp.Header.Get("Credits-Hold"); h != "5" {
				t.Fatalf("Credits-Hold %q", h)
			}
			if r := resp.Header.Get("Credits-Remaining"); r != "95" {
				t.Fatalf("Credits-Remaining %q after the hold", r)
			}
			want := fmt.Sprint(tc.charged)
			if c := resp.Trailer.Get("Credits-Charged"); c != want {
				t.Fatalf("trailer Credits-Charged %q, want %s; trailers %v", c, want, resp.Trailer)
			}
			if r := resp.Trailer.Get("Credits-Remaining"); r != fmt.Sprint(100-tc.charged) {
				t.Fatalf("trailer Credits-Remaining %q", r)
			}
			if b := g.balance(org); b != 100-tc.charged {
				t.Fatalf("balance %d, want %d", b, 100-tc.charged)
			}
			events := g.admin(http.MethodGet, "/orgs/"+org+"/events", "")
			if tc.charged != 5 && !strings.Contains(string(events.body), `"kind":"settle"`) {
				t.Fatalf("no settle event: %s", events.body)
			}
		})
	}

	t.Run("a stream the upstream cuts before any usage is refunded", func(t *testing.T) {
		g.t = t
		req, _ := http.NewRequest(http.MethodPost, base+"/ai/openai/sse-cut", nil)
		req.Header.Set("X-Org-Id", "cut")
		resp, err := g.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil || !strings.Contains(string(body), "half an ans") {
			t.Fatalf("the client did not see the cut: %q %v", body, err)
		}
		waitFor(t, "the refund", func() bool { return g.balance("cut") == 100 })
	})

	t.Run("a stream cut after its usage is charged the usage", func(t *testing.T) {
		g.t = t
		req, _ := http.NewRequest(http.MethodPost, base+"/ai/openai/sse-cut-after-usage", nil)
		req.Header.Set("X-Org-Id", "cut-late")
		if resp, err := g.client.Do(req); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		// (500*2000 + 500*8000) / 1e6 = 5: the usage, not a refund.
		waitFor(t, "the settle", func() bool {
			for _, ev := range strings.Split(string(g.admin(http.MethodGet, "/orgs/cut-late/events", "").body), "},{") {
				if strings.Contains(ev, `"kind":"charge"`) {
					return g.balance("cut-late") == 95
				}
			}
			return false
		})
	})

	t.Run("a client gone mid-stream is charged the usage seen", func(t *testing.T) {
		g.t = t
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/ai/openai/sse-long", nil)
		req.Header.Set("X-Org-Id", "leaver")
		resp, err := g.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		readEvents(t, resp.Body, 3)
		cancel()
		resp.Body.Close()
		// (1000*2000 + 1000*8000) / 1e6 = 10.
		waitFor(t, "the charge of the usage seen", func() bool { return g.balance("leaver") == 90 })
	})

	t.Run("a block route whose org cannot cover the hold refuses", func(t *testing.T) {
		g.t = t
		g.admin(http.MethodPut, "/orgs/poor/plan", `{"allowance": 40, "recharge_month": 1}`)
		resp, body := call(t, g.client, "/ai/block/x", "poor", "")
		if resp.StatusCode != http.StatusPaymentRequired || !strings.Contains(body, "insufficient-credits") {
			t.Fatalf("%d %s", resp.StatusCode, body)
		}
		if b := g.balance("poor"); b != 40 {
			t.Fatalf("balance %d", b)
		}
	})
}

// readEvents reads a server-sent event stream until n data lines have
// passed.
func readEvents(t *testing.T, body io.Reader, n int) {
	t.Helper()
	rd := bufio.NewReader(body)
	for seen := 0; seen < n; {
		line, err := rd.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(line, "data:") {
			seen++
		}
	}
}
