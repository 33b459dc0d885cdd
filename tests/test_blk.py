"""virtio-blk semantics through the real daemon: data lands in (and comes
from) the host image file, read back with ordinary file I/O."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time

import pytest

from conftest import BLK_S_OK, Guest, Vhostd, blk_roundtrip, eventfd_take, readable, wait_until
from virtio_driver import (
    BLK_S_IOERR,
    BLK_S_UNSUPP,
    BLK_T_DISCARD,
    BLK_T_FLUSH,
    BLK_T_GET_ID,
    BLK_T_IN,
    BLK_T_OUT,
    BLK_T_WRITE_ZEROES,
    DESC_F_NEXT,
    DESC_F_WRITE,
    AVAIL_F_NO_INTERRUPT,
    EVENT_F_DESC,
    EVENT_F_DISABLE,
    EVENT_F_ENABLE,
    USED_F_NO_NOTIFY,
    BlkDriver,
    PackedQueue,
    SplitQueue,
    blk_header,
)

DISK_SIZE = 8 << 20
CAPACITY = DISK_SIZE // 512
RO_PATTERN = bytes(range(256)) * (4096 // 256) * 64  # 256 KiB
LONG_NAME = "a-device-name-longer-than-twenty"
F_RO, F_FLUSH, F_DISCARD, F_WRITE_ZEROES, F_EVENT_IDX, F_INDIRECT = 5, 9, 13, 14, 29, 28
# Tests that run on both ring layouts: split (2.7) and packed (2.8).
layouts = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


@pytest.fixture(scope="module")
def vd(module_vhostd_factory):
    return module_vhostd_factory(
        [
            {"name": "disk", "queues": 2, "queue_size": 1024, "size": DISK_SIZE},
            {"name": "ro", "readonly": True},
            {"name": "ser", "serial": "SER-12345", "size": "1M"},
            {"name": "full", "serial": "ABCDEFGHIJKLMNOPQRST", "size": "1M"},
            {"name": LONG_NAME, "size": "1M"},
            {"name": "nodisc", "discard": False, "write_zeroes": False, "size": "1M"},
        ],
        images={"ro": RO_PATTERN},
    )


@pytest.fixture
def guest(vd):
    opened: list[Guest] = []

    def make(name: str = "disk", **kw) -> Guest:
        g = vd.connect(name, **kw)
        opened.append(g)
        return g

    yield make
    for g in opened:
        g.close()
    vd.assert_alive()


def run_chain(q: SplitQueue | PackedQueue, out: list[bytes], in_lens: list[int], indirect: bool = False) -> tuple[int, bytes, int]:
    """One request made of the given segments; the status is the last
    writable byte.  Returns (status, writable bytes before it, used len)."""
    head, bufs = q.add(out, in_lens, indirect=indirect)
    (u,) = q.wait_used(1)
    assert u.head == head
    data = b"".join(q.mem.read(a, n) for a, n in zip(bufs, in_lens))
    return data[-1], data[:-1], u.length


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


# ====================================================================== reads and writes


@layouts
def test_write_then_read_and_the_image_file_agrees(vd, guest, packed):
    drv = guest(packed=packed).blk(0)
    data = os.urandom(8192)
    status, _, used = drv.run(BLK_T_OUT, 16, data)
    assert (status, used) == (BLK_S_OK, 1)
    assert vd.read_image("disk", 16 * 512, 8192) == data
    host = os.urandom(4096)
    vd.write_image("disk", 100 * 512, host)
    status, back, used = drv.run(BLK_T_IN, 100, in_len=4096)
    assert (status, back, used) == (BLK_S_OK, host, 4097)
    # last sector of the disk
    blk_roundtrip(vd, drv, CAPACITY - 1, 512, "disk")


@layouts
def test_multi_segment_chains(vd, guest, packed):
    drv = guest(packed=packed).blk(0)
    data = os.urandom(16384)
    assert drv.write(64, data, split=512) == BLK_S_OK  # 32 data descriptors
    assert vd.read_image("disk", 64 * 512, 16384) == data
    status, back = drv.read(64, 16384, split=1024)
    assert status == BLK_S_OK and back == data


@layouts
def test_odd_segment_boundaries(vd, guest, packed):
    q = guest(packed=packed).queue(0)
    data = os.urandom(2048)
    hdr = blk_header(BLK_T_OUT, 200)
    # header split over two descriptors, data in uneven pieces, status alone
    status, _, used = run_chain(q, [hdr[:5], hdr[5:], data[:100], data[100:512], data[512:]], [1])
    assert (status, used) == (BLK_S_OK, 1)
    assert vd.read_image("disk", 200 * 512, 2048) == data
    # read: uneven writable pieces, the status byte sharing the last one
    status, back, used = run_chain(q, [blk_header(BLK_T_IN, 200)], [100, 412, 3, 1533 + 1])
    assert (status, back, used) == (BLK_S_OK, data, 2049)


@layouts
def test_indirect_chains(vd, guest, packed):
    g = guest(packed=packed)
    assert g.features & (1 << F_INDIRECT) and g.packed == packed
    drv = g.blk(0)
    data = os.urandom(64 * 512)
    assert drv.write(300, data, indirect=True, split=512) == BLK_S_OK  # 66-entry table
    assert vd.read_image("disk", 300 * 512, len(data)) == data
    status, back = drv.read(300, len(data), indirect=True, split=2048)
    assert status == BLK_S_OK and back == data
    status, back, used = drv.run(BLK_T_IN, 300, in_len=512, indirect=True)
    assert (status, back, used) == (BLK_S_OK, data[:512], 513)


@layouts
def test_large_request(vd, guest, packed):
    drv = guest(packed=packed).blk(0, size=256, arena=4 << 20)
    data = os.urandom(1 << 20)
    assert drv.write(2048, data, split=8192) == BLK_S_OK  # 128 segments
    assert vd.read_image("disk", 2048 * 512, len(data)) == data
    status, back = drv.read(2048, len(data), indirect=True, split=4096)  # 258-entry table
    assert status == BLK_S_OK and back == data


@layouts
def test_buffer_crossing_a_region_boundary(vd, guest, packed):
    boundary = 8 << 20
    g = guest(layout=[(0, boundary), (boundary, 8 << 20)], packed=packed)
    q = g.queue(0)
    view = g.mem.map  # both regions are one contiguous mapping: file offset == gpa here
    buf, status_gpa = boundary - 1000, boundary + 8192
    data = os.urandom(4096)
    view[buf : buf + 4096] = data

    def run(kind: int, writable: int) -> int:
        hdr = q.buffer(16)
        g.mem.write(hdr, blk_header(kind, 500))
        if q.packed:
            q.post([(hdr, 16, DESC_F_NEXT), (buf, 4096, DESC_F_NEXT | writable), (status_gpa, 1, DESC_F_WRITE)])
        else:
            q.write_desc(0, hdr, 16, DESC_F_NEXT, 1)
            q.write_desc(1, buf, 4096, DESC_F_NEXT | writable, 2)
            q.write_desc(2, status_gpa, 1, DESC_F_WRITE)
            q.chains[0] = []
            q.publish(0)
        (u,) = q.wait_used(1)
        return view[status_gpa], u.length

    assert run(BLK_T_OUT, 0) == (BLK_S_OK, 1)
    assert vd.read_image("disk", 500 * 512, 4096) == data
    view[buf : buf + 4096] = bytes(4096)
    assert run(BLK_T_IN, DESC_F_WRITE) == (BLK_S_OK, 4097)
    assert view[buf : buf + 4096] == data


# ====================================================================== other request types


@layouts
def test_flush(guest, packed):
    drv = guest(packed=packed).blk(0)
    status, data, used = drv.run(BLK_T_FLUSH)
    assert (status, data, used) == (BLK_S_OK, b"", 1)


@pytest.mark.parametrize(
    "name, expect",
    [
        ("disk", b"disk" + bytes(16)),  # default: the device name
        ("ser", b"SER-12345" + bytes(11)),
        ("full", b"ABCDEFGHIJKLMNOPQRST"),  # 20 bytes, no terminator
        (LONG_NAME, LONG_NAME[:20].encode()),  # the name is cut to 20
    ],
)
def test_get_id(guest, name, expect):
    drv = guest(name).blk(0)
    status, data, used = drv.run(BLK_T_GET_ID, in_len=20)
    assert (status, data, used) == (BLK_S_OK, expect, 21)


def test_get_id_buffer_sizes(guest):
    drv = guest("ser").blk(0)
    status, data, used = drv.run(BLK_T_GET_ID, in_len=8)
    assert (status, data, used) == (BLK_S_OK, b"SER-1234", 9)
    status, data, used = drv.run(BLK_T_GET_ID, in_len=32)
    assert status == BLK_S_OK and used == 21 and data[:20] == b"SER-12345" + bytes(11)


def blocks(vd, name: str) -> int:
    return os.stat(vd.image(name)).st_blocks


def test_discard_punches_holes(vd, guest):
    drv = guest().blk(0, arena=2 << 20)
    sector, length = 4096, 1 << 20
    assert drv.write(sector, os.urandom(length), split=65536) == BLK_S_OK
    assert drv.run(BLK_T_FLUSH)[0] == BLK_S_OK
    before = blocks(vd, "disk")
    status, _, used = drv.run(BLK_T_DISCARD, data=seg(sector, length // 512))
    assert (status, used) == (BLK_S_OK, 1)
    assert blocks(vd, "disk") <= before - length // 512 // 2
    assert vd.read_image("disk", sector * 512, length) == bytes(length)
    status, back = drv.read(sector, length)
    assert status == BLK_S_OK and back == bytes(length)


def test_discard_several_segments(vd, guest):
    drv = guest().blk(0)
    marks = [6000, 6100, 6300]
    for s in marks:
        assert drv.write(s, b"\xaa" * 4096) == BLK_S_OK
    assert drv.write(6200, b"\xbb" * 4096) == BLK_S_OK
    assert drv.run(BLK_T_DISCARD, data=b"".join(seg(s, 8) for s in marks))[0] == BLK_S_OK
    for s in marks:
        assert vd.read_image("disk", s * 512, 4096) == bytes(4096)
    assert vd.read_image("disk", 6200 * 512, 4096) == b"\xbb" * 4096


@pytest.mark.parametrize("flags", [0, 1])
def test_write_zeroes(vd, guest, flags):
    drv = guest().blk(0, arena=2 << 20)
    sector, length = 8192 + flags * 2048, 1 << 20
    assert drv.write(sector, os.urandom(length), split=65536) == BLK_S_OK
    assert drv.write(sector + length // 512, b"\xcc" * 512) == BLK_S_OK  # the neighbour survives
    assert drv.run(BLK_T_FLUSH)[0] == BLK_S_OK
    before = blocks(vd, "disk")
    status, _, used = drv.run(BLK_T_WRITE_ZEROES, data=seg(sector, length // 512, flags))
    assert (status, used) == (BLK_S_OK, 1)
    assert vd.read_image("disk", sector * 512, length) == bytes(length)
    assert vd.read_image("disk", sector * 512 + length, 512) == b"\xcc" * 512
    status, back = drv.read(sector, length)
    assert status == BLK_S_OK and back == bytes(length)
    if flags:  # UNMAP: the device may deallocate, and on a sparse file it does
        assert blocks(vd, "disk") <= before - length // 512 // 2


@pytest.mark.parametrize(
    "kind, payload, expect",
    [
        (BLK_T_DISCARD, seg(0, 8, 1), BLK_S_UNSUPP),  # unmap flag is reserved for discard
        (BLK_T_WRITE_ZEROES, seg(0, 8, 2), BLK_S_UNSUPP),  # unknown flag
        (BLK_T_DISCARD, seg(0, 8)[:15], BLK_S_UNSUPP),  # ragged segment list
        (BLK_T_DISCARD, b"", BLK_S_UNSUPP),
        (BLK_T_DISCARD, seg(0, 1) * 33, BLK_S_UNSUPP),  # more than max_discard_seg
        (BLK_T_DISCARD, seg(CAPACITY - 4, 8), BLK_S_IOERR),
        (BLK_T_WRITE_ZEROES, seg(2**64 - 1, 1), BLK_S_IOERR),
        (BLK_T_DISCARD, seg(0, 0x400000), BLK_S_IOERR),  # more than max_discard_sectors
        (BLK_T_DISCARD, seg(16, 0), BLK_S_OK),
    ],
)
def test_bad_discard_and_write_zeroes(vd, guest, kind, payload, expect):
    drv = guest().blk(0)
    assert drv.write(0, b"\x11" * 4096) == BLK_S_OK
    assert drv.run(kind, data=payload)[0] == expect
    assert vd.read_image("disk", 0, 4096) == b"\x11" * 4096


def test_discard_and_write_zeroes_when_disabled(vd, guest):
    g = guest("nodisc")
    assert not g.offered & ((1 << F_DISCARD) | (1 << F_WRITE_ZEROES))
    drv = g.blk(0)
    assert drv.write(0, b"\x22" * 512) == BLK_S_OK
    assert drv.run(BLK_T_DISCARD, data=seg(0, 1))[0] == BLK_S_UNSUPP
    assert drv.run(BLK_T_WRITE_ZEROES, data=seg(0, 1))[0] == BLK_S_UNSUPP
    assert vd.read_image("nodisc", 0, 512) == b"\x22" * 512


# ====================================================================== errors


@pytest.mark.parametrize(
    "sector, length",
    [(CAPACITY, 512), (CAPACITY - 1, 1024), (CAPACITY + 100, 512), (2**63, 512), (2**64 - 1, 512)],
)
def test_out_of_range_is_ioerr(vd, guest, sector, length):
    drv = guest().blk(0)
    status, _, used = drv.run(BLK_T_IN, sector, in_len=length)
    assert (status, used) == (BLK_S_IOERR, 1)
    assert drv.write(sector, b"\x33" * length) == BLK_S_IOERR
    assert os.path.getsize(vd.image("disk")) == DISK_SIZE


@pytest.mark.parametrize("length", [1, 100, 511, 513, 700])
def test_length_not_a_multiple_of_512_is_ioerr(vd, guest, length):
    drv = guest().blk(0)
    before = vd.read_image("disk", 0, 4096)
    assert drv.read(0, length)[0] == BLK_S_IOERR
    assert drv.write(0, b"\x44" * length) == BLK_S_IOERR
    assert vd.read_image("disk", 0, 4096) == before


@pytest.mark.parametrize("kind", [2, 3, 5, 7, 99, 0xFFFFFFFF])
def test_unknown_type_is_unsupp(guest, kind):
    drv = guest().blk(0)
    status, _, used = drv.run(kind, 0, in_len=512)
    assert status == BLK_S_UNSUPP and used == 1


def test_short_header_is_ioerr(guest):
    q = guest().queue(0)
    status, _, used = run_chain(q, [blk_header(BLK_T_IN, 0)[:15]], [513])
    assert (status, used) == (BLK_S_IOERR, 1)


def test_readonly_device(vd, guest):
    g = guest("ro")
    assert g.offered & (1 << F_RO) and not g.offered & (1 << F_FLUSH)
    drv = g.blk(0)
    digest = vd.image_digest("ro")
    status, data = drv.read(8, 4096)
    assert status == BLK_S_OK and data == RO_PATTERN[4096 : 8192]
    assert drv.write(8, b"\x55" * 4096) == BLK_S_IOERR
    assert drv.run(BLK_T_DISCARD, data=seg(0, 8))[0] == BLK_S_IOERR
    assert drv.run(BLK_T_WRITE_ZEROES, data=seg(0, 8))[0] == BLK_S_IOERR
    assert drv.run(BLK_T_WRITE_ZEROES, data=seg(0, 8, 1))[0] == BLK_S_IOERR
    assert vd.image_digest("ro") == digest


# ====================================================================== queues and notifications


@layouts
def test_multiqueue_serves_both_queues_concurrently(vd, guest, packed):
    g = guest(packed=packed)
    q0, q1 = g.queue(0, size=256, arena=2 << 20), g.queue(1, size=256, arena=2 << 20)
    payload = {}
    for i in range(64):
        for qi, q in ((0, q0), (1, q1)):
            sector = 10000 + qi * 1000 + i * 8
            payload[sector] = os.urandom(4096)
            q.add([blk_header(BLK_T_OUT, sector), payload[sector]], [1], kick=False)
    q0.notify()
    q1.notify()
    assert len(q0.wait_used(64)) == 64 and len(q1.wait_used(64)) == 64
    for sector, data in payload.items():
        assert vd.read_image("disk", sector * 512, 4096) == data
    # the queues are independent: a disabled queue 0 does not hold up queue 1
    g.fe.set_vring_enable(0, False)
    BlkDriver(q0).submit(BLK_T_IN, 0, in_len=512)
    blk_roundtrip(vd, BlkDriver(q1), 12000, 4096, "disk")
    assert q0.poll_used() == []
    g.fe.set_vring_enable(0, True)
    assert len(q0.wait_used(1)) == 1


def wait_used_idx(q: SplitQueue | PackedQueue, idx: int) -> None:
    wait_until(lambda: q.used_idx() == idx, 5, what=f"used idx {idx}")


def test_event_idx_used_event_is_respected(guest):
    g = guest()
    assert g.features & (1 << F_EVENT_IDX)
    q = g.queue(0, size=64)
    q.auto_used_event = False
    drv = BlkDriver(q)
    q.set_used_event(2)  # "interrupt me once used idx passes 2"
    for i in range(3):
        drv.submit(BLK_T_IN, i, in_len=512)
        wait_used_idx(q, i + 1)
        if i < 2:
            assert not readable(q.call, 0.05), f"signalled at used idx {i + 1}"
        else:
            assert readable(q.call, 5) and eventfd_take(q.call) == 1
        assert q.avail_event() == i + 1  # the device asks to be kicked for the next one
    q.poll_used()
    # a batch of 10 crossing used_event gives one signal, not ten
    q.set_used_event(7)
    for i in range(10):
        q.add([blk_header(BLK_T_IN, i)], [513], kick=False)
    q.notify()
    wait_used_idx(q, 13)
    assert readable(q.call, 5)
    time.sleep(0.02)
    assert eventfd_take(q.call) == 1
    assert q.avail_event() == 13
    # used_event behind us: no signal at all
    q.poll_used()
    q.set_used_event(5)
    drv.submit(BLK_T_IN, 0, in_len=512)
    wait_used_idx(q, 14)
    assert not readable(q.call, 0.05)


@layouts
def test_no_interrupt_flag_without_event_idx(guest, packed):
    """Split: avail flags NO_INTERRUPT; packed: the driver area's DISABLE (the same value, 1)."""
    g = guest(features=~(1 << F_EVENT_IDX), packed=packed)
    assert not g.features & (1 << F_EVENT_IDX)
    q = g.queue(0, size=64)
    drv = BlkDriver(q)
    q.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    for i in range(3):
        drv.submit(BLK_T_IN, i, in_len=512)
        wait_used_idx(q, i + 1)
    assert not readable(q.call, 0.05)
    q.set_avail_flags(0)
    drv.submit(BLK_T_IN, 0, in_len=512)
    wait_used_idx(q, 4)
    assert readable(q.call, 5) and eventfd_take(q.call) == 1


@layouts
def test_used_flags_no_notify_is_cleared_when_idle(guest, packed):
    g = guest(features=~(1 << F_EVENT_IDX), packed=packed)
    q = g.queue(0, size=64)
    # a stale NO_NOTIFY (packed: the device area's DISABLE) must not survive
    # the device going idle, or the driver would never kick again
    if packed:
        q.mem.write(q.used, struct.pack("<HH", 0, EVENT_F_DISABLE))
    else:
        q.mem.write(q.used, struct.pack("<H", USED_F_NO_NOTIFY))
    drv = BlkDriver(q)
    assert drv.read(0, 512)[0] == BLK_S_OK
    if packed:
        assert q.used_flags() == EVENT_F_ENABLE
    else:
        assert q.used_flags() & USED_F_NO_NOTIFY == 0


@layouts
def test_ring_of_1024_filled_and_kicked_once(vd, guest, packed):
    g = guest(packed=packed)
    q = g.queue(0, size=1024, arena=2 << 20)
    image = os.urandom(1024 * 512)
    vd.write_image("disk", 0, image)
    heads = {}
    for i in range(1024):
        head, bufs = q.add([blk_header(BLK_T_IN, i)], [512, 1], indirect=True, kick=False)
        heads[head] = (i, bufs)
    assert q.free == []  # every descriptor (packed: every buffer id and ring slot) is in flight
    assert not packed or q.num_free == 0
    q.notify()
    done = q.wait_used(1024, timeout=10)
    assert sorted(u.head for u in done) == sorted(heads)
    for u in done:
        i, (data, status) = heads[u.head]
        assert u.length == 513 and q.mem.read(status, 1)[0] == BLK_S_OK
        assert q.mem.read(data, 512) == image[i * 512 : (i + 1) * 512]


@layouts
def test_direct_chains_fill_the_ring(vd, guest, packed):
    q = guest(packed=packed).queue(0, size=256)
    n = 256 // 3
    status = []
    for i in range(n):
        status.append(q.add([blk_header(BLK_T_OUT, 14000 + i), bytes([i]) * 512], [1], kick=False)[1][-1])
    assert (q.num_free if packed else len(q.free)) == 1  # 85 chains of 3 use 255 of 256 descriptors
    q.notify()
    assert len(q.wait_used(n)) == n
    for i in range(n):
        assert q.mem.read(status[i], 1)[0] == BLK_S_OK
        assert vd.read_image("disk", (14000 + i) * 512, 512) == bytes([i]) * 512


def test_index_wraps_from_65535_to_0(vd, guest):
    g = guest()
    base = 65536 - 150
    q = g.queue(0, size=128, base=base)
    assert g.fe.get_vring_base(0) == base
    g.fe.set_vring_kick(0, q.kick)  # restart after the peek
    drv = BlkDriver(q)
    expected = {}
    for batch in range(10):
        sent = []
        for i in range(30):
            sector = 15000 + batch * 30 + i
            expected[sector] = os.urandom(512)
            head, bufs = q.add([blk_header(BLK_T_OUT, sector), expected[sector]], [1], kick=False)
            sent.append(bufs[-1])
        q.notify()
        assert len(q.wait_used(30)) == 30
        assert all(q.mem.read(s, 1)[0] == BLK_S_OK for s in sent)
    assert q.used_idx() == q.avail_idx == (base + 300) & 0xFFFF == 150
    for sector, data in expected.items():
        assert vd.read_image("disk", sector * 512, 512) == data
    status, back = drv.read(15000 + 7, 512)
    assert status == BLK_S_OK and back == expected[15007]
    assert g.fe.get_vring_base(0) == 151


def packed_base(q: PackedQueue) -> int:
    """GET_VRING_BASE of a packed ring with nothing in flight: the driver's
    next position and wrap counter, the same on the used side."""
    assert q.next_avail == q.last_used and q.avail_wrap == q.used_wrap
    return q.ring_base() | q.ring_base() << 16


def test_packed_ring_wraps_many_times_and_the_base_says_where(vd, guest):
    """A packed ring resumed at position 5 of a wrap-0 lap, then 300 writes
    (3 descriptors each, some through indirect tables, completing in any
    order): seven laps with both wrap counters flipping, and GET_VRING_BASE
    telling where each side got to."""
    g = guest(packed=True)
    q = g.queue(0, size=128, base=5 | 0 << 15)
    assert isinstance(q, PackedQueue) and (q.next_avail, q.avail_wrap) == (5, 0)
    assert g.fe.get_vring_base(0) == 5 | 0 << 15 | 5 << 16 | 0 << 31
    g.fe.set_vring_kick(0, q.kick)  # restart after the peek
    expected, laps = {}, set()
    for batch in range(10):
        sent = []
        for i in range(30):
            sector = 16000 + batch * 30 + i
            expected[sector] = os.urandom(512)
            head, bufs = q.add([blk_header(BLK_T_OUT, sector), expected[sector]], [1], kick=False,
                               indirect=(i % 7 == 3))
            sent.append(bufs[-1])
        q.notify()
        assert len(q.wait_used(30)) == 30
        assert all(q.mem.read(s, 1)[0] == BLK_S_OK for s in sent)
        laps.add(q.used_wrap)
    assert laps == {0, 1} and q.num_free == 128
    for sector, data in expected.items():
        assert vd.read_image("disk", sector * 512, 512) == data
    drv = BlkDriver(q)
    status, back = drv.read(16000 + 7, 512)
    assert status == BLK_S_OK and back == expected[16007]
    assert g.fe.get_vring_base(0) == packed_base(q)


def test_packed_desc_event_is_respected(guest):
    """EVENT_IDX on a packed ring: a DESC event signals exactly when the
    device writes the used descriptor at the named position (and wrap),
    once per batch; the device asks for kicks with a DESC event at its next
    position."""
    g = guest(packed=True)
    assert g.features & (1 << F_EVENT_IDX)
    q = g.queue(0, size=64)
    q.auto_used_event = False
    drv = BlkDriver(q)
    q.set_used_event(6)  # each request takes 3 descriptors: the third completion is written at 6
    for i in range(3):
        drv.submit(BLK_T_IN, i, in_len=512)
        wait_used_idx(q, i + 1)
        if i < 2:
            assert not readable(q.call, 0.05), f"signalled at completion {i + 1}"
        else:
            assert readable(q.call, 5) and eventfd_take(q.call) == 1
        assert q.device_event_area() == (q.ring_base(), EVENT_F_DESC)  # a kick for the next position
    q.poll_used()
    # a batch of 10 crossing the named position gives one signal, not ten
    q.set_used_event(q.last_used + 2 * 4)  # these take 2 descriptors each: the 5th one's position
    for i in range(10):
        q.add([blk_header(BLK_T_IN, i)], [513], kick=False)
    q.notify()
    wait_used_idx(q, 13)
    assert readable(q.call, 5)
    time.sleep(0.02)
    assert eventfd_take(q.call) == 1
    q.poll_used()
    assert q.device_event_area() == (q.ring_base(), EVENT_F_DESC)
    # round the end of the ring: the wrap bit says which lap the position is in
    assert (q.last_used, q.used_wrap) == (29, 1)
    q.set_used_event(1, wrap=0)  # position 1 of the next lap (behind us in this one): 29 + 12 * 3 - 64
    for i in range(13):
        drv.submit(BLK_T_IN, i, in_len=512)
        wait_used_idx(q, 14 + i)
        assert readable(q.call, 0.5 if i == 12 else 0.02) == (i == 12), f"completion {i + 1}"
        eventfd_take(q.call)
    assert len(q.poll_used()) == 13 and (q.last_used, q.used_wrap) == (4, 0)
    # an event behind the device: no signal at all
    q.set_used_event(q.last_used - 3)
    drv.submit(BLK_T_IN, 0, in_len=512)
    wait_used_idx(q, 27)
    assert not readable(q.call, 0.05)
    # DISABLE holds with EVENT_IDX too
    q.set_avail_flags(EVENT_F_DISABLE)
    drv.submit(BLK_T_IN, 0, in_len=512)
    wait_used_idx(q, 28)
    assert not readable(q.call, 0.05)


@layouts
def test_seg_max_segments_in_one_request(vd, guest, packed):
    """queue_size 1024 advertises seg_max 1022: a request that uses them all."""
    g = guest(packed=packed)
    assert struct.unpack("<I", g.fe.get_config(12, 4))[0] == 1022
    drv = g.blk(0, size=1024, arena=4 << 20)
    data = os.urandom(1022 * 512)
    assert drv.write(1000, data, indirect=True, split=512) == BLK_S_OK
    assert vd.read_image("disk", 1000 * 512, len(data)) == data
    status, back = drv.read(1000, len(data), indirect=True, split=512)
    assert status == BLK_S_OK and back == data
    # the same as a direct chain of 1024 descriptors: the whole ring
    status, back = drv.read(1000, len(data), split=512)
    assert status == BLK_S_OK and back == data


# ====================================================================== backend null


NULL_SIZE = 1 << 40  # 1 TiB of nothing


@pytest.fixture(scope="module")
def null_vd(tmp_path_factory):
    """A daemon serving null disks (the Vhostd helper gives them no image)."""
    sock = tempfile.mkdtemp(prefix="vd-", dir="/tmp")
    wd = tmp_path_factory.mktemp("vhostd-null")
    devices = [
        {"name": "null", "backend": "null", "size": NULL_SIZE, "queues": 2},
        {"name": "nullro", "backend": "null", "size": "1M", "readonly": True},
    ]
    vd = Vhostd(wd, sock, devices)
    vd.start()
    try:
        yield vd
        vd.finish()
    finally:
        shutil.rmtree(sock, ignore_errors=True)


@pytest.fixture
def null_guest(null_vd):
    opened: list[Guest] = []

    def make(name: str = "null", **kw) -> Guest:
        g = null_vd.connect(name, **kw)
        opened.append(g)
        return g

    yield make
    for g in opened:
        g.close()
    null_vd.assert_alive()


def test_null_disk_capacity_and_no_image(null_vd, null_guest):
    g = null_guest()
    assert struct.unpack("<Q", g.fe.get_config(0, 8))[0] == NULL_SIZE // 512
    assert g.offered & (1 << F_FLUSH) and g.offered & (1 << F_DISCARD) and g.offered & (1 << F_WRITE_ZEROES)
    assert sorted(p.name for p in null_vd.workdir.iterdir()) == ["vhostd.log", "vhostd.yaml"]


def test_null_disk_reads_leave_the_buffers_alone(null_guest):
    q = null_guest().queue(0)
    pattern = bytes(range(256)) * (q.arena_size // 256)
    q.mem.write(q.arena, pattern)  # every buffer the driver hands out starts with this
    drv = BlkDriver(q)
    for sector, length in ((0, 4096), (NULL_SIZE // 512 - 8, 4096), (12345, 65536)):
        head, bufs, lens = drv.submit(BLK_T_IN, sector, in_len=length)
        (u,) = q.wait_used(1)
        assert (u.head, u.length) == (head, length + 1)
        assert q.mem.read(bufs[-1], 1)[0] == BLK_S_OK
        off = bufs[0] - q.arena
        assert q.mem.read(bufs[0], length) == pattern[off : off + length]


def test_null_disk_accepts_everything_and_stores_nothing(null_guest):
    drv = null_guest().blk(1)
    data = os.urandom(8192)
    assert drv.write(16, data) == BLK_S_OK
    assert drv.write(16, data, split=512, indirect=True) == BLK_S_OK
    assert drv.run(BLK_T_FLUSH)[:3:2] == (BLK_S_OK, 1)
    assert drv.run(BLK_T_DISCARD, data=seg(0, 8))[0] == BLK_S_OK
    assert drv.run(BLK_T_WRITE_ZEROES, data=seg(8, 8, 1))[0] == BLK_S_OK
    assert drv.run(BLK_T_GET_ID, in_len=20)[1] == b"null" + bytes(16)
    status, back = drv.read(16, 8192)
    assert status == BLK_S_OK and back != data  # nothing was kept


def test_null_disk_checks_requests_like_a_real_one(null_guest):
    drv = null_guest().blk(0)
    capacity = NULL_SIZE // 512
    assert drv.read(capacity, 512)[0] == BLK_S_IOERR
    assert drv.write(capacity - 1, bytes(1024)) == BLK_S_IOERR
    assert drv.read(0, 700)[0] == BLK_S_IOERR
    assert drv.run(BLK_T_DISCARD, data=seg(capacity - 4, 8))[0] == BLK_S_IOERR
    assert drv.run(BLK_T_DISCARD, data=seg(0, 8, 1))[0] == BLK_S_UNSUPP
    assert drv.run(99, in_len=512)[0] == BLK_S_UNSUPP


def test_null_disk_readonly(null_guest):
    g = null_guest("nullro")
    assert g.offered & (1 << F_RO)
    drv = g.blk(0)
    assert drv.read(0, 4096)[0] == BLK_S_OK
    assert drv.write(0, bytes(4096)) == BLK_S_IOERR
    assert drv.run(BLK_T_WRITE_ZEROES, data=seg(0, 8))[0] == BLK_S_IOERR


# ====================================================================== packed: completions out of order


def test_packed_requests_complete_out_of_order(vhostd_factory, hanging_disk):
    """A read waits for a disk that hangs while requests behind it complete:
    on a packed ring their used descriptors take the slots from the front
    (where the waiting chain's descriptors were), each moving the used
    position by its own chain's length; the read comes last, and both sides
    agree where they are."""
    vd = vhostd_factory([{"name": "hang", "path": hanging_disk.path, "direct": True}])
    g = vd.connect("hang", packed=True)
    drv = g.blk(0, size=16)
    q = drv.q
    data = os.urandom(4096)
    assert drv.write(8, data) == BLK_S_OK  # 3 descriptors: positions 0-2
    hanging_disk.pause()
    slow, slow_bufs, slow_lens = drv.submit(BLK_T_IN, 8, in_len=4096, split=1024)  # 6 descriptors: 3-8
    fast = [drv.submit(BLK_T_GET_ID, in_len=20, **kw) for kw in ({}, {"split": 10}, {"indirect": True})]  # 3, 4, 1
    used = q.wait_used(3)
    assert [u.head for u in used] == [h for h, _, _ in fast] and all(u.length == 21 for u in used)
    for _, bufs, _ in fast:
        assert q.mem.read(bufs[-1], 1)[0] == BLK_S_OK and q.mem.read(bufs[0], 4) == b"hang"
    assert (q.last_used, q.used_wrap) == (3 + 3 + 4 + 1, 1)
    assert [q.read_desc(p)[2] for p in (3, 6, 10)] == [h for h, _, _ in fast]  # over the waiting chain's slots
    time.sleep(0.2)
    assert q.poll_used() == []
    hanging_disk.resume()
    (u,) = q.wait_used(1)
    assert (u.head, u.length) == (slow, 4097) and q.mem.read(slow_bufs[-1], 1)[0] == BLK_S_OK
    assert b"".join(q.mem.read(a, n) for a, n in zip(slow_bufs[:-1], slow_lens[:-1])) == data
    assert (q.last_used, q.used_wrap) == (1, 0) == (q.next_avail, q.avail_wrap)  # 17 descriptors: round the end
    assert g.fe.get_vring_base(0) == 1 | 0 << 15 | 1 << 16 | 0 << 31
    g.fe.set_vring_kick(0, q.kick)
    for i in range(6):  # and on round the ring
        blk_roundtrip(vd, drv, 16 + 8 * i, 4096)  # O_DIRECT: 4 KiB aligned
    g.close()
