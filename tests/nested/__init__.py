"""Real hardware virtualisation for tests, one level down.

This machine's /dev/kvm is PVM: it cannot boot an ordinary Linux kernel.
The shared `nested-run.sh` (see $VHOSTD_NESTED_RUN) starts a QEMU TCG guest
with an emulated AMD SVM CPU, whose own /dev/kvm is real hardware
virtualisation; it runs a command there, with this machine's files visible
at the same paths (writes stay inside), and returns its output and status.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = [
    os.environ.get("VHOSTD_NESTED_RUN", ""),
    str(ROOT.parent / "shared" / "reference" / "nested-kvm" / "nested-run.sh"),
    "/work/shared/reference/nested-kvm/nested-run.sh",
]


#: nested-run.sh's status when the nested guest ended without running the command to its end
L1_FAILED = 125
#: nested-run.sh's status when its timeout ran out
L1_TIMED_OUT = 124


def runner() -> str | None:
    """The nested-run.sh to use, or None."""
    return next((c for c in CANDIDATES if c and os.access(c, os.X_OK)), None)


def why_not() -> str | None:
    """Why nested hardware virtualisation cannot be had here (None: it can)."""
    if runner() is None:
        return ("no nested-run.sh (set VHOSTD_NESTED_RUN): this machine has no hardware-virtualisation "
                "/dev/kvm, and no way to get one one level down")
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is missing (scripts/test-deps.sh installs it)"
    return None


def run(command: list[str], timeout: float = 600, live_stderr: bool = False) -> subprocess.CompletedProcess:
    """Run command inside the nested guest; its output and exit status.
    live_stderr: the command's stderr goes straight to ours (progress that
    must show even when the nested guest then times out)."""
    env = {**os.environ, "NESTED_TIMEOUT": str(int(timeout))}
    return subprocess.run([runner(), *command], stdout=subprocess.PIPE,
                          stderr=None if live_stderr else subprocess.PIPE, text=True, env=env,
                          timeout=timeout + 60, cwd=ROOT)
