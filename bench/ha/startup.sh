#!/usr/bin/env bash
# The start-up p99 of issue 8: open-loop load on an agent (2,000 qps), and at second 2 either
# nothing new (control: `sleep`) or a standalone proxy joining the port. Prints the p99 of
# each second and, per run, the ratio of second 2's p99 to the median of the others.
#   bench/ha/startup.sh [RUNS]        (release build; loopback only; about 6 s a run)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
cargo build --quiet --release -p dnsfence -p dnsfence-loadgen
target=${CARGO_TARGET_DIR:-target}
bin="$target/release"
work=$(mktemp -d /tmp/dnsfence-ha-startup.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(port); listen=$(port)
cat > "$work/policy.yaml" <<'P'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}]
  - toFQDNs: [{matchPattern: "*.allowed.test"}]
P
printf 'endpoints:\n- {name: client, namespace: default, labels: {app: client}, ips: ["127.0.0.1"]}\n' > "$work/endpoints.yaml"
for i in $(seq 0 499); do echo "h$i.allowed.test A"; done > "$work/q.txt"
"$bin/dnsfence-loadgen" upstream --listen "127.0.0.1:$up" > "$work/up.log" 2>&1 & pids+=($!)
sleep 0.3
"$bin/dnsfence" agent --no-bpf --listen "127.0.0.1:$listen" --upstream "127.0.0.1:$up" \
  --policy "$work/policy.yaml" --endpoints "$work/endpoints.yaml" --no-metrics \
  --agent-socket "$work/agent.sock" > "$work/agent.log" 2>&1 & pids+=($!)
sleep 1
for run in $(seq 1 "$runs"); do
  for variant in control proxy; do
    if [ "$variant" = proxy ]; then
      cmd="$bin/dnsfence proxy --no-bpf --listen 127.0.0.1:$listen --upstream 127.0.0.1:$up --no-metrics --agent-socket $work/agent.sock --state-dir $work/state-$run"
    else
      cmd="sleep 3"
    fi
    "$bin/dnsfence-loadgen" --server "127.0.0.1:$listen" --queries "$work/q.txt" --rate 2000 \
      --duration 5 --json --quiet --at "2:$cmd > $work/$variant.log 2>&1 & echo \$! > $work/v.pid" \
      > "$work/lg.json"
    python3 - "$work/lg.json" "$variant" <<'PY'
import json, statistics, sys
r = json.load(open(sys.argv[1]))
p99 = [t["p99_us"] for t in r["timeline"]]
others = statistics.median(p99[1:2] + p99[3:])
print(f"{sys.argv[2]:8} p99 per second (µs): {p99}  second 2 / others: {p99[2] / max(others, 1):.1f}x  lost: {r['timeouts']}")
PY
    kill "$(cat "$work/v.pid")" 2>/dev/null || true
    sleep 0.5
  done
done
