#!/usr/bin/env bash
# Builds the BPF objects from their C sources with Debian's clang, reproducibly, and strips
# them; the stripped objects are committed beside the sources and embedded by the datapath
# crate with include_bytes!, so `cargo build` needs no clang.
#   ebpf/build.sh           rebuild the committed objects
#   ebpf/build.sh --check   rebuild into a temporary directory; fail if they differ
set -euo pipefail
cd "$(dirname "$0")"
check=0
[[ ${1:-} == --check ]] && check=1
CLANG=${CLANG:-clang}
STRIP=${LLVM_STRIP:-llvm-strip}
command -v "$CLANG" > /dev/null || { echo "ebpf/build.sh: $CLANG not found (apt install clang llvm)" >&2; exit 1; }
arch_inc=/usr/include/$(uname -m)-linux-gnu
out=.
if ((check)); then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
status=0
for src in *.bpf.c; do
  obj=${src%.c}.o
  "$CLANG" -target bpf -O2 -g -Wall -Werror -I"$arch_inc" -I. \
    -fdebug-prefix-map="$PWD"=. -c "$src" -o "$out/$obj"
  # Keep BTF (.BTF/.BTF.ext, needed for map definitions), drop DWARF.
  "$STRIP" -g "$out/$obj"
  if ((check)); then
    if ! cmp -s "$out/$obj" "$obj"; then
      echo "ebpf/build.sh --check: ebpf/$obj is not the build of ebpf/$src ($("$CLANG" --version | head -1)); run ebpf/build.sh and commit it" >&2
      status=1
    fi
  fi
done
exit $status
