#!/usr/bin/env bash
# The cost of tracing and metrics: the same wrk load through four meshd
# processes running side by side (beside run.sh's own meshd, HAProxy and
# nginx, idle here), in turns over several rounds, each round starting one
# further on: telemetry off, metrics alone, and metrics with traces sampled
# at 1% and at 100% (exported over OTLP/gRPC to a real Jaeger on loopback).
# Tracing's own cost is the traced rates against metrics alone. The
# processes live through the whole run (after a warm-up), so no round pays
# for a start. Writes examples/bench/tracing.md.
#
# Environment: BENCH_DURATION (seconds per run, default 3), BENCH_ROUNDS
# (default 10).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin}
JAEGER=${MESHD_JAEGER_BIN:-$HOME/.cache/meshd/bin/jaeger}
[ -x "$JAEGER" ] || .ci/install-tool jaeger
ROUNDS=${BENCH_ROUNDS:-10}
DUR=${BENCH_DURATION:-3}
work=$(mktemp -d)
trap 'kill $jpid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/jaeger.yaml" <<'CONF'
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics: {level: none}
    logs: {level: warn}
extensions:
  healthcheckv2: {use_v2: true, http: {endpoint: 127.0.0.1:18133}}
  jaeger_storage: {backends: {memstore: {memory: {max_traces: 20000}}}}
  jaeger_query: {enable_tracing: false, storage: {traces: memstore}, http: {endpoint: 127.0.0.1:18686}, grpc: {endpoint: 127.0.0.1:18685}}
receivers:
  otlp: {protocols: {grpc: {endpoint: 127.0.0.1:18317}, http: {endpoint: 127.0.0.1:18318}}}
processors:
  batch: {}
exporters:
  jaeger_storage_exporter: {trace_storage: memstore}
CONF
"$JAEGER" --config "$work/jaeger.yaml" > "$work/jaeger.log" 2>&1 &
jpid=$!
for _ in $(seq 100); do curl -fs http://127.0.0.1:18133/status >/dev/null 2>&1 && break; sleep 0.2; done
curl -fs http://127.0.0.1:18133/status >/dev/null || { echo "tracing bench: Jaeger did not start" >&2; cat "$work/jaeger.log" >&2; exit 1; }

export MESHD_CONFIG_off="telemetry: {traces: none, metrics: none}"
export MESHD_CONFIG_met="telemetry: {traces: none, metrics: prometheus}"
export MESHD_CONFIG_one="telemetry: {traces: otlp-grpc, endpoint: 127.0.0.1:18317, insecure: true, sample_ratio: 0.01, service_name: bench}"
export MESHD_CONFIG_all="telemetry: {traces: otlp-grpc, endpoint: 127.0.0.1:18317, insecure: true, sample_ratio: 1, service_name: bench}"
BENCH_MESHD_VARIANTS="off met one all" BENCH_TARGETS="meshd-off meshd-met meshd-one meshd-all" \
  BENCH_SCENARIOS="64:small" BENCH_ROUNDS=$ROUNDS BENCH_DURATION=$DUR BENCH_WARMUP=1 BENCH_ROTATE=1 \
  BENCH_RAW="$work/raw.tsv" BENCH_OUT="$work/run.md" BIN=$BIN examples/bench/run.sh >/dev/null
# A round without a rate (wrk failed, a meshd died) would be read as 0,
# and one in which wrk counted errors (non-2xx answers, socket errors)
# holds them in its rate and latencies.
if bad=$(awk -F'\t' '!($5 > 0) || $12 + 0 > 0 {print $1 " round " $4 ($5 > 0 ? ": " $12 " errors" : ": no rate"); exit 1}' "$work/raw.tsv"); then :; else
  echo "tracing bench: $bad; nothing written" >&2
  exit 1
fi
{
  echo "# The cost of telemetry"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC') (the run's end), $(nproc) cores, wrk 64 connections, 128 B answers, ${DUR}s x $ROUNDS rounds in turns (each round starting one further on) through four meshd processes running side by side (warmed up 1 s each); traces exported over OTLP/gRPC to Jaeger on loopback. Medians; CPU is meshd's time (user and system) per request."
  echo
  echo "| telemetry | rps | p99 ms | CPU us/req | rps vs off | rps vs metrics alone | steal % (highest round) |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  awk -F'\t' '
    function median(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }; return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    { k = substr($1, 7); n[k]++; r[k, $4] = $5; p[k, n[k]] = $7; c[k, n[k]] = $10; if ($11 > st[k]) st[k] = $11; rounds[$4] = 1 }
    END {
      split("off met one all", modes, " "); label["off"] = "off (traces none, metrics none)"; label["met"] = "metrics alone (traces none)"; label["one"] = "traces 1% + metrics"; label["all"] = "traces 100% + metrics"
      for (m = 1; m <= 4; m++) { k = modes[m]; i = 0; for (rd in rounds) { i++; a[i] = r[k, rd] }; R[k] = median(a, i); for (i = 1; i <= n[k]; i++) { b[i] = p[k, i]; d[i] = c[k, i] }; P[k] = median(b, n[k]); C[k] = median(d, n[k]) }
      for (m = 1; m <= 4; m++) { k = modes[m]; v = (k == "off") ? "-" : sprintf("%.2f", R[k] / R["met"]); printf "| %s | %.0f | %.2f | %.1f | %.2f | %s | %d |\n", label[k], R[k], P[k], C[k], R[k] / R["off"], v, st[k] }
      printf "\nRounds, traces 1%% against metrics alone in the same round:"
      nr = 0; for (rd in rounds) nr++
      for (rd = 1; rd <= nr; rd++) { x[rd] = r["one", rd] / r["met", rd]; printf " %.2f", x[rd] }
      printf " (median %.2f); metrics alone against off:", median(x, nr)
      for (rd = 1; rd <= nr; rd++) { y[rd] = r["met", rd] / r["off", rd]; printf " %.2f", y[rd] }
      printf " (median %.2f).\n", median(y, nr)
    }' "$work/raw.tsv"
} > "$work/tracing.md"
mv "$work/tracing.md" examples/bench/tracing.md
cat examples/bench/tracing.md
