"""Python face of the virtqueue + memory layer (the C data plane).

`Engine` owns the worker threads; `Rings` owns one device's memory table and
virtqueues inside the engine.  Every call goes straight to C (cffi releases
the GIL), and every failure comes back as `DataPlaneError` with the C side's
one-line reason.  Nothing here knows about vhost-user messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vhostd.native import ffi, lib

ERRLEN = 256


class DataPlaneError(Exception):
    pass


def _call(fn, *args) -> None:
    err = ffi.new("char[]", ERRLEN)
    rc = fn(*args, err, ERRLEN)
    if rc < 0:
        raise DataPlaneError(ffi.string(err).decode(errors="replace") or os.strerror(-rc))


@dataclass(frozen=True)
class QueueInfo:
    index: int
    num: int
    started: bool
    enabled: bool
    broken: bool
    polled: bool
    last_avail: int
    used_idx: int
    driver_avail: int  # the driver's avail index: ahead of last_avail = requests not taken yet
    requests: int
    kicks: int
    notifies: int
    out_bytes: int
    in_bytes: int
    pending: int  # requests submitted and not yet completed
    packed: bool = False  # a packed ring: last_avail/used_idx are ring positions


class Engine:
    """A pool of native worker threads shared by all devices of the daemon."""

    def __init__(self, workers: int = 0) -> None:
        if workers <= 0:
            workers = min(os.cpu_count() or 1, 4)
        self.workers = workers
        self._ptr = lib.vd_engine_new(workers)
        if self._ptr == ffi.NULL:
            raise DataPlaneError("cannot start the data plane workers")

    def close(self) -> None:
        if self._ptr is not None:
            lib.vd_engine_free(self._ptr)
            self._ptr = None

    def uring(self) -> tuple[bool, str]:
        """Whether the workers have io_uring rings, and if not, why."""
        why = ffi.new("char[]", ERRLEN)
        ok = bool(lib.vd_engine_uring(self.ptr, why, ERRLEN))
        return ok, ffi.string(why).decode(errors="replace")

    @property
    def ptr(self):
        if self._ptr is None:
            raise DataPlaneError("engine is closed")
        return self._ptr


class Rings:
    """Memory table and virtqueues of one device, served by the engine.

    The device model gives the C request handler and its context (see
    Device.native); `event_fd` becomes readable when a queue breaks (call
    `take_errors`) or a draining queue has nothing pending any more.  With
    `poll_us` a queue that ran empty is busy-polled that long before it
    waits for a kick again (see engine.c).
    """

    def __init__(self, engine: Engine, device, event_fd: int) -> None:
        self.num_queues = device.num_queues
        self._engine = engine
        handler, ctx, req_priv, release = device.native()
        # A device whose store runs on one worker (NBD) has all its queues there.
        worker = device.place(engine)
        self._ptr = lib.vd_device_new(engine.ptr, device.num_queues, device.max_queue_size, handler, ctx,
                                      req_priv, release, event_fd, worker)
        if self._ptr == ffi.NULL:
            if release != ffi.NULL:
                release(ctx)  # the reference native() gave is not taken
            raise DataPlaneError(f"cannot create a device with {device.num_queues} queues")
        if device.poll_us:
            lib.vd_device_set_poll(self._ptr, device.poll_us)

    def close(self) -> None:
        if self._ptr is not None:
            lib.vd_device_free(self._ptr)
            self._ptr = None

    @property
    def ptr(self):
        return self._ptr

    # memory ---------------------------------------------------------------

    def set_mem_table(self, regions, fds: list[int]) -> None:
        """regions: objects with guest_addr/size/user_addr/mmap_offset.  Takes the fds."""
        descs = ffi.new("struct vd_region_desc[]", len(regions))
        for d, r in zip(descs, regions):
            d.gpa, d.size, d.uva, d.mmap_offset = r.guest_addr, r.size, r.user_addr, r.mmap_offset
        _call(lib.vd_mem_set_table, self._ptr, len(regions), descs, ffi.new("int[]", fds))

    def add_region(self, region, fd: int) -> None:
        _call(lib.vd_mem_add_region, self._ptr, self._desc(region), fd)

    def remove_region(self, region) -> None:
        _call(lib.vd_mem_remove_region, self._ptr, self._desc(region))

    @staticmethod
    def _desc(r):
        return ffi.new("struct vd_region_desc *", (r.guest_addr, r.size, r.user_addr, r.mmap_offset))

    def clear_memory(self) -> None:
        lib.vd_device_clear_memory(self._ptr)

    # queues ---------------------------------------------------------------

    def set_features(self, features: int) -> None:
        lib.vd_device_set_features(self._ptr, features)

    def set_num(self, index: int, num: int) -> None:
        _call(lib.vd_queue_set_num, self._ptr, index, num)

    def set_addr(self, index: int, desc: int, used: int, avail: int, flags: int = 0, log: int = 0) -> None:
        _call(lib.vd_queue_set_addr, self._ptr, index, desc, used, avail, flags, log)

    def set_log(self, base, size: int) -> None:
        """The dirty log at base (a cdata pointer; ffi.NULL: none)."""
        _call(lib.vd_device_set_log, self._ptr, base, size)

    def set_log_fd(self, fd: int) -> None:
        lib.vd_device_set_log_fd(self._ptr, fd)

    def set_base(self, index: int, base: int) -> None:
        _call(lib.vd_queue_set_base, self._ptr, index, base)

    def drain(self, index: int) -> int:
        """Take no new requests on the queue; returns how many are still
        pending (event_fd is written when that reaches 0)."""
        pending = ffi.new("uint32_t *")
        _call(lib.vd_queue_drain, self._ptr, index, pending)
        return pending[0]

    def pending(self, index: int) -> int:
        return lib.vd_queue_pending(self._ptr, index)

    def get_base(self, index: int) -> int:
        """Stop the queue and return where the device got to in the avail
        ring (drain it first: requests still pending are orphaned)."""
        base = ffi.new("uint32_t *")
        _call(lib.vd_queue_get_base, self._ptr, index, base)
        return base[0]

    def set_kick(self, index: int, fd: int | None) -> None:
        """Start the queue; None means no kick fd (the worker polls the ring)."""
        _call(lib.vd_queue_set_kick, self._ptr, index, -1 if fd is None else fd)

    def set_call(self, index: int, fd: int | None) -> None:
        _call(lib.vd_queue_set_call, self._ptr, index, -1 if fd is None else fd)

    def set_err(self, index: int, fd: int | None) -> None:
        _call(lib.vd_queue_set_err, self._ptr, index, -1 if fd is None else fd)

    def set_enable(self, index: int, enable: bool) -> None:
        _call(lib.vd_queue_set_enable, self._ptr, index, int(enable))

    def reset(self) -> None:
        lib.vd_device_reset(self._ptr)

    def fail(self, index: int, message: str) -> None:
        """Break the queue with message as its error (NEEDS_RESET), as a bad ring would."""
        _call(lib.vd_device_fail, self._ptr, index, message.encode()[:ERRLEN - 1])

    @property
    def orphans(self) -> int:
        """Requests of stopped queues still in flight (event_fd is written when none are left)."""
        return lib.vd_device_orphans(self._ptr)

    def any_started(self) -> bool:
        return any(self.queue_info(i).started for i in range(self.num_queues))

    # state ----------------------------------------------------------------

    @property
    def needs_reset(self) -> bool:
        return bool(lib.vd_device_needs_reset(self._ptr))

    def take_errors(self) -> list[tuple[int, str]]:
        """(queue, message) for each queue that broke since the last call."""
        out = []
        buf = ffi.new("char[]", ERRLEN)
        while (q := lib.vd_device_take_error(self._ptr, buf, ERRLEN)) >= 0:
            out.append((q, ffi.string(buf).decode(errors="replace")))
        return out

    def take_redos(self) -> list[tuple[int, int]]:
        """(queue, requests) for each queue that started by redoing requests
        from the inflight area since the last call."""
        out, count = [], ffi.new("int *")
        while (q := lib.vd_device_take_redo(self._ptr, count)) >= 0:
            out.append((q, count[0]))
        return out

    def set_inflight(self, index: int, region, queue_size: int = 0) -> None:
        """region: a cdata pointer into the inflight mapping, or ffi.NULL."""
        _call(lib.vd_queue_set_inflight, self._ptr, index, region, queue_size)

    def set_timing(self, on: bool) -> None:
        lib.vd_device_set_timing(self._ptr, int(on))

    def latency(self, index: int) -> tuple[list[int], int]:
        """(counts per bucket, total ns): bucket k counts requests under
        2**k microseconds, the last one everything slower."""
        buckets = ffi.new("uint64_t[]", lib.VD_LAT_BUCKETS)
        total = ffi.new("uint64_t *")
        lib.vd_queue_get_latency(self._ptr, index, buckets, total)
        return list(buckets), total[0]

    def queue_info(self, index: int) -> QueueInfo:
        info = ffi.new("struct vd_queue_info *")
        lib.vd_queue_get_stats(self._ptr, index, info)
        return QueueInfo(
            index, info.num, bool(info.started), bool(info.enabled), bool(info.broken), bool(info.polled),
            info.last_avail, info.used_idx, info.driver_avail, info.requests, info.kicks, info.notifies,
            info.out_bytes, info.in_bytes, info.pending, bool(info.packed),
        )
