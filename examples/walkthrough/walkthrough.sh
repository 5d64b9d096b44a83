#!/usr/bin/env bash
# The meshd walkthrough: Consul, Jaeger, a frontend and two backend instances,
# each beside its own meshd sidecar, all on 127.0.0.1. It sends a bounded
# burst of traffic, shows what the traces say, and leaves everything running
# for you to explore until Ctrl-C.
#
#   examples/walkthrough/walkthrough.sh          # run, then wait for Ctrl-C
#   examples/walkthrough/walkthrough.sh --once   # run, check the traces, stop
#
# Environment:
#   BIN                 where meshd is (default bin); the demo programs are built there too
#   MESHD_CONSUL_BIN    consul binary (default $HOME/.cache/meshd/bin/consul, then PATH)
#   MESHD_JAEGER_BIN    jaeger v2 binary (default $HOME/.cache/meshd/bin/jaeger, then PATH)
#   WALKTHROUGH_ONCE=1  same as --once
#   WALKTHROUGH_REQUESTS, WALKTHROUGH_DURATION   traffic (default 200 requests over 20s)
#   WALKTHROUGH_KEEP=1  keep the logs and rendered configs after exit
#   PORT_<NAME>         a port of your choice, e.g. PORT_JAEGER_UI=26686 (names below)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
BIN=${BIN:-bin}
GO=${GO:-go}
once=${WALKTHROUGH_ONCE:-0}
for arg in "$@"; do
  case $arg in
    --once) once=1 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "walkthrough: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done
requests=${WALKTHROUGH_REQUESTS:-200}
duration=${WALKTHROUGH_DURATION:-20s}

say() { printf '\033[1m== %s\033[0m\n' "$*"; }
die() { echo "walkthrough: $*" >&2; exit 1; }

find_tool() { # name env-var
  local name=$1 var=$2 p
  p=${!var:-}
  if [ -n "$p" ]; then
    [ -x "$p" ] || die "$var=$p is not an executable"
    echo "$p"; return
  fi
  p=$HOME/.cache/meshd/bin/$name
  if [ -x "$p" ]; then echo "$p"; return; fi
  if p=$(command -v "$name"); then echo "$p"; return; fi
  die "no $name binary: run 'make tools' (or .ci/install-tool $name), or set $var"
}
command -v curl >/dev/null || die "curl is needed (apt-get install curl)"
consul_bin=$(find_tool consul MESHD_CONSUL_BIN)
jaeger_bin=$(find_tool jaeger MESHD_JAEGER_BIN)

say "building the demo programs into $BIN/"
mkdir -p "$BIN"
[ -x "$BIN/meshd" ] || "$GO" build -o "$BIN/meshd" ./cmd/meshd
"$GO" build -o "$BIN/backend" ./examples/backend
"$GO" build -o "$BIN/walkthrough-frontend" ./examples/walkthrough/frontend
"$GO" build -o "$BIN/walkthrough-loadgen" ./examples/walkthrough/loadgen

# Ports: PORT_<NAME> when set, else the default when free, else the next
# free port that no PORT_<NAME> asks for.
declare -A taken=() assigned=()
for v in $(compgen -v PORT_ || true); do if [ -n "${!v}" ]; then taken[${!v}]=1; fi; done
in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port() { # NAME default
  local name=$1 p=$2 fixed var="PORT_$1"
  fixed=${!var:-}
  if [ -n "$fixed" ]; then
    [[ $fixed =~ ^[0-9]+$ ]] || die "$var=$fixed is not a port number"
    [ -z "${assigned[$fixed]:-}" ] || die "$var=$fixed is also ${assigned[$fixed]}"
    in_use "$fixed" && die "$var=$fixed is already in use"
    p=$fixed
  else
    for _ in $(seq 200); do
      if [ -z "${taken[$p]:-}" ] && ! in_use "$p"; then break; fi
      p=$((p + 1))
    done
    [ "$p" = "$2" ] || echo "   port $name: $2 is taken, using $p"
  fi
  taken[$p]=1
  assigned[$p]=$name
  printf -v "$name" '%s' "$p"
  export "${name?}"
}
say "choosing ports"
port CONSUL_HTTP 8500; port CONSUL_SERF_LAN 8301; port CONSUL_SERF_WAN 8302; port CONSUL_SERVER 8300
port JAEGER_UI 16686; port JAEGER_QUERY_GRPC 16685; port JAEGER_OTLP_GRPC 4317; port JAEGER_OTLP_HTTP 4318; port JAEGER_HEALTH 13133
port FRONTEND_APP 8081; port FRONTEND_ADMIN 15000; port FRONTEND_OUT 15001; port FRONTEND_IN 15006
port BACKEND_A_APP 9101; port BACKEND_A_ADMIN 15100; port BACKEND_A_OUT 15101; port BACKEND_A_IN 15106
port BACKEND_B_APP 9102; port BACKEND_B_ADMIN 15200; port BACKEND_B_OUT 15201; port BACKEND_B_IN 15206

# Every program runs in a session of its own, so that Ctrl-C reaches this
# script alone and it stops them in order: sidecars first (they deregister
# from Consul and flush their spans to Jaeger), then the apps, Jaeger, Consul.
names=(); pids=()
start() { # name command...
  local name=$1; shift
  if command -v setsid >/dev/null; then
    setsid "$@" >"$state/$name.log" 2>&1 </dev/null &
  else
    "$@" >"$state/$name.log" 2>&1 </dev/null &
  fi
  names+=("$name"); pids+=($!)
}
stop_one() { # index
  local pid=${pids[$1]} i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "   ${names[$1]} did not stop within 10s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}
status=1
cleanup() {
  trap - EXIT INT TERM HUP
  set +e # stop everything even if printing fails
  echo
  say "stopping everything"
  local i
  # Sidecars first, all at once (they drain in parallel), then the rest in reverse order.
  for i in "${!names[@]}"; do
    if [[ ${names[$i]} == *-sidecar ]]; then kill -TERM "${pids[$i]}" 2>/dev/null || true; fi
  done
  for i in "${!names[@]}"; do
    if [[ ${names[$i]} == *-sidecar ]]; then stop_one "$i"; fi
  done
  for ((i = ${#names[@]} - 1; i >= 0; i--)); do stop_one "$i"; done
  wait 2>/dev/null || true
  if [ -z "${state:-}" ]; then
    :
  elif [ "$status" != 0 ] || [ "${WALKTHROUGH_KEEP:-0}" = 1 ]; then
    echo "logs and configs kept in $state"
  else
    rm -rf "$state"
  fi
  exit "$status"
}
running=0
trap cleanup EXIT
# Ctrl-C once everything runs is the normal way to stop: exit 0 then.
trap 'if [ "$running" = 1 ]; then status=0; else status=130; fi; exit' INT TERM HUP
# A closed stdout (| head) makes writes fail, and so the script exit and clean up.
trap '' PIPE

state=$(mktemp -d "${TMPDIR:-/tmp}/meshd-walkthrough.XXXXXX")
# render TEMPLATE OUT: replaces every ${NAME} with the variable's value.
render() {
  local line out=$2
  : >"$out"
  while IFS= read -r line || [ -n "$line" ]; do
    while [[ $line =~ \$\{([A-Z_]+)\} ]]; do
      local name=${BASH_REMATCH[1]}
      [ -n "${!name+x}" ] || die "$1: \${$name} has no value"
      line=${line//"\${$name}"/${!name}}
    done
    printf '%s\n' "$line" >>"$out"
  done <"$1"
}
render "$here/jaeger.yaml" "$state/jaeger.yaml"
render "$here/frontend-sidecar.yaml" "$state/frontend-sidecar.yaml"
for b in A B; do
  id=backend-${b,,}
  BACKEND_ID=$id; eval "BACKEND_APP=\$BACKEND_${b}_APP BACKEND_IN=\$BACKEND_${b}_IN BACKEND_OUT=\$BACKEND_${b}_OUT BACKEND_ADMIN=\$BACKEND_${b}_ADMIN"
  render "$here/backend-sidecar.yaml" "$state/$id-sidecar.yaml"
done

fail() { # message [log names...]
  echo "walkthrough: $1" >&2
  shift
  for n in "$@"; do echo "--- last lines of $state/$n.log"; tail -n 20 "$state/$n.log"; done >&2
  exit 1
}
pid_of() { local i; for i in "${!names[@]}"; do [ "${names[$i]}" = "$1" ] && echo "${pids[$i]}"; done; return 0; }
# wait_for NAME SECONDS COMMAND...: polls until the command succeeds; gives up
# early when NAME is a program started here and it has exited.
wait_for() {
  local what=$1 secs=$2 i pid; shift 2
  pid=$(pid_of "$what")
  for i in $(seq $((secs * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.1
  done
  return 1
}
alive() { local i; for i in "${!names[@]}"; do kill -0 "${pids[$i]}" 2>/dev/null || fail "${names[$i]} exited" "${names[$i]}"; done; }

say "starting Consul (dev agent) on 127.0.0.1:$CONSUL_HTTP"
start consul "$consul_bin" agent -dev -node walkthrough -bind 127.0.0.1 -client 127.0.0.1 -advertise 127.0.0.1 \
  -http-port "$CONSUL_HTTP" -https-port -1 -dns-port -1 -grpc-port -1 -grpc-tls-port -1 \
  -serf-lan-port "$CONSUL_SERF_LAN" -serf-wan-port "$CONSUL_SERF_WAN" -server-port "$CONSUL_SERVER"
leader() { curl -fsS "http://127.0.0.1:$CONSUL_HTTP/v1/status/leader" | grep -q ':'; }
wait_for consul 60 leader || fail "Consul did not start (or elect itself leader within 60s)" consul

say "starting Jaeger; UI and query API on http://127.0.0.1:$JAEGER_UI"
start jaeger "$jaeger_bin" --config "file:$state/jaeger.yaml"
jaeger_ok() { curl -fsS "http://127.0.0.1:$JAEGER_HEALTH/status" | grep -q StatusOK && curl -fsS "http://127.0.0.1:$JAEGER_UI/api/services" >/dev/null; }
wait_for jaeger 60 jaeger_ok || fail "Jaeger did not start (or become ready within 60s)" jaeger

say "starting the apps: frontend; backend-a (5ms); backend-b (30ms, and 503 for 20% of requests)"
start backend-a-app "$BIN/backend" -listen "127.0.0.1:$BACKEND_A_APP" -name backend-a -delay 5ms
start backend-b-app "$BIN/backend" -listen "127.0.0.1:$BACKEND_B_APP" -name backend-b -delay 30ms -error-rate 0.2
start frontend-app env HTTP_PROXY="http://127.0.0.1:$FRONTEND_OUT" NO_PROXY= "$BIN/walkthrough-frontend" \
  -listen "127.0.0.1:$FRONTEND_APP" -upstream http://backend/

say "starting a meshd sidecar beside each app"
# Spans are exported every 500ms instead of every 5s, so they show up in Jaeger quickly.
export OTEL_BSP_SCHEDULE_DELAY=500
start backend-a-sidecar env OTEL_RESOURCE_ATTRIBUTES=service.instance.id=backend-a "$BIN/meshd" run --config "$state/backend-a-sidecar.yaml"
start backend-b-sidecar env OTEL_RESOURCE_ATTRIBUTES=service.instance.id=backend-b "$BIN/meshd" run --config "$state/backend-b-sidecar.yaml"
start frontend-sidecar env OTEL_RESOURCE_ATTRIBUTES=service.instance.id=frontend-1 "$BIN/meshd" run --config "$state/frontend-sidecar.yaml"
for s in frontend:$FRONTEND_ADMIN backend-a:$BACKEND_A_ADMIN backend-b:$BACKEND_B_ADMIN; do
  wait_for "${s%%:*}-sidecar" 30 curl -fsS "http://127.0.0.1:${s##*:}/ready" || fail "the ${s%%:*} sidecar is not ready" "${s%%:*}-sidecar"
done
# Both backend instances pass their Consul check and reach the frontend's sidecar.
both() {
  local table
  table=$(curl -fsS "http://127.0.0.1:$FRONTEND_ADMIN/upstreams?format=text") &&
    grep -q "127.0.0.1:$BACKEND_A_IN " <<<"$table" && grep -q "127.0.0.1:$BACKEND_B_IN " <<<"$table"
}
wait_for frontend-sidecar 30 both || fail "the frontend's sidecar does not see both backend instances" frontend-sidecar backend-a-sidecar backend-b-sidecar
alive

say "sending $requests requests over $duration to the frontend, through its sidecar (http://127.0.0.1:$FRONTEND_IN/)"
if ! "$BIN/walkthrough-loadgen" -url "http://127.0.0.1:$FRONTEND_IN/" -n "$requests" -duration "$duration" \
  -jaeger "http://127.0.0.1:$JAEGER_UI" -services frontend-sidecar,backend-sidecar; then
  if [ "$once" = 1 ]; then fail "the traces are not all in Jaeger" frontend-sidecar backend-a-sidecar jaeger; fi
  echo "walkthrough: warning: the trace check failed (see above); everything keeps running" >&2
fi
echo
say "what the frontend's sidecar sees now"
curl -fsS "http://127.0.0.1:$FRONTEND_ADMIN/upstreams?format=text" || echo "(the frontend's sidecar does not answer)"

ui_note=""
if curl -fsS "http://127.0.0.1:$JAEGER_UI/search" | grep -qi 'placeholder'; then
  ui_note="   (this jaeger binary was built without its web UI, so the page is a placeholder;
    the API below works, and a release binary or the Docker image has the full UI)"
fi
cat <<EOF

== where to look
Jaeger          http://127.0.0.1:$JAEGER_UI/search
$ui_note
  Service "frontend-sidecar" → Find Traces. Each trace is one request:
    frontend-sidecar server   the request arriving at the frontend's inbound listener
    frontend-sidecar client   handed to the frontend app (meshd.upstream=inbound)
    frontend-sidecar server   the frontend's own call to http://backend/ (its HTTP_PROXY)
    frontend-sidecar client   one per attempt at a backend instance, with the routing attributes:
        meshd.upstream           the service asked for (backend)
        meshd.lb.algorithm       the balancing algorithm (least_response_time)
        meshd.lb.candidates      how many instances it could choose from (2)
        meshd.lb.reason / score  why it chose this one, and its latency score
        meshd.instance.id        the chosen instance: Consul node/service ID (walkthrough/backend-a)
        meshd.instance.address   the address dialled: that instance's sidecar, inbound
        meshd.breaker.state      the instance's circuit breaker when it was admitted
        meshd.attempt            1, or 2+ for a retry (the server span then has a meshd.retry event)
    backend-sidecar  server/client   the same request arriving at the chosen backend instance
  API: curl 'http://127.0.0.1:$JAEGER_UI/api/traces?service=frontend-sidecar&limit=5'
Consul          http://127.0.0.1:$CONSUL_HTTP/ui/  (services frontend and backend, registered by their sidecars)
Sidecar admin   http://127.0.0.1:$FRONTEND_ADMIN/upstreams?format=text  (also /metrics)
                backend-a: 127.0.0.1:$BACKEND_A_ADMIN, backend-b: 127.0.0.1:$BACKEND_B_ADMIN
More traffic    curl http://127.0.0.1:$FRONTEND_IN/
Try a failure   kill $(pid_of backend-a-app)   (backend-a's app: Consul marks it critical and the
                frontend's sidecar stops choosing it; curl keeps getting answers from backend-b)
Logs            $state/*.log
EOF

if [ "$once" = 1 ]; then
  status=0
  exit 0
fi
echo
running=1
say "everything keeps running; press Ctrl-C to stop"
# Say when a program ends (you may stop one on purpose to see what the
# sidecars make of it), and keep the rest running.
declare -A gone=()
while true; do
  sleep 2 &
  wait $! || true
  for i in "${!names[@]}"; do
    if [ -z "${gone[$i]:-}" ] && ! kill -0 "${pids[$i]}" 2>/dev/null; then
      gone[$i]=1
      echo "walkthrough: ${names[$i]} has exited (log: $state/${names[$i]}.log); the rest keeps running"
    fi
  done
done
