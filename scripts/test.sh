#!/usr/bin/env bash
# Install everything the tests need (apt packages, .venv with test extras)
# and run the whole suite, then the sanitizer job (scripts/sanitize.sh).
# Extra args go to pytest.  Exit status: non-zero if either failed.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ "$(id -u)" -eq 0 ]; then
    bash "$HERE/test-deps.sh"
else
    sudo bash "$HERE/test-deps.sh"
fi
source "$HERE/venv.sh" "[test]"
cd "$ROOT"
status=0
"$VENV/bin/python" -m pytest -ra "$@" || status=$?
# The sanitizer job: the fuzz and hostile-input tests again, on an ASan+UBSan
# build of the data plane.  Skipped when pytest was given a selection.
if [ $# -eq 0 ] || [ "${VHOSTD_SANITIZE_JOB:-}" = 1 ]; then
    echo "== sanitizer job (AddressSanitizer + UBSan): scripts/sanitize.sh" >&2
    VENV="$VENV" bash "$HERE/sanitize.sh" || { s=$?; [ $status -ne 0 ] || status=$s; }
fi
exit $status
