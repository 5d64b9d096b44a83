#!/usr/bin/env bash
# Runs meshd on the embedded static catalog in front of three demo backends,
# sends requests through it the three ways an app can, shows where each went,
# and stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
logs=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$logs"
}
trap cleanup EXIT

for port in 9001 9002 9003; do
  "$BIN/backend" -listen 127.0.0.1:$port -name "backend-$port" 2>"$logs/backend-$port.log" &
  pids+=($!)
done
"$BIN/meshd" run --config examples/demo.yaml 2>"$logs/meshd.log" &
meshd=$!
pids+=($meshd)

for _ in $(seq 100); do
  curl -fs http://127.0.0.1:15000/ready >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs http://127.0.0.1:15000/ready >/dev/null || { echo "meshd did not become ready:"; cat "$logs/meshd.log"; exit 1; }

echo "== 1. as an HTTP forward proxy (HTTP_PROXY=http://127.0.0.1:15001, URL http://payments/...)"
for i in 1 2 3 4; do curl -fsS -x http://127.0.0.1:15001 "http://payments/orders/$i" | tee -a "$logs/replies"; done
echo
echo "== 2. by Host header on the outbound listener"
for i in 5 6; do curl -fsS -H 'Host: payments' "http://127.0.0.1:15001/orders/$i" | tee -a "$logs/replies"; done
echo
echo "== 3. on the upstream's own listener (127.0.0.1:9191)"
for i in 7 8; do curl -fsS "http://127.0.0.1:9191/orders/$i" | tee -a "$logs/replies"; done
echo
echo "== a name meshd does not know is refused"
curl -sS -x http://127.0.0.1:15001 http://example.com/ -o /dev/stderr -w 'status %{http_code}\n' 2>&1 || true
echo
echo "== where the 8 requests went (round robin; weights only matter to the weighted algorithms)"
cut -d' ' -f1 "$logs/replies" | sort | uniq -c
echo
echo "== the same seen by meshd (GET http://127.0.0.1:15000/upstreams?format=text)"
curl -fsS 'http://127.0.0.1:15000/upstreams?format=text'
echo
echo "== meshd's log"
kill -TERM "$meshd"
wait "$meshd" || true
cat "$logs/meshd.log"
