"""One tenant's misbehaviour must not slow another's I/O much: a well-behaved
front-end measures its own request rate alone, then while misbehaving peers
hammer another device of the same daemon (one data plane worker for both),
and must keep a sane fraction of it.  A ratio inside one test, not a timing
assertion on absolute speed.  Afterwards the daemon's fds and mappings are
back to the baseline and its RSS has not run away."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from conftest import BLK_S_OK, Guest
from vhostd.frontend import Frontend
from vhostd.protocol.codec import MemoryRegion, pack_memory_table
from vhostd.protocol.constants import VERSION, Request

WINDOW = 1.5


def rate(drv, seconds: float) -> float:
    n, end = 0, time.monotonic() + seconds
    data = b"\x5a" * 4096
    while time.monotonic() < end:
        assert drv.write(8 * (n % 64), data) == BLK_S_OK
        n += 1
    return n / seconds


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def hammer(vd, stop: threading.Event, counts: dict) -> None:
    sock = vd.socket("bad")
    kinds = ["garbage", "huge-size", "fd-flood", "big-table", "loop"]
    i = 0
    while not stop.is_set():
        kind = kinds[i % len(kinds)]
        i += 1
        try:
            if kind == "loop":  # a descriptor loop: the queue breaks, NEEDS_RESET, one line
                g = Guest(vd, "bad")
                q = g.queue(0, size=16)
                q.write_desc(0, 0x100000, 16, 1, 1)
                q.write_desc(1, 0x100000, 16, 1, 0)
                q.publish(0)
                time.sleep(0.01)
                g.close()
            else:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(0.05)  # the daemon may wait for the rest of a message: do not wait with it
                    s.connect(sock)
                    if kind == "garbage":
                        s.sendall(os.urandom(300))
                    elif kind == "huge-size":
                        s.sendall(struct.pack("<III", Request.SET_MEM_TABLE, VERSION, 0xFFFFFFF0) + bytes(64))
                    elif kind == "fd-flood":
                        fds = [os.eventfd(0) for _ in range(64)]
                        try:
                            s.sendmsg([struct.pack("<III", Request.SET_VRING_KICK, VERSION, 8) + bytes(8)],
                                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
                        finally:
                            for fd in fds:
                                os.close(fd)
                    try:
                        s.recv(64)
                    except socket.timeout:
                        pass
            if kind == "big-table":  # eight big (virtual) regions, then gone
                with Frontend(sock, timeout=2) as fe:
                    fe.negotiate()
                    fds = []
                    for _ in range(8):
                        fd = os.memfd_create("big", os.MFD_CLOEXEC)
                        os.ftruncate(fd, 1 << 30)
                        fds.append(fd)
                    regions = [MemoryRegion(k << 31, 1 << 30, 0x10000000000 + (k << 31), 0) for k in range(8)]
                    try:
                        fe.request(Request.SET_MEM_TABLE, pack_memory_table(regions), fds)
                    finally:
                        for fd in fds:
                            os.close(fd)
            counts[kind] = counts.get(kind, 0) + 1
        except OSError:
            counts["refused"] = counts.get("refused", 0) + 1
        except Exception:  # the front-end side may see the connection dropped mid-way
            counts["dropped"] = counts.get("dropped", 0) + 1


def test_misbehaving_peers_do_not_starve_a_good_one(vhostd_factory):
    vd = vhostd_factory([{"name": "good", "size": "4M"}, {"name": "bad", "size": "4M"}], daemon={"workers": 1})
    good = Guest(vd, "good")
    drv = good.blk(size=64)
    rate(drv, 0.3)  # warm up
    fds, rss = vd.fd_count(), rss_kib(vd.pid)
    alone = rate(drv, WINDOW)
    stop, counts = threading.Event(), {}
    t = threading.Thread(target=hammer, args=(vd, stop, counts), daemon=True)
    t.start()
    try:
        time.sleep(0.2)
        busy = rate(drv, WINDOW)
    finally:
        stop.set()
        t.join(30)
    print(f"good device: {alone:.0f} req/s alone, {busy:.0f} while hammered ({busy / alone:.2f}); {counts}")
    assert busy >= 0.25 * alone, f"{busy:.0f} req/s while hammered vs {alone:.0f} alone; {counts}"
    assert sum(counts.values()) > 10, counts
    vd.wait_session_idle("bad", timeout=10)
    assert vd.fd_count() == fds + 0, "fds not back to the baseline"
    assert vd.memfd_mappings() <= 1  # only the good front-end's memory is still mapped
    assert rss_kib(vd.pid) < rss + 64 * 1024, "RSS grew by more than 64 MiB"
    vd.assert_alive()
    assert "Traceback" not in vd.log()
    good.close()
