package caddymodule

import (
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

// usageAnswer is what the upstream answered one org: its bytes and the
// tokens it reported.
type usageAnswer struct {
	bytes         int
	input, output int64
}

// jsonUsageUpstream answers JSON in OpenAI's or Anthropic's format: a path
// /<format>/<size>/<model> gets an answer of about size bytes (text
// between the model and the usage) naming model, with the tokens of the
// X-Input and X-Output headers. It records what it answered each org.
func jsonUsageUpstream(t *testing.T) (*httptest.Server, func(org string) usageAnswer) {
	t.Helper()
	var mu sync.Mutex
	answered := map[string]usageAnswer{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		parts := strings.SplitN(strings.TrimPrefix(r.URL.Path, "/ai/"), "/", 3)
		if len(parts) != 3 {
			http.NotFound(w, r)
			return
		}
		var size int
		fmt.Sscan(parts[1], &size)
		in, out := r.Header.Get("X-Input"), r.Header.Get("X-Output")
		var b strings.Builder
		fmt.Fprintf(&b, `{"id":"x","model":%q,`, parts[2])
		if parts[0] == "anthropic" {
			b.WriteString(`"type":"message","role":"assistant","content":[`)
		} else {
			b.WriteString(`"object":"chat.completion","choices":[`)
		}
		text := strings.Repeat(`a \"quoted\" word, {not: [json]} \u00e9\n`, 25)
		for i := 0; b.Len() < size; i++ {
			if i > 0 {
				b.WriteString(",")
			}
			if parts[0] == "anthropic" {
				fmt.Fprintf(&b, `{"type":"text","text":"%s"}`, text)
			} else {
				fmt.Fprintf(&b, `{"index":%d,"message":{"role":"assistant","content":"%s"},"finish_reason":"stop"}`, i, text)
			}
		}
		if parts[0] == "anthropic" {
			fmt.Fprintf(&b, `],"usage":{"input_tokens":%s,"output_tokens":%s}}`, in, out)
		} else {
			fmt.Fprintf(&b, `],"usage":{"prompt_tokens":%s,"completion_tokens":%s}}`, in, out)
		}
		a := usageAnswer{bytes: b.Len()}
		fmt.Sscan(in, &a.input)
		fmt.Sscan(out, &a.output)
		mu.Lock()
		answered[r.Header.Get("X-Org-Id")] = a
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, b.String())
	}))
	t.Cleanup(srv.Close)
	return srv, func(org string) usageAnswer {
		mu.Lock()
		defer mu.Unlock()
		return answered[org]
	}
}

const usageEdgesCaddyfile = `{
	admin off
	credits {
		redis redis://{REDIS}
		default_plan 100000
	}
}
http://127.0.0.1:{PORT} {
	route /ai/openai/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature rich-text
			cost 20
			usage openai
			price * 1000 2000
		}
		reverse_proxy {UPSTREAM}
	}
	route /ai/anthropic/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature rich-text
			cost 20
			usage anthropic
			price * 1000 2000
		}
		reverse_proxy {UPSTREAM}
	}
	route /ai/llama/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature rich-text
			cost 20
			usage openai
			price meta-llama/* 1000 4000
			price * 1 1
		}
		uri replace /ai/llama/ /ai/openai/ 1
		reverse_proxy {UPSTREAM}
	}
	route /ai/star/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature rich-text
			cost 20
			usage openai
			price * 1000 4000
		}
		uri replace /ai/star/ /ai/openai/ 1
		reverse_proxy {UPSTREAM}
	}
	handle_path /admin/* {
		credits_admin
	}
}
`

// TestUsageEdges: JSON answers are charged the price of the tokens they
// report whatever their size, and vendor/model names are priced by the
// globs that match them, through a real Caddy, a real upstream and a real
// redis-server. What the ledger charged each org is checked against what
// the upstream answered it.
func TestUsageEdges(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	up, answered := jsonUsageUpstream(t)
	port := freePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	loadCaddyfile(t, strings.NewReplacer("{REDIS}", srv.Addr, "{PORT}", fmt.Sprint(port), "{UPSTREAM}", up.URL).Replace(usageEdgesCaddyfile))
	g := &gateway{t: t, url: base, adminURL: base + "/admin", client: &http.Client{Timeout: 30 * time.Second}}

	for i, tc := range []struct {
		name, path    string
		input, output int64
		size          int   // the least size of the answer
		price         int64 // the credits the tokens cost
	}{
		// (1,001,000*1000 + 1,001,000*2000) / 1e6 = 3003.
		{"OpenAI JSON of 1 KB", "/ai/openai/1000/gpt-4o", 1_001_000, 1_001_000, 1000, 3003},
		{"OpenAI JSON of 1.1 MB", "/ai/openai/1100000/gpt-4o", 1_001_000, 1_001_000, 1_100_000, 3003},
		{"OpenAI JSON of 8 MB", "/ai/openai/8000000/gpt-4o", 1_001_000, 1_001_000, 8_000_000, 3003},
		{"Anthropic JSON of 1 KB", "/ai/anthropic/1000/claude-3-5-sonnet-20241022", 1_001_000, 1_001_000, 1000, 3003},
		{"Anthropic JSON of 1.1 MB", "/ai/anthropic/1100000/claude-3-5-sonnet-20241022", 1_001_000, 1_001_000, 1_100_000, 3003},
		// (1e6*1000 + 1e6*4000) / 1e6 = 5000.
		{"meta-llama/Llama-3-70b under price *", "/ai/star/1000/meta-llama/Llama-3-70b", 1_000_000, 1_000_000, 1000, 5000},
		{"openai/gpt-4o under price *", "/ai/star/1000/openai/gpt-4o", 1_000_000, 1_000_000, 1000, 5000},
		{"meta-llama/Llama-3-70b under price meta-llama/*", "/ai/llama/1000/meta-llama/Llama-3-70b", 1_000_000, 1_000_000, 1000, 5000},
		// The next price, * 1 1: (1e6 + 1e6) / 1e6 = 2.
		{"mistralai/Mixtral under price meta-llama/* falls to the next price", "/ai/llama/1000/mistralai/Mixtral-8x7B-Instruct-v0.1", 1_000_000, 1_000_000, 1000, 2},
	} {
		org := fmt.Sprintf("edges-%d", i)
		t.Run(tc.name, func(t *testing.T) {
			g.t = t
			req, _ := http.NewRequest(http.MethodPost, base+tc.path, strings.NewReader(`{}`))
			req.Header.Set("X-Org-Id", org)
			req.Header.Set("X-Input", fmt.Sprint(tc.input))
			req.Header.Set("X-Output", fmt.Sprint(tc.output))
			resp, err := g.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("%d %v", resp.StatusCode, err)
			}
			a := answered(org)
			if len(body) != a.bytes || a.bytes < tc.size {
				t.Fatalf("the client got %d bytes; the upstream answered %d, want at least %d", len(body), a.bytes, tc.size)
			}
			if a.input != tc.input || a.output != tc.output {
				t.Fatalf("the upstream answered %+v", a)
			}
			// Each org starts with the default plan's 100000.
			charged := 100000 - g.balance(org)
			if charged != tc.price {
				t.Fatalf("charged %d for a %d-byte answer of %d and %d tokens, want %d", charged, a.bytes, a.input, a.output, tc.price)
			}
			if c := resp.Trailer.Get("Credits-Charged"); c != fmt.Sprint(tc.price) {
				t.Fatalf("trailer Credits-Charged %q, want %d", c, tc.price)
			}
		})
	}
}
