"""What every benchmark here needs: pinned processes, readiness, CPU time,
and a results file the plot reads.

The back-end under test always runs on CPU 0 and the load on CPU 1 (this
machine has two), so the two never share a core.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
BACKEND_CPU, LOAD_CPU = "0", "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pinned(cmd: list[str], cpu: str, log: str, **kw) -> subprocess.Popen:
    """Start cmd on one CPU with stdout and stderr going to log."""
    kw.setdefault("cwd", ROOT)
    return subprocess.Popen(["taskset", "-c", cpu, *cmd], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, **kw)


def listening(paths: set[str], table: str = "/proc/net/unix") -> set[str]:
    """Which of the unix socket paths something listens on (one read of
    the table, however many paths; connecting would use up a one-front-end
    back-end).  table: another namespace's, e.g. /proc/PID/net/unix."""
    found = set()
    try:
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.rstrip("\n").split(None, 7)
                # Num RefCount Protocol Flags Type St Inode Path; Flags has __SO_ACCEPTCON
                if len(parts) >= 8 and int(parts[3], 16) & 0x10000 and parts[7] in paths:
                    found.add(parts[7])
    except OSError:  # the process owning the table is gone
        pass
    return found


def wait_listening(paths, proc: subprocess.Popen | None = None, timeout: float = 60) -> float:
    """Wait until every path listens; returns the seconds waited."""
    want = {os.path.abspath(p) for p in ([paths] if isinstance(paths, str) else paths)}
    start = time.monotonic()
    while listening(want) != want:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"back-end exited ({proc.returncode}) before listening")
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{len(want - listening(want))} socket(s) not listening after {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def vhostd_cmd(config: str) -> list[str]:
    return [sys.executable, "-m", "vhostd", "serve", "--config", config]


def bench_blk(sock: str, rw: str, bs: int, iodepth: int, seconds: float, queues: int = 1,
              extra: tuple[str, ...] = ()) -> dict:
    """One run of `vhostd bench blk` on the load CPU; its --json result.
    extra: more of its options (e.g. --dirty-log)."""
    cmd = ["taskset", "-c", LOAD_CPU, sys.executable, "-m", "vhostd", "bench", "blk", "--socket", sock,
           "--rw", rw, "--bs", str(bs), "--iodepth", str(iodepth), "--queues", str(queues),
           "--seconds", str(seconds), "--json", *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_qsd(tmp: str, blockdev: str) -> tuple[subprocess.Popen, str]:
    """qemu-storage-daemon on the back-end CPU exporting one block node
    (blockdev: its options, e.g. driver=nbd,...) on tmp/qsd.sock, writable."""
    sock = os.path.join(tmp, "qsd.sock")
    cmd = ["qemu-storage-daemon", "--blockdev", f"{blockdev},node-name=n0",
           "--export", f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},writable=on"]
    p = pinned(cmd, BACKEND_CPU, os.path.join(tmp, "qsd.log"))
    wait_listening([sock], p)
    return p, sock


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summarize(runs: list[dict]) -> dict:
    """One figure per measure from repeated runs: the median; `iops_runs`
    keeps every run's IOPS (the spread)."""
    out = {k: median([r[k] for r in runs]) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    out["iops_runs"] = [r["iops"] for r in runs]
    return out


def ratio_spread(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-run ratios ours[i] / theirs[i]: runs i
    were measured back to back, so each ratio shares that moment's noise."""
    ratios = [a / b if b else float("inf") for a, b in zip(ours, theirs)]
    return median(ratios), min(ratios), max(ratios)


def fio(path: str, rw: str, bs: int, iodepth: int, seconds: float, cpu: str = LOAD_CPU) -> dict:
    """fio with io_uring and O_DIRECT on a file: the disk's own limit."""
    return fio_job([f"--filename={path}", "--direct=1", "--ioengine=io_uring"], rw, bs, iodepth, seconds, cpu)


def fio_job(target: list[str], rw: str, bs: int, iodepth: int, seconds: float, cpu: str = LOAD_CPU,
            env: dict | None = None) -> dict:
    """fio on target (its engine and what the engine opens: a file, an NBD
    URI, an RBD image)."""
    cmd = ["taskset", "-c", cpu, "fio", "--name=limit", *target,
           f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}", f"--runtime={seconds}", "--time_based",
           "--output-format=json", "--norandommap"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed ({out.returncode}): {out.stderr[-1000:]}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]  # (engines may print before the JSON)
    side = job["write"] if "write" in rw else job["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {"iops": side["iops"], "lat_p50_us": pct.get("50.000000", 0) / 1000,
            "lat_p99_us": pct.get("99.000000", 0) / 1000}


def save_results(name: str, command: str, rows: list[dict]) -> str:
    """Write benchmarks/results/<name>.json, which plot.py and RESULTS.md use."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"command": command, "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
        f.write("\n")
    return path
