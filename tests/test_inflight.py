"""VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: requests are tracked in the
front-end's inflight area, and a back-end that starts on an area a crashed
one left behind redoes exactly the unfinished requests.  The crash states are
written into the area by hand (as a SIGKILL at that point would leave them);
tests/test_qemu_reconnect.py does the real thing with QEMU."""

from __future__ import annotations

import mmap
import os
import random
import struct
import time

import pytest

from conftest import BLK_S_OK, Guest, Vhostd, wait_broken, wait_until
from vhostd.frontend import BackendError
from vhostd.native import lib
from vhostd.protocol.codec import InflightInfo
from virtio_driver import BLK_T_GET_ID, BLK_T_OUT, BlkDriver, blk_header

QSIZE = 128


class Area:
    """The front-end's view of the inflight memfd (one queue)."""

    def __init__(self, fd: int, info: InflightInfo) -> None:
        self.fd, self.info = fd, info
        self.map = mmap.mmap(fd, info.mmap_size)

    def header(self) -> tuple[int, int, int, int]:
        return struct.unpack_from("<HHHH", self.map, 8)  # version, desc_num, last_batch_head, used_idx

    def set_header(self, **kw) -> None:
        fields = dict(zip(("version", "desc_num", "last_batch_head", "used_idx"), self.header()), **kw)
        struct.pack_into("<HHHH", self.map, 8, *fields.values())

    def entry(self, head: int) -> tuple[int, int]:
        off = 16 + 16 * head
        return self.map[off], struct.unpack_from("<Q", self.map, off + 8)[0]

    def mark(self, head: int, counter: int, inflight: int = 1) -> None:
        off = 16 + 16 * head
        struct.pack_into("<Q", self.map, off + 8, counter)
        self.map[off] = inflight

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def session(vd, guest: Guest | None, area: Area | None, qsize: int = QSIZE):
    """A (re)connecting front-end the way QEMU does it: GET_INFLIGHT_FD on
    first start, SET_INFLIGHT_FD every time, then the rings."""
    g = Guest(vd, "d0") if guest is None else guest
    if area is None:
        fd, info = g.fe.get_inflight_fd(1, qsize)
        assert info.mmap_size == lib.vd_inflight_queue_bytes(qsize) and info.num_queues == 1
        area = Area(fd, info)
    g.fe.set_inflight_fd(area.fd, area.info)
    return g, area


def reconnect(vd, g: Guest) -> Guest:
    """A new front-end on the same guest memory and rings (QEMU after the back-end restarted)."""
    g.fe.close()
    vd.wait_session_idle("d0")
    g2 = Guest(vd, "d0", handshake=False)
    g2.fe.set_owner()
    g2.fe.set_protocol_features(g2.fe.get_protocol_features())
    g2.fe.set_features(g.features)
    g2.features = g.features
    g2.mem = g.mem
    g.mem.give_to(g2.fe)
    return g2


def write_chain(q, sector: int, fill: int, kick: bool) -> int:
    head, _ = q.add([blk_header(BLK_T_OUT, sector), bytes([fill]) * 4096], [1], kick=kick)
    return head


def test_requests_are_tracked_then_forgotten(vhostd_factory):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g, area = session(vd, None, None)
    q = g.queue(0, size=QSIZE)
    heads = [write_chain(q, 8 * i, i + 1, True) for i in range(10)]
    assert {u.head for u in q.wait_used(10)} == set(heads)
    version, num, last, used_idx = area.header()
    assert (version, num, used_idx) == (1, QSIZE, 10) and last in heads
    assert all(area.entry(h)[0] == 0 and area.entry(h)[1] > 0 for h in heads)
    assert "inflight tracking: new area" in vd.log()
    g.close()
    area.close()


def test_restart_redoes_exactly_the_unfinished_requests(vhostd_factory):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g, area = session(vd, None, None)
    q = g.queue(0, size=QSIZE)
    write_chain(q, 0, 0xAA, True)
    q.wait_used(1)
    # The guest publishes three writes; the back-end "took" them and died.
    pending = [write_chain(q, 8 * (i + 1), 0x10 + i, False) for i in range(3)]
    for n, head in enumerate(pending):
        area.mark(head, counter=100 + n)
    g2 = reconnect(vd, g)
    session(vd, g2, area)
    mark = vd.log_mark()
    saved, q.avail_idx = q.avail_idx, 1  # QEMU restores last_avail to the used index after a crash
    q.attach(g2.fe, 0)
    q.avail_idx = saved
    used = q.wait_used(3)
    assert [u.head for u in used] == pending  # oldest first, each exactly once
    vd.wait_log(mark, r"queue 0: redoing 3 request\(s\) a previous vhostd took")
    assert struct.unpack_from("<H", bytes(g.mem.read(q.used + 2, 2)))[0] == 4
    for i in range(3):
        assert vd.read_image("d0", 8 * (i + 1) * 512, 4096) == bytes([0x10 + i]) * 4096
    assert all(area.entry(h)[0] == 0 for h in pending) and area.header()[3] == 4
    # and the ring goes on normally afterwards
    h = write_chain(q, 64, 0x55, True)
    assert q.wait_used(1)[0].head == h
    g2.close()
    g.queues.clear()
    area.close()


def test_death_between_completion_and_forgetting(vhostd_factory):
    """The used index already counts a request its flag still calls in
    flight: recovery clears it through last_batch_head instead of redoing it."""
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g, area = session(vd, None, None)
    q = g.queue(0, size=QSIZE)
    heads = [write_chain(q, 8 * i, i + 1, True) for i in range(2)]
    q.wait_used(2)
    area.mark(heads[1], counter=7)
    area.set_header(last_batch_head=heads[1], used_idx=1)
    g2 = reconnect(vd, g)
    session(vd, g2, area)
    saved, q.avail_idx = q.avail_idx, 2
    q.attach(g2.fe, 0)
    q.avail_idx = saved
    h = write_chain(q, 80, 9, True)
    assert [u.head for u in q.wait_used(1)] == [h]  # nothing redone before it
    assert area.entry(heads[1])[0] == 0 and area.header()[3] == 3
    g2.close()
    g.queues.clear()
    area.close()


def test_hostile_areas(vhostd_factory):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}, {"name": "d1", "size": "4M"}])
    g, area = session(vd, None, None)
    bad = [InflightInfo(area.info.mmap_size, 0, 0, QSIZE), InflightInfo(area.info.mmap_size, 0, 5, QSIZE),
           InflightInfo(area.info.mmap_size, 0, 1, 100), InflightInfo(16, 0, 1, QSIZE),
           InflightInfo(area.info.mmap_size, 100, 1, QSIZE), InflightInfo(1 << 40, 0, 1, QSIZE)]
    for info in bad:
        with pytest.raises(BackendError):
            g.fe.set_inflight_fd(area.fd, info)
    # An area that does not match the ring breaks that queue only, with one clear line.
    area.set_header(version=1, desc_num=64)
    mark = vd.log_mark()
    g.fe.set_inflight_fd(area.fd, area.info)
    q = g.queue(0, size=QSIZE)
    wait_broken(q)
    vd.wait_log(mark, r"d0: .*inflight region has version 1 for 64 descriptors; the ring has 128")
    area.set_header(version=1, desc_num=QSIZE, last_batch_head=4000, used_idx=9)
    g.close()
    other = Guest(vd, "d1")
    from conftest import blk_roundtrip

    blk_roundtrip(vd, other.blk(), 0, name="d1")
    other.close()
    g2 = Guest(vd, "d0")
    g2.fe.set_inflight_fd(area.fd, area.info)
    mark = vd.log_mark()
    q2 = g2.queue(0, size=QSIZE)
    wait_broken(q2)
    vd.wait_log(mark, r"inflight last_batch_head 4000 is beyond the ring size 128")
    g2.close()
    area.close()
    vd.assert_alive()


def test_more_unfinished_requests_than_one_turn(vhostd_factory):
    """80 requests to redo: more than a worker serves in one turn (64)."""
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g, area = session(vd, None, None, qsize=256)
    q = g.queue(0, size=256, arena=4 << 20)
    done = write_chain(q, 0, 1, True)
    assert q.wait_used(1)[0].head == done
    pending = []
    for i in range(80):  # 3 descriptors each: 240 of 256
        pending.append(write_chain(q, 8 * (i + 1), 0x20 + i, False))
    for n, head in enumerate(pending):
        area.mark(head, counter=10 + n)
    g2 = reconnect(vd, g)
    session(vd, g2, area)
    saved, q.avail_idx = q.avail_idx, 1
    q.attach(g2.fe, 0)
    q.avail_idx = saved
    assert [u.head for u in q.wait_used(80)] == pending
    for i in range(80):
        assert vd.read_image("d0", 8 * (i + 1) * 512, 4096) == bytes([0x20 + i]) * 4096
    g2.close()
    area.close()


# ====================================================================== packed rings


class PackedArea(Area):
    """The packed layout of one queue's region (vhostd/native/inflight.c):
    features, version, desc_num, then the used position at 16 (old at 18),
    wrap counters at 20 and 21; from 32 entries of 32 bytes, each a copy of
    one descriptor of a chain taken (the chain's first entry marked inflight,
    holding its length, last entry and counter)."""

    def features(self) -> int:
        return struct.unpack_from("<Q", self.map, 0)[0]

    def used(self) -> tuple[int, int, int, int]:
        """(used position, old used position, used wrap, old used wrap)."""
        return struct.unpack_from("<HHBB", self.map, 16)

    def inflight(self) -> dict[int, tuple[int, int]]:
        """Chains marked in flight: buffer id -> (descriptors, counter)."""
        out = {}
        num = self.header()[1]
        for e in range(num):
            off = 32 + 32 * e
            if self.map[off]:
                last, n = struct.unpack_from("<HH", self.map, off + 4)
                counter = struct.unpack_from("<Q", self.map, off + 8)[0]
                (bid,) = struct.unpack_from("<H", self.map, 32 + 32 * last + 16)
                out[bid] = (n, counter)
        return out


def packed_session(vd, qsize: int = QSIZE) -> tuple[Guest, PackedArea]:
    g = Guest(vd, "d0", packed=True)
    assert g.packed
    fd, info = g.fe.get_inflight_fd(1, qsize)
    area = PackedArea(fd, info)
    g.fe.set_inflight_fd(area.fd, area.info)
    return g, area


def resume(vd, g: Guest, area: Area, q) -> Guest:
    """The restarted back-end, a new front-end session: the same memory, the
    inflight area, the ring; SET_VRING_BASE says where the driver saw the
    device's used position (the area knows better, and wins)."""
    g.fe.close()  # the killed daemon's session: never ended in its log
    g2 = Guest(vd, "d0", handshake=False)
    g2.fe.set_owner()
    g2.fe.set_protocol_features(g2.fe.get_protocol_features())
    g2.fe.set_features(g.features)
    g2.features, g2.mem = g.features, g.mem
    g.mem.give_to(g2.fe)
    g2.fe.set_inflight_fd(area.fd, area.info)
    q.attach(g2.fe, 0, base=q.last_used | q.used_wrap << 15)
    return g2


def test_packed_requests_are_tracked_then_forgotten(vhostd_factory):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g, area = packed_session(vd)
    q = g.queue(0, size=QSIZE)
    heads = [write_chain(q, 8 * i, i + 1, True) for i in range(10)]
    assert sorted(u.head for u in q.wait_used(10)) == sorted(heads)
    assert area.features() & (1 << 34) and area.header()[:2] == (1, QSIZE)
    assert area.used() == (30, 30, 1, 1)  # 10 chains of 3 descriptors
    assert area.inflight() == {}
    g.close()
    area.close()


def test_packed_sigkill_with_a_write_in_flight_redoes_it(vhostd_factory, tmp_path, sockdir, hanging_disk):
    """A packed write hangs; a request behind it completes (its used
    descriptor over the hung chain's first slot); vhostd is killed; the next
    vhostd redoes exactly the hung write from the copy in the area, its used
    descriptor where the first left off, and the ring goes on."""
    devices = [{"name": "d0", "path": hanging_disk.path, "direct": True}]
    (tmp_path / "first").mkdir()
    first = Vhostd(tmp_path / "first", sockdir, devices)
    first.start()
    try:
        g, area = packed_session(first)
        q = g.queue(0, size=QSIZE)
        drv = BlkDriver(q)
        hanging_disk.pause()
        hung, _, _ = drv.submit(BLK_T_OUT, 16, b"\x03" * 4096, split=1024)  # 6 descriptors at 0-5
        wait_until(lambda: area.inflight(), what="the write to be marked in flight")
        quick, _, _ = drv.submit(BLK_T_GET_ID, in_len=20)  # 3 at 6-8
        (used,) = q.wait_used(1)
        assert used.head == quick and (q.last_used, q.used_wrap) == (3, 1)
        assert area.inflight().keys() == {hung} and area.inflight()[hung][0] == 6
        assert area.used() == (3, 3, 1, 1)
    finally:
        first.kill()
        hanging_disk.resume()
    os.unlink(first.socket("d0"))  # stale: the next daemon binds it anew
    with open(hanging_disk.path, "r+b") as f:  # as if the hung write never reached the disk
        f.seek(16 * 512)
        f.write(bytes(4096))
    second = vhostd_factory(devices)
    g2 = resume(second, g, area, q)
    (redone,) = q.wait_used(1)
    assert redone.head == hung and (q.last_used, q.used_wrap) == (9, 1)
    with open(hanging_disk.path, "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == b"\x03" * 4096
    assert area.inflight() == {} and area.used() == (9, 9, 1, 1)
    drv.q = q
    for i in range(50):  # and on, round the ring several times
        assert drv.write(8 * i, bytes([i]) * 4096) == BLK_S_OK
    assert q.used_wrap == 0 and area.used()[0] == q.last_used
    g2.close()
    g.queues.clear()
    area.close()


def test_packed_sigkill_under_load_loses_nothing_acknowledged(tmp_path, sockdir):
    """Rounds of writes (direct, some split, some indirect) on a packed ring;
    each round the daemon is SIGKILLed while they run and started again:
    every write the driver saw completed is on the disk, every other one is
    completed by the next daemon (redone from the area, or taken from the
    ring), each exactly once."""
    devices = [{"name": "d0", "size": "16M", "direct": True}]
    vd = Vhostd(tmp_path, sockdir, devices)
    vd.start()
    rng = random.Random(17)
    g, area = packed_session(vd)
    q = g.queue(0, size=QSIZE, arena=8 << 20)
    outstanding: dict[int, tuple[int, bytes, int]] = {}  # buffer id -> (sector, data, status address)
    on_disk: dict[int, bytes] = {}
    sector, redone = 0, 0

    def collect(used) -> None:
        for u in used:
            s, data, status = outstanding.pop(u.head)
            assert q.mem.read(status, 1)[0] == BLK_S_OK and u.length == 1
            on_disk[s] = data

    try:
        for _ in range(4):
            for _ in range(rng.randrange(12, 20)):
                data = os.urandom(rng.choice([4096, 16384, 65536]))
                pieces = rng.choice([0, 4096])
                out = [blk_header(BLK_T_OUT, sector)] + ([data[i : i + pieces] for i in range(0, len(data), pieces)]
                                                       if pieces else [data])
                head, bufs = q.add(out, [1], indirect=rng.random() < 0.3, kick=False)
                q.mem.write(bufs[-1], b"\xee")
                outstanding[head] = (sector, data, bufs[-1])
                sector += len(data) // 512
            q.notify()
            wait_until(q.has_used, what="a first completion")
            vd.kill()
            collect(q.poll_used())
            redone += len(area.inflight())
            for s, data in on_disk.items():  # acknowledged: on the disk, whatever happens next
                assert vd.read_image("d0", s * 512, len(data)) == data
            os.unlink(vd.socket("d0"))  # stale: the next daemon binds it anew
            vd.start()
            g = resume(vd, g, area, q)
            collect(q.wait_used(len(outstanding), timeout=10))
            assert area.inflight() == {}
            time.sleep(0.05)
            assert q.poll_used() == [] and not q.has_used()  # nothing completed twice
        for s, data in on_disk.items():
            assert vd.read_image("d0", s * 512, len(data)) == data
        print(f"{len(on_disk)} writes, {redone} redone from the inflight area")
        assert redone, "no write was in flight at any of the kills"
        g.close(wait=False)  # the killed daemons' sessions never ended in the log
        area.close()
    finally:
        vd.finish()
