"""`vhostd bench blk`: a vhost-user-blk load generator for any back-end.

Python does the handshake with the blocking front-end (vhostd.frontend) and
lays the rings and buffers out in one memfd; the request loop is C
(lg.c on guest-drivers/lib/virtq.c, module vhostd._loadgen) running with the
GIL released.  The rings are split, or packed with packed=True (the
back-end must offer VIRTIO_F_RING_PACKED).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from dataclasses import dataclass

from vhostd.frontend import BackendError, Frontend, make_eventfd
from vhostd.protocol.codec import MemoryRegion
from vhostd.protocol.constants import F_LOG_ALL, F_PROTOCOL_FEATURES, VRING_F_LOG, ProtocolFeature

F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_MQ = 1, 2, 5, 6, 9, 12
F_EVENT_IDX, F_VERSION_1, F_RING_PACKED = 29, 32, 34
WANT_FEATURES = sum(1 << b for b in (F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_MQ, F_EVENT_IDX,
                                     F_VERSION_1, F_PROTOCOL_FEATURES))
WANT_PROTOCOL = sum(1 << b for b in (ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
                                     ProtocolFeature.LOG_SHMFD))
RW_MODES = {"read": (0, 0), "write": (1, 0), "randread": (0, 1), "randwrite": (1, 1)}
SLOT_BYTES = 32
PAGE = 4096


class BenchError(Exception):
    """The workload cannot run (bad parameters, refused by the back-end)."""


@dataclass
class BlkResult:
    rw: str
    bs: int
    iodepth: int
    queues: int
    seconds: float
    ios: int
    errors: int
    iops: float
    bw_bytes_per_s: float
    lat_p50_us: float
    lat_p99_us: float
    lat_max_us: float
    kicks: int
    drained: bool
    ring: str = "split"

    def line(self) -> str:
        ring = "" if self.ring == "split" else f" ring={self.ring}"
        return (f"IOPS={self.iops:.0f} BW={self.bw_bytes_per_s / 2**20:.1f}MiB/s lat_p50={self.lat_p50_us:.1f}us "
                f"lat_p99={self.lat_p99_us:.1f}us ios={self.ios} errors={self.errors} "
                f"({self.rw} bs={self.bs} iodepth={self.iodepth} queues={self.queues} seconds={self.seconds:.1f}{ring})")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def ring_size(iodepth: int) -> int:
    """Smallest power of two holding iodepth 3-descriptor chains."""
    n = 1
    while n < 3 * iodepth:
        n *= 2
    return n


def run_blk(socket_path: str, rw: str, bs: int = 4096, iodepth: int = 32, queues: int = 1, seconds: float = 10.0,
            poll: bool = False, seed: int = 1, dirty_log: bool = False, packed: bool = False) -> BlkResult:
    """dirty_log: run as a front-end does while it migrates the guest (a
    dirty log mapped, VHOST_F_LOG_ALL acked, used rings logged), to measure
    what logging costs the back-end.  packed: packed virtqueues
    (VIRTIO_F_RING_PACKED) instead of split ones."""
    from vhostd._loadgen import ffi, lib

    if rw not in RW_MODES:
        raise BenchError(f"--rw must be one of {', '.join(RW_MODES)}, not {rw!r}")
    if bs <= 0 or bs % 512:
        raise BenchError(f"--bs {bs}: the block size must be a positive multiple of 512")
    if not 1 <= iodepth <= 256:
        raise BenchError(f"--iodepth {iodepth}: must be 1 to 256")
    if not 1 <= queues <= 64:
        raise BenchError(f"--queues {queues}: must be 1 to 64")
    write, random = RW_MODES[rw]
    num = ring_size(iodepth)
    # Per queue, each page aligned: split the desc table, avail ring and used
    # ring; packed the descriptor ring and the driver and device event areas
    # (4 bytes each); then the slots and the data.
    if packed:
        desc_len, avail_len, used_len = 16 * num, 4, 4
    else:
        desc_len, avail_len, used_len = 16 * num, 6 + 2 * num, 6 + 8 * num
    slots_len, data_len = SLOT_BYTES * iodepth, bs * iodepth
    per_queue = sum(_align(n, PAGE) for n in (desc_len, avail_len, used_len, slots_len, data_len))
    mem_size = _align(per_queue * queues, 2 << 20)

    try:
        fe = Frontend(socket_path)
    except OSError as exc:
        raise BenchError(f"cannot connect to {socket_path}: {exc.strerror or exc}") from None
    fd = os.memfd_create("vhostd-bench", os.MFD_CLOEXEC)
    log_fd = os.memfd_create("vhostd-bench-log", os.MFD_CLOEXEC)
    kicks, calls = [], []
    try:
        os.ftruncate(fd, mem_size)
        mem = mmap.mmap(fd, mem_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        base = ffi.cast("uint8_t *", ffi.from_buffer(mem))
        uva = int(ffi.cast("uintptr_t", base))

        offered = fe.get_features()
        if write and offered & (1 << F_RO):
            raise BenchError(f"{socket_path}: the disk is read-only; use --rw read or randread")
        if packed and not offered & (1 << F_RING_PACKED):
            raise BenchError(f"{socket_path}: the back-end does not offer packed virtqueues (no VIRTIO_F_RING_PACKED); "
                             "run without --packed")
        if queues > 1 and not offered & (1 << F_MQ):
            raise BenchError(f"{socket_path}: the back-end has one queue (no VIRTIO_BLK_F_MQ); use --queues 1")
        fe.set_owner()
        if not offered & (1 << F_PROTOCOL_FEATURES):
            raise BenchError(f"{socket_path}: the back-end offers no protocol features (need CONFIG)")
        pf = fe.get_protocol_features() & WANT_PROTOCOL
        fe.set_protocol_features(pf)
        if not pf & (1 << ProtocolFeature.CONFIG):
            raise BenchError(f"{socket_path}: the back-end does not serve its config space (no CONFIG)")
        if pf & (1 << ProtocolFeature.MQ) and fe.get_queue_num() < queues:
            raise BenchError(f"{socket_path}: the back-end has fewer than {queues} queues")
        capacity = struct.unpack("<Q", fe.get_config(0, 8))[0] * 512
        if capacity < bs:
            raise BenchError(f"{socket_path}: the disk ({capacity} bytes) is smaller than one block of {bs}")
        features = offered & (WANT_FEATURES | (1 << F_RING_PACKED if packed else 0))
        fe.set_features(features)
        fe.set_mem_table([MemoryRegion(0, mem_size, uva, 0)], [fd])
        if dirty_log:
            if not offered & (1 << F_LOG_ALL) or not pf & (1 << ProtocolFeature.LOG_SHMFD):
                raise BenchError(f"{socket_path}: the back-end cannot log dirty pages (no LOG_ALL or LOG_SHMFD)")
            log_size = _align(mem_size // PAGE // 8, PAGE)
            os.ftruncate(log_fd, log_size)
            fe.set_log_base(log_fd, log_size)
            features |= 1 << F_LOG_ALL
            fe.set_features(features)

        lqs = ffi.new("struct lg_queue[]", queues)
        off = 0
        for i in range(queues):
            layout = {}
            for name, n in (("desc", desc_len), ("avail", avail_len), ("used", used_len), ("slots", slots_len),
                            ("data", data_len)):
                layout[name] = off
                off += _align(n, PAGE)
            q = lqs[i]
            q.desc, q.avail, q.used = (base + layout[k] for k in ("desc", "avail", "used"))
            q.desc_gpa, q.avail_gpa, q.used_gpa = (layout[k] for k in ("desc", "avail", "used"))
            q.slots, q.slots_gpa = base + layout["slots"], layout["slots"]
            q.data, q.data_gpa = base + layout["data"], layout["data"]
            q.num = num
            kicks.append(make_eventfd())
            calls.append(make_eventfd())
            q.kick_fd, q.call_fd = kicks[-1], calls[-1]
            fe.set_vring_num(i, num)
            fe.set_vring_base(i, 1 << 15 if packed else 0)  # packed: position 0, wrap counter 1
            fe.set_vring_addr(i, uva + layout["desc"], uva + layout["used"], uva + layout["avail"],
                              VRING_F_LOG if dirty_log else 0, layout["used"])
            fe.set_vring_call(i, calls[-1])
            fe.set_vring_kick(i, kicks[-1])
            if pf:
                fe.set_vring_enable(i, True)

        params = ffi.new("struct lg_params *")
        params.write, params.random, params.bs, params.iodepth = write, random, bs, iodepth
        params.capacity, params.seconds, params.poll = capacity, seconds, int(poll)
        params.event_idx = int(bool(features & (1 << F_EVENT_IDX)))
        params.packed = int(packed)
        params.seed = seed
        res = ffi.new("struct lg_result *")
        rc = lib.lg_run(params, lqs, queues, res)  # cffi releases the GIL for the whole run
        error = ffi.string(res.error).decode(errors="replace")
        if rc == -errno.EPROTO:
            raise BenchError(f"{socket_path}: the back-end broke a ring: {error}")
        if rc < 0:
            raise BenchError(f"load generator refused the parameters ({error or os.strerror(-rc)})")
        for i in range(queues):
            fe.get_vring_base(i)  # stops the ring in the back-end
        del base, lqs
    except BackendError as exc:
        raise BenchError(f"{socket_path}: {exc}") from None
    except (OSError, EOFError) as exc:
        raise BenchError(f"{socket_path}: connection failed: {exc}") from None
    finally:
        fe.close()
        for f in (fd, log_fd, *kicks, *calls):
            os.close(f)
    elapsed = res.elapsed or seconds
    return BlkResult(rw=rw, bs=bs, iodepth=iodepth, queues=queues, seconds=elapsed, ios=res.ios,
                     errors=res.errors, iops=res.ios / elapsed, bw_bytes_per_s=res.bytes / elapsed,
                     lat_p50_us=res.p50_us, lat_p99_us=res.p99_us, lat_max_us=res.max_us, kicks=res.kicks,
                     drained=bool(res.drained), ring="packed" if packed else "split")


def magic() -> int:
    from vhostd._loadgen import lib

    return lib.lg_magic()
