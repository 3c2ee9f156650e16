#!/usr/bin/env bash
# bench/datapath/run.sh: what eBPF redirection costs per query, side by side in one run.
#
# One agent in eBPF mode (1 shard, pinned to CPU 1) and the bundled upstream (CPU 0). The same
# load generator run (paced, open loop, RATE qps for DURATION s, 80 % allowed names with stable
# answers / 20 % denied, a workload that is both an endpoint by source address and by cgroup)
# is sent REPS times in each of two ways, interleaved:
#   direct      the loadgen outside every endpoint cgroup sends to the proxy's address
#               (the endpoint is found by source address 127.0.0.1)
#   redirected  the loadgen inside the endpoint's cgroup sends to 192.0.2.53:53 (blackholed);
#               the BPF programs rewrite it to the proxy, which finds the endpoint through
#               the origin map
# Then the direct runs again against the same agent with --no-bpf (no origin lookup).
# For each: CPU-µs per answered query of the agent (utime+stime delta from /proc) and of the
# loadgen (its own getrusage): BPF programs' time is charged to the process whose syscall ran them;
# answered, lost, p99, and allow-map writes per query (map-update syscalls: the shard writes
# an entry once, then only when it would expire before a client's cached answer).
#
# Environment (defaults): RATE=20000 DURATION=5 REPS=3 TTL=300 CPU_PROXY=1 CPU_LOAD=0
#   NO_BUILD=1 (use $CARGO_TARGET_DIR/release as built).
# Needs root. Loopback only; bounded; stops only what it started, by PID.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RATE=${RATE:-20000} DURATION=${DURATION:-5} REPS=${REPS:-3} TTL=${TTL:-300}
CPU_PROXY=${CPU_PROXY:-1} CPU_LOAD=${CPU_LOAD:-0}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $(id -u) == 0 ]] || { echo "bench/datapath/run.sh: needs root (BPF, cgroups, routes)" >&2; exit 1; }
if [[ -z ${NO_BUILD:-} ]]; then
  (cd "$ROOT" && cargo build --release -q -p dnsfence -p dnsfence-loadgen)
fi
BIN=$TARGET/release
WORK=$(mktemp -d /tmp/dnsfence-datapath-bench.XXXXXX)
CG_MOUNT=/run/dnsfence-bench-cgroup2
CG=$CG_MOUNT/dnsfence-bench-$$
PIN=/sys/fs/bpf/dnsfence-bench-$$
PORT=5320 UP_PORT=5321 METRICS=127.0.0.1:9970
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$BIN/dnsfence" agent --uninstall --bpf-pin "$PIN" > /dev/null 2>&1 || true
  rmdir "$CG/load" "$CG" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$CG_MOUNT"
grep -q " $CG_MOUNT cgroup2 " /proc/mounts || mount -t cgroup2 none "$CG_MOUNT"
mkdir -p "$CG/load"
# Kept afterwards (as the system tests do): a query that escaped redirection must never leave.
ip route replace blackhole 192.0.2.53

cat > "$WORK/policy.yaml" <<'YAML'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: load, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: load}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}]
  - toFQDNs: [{matchPattern: "*.allowed.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
YAML
cat > "$WORK/endpoints.yaml" <<'YAML'
endpoints:
- {name: load, namespace: default, labels: {app: load}, ips: ["127.0.0.1"], cgroup: load}
YAML
python3 - "$WORK/queries.txt" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(10000):
        f.write(f"h{i % 2000}.allowed.test A\n" if i % 5 else f"d{i}.denied.test A\n")
PY

taskset -c "$CPU_LOAD" "$BIN/dnsfence-loadgen" upstream --listen 127.0.0.1:$UP_PORT --ttl "$TTL" \
  --ips 1 > "$WORK/upstream.log" 2>&1 &
pids+=($!)
taskset -c "$CPU_PROXY" "$BIN/dnsfence" agent --listen 127.0.0.1:$PORT --upstream 127.0.0.1:$UP_PORT \
  --policy "$WORK/policy.yaml" --endpoints "$WORK/endpoints.yaml" --shards 1 --cpus "$CPU_PROXY" \
  --open-loopback-answers \
  --bpf-pin "$PIN" --cgroup-root "$CG" --metrics-listen $METRICS > "$WORK/agent.log" 2>&1 &
agent=$!
pids+=($agent)
for _ in $(seq 50); do
  dig +short +time=1 +tries=1 @127.0.0.1 -p $PORT h1.allowed.test > /dev/null 2>&1 && break
  sleep 0.2
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
metric() { curl -s "http://$METRICS/metrics" | awk -v m="$1" '$1 ~ "^"m {s += $2} END {print s + 0}'; }
hz=$(getconf CLK_TCK)

run_one() { # mode rep
  local mode=$1 server procs=/dev/null
  if [[ $mode == redirected ]]; then server=192.0.2.53:53 procs=$CG/load/cgroup.procs
  else server=127.0.0.1:$PORT; fi
  local a0 w0 q0
  a0=$(cpu_ticks $agent); w0=$(metric dnsfence_allow_writes_total); q0=$(metric dnsfence_queries_total)
  sh -c 'echo $$ > "$0"; exec taskset -c "$1" "$2" --server "$3" --queries "$4" --rate "$5" --duration "$6" --json --quiet' \
    "$procs" "$CPU_LOAD" "$BIN/dnsfence-loadgen" "$server" "$WORK/queries.txt" "$RATE" "$DURATION" \
    > "$WORK/lg.json" 2> "$WORK/lg.err" &
  wait $!
  local a1 w1 q1
  a1=$(cpu_ticks $agent); w1=$(metric dnsfence_allow_writes_total); q1=$(metric dnsfence_queries_total)
  python3 - "$WORK/lg.json" "$mode" "$(( a1 - a0 ))" "$hz" "$(( w1 - w0 ))" "$(( q1 - q0 ))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
mode, agent_t, hz, writes, queries = sys.argv[2], *map(int, sys.argv[3:])
answered = max(r["answered"], 1)
print(f"| {mode} | {r['sent']} | {r['answered']} | {r['timeouts']} | "
      f"{agent_t / hz * 1e6 / answered:.2f} | {r['cpu_s'] * 1e6 / answered:.2f} | "
      f"{r['latency_us']['p99']} | {writes / max(queries, 1):.4f} |")
PY
}

echo "## bench/datapath: direct vs redirected, $RATE qps x ${DURATION}s, $REPS reps (agent on CPU $CPU_PROXY)"
echo
echo "| mode | sent | answered | lost | agent CPU-µs/q | loadgen CPU-µs/q | p99 µs | allow writes/q |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
# Warm-up: the allowed names' entries are written once.
run_one direct > /dev/null
for rep in $(seq "$REPS"); do
  run_one direct
  run_one redirected
done
echo
echo "datapath counters: $(curl -s "http://$METRICS/metrics" | grep '^dnsfence_datapath_events_total' | tr '\n' ' ')"
# The same direct load against the agent without eBPF (no origin lookup per query): what the
# eBPF mode costs the proxy itself.
kill "$agent"; wait "$agent" 2>/dev/null || true
taskset -c "$CPU_PROXY" "$BIN/dnsfence" agent --no-bpf --listen 127.0.0.1:$PORT --upstream 127.0.0.1:$UP_PORT \
  --policy "$WORK/policy.yaml" --endpoints "$WORK/endpoints.yaml" --shards 1 --cpus "$CPU_PROXY" \
  --open-loopback-answers \
  --metrics-listen $METRICS > "$WORK/agent-nobpf.log" 2>&1 &
agent=$!
pids+=($agent)
for _ in $(seq 50); do
  dig +short +time=1 +tries=1 @127.0.0.1 -p $PORT h1.allowed.test > /dev/null 2>&1 && break
  sleep 0.2
done
echo
echo "| mode | sent | answered | lost | agent CPU-µs/q | loadgen CPU-µs/q | p99 µs | allow writes/q |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
run_one direct > /dev/null
for rep in $(seq "$REPS"); do
  run_one direct | sed 's/^| direct |/| direct, --no-bpf agent |/'
done
