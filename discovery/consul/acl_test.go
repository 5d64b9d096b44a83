package consul

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshd/meshd/internal/testenv"
)

func TestWatchWithACLs(t *testing.T) {
	isolateEnv(t)
	c := testenv.StartConsul(t, testenv.WithACL())
	admin := c.Client(t)
	node := c.NodeName()

	policy, _, err := admin.ACL().PolicyCreate(&api.ACLPolicy{
		Name:  "meshd-discovery",
		Rules: `service_prefix "" { policy = "read" } node_prefix "" { policy = "read" }`,
	}, nil)
	if err != nil {
		t.Fatalf("create policy: %v", err)
	}
	reader, _, err := admin.ACL().TokenCreate(&api.ACLToken{
		Description: "discovery reader",
		Policies:    []*api.ACLTokenPolicyLink{{ID: policy.ID}},
	}, nil)
	if err != nil {
		t.Fatalf("create token: %v", err)
	}
	powerless, _, err := admin.ACL().TokenCreate(&api.ACLToken{Description: "no rules"}, nil)
	if err != nil {
		t.Fatalf("create token: %v", err)
	}
	agentRegister(t, admin, &api.AgentServiceRegistration{ID: "s1", Name: "secure", Port: 9401, Address: "127.0.0.1"})
	const unknownToken = "0b5e4a8e-6f1c-4c37-9d0f-2a41c7d1e0aa"
	secrets := []string{reader.SecretID, powerless.SecretID, unknownToken, c.ManagementToken()}

	// assertNoSecrets checks an error and the logs for every token in play.
	assertNoSecrets := func(t *testing.T, what string, texts ...string) {
		t.Helper()
		for _, text := range texts {
			for _, s := range secrets {
				if strings.Contains(text, s) {
					t.Errorf("%s: want no ACL token in %q, have token %s…", what, text, s[:8])
				}
			}
		}
	}

	t.Run("reader token", func(t *testing.T) {
		log, logs := newLogger(t)
		cfg := testConfig(c, log)
		cfg.Token = reader.SecretID
		w := startWatch(t, newSource(t, cfg), "secure", WatchOptions{})
		w.rec.wait(t, 0, 5*time.Second, "s1 with the reader token", hasIDs(node+"/s1"))
		assertNoSecrets(t, "logs", logs.String())
	})

	t.Run("token file", func(t *testing.T) {
		log, _ := newLogger(t)
		path := filepath.Join(t.TempDir(), "token")
		if err := os.WriteFile(path, []byte(reader.SecretID+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg := testConfig(c, log)
		cfg.TokenFile = path
		cfg.Token = unknownToken // the file wins
		w := startWatch(t, newSource(t, cfg), "secure", WatchOptions{})
		w.rec.wait(t, 0, 5*time.Second, "s1 with the token from the file", hasIDs(node+"/s1"))
	})

	t.Run("token from CONSUL_HTTP_TOKEN", func(t *testing.T) {
		t.Setenv(api.HTTPTokenEnvName, reader.SecretID)
		log, _ := newLogger(t)
		w := startWatch(t, newSource(t, testConfig(c, log)), "secure", WatchOptions{})
		w.rec.wait(t, 0, 5*time.Second, "s1 with the token from the environment", hasIDs(node+"/s1"))
	})

	for _, tc := range []struct {
		name, token string
		env         string // CONSUL_HTTP_TOKEN, which cfg.Token must override
		want        string
		status      int // of the StatusError in the chain; 0 for none
	}{
		// Consul answers these with an empty set marked as filtered.
		{name: "no token", want: "no ACL token is configured"},
		{name: "token without rules", token: powerless.SecretID, want: "consul filtered every instance out"},
		{name: "field overrides env", token: powerless.SecretID, env: reader.SecretID, want: "consul filtered every instance out"},
		// And this one with a 403.
		{name: "unknown token", token: unknownToken, want: "ACL not found", status: 403},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(api.HTTPTokenEnvName, tc.env)
			log, logs := newLogger(t)
			cfg := testConfig(c, log)
			cfg.Token = tc.token
			src := newSource(t, cfg)
			w := startWatch(t, src, "secure", WatchOptions{})
			_, pos := w.rec.wait(t, 0, 5*time.Second, "an ACL failure", failed)
			w.rec.wait(t, pos, 5*time.Second, "a retried ACL failure", failed)
			for _, e := range w.rec.all() {
				if e.u != nil {
					t.Errorf("want no update without read permission, have %v", e)
				}
			}
			err := w.rec.all()[0].st.Err
			msg := err.Error()
			if !strings.HasPrefix(msg, `consul: watch "secure": ACL permission denied`) || !strings.Contains(msg, tc.want) {
				t.Errorf("error: want an ACL error naming %q, have %q", tc.want, msg)
			}
			var se api.StatusError
			if have := errors.As(err, &se); have != (tc.status != 0) || se.Code != tc.status {
				t.Errorf("error: want StatusError %d in the chain, have %v", tc.status, err)
			}

			ok, kerr := src.Known(context.Background(), "secure")
			if kerr == nil || ok || !strings.Contains(kerr.Error(), `consul: lookup "secure": ACL permission denied`) {
				t.Errorf("Known without permission: want an ACL error, have %v, %v", ok, kerr)
			}
			assertNoSecrets(t, "errors and logs", msg, kerr.Error(), logs.String())
			if !strings.Contains(logs.String(), "consul watch failed") {
				t.Errorf("logs: want the failure logged, have:\n%s", logs)
			}
		})
	}

	t.Run("known with the reader token", func(t *testing.T) {
		cfg := testConfig(c, nil)
		cfg.Token = reader.SecretID
		src := newSource(t, cfg)
		for name, want := range map[string]bool{"secure": true, "absent": false} {
			if have, err := src.Known(context.Background(), name); err != nil || have != want {
				t.Errorf("Known(%q): want %v, have %v (err %v)", name, want, have, err)
			}
		}
	})
}

func TestRedactToken(t *testing.T) {
	const tok = "5f0c1d2e-aaaa-bbbb-cccc-0123456789ab"
	c := &conn{token: tok}
	base := errors.New(`Get "http://x/v1/health/service/a?token=` + tok + `": refused`)
	err := c.redact(base)
	if strings.Contains(err.Error(), tok) || !strings.Contains(err.Error(), "token=[redacted]") {
		t.Errorf("redact: want the token replaced, have %q", err)
	}
	if !errors.Is(err, base) {
		t.Errorf("redact: want the original error kept in the chain")
	}
	plain := errors.New("no secret here")
	if have := c.redact(plain); have != plain {
		t.Errorf("redact without token: want the same error, have %v", have)
	}
	if have := (&conn{}).redact(base); have != base {
		t.Errorf("redact with no token configured: want the same error, have %v", have)
	}
}
