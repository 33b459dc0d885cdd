#!/usr/bin/env python3
"""vhost-user-blk on remote stores: vhostd against qemu-storage-daemon, both
the client of the same NBD export or the same RBD image.

Part `nbd`: an nbdkit memory export on a Unix socket; vhostd `backend: nbd`
against qemu-storage-daemon `driver=nbd`.  Part `rbd`: an image in a
throw-away Ceph cluster (tests/ceph.py: one monitor, one memstore OSD);
vhostd `backend: rbd` against qemu-storage-daemon `driver=rbd`, librbd's
cache off for all (see part_rbd).  In both,
fio's own engine for the store (nbd: libnbd; rbd: librbd) is the client's
limit: what the store gives one client with no vhost-user in between.

The back-ends and the servers share CPU 0 (there are two); `vhostd bench
blk` runs on CPU 1.  fio runs twice: on CPU 0 like the back-ends ("fio",
the like-for-like limit) and on CPU 1 ("fio other": a core of its own, the
most the store gives a client here).  Each workload is measured --runs times, the
back-ends in a rotating order; the ratio is the median of the per-run
ratios, with their spread.

    .venv/bin/python benchmarks/blk_remote.py [--seconds 5] [--runs 3] [--only nbd|rbd]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from blk_disk import measure_rounds, start_vhostd  # noqa: E402
from common import BACKEND_CPU, LOAD_CPU, fio_job, ratio_spread, save_results, start_qsd, stop  # noqa: E402

SIZE = 256 << 20
WORKLOADS = [
    ("4K randread qd1", "randread", 4096, 1),
    ("4K randread qd32", "randread", 4096, 32),
    ("4K randwrite qd1", "randwrite", 4096, 1),
    ("4K randwrite qd32", "randwrite", 4096, 32),
]


def compare(args, sides: dict, limit) -> list[dict]:
    """sides: name -> (process, socket); limit(rw, bs, qd, cpu) -> fio's
    result with the store's engine, run on that CPU: on the back-ends' CPU
    ("fio", the like-for-like limit: the client library shares a core with
    the server, as the back-ends do) and on the other one ("fio other", a
    core of its own)."""
    rows = []
    print(f"{'workload':<18} {'vhostd':>9} {'qsd':>9} {'fio':>9} {'fio other':>9}   {'ratio (spread)':>16} "
          f"{'of fio':>7} {'of other':>8}   {'p50/p99 us vhostd':>18} {'qsd':>14}   {'CPU s/M vhostd':>14} {'qsd':>6}")
    for label, rw, bs, qd in WORKLOADS:
        limits = {"fio": lambda: limit(rw, bs, qd, BACKEND_CPU), "fio other": lambda: limit(rw, bs, qd, LOAD_CPU)}
        s = measure_rounds(sides, limits, rw, bs, qd, args.runs, args.seconds)
        iops = s["iops"]
        r, lo, hi = ratio_spread(iops["vhostd"], iops["qsd"])
        r_f, _, _ = ratio_spread(iops["vhostd"], iops["fio"])
        r_o, _, _ = ratio_spread(iops["vhostd"], iops["fio other"])
        v, q = s["vhostd"], s["qsd"]
        rows.append({"workload": label, "vhostd": v, "anchor": q, "fio": s["fio"], "fio_other_cpu": s["fio other"],
                     "ratio": r, "ratio_min": lo, "ratio_max": hi, "of_fio": r_f, "of_fio_other_cpu": r_o})
        print(f"{label:<18} {v['iops']:>9,.0f} {q['iops']:>9,.0f} {s['fio']['iops']:>9,.0f} "
              f"{s['fio other']['iops']:>9,.0f}   {r:>6.2f} ({lo:.2f}-{hi:.2f}) {r_f:>7.2f} {r_o:>8.2f}   "
              f"{v['lat_p50_us']:>8.1f}/{v['lat_p99_us']:<9.1f} {q['lat_p50_us']:>6.1f}/{q['lat_p99_us']:<7.1f}  "
              f"{v['cpu_s_per_mio']:>14.2f} {q['cpu_s_per_mio']:>6.2f}", flush=True)
    return rows


def part_nbd(args, tmp: str) -> list[dict]:
    from stores import NbdServer

    server = NbdServer(plugin="memory", args=(f"{SIZE >> 20}M",))
    server.start()
    procs = []
    try:
        os.sched_setaffinity(server.proc.pid, {int(BACKEND_CPU)})
        vd, vs = start_vhostd(tmp, {"d": f"backend: nbd, uri: '{server.uri}'"})
        procs.append(vd)
        qsd, qs = start_qsd(tmp, f"driver=nbd,server.type=unix,server.path={server.sock}")
        procs.append(qsd)
        return compare(args, {"vhostd": (vd, vs["d"]), "qsd": (qsd, qs)},
                       lambda rw, bs, qd, cpu: fio_job(["--ioengine=nbd", f"--uri={server.uri}"], rw, bs, qd,
                                                       args.seconds, cpu))
    finally:
        for p in procs:
            stop(p)
        server.close()


def part_rbd(args, tmp: str) -> list[dict]:
    from ceph import CephCluster

    cluster = CephCluster("memstore")
    procs = []
    try:
        cluster.start()
        for p in (cluster.mon, cluster.osd):
            os.sched_setaffinity(p.pid, {int(BACKEND_CPU)})
        # librbd's cache off for every client: fio's engine flushes once at
        # the start, which turns the cache to writeback for it alone (its 4K
        # writes at depth 1 then run at ~22k/s against ~4k/s); QEMU sets
        # rbd_cache=false itself with cache.direct=on.
        with open(cluster.conf, "a") as f:
            f.write("[client]\nrbd cache = false\n")
        img = cluster.new_image(size=SIZE)
        cluster.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-pattern", "seq",
                    "--io-total", str(SIZE), f"rbd/{img}")  # data everywhere: reads of holes cost nothing
        vd, vs = start_vhostd(tmp, {"d": f"backend: rbd, image: {img}, ceph_conf: {cluster.conf}"})
        procs.append(vd)
        qsd, qs = start_qsd(tmp, f"driver=rbd,pool=rbd,image={img},conf={cluster.conf},cache.direct=on")
        procs.append(qsd)
        return compare(args, {"vhostd": (vd, vs["d"]), "qsd": (qsd, qs)},
                       lambda rw, bs, qd, cpu: fio_job(["--ioengine=rbd", "--clientname=admin", "--pool=rbd",
                                                        f"--rbdname={img}"], rw, bs, qd, args.seconds, cpu,
                                                       env=cluster.env()))
    finally:
        for p in procs:
            stop(p)
        cluster.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["nbd", "rbd"])
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    for tool in ("fio", "qemu-storage-daemon", "nbdkit", "ceph-osd"):
        if not shutil.which(tool):
            print(f"{tool} is missing: run scripts/test-deps.sh (and apt-get install fio)", file=sys.stderr)
            return 1
    cmd = f"python3 benchmarks/blk_remote.py --seconds {args.seconds:g} --runs {args.runs}"
    for part, run in (("nbd", part_nbd), ("rbd", part_rbd)):
        if args.only not in (None, part):
            continue
        tmp = tempfile.mkdtemp(prefix=f"vhostd-bench-{part}-")
        try:
            print(f"== {part}", flush=True)
            rows = run(args, tmp)
            if not args.no_save:
                print("saved", save_results(f"blk_{part}", f"{cmd} --only {part}", rows))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
