#!/usr/bin/env bash
# The start-up p99 of issue 8: open-loop load on an agent (2,000 qps), and at second 2 one of
# these variants (VARIANTS, default "control other proxy"):
#   control       nothing new starts (`sleep`)
#   other         a standalone proxy starts on another port: it does not join the agent's port,
#                 so what it costs the agent is CPU only
#   proxy         a standalone proxy starts and joins the agent's port (SO_REUSEPORT)
#   agent         the agent restarts beside a standalone proxy serving alone (before the run
#                 a proxy joins the port and the agent is SIGKILLed; at second 2 the agent
#                 starts again, with the same policy, and serves on as the base agent)
#   crash         a standalone proxy serving beside the agent is SIGKILLed
#   other-normal, proxy-normal, agent-normal
#                 the same with DNSFENCE_PREPARE_AT_NORMAL_PRIORITY=1: start-up work at normal
#                 priority instead of SCHED_IDLE (the A/B of engine::startup)
# Prints the p99 of each second and, per run, the ratio of second 2's p99 to the median of the
# others; at the end, each variant's median ratio over the runs. PROXY_ARGS adds flags to the starting proxy (e.g. "--allow-entries 4096" to see what
# the allow table's start-up work costs). SLOW_US=N also lists the answers at least N µs late (loadgen --slow-us): when their
# query was sent (ms) and their latency (µs). PIN=1 places the load generator and the upstream on
# CPU 0 and every dnsfence process on CPU 1 (the peer harness's layout): on a 2-CPU VM the load
# generator's own bursts of CPU (and the upstream's) otherwise land on the serving CPU too.
# SETSID=1 runs every dnsfence process in a session of its own (see below).
#   [VARIANTS=...] [SLOW_US=N] [PIN=1] bench/ha/startup.sh [RUNS]   (release build; loopback; ~6 s a run)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
variants=${VARIANTS:-control other proxy}
slow_us=${SLOW_US:-0}
if [ "${PIN:-0}" = 1 ]; then lg="taskset -c 0"; df="taskset -c 1"; else lg=""; df=""; fi
# SETSID=1: every dnsfence process runs in a session of its own (its own autogroup, as a
# separate service or pod is its own scheduling group): a starting process's idle-priority
# work then competes as its group, whose weight its threads' policies do not lower.
if [ "${SETSID:-0}" = 1 ]; then df="setsid $df"; fi
source bench/ha/common.sh startup
up=$(port); listen=$(port); other=$(port)
fixtures "*.allowed.test"
$lg "$bin/dnsfence-loadgen" upstream --listen "127.0.0.1:$up" > "$work/up.log" 2>&1 & pids+=($!)
sleep 0.3
agent_cmd="$df $bin/dnsfence agent --no-bpf --listen 127.0.0.1:$listen --upstream 127.0.0.1:$up \
  --policy $work/policy.yaml --endpoints $work/endpoints.yaml --no-metrics \
  --agent-socket $work/agent.sock --open-loopback-answers"
$agent_cmd > "$work/agent.log" 2>&1 & agent_pid=$!
pids+=("$agent_pid")
sleep 1
: > "$work/ratios"
for run in $(seq 1 "$runs"); do
  for variant in $variants; do
    env=""
    case $variant in
      *-normal) env="DNSFENCE_PREPARE_AT_NORMAL_PRIORITY=1 " ;;
    esac
    common="--no-bpf --upstream 127.0.0.1:$up --no-metrics --agent-socket $work/agent.sock --state-dir $work/state-$variant-$run ${PROXY_ARGS:-}"
    case $variant in
      control) cmd="sleep 3" ;;
      other | other-normal) cmd="$env$df $bin/dnsfence proxy --listen 127.0.0.1:$other $common" ;;
      crash)
        # A proxy joins the agent's port before the run; at second 2 it is SIGKILLed (what
        # the agent pays for the kernel tearing the dead process down, and what sat in its
        # socket queue is lost: counted, not in the p99).
        $df $bin/dnsfence proxy --listen "127.0.0.1:$listen" $common > "$work/victim-$run.log" 2>&1 &
        victim=$!
        serving "$work/victim-$run.log"
        sleep 0.5
        cmd="kill -KILL $victim" ;;
      proxy | proxy-normal) cmd="$env$df $bin/dnsfence proxy --listen 127.0.0.1:$listen $common" ;;
      agent | agent-normal)
        # The proxy serves alone when the run starts; the agent comes back at second 2.
        $df $bin/dnsfence proxy --listen "127.0.0.1:$listen" $common > "$work/alone-$run.log" 2>&1 &
        alone=$!; pids+=("$alone")
        serving "$work/alone-$run.log"
        sleep 0.5
        kill -KILL "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
        sleep 0.5
        cmd="$env$agent_cmd" ;;
      *) echo "unknown variant $variant" >&2; exit 2 ;;
    esac
    $lg "$bin/dnsfence-loadgen" --server "127.0.0.1:$listen" --queries "$work/q.txt" --rate 2000 \
      --duration 5 --json --quiet --slow-us "$slow_us" \
      --at "2:$cmd > $work/$variant.log 2>&1 & echo \$! > $work/v.pid" > "$work/lg.json"
    python3 - "$work/lg.json" "$variant" "$slow_us" "$work/ratios" <<'PY'
import json, statistics, sys
r = json.load(open(sys.argv[1]))
p99 = [t["p99_us"] for t in r["timeline"]]
others = statistics.median(p99[1:2] + p99[3:])
print(f"{sys.argv[2]:12} p99 per second (µs): {p99}  second 2 / others: {p99[2] / max(others, 1):.1f}x  lost: {r['timeouts']}")
with open(sys.argv[4], "a") as f:
    f.write(f"{sys.argv[2]} {p99[2] / max(others, 1)}\n")
if int(sys.argv[3]) > 0:
    slow = " ".join(f"{s['sent_ms']:.0f}ms:{s['us']}us" for s in r["slow"][:60])
    print(f"{'':12} slow (>= {sys.argv[3]} µs): {len(r['slow'])}: {slow}")
PY
    case $variant in
      agent | agent-normal)
        # The restarted agent is the base from now on; the proxy goes.
        agent_pid=$(cat "$work/v.pid"); pids+=("$agent_pid")
        kill -TERM "$alone"; wait "$alone" 2>/dev/null || true ;;
      # The command was `sleep` or `kill`, long gone: its pid may be another process's now.
      control | crash) ;;
      *) kill "$(cat "$work/v.pid")" 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
done
python3 - "$work/ratios" <<'PY'
import collections, statistics, sys
by = collections.defaultdict(list)
for line in open(sys.argv[1]):
    v, r = line.split()
    by[v].append(float(r))
for v, rs in by.items():
    print(f"{v:12} median second 2 / others over {len(rs)} runs: {statistics.median(rs):.2f}x  ({', '.join(f'{r:.1f}' for r in rs)})")
PY
