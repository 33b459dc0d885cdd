#!/usr/bin/env python3
"""vhost-user-blk on packed rings against split rings, same back-end.

One vhostd (pinned to CPU 0) serves three disks: an image in tmpfs (filled
with data), a null device (`backend: null`: the protocol + ring cost
alone), and an image on this machine's own disk with O_DIRECT
(`direct: true`).  `vhostd bench blk` (CPU 1) drives each workload on each
disk --runs times, once with split rings and once with `--packed`, in a
rotating order.  Reported per workload (medians over the runs): IOPS of
both layouts, the packed / split ratio (median of the per-run ratios, with
their spread; above 1: packed is faster), and the back-end's CPU seconds per
million I/Os on each layout.

qemu-storage-daemon is not the anchor here: libvhost-user serves split
rings only.  For net, DPDK's vhost PMD serves both layouts:
benchmarks/net_testpmd.py --rings split,packed.

    .venv/bin/python benchmarks/blk_packed.py [--seconds 5] [--runs 3] [--dir /var/tmp] [--poll-us 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from blk_disk import IMAGE_SIZE, fill, measure_rounds, start_vhostd  # noqa: E402
from common import ratio_spread, save_results, stop  # noqa: E402

# (label, disk, rw, block size, queue depth)
WORKLOADS = [
    ("null 4K randread qd1", "null", "randread", 4096, 1),
    ("null 4K randread qd32", "null", "randread", 4096, 32),
    ("tmpfs 4K randread qd1", "tmpfs", "randread", 4096, 1),
    ("tmpfs 4K randread qd32", "tmpfs", "randread", 4096, 32),
    ("tmpfs 4K randwrite qd32", "tmpfs", "randwrite", 4096, 32),
    ("tmpfs 64K read qd8", "tmpfs", "read", 65536, 8),
    ("disk 4K randread qd32", "disk", "randread", 4096, 32),
    ("disk 4K randwrite qd32", "disk", "randwrite", 4096, 32),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp", help="a directory on the disk to measure (not tmpfs)")
    ap.add_argument("--poll-us", type=int, default=32, help="vhostd's poll_us on every disk")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    disk_tmp = tempfile.mkdtemp(prefix="vhostd-bench-", dir=args.dir)
    shm_tmp = tempfile.mkdtemp(prefix="vhostd-bench-", dir="/dev/shm")
    vd = None
    try:
        images = {"tmpfs": os.path.join(shm_tmp, "disk.img"), "disk": os.path.join(disk_tmp, "disk.img")}
        for img in images.values():
            print(f"filling a {IMAGE_SIZE >> 20} MiB image at {img} ...", flush=True)
            fill(img, IMAGE_SIZE)
        poll = f"poll_us: {args.poll_us}"
        vd, socks = start_vhostd(shm_tmp, {"tmpfs0": f"path: {images['tmpfs']}, {poll}",
                                           "disk0": f"path: {images['disk']}, direct: true, {poll}",
                                           "null0": f"backend: null, size: {IMAGE_SIZE}, {poll}"})
        rows = []
        print(f"{'workload':<24} {'split IOPS':>11} {'packed IOPS':>12} {'packed/split (spread)':>22}   "
              f"{'CPU s/M split':>13} {'packed':>7}", flush=True)
        for label, disk, rw, bs, qd in WORKLOADS:
            sock = socks[disk + "0"]
            sides = {"split": (vd, sock), "packed": (vd, sock, "--packed")}
            s = measure_rounds(sides, {}, rw, bs, qd, args.runs, args.seconds)
            ratio, lo, hi = ratio_spread(s["iops"]["packed"], s["iops"]["split"])
            rows.append({"workload": label, "vhostd": s["packed"], "anchor": s["split"], "ratio": ratio,
                         "ratio_min": lo, "ratio_max": hi})
            sp, pk = s["split"], s["packed"]
            print(f"{label:<24} {sp['iops']:>11,.0f} {pk['iops']:>12,.0f} {ratio:>9.2f} ({lo:.2f}-{hi:.2f})     "
                  f"{sp['cpu_s_per_mio']:>13.2f} {pk['cpu_s_per_mio']:>7.2f}", flush=True)
        if not args.no_save:
            cmd = (f"python3 benchmarks/blk_packed.py --seconds {args.seconds:g} --runs {args.runs} "
                   f"--dir {args.dir} --poll-us {args.poll_us}")
            print("saved", save_results("blk_packed", cmd, rows))
    finally:
        if vd is not None:
            stop(vd)
        shutil.rmtree(disk_tmp, ignore_errors=True)
        shutil.rmtree(shm_tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
