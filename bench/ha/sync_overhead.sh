#!/usr/bin/env bash
# Issue 8's sync overhead target: the standalone proxy's CPU per query with the agent
# connected, against the proxy alone (serving its persisted policy). The agent listens on
# another port, so all the load goes to the proxy; every query is a fresh allowed name, so
# every answer is an observation the proxy sends to the agent (the worst case).
#   bench/ha/sync_overhead.sh [RUNS] [QPS]   (release build; loopback only)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
qps=${2:-10000}
secs=5
source bench/ha/common.sh sync
up=$(port); proxy_port=$(port); agent_port=$(port)
fixtures "**.allowed.test"
"$bin/dnsfence-loadgen" upstream --listen "127.0.0.1:$up" > "$work/up.log" 2>&1 & pids+=($!)
agent() {
  "$bin/dnsfence" agent --no-bpf --listen "127.0.0.1:$agent_port" --upstream "127.0.0.1:$up" \
    --policy "$work/policy.yaml" --endpoints "$work/endpoints.yaml" --no-metrics --no-pin \
    --shards 1 --agent-socket "$work/agent.sock" --open-loopback-answers > "$work/agent.log" 2>&1 &
  # A child of this shell (not of a command substitution's subshell), so that `wait` waits
  # for its drain.
  a=$!; pids+=("$a")
}
# The proxy gets the policy once and persists it; then it runs alone or with the agent.
agent; sleep 1
"$bin/dnsfence" proxy --no-bpf --listen "127.0.0.1:$proxy_port" --upstream "127.0.0.1:$up" \
  --no-metrics --no-pin --shards 1 --agent-socket "$work/agent.sock" --state-dir "$work/state" \
  > "$work/proxy.log" 2>&1 & proxy=$!; pids+=($proxy)
sleep 1.5
kill "$a"; wait "$a" 2>/dev/null || true
cpu() { awk '{print $14 + $15}' "/proc/$proxy/stat"; }
tick=$(getconf CLK_TCK)
for run in $(seq 1 "$runs"); do
  for mode in alone connected; do
    a=""
    if [ "$mode" = connected ]; then agent; sleep 1.5; fi
    seq "$((run * 10000000))" 1 "$((run * 10000000 + qps * secs))" \
      | sed "s/.*/n&.$mode.allowed.test A/" > "$work/q.txt"
    before=$(cpu)
    "$bin/dnsfence-loadgen" --server "127.0.0.1:$proxy_port" --queries "$work/q.txt" \
      --rate "$qps" --duration "$secs" --json --quiet > "$work/lg.json"
    sleep 0.5
    after=$(cpu)
    python3 - "$work/lg.json" "$mode" "$before" "$after" "$tick" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ticks = int(sys.argv[4]) - int(sys.argv[3])
us = ticks / int(sys.argv[5]) * 1e6 / max(r["answered"], 1)
print(f"{sys.argv[2]:10} answered {r['answered']:>7}  proxy CPU {us:6.2f} µs/query")
PY
    if [ -n "$a" ]; then kill "$a"; wait "$a" 2>/dev/null || true; fi
  done
done
