#!/usr/bin/env bash
# Install everything the tests need (apt packages, .venv with test extras)
# and run the whole suite.  Extra args go to pytest.  Exit status is pytest's.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ "$(id -u)" -eq 0 ]; then
    bash "$HERE/test-deps.sh"
else
    sudo bash "$HERE/test-deps.sh"
fi
source "$HERE/venv.sh" "[test]"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -ra "$@"
