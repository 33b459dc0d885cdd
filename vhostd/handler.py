"""Glue between the vhost-user protocol and a device: implements the
protocol's RequestHandler with a device model and its rings in the data
plane.  The device model never sees vhost-user; the protocol never sees
the data plane."""

from __future__ import annotations

import logging
import mmap
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

from vhostd.dataplane import DataPlaneError, Engine, Rings
from vhostd.native import ffi, lib
from vhostd.devices.base import Device
from vhostd.protocol.backend import RequestError, Wait
from vhostd.protocol.codec import LogArea, MemoryRegion, VringAddr
from vhostd.protocol.constants import F_LOG_ALL, ProtocolFeature
from vhostd.virtio import STATUS_NEEDS_RESET

PROTOCOL_FEATURES = sum(
    1 << f
    for f in (
        ProtocolFeature.MQ,
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.CONFIG,
        ProtocolFeature.RESET_DEVICE,
        ProtocolFeature.CONFIGURE_MEM_SLOTS,
        ProtocolFeature.STATUS,
        ProtocolFeature.LOG_SHMFD,
    )
)
# The dirty log may be as large as this: a bit per 4 KiB page of 8 TiB of
# guest-physical address space.
MAX_LOG_BYTES = 256 << 20


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _require_eventfd(fd: int | None, what: str) -> None:
    """Kick/call/err fds must be eventfds: a pipe or file could block a worker.

    They are also made non-blocking: a blocking eventfd whose counter the
    front-end drained (kick) or saturated (call, err) would otherwise hang
    the worker inside read()/write() while it holds the queue lock.  The flag
    lives in the open file description, which the front-end shares; a
    front-end never needs blocking I/O on these (QEMU creates them
    non-blocking anyway)."""
    if fd is None:
        return
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = "?"
    if target != "anon_inode:[eventfd]":
        _close(fd)
        raise RequestError(f"{what} fd is {target}, not an eventfd")
    os.set_blocking(fd, False)


def _map_shared(fd: int, size: int, offset: int, what: str) -> tuple[mmap.mmap, object]:
    """Map size bytes at offset of a front-end's memory file: (mmap, its cdata)."""
    if offset % mmap.PAGESIZE:
        raise RequestError(f"{what} mmap offset {offset:#x} is not page aligned")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or offset + size > st.st_size:
        # A shorter file would fault (SIGBUS) where the area goes past its end.
        raise RequestError(f"{what} fd is not a memory file of at least {offset + size} bytes")
    try:
        area = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    except (OSError, ValueError) as exc:
        raise RequestError(f"cannot map the {what}: {exc}") from None
    return area, ffi.from_buffer(area)


def _unmap(mapped: tuple[mmap.mmap, object]) -> None:
    area, base = mapped
    ffi.release(base)
    area.close()


class DeviceHandler:
    def __init__(self, device: Device, engine: Engine, log: logging.LoggerAdapter | logging.Logger) -> None:
        self.device = device
        self.log = log
        self.status = 0
        self.features = 0
        self.event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._inflight = None  # (mmap, cdata) of the inflight area while a front-end set one
        self._release_wanted = False  # release the device once its orphaned requests are done
        self._log = None  # (mmap, cdata) of the dirty log while a front-end set one
        self._pending_claim = None  # abandons a claim running off the loop (see _claim_off_loop)
        self._lock_thread: ThreadPoolExecutor | None = None
        self.rings = Rings(engine, device, self.event_fd)
        self.reset_reason = ""  # the log line of the last queue that broke (for status views)

    def close(self) -> None:
        if self._lock_thread is not None:
            self._lock_thread.shutdown(wait=True)  # (bounded: each lock call gives up after LOCK_WAIT)
        self.rings.close()
        _close(self.event_fd)

    def report_errors(self) -> None:
        """Log each broken queue once (called when event_fd is readable,
        which it also becomes when a draining queue has nothing pending)."""
        try:
            os.eventfd_read(self.event_fd)
        except BlockingIOError:
            pass
        self.log_errors()
        if self._release_wanted:
            self._release_if_stopped()

    def log_errors(self) -> None:
        for queue, message in self.rings.take_errors():
            self.log.error("queue %d marked NEEDS_RESET: %s", queue, message)
            self.reset_reason = f"queue {queue} marked NEEDS_RESET: {message}"
        for queue, n in self.rings.take_redos():
            self.log.warning("queue %d: redoing %d request(s) a previous vhostd took and did not complete "
                             "(inflight area)", queue, n)

    def _dp(self, fn, *args):
        try:
            return fn(*args)
        except DataPlaneError as exc:
            raise RequestError(str(exc)) from None

    # RequestHandler --------------------------------------------------------

    def device_features(self) -> int:
        # Logging is the rings' business, not the device model's: every device can.
        return self.device.features() | (1 << F_LOG_ALL)

    def protocol_features(self) -> int:
        return PROTOCOL_FEATURES | self.device.extra_protocol_features()

    def num_queues(self) -> int:
        return self.device.num_queues

    def queue_num_reply(self) -> int:
        return self.device.queue_num_reply()

    def set_features(self, features: int) -> None:
        self.features = features
        self.rings.set_features(features)
        try:
            self.device.set_features(features)
        except (OSError, ValueError) as exc:
            raise RequestError(f"cannot apply features {features:#x}: {exc}") from None

    def set_mem_table(self, regions: list[MemoryRegion], fds: list[int]) -> None:
        self._dp(self.rings.set_mem_table, regions, fds)
        self.log.info("memory table: %s", ", ".join(f"{r.guest_addr:#x}+{r.size:#x}" for r in regions))

    def add_mem_region(self, region: MemoryRegion, fd: int) -> None:
        self._dp(self.rings.add_region, region, fd)

    def remove_mem_region(self, region: MemoryRegion) -> None:
        self._dp(self.rings.remove_region, region)

    def set_vring_num(self, index: int, num: int) -> None:
        self._dp(self.rings.set_num, index, num)

    def set_vring_addr(self, addr: VringAddr) -> None:
        self._dp(self.rings.set_addr, addr.index, addr.desc, addr.used, addr.avail, addr.flags, addr.log)

    def set_vring_base(self, index: int, base: int) -> None:
        self._dp(self.rings.set_base, index, base)

    def drain_vring(self, index: int) -> None:
        self._dp(self.rings.drain, index)

    def vring_pending(self, index: int) -> int:
        return self.rings.pending(index)

    def get_vring_base(self, index: int) -> int:
        base = self._dp(self.rings.get_base, index)
        self._release_if_stopped()
        return base

    def set_vring_kick(self, index: int, fd: int | None) -> Wait | None:
        _require_eventfd(fd, "kick")
        if self.device.claim_waits() and not self.rings.any_started():
            return self._claim_off_loop(index, fd)
        if not self._claim(index, fd):
            return None
        self._dp(self.rings.set_kick, index, fd)
        return None

    # A shared image is locked only while the guest runs the device: the
    # first queue that starts claims it, and it is released once no queue
    # runs and no request of a stopped one is in flight (an old write must
    # not land after the next user's).

    def _claim(self, index: int, fd: int | None) -> bool:
        try:
            self.device.claim()
        except OSError as exc:
            self._refuse_start(index, fd, exc)
            return False
        self._release_wanted = False
        return True

    def _refuse_start(self, index: int, fd: int | None, exc: OSError) -> None:
        # Refused (another user runs the image): the queue stays stopped
        # and NEEDS_RESET, and the log names the holder.
        _close(fd)
        self._dp(self.rings.fail, index, f"queue {index} cannot start: {exc.strerror or exc}")
        self.log_errors()

    def _locker(self) -> ThreadPoolExecutor:
        """One thread for a device's lock calls that wait for a cluster: in
        order, so a release is never overtaken by the next claim."""
        if self._lock_thread is None:
            self._lock_thread = ThreadPoolExecutor(1, thread_name_prefix=f"vhostd-lock-{self.device.name}")
        return self._lock_thread

    def _claim_off_loop(self, index: int, fd: int | None) -> Wait:
        """Take a lock that waits for a cluster on a thread of its own: the
        event loop serves everything else meanwhile; the answer to this
        SET_VRING_KICK waits (the front-end's next message is read after it).
        The thread writes event_fd when done, which makes the server poll."""
        state = {"done": False, "error": None, "abandoned": False}
        guard = threading.Lock()

        def run() -> None:
            error = None
            try:
                self.device.claim()
            except OSError as exc:
                error = exc
            with guard:
                state["done"], state["error"] = True, error
                abandoned = state["abandoned"]
            if abandoned and error is None:
                self.device.release()  # the front-end left meanwhile: nobody runs the image
            try:
                os.eventfd_write(self.event_fd, 1)
            except OSError:
                pass  # the handler was closed meanwhile

        def finish() -> None:
            self._pending_claim = None
            if state["error"] is not None:
                self._refuse_start(index, fd, state["error"])
                return None
            self._release_wanted = False
            self._dp(self.rings.set_kick, index, fd)
            return None

        def abandon() -> None:
            with guard:
                state["abandoned"] = not state["done"]
            _close(fd)

        self._pending_claim = abandon
        self._locker().submit(run)
        return Wait(f"SET_VRING_KICK of ring {index} (taking the image's lock)", lambda: state["done"], finish)

    def _release_if_stopped(self) -> None:
        if self.rings.any_started():
            return
        if self.rings.orphans:
            self._release_wanted = True  # event_fd is written when they are done
            return
        self._release_wanted = False
        if self.device.claim_waits():
            self._locker().submit(self._release)
        else:
            self._release()

    def _release(self) -> None:
        try:
            self.device.release()
        except OSError as exc:
            self.log.warning("cannot release the device: %s", exc)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        _require_eventfd(fd, "call")
        self._dp(self.rings.set_call, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        _require_eventfd(fd, "err")
        self._dp(self.rings.set_err, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._dp(self.rings.set_enable, index, enable)

    def get_config(self, offset: int, size: int) -> bytes:
        space = self.device.config_space()
        return space[offset : offset + size].ljust(size, b"\0")

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        try:
            self.device.write_config(offset, data)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def set_mtu(self, mtu: int) -> None:
        try:
            self.device.set_mtu(mtu)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def send_rarp(self, mac: bytes) -> None:
        try:
            self.device.send_rarp(mac)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def set_status(self, status: int) -> None:
        # Status 0 is not a ring reset here: QEMU sends it before GET_VRING_BASE.
        self.status = status

    def get_status(self) -> int:
        return self.status | (STATUS_NEEDS_RESET if self.rings.needs_reset else 0)

    # ------------------------------------------------------------ inflight tracking

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        size = lib.vd_inflight_queue_bytes(queue_size) * num_queues
        fd = os.memfd_create(f"vhostd-inflight-{self.device.name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._map_inflight(fd, size, 0, num_queues, queue_size)
        except BaseException:
            os.close(fd)
            raise
        self.log.info("inflight tracking: new area of %d bytes for %d queue(s) of %d", size, num_queues, queue_size)
        return fd, size

    def set_inflight_fd(self, fd: int, info) -> None:
        try:
            self._map_inflight(fd, info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size)
        finally:
            os.close(fd)
        self.log.info("inflight tracking: %d queue(s) of %d from the front-end's area", info.num_queues,
                      info.queue_size)

    def _map_inflight(self, fd: int, size: int, offset: int, num_queues: int, queue_size: int) -> None:
        per = lib.vd_inflight_queue_bytes(queue_size)
        if queue_size > self.device.max_queue_size:
            raise RequestError(f"inflight queue size {queue_size} exceeds this device's {self.device.max_queue_size}")
        if size < per * num_queues or size > 64 << 20:
            raise RequestError(f"inflight area of {size} bytes; {num_queues} queue(s) of {queue_size} need {per * num_queues}")
        area = _map_shared(fd, size, offset, "inflight")
        self._unmap_inflight()
        self._inflight = area
        base = area[1]
        for i in range(num_queues):
            self._dp(self.rings.set_inflight, i, ffi.cast("uint8_t *", base) + i * per, queue_size)

    def _unmap_inflight(self) -> None:
        if self._inflight is None:
            return
        for i in range(self.device.num_queues):
            self.rings.set_inflight(i, ffi.NULL)
        _unmap(self._inflight)
        self._inflight = None

    # ------------------------------------------------------------ migration: the dirty log

    def set_log_base(self, fd: int, area: LogArea) -> None:
        size = area.mmap_size
        try:
            if not 0 < size <= MAX_LOG_BYTES:
                raise RequestError(f"dirty log of {size} bytes (at most {MAX_LOG_BYTES})")
            mapped = _map_shared(fd, size, area.mmap_offset, "dirty log")
        finally:
            os.close(fd)
        try:
            self._dp(self.rings.set_log, ffi.cast("void *", mapped[1]), size)
        except RequestError:
            _unmap(mapped)
            raise
        self._unmap_log(swapped=True)
        self._log = mapped
        self.log.info("dirty log: %d bytes (guest memory up to %#x)", size, size * 8 * 4096)

    def set_log_fd(self, fd: int) -> None:
        _require_eventfd(fd, "log")
        self.rings.set_log_fd(fd)

    def _unmap_log(self, swapped: bool = False) -> None:
        """Drop the dirty log; `swapped`: the data plane already uses another."""
        if self._log is None:
            return
        if not swapped:
            self.rings.set_log(ffi.NULL, 0)
        _unmap(self._log)
        self._log = None

    def reset(self) -> None:
        self.rings.reset()
        self.device.reset()
        self._release_if_stopped()
        # A queue may have broken after the last event_fd wake-up; with the
        # rings stopped no new error can come, so collect it now or never.
        self.log_errors()
        self.status = 0
        self.features = 0

    def disconnected(self) -> None:
        if self._pending_claim is not None:  # its answer will never be sent
            self._pending_claim()
            self._pending_claim = None
        self.reset()
        self._unmap_inflight()
        self._unmap_log()
        self.rings.set_log_fd(-1)
        self.rings.clear_memory()
