#!/usr/bin/env bash
# bench/device/pack.sh [KIT]: build the device scaling kit (default KIT: device-kit/ at the repo
# root, git-ignored), to be carried to the 16-core device machine, which has no package registry:
#   KIT/bin/      dnsfence, dnsfence-loadgen (release, CARGO_TARGET_DIR respected, stripped
#                 copies), fwd (bench/peer/floor/fwd.c), and this machine's dnsperf, knotd, dnsdist
#   KIT/lib/      their shared libraries (from ldd), glibc's own excluded (the device has glibc)
#   KIT/harness/  gen-policy.py, gen-queries.py, policy.py, root.zone (from bench/peer)
#   KIT/run.sh, KIT/report.py   (from bench/device), KIT/VERSION (commit, tool versions, sums)
# Then, with the device tool: run(command="bash device-kit/run.sh", carry=["device-kit"]);
# see bench/device/README.md. NO_BUILD=1 packs what is already built.
# Needs: cargo, cc, ldd, dnsperf, knotd, dnsdist (scripts/install-deps; apt-get install dnsdist).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
KIT=${1:-$ROOT/device-kit}
case $KIT in /*) ;; *) KIT=$PWD/$KIT ;; esac
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac

if [ "${NO_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --release -p dnsfence -p dnsfence-loadgen)
fi
for t in cc ldd dnsperf knotd dnsdist; do
  command -v "$t" > /dev/null || { echo "pack.sh: $t not found" >&2; exit 1; }
done

rm -rf "${KIT:?}/bin" "${KIT:?}/lib" "${KIT:?}/harness"
mkdir -p "$KIT/bin" "$KIT/lib" "$KIT/harness"
for b in dnsfence dnsfence-loadgen; do
  [ -x "$TARGET/release/$b" ] || { echo "pack.sh: $TARGET/release/$b missing" >&2; exit 1; }
  # the release profile keeps debug info: strip the copies (the carry limit is 64 MiB in all)
  if command -v strip > /dev/null; then strip -o "$KIT/bin/$b" "$TARGET/release/$b"
  else cp "$TARGET/release/$b" "$KIT/bin/$b"; fi
done
cc -O2 -o "$KIT/bin/fwd" "$ROOT/bench/peer/floor/fwd.c"
for t in dnsperf knotd dnsdist; do cp -L "$(command -v "$t")" "$KIT/bin/$t"; done

# Shared libraries: everything ldd resolves (transitively), except glibc's own libraries, which
# the device machine has (a copied libc would not match its loader).
glibc() {
  case $1 in
    ld-linux*|libc.so.*|libm.so.*|libmvec.so.*|libpthread.so.*|libdl.so.*|librt.so.*|\
    libresolv.so.*|libutil.so.*|libanl.so.*|libnss_*|libthread_db.so.*|libBrokenLocale.so.*|\
    libnsl.so.1|libc_malloc_debug.so.*) return 0 ;;
  esac
  return 1
}
for b in "$KIT"/bin/*; do
  if ldd "$b" | grep -q 'not found'; then
    echo "pack.sh: $b has unresolved libraries:" >&2; ldd "$b" | grep 'not found' >&2; exit 1
  fi
  ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | while read -r lib; do
    name=$(basename "$lib")
    glibc "$name" && continue
    [ -e "$KIT/lib/$name" ] || cp -L "$lib" "$KIT/lib/$name"
  done
done

cp "$ROOT/bench/peer/gen-policy.py" "$ROOT/bench/peer/gen-queries.py" "$ROOT/bench/peer/policy.py" \
  "$ROOT/bench/peer/upstream/root.zone" "$KIT/harness/"
cp "$HERE/run.sh" "$HERE/ha.sh" "$HERE/report.py" "$KIT/"
chmod +x "$KIT/run.sh" "$KIT/ha.sh" "$KIT/report.py" "$KIT"/bin/*

# Every binary must start from the kit alone (a missing library fails here, not on the device).
export LD_LIBRARY_PATH=$KIT/lib
"$KIT/bin/dnsfence" --version > /dev/null
"$KIT/bin/dnsfence-loadgen" --version > /dev/null
"$KIT/bin/dnsdist" --version > /dev/null
"$KIT/bin/knotd" --version > /dev/null
"$KIT/bin/dnsperf" -h 2>&1 | grep -q '^Version' || { echo "pack.sh: kit dnsperf does not start" >&2; exit 1; }
{
  echo "commit $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- Cargo.toml Cargo.lock matcher policy engine dnsfence loadgen 2> /dev/null || echo ' (+ uncommitted changes to the built code)')"
  echo "packed $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n), $(ldd --version | head -1)"
  echo "$("$KIT/bin/dnsfence" --version), $("$KIT/bin/dnsdist" --version | head -1 | cut -d' ' -f1-2), dnsperf $("$KIT/bin/dnsperf" -h 2>&1 | sed -n 's/^Version //p'), knotd $("$KIT/bin/knotd" --version | awk '{print $NF}'), $(rustc --version 2> /dev/null | cut -d' ' -f1-2)"
  (cd "$KIT" && sha256sum bin/*)
} > "$KIT/VERSION"
size=$(du -sm "$KIT" | cut -f1)
echo "pack.sh: $KIT: $(find "$KIT/bin" -type f | wc -l) binaries, $(find "$KIT/lib" -type f | wc -l) libraries, ${size} MiB" >&2
if [ "$size" -gt 60 ]; then echo "pack.sh: WARNING: over 60 MiB; the device tool carries 64 MiB in all" >&2; fi
