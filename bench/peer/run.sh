#!/usr/bin/env bash
# bench/peer/run.sh: the side-by-side peer comparison, one command.
#
# Builds dnsfence and dnsfence-loadgen (release, CARGO_TARGET_DIR respected) and the floor
# forwarder, generates the 10k-pattern policy (for each peer's syntax) and the 100k-query mix
# (80 % allowed / 20 % denied), then runs REPS interleaved repetitions (rep 1 of every peer,
# then rep 2, ...) of bench-peer.sh for each peer against the same upstream, and writes
# summary.md (markdown tables: medians over repetitions, plus the machine and the command).
#
# Peers (PEERS, in this order): direct (no proxy: the load goes straight to the upstream),
# dnsfence-uring, dnsfence-mmsg (dnsfence agent --no-bpf --shards 1 --io ...), dnsdist, unbound,
# floor (floor/fwd.c). A peer whose program is not installed is skipped with a warning.
#
# Each peer and repetition (bench-peer.sh, PIN=1: load generator + upstream on CPU 0, proxy on
# CPU 1):
#   dnsperf -q $OUTSTANDING      closed loop, saturation: max QPS and proxy CPU-µs per query
#   dnsperf -Q $RATES -v         paced: per-name rcode check, dnsperf's percentiles
#   loadgen at $LG_RATES         paced, open loop: the latency percentiles; "half" stands for
#                                half of dnsfence-uring's max load, measured first (calibration)
#   direct only, also loadgen at $DIRECT_LG_RATES: the load generator comparison (ceiling).
#
# Environment (defaults): DURATION=5 REPS=3 OUTSTANDING=500 RATES=20000 LG_RATES=half
#   DIRECT_LG_RATES="20000 250000" HALF=(calibrated) PEERS=(all) UPSTREAM=knot (or loadgen:
#   the bundled `dnsfence-loadgen upstream`) PIN=1 PORT=5310 UP_PORT=5311 (not the harness's
#   5300/5301, so that both can be on one machine; a port in use stops the run)
#   PEER_OUT=${TMPDIR:-/tmp}/dnsfence-peer (generated files) RESULTS=$PEER_OUT/results/<time>
#   NO_BUILD=1 (use the binaries already in $CARGO_TARGET_DIR/release), plus bench-peer.sh's.
# Needs: dnsperf, knot (knotd, knotc), dig, cc, python3; dnsdist and unbound for those peers
# (scripts/install-deps installs all but dnsdist/unbound: apt-get install dnsdist unbound).
# Takes about REPS x peers x (3 runs x DURATION + ~8 s): ~8 min with the defaults (measured:
# 7 min 20 s for DURATION=5 REPS=3 on a 2-core VM, plus the release build).
# Loopback only; every run is bounded; only processes it started are stopped, by PID.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export DURATION=${DURATION:-5} PIN=${PIN:-1} UPSTREAM=${UPSTREAM:-knot}
export OUTSTANDING=${OUTSTANDING-500} RATES=${RATES-20000}
LG_RATES=${LG_RATES-half} DIRECT_LG_RATES=${DIRECT_LG_RATES-20000 250000}
REPS=${REPS:-3} PORT=${PORT:-5310} UP_PORT=${UP_PORT:-5311}
PEERS=${PEERS:-direct dnsfence-uring dnsfence-mmsg dnsdist unbound floor}
export PEER_OUT=${PEER_OUT:-${TMPDIR:-/tmp}/dnsfence-peer}
mkdir -p "$PEER_OUT"
RESULTS=${RESULTS:-$PEER_OUT/results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"
export UP_PORT

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
if [ "${NO_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --release -p dnsfence -p dnsfence-loadgen)
fi
export DNSFENCE=$TARGET/release/dnsfence LOADGEN=$TARGET/release/dnsfence-loadgen
for b in "$DNSFENCE" "$LOADGEN"; do [ -x "$b" ] || { echo "run.sh: $b missing" >&2; exit 1; }; done
cc -O2 -o "$PEER_OUT/fwd" "$HERE/floor/fwd.c"
python3 "$HERE/gen-policy.py"
python3 "$HERE/gen-queries.py"

declare -A CMD=(
  [direct]=none
  [dnsfence-uring]="$HERE/peers/dnsfence.sh uring $PORT 127.0.0.1:$UP_PORT"
  [dnsfence-mmsg]="$HERE/peers/dnsfence.sh mmsg $PORT 127.0.0.1:$UP_PORT"
  # Without the agent's flow history (--flow-history 0: no flow record per query).
  [dnsfence-uring-noflows]="env DNSFENCE_ARGS=--flow-history=0 $HERE/peers/dnsfence.sh uring $PORT 127.0.0.1:$UP_PORT"
  # Completion coalescing (--coalesce): not in the default set; name them in PEERS.
  [dnsfence-uring-c20]="env DNSFENCE_ARGS=--coalesce=20us $HERE/peers/dnsfence.sh uring $PORT 127.0.0.1:$UP_PORT"
  [dnsfence-uring-c50]="env DNSFENCE_ARGS=--coalesce=50us $HERE/peers/dnsfence.sh uring $PORT 127.0.0.1:$UP_PORT"
  [dnsfence-uring-c100]="env DNSFENCE_ARGS=--coalesce=100us $HERE/peers/dnsfence.sh uring $PORT 127.0.0.1:$UP_PORT"
  [dnsfence-uring-c200]="env DNSFENCE_ARGS=--coalesce=200us $HERE/peers/dnsfence.sh uring $PORT 127.0.0.1:$UP_PORT"
  [dnsdist]="$HERE/peers/dnsdist.sh $PORT 127.0.0.1:$UP_PORT"
  [unbound]="$HERE/peers/unbound.sh $PORT 127.0.0.1@$UP_PORT"
  [floor]="$HERE/peers/floor.sh $PORT $UP_PORT 32"
)
declare -A NEEDS=([direct]=dnsperf [dnsdist]=dnsdist [unbound]=unbound [floor]=cc)
need=(dnsperf dig python3)
[ "$UPSTREAM" = knot ] && need+=(knotd knotc)
for t in "${need[@]}"; do command -v "$t" > /dev/null || { echo "run.sh: $t not found" >&2; exit 1; }; done
ORDER=()
for p in $PEERS; do
  [ -n "${CMD[$p]:-}" ] || { echo "run.sh: unknown peer $p" >&2; exit 2; }
  if [ -n "${NEEDS[$p]:-}" ] && ! command -v "${NEEDS[$p]}" > /dev/null; then
    echo "run.sh: skipping $p (${NEEDS[$p]} not installed)" >&2; continue
  fi
  ORDER+=("$p")
done

bench() {  # bench NAME [env...]: one bench-peer.sh run of peer NAME
  local n=$1 p=$PORT; shift
  [ "${CMD[$n]}" = none ] && p=$UP_PORT
  # shellcheck disable=SC2086  # CMD is a command line, split on purpose
  env "$@" "$HERE/bench-peer.sh" "$n" "$p" ${CMD[$n]} > /dev/null
}

# Half of dnsfence's max load: one closed-loop run of dnsfence-uring, kept apart.
if [[ " $LG_RATES " == *" half "* ]] && [ -z "${HALF:-}" ]; then
  echo "== calibration: dnsfence-uring closed loop" >&2
  bench dnsfence-uring RESULTS="$RESULTS/calibration" RATES= LG_RATES= REP=0
  HALF=$(python3 -c 'import json,sys; q=[json.loads(l)["qps"] for l in open(sys.argv[1])]; print(max(1000, int(round(max(q) / 2, -3))))' "$RESULTS/calibration/dnsfence-uring.jsonl")
fi
LG=${LG_RATES//half/${HALF:-}}
echo "== paced loadgen rate(s): $LG (half of max load: ${HALF:-n/a})" >&2

START=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
for rep in $(seq "$REPS"); do
  for n in "${ORDER[@]}"; do
    echo "== rep $rep: $n" >&2
    lg=$LG; [ "$n" = direct ] && lg="$LG $DIRECT_LG_RATES"
    bench "$n" RESULTS="$RESULTS" REP="$rep" LG_RATES="$lg"
  done
done

{
  echo "# Peer comparison, $START"
  echo
  echo "- command: \`$(printf '%q ' env DURATION="$DURATION" REPS="$REPS" OUTSTANDING="$OUTSTANDING" RATES="$RATES" LG_RATES="$LG_RATES" UPSTREAM="$UPSTREAM" PIN="$PIN")bench/peer/run.sh\`"
  echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- Cargo.toml Cargo.lock matcher policy engine dnsfence loadgen 2>/dev/null || echo ' (+ uncommitted changes to the built code)')"
  echo "- machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1), kernel $(uname -r)"
  echo "- versions: $(rustc --version 2>/dev/null | cut -d' ' -f1-2), dnsperf $(dnsperf -h 2>&1 | sed -n 's/^Version //p' | head -1), $(dnsdist --version 2>/dev/null | head -1 | cut -d' ' -f1-2), unbound $(unbound -V 2>/dev/null | sed -n 's/^Version //p' | head -1), knotd $(knotd --version 2>/dev/null | awk '{print $NF}')"
  echo "- upstream: $UPSTREAM on 127.0.0.1:$UP_PORT; pinning PIN=$PIN (load generator + upstream on CPU 0, proxy on CPU 1)"
  echo "- ${DURATION} s per run, $REPS interleaved repetitions, medians (min-max); half of dnsfence-uring's max load: ${HALF:-n/a} qps"
  echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  python3 "$HERE/summarize.py" "$RESULTS"
} > "$RESULTS/summary.md"
cat "$RESULTS/summary.md"
echo "run.sh: results in $RESULTS (summary.md, *.jsonl)" >&2
