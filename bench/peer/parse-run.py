#!/usr/bin/env python3
"""Turn one load-generator run into one JSON line (printed on stdout).
  parse-run.py --dnsperf OUT [--verbose FILE] [--expect FILE] [key=value ...]
  parse-run.py --loadgen JSON [--expect FILE] [key=value ...]
--dnsperf: dnsperf's summary. --verbose: its -v output ("> RCODE name type latency",
"> T name type" for timeouts), used for latency percentiles and, with --expect,
to count answers whose rcode differs from the policy's (wrong_rcode, per name).
--loadgen: dnsfence-loadgen --json output; percentiles from its HdrHistogram. With --expect,
wrong_rcode is estimated from counts (the loadgen sends the query file in order, in a loop, so
the expected REFUSED count for `sent` queries is known): |REFUSED - expected| beyond the
timeouts, plus every rcode other than NOERROR/REFUSED (rcode_check = "counts").
key=value pairs are copied into the record (numbers where they parse).
Copied from the shared benchmark harness (parse-run.py) and extended with --loadgen.
"""
import json, re, sys


def num(v):
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


def parse_summary(text):
    r = {}
    pats = {
        "sent": r"Queries sent:\s+(\d+)", "completed": r"Queries completed:\s+(\d+)",
        "lost": r"Queries lost:\s+(\d+)", "run_s": r"Run time \(s\):\s+([\d.]+)",
        "qps": r"Queries per second:\s+([\d.]+)", "lat_avg_ms": r"Average Latency \(s\):\s+([\d.]+)",
        "lat_min_ms": r"Average Latency.*\(min ([\d.]+)", "lat_max_ms": r"Average Latency.*max ([\d.]+)\)",
        "lat_sd_ms": r"Latency StdDev \(s\):\s+([\d.]+)",
    }
    for k, p in pats.items():
        m = re.search(p, text)
        if m:
            v = float(m.group(1))
            r[k] = (round(v * 1000, 4) if k.endswith("_ms") else round(v, 3) if k in ("qps", "run_s") else int(v))
    m = re.search(r"Response codes:\s+(.*)", text)
    if m:
        for code, n in re.findall(r"([A-Z]+) (\d+)", m.group(1)):
            r["rc_" + code] = int(n)
    return r


def pct(sorted_v, p):
    if not sorted_v:
        return None
    return sorted_v[min(len(sorted_v) - 1, int(p / 100.0 * len(sorted_v)))]


def parse_loadgen(path, expect):
    j = json.load(open(path))
    lat = j.get("latency_us", {})
    r = {"sent": j["sent"], "completed": j["answered"], "lost": j["timeouts"],
         "qps": round(j["qps"], 3), "sent_qps": round(j.get("sent_qps", 0), 3),
         "run_s": j.get("send_s"), "lat_avg_ms": round(lat.get("mean", 0) / 1000, 4),
         "loadgen_cpu_s": round(j.get("cpu_s", 0), 2), "max_send_lag_us": j.get("max_send_lag_us")}
    for k, name in (("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"), ("p999", "p99.9_ms"), ("max", "lat_max_ms")):
        if k in lat:
            r[name] = round(lat[k] / 1000, 4)
    for code, n in j.get("rcodes", {}).items():
        r["rc_" + code] = n
    for k in ("mismatched", "unexpected", "malformed"):
        r[k] = j.get(k, 0)
    if expect:
        with open(expect) as f:
            codes = [line.rstrip("\n").partition("\t")[2] for line in f]
        full, part = divmod(j["sent"], len(codes))
        exp_refused = full * codes.count("REFUSED") + codes[:part].count("REFUSED")
        got = j.get("rcodes", {})
        other = sum(n for c, n in got.items() if c not in ("NOERROR", "REFUSED"))
        r["refused_expected"] = exp_refused
        r["wrong_rcode"] = max(0, abs(got.get("REFUSED", 0) - exp_refused) - j["timeouts"]) + other
        r["rcode_check"] = "counts"
    return r


def main():
    a = sys.argv[1:]
    rec, verbose, expect, extra, dnsperf, loadgen = {}, None, None, {}, None, None
    i = 0
    while i < len(a):
        if a[i] == "--verbose":
            verbose = a[i + 1]; i += 2
        elif a[i] == "--expect":
            expect = a[i + 1]; i += 2
        elif a[i] == "--dnsperf":
            dnsperf = a[i + 1]; i += 2
        elif a[i] == "--loadgen":
            loadgen = a[i + 1]; i += 2
        else:
            k, _, v = a[i].partition("="); extra[k] = num(v); i += 1
    rec.update(extra)
    if loadgen:
        rec.update(parse_loadgen(loadgen, expect))
    else:
        rec.update(parse_summary(open(dnsperf).read()))
    if verbose:
        exp = {}
        if expect:
            with open(expect) as f:
                for line in f:
                    n, _, rc = line.rstrip("\n").partition("\t")
                    exp[n] = rc
        lat, wrong, timeouts = [], 0, 0
        with open(verbose) as f:
            for line in f:
                if not line.startswith("> "):
                    continue
                p = line.split()
                if p[1] == "T":
                    timeouts += 1
                    continue
                lat.append(float(p[4]))
                if exp and exp.get(p[2], p[1]) != p[1]:
                    wrong += 1
        lat.sort()
        for p in (50, 90, 99, 99.9):
            v = pct(lat, p)
            rec[f"p{p:g}_ms"] = round(v * 1000, 4) if v is not None else None
        rec["verbose_answers"], rec["verbose_timeouts"] = len(lat), timeouts
        if expect:
            rec["wrong_rcode"] = wrong
            rec["rcode_check"] = "names"
    c = rec.get("completed") or 0
    for who in ("proxy", "upstream", "loadgen"):
        cpu = rec.get(who + "_cpu_s")
        if isinstance(cpu, (int, float)) and c:
            rec[who + "_cpu_us_per_q"] = round(cpu * 1e6 / c, 2)
    # CPU the box spent outside the three measured processes (tick-sampled, so only a rough
    # sign of foreign load: ~0 in closed-loop runs here, slightly negative in paced runs)
    own = [rec.get(w + "_cpu_s") for w in ("proxy", "upstream", "loadgen")]
    if isinstance(rec.get("box_busy_s"), (int, float)):
        rec["foreign_cpu_s"] = round(rec["box_busy_s"] - sum(v for v in own if isinstance(v, (int, float))), 2)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
