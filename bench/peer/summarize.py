#!/usr/bin/env python3
"""summarize.py RESULTS_DIR: markdown tables of the *.jsonl files bench-peer.sh wrote, median
(min-max) over repetitions, per peer / mode / parameter:
  1. every run kind (closed-loop dnsperf, paced dnsperf -v, paced dnsfence-loadgen);
  2. latency added over direct-to-upstream at the same paced rate (medians of p50/p99/p99.9
     minus the direct peer's medians);
  3. the load generators themselves against the upstream (the direct peer).
lost, UDP rcvbuf drops and wrong rcodes are sums over the repetitions (drops are host-wide).
Copied from the shared benchmark harness (summarize.py) and extended (loadgen runs, added
latency, load generator comparison)."""
import glob, json, os, statistics, sys

COLS = [("qps", "QPS", 0), ("proxy_cpu_us_per_q", "proxy CPU-µs/q", 2),
        ("upstream_cpu_us_per_q", "upstream CPU-µs/q", 1), ("loadgen_cpu_us_per_q", "loadgen CPU-µs/q", 1),
        ("p50_ms", "p50 ms", 3), ("p99_ms", "p99 ms", 3), ("p99.9_ms", "p99.9 ms", 3),
        ("proxy_sys_share", "proxy sys share", 2), ("box_busy_pct", "box busy %", 0)]
MODES = {"closed": 0, "rate": 1, "lg": 2}


def med(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else None


def cell(vals, nd):
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals:
        return "-"
    f = lambda v: f"{v:,.{nd}f}"
    return f(statistics.median(vals)) + (f" ({f(min(vals))}-{f(max(vals))})" if len(vals) > 1 else "")


def load_label(mode, param):
    if mode == "closed":
        return f"dnsperf -q {param} (closed loop)"
    if mode == "rate":
        return f"dnsperf -Q {param:,} -v"
    return f"loadgen {param:,}/s"


def load(d):
    rows, order = {}, []
    for fn in sorted(glob.glob(os.path.join(d, "*.jsonl")), key=os.path.getmtime):
        for line in open(fn):
            r = json.loads(line)
            k = (r["peer"], r["mode"], r["param"])
            if k not in rows:
                order.append(k)
            rows.setdefault(k, []).append(r)
    peers = []
    for k in order:
        if k[0] not in peers:
            peers.append(k[0])
    order.sort(key=lambda k: (peers.index(k[0]), MODES.get(k[1], 9), k[2]))
    return rows, order, peers


def main_table(rows, order):
    print("| peer | load | reps | " + " | ".join(c[1] for c in COLS) + " | lost | UDP rcvbuf drops | wrong rcode |")
    print("|---" * (len(COLS) + 6) + "|")
    for k in order:
        rs = rows[k]
        lost = sum(r.get("lost", 0) for r in rs)
        drops = sum(r.get("udp_rcvbuf_errors", 0) for r in rs) if any("udp_rcvbuf_errors" in r for r in rs) else "-"
        if any("wrong_rcode" in r for r in rs):
            wrong = str(sum(r["wrong_rcode"] for r in rs if "wrong_rcode" in r))
            if any(r.get("rcode_check") == "counts" for r in rs):
                wrong += " (counts)"
        else:
            wrong = "-"
        print(f"| {k[0]} | {load_label(k[1], k[2])} | {len(rs)} | "
              + " | ".join(cell([r.get(c[0]) for r in rs], c[2]) for c in COLS)
              + f" | {lost} | {drops} | {wrong} |")


def added_table(rows, order, direct="direct"):
    paced = [k for k in order if k[1] in ("lg", "rate") and k[0] != direct and (direct, k[1], k[2]) in rows]
    if not paced:
        return
    print("\nLatency added over direct-to-upstream at the same paced rate (median of the peer minus "
          "median of direct, ms; the direct figures are in the first columns):\n")
    print("| peer | load | direct p50 | direct p99 | direct p99.9 | added p50 | added p99 | added p99.9 | lost (peer) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in paced:
        d, p = rows[(direct, k[1], k[2])], rows[k]
        vals = []
        for key in ("p50_ms", "p99_ms", "p99.9_ms"):
            vals.append(med([r.get(key) for r in d]))
        adds = []
        for key, dv in zip(("p50_ms", "p99_ms", "p99.9_ms"), vals):
            pv = med([r.get(key) for r in p])
            adds.append("-" if pv is None or dv is None else f"{pv - dv:+.3f}")
        dcells = ["-" if v is None else f"{v:.3f}" for v in vals]
        print(f"| {k[0]} | {load_label(k[1], k[2])} | " + " | ".join(dcells) + " | " + " | ".join(adds)
              + f" | {sum(r.get('lost', 0) for r in p)} |")


def loadgen_table(rows, order, direct="direct"):
    ks = [k for k in order if k[0] == direct]
    if not ks:
        return
    print("\nThe load generators against the upstream alone (direct): answered QPS and the load "
          "generator's own CPU per answered query (dnsperf: bash `times`; loadgen: getrusage).\n")
    print("| load | reps | sent QPS | answered QPS | lost | load generator CPU-µs/q | upstream CPU-µs/q |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        rs = rows[k]
        sent = [r.get("sent", 0) / r["run_s"] for r in rs if isinstance(r.get("run_s"), (int, float)) and r["run_s"]]
        print(f"| {load_label(k[1], k[2])} | {len(rs)} | {cell(sent, 0)} | {cell([r.get('qps') for r in rs], 0)} | "
              f"{sum(r.get('lost', 0) for r in rs)} | {cell([r.get('loadgen_cpu_us_per_q') for r in rs], 2)} | "
              f"{cell([r.get('upstream_cpu_us_per_q') for r in rs], 2)} |")


def warn_foreign(d, limit=1.0):
    for fn in sorted(glob.glob(os.path.join(d, "*.jsonl"))):
        for line in open(fn):
            r = json.loads(line)
            if r.get("foreign_cpu_s", 0) > limit:
                print(f"- {r['peer']} rep {r['rep']} {r['mode']} {r['param']}: "
                      f"{r['foreign_cpu_s']} CPU-s outside the measured processes (other load on the box)")


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "results"
    rows, order, _ = load(d)
    main_table(rows, order)
    added_table(rows, order)
    loadgen_table(rows, order)
    print("\nRuns with CPU load outside the measured processes (> 1 CPU-s):\n")
    warn_foreign(d)


if __name__ == "__main__":
    main()
