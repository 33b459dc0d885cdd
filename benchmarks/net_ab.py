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

Either side may be `dpdk`: DPDK's vhost PMD as in net_testpmd.py (macswap
for loopback, io forwarding between two ports for switch), so vhostd and the
anchor are compared at the same moment of the host:

    python3 benchmarks/net_ab.py vhostd/_native.abi3.so dpdk --path switch

Prints each round and the medians of A/B frames/s (above 1: A moves more
frames) and of B/A back-end CPU per frame (above 1: A spends less per frame).
The second is the one to read when the sides get unequal shares of the CPU,
as a daemon and DPDK's always-spinning lcore do.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, cpu_seconds, median  # noqa: E402
from net_testpmd import Procs, anchor_ports, start_load, vhostd_ports  # noqa: E402


def package(tmp: str, native: str) -> str:
    """A copy of this checkout's vhostd package around the given build; its path."""
    pkg = tempfile.mkdtemp(prefix="pkg-", dir=tmp)
    shutil.copytree(os.path.join(ROOT, "vhostd"), os.path.join(pkg, "vhostd"),
                    ignore=shutil.ignore_patterns("__pycache__", "_native*.so"))
    shutil.copy(native, os.path.join(pkg, "vhostd", "_native.abi3.so"))
    return pkg


def round_(tmp: str, builds: list[tuple[str, str]], path: str,
           seconds: float) -> dict[str, tuple[float, float]]:
    """Frames/s and back-end CPU ns per frame of each build (label, module
    or "dpdk"), all loaded at once."""
    with Procs() as procs:
        sides = []
        for label, native in builds:
            work = tempfile.mkdtemp(prefix=f"{label}-", dir=tmp)
            if native == "dpdk":
                backend, socks = anchor_ports(work, procs, path)
            else:
                backend, socks = vhostd_ports(work, path, env={**os.environ, "PYTHONPATH": package(tmp, native)})
                procs.add(backend)
            sides.append((label, work, socks, backend.pid))
        gens = {label: start_load(procs, work, "gen", path, socks, 64) for label, work, socks, _ in sides}
        pids = {label: pid for label, _, _, pid in sides}
        time.sleep(2)  # warm-up

        def sample() -> tuple[float, dict[str, int], dict[str, float]]:
            t = time.monotonic()
            return (t, {label: sum(g.rx_packets().values()) for label, g in gens.items()},
                    {label: cpu_seconds(pid) for label, pid in pids.items()})

        t0, n0, c0 = sample()
        time.sleep(seconds)
        t1, n1, c1 = sample()
        return {label: ((n1[label] - n0[label]) / (t1 - t0), (c1[label] - c0[label]) * 1e9 / (n1[label] - n0[label]))
                for label in gens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help='build A: a compiled _native module, or "dpdk" for the DPDK anchor')
    ap.add_argument("b", help="build B (the same)")
    ap.add_argument("--path", choices=("loopback", "switch"), default="switch")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vhostd-ab-")
    ratios, costs = [], []
    for r in range(args.rounds):
        builds = [("A", args.a), ("B", args.b)]
        res = round_(tmp, builds if r % 2 == 0 else builds[::-1], args.path, args.seconds)
        (fa, ca), (fb, cb) = res["A"], res["B"]
        ratios.append(fa / fb)
        costs.append(cb / ca)
        print(f"round {r + 1}: A {fa / 1e6:.2f} M frames/s at {ca:.0f} ns/frame, B {fb / 1e6:.2f} at {cb:.0f}; "
              f"A/B frames {ratios[-1]:.3f}, cost B/A {costs[-1]:.3f}", flush=True)
    print(f"{args.path} 64 B: A/B frames median {median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"B/A CPU per frame median {median(costs):.3f} (min {min(costs):.3f}, max {max(costs):.3f}); logs: {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
