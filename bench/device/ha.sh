#!/usr/bin/env bash
# device-kit/ha.sh: issue 8's transition p99 on a machine whose cores are not shared, in one
# call of the device tool (a second call after run.sh, or instead of it):
#   run(command="bash device-kit/ha.sh", carry=["device-kit"], timeout_s=420)
# Runs DEMOS (6) times `dnsfence demo --place --patterns 10000` (load generator and upstream
# on the first CPU of the mask, agent and standalone proxy on the others; eBPF mode as root
# with a BPF filesystem, else `--no-bpf`, and the demo says which), each ~30 s, and keeps each
# demo's full output in $OUT/ha-demo-N.txt. Prints per demo the quiet seconds' median p99, the
# transition-second ratios (each transition second's p99 over that median; issue 8's target
# is at most 2x) and the proof's verdict, then how many transition seconds were within 2x in all.
# Environment: DEMOS=6 RATE=2000 (allowed qps; denied get a quarter on top) PATTERNS=10000
#   OUT=/tmp/dnsfence-ha.PID/out.
set -euo pipefail
D=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=$D/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
chmod +x "$D"/bin/* 2> /dev/null || true
DEMOS=${DEMOS:-6} RATE=${RATE:-2000} PATTERNS=${PATTERNS:-10000}
OUT=${OUT:-/tmp/dnsfence-ha.$$/out}
mkdir -p "$OUT"
MODE=()
if [ "$(id -u)" != 0 ] || ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
  MODE=(--no-bpf)
fi
{
  echo "date: $(date -u +%FT%TZ)"; echo "kernel: $(uname -r)"; echo "cpus: $(nproc)"
  grep -m1 'model name' /proc/cpuinfo || true
  head -1 "$D/VERSION" 2> /dev/null || true
  echo "mode: ${MODE[*]:-eBPF (root)}"
} | tee "$OUT/ha-machine.txt"
within=0 total=0 failed=0
for i in $(seq 1 "$DEMOS"); do
  log=$OUT/ha-demo-$i.txt
  rc=0
  timeout 120 "$D/bin/dnsfence" demo --place --patterns "$PATTERNS" --rate "$RATE" "${MODE[@]}" \
    > "$log" 2>&1 || rc=$?
  ratios=$(grep -A1 '^p99 of each transition' "$log" | tail -1 || true)
  counts=$(grep -o 'within 2x: [0-9]* of [0-9]*' "$log" || true)
  steady=$(grep -o "quiet seconds' median ([0-9]* µs" "$log" | grep -o '[0-9]* µs' || true)
  verdict=$(grep '^proof ' "$log" || echo "no verdict (rc $rc)")
  echo "demo $i: steady p99 ${steady:-?} |$ratios | $counts | $verdict"
  if [ -n "$counts" ]; then
    read -r w n < <(echo "$counts" | awk '{print $3, $5}')
    within=$((within + w)) total=$((total + n))
  fi
  [ "$rc" = 0 ] || failed=$((failed + 1))
done
echo "transition seconds within 2x of steady p99: $within of $total; demos whose proof failed: $failed" \
  | tee "$OUT/ha-summary.txt"
