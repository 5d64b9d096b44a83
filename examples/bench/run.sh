#!/usr/bin/env bash
# meshd's throughput benchmark: wrk through meshd, HAProxy and nginx (and
# straight to one backend), in turns (A, B, C, D, A, B, ...) over several
# rounds, for 64 connections and 1 connection, 128 B and 64 KiB responses.
# Prints one table with the proxy's RSS and CPU and the ratios, and writes it
# to examples/bench/results.md.
#
# Environment: BENCH_DURATION (seconds per run, default 3), BENCH_ROUNDS
# (default 10: single runs on a shared VM swing by about 8%, and more,
# shorter rounds in turns steady the medians more than fewer long ones),
# BENCH_TARGETS (default "direct meshd haproxy nginx"),
# BENCH_SCENARIOS (default "64:small 1:small 64:large 1:large"),
# MESHD_EXTRA_CONFIG (YAML appended to meshd's config, e.g. telemetry),
# BENCH_MESHD_VARIANTS (names of more meshd processes to run beside the
# first, each with the YAML in MESHD_CONFIG_<name> appended, as targets
# meshd-<name>; a name is letters, digits and underscores), BENCH_WARMUP
# (seconds of load on each target before the rounds, default 0),
# BENCH_ROTATE (1: each round starts one target further on, so that no
# target always follows the same one), BENCH_RAW (a file to copy the
# rounds' raw rows to).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin}
DUR=${BENCH_DURATION:-3}
ROUNDS=${BENCH_ROUNDS:-10}
TARGETS=${BENCH_TARGETS:-direct meshd haproxy nginx}
SCENARIOS=${BENCH_SCENARIOS:-64:small 1:small 64:large 1:large}
OUT=${BENCH_OUT:-examples/bench/results.md}
work=$(mktemp -d)
chmod 755 "$work"  # nginx workers run unprivileged and must read the files
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1 || command -v "/usr/sbin/$1" >/dev/null 2>&1; }
missing=()
need wrk || missing+=(wrk)
need haproxy || missing+=(haproxy)
need nginx || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing ${missing[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

# Every server runs in a session of its own (setsid), as a service or a
# container does: the kernel then shares the processors between them as
# groups, not thread by thread with wrk. Started in wrk's session, meshd,
# HAProxy and nginx were all scheduled as wrk's threads' peers, which gave
# a different picture (meshd 1.04x HAProxy there, 0.85x here, in one run
# on 2026-11-26, before the loops learnt to spin when busy).
SPAWN=(setsid)

# --- backends: one nginx worker serving three ports --------------------------
mkdir -p "$work/www" "$work/nginx-b" "$work/nginx-p"
head -c 128 /dev/zero | tr '\0' 'x' > "$work/www/small"
head -c 65536 /dev/zero | tr '\0' 'x' > "$work/www/large"
cat > "$work/nginx-b/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx-b/pid;
error_log $work/nginx-b/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  server { listen 127.0.0.1:18081; root $work/www; }
  server { listen 127.0.0.1:18082; root $work/www; }
  server { listen 127.0.0.1:18083; root $work/www; }
}
CONF
"${SPAWN[@]}" "$NGINX" -c "$work/nginx-b/nginx.conf" -p "$work/nginx-b" &
pids+=($!)

# --- the proxies --------------------------------------------------------------
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 2
  maxconn 4000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:18090
  default_backend be
backend be
  balance roundrobin
  server b1 127.0.0.1:18081
  server b2 127.0.0.1:18082
  server b3 127.0.0.1:18083
CONF
"${SPAWN[@]}" "$HAPROXY" -f "$work/haproxy.cfg" -db &
pids+=($!)
haproxy_pid=$!

cat > "$work/nginx-p/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $work/nginx-p/pid;
error_log $work/nginx-p/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream be {
    server 127.0.0.1:18081;
    server 127.0.0.1:18082;
    server 127.0.0.1:18083;
    keepalive 128;
  }
  server {
    listen 127.0.0.1:18091;
    location / {
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
    }
  }
}
CONF
"${SPAWN[@]}" "$NGINX" -c "$work/nginx-p/nginx.conf" -p "$work/nginx-p" &
pids+=($!)
nginx_master=$!

cat > "$work/meshd.yaml" <<CONF
listen: {outbound: 127.0.0.1:18092, admin: 127.0.0.1:18093}
discovery:
  static:
    payments: [127.0.0.1:18081, 127.0.0.1:18082, 127.0.0.1:18083]
upstreams:
  payments:
    balance: {algorithm: round_robin}
log: {access: false, level: warn}
${MESHD_EXTRA_CONFIG:-}
CONF
"${SPAWN[@]}" "$BIN/meshd" run --config "$work/meshd.yaml" 2>"$work/meshd.log" &
pids+=($!)
meshd_pid=$!

for _ in $(seq 100); do
  curl -fs http://127.0.0.1:18093/ready >/dev/null 2>&1 && break
  sleep 0.1
done
for url in http://127.0.0.1:18081/small http://127.0.0.1:18090/small http://127.0.0.1:18091/small; do
  for _ in $(seq 50); do curl -fs "$url" -o /dev/null && break; sleep 0.1; done
  curl -fs "$url" -o /dev/null || { echo "bench: $url does not answer" >&2; cat "$work"/nginx-*/error.log >&2; exit 1; }
done
curl -fs -H 'Host: payments' http://127.0.0.1:18092/small -o /dev/null || { echo "bench: meshd does not answer" >&2; cat "$work/meshd.log" >&2; exit 1; }

# More meshd processes, one per variant, on ports 18100 and up (admin one
# above): the same catalog, each with its own extra YAML.
declare -A variant_port variant_pid
vport=18100
for v in ${BENCH_MESHD_VARIANTS:-}; do
  cfgvar=MESHD_CONFIG_$v
  cat > "$work/meshd-$v.yaml" <<CONF
listen: {outbound: 127.0.0.1:$vport, admin: 127.0.0.1:$((vport + 1))}
discovery:
  static:
    payments: [127.0.0.1:18081, 127.0.0.1:18082, 127.0.0.1:18083]
upstreams:
  payments:
    balance: {algorithm: round_robin}
log: {access: false, level: warn}
${!cfgvar:-}
CONF
  "${SPAWN[@]}" "$BIN/meshd" run --config "$work/meshd-$v.yaml" 2>"$work/meshd-$v.log" &
  pids+=($!)
  variant_pid[$v]=$!
  variant_port[$v]=$vport
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$((vport + 1))/ready" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs -H 'Host: payments' "http://127.0.0.1:$vport/small" -o /dev/null || { echo "bench: meshd-$v does not answer" >&2; cat "$work/meshd-$v.log" >&2; exit 1; }
  vport=$((vport + 2))
done

# --- measurement ---------------------------------------------------------------
url_of() {
  case $1 in
    direct) echo "http://127.0.0.1:18081" ;;
    meshd) echo "http://127.0.0.1:18092" ;;
    haproxy) echo "http://127.0.0.1:18090" ;;
    nginx) echo "http://127.0.0.1:18091" ;;
    meshd-*) echo "http://127.0.0.1:${variant_port[${1#meshd-}]}" ;;
  esac
}
pids_of() {
  case $1 in
    meshd) echo "$meshd_pid" ;;
    haproxy) echo "$haproxy_pid" ;;
    nginx) echo "$nginx_master $(pgrep -P "$nginx_master" | tr '\n' ' ')" ;;
    meshd-*) echo "${variant_pid[${1#meshd-}]}" ;;
    *) echo "" ;;
  esac
}
# cpu_ticks PIDS: utime+stime of all, in clock ticks.
cpu_ticks() {
  local t=0 p
  for p in $1; do
    [ -r /proc/$p/stat ] || continue
    t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat)))
  done
  echo $t
}
rss_kb() {
  local t=0 p
  for p in $1; do
    [ -r /proc/$p/status ] || continue
    t=$((t + $(awk '/^VmRSS/ {print $2}' /proc/$p/status)))
  done
  echo $t
}
to_ms() { # wrk latency like 123.45us / 1.23ms / 1.2s
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v/1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v*1000 }
    else printf "%s", v }'
}
# steal_ticks: the machine's stolen ticks and all its ticks, from /proc/stat.
# On a VM, time the host gives to others shows as steal: a run with much of
# it measured the host, not the proxy.
steal_ticks() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print $9, t; exit}' /proc/stat; }
hz=$(getconf CLK_TCK)
results=$work/results.tsv
: > "$results"
run_one() { # target conns path round
  local target=$1 conns=$2 path=$3 round=$4 threads=2
  [ "$conns" -lt 2 ] && threads=1
  local ps; ps=$(pids_of "$target")
  local c0; c0=$(cpu_ticks "$ps")
  local s0; s0=$(steal_ticks)
  local out
  out=$(wrk -t$threads -c"$conns" -d"${DUR}s" --latency -H 'Host: payments' "$(url_of "$target")/$path" 2>&1)
  local c1; c1=$(cpu_ticks "$ps")
  local st; st=$(awk -v a="$s0" -v b="$(steal_ticks)" 'BEGIN {split(a, x); split(b, y); printf "%.0f", (y[2] > x[2] ? (y[1]-x[1])/(y[2]-x[2])*100 : 0)}')
  local rss; rss=$(rss_kb "$ps")
  local rps p50 p99 errs
  rps=$(echo "$out" | awk '/^Requests\/sec/ {print $2}')
  p50=$(to_ms "$(echo "$out" | awk '$1 == "50%" {print $2}')")
  p99=$(to_ms "$(echo "$out" | awk '$1 == "99%" {print $2}')")
  errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
  # The same as a count: wrk counts such answers in its rates and
  # latencies, so a round with any is left out of the round-by-round table.
  local nerr
  nerr=$(echo "$out" | awk '/Non-2xx or 3xx responses:/ {n += $NF} /Socket errors:/ {for (i = 3; i <= NF; i++) {v = $i; sub(/,$/, "", v); if (v ~ /^[0-9]+$/) n += v}} END {print n + 0}')
  local cpu; cpu=$(awk -v a="$c0" -v b="$c1" -v hz="$hz" -v d="$DUR" 'BEGIN {printf "%.0f", (b-a)/hz/d*100}')
  # CPU per request: the proxy's CPU time over the requests wrk counted.
  local cpr; cpr=$(awk -v a="$c0" -v b="$c1" -v hz="$hz" -v n="$(echo "$out" | awk '/requests in/ {print $1}')" 'BEGIN {printf "%.1f", (n > 0 ? (b-a)/hz*1e6/n : 0)}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$conns" "$path" "$round" "$rps" "$p50" "$p99" "$rss" "$cpu" "$cpr" "$st" "$nerr" >> "$results"
  [ -n "$errs" ] && echo "bench: $target c$conns $path: $errs" >&2
  printf '  round %s %-8s c=%-3s %-6s %10s rps  p50 %8s ms  p99 %8s ms  rss %6s KiB  cpu %4s%% %6s us/req  steal %3s%%\n' "$round" "$target" "$conns" "$path" "$rps" "$p50" "$p99" "$rss" "$cpu" "$cpr" "$st" >&2
}

echo "bench: ${ROUNDS} rounds of ${DUR}s per target and scenario (targets: $TARGETS)" >&2
for scenario in $SCENARIOS; do
  set -- ${scenario/:/ }
  if [ "${BENCH_WARMUP:-0}" != 0 ]; then
    for target in $TARGETS; do
      wrk -t$(( $1 < 2 ? 1 : 2 )) -c"$1" -d"${BENCH_WARMUP}s" -H 'Host: payments' "$(url_of "$target")/$2" >/dev/null 2>&1 ||
        { echo "bench: warming $target up failed" >&2; exit 1; }
    done
  fi
  read -r -a order <<<"$TARGETS"
  for round in $(seq "$ROUNDS"); do
    shift_by=0
    [ "${BENCH_ROTATE:-0}" = 1 ] && shift_by=$(( (round - 1) % ${#order[@]} ))
    for i in "${!order[@]}"; do
      run_one "${order[$(( (i + shift_by) % ${#order[@]} ))]}" "$1" "$2" "$round"
    done
  done
done
if [ -n "${BENCH_RAW:-}" ]; then cp "$results" "$BENCH_RAW"; fi

# --- report -----------------------------------------------------------------------
report=$work/report.md
{
  echo "# meshd benchmark"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(go version | awk '{print $3}'), $("$HAPROXY" -v | head -1 | awk '{print "HAProxy", $3}'), $("$NGINX" -v 2>&1 | sed 's/.*nginx\//nginx /'), wrk ${DUR}s x ${ROUNDS} rounds, targets in turns."
  echo "Backends: one nginx worker serving 3 ports. HAProxy: nbthread 2, http-reuse always. nginx: 2 workers, keepalive 128. meshd: round_robin, access log off. Each server in a session (scheduling group) of its own."
  echo "Medians over rounds, leaving out any round in which wrk counted errors (the target's cell says how many rounds are left). RSS at the end of the run; CPU is the proxy's share of one core (200% = both), and its CPU time (user and system) per request. Steal: the share of the machine's time the VM's host took for others during the run (the highest of the rounds)."
  echo
  echo "| scenario | target | rps | p50 ms | p99 ms | RSS MiB | CPU % | CPU us/req | steal % |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
  awk -F'\t' '
    function median(arr, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (arr[j] < arr[i]) { t = arr[i]; arr[i] = arr[j]; arr[j] = t }; return (n % 2) ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2 }
    function ratio(a, b) { return (a && b) ? sprintf("%.2f", a / b) : "-" }
    {
      key = $2 " conns, " ($3 == "small" ? "128 B" : "64 KiB") SUBSEP $1
      if (!(key in seen)) { seen[key] = 1; order[++k] = key }
      tot[key]++; if ($11 > stmax[key]) stmax[key] = $11
      # wrk counts non-2xx answers and socket errors in its rates and
      # latencies, and a round it failed has no figures: neither counts.
      if ($5 == "" || $12 + 0 > 0) next
      n[key]++; rps[key, n[key]] = $5; p50[key, n[key]] = $6; p99[key, n[key]] = $7; rss[key, n[key]] = $8; cpu[key, n[key]] = $9; cpr[key, n[key]] = $10
    }
    END {
      for (i = 1; i <= k; i++) {
        key = order[i]; split(key, parts, SUBSEP)
        m = n[key] + 0; sc[parts[1]] = 1
        label = parts[2] (m < tot[key] ? sprintf(" (%d of %d rounds counted)", m, tot[key]) : "")
        if (m == 0) {
          printf "| %s | %s | - | - | - | - | - | - | %d |\n", parts[1], label, stmax[key]
          continue
        }
        for (j = 1; j <= m; j++) { a[j] = rps[key, j]; b[j] = p50[key, j]; c[j] = p99[key, j]; d[j] = rss[key, j]; e[j] = cpu[key, j]; f[j] = cpr[key, j] }
        R = median(a, m); P5 = median(b, m); P9 = median(c, m); S = median(d, m); C = median(e, m); CR = median(f, m)
        med[parts[1], parts[2], "rps"] = R; med[parts[1], parts[2], "p50"] = P5; med[parts[1], parts[2], "p99"] = P9; med[parts[1], parts[2], "cpr"] = CR
        printf "| %s | %s | %.0f | %.3f | %.3f | %s | %s | %s | %d |\n", parts[1], label, R, P5, P9, (parts[2] == "direct" ? "-" : sprintf("%.1f", S / 1024)), (parts[2] == "direct" ? "-" : C), (parts[2] == "direct" ? "-" : sprintf("%.1f", CR)), stmax[key]
      }
      print ""
      print "| scenario | meshd/HAProxy rps | meshd/nginx rps | meshd/direct rps | meshd/HAProxy p50 | meshd/HAProxy p99 | meshd/HAProxy CPU per request |"
      print "|---|---:|---:|---:|---:|---:|---:|"
      for (s in sc) {
        mr = med[s, "meshd", "rps"]; hr = med[s, "haproxy", "rps"]; nr = med[s, "nginx", "rps"]; dr = med[s, "direct", "rps"]
        printf "| %s | %s | %s | %s | %s | %s | %s |\n", s, ratio(mr, hr), ratio(mr, nr), ratio(mr, dr), ratio(med[s, "meshd", "p50"], med[s, "haproxy", "p50"]), ratio(med[s, "meshd", "p99"], med[s, "haproxy", "p99"]), ratio(med[s, "meshd", "cpr"], med[s, "haproxy", "cpr"])
      }
    }' "$results"
  # Round by round: meshd against HAProxy in the same round (they ran a few
  # seconds apart), so that a ratio near 1 can be told from a difference
  # the host's swings hide. The sign test counts the rounds meshd was
  # ahead; its p is the chance of a count as lopsided if neither were.
  if [[ " $TARGETS " == *" meshd "* && " $TARGETS " == *" haproxy "* ]]; then
    echo
    echo "Round by round, meshd against HAProxy in the same round: the median of the rounds' ratios (lowest-highest); the rounds in which meshd was ahead (more rps, lower latency) and behind, ties left out; and a two-sided sign test's p on those counts (below 0.05: more than the rounds' noise)."
    echo
    echo "| scenario | rps ratio | ahead/behind | p | p50 ratio | ahead/behind | p | p99 ratio | ahead/behind | p |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '
      function median(arr, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (arr[j] < arr[i]) { t = arr[i]; arr[i] = arr[j]; arr[j] = t }; return (n % 2) ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2 }
      function choose(n, k,   r, i) { r = 1; for (i = 1; i <= k; i++) r = r * (n - k + i) / i; return r }
      function sign_p(k, n,   m, i, t) { m = (k > n - k) ? k : n - k; t = 0; for (i = m; i <= n; i++) t += choose(n, i); t = 2 * t / 2 ^ n; return t > 1 ? 1 : t }
      function cell(s, f, lower,   i, m, a, lo, hi, k, b, r, rd, hv, mv) {
        m = 0; k = 0; b = 0
        for (i = 1; i <= nr[s]; i++) {
          rd = rounds[s, i]
          # A round without a figure (wrk failed) counts for neither side.
          hv = v[s, "haproxy", rd, f]; mv = v[s, "meshd", rd, f]
          if (hv == "" || mv == "" || hv + 0 <= 0 || mv + 0 <= 0) continue
          # Nor does one in which either answered with errors.
          if (er[s, "haproxy", rd] > 0 || er[s, "meshd", rd] > 0) continue
          r = mv / hv
          a[++m] = r
          if (m == 1 || r < lo) lo = r
          if (m == 1 || r > hi) hi = r
          if (lower ? r < 1 : r > 1) k++
          else if (lower ? r > 1 : r < 1) b++
        }
        if (m == 0) return "- | - | -"
        # Ties (equal figures) count for neither side.
        return sprintf("%.2f (%.2f-%.2f) | %d/%d | %.3f", median(a, m), lo, hi, k, b, (k + b > 0 ? sign_p(k, k + b) : 1))
      }
      { s = $2 " conns, " ($3 == "small" ? "128 B" : "64 KiB"); v[s, $1, $4, "rps"] = $5; v[s, $1, $4, "p50"] = $6; v[s, $1, $4, "p99"] = $7; er[s, $1, $4] = $12 + 0
        if ($12 + 0 > 0) bad = bad sprintf("%s%s round %s (%s): %d", (bad == "" ? "" : "; "), $1, $4, s, $12)
        if (!((s, $4) in seenr)) { seenr[s, $4] = 1; rounds[s, ++nr[s]] = $4 }
        if (!(s in seen)) { seen[s] = 1; order[++k] = s } }
      END {
        for (j = 1; j <= k; j++) { s = order[j]; printf "| %s | %s | %s | %s |\n", s, cell(s, "rps", 0), cell(s, "p50", 1), cell(s, "p99", 1) }
        printf "\nRounds in which wrk counted non-2xx answers or socket errors (left out above; wrk counts them in its rates and latencies): %s\n", (bad == "" ? "none" : bad)
      }' "$results"
  fi
  # Any answer meshd gave other than 200, by status, from its own metrics:
  # wrk only counts them, meshd says which they were.
  if [[ " $TARGETS " == *" meshd "* ]]; then
    # (With metrics off, as in the telemetry bench, there is nothing to read.)
    if metrics=$(curl -fs http://127.0.0.1:18093/metrics); then
      odd=$(echo "$metrics" | awk '/^http_server_request_duration_seconds_count/ && !/status_code="200"/ {
        if (match($0, /status_code="[0-9]+"/)) k = substr($0, RSTART + 13, RLENGTH - 14)
        else if (match($0, /error_type="[^"]+"/)) k = substr($0, RSTART + 12, RLENGTH - 13)
        else k = "none"
        n[k] += $2 } END { for (k in n) printf "%s %s; ", k, n[k] }')
    else
      odd="unknown (metrics off)"
    fi
    echo
    echo "meshd's answers other than 200 over the whole run (status count): ${odd:-none}"
  fi
} > "$report"
cat "$report"
cp "$report" "$OUT"
echo "bench: written to $OUT" >&2
