#!/usr/bin/env python3
"""vhost-user-net back-end throughput: vhostd `loopback` vs DPDK's vhost PMD.

The same load generator drives both: dpdk-testpmd with the virtio-user PMD in
io forwarding, `--tx-first` (frames circulate: every frame received is sent
again). The back-end under test runs pinned to CPU 0, testpmd to CPU 1.
  * vhostd: a `loopback` net device (every frame sent comes back);
  * anchor: a second testpmd with DPDK's net_vhost PMD in macswap mode.
Reports received frames per second at the load generator and the ratio.

    python3 benchmarks/net_testpmd.py [--seconds 10] [--sizes 64,1500]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BACKEND_CPU, LOAD_CPU, ROOT, save_results, vhostd_cmd, wait_listening  # noqa: E402


def testpmd(args: list[str], cpu: str, prefix: str, log: str) -> subprocess.Popen:
    cmd = ["taskset", "-c", cpu, "dpdk-testpmd", "--lcores", f"0@{cpu},1@{cpu}", "--no-huge", "-m", "1024",
           "--no-pci", f"--file-prefix={prefix}", *args]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def rx_pps(log: str) -> float:
    """Median of the periodic Rx-pps readings after the first (warm-up) ones."""
    text = open(log).read()
    vals = [int(v) for v in re.findall(r"Rx-pps:\s+(\d+)", text)]
    vals = vals[2:] if len(vals) > 4 else vals
    if not vals:
        raise RuntimeError(f"no Rx-pps in {log}:\n{text[-2000:]}")
    vals.sort()
    return float(vals[len(vals) // 2])


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def load(sock: str, size: int, seconds: int, prefix: str, log: str) -> float:
    gen = testpmd([f"--vdev=net_virtio_user0,path={sock},queues=1", "--", "--forward-mode=io", "--tx-first",
                   "--auto-start", "--stats-period", "1", f"--txpkts={size}"], LOAD_CPU, prefix, log)
    time.sleep(seconds + 3)
    stop(gen)
    return rx_pps(log)


def run_vhostd(tmp: str, size: int, seconds: int) -> float:
    cfg = os.path.join(tmp, "vhostd.yaml")
    sock = os.path.join(tmp, "loop.sock")
    with open(cfg, "w") as f:
        f.write(f"daemon: {{workers: 1, log_level: warning}}\n"
                f"devices:\n  - {{name: loop0, type: net, socket: {sock}, backend: loopback}}\n")
    d = subprocess.Popen(["taskset", "-c", BACKEND_CPU, *vhostd_cmd(cfg)], cwd=ROOT, stdout=open(os.path.join(tmp, "vhostd.log"), "w"), stderr=subprocess.STDOUT)
    try:
        wait_listening(sock, d)
        return load(sock, size, seconds, f"bench-gen-v{size}", os.path.join(tmp, f"gen-vhostd-{size}.log"))
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(10)


def run_dpdk(tmp: str, size: int, seconds: int) -> float:
    sock = os.path.join(tmp, "dpdk.sock")
    be = testpmd([f"--vdev=net_vhost0,iface={sock},queues=1", "--", "--forward-mode=macswap", "--auto-start",
                  "--stats-period", "5"], BACKEND_CPU, f"bench-be{size}", os.path.join(tmp, f"be-dpdk-{size}.log"))
    try:
        wait_listening(sock, be)
        return load(sock, size, seconds, f"bench-gen-d{size}", os.path.join(tmp, f"gen-dpdk-{size}.log"))
    finally:
        stop(be)
        if os.path.exists(sock):
            os.unlink(sock)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/net_testpmd.json")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vhostd-bench-")
    print(f"{'frame':>6} {'vhostd Mfps':>12} {'DPDK vhost Mfps':>16} {'ratio':>6}")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        v = run_vhostd(tmp, size, args.seconds)
        a = run_dpdk(tmp, size, args.seconds)
        rows.append({"workload": f"{size} B frames", "vhostd": {"fps": v}, "anchor": {"fps": a}, "ratio": v / a})
        print(f"{size:>6} {v / 1e6:>12.2f} {a / 1e6:>16.2f} {v / a:>6.2f}", flush=True)
    print(f"logs: {tmp}")
    if not args.no_save:
        print("saved", save_results("net_testpmd", f"python3 benchmarks/net_testpmd.py --seconds {args.seconds} "
                                    f"--sizes {args.sizes}", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
