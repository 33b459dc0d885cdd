#!/usr/bin/env python3
"""vhost-user-net back-end throughput: vhostd against DPDK's vhost PMD on three
paths, the same dpdk-testpmd load driving both sides in the same run.

The back-end under test runs pinned to CPU 0 (BACKEND_CPU), every load
testpmd to CPU 1 (LOAD_CPU).  Paths (--paths):

  loopback  vhostd: a `backend: loopback` net device (every frame sent comes
            back).  Anchor: testpmd with the net_vhost PMD in macswap mode.
            Load: one testpmd virtio-user port in io forwarding, started with
            one tx_first burst (frames circulate).  Counted: frames received
            by the load testpmd.
  switch    vhostd: two ports (s0, s1) of one switch.  Anchor: testpmd with two
            net_vhost ports in io forwarding (0 -> 1 and 1 -> 0, no MAC work).
            Load: one testpmd with two virtio-user ports in flowgen mode: each
            port sends as fast as it can, from its own MAC to the other port's
            (the switch learns both, so the frames take its learned-unicast
            way, not the flood; learning lasts 300 s, longer than a run), and
            receives and frees what arrives.  Counted: frames received on both
            ports, i.e. frames the back-end forwarded.  (Not the issue's
            sender testpmd + counter testpmd: two busy-polling testpmds sharing
            the load CPU see each other only when the scheduler switches, so
            the counter took at most a ring (256 frames) per time slice: about
            30 K frames/s on both sides, the back-end dropping the rest.)
  tap       vhostd: a `backend: tap` device, run inside a network namespace
            this benchmark creates, so vhostd creates its TAP there.  Anchor:
            testpmd (in the namespace too) with a net_vhost port and a net_tap
            port in io forwarding (vhost -> TAP).  Load: a txonly sender
            testpmd on the vhost-user socket.  Counted: the TAP's rx_packets
            in the namespace (frames the kernel took; they are addressed to
            another host and the namespace has no address, so the kernel
            drops them right after counting).  The kernel's work is done in
            the back-end's write() to the TAP, so it is in its CPU time, and
            it is likely the bottleneck on both sides.

Each path and frame size runs --runs rounds; a round runs, for each ring
layout of --rings (the load's virtio-user ports with packed_vq=0 or 1; both
back-ends serve either), vhostd then the anchor, each with fresh processes: after a warm-up, the frames counted and the
back-end's CPU time (utime + stime, all threads) are read at the start and
the end of a --seconds window.  Reported per size and layout: the median
frames/s of each side, the median of the per-round ratios with their min-max,
and the back-end's CPU ns per frame; with both layouts also vhostd's packed /
split ratio per round (above 1: packed is faster).  vhostd's devices get `poll_us: 100` (DPDK's
PMD polls all the time too); --device-keys changes that.

    python3 benchmarks/net_testpmd.py [--paths loopback,switch,tap] [--sizes 64,1500]
                                      [--rings split,packed] [--seconds 10] [--runs 3]
                                      [--device-keys KEYS] [--no-save]
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BACKEND_CPU, LOAD_CPU, cpu_seconds, listening, median, pinned, ratio_spread,  # noqa: E402
                    save_results, stop, vhostd_cmd, wait_listening)

PATHS = ("loopback", "switch", "tap")
WARMUP = 2.0  # seconds of traffic before the measured window
DPDK_RUN = "/var/run/dpdk"  # EAL's runtime directories (root): <DPDK_RUN>/<file-prefix>
PREFIX = f"vhostd-bench-{os.getpid()}"  # of DPDK file prefixes and the namespace
MACS = ("02:00:00:00:5e:00", "02:00:00:00:5e:01")  # of the switch load's two ports
RINGS = ("split", "packed")
RING = "split"  # the layout the load's virtio-user ports negotiate (packed_vq=1: packed); set per run


def virtio_user(i: int, sock: str, extra: str = "") -> str:
    """A load testpmd's virtio-user port on sock, on the current ring layout."""
    return f"net_virtio_user{i},path={sock},queues=1{extra}" + (",packed_vq=1" if RING == "packed" else "")
_seq = itertools.count()


# ---------------------------------------------------------------------------- processes

class Testpmd:
    """One dpdk-testpmd on one CPU (main and forwarding lcore share it).
    interactive: commands on stdin (`start tx_first`, `show port stats N`),
    so counters are read at the moment wanted; else --auto-start."""

    def __init__(self, tmp: str, name: str, vdevs: list[str], args: list[str], cpu: str,
                 interactive: bool = False, netns: str | None = None):
        self.prefix = f"{PREFIX}-{next(_seq)}"
        self.log = os.path.join(tmp, f"testpmd-{name}.log")
        self.interactive = interactive
        self.vdevs = vdevs
        cmd = ["taskset", "-c", cpu] + (["ip", "netns", "exec", netns] if netns else [])
        # stdbuf: testpmd's printf output would otherwise reach the log only at exit.
        cmd += ["stdbuf", "-oL", "-eL", "dpdk-testpmd", "--lcores", f"0@{cpu},1@{cpu}", "--no-huge",
                "-m", "512", "--no-pci", f"--file-prefix={self.prefix}", *(f"--vdev={v}" for v in vdevs),
                "--", "--total-num-mbufs=32768", *args]
        cmd += ["-i"] if interactive else ["--auto-start", "--stats-period=60"]
        # taskset, ip netns exec and stdbuf all exec: self.proc.pid is testpmd's.
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.PIPE if interactive else subprocess.DEVNULL)
        self.pid = self.proc.pid

    def text(self, offset: int = 0) -> str:
        with open(self.log, "rb") as f:
            f.seek(offset)
            return f.read().decode("latin-1")

    def wait(self, pattern: str, offset: int = 0, timeout: float = 60) -> re.Match:
        pat = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        while True:
            m = pat.search(self.text(offset))
            if m:
                return m
            if self.proc.poll() is not None:
                raise RuntimeError(f"testpmd exited ({self.proc.returncode}), see {self.log}:\n"
                                   f"{self.text()[-1500:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not in {self.log} after {timeout}s:\n{self.text()[-1500:]}")
            time.sleep(0.002)

    def cmd(self, command: str, until: str, timeout: float = 30) -> re.Match:
        """Run an interactive command; the match of `until` in what follows it."""
        offset = os.path.getsize(self.log)
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it exited: wait() says so, with its output
        return self.wait(until, offset, timeout)

    def ready(self, ports: int = 1, timeout: float = 60) -> None:
        """Interactive: wait for the prompt, then until every port's link is up."""
        self.wait(r"testpmd> ", 0, timeout)
        deadline = time.monotonic() + timeout
        for port in range(ports):
            while "Link status: up" not in self.cmd(f"show port info {port}", r"Link status: \w+").group(0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"port {port} link down after {timeout}s, see {self.log}")
                time.sleep(0.1)

    def rx_packets(self) -> dict[int, int]:
        """{port: RX-packets} of every port, read with one command."""
        n = len(self.vdevs)
        m = self.cmd("show port stats all", rf"(.*NIC statistics for port {n - 1}\b.*?)\n\s*#{{20,}}")
        got = {int(p): int(v) for p, v in re.findall(r"NIC statistics for port (\d+).*?RX-packets:\s*(\d+)",
                                                     m.group(1), re.S)}
        if len(got) != n:
            raise RuntimeError(f"cannot parse port stats in {self.log}: {m.group(1)[-1000:]}")
        return got

    def stop(self) -> None:
        if self.interactive and self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        stop(self.proc, signal.SIGINT)
        shutil.rmtree(os.path.join(DPDK_RUN, self.prefix), ignore_errors=True)


class Procs:
    """Everything one measurement started, stopped in reverse order."""

    def __init__(self) -> None:
        self.items: list[Testpmd | subprocess.Popen] = []

    def add(self, p):
        self.items.append(p)
        return p

    def close(self) -> None:
        while self.items:
            p = self.items.pop()
            try:
                p.stop() if isinstance(p, Testpmd) else stop(p)
            except Exception as e:  # noqa: BLE001 - stop the others anyway
                print(f"warning: stopping {p}: {e}", file=sys.stderr)

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_listen(paths: list[str], proc: subprocess.Popen, netns: str | None) -> None:
    if not netns:
        wait_listening(paths, proc)
        return
    # Another namespace has its own /proc/net/unix: read the process's.
    want, deadline = {os.path.abspath(p) for p in paths}, time.monotonic() + 60
    while listening(want, f"/proc/{proc.pid}/net/unix") != want:
        if proc.poll() is not None:
            raise RuntimeError(f"back-end exited ({proc.returncode}) before listening")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sorted(want)} not listening after 60s")
        time.sleep(0.01)


# vhostd's devices busy-poll their tx queues (poll_us) by default here: DPDK's
# vhost PMD polls its queues all the time, and the question is how fast each
# moves frames when CPU is spent on it.  --device-keys "" measures without.
POLL_KEYS = "poll_us: 100"
DEVICE_KEYS = POLL_KEYS  # --device-keys: the keys added to every vhostd device


def start_vhostd(tmp: str, devices: list[str], socks: list[str], netns: str | None = None,
                 env: dict | None = None) -> subprocess.Popen:
    """vhostd serving `devices` (YAML flow mappings) on the back-end CPU; env:
    its environment (e.g. PYTHONPATH to another build, net_ab.py)."""
    cfg = os.path.join(tmp, "vhostd.yaml")
    extra = f", {DEVICE_KEYS}" if DEVICE_KEYS else ""
    with open(cfg, "w") as f:
        f.write("daemon: {workers: 1, log_level: warning}\ndevices:\n"
                + "".join(f"  - {{{d}{extra}}}\n" for d in devices))
    for s in socks:
        if os.path.exists(s):
            os.unlink(s)
    cmd = (["ip", "netns", "exec", netns] if netns else []) + vhostd_cmd(cfg)
    d = pinned(cmd, BACKEND_CPU, os.path.join(tmp, "vhostd.log"), env=env)
    try:
        wait_listen(socks, d, netns)
    except BaseException:
        stop(d)
        raise
    return d


def anchor(tmp: str, procs: Procs, vdevs: list[str], mode: str, socks: list[str],
           netns: str | None = None) -> Testpmd:
    for s in socks:
        if os.path.exists(s):
            os.unlink(s)
    be = procs.add(Testpmd(tmp, "anchor", vdevs, [f"--forward-mode={mode}"], BACKEND_CPU, netns=netns))
    wait_listen(socks, be.proc, netns)
    return be


# ---------------------------------------------------------------------------- measuring

def window(count: Callable[[], int], backend_pid: int, seconds: float) -> tuple[float, float]:
    """(frames/s, back-end CPU ns per frame) over `seconds` after the warm-up."""
    time.sleep(WARMUP)

    def sample() -> tuple[int, float, float]:
        t = time.monotonic()
        n = count()
        t = (t + time.monotonic()) / 2  # the counter was read somewhere in between
        return n, t, cpu_seconds(backend_pid)

    n0, t0, c0 = sample()
    time.sleep(seconds)
    n1, t1, c1 = sample()
    frames = n1 - n0
    if frames <= 0:
        raise RuntimeError(f"no frames counted in {seconds}s")
    return frames / (t1 - t0), (c1 - c0) * 1e9 / frames


def vhostd_ports(tmp: str, path: str, env: dict | None = None) -> tuple[subprocess.Popen, list[str]]:
    """vhostd with the devices of a loopback run (one loopback device) or of
    a switch run (two ports of one switch), and their sockets."""
    if path == "loopback":
        socks = [os.path.join(tmp, "loop.sock")]
        devices = [f"name: loop0, type: net, socket: {socks[0]}, backend: loopback"]
    else:
        socks = [os.path.join(tmp, "s0.sock"), os.path.join(tmp, "s1.sock")]
        devices = [f"name: sw{i}, type: net, socket: {s}, backend: switch, switch: lan0" for i, s in enumerate(socks)]
    return start_vhostd(tmp, devices, socks, env=env), socks


def start_load(procs: Procs, tmp: str, name: str, path: str, socks: list[str], size: int) -> Testpmd:
    """The load of a loopback or switch run on socks, forwarding.  Loopback:
    io forwarding, one tx_first burst circulating.  Switch: flowgen, each port
    sending from its own MAC to the other's (the switch learns both) and
    freeing what arrives; its frames are --txpkts minus 4 (an FCS it leaves
    out)."""
    if path == "loopback":
        vdevs = [virtio_user(0, socks[0])]
        args, start = ["--forward-mode=io", f"--txpkts={size}"], "start tx_first"
    else:
        vdevs = [virtio_user(i, s, f",mac={mac}") for i, (s, mac) in enumerate(zip(socks, MACS))]
        args = ["--forward-mode=flowgen", f"--txpkts={size + 4}", f"--eth-peer=0,{MACS[1]}", f"--eth-peer=1,{MACS[0]}"]
        start = "start"
    gen = procs.add(Testpmd(tmp, name, vdevs, args, LOAD_CPU, interactive=True))
    gen.ready(ports=len(vdevs))
    gen.cmd(start, r"testpmd> ")
    return gen


def anchor_ports(tmp: str, procs: Procs, path: str) -> tuple[Testpmd, list[str]]:
    """DPDK's vhost PMD serving a loopback run (macswap on one port) or a
    switch run (io forwarding between two ports), and its sockets."""
    if path == "loopback":
        socks = [os.path.join(tmp, "dpdk.sock")]
        return anchor(tmp, procs, [f"net_vhost0,iface={socks[0]},queues=1"], "macswap", socks), socks
    socks = [os.path.join(tmp, "a.sock"), os.path.join(tmp, "b.sock")]
    return anchor(tmp, procs, [f"net_vhost{i},iface={s},queues=1" for i, s in enumerate(socks)], "io", socks), socks


def forwarded(path: str, tmp: str, side: str, size: int, seconds: float) -> tuple[float, float]:
    """A loopback or switch run; counted: frames received by the load."""
    with Procs() as procs:
        if side == "vhostd":
            be, socks = vhostd_ports(tmp, path)
            procs.add(be)
        else:
            be, socks = anchor_ports(tmp, procs, path)
        gen = start_load(procs, tmp, f"gen-{side}", path, socks, size)
        return window(lambda: sum(gen.rx_packets().values()), be.pid, seconds)


def tap_rx(netns: str, ifname: str) -> int:
    out = subprocess.run(["ip", "-n", netns, "-s", "-j", "link", "show", ifname], capture_output=True,
                         text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def tap(tmp: str, side: str, size: int, seconds: float, netns: str) -> tuple[float, float]:
    with Procs() as procs:
        if side == "vhostd":
            sock, ifname = os.path.join(tmp, "t.sock"), "vbtap0"
            be = procs.add(start_vhostd(tmp, [f"name: tap0, type: net, socket: {sock}, backend: tap, tap: {ifname}"],
                                        [sock], netns))
        else:
            sock, ifname = os.path.join(tmp, "ta.sock"), "vbtap1"
            be = anchor(tmp, procs, [f"net_vhost0,iface={sock},queues=1", f"net_tap0,iface={ifname}"], "io",
                        [sock], netns)
        procs.add(Testpmd(tmp, f"sender-{side}", [virtio_user(0, sock)],
                          ["--forward-mode=txonly", f"--txpkts={size}"], LOAD_CPU))
        return window(lambda: tap_rx(netns, ifname), be.pid, seconds)


# ---------------------------------------------------------------------------- housekeeping

def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def clean_stale() -> None:
    """Runtime directories and namespaces an earlier run that was killed left."""
    for d in glob.glob(os.path.join(DPDK_RUN, "vhostd-bench-*")):
        m = re.match(r"vhostd-bench-(\d+)-\d+$", os.path.basename(d))
        if m and not alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in re.findall(r"^(vhostd-bench-(\d+))\b", out, re.M):
        if not alive(int(name[1])):
            subprocess.run(["ip", "netns", "del", name[0]], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated: loopback,switch,tap")
    ap.add_argument("--sizes", default="64,1500", help="frame sizes in bytes")
    ap.add_argument("--seconds", type=float, default=10, help="measured window per run (after a warm-up)")
    ap.add_argument("--runs", type=int, default=3, help="rounds (vhostd then anchor) per path and size")
    ap.add_argument("--rings", default=",".join(RINGS), help="ring layouts the load negotiates: split,packed")
    ap.add_argument("--device-keys", default=POLL_KEYS,
                    help=f'YAML keys added to vhostd\'s devices (default "{POLL_KEYS}"; "" for none)')
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/net_testpmd.json")
    args = ap.parse_args()
    global DEVICE_KEYS, RING
    DEVICE_KEYS = args.device_keys
    paths, rings = args.paths.split(","), args.rings.split(",")
    if set(paths) - set(PATHS) or args.runs < 1 or not rings or set(rings) - set(RINGS):
        ap.error(f"--paths: some of {','.join(PATHS)}; --rings: some of {','.join(RINGS)}; --runs: at least 1")
    sizes = [int(s) for s in args.sizes.split(",")]
    if not all(60 <= s <= 2040 for s in sizes):
        ap.error("--sizes: 60 to 2040 bytes (one mbuf)")
    # SIGTERM like Ctrl-C: unwind through the finally blocks that stop everything.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    clean_stale()
    tmp = tempfile.mkdtemp(prefix="vhostd-bench-net-")
    netns = None
    rows = []
    start = time.monotonic()
    try:
        if "tap" in paths:
            netns = PREFIX
            subprocess.run(["ip", "netns", "add", netns], check=True)
        measure = {"loopback": lambda *a: forwarded("loopback", *a), "switch": lambda *a: forwarded("switch", *a),
                   "tap": lambda *a: tap(*a, netns=netns)}
        print(f"{'workload':<22} {'vhostd Mfps':>11} {'DPDK Mfps':>10} {'ratio':>6} {'min-max':>11} "
              f"{'vhostd ns/f':>11} {'DPDK ns/f':>10}", flush=True)
        for path in paths:
            for size in sizes:
                res = {ring: {"vhostd": [], "anchor": []} for ring in rings}
                for r in range(args.runs):
                    for ring in rings:
                        RING = ring
                        for side in ("vhostd", "anchor"):
                            work = os.path.join(tmp, f"{path}-{size}-{ring}-r{r + 1}-{side}")  # its logs, sockets
                            os.mkdir(work)
                            res[ring][side].append(measure[path](work, side, size, args.seconds))
                        print(f"  {path} {size} B {ring} round {r + 1}: "
                              f"vhostd {res[ring]['vhostd'][-1][0] / 1e6:.3f} Mfps, "
                              f"anchor {res[ring]['anchor'][-1][0] / 1e6:.3f} Mfps", flush=True)
                for ring in rings:
                    fps = {s: [f for f, _ in res[ring][s]] for s in res[ring]}
                    ratio, lo, hi = ratio_spread(fps["vhostd"], fps["anchor"])
                    row = {"workload": f"{path} {size} B" + (f" {ring}" if len(rings) > 1 else ""), "ring": ring}
                    for s in res[ring]:
                        row[s] = {"fps": median(fps[s]), "ns_per_frame": median([n for _, n in res[ring][s]]),
                                  "fps_runs": fps[s]}
                    row.update(ratio=ratio, ratio_min=lo, ratio_max=hi)
                    rows.append(row)
                    v, a = row["vhostd"], row["anchor"]
                    print(f"{row['workload']:<22} {v['fps'] / 1e6:>11.3f} {a['fps'] / 1e6:>10.3f} {ratio:>6.2f} "
                          f"{f'{lo:.2f}-{hi:.2f}':>11} {v['ns_per_frame']:>11.0f} {a['ns_per_frame']:>10.0f}",
                          flush=True)
                if len(rings) == 2:
                    ratio, lo, hi = ratio_spread([f for f, _ in res["packed"]["vhostd"]],
                                                 [f for f, _ in res["split"]["vhostd"]])
                    rows[-1]["vhostd_packed_over_split"] = {"ratio": ratio, "min": lo, "max": hi}
                    print(f"  vhostd packed/split {path} {size} B: {ratio:.2f} ({lo:.2f}-{hi:.2f})", flush=True)
    finally:
        if netns:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    print(f"{time.monotonic() - start:.0f} s; logs: {tmp}")
    if not args.no_save:
        print("saved", save_results("net_testpmd", f"python3 benchmarks/net_testpmd.py --paths {args.paths} "
                                    f"--sizes {args.sizes} --rings {args.rings} --seconds {args.seconds:g} "
                                    f"--runs {args.runs}"
                                    + (f" --device-keys '{args.device_keys}'" if args.device_keys != POLL_KEYS
                                       else ""), rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
