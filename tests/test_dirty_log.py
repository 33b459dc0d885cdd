"""Dirty-page logging for live migration (vhost-user "Migration"): while the
front-end has VHOST_F_LOG_ALL acked and a log mapped (SET_LOG_BASE), every
byte the daemon writes into guest memory is marked in the log, one bit per
4 KiB page: used rings (VHOST_VRING_F_LOG), blk read data and status bytes,
net rx frames, also when the I/O completes later.  The log and its
description are hostile input like everything else."""

from __future__ import annotations

import mmap
import os
import select
import struct

import pytest

from conftest import Guest, wait_broken
from test_hostile import assert_closed_by_daemon
from vhostd.frontend import BackendError
from vhostd.protocol.codec import MemoryRegion
from vhostd.protocol.constants import F_LOG_ALL, VRING_F_LOG
from virtio_driver import BLK_S_OK, BLK_T_IN, BLK_T_OUT

PAGE = 4096
MEM = 16 << 20
LOG_BYTES = MEM // PAGE // 8  # covers the test guest's 16 MiB


class Log:
    """The front-end's dirty bitmap: a memfd it hands the daemon."""

    def __init__(self, size: int = LOG_BYTES, file_size: int | None = None) -> None:
        self.size = size
        self.fd = os.memfd_create("test-dirty-log", os.MFD_CLOEXEC)
        file_size = size if file_size is None else file_size
        os.ftruncate(self.fd, file_size)
        self.map = mmap.mmap(self.fd, file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def give_to(self, g: Guest, offset: int = 0) -> None:
        fd = os.dup(self.fd)
        try:
            g.fe.set_log_base(fd, self.size, offset)
        finally:
            os.close(fd)

    def pages(self) -> set[int]:
        bits = self.map[: self.size]
        return {i * 8 + b for i, byte in enumerate(bits) if byte for b in range(8) if byte >> b & 1}

    def clear(self) -> None:
        self.map[: self.size] = bytes(self.size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def connect(vd, name: str) -> Guest:
    """A session that has not acked VHOST_F_LOG_ALL yet, like QEMU's before a migration."""
    return vd.connect(name, features=(1 << 64) - 1 - (1 << F_LOG_ALL))


def pages_of(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


def start_logging(g: Guest, log: Log, queues) -> None:
    """What QEMU does when a migration starts: the log, LOG_ALL, the rings' log flag."""
    log.give_to(g)
    g.fe.set_features(g.features | 1 << F_LOG_ALL)
    for q in queues:
        g.fe.set_vring_addr(q.index, q.uva(q.desc), q.uva(q.used), q.uva(q.avail), flags=VRING_F_LOG, log=q.used)


@pytest.fixture
def log():
    lg = Log()
    yield lg
    lg.close()


def used_ring(q) -> set[int]:
    return pages_of(q.used, 6 + 8 * q.size)


def test_logging_is_offered(vhostd_factory):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    assert g.offered >> F_LOG_ALL & 1
    g.close()


def test_reads_mark_their_buffers_and_the_used_ring(vhostd_factory, log):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    drv = g.blk(0)
    q = drv.q
    data = os.urandom(3 * PAGE)
    assert drv.write(8, data) == BLK_S_OK
    assert log.pages() == set()
    start_logging(g, log, [q])
    head, bufs, lens = drv.submit(BLK_T_IN, 8, in_len=len(data))
    q.wait_used(1)
    assert g.mem.read(bufs[0], len(data)) == data and g.mem.read(bufs[1], 1)[0] == BLK_S_OK
    written = pages_of(bufs[0], len(data)) | pages_of(bufs[1], 1)
    marked = log.pages()
    assert written | (used_ring(q) & marked) == marked  # nothing else
    assert written <= marked and marked & used_ring(q)
    g.close()


def test_writes_mark_only_their_status_byte_and_the_used_ring(vhostd_factory, log):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    drv = g.blk(0)
    start_logging(g, log, [drv.q])
    head, bufs, lens = drv.submit(BLK_T_OUT, 0, os.urandom(4 * PAGE))
    drv.q.wait_used(1)
    status = bufs[-1]
    assert pages_of(status, 1) <= log.pages() <= pages_of(status, 1) | used_ring(drv.q)
    g.close()


def test_packed_rings_mark_the_descriptors_they_write(vhostd_factory, log):
    """A packed ring has no used ring: the device writes its used descriptors
    into the descriptor ring (and kick suppression into its event area), and
    those pages are what the log must show, with the data and status bytes."""
    vd = vhostd_factory([{"name": "d0", "size": "4M", "queue_size": 1024}])
    g = vd.connect("d0", features=(1 << 64) - 1 - (1 << F_LOG_ALL), packed=True)
    drv = g.blk(0, size=1024)  # a 16 KiB descriptor ring: four pages
    q = drv.q
    assert q.packed
    data = os.urandom(3 * PAGE)
    for i in range(100):  # the used position into the ring's second page
        assert drv.write(8, data) == BLK_S_OK
    start_logging(g, log, [q])
    pos = q.next_avail
    head, bufs, lens = drv.submit(BLK_T_IN, 8, in_len=len(data))
    q.wait_used(1)
    assert g.mem.read(bufs[0], len(data)) == data and g.mem.read(bufs[1], 1)[0] == BLK_S_OK
    written = pages_of(bufs[0], len(data)) | pages_of(bufs[1], 1)
    used_desc = pages_of(q.desc + 16 * pos, 16)
    assert used_desc != pages_of(q.desc, 1)
    marked = log.pages()
    assert written | used_desc <= marked <= written | used_desc | pages_of(q.used, 4)
    g.close()


def test_nothing_is_marked_without_log_all_or_after_it_is_dropped(vhostd_factory, log):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    drv = g.blk(0)
    log.give_to(g)  # mapped, but LOG_ALL not acked
    assert drv.read(0, PAGE)[0] == BLK_S_OK
    assert log.pages() == set()
    start_logging(g, log, [drv.q])
    assert drv.read(0, PAGE)[0] == BLK_S_OK
    assert log.pages()
    g.fe.set_features(g.features)  # migration cancelled
    log.clear()  # (after: the worker may mark the used ring once more as it re-arms notifications)
    assert drv.read(0, PAGE)[0] == BLK_S_OK
    assert log.pages() == set()
    g.close()


def test_used_ring_is_logged_only_with_the_ring_flag(vhostd_factory, log):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    drv = g.blk(0)
    log.give_to(g)
    g.fe.set_features(g.features | 1 << F_LOG_ALL)  # no VHOST_VRING_F_LOG on the ring
    head, bufs, _ = drv.submit(BLK_T_IN, 0, in_len=PAGE)
    drv.q.wait_used(1)
    assert log.pages() == pages_of(bufs[0], PAGE) | pages_of(bufs[1], 1)
    g.close()


def test_the_log_fd_is_written_after_a_batch_that_marked(vhostd_factory, log):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    drv = g.blk(0)
    efd = g.eventfd()
    g.fe.set_log_fd(os.dup(efd))
    start_logging(g, log, [drv.q])
    assert drv.read(0, PAGE)[0] == BLK_S_OK
    assert select.select([efd], [], [], 2)[0]
    g.close()


def test_a_new_log_replaces_the_old_one(vhostd_factory, log):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    drv = g.blk(0)
    start_logging(g, log, [drv.q])
    bigger = Log(2 * LOG_BYTES)
    try:
        bigger.give_to(g)  # QEMU resizes the log when guest memory grows
        log.clear()
        assert drv.read(0, PAGE)[0] == BLK_S_OK
        assert log.pages() == set() and bigger.pages()
    finally:
        g.close()
        bigger.close()


def test_net_rx_frames_are_logged(vhostd_factory, log):
    from net_driver import NetDriver, eth

    vd = vhostd_factory([{"name": "n0", "type": "net", "backend": "loopback"}])
    g = connect(vd, "n0")
    d = NetDriver(g)
    start_logging(g, log, [d.rx[0], d.tx[0]])
    chains = [d._posted[0][h] for h in d.post_rx(4)]
    frame = eth(b"\xff" * 6, b"\x02" * 6, 0x88B5, os.urandom(900))
    d.send(frame)
    assert d.recv().frame == frame
    marked = log.pages()
    assert any(all(pages_of(a, n) <= marked for a, n in chain) for chain in chains)  # the buffer it filled
    assert marked & used_ring(d.rx[0])
    g.close()


# ---------------------------------------------------------------- hostile logs


def refused(vd, g: Guest, mark: int, why: str) -> None:
    """A log the daemon cannot use closes the session (QEMU would otherwise
    migrate on a log nobody fills), with one line saying why."""
    assert_closed_by_daemon(g.fe)
    vd.wait_log(mark, rf"SET_LOG_BASE refused: {why}")


@pytest.mark.parametrize("size, file_size, offset, why", [
    (LOG_BYTES // 2, None, 0, r"dirty log of 256 bytes covers 0x800000 bytes of guest memory; the memory table "
                              r"reaches 0x1000000"),
    (LOG_BYTES, LOG_BYTES // 2, 0, r"dirty log fd is not a memory file of at least 512 bytes"),
    (LOG_BYTES, None, 100, r"dirty log mmap offset 0x64 is not page aligned"),
    (0, None, 0, r"dirty log of 0 bytes"),
    (1 << 40, None, 0, r"dirty log of 1099511627776 bytes \(at most"),
])
def test_a_log_that_does_not_fit_is_refused(vhostd_factory, size, file_size, offset, why):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    lg = Log(LOG_BYTES, file_size)
    mark = vd.log_mark()
    fd = os.dup(lg.fd)
    try:
        with pytest.raises((BackendError, OSError)):
            g.fe.set_log_base(fd, size, offset)
        refused(vd, g, mark, why)
    finally:
        os.close(fd)
        lg.close()
        g.close()
    vd.connect("d0").close()  # the device serves the next front-end


def test_a_log_that_is_not_a_memory_file_is_refused(vhostd_factory):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    r, w = os.pipe()
    mark = vd.log_mark()
    try:
        with pytest.raises((BackendError, OSError)):
            g.fe.set_log_base(r, LOG_BYTES)
        refused(vd, g, mark, "dirty log fd is not a memory file")
    finally:
        os.close(r)
        os.close(w)
        g.close()


def test_a_used_ring_logged_beyond_the_log_is_refused(vhostd_factory, log):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    drv = g.blk(0)
    q = drv.q
    log.give_to(g)
    with pytest.raises(BackendError):
        g.fe.set_vring_addr(0, q.uva(q.desc), q.uva(q.used), q.uva(q.avail), flags=VRING_F_LOG, log=MEM)
    g.fe.set_features(g.features | 1 << F_LOG_ALL)
    assert drv.read(0, PAGE)[0] == BLK_S_OK  # the ring runs on, unlogged
    g.close()


def test_guest_memory_added_beyond_the_log_breaks_the_queue_not_the_log(vhostd_factory, log):
    """A region the log does not cover (the front-end did not resize it):
    a write there fails the queue, no byte outside the log is touched."""
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    drv = g.blk(0)
    start_logging(g, log, [drv.q])
    extra = os.memfd_create("extra", os.MFD_CLOEXEC)
    os.ftruncate(extra, 1 << 20)
    area = mmap.mmap(extra, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        from virtio_driver import _address_of

        g.fe.add_mem_region(MemoryRegion(MEM * 4, 1 << 20, _address_of(area), 0), extra)
        q = drv.q
        mark = vd.log_mark()
        # a read whose data buffer lies in the new region
        hdr, status = q.buffer(16), q.buffer(1)
        g.mem.write(hdr, struct.pack("<IIQ", BLK_T_IN, 0, 0))
        ids = [q.free.pop(0) for _ in range(3)]
        q.write_desc(ids[0], hdr, 16, 1, ids[1])
        q.write_desc(ids[1], MEM * 4, PAGE, 3, ids[2])
        q.write_desc(ids[2], status, 1, 2)
        q.publish(ids[0])
        wait_broken(q)
        vd.wait_log(mark, r"beyond the dirty log of 512 bytes")
    finally:
        area.close()
        os.close(extra)
        g.close()


def test_a_log_truncated_under_the_daemon_breaks_the_queue_not_the_daemon(vhostd_factory):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    g = connect(vd, "d0")
    drv = g.blk(0)
    lg = Log(LOG_BYTES, file_size=LOG_BYTES)
    try:
        start_logging(g, lg, [drv.q])
        os.ftruncate(lg.fd, 0)  # the pages behind the daemon's mapping are gone
        mark = vd.log_mark()
        drv.submit(BLK_T_IN, 0, in_len=PAGE)
        wait_broken(drv.q)
        vd.wait_log(mark, r"faulted \(SIGBUS\)")
    finally:
        g.close()
        lg.map.close()
        os.close(lg.fd)
    vd.connect("d0").close()
