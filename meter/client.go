package meter

import (
	"errors"
	"fmt"
	"net/url"
	"sync"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// ClientOptions says which Redis to talk to.
type ClientOptions struct {
	// URL is a redis:// or rediss:// URL (user, password and db in it).
	URL string
	// Cluster lists Redis Cluster seed nodes, host:port, instead of URL.
	Cluster []string
	// PoolSize is the connections per node; 0 means go-redis' default.
	PoolSize int
}

// NewClient returns a client with settings that cannot charge twice and that
// honour deadlines: go-redis never resends a command by itself (a lost reply
// to a resent charge would be a second charge; the ledger retries only what
// its request ids make safe), and every call ends at its context's deadline.
func NewClient(o ClientOptions) (redis.UniversalClient, error) {
	switch {
	case o.URL != "" && len(o.Cluster) > 0:
		return nil, fmt.Errorf("both a Redis URL and Cluster nodes: choose one")
	case len(o.Cluster) > 0:
		return redis.NewClusterClient(&redis.ClusterOptions{
			Addrs:                 o.Cluster,
			MaxRetries:            -1,
			ContextTimeoutEnabled: true,
			PoolSize:              o.PoolSize,
		}), nil
	case o.URL != "":
		opts, err := ParseURL(o.URL)
		if err != nil {
			return nil, err
		}
		opts.MaxRetries = -1
		opts.ContextTimeoutEnabled = true
		if o.PoolSize > 0 {
			opts.PoolSize = o.PoolSize
		}
		return redis.NewClient(opts), nil
	}
	return nil, fmt.Errorf("no Redis URL or Cluster nodes")
}

// ParseURL parses a redis:// or rediss:// URL. Its errors never quote the
// URL, which may hold a password.
func ParseURL(s string) (*redis.Options, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, errors.New("invalid redis URL: it does not parse as a URL")
	}
	if u.Scheme != "redis" && u.Scheme != "rediss" {
		return nil, errors.New("invalid redis URL: it must start with redis:// or rediss://")
	}
	opts, err := redis.ParseURL(s)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			return nil, errors.New("invalid redis URL: it does not parse as a URL")
		}
		// go-redis names the part it rejects (db, an option), never the
		// user info.
		return nil, fmt.Errorf("invalid redis URL: %w", err)
	}
	return opts, nil
}

// Embedded is an in-process store, for trying the gateway without Redis: the
// same scripts on miniredis. Everything in it is lost when it closes.
type Embedded struct {
	srv    *miniredis.Miniredis
	client *redis.Client
	stop   chan struct{}
	done   sync.WaitGroup
}

// NewEmbedded starts an embedded store.
func NewEmbedded() (*Embedded, error) {
	srv := miniredis.NewMiniRedis()
	if err := srv.Start(); err != nil {
		return nil, fmt.Errorf("embedded store: %w", err)
	}
	e := &Embedded{
		srv: srv,
		client: redis.NewClient(&redis.Options{
			Addr:                  srv.Addr(),
			MaxRetries:            -1,
			ContextTimeoutEnabled: true,
		}),
		stop: make(chan struct{}),
	}
	// miniredis' clock stands still unless moved; move it so request
	// markers expire.
	e.done.Add(1)
	go func() {
		defer e.done.Done()
		t := time.NewTicker(time.Second)
		defer t.Stop()
		last := time.Now()
		for {
			select {
			case <-e.stop:
				return
			case now := <-t.C:
				srv.FastForward(now.Sub(last))
				last = now
			}
		}
	}()
	return e, nil
}

// Client returns a client of the embedded store.
func (e *Embedded) Client() redis.UniversalClient { return e.client }

// Close stops the store; its data is gone.
func (e *Embedded) Close() error {
	close(e.stop)
	e.done.Wait()
	err := e.client.Close()
	e.srv.Close()
	return err
}
