#!/usr/bin/env bash
# Peer: the floor, floor/fwd.c (a minimal single-threaded recvmmsg/sendmmsg forwarder with the
# same policy as a hash set of exact names and suffixes). Compiled into $PEER_OUT/fwd on first use.
# Usage: peers/floor.sh [PORT=5300] [UPSTREAM_PORT=5301] [BATCH=32]   (foreground)
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd); OUT=${PEER_OUT:-$HERE/out}
[ -x "$OUT/fwd" ] && [ "$OUT/fwd" -nt "$HERE/floor/fwd.c" ] || cc -O2 -o "$OUT/fwd" "$HERE/floor/fwd.c"
exec "$OUT/fwd" "${1:-5300}" "${2:-5301}" "${3:-32}" "$OUT/policy.txt"
