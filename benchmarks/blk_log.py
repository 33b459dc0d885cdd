#!/usr/bin/env python3
"""What dirty-page logging (live migration) costs the blk data plane.

One null disk each (vhostd `backend: null`, qemu-storage-daemon `null-co`),
4K random reads at depth 32 and 1 from `vhostd bench blk`, measured:

* logging off, this vhostd against the build before logging existed (REV, a
  commit: its own checkout and native build in a scratch directory): logging
  must cost nothing while no migration runs;
* logging on (`--dirty-log`: a log mapped, VHOST_F_LOG_ALL acked, used rings
  logged, as QEMU does while migrating) against off, for vhostd and for
  qemu-storage-daemon (libvhost-user logs too).

Back-ends on CPU 0, the load on CPU 1; --runs rounds in rotating order; the
ratios are medians of per-round ratios (spread in brackets).

    .venv/bin/python benchmarks/blk_log.py [--seconds 5] [--runs 3] [--before REV]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from blk_disk import measure_rounds  # noqa: E402
from common import (BACKEND_CPU, ROOT, pinned, ratio_spread, save_results, start_qsd, stop,  # noqa: E402
                    wait_listening)

SIZE = "1G"
WORKLOADS = [("4K randread qd32", 32), ("4K randread qd1", 1)]


def build_before(rev: str, tmp: str) -> tuple[dict, str]:
    """A checkout of rev with its native module built in place: the env and
    the directory to run it in (python -m looks in its cwd first)."""
    src = os.path.join(tmp, "before")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", src, rev], check=True, capture_output=True)
    subprocess.run([sys.executable, "vhostd/native/build.py"], cwd=src, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": src})
    (so,) = glob.glob(os.path.join(src, "build", "cffi", "vhostd", "_native*.so")) or \
        glob.glob(os.path.join(src, "build", "cffi", "_native*.so"))
    return {**os.environ, "PYTHONPATH": src, "VHOSTD_NATIVE_MODULE": so}, src


def start_vhostd(tmp: str, tag: str, env: dict | None = None, cwd: str = ROOT) -> tuple:
    sock = os.path.join(tmp, f"{tag}.sock")
    cfg = os.path.join(tmp, f"{tag}.yaml")
    with open(cfg, "w") as f:
        # poll_us 32: qemu-storage-daemon polls 32 us too (its default)
        f.write(f"daemon: {{workers: 1}}\ndevices:\n  - {{name: n, type: blk, socket: {sock}, backend: null, "
                f"size: {SIZE}, poll_us: 32}}\n")
    p = pinned([sys.executable, "-m", "vhostd", "serve", "--config", cfg], BACKEND_CPU,
               os.path.join(tmp, f"{tag}.log"), env=env, cwd=cwd)
    wait_listening([sock], p)
    return p, sock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--before", default="04b7a20", help="the commit before dirty logging")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vhostd-bench-log-")
    procs = []
    try:
        now, now_sock = start_vhostd(tmp, "now")
        env, src = build_before(args.before, tmp)
        old, old_sock = start_vhostd(tmp, "before", env, src)
        qsd, qsd_sock = start_qsd(tmp, f"driver=null-co,size={1 << 30}")
        procs = [now, old, qsd]
        log = "--dirty-log"
        sides = {"vhostd off": (now, now_sock), "before off": (old, old_sock), "vhostd on": (now, now_sock, log),
                 "qsd off": (qsd, qsd_sock), "qsd on": (qsd, qsd_sock, log)}
        rows = []
        print(f"{'workload':<18} " + " ".join(f"{k:>11}" for k in sides) +
              f"   {'off/before':>18} {'vhostd on/off':>18} {'qsd on/off':>11}", flush=True)
        for label, qd in WORKLOADS:
            s = measure_rounds(sides, {}, "randread", 4096, qd, args.runs, args.seconds)
            iops = s.pop("iops")
            off, lo_o, hi_o = ratio_spread(iops["vhostd off"], iops["before off"])
            on, lo_n, hi_n = ratio_spread(iops["vhostd on"], iops["vhostd off"])
            q, _, _ = ratio_spread(iops["qsd on"], iops["qsd off"])
            rows.append({"workload": label, **{k.replace(" ", "_"): v for k, v in s.items()},
                         "vhostd": s["vhostd off"], "anchor": s["before off"], "ratio": off, "ratio_min": lo_o,
                         "ratio_max": hi_o, "log_on_off": on, "log_on_off_min": lo_n, "log_on_off_max": hi_n,
                         "qsd_log_on_off": q})
            print(f"{label:<18} " + " ".join(f"{s[k]['iops']:>11,.0f}" for k in sides) +
                  f"   {off:>5.2f} ({lo_o:.2f}-{hi_o:.2f}) {on:>6.2f} ({lo_n:.2f}-{hi_n:.2f}) {q:>11.2f}", flush=True)
        if not args.no_save:
            cmd = f"python3 benchmarks/blk_log.py --seconds {args.seconds:g} --runs {args.runs} --before {args.before}"
            print("saved", save_results("blk_log", cmd, rows))
    finally:
        for p in procs:
            stop(p)
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", os.path.join(tmp, "before")],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
