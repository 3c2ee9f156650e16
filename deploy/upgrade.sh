#!/usr/bin/env bash
# Upgrade dnsfence on a cluster without a moment when a node has neither process: roll the
# agent DaemonSet (one node at a time; the proxy serves meanwhile), then replace the proxy
# (OnDelete) node by node, each only once that node's new agent is ready.
#   deploy/upgrade.sh [IMAGE]      (IMAGE: set both DaemonSets' image first)
set -euo pipefail
ns=kube-system
sel=app.kubernetes.io/name=dnsfence
if [ $# -ge 1 ]; then
  kubectl -n "$ns" set image ds/dnsfence-agent agent="$1" install-seccomp="$1"
  kubectl -n "$ns" set image ds/dnsfence-proxy proxy="$1" install-seccomp="$1"
fi
kubectl -n "$ns" rollout status ds/dnsfence-agent --timeout=30m
for pod in $(kubectl -n "$ns" get pods -l "$sel,app.kubernetes.io/component=proxy" -o name); do
  node=$(kubectl -n "$ns" get "$pod" -o jsonpath='{.spec.nodeName}')
  kubectl -n "$ns" wait pod -l "$sel,app.kubernetes.io/component=agent" \
    --field-selector "spec.nodeName=$node" --for=condition=Ready --timeout=5m
  kubectl -n "$ns" delete "$pod" --wait=true
  until kubectl -n "$ns" wait pod -l "$sel,app.kubernetes.io/component=proxy" \
      --field-selector "spec.nodeName=$node" --for=condition=Ready --timeout=5m 2>/dev/null; do
    sleep 2
  done
  echo "upgrade: $node done"
done
