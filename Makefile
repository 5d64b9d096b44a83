# meshd: `make demo` runs the sidecar on its embedded static catalog,
# `make test` runs every test (installing Consul and Jaeger first).
SHELL := /bin/bash
GO ?= go
CACHE ?= $(HOME)/.cache/meshd
BIN := $(CACHE)/bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS := -s -w -X github.com/meshd/meshd/cmd/meshd/internal/buildinfo.Version=$(VERSION) -X github.com/meshd/meshd/cmd/meshd/internal/buildinfo.Commit=$(COMMIT)
export MESHD_CONSUL_BIN ?= $(BIN)/consul
export MESHD_JAEGER_BIN ?= $(BIN)/jaeger
TESTFLAGS ?=

.PHONY: all build test unit tools demo demo-deps bench walkthrough lint clean

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/meshd ./cmd/meshd

tools: $(BIN)/consul $(BIN)/jaeger

$(BIN)/consul:
	.ci/install-tool consul

$(BIN)/jaeger:
	.ci/install-tool jaeger

# Every test, with the race detector. Integration tests must not skip here:
# MESHD_REQUIRE_INTEGRATION turns a missing consul or jaeger into a failure.
test: tools lint build
	MESHD_REQUIRE_INTEGRATION=1 MESHD_BIN=$(CURDIR)/bin/meshd $(GO) test -race -count=1 -timeout 30m $(TESTFLAGS) ./...
	@echo "== the sidecar suite again with proxy.event_loop off (the fast path's goroutines alone)"
	MESHD_TEST_FAST_PATH=goroutines MESHD_REQUIRE_INTEGRATION=1 $(GO) test -race -count=1 -timeout 10m $(TESTFLAGS) ./sidecar/
	@echo "== the sidecar suite again with proxy.fast_path off (net/http's server alone)"
	MESHD_TEST_FAST_PATH=off MESHD_REQUIRE_INTEGRATION=1 $(GO) test -race -count=1 -timeout 10m $(TESTFLAGS) ./sidecar/

# Unit tests only: no tools are installed and integration tests skip.
unit:
	$(GO) test -race -count=1 ./...

lint:
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

clean:
	rm -rf bin

# The demo: three local backends, meshd on the static catalog, a few requests.
demo: build demo-deps
	$(GO) build -o bin/backend ./examples/backend
	BIN=bin examples/demo.sh

demo-deps:
	@command -v curl >/dev/null || { echo "installing curl"; apt-get update -qq && apt-get install -y -qq curl; }

# Benchmarks: Go micro-benchmarks, then wrk through meshd beside HAProxy and nginx.
bench: build tools
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 200ms ./balance/ ./sidecar/ ./sidecar/h1/
	BIN=bin examples/bench/run.sh
	$(GO) run ./examples/bench/fault -meshd bin/meshd
	BIN=bin examples/bench/tracing.sh

# Consul, Jaeger and two services with their sidecars, traced (see examples/walkthrough).
walkthrough: build tools demo-deps
	BIN=bin examples/walkthrough/walkthrough.sh
