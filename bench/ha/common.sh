# Shared by the bench/ha scripts (sourced from the repository root): builds the release
# binaries, makes a work directory ($work, removed at exit with the processes in $pids), and
# defines `port` (a free loopback port), `serving LOG` (waits, bounded, until a dnsfence log
# says it serves) and `fixtures PATTERN` (policy.yaml allowing PATTERN by DNS and toFQDNs for
# one client at 127.0.0.1, endpoints.yaml, and q.txt: 500 names under allowed.test).
#   source bench/ha/common.sh NAME
cargo build --quiet --release -p dnsfence -p dnsfence-loadgen
target=${CARGO_TARGET_DIR:-target}
bin="$target/release"
work=$(mktemp -d "/tmp/dnsfence-ha-$1.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
serving() { for _ in $(seq 1 100); do grep -q ": serving " "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "not serving: $1" >&2; return 1; }
fixtures() {
  cat > "$work/policy.yaml" <<P
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "$1"}]
  - toFQDNs: [{matchPattern: "$1"}]
P
  printf 'endpoints:\n- {name: client, namespace: default, labels: {app: client}, ips: ["127.0.0.1"]}\n' > "$work/endpoints.yaml"
  for i in $(seq 0 499); do echo "h$i.allowed.test A"; done > "$work/q.txt"
}
