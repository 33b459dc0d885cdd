"""The ring layer itself, request by request, in both layouts (split, virtio
1.2 section 2.7; packed, section 2.8).

One queue of a native device is served by hand through the probe API
(vd_probe_pop/push/publish/notify in vhostd/native/probe.c): the test plays
the device, tests/virtio_driver.py's SplitQueue/PackedQueue play the driver,
both on one memfd that the device maps for itself like the daemon does.  So
every step is visible: which chain the device takes, what it reads, when a
used entry becomes visible, when the call eventfd is signalled and what the
device writes to ask for (or suppress) kicks.  Everything runs in this
process (no daemon), in a few seconds, and under the sanitizer job too
(scripts/sanitize.sh).  VHOSTD_RING_EXAMPLES raises the number of random
rings (default 150 per layout).

The queues are made device-driven without an rx_kick
(vd_device_set_rx_queues(d, mask, NULL)) so that the engine's worker never
serves them; its one visit, for the poke a queue gets when it starts, only
suppresses kicks (the rig waits for it before a test begins).
"""

from __future__ import annotations

import os
import random
import re
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import wait_until
from vhostd.frontend import make_eventfd
from vhostd.dataplane import DataPlaneError, _call
from vhostd.native import ffi, lib
from virtio_driver import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT as IND,
    DESC_F_NEXT as NEXT,
    DESC_F_WRITE as WRITE,
    EVENT_F_DESC,
    EVENT_F_DISABLE,
    EVENT_F_ENABLE,
    PACKED_F_AVAIL,
    PACKED_F_USED,
    USED_F_NO_NOTIFY,
    GuestMemory,
    PackedQueue,
    SplitQueue,
    Used,
)

F_INDIRECT, F_EVENT_IDX, F_VERSION_1, F_PACKED = 28, 29, 32, 34
ERRLEN = 256
MAX_QUEUE = 1024  # the devices' max_queue_size: also the chain limit
ALL_QUEUES = (1 << 64) - 1
MAX_BUFS = 2048
LAYOUTS = ["split", "packed"]
packed_only = pytest.mark.parametrize("layout", ["packed"])
split_only = pytest.mark.parametrize("layout", ["split"])


@dataclass
class Chain:
    """A chain as the device took it (vd_probe_pop)."""

    id: int
    ndesc: int
    nout: int
    nin: int
    out_bytes: int
    in_bytes: int
    bufs: list[tuple[int, int]] = field(default_factory=list)  # (host address in the device's mapping, len)

    def read_out(self) -> bytes:
        """The device-readable bytes, read through the device's own mapping."""
        return b"".join(ffi.buffer(ffi.cast("char *", h), n)[:] for h, n in self.bufs[: self.nout])

    def write_in(self, data: bytes) -> int:
        """Fill the device-writable buffers in order; returns the bytes written."""
        done = 0
        for h, n in self.bufs[self.nout :]:
            piece = data[done : done + n]
            if not piece:
                break
            ffi.memmove(ffi.cast("char *", h), piece, len(piece))
            done += len(piece)
        return done


class Rig:
    """A native device whose queues the test serves (the device side) and the
    driver queues on the guest memory it maps (the driver side)."""

    def __init__(self, engine, layout: str, features: int | None = None, nqueues: int = 2,
                 mem_size: int = 4 << 20, mem_layout: list[tuple[int, int]] | None = None) -> None:
        self.packed = layout == "packed"
        if features is None:
            features = (1 << F_INDIRECT) | (1 << F_EVENT_IDX)
        self.features = features | (1 << F_VERSION_1) | ((1 << F_PACKED) if self.packed else 0)
        self.event_fd = make_eventfd()
        self.dev = lib.vd_device_new(engine, nqueues, MAX_QUEUE, ffi.NULL, ffi.NULL, 0, ffi.NULL, self.event_fd, -1)
        assert self.dev != ffi.NULL
        lib.vd_device_set_rx_queues(self.dev, ALL_QUEUES, ffi.NULL)
        lib.vd_device_set_features(self.dev, self.features)
        self.mem = GuestMemory(mem_layout, size=mem_size)
        regions = ffi.new("struct vd_region_desc[]", len(self.mem.regions))
        for d, r in zip(regions, self.mem.regions):
            d.gpa, d.size, d.uva, d.mmap_offset = r.guest_addr, r.size, r.user_addr, r.mmap_offset
        _call(lib.vd_mem_set_table, self.dev, len(self.mem.regions), regions, ffi.new("int[]", self.mem.fds()))
        self.queues: dict[int, SplitQueue | PackedQueue] = {}

    def close(self) -> None:
        lib.vd_device_free(self.dev)
        os.close(self.event_fd)
        for q in self.queues.values():
            q.close()
            os.close(q.err)
        self.mem.close()

    # ------------------------------------------------------------ the control plane's steps
    def queue(self, i: int = 0, size: int = 16, arena: int = 256 << 10, start: bool = True):
        q = (PackedQueue if self.packed else SplitQueue)(self.mem, size, arena=arena)
        q.err = make_eventfd()
        self.queues[i] = q
        if start:
            self.start(i)
        return q

    def start(self, i: int, base: int | None = None) -> None:
        """SET_VRING_NUM/ADDR/BASE/CALL/ERR/ENABLE/KICK, as a front-end sends
        them; returns once the worker has seen the start-up poke."""
        q = self.queues[i]
        _call(lib.vd_queue_set_num, self.dev, i, q.size)
        _call(lib.vd_queue_set_addr, self.dev, i, q.uva(q.desc), q.uva(q.used), q.uva(q.avail), 0, 0)
        _call(lib.vd_queue_set_base, self.dev, i, q.ring_base() if base is None else base)
        _call(lib.vd_queue_set_call, self.dev, i, os.dup(q.call))
        _call(lib.vd_queue_set_err, self.dev, i, os.dup(q.err))
        _call(lib.vd_queue_set_enable, self.dev, i, 1)
        self.kick_start(i)

    def kick_start(self, i: int) -> None:
        """SET_VRING_KICK starts the queue and pokes it; the worker's visit
        (kicks suppressed, as for a device-driven queue) is over when it has
        counted the kick."""
        kicks = self.info(i).kicks
        _call(lib.vd_queue_set_kick, self.dev, i, os.dup(self.queues[i].kick))
        wait_until(lambda: self.info(i).kicks > kicks, what="the worker to see the start-up poke")

    def get_base(self, i: int) -> int:
        """GET_VRING_BASE: drain (nothing is pending here), then stop and read."""
        pending = ffi.new("uint32_t *")
        _call(lib.vd_queue_drain, self.dev, i, pending)
        assert pending[0] == 0
        base = ffi.new("uint32_t *")
        _call(lib.vd_queue_get_base, self.dev, i, base)
        return base[0]

    def set_base(self, i: int, base: int) -> None:
        _call(lib.vd_queue_set_base, self.dev, i, base)

    def info(self, i: int = 0):
        out = ffi.new("struct vd_queue_info *")
        assert lib.vd_queue_get_stats(self.dev, i, out) == 0
        return out

    def errors(self) -> list[tuple[int, str]]:
        out, buf = [], ffi.new("char[]", ERRLEN)
        while (q := lib.vd_device_take_error(self.dev, buf, ERRLEN)) >= 0:
            out.append((q, ffi.string(buf).decode(errors="replace")))
        return out

    @property
    def needs_reset(self) -> bool:
        return bool(lib.vd_device_needs_reset(self.dev))

    # ------------------------------------------------------------ the device's side
    def pop_raw(self, i: int = 0) -> tuple[int, Chain | None]:
        c = ffi.new("struct vd_probe_chain *")
        bufs = ffi.new("struct vd_probe_buf[]", MAX_BUFS)
        r = lib.vd_probe_pop(self.dev, i, c, bufs, MAX_BUFS)
        if r != 1:
            return r, None
        n = c.nout + c.nin
        assert n <= MAX_BUFS
        return r, Chain(c.id, c.ndesc, c.nout, c.nin, c.out_bytes, c.in_bytes,
                        [(bufs[k].host, bufs[k].len) for k in range(n)])

    def pop(self, i: int = 0) -> Chain | None:
        r, c = self.pop_raw(i)
        assert r >= 0, f"queue {i} broke: {self.errors()}"
        return c

    def push(self, c: Chain, length: int = 0, i: int = 0) -> None:
        lib.vd_probe_push(self.dev, i, c.id, c.ndesc, length)

    def publish(self, i: int = 0) -> None:
        lib.vd_probe_publish(self.dev, i)

    def notify(self, on: bool, i: int = 0) -> int:
        return lib.vd_probe_notify(self.dev, i, int(on))

    def complete(self, c: Chain, length: int = 0, i: int = 0) -> None:
        self.push(c, length, i)
        self.publish(i)


@pytest.fixture(scope="module")
def engine():
    e = lib.vd_engine_new(1)
    assert e != ffi.NULL
    yield e
    lib.vd_engine_free(e)


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


@pytest.fixture
def rig(engine, layout):
    made: list[Rig] = []

    def make(**kw) -> Rig:
        r = Rig(engine, layout, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def signals(q) -> int:
    """Signals on the call eventfd since the last look (0 or the count)."""
    return q.call_pending()


def used_position(q) -> tuple[int, int]:
    return (q.last_used, q.used_wrap) if q.packed else (q.last_used, 0)


# ====================================================================== chains


def test_single_descriptor_chain(rig):
    r = rig()
    q = r.queue()
    assert r.pop() is None  # nothing available yet
    head, _ = q.add([b"hello, device"], [], kick=False)
    c = r.pop()
    assert (c.id, c.ndesc, c.nout, c.nin, c.out_bytes, c.in_bytes) == (head, 1, 1, 0, 13, 0)
    assert c.read_out() == b"hello, device"
    assert r.pop() is None  # taken once
    assert q.poll_used() == []
    r.complete(c, 0)
    assert q.poll_used() == [Used(head, 0)]
    st = r.info()
    assert (st.last_avail, st.used_idx, bool(st.packed)) == ((1, 1, True) if r.packed else (1, 1, False))


def test_multi_descriptor_chain(rig):
    r = rig()
    q = r.queue()
    head, (w1, w2) = q.add([b"abc", b"defgh"], [100, 200], kick=False)
    c = r.pop()
    assert (c.id, c.ndesc, c.nout, c.nin, c.out_bytes, c.in_bytes) == (head, 4 if r.packed else 1, 2, 2, 8, 300)
    assert c.read_out() == b"abcdefgh"
    reply = os.urandom(300)
    assert c.write_in(reply) == 300
    r.complete(c, 300)
    assert q.poll_used() == [Used(head, 300)]
    assert q.mem.read(w1, 100) + q.mem.read(w2, 200) == reply


def test_indirect_chain(rig):
    r = rig()
    q = r.queue()
    out = [bytes([i]) * (i + 1) for i in range(6)]
    head, wbufs = q.add(out, [64, 64, 1], indirect=True, kick=False)
    if r.packed:
        assert q.next_avail == 1  # one ring descriptor, the table
    c = r.pop()
    assert (c.id, c.ndesc, c.nout, c.nin, c.in_bytes) == (head, 1, 6, 3, 129)
    assert c.read_out() == b"".join(out)
    c.write_in(b"\x77" * 129)
    r.complete(c, 129)
    assert q.poll_used() == [Used(head, 129)]
    assert all(q.mem.read(a, 1) == b"\x77" for a in wbufs)


@packed_only
def test_packed_indirect_table_is_read_sequentially(rig):
    """2.8.19: a packed indirect table's entries follow each other; their
    NEXT flags and next/id fields mean nothing."""
    r = rig()
    q = r.queue()
    a, b, w = q.buffer(4), q.buffer(4), q.buffer(8)
    q.mem.write(a, b"AAAA")
    q.mem.write(b, b"BBBB")
    table = q.buffer(48)
    q.write_desc(0, a, 4, NEXT, buf_id=7, table=table)  # NEXT: ignored
    q.write_desc(1, b, 4, 0, buf_id=9, table=table)  # no NEXT: the table goes on anyway
    q.write_desc(2, w, 8, WRITE | NEXT, buf_id=0xFFFF, table=table)
    bid = q.post([(table, 48, IND)], kick=False)
    c = r.pop()
    assert (c.id, c.ndesc, c.nout, c.nin, c.out_bytes, c.in_bytes) == (bid, 1, 2, 1, 8, 8)
    assert c.read_out() == b"AAAABBBB"
    r.complete(c, 8)
    assert q.poll_used() == [Used(bid, 8)]


@packed_only
def test_packed_buffer_id_comes_from_the_last_descriptor(rig):
    r = rig()
    q = r.queue()
    descs = [(q.buffer(16), 16, NEXT), (q.buffer(16), 16, NEXT), (q.buffer(1), 1, WRITE)]
    bid = q.post(descs, 5, ids=[999, 0xFFFF, 5], kick=False)  # only the last one's id counts
    c = r.pop()
    assert (c.id, c.ndesc) == (bid, 3) == (5, 3)
    r.complete(c, 1)
    assert q.poll_used() == [Used(5, 1)]
    assert (q.last_used, q.used_wrap) == (3, 1)


def test_zero_length_buffers_take_no_iovec(rig):
    r = rig()
    q = r.queue()
    head, _ = q.add([b"", b"x"], [0, 4], kick=False)
    c = r.pop()
    assert (c.nout, c.nin, c.out_bytes, c.in_bytes, c.read_out()) == (1, 1, 1, 4, b"x")
    r.complete(c, 0)
    assert q.poll_used() == [Used(head, 0)]


def test_buffer_across_two_memory_regions(rig):
    """A buffer that runs from one memory region into the next: two iovecs
    (the device maps each region on its own)."""
    r = rig(mem_layout=[(0, 1 << 20), (1 << 20, 1 << 20)])
    q = r.queue(size=8, arena=64 << 10)
    data = os.urandom(4096)
    at = (1 << 20) - 1000
    r.mem.write(at, data[:1000])
    r.mem.write(1 << 20, data[1000:])
    if r.packed:
        bid = q.post([(at, 4096, 0)], kick=False)
    else:
        q.write_desc(0, at, 4096, 0)
        q.free.remove(0)
        q.chains[0] = [0]
        q.publish(0, kick=False)
        bid = 0
    c = r.pop()
    assert (c.id, c.nout, c.out_bytes) == (bid, 2, 4096)
    assert [n for _, n in c.bufs] == [1000, 3096]
    assert c.read_out() == data
    r.complete(c)
    assert q.poll_used() == [Used(bid, 0)]


# ====================================================================== order and laps


def test_out_of_order_completion(rig):
    r = rig()
    q = r.queue(size=16)
    lens = [1, 3, 2, 4]  # descriptors per chain
    heads = [q.add([bytes([k])] * n, [], kick=False)[0] for k, n in enumerate(lens)]
    taken = [r.pop() for _ in lens]
    assert [c.id for c in taken] == heads
    assert [c.ndesc for c in taken] == (lens if r.packed else [1] * 4)
    order = [2, 0, 3, 1]
    for k in order:
        r.push(taken[k], 10 + k)
    r.publish()
    assert q.poll_used() == [Used(heads[k], 10 + k) for k in order]
    if r.packed:
        # one used descriptor per chain, each where the one before it ended
        pos = 0
        for k in order:
            _, length, bid, flags = q.read_desc(pos)
            assert (bid, length, flags & (PACKED_F_AVAIL | PACKED_F_USED)) == (heads[k], 10 + k,
                                                                               PACKED_F_AVAIL | PACKED_F_USED)
            pos += lens[k]
        assert (q.last_used, q.used_wrap) == (sum(lens), 1)
        assert r.info().used_idx == sum(lens)
    else:
        assert q.used_idx() == 4


@pytest.mark.parametrize("size", [8, 16])
def test_wrap_around_over_several_laps(rig, size):
    """Chains of odd lengths (1, 3, 5 descriptors, some indirect) kept in
    flight and completed in a random order, until the ring has gone round
    several times; every byte each way checked."""
    r = rig()
    q = r.queue(size=size, arena=512 << 10)
    rng = random.Random(size)
    held: list[tuple[Chain, bytes, list[int], int]] = []
    expect: dict[int, tuple[list[int], int, bytes]] = {}
    done = 0
    wraps_seen = set()
    while done < 40 * size // 3:
        n = rng.choice([1, 3, 5])
        indirect = rng.random() < 0.2
        nin = n // 2
        out = [os.urandom(rng.randrange(1, 64)) for _ in range(n - nin)]
        in_lens = [rng.randrange(1, 64) for _ in range(nin)]
        need = 1 if indirect else n
        room = q.num_free if q.packed else len(q.free)
        if room >= need and rng.random() < 0.6:
            head, wbufs = q.add(out, in_lens, indirect=indirect, kick=False)
            c = r.pop()
            assert c.id == head and c.ndesc == (need if r.packed else 1)
            assert c.read_out() == b"".join(out)
            reply = os.urandom(sum(in_lens))
            assert c.write_in(reply) == len(reply)
            held.append((c, reply, wbufs, len(reply)))
            expect[head] = (in_lens, len(reply), reply)
        elif held:
            batch = [held.pop(rng.randrange(len(held))) for _ in range(min(len(held), rng.randrange(1, 4)))]
            for c, _, _, length in batch:
                r.push(c, length)
            r.publish()
            got = q.poll_used()
            assert [u.head for u in got] == [c.id for c, _, _, _ in batch]
            for (c, reply, wbufs, length), u in zip(batch, got):
                assert u.length == length
                lens_, _, _ = expect.pop(c.id)
                assert b"".join(q.mem.read(a, k) for a, k in zip(wbufs, lens_)) == reply
            done += len(batch)
        if r.packed:
            wraps_seen.add((q.avail_wrap, q.used_wrap))
    for c, _, _, length in held:
        r.push(c, length)
    r.publish()
    assert len(q.poll_used()) == len(held)
    assert r.pop() is None
    st = r.info()
    if r.packed:
        assert wraps_seen >= {(1, 1), (0, 1), (0, 0), (1, 0)}  # both counters flipped, several times
        assert (st.last_avail, st.used_idx) == (q.next_avail, q.last_used)
        base = r.get_base(0)
        assert base == q.next_avail | q.avail_wrap << 15 | q.last_used << 16 | q.used_wrap << 31
    else:
        assert st.last_avail == st.used_idx == q.avail_idx == q.last_used
        assert r.get_base(0) == q.avail_idx


def test_a_full_ring(rig):
    """As many chains as the ring holds, all in flight, then all completed."""
    r = rig()
    q = r.queue(size=16)
    heads = [q.add([b"x"], [], kick=False)[0] for _ in range(16)]
    with pytest.raises(IndexError):
        q.add([b"one too many"], [], kick=False)
    taken = [r.pop() for _ in range(16)]
    assert r.pop() is None and [c.id for c in taken] == heads
    for c in reversed(taken):
        r.push(c, 1)
    r.publish()
    assert [u.head for u in q.poll_used()] == heads[::-1]
    # and the ring goes on: the next lap
    head, _ = q.add([b"y"], [], kick=False)
    r.complete(r.pop())
    assert q.poll_used() == [Used(head, 0)]
    if r.packed:
        assert (q.next_avail, q.avail_wrap, q.last_used, q.used_wrap) == (1, 0, 1, 0)


# ====================================================================== batches


def test_batched_publication(rig):
    """Used entries pushed are not the driver's until publish, and then all at once."""
    r = rig()
    q = r.queue(size=16)
    lens = [2, 1, 3]
    heads = [q.add([b"a"] * n, [], kick=False)[0] for n in lens]
    taken = [r.pop() for _ in lens]
    for c in (taken[1], taken[2], taken[0]):
        r.push(c, 5)
    assert q.poll_used() == [] and not q.has_used() and signals(q) == 0
    if r.packed:
        # the batch's later descriptors are written already; its first one's flags hold it back
        _, length, bid, flags = q.read_desc(lens[1])
        assert (bid, length, flags & (PACKED_F_AVAIL | PACKED_F_USED)) == (heads[2], 5, PACKED_F_AVAIL | PACKED_F_USED)
        _, length, bid, flags = q.read_desc(0)
        assert (bid, length) == (heads[1], 5) and flags & (PACKED_F_AVAIL | PACKED_F_USED) != (
            PACKED_F_AVAIL | PACKED_F_USED)
    else:
        assert q.used_idx() == 0
    r.publish()
    assert [u.head for u in q.poll_used()] == [heads[1], heads[2], heads[0]]
    assert signals(q) == 1  # one signal for the batch
    r.publish()  # nothing new: no signal
    assert signals(q) == 0


def test_a_batch_that_wraps(rig):
    """A batch whose used entries run over the end of the ring: its first
    flags (written last) are in the old lap, the others in the new one."""
    r = rig()
    q = r.queue(size=8)
    for _ in range(6):
        q.add([b"x"], [], kick=False)
        r.complete(r.pop())
    q.poll_used()
    heads = [q.add([b"y"], [], kick=False)[0] for _ in range(4)]
    taken = [r.pop() for _ in range(4)]
    for c in taken:
        r.push(c, 2)
    assert not q.has_used()
    r.publish()
    assert [u.head for u in q.poll_used()] == heads
    if r.packed:
        assert (q.last_used, q.used_wrap) == (2, 0)
        assert [q.read_desc(p)[3] & (PACKED_F_AVAIL | PACKED_F_USED) for p in (6, 7, 0, 1)] == \
            [PACKED_F_AVAIL | PACKED_F_USED] * 2 + [0] * 2


# ====================================================================== interrupts (device -> driver)


def complete_one(r: Rig, q, n: int = 1) -> int:
    """One chain of n descriptors through the ring; the signals it caused."""
    q.add([b"z"] * n, [], kick=False)
    r.complete(r.pop())
    assert len(q.poll_used()) == 1
    return signals(q)


def test_driver_disables_interrupts(rig):
    """Without EVENT_IDX: split NO_INTERRUPT, packed DISABLE; back on, every publish signals."""
    r = rig(features=1 << F_INDIRECT)
    q = r.queue()
    assert complete_one(r, q) == 1
    q.set_avail_flags(AVAIL_F_NO_INTERRUPT if not r.packed else EVENT_F_DISABLE)
    assert [complete_one(r, q) for _ in range(3)] == [0, 0, 0]
    q.set_avail_flags(0 if not r.packed else EVENT_F_ENABLE)
    assert [complete_one(r, q) for _ in range(2)] == [1, 1]


@packed_only
def test_packed_disable_holds_with_event_idx(rig):
    r = rig()
    q = r.queue()
    q.set_driver_event(EVENT_F_DISABLE, 0)
    assert [complete_one(r, q) for _ in range(20)] == [0] * 20  # round the ring and more
    q.set_driver_event(EVENT_F_ENABLE)
    assert complete_one(r, q) == 1


def name_entry(q, k: int, lens: list[int]) -> None:
    """Ask for a signal at the k-th used entry from now (split: used_event;
    packed: a DESC event at the position that entry will be written, given
    the descriptors of the chains before it)."""
    if not q.packed:
        q.set_used_event((q.last_used + k) & 0xFFFF)
        return
    pos, wrap = q.last_used + sum(lens[:k]), q.used_wrap
    while pos >= q.size:
        pos -= q.size
        wrap ^= 1
    q.set_driver_event(EVENT_F_DESC, pos | wrap << 15)


def test_event_idx_signals_exactly_at_the_named_entry(rig):
    r = rig()
    q = r.queue(size=16)
    lens = [1, 3, 2, 1, 2, 3, 1, 1]  # packed: each used entry lands where the one before it ended
    name_entry(q, 5, lens)
    got = [complete_one(r, q, n) for n in lens]
    assert got == [0, 0, 0, 0, 0, 1, 0, 0]
    # a batch that crosses the named entry: one signal
    lens = [2, 1, 2, 1]
    name_entry(q, 2, lens)
    for n in lens:
        q.add([b"b"] * n, [], kick=False)
    taken = [r.pop() for _ in lens]
    for c in taken[:2]:
        r.push(c)
    r.publish()  # entries 0 and 1: not yet
    assert signals(q) == 0
    for c in taken[2:]:
        r.push(c)
    r.publish()  # entries 2 and 3: the named one is among them
    assert signals(q) == 1
    assert len(q.poll_used()) == 4
    # an entry named behind the device: no signal (until the index comes round again)
    if r.packed:
        q.set_driver_event(EVENT_F_DESC, (q.last_used - 1) % q.size | (q.used_wrap if q.last_used else
                                                                         q.used_wrap ^ 1) << 15)
    else:
        q.set_used_event((q.last_used - 1) & 0xFFFF)
    assert [complete_one(r, q) for _ in range(3)] == [0, 0, 0]


@packed_only
def test_packed_event_wrap_counter_names_the_lap(rig):
    """The event's wrap bit says which lap: position 3 of the wrong lap is not yet."""
    r = rig()
    q = r.queue(size=8)
    q.set_driver_event(EVENT_F_DESC, 3 | 0 << 15)  # position 3 in the second lap (wrap counter 0)
    got = [complete_one(r, q) for _ in range(16)]
    assert got == [0] * 8 + [0, 0, 0, 1] + [0] * 4  # written at lap 0's position 3: the 12th completion
    q.set_driver_event(EVENT_F_DESC, 5 | 1 << 15)  # position 5 of the third lap (wrap 1 again)
    got = [complete_one(r, q) for _ in range(8)]
    assert got == [0, 0, 0, 0, 0, 1, 0, 0]


@packed_only
def test_packed_event_inside_a_chain_signals_when_passed(rig):
    """A DESC event naming a position no used descriptor is written at (inside
    a longer chain's span): the signal comes with the used descriptor whose
    span covers it."""
    r = rig()
    q = r.queue(size=16)
    q.set_driver_event(EVENT_F_DESC, 5 | 1 << 15)  # chains of 4: used descriptors at 0, 4, 8 -- 5 is inside the second
    assert [complete_one(r, q, 4) for _ in range(3)] == [0, 1, 0]


@split_only
def test_split_used_event_across_the_16_bit_wrap(rig):
    r = rig()
    q = r.queue(size=8, start=False)
    base = 0xFFFD
    q.avail_idx = q.last_used = base
    q.set_avail_idx(base)
    q.mem.write(q.used + 2, struct.pack("<H", base))
    r.start(0)
    q.set_used_event(1)  # the entry with index 1, after 0xfffd, 0xfffe, 0xffff, 0
    assert [complete_one(r, q) for _ in range(6)] == [0, 0, 0, 0, 1, 0]
    assert q.used_idx() == 3


# ====================================================================== kicks (driver -> device)


def device_wants(q, old: tuple[int, int]) -> bool:
    """Whether the driver must kick after moving from `old` (its avail
    index, or packed position and wrap counter) to where it is now."""
    if q.packed:
        return q.kick_wanted(*old)
    if q.used_flags() & USED_F_NO_NOTIFY:
        return False
    return True


def test_kick_suppression_without_event_idx(rig):
    r = rig(features=1 << F_INDIRECT)
    q = r.queue()
    # the worker's visit at start-up suppressed kicks
    assert (q.used_flags() == EVENT_F_DISABLE) if r.packed else (q.used_flags() & USED_F_NO_NOTIFY)
    assert r.notify(True) == 0  # nothing available: wait for a kick
    assert q.used_flags() == (EVENT_F_ENABLE if r.packed else 0)
    old = (q.next_avail, q.avail_wrap) if r.packed else (q.avail_idx, 0)
    q.add([b"k"], [], kick=False)
    assert device_wants(q, old)
    assert r.notify(True) == 1  # a chain came meanwhile: keep going instead of waiting
    assert r.notify(False) == 0
    assert (q.used_flags() == EVENT_F_DISABLE) if r.packed else (q.used_flags() & USED_F_NO_NOTIFY)
    old = (q.next_avail, q.avail_wrap) if r.packed else (q.avail_idx, 0)
    q.add([b"k"], [], kick=False)
    assert not device_wants(q, old)
    assert r.pop() is not None and r.pop() is not None and r.pop() is None


def test_kick_suppression_with_event_idx(rig):
    r = rig()
    q = r.queue(size=8)
    if r.packed:
        assert q.used_flags() == EVENT_F_DISABLE
    for lap in range(3):  # the event follows the device round the ring, wrap bit included
        for _ in range(5):
            assert r.notify(True) == 0
            if r.packed:
                assert q.device_event_area() == (q.next_avail | q.avail_wrap << 15, EVENT_F_DESC)
                old = (q.next_avail, q.avail_wrap)
            else:
                assert q.avail_event() == q.avail_idx  # a kick when the next index is published
                old = (q.avail_idx, 0)
            q.add([b"e"], [], kick=False)
            if r.packed:
                assert q.kick_wanted(*old)
                old2 = (q.next_avail, q.avail_wrap)
                q.add([b"e"], [], kick=False)
                assert not q.kick_wanted(*old2)  # the named position is behind: no second kick
            else:
                q.add([b"e"], [], kick=False)
            assert r.notify(True) == 1
            for _ in range(2):
                r.complete(r.pop())
            q.poll_used()
    assert r.notify(False) == 0
    if r.packed:
        assert q.used_flags() == EVENT_F_DISABLE


# ====================================================================== SET/GET_VRING_BASE


def test_vring_base_round_trip(rig):
    """GET_VRING_BASE with chains still taken, a restart from it (SET_VRING_BASE),
    and the ring goes on: those chains complete, new ones come."""
    r = rig()
    q = r.queue(size=8)
    q.add([b"0"], [], kick=False)
    r.complete(r.pop())
    q.poll_used()
    lens = [3, 3, 2]  # with the one before: round the end of the ring
    heads = [q.add([b"r"] * n, [], kick=False)[0] for n in lens]
    taken = [r.pop() for _ in lens]
    r.complete(taken[0], 7)
    assert q.poll_used() == [Used(heads[0], 7)]
    base = r.get_base(0)
    assert r.pop_raw()[0] == -1  # stopped
    if r.packed:
        # avail: 9 descriptors taken = position 1 of the second lap (wrap 0); used: 4 of the first (wrap 1)
        assert base == 1 | 0 << 15 | 4 << 16 | 1 << 31
    else:
        assert base == 4
    # a new "front-end" restores it; the two chains still taken complete after the restart
    r.set_base(0, base)
    r.kick_start(0)
    assert r.pop() is None  # the device looks at the ring first (split: reads the used index there)
    st = r.info()
    assert (st.last_avail, st.used_idx) == ((1, 4) if r.packed else (4, 2))
    for c in taken[1:]:
        r.push(c, 8)
    r.publish()
    assert q.poll_used() == [Used(heads[1], 8), Used(heads[2], 8)]
    h, _ = q.add([b"after"], [], kick=False)
    c = r.pop()
    assert c.id == h and c.read_out() == b"after"
    r.complete(c)
    assert q.poll_used() == [Used(h, 0)]
    assert r.get_base(0) == (2 | 0 << 15 | 2 << 16 | 0 << 31 if r.packed else 5)


@packed_only
def test_vring_base_16_bits_set_both_sides(rig):
    r = rig()
    q = r.queue(size=8, start=False)
    q.resume_at(5, 0)
    r.start(0, base=5 | 0 << 15)  # no used half: the same as the avail half
    st = r.info()
    assert (st.last_avail, st.used_idx) == (5, 5)
    h, _ = q.add([b"p"] * 4, [], kick=False)  # positions 5, 6, 7 and 0 of the next lap
    c = r.pop()
    assert (c.id, c.ndesc) == (h, 4)
    r.complete(c)
    assert q.poll_used() == [Used(h, 0)]
    assert r.get_base(0) == 1 | 1 << 15 | 1 << 16 | 1 << 31


def test_vring_base_refused(rig):
    r = rig()
    r.queue(size=8, start=False)
    _call(lib.vd_queue_set_num, r.dev, 0, 8)
    if r.packed:
        with pytest.raises(DataPlaneError, match=r"packed ring base 0x8 names a position beyond the ring size 8"):
            r.set_base(0, 8)
        with pytest.raises(DataPlaneError, match=r"beyond the ring size 8"):
            r.set_base(0, 1 | 9 << 16)
        r.set_base(0, 7 | 1 << 15 | 7 << 16)
    else:
        with pytest.raises(DataPlaneError, match=r"ring base 65536 does not fit 16 bits"):
            r.set_base(0, 0x10000)
        r.set_base(0, 0xFFFF)
    r.start(0)
    with pytest.raises(DataPlaneError, match=r"cannot set the base of a running queue"):
        r.set_base(0, 0)


# ====================================================================== hostile rings


@dataclass
class Attack:
    name: str
    layout: str
    build: object  # (rig, q) -> None: write the bad ring
    log: str  # what the error says
    features: int | None = None


def hdr(q) -> int:
    a = q.buffer(16)
    q.mem.write(a, bytes(16))
    return a


# ---- split


def s_head(value):
    def build(r, q):
        q.publish(value, kick=False)
    return build


def s_single(addr, length, flags, nxt=0):
    def build(r, q):
        q.write_desc(0, addr, length, flags, nxt)
        q.publish(0, kick=False)
    return build


def s_loop(r, q):
    q.write_desc(0, hdr(q), 16, NEXT, 1)
    q.write_desc(1, hdr(q), 16, NEXT, 0)
    q.publish(0, kick=False)


def s_readable_after_writable(r, q):
    q.write_desc(0, hdr(q), 16, NEXT, 1)
    q.write_desc(1, q.buffer(8), 8, NEXT | WRITE, 2)
    q.write_desc(2, q.buffer(8), 8, 0)
    q.publish(0, kick=False)


def s_indirect(entries, length=None, flags=IND):
    def build(r, q):
        table = q.buffer(16 * max(len(entries), 1) + 64)
        for i, (a, n, f, nx) in enumerate(entries):
            q.write_desc(i, hdr(q) if a is None else a, n, f, nx, table=table)
        q.write_desc(0, table, 16 * len(entries) if length is None else length, flags, 1)
        q.write_desc(1, q.buffer(1), 1, WRITE)
        q.publish(0, kick=False)
    return build


def s_avail_jump(r, q):
    q.set_avail_idx((q.avail_idx + q.size + 1) & 0xFFFF)


# ---- packed


def p_post(descs, buf_id=None, ids=None):
    def build(r, q):
        q.post([(hdr(q) if a is None else a, n, f) for a, n, f in descs], buf_id, ids=ids, kick=False)
    return build


def p_whole_ring(r, q):
    """Every descriptor of the ring has NEXT: a chain longer than the ring."""
    q.post([(hdr(q), 16, NEXT)] * q.size, kick=False)


def p_over_chain_limit(r, q):
    """10 direct descriptors and an indirect table of 1020: 1030 buffers > 1024."""
    table = q.buffer(16 * 1020)
    a = hdr(q)
    for i in range(1020):
        q.write_desc(i, a, 16, 0, table=table)
    q.post([(a, 16, NEXT)] * 10 + [(table, 16 * 1020, IND)], kick=False)


def p_indirect(entries, length=None, flags=IND, addr=None):
    def build(r, q):
        table = q.buffer(16 * max(len(entries), 1) + 64)
        for i, (a, n, f) in enumerate(entries):
            q.write_desc(i, hdr(q) if a is None else a, n, f, table=table)
        q.post([(table if addr is None else addr, 16 * len(entries) if length is None else length, flags)],
               kick=False)
    return build


OUT = 1 << 40
ATTACKS = [
    Attack("head-out-of-range", "split", s_head(16), r"avail ring names descriptor 16, ring size is 16"),
    Attack("next-out-of-range", "split", s_single(0x1000, 16, NEXT, 16), r"descriptor next 16 is beyond its table of 16"),
    Attack("loop", "split", s_loop, r"descriptor chain at head 0 is longer than 1024 \(loop\?\)"),
    Attack("buffer-outside", "split", s_single(OUT, 512, WRITE), r"buffer 0x10000000000\+512 at head 0 is outside guest memory"),
    Attack("readable-after-writable", "split", s_readable_after_writable, r"readable descriptor after a writable one at head 0"),
    Attack("nested-indirect", "split", s_indirect([(None, 16, NEXT, 1), (0x2000, 32, IND, 0)]), r"nested indirect descriptor table"),
    Attack("indirect-with-next", "split", s_indirect([(None, 16, 0, 0)], flags=IND | NEXT), r"indirect descriptor with NEXT set at head 0"),
    Attack("indirect-ragged", "split", s_indirect([(None, 16, 0, 0)], length=24), r"indirect table of 24 bytes at head 0 is empty, ragged or too long"),
    Attack("indirect-not-negotiated", "split", s_indirect([(None, 16, 0, 0)]), r"INDIRECT_DESC was not negotiated", features=1 << F_EVENT_IDX),
    Attack("avail-jump", "split", s_avail_jump, r"avail index jumped from 3 to 20, more than the ring size 16"),
    Attack("id-out-of-range", "packed", p_post([(None, 16, 0)], buf_id=16), r"buffer id 16 at position 3 is beyond the ring size 16"),
    Attack("id-0xffff", "packed", p_post([(None, 16, NEXT), (None, 16, 0)], buf_id=0xFFFF), r"buffer id 65535 at position 4 is beyond"),
    Attack("id-of-the-last-descriptor", "packed", p_post([(None, 16, NEXT), (None, 1, WRITE)], buf_id=2, ids=[2, 300]),
           r"buffer id 300 at position 4 is beyond the ring size 16"),
    Attack("chain-longer-than-ring", "packed", p_whole_ring, r"descriptor chain at position 3 is longer than the ring of 16"),
    Attack("chain-over-the-limit", "packed", p_over_chain_limit, r"descriptor chain at position 3 is longer than 1024 \(loop\?\)"),
    Attack("buffer-outside", "packed", p_post([(OUT, 512, WRITE)]), r"buffer 0x10000000000\+512 at position 3 is outside guest memory"),
    Attack("buffer-past-the-end", "packed", p_post([(None, 16, NEXT), ((4 << 20) - 256, 512, WRITE)]),
           r"buffer 0x3fff00\+512 at position 3 is outside guest memory"),
    Attack("readable-after-writable", "packed", p_post([(None, 16, NEXT), (None, 8, NEXT | WRITE), (None, 8, 0)]),
           r"readable descriptor after a writable one at position 3"),
    Attack("nested-indirect", "packed", p_indirect([(None, 16, 0), (0x2000, 32, IND)]), r"nested indirect descriptor table at position 3"),
    Attack("indirect-with-next", "packed", p_indirect([(None, 16, 0)], flags=IND | NEXT), r"indirect descriptor with NEXT set at position 3"),
    Attack("indirect-ragged", "packed", p_indirect([(None, 16, 0)], length=24), r"indirect table of 24 bytes at position 3 is empty, ragged or too long"),
    Attack("indirect-empty", "packed", p_indirect([], length=0), r"indirect table of 0 bytes at position 3"),
    Attack("indirect-too-long", "packed", p_indirect([(None, 16, 0)], length=16 * 1025), r"indirect table of 16400 bytes"),
    Attack("indirect-outside", "packed", p_indirect([(None, 16, 0)], addr=OUT, length=64), r"indirect table 0x10000000000\+64 at position 3 is outside"),
    Attack("indirect-not-negotiated", "packed", p_indirect([(None, 16, 0)]), r"INDIRECT_DESC was not negotiated", features=1 << F_EVENT_IDX),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[f"{a.layout}-{a.name}" for a in ATTACKS])
def test_hostile_ring_breaks_only_its_queue(engine, attack):
    r = Rig(engine, attack.layout, features=attack.features)
    try:
        victim, bystander = r.queue(0, size=16), r.queue(1, size=16)
        for _ in range(3):  # it works until the attack (and the chain is not at position 0)
            h, _ = victim.add([b"ok"], [], kick=False)
            r.complete(r.pop(0))
            assert victim.poll_used() == [Used(h, 0)]
        signals(victim)
        attack.build(r, victim)
        assert r.pop_raw(0)[0] == -1
        assert r.needs_reset
        ((qi, msg),) = r.errors()
        assert qi == 0 and msg.startswith("queue 0: ") and re.search(attack.log, msg), msg
        assert os.eventfd_read(victim.err) == 1
        # broken stays broken and quiet: nothing taken, nothing written, no second error
        assert r.pop_raw(0)[0] == -1 and r.notify(True, 0) == -1
        r.publish(0)
        assert signals(victim) == 0 and r.errors() == []
        st = r.info(0)
        assert st.broken and not r.info(1).broken
        # the other queue of the device is served all along
        for n in (1, 3):
            h, (w,) = bystander.add([b"by"] * n, [4], kick=False)
            c = r.pop(1)
            assert c.id == h and c.read_out() == b"by" * n
            c.write_in(b"fine")
            r.complete(c, 4, 1)
            assert bystander.poll_used() == [Used(h, 4)] and bystander.mem.read(w, 4) == b"fine"
    finally:
        r.close()


def test_a_restarted_queue_serves_again_after_a_break(rig):
    """The front-end's answer to NEEDS_RESET: the ring set up anew works."""
    r = rig()
    q = r.queue(size=16)
    if r.packed:
        q.post([(q.buffer(16), 16, 0)], buf_id=99, kick=False)
    else:
        q.publish(99, kick=False)
    assert r.pop_raw()[0] == -1 and r.needs_reset
    assert len(r.errors()) == 1
    q.close()
    os.close(q.err)
    lib.vd_device_reset(r.dev)
    lib.vd_device_set_features(r.dev, r.features)
    assert not r.needs_reset
    q = r.queue(size=16)
    h, _ = q.add([b"again"], [], kick=False)
    c = r.pop()
    assert c.id == h and c.read_out() == b"again"
    r.complete(c)
    assert q.poll_used() == [Used(h, 0)]


# ====================================================================== random rings


GOOD = [0x300000, 0x300200, 0x300400, 0x301000]
WILD = [0, 0x3FFFF0, 4 << 20, 1 << 40, 2**64 - 512]


@st.composite
def ring_contents(draw, packed: bool):
    size = 8
    addr = st.one_of(st.sampled_from(GOOD), st.sampled_from(WILD), st.integers(0, 2**64 - 1))
    length = st.one_of(st.sampled_from([0, 1, 16, 512]), st.integers(0, 2**32 - 1))
    bits = [0, PACKED_F_AVAIL, PACKED_F_USED, PACKED_F_AVAIL | PACKED_F_USED] if packed else [0]
    flags = st.builds(lambda f, b: f | b, st.one_of(st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, IND]),
                                                    st.integers(0, 7)), st.sampled_from(bits))
    other = st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF))  # next (split) or id (packed)
    desc = [(draw(addr), draw(length), draw(flags), draw(other)) for _ in range(size)]
    if draw(st.booleans()):  # a well-formed chain at the start
        k = draw(st.integers(1, size))
        w = draw(st.integers(0, k))
        bid = draw(st.integers(0, size - 1))
        for i in range(k):
            f = (NEXT if i < k - 1 else 0) | (WRITE if i >= w else 0) | (PACKED_F_AVAIL if packed else 0)
            desc[i] = (draw(st.sampled_from(GOOD)), draw(st.sampled_from([1, 16, 512])), f, bid if packed else i + 1)
    table = draw(st.lists(st.tuples(addr, length, flags, other), max_size=6))
    heads = draw(st.lists(st.integers(0, 0xFFFF) | st.integers(0, size - 1), min_size=1, max_size=4))
    extra = draw(st.one_of(st.just(0), st.integers(-3, 20)))
    return desc, table, heads, extra


def run_random_ring(engine, layout: str, ring) -> str:
    desc, table, heads, extra = ring
    r = Rig(engine, layout)
    try:
        q = r.queue(0, size=8, arena=4096)
        for i, (a, n, f, o) in enumerate(table):
            q.write_desc(i, a, n, f, o, table=0x380000)
        for i, (a, n, f, o) in enumerate(desc):
            q.write_desc(i, a & (2**64 - 1), n, f, o)
        if layout == "split":
            for h in heads:
                q.publish(h, kick=False)
            q.set_avail_idx((q.avail_idx + extra) & 0xFFFF)
        taken = 0
        for _ in range(3 * q.size):
            rc, c = r.pop_raw(0)
            if rc == -1:
                ((qi, msg),) = r.errors()
                assert qi == 0 and msg.startswith("queue 0: ")
                assert r.needs_reset
                return "broken"
            if rc == 0:
                break
            assert c.id < q.size and 1 <= c.ndesc <= q.size
            assert c.out_bytes + c.in_bytes == sum(n for _, n in c.bufs)
            assert len(c.bufs) == c.nout + c.nin
            c.read_out()  # the device's mapping holds every byte it handed out
            r.push(c, c.in_bytes & 0xFFFF)
            taken += 1
        r.publish(0)
        assert not r.needs_reset and r.errors() == []
        return f"took {taken}"
    finally:
        r.close()


FUZZ = settings(max_examples=int(os.environ.get("VHOSTD_RING_EXAMPLES", "150")), deadline=None,
                suppress_health_check=list(HealthCheck), database=None)


@FUZZ
@given(ring=ring_contents(packed=False))
def test_random_split_rings(engine, ring):
    """Random descriptors, tables and avail entries: each chain is taken
    sane or the queue breaks with a message; nothing else happens."""
    event(run_random_ring(engine, "split", ring))


@FUZZ
@given(ring=ring_contents(packed=True))
def test_random_packed_rings(engine, ring):
    """The same for packed rings: random flags (avail/used bits of either
    lap), ids, lengths, tables."""
    event(run_random_ring(engine, "packed", ring))
