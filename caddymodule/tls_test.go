package caddymodule

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/creditsgw/caddy-credits/internal/redistest"
)

// tlsPassword is the TLS Redis' password: no output may show it.
const tlsPassword = "tls-pass-5e2a"

// startTLSRedis starts a redis-server that listens with TLS only, with a
// certificate of ca, and requires a client certificate of ca.
func startTLSRedis(t *testing.T, ca *redistest.CA) *redistest.Server {
	t.Helper()
	return redistest.Start(t, redistest.Options{TLS: ca.Server(t, true), Password: tlsPassword})
}

// TestRedisTLS charges through a gateway that reaches Redis over TLS with
// tls_ca and tls_client, by a rediss:// URL, to a Cluster (host:port seeds,
// put on TLS by the options) and through Sentinel (the sentinels on TLS
// too): every org's balance is its start less the calls
// the upstream answered.
func TestRedisTLS(t *testing.T) {
	ca := redistest.NewCA(t, "credits")
	cert, key := ca.Issue(t, "gateway", false)
	files := fmt.Sprintf("tls_ca %s\n\t\ttls_client %s %s", ca.File, cert, key)
	for _, tc := range []struct {
		name  string
		start func(t *testing.T) (store string, srv *redistest.Server)
	}{
		{"rediss URL", func(t *testing.T) (string, *redistest.Server) {
			srv := startTLSRedis(t, ca)
			return fmt.Sprintf("redis rediss://:%s@%s\n\t\t%s", tlsPassword, srv.Addr, files), srv
		}},
		{"cluster", func(t *testing.T) (string, *redistest.Server) {
			cluster := redistest.StartClusterTLS(t, 3, 0, ca.Server(t, true))
			return fmt.Sprintf("redis_cluster %s\n\t\t%s", strings.Join(cluster.Addrs, " "), files), cluster.Nodes[0]
		}},
		{"sentinel", func(t *testing.T) (string, *redistest.Server) {
			set := redistest.StartSentinel(t, redistest.SentinelOptions{Master: "tls-main",
				Server: redistest.Options{TLS: ca.Server(t, true), Password: tlsPassword}})
			return fmt.Sprintf("redis_sentinel tls-main %s {\n\t\t\tpassword %s\n\t\t}\n\t\t%s",
				strings.Join(set.Addrs, " "), tlsPassword, files), set.Servers[0]
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store, srv := tc.start(t)
			g := startGateway(t, gatewayOptions{store: store})
			g.redis = srv
			orgs := setupFaultOrgs(g, 3)
			stop := make(chan struct{})
			res, wait := runLoad(g, orgs, 4, stop)
			res.waitDone(t, 300)
			close(stop)
			wait()
			wantOnly(t, res, http.StatusOK)
			checkExact(t, g, orgs)
			if n := g.upstream.calls.Load(); n < 300 {
				t.Errorf("the upstream answered %d calls, want at least 300", n)
			}
		})
	}
}

// TestRedisTLSFailsAtStart: a TLS setting that can never connect stops
// caddy run with an error that names the problem, never the password. A
// Redis over TLS that is merely not there yet is only a warning.
func TestRedisTLSFailsAtStart(t *testing.T) {
	ca := redistest.NewCA(t, "credits")
	srv := startTLSRedis(t, ca)
	cert, key := ca.Issue(t, "gateway", false)
	other := redistest.NewCA(t, "other")
	notCert := filepath.Join(t.TempDir(), "not-a-certificate.pem")
	if err := os.WriteFile(notCert, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "missing.pem")
	url := fmt.Sprintf("rediss://:%s@%s", tlsPassword, srv.Addr)
	for _, tc := range []struct {
		name, settings string
		want           []string
	}{
		{"tls_ca missing", fmt.Sprintf("tls_ca %s\n\t\ttls_client %s %s", missing, cert, key),
			[]string{"tls_ca: cannot read " + missing, "no such file"}},
		{"tls_client key missing", fmt.Sprintf("tls_ca %s\n\t\ttls_client %s %s", ca.File, cert, missing),
			[]string{"tls_client: cannot read " + missing}},
		{"tls_client cert not a certificate", fmt.Sprintf("tls_ca %s\n\t\ttls_client %s %s", ca.File, notCert, key),
			[]string{"tls_client", notCert}},
		{"server certificate of another CA", fmt.Sprintf("tls_ca %s\n\t\ttls_client %s %s", other.File, cert, key),
			[]string{"TLS connection to Redis at " + srv.Addr + " failed", "certificate signed by unknown authority"}},
		{"no client certificate", fmt.Sprintf("tls_ca %s", ca.File),
			[]string{"TLS connection to Redis at " + srv.Addr + " failed", "remote error: tls: ", "needs the gateway's certificate in tls_client"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "Caddyfile")
			cfg := fmt.Sprintf(credentialsCaddyfile, "off", url+"\n\t\t"+tc.settings, fmt.Sprintf("127.0.0.1:%d", freePort(t)))
			if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
				t.Fatal(err)
			}
			out, err := runCaddyCommand(t, "run", "--config", path, "--adapter", "caddyfile")
			if exitErr, ok := errors.AsType[*exec.ExitError](err); !ok || exitErr.ExitCode() == 0 {
				t.Fatalf("caddy run: %v, want a non-zero exit\n%s", err, out)
			}
			all := out + err.Error()
			for _, w := range tc.want {
				if !strings.Contains(all, w) {
					t.Errorf("the output does not say %q:\n%s", w, all)
				}
			}
			if strings.Contains(all, tlsPassword) {
				t.Errorf("the output shows the password:\n%s", all)
			}
		})
	}

	t.Run("unreachable at start", func(t *testing.T) {
		site := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		dead := fmt.Sprintf("rediss://:%s@127.0.0.1:%d\n\t\ttls_ca %s\n\t\ttls_client %s %s", tlsPassword, freePort(t), ca.File, cert, key)
		p := startCaddyProcess(t, fmt.Sprintf(credentialsCaddyfile, "off", dead, site), site)
		eventually(t, "the warning is logged", func() bool {
			return strings.Contains(p.output(), "cannot reach Redis at start")
		})
		if strings.Contains(p.output(), tlsPassword) {
			t.Errorf("the log shows the password:\n%s", p.output())
		}
	})
}

// TestProbeTLS: when a start's ping saw only a dropped connection, the TLS
// 1.2 probe finds a server's refusal of a missing client certificate (TLS
// 1.3 may show the client only a reset), and finds nothing against a
// server that takes the client.
func TestProbeTLS(t *testing.T) {
	ca := redistest.NewCA(t, "credits")
	srv := startTLSRedis(t, ca)
	reset := errors.New("write: connection reset by peer")
	noCert := &store{probe: []string{srv.Addr}, tls: &tls.Config{RootCAs: ca.Pool()}}
	if err := noCert.probeTLS(reset); err == reset || !refusedTLS(err) {
		t.Errorf("without a client certificate: %v, want the server's refusal", err)
	}
	cert, key := ca.Issue(t, "gateway", false)
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	withCert := &store{probe: []string{srv.Addr}, tls: &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{pair}}}
	if err := withCert.probeTLS(reset); err != reset {
		t.Errorf("with a client certificate: %v, want the ping's own error", err)
	}
}
