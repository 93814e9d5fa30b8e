package main

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// streamSize is the size of one stream of BenchmarkStream.
const streamSize = 64 << 20

// streamCaddyfile meters /metered/* by the usage of the stream it passes,
// on a real redis-server, and leaves /plain/* a reverse_proxy.
const streamCaddyfile = `{
	admin off
	credits {
		redis redis://{REDIS}
		default_plan 1000000000000
	}
}
http://127.0.0.1:{PORT} {
	route /metered/* {
		credits {
			org {http.request.header.X-Org-Id}
			feature bench
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

// BenchmarkStream streams 64 MiB of server-sent events (the usage in the
// last event) through a Caddy process, alternately through the plain route
// and the metered one that reads the stream's usage, and reports each
// one's MB/s and metered/plain, the ratio of their throughputs in the same
// run.
//
//	go test -run '^$' -bench Stream -benchtime 20x -count 5 ./bench/
func BenchmarkStream(b *testing.B) {
	ctx := context.Background()
	dir := b.TempDir()
	ps := &procs{dir: dir}
	b.Cleanup(func() { _ = ps.stopAll() })
	caddyBin, _, err := buildBinaries(ctx, dir)
	if err != nil {
		b.Fatal(err)
	}
	_, redisAddr, err := startRedis(ctx, ps, "redis")
	if err != nil {
		b.Fatal(err)
	}
	line := []byte(`data: {"model":"gpt-4o","choices":[{"delta":{"content":"` + strings.Repeat("x", 960) + `"}}],"usage":null}` + "\n\n")
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		bw := bufio.NewWriterSize(w, 64<<10)
		for n := 0; n < streamSize; n += len(line) {
			if _, err := bw.Write(line); err != nil {
				return
			}
		}
		io.WriteString(bw, `data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":1000}}`+"\n\ndata: [DONE]\n\n")
		bw.Flush()
	}))
	b.Cleanup(up.Close)
	port, err := freePort()
	if err != nil {
		b.Fatal(err)
	}
	cfg := strings.NewReplacer("{PORT}", strconv.Itoa(port), "{UPSTREAM}", up.URL, "{REDIS}", redisAddr).Replace(streamCaddyfile)
	cfgPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(caddyBin, "run", "--config", cfgPath, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	p, err := ps.start("caddy", cmd)
	if err != nil {
		b.Fatal(err)
	}
	base := "http://127.0.0.1:" + strconv.Itoa(port)
	client := &http.Client{Timeout: time.Minute}
	stream := func(route string) (int64, http.Header, error) {
		req, _ := http.NewRequest(http.MethodPost, base+"/"+route+"/v1/chat", nil)
		req.Header.Set("X-Org-Id", "bench")
		resp, err := client.Do(req)
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		n, err := io.Copy(io.Discard, resp.Body)
		return n, resp.Trailer, err
	}
	if err := awaitReady(ctx, p, func() error { _, _, err := stream("plain"); return err }); err != nil {
		b.Fatal(err)
	}
	// The metered route really reads the usage: 2 credits, not the hold.
	if _, trailer, err := stream("metered"); err != nil || trailer.Get("Credits-Charged") != "2" {
		b.Fatalf("metered stream: trailers %v, %v", trailer, err)
	}
	// Plain and metered streams take turns, so that both meet the same
	// machine: the figure to read is metered/plain, the metered route's
	// throughput against the plain one's.
	var took [2]time.Duration
	b.SetBytes(2 * streamSize)
	b.ResetTimer()
	for range b.N {
		for i, route := range []string{"plain", "metered"} {
			start := time.Now()
			if n, _, err := stream(route); err != nil || n < streamSize {
				b.Fatalf("%s: %d bytes: %v", route, n, err)
			}
			took[i] += time.Since(start)
		}
	}
	b.ReportMetric(float64(b.N)*streamSize/1e6/took[0].Seconds(), "plain-MB/s")
	b.ReportMetric(float64(b.N)*streamSize/1e6/took[1].Seconds(), "metered-MB/s")
	b.ReportMetric(took[0].Seconds()/took[1].Seconds(), "metered/plain")
}
