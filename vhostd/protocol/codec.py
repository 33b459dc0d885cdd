"""vhost-user message framing and payload layouts, with no I/O inside.

A message is a 12-byte header (request, flags, size) and `size` bytes of
payload; file descriptors travel as SCM_RIGHTS ancillary data with the
header.  `MessageDecoder` turns a byte stream (plus the fds that came with
it) into `Message`s; each payload type has a small dataclass that packs and
unpacks itself and rejects a payload of the wrong size.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from vhostd.protocol.constants import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_MEM_REGIONS_TABLE,
    MAX_PAYLOAD,
    VERSION,
    VERSION_MASK,
    Request,
)

_HEADER = struct.Struct("<III")


class ProtocolError(Exception):
    """The peer broke the framing or sent something the connection cannot survive."""


class PayloadError(ProtocolError):
    """A payload does not have the layout its request code requires."""


def request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


@dataclass
class Message:
    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return request_name(self.request)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def encode(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, len(self.payload)) + self.payload

    def close_fds(self) -> None:
        """Close every fd this message still owns (unused or rejected ones)."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def take_fd(self) -> int | None:
        """Hand over ownership of the single fd of this message, if any."""
        return self.fds.pop(0) if self.fds else None

    def reply(self, payload: bytes = b"") -> Message:
        return Message(self.request, VERSION | FLAG_REPLY, payload)


class MessageDecoder:
    """Incremental decoder: feed() bytes and fds, pop complete messages.

    The I/O layer should read at most `bytes_needed()` bytes per recvmsg so
    that fds, which arrive with a message's first byte, are never confused
    with those of the next message.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD, expect_reply: bool = False) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: tuple[int, int, int] | None = None
        self._ready: list[Message] = []
        self._max_payload = max_payload
        self._expect_reply = expect_reply

    def bytes_needed(self) -> int:
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return self._header[2] - len(self._buf)

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Add received bytes; raises ProtocolError on a framing violation.

        On error every fd held (including `fds`) is closed before raising.
        """
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS_PER_MESSAGE:
            self.close()
            raise ProtocolError(f"more than {MAX_FDS_PER_MESSAGE} file descriptors with one message")
        view = memoryview(data)
        while view:
            need = self.bytes_needed()
            take = min(need, len(view))
            self._buf += view[:take]
            view = view[take:]
            if take == need:
                self._advance()

    def _advance(self) -> None:
        if self._header is None:
            request, flags, size = _HEADER.unpack(self._buf)
            self._buf.clear()
            if flags & VERSION_MASK != VERSION:
                self.close()
                raise ProtocolError(f"{request_name(request)}: unsupported version {flags & VERSION_MASK} in flags {flags:#x}")
            if bool(flags & FLAG_REPLY) != self._expect_reply:
                self.close()
                raise ProtocolError(f"{request_name(request)}: unexpected reply flag in flags {flags:#x}")
            if size > self._max_payload:
                self.close()
                raise ProtocolError(f"{request_name(request)}: payload of {size} bytes exceeds the limit of {self._max_payload}")
            self._header = (request, flags, size)
            if size:
                return
        request, flags, _ = self._header
        self._ready.append(Message(request, flags, bytes(self._buf), self._fds))
        self._header = None
        self._buf.clear()
        self._fds = []

    def pop(self) -> Message | None:
        return self._ready.pop(0) if self._ready else None

    @property
    def idle(self) -> bool:
        """True when no partial message is buffered (a clean place for EOF)."""
        return self._header is None and not self._buf

    def close(self) -> None:
        for msg in self._ready:
            msg.close_fds()
        self._ready.clear()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


# ---------------------------------------------------------------- payloads


def _unpack(st: struct.Struct, payload: bytes, what: str) -> tuple:
    if len(payload) != st.size:
        raise PayloadError(f"{what} payload must be {st.size} bytes, got {len(payload)}")
    return st.unpack(payload)


_U64 = struct.Struct("<Q")


def pack_u64(value: int) -> bytes:
    return _U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF)


def unpack_u64(payload: bytes) -> int:
    # QEMU sends some u64 payloads padded to the union size; take the first 8.
    if len(payload) < 8:
        raise PayloadError(f"u64 payload must be 8 bytes, got {len(payload)}")
    return _U64.unpack_from(payload)[0]


@dataclass(frozen=True)
class InflightInfo:
    """GET_INFLIGHT_FD / SET_INFLIGHT_FD payload."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    _S = struct.Struct("<QQHH")  # 20 bytes of fields; C front-ends send sizeof() = 24 with padding

    @classmethod
    def unpack(cls, payload: bytes) -> InflightInfo:
        if len(payload) not in (20, 24):
            raise PayloadError(f"inflight payload must be 20 or 24 bytes, got {len(payload)}")
        return cls(*cls._S.unpack(payload[:20]))

    def pack(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size) + bytes(4)


@dataclass(frozen=True)
class LogArea:
    """SET_LOG_BASE payload: where in the fd that comes with it the dirty log lies."""

    mmap_size: int
    mmap_offset: int
    _S = struct.Struct("<QQ")

    @classmethod
    def unpack(cls, payload: bytes) -> LogArea:
        return cls(*_unpack(cls._S, payload, "log area"))

    def pack(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset)


@dataclass(frozen=True)
class VringState:
    index: int
    num: int
    _S = struct.Struct("<II")

    @classmethod
    def unpack(cls, payload: bytes) -> VringState:
        return cls(*_unpack(cls._S, payload, "vring state"))

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    _S = struct.Struct("<IIQQQQ")

    @classmethod
    def unpack(cls, payload: bytes) -> VringAddr:
        return cls(*_unpack(cls._S, payload, "vring address"))

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


@dataclass(frozen=True)
class MemoryRegion:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    _S = struct.Struct("<QQQQ")

    def pack(self) -> bytes:
        return self._S.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)


_MEM_HEADER = struct.Struct("<II")


def unpack_memory_table(payload: bytes) -> list[MemoryRegion]:
    """SET_MEM_TABLE: u32 count, u32 padding, then up to 8 regions.

    QEMU always sends room for 8 regions; accept any size that holds `count`.
    """
    if len(payload) < _MEM_HEADER.size:
        raise PayloadError(f"memory table payload too short ({len(payload)} bytes)")
    count, _ = _MEM_HEADER.unpack_from(payload)
    if count > MAX_MEM_REGIONS_TABLE:
        raise PayloadError(f"memory table lists {count} regions, at most {MAX_MEM_REGIONS_TABLE} allowed")
    need = _MEM_HEADER.size + count * MemoryRegion._S.size
    if len(payload) < need:
        raise PayloadError(f"memory table of {count} regions needs {need} bytes, got {len(payload)}")
    off = _MEM_HEADER.size
    return [MemoryRegion(*MemoryRegion._S.unpack_from(payload, off + i * 32)) for i in range(count)]


def pack_memory_table(regions: list[MemoryRegion]) -> bytes:
    return _MEM_HEADER.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


_SINGLE_REGION = struct.Struct("<QQQQQ")


def unpack_single_region(payload: bytes) -> MemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding then one region."""
    _, *fields = _unpack(_SINGLE_REGION, payload, "memory region")
    return MemoryRegion(*fields)


def pack_single_region(region: MemoryRegion) -> bytes:
    return pack_u64(0) + region.pack()


@dataclass(frozen=True)
class ConfigAccess:
    """GET_CONFIG / SET_CONFIG: u32 offset, u32 size, u32 flags, then data."""

    offset: int
    size: int
    flags: int
    data: bytes
    _S = struct.Struct("<III")

    @classmethod
    def unpack(cls, payload: bytes) -> ConfigAccess:
        if len(payload) < cls._S.size:
            raise PayloadError(f"config payload too short ({len(payload)} bytes)")
        offset, size, flags = cls._S.unpack_from(payload)
        data = payload[cls._S.size :]
        if len(data) != size:
            raise PayloadError(f"config payload says {size} data bytes but carries {len(data)}")
        return cls(offset, size, flags, data)

    def pack(self) -> bytes:
        return self._S.pack(self.offset, self.size, self.flags) + self.data


@dataclass(frozen=True)
class InflightDesc:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    _S = struct.Struct("<QQHH")

    @classmethod
    def unpack(cls, payload: bytes) -> InflightDesc:
        # Some front-ends pad this payload to 24 bytes.
        if len(payload) < cls._S.size:
            raise PayloadError(f"inflight payload must be {cls._S.size} bytes, got {len(payload)}")
        return cls(*cls._S.unpack_from(payload))

    def pack(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)
