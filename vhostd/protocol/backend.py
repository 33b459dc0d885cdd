"""The back-end side of vhost-user as a state machine with no sockets inside.

`BackendProtocol.handle(message)` validates one front-end request (payload
size, fds, ring index, negotiated features), applies it to a
`RequestHandler` and returns the replies to send.  The handler is the device
side (memory table, vrings, config space); this module only knows the
protocol.  Errors come in two kinds:

* `RequestError` -- this request is refused.  With REPLY_ACK negotiated and
  the need_reply flag set, the front-end gets a failure ack and the session
  goes on; otherwise the connection must be dropped (the front-end would
  assume success), so it becomes a `ProtocolError`.
* `ProtocolError` -- the caller must log it and close the connection.

Some requests must wait for the data plane before they are answered:
GET_VRING_BASE and RESET_DEVICE finish the requests still in flight on the
rings first (their I/O may take long, a hung disk forever); SET_VRING_KICK
may have to take a shared image's lock in a cluster first.  `handle` then
returns no reply and the protocol is `waiting`; the caller stops feeding it
messages and calls `poll()` whenever the device may have made progress,
until `poll()` returns the replies.  Nothing blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

from vhostd.protocol.codec import (
    ConfigAccess,
    InflightInfo,
    LogArea,
    MemoryRegion,
    Message,
    PayloadError,
    ProtocolError,
    VringAddr,
    VringState,
    pack_u64,
    unpack_memory_table,
    unpack_single_region,
    unpack_u64,
)
from vhostd.protocol.constants import (
    F_PROTOCOL_FEATURES,
    F_RING_PACKED,
    MAX_CONFIG_SPACE,
    VRING_F_LOG,
    MAX_MEM_SLOTS,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    ProtocolFeature,
    Request,
)

log = logging.getLogger("vhostd.protocol")


class RequestError(Exception):
    """The handler refuses one request; the message says why."""


class RequestHandler(Protocol):
    """What a device offers to the protocol.  Every fd passed in is owned by
    the handler from then on; a handler that raises must still close it."""

    def device_features(self) -> int: ...
    def protocol_features(self) -> int: ...
    def num_queues(self) -> int: ...
    def queue_num_reply(self) -> int:
        """GET_QUEUE_NUM's answer: queues for blk, queue pairs for net."""
    def set_features(self, features: int) -> None: ...
    def set_mem_table(self, regions: list[MemoryRegion], fds: list[int]) -> None: ...
    def add_mem_region(self, region: MemoryRegion, fd: int) -> None: ...
    def remove_mem_region(self, region: MemoryRegion) -> None: ...
    def set_vring_num(self, index: int, num: int) -> None: ...
    def set_vring_addr(self, addr: VringAddr) -> None: ...
    def set_vring_base(self, index: int, base: int) -> None: ...
    def drain_vring(self, index: int) -> None:
        """Take no new requests from the ring; those in flight go on."""
    def vring_pending(self, index: int) -> int:
        """Requests of the ring still in flight."""
    def get_vring_base(self, index: int) -> int:
        """Stop the ring (drained) and return its next avail index."""
    def set_vring_kick(self, index: int, fd: int | None) -> Wait | None:
        """May answer later (a Wait): starting the ring waits for something."""
    def set_vring_call(self, index: int, fd: int | None) -> None: ...
    def set_vring_err(self, index: int, fd: int | None) -> None: ...
    def set_vring_enable(self, index: int, enable: bool) -> None: ...
    def get_config(self, offset: int, size: int) -> bytes: ...
    def set_config(self, offset: int, data: bytes, flags: int) -> None: ...
    def set_mtu(self, mtu: int) -> None: ...
    def send_rarp(self, mac: bytes) -> None: ...
    def set_status(self, status: int) -> None: ...
    def get_status(self) -> int: ...
    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        """A new zeroed inflight area: (fd to send, its size).  The fd is
        the protocol's to send and close."""
    def set_inflight_fd(self, fd: int, info: InflightInfo) -> None: ...
    def set_log_base(self, fd: int, area: LogArea) -> None:
        """Map the dirty log (migration) from fd; replaces the one before."""
    def set_log_fd(self, fd: int) -> None:
        """The eventfd to write when the log changed."""
    def reset(self) -> None:
        """RESET_DEVICE: stop and forget all rings and features; keep memory."""
    def disconnected(self) -> None:
        """The front-end is gone: stop everything and unmap its memory."""


def _bit(feature: int) -> int:
    return 1 << feature


@dataclass
class Wait:
    """A request whose answer waits until ready() is true; then finish()
    gives what the request's function would have returned."""

    what: str
    ready: Callable[[], bool]
    finish: Callable[[], bytes | None]
    msg: Message | None = None


# Requests that carry exactly one fd (unless the NOFD bit says otherwise).
_ONE_FD = {Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR, Request.ADD_MEM_REG,
           Request.SET_INFLIGHT_FD, Request.SET_LOG_BASE, Request.SET_LOG_FD}
# Requests allowed to carry an fd we ignore (spec: REM_MEM_REG "MAY accept").
_TOLERATED_FD = {Request.REM_MEM_REG}

# Protocol feature each optional request depends on.
_NEEDS = {
    Request.GET_QUEUE_NUM: ProtocolFeature.MQ,
    Request.GET_CONFIG: ProtocolFeature.CONFIG,
    Request.SET_CONFIG: ProtocolFeature.CONFIG,
    Request.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
    Request.SET_STATUS: ProtocolFeature.STATUS,
    Request.GET_STATUS: ProtocolFeature.STATUS,
    Request.NET_SET_MTU: ProtocolFeature.MTU,
    Request.SEND_RARP: ProtocolFeature.RARP,
    Request.GET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
    Request.SET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
    Request.SET_LOG_BASE: ProtocolFeature.LOG_SHMFD,
}


class BackendProtocol:
    def __init__(self, handler: RequestHandler, logger: logging.Logger | logging.LoggerAdapter = log) -> None:
        self.handler = handler
        self.log = logger
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self._waiting: Wait | None = None
        self._dispatch = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.RESET_DEVICE: self._reset_device,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
            Request.NET_SET_MTU: self._net_set_mtu,
            Request.SEND_RARP: self._send_rarp,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
        }

    # ------------------------------------------------------------ public

    def offered_features(self) -> int:
        return self.handler.device_features() | _bit(F_PROTOCOL_FEATURES)

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return bool(self.acked_protocol_features & _bit(feature))

    @property
    def waiting(self) -> str | None:
        """What the last request waits for before it is answered, or None."""
        return self._waiting.what if self._waiting else None

    def handle(self, msg: Message) -> list[Message]:
        """Apply one request; return the replies.  Raises ProtocolError when
        the connection has to be closed.  Always consumes msg.fds.  Must not
        be called while `waiting`."""
        if self._waiting:
            raise ProtocolError(f"{msg.name} arrived while {self._waiting.what} was not answered yet")
        return self._answer(msg, lambda: self._handle(msg))

    def poll(self) -> list[Message] | None:
        """While waiting: None if still waiting, else the replies to the
        request that waited.  [] when nothing waits."""
        wait = self._waiting
        if wait is None:
            return []
        if not wait.ready():
            return None
        self._waiting = None
        return self._answer(wait.msg, wait.finish)

    def _answer(self, msg: Message, run: Callable[[], object]) -> list[Message]:
        try:
            explicit = run()
        except RequestError as exc:
            msg.close_fds()
            if msg.need_reply and self.has_protocol_feature(ProtocolFeature.REPLY_ACK):
                self.log.warning("%s refused: %s", msg.name, exc)
                return [msg.reply(pack_u64(1))]
            raise ProtocolError(f"{msg.name} refused: {exc}") from None
        except PayloadError as exc:
            msg.close_fds()
            raise ProtocolError(f"{msg.name}: {exc}") from None
        except BaseException:
            msg.close_fds()
            raise
        msg.close_fds()  # anything the handler did not take
        if isinstance(explicit, Wait):
            if not explicit.ready():
                explicit.msg = msg
                self._waiting = explicit
                return []
            return self._answer(msg, explicit.finish)
        if isinstance(explicit, Message):  # a reply that carries fds
            return [explicit]
        if explicit is not None:
            return [msg.reply(explicit)]
        if msg.need_reply and self.has_protocol_feature(ProtocolFeature.REPLY_ACK):
            return [msg.reply(pack_u64(0))]
        return []

    def connection_lost(self) -> None:
        """The front-end went away: drop all per-connection state (requests
        still in flight finish without writing back, see request.c)."""
        self._waiting = None
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self.handler.disconnected()

    # ------------------------------------------------------------ checks

    def _handle(self, msg: Message) -> bytes | None:
        try:
            request = Request(msg.request)
        except ValueError:
            raise RequestError(f"unknown request code {msg.request}") from None
        fn = self._dispatch.get(request)
        if fn is None:
            raise RequestError("not supported by this back-end")
        needed = _NEEDS.get(request)
        if needed is not None and not self.has_protocol_feature(needed):
            raise RequestError(f"needs protocol feature {needed.name}, which was not negotiated")
        if request not in _ONE_FD and request not in _TOLERATED_FD and request != Request.SET_MEM_TABLE and msg.fds:
            raise RequestError(f"carries {len(msg.fds)} unexpected file descriptor(s)")
        if request in _TOLERATED_FD:
            msg.close_fds()
        return fn(msg)

    def _ring(self, index: int) -> int:
        if index >= self.handler.num_queues():
            raise RequestError(f"ring index {index} out of range (device has {self.handler.num_queues()} queues)")
        return index

    def _ring_fd(self, msg: Message) -> tuple[int, int | None]:
        value = unpack_u64(msg.payload)
        index = self._ring(value & VRING_IDX_MASK)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise RequestError(f"reserved bits set in {value:#x}")
        if value & VRING_NOFD_MASK:
            if msg.fds:
                raise RequestError("no-fd flag set but a file descriptor was sent")
            return index, None
        return index, self._one_fd(msg)

    def _one_fd(self, msg: Message) -> int:
        if len(msg.fds) != 1:
            raise RequestError(f"expects exactly one file descriptor, got {len(msg.fds)}")
        return msg.take_fd()

    # ------------------------------------------------------------ features

    def _get_features(self, msg: Message) -> bytes:
        return pack_u64(self.offered_features())

    def _set_features(self, msg: Message) -> None:
        features = unpack_u64(msg.payload)
        extra = features & ~self.offered_features()
        if extra:
            raise RequestError(f"front-end acked features {extra:#x} that were not offered")
        self.acked_features = features
        self.handler.set_features(features)
        if not features & _bit(F_PROTOCOL_FEATURES):
            # Without protocol features there is no SET_VRING_ENABLE: rings start enabled.
            for index in range(self.handler.num_queues()):
                self.handler.set_vring_enable(index, True)

    def _get_protocol_features(self, msg: Message) -> bytes:
        return pack_u64(self.handler.protocol_features())

    def _set_protocol_features(self, msg: Message) -> None:
        features = unpack_u64(msg.payload)
        extra = features & ~self.handler.protocol_features()
        if extra:
            raise RequestError(f"front-end acked protocol features {extra:#x} that were not offered")
        self.acked_protocol_features = features

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec recommends treating it as "disable all rings".
        for index in range(self.handler.num_queues()):
            self.handler.set_vring_enable(index, False)

    # ------------------------------------------------------------ memory

    def _set_mem_table(self, msg: Message) -> None:
        regions = unpack_memory_table(msg.payload)
        if len(msg.fds) != len(regions):
            raise RequestError(f"{len(regions)} regions but {len(msg.fds)} file descriptors")
        if not regions:
            raise RequestError(
                "memory table has no regions: guest memory is not shareable "
                "(start the VM with a shared memory backend, e.g. QEMU's "
                "-object memory-backend-memfd,share=on)"
            )
        fds, msg.fds = msg.fds, []
        self.handler.set_mem_table(regions, fds)

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return pack_u64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg: Message) -> None:
        region = unpack_single_region(msg.payload)
        self.handler.add_mem_region(region, self._one_fd(msg))

    def _rem_mem_reg(self, msg: Message) -> None:
        self.handler.remove_mem_region(unpack_single_region(msg.payload))

    # ------------------------------------------------------------ rings

    def _set_vring_num(self, msg: Message) -> None:
        st = VringState.unpack(msg.payload)
        self.handler.set_vring_num(self._ring(st.index), st.num)

    def _set_vring_addr(self, msg: Message) -> None:
        addr = VringAddr.unpack(msg.payload)
        self._ring(addr.index)
        if addr.flags & ~VRING_F_LOG:
            raise RequestError(f"unknown ring address flags {addr.flags:#x}")
        self.handler.set_vring_addr(addr)

    def _set_vring_base(self, msg: Message) -> None:
        st = VringState.unpack(msg.payload)
        # Split rings: the avail index, 16 bits.  Packed rings: position and
        # wrap counter, with the used side in the upper half (the data plane
        # checks them against the ring size).
        if st.num > 0xFFFF and not self.acked_features & _bit(F_RING_PACKED):
            raise RequestError(f"ring base {st.num} does not fit 16 bits")
        self.handler.set_vring_base(self._ring(st.index), st.num)

    def _get_vring_base(self, msg: Message) -> Wait:
        # The front-end resumes from the index we return (the destination of
        # a migration, a reconnect): every request before it must be complete.
        st = VringState.unpack(msg.payload)
        index = self._ring(st.index)
        self.handler.drain_vring(index)
        return Wait(f"GET_VRING_BASE of ring {index}", lambda: self.handler.vring_pending(index) == 0,
                     lambda: VringState(index, self.handler.get_vring_base(index)).pack())

    def _set_vring_kick(self, msg: Message) -> Wait | None:
        return self.handler.set_vring_kick(*self._ring_fd(msg))

    def _set_vring_call(self, msg: Message) -> None:
        self.handler.set_vring_call(*self._ring_fd(msg))

    def _set_vring_err(self, msg: Message) -> None:
        self.handler.set_vring_err(*self._ring_fd(msg))

    def _set_vring_enable(self, msg: Message) -> None:
        st = VringState.unpack(msg.payload)
        if not self.acked_features & _bit(F_PROTOCOL_FEATURES) and self.acked_features:
            raise RequestError("needs VHOST_USER_F_PROTOCOL_FEATURES, which was not negotiated")
        if st.num not in (0, 1):
            raise RequestError(f"enable must be 0 or 1, got {st.num}")
        self.handler.set_vring_enable(self._ring(st.index), bool(st.num))

    def _get_queue_num(self, msg: Message) -> bytes:
        return pack_u64(self.handler.queue_num_reply())

    # ------------------------------------------------------------ config, status, reset

    def _get_config(self, msg: Message) -> bytes:
        access = ConfigAccess.unpack(msg.payload)
        if access.offset + access.size > MAX_CONFIG_SPACE:
            # The spec's way to say "error" here is an empty config payload.
            self.log.warning("GET_CONFIG of %d bytes at offset %d is outside the config space", access.size, access.offset)
            return ConfigAccess(access.offset, 0, access.flags, b"").pack()
        data = self.handler.get_config(access.offset, access.size)
        return ConfigAccess(access.offset, access.size, access.flags, data).pack()

    def _set_config(self, msg: Message) -> None:
        access = ConfigAccess.unpack(msg.payload)
        if access.offset + access.size > MAX_CONFIG_SPACE:
            raise RequestError(f"{access.size} bytes at offset {access.offset} is outside the config space")
        self.handler.set_config(access.offset, access.data, access.flags)

    def _reset_device(self, msg: Message) -> Wait:
        # After the reset the guest may reuse any buffer: no I/O may still write into one.
        rings = range(self.handler.num_queues())
        for index in rings:
            self.handler.drain_vring(index)

        def reset() -> None:
            self.acked_features = 0
            self.handler.reset()

        return Wait("RESET_DEVICE", lambda: all(self.handler.vring_pending(i) == 0 for i in rings), reset)

    def _set_status(self, msg: Message) -> None:
        status = unpack_u64(msg.payload)
        if status > 0xFF:
            raise RequestError(f"device status {status:#x} does not fit 8 bits")
        self.handler.set_status(status)

    def _net_set_mtu(self, msg: Message) -> None:
        mtu = unpack_u64(msg.payload)
        if mtu > 0xFFFF:
            raise RequestError(f"MTU {mtu} does not fit 16 bits")
        self.handler.set_mtu(mtu)

    def _send_rarp(self, msg: Message) -> None:
        # The first 6 bytes of the u64 payload are the guest's MAC address.
        if len(msg.payload) < 8:
            raise PayloadError(f"u64 payload must be 8 bytes, got {len(msg.payload)}")
        self.handler.send_rarp(bytes(msg.payload[:6]))

    # ------------------------------------------------------------ inflight tracking

    def _inflight_info(self, msg: Message) -> InflightInfo:
        info = InflightInfo.unpack(msg.payload)
        if not 1 <= info.num_queues <= self.handler.num_queues():
            raise RequestError(f"inflight area for {info.num_queues} queues; the device has "
                               f"{self.handler.num_queues()}")
        if not 1 <= info.queue_size <= 32768 or info.queue_size & (info.queue_size - 1):
            raise RequestError(f"inflight queue size {info.queue_size} is not a power of two up to 32768")
        return info

    def _get_inflight_fd(self, msg: Message) -> Message:
        info = self._inflight_info(msg)
        fd, size = self.handler.get_inflight_fd(info.num_queues, info.queue_size)
        reply = msg.reply(InflightInfo(size, 0, info.num_queues, info.queue_size).pack())
        reply.fds = [fd]
        return reply

    def _set_inflight_fd(self, msg: Message) -> None:
        info = self._inflight_info(msg)
        self.handler.set_inflight_fd(self._one_fd(msg), info)

    def _get_status(self, msg: Message) -> bytes:
        return pack_u64(self.handler.get_status())

    # ------------------------------------------------------------ migration

    def _set_log_base(self, msg: Message) -> bytes:
        area = LogArea.unpack(msg.payload)
        self.handler.set_log_base(self._one_fd(msg), area)
        # QEMU waits for an answer once the log is mapped, REPLY_ACK or not.
        return pack_u64(0)

    def _set_log_fd(self, msg: Message) -> None:
        self.handler.set_log_fd(self._one_fd(msg))
