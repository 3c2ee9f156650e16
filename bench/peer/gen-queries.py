#!/usr/bin/env python3
"""Generate a dnsperf query file ("name TYPE" a line) against OUT/policy.txt:
allowed names (exact entries and subdomains under wildcards) and denied names
(unrelated domains and near-misses), with random letter case and some trailing
dots. Also writes OUT/queries.expect ("name<TAB>NOERROR|REFUSED").
Denied names are never a wildcard's apex nor below an exact entry, the two cases
where peers' semantics differ, so every peer must give the same rcodes.
Note: a trailing dot does not change the wire format; it only exercises parsers.
Copied unchanged from the shared benchmark harness, except for the PEER_OUT default.
"""
import argparse, os, random, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from policy import Policy  # noqa: E402

OTHER = ("qua ste mib rok dun vog pim tas huv nep bok sar fiz gru lop wam".split())
TLDS = ["com", "com", "net", "org", "io", "info", "xyz", "biz"]
LBL = "x img node cache app web svc eu us v2 prod".split()


def rnd_label(rng):
    if rng.random() < 0.5:
        return rng.choice(LBL) + str(rng.randint(0, 999))
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(4, 10)))


def denied_name(rng, exact, suffixes):
    r = rng.random()
    if r < 0.5:    # unrelated domain
        d = "".join(rng.choice(OTHER) for _ in range(rng.randint(2, 3))) + "." + rng.choice(TLDS)
        return d if rng.random() < 0.4 else rnd_label(rng) + "." + d
    if r < 0.7:    # sibling of an exact entry
        e = rng.choice(exact).split(".")
        return ".".join([rnd_label(rng)] + e[1:])
    if r < 0.85:   # allowed name glued under a foreign domain
        base = rng.choice(exact) if rng.random() < 0.5 else "a." + rng.choice(suffixes)
        return base + ".attacker-" + rng.choice(OTHER) + ".net"
    # look-alike: suffix without the label boundary
    return rng.choice(["evil", "x", "my", "login-"]) + rng.choice(suffixes + exact)


def mangle(rng, name, case_p, dot_p):
    if rng.random() < case_p:
        name = "".join(c.upper() if rng.random() < 0.5 else c for c in name)
    return name + "." if rng.random() < dot_p else name


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100000, help="queries (100000)")
    ap.add_argument("--allowed", type=float, default=0.8, help="share of allowed names (0.8)")
    ap.add_argument("--exact-share", type=float, default=0.5, help="share of allowed hitting exact entries (0.5)")
    ap.add_argument("--aaaa", type=float, default=0.3, help="share of AAAA queries, rest A (0.3)")
    ap.add_argument("--case", type=float, default=0.3, help="share with random letter case (0.3)")
    ap.add_argument("--dot", type=float, default=0.1, help="share with a trailing dot (0.1)")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("PEER_OUT") or os.path.join(here, "out"))
    a = ap.parse_args()
    pol = Policy.load(os.path.join(a.out, "policy.txt"))
    exact, suffixes = sorted(pol.exact), sorted(pol.suffixes)
    rng = random.Random(a.seed)
    n_allowed = 0
    with open(os.path.join(a.out, "queries.txt"), "w") as q, open(os.path.join(a.out, "queries.expect"), "w") as e:
        for _ in range(a.n):
            if rng.random() < a.allowed:
                name = (rng.choice(exact) if rng.random() < a.exact_share else
                        ".".join(rnd_label(rng) for _ in range(rng.randint(1, 2))) + "." + rng.choice(suffixes))
                ok = True
            else:
                while True:
                    name = denied_name(rng, exact, suffixes)
                    if not pol.allowed(name) and not pol.ambiguous(name):
                        break
                ok = False
            assert pol.allowed(name) == ok and not (ok is False and pol.ambiguous(name))
            name = mangle(rng, name, a.case, a.dot)
            q.write(f"{name} {'AAAA' if rng.random() < a.aaaa else 'A'}\n")
            e.write(f"{name}\t{'NOERROR' if ok else 'REFUSED'}\n")
            n_allowed += ok
    print(f"gen-queries: {a.n} queries, {n_allowed} allowed ({100.0 * n_allowed / a.n:.1f}%) -> {os.path.relpath(a.out)}/queries.txt")


if __name__ == "__main__":
    main()
