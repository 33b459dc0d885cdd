"""The asynchronous blk data plane: requests complete when their I/O does.

Against a disk that really hangs (tests/hanging_disk.py: nbdkit's pause
filter behind nbdfuse) and real images on this machine's ext4 and tmpfs:
out-of-order completion, no head-of-line blocking between devices of one
worker, a control plane that never waits for a disk, GET_VRING_BASE and
RESET_DEVICE that wait for the requests in flight, memory and sessions that
go away while I/O is pending, O_DIRECT with buffers the guest did not
align, the thread pool (chosen, and where seccomp forbids io_uring), and
SIGTERM / SIGKILL with I/O in flight."""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import Guest, Vhostd, wait_until
from test_inflight import Area, reconnect
from vhostd.control import request as control
from virtio_driver import (BLK_S_OK, BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT, DESC_F_NEXT, DESC_F_WRITE,
                           BlkDriver, blk_header)

BLK_T_DISCARD, BLK_T_WRITE_ZEROES = 11, 13
HERE = Path(__file__).resolve().parent


def status(vd) -> dict:
    return {d["name"]: d for d in control(str(vd.workdir / "ctl.sock"), "status", timeout=5)["devices"]}


def pending(vd, name: str, queue: int = 0) -> int:
    return status(vd)[name]["queues"][queue]["pending"]


def counters(vd, name: str, queue: int = 0) -> dict:
    return status(vd)[name]["counters"][queue]


def start(vhostd_factory, devices: list[dict], **daemon):
    vd = vhostd_factory(devices, {"control_socket": "ctl.sock", **daemon})
    wait_until(lambda: answers(vd), what="the control socket")
    return vd


def answers(vd) -> bool:
    # The socket file appears at bind(), a moment before listen(): ask.
    try:
        status(vd)
    except OSError:
        return False
    return True


def hang_device(disk, name: str = "hang", **kw) -> dict:
    return {"name": name, "path": disk.path, "direct": True, **kw}


def mapped_mib(vd, tag: str = "vhostd-test-guest") -> int:
    """MiB of guest memory the daemon has mapped (the kernel may merge
    adjacent mappings, so lines are not counted)."""
    total = 0
    with open(f"/proc/{vd.pid}/maps") as f:
        for line in f:
            if tag in line:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                total += end - start
    return total >> 20


def put_status_marks(g: Guest, bufs: list[int], mark: int = 0xEE) -> None:
    """Give status bytes a value the device never writes."""
    g.mem.write(bufs[-1], bytes([mark]))


# ------------------------------------------------------------------ ordering


def test_a_request_waiting_for_its_disk_does_not_hold_back_the_next(vhostd_factory, hanging_disk):
    vd = start(vhostd_factory, [hang_device(hanging_disk)])
    g = vd.connect("hang")
    drv = g.blk(0)
    hanging_disk.pause()
    slow, slow_bufs, _ = drv.submit(BLK_T_IN, 8, in_len=4096)
    fast, fast_bufs, _ = drv.submit(BLK_T_GET_ID, in_len=20)
    (used,) = drv.q.wait_used(1)
    assert used.head == fast and g.mem.read(fast_bufs[-1], 1)[0] == BLK_S_OK
    assert g.mem.read(fast_bufs[0], 4) == b"hang"
    time.sleep(0.2)
    assert drv.q.poll_used() == [] and pending(vd, "hang") == 1
    hanging_disk.resume()
    (used,) = drv.q.wait_used(1)
    assert used.head == slow and used.length == 4097 and g.mem.read(slow_bufs[-1], 1)[0] == BLK_S_OK
    assert pending(vd, "hang") == 0
    assert status(vd)["hang"]["aio"] == "io_uring"
    assert "kernel workers" in status(vd)["hang"]["aio_note"]  # FUSE: IOSQE_ASYNC


def test_many_requests_in_flight_complete_in_any_order_and_all_land(vhostd_factory, tmp_path):
    """A real ext4 image with O_DIRECT: 64 writes in flight at once, then 64
    reads; every byte where it belongs."""
    vd = start(vhostd_factory, [{"name": "d", "size": "16M", "direct": True}])
    g = vd.connect("d")
    drv = g.blk(0, size=256, arena=4 << 20)
    blocks = {i * 16: os.urandom(4096) for i in range(64)}
    heads = {drv.submit(BLK_T_OUT, s, data)[0]: s for s, data in blocks.items()}
    done = drv.q.wait_used(64)
    assert sorted(u.head for u in done) == sorted(heads)
    reads = {}
    for s in blocks:
        head, bufs, _ = drv.submit(BLK_T_IN, s, in_len=4096)
        reads[head] = (s, bufs)
    for u in drv.q.wait_used(64):
        s, bufs = reads[u.head]
        assert drv.q.mem.read(bufs[-1], 1)[0] == BLK_S_OK and drv.q.mem.read(bufs[0], 4096) == blocks[s]
    for s, data in blocks.items():
        assert vd.read_image("d", s * 512, 4096) == data


# ------------------------------------------------------------------ head-of-line blocking


def test_a_hung_disk_stalls_neither_its_worker_nor_the_control_plane(vhostd_factory, hanging_disk, tmp_path):
    """One worker serves a disk whose requests hang and an ordinary disk: the
    ordinary one keeps working, and status, reload and a metrics scrape
    answer while the hung one has requests in flight."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    vd = start(vhostd_factory, [hang_device(hanging_disk), {"name": "ok", "size": "8M"}], workers=1,
               metrics=f"127.0.0.1:{port}")
    gh, go = vd.connect("hang"), vd.connect("ok")
    hung, ok = gh.blk(0), go.blk(0)
    hanging_disk.pause()
    for i in range(8):
        hung.submit(BLK_T_IN, 8 * i, in_len=4096)
    wait_until(lambda: pending(vd, "hang") == 8, what="8 requests pending on the hung disk")
    for i in range(100):
        data = os.urandom(4096)
        assert ok.write(i * 8, data) == BLK_S_OK
        assert ok.read(i * 8, 4096) == (BLK_S_OK, data)
    t0 = time.monotonic()
    st = status(vd)
    took = time.monotonic() - t0
    assert st["hang"]["queues"][0]["pending"] == 8 and st["ok"]["counters"][0]["reads"] == 100
    # the driver's avail index is shown beside the back-end's: all 8 taken
    assert st["hang"]["queues"][0]["driver_avail"] == st["hang"]["queues"][0]["last_avail"] == 8
    print(f"status answered in {took * 1000:.1f} ms with 8 requests hung")
    assert control(str(vd.workdir / "ctl.sock"), "reload", timeout=5)["ok"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert b'vhostd_queue_pending{device="hang",queue="0"} 8.0' in r.read()
    assert hung.q.poll_used() == []
    hanging_disk.resume()
    assert len(hung.q.wait_used(8)) == 8


def test_the_thread_pool_keeps_a_hung_disk_to_its_share(vhostd_factory, hanging_disk):
    """aio: threads.  A hung disk with more requests than its share of the
    pool (16 threads) does not starve another thread-pool disk."""
    vd = start(vhostd_factory, [hang_device(hanging_disk, aio="threads"), {"name": "ok", "size": "8M",
                                                                          "aio": "threads"}], workers=1)
    assert status(vd)["ok"]["aio"] == "threads" and status(vd)["hang"]["aio"] == "threads"
    gh, go = vd.connect("hang"), vd.connect("ok")
    hung, ok = gh.blk(0), go.blk(0)
    hanging_disk.pause()
    for i in range(40):
        hung.submit(BLK_T_IN, 8 * i, in_len=4096)
    wait_until(lambda: pending(vd, "hang") == 40, what="40 requests pending")
    for i in range(50):
        data = os.urandom(4096)
        assert ok.write(i * 8, data) == BLK_S_OK
        assert ok.read(i * 8, 4096) == (BLK_S_OK, data)
    hanging_disk.resume()
    assert len(hung.q.wait_used(40, timeout=10)) == 40


# ------------------------------------------------------------------ waiting for the requests in flight


def test_get_vring_base_is_answered_once_the_requests_in_flight_are_done(vhostd_factory, hanging_disk):
    vd = start(vhostd_factory, [hang_device(hanging_disk)])
    g = vd.connect("hang")
    drv = g.blk(0)
    hanging_disk.pause()
    for i in range(4):
        drv.submit(BLK_T_IN, 8 * i, in_len=4096)
    wait_until(lambda: pending(vd, "hang") == 4, what="4 requests pending")
    got = {}
    asker = threading.Thread(target=lambda: got.setdefault("base", g.fe.get_vring_base(0)))
    asker.start()
    asker.join(0.5)
    assert asker.is_alive(), "GET_VRING_BASE was answered with requests still in flight"
    assert status(vd)["hang"]["connected"]  # the control plane is not held up
    hanging_disk.resume()
    asker.join(10)
    assert got["base"] == 4
    done = drv.q.poll_used()
    assert len(done) == 4  # every request before the base is complete
    g.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_get_vring_base_answers_with_the_last_completion_visible(vhostd_factory, hanging_disk, packed):
    """The completion that drains a queue wakes GET_VRING_BASE while its
    worker is still busy with other completions of the same round (here 32
    bounced 1 MiB reads on the device's other queue, one worker): the answer
    must wait for nothing, but that completion must be visible to the driver
    by then (split: the used index; packed: its used descriptor's flags), or
    it is lost to the next session."""
    vd = start(vhostd_factory, [hang_device(hanging_disk, queues=2)], workers=1)
    for _ in range(4):
        g = vd.connect("hang", packed=packed, mem_size=64 << 20)
        d0, d1 = g.blk(0, size=64), g.blk(1, size=128, arena=40 << 20)
        hanging_disk.pause()
        head, _, _ = d0.submit(BLK_T_IN, 8, in_len=4096)
        wait_until(lambda: pending(vd, "hang") == 1, what="the read pending")
        for i in range(32):
            d1.q._arena_next += 8  # buffers O_DIRECT cannot take: bounced, copied at completion
            d1.submit(BLK_T_IN, 2048 * i, in_len=1 << 20, indirect=True)
        wait_until(lambda: pending(vd, "hang", 1) == 16, what="the big reads pending")  # 16 MiB of bounce buffers
        resume = threading.Timer(0.05, hanging_disk.resume)
        resume.start()
        base = g.fe.get_vring_base(0)
        resume.join()
        assert base == (3 | 1 << 15 | 3 << 16 | 1 << 31 if packed else 1)
        assert [u.head for u in d0.q.poll_used()] == [head], "GET_VRING_BASE answered before the completion was visible"
        assert len(d1.q.wait_used(32, timeout=10)) == 32
        g.close()


def test_reset_device_waits_for_the_requests_in_flight(vhostd_factory, hanging_disk):
    vd = start(vhostd_factory, [hang_device(hanging_disk)])
    g = vd.connect("hang")
    drv = g.blk(0)
    hanging_disk.pause()
    _, bufs, _ = drv.submit(BLK_T_IN, 0, in_len=4096)
    put_status_marks(g, bufs)
    wait_until(lambda: pending(vd, "hang") == 1, what="a request pending")
    asker = threading.Thread(target=g.fe.reset_device)
    asker.start()
    asker.join(0.5)
    assert asker.is_alive()
    hanging_disk.resume()
    asker.join(10)
    assert not asker.is_alive()
    assert g.mem.read(bufs[-1], 1)[0] == BLK_S_OK  # completed before the reset was acknowledged
    g.close()


# ------------------------------------------------------------------ memory and sessions going away


def test_a_front_end_that_leaves_with_io_in_flight(vhostd_factory, hanging_disk):
    """Its requests finish without writing back, its memory stays mapped until
    they have, and the next session's requests wait for them (an old write
    must not land after a new one)."""
    vd = start(vhostd_factory, [hang_device(hanging_disk)])
    g = vd.connect("hang")
    drv = g.blk(0)
    hanging_disk.pause()
    old = []
    for i in range(3):
        _, bufs, _ = drv.submit(BLK_T_OUT, 8 * i, b"\x01" * 4096)
        put_status_marks(g, bufs)
        old.append(bufs[-1])
    wait_until(lambda: pending(vd, "hang") == 3, what="3 writes pending")
    mem, qs = g.mem, g.queues
    g.fe.close()
    vd.wait_session_idle("hang")
    assert mapped_mib(vd) == 16  # the old session's memory, kept for the writes in flight
    g2 = vd.connect("hang")
    drv2 = g2.blk(0)
    head, _, _ = drv2.submit(BLK_T_OUT, 8, b"\x02" * 4096)
    time.sleep(0.3)
    assert drv2.q.poll_used() == [], "a new write went ahead of the old session's"
    hanging_disk.resume()
    (used,) = drv2.q.wait_used(1)
    assert used.head == head
    wait_until(lambda: mapped_mib(vd) == 16, what="the old session's memory to be unmapped")
    assert all(mem.read(a, 1)[0] == 0xEE for a in old), "a request of a gone session wrote back"
    assert drv2.read(8, 4096) == (BLK_S_OK, b"\x02" * 4096)
    for q in qs:
        q.close()
    mem.close()
    g2.close()


def test_memory_regions_replaced_or_removed_stay_mapped_for_the_io_using_them(vhostd_factory, hanging_disk):
    """SET_MEM_TABLE and REM_MEM_REG while reads into that memory are in
    flight: the old mappings live until the reads are done, the data lands."""
    vd = start(vhostd_factory, [hang_device(hanging_disk)])
    data = os.urandom(8192)
    with open(hanging_disk.path, "r+b") as f:
        f.write(data)
    g = vd.connect("hang", layout=[(0, 8 << 20), (16 << 20, 1 << 20)])
    drv = g.blk(0)
    assert mapped_mib(vd) == 9
    hanging_disk.pause()
    head = drv.q.size - 1  # a chain by hand: header and status in region 0, data in region 1
    hdr, st, buf = drv.q.buffer(16), drv.q.buffer(1), (16 << 20) + 4096
    g.mem.write(hdr, blk_header(BLK_T_IN, 0))
    drv.q.write_desc(head, hdr, 16, DESC_F_NEXT, head - 1)
    drv.q.write_desc(head - 1, buf, 8192, DESC_F_WRITE | DESC_F_NEXT, head - 2)
    drv.q.write_desc(head - 2, st, 1, DESC_F_WRITE)
    drv.q.publish(head)
    wait_until(lambda: pending(vd, "hang") == 1, what="the read pending")
    g.fe.set_mem_table(g.mem.regions, g.mem.fds())  # the same memory again, as QEMU does
    assert mapped_mib(vd) == 18  # the new table and the old one, which the read uses
    g.fe.remove_mem_region(g.mem.regions[1])
    assert mapped_mib(vd) == 17  # region 1 is gone from the new table; the read still has its own
    hanging_disk.resume()
    (used,) = drv.q.wait_used(1)
    assert used.head == head and g.mem.read(st, 1)[0] == BLK_S_OK and g.mem.read(buf, 8192) == data
    wait_until(lambda: mapped_mib(vd) == 8, what="the old mappings to go")
    g.close()


def test_a_head_made_available_again_while_pending_breaks_the_queue(vhostd_factory, hanging_disk):
    vd = start(vhostd_factory, [hang_device(hanging_disk)])
    g = vd.connect("hang")
    drv = g.blk(0)
    hanging_disk.pause()
    head, _, _ = drv.submit(BLK_T_IN, 0, in_len=4096)
    wait_until(lambda: pending(vd, "hang") == 1, what="a request pending")
    mark = vd.log_mark()
    drv.q.publish(head)
    vd.wait_log(mark, r"queue 0 marked NEEDS_RESET: queue 0: descriptor \d+ was made available again while its "
                      r"request is pending")
    hanging_disk.resume()
    g.close()
    g2 = vd.connect("hang")  # the next session is served
    assert g2.blk(0).read(0, 4096)[0] == BLK_S_OK


def test_memory_cut_off_while_io_is_in_flight(vhostd_factory, hanging_disk):
    """The front-end shrinks guest memory under a pending read: the read's
    data pages and its status byte are gone by the time it completes.  The
    completion's SIGBUS breaks that queue with one line; the daemon and the
    device's other queue go on."""
    vd = start(vhostd_factory, [hang_device(hanging_disk, queues=2)])
    g = vd.connect("hang")
    drv, other = g.blk(0), g.blk(1)
    hanging_disk.pause()
    hdr, status, data = drv.q.buffer(16), 8 << 20, (8 << 20) + 4096  # rings and header in the first MiBs
    g.mem.write(hdr, blk_header(BLK_T_IN, 0))
    drv.q.write_desc(0, hdr, 16, DESC_F_NEXT, 1)
    drv.q.write_desc(1, data, 4096, DESC_F_WRITE | DESC_F_NEXT, 2)
    drv.q.write_desc(2, status, 1, DESC_F_WRITE)
    drv.q.publish(0)
    wait_until(lambda: pending(vd, "hang") == 1, what="the read pending")
    mark = vd.log_mark()
    os.ftruncate(g.mem.fd, 4 << 20)
    hanging_disk.resume()
    vd.wait_log(mark, r"queue 0 marked NEEDS_RESET: queue 0: guest memory access faulted \(SIGBUS\) completing a "
                      r"request")
    assert g.status() & 0x40  # NEEDS_RESET
    assert other.read(8, 4096)[0] == BLK_S_OK
    assert pending(vd, "hang") == 0
    g.close()


# ------------------------------------------------------------------ O_DIRECT and guest buffers


def chain(q, out: list[tuple[int, bytes]], ins: list[tuple[int, int]]) -> int:
    """A chain of buffers at the given guest addresses; returns its head."""
    ids = [q.free.pop() for _ in range(len(out) + len(ins))]
    segs = [(a, len(d), 0) for a, d in out] + [(a, n, DESC_F_WRITE) for a, n in ins]
    for a, d in out:
        q.mem.write(a, d)
    for k, (a, n, fl) in enumerate(segs):
        last = k == len(segs) - 1
        q.write_desc(ids[k], a, n, fl | (0 if last else DESC_F_NEXT), 0 if last else ids[k + 1])
    q.chains[ids[0]] = ids
    q.publish(ids[0])
    return ids[0]


def test_direct_io_with_buffers_the_guest_did_not_align(vhostd_factory):
    """O_DIRECT needs aligned buffers; a guest's may not be.  Those go through
    a bounce buffer (in 1 MiB pieces), aligned ones go straight."""
    vd = start(vhostd_factory, [{"name": "dio", "size": "16M", "direct": True}])
    g = vd.connect("dio", mem_size=32 << 20)
    q = g.blk(0).q
    hdr, st = g.mem.alloc(16), g.mem.alloc(1)
    aligned = g.mem.alloc(8192, 4096)
    odd = g.mem.alloc((3 << 20) + 4096, 4096) + 3  # 3 bytes past a page: O_DIRECT refuses it as it is
    data = os.urandom(8192)
    chain(q, [(hdr, blk_header(BLK_T_OUT, 0)), (aligned, data)], [(st, 1)])
    q.wait_used(1)
    assert g.mem.read(st, 1)[0] == BLK_S_OK and counters(vd, "dio")["bounced"] == 0
    chain(q, [(hdr, blk_header(BLK_T_IN, 0))], [(odd, 8192), (st, 1)])
    (used,) = q.wait_used(1)
    assert g.mem.read(st, 1)[0] == BLK_S_OK and used.length == 8193 and g.mem.read(odd, 8192) == data
    big = os.urandom(3 << 20)  # three bounce chunks from two odd buffers
    second = odd + (1 << 20) + 5
    chain(q, [(hdr, blk_header(BLK_T_OUT, 64)), (odd, big[: 1 << 20]), (second, big[1 << 20 :])], [(st, 1)])
    q.wait_used(1)
    assert g.mem.read(st, 1)[0] == BLK_S_OK
    assert vd.read_image("dio", 64 * 512, len(big)) == big
    g.mem.write(odd, bytes(len(big)))
    chain(q, [(hdr, blk_header(BLK_T_IN, 64))], [(odd, 1 << 20), (second, 2 << 20), (st, 1)])
    q.wait_used(1)
    assert g.mem.read(st, 1)[0] == BLK_S_OK
    assert g.mem.read(odd, 1 << 20) + g.mem.read(second, 2 << 20) == big
    assert counters(vd, "dio")["bounced"] == 3
    assert status(vd)["dio"]["block_size"] == 512  # this disk's logical blocks
    g.close()


def test_bounce_buffers_are_bounded_per_queue(vhostd_factory, hanging_disk):
    """Misaligned requests waiting for a hung disk hold at most 16 MiB of
    bounce buffers per queue; the rest wait in the ring, and all complete."""
    vd = start(vhostd_factory, [hang_device(hanging_disk)])
    g = vd.connect("hang", mem_size=64 << 20)
    q = g.blk(0, size=128).q
    hanging_disk.pause()
    bufs = []
    for i in range(20):
        hdr, st = g.mem.alloc(16), g.mem.alloc(1)
        data = g.mem.alloc((1 << 20) + 4096, 4096) + 3
        chain(q, [(hdr, blk_header(BLK_T_IN, i * 2048))], [(data, 1 << 20), (st, 1)])
        bufs.append(st)
    wait_until(lambda: pending(vd, "hang") == 16, what="16 requests pending")
    time.sleep(0.2)
    assert pending(vd, "hang") == 16
    hanging_disk.resume()
    assert len(q.wait_used(20, timeout=20)) == 20
    assert all(g.mem.read(st, 1)[0] == BLK_S_OK for st in bufs)
    assert counters(vd, "hang")["bounced"] == 20
    g.close()


# ------------------------------------------------------------------ engines


def test_each_image_gets_the_engine_its_file_system_wants(vhostd_factory, hanging_disk, tmp_path):
    shm = Path("/dev/shm") / f"vhostd-test-{os.getpid()}.img"
    try:
        vd = start(vhostd_factory, [{"name": "ext4", "size": "4M"}, {"name": "shm", "path": str(shm), "size": "4M"},
                                    hang_device(hanging_disk, name="fuse"), {"name": "null", "backend": "null",
                                                                             "size": "4M"},
                                    {"name": "pool", "size": "4M", "aio": "threads"}])
        st = status(vd)
        assert (st["ext4"]["aio"], st["ext4"]["aio_note"]) == ("io_uring", "")
        assert (st["shm"]["aio"], st["shm"]["aio_note"]) == ("inline", "image on tmpfs")
        assert (st["fuse"]["aio"], st["fuse"]["aio_note"]) == ("io_uring",
                                                               "image on fuse: requests go to kernel workers")
        assert st["null"]["aio"] == "none" and st["pool"]["aio"] == "threads"
        for name in ("ext4", "shm", "pool"):  # every kind of request on every engine
            g = vd.connect(name)
            drv = g.blk(0)
            data = os.urandom(8192)
            assert drv.write(8, data) == BLK_S_OK
            assert drv.run(BLK_T_FLUSH)[0] == BLK_S_OK
            assert drv.read(8, 8192) == (BLK_S_OK, data)
            seg = struct.pack("<QII", 8, 8, 0)
            assert drv.run(BLK_T_WRITE_ZEROES, data=seg)[0] == BLK_S_OK
            assert drv.read(8, 8192) == (BLK_S_OK, bytes(4096) + data[4096:])
            assert drv.run(BLK_T_DISCARD, data=seg)[0] == BLK_S_OK
            assert vd.read_image(name, 8 * 512, 4096) == bytes(4096)
            c = counters(vd, name)
            assert (c["writes"], c["reads"], c["flushes"], c["write_zeroes"], c["discards"], c["errors"]) == \
                (1, 2, 1, 1, 1, 0)
    finally:
        shm.unlink(missing_ok=True)


def test_where_seccomp_forbids_io_uring_the_thread_pool_serves(vhostd_factory):
    vd = vhostd_factory([{"name": "d", "size": "4M"}], {"control_socket": "ctl.sock"},
                        prefix=[sys.executable, str(HERE / "no_io_uring.py")])
    wait_until(lambda: answers(vd), what="the control socket")
    assert len(vd.log_lines(0, r"io_uring is unavailable \(io_uring_setup failed: Operation not permitted\): "
                               r"disk I/O runs on a thread pool")) == 1
    st = status(vd)["d"]
    assert st["aio"] == "threads" and "io_uring unavailable" in st["aio_note"]
    g = vd.connect("d")
    drv = g.blk(0)
    data = os.urandom(4096)
    assert drv.write(0, data) == BLK_S_OK and drv.read(0, 4096) == (BLK_S_OK, data)


# ------------------------------------------------------------------ stopping and crashing with I/O in flight


def test_sigterm_waits_for_the_requests_in_flight(vhostd_factory, hanging_disk):
    vd = start(vhostd_factory, [hang_device(hanging_disk)])
    g = vd.connect("hang")
    drv = g.blk(0)
    hanging_disk.pause()
    marks = []
    for i in range(4):
        _, bufs, _ = drv.submit(BLK_T_OUT, 8 * i, bytes([i + 1]) * 4096)
        put_status_marks(g, bufs)
        marks.append(bufs[-1])
    wait_until(lambda: pending(vd, "hang") == 4, what="4 writes pending")
    vd.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert vd.alive(), "vhostd stopped with writes in flight"
    hanging_disk.resume()
    assert vd.stop() == 0
    assert len(drv.q.poll_used()) == 4 and all(g.mem.read(a, 1)[0] == BLK_S_OK for a in marks)
    with open(hanging_disk.path, "rb") as f:
        assert [f.read(4096)[:1] for _ in range(4)] == [b"\x01", b"\x02", b"\x03", b"\x04"]
    g.close(wait=False)


def test_sigkill_with_writes_in_flight_loses_none_that_completed_and_redoes_the_rest(vhostd_factory, tmp_path,
                                                                                     sockdir, hanging_disk):
    """Inflight tracking with out-of-order completion: a request completes
    after one that hangs; vhostd is killed; the next vhostd redoes exactly the
    one that never completed."""
    devices = [hang_device(hanging_disk, name="d0")]
    (tmp_path / "first").mkdir()
    first = Vhostd(tmp_path / "first", sockdir, devices, {"control_socket": "ctl.sock"})
    first.start()
    wait_until(lambda: answers(first), what="the control socket")
    try:
        g = Guest(first, "d0")
        fd, info = g.fe.get_inflight_fd(1, 128)
        area = Area(fd, info)
        g.fe.set_inflight_fd(area.fd, area.info)
        q = g.queue(0, size=128)
        drv = BlkDriver(q)
        hanging_disk.pause()
        hung, _, _ = drv.submit(BLK_T_OUT, 16, b"\x03" * 4096)
        wait_until(lambda: pending(first, "d0") == 1, what="the write pending")
        quick, _, _ = drv.submit(BLK_T_GET_ID, in_len=20)
        (used,) = q.wait_used(1)
        assert used.head == quick
        assert area.entry(hung)[0] == 1 and area.entry(quick)[0] == 0
    finally:
        first.kill()
        hanging_disk.resume()
    with open(hanging_disk.path, "r+b") as f:  # as if the hung write never reached the disk
        f.seek(16 * 512)
        f.write(bytes(4096))
    second = start(vhostd_factory, devices)
    g2 = reconnect(second, g)
    g2.fe.set_inflight_fd(area.fd, area.info)
    saved, q.avail_idx = q.avail_idx, 1  # QEMU restores last_avail to the used index after a crash
    q.attach(g2.fe, 0)
    q.avail_idx = saved
    (redone,) = q.wait_used(1)
    assert redone.head == hung
    with open(hanging_disk.path, "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == b"\x03" * 4096
    assert area.entry(hung)[0] == 0
    g2.close()
    g.queues.clear()
    area.close()
