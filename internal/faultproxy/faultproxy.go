// Package faultproxy is a TCP proxy for tests that puts network faults
// between a client and a server: latency, dropped connections, refused
// connections, and replies cut after the server has acted on the request.
package faultproxy

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Proxy forwards connections from Addr to a target address.
type Proxy struct {
	// Addr is where clients connect.
	Addr string

	target   string
	ln       net.Listener
	latency  atomic.Int64 // nanoseconds, added before each chunk either way
	cutEvery atomic.Int64 // cut every n-th reply; 0: never
	replies  atomic.Int64
	cuts     atomic.Int64
	refuse   atomic.Bool
	pipes    atomic.Int64

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	peak  int
	wg    sync.WaitGroup
}

// Start proxies to target until the test ends.
func Start(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{Addr: ln.Addr().String(), target: target, ln: ln, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// SetLatency delays every chunk of data, in both directions, by d.
func (p *Proxy) SetLatency(d time.Duration) { p.latency.Store(int64(d)) }

// CutReplyEvery drops every n-th reply from the server, after the server
// sent it (so it acted on the request), and closes that connection; 0 stops
// cutting. A reply is one chunk read from the server.
func (p *Proxy) CutReplyEvery(n int) { p.cutEvery.Store(int64(n)) }

// Refuse makes the proxy close new connections at once (on) and drops the
// open ones; off lets them through again.
func (p *Proxy) Refuse(on bool) {
	p.refuse.Store(on)
	if on {
		p.DropAll()
	}
}

// DropAll closes every open connection.
func (p *Proxy) DropAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
}

// Cuts returns how many replies were cut.
func (p *Proxy) Cuts() int64 { return p.cuts.Load() }

// Conns returns the connections open now and the most open at once.
func (p *Proxy) Conns() (now, peak int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns) / 2, p.peak
}

// Goroutines returns how many goroutines the proxy runs now, so that a test
// counting its own can leave them out.
func (p *Proxy) Goroutines() int { return int(p.pipes.Load()) + 1 }

// Close stops the proxy and closes its connections.
func (p *Proxy) Close() {
	p.ln.Close()
	p.DropAll()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		if p.refuse.Load() {
			client.Close()
			continue
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		p.mu.Lock()
		p.conns[client] = struct{}{}
		p.conns[server] = struct{}{}
		p.peak = max(p.peak, len(p.conns)/2)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(server, client, false)
		go p.pipe(client, server, true)
	}
}

// pipe copies from src to dst; replies is true for the server-to-client
// direction.
func (p *Proxy) pipe(dst, src net.Conn, replies bool) {
	p.pipes.Add(1)
	defer p.pipes.Add(-1)
	defer p.wg.Done()
	defer func() {
		src.Close()
		dst.Close()
		p.mu.Lock()
		delete(p.conns, src)
		delete(p.conns, dst)
		p.mu.Unlock()
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if d := time.Duration(p.latency.Load()); d > 0 {
				time.Sleep(d)
			}
			if replies {
				if every := p.cutEvery.Load(); every > 0 && p.replies.Add(1)%every == 0 {
					p.cuts.Add(1)
					return
				}
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
