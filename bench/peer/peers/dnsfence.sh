#!/usr/bin/env bash
# Peer: dnsfence agent without eBPF, one shard, the 10k-pattern policy as a CiliumNetworkPolicy
# (gen-policy.py: dnsfence-policy.yaml / dnsfence-endpoints.yaml in $PEER_OUT).
# Usage: peers/dnsfence.sh IO [PORT=5300] [UPSTREAM=127.0.0.1:5301]   (IO: uring | mmsg | auto)
#   DNSFENCE: the binary (default: dnsfence on PATH); PIN=1 also pins the shard (--cpus 1).
#   DNSFENCE_ARGS: extra agent flags. Foreground; exec's the agent.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd); OUT=${PEER_OUT:-$HERE/out}
IO=${1:-uring}; PORT=${2:-5300}; UP=${3:-127.0.0.1:5301}
CPUS=(); [ "${PIN:-1}" = 1 ] && CPUS=(--cpus 1)
# shellcheck disable=SC2086  # DNSFENCE_ARGS is a list of flags
exec "${DNSFENCE:-dnsfence}" agent --no-bpf --listen "127.0.0.1:$PORT" --upstream "$UP" \
  --policy "$OUT/dnsfence-policy.yaml" --endpoints "$OUT/dnsfence-endpoints.yaml" \
  --shards 1 "${CPUS[@]}" --no-metrics --io "$IO" ${DNSFENCE_ARGS:-}
