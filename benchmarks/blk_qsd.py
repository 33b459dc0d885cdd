#!/usr/bin/env python3
"""vhost-user-blk back-ends side by side: vhostd vs qemu-storage-daemon.

Both back-ends run at once, pinned to CPU 0, each on its own copy of the same
1 GiB image in tmpfs (filled with data, so reads copy real pages), plus a
null device each (vhostd `backend: null`, qsd `null-co`) for the pure
protocol + ring cost. `vhostd bench blk` (CPU 1) drives one workload at a
time, alternating between the two back-ends so drift hits both alike, --runs
times.  Reported per workload (medians over the runs): IOPS, latency p50/p99
and the back-end's CPU seconds per million I/Os (its utime+stime across the
run, all threads); the ratio is the median of the per-run ratios, with their
spread.

    python3 benchmarks/blk_qsd.py [--seconds 10] [--runs 3] [--qsd-aio threads|io_uring|native] [--poll-us 32]

(The same on this machine's own disk with O_DIRECT: benchmarks/blk_disk.py.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BACKEND_CPU, bench_blk, cpu_seconds, pinned, ratio_spread, save_results,  # noqa: E402
                    stop, summarize, vhostd_cmd, wait_listening)

IMAGE_SIZE = 1 << 30
# (label, rw, block size, queue depth, device kind)
WORKLOADS = [
    ("4K randread qd1", "randread", 4096, 1, "file"),
    ("4K randread qd32", "randread", 4096, 32, "file"),
    ("4K randwrite qd1", "randwrite", 4096, 1, "file"),
    ("4K randwrite qd32", "randwrite", 4096, 32, "file"),
    ("64K read qd8", "read", 65536, 8, "file"),
    ("null 4K randread qd32", "randread", 4096, 32, "null"),
]


def fill_image(path: str) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB, non-zero: reads copy real pages, not holes
    with open(path, "wb") as f:
        for _ in range(IMAGE_SIZE // len(chunk)):
            f.write(chunk)


def start_vhostd(tmp: str, img: str, poll_us: int) -> tuple[object, dict]:
    cfg = os.path.join(tmp, "vhostd.yaml")
    socks = {"file": os.path.join(tmp, "vd-file.sock"), "null": os.path.join(tmp, "vd-null.sock")}
    with open(cfg, "w") as f:
        f.write("daemon: {workers: 1, log_level: warning}\ndevices:\n"
                f"  - {{name: file0, type: blk, socket: {socks['file']}, path: {img}, poll_us: {poll_us}}}\n"
                f"  - {{name: null0, type: blk, socket: {socks['null']}, backend: null, size: {IMAGE_SIZE}, "
                f"poll_us: {poll_us}}}\n")
    p = pinned(vhostd_cmd(cfg), BACKEND_CPU, os.path.join(tmp, "vhostd.log"))
    wait_listening(socks.values(), p)
    return p, socks


def start_qsd(tmp: str, img: str, aio: str) -> tuple[object, dict]:
    socks = {"file": os.path.join(tmp, "qsd-file.sock"), "null": os.path.join(tmp, "qsd-null.sock")}
    cmd = ["qemu-storage-daemon",
           "--blockdev", f"driver=file,node-name=f0,filename={img},aio={aio}",
           "--blockdev", f"driver=null-co,node-name=n0,size={IMAGE_SIZE}",
           "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={socks['file']},writable=on",
           "--export", f"type=vhost-user-blk,id=e1,node-name=n0,addr.type=unix,addr.path={socks['null']},writable=on"]
    p = pinned(cmd, BACKEND_CPU, os.path.join(tmp, "qsd.log"))
    wait_listening(socks.values(), p)
    return p, socks


def measure(proc, sock: str, rw: str, bs: int, qd: int, seconds: float) -> dict:
    before = cpu_seconds(proc.pid)
    r = bench_blk(sock, rw, bs, qd, seconds)
    cpu = cpu_seconds(proc.pid) - before
    r["backend_cpu_s"] = cpu
    r["cpu_s_per_mio"] = cpu / r["ios"] * 1e6 if r["ios"] else float("nan")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--qsd-aio", default="io_uring", choices=["threads", "io_uring", "native"],
                    help="qsd's file AIO engine (default io_uring, its fastest here on tmpfs)")
    ap.add_argument("--poll-us", type=int, default=32,
                    help="vhostd's poll_us (default 32: qsd's own default adaptive polling, poll-max-ns, is 32 us)")
    ap.add_argument("--only", help="run only workloads whose label contains this")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/blk_qsd.json")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vhostd-bench-", dir="/dev/shm")
    img_v, img_q = os.path.join(tmp, "vhostd.img"), os.path.join(tmp, "qsd.img")
    fill_image(img_v)
    shutil.copyfile(img_v, img_q)
    vd, vsocks = start_vhostd(tmp, img_v, args.poll_us)
    qsd, qsocks = start_qsd(tmp, img_q, args.qsd_aio)
    rows = []
    print(f"{'workload':<22} {'vhostd IOPS':>12} {'qsd IOPS':>10} {'ratio (spread)':>17}   "
          f"{'p50/p99 us vhostd':>18} {'qsd':>13}   {'CPU s/M I/O vhostd':>18} {'qsd':>6}")
    try:
        for label, rw, bs, qd, kind in WORKLOADS:
            if args.only and args.only not in label:
                continue
            vr, qr = [], []
            for i in range(args.runs):
                pair = [(vr, vd, vsocks), (qr, qsd, qsocks)]
                for out, proc, socks in pair[i % 2:] + pair[: i % 2]:
                    out.append(measure(proc, socks[kind], rw, bs, qd, args.seconds))
            v, q = summarize(vr), summarize(qr)
            ratio, lo, hi = ratio_spread(v["iops_runs"], q["iops_runs"])
            rows.append({"workload": label, "vhostd": v, "anchor": q, "ratio": ratio, "ratio_min": lo,
                         "ratio_max": hi})
            print(f"{label:<22} {v['iops']:>12,.0f} {q['iops']:>10,.0f} {ratio:>6.2f} ({lo:.2f}-{hi:.2f})   "
                  f"{v['lat_p50_us']:>8.1f}/{v['lat_p99_us']:<9.1f} {q['lat_p50_us']:>6.1f}/{q['lat_p99_us']:<6.1f}   "
                  f"{v['cpu_s_per_mio']:>18.2f} {q['cpu_s_per_mio']:>6.2f}", flush=True)
    finally:
        stop(vd)
        stop(qsd)
    if not args.no_save and not args.only:
        cmd = (f"python3 benchmarks/blk_qsd.py --seconds {args.seconds:g} --runs {args.runs} --qsd-aio {args.qsd_aio} "
               f"--poll-us {args.poll_us}")
        print("saved", save_results("blk_qsd", cmd, rows))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
