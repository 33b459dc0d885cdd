"""Driver side of virtio for tests: guest memory in a real memfd, a split
virtqueue the way a guest driver fills it, and virtio-blk requests.

The back-end maps the same memfd, so everything here goes through real
shared memory; the ring is laid out per virtio 1.2 section 2.7.
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


class SplitQueue:
    """The driver's half of a split virtqueue."""

    def __init__(self, mem: GuestMemory, size: int = 256, region: int = 0, arena: int = 4 << 20) -> None:
        self.mem = mem
        self.size = size
        self.desc = mem.alloc(16 * size, 16, region)
        self.avail = mem.alloc(6 + 2 * size, 2, region)
        self.used = mem.alloc(6 + 8 * size, 4, region)
        self.arena = mem.alloc(arena, 4096, region)
        self.arena_size = arena
        self._arena_next = 0
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}
        self.kick = make_eventfd()
        self.call = make_eventfd()

    def close(self) -> None:
        for fd in (self.kick, self.call):
            try:
                os.close(fd)
            except OSError:
                pass

    # --- set-up over vhost-user
    def attach(self, fe: Frontend, index: int, enable: bool = True, kick: bool = True) -> None:
        fe.set_vring_num(index, self.size)
        fe.set_vring_base(index, self.avail_idx)
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

    # --- raw ring access (also used to build hostile rings)
    def buffer(self, length: int) -> int:
        length = max(length, 1)
        if self._arena_next + length > self.arena_size:
            self._arena_next = 0
        gpa = self.arena + self._arena_next
        self._arena_next = (self._arena_next + length + 63) & ~63
        return gpa

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

    def notify(self) -> None:
        os.eventfd_write(self.kick, 1)

    # --- chains
    def add(self, out: list[bytes], in_lens: list[int], indirect: bool = False, kick: bool = True) -> tuple[int, list[int]]:
        """Queue a chain; returns (head, guest addresses of the writable buffers)."""
        segs = [(self.buffer(len(b)), len(b), 0, b) for b in out]
        segs += [(self.buffer(n), n, DESC_F_WRITE, None) for n in in_lens]
        for addr, _, _, data in segs:
            if data:
                self.mem.write(addr, data)
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


# ------------------------------------------------------------------ virtio-blk

BLK_T_IN, BLK_T_OUT, BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_DISCARD, BLK_T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
BLK_S_OK, BLK_S_IOERR, BLK_S_UNSUPP = 0, 1, 2


def blk_header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


class BlkDriver:
    """virtio-blk requests on one SplitQueue."""

    def __init__(self, q: SplitQueue) -> None:
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
