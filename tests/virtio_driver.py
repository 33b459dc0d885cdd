"""Driver side of virtio for tests: guest memory in a real memfd, split and
packed virtqueues the way a guest driver fills them, and virtio-blk requests.

The back-end maps the same memfd, so everything here goes through real
shared memory; the rings are laid out per virtio 1.2 sections 2.7 (split)
and 2.8 (packed).  SplitQueue and PackedQueue have one interface (attach,
add, notify, poll_used/wait_used, event suppression, raw writers), so a
test or a device driver model can run on either.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import time
from dataclasses import dataclass

from vhostd.frontend import Frontend, make_eventfd
from vhostd.protocol.codec import MemoryRegion

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
# packed rings (2.8): descriptor flags and the event suppression areas' flags
PACKED_F_AVAIL = 1 << 7
PACKED_F_USED = 1 << 15
EVENT_F_ENABLE, EVENT_F_DISABLE, EVENT_F_DESC = 0, 1, 2


class GuestMemory:
    """Guest RAM: one memfd, split into regions at the given guest addresses.

    Region i covers [gpa_i, gpa_i + size_i) and lives at file offset
    sum(size_0..size_{i-1}); its "user address" is where we mapped it, as
    QEMU does.  A gap between regions is unmapped guest space.
    """

    def __init__(self, layout: list[tuple[int, int]] | None = None, size: int = 16 << 20) -> None:
        layout = layout or [(0, size)]
        total = sum(s for _, s in layout)
        self.fd = os.memfd_create("vhostd-test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, total)
        self.map = mmap.mmap(self.fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        base = _address_of(self.map)
        self.regions: list[MemoryRegion] = []
        self._file_off: list[int] = []
        off = 0
        for gpa, sz in layout:
            self.regions.append(MemoryRegion(gpa, sz, base + off, off))
            self._file_off.append(off)
            off += sz
        self._next = {i: 0 for i in range(len(layout))}

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def _offset(self, gpa: int, length: int) -> int:
        for r, off in zip(self.regions, self._file_off):
            if r.guest_addr <= gpa and gpa + length <= r.guest_addr + r.size:
                return off + gpa - r.guest_addr
        raise ValueError(f"guest range {gpa:#x}+{length:#x} is not inside one region")

    def read(self, gpa: int, length: int) -> bytes:
        o = self._offset(gpa, length)
        return bytes(self.map[o : o + length])

    def write(self, gpa: int, data: bytes) -> None:
        o = self._offset(gpa, len(data))
        self.map[o : o + len(data)] = data

    def alloc(self, length: int, align: int = 16, region: int = 0) -> int:
        r = self.regions[region]
        start = (self._next[region] + align - 1) & ~(align - 1)
        if start + length > r.size:
            raise MemoryError("test guest memory exhausted")
        self._next[region] = start + length
        return r.guest_addr + start

    def fds(self) -> list[int]:
        """One dup of the memfd per region, as SET_MEM_TABLE wants."""
        return [os.dup(self.fd) for _ in self.regions]

    def give_to(self, fe: Frontend) -> None:
        fds = self.fds()
        try:
            fe.set_mem_table(self.regions, fds)
        finally:
            for fd in fds:
                os.close(fd)


def _address_of(m: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(m))


@dataclass
class Used:
    head: int
    length: int


class _Ring:
    """What both layouts share: the queue's place in guest memory, its data
    arena, the kick and call eventfds, waiting for completions."""

    packed = False

    def _setup(self, mem: GuestMemory, size: int, arena: int, region: int) -> None:
        self.arena = mem.alloc(arena, 4096, region)
        self.arena_size = arena
        self._arena_next = 0
        self.kick = make_eventfd()
        self.call = make_eventfd()

    def close(self) -> None:
        for fd in (self.kick, self.call):
            try:
                os.close(fd)
            except OSError:
                pass

    # --- set-up over vhost-user
    def attach(self, fe: Frontend, index: int, enable: bool = True, kick: bool = True,
               base: int | None = None) -> None:
        """SET_VRING_NUM/BASE/ADDR/CALL/KICK(/ENABLE); base: what SET_VRING_BASE
        says (default: where the driver will make the next chain available)."""
        fe.set_vring_num(index, self.size)
        fe.set_vring_base(index, self.ring_base() if base is None else base)
        fe.set_vring_addr(index, self.uva(self.desc), self.uva(self.used), self.uva(self.avail))
        fe.set_vring_call(index, self.call)
        fe.set_vring_kick(index, self.kick if kick else None)
        if enable and fe.features & (1 << 30):
            fe.set_vring_enable(index, True)

    def uva(self, gpa: int) -> int:
        for r in self.mem.regions:
            if r.guest_addr <= gpa < r.guest_addr + r.size:
                return r.user_addr + gpa - r.guest_addr
        raise ValueError(gpa)

    def buffer(self, length: int) -> int:
        length = max(length, 1)
        if self._arena_next + length > self.arena_size:
            self._arena_next = 0
        gpa = self.arena + self._arena_next
        self._arena_next = (self._arena_next + length + 63) & ~63
        return gpa

    def notify(self) -> None:
        os.eventfd_write(self.kick, 1)

    def _segments(self, out: list[bytes], in_lens: list[int]) -> list[tuple[int, int, int, bytes | None]]:
        """Buffers for a chain, readable ones filled: (addr, len, WRITE or 0, data)."""
        segs = [(self.buffer(len(b)), len(b), 0, b) for b in out]
        segs += [(self.buffer(n), n, DESC_F_WRITE, None) for n in in_lens]
        for addr, _, _, data in segs:
            if data:
                self.mem.write(addr, data)
        return segs

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[Used]:
        """Wait (on the call eventfd, with a polling fallback) for `count` completions."""
        got: list[Used] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += self.poll_used()
            if len(got) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(got)} of {count} requests completed (used idx {self.used_idx()})")
            r, _, _ = select.select([self.call], [], [], min(left, 0.05))
            if r:
                try:
                    os.eventfd_read(self.call)
                except BlockingIOError:
                    pass
        return got

    def call_pending(self) -> int:
        """Read and reset the call eventfd counter (0 if not signalled)."""
        try:
            return os.eventfd_read(self.call)
        except BlockingIOError:
            return 0


class SplitQueue(_Ring):
    """The driver's half of a split virtqueue."""

    def __init__(self, mem: GuestMemory, size: int = 256, region: int = 0, arena: int = 4 << 20) -> None:
        self.mem = mem
        self.size = size
        self.desc = mem.alloc(16 * size, 16, region)
        self.avail = mem.alloc(6 + 2 * size, 2, region)
        self.used = mem.alloc(6 + 8 * size, 4, region)
        self._setup(mem, size, arena, region)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}

    def ring_base(self) -> int:
        """SET_VRING_BASE: the next avail index."""
        return self.avail_idx

    # --- raw ring access (also used to build hostile rings)
    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int, kick: bool = True) -> None:
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)
        if kick:
            self.notify()

    def set_avail_idx(self, idx: int) -> None:
        self.mem.write(self.avail + 2, struct.pack("<H", idx))

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, idx: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", idx))

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0]

    def used_flags(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used, 2))[0]

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def has_used(self) -> bool:
        """Whether the device made a completion visible that poll_used has not taken."""
        return self.used_idx() != self.last_used

    # --- chains
    def add(self, out: list[bytes], in_lens: list[int], indirect: bool = False, kick: bool = True) -> tuple[int, list[int]]:
        """Queue a chain; returns (head, guest addresses of the writable buffers)."""
        segs = self._segments(out, in_lens)
        if indirect:
            table = self.buffer(16 * len(segs))
            for i, (addr, n, fl, _) in enumerate(segs):
                last = i == len(segs) - 1
                self.write_desc(i, addr, n, fl | (0 if last else DESC_F_NEXT), 0 if last else i + 1, table=table)
            head = self.free.pop()
            self.write_desc(head, table, 16 * len(segs), DESC_F_INDIRECT)
            self.chains[head] = [head]
        else:
            ids = [self.free.pop() for _ in segs]
            for k, (addr, n, fl, _) in enumerate(segs):
                last = k == len(segs) - 1
                self.write_desc(ids[k], addr, n, fl | (0 if last else DESC_F_NEXT), 0 if last else ids[k + 1])
            head = ids[0]
            self.chains[head] = ids
        self.publish(head, kick)
        return head, [a for a, _, fl, _ in segs if fl & DESC_F_WRITE]

    def poll_used(self) -> list[Used]:
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            elem = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.mem.read(elem, 8))
            out.append(Used(head, length))
            self.free.extend(self.chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class PackedQueue(_Ring):
    """The driver's half of a packed virtqueue (virtio 1.2 section 2.8).

    One ring of `size` descriptors {le64 addr, le32 len, le16 id, le16
    flags} that both sides write, and two 4-byte event suppression areas
    {le16 off_wrap, le16 flags}: the driver's (`avail`, given to the device
    as SET_VRING_ADDR's avail address) and the device's (`used`, its used
    address).

    The driver writes a chain at its next position, the buffer id in every
    descriptor (the device reads it from the last one), AVAIL = its wrap
    counter and USED = the inverse, the chain's first flags last.  The
    device hands a buffer back by writing one descriptor at its own used
    position (id, bytes written, AVAIL = USED = its wrap counter) and moves
    on by the number of descriptors the chain took; the driver follows it
    with its own copy of that count per buffer id.  Both wrap counters
    start at 1 and flip each time their position passes the end.

    The same interface as SplitQueue: `head` there is the buffer id here,
    `free` the free buffer ids (`num_free` counts free descriptors), and
    `used_idx()` counts completions the device made visible (mod 2^16; a
    packed ring keeps no such index in memory).
    """

    packed = True
    event_idx = True  # set by whoever negotiated: DESC events only with EVENT_IDX

    def __init__(self, mem: GuestMemory, size: int = 256, region: int = 0, arena: int = 4 << 20) -> None:
        self.mem = mem
        self.size = size
        self.desc = mem.alloc(16 * size, 16, region)
        self.avail = mem.alloc(4, 4, region)  # driver event suppression area
        self.used = mem.alloc(4, 4, region)  # device event suppression area
        self._setup(mem, size, arena, region)
        self.next_avail, self.avail_wrap = 0, 1
        self.last_used, self.used_wrap = 0, 1
        self.num_free = size
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}
        self.ndesc: dict[int, int] = {}  # buffer id in flight -> ring descriptors its chain took
        self.avail_idx = 0  # chains made available, mod 2^16
        self.used_seen = 0  # completions taken by poll_used, mod 2^16

    @property
    def driver_event(self) -> int:
        return self.avail

    @property
    def device_event(self) -> int:
        return self.used

    def ring_base(self) -> int:
        """SET_VRING_BASE: the next position | avail wrap counter << 15."""
        return self.next_avail | self.avail_wrap << 15

    def resume_at(self, pos: int, wrap: int) -> None:
        """A ring that has run before: every descriptor up to (pos, wrap) was
        made available and used, so both sides continue there."""
        assert 0 <= pos < self.size and wrap in (0, 1)
        for i in range(self.size):
            lap = wrap if i < pos else wrap ^ 1  # the lap that last wrote slot i
            self.write_flags(i, PACKED_F_AVAIL | PACKED_F_USED if lap else 0)
        self.next_avail = self.last_used = pos
        self.avail_wrap = self.used_wrap = wrap

    # --- raw ring access (also used to build hostile rings)
    def write_desc(self, i: int, addr: int, length: int, flags: int, buf_id: int = 0,
                   table: int | None = None) -> None:
        """Descriptor i of the ring (or of an indirect table), flags as given."""
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr, length, buf_id, flags))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ring descriptor i."""
        return struct.unpack("<QIHH", self.mem.read(self.desc + 16 * i, 16))

    def write_flags(self, i: int, flags: int) -> None:
        self.mem.write(self.desc + 16 * i + 14, struct.pack("<H", flags))

    @staticmethod
    def avail_bits(wrap: int) -> int:
        """The flags that make a descriptor available in a lap of this wrap counter."""
        return PACKED_F_AVAIL if wrap else PACKED_F_USED

    def post(self, descs: list[tuple[int, int, int]], buf_id: int | None = None, *, ids: list[int] | None = None,
             kick: bool = True) -> int:
        """Write a chain of (addr, len, flags) at the next position and make it
        available: the avail bits of each descriptor's lap are added to its
        flags (NEXT is the caller's), the first descriptor's flags last.
        buf_id goes into every descriptor (ids: one each, as a hostile driver
        might).  Returns the buffer id; poll_used knows how far it moves."""
        if buf_id is None:
            buf_id = self.free.pop()
        elif buf_id in self.free:
            self.free.remove(buf_id)
        if ids is None:
            ids = [buf_id] * len(descs)
        first, first_flags = self.next_avail, 0
        for k, ((addr, n, fl), i) in enumerate(zip(descs, ids)):
            flags = fl | self.avail_bits(self.avail_wrap)
            if k == 0:  # all but its flags: the slot stays as it was (not available) for now
                first_flags = flags
                self.mem.write(self.desc + 16 * self.next_avail, struct.pack("<QIH", addr, n, i))
            else:
                self.write_desc(self.next_avail, addr, n, flags, i)
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap ^= 1
        self.num_free -= len(descs)
        self.ndesc[buf_id] = len(descs)
        self.chains[buf_id] = [buf_id] if buf_id < self.size else []
        self.write_flags(first, first_flags)  # the chain is the device's from here
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if kick:
            self.notify()
        return buf_id

    # --- event suppression
    def set_driver_event(self, flags: int, off_wrap: int | None = None) -> None:
        """The driver's area: flags ENABLE/DISABLE/DESC, off_wrap (position | wrap << 15) for DESC."""
        if off_wrap is not None:
            self.mem.write(self.avail, struct.pack("<H", off_wrap))
        self.mem.write(self.avail + 2, struct.pack("<H", flags))

    def set_avail_flags(self, flags: int) -> None:
        """As SplitQueue: AVAIL_F_NO_INTERRUPT (1) is DISABLE, 0 ENABLE."""
        self.set_driver_event(flags)

    def set_used_event(self, pos: int, wrap: int | None = None) -> None:
        """Ask for a signal when the device writes the used descriptor at
        position pos (DESC; wrap: its used wrap counter then, by default the
        next time the device gets there)."""
        pos %= self.size
        if wrap is None:
            wrap = self.used_wrap if pos >= self.last_used else self.used_wrap ^ 1
        self.set_driver_event(EVENT_F_DESC, pos | wrap << 15)

    def device_event_area(self) -> tuple[int, int]:
        """What the device wrote in its area: (off_wrap, flags)."""
        return struct.unpack("<HH", self.mem.read(self.used, 4))

    def avail_event(self) -> int:
        """The device's off_wrap: where it wants a kick (with DESC)."""
        return self.device_event_area()[0]

    def used_flags(self) -> int:
        """The device's flags: ENABLE, DISABLE (no kicks, as NO_NOTIFY) or DESC."""
        return self.device_event_area()[1]

    def kick_wanted(self, old_pos: int, old_wrap: int) -> bool:
        """Whether the device asks for a kick now that the driver moved from
        (old_pos, old_wrap) to its next position (2.8.10's rule)."""
        off_wrap, flags = self.device_event_area()
        if flags == EVENT_F_DISABLE:
            return False
        if flags != EVENT_F_DESC:
            return True
        def lap(pos: int, wrap: int) -> int:  # position and wrap counter on one scale of two laps
            return pos + (0 if wrap else self.size)

        laps = 2 * self.size
        old, new = lap(old_pos, old_wrap), lap(self.next_avail, self.avail_wrap)
        ev = lap(off_wrap & 0x7FFF, off_wrap >> 15)
        return (ev - old) % laps < (new - old) % laps  # the named position was made available just now

    # --- used descriptors
    def _is_used(self, flags: int, wrap: int) -> bool:
        return bool(flags & PACKED_F_AVAIL) == wrap and bool(flags & PACKED_F_USED) == wrap

    def has_used(self) -> bool:
        return self._is_used(self.read_desc(self.last_used)[3], self.used_wrap)

    def _walk_used(self, take: bool) -> list[Used]:
        out = []
        pos, wrap, ndesc = self.last_used, self.used_wrap, self.ndesc if take else dict(self.ndesc)
        while len(out) < self.size:
            _, length, buf_id, flags = self.read_desc(pos)
            if not self._is_used(flags, wrap):
                break
            n = ndesc.pop(buf_id, None)
            if n is None:
                raise AssertionError(f"the device used buffer id {buf_id} at position {pos} (wrap {wrap}), "
                                     f"which is not in flight")
            out.append(Used(buf_id, length))
            pos += n
            if pos >= self.size:
                pos -= self.size
                wrap ^= 1
            if take:
                self.last_used, self.used_wrap = pos, wrap
                self.num_free += n
                self.free.extend(self.chains.pop(buf_id, []))
                self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def poll_used(self) -> list[Used]:
        return self._walk_used(True)

    def used_idx(self) -> int:
        """Completions the device made visible so far (those taken and those waiting), mod 2^16."""
        return (self.used_seen + len(self._walk_used(False))) & 0xFFFF

    # --- chains
    def add(self, out: list[bytes], in_lens: list[int], indirect: bool = False, kick: bool = True) -> tuple[int, list[int]]:
        """Queue a chain; returns (buffer id, guest addresses of the writable buffers)."""
        segs = self._segments(out, in_lens)
        need = 1 if indirect else len(segs)
        if need > self.num_free or not self.free:
            raise IndexError(f"packed ring full: {need} descriptors wanted, {self.num_free} free")
        if indirect:
            # 2.8.19: the table's entries follow each other; no NEXT, no ids.
            table = self.buffer(16 * len(segs))
            for i, (addr, n, fl, _) in enumerate(segs):
                self.write_desc(i, addr, n, fl, table=table)
            descs = [(table, 16 * len(segs), DESC_F_INDIRECT)]
        else:
            descs = [(addr, n, fl | (DESC_F_NEXT if k < len(segs) - 1 else 0)) for k, (addr, n, fl, _) in enumerate(segs)]
        buf_id = self.post(descs, kick=kick)
        return buf_id, [a for a, _, fl, _ in segs if fl & DESC_F_WRITE]


# ------------------------------------------------------------------ virtio-blk

BLK_T_IN, BLK_T_OUT, BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_DISCARD, BLK_T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
BLK_S_OK, BLK_S_IOERR, BLK_S_UNSUPP = 0, 1, 2


def blk_header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


class BlkDriver:
    """virtio-blk requests on one SplitQueue or PackedQueue."""

    def __init__(self, q: SplitQueue | PackedQueue) -> None:
        self.q = q

    def _status(self, used: Used, bufs: list[int], in_lens: list[int]) -> int:
        return self.q.mem.read(bufs[-1], 1)[0]

    def submit(self, kind: int, sector: int = 0, data: bytes = b"", in_len: int = 0, indirect: bool = False,
               split: int = 0) -> tuple[int, list[int], list[int]]:
        out = [blk_header(kind, sector)]
        if data:
            out += [data[i : i + split] for i in range(0, len(data), split)] if split else [data]
        in_lens = ([split] * (in_len // split) if split else [in_len]) if in_len else []
        head, bufs = self.q.add(out, in_lens + [1], indirect=indirect)
        return head, bufs, in_lens + [1]

    def run(self, kind: int, sector: int = 0, data: bytes = b"", in_len: int = 0, **kw) -> tuple[int, bytes, int]:
        """Submit one request and wait: (status, data read, used length)."""
        head, bufs, lens = self.submit(kind, sector, data, in_len, **kw)
        (used,) = self.q.wait_used(1)
        assert used.head == head, (used.head, head)
        payload = b"".join(self.q.mem.read(a, n) for a, n in zip(bufs[:-1], lens[:-1]))
        return self.q.mem.read(bufs[-1], 1)[0], payload, used.length

    def read(self, sector: int, length: int, **kw) -> tuple[int, bytes]:
        status, data, _ = self.run(BLK_T_IN, sector, in_len=length, **kw)
        return status, data

    def write(self, sector: int, data: bytes, **kw) -> int:
        return self.run(BLK_T_OUT, sector, data, **kw)[0]
