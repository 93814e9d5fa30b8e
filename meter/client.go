package meter

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// ClientOptions says which Redis to talk to: a URL, Cluster seed nodes, or
// a Sentinel's master.
type ClientOptions struct {
	// URL is a redis:// or rediss:// URL (user, password and db in it).
	URL string
	// Cluster lists Redis Cluster seed nodes instead of URL: host:port, or
	// redis:// or rediss:// URLs with the cluster's user, password and TLS
	// (see ClusterOptions).
	Cluster []string
	// Sentinel names a master that Redis Sentinel watches, instead of URL
	// or Cluster.
	Sentinel *SentinelOptions
	// TLS holds the files that verify Redis and identify the gateway to it.
	TLS TLSFiles
	// PoolSize is the connections per node; 0 means go-redis' default.
	PoolSize int
}

// SentinelOptions says how to find a master through Redis Sentinel.
type SentinelOptions struct {
	// Master is the name the sentinels know the master by.
	Master string
	// Addrs are the sentinels' host:port addresses.
	Addrs []string
	// Username and Password are the master's (and its replicas')
	// credentials.
	Username, Password string
	// SentinelPassword is the sentinels' own password (requirepass).
	SentinelPassword string
	// DB is the database number on the master.
	DB int
}

// TLSFiles are PEM files for a connection to Redis over TLS.
type TLSFiles struct {
	// CA verifies Redis' certificate instead of the system's roots.
	CA string
	// Cert and Key are the gateway's client certificate, for a Redis with
	// tls-auth-clients.
	Cert, Key string
}

// set reports whether any file is given.
func (f TLSFiles) set() bool { return f.CA != "" || f.Cert != "" }

// config returns a TLS config that trusts f.CA (the system's roots when
// empty) and presents f.Cert; base, when not nil, is the URL's. The errors
// name the file and what is wrong with it.
func (f TLSFiles) config(base *tls.Config) (*tls.Config, error) {
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if base != nil {
		c = base.Clone()
	}
	if f.CA != "" {
		pem, err := os.ReadFile(f.CA)
		if err != nil {
			return nil, fmt.Errorf("tls_ca: cannot read %s: %w", f.CA, errors.Unwrap(err))
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls_ca: %s holds no PEM certificate", f.CA)
		}
		c.RootCAs = pool
	}
	if f.Cert != "" || f.Key != "" {
		for _, p := range []string{f.Cert, f.Key} {
			if _, err := os.Stat(p); err != nil {
				return nil, fmt.Errorf("tls_client: cannot read %s: %w", p, errors.Unwrap(err))
			}
		}
		cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
		if err != nil {
			return nil, fmt.Errorf("tls_client: %s and %s: %w", f.Cert, f.Key, err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// NewClient returns a client with settings that cannot charge twice and that
// honour deadlines: go-redis never resends a command by itself (a lost reply
// to a resent charge would be a second charge; the ledger retries only what
// its request ids make safe), and every call ends at its context's deadline.
func NewClient(o ClientOptions) (redis.UniversalClient, error) {
	given := 0
	for _, set := range []bool{o.URL != "", len(o.Cluster) > 0, o.Sentinel != nil} {
		if set {
			given++
		}
	}
	switch {
	case given > 1:
		return nil, fmt.Errorf("more than one of a Redis URL, Cluster nodes and a Sentinel: choose one")
	case len(o.Cluster) > 0:
		opts, err := ClusterOptions(o.Cluster)
		if err != nil {
			return nil, err
		}
		if o.TLS.set() {
			for _, seed := range o.Cluster {
				if strings.HasPrefix(seed, "redis://") {
					return nil, errors.New("tls_ca and tls_client need rediss:// seed URLs (or host:port seeds)")
				}
			}
			if opts.TLSConfig, err = o.TLS.config(opts.TLSConfig); err != nil {
				return nil, err
			}
		}
		opts.MaxRetries = -1
		opts.ContextTimeoutEnabled = true
		opts.PoolSize = o.PoolSize
		return redis.NewClusterClient(opts), nil
	case o.Sentinel != nil:
		s := o.Sentinel
		if s.Master == "" || len(s.Addrs) == 0 {
			return nil, errors.New("redis_sentinel needs the master's name and at least one sentinel")
		}
		opts := &redis.FailoverOptions{
			MasterName:            s.Master,
			SentinelAddrs:         s.Addrs,
			SentinelPassword:      s.SentinelPassword,
			Username:              s.Username,
			Password:              s.Password,
			DB:                    s.DB,
			MaxRetries:            -1,
			ContextTimeoutEnabled: true,
			PoolSize:              o.PoolSize,
		}
		// The sentinels and the servers share one TLS setting, as go-redis
		// dials both with it: the files turn it on.
		if o.TLS.set() {
			var err error
			if opts.TLSConfig, err = o.TLS.config(nil); err != nil {
				return nil, err
			}
		}
		return redis.NewFailoverClient(opts), nil
	case o.URL != "":
		opts, err := ParseURL(o.URL)
		if err != nil {
			return nil, err
		}
		if o.TLS.set() {
			if opts.TLSConfig == nil {
				return nil, errors.New("tls_ca and tls_client need a rediss:// URL")
			}
			if opts.TLSConfig, err = o.TLS.config(opts.TLSConfig); err != nil {
				return nil, err
			}
		}
		opts.MaxRetries = -1
		opts.ContextTimeoutEnabled = true
		if o.PoolSize > 0 {
			opts.PoolSize = o.PoolSize
		}
		return redis.NewClient(opts), nil
	}
	return nil, fmt.Errorf("no Redis URL, Cluster nodes or Sentinel")
}

// ClusterOptions parses Redis Cluster seed nodes: each is host:port, or a
// redis:// or rediss:// URL. The user, password and TLS of the URLs are the
// cluster's, so the URLs must agree on them, name no db but 0, and a
// host:port seed uses them too. With rediss://, each node's certificate is
// checked against the address the cluster gives for that node. Its errors
// never quote a seed, which may hold a password.
func ClusterOptions(seeds []string) (*redis.ClusterOptions, error) {
	if len(seeds) == 0 {
		return nil, errors.New("no Redis Cluster seed nodes")
	}
	o := &redis.ClusterOptions{}
	var first *redis.Options
	for i, seed := range seeds {
		if !strings.Contains(seed, "://") {
			if _, _, err := net.SplitHostPort(seed); err != nil {
				return nil, fmt.Errorf("redis_cluster seed %d: must be host:port or a redis:// or rediss:// URL", i+1)
			}
			o.Addrs = append(o.Addrs, seed)
			continue
		}
		u, err := ParseURL(seed)
		if err != nil {
			return nil, fmt.Errorf("redis_cluster seed %d: %w", i+1, err)
		}
		if u.DB != 0 {
			return nil, fmt.Errorf("redis_cluster seed %d: a Redis Cluster has only db 0", i+1)
		}
		if first == nil {
			first = u
		} else if u.Username != first.Username || u.Password != first.Password || (u.TLSConfig == nil) != (first.TLSConfig == nil) {
			return nil, fmt.Errorf("redis_cluster seed %d: its user, password or scheme differs from an earlier seed's; a cluster has one", i+1)
		}
		o.Addrs = append(o.Addrs, u.Addr)
	}
	if first != nil {
		o.Username, o.Password = first.Username, first.Password
		if first.TLSConfig != nil {
			o.TLSConfig = first.TLSConfig.Clone()
			// Each node is checked against its own address.
			o.TLSConfig.ServerName = ""
		}
	}
	return o, nil
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
