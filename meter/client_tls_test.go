package meter

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestNewClientSettings: the settings NewClient refuses, each with a
// message that names the setting or the file and never a password.
func TestNewClientSettings(t *testing.T) {
	notPEM := filepath.Join(t.TempDir(), "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "missing.pem")
	for _, tc := range []struct {
		name string
		o    ClientOptions
		want string
	}{
		{"URL and sentinel", ClientOptions{URL: "redis://:s3cret@a:1", Sentinel: &SentinelOptions{Master: "m", Addrs: []string{"a:2"}}}, "choose one"},
		{"sentinel without sentinels", ClientOptions{Sentinel: &SentinelOptions{Master: "m", Password: "s3cret"}}, "needs the master's name and at least one sentinel"},
		{"TLS files with redis://", ClientOptions{URL: "redis://:s3cret@a:1", TLS: TLSFiles{CA: notPEM}}, "need a rediss:// URL"},
		{"TLS files with a redis:// seed", ClientOptions{Cluster: []string{"redis://:s3cret@a:1"}, TLS: TLSFiles{CA: notPEM}}, "need rediss:// seed URLs"},
		{"CA missing", ClientOptions{URL: "rediss://:s3cret@a:1", TLS: TLSFiles{CA: missing}}, "tls_ca: cannot read " + missing + ": no such file"},
		{"CA not PEM", ClientOptions{URL: "rediss://:s3cret@a:1", TLS: TLSFiles{CA: notPEM}}, "tls_ca: " + notPEM + " holds no PEM certificate"},
		{"client key missing", ClientOptions{Sentinel: &SentinelOptions{Master: "m", Addrs: []string{"a:2"}}, TLS: TLSFiles{Cert: notPEM, Key: missing}}, "tls_client: cannot read " + missing},
		{"client certificate not PEM", ClientOptions{Cluster: []string{"a:1"}, TLS: TLSFiles{Cert: notPEM, Key: notPEM}}, "tls_client: " + notPEM},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := NewClient(tc.o)
			if err == nil {
				c.Close()
				t.Fatalf("no error, want one with %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "s3cret") {
				t.Fatalf("error %q, want one with %q and no password", err, tc.want)
			}
		})
	}
}
