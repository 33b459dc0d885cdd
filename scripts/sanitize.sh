#!/usr/bin/env bash
# The sanitizer job: build the C data plane with AddressSanitizer + UBSan into
# a scratch copy of the package (the normal build is left alone) and run the
# fuzz and hostile-input tests against it, in-process and in the daemon
# subprocesses they start.  Any bad memory access or undefined behaviour in C
# aborts the process and fails the job.  Called by scripts/test.sh; extra
# arguments go to pytest.  Needs the .venv that test.sh made.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${VENV:-$ROOT/.venv}/bin/python"
BUILD="$ROOT/build/asan"
rm -rf "$BUILD" && mkdir -p "$BUILD"
(cd "$ROOT" && VHOSTD_SANITIZE=1 "$PY" -c "
from vhostd.native.build import make_builder
make_builder(absolute_paths=True).compile(tmpdir='$BUILD')" >/dev/null)
VHOSTD_NATIVE_MODULE="$(ls "$BUILD"/vhostd/_native*.so)"
export VHOSTD_NATIVE_MODULE  # vhostd/native/__init__.py loads this build instead
# Python is not built with ASan: preload the runtime; CPython's own
# allocations are not ours to judge, so no leak checking.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:handle_segv=1:handle_sigbus=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
cd "$ROOT"
"$PY" - <<'EOF'
import sys
import vhostd.native
n = sys.modules["vhostd._native"]
assert "build/asan" in n.__file__, f"not the sanitizer build: {n.__file__}"
print("sanitizer build:", n.__file__, file=sys.stderr)
EOF
exec "$PY" -m pytest -q -p no:cacheprovider tests/test_fuzz_protocol.py tests/test_fuzz_corpus.py tests/test_ring.py tests/test_hostile.py tests/test_inflight.py \
    tests/test_async_blk.py tests/test_nbd.py tests/test_rbd.py tests/test_dirty_log.py \
    tests/test_codec.py "$@"
