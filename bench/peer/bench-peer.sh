#!/usr/bin/env bash
# bench-peer.sh NAME PORT CMD [ARGS...]
#
# Benchmarks one DNS proxy (the unit under test); usually called by run.sh. Starts the upstream
# (knotd on 127.0.0.1:$UP_PORT, see upstream/knot.sh, or `dnsfence-loadgen upstream` with
# UPSTREAM=loadgen), then CMD, which must run in the foreground, listen on 127.0.0.1:PORT (UDP)
# and forward allowed names to the upstream. Then, against 127.0.0.1:PORT:
#   closed loop: one dnsperf run per value in $OUTSTANDING (dnsperf -q N), as fast as it can:
#                the CPU cost per query at saturation and the maximum QPS;
#   paced:       one dnsperf run per value in $RATES (dnsperf -Q N -v): per-name rcode check
#                against $PEER_OUT/queries.expect, and dnsperf's latency percentiles;
#   paced:       one dnsfence-loadgen run per value in $LG_RATES (open loop, kernel receive
#                timestamps, HdrHistogram): the latency percentiles the tables report.
# Appends one JSON line per run to $RESULTS/NAME.jsonl (see parse-run.py) and prints it.
# CMD "none" = no proxy: the load goes to the upstream itself (give PORT=$UP_PORT).
# CPU: utime+stime of the proxy / upstream processes (all threads, /proc/PID/stat) and of the
# load generator (bash `times` for dnsperf, getrusage for the loadgen), divided by queries
# answered = CPU-us per query.
#
# Copied from the shared benchmark harness (bench-peer.sh) and extended: loadgen runs, the
# bundled upstream, PEER_OUT. Nothing here reads ../shared at run time.
#
# Environment (defaults): DURATION=10 (s per run) OUTSTANDING="20 100 500" RATES="20000 50000"
#   LG_RATES="" LOADGEN=dnsfence-loadgen (path) CLIENTS=4 (dnsperf -c) PIN=1 (taskset:
#   load generator + upstream on CPU 0, proxy on CPU 1; with CMD none the upstream gets CPU 1)
#   REP=1 (label) UP_PORT=5301 UPSTREAM=knot|loadgen WARMUP=2 (s) PEER_OUT=$HERE/out
#   QUERIES=$PEER_OUT/queries.txt RESULTS=results
#   RCVBUF=4194304: while running, net.core.rmem_default (the UDP receive buffer every socket
#   gets unless it sets its own) is raised to this, then restored; the 208 KiB default overflows
#   during the multi-ms stalls of a small VM and the drops show up as "lost". RCVBUF=0: leave it.
# Every run is bounded (dnsperf -l / loadgen --duration, plus `timeout`); only processes
# started here are stopped, by PID, on exit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 3 ] || { awk 'NR > 1 { if (!/^#/) exit; print }' "$0"; exit 2; }
NAME=$1 PORT=$2; shift 2
DURATION=${DURATION:-10} OUTSTANDING=${OUTSTANDING-20 100 500} RATES=${RATES-20000 50000}
LG_RATES=${LG_RATES-} LOADGEN=${LOADGEN:-dnsfence-loadgen} UPSTREAM=${UPSTREAM:-knot}
CLIENTS=${CLIENTS:-4} PIN=${PIN:-1} REP=${REP:-1} UP_PORT=${UP_PORT:-5301} WARMUP=${WARMUP:-2}
RCVBUF=${RCVBUF:-4194304}
export PEER_OUT=${PEER_OUT:-$HERE/out}
QUERIES=${QUERIES:-$PEER_OUT/queries.txt} RESULTS=${RESULTS:-$HERE/results}
EXPECT=${EXPECT:-${QUERIES%.txt}.expect}
[ -f "$PEER_OUT/policy.txt" ] || python3 "$HERE/gen-policy.py"
[ -f "$QUERIES" ] || python3 "$HERE/gen-queries.py"
mkdir -p "$RESULTS"
RUN=$(mktemp -d "${TMPDIR:-/tmp}/bench-$NAME.XXXXXX")
VDIR=/dev/shm; [ -d "$VDIR" ] && [ -w "$VDIR" ] || VDIR=$RUN
PIDS=()

stop() {  # stop the processes this script started, by PID: TERM, then KILL after 5 s
  local p i
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  PIDS=()
}
RMEM=/proc/sys/net/core/rmem_default OLD_RMEM=""
restore_rmem() { if [ -n "$OLD_RMEM" ]; then echo "$OLD_RMEM" > "$RMEM"; fi; }
trap 'stop; restore_rmem; rm -rf "$RUN"' EXIT
trap 'exit 130' INT TERM

pin() { if [ "$PIN" = 1 ]; then echo "taskset -c $1"; fi; }
start() {  # start LOG CPU CMD...: run CMD in its own session; print its PID
  local log=$1 cpu=$2; shift 2
  # shellcheck disable=SC2046  # pin prints a command prefix, split on purpose
  setsid $(pin "$cpu") "$@" > "$log" 2>&1 < /dev/null &
  PIDS+=($!); echo "started pid $! ($*)" >&2; LAST=$!
}
cpu_s() {  # utime+stime (seconds, all threads) of PID, from /proc/PID/stat
  [ -r "/proc/$1/stat" ] || { echo 0; return; }
  sed 's/.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($12+$13)/hz}'
}
cpu_us() {  # "utime stime" (seconds) of PID
  [ -r "/proc/$1/stat" ] || { echo "0 0"; return; }
  sed 's/.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f %.2f", $12/hz, $13/hz}'
}
listener() { ss -Hlunp "sport = :$1" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | sed -n 1p; }
up_count() {  # queries the upstream received so far (knot's mod-stats; NA for the loadgen upstream)
  if [ "$UPSTREAM" = knot ]; then
    knotc -s "$RUN/up/knot.sock" stats 2>/dev/null | awk -F' = ' '/request-protocol\[udp4\]/{print $2}' | grep . || echo 0
  else echo 0; fi
}
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }  # all CPUs, ticks
rcvbuf_errors() { awk '/^Udp: [0-9]/{print $6}' /proc/net/snmp; }  # UDP drops, whole host
wait_ready() {  # wait_ready PORT NAME: up to 20 s for a NOERROR answer
  local i
  for i in $(seq 40); do
    dig +time=1 +tries=1 -p "$1" @127.0.0.1 "$2" A 2>/dev/null | grep -q 'status: NOERROR' && return 0
    sleep 0.5
  done
  echo "bench-peer: nothing answered on 127.0.0.1:$1" >&2; return 1
}

busy_port() { ss -Hlun "sport = :$1" 2>/dev/null | grep -q .; }
for p in "$UP_PORT" $([ "$1" = none ] || echo "$PORT"); do
  if busy_port "$p"; then
    echo "bench-peer: UDP port $p is already in use (another benchmark?): pick PORT/UP_PORT" >&2
    exit 1
  fi
done
if [ "$RCVBUF" != 0 ] && [ -w "$RMEM" ]; then OLD_RMEM=$(cat "$RMEM"); echo "$RCVBUF" > "$RMEM"; fi
PROBE=$(awk '!/^\*/{print; exit}' "$PEER_OUT/policy.txt")
if [ "$1" = none ]; then UPCPU=1; else UPCPU=0; fi
export BENCH_RUN=$RUN  # scratch folder for the peers' generated configs
if [ "$UPSTREAM" = knot ]; then
  start "$RUN/upstream.log" $UPCPU "$HERE/upstream/knot.sh" "$RUN/up" "$UP_PORT"
else
  start "$RUN/upstream.log" $UPCPU "$LOADGEN" upstream --listen "127.0.0.1:$UP_PORT" \
    --prefix4 198.18.0.0/15 --ttl 300
fi
UPPID=$LAST
wait_ready "$UP_PORT" "$PROBE"
PROXY_PID=""
if [ "$1" != none ]; then
  start "$RUN/proxy.log" 1 "$@"
  wait_ready "$PORT" "$PROBE" || { cat "$RUN/proxy.log" >&2; exit 1; }
  PROXY_PID=$(listener "$PORT"); PROXY_PID=${PROXY_PID:-$LAST}
  if [ "$PIN" = 1 ]; then taskset -apc 1 "$PROXY_PID" > /dev/null; fi
fi
CHECK=(); [ "$1" = none ] || CHECK=(--expect "$EXPECT")
DP=(dnsperf -s 127.0.0.1 -p "$PORT" -d "$QUERIES" -c "$CLIENTS" -T 1 -t 2)
# shellcheck disable=SC2046
timeout 30 $(pin 0) "${DP[@]}" -l "$WARMUP" -q 100 > /dev/null 2>&1 || true

one() {  # one MODE PARAM ARGS...: MODE closed|rate (dnsperf ARGS) or lg (loadgen at rate PARAM)
  local mode=$1 param=$2; shift 2
  local out=$RUN/run.out vfile=$VDIR/bench-$NAME-$$.v pa pb ua ub ba bb qa qb ea eb wa wb t lg
  local src=(--dnsperf "$out") vopt=()
  [ "$mode" = rate ] && vopt=(--verbose "$vfile")
  local sa sb; sa=$(cpu_us "${PROXY_PID:-0}"); pa=$(cpu_s "${PROXY_PID:-0}"); ua=$(cpu_s "$UPPID"); qa=$(up_count); ba=$(busy); ea=$(rcvbuf_errors); wa=$(date +%s.%N)
  # shellcheck disable=SC2046
  if [ "$mode" = lg ]; then
    timeout $((DURATION + 30)) $(pin 0) "$LOADGEN" --server "127.0.0.1:$PORT" --queries "$QUERIES" \
      --rate "$param" --duration "$DURATION" --timeout 2000 --json --quiet > "$out" 2> "$RUN/lg.err" || true
    src=(--loadgen "$out"); t=""
  elif [ "$mode" = rate ]; then
    t=$( { ( timeout $((DURATION + 30)) $(pin 0) "${DP[@]}" -l "$DURATION" "$@" -v > "$vfile" 2>&1; times ) | tail -1; } || true)
    cp "$vfile" "$out"
  else
    t=$( { ( timeout $((DURATION + 30)) $(pin 0) "${DP[@]}" -l "$DURATION" "$@" > "$out" 2>&1; times ) | tail -1; } || true)
  fi
  sb=$(cpu_us "${PROXY_PID:-0}"); pb=$(cpu_s "${PROXY_PID:-0}"); ub=$(cpu_s "$UPPID"); qb=$(up_count); bb=$(busy); eb=$(rcvbuf_errors); wb=$(date +%s.%N)
  lg=$(echo "$t" | awk 'NF {split($1,u,"m"); split($2,s,"m"); printf "%.2f", u[1]*60+u[2]+s[1]*60+s[2]}')
  local extra=(); [ -n "$lg" ] && extra=(loadgen_cpu_s="$lg")
  python3 "$HERE/parse-run.py" "${src[@]}" "${vopt[@]}" "${CHECK[@]}" peer="$NAME" rep="$REP" mode="$mode" \
    param="$param" clients="$CLIENTS" pin="$PIN" duration="$DURATION" upstream="$UPSTREAM" \
    rmem_default="$(cat "$RMEM")" "${extra[@]}" \
    proxy_cpu_s="$([ -n "$PROXY_PID" ] && awk -v a="$pa" -v b="$pb" 'BEGIN{printf "%.2f", b-a}' || echo NA)" \
    proxy_sys_share="$([ -n "$PROXY_PID" ] && echo "$sa $sb" | awk '{u=$3-$1; s=$4-$2; if (u+s > 0) printf "%.2f", s/(u+s); else print "NA"}' || echo NA)" \
    upstream_cpu_s="$(awk -v a="$ua" -v b="$ub" 'BEGIN{printf "%.2f", b-a}')" \
    upstream_queries="$([ "$UPSTREAM" = knot ] && echo $((qb - qa)) || echo NA)" udp_rcvbuf_errors=$((eb - ea)) \
    wall_s="$(awk -v a="$wa" -v b="$wb" 'BEGIN{printf "%.2f", b-a}')" \
    box_busy_pct="$(awk -v a="$ba" -v b="$bb" -v n="$(nproc)" -v hz="$(getconf CLK_TCK)" -v d="$(awk -v a="$wa" -v b="$wb" 'BEGIN{print b-a}')" 'BEGIN{printf "%.0f", 100*(b-a)/hz/d/n}')" \
    box_busy_s="$(awk -v a="$ba" -v b="$bb" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.2f", (b-a)/hz}')" \
    | tee -a "$RESULTS/$NAME.jsonl"
  rm -f "$vfile"
}
for q in $OUTSTANDING; do one closed "$q" -q "$q"; done
for r in $RATES; do one rate "$r" -Q "$r" -q 1000; done
for r in $LG_RATES; do one lg "$r"; done
