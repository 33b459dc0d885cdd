#!/usr/bin/env python3
"""Paired A/B of two builds of vhostd's data plane on a net path.

On this machine a net run lands in a fast or a slow mode for its whole
window (the host shares these CPUs), so two builds measured one after the
other differ by up to 2x for no reason of theirs.  Here both run at once:
two daemons on the back-end CPU, each with its own dpdk-testpmd load on the
load CPU, so both see the same host at the same moment and the scheduler
gives each half of each CPU.  The ratio of their frame rates then compares
their cost per frame; running the same build on both sides gives 1.000 to
1.006.  Rounds alternate which build starts first.

Each build is a compiled `_native` module (e.g. a copy of
vhostd/_native.abi3.so made after building a revision); the Python package
around it comes from this checkout.

    python3 benchmarks/net_ab.py A.so B.so [--path loopback|switch] [--rounds 4] [--seconds 3]

Prints each round and the median of A/B (above 1: A moves more frames).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, median  # noqa: E402
from net_testpmd import Procs, start_load, vhostd_ports  # noqa: E402


def package(tmp: str, native: str) -> str:
    """A copy of this checkout's vhostd package around the given build; its path."""
    pkg = tempfile.mkdtemp(prefix="pkg-", dir=tmp)
    shutil.copytree(os.path.join(ROOT, "vhostd"), os.path.join(pkg, "vhostd"),
                    ignore=shutil.ignore_patterns("__pycache__", "_native*.so"))
    shutil.copy(native, os.path.join(pkg, "vhostd", "_native.abi3.so"))
    return pkg


def round_(tmp: str, builds: list[tuple[str, str]], path: str, seconds: float) -> dict[str, float]:
    """Frames/s of each build (label, module), both loaded at once."""
    with Procs() as procs:
        sides = []
        for label, native in builds:
            work = tempfile.mkdtemp(prefix=f"{label}-", dir=tmp)
            daemon, socks = vhostd_ports(work, path, env={**os.environ, "PYTHONPATH": package(tmp, native)})
            procs.add(daemon)
            sides.append((label, work, socks))
        gens = {label: start_load(procs, work, "gen", path, socks, 64) for label, work, socks in sides}
        time.sleep(2)  # warm-up

        def received() -> tuple[float, dict[str, int]]:
            t = time.monotonic()
            return t, {label: sum(g.rx_packets().values()) for label, g in gens.items()}

        t0, before = received()
        time.sleep(seconds)
        t1, after = received()
        return {label: (after[label] - before[label]) / (t1 - t0) for label in gens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="build A: a compiled _native module")
    ap.add_argument("b", help="build B")
    ap.add_argument("--path", choices=("loopback", "switch"), default="switch")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vhostd-ab-")
    ratios = []
    for r in range(args.rounds):
        builds = [("A", args.a), ("B", args.b)]
        fps = round_(tmp, builds if r % 2 == 0 else builds[::-1], args.path, args.seconds)
        ratios.append(fps["A"] / fps["B"])
        print(f"round {r + 1}: A {fps['A'] / 1e6:.2f} M frames/s, B {fps['B'] / 1e6:.2f}, A/B {ratios[-1]:.3f}",
              flush=True)
    print(f"{args.path} 64 B: A/B median {median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"logs: {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
