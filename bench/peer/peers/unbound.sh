#!/usr/bin/env bash
# Peer (b): unbound as a forwarder. local-zone "." refuse + one "transparent"
# local-zone per allowed pattern (subtrees: exact entries also admit subdomains).
# Cache minimised: cache-max-ttl 0 (nothing served from cache, but clients then see
# TTL 0), tiny caches, no prefetch/serve-expired. The cache itself cannot be disabled.
# Usage: peers/unbound.sh [PORT=5300] [UPSTREAM=127.0.0.1@5301] [THREADS=1]  (foreground;
#   config goes to $BENCH_RUN/unbound, set by bench-peer.sh, else a new temp folder)
# Policy from $PEER_OUT (gen-policy.py). Copied from the shared benchmark harness.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd); OUT=${PEER_OUT:-$HERE/out}
RUN=${BENCH_RUN:-$(mktemp -d)}/unbound; mkdir -p "$RUN"
PORT=${1:-5300}; UP=${2:-127.0.0.1@5301}; THREADS=${3:-1}
cat > "$RUN/unbound.conf" <<CONF
server:
  interface: 127.0.0.1@$PORT
  port: $PORT
  num-threads: $THREADS
  so-reuseport: yes
  do-daemonize: no
  username: ""
  chroot: ""
  pidfile: ""
  directory: "$RUN"
  use-syslog: no
  logfile: ""
  verbosity: 0
  do-ip6: no
  module-config: "iterator"
  do-not-query-localhost: no
  qname-minimisation: no
  cache-max-ttl: 0
  cache-max-negative-ttl: 0
  msg-cache-size: 64k
  rrset-cache-size: 64k
  prefetch: no
  serve-expired: no
  num-queries-per-thread: 4096
  outgoing-range: 8192
  local-zone: "." refuse
  include: "$OUT/unbound-policy.conf"
forward-zone:
  name: "."
  forward-addr: $UP
remote-control:
  control-enable: yes
  control-interface: "$RUN/unbound.ctl"
  control-use-cert: no
CONF
exec unbound -d -c "$RUN/unbound.conf"
