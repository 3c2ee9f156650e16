#!/usr/bin/env bash
# Offline validation of deploy/ (scripts/test runs it): the Kubernetes manifests against the API
# schemas of two Kubernetes versions (kubernetes-validate, strict: unknown fields fail), then
# deploy/check.py (kustomization, seccomp profile, flags the manifests and units pass, probes),
# then the shipped policy and endpoints through dnsfence's own loader.
# Needs the venv scripts/install-deps makes (DNSFENCE_VENV) and a built dnsfence (DNSFENCE).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DNSFENCE_VENV:-/var/tmp/dnsfence-venv}
dnsfence=${DNSFENCE:-${CARGO_TARGET_DIR:-target}/debug/dnsfence}
[ -x "$venv/bin/kubernetes-validate" ] || { echo "deploy/validate.sh: $venv/bin/kubernetes-validate missing (scripts/install-deps)" >&2; exit 1; }
[ -x "$dnsfence" ] || { echo "deploy/validate.sh: $dnsfence missing (cargo build -p dnsfence)" >&2; exit 1; }
manifests=(deploy/kubernetes/{rbac,config,agent,proxy}.yaml)
for k in 1.30.0 1.34.0; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$k" "${manifests[@]}"
done
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$dnsfence" agent --help > "$tmp/agent.help"
"$dnsfence" proxy --help > "$tmp/proxy.help"
"$venv/bin/python" deploy/check.py "$tmp" "$tmp"
if [ -f "$tmp/endpoints.yaml" ]; then
  "$dnsfence" policy validate --endpoints "$tmp/endpoints.yaml" "$tmp/policy"
else
  "$dnsfence" policy validate "$tmp/policy"
fi
echo "deploy/validate.sh: ok (${#manifests[@]} manifests, 2 Kubernetes versions)"
