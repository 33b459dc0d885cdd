#!/usr/bin/env python3
"""Live migration with vhostd vs qemu-storage-daemon as the vhost-user-blk
back-end: the same QEMU (TCG), the same guest, the same workload.

A guest (default 1 GiB of RAM) reads its disk in a loop (a 256 MiB image in
tmpfs, read through the page cache pass after pass, so the back-end keeps
writing guest RAM that it must log as dirty) and migrates over a unix socket
to a second QEMU on a second socket of the same back-end (vhostd: two
readonly devices on one image; qsd: two exports of one node).  Reported:
QEMU's `total-time` and `downtime` (ms), medians over --runs, alternating the
back-ends; the ratio vhostd / qsd is the median of the per-run ratios (lower
is better here), with their spread; and how many guests still ran after the
move (a failure is counted and its console kept, not fatal).  `emulated`
adds QEMU's own virtio-blk on the same image as a reference without
vhost-user.

What logging costs the data plane (null disks, logging on vs off, with a
load generator that enables it as QEMU does) is benchmarks/blk_log.py.

Back-end on CPU 0, both QEMUs on CPU 1.

    .venv/bin/python benchmarks/migration.py [--runs 5] [--memory 1G] [--bandwidth BYTES_PER_S]
                                             [--backends vhostd,qsd[,emulated]]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from common import (BACKEND_CPU, LOAD_CPU, median, pinned, ratio_spread, save_results, stop,  # noqa: E402
                    vhostd_cmd, wait_listening)
from guest.build_guest import ensure_guest_image  # noqa: E402
from guest.qemu import GuestError, QemuGuest  # noqa: E402

IMAGE_SIZE = 256 << 20

# Reads the whole disk through the page cache, pass after pass (dd's close
# drops the device's page cache too, so each pass reads from the back-end).
READ_LOOP = """
echo 1 > /proc/sys/kernel/printk
echo VHOSTD-BENCH-READY
while :; do
    echo 1 > /proc/sys/vm/drop_caches
    dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null
    echo VHOSTD-BENCH-PASS
done
"""

def fill_image(path: str) -> None:
    chunk = bytes(range(256)) * 4096  # non-zero: reads copy real pages
    with open(path, "wb") as f:
        for _ in range(IMAGE_SIZE // len(chunk)):
            f.write(chunk)


def start_vhostd(tmp: str, img: str) -> tuple[subprocess.Popen, dict]:
    socks = {k: os.path.join(tmp, f"vd-{k}.sock") for k in ("src", "dst")}
    cfg = os.path.join(tmp, "vhostd.yaml")
    # Both sides only read, so two readonly devices may name one image.
    with open(cfg, "w") as f:
        f.write("daemon: {workers: 1, log_level: warning}\ndevices:\n"
                f"  - {{name: src, type: blk, socket: {socks['src']}, path: {img}, readonly: true}}\n"
                f"  - {{name: dst, type: blk, socket: {socks['dst']}, path: {img}, readonly: true}}\n")
    p = pinned(vhostd_cmd(cfg), BACKEND_CPU, os.path.join(tmp, "vhostd.log"))
    wait_listening(socks.values(), p)
    return p, socks


def start_qsd(tmp: str, img: str) -> tuple[subprocess.Popen, dict]:
    socks = {k: os.path.join(tmp, f"qsd-{k}.sock") for k in ("src", "dst")}
    cmd = ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={img},read-only=on"]
    for i, sock in enumerate(socks.values()):
        cmd += ["--export", f"type=vhost-user-blk,id=e{i},node-name=f0,addr.type=unix,addr.path={sock},writable=off"]
    p = pinned(cmd, BACKEND_CPU, os.path.join(tmp, "qsd.log"))
    wait_listening(socks.values(), p)
    return p, socks


def pin_to_load_cpu(g: QemuGuest) -> None:
    # All of QEMU's threads (vCPU, migration, I/O), and those it starts later.
    subprocess.run(["taskset", "-a", "-p", "-c", LOAD_CPU, str(g.proc.pid)], check=True,
                   stdout=subprocess.DEVNULL)


def emulated(img: str) -> dict:
    """QEMU's own virtio-blk on the image: the reference without vhost-user
    (QEMU tracks its device's writes to guest RAM itself)."""
    return {"extra_args": ["-drive", f"file={img},if=none,id=d0,format=raw,readonly=on",
                           "-device", "virtio-blk-pci,drive=d0"]}


def migrate_once(tmp: str, name: str, socks: dict, memory: str, image, bandwidth: int) -> dict:
    disk = {"extra_args": socks["extra_args"]} if "extra_args" in socks else {"disks": [socks["src"]]}
    src = QemuGuest(READ_LOOP, memory=memory, qmp=True, image=image, timeout=300,
                    workdir=os.path.join(tmp, f"{name}-src"), **disk)
    dst = None
    try:
        src.start()
        pin_to_load_cpu(src)
        src.wait_for("VHOSTD-BENCH-READY", timeout=300)
        src.wait_for("VHOSTD-BENCH-PASS", timeout=300)  # the loop is in its stride
        dst_disk = {} if "extra_args" in socks else {"disks": [socks["dst"]]}
        dst = QemuGuest(**src.destination_args(workdir=os.path.join(tmp, f"{name}-dst"), **dst_disk))
        dst.start()
        pin_to_load_cpu(dst)
        try:
            src.migrate(dst, max_bandwidth=bandwidth, timeout=600)
        except (GuestError, OSError):
            # Completed, but the destination died while starting the guest:
            # counted below like a guest that fails afterwards.
            if src.last_migration is None:  # the migration itself failed
                raise
        info = src.last_migration
        ram = info.get("ram", {})
        r = {"total_ms": info["total-time"], "downtime_ms": info["downtime"],
             "setup_ms": info.get("setup-time", 0), "transferred_mib": ram.get("transferred", 0) / (1 << 20),
             "dirty_syncs": ram.get("dirty-sync-count", 0), "guest_ok": True}
        try:
            # The guest must go on reading over there: two more passes.
            dst.wait_for("VHOSTD-BENCH-PASS", timeout=60)
            dst.wait_for("VHOSTD-BENCH-PASS", timeout=60)
        except GuestError as e:
            # Counted, not fatal: whether the guest survives the move is a
            # result too (on QEMU 7.2 under TCG, fast migrations with either
            # vhost-user back-end sometimes leave a corrupted guest).
            r["guest_ok"] = False
            r["guest_error"] = str(e).splitlines()[0]
            r["console"] = dst.console_path.read_text(errors="replace")[-4000:]
        return r
    finally:
        src.close()
        if dst is not None:
            dst.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--memory", default="1G", help="guest RAM (default 1G)")
    ap.add_argument("--bandwidth", type=int, default=100 << 30,
                    help="migration max-bandwidth in bytes/s (default 100 GiB/s: as fast as it goes)")
    ap.add_argument("--backends", default="vhostd,qsd",
                    help="comma-separated subset of vhostd,qsd,emulated (QEMU's own virtio-blk, no vhost-user)")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/migration.json")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    image = ensure_guest_image()
    tmp = tempfile.mkdtemp(prefix="vhostd-bench-", dir="/dev/shm")
    img = os.path.join(tmp, "disk.img")
    fill_image(img)
    procs, socks = {}, {}
    rows = []
    try:
        for b in backends:
            if b == "emulated":
                socks[b] = emulated(img)
            else:
                procs[b], socks[b] = (start_vhostd if b == "vhostd" else start_qsd)(tmp, img)
        runs = {b: [] for b in backends}
        for i in range(args.runs):
            order = backends[i % len(backends):] + backends[:i % len(backends)]
            for b in order:
                r = migrate_once(tmp, f"{b}{i}", socks[b], args.memory, image, args.bandwidth)
                runs[b].append(r)
                print(f"run {i} {b:<6} total {r['total_ms']:>6} ms  downtime {r['downtime_ms']:>4} ms  "
                      f"setup {r['setup_ms']:>3} ms  sent {r['transferred_mib']:.0f} MiB  "
                      f"syncs {r['dirty_syncs']}"
                      + ("" if r["guest_ok"] else f"  GUEST FAILED AFTERWARDS: {r['guest_error']}"),
                      flush=True)
                if not r["guest_ok"]:
                    crash = os.path.join(tempfile.gettempdir(), f"vhostd-migration-{b}{i}-console.log")
                    with open(crash, "w") as f:
                        f.write(r["console"])
                    print(f"    (destination console tail saved to {crash})", flush=True)
        print(f"\n{'migration, ' + args.memory + ' guest':<26} " + " ".join(f"{b:>10}" for b in backends)
              + ("   vhostd/qsd (spread)" if {"vhostd", "qsd"} <= set(backends) else ""))
        for key, label in (("total_ms", "total time ms"), ("downtime_ms", "downtime ms")):
            med = {b: median([r[key] for r in runs[b]]) for b in backends}
            line = f"{label:<26} " + " ".join(f"{med[b]:>10.0f}" for b in backends)
            row = {"workload": f"migration {label}", **{b: med[b] for b in backends},
                   "runs": {b: [r[key] for r in runs[b]] for b in backends}}
            if {"vhostd", "qsd"} <= set(backends):
                ratio, lo, hi = ratio_spread(row["runs"]["vhostd"], row["runs"]["qsd"])
                row.update(ratio=ratio, ratio_min=lo, ratio_max=hi)
                line += f"   {ratio:.2f} ({lo:.2f}-{hi:.2f})"
            rows.append(row)
            print(line, flush=True)
        ok = {b: sum(r["guest_ok"] for r in runs[b]) for b in backends}
        print(f"{'guest alive afterwards':<26} " + " ".join(f"{f'{ok[b]}/{args.runs}':>10}" for b in backends),
              flush=True)
        rows.append({"workload": "migration guest alive afterwards", **ok, "runs_total": args.runs})
    finally:
        for p in procs.values():
            stop(p)
    if not args.no_save and {"vhostd", "qsd"} <= set(backends):
        cmd = (f"python3 benchmarks/migration.py --runs {args.runs} --memory {args.memory} "
               f"--bandwidth {args.bandwidth} --backends {','.join(backends)}")
        print("saved", save_results("migration", cmd, rows))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
