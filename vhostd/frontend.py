"""A blocking vhost-user front-end: the client side of the protocol.

Used by the tests (and later by the VMM and the load generator) to drive any
vhost-user back-end: vhostd, qemu-storage-daemon, DPDK.  It shares the
codec with the back-end, so both sides agree on layouts by construction.
"""

from __future__ import annotations

import array
import os
import socket

from vhostd.protocol.codec import (
    ConfigAccess,
    InflightInfo,
    LogArea,
    MemoryRegion,
    Message,
    MessageDecoder,
    ProtocolError,
    VringAddr,
    VringState,
    pack_memory_table,
    pack_single_region,
    pack_u64,
    unpack_u64,
)
from vhostd.protocol.constants import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    VERSION,
    VRING_NOFD_MASK,
    ProtocolFeature,
    Request,
)

_REPLIES = {
    Request.SET_LOG_BASE,  # with LOG_SHMFD: answered once the log is mapped
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM,
    Request.GET_CONFIG,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
    Request.GET_INFLIGHT_FD,
}


class BackendError(Exception):
    """The back-end refused a request (failure ack) or closed the connection."""


class Frontend:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.protocol_features = 0
        self.features = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ raw messages

    def send(self, request: int, payload: bytes = b"", fds: list[int] = (), flags: int = VERSION) -> None:
        data = Message(request, flags, payload).encode()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)

    def send_raw(self, data: bytes, fds: list[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)

    def recv(self) -> Message:
        decoder = MessageDecoder(expect_reply=True)
        while (msg := decoder.pop()) is None:
            data = self.sock.recv(decoder.bytes_needed())
            if not data:
                raise BackendError("back-end closed the connection")
            decoder.feed(data)
        return msg

    def request(self, request: int, payload: bytes = b"", fds: list[int] = (), ack: bool | None = None) -> bytes | None:
        """Send a request; return the reply payload for requests that have one.

        With ack=True (default when REPLY_ACK is negotiated) the need_reply
        flag is set and a failure ack raises BackendError.
        """
        if ack is None:
            ack = bool(self.protocol_features & (1 << ProtocolFeature.REPLY_ACK))
        has_reply = request in _REPLIES
        flags = VERSION | (FLAG_NEED_REPLY if ack and not has_reply else 0)
        self.send(request, payload, fds, flags)
        if not has_reply and not (flags & FLAG_NEED_REPLY):
            return None
        reply = self.recv()
        if reply.request != request:
            raise ProtocolError(f"reply to {reply.name} while waiting for {Request(request).name}")
        if has_reply:
            return reply.payload
        if unpack_u64(reply.payload) != 0:
            raise BackendError(f"{Request(request).name} refused by the back-end")
        return None

    # ------------------------------------------------------------ typed requests

    def get_features(self) -> int:
        return unpack_u64(self.request(Request.GET_FEATURES))

    def set_features(self, features: int) -> None:
        self.features = features
        self.request(Request.SET_FEATURES, pack_u64(features))

    def get_protocol_features(self) -> int:
        return unpack_u64(self.request(Request.GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: int) -> None:
        self.request(Request.SET_PROTOCOL_FEATURES, pack_u64(features), ack=False)
        self.protocol_features = features

    def set_owner(self) -> None:
        self.request(Request.SET_OWNER)

    def negotiate(self, want_features: int | None = None, want_protocol: int | None = None) -> int:
        """The usual handshake; returns the acked virtio features."""
        offered = self.get_features()
        self.set_owner()
        if offered & (1 << F_PROTOCOL_FEATURES):
            pf = self.get_protocol_features()
            self.set_protocol_features(pf if want_protocol is None else pf & want_protocol)
        features = offered if want_features is None else offered & want_features
        self.set_features(features)
        return features

    def set_mem_table(self, regions: list[MemoryRegion], fds: list[int]) -> None:
        self.request(Request.SET_MEM_TABLE, pack_memory_table(regions), fds)

    def add_mem_region(self, region: MemoryRegion, fd: int) -> None:
        self.request(Request.ADD_MEM_REG, pack_single_region(region), [fd])

    def remove_mem_region(self, region: MemoryRegion) -> None:
        self.request(Request.REM_MEM_REG, pack_single_region(region))

    def get_max_mem_slots(self) -> int:
        return unpack_u64(self.request(Request.GET_MAX_MEM_SLOTS))

    def get_queue_num(self) -> int:
        return unpack_u64(self.request(Request.GET_QUEUE_NUM))

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(Request.SET_VRING_NUM, VringState(index, num).pack())

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, flags: int = 0, log: int = 0) -> None:
        """flags VRING_F_LOG: log used-ring writes at guest address `log`."""
        self.request(Request.SET_VRING_ADDR, VringAddr(index, flags, desc, used, avail, log).pack())

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(Request.SET_VRING_BASE, VringState(index, base).pack())

    def get_vring_base(self, index: int) -> int:
        return VringState.unpack(self.request(Request.GET_VRING_BASE, VringState(index, 0).pack())).num

    def _vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        if fd is None:
            self.request(request, pack_u64(index | VRING_NOFD_MASK))
        else:
            self.request(request, pack_u64(index), [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(Request.SET_VRING_ENABLE, VringState(index, int(enable)).pack())

    def get_config(self, offset: int, size: int) -> bytes:
        reply = ConfigAccess.unpack(self.request(Request.GET_CONFIG, ConfigAccess(offset, size, 0, bytes(size)).pack()))
        if reply.size == 0 and size:
            raise BackendError("GET_CONFIG refused by the back-end")
        return reply.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.request(Request.SET_CONFIG, ConfigAccess(offset, len(data), flags, data).pack())

    def set_status(self, status: int) -> None:
        self.request(Request.SET_STATUS, pack_u64(status))

    def get_status(self) -> int:
        return unpack_u64(self.request(Request.GET_STATUS))

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, InflightInfo]:
        """GET_INFLIGHT_FD: the back-end's new inflight area (fd, its description)."""
        self.send(Request.GET_INFLIGHT_FD, InflightInfo(0, 0, num_queues, queue_size).pack())
        decoder = MessageDecoder(expect_reply=True)
        while (msg := decoder.pop()) is None:
            data, anc, _flags, _ = self.sock.recvmsg(decoder.bytes_needed(), socket.CMSG_SPACE(16))
            if not data:
                raise BackendError("back-end closed the connection")
            fds = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", payload[: len(payload) - len(payload) % 4])
            decoder.feed(data, fds)
        if msg.request != Request.GET_INFLIGHT_FD or len(msg.fds) != 1:
            msg.close_fds()
            raise BackendError("GET_INFLIGHT_FD answered without an fd")
        return msg.fds[0], InflightInfo.unpack(msg.payload)

    def set_inflight_fd(self, fd: int, info: InflightInfo) -> None:
        self.request(Request.SET_INFLIGHT_FD, info.pack(), [fd])

    def reset_device(self) -> None:
        self.request(Request.RESET_DEVICE)

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        """SET_LOG_BASE (LOG_SHMFD): the back-end maps the dirty log and answers.
        The answer's value means nothing (libvhost-user echoes the log's size,
        QEMU ignores it); a back-end that refuses closes the session."""
        self.request(Request.SET_LOG_BASE, LogArea(size, offset).pack(), [fd])

    def set_log_fd(self, fd: int) -> None:
        self.request(Request.SET_LOG_FD, b"", [fd])


def make_eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
