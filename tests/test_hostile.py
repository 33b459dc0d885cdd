"""A hostile guest and a hostile front-end against the real daemon.

For every ring-level attack: the daemon lives, the queue is marked broken
(NEEDS_RESET in GET_STATUS, the vring err eventfd fires), the log says so in
exactly one line, another device in the same daemon keeps serving I/O all
along, and a new session on the attacked device works.  Message-level
attacks cost the attacker its connection (one log line), never an fd leak.
"""

from __future__ import annotations

import array
import os
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import (
    BLK_S_OK,
    STATUS_NEEDS_RESET,
    Guest,
    blk_roundtrip,
    connect_frontend,
    readable,
    wait_broken,
    wait_until,
)
from virtio_driver import (
    BLK_T_IN,
    BLK_T_OUT,
    DESC_F_INDIRECT as IND,
    DESC_F_NEXT as NEXT,
    DESC_F_WRITE as WRITE,
    EVENT_F_DESC,
    PACKED_F_AVAIL,
    PACKED_F_USED,
    BlkDriver,
    GuestMemory,
    PackedQueue,
    SplitQueue,
    Used,
    blk_header,
)
from vhostd.frontend import BackendError, Frontend
from vhostd.protocol.codec import MemoryRegion, pack_memory_table, pack_u64
from vhostd.protocol.constants import FLAG_NEED_REPLY, FLAG_REPLY, VERSION, Request as R

F_INDIRECT = 28
MEM = 16 << 20
RING = 256  # victim queue_size: also the chain limit


@pytest.fixture(scope="module")
def vd(module_vhostd_factory):
    return module_vhostd_factory(
        [{"name": "victim", "size": "1M", "queue_size": RING}, {"name": "bystander", "size": "1M"}],
        daemon={"workers": 2},
    )


@pytest.fixture(scope="module")
def bystander(vd):
    """A well-behaved session on another device, connected for the whole
    module; check() does verified I/O on it."""
    g = vd.connect("bystander", mem_size=4 << 20)
    drv = g.blk(0, size=64)
    rng = random.Random(1)

    def check() -> None:
        for _ in range(2):
            blk_roundtrip(vd, drv, rng.randrange(0, 2048 - 8), 4096, "bystander")

    check()
    yield check
    check()
    g.close()


@pytest.fixture
def victim(vd, bystander):
    """Sessions on the attacked device.  At teardown: the daemon is alive,
    the bystander still works, and a fresh session on the victim works."""
    opened: list[Guest] = []

    def make(**kw) -> Guest:
        g = vd.connect("victim", **kw)
        opened.append(g)
        return g

    yield make
    for g in opened:
        g.close()
    vd.assert_alive()
    bystander()
    fresh = vd.connect("victim")
    try:
        assert fresh.status() == 0
        blk_roundtrip(vd, fresh.blk(0), 3, 4096, "victim")
    finally:
        fresh.close()


def assert_closed_by_daemon(fe: Frontend, timeout: float = 5.0) -> None:
    fe.sock.settimeout(timeout)
    try:
        while fe.sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else [])


# ====================================================================== ring-level attacks


@dataclass
class Attack:
    name: str
    build: Callable[[Guest, SplitQueue | PackedQueue], None]  # write the bad descriptors and publish (no kick)
    log: str  # what the one log line must say
    features: int | None = None
    layout: list | None = None
    arena: int = 1 << 20


def hdr(q: SplitQueue | PackedQueue, kind: int = BLK_T_IN, sector: int = 0) -> int:
    a = q.buffer(16)
    q.mem.write(a, blk_header(kind, sector))
    return a


def single(addr: int, length: int, flags: int, nxt: int = 0):
    def build(g, q):
        q.write_desc(0, addr, length, flags, nxt)
        q.publish(0, kick=False)

    return build


def loop(g, q):
    h = hdr(q)
    q.write_desc(0, h, 16, NEXT, 1)
    q.write_desc(1, h, 16, NEXT, 0)
    q.publish(0, kick=False)


def self_loop(g, q):
    q.write_desc(7, hdr(q), 16, NEXT, 7)
    q.publish(7, kick=False)


def long_via_indirect(g, q):
    """200 direct descriptors ending in an indirect table of 100: 301 > 256."""
    h = hdr(q)
    table = q.buffer(100 * 16)
    for i in range(100):
        q.write_desc(i, h, 16, NEXT if i < 99 else 0, i + 1, table=table)
    for i in range(200):
        q.write_desc(i, h, 16, NEXT, i + 1)
    q.write_desc(200, table, 1600, IND)
    q.publish(0, kick=False)


def indirect(entries: list[tuple[int, int, int, int]] | None = None, length: int | None = None,
             addr: int | None = None, flags: int = IND):
    def build(g, q):
        h = hdr(q)
        ents = entries if entries is not None else [(h, 16, NEXT, 1), (q.buffer(1), 1, WRITE, 0)]
        table = q.buffer(16 * max(len(ents), 1) + 64)
        for i, (a, n, f, nx) in enumerate(ents):
            q.write_desc(i, h if a == -1 else a, n, f, nx, table=table)
        q.write_desc(0, table if addr is None else addr, 16 * len(ents) if length is None else length, flags, 1)
        q.write_desc(1, q.buffer(1), 1, WRITE)
        q.publish(0, kick=False)

    return build


def too_many_pieces(g, q):
    """A chain within the descriptor limit whose buffers each span all 8
    memory regions: more host iovecs than the device handles."""
    q.write_desc(0, hdr(q), 16, NEXT, 1)
    for i in range(1, 141):
        q.write_desc(i, 0x8000, 7 * PIECE - 0x8000 + 0x1000, NEXT | WRITE, i + 1)
    q.write_desc(141, q.buffer(1), 1, WRITE)
    q.publish(0, kick=False)


PIECE = 64 << 10


def readable_after_writable(g, q):
    q.write_desc(0, hdr(q), 16, NEXT, 1)
    q.write_desc(1, q.buffer(512), 512, NEXT | WRITE, 2)
    q.write_desc(2, q.buffer(16), 16, NEXT, 3)
    q.write_desc(3, q.buffer(1), 1, WRITE)
    q.publish(0, kick=False)


def head_twice(g, q):
    """A read chain made available twice in one burst: the second time, its
    request is still in flight (the disk has not answered yet)."""
    q.write_desc(0, hdr(q), 16, NEXT, 1)
    q.write_desc(1, q.buffer(4096), 4096, NEXT | WRITE, 2)
    q.write_desc(2, q.buffer(1), 1, WRITE)
    q.publish(0, kick=False)
    q.publish(0, kick=False)


def avail_jump(g, q):
    q.set_avail_idx((q.avail_idx + RING + 1) & 0xFFFF)


def avail_backwards(g, q):
    q.set_avail_idx((q.avail_idx - 1) & 0xFFFF)


def head(value: int):
    def build(g, q):
        q.publish(value, kick=False)

    return build


ATTACKS = [
    Attack("loop", loop, r"chain at head 0 is longer than 256 \(loop\?\)"),
    Attack("self-loop", self_loop, r"chain at head 7 is longer than 256"),
    Attack("longer-than-limit", long_via_indirect, r"chain at head 0 is longer than 256"),
    Attack("head-out-of-range", head(RING), r"avail ring names descriptor 256, ring size is 256"),
    Attack("head-0xffff", head(0xFFFF), r"avail ring names descriptor 65535"),
    Attack("next-out-of-range", single(0x1000, 16, NEXT, RING), r"descriptor next 256 is beyond its table of 256"),
    Attack("indirect-next-out-of-range", indirect([(-1, 16, NEXT, 2), (0x2000, 1, WRITE, 0)]),
           r"descriptor next 2 is beyond its table of 2"),
    Attack("indirect-in-indirect", indirect([(-1, 16, NEXT, 1), (0x2000, 32, IND, 0)]), r"nested indirect"),
    Attack("indirect-with-next", indirect(flags=IND | NEXT), r"indirect descriptor with NEXT set"),
    Attack("indirect-ragged", indirect(length=24), r"indirect table of 24 bytes .* empty, ragged or too long"),
    Attack("indirect-empty", indirect(length=0), r"indirect table of 0 bytes"),
    Attack("indirect-too-long", indirect(length=16 * (RING + 1)), r"indirect table of 4112 bytes"),
    Attack("indirect-outside", indirect(addr=1 << 40, length=64), r"indirect table 0x10000000000\+64 .* outside"),
    Attack("indirect-straddles-end", indirect(addr=MEM - 32, length=64), r"indirect table 0xffffe0\+64 .* outside"),
    Attack("indirect-not-negotiated", indirect(), r"INDIRECT_DESC was not negotiated", features=~(1 << F_INDIRECT)),
    Attack("buffer-outside", single(1 << 40, 512, WRITE), r"buffer 0x10000000000\+512 at head 0 is outside"),
    Attack("buffer-in-a-gap", single(12 << 20, 512, 0), r"buffer 0xc00000\+512 .* outside",
           layout=[(0, 8 << 20), (16 << 20, 8 << 20)]),
    Attack("buffer-past-the-end", single(MEM - 256, 512, WRITE), r"buffer 0xffff00\+512 .* outside"),
    Attack("addr-len-overflow", single(2**64 - 256, 512, 0), r"buffer 0xffffffffffffff00\+512 .* outside"),
    Attack("len-4g", single(0x1000, 0xFFFFFFFF, WRITE), r"buffer 0x1000\+4294967295 .* outside"),
    Attack("readable-after-writable", readable_after_writable, r"readable descriptor after a writable one"),
    Attack("too-many-pieces", too_many_pieces, r"chain at head 0 spans more than 1088 pieces of guest memory",
           layout=[(i * PIECE, PIECE) for i in range(8)], arena=16 << 10),
    Attack("head-twice-in-a-burst", head_twice, r"descriptor 0 was made available again while its request is pending"),
    Attack("avail-jump", avail_jump, r"avail index jumped from \d+ to \d+, more than the ring size 256"),
    Attack("avail-backwards", avail_backwards, r"avail index jumped"),
]


def assert_broken_once(vd, g: Guest, q: SplitQueue | PackedQueue, mark: int, pattern: str, check_ring: bool = True) -> None:
    wait_broken(q)
    assert g.status() & STATUS_NEEDS_RESET
    (line,) = vd.wait_log(mark, r"victim: queue 0 marked NEEDS_RESET")
    assert re.search(pattern, line), line
    # broken stays broken, and quiet: more kicks are neither served nor logged again
    used = q.used_idx() if check_ring else None
    for _ in range(3):
        q.notify()
    time.sleep(0.05)
    if check_ring:
        assert q.used_idx() == used
    assert len(vd.log_lines(mark, r"NEEDS_RESET")) == 1
    assert not readable(q.err, 0)
    assert g.status() & STATUS_NEEDS_RESET


def attack_ring(vd, victim, bystander, attack, packed: bool) -> None:
    """The victim's ring works, then the attack: NEEDS_RESET once, one log
    line, and the bystander device works before and after."""
    g = victim(features=attack.features, layout=attack.layout, packed=packed)
    q = g.queue(0, size=RING, arena=attack.arena)
    assert isinstance(q, PackedQueue) == packed
    drv = BlkDriver(q)
    blk_roundtrip(vd, drv, 1, 4096, "victim")  # it works until the attack
    mark = vd.log_mark()
    attack.build(g, q)
    bystander()
    q.notify()
    assert_broken_once(vd, g, q, mark, attack.log)
    bystander()


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_bad_ring(vd, victim, bystander, attack):
    attack_ring(vd, victim, bystander, attack, packed=False)


def test_many_bad_requests_give_one_line(vd, victim, bystander):
    g = victim()
    q = g.queue(0, size=RING)
    mark = vd.log_mark()
    for _ in range(20):
        q.publish(RING + 5, kick=False)
    for _ in range(10):
        q.notify()
        time.sleep(0.002)
    assert_broken_once(vd, g, q, mark, r"names descriptor 261")


def test_error_is_logged_even_if_the_front_end_leaves_at_once(vd, victim):
    """The break and the disconnect race in the daemon's event loop (the
    error wake-up and the EOF arrive together); the line must not be lost."""
    for attempt in range(20):
        g = victim()
        q = g.queue(0, size=16)
        mark = vd.log_mark()
        q.publish(99)
        assert readable(q.err, 5)  # it broke ...
        g.close()  # ... and the front-end is gone at once
        vd.wait_log(mark, r"victim: queue 0 marked NEEDS_RESET: queue 0: avail ring names descriptor 99")


# ---------------------------------------------------------------------- packed rings (2.8)


def p_chain(*descs, buf_id: int | None = None, ids: list[int] | None = None, twice: bool = False):
    """A packed chain of (addr, len, flags) made available (no kick); addr
    None: a read header.  twice: the same buffer id again right behind it."""
    def build(g, q: PackedQueue):
        chain = [(hdr(q) if a is None else a, n, f) for a, n, f in descs]
        bid = q.post(chain, buf_id, ids=ids, kick=False)
        if twice:
            q.post(chain, bid, kick=False)

    return build


def p_whole_ring(g, q: PackedQueue):
    """Every descriptor of the ring says NEXT: a chain longer than the ring."""
    q.post([(hdr(q), 16, NEXT)] * q.size, kick=False)


def p_long_via_indirect(g, q: PackedQueue):
    """200 direct descriptors ending in an indirect table of 100: 300 > 256."""
    h = hdr(q)
    table = q.buffer(100 * 16)
    for i in range(100):
        q.write_desc(i, h, 16, 0, table=table)
    q.post([(h, 16, NEXT)] * 200 + [(table, 1600, IND)], kick=False)


def p_indirect(entries: list[tuple[int | None, int, int]] | None = None, length: int | None = None,
               addr: int | None = None, flags: int = IND):
    """A packed chain of one indirect descriptor (table entries read in order, no NEXT needed)."""
    def build(g, q: PackedQueue):
        ents = entries if entries is not None else [(None, 16, 0), (q.buffer(1), 1, WRITE)]
        table = q.buffer(16 * max(len(ents), 1) + 64)
        for i, (a, n, f) in enumerate(ents):
            q.write_desc(i, hdr(q) if a is None else a, n, f, table=table)
        q.post([(table if addr is None else addr, 16 * len(ents) if length is None else length, flags)], kick=False)

    return build


def p_too_many_pieces(g, q: PackedQueue):
    """Within the descriptor limit, but each buffer spans all 8 memory regions."""
    q.post([(hdr(q), 16, NEXT)] + [(0x8000, 7 * PIECE - 0x8000 + 0x1000, NEXT | WRITE)] * 140
           + [(q.buffer(1), 1, WRITE)], kick=False)


POS = r"at position \d+"
PACKED_ATTACKS = [
    Attack("id-out-of-range", p_chain((None, 16, NEXT), (0x2000, 1, WRITE), buf_id=RING),
           rf"buffer id 256 {POS} is beyond the ring size 256"),
    Attack("id-0xffff", p_chain((None, 16, 0), buf_id=0xFFFF), rf"buffer id 65535 {POS} is beyond"),
    Attack("id-of-the-last-descriptor", p_chain((None, 16, NEXT), (0x2000, 1, WRITE), buf_id=3, ids=[3, 4000]),
           rf"buffer id 4000 {POS} is beyond the ring size 256"),
    Attack("chain-longer-than-ring", p_whole_ring, rf"descriptor chain {POS} is longer than the ring of 256"),
    Attack("longer-than-limit", p_long_via_indirect, rf"descriptor chain {POS} is longer than 256 \(loop\?\)"),
    Attack("buffer-outside", p_chain((1 << 40, 512, WRITE)), rf"buffer 0x10000000000\+512 {POS} is outside"),
    Attack("buffer-in-a-gap", p_chain((12 << 20, 512, 0)), r"buffer 0xc00000\+512 .* outside",
           layout=[(0, 8 << 20), (16 << 20, 8 << 20)]),
    Attack("buffer-past-the-end", p_chain((None, 16, NEXT), (MEM - 256, 512, WRITE)), r"buffer 0xffff00\+512 .* outside"),
    Attack("addr-len-overflow", p_chain((2**64 - 256, 512, 0)), r"buffer 0xffffffffffffff00\+512 .* outside"),
    Attack("len-4g", p_chain((0x1000, 0xFFFFFFFF, WRITE)), r"buffer 0x1000\+4294967295 .* outside"),
    Attack("readable-after-writable", p_chain((None, 16, NEXT), (0x2000, 512, NEXT | WRITE), (0x3000, 16, NEXT),
                                              (0x4000, 1, WRITE)), rf"readable descriptor after a writable one {POS}"),
    Attack("indirect-in-indirect", p_indirect([(None, 16, 0), (0x2000, 32, IND)]), rf"nested indirect descriptor table {POS}"),
    Attack("indirect-with-next", p_indirect(flags=IND | NEXT), rf"indirect descriptor with NEXT set {POS}"),
    Attack("indirect-ragged", p_indirect(length=24), rf"indirect table of 24 bytes {POS} is empty, ragged or too long"),
    Attack("indirect-empty", p_indirect(length=0), r"indirect table of 0 bytes"),
    Attack("indirect-too-long", p_indirect(length=16 * (RING + 1)), r"indirect table of 4112 bytes"),
    Attack("indirect-outside", p_indirect(addr=1 << 40, length=64), r"indirect table 0x10000000000\+64 .* outside"),
    Attack("indirect-not-negotiated", p_indirect(), r"INDIRECT_DESC was not negotiated", features=~(1 << F_INDIRECT)),
    Attack("too-many-pieces", p_too_many_pieces, rf"chain {POS} spans more than 1088 pieces of guest memory",
           layout=[(i * PIECE, PIECE) for i in range(8)], arena=16 << 10),
    Attack("id-twice-in-a-burst", p_chain((None, 16, NEXT), (0x100000, 4096, NEXT | WRITE), (0x2000, 1, WRITE),
                                          twice=True), r"buffer id \d+ was made available again while its request is pending"),
]


@pytest.mark.parametrize("attack", PACKED_ATTACKS, ids=[a.name for a in PACKED_ATTACKS])
def test_bad_packed_ring(vd, victim, bystander, attack):
    attack_ring(vd, victim, bystander, attack, packed=True)


def test_packed_chain_at_the_end_of_the_ring_wraps_to_its_start(vd, victim):
    """Not an attack: a chain may run over the end of the ring (its last
    descriptors are those of the next lap), and an indirect one right at
    the last slot is fine too."""
    g = victim(packed=True)
    q = g.queue(0, size=16)
    drv = BlkDriver(q)
    for i in range(2):
        blk_roundtrip(vd, drv, i, 4096, "victim")  # 4 requests of 3 descriptors
    assert q.next_avail == 12
    data = os.urandom(2048)
    assert drv.write(40, data, split=512) == BLK_S_OK  # 6 descriptors: 12-15 and 0-1
    assert (q.next_avail, q.avail_wrap, q.last_used, q.used_wrap) == (2, 0, 2, 0)
    assert drv.read(40, 2048, indirect=True) == (BLK_S_OK, data)
    assert g.status() == 0


def test_packed_descriptors_that_are_not_available_are_left_alone(vd, victim):
    """Flags that do not say available in the device's lap (AVAIL == USED, or
    the other lap's bits) are not a chain: nothing is taken, nothing breaks,
    until the driver really makes it available."""
    g = victim(packed=True)
    q = g.queue(0, size=16)
    h = hdr(q, BLK_T_IN, 0)
    status = q.buffer(1)
    q.mem.write(status, b"\xee")
    for flags in (0, PACKED_F_AVAIL | PACKED_F_USED, PACKED_F_USED):  # wrap counter 1: only AVAIL alone says yes
        q.write_desc(0, h, 16, NEXT | flags, 7)
        q.write_desc(1, status, 1, WRITE | PACKED_F_AVAIL, 7)
        q.notify()
        time.sleep(0.02)
        # untouched: no used descriptor over it, no status written
        assert q.read_desc(0) == (h, 16, 7, NEXT | flags) and q.mem.read(status, 1) == b"\xee"
        assert not readable(q.err, 0) and g.status() == 0
    q.write_desc(0, h, 16, NEXT | PACKED_F_AVAIL, 7)
    q.ndesc[7], q.chains[7] = 2, [7]
    q.free.remove(7)
    q.notify()
    assert q.wait_used(1) == [Used(7, 1)] and q.mem.read(status, 1)[0] == BLK_S_OK


# ---------------------------------------------------------------------- rings outside memory


@pytest.mark.parametrize(
    "where, log",
    [
        ("desc+8", r"misaligned"),
        ("avail+1", r"misaligned"),
        ("used+2", r"misaligned"),
        ("outside", r"rings .* are not inside guest memory"),
        ("straddle", r"rings .* are not inside guest memory"),
    ],
)
def test_bad_ring_addresses_are_refused(vd, victim, bystander, where, log):
    g = victim()
    q = SplitQueue(g.mem, 128, arena=4096)
    desc, avail, used = q.uva(q.desc), q.uva(q.avail), q.uva(q.used)
    if where == "desc+8":
        desc += 8
    elif where == "avail+1":
        avail += 1
    elif where == "used+2":
        used += 2
    elif where == "outside":
        desc = 1 << 46
    else:  # the descriptor table runs past the end of guest memory
        desc = g.mem.regions[0].user_addr + MEM - 16 * 128 + 16
    mark = vd.log_mark()
    g.fe.set_vring_num(0, 128)
    g.fe.set_vring_addr(0, desc, used, avail)
    with pytest.raises(BackendError):
        g.fe.set_vring_kick(0, q.kick)
    (line,) = vd.wait_log(mark, r"victim: SET_VRING_KICK refused")
    assert re.search(log, line), line
    q.close()
    bystander()
    # the same session can still set the ring up properly
    blk_roundtrip(vd, g.blk(0), 5, 4096, "victim")


def test_moving_a_running_ring_outside_memory_is_refused(vd, victim):
    g = victim()
    q = g.queue(0)
    mark = vd.log_mark()
    with pytest.raises(BackendError):
        g.fe.set_vring_addr(0, 1 << 46, q.uva(q.used), q.uva(q.avail))
    vd.wait_log(mark, r"SET_VRING_ADDR refused: .*not inside guest memory")
    BlkDriver(q).submit(BLK_T_IN, 0, in_len=512)
    time.sleep(0.05)
    assert q.used_idx() == 0  # the queue stopped; the daemon did not touch a bad pointer


def test_removing_the_region_under_a_running_ring(vd, victim, bystander):
    g = victim()
    extra = GuestMemory([(64 << 20, 1 << 20)])
    try:
        fd = os.dup(extra.fd)
        try:
            g.fe.add_mem_region(extra.regions[0], fd)
        finally:
            os.close(fd)
        q = SplitQueue(extra, 64, arena=64 << 10)
        q.err = g.eventfd()
        g.fe.set_vring_err(0, q.err)
        q.attach(g.fe, 0)
        drv = BlkDriver(q)
        assert drv.read(0, 512)[0] == BLK_S_OK
        mark = vd.log_mark()
        g.fe.remove_mem_region(extra.regions[0])
        assert_broken_once(vd, g, q, mark, r"not inside guest memory .*after a memory table change")
        q.close()
    finally:
        extra.close()


def test_new_mem_table_without_the_ring(vd, victim):
    g = victim()
    q = g.queue(0)
    other = GuestMemory([(32 << 20, 1 << 20)])
    try:
        mark = vd.log_mark()
        other.give_to(g.fe)
        assert_broken_once(vd, g, q, mark, r"after a memory table change")
    finally:
        other.close()


def test_memfd_truncated_under_the_daemon(vd, victim, bystander):
    """Touching pages the front-end cut off raises SIGBUS in the worker; the
    guard turns it into a broken queue instead of a dead daemon."""
    g = victim()
    q = g.queue(0, size=64)
    blk_roundtrip(vd, BlkDriver(q), 1, 512)
    q.add([blk_header(BLK_T_IN, 0)], [513], kick=False)
    mark = vd.log_mark()
    os.ftruncate(g.mem.fd, 0)  # from here on the test must not touch g.mem either
    q.notify()
    assert_broken_once(vd, g, q, mark, r"faulted \(SIGBUS\)", check_ring=False)
    bystander()


def test_memfd_truncated_under_the_data_buffers(vd, victim, bystander):
    """Rings intact, data pages gone: the request fails, the daemon lives."""
    g = victim()
    q = g.queue(0, size=64, arena=1 << 20)
    drv = BlkDriver(q)
    keep = 2 << 20  # rings, headers and status bytes live in the first MiB
    buf = 8 << 20
    h = hdr(q, BLK_T_OUT, 0)
    status = q.buffer(1)
    q.write_desc(0, h, 16, NEXT, 1)
    q.write_desc(1, buf, 4096, NEXT, 2)
    q.write_desc(2, status, 1, WRITE)
    q.mem.write(status, b"\xff")
    os.ftruncate(g.mem.fd, keep)
    mark = vd.log_mark()
    q.publish(0)
    # pwritev from a lost page faults inside the kernel (EFAULT), not in us: an I/O error
    (u,) = q.wait_used(1)
    assert u.head == 0 and q.mem.read(status, 1)[0] == 1  # IOERR
    assert vd.log_lines(mark, "NEEDS_RESET") == []
    assert drv.read(0, 512)[0] == BLK_S_OK
    bystander()


# ---------------------------------------------------------------------- memory-table abuse


def test_memory_fd_that_cannot_be_mapped(vd, victim):
    g = victim()
    efd = g.eventfd()
    mark = vd.log_mark()
    with pytest.raises(BackendError):
        g.fe.set_mem_table([MemoryRegion(0, 1 << 20, 0x7000_0000_0000, 0)], [efd])
    vd.wait_log(mark, r"SET_MEM_TABLE refused: cannot map guest memory shared")


@pytest.mark.parametrize(
    "region, log",
    [
        (MemoryRegion(1 << 36, 0, 0x7000_0000_0000, 0), r"has size 0"),
        (MemoryRegion(2**64 - 4096, 8192, 0x7000_0000_0000, 0), r"wraps the address space"),
        (MemoryRegion(1 << 36, 4096, 2**64 - 4096, 0), r"wraps the address space"),
        (MemoryRegion(1 << 36, 4096, 0x7000_0000_0000, 2**64 - 1), r"wraps the address space"),
        (MemoryRegion(1 << 36, 4096, 0x7000_0000_0000, 1 << 40), r"the file has only"),
        (MemoryRegion(0x1000, 4096, 0x7000_0000_0000, 0), r"overlaps region gpa 0 size 0x1000000"),
    ],
)
def test_bad_regions(vd, victim, region, log):
    g = victim()
    fd = os.dup(g.mem.fd)
    mark = vd.log_mark()
    try:
        with pytest.raises(BackendError):
            g.fe.add_mem_region(region, fd)
    finally:
        os.close(fd)
    vd.wait_log(mark, rf"ADD_MEM_REG refused: .*{log}")


def test_memory_slots_run_out(vd, victim):
    g = victim()
    base = vd.memfd_mappings()
    fd = os.dup(g.mem.fd)
    try:
        for i in range(508):  # one slot is taken by SET_MEM_TABLE
            g.fe.add_mem_region(MemoryRegion((1 << 32) + i * 4096, 4096, 0x1000_0000_0000 + i * 4096, 0), fd)
        mark = vd.log_mark()
        with pytest.raises(BackendError):
            g.fe.add_mem_region(MemoryRegion(1 << 40, 4096, 0x2000_0000_0000, 0), fd)
    finally:
        os.close(fd)
    vd.wait_log(mark, r"too many memory regions \(limit 509\)")
    assert vd.memfd_mappings() == base + 508
    blk_roundtrip(vd, g.blk(0), 9, 4096, "victim")
    g.close()
    wait_until(lambda: vd.memfd_mappings() == base - 1, what="all 509 regions to be unmapped")


# ====================================================================== message-level attacks


def hostile_session(vd, send: Callable[[Frontend], None], log: str, expect_close: bool = True) -> None:
    """Run one attack on a fresh connection to the victim; the daemon must
    drop it with exactly one line matching `log` and leak no fd."""
    vd.wait_session_idle("victim")
    baseline = vd.fd_count()
    mark = vd.log_mark()
    fe, _ = connect_frontend(vd.socket("victim"))
    try:
        send(fe)
        if expect_close:
            assert_closed_by_daemon(fe)
    finally:
        fe.close()
    lines = vd.wait_log(mark, log)
    vd.wait_session_idle("victim")
    assert len(lines) == 1, lines
    # exactly one line says what went wrong
    complaints = vd.log_lines(mark, r"victim: .*(closing connection|in the middle of a message|refused|NEEDS_RESET)")
    assert complaints == lines, complaints
    assert vd.fd_count() == baseline, "the daemon leaked file descriptors"
    vd.assert_alive()


def raw(request: int, flags: int, size: int, payload: bytes = b"") -> bytes:
    return struct.pack("<III", request, flags, size) + payload


def sender(data: bytes, fds: int = 0):
    def send(fe: Frontend) -> None:
        held = [os.eventfd(0) for _ in range(fds)]
        try:
            send_fds(fe.sock, data, held)
        finally:
            for fd in held:
                os.close(fd)

    return send


# CONFIG and CONFIGURE_MEM_SLOTS (no REPLY_ACK: a refusal must close the session)
PF_ALL = raw(R.SET_PROTOCOL_FEATURES, VERSION, 8, pack_u64((1 << 9) | (1 << 15)))

MESSAGE_ATTACKS = [
    ("bad-version-0", raw(R.SET_OWNER, 0, 0), r"unsupported version 0"),
    ("bad-version-3", raw(R.SET_OWNER, 3, 0), r"unsupported version 3"),
    ("reply-flag", raw(R.SET_OWNER, VERSION | FLAG_REPLY, 0), r"unexpected reply flag"),
    ("oversize", raw(R.SET_MEM_TABLE, VERSION, 269), r"payload of 269 bytes exceeds the limit of 268"),
    ("oversize-4g", raw(R.SET_CONFIG, VERSION, 0xFFFFFFFF), r"payload of 4294967295 bytes exceeds"),
    ("short-vring-state", raw(R.SET_VRING_NUM, VERSION, 4, bytes(4)), r"vring state payload must be 8 bytes, got 4"),
    ("short-u64", raw(R.SET_FEATURES, VERSION | FLAG_NEED_REPLY, 7, bytes(7)), r"u64 payload must be 8 bytes"),
    ("long-vring-addr", raw(R.SET_VRING_ADDR, VERSION, 48, bytes(48)), r"vring address payload must be 40"),
    ("lying-table-count", raw(R.SET_MEM_TABLE, VERSION, 40, struct.pack("<II", 3, 0) + bytes(32)),
     r"memory table of 3 regions needs 104 bytes, got 40"),
    ("too-many-regions", raw(R.SET_MEM_TABLE, VERSION, 8, struct.pack("<II", 9, 0)), r"9 regions, at most 8"),
    ("lying-config-size", PF_ALL + raw(R.GET_CONFIG, VERSION, 16, struct.pack("<III", 0, 8, 0) + bytes(4)),
     r"config payload says 8 data bytes but carries 4"),
    ("short-region", PF_ALL + raw(R.ADD_MEM_REG, VERSION, 32, bytes(32)), r"memory region payload must be 40 bytes"),
    ("unknown-request", raw(0xDEAD, VERSION, 0), r"unknown request code 57005"),
]


@pytest.mark.parametrize("data, log", [(d, l) for _, d, l in MESSAGE_ATTACKS], ids=[n for n, _, _ in MESSAGE_ATTACKS])
def test_bad_message(vd, victim, bystander, data, log):
    hostile_session(vd, sender(data), log)
    bystander()


def test_bad_message_with_fds_closes_them(vd, victim):
    hostile_session(vd, sender(raw(R.SET_MEM_TABLE, VERSION, 40, struct.pack("<II", 3, 0) + bytes(32)), fds=1),
                    r"needs 104 bytes")
    table = pack_memory_table([MemoryRegion(0, 4096, 0, 0)] * 2)
    hostile_session(vd, sender(raw(R.SET_MEM_TABLE, VERSION, len(table), table), fds=3),
                    r"SET_MEM_TABLE refused: 2 regions but 3 file descriptors")


def test_unexpected_fds_with_reply_ack_are_closed(vd, victim):
    g = victim()
    baseline = vd.fd_count()
    held = [os.eventfd(0) for _ in range(8)]
    try:
        send_fds(g.fe.sock, raw(R.SET_OWNER, VERSION | FLAG_NEED_REPLY, 0), held)
    finally:
        for fd in held:
            os.close(fd)
    reply = g.fe.recv()
    assert struct.unpack("<Q", reply.payload)[0] == 1
    assert vd.fd_count() == baseline
    blk_roundtrip(vd, g.blk(0), 11, 4096, "victim")


def test_nine_fds_on_one_message(vd, victim, bystander):
    hostile_session(vd, sender(raw(R.SET_MEM_TABLE, VERSION, 8, bytes(8)), fds=9),
                    r"more than 8 file descriptors in one message")
    bystander()


def test_nine_fds_spread_over_one_message(vd, victim):
    def send(fe):
        held = [os.eventfd(0) for _ in range(9)]
        data = raw(R.SET_MEM_TABLE, VERSION, 8, bytes(8))
        try:
            send_fds(fe.sock, data[:6], held[:5])
            time.sleep(0.02)  # let the daemon read the first part on its own
            send_fds(fe.sock, data[6:], held[5:])
        finally:
            for fd in held:
                os.close(fd)

    hostile_session(vd, send, r"more than 8 file descriptors with one message")


@pytest.mark.parametrize("cut", [1, 11, 12, 20])
def test_truncated_message(vd, victim, cut):
    data = raw(R.SET_VRING_ADDR, VERSION, 40, bytes(40))[:cut]
    hostile_session(vd, sender(data), r"victim: front-end disconnected in the middle of a message",
                    expect_close=False)


def test_front_end_that_does_not_read_its_replies(vd, victim, bystander):
    def send(fe):
        burst = raw(R.GET_FEATURES, VERSION, 0) * 20000
        try:
            fe.sock.sendall(burst)
        except (BrokenPipeError, ConnectionResetError):
            pass
        time.sleep(0.05)

    hostile_session(vd, send, r"front-end is not reading its replies")
    bystander()


def test_garbage_bytes(vd, victim, bystander):
    rng = random.Random(7)
    for _ in range(5):
        hostile_session(vd, sender(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))),
                        r"victim: (closing connection|front-end disconnected in the middle)",
                        expect_close=False)
    bystander()


# ====================================================================== property tests

def examples(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@st.composite
def messages(draw):
    """A stream of vhost-user-looking messages, some well formed, some lying."""
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        request = draw(st.one_of(st.integers(0, 45), st.integers(0, 2**32 - 1)))
        flags = draw(st.sampled_from([VERSION, VERSION | FLAG_NEED_REPLY, 0, VERSION | FLAG_REPLY, 0xFFFFFFFF]))
        payload = draw(st.binary(max_size=280))
        size = draw(st.one_of(st.just(len(payload)), st.integers(0, 300), st.integers(0, 2**32 - 1)))
        out += struct.pack("<III", request, flags, size) + payload
    if draw(st.booleans()):
        out += draw(st.binary(max_size=64))
    return out


@examples(120)
@given(stream=messages(), fds=st.integers(0, 10))
def test_random_message_streams(vd, victim, bystander, stream, fds):
    vd.wait_session_idle("victim")
    baseline = vd.fd_count()
    mark = vd.log_mark()
    fe, _ = connect_frontend(vd.socket("victim"))
    try:
        held = [os.eventfd(0) for _ in range(fds)]
        try:
            send_fds(fe.sock, stream, held)
        except OSError:
            pass
        finally:
            for fd in held:
                os.close(fd)
        time.sleep(0.002)
    finally:
        fe.close()
    vd.wait_session_idle("victim")
    vd.assert_alive()
    assert "Traceback" not in vd.log_since(mark)
    assert len(vd.log_lines(mark, r"victim: closing connection")) <= 1
    assert vd.fd_count() == baseline, "the daemon leaked file descriptors"


ADDRS = [0x3000, 0x100000, 0x100200, 0x100400, 0x101000, 0x180000, MEM - 512, MEM - 16, MEM, 1 << 40, 2**64 - 512]
LENS = [0, 1, 15, 16, 17, 32, 48, 512, 513, 4096, 0xFFFFFFFF]


GOOD_ADDRS = [0x100000, 0x100200, 0x100400, 0x101000]


@st.composite
def rings(draw):
    """Descriptors that are often plausible and sometimes wild."""
    n = 16
    addr = st.one_of(st.sampled_from(GOOD_ADDRS), st.sampled_from(ADDRS), st.integers(0, 2**64 - 1))
    length = st.one_of(st.sampled_from([16, 1, 512, 4096]), st.sampled_from(LENS), st.integers(0, 2**32 - 1))
    flags = st.one_of(st.sampled_from([0, NEXT, WRITE, NEXT | WRITE]), st.integers(0, 7))
    nxt = st.one_of(st.integers(0, n - 1), st.integers(0, 0xFFFF))
    desc = [(draw(addr), draw(length), draw(flags), draw(nxt)) for _ in range(n)]
    if draw(st.booleans()):  # a well-formed chain 0 -> 1 -> ... with random buffers and contents
        k = draw(st.integers(1, 6))
        w = draw(st.integers(0, k))
        for i in range(k):
            f = (NEXT if i < k - 1 else 0) | (WRITE if i >= w else 0)
            desc[i] = (draw(st.sampled_from(GOOD_ADDRS)), draw(st.sampled_from([1, 16, 512, 1024])), f, i + 1)
    table = draw(st.lists(st.tuples(addr, length, flags, st.integers(0, 10)), max_size=8))
    heads = draw(st.lists(st.one_of(st.just(0), st.integers(0, n - 1), st.integers(0, 0xFFFF)), min_size=1,
                          max_size=4))
    extra = draw(st.one_of(st.just(0), st.integers(-3, 20)))
    data = draw(st.binary(min_size=64, max_size=64))
    return desc, table, heads, extra, data


@examples(80)
@given(ring=rings(), indirect_ok=st.booleans())
def test_random_descriptor_tables(vd, victim, bystander, ring, indirect_ok):
    """Random descriptors, indirect tables and avail entries: the queue
    either completes what was published or breaks; the daemon survives."""
    desc, table, heads, extra, data = ring
    vd.wait_session_idle("victim")
    g = vd.connect("victim", features=None if indirect_ok else ~(1 << F_INDIRECT))
    try:
        q = g.queue(0, size=16, arena=4096)  # rings and arena below 0x100000
        # the buffers the sampled addresses point at: random headers and data
        for a in (0x100000, 0x100200, 0x100400, 0x101000, 0x180000):
            g.mem.write(a, data + blk_header(BLK_T_IN, 1) + data)
        for i, (a, n, f, nx) in enumerate(table):
            q.write_desc(i, a, n, f, nx, table=0x180000)
        for i, (a, n, f, nx) in enumerate(desc):
            q.write_desc(i, a, n, f, nx)
        for h in heads:
            q.publish(h, kick=False)
        idx = (q.avail_idx + extra) & 0xFFFF
        q.set_avail_idx(idx)
        q.notify()

        def settled():
            if readable(q.err, 0):
                return "broken"
            return "done" if q.used_idx() == idx else None

        outcome = wait_until(settled, 5, what="the queue to complete or break")
        event(outcome)
        if outcome == "broken":
            assert g.status() & STATUS_NEEDS_RESET
        else:
            assert not g.status() & STATUS_NEEDS_RESET
    finally:
        g.close()
    vd.assert_alive()
    bystander()


@st.composite
def packed_rings(draw):
    """Packed descriptors that are often plausible and sometimes wild: any
    flags (the avail/used bits of either lap among them), ids and lengths."""
    n = 16
    addr = st.one_of(st.sampled_from(GOOD_ADDRS), st.sampled_from(ADDRS), st.integers(0, 2**64 - 1))
    length = st.one_of(st.sampled_from([16, 1, 512, 4096]), st.sampled_from(LENS), st.integers(0, 2**32 - 1))
    bits = st.sampled_from([PACKED_F_AVAIL, PACKED_F_AVAIL, 0, PACKED_F_USED, PACKED_F_AVAIL | PACKED_F_USED])
    flags = st.builds(lambda f, b: f | b, st.one_of(st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, IND]),
                                                    st.integers(0, 7)), bits)
    ids = st.one_of(st.integers(0, n - 1), st.integers(0, 0xFFFF))
    desc = [(draw(addr), draw(length), draw(flags), draw(ids)) for _ in range(n)]
    at = 0
    for _ in range(draw(st.integers(0, 3))):  # well-formed chains one after another, random buffers and contents
        k = draw(st.integers(1, 5))
        if at + k > n:
            break
        w = draw(st.integers(0, k))
        bid = draw(st.integers(0, n - 1))
        for i in range(k):
            f = (NEXT if i < k - 1 else 0) | (WRITE if i >= w else 0) | PACKED_F_AVAIL
            desc[at + i] = (draw(st.sampled_from(GOOD_ADDRS)), draw(st.sampled_from([1, 16, 512, 1024])), f, bid)
        at += k
    table = draw(st.lists(st.tuples(addr, length, flags, ids), max_size=8))
    data = draw(st.binary(min_size=64, max_size=64))
    return desc, table, data


@examples(60)
@given(ring=packed_rings(), indirect_ok=st.booleans())
def test_random_packed_rings(vd, victim, bystander, ring, indirect_ok):
    """Random packed descriptors and indirect tables: the device takes what
    is available in its lap and either completes it or breaks the queue
    (then NEEDS_RESET and the err eventfd agree); the daemon survives."""
    desc, table, data = ring
    vd.wait_session_idle("victim")
    g = vd.connect("victim", features=None if indirect_ok else ~(1 << F_INDIRECT), packed=True)
    try:
        q = g.queue(0, size=16, arena=4096)  # rings and arena below 0x100000
        for a in (0x100000, 0x100200, 0x100400, 0x101000, 0x180000):
            g.mem.write(a, data + blk_header(BLK_T_IN, 1) + data)
        for i, (a, n, f, bid) in enumerate(table):
            q.write_desc(i, a, n, f, bid, table=0x180000)
        for i, (a, n, f, bid) in enumerate(desc):
            q.write_desc(i, a, n, f, bid)
        sentinel = 0x7FFF  # a position the device never names in a ring of 16
        g.mem.write(q.used, struct.pack("<HH", sentinel, EVENT_F_DESC))
        q.notify()
        # the device has been round the ring once it asks for the next kick (or broke)
        wait_until(lambda: readable(q.err, 0) or q.device_event_area()[0] != sentinel, 5,
                   what="the device to look at the ring")
        broken = bool(g.status() & STATUS_NEEDS_RESET)
        event("broken" if broken else "served")
        assert readable(q.err, 1 if broken else 0) == broken
    finally:
        g.close()
    vd.assert_alive()
    bystander()


# ====================================================================== a guest that never lets go


def test_flooding_guest_does_not_starve_other_devices(vhostd_factory):
    """One data plane worker, two devices: a guest that keeps its ring full
    of 1 MiB writes must not monopolise the worker."""
    vd = vhostd_factory([{"name": "hog", "size": "8M"}, {"name": "meek", "size": "1M"}], daemon={"workers": 1})
    hog = vd.connect("hog", mem_size=8 << 20)
    meek = vd.connect("meek", mem_size=2 << 20)
    q = hog.queue(0, size=256, arena=4 << 20)
    buf, status = q.buffer(1 << 20), q.buffer(1)
    heads = []
    for i in range(256):  # 256 indirect requests in flight
        table = q.buffer(48)
        q.write_desc(0, hdr(q, BLK_T_OUT, (i % 7) * 2048), 16, NEXT, 1, table=table)
        q.write_desc(1, buf, 1 << 20, NEXT, 2, table=table)
        q.write_desc(2, status, 1, WRITE, table=table)
        q.write_desc(i, table, 48, IND)
        heads.append(i)
    stop = threading.Event()
    completed = [0]

    def flood():
        free = list(heads)
        while not stop.is_set():
            while free:
                q.publish(free.pop(), kick=False)
            q.notify()
            idx = q.used_idx()
            while q.last_used != idx:
                elem = q.used + 4 + 8 * (q.last_used % q.size)
                free.append(struct.unpack("<I", q.mem.read(elem, 4))[0])
                q.last_used = (q.last_used + 1) & 0xFFFF
                completed[0] += 1

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        wait_until(lambda: completed[0] > 100, 10, what="the flood to get going")
        drv = meek.blk(0, size=16)
        for i in range(5):
            start = time.monotonic()
            status_, _ = drv.read(i, 512)  # wait_used gives up after 5 s
            assert status_ == BLK_S_OK
            assert time.monotonic() - start < 1.0
        assert t.is_alive()  # the flood went on all along
    finally:
        stop.set()
        t.join(10)
    hog.close()
    meek.close()


def test_blocking_eventfds_cannot_hang_a_worker(vhostd_factory):
    """Kick/call/err fds the front-end made blocking, then drained or
    saturated: the worker must not block in read()/write() holding the
    queue lock (that froze the other device and even the daemon's shutdown)."""
    vd = vhostd_factory([{"name": "evil", "queues": 2}, {"name": "good"}], daemon={"workers": 1})
    good = vd.connect("good")
    gd = good.blk(0)
    g = vd.connect("evil")

    def blocking_eventfd(value: int = 0) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        g.extra_fds.append(fd)
        if value:
            os.eventfd_write(fd, value)
        return fd

    # call fd with its counter at the maximum: signalling it would block
    q0 = g.queue(0)
    g.fe.set_vring_call(0, blocking_eventfd(2**64 - 2))
    BlkDriver(q0).submit(BLK_T_IN, 0, in_len=512)
    assert len(q0.wait_used(1)) == 1
    blk_roundtrip(vd, gd, 1, 4096, "good")

    # one kick eventfd for two queues: both wake up, one finds it drained
    q1 = g.queue(1)
    kick = blocking_eventfd()
    g.fe.set_vring_kick(0, kick)
    g.fe.set_vring_kick(1, kick)
    for q in (q0, q1):
        q.add([blk_header(BLK_T_IN, 0)], [513], kick=False)
    os.eventfd_write(kick, 1)
    assert len(q0.wait_used(1)) == 1 and len(q1.wait_used(1)) == 1
    blk_roundtrip(vd, gd, 2, 4096, "good")

    # err fd saturated, then the queue breaks
    mark = vd.log_mark()
    g.fe.set_vring_err(0, blocking_eventfd(2**64 - 2))
    q0.publish(999, kick=False)
    os.eventfd_write(kick, 1)
    wait_until(lambda: g.status() & STATUS_NEEDS_RESET, what="NEEDS_RESET")
    vd.wait_log(mark, r"evil: queue 0 marked NEEDS_RESET")
    blk_roundtrip(vd, gd, 3, 4096, "good")
    g.close()  # the control plane still gets the queue locks
    good.close()


def test_disconnect_with_a_full_ring_in_flight(vd, victim, bystander):
    for _ in range(3):
        g = victim()
        q = g.queue(0, size=RING, arena=1 << 20)
        for i in range(RING // 3):  # 3 descriptors each
            q.add([blk_header(BLK_T_OUT, i), b"\x5a" * 512], [1], kick=False)
        q.notify()
        g.close()  # while the worker is still at it
        bystander()
