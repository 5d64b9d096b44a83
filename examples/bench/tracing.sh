#!/usr/bin/env bash
# The cost of tracing and metrics: the same wrk load through meshd with
# telemetry off, with traces sampled at 1% and at 100% (exported over OTLP/gRPC
# to a real Jaeger on loopback), and metrics on. Rounds alternate the three.
# Writes examples/bench/tracing.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin}
JAEGER=${MESHD_JAEGER_BIN:-$HOME/.cache/meshd/bin/jaeger}
[ -x "$JAEGER" ] || .ci/install-tool jaeger
ROUNDS=${BENCH_ROUNDS:-5}
export BENCH_DURATION=${BENCH_DURATION:-5} BENCH_ROUNDS=1 BENCH_TARGETS=meshd BENCH_SCENARIOS="64:small"
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

off="telemetry: {traces: none, metrics: none}"
one="telemetry: {traces: otlp-grpc, endpoint: 127.0.0.1:18317, insecure: true, sample_ratio: 0.01, service_name: bench}"
all="telemetry: {traces: otlp-grpc, endpoint: 127.0.0.1:18317, insecure: true, sample_ratio: 1, service_name: bench}"
: > "$work/rows"
for round in $(seq "$ROUNDS"); do
  for mode in off one all; do
    MESHD_EXTRA_CONFIG="${!mode}" BENCH_OUT="$work/$mode-$round.md" examples/bench/run.sh >/dev/null 2>"$work/$mode-$round.err" || { cat "$work/$mode-$round.err" >&2; exit 1; }
    rps=$(awk -F'|' '/\| meshd \|/ {gsub(/ /, "", $4); print $4; exit}' "$work/$mode-$round.md")
    p99=$(awk -F'|' '/\| meshd \|/ {gsub(/ /, "", $6); print $6; exit}' "$work/$mode-$round.md")
    steal=$(awk -F'|' '/\| meshd \|/ {gsub(/ /, "", $10); print $10; exit}' "$work/$mode-$round.md")
    echo "$mode $rps $p99 $steal" >> "$work/rows"
    echo "  round $round $mode: $rps rps, p99 $p99 ms, steal $steal%" >&2
  done
done
{
  echo "# The cost of telemetry"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, wrk 64 connections, 128 B answers, ${BENCH_DURATION}s x $ROUNDS rounds in turns; traces exported over OTLP/gRPC to Jaeger on loopback. Medians."
  echo
  echo "| telemetry | rps | p99 ms | rps vs off | steal % (highest round) |"
  echo "|---|---:|---:|---:|---:|"
  awk '
    function median(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }; return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    { n[$1]++; r[$1, n[$1]] = $2; p[$1, n[$1]] = $3; if ($4 > st[$1]) st[$1] = $4 }
    END {
      split("off one all", modes, " "); label["off"] = "off (traces none, metrics none)"; label["one"] = "traces 1% + metrics"; label["all"] = "traces 100% + metrics"
      for (m = 1; m <= 3; m++) { k = modes[m]; for (i = 1; i <= n[k]; i++) { a[i] = r[k, i]; b[i] = p[k, i] }; R[k] = median(a, n[k]); P[k] = median(b, n[k]) }
      for (m = 1; m <= 3; m++) { k = modes[m]; printf "| %s | %.0f | %.2f | %.2f | %d |\n", label[k], R[k], P[k], R[k] / R["off"], st[k] }
    }' "$work/rows"
} > examples/bench/tracing.md
cat examples/bench/tracing.md
