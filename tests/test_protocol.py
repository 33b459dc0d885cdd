"""Every front-end request vhostd supports, good and bad, against the real
`vhostd serve` subprocess over a real Unix socket."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from conftest import (
    BLK_S_OK,
    STATUS_NEEDS_RESET,
    Guest,
    blk_roundtrip,
    connect_frontend,
    eventfd_take,
    readable,
    wait_broken,
    wait_until,
)
from virtio_driver import BLK_T_IN, BLK_T_OUT, DESC_F_NEXT, DESC_F_WRITE, BlkDriver, GuestMemory, SplitQueue, blk_header
from vhostd.frontend import BackendError, Frontend
from vhostd.protocol.codec import ConfigAccess, MemoryRegion, pack_u64, unpack_u64
from vhostd.virtio import F_RING_PACKED
from vhostd.protocol.constants import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    VERSION,
    ProtocolFeature as PF,
    Request as R,
)

NO_REPLY_ACK = ~(1 << PF.REPLY_ACK)
IMAGE_SIZE = 4 << 20


@pytest.fixture
def vd(vhostd_factory):
    return vhostd_factory([{"name": "d0", "queues": 2, "size": IMAGE_SIZE}, {"name": "d1", "size": "1M"}])


@pytest.fixture
def guests():
    opened: list[Guest] = []
    yield opened
    for g in opened:
        g.close()


@pytest.fixture
def connect(vd, guests):
    def make(name: str = "d0", **kw) -> Guest:
        g = vd.connect(name, **kw)
        guests.append(g)
        return g

    return make


def assert_closed_by_daemon(fe: Frontend, timeout: float = 5.0) -> None:
    fe.sock.settimeout(timeout)
    try:
        data = fe.sock.recv(4096)
    except ConnectionResetError:
        return
    assert data == b"", f"expected EOF, got {data!r}"


def not_served(q: SplitQueue, wait: float = 0.2) -> bool:
    before = q.used_idx()
    time.sleep(wait)
    return q.used_idx() == before


def io_works(vd, g: Guest, index: int = 0, **kw) -> BlkDriver:
    drv = g.blk(index, **kw)
    blk_roundtrip(vd, drv, 8 + index, 4096, g.name)
    return drv


# ====================================================================== features


def test_get_features_offers_ring_blk_and_protocol_bits(connect):
    g = connect(handshake=False)
    f = g.offered
    for bit in (1, 2, 6, 9, 10, 12, 13, 14, 28, 29, 32, F_PROTOCOL_FEATURES):
        assert f & (1 << bit), bit
    assert not f & (1 << 5)  # writable device: no RO


def test_set_features_with_unoffered_bits_gets_a_failure_ack(vd, connect):
    g = connect()
    mark = vd.log_mark()
    with pytest.raises(BackendError):
        g.fe.set_features(g.offered | (1 << 5))
    vd.wait_log(mark, r"SET_FEATURES refused: front-end acked features 0x20 that were not offered")
    assert g.fe.get_features() == g.offered  # the session goes on
    io_works(vd, g)


def test_set_features_with_unoffered_bits_without_reply_ack_drops_the_session(vd, connect):
    fe, offered = connect_frontend(vd.socket("d0"))
    mark = vd.log_mark()
    fe.send(R.SET_FEATURES, pack_u64(offered | (1 << 63)))
    assert_closed_by_daemon(fe)
    vd.wait_log(mark, r"closing connection: SET_FEATURES refused")
    fe.close()
    io_works(vd, connect())


def test_protocol_features(vd, connect):
    g = connect(handshake=False)
    pf = g.fe.get_protocol_features()
    want = {PF.MQ, PF.REPLY_ACK, PF.CONFIG, PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS, PF.STATUS, PF.INFLIGHT_SHMFD, PF.LOG_SHMFD}
    assert pf == sum(1 << f for f in want)  # blk; net adds MTU and RARP, drops INFLIGHT_SHMFD
    mark = vd.log_mark()
    g.fe.send(R.SET_PROTOCOL_FEATURES, pack_u64(pf | (1 << PF.PAGEFAULT)))
    assert_closed_by_daemon(g.fe)
    vd.wait_log(mark, r"SET_PROTOCOL_FEATURES refused: .*not offered")


def test_set_owner_and_reset_owner(vd, connect):
    g = connect()
    g.fe.set_owner()  # again: harmless
    drv = io_works(vd, g)
    g.fe.request(R.RESET_OWNER)  # deprecated: disables the rings
    drv.submit(BLK_T_IN, 0, in_len=512)
    assert not_served(drv.q)
    g.fe.set_vring_enable(0, True)
    assert drv.q.wait_used(1)[0].length == 513


# ====================================================================== memory table


def test_set_mem_table_with_several_regions(vd, connect):
    layout = [(0, 2 << 20), (16 << 20, 2 << 20), (1 << 32, 4 << 20)]
    g = connect(layout=layout)
    assert g.mem.regions[2].guest_addr == 1 << 32
    # queue 0 lives in the region above 4 GiB, queue 1 in the middle one
    d0 = g.blk(0, region=2, size=64, arena=2 << 20)
    d1 = g.blk(1, region=1, size=64, arena=1 << 20)
    blk_roundtrip(vd, d0, 100, 8192, "d0")
    blk_roundtrip(vd, d1, 200, 8192, "d0")


def test_set_mem_table_without_regions_says_share_on(vd, connect):
    g = connect()
    mark = vd.log_mark()
    with pytest.raises(BackendError):
        g.fe.set_mem_table([], [])
    (line,) = vd.wait_log(mark, r"SET_MEM_TABLE refused")
    assert "share=on" in line


def test_set_mem_table_without_regions_and_without_reply_ack(vd, connect):
    g = connect(protocol=NO_REPLY_ACK)
    mark = vd.log_mark()
    g.fe.set_mem_table([], [])
    assert_closed_by_daemon(g.fe)
    (line,) = vd.wait_log(mark, r"closing connection: SET_MEM_TABLE refused")
    assert "share=on" in line


def test_set_mem_table_fd_count_mismatch(vd, connect):
    g = connect()
    mem = GuestMemory([(0, 1 << 20), (2 << 20, 1 << 20)])
    fd = os.dup(mem.fd)
    mark = vd.log_mark()
    try:
        with pytest.raises(BackendError):
            g.fe.set_mem_table(mem.regions, [fd])
    finally:
        os.close(fd)
        mem.close()
    vd.wait_log(mark, r"2 regions but 1 file descriptors")


def test_set_mem_table_memfd_too_small(vd, connect):
    g = connect()
    fd = os.memfd_create("small", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    mark = vd.log_mark()
    try:
        with pytest.raises(BackendError):
            g.fe.set_mem_table([MemoryRegion(0, 2 << 20, 0x7000_0000_0000, 0)], [fd])
        # an offset pushing the region past the end is just as bad
        with pytest.raises(BackendError):
            g.fe.set_mem_table([MemoryRegion(0, 1 << 20, 0x7000_0000_0000, 4096)], [fd])
    finally:
        os.close(fd)
    assert len(vd.wait_log(mark, r"the file has only 0x100000", count=2)) == 2
    io_works(vd, g)  # the earlier table is still in place


@pytest.mark.parametrize(
    "second",
    [
        MemoryRegion(0x1000, 0x1000, 0x7100_0000_0000, 0),  # same guest range
        MemoryRegion(0x100000 - 0x1000, 0x2000, 0x7100_0000_0000, 0),  # straddles the end of the first
        MemoryRegion(0x1000_0000, 0x1000, 0x7000_0000_0000 + 0x2000, 0),  # user addresses overlap
    ],
)
def test_set_mem_table_overlapping_regions(vd, connect, second):
    g = connect()
    first = MemoryRegion(0, 0x100000, 0x7000_0000_0000, 0)
    fd = os.memfd_create("overlap", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x200000)
    mark = vd.log_mark()
    try:
        with pytest.raises(BackendError):
            g.fe.set_mem_table([first, second], [fd, fd])
    finally:
        os.close(fd)
    vd.wait_log(mark, r"overlaps region")


def test_refused_mem_table_keeps_the_running_one(vd, connect):
    g = connect()
    drv = io_works(vd, g)
    fd = os.dup(g.mem.fd)
    try:
        with pytest.raises(BackendError):
            g.fe.set_mem_table([MemoryRegion(0, 0, 0x7000_0000_0000, 0)], [fd])
    finally:
        os.close(fd)
    blk_roundtrip(vd, drv, 33, 4096, "d0")


def test_rings_need_a_memory_table_first(vd):
    fe, offered = connect_frontend(vd.socket("d0"))
    try:
        fe.set_protocol_features(fe.get_protocol_features())
        fe.set_features(offered & ~(1 << F_RING_PACKED))  # the split ring driver
        mem = GuestMemory(size=1 << 20)
        q = SplitQueue(mem, 16, arena=4096)
        mark = vd.log_mark()
        with pytest.raises(BackendError):
            q.attach(fe, 0)
        (line,) = vd.wait_log(mark, r"SET_VRING_KICK refused")
        assert "no memory table" in line and "share=on" in line
        q.close()
        mem.close()
    finally:
        fe.close()


# ====================================================================== ring set-up


@pytest.mark.parametrize("num", [0, 3, 100, 255, 512, 1024, 2048, 1 << 31])
def test_set_vring_num_refuses_bad_sizes(vd, connect, num):
    g = connect()
    mark = vd.log_mark()
    with pytest.raises(BackendError):
        g.fe.set_vring_num(0, num)
    vd.wait_log(mark, rf"size {num} is not a power of two from 1 to 256")


def test_set_vring_num_accepts_powers_of_two_up_to_the_queue_size(vd, connect):
    g = connect()
    for num in (1, 2, 64, 256):
        g.fe.set_vring_num(0, num)
    g.fe.set_vring_num(1, 128)
    drv = io_works(vd, g, size=256)
    with pytest.raises(BackendError):
        g.fe.set_vring_num(0, 64)  # not while it runs
    blk_roundtrip(vd, drv, 1)


def test_set_vring_num_up_to_1024_when_configured(vhostd_factory):
    vd = vhostd_factory([{"name": "big", "queue_size": 1024}])
    g = vd.connect("big")
    try:
        with pytest.raises(BackendError):
            g.fe.set_vring_num(0, 2048)
        io_works(vd, g, size=1024)
    finally:
        g.close()


def test_set_vring_base(vd, connect):
    g = connect()
    with pytest.raises(BackendError):
        g.fe.request(R.SET_VRING_BASE, struct.pack("<II", 0, 0x10000))
    drv = io_works(vd, g)
    mark = vd.log_mark()
    with pytest.raises(BackendError):
        g.fe.set_vring_base(0, 7)  # running queue
    vd.wait_log(mark, r"cannot set the base of a running queue")
    blk_roundtrip(vd, drv, 2)


def test_set_vring_addr_rejects_addresses_outside_memory_at_start(vd, connect):
    g = connect()
    mark = vd.log_mark()
    g.fe.set_vring_num(0, 16)
    g.fe.set_vring_addr(0, 1 << 40, 1 << 40, 1 << 40)
    with pytest.raises(BackendError):
        g.fe.set_vring_kick(0, g.eventfd())
    vd.wait_log(mark, r"rings .* are not inside guest memory")
    io_works(vd, g)  # a proper ring on the same queue afterwards


def test_get_vring_base_stops_the_ring_and_restart_continues(vd, connect):
    g = connect()
    drv = g.blk(0, size=16)
    for i in range(5):
        blk_roundtrip(vd, drv, i, 512)
    assert g.fe.get_vring_base(0) == 10
    # stopped: requests are left in the avail ring, kicks are not served
    head, bufs, lens = drv.submit(BLK_T_OUT, 40, data=b"A" * 512)
    drv.q.notify()
    assert not_served(drv.q)
    assert g.fe.get_vring_base(0) == 10  # nothing consumed
    # restart from that base: the waiting request is served, then the rest
    g.fe.set_vring_base(0, 10)
    g.fe.set_vring_kick(0, drv.q.kick)
    (u,) = drv.q.wait_used(1)
    assert u.head == head and drv.q.mem.read(bufs[-1], 1)[0] == BLK_S_OK
    assert vd.read_image("d0", 40 * 512, 512) == b"A" * 512
    for i in range(20):  # wraps the 16-entry ring
        blk_roundtrip(vd, drv, 50 + i, 512, "d0")
    assert g.fe.get_vring_base(0) == 10 + 1 + 40


def test_restart_from_base_in_a_new_session(vd, guests):
    """The same guest memory handed to a second session (as after a
    front-end restart): the ring continues from GET_VRING_BASE."""
    g1 = vd.connect("d0")
    guests.append(g1)
    drv = g1.blk(0, size=32)
    for i in range(7):
        blk_roundtrip(vd, drv, i, 1024)
    base = g1.fe.get_vring_base(0)
    assert base == 14
    mem, q = g1.mem, drv.q
    g1.mem, g1.queues = None, []  # keep them for the next session
    g1.close()

    fe, offered = connect_frontend(vd.socket("d0"))
    try:
        fe.set_protocol_features(fe.get_protocol_features())
        fe.set_features(offered & ~(1 << F_RING_PACKED))  # the split ring driver
        mem.give_to(fe)
        q.attach(fe, 0)  # SET_VRING_BASE(14): q.avail_idx is the driver's own index
        assert q.avail_idx == 14
        for i in range(40):
            blk_roundtrip(vd, drv, 100 + i, 512, "d0")
        assert fe.get_vring_base(0) == 14 + 80
    finally:
        fe.close()
        q.close()
        mem.close()


# ====================================================================== kick / call / err


def test_no_kick_fd_means_the_ring_is_polled(vd, connect):
    g = connect()
    drv = g.blk(0, kick=False)
    for i in range(3):
        head, bufs = drv.q.add([blk_header(BLK_T_OUT, 60 + i), bytes([i]) * 512], [1], kick=False)
        (u,) = drv.q.wait_used(1)
        assert u.head == head and drv.q.mem.read(bufs[-1], 1)[0] == BLK_S_OK
    assert vd.read_image("d0", 62 * 512, 512) == b"\2" * 512


def test_no_call_fd(vd, connect):
    g = connect()
    q = g.queue(0)
    g.fe.set_vring_call(0, None)
    drv = BlkDriver(q)
    for i in range(3):
        blk_roundtrip(vd, drv, i)
    assert eventfd_take(q.call) == 0  # the old call fd was dropped


def test_call_fd_is_signalled(vd, connect):
    g = connect()
    drv = g.blk(0)
    eventfd_take(drv.q.call)
    drv.submit(BLK_T_IN, 0, in_len=512)
    assert readable(drv.q.call, 5)
    assert eventfd_take(drv.q.call) == 1


def test_err_fd_with_and_without_fd(vd, connect):
    g = connect()
    g.fe.set_vring_err(0, None)
    g.fe.set_vring_err(0, g.eventfd())
    io_works(vd, g, err=False)


@pytest.mark.parametrize("which", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
@pytest.mark.parametrize("kind", ["pipe", "file", "socket"])
def test_non_eventfd_fds_are_refused(vd, connect, tmp_path, which, kind):
    g = connect()
    if kind == "pipe":
        fd, other = os.pipe()
    elif kind == "file":
        fd, other = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT), None
    else:
        a, b = socket.socketpair()
        fd, other = a.detach(), b.detach()
    mark = vd.log_mark()
    try:
        g.queue(0, kick=True)  # a running queue first
        with pytest.raises(BackendError):
            g.fe.request(which, pack_u64(0), [fd])
    finally:
        for x in (fd, other):
            if x is not None:
                os.close(x)
    vd.wait_log(mark, r"fd is .*, not an eventfd")
    blk_roundtrip(vd, BlkDriver(g.queues[0]), 3)


def test_vring_fd_flag_errors(vd, connect):
    g = connect()
    fd = g.eventfd()
    with pytest.raises(BackendError):
        g.fe.request(R.SET_VRING_CALL, pack_u64(0x100), [fd])  # no-fd flag and an fd
    with pytest.raises(BackendError):
        g.fe.request(R.SET_VRING_CALL, pack_u64(0))  # no fd, no flag
    with pytest.raises(BackendError):
        g.fe.request(R.SET_VRING_CALL, pack_u64(5), [fd])  # no such ring


def test_disabled_ring_is_not_served_until_enabled(vd, connect):
    g = connect()
    drv = g.blk(0, enable=False)
    head, _, _ = drv.submit(BLK_T_IN, 0, in_len=512)
    assert not_served(drv.q)
    g.fe.set_vring_enable(0, True)
    assert drv.q.wait_used(1)[0].head == head
    g.fe.set_vring_enable(0, False)
    drv.submit(BLK_T_IN, 0, in_len=512)
    assert not_served(drv.q)
    g.fe.set_vring_enable(0, True)
    assert len(drv.q.wait_used(1)) == 1
    with pytest.raises(BackendError):
        g.fe.request(R.SET_VRING_ENABLE, struct.pack("<II", 0, 2))


def test_rings_start_enabled_without_protocol_features(vd, guests):
    g = vd.connect("d0", features=~(1 << F_PROTOCOL_FEATURES))
    guests.append(g)
    assert not g.features & (1 << F_PROTOCOL_FEATURES)
    drv = g.blk(0)  # attach() sends no SET_VRING_ENABLE here
    blk_roundtrip(vd, drv, 5, 512, "d0")
    with pytest.raises(BackendError):
        g.fe.set_vring_enable(0, False)


# ====================================================================== queues, config, slots, status


def test_get_queue_num(vd, connect):
    assert connect("d0").fe.get_queue_num() == 2
    assert connect("d1").fe.get_queue_num() == 1


def test_get_config(vd, connect):
    g = connect()
    cfg = g.fe.get_config(0, 60)
    capacity, size_max, seg_max = struct.unpack_from("<QII", cfg, 0)
    assert capacity == IMAGE_SIZE // 512 and size_max == 1 << 20 and seg_max == 254
    assert struct.unpack_from("<I", cfg, 20)[0] == 512  # blk_size
    assert cfg[24] == 3  # physical_block_exp: 4 KiB
    assert struct.unpack_from("<H", cfg, 34)[0] == 2  # num_queues
    max_discard, discard_seg, discard_align = struct.unpack_from("<III", cfg, 36)
    assert (max_discard, discard_seg, discard_align) == (0x3FFFFF, 32, 8)
    assert g.fe.get_config(20, 4) == struct.pack("<I", 512)
    assert g.fe.get_config(34, 2) == struct.pack("<H", 2)
    assert g.fe.get_config(60, 196) == bytes(196)  # past the blk fields: zeros
    assert connect("d1").fe.get_config(0, 8) == struct.pack("<Q", (1 << 20) // 512)


@pytest.mark.parametrize("offset, size", [(250, 10), (256, 1), (1, 256), (255, 2), (0xFFFFFFFF, 2)])
def test_get_config_out_of_range_gives_an_empty_reply(vd, connect, offset, size):
    g = connect()
    mark = vd.log_mark()
    reply = ConfigAccess.unpack(g.fe.request(R.GET_CONFIG, ConfigAccess(offset, size, 0, bytes(size)).pack()))
    assert reply.size == 0 and reply.data == b""
    vd.wait_log(mark, r"outside the config space")
    assert g.fe.get_config(0, 8)  # the session goes on


def test_set_config_is_refused(vd, connect):
    g = connect()
    mark = vd.log_mark()
    with pytest.raises(BackendError):
        g.fe.set_config(32, b"\1")
    vd.wait_log(mark, r"SET_CONFIG refused: the virtio-blk config space is read-only")
    assert g.fe.get_config(32, 1) == b"\0"


def test_get_max_mem_slots(connect):
    assert connect().fe.get_max_mem_slots() == 509


def test_add_and_remove_mem_region_at_runtime(vd, connect):
    g = connect()
    q = g.queue(0)
    extra = GuestMemory([(64 << 20, 1 << 20)])
    try:
        before = vd.memfd_mappings()
        fd = os.dup(extra.fd)
        try:
            g.fe.add_mem_region(extra.regions[0], fd)
        finally:
            os.close(fd)
        assert vd.memfd_mappings() == before + 1
        data_gpa, status_gpa = 64 << 20, (64 << 20) + 8192

        def run(kind: int, sector: int, writable: bool) -> int:
            hdr = q.buffer(16)
            g.mem.write(hdr, blk_header(kind, sector))
            q.write_desc(0, hdr, 16, DESC_F_NEXT, 1)
            q.write_desc(1, data_gpa, 4096, DESC_F_NEXT | (DESC_F_WRITE if writable else 0), 2)
            q.write_desc(2, status_gpa, 1, DESC_F_WRITE)
            extra.write(status_gpa, b"\xff")
            q.publish(0)
            q.chains[0] = []
            q.wait_used(1)
            return extra.read(status_gpa, 1)[0]

        payload = os.urandom(4096)
        extra.write(data_gpa, payload)
        assert run(BLK_T_OUT, 300, False) == BLK_S_OK  # data taken from the added region
        assert vd.read_image("d0", 300 * 512, 4096) == payload
        extra.write(data_gpa, bytes(4096))
        assert run(BLK_T_IN, 300, True) == BLK_S_OK  # and written into it
        assert extra.read(data_gpa, 4096) == payload

        # an overlapping region and an unknown one are refused
        fd = os.dup(extra.fd)
        try:
            with pytest.raises(BackendError):
                g.fe.add_mem_region(MemoryRegion((64 << 20) + 4096, 4096, 0x7777_0000_0000, 0), fd)
        finally:
            os.close(fd)
        with pytest.raises(BackendError):
            g.fe.remove_mem_region(MemoryRegion(1 << 40, 4096, 0, 0))

        g.fe.remove_mem_region(extra.regions[0])
        assert vd.memfd_mappings() == before
        # the region is gone for the device too: using it breaks the queue
        mark = vd.log_mark()
        hdr = q.buffer(16)
        g.mem.write(hdr, blk_header(BLK_T_IN, 0))
        q.write_desc(0, hdr, 16, DESC_F_NEXT, 1)
        q.write_desc(1, status_gpa, 1, DESC_F_WRITE)
        q.publish(0)
        wait_broken(q)
        vd.wait_log(mark, r"queue 0 marked NEEDS_RESET: .*outside guest memory")
        assert g.status() & STATUS_NEEDS_RESET
    finally:
        extra.close()


def test_status(vd, connect):
    g = connect()
    assert g.status() == 0
    g.fe.set_status(0xF)
    assert g.status() == 0xF
    with pytest.raises(BackendError):
        g.fe.set_status(0x100)
    assert g.status() == 0xF
    g.close()
    assert connect().status() == 0  # a new session starts from scratch


def test_reset_device(vd, connect):
    g = connect()
    drv = g.blk(0)
    blk_roundtrip(vd, drv, 1)
    # break it, so that reset has something to clear
    drv.q.publish(500)
    wait_broken(drv.q)
    g.fe.set_status(0xF)
    assert g.status() == 0xF | STATUS_NEEDS_RESET
    g.fe.reset_device()
    assert g.status() == 0
    drv.submit(BLK_T_IN, 0, in_len=512)
    assert not_served(drv.q)  # rings forgotten
    # memory is kept: features again and a fresh ring, no SET_MEM_TABLE
    g.fe.set_features(g.features)
    drv2 = g.blk(1)
    blk_roundtrip(vd, drv2, 77, 4096, "d0")


# ====================================================================== unknown requests, sessions


def test_unknown_request_with_reply_ack(vd, connect):
    g = connect()
    mark = vd.log_mark()
    g.fe.send(99, b"", flags=VERSION | FLAG_NEED_REPLY)
    reply = g.fe.recv()
    assert reply.request == 99 and unpack_u64(reply.payload) == 1
    vd.wait_log(mark, r"request 99 refused: unknown request code 99")
    io_works(vd, g)


def test_unsupported_request_with_reply_ack(vd, connect):
    g = connect()
    with pytest.raises(BackendError):
        g.fe.request(R.IOTLB_MSG, bytes(64))
    with pytest.raises(BackendError):
        g.fe.request(R.SEND_RARP, bytes(8))
    io_works(vd, g)


def test_unknown_request_without_reply_ack_closes_the_session(vd, connect):
    fe, _ = connect_frontend(vd.socket("d0"))
    mark = vd.log_mark()
    fe.send(99)
    assert_closed_by_daemon(fe)
    fe.close()
    lines = vd.wait_log(mark, r"closing connection: request 99 refused: unknown request code 99")
    assert len(lines) == 1
    vd.wait_log(mark, r"session ended \(protocol error\)")
    io_works(vd, connect())  # a new connection is accepted and works


def test_second_connection_is_refused_while_the_first_works(vd, connect):
    g = connect()
    drv = io_works(vd, g)
    mark = vd.log_mark()
    intruder = Frontend(vd.socket("d0"))
    try:
        assert_closed_by_daemon(intruder)
    finally:
        intruder.close()
    vd.wait_log(mark, r"d0: refused a second front-end .*while one is connected")
    for i in range(3):
        blk_roundtrip(vd, drv, 20 + i, 4096, "d0")
    # the other device is free to take its own front-end meanwhile
    io_works(vd, connect("d1"))


def test_reconnect_after_disconnect(vd, connect):
    g = connect()
    drv = g.blk(0, size=16)
    for i in range(9):
        blk_roundtrip(vd, drv, i, 512)
    g.fe.set_status(0xF)
    assert vd.memfd_mappings() == 1
    g.close()
    wait_until(lambda: vd.memfd_mappings() == 0, what="guest memory to be unmapped")
    g2 = connect()
    assert g2.status() == 0
    drv2 = g2.blk(0, size=16)  # base 0 in fresh memory: the rings were reset
    for i in range(20):
        blk_roundtrip(vd, drv2, 100 + i, 512, "d0")
    assert g2.fe.get_vring_base(0) == 40


def test_abrupt_disconnect_mid_message_then_reconnect(vd, connect):
    fe, _ = connect_frontend(vd.socket("d0"))
    mark = vd.log_mark()
    fe.send_raw(struct.pack("<III", R.SET_VRING_NUM, VERSION, 8) + b"\0\0\0")
    fe.close()
    vd.wait_log(mark, r"disconnected in the middle of a message")
    io_works(vd, connect())


def test_both_devices_serve_at_once(vd, connect):
    a = connect("d0").blk(0)
    b = connect("d1").blk(0)
    for i in range(5):
        blk_roundtrip(vd, a, i * 8, 4096, "d0")
        blk_roundtrip(vd, b, i * 8, 4096, "d1")


# ====================================================================== control changes under load


def test_control_requests_while_io_runs(vd, connect):
    """QEMU may resend the memory table (hotplug) or the ring addresses
    (dirty logging) while the guest does I/O: nothing may be lost."""
    g = connect()
    q = g.queue(0, size=256, arena=4 << 20)
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def io():
        drv = BlkDriver(q)
        try:
            while not stop.is_set():
                sector = 8 * (done[0] % 64)
                data = os.urandom(4096)
                assert drv.write(sector, data) == BLK_S_OK
                status, back = drv.read(sector, 4096)
                assert status == BLK_S_OK and back == data
                done[0] += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=io, daemon=True)
    t.start()
    extra = GuestMemory([(64 << 20, 1 << 20)])
    try:
        for i in range(20):
            fds = [os.dup(g.mem.fd), os.dup(extra.fd)]
            try:  # same memory, plus (or minus) another region
                regions = g.mem.regions + (extra.regions if i % 2 else [])
                g.fe.set_mem_table(regions, fds[: len(regions)])
            finally:
                for fd in fds:
                    os.close(fd)
            g.fe.set_vring_addr(0, q.uva(q.desc), q.uva(q.used), q.uva(q.avail))  # same addresses again
            g.fe.set_vring_call(0, q.call)
            time.sleep(0.005)
    finally:
        stop.set()
        t.join(10)
        extra.close()
    assert not errors, errors
    assert done[0] > 5 and not g.status() & STATUS_NEEDS_RESET


def test_sigterm_with_sessions_attached(vhostd_factory):
    """Stopping the daemon under live sessions (one of them broken) is clean:
    exit status 0 and no traceback (checked by the fixture)."""
    vd = vhostd_factory([{"name": "a"}, {"name": "b"}])
    a, b = vd.connect("a"), vd.connect("b")
    drv = a.blk(0)
    blk_roundtrip(vd, drv, 1, 4096, "a")
    qb = b.queue(0)
    qb.publish(4000)
    wait_broken(qb)
    for i in range(16):
        drv.submit(BLK_T_IN, i, in_len=4096)
    assert vd.stop() == 0
    for g in (a, b):
        g.close(wait=False)
    assert "session ended (daemon stopping)" in vd.log()
