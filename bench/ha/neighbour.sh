#!/usr/bin/env bash
# What a CPU-bound neighbour on a shard's CPU costs its p99, and what scheduling weight does
# about it. The agent (userspace, one shard) is pinned to CPU 1, the load generator (open loop,
# 2,000 qps) and the upstream to CPU 0. For each run and each nice value of the shard thread
# (NICES, default "0 -10", set with renice on the shard's thread; below 0 needs root), three
# 4-second loads: no neighbour; a busy loop on CPU 1 in the agent's session ("same": the same
# autogroup, as processes started from one shell); the same loop in a session of its own
# ("other": its own autogroup, as a separate service or pod is its own scheduling group).
# Prints each p99 and, at the end, the medians.
#   [NICES="0 -10"] bench/ha/neighbour.sh [RUNS]   (release build; loopback; ~15 s a value and run)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
nices=${NICES:-0 -10}
if [ "$(id -u)" != 0 ] && [ "$nices" != 0 ]; then
  echo "a negative nice value needs root (or NICES=0)" >&2; exit 2
fi
source bench/ha/common.sh neighbour
up=$(port)
fixtures "*.allowed.test"
taskset -c 0 "$bin/dnsfence-loadgen" upstream --listen "127.0.0.1:$up" > "$work/up.log" 2>&1 & pids+=($!)
sleep 0.3
: > "$work/p99s"
for run in $(seq 1 "$runs"); do
  for nice in $nices; do
    listen=$(port)
    taskset -c 1 "$bin/dnsfence" agent --no-bpf --listen "127.0.0.1:$listen" --upstream "127.0.0.1:$up" \
      --policy "$work/policy.yaml" --endpoints "$work/endpoints.yaml" --no-metrics --shards 1 \
      --agent-socket "$work/agent-$run$nice.sock" --state-dir "$work/state-$run$nice" \
      --open-loopback-answers > "$work/agent-$run$nice.log" 2>&1 &
    agent=$!; pids+=("$agent")
    serving "$work/agent-$run$nice.log"
    reniced=0
    for t in /proc/$agent/task/*; do
      if [ "$(cat "$t/comm")" = dnsf-shard-0 ]; then
        renice -n "$nice" -p "$(basename "$t")" > /dev/null && reniced=1
      fi
    done
    if [ "$reniced" != 1 ]; then echo "the shard thread was not reniced to $nice" >&2; exit 1; fi
    sleep 0.5
    for neighbour in none same other; do
      hog=""
      case $neighbour in
        # Bounded: each ends by itself even if this script dies.
        same) taskset -c 1 timeout 6 sh -c 'while :; do :; done' & hog=$! ;;
        other) setsid taskset -c 1 timeout 6 sh -c 'while :; do :; done' & hog=$! ;;
      esac
      if [ -n "$hog" ]; then pids+=("$hog"); sleep 0.2; fi
      taskset -c 0 "$bin/dnsfence-loadgen" --server "127.0.0.1:$listen" --queries "$work/q.txt" \
        --rate 2000 --duration 4 --json --quiet > "$work/lg.json"
      if [ -n "$hog" ]; then
        # The loop itself is timeout's child.
        pkill -P "$hog" 2>/dev/null || true
        kill "$hog" 2>/dev/null || true; wait "$hog" 2>/dev/null || true
      fi
      python3 - "$work/lg.json" "$nice" "$neighbour" "$work/p99s" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"nice {sys.argv[2]:>3} neighbour {sys.argv[3]:5} p99 {r['latency_us']['p99']:6} µs  p50 {r['latency_us']['p50']:5} µs  answered {r['answered']}  lost {r['timeouts']}")
with open(sys.argv[4], "a") as f:
    f.write(f"{sys.argv[2]} {sys.argv[3]} {r['latency_us']['p99']}\n")
PY
    done
    kill -TERM "$agent"; wait "$agent" 2>/dev/null || true
  done
done
python3 - "$work/p99s" <<'PY'
import collections, statistics, sys
by = collections.defaultdict(list)
for line in open(sys.argv[1]):
    s, n, p = line.split()
    by[(s, n)].append(int(p))
for (s, n), ps in by.items():
    print(f"nice {s:>3} neighbour {n:5} median p99 over {len(ps)} runs: {statistics.median(ps)} µs  ({', '.join(map(str, ps))})")
PY
