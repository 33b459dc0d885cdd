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
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BACKEND_CPU, LOAD_CPU, ROOT, median, stop, wait_listening  # noqa: E402

MACS = ("02:00:00:00:5e:00", "02:00:00:00:5e:01")


class Side:
    """One build: its own package copy, daemon and load testpmd."""

    def __init__(self, tmp: str, name: str, native: str, path: str) -> None:
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        pkg = os.path.join(self.dir, "pkg")
        shutil.copytree(os.path.join(ROOT, "vhostd"), os.path.join(pkg, "vhostd"),
                        ignore=shutil.ignore_patterns("__pycache__", "_native*.so"))
        shutil.copy(native, os.path.join(pkg, "vhostd", "_native.abi3.so"))
        n = 1 if path == "loopback" else 2
        self.socks = [os.path.join(self.dir, f"{i}.sock") for i in range(n)]
        backend = "loopback" if path == "loopback" else f"switch, switch: lan{name}"
        cfg = os.path.join(self.dir, "vhostd.yaml")
        with open(cfg, "w") as f:
            f.write("daemon: {workers: 1, log_level: warning}\ndevices:\n" + "".join(
                f"  - {{name: {name}{i}, type: net, socket: {s}, backend: {backend}, poll_us: 100}}\n"
                for i, s in enumerate(self.socks)))
        self.daemon = subprocess.Popen(
            ["taskset", "-c", BACKEND_CPU, sys.executable, "-m", "vhostd", "serve", "--config", cfg],
            env={**os.environ, "PYTHONPATH": pkg}, cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.dir, "vhostd.log"), "w"), stderr=subprocess.STDOUT)
        wait_listening(self.socks, self.daemon)
        if path == "loopback":
            vdevs = [f"net_virtio_user0,path={self.socks[0]},queues=1"]
            args = ["--forward-mode=io", "--txpkts=64"]
        else:  # flowgen frames are --txpkts minus 4
            vdevs = [f"net_virtio_user{i},path={s},queues=1,mac={m}" for i, (s, m) in enumerate(zip(self.socks, MACS))]
            args = ["--forward-mode=flowgen", "--txpkts=68", f"--eth-peer=0,{MACS[1]}", f"--eth-peer=1,{MACS[0]}"]
        self.log = os.path.join(self.dir, "testpmd.log")
        # O_APPEND: the marks written here and testpmd's output interleave, never overwrite.
        self.gen = subprocess.Popen(
            ["taskset", "-c", LOAD_CPU, "stdbuf", "-oL", "dpdk-testpmd", "--lcores", f"0@{LOAD_CPU},1@{LOAD_CPU}",
             "--no-huge", "-m", "512", "--no-pci", f"--file-prefix=vhostd-ab-{os.getpid()}-{name}",
             *(f"--vdev={v}" for v in vdevs), "--", "--total-num-mbufs=32768", *args, "-i"],
            stdin=subprocess.PIPE, stdout=open(self.log, "a"), stderr=subprocess.STDOUT)

    def send(self, line: str) -> None:
        self.gen.stdin.write(line.encode() + b"\n")
        self.gen.stdin.flush()

    def mark(self) -> None:
        """Ask for the port counters after a mark in the log."""
        with open(self.log, "a") as f:
            f.write("@@mark\n")
        self.send("show port stats all")

    def received(self) -> int:
        with open(self.log) as f:
            last = f.read().rsplit("@@mark", 1)[-1]
        return sum(int(v) for v in re.findall(r"RX-packets:\s+(\d+)", last))

    def close(self) -> None:
        try:
            self.send("quit")
        except OSError:
            pass
        stop(self.gen)
        stop(self.daemon)


def wait_prompt(sides: list[Side], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    for s in sides:
        while "testpmd> " not in open(s.log).read():
            if time.monotonic() > end or s.gen.poll() is not None:
                raise RuntimeError(f"testpmd did not start, see {s.log}")
            time.sleep(0.05)


def round_(tmp: str, first: tuple[str, str], second: tuple[str, str], path: str, seconds: float) -> dict[str, float]:
    """Frames/s of each build (by label), both loaded at once."""
    sides = []
    try:
        for label, native in (first, second):
            sides.append(Side(tmp, f"{label}{len(os.listdir(tmp))}", native, path))
        wait_prompt(sides)
        time.sleep(1)  # link up
        for s in sides:
            s.send("start tx_first" if path == "loopback" else "start")
        time.sleep(2)  # warm-up
        for s in sides:
            s.mark()
        time.sleep(0.5)
        before = [s.received() for s in sides]
        t0 = time.monotonic()
        time.sleep(seconds)
        for s in sides:
            s.mark()
        time.sleep(0.5)
        elapsed = time.monotonic() - t0
        after = [s.received() for s in sides]
        return {label: (a - b) / elapsed for (label, _), a, b in zip((first, second), after, before)}
    finally:
        for s in sides:
            s.close()


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
        pair = [("A", args.a), ("B", args.b)]
        fps = round_(tmp, *(pair if r % 2 == 0 else pair[::-1]), args.path, args.seconds)
        ratios.append(fps["A"] / fps["B"])
        print(f"round {r + 1}: A {fps['A'] / 1e6:.2f} M frames/s, B {fps['B'] / 1e6:.2f}, A/B {ratios[-1]:.3f}",
              flush=True)
    print(f"{args.path} 64 B: A/B median {median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"logs: {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
