#!/usr/bin/env python3
"""One vhostd serving many devices: what idle devices cost, and whether one
busy device is slowed down by hundreds of idle neighbours.

    python3 benchmarks/scale.py [--blk 256 --net 256 --idle-seconds 10 --seconds 5]

For each worker setting (--workers, default "1,0": one data plane worker, then
the daemon's default) it starts `vhostd serve` on CPU 0, under the soft
open-file limit services usually get (--nofile 1024), with --blk virtio-blk
devices (sparse images in a temp dir under /dev/shm) and --net virtio-net
devices (--tap on TAP interfaces in a namespace of the daemon's own, then
--switch-ports ports on a few built-in switches, the rest loopback), and
measures

  startup    process start until every socket listens (/proc/net/unix)
  threads    the daemon's threads after start-up
  RSS        VmRSS after start-up
  idle CPU   utime+stime over --idle-seconds, in % of one core, and the
             threads' wake-ups (context switches) per second
  +fe        RSS and idle CPU again with --frontends connected-but-idle
             front-ends (memory table, every queue started with kick/call fds)
  IOPS       one blk device under `vhostd bench blk --rw randread --bs 4096
             --iodepth 32` (on CPU 1; guest-drivers blkbench in vhostd's VMM
             when `vhostd bench` is missing) while all others idle, and the
             same load on a daemon serving only that device, --repeat runs
             each, alternating; `ratio` = median among / median alone
  PPS        with --net-load, the same for guest-drivers netbench (64-byte
             frames) on the last net device, a loopback port
  stop       SIGTERM until the daemon has exited

The targets are RSS < 300 MB and idle CPU < 1 % of a core (both with and
without the idle front-ends); the exit status is 1 when one is missed.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BACKEND_CPU, LOAD_CPU, ROOT, cpu_seconds, listening  # noqa: E402

sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tests"))  # the Python driver model (virtio_driver.py)

RSS_TARGET_MB = 300
IDLE_CPU_TARGET = 1.0  # % of one core


# ---------------------------------------------------------------- /proc


def status_field(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    return status_field(pid, "VmRSS") / 1024


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def context_switches(pid: int) -> int:
    """Context switches of every thread so far: each sleep and wake-up counts."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += sum(status_field(f"{pid}/task/{tid}", k) for k in ("voluntary_ctxt_switches",
                                                                      "nonvoluntary_ctxt_switches"))
        except OSError:  # the thread ended meanwhile
            pass
    return total


def idle_cpu(pid: int, seconds: float) -> tuple[float, float]:
    """CPU the process used over `seconds` of wall time, in % of one core,
    and its threads' wake-ups per second (context switches)."""
    c0, s0, t0 = cpu_seconds(pid), context_switches(pid), time.monotonic()
    time.sleep(seconds)
    c1, s1, t1 = cpu_seconds(pid), context_switches(pid), time.monotonic()
    return 100 * (c1 - c0) / (t1 - t0), (s1 - s0) / (t1 - t0)


# ---------------------------------------------------------------- the daemon


def write_config(work: str, name: str, nblk: int, nnet: int, workers: int, switch_ports: int, switches: int,
                 taps: int, image_size: str, blk_queues: int, net_queues: int,
                 log_level: str) -> tuple[str, list[str], list[str]]:
    """A config with nblk blk and nnet net devices (the first `taps` on TAP
    interfaces, the next `switch_ports` on switches, the rest loopback)
    in a directory of its own, work/name; returns (path, blk sockets, net
    sockets)."""
    work = os.path.join(work, name)
    os.makedirs(work)
    lines = [f"daemon: {{workers: {workers}, log_level: {log_level}}}", "devices:"]
    blk, net = [], []
    for i in range(nblk):
        sock = os.path.join(work, f"b{i}.sock")
        blk.append(sock)
        lines.append(f"  - {{name: b{i}, type: blk, socket: {sock}, path: {work}/b{i}.img, size: {image_size}, "
                     f"queues: {blk_queues}}}")
    for i in range(nnet):
        sock = os.path.join(work, f"n{i}.sock")
        net.append(sock)
        if i < taps:
            backend = f"backend: tap, tap: vst{i}"
        elif i < taps + switch_ports:
            backend = f"backend: switch, switch: lan{i % switches}"
        else:
            backend = "backend: loopback"
        lines.append(f"  - {{name: n{i}, type: net, socket: {sock}, {backend}, queues: {net_queues}}}")
    path = os.path.join(work, "vhostd.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, blk, net


class Daemon:
    """`vhostd serve` on CPU 0, with the soft open-file limit most services
    get (1024, as systemd gives them), in a network namespace of its own
    when it has TAP devices."""

    def __init__(self, config: str, sockets: list[str], log: str, nofile: int = 1024, netns: bool = False) -> None:
        self.sockets = sockets
        self.log = log
        cmd = ["taskset", "-c", BACKEND_CPU, *(["unshare", "-n"] if netns else []),
               sys.executable, "-m", "vhostd", "serve", "--config", config]

        def limits() -> None:
            if nofile:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=ROOT, preexec_fn=limits)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_listening(self, timeout: float = 120) -> float:
        """Seconds from process start until every socket listens."""
        want = set(self.sockets)
        # The daemon's own view: /proc/net/unix lists only the reader's network namespace.
        table = f"/proc/{self.pid}/net/unix"
        while listening(want, table) != want:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vhostd exited with {self.proc.returncode}; see {self.log}:\n{self.tail()}")
            if time.monotonic() - self.t0 > timeout:
                raise TimeoutError(f"{len(want - listening(want, table))} socket(s) not listening after {timeout} s")
            time.sleep(0.005)
        took = time.monotonic() - self.t0
        if self.proc.poll() is not None:  # someone else's sockets?
            raise RuntimeError(f"vhostd exited with {self.proc.returncode}; see {self.log}:\n{self.tail()}")
        return took

    def stop(self, timeout: float = 20) -> float:
        """SIGTERM; seconds until it exited."""
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"vhostd did not stop within {timeout} s of SIGTERM")
        return time.monotonic() - t

    def tail(self, n: int = 20) -> str:
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-n:])


# ---------------------------------------------------------------- idle front-ends


class IdleFrontend:
    """A connected front-end that set everything up and then does nothing:
    memory table, every queue sized, addressed and started with kick and
    call eventfds (as a booted guest whose device is quiet)."""

    def __init__(self, sock: str, nqueues: int) -> None:
        from vhostd.frontend import Frontend
        from virtio_driver import GuestMemory, SplitQueue

        self.fe = Frontend(sock)
        self.fe.negotiate()
        self.mem = GuestMemory(size=1 << 20)
        self.mem.give_to(self.fe)
        self.queues = []
        for i in range(nqueues):
            q = SplitQueue(self.mem, 256, arena=4096)
            q.attach(self.fe, i)
            self.queues.append(q)

    def close(self) -> None:
        self.fe.close()
        for q in self.queues:
            q.close()
        self.mem.close()


# ---------------------------------------------------------------- load


def bench_available() -> bool:
    r = subprocess.run([sys.executable, "-m", "vhostd", "bench", "blk", "--help"], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


_built: list[bool] = []


def run_load(kind: str, sock: str, seconds: float, work: str) -> int:
    """IOPS of 4 KiB random reads at queue depth 32 on one blk socket, from CPU 1."""
    if kind == "bench":
        cmd = [sys.executable, "-m", "vhostd", "bench", "blk", "--socket", sock, "--rw", "randread",
               "--bs", "4096", "--iodepth", "32", "--seconds", f"{seconds:g}"]
        return _run_counting(cmd, "IOPS", seconds)
    # guest-drivers blkbench in vhostd's VMM, as benchmarks/blk_vmm.py
    return run_vm("blkbench", f"rw=randread bs=4096 iodepth=32 seconds={seconds:g}", "blk", sock, "IOPS", seconds,
                  work)


def run_net_load(sock: str, seconds: float, work: str) -> int:
    """Frames per second of guest-drivers netbench (64-byte frames, window 64)
    through one loopback net socket, from CPU 1."""
    return run_vm("netbench", f"size=64 window=64 seconds={seconds:g}", "net", sock, "PPS", seconds, work)


def run_vm(program: str, vm_args: str, kind: str, sock: str, key: str, seconds: float, work: str) -> int:
    """A guest-drivers program in vhostd's VMM on one device; its KEY=<n>."""
    if not _built:
        subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "guest-drivers")], check=True,
                       stdout=subprocess.DEVNULL)
        _built.append(True)
    vm = os.path.join(work, "vm.yaml")
    with open(vm, "w") as f:
        f.write(f"vms:\n  - {{name: b, memory: 64M, payload: {ROOT}/guest-drivers/build/{program}.elf, "
                f"args: \"{vm_args}\", devices: [{{type: {kind}, socket: {sock}}}]}}\n")
    return _run_counting([sys.executable, "-m", "vhostd", "vm", "run", "--config", vm,
                          "--timeout", f"{seconds * 4 + 30:g}", "b"], key, seconds)


def _run_counting(cmd: list[str], key: str, seconds: float) -> int:
    r = subprocess.run(["taskset", "-c", LOAD_CPU, *cmd], cwd=ROOT, capture_output=True, text=True,
                       timeout=seconds * 4 + 60)
    m = re.findall(rf"\b{key}=(\d+)", r.stdout + r.stderr)
    if not m:
        raise RuntimeError(f"no {key}= in the load generator's output (status {r.returncode}):\n{r.stdout}{r.stderr}")
    return int(m[-1])


# ---------------------------------------------------------------- one run


def measure(args, work: str, workers: int, load: str | None) -> dict:
    name = f"scale-w{workers}"
    config, blk, net = write_config(work, name, args.blk, args.net, workers, args.switch_ports, args.switches,
                                    args.tap, args.image_size, args.blk_queues, args.net_queues, args.log_level)
    row = {"workers": workers or "default"}
    daemons = [Daemon(config, blk + net, config[:-4] + "log", args.nofile, netns=args.tap > 0)]
    d = daemons[0]
    fes: list[IdleFrontend] = []
    try:
        row["startup"] = d.wait_listening()
        time.sleep(0.5)  # let the start-up's last log lines and allocations settle
        row["threads"] = threads(d.pid)
        row["rss"] = rss_mb(d.pid)
        row["idle"], row["wakeups"] = idle_cpu(d.pid, args.idle_seconds)
        if args.frontends:
            nb = min(len(blk) - 1, args.frontends // 2)  # b0 stays free for the load
            nn = min(len(net) - 1, args.frontends - nb)  # and so does the last net device
            fes = [IdleFrontend(s, args.blk_queues) for s in blk[1 : 1 + nb]]
            fes += [IdleFrontend(s, 2 * args.net_queues + 1) for s in net[:nn]]
            time.sleep(0.5)
            row["fe"] = len(fes)
            row["fe_threads"] = threads(d.pid)
            row["fe_rss"] = rss_mb(d.pid)
            row["fe_idle"], row["fe_wakeups"] = idle_cpu(d.pid, args.idle_seconds)
        net_load = args.net_load and net and len(net) > args.tap + args.switch_ports  # needs a loopback port
        if (load and blk) or net_load:
            # The same device alone in a daemon of its own.  Both daemons stay
            # up (an idle one costs nothing: measured above) and the runs
            # alternate, so that drift of the machine hits both sides alike.
            config1, blk1, net1 = write_config(work, name + "-alone", 1, 1, workers, 0, 1, 0, args.image_size,
                                               args.blk_queues, 1, args.log_level)
            daemons.append(Daemon(config1, blk1 + net1, config1[:-4] + "log", args.nofile))
            daemons[1].wait_listening()
        if load and blk:
            among, alone = [], []
            for _ in range(args.repeat):
                among.append(run_load(load, blk[0], args.seconds, work))
                alone.append(run_load(load, blk1[0], args.seconds, work))
            row["iops_among"], row["iops_alone"] = statistics.median(among), statistics.median(alone)
            row["ratio"] = row["iops_among"] / row["iops_alone"] if row["iops_alone"] else 0.0
            row["runs"] = f"IOPS among {among} alone {alone}"
        if net_load:
            among, alone = [], []
            for _ in range(args.repeat):
                among.append(run_net_load(net[-1], args.seconds, work))
                alone.append(run_net_load(net1[0], args.seconds, work))
            row["pps_among"], row["pps_alone"] = statistics.median(among), statistics.median(alone)
            row["pps_ratio"] = row["pps_among"] / row["pps_alone"] if row["pps_alone"] else 0.0
            row["net_runs"] = f"PPS among {among} alone {alone}"
    finally:
        for fe in fes:
            fe.close()
        row["stop"] = d.stop()
        for other in daemons[1:]:
            other.stop()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blk", type=int, default=256, help="virtio-blk devices (default 256)")
    ap.add_argument("--net", type=int, default=256, help="virtio-net devices (default 256)")
    ap.add_argument("--tap", type=int, default=0,
                    help="net devices on TAP interfaces (the daemon then runs in a network namespace of its own)")
    ap.add_argument("--switch-ports", type=int, default=16, help="net devices on switches, the rest loopback")
    ap.add_argument("--switches", type=int, default=4, help="how many switches those ports spread over")
    ap.add_argument("--image-size", default="64M", help="each blk device's sparse image")
    ap.add_argument("--blk-queues", type=int, default=1, help="queues per blk device")
    ap.add_argument("--net-queues", type=int, default=1, help="queue pairs per net device")
    ap.add_argument("--nofile", type=int, default=1024,
                    help="the daemon's soft open-file limit at exec (0: inherit); 1024 is what services usually get")
    ap.add_argument("--workers", default="1,0", help="daemon.workers settings to run, comma separated (0: default)")
    ap.add_argument("--idle-seconds", type=float, default=10, help="idle CPU measurement window")
    ap.add_argument("--seconds", type=float, default=5, help="length of each load run")
    ap.add_argument("--repeat", type=int, default=5, help="load runs on each side (alternating); medians are shown")
    ap.add_argument("--frontends", type=int, default=64,
                    help="connected-but-idle front-ends for the second idle measurement (0: skip)")
    ap.add_argument("--load", choices=["auto", "bench", "vmm", "none"], default="auto",
                    help="load generator: `vhostd bench blk`, blkbench in the VMM, or none (auto: bench if present)")
    ap.add_argument("--net-load", action="store_true",
                    help="also netbench (VMM) on the last net device, a loopback port, among the idle ones and alone")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()

    load = {"auto": "bench" if bench_available() else "vmm", "none": None}.get(args.load, args.load)
    work = tempfile.mkdtemp(prefix="vhostd-scale-", dir="/dev/shm")
    rows = []
    try:
        for w in (int(x) for x in args.workers.split(",")):
            rows.append(measure(args, work, w, load))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.blk} blk ({args.blk_queues} queue) + {args.net} net devices ({args.net_queues} pair; {args.tap} TAP, "
          f"{args.switch_ports} switch ports), daemon on CPU {BACKEND_CPU}"
          f", load ({load or 'none'}: randread 4 KiB qd 32, {args.seconds:g} s) on CPU {LOAD_CPU}")
    head = ("workers", "startup s", "threads", "RSS MB", "idle CPU %", "wakeups/s")
    if args.frontends:
        head += ("+fe", "RSS MB", "idle CPU %", "wakeups/s")
    if load:
        head += ("IOPS among", "IOPS alone", "ratio")
    if args.net_load:
        head += ("PPS among", "PPS alone", "ratio")
    head += ("stop s",)
    print(" | ".join(head))
    for r in rows:
        cells = [str(r["workers"]), f"{r['startup']:.2f}", str(r["threads"]), f"{r['rss']:.1f}", f"{r['idle']:.2f}",
                 f"{r['wakeups']:.1f}"]
        if args.frontends:
            cells += [str(r.get("fe", 0)), f"{r.get('fe_rss', 0):.1f}", f"{r.get('fe_idle', 0):.2f}",
                      f"{r.get('fe_wakeups', 0):.1f}"]
        if load:
            cells += [f"{r.get('iops_among', 0):.0f}", f"{r.get('iops_alone', 0):.0f}", f"{r.get('ratio', 0):.2f}"]
        if args.net_load:
            cells += [f"{r.get('pps_among', 0):.0f}", f"{r.get('pps_alone', 0):.0f}", f"{r.get('pps_ratio', 0):.2f}"]
        cells.append(f"{r['stop']:.2f}")
        print(" | ".join(cells))
    for r in rows:
        for key in ("runs", "net_runs"):
            if key in r:
                print(f"workers={r['workers']}: {r[key]}")

    missed = []
    for r in rows:
        for key, what in (("rss", "RSS"), ("fe_rss", "RSS with idle front-ends")):
            if key in r and r[key] >= RSS_TARGET_MB:
                missed.append(f"workers={r['workers']}: {what} {r[key]:.1f} MB >= {RSS_TARGET_MB} MB")
        for key, what in (("idle", "idle CPU"), ("fe_idle", "idle CPU with idle front-ends")):
            if key in r and r[key] >= IDLE_CPU_TARGET:
                missed.append(f"workers={r['workers']}: {what} {r[key]:.2f} % >= {IDLE_CPU_TARGET} %")
    print(f"targets: RSS < {RSS_TARGET_MB} MB, idle CPU < {IDLE_CPU_TARGET} % of one core: "
          + ("met" if not missed else "MISSED"))
    for m in missed:
        print("  " + m)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
