package consul

import (
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshd/meshd/internal/testenv"
)

// meshd talks to an agent that serves its API over HTTPS only with a
// client certificate, the way production agents are often set up: the
// watch works with the right files and fails with a clear error without.
func TestWatchOverTLS(t *testing.T) {
	isolateEnv(t)
	files := testenv.NewTLSFiles(t)
	c := testenv.StartConsul(t, testenv.WithTLS(files))
	agentRegister(t, c.Client(t), &api.AgentServiceRegistration{ID: "s1", Name: "secure", Port: 9401, Address: "127.0.0.1"})
	node := c.NodeName()
	tlsConfig := func(tc TLSConfig) Config {
		log, _ := newLogger(t)
		cfg := testConfig(c, log)
		cfg.Address, cfg.Scheme, cfg.TLS = c.HTTPSAddr(), "https", tc
		return cfg
	}

	t.Run("with CA and client certificate", func(t *testing.T) {
		cfg := tlsConfig(TLSConfig{CAFile: files.CA, CertFile: files.ClientCert, KeyFile: files.ClientKey})
		w := startWatch(t, newSource(t, cfg), "secure", WatchOptions{})
		w.rec.wait(t, 0, 10*time.Second, "s1 over HTTPS", hasIDs(node+"/s1"))
	})

	t.Run("address with https scheme", func(t *testing.T) {
		cfg := tlsConfig(TLSConfig{CAFile: files.CA, CertFile: files.ClientCert, KeyFile: files.ClientKey})
		cfg.Address, cfg.Scheme = "https://"+c.HTTPSAddr(), ""
		w := startWatch(t, newSource(t, cfg), "secure", WatchOptions{})
		w.rec.wait(t, 0, 10*time.Second, "s1 over an https:// address", hasIDs(node+"/s1"))
	})

	for _, tc := range []struct {
		name string
		tls  TLSConfig
		want string
	}{
		{"unknown authority", TLSConfig{CAFile: files.OtherCA, CertFile: files.ClientCert, KeyFile: files.ClientKey}, "certificate signed by unknown authority"},
		{"no client certificate", TLSConfig{CAFile: files.CA}, "tls: certificate required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := startWatch(t, newSource(t, tlsConfig(tc.tls)), "secure", WatchOptions{})
			w.rec.wait(t, 0, 10*time.Second, "a TLS failure", failed)
			for _, e := range w.rec.all() {
				if e.u != nil {
					t.Fatalf("want no update over a failed handshake, have %v", e)
				}
			}
			msg := w.rec.all()[0].st.Err.Error()
			if !strings.HasPrefix(msg, `consul: watch "secure"`) || !strings.Contains(msg, tc.want) {
				t.Fatalf("want a watch error naming %q, have %q", tc.want, msg)
			}
		})
	}

	t.Run("missing CA file", func(t *testing.T) {
		_, err := New(tlsConfig(TLSConfig{CAFile: files.CA + ".missing"}))
		if err == nil || !strings.HasPrefix(err.Error(), "consul: client:") || !strings.Contains(err.Error(), ".missing") {
			t.Fatalf("want a client error naming the missing file, have %v", err)
		}
	})
}
