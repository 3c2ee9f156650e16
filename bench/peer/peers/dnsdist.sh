#!/usr/bin/env bash
# Peer (a): dnsdist as the policy proxy. Allowed = QNameSetRule(exact) or
# SuffixMatchNodeRule(wildcard suffixes; note: also matches the suffix apex);
# everything else gets REFUSED. One pool, one backend, NO packet cache.
# Usage: peers/dnsdist.sh [PORT=5300] [UPSTREAM=127.0.0.1:5301]  (foreground;
#   config goes to $BENCH_RUN/dnsdist, set by bench-peer.sh, else a new temp folder)
# Policy from $PEER_OUT (gen-policy.py). Copied from the shared benchmark harness.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd); OUT=${PEER_OUT:-$HERE/out}
RUN=${BENCH_RUN:-$(mktemp -d)}/dnsdist; mkdir -p "$RUN"
PORT=${1:-5300}; UP=${2:-127.0.0.1:5301}
cat > "$RUN/dnsdist.conf" <<CONF
setSecurityPollSuffix("")          -- no security-status lookups (they would leave loopback)
setLocal("127.0.0.1:$PORT")
newServer({address="$UP", name="upstream"})
dofile("$OUT/dnsdist-policy.lua")
addAction(NotRule(OrRule({QNameSetRule(allowExact), SuffixMatchNodeRule(allowSuffix, true)})),
          RCodeAction(DNSRCode.REFUSED))
-- no packet cache: getPool(""):setCache(...) is deliberately not called
CONF
exec dnsdist --supervised --disable-syslog -C "$RUN/dnsdist.conf"
