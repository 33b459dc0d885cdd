#!/usr/bin/env python3
"""guest-drivers `blkbench` in vhostd's own VMM, against vhostd and against
qemu-storage-daemon: the same freestanding guest program (polling its ring),
the same 256 MiB image in tmpfs, back-end on CPU 0, the VM on CPU 1.

    python3 benchmarks/blk_vmm.py [--seconds 5] [--workloads randread:32,randread:1]

Needs /dev/kvm (the VM runs the guest at CPL3).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BACKEND_CPU, LOAD_CPU, ROOT, pinned, save_results, stop,  # noqa: E402
                    vhostd_cmd, wait_listening)

PAYLOAD = os.path.join(ROOT, "guest-drivers", "build", "blkbench.elf")


def run_vm(tmp: str, sock: str, rw: str, qd: int, seconds: float) -> int:
    cfg = os.path.join(tmp, "vm.yaml")
    args = f"rw={rw} bs=4096 iodepth={qd} seconds={seconds:g}"
    with open(cfg, "w") as f:
        f.write(f"vms:\n  - {{name: b, memory: 64M, payload: {PAYLOAD}, args: \"{args}\", "
                f"devices: [{{type: blk, socket: {sock}}}]}}\n")
    out = subprocess.run(["taskset", "-c", LOAD_CPU, sys.executable, "-m", "vhostd", "vm", "run", "--config", cfg,
                          "b"], cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"IOPS=(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"blkbench failed ({out.returncode}):\n{out.stdout[-1500:]}{out.stderr[-1500:]}")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--workloads", default="randread:32,randread:1,randwrite:32",
                    help="comma-separated rw:iodepth pairs (4 KiB each)")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/blk_vmm.json")
    args = ap.parse_args()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("blk_vmm: needs /dev/kvm", file=sys.stderr)
        return 2
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "guest-drivers")], check=True, stdout=subprocess.DEVNULL)
    tmp = tempfile.mkdtemp(prefix="vhostd-bench-", dir="/dev/shm")
    dimg, qimg = os.path.join(tmp, "d.img"), os.path.join(tmp, "q.img")
    for img in (dimg, qimg):
        with open(img, "wb") as f:
            f.truncate(256 << 20)
    dsock, qsock = os.path.join(tmp, "d.sock"), os.path.join(tmp, "q.sock")
    cfg = os.path.join(tmp, "d.yaml")
    with open(cfg, "w") as f:
        f.write(f"daemon: {{workers: 1, log_level: warning}}\n"
                f"devices:\n  - {{name: d0, type: blk, socket: {dsock}, path: {dimg}}}\n")
    vd = pinned(vhostd_cmd(cfg), BACKEND_CPU, os.path.join(tmp, "vhostd.log"))
    qsd = pinned(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={qimg},aio=io_uring",
                  "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={qsock},writable=on"],
                 BACKEND_CPU, os.path.join(tmp, "qsd.log"))
    rows = []
    try:
        wait_listening(dsock, vd)
        wait_listening(qsock, qsd)
        print(f"{'workload':<22} {'vhostd IOPS':>12} {'qsd IOPS':>10} {'ratio':>6}")
        for w in args.workloads.split(","):
            rw, qd = w.split(":")
            v = run_vm(tmp, dsock, rw, int(qd), args.seconds)
            q = run_vm(tmp, qsock, rw, int(qd), args.seconds)
            label = f"VMM 4K {rw} qd{qd}"
            rows.append({"workload": label, "vhostd": {"iops": v}, "anchor": {"iops": q}, "ratio": v / q})
            print(f"{label:<22} {v:>12,} {q:>10,} {v / q:>6.2f}", flush=True)
    finally:
        stop(vd)
        stop(qsd)
    if not args.no_save:
        print("saved", save_results("blk_vmm", f"python3 benchmarks/blk_vmm.py --seconds {args.seconds:g} "
                                    f"--workloads {args.workloads}", rows))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
