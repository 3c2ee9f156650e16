#!/usr/bin/env bash
# The callgrind performance gate (see BENCHMARKING.md): builds bench/examples/gate.rs with
# [profile.gate] and runs `gate check`, which counts the instructions of each hot path under
# callgrind and fails (exit 1) when one is more than 5 % above bench/gate/baselines.txt.
#   bench/gate/run.sh                    # check (what scripts/test runs)
#   bench/gate/run.sh --update           # accept: rewrite the baselines with the current figures
#   bench/gate/run.sh --only core/allowed,core/denied --tolerance 2
# Needs valgrind (scripts/install-deps). Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v valgrind > /dev/null || { echo "gate: valgrind not found (scripts/install-deps)" >&2; exit 1; }
cargo build --quiet --profile gate -p dnsfence-bench --example gate
target=${CARGO_TARGET_DIR:-target}
exec "$target/gate/examples/gate" check "$@"
