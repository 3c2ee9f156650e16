#!/usr/bin/env bash
# device-kit/run.sh: dnsfence shard scaling on the 16-core device machine, in one call.
# Packed by bench/device/pack.sh beside bin/, lib/, harness/ and report.py; see
# bench/device/README.md. Issue #3's target: 1 -> 8 shards >= 6x throughput, and dnsfence with 8
# shards above dnsdist with 8 threads (anchor: 583k qps, ~12 CPU-us/query).
#
# Layout (defaults): upstream knotd on CPUs 0-3 (4 UDP workers); the proxy on the first N CPUs
# of 4-11 (dnsfence: --shards N --cpus <those>, the whole process taskset to them; dnsdist: N
# listeners + N backends, taskset likewise); the load on CPUs 12-15.
# Configurations, in this order (a configuration that would end after BUDGET seconds is skipped,
# so the low-priority ones go first when time runs short):
#   direct (the load straight to knot), dnsfence-uring 1/2/4/8, dnsdist 1/8 (the same-run
#   anchor), dnsfence-mmsg 1/2/4/8, floor-fwd-1 (floor/fwd.c, one thread).
# Each configuration: dnsperf closed loop (-c 64 -T <load CPUs> -q 2000, as the shared anchor;
# WARMUP s, then DURATION s), then dnsfence-loadgen open loop at LG_FACTORS x the dnsperf qps
# (capped at LG_MAX), one loadgen process per load CPU, each pinned, each at rate/LG_PROCS:
# dnsperf on 4 cores tops out near 600k qps, the loadgen goes beyond.
# Per point: answered qps, lost, proxy CPU-us/query (utime+stime of all the proxy's threads,
# /proc/PID/stat, over answered), upstream CPU-us/query, busy % of the proxy / upstream / load
# CPU groups (/proc/stat), the proxy's busiest threads (% of one CPU each: a shard at ~100 %
# while others idle is flow imbalance, not a lack of CPUs), NOERROR share (80 % expected). Results go to $OUT (created if needed):
# results.jsonl (one line per point, written as it goes), summary.md (tables: every point, best
# per configuration, the issue #3 checks, shard scaling), machine.txt, logs.tgz (the proxies'
# logs, dnsperf outputs, loadgen JSON; logs/ until the end).
#
# Environment (defaults): DURATION=5 WARMUP=1 SHARDS="1 2 4 8" IOS="uring mmsg"
#   DD_THREADS="1 8" DIRECT=1 FLOOR=1 CPUS_UP=0-3 UP_WORKERS=4 CPUS_PROXY=4-11 CPUS_LOAD=12-15
#   LG_FACTORS="0.9 1.3 1.8" LG_MAX=2000000 LG_PROCS=(number of load CPUs) LG_TIMEOUT=500 (ms)
#   LG_SOCKETS=64 (source ports per loadgen process: SO_REUSEPORT spreads flows over the shards
#   by hash; with 4 x 64 flows the busiest of 8 shards gets ~1.26x the mean, with dnsperf's 64
#   flows ~1.5x: compare the proxy's thread loads in summary.md)
#   DP_CLIENTS=64 DP_OUTSTANDING=2000 PORT=5320 UP_PORT=5321 UPSTREAM=knot (or loadgen:
#   `dnsfence-loadgen upstream --threads UP_WORKERS`, cheaper per answer than knot) BUDGET=390 (s)
#   OUT=$WORK/out WORK=/tmp/dnsfence-device.PID (scratch, removed at the end unless KEEP=1)
# Needs on the machine: bash, python3, taskset, ss (optional); everything else is in the kit
# (LD_LIBRARY_PATH=kit/lib). Loopback only; every process is bounded by `timeout` or stopped
# here by PID; net.core.rmem_default is raised to 4 MiB while it runs (if writable), restored.
set -euo pipefail
D=$(cd "$(dirname "$0")" && pwd)
B=$D/bin
export LD_LIBRARY_PATH=$D/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
chmod +x "$B"/* 2> /dev/null || true
T0=$(date +%s)

DURATION=${DURATION:-5} WARMUP=${WARMUP:-1}
SHARDS=${SHARDS-1 2 4 8} IOS=${IOS-uring mmsg} DD_THREADS=${DD_THREADS-1 8}
DIRECT=${DIRECT:-1} FLOOR=${FLOOR:-1}
CPUS_UP=${CPUS_UP:-0-3} UP_WORKERS=${UP_WORKERS:-4} CPUS_PROXY=${CPUS_PROXY:-4-11}
CPUS_LOAD=${CPUS_LOAD:-12-15}
LG_FACTORS=${LG_FACTORS-0.9 1.3 1.8} LG_MAX=${LG_MAX:-2000000} LG_TIMEOUT=${LG_TIMEOUT:-500}
LG_SOCKETS=${LG_SOCKETS:-64}
DP_CLIENTS=${DP_CLIENTS:-64} DP_OUTSTANDING=${DP_OUTSTANDING:-2000}
PORT=${PORT:-5320} UP_PORT=${UP_PORT:-5321} UPSTREAM=${UPSTREAM:-knot} BUDGET=${BUDGET:-390}
WORK=${WORK:-/tmp/dnsfence-device.$$}
OUT=${OUT:-$WORK/out}
REPORT=(python3 "$D/report.py")
LOAD_LIST=$("${REPORT[@]}" cpus "$CPUS_LOAD")
NLOAD=$("${REPORT[@]}" count "$CPUS_LOAD")
LG_PROCS=${LG_PROCS:-$NLOAD}
rm -rf "$WORK"; mkdir -p "$WORK/data" "$OUT/logs"
RESULTS=$OUT/results.jsonl; : > "$RESULTS"

PIDS=()
stop_pid() {  # TERM, then KILL after 5 s; only PIDs started here
  local p=$1 i
  kill -TERM "$p" 2> /dev/null || true
  for i in $(seq 50); do kill -0 "$p" 2> /dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2> /dev/null || true
  wait "$p" 2> /dev/null || true
}
RMEM=/proc/sys/net/core/rmem_default OLD_RMEM=""
cleanup() {
  local p
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  if [ -n "$OLD_RMEM" ]; then echo "$OLD_RMEM" > "$RMEM" 2> /dev/null || true; fi
  if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK/data" "$WORK/run"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
  echo "kit: $(head -3 "$D/VERSION" 2> /dev/null | tr '\n' ' ')"
  echo "layout: upstream $UPSTREAM on CPUs $CPUS_UP ($UP_WORKERS workers), proxy on the first N of $CPUS_PROXY, load on $CPUS_LOAD ($LG_PROCS loadgen processes)"
  echo "points: $DURATION s (+ $WARMUP s dnsperf warm-up), dnsperf -c $DP_CLIENTS -T $NLOAD -q $DP_OUTSTANDING, loadgen at $LG_FACTORS x the dnsperf qps (max $LG_MAX), budget $BUDGET s"
} | tee "$OUT/machine.txt"
sed 's/^/    /' "$D/VERSION" 2> /dev/null >> "$OUT/machine.txt" || true

for p in "$PORT" "$UP_PORT"; do
  if command -v ss > /dev/null && ss -Hlun "sport = :$p" 2> /dev/null | grep -q .; then
    echo "run.sh: UDP port $p is in use: set PORT/UP_PORT" >&2; exit 1
  fi
done
if [ -w "$RMEM" ]; then OLD_RMEM=$(cat "$RMEM"); echo 4194304 > "$RMEM" || OLD_RMEM=""; fi

Q=$WORK/data/queries.txt
python3 "$D/harness/gen-policy.py" --out "$WORK/data" > /dev/null
python3 "$D/harness/gen-queries.py" --out "$WORK/data" > /dev/null
awk '!/^\*/ {print $1 " A"; exit}' "$WORK/data/policy.txt" > "$WORK/data/probe.txt"

ticks() {  # utime+stime of PID (all threads), clock ticks; NA if gone
  if [ -r "/proc/$1/stat" ]; then sed 's/.*) //' "/proc/$1/stat" | awk '{print $12+$13}'; else echo NA; fi
}
PROXY_PID="" UP_PID=""
snap() {  # snap FILE: wall clock, proxy / upstream CPU ticks, the proxy's threads, /proc/stat
  local t
  {
    echo "wall $(date +%s.%N)"; echo "proxy $(ticks "$PROXY_PID")"; echo "up $(ticks "$UP_PID")"
    for t in /proc/"$PROXY_PID"/task/*; do
      [ -r "$t/stat" ] && echo "task ${t##*/} $(sed 's/.*) //' "$t/stat" | awk '{print $12+$13}') $(tr ' ' _ < "$t/comm")"
    done 2> /dev/null
    grep '^cpu[0-9]' /proc/stat
  } > "$1"
}
ready() {  # ready PORT [PID]: up to 15 s for an answer to the probe name (not if PID exits)
  local i
  for i in $(seq 30); do
    if [ -n "${2:-}" ] && ! kill -0 "$2" 2> /dev/null; then return 1; fi
    if timeout 5 "$B/dnsfence-loadgen" --server "127.0.0.1:$1" --queries "$WORK/data/probe.txt" \
      --rate 20 --duration 0.1 --timeout 300 --json --quiet 2> /dev/null | grep -q '"answered":[1-9]'; then
      return 0
    fi
    sleep 0.5
  done
  return 1
}
start() {  # start NAME CPUS CMD...: background, pinned; sets LAST
  local name=$1 cpus=$2; shift 2
  taskset -c "$cpus" "$@" > "$OUT/logs/$name.log" 2>&1 < /dev/null &
  LAST=$!; PIDS+=("$LAST")
}
forget() { local p keep=(); for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; PIDS=("${keep[@]}"); }

mkdir -p "$WORK/run/knot/db"
if [ "$UPSTREAM" = knot ]; then
  cat > "$WORK/run/knot/knot.conf" << C
server:
    listen: 127.0.0.1@$UP_PORT
    rundir: "$WORK/run/knot"
    udp-workers: $UP_WORKERS
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$WORK/run/knot/db"
log:
  - target: stderr
    any: warning
zone:
  - domain: .
    file: "$D/harness/root.zone"
    semantic-checks: off
    journal-content: none
    zonefile-sync: -1
C
  start upstream "$CPUS_UP" "$B/knotd" -c "$WORK/run/knot/knot.conf"
else
  start upstream "$CPUS_UP" "$B/dnsfence-loadgen" upstream --listen "127.0.0.1:$UP_PORT" \
    --threads "$UP_WORKERS" --prefix4 198.18.0.0/15 --ttl 300
fi
UP_PID=$LAST
ready "$UP_PORT" || { echo "run.sh: the upstream does not answer" >&2; tail -5 "$OUT/logs/upstream.log" >&2; exit 1; }

measure() {  # measure NAME PEER IO SHARDS PORT PROXY_CPUS: dnsperf closed loop, then the loadgen ladder
  local name=$1 peer=$2 io=$3 shards=$4 port=$5 pcpus=$6 dpq f rate per i lgs
  local common=(name="$name" peer="$peer" io="$io" shards="$shards" duration="$DURATION"
    proxy_cpus="$pcpus" up_cpus="$CPUS_UP" load_cpus="$CPUS_LOAD")
  local DP=("$B/dnsperf" -s 127.0.0.1 -p "$port" -d "$Q" -c "$DP_CLIENTS" -T "$NLOAD" -q "$DP_OUTSTANDING" -t 2)
  timeout $((WARMUP + 15)) taskset -c "$CPUS_LOAD" "${DP[@]}" -l "$WARMUP" > /dev/null 2>&1 || true
  snap "$WORK/b"
  timeout $((DURATION + 20)) taskset -c "$CPUS_LOAD" "${DP[@]}" -l "$DURATION" > "$OUT/logs/$name.dnsperf.txt" 2>&1 || true
  snap "$WORK/a"
  "${REPORT[@]}" point "${common[@]}" mode=closed rate= before="$WORK/b" after="$WORK/a" \
    dnsperf="$OUT/logs/$name.dnsperf.txt" >> "$RESULTS"
  dpq=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readlines()[-1])["qps"])' "$RESULTS")
  for f in $LG_FACTORS; do
    rate=$(python3 -c "print(int(min($LG_MAX, round($f * $dpq, -3))))")
    [ "$rate" -ge 1000 ] || continue
    per=$(python3 -c "print($rate / $LG_PROCS)")
    local lpids=() files=()
    snap "$WORK/b"
    for i in $(seq 0 $((LG_PROCS - 1))); do
      lgs=$OUT/logs/$name.lg$rate.$i.json
      files+=("$lgs")
      # one process per load CPU (round robin when LG_PROCS exceeds them)
      taskset -c "$(echo "$LOAD_LIST" | tr ',' '\n' | sed -n "$((i % NLOAD + 1))p")" \
        timeout $((DURATION + 20)) "$B/dnsfence-loadgen" --server "127.0.0.1:$port" --queries "$Q" \
        --rate "$per" --duration "$DURATION" --timeout "$LG_TIMEOUT" --sockets "$LG_SOCKETS" --json --quiet \
        > "$lgs" 2> "$lgs.err" < /dev/null &
      lpids+=($!)
    done
    for i in "${lpids[@]}"; do wait "$i" || true; done
    snap "$WORK/a"
    "${REPORT[@]}" point "${common[@]}" mode=lg rate="$rate" before="$WORK/b" after="$WORK/a" \
      loadgen="$(IFS=,; echo "${files[*]}")" >> "$RESULTS"
  done
}

# Seconds one configuration takes: start + warm-up + dnsperf + the ladder (+ timeouts, margins).
NF=$(echo "$LG_FACTORS" | wc -w)
COST=$((4 + WARMUP + DURATION + NF * (DURATION + 1)))
fits() {
  local now; now=$(date +%s)
  if [ $((now - T0 + COST)) -gt "$BUDGET" ]; then
    echo "run.sh: skipping $1 (budget $BUDGET s: $((now - T0)) s used, ~$COST s needed)" | tee -a "$OUT/machine.txt" >&2
    return 1
  fi
}
proxy() {  # proxy NAME PEER IO N CPUS CMD...: start it, measure it, stop it
  local name=$1 peer=$2 io=$3 n=$4 cpus=$5; shift 5
  fits "$name" || return 0
  echo "== $name (CPUs $cpus)" >&2
  start "$name" "$cpus" "$@"
  PROXY_PID=$LAST
  if ready "$PORT" "$PROXY_PID"; then
    measure "$name" "$peer" "$io" "$n" "$PORT" "$cpus"
  else
    echo "run.sh: $name does not answer; log:" >&2; tail -5 "$OUT/logs/$name.log" >&2
  fi
  stop_pid "$PROXY_PID"; forget "$PROXY_PID"; PROXY_PID=""
}

if [ "$DIRECT" = 1 ] && fits direct; then
  echo "== direct (load -> upstream)" >&2
  PROXY_PID=$UP_PID
  measure direct direct - - "$UP_PORT" "$CPUS_UP"
  PROXY_PID=""
fi
dnsfence() {  # dnsfence IO N
  local cpus; cpus=$("${REPORT[@]}" cpus "$CPUS_PROXY" "$2")
  proxy "dnsfence-$1-$2" dnsfence "$1" "$2" "$cpus" "$B/dnsfence" agent --no-bpf \
    --listen "127.0.0.1:$PORT" --upstream "127.0.0.1:$UP_PORT" \
    --policy "$WORK/data/dnsfence-policy.yaml" --endpoints "$WORK/data/dnsfence-endpoints.yaml" \
    --shards "$2" --cpus "$cpus" --io "$1" --no-metrics
}
dnsdist() {  # dnsdist N: N listeners (reusePort) and N backends, no packet cache (as the anchor)
  local t=$1 i cpus conf=$WORK/run/dd$1.conf
  cpus=$("${REPORT[@]}" cpus "$CPUS_PROXY" "$t")
  {
    echo 'setSecurityPollSuffix("")'
    echo "setLocal(\"127.0.0.1:$PORT\", {reusePort=true})"
    for i in $(seq 2 "$t"); do echo "addLocal(\"127.0.0.1:$PORT\", {reusePort=true})"; done
    for i in $(seq 1 "$t"); do echo "newServer({address=\"127.0.0.1:$UP_PORT\", name=\"up$i\"})"; done
    echo "dofile(\"$WORK/data/dnsdist-policy.lua\")"
    echo 'addAction(NotRule(OrRule({QNameSetRule(allowExact), SuffixMatchNodeRule(allowSuffix, true)})), RCodeAction(DNSRCode.REFUSED))'
  } > "$conf"
  proxy "dnsdist-$t" dnsdist - "$t" "$cpus" "$B/dnsdist" --supervised --disable-syslog -C "$conf"
}

first_io=${IOS%% *}
if [ -n "$first_io" ]; then
  for n in $SHARDS; do dnsfence "$first_io" "$n"; done
fi
for t in $DD_THREADS; do dnsdist "$t"; done
for io in ${IOS#"$first_io"}; do
  for n in $SHARDS; do dnsfence "$io" "$n"; done
done
if [ "$FLOOR" = 1 ]; then
  c=$("${REPORT[@]}" cpus "$CPUS_PROXY" 1)
  proxy floor-fwd-1 floor - 1 "$c" "$B/fwd" "$PORT" "$UP_PORT" 32 "$WORK/data/policy.txt"
fi

echo "total: $(($(date +%s) - T0)) s" >> "$OUT/machine.txt"
"${REPORT[@]}" table "$RESULTS" "$OUT/machine.txt" > "$OUT/summary.md"
# the raw outputs as one archive (fewer files to bring back)
stop_pid "$UP_PID"; forget "$UP_PID"
find "$OUT/logs" -type f -empty -delete
if tar czf "$OUT/logs.tgz" -C "$OUT" logs; then rm -rf "$OUT/logs"; fi
cat "$OUT/summary.md"
echo "run.sh: results in $OUT (summary.md, results.jsonl, machine.txt, logs.tgz), $(($(date +%s) - T0)) s" >&2
