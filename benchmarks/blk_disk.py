#!/usr/bin/env python3
"""vhost-user-blk where users run it: an image on this machine's own disk,
O_DIRECT on every side.

Part `disk`: vhostd (`direct: true`) against qemu-storage-daemon with
aio=io_uring and aio=native (cache.direct=on), all three serving the same
image file at once (pinned to CPU 0), and fio (io_uring, O_DIRECT) on that
file as the disk's own limit.  `vhostd bench blk` is the load (CPU 1).  Each
workload is measured --runs times, the back-ends in a rotating order; the
ratio is the median of the per-run ratios, with their spread.

Part `hol` (head-of-line blocking): one back-end thread serves a tmpfs disk
next to a disk that is busy (4 KiB random reads at qd32 on the real disk)
or hung (tests/hanging_disk.py: nbdkit's pause filter behind nbdfuse, with
requests waiting on it).  Reported: the tmpfs disk's rate beside it as a
fraction of its rate alone, and for vhostd how long `vhostd status` takes
to answer while the disk hangs.

    .venv/bin/python benchmarks/blk_disk.py [--seconds 5] [--runs 3] [--dir /var/tmp] [--only disk|hol]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BACKEND_CPU, LOAD_CPU, ROOT, bench_blk, cpu_seconds, fio, median, pinned,  # noqa: E402
                    ratio_spread, save_results, stop, summarize, vhostd_cmd, wait_listening)

IMAGE_SIZE = 1 << 30
# (label, rw, block size, queue depth)
WORKLOADS = [
    ("4K randread qd1", "randread", 4096, 1),
    ("4K randread qd32", "randread", 4096, 32),
    ("4K randwrite qd1", "randwrite", 4096, 1),
    ("4K randwrite qd32", "randwrite", 4096, 32),
    ("64K read qd8", "read", 65536, 8),
]


def fill(path: str, size: int) -> None:
    """Real data on disk: reads of a sparse file never reach the disk."""
    chunk = bytes(range(256)) * 4096
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def vhostd_config(path: str, devices: list[str], workers: int = 1, control: str | None = None) -> None:
    with open(path, "w") as f:
        f.write(f"daemon: {{workers: {workers}, log_level: warning"
                + (f", control_socket: {control}" if control else "") + "}\ndevices:\n")
        for d in devices:
            f.write(f"  - {d}\n")


def start_vhostd(tmp: str, devices: dict[str, str], control: bool = False) -> tuple[subprocess.Popen, dict]:
    """devices: name -> the rest of its YAML flow mapping."""
    socks = {n: os.path.join(tmp, f"vd-{n}.sock") for n in devices}
    cfg = os.path.join(tmp, "vhostd.yaml")
    vhostd_config(cfg, [f"{{name: {n}, type: blk, socket: {socks[n]}, {rest}}}" for n, rest in devices.items()],
                  control=os.path.join(tmp, "vd.ctl") if control else None)
    p = pinned(vhostd_cmd(cfg), BACKEND_CPU, os.path.join(tmp, "vhostd.log"))
    wait_listening(socks.values(), p)
    return p, socks


def start_qsd(tmp: str, tag: str, files: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    """files: name -> blockdev options after driver=file (filename=..., aio=...)."""
    socks = {n: os.path.join(tmp, f"{tag}-{n}.sock") for n in files}
    cmd = ["qemu-storage-daemon"]
    for i, (n, opts) in enumerate(files.items()):
        cmd += ["--blockdev", f"driver=file,node-name=n{i},{opts},locking=off",
                "--export", f"type=vhost-user-blk,id=e{i},node-name=n{i},addr.type=unix,addr.path={socks[n]},"
                            "writable=on"]
    p = pinned(cmd, BACKEND_CPU, os.path.join(tmp, f"{tag}.log"))
    wait_listening(socks.values(), p)
    return p, socks


def measure(proc, sock: str, rw: str, bs: int, qd: int, seconds: float, extra: tuple[str, ...] = ()) -> dict:
    before = cpu_seconds(proc.pid)
    r = bench_blk(sock, rw, bs, qd, seconds, extra=extra)
    r["backend_cpu_s"] = cpu_seconds(proc.pid) - before
    r["cpu_s_per_mio"] = r["backend_cpu_s"] / r["ios"] * 1e6 if r["ios"] else float("nan")
    return r


def measure_rounds(sides: dict, limits: dict, rw: str, bs: int, qd: int, runs: int, seconds: float) -> dict:
    """One workload, `runs` times on every side (name -> (process, socket,
    *more `vhostd bench blk` options)), in an order that rotates so that
    none is always first; then each limit
    (name -> a callable giving fio's figure).  Returns name -> summary, and
    "iops" -> name -> per-run IOPS, for ratio_spread."""
    results = {k: [] for k in [*sides, *limits]}
    names = list(sides)
    for i in range(runs):
        for name in names[i % len(names):] + names[: i % len(names)]:
            proc, sock, *extra = sides[name]
            results[name].append(measure(proc, sock, rw, bs, qd, seconds, tuple(extra)))
        for name, limit in limits.items():
            results[name].append(limit())
    return {**{k: summarize(v) for k, v in results.items()},
            "iops": {k: [r["iops"] for r in v] for k, v in results.items()}}


# ------------------------------------------------------------------ part disk


def part_disk(args, tmp: str, img: str) -> list[dict]:
    poll = args.poll_us
    vd, vs = start_vhostd(tmp, {"d": f"path: {img}, direct: true, poll_us: {poll}"})
    qu, qus = start_qsd(tmp, "qsd-uring", {"d": f"filename={img},aio=io_uring,cache.direct=on"})
    qn, qns = start_qsd(tmp, "qsd-native", {"d": f"filename={img},aio=native,cache.direct=on"})
    sides = {"vhostd": (vd, vs["d"]), "qsd io_uring": (qu, qus["d"]), "qsd native": (qn, qns["d"])}
    rows = []
    print(f"{'workload':<18} {'vhostd':>9} {'qsd uring':>10} {'qsd native':>10} {'fio':>9}   "
          f"{'vs uring (spread)':>19} {'vs native':>9} {'of fio':>7}   "
          f"{'p50/p99 us vhostd':>18} {'qsd uring':>14}   {'CPU s/M vhostd':>14} {'qsd':>6}")
    try:
        for label, rw, bs, qd in WORKLOADS:
            s = measure_rounds(sides, {"fio": lambda: fio(img, rw, bs, qd, args.seconds)}, rw, bs, qd, args.runs,
                               args.seconds)
            iops = s["iops"]
            r_u, lo_u, hi_u = ratio_spread(iops["vhostd"], iops["qsd io_uring"])
            r_n, _, _ = ratio_spread(iops["vhostd"], iops["qsd native"])
            r_f, _, _ = ratio_spread(iops["vhostd"], iops["fio"])
            rows.append({"workload": label, "vhostd": s["vhostd"], "anchor": s["qsd io_uring"],
                         "qsd_native": s["qsd native"], "fio": s["fio"], "ratio": r_u, "ratio_min": lo_u,
                         "ratio_max": hi_u, "ratio_native": r_n, "of_fio": r_f})
            v, u = s["vhostd"], s["qsd io_uring"]
            print(f"{label:<18} {v['iops']:>9,.0f} {u['iops']:>10,.0f} {s['qsd native']['iops']:>10,.0f} "
                  f"{s['fio']['iops']:>9,.0f}   {r_u:>6.2f} ({lo_u:.2f}-{hi_u:.2f}) {r_n:>9.2f} {r_f:>7.2f}   "
                  f"{v['lat_p50_us']:>8.1f}/{v['lat_p99_us']:<9.1f} {u['lat_p50_us']:>6.1f}/{u['lat_p99_us']:<7.1f}  "
                  f"{v['cpu_s_per_mio']:>14.2f} {u['cpu_s_per_mio']:>6.2f}", flush=True)
    finally:
        for p in (vd, qu, qn):
            stop(p)
    return rows


# ------------------------------------------------------------------ part hol


def background_load(sock: str, rw: str, qd: int, seconds: float) -> subprocess.Popen:
    cmd = ["taskset", "-c", LOAD_CPU, sys.executable, "-m", "vhostd", "bench", "blk", "--socket", sock, "--rw", rw,
           "--bs", "4096", "--iodepth", str(qd), "--seconds", str(seconds)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fast_iops(sock: str, seconds: float) -> float:
    """The tmpfs disk's rate; 0 when the back-end did not serve it at all."""
    try:
        return bench_blk(sock, "randread", 4096, 32, seconds)["iops"]
    except RuntimeError:
        return 0.0


def status_ms(ctl: str, n: int = 20) -> list[float]:
    from vhostd.control import request

    out = []
    for _ in range(n):
        t0 = time.monotonic()
        request(ctl, "status", timeout=10)
        out.append((time.monotonic() - t0) * 1000)
        time.sleep(0.02)
    return out


def part_hol(args, tmp: str, img: str) -> list[dict]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from hanging_disk import HangingDisk

    shm = tempfile.mkdtemp(prefix="vhostd-hol-", dir="/dev/shm")
    fast = os.path.join(shm, "fast.img")
    fill(fast, IMAGE_SIZE // 4)
    hang = HangingDisk("256M")
    rows = []
    try:
        vd, vs = start_vhostd(tmp, {"disk": f"path: {img}, direct: true", "fast": f"path: {fast}",
                                    "hung": f"path: {hang.path}, direct: true"}, control=True)
        qsd, qs = start_qsd(tmp, "qsd-hol", {"disk": f"filename={img},aio=io_uring,cache.direct=on",
                                             "fast": f"filename={fast},aio=io_uring",
                                             "hung": f"filename={hang.path},aio=io_uring,cache.direct=on"})
        sides = {"vhostd": (vd, vs), "qsd": (qsd, qs)}
        t = args.seconds
        results = {k: {"alone": [], "busy": [], "hung": []} for k in sides}
        status_while_hung = []
        try:
            for i in range(args.runs):
                for name, (proc, socks) in sides.items():
                    results[name]["alone"].append(bench_blk(socks["fast"], "randread", 4096, 32, t)["iops"])
                    bg = background_load(socks["disk"], "randread", 32, t + 3)
                    time.sleep(1)
                    results[name]["busy"].append(bench_blk(socks["fast"], "randread", 4096, 32, t)["iops"])
                    bg.wait()
                    hang.pause()
                    bg = background_load(socks["hung"], "randread", 8, 3600)
                    time.sleep(1)
                    results[name]["hung"].append(fast_iops(socks["fast"], t))
                    if name == "vhostd":
                        status_while_hung += status_ms(os.path.join(tmp, "vd.ctl"))
                    hang.resume()
                    bg.kill()
                    bg.wait()
                    time.sleep(0.5)
        finally:
            if hang.paused:
                hang.resume()
            stop(vd)
            stop(qsd)
        print(f"{'one back-end thread':<22} {'fast alone':>11} {'beside busy':>12} {'kept':>5} "
              f"{'beside hung':>12} {'kept':>5}")
        for name, r in results.items():
            busy = ratio_spread(r["busy"], r["alone"])
            hung = ratio_spread(r["hung"], r["alone"])
            rows.append({"workload": f"tmpfs disk beside another ({name})", "alone": median(r["alone"]),
                         "beside_busy": median(r["busy"]), "kept_busy": busy[0], "kept_busy_min": busy[1],
                         "kept_busy_max": busy[2], "beside_hung": median(r["hung"]), "kept_hung": hung[0],
                         "kept_hung_min": hung[1], "kept_hung_max": hung[2]})
            print(f"{name:<22} {median(r['alone']):>11,.0f} {median(r['busy']):>12,.0f} {busy[0]:>5.2f} "
                  f"{median(r['hung']):>12,.0f} {hung[0]:>5.2f}   (kept busy {busy[1]:.2f}-{busy[2]:.2f}, "
                  f"hung {hung[1]:.2f}-{hung[2]:.2f})")
        print(f"vhostd status while a disk hangs: median {median(status_while_hung):.1f} ms, "
              f"max {max(status_while_hung):.1f} ms over {len(status_while_hung)} requests")
        rows.append({"workload": "vhostd status while a disk hangs", "status_ms_median": median(status_while_hung),
                     "status_ms_max": max(status_while_hung)})
    finally:
        hang.close()
        shutil.rmtree(shm, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp", help="a directory on the disk to measure (not tmpfs)")
    ap.add_argument("--poll-us", type=int, default=32, help="vhostd's poll_us in part disk (qsd polls 32 us)")
    ap.add_argument("--only", choices=["disk", "hol"])
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    for tool in ("fio", "qemu-storage-daemon", "nbdkit", "nbdfuse"):
        if not shutil.which(tool):
            print(f"{tool} is missing: apt-get install fio qemu-system-x86 nbdkit libnbd-bin fuse3", file=sys.stderr)
            return 1
    tmp = tempfile.mkdtemp(prefix="vhostd-bench-", dir=args.dir)
    img = os.path.join(tmp, "disk.img")
    try:
        print(f"filling a {IMAGE_SIZE >> 20} MiB image in {tmp} ...", flush=True)
        fill(img, IMAGE_SIZE)
        cmd = (f"python3 benchmarks/blk_disk.py --seconds {args.seconds:g} --runs {args.runs} --dir {args.dir} "
               f"--poll-us {args.poll_us}")
        if args.only in (None, "disk"):
            rows = part_disk(args, tmp, img)
            if not args.no_save:
                print("saved", save_results("blk_disk", cmd + " --only disk", rows))
        if args.only in (None, "hol"):
            rows = part_hol(args, tmp, img)
            if not args.no_save:
                print("saved", save_results("blk_hol", cmd + " --only hol", rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
