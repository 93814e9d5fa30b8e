package caddymodule

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
)

// bigStream is an upstream that streams size bytes of server-sent events,
// then the chunk with the usage.
func bigStream(t testing.TB, size int64) *httptest.Server {
	t.Helper()
	line := []byte(`data: {"model":"gpt-4o","choices":[{"delta":{"content":"` + strings.Repeat("x", 960) + `"}}],"usage":null}` + "\n\n")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		bw := bufio.NewWriterSize(w, 64<<10)
		for n := int64(0); n < size; n += int64(len(line)) {
			if _, err := bw.Write(line); err != nil {
				return
			}
		}
		io.WriteString(bw, `data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":1000}}`+"\n\ndata: [DONE]\n\n")
		bw.Flush()
	}))
	t.Cleanup(srv.Close)
	return srv
}

const bigStreamCaddyfile = `{
	admin off
	credits {
		default_plan 1000
	}
}
http://127.0.0.1:{PORT} {
	route /metered/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature rich-text
			cost 5
			usage openai
			price * 1000 1000
		}
		reverse_proxy {UPSTREAM} {
			flush_interval -1
		}
	}
	route /plain/* {
		reverse_proxy {UPSTREAM} {
			flush_interval -1
		}
	}
}
`

// TestStreamMemory: a 1 GiB stream through a metered route grows the
// gateway's peak memory by less than 16 MiB, and is charged its usage.
func TestStreamMemory(t *testing.T) {
	const size = 1 << 30
	up := bigStream(t, size)
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	p := startCaddyProcess(t, strings.NewReplacer("{PORT}", fmt.Sprint(port), "{UPSTREAM}", up.URL).Replace(bigStreamCaddyfile), addr)
	stream := func(org string) (int64, *http.Response) {
		req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/metered/x", nil)
		req.Header.Set("X-Org-Id", org)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		n, err := io.Copy(io.Discard, resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return n, resp
	}
	// A first stream settles the process's own buffers and pools.
	stream("warm")
	before := peakRSS(t, p.cmd.Process.Pid)
	n, resp := stream("big")
	after := peakRSS(t, p.cmd.Process.Pid)
	if n < size {
		t.Fatalf("the client got %d bytes of %d", n, size)
	}
	if resp.Trailer.Get("Credits-Charged") != "2" {
		t.Fatalf("trailers %v: want the usage's 2 credits charged", resp.Trailer)
	}
	growth := after - before
	t.Logf("peak RSS %d MiB before, %d MiB after a %d MiB stream", before>>20, after>>20, n>>20)
	if growth >= 16<<20 {
		t.Fatalf("the gateway's peak memory grew by %d MiB over a 1 GiB stream", growth>>20)
	}
}

// peakRSS reads a process's peak resident memory (VmHWM), in bytes.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range bytes.Split(data, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("VmHWM:")); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(string(v), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc status")
	return 0
}
