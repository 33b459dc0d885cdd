# Sourced by run.sh and test.sh: make .venv (once) and install vhostd into it,
# editable, so the cffi data plane is compiled for this machine.
# $1: pip extras ("" or "[test]").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# Reinstall when the sources of the native modules (the load generator's
# include the guest programs' virtqueue) or the metadata changed.  One
# install serves both scripts: the stamp records the extras installed, and
# an install with the test extras also serves run.sh (and stays one).
stamp="$VENV/.vhostd-installed"
want="${1:-}"
have="$(cat "$stamp" 2>/dev/null || echo none)"
if [ "$have" = none ] || { [ "$want" = "[test]" ] && [ "$have" != "[test]" ]; } \
   || [ -n "$(find "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/vhostd/native" "$ROOT/vhostd/loadgen" "$ROOT/vhostd/vmm/vcpu.c" "$ROOT/vhostd/vmm/vcpu.h" "$ROOT/guest-drivers/lib/virtq.c" "$ROOT/guest-drivers/lib/virtq.h" "$ROOT/guest-drivers/lib/virtq_port.h" -newer "$stamp" -print -quit)" ] \
   || ! "$VENV/bin/python" -c 'import vhostd._native, vhostd._loadgen, vhostd._vcpu' 2>/dev/null; then
    extras="$want"
    [ "$have" = "[test]" ] && extras="[test]"
    # PYTHONWARNINGS: no setuptools banner about editable installs on every run.
    PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q -e "$ROOT$extras"
    echo "$extras" > "$stamp"
fi
