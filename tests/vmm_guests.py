"""Guest programs for the built-in VMM, built by the tests (pytest plugin).

tests/vmm/probe.c prints the boot info and each device's id (and a blk
device's capacity), then exits with `exit=N`; `spin=1` spins forever.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

PROBE_SRC = Path(__file__).resolve().parent / "vmm" / "probe.c"

GUEST_CFLAGS = [
    "-ffreestanding", "-nostdlib", "-static", "-fno-pie", "-no-pie", "-mno-sse", "-mno-mmx", "-mno-red-zone",
    "-mgeneral-regs-only", "-O2", "-fno-stack-protector", "-fcf-protection=none", "-fno-asynchronous-unwind-tables",
    "-Wall", "-Werror",
    # one PT_LOAD at 0x200000 (ABI: the program is linked at or above it)
    "-Wl,-N", "-Wl,-Ttext=0x200000", "-Wl,-e,_start", "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments",
]


@pytest.fixture(scope="session")
def probe_elf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "probe.elf"
    r = subprocess.run(["gcc", *GUEST_CFLAGS, "-o", str(out), str(PROBE_SRC)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out
