"""VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: requests are tracked in the
front-end's inflight area, and a back-end that starts on an area a crashed
one left behind redoes exactly the unfinished requests.  The crash states are
written into the area by hand (as a SIGKILL at that point would leave them);
tests/test_qemu_reconnect.py does the real thing with QEMU."""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from conftest import Guest, wait_broken
from vhostd.frontend import BackendError
from vhostd.native import lib
from vhostd.protocol.codec import InflightInfo
from virtio_driver import BLK_T_OUT, blk_header

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
    saved, q.avail_idx = q.avail_idx, 1  # QEMU restores last_avail to the used index after a crash
    q.attach(g2.fe, 0)
    q.avail_idx = saved
    used = q.wait_used(3)
    assert [u.head for u in used] == pending  # oldest first, each exactly once
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
