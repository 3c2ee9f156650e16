#!/usr/bin/env bash
# The start-up p99 of issue 8: open-loop load on an agent (2,000 qps), and at second 2 one of
# these variants (VARIANTS, default "control other proxy"):
#   control       nothing new starts (`sleep`)
#   other         a standalone proxy starts on another port: it does not join the agent's port,
#                 so what it costs the agent is CPU only
#   proxy         a standalone proxy starts and joins the agent's port (SO_REUSEPORT)
#   other-normal, proxy-normal
#                 the same with DNSFENCE_PREPARE_AT_NORMAL_PRIORITY=1: start-up work at normal
#                 priority instead of SCHED_IDLE (the A/B of engine::startup)
# Prints the p99 of each second and, per run, the ratio of second 2's p99 to the median of the
# others. PROXY_ARGS adds flags to the starting proxy (e.g. "--allow-entries 4096" to see what
# the allow table's start-up work costs). SLOW_US=N also lists the answers at least N µs late (loadgen --slow-us): when their
# query was sent (ms) and their latency (µs).
#   [VARIANTS=...] [SLOW_US=N] bench/ha/startup.sh [RUNS]   (release build; loopback; ~6 s a run)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
variants=${VARIANTS:-control other proxy}
slow_us=${SLOW_US:-0}
cargo build --quiet --release -p dnsfence -p dnsfence-loadgen
target=${CARGO_TARGET_DIR:-target}
bin="$target/release"
work=$(mktemp -d /tmp/dnsfence-ha-startup.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(port); listen=$(port); other=$(port)
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
  for variant in $variants; do
    env=""
    case $variant in
      *-normal) env="DNSFENCE_PREPARE_AT_NORMAL_PRIORITY=1 " ;;
    esac
    common="--no-bpf --upstream 127.0.0.1:$up --no-metrics --agent-socket $work/agent.sock --state-dir $work/state-$variant-$run ${PROXY_ARGS:-}"
    case $variant in
      control) cmd="sleep 3" ;;
      other | other-normal) cmd="$env$bin/dnsfence proxy --listen 127.0.0.1:$other $common" ;;
      proxy | proxy-normal) cmd="$env$bin/dnsfence proxy --listen 127.0.0.1:$listen $common" ;;
      *) echo "unknown variant $variant" >&2; exit 2 ;;
    esac
    "$bin/dnsfence-loadgen" --server "127.0.0.1:$listen" --queries "$work/q.txt" --rate 2000 \
      --duration 5 --json --quiet --slow-us "$slow_us" \
      --at "2:$cmd > $work/$variant.log 2>&1 & echo \$! > $work/v.pid" > "$work/lg.json"
    python3 - "$work/lg.json" "$variant" "$slow_us" <<'PY'
import json, statistics, sys
r = json.load(open(sys.argv[1]))
p99 = [t["p99_us"] for t in r["timeline"]]
others = statistics.median(p99[1:2] + p99[3:])
print(f"{sys.argv[2]:12} p99 per second (µs): {p99}  second 2 / others: {p99[2] / max(others, 1):.1f}x  lost: {r['timeouts']}")
if int(sys.argv[3]) > 0:
    slow = " ".join(f"{s['sent_ms']:.0f}ms:{s['us']}us" for s in r["slow"][:60])
    print(f"{'':12} slow (>= {sys.argv[3]} µs): {len(r['slow'])}: {slow}")
PY
    kill "$(cat "$work/v.pid")" 2>/dev/null || true
    sleep 0.5
  done
done
