#!/usr/bin/env bash
# Coverage-guided fuzzing (atheris) of the vhost-user codec and state machine
# against the real handler and data plane.  Separate from the test suite:
#   fuzz/run.sh [seconds]            (default 60)
# Installs atheris into the project's .venv (made by scripts/venv.sh) on first
# use.  New interesting inputs go to fuzz/corpus/protocol/; a crash is saved as
# fuzz/crash-* and the command exits non-zero.  With VHOSTD_SANITIZE_FUZZ=1 the
# data plane is the ASan+UBSan build (as in scripts/sanitize.sh).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/../scripts/venv.sh" "[test]"
"$VENV/bin/python" -c "import atheris" 2>/dev/null || "$VENV/bin/python" -m pip install -q atheris
SECONDS_TO_RUN=${1:-60}
cd "$HERE"
exec "$VENV/bin/python" protocol_fuzz.py -max_total_time="$SECONDS_TO_RUN" -rss_limit_mb=4096 \
    -artifact_prefix="$HERE/crash-" corpus/protocol
