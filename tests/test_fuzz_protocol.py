"""Fuzzing the vhost-user state machine in-process, against the REAL device
handler and data plane (a blk device on the native engine): random request
sequences with plausible and absurd payloads and real fds of every kind
(eventfds, memfds of odd sizes, pipes, files, sockets).

Invariants: only ProtocolError ever escapes (the server then drops the
connection); every reply is well formed; after the session ends every fd the
messages carried is closed again (the process fd count returns to its
baseline) and the engine is still serving.  In-process so that the
sanitizer job (scripts/sanitize.sh) sees any bad memory access in C.

VHOSTD_FUZZ_EXAMPLES raises the number of examples (default 150).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostd.config import BlkDeviceConfig
from vhostd.dataplane import Engine
from vhostd.devices.blk import BlkDevice
from vhostd.handler import DeviceHandler
from vhostd.protocol.backend import BackendProtocol
from vhostd.protocol.codec import (InflightInfo, MemoryRegion, Message, MessageDecoder, ProtocolError, VringAddr,
                                   VringState, pack_memory_table, pack_single_region, pack_u64)
from vhostd.protocol.constants import FLAG_NEED_REPLY, VERSION, Request
from vhostd.storage import null

EXAMPLES = int(os.environ.get("VHOSTD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)

U64 = st.one_of(st.sampled_from([0, 1, 0x1000, 0x10000, 0x200000, 2**32, 2**63, 2**64 - 1, 2**64 - 4096]),
                st.integers(0, 2**64 - 1))
SMALL = st.one_of(st.integers(0, 4), st.sampled_from([0xFF, 0xFFFF, 2**31, 2**32 - 1]))
SIZES = st.sampled_from([0, 1, 16, 4096, 0x10000, 0x200000, 0x200001])
RING = (1 << 32) | (1 << 30) | (1 << 29)  # VERSION_1, PROTOCOL_FEATURES, EVENT_IDX
PACKED = 1 << 34  # VIRTIO_F_RING_PACKED: the rings started on the fuzzed memory are packed ones


@pytest.fixture(scope="module")
def engine():
    e = Engine(1)
    yield e
    e.close()


@pytest.fixture(scope="module")
def handler(engine):
    cfg = BlkDeviceConfig(name="fuzz", socket="/nonexistent", backend="null", store=null.Settings(size=1 << 20), queues=2)
    device = BlkDevice(cfg)
    h = DeviceHandler(device, engine, logging.getLogger("fuzz"))
    device.attach(h.rings)
    yield h
    device.detach()
    h.close()
    device.close()


def make_fd(kind: str, size: int) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "memfd":
        fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return fd
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "file":
        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
        return fd
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    return s.detach()


@st.composite
def payloads(draw, request: int) -> bytes:
    """Well-formed-looking payloads with absurd values, or raw bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=120))
    r = request
    if r in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_VRING_ENABLE):
        # split: a 16-bit index; packed: position | wrap << 15, used half in bits 16-31
        return VringState(draw(SMALL), draw(st.one_of(st.sampled_from([0, 1, 2, 128, 256, 1024, 1025, 0x8000, 0x8001,
                                                                       0x7FFF, 0x80008000, 0x00058005, 0xFFFF8000]),
                                                      st.integers(0, 2**32 - 1)))).pack()
    if r == Request.SET_VRING_ADDR:
        return VringAddr(draw(SMALL), draw(st.integers(0, 3)), draw(U64), draw(U64), draw(U64), draw(U64)).pack()
    if r == Request.SET_MEM_TABLE:
        regions = [MemoryRegion(draw(U64), draw(st.one_of(SIZES, U64)), draw(U64), draw(st.one_of(SIZES, U64)))
                   for _ in range(draw(st.integers(0, 4)))]
        return pack_memory_table(regions)
    if r in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        return pack_single_region(MemoryRegion(draw(U64), draw(st.one_of(SIZES, U64)), draw(U64),
                                               draw(st.one_of(SIZES, U64))))
    if r in (Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD):
        return InflightInfo(draw(st.one_of(SIZES, U64)), draw(st.one_of(SIZES, U64)), draw(st.integers(0, 0xFFFF)),
                            draw(st.sampled_from([0, 1, 3, 64, 128, 256, 4096, 32768, 65535]))).pack()
    if r in (Request.GET_CONFIG, Request.SET_CONFIG):
        size = draw(st.integers(0, 300))
        return struct.pack("<III", draw(st.integers(0, 300)), size, draw(st.integers(0, 3))) + bytes(
            draw(st.integers(0, 300)))
    return pack_u64(draw(U64))


@st.composite
def sessions(draw):
    """A handshake-ish prefix (so deeper states are reached) then anything."""
    steps = []
    if draw(st.booleans()):
        steps += [(Request.SET_OWNER, b"", []), (Request.SET_PROTOCOL_FEATURES, pack_u64(draw(U64)), []),
                  (Request.SET_FEATURES, pack_u64(draw(st.sampled_from([0, RING, RING | PACKED | (1 << 28)]))),
                   [])]
        size = draw(st.sampled_from([0x10000, 0x200000]))
        steps.append((Request.SET_MEM_TABLE, pack_memory_table([MemoryRegion(0, size, 0x7F0000000000, 0)]),
                      [("memfd", draw(st.sampled_from([size, size // 2, 0])))]))
    codes = st.one_of(st.sampled_from(list(Request)), st.integers(0, 60))
    for _ in range(draw(st.integers(1, 12))):
        code = draw(codes)
        fds = draw(st.lists(st.tuples(st.sampled_from(["eventfd", "memfd", "pipe", "file", "socket"]), SIZES),
                            max_size=3))
        steps.append((code, draw(payloads(code)), fds))
    return steps


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@FUZZ
@given(steps=sessions(), need_reply=st.booleans())
def test_random_sessions_against_the_real_handler(handler, steps, need_reply):
    baseline = fd_count()
    proto = BackendProtocol(handler, logging.getLogger("fuzz"))
    try:
        for code, payload, fd_specs in steps:
            fds = [make_fd(kind, size) for kind, size in fd_specs]
            flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
            try:
                replies = proto.handle(Message(code, flags, payload, fds))
            except ProtocolError:
                proto.connection_lost()  # what the server does: drop the session
                proto = BackendProtocol(handler, logging.getLogger("fuzz"))
                continue
            for reply in replies:
                assert reply.is_reply and reply.request == code
                reply.close_fds()
    finally:
        proto.connection_lost()
    assert fd_count() == baseline, "a file descriptor leaked"
    assert handler.rings.queue_info(0).num >= 0  # the data plane still answers (a broken ring is allowed)


@FUZZ
@given(chunks=st.lists(st.binary(max_size=64), max_size=20), nfds=st.lists(st.integers(0, 3), max_size=20))
def test_decoder_never_loses_an_fd(chunks, nfds):
    baseline = fd_count()
    decoder = MessageDecoder()
    try:
        for chunk, n in zip(chunks, nfds + [0] * len(chunks)):
            fds = [os.eventfd(0) for _ in range(n)]
            try:
                decoder.feed(chunk, fds)
            except ProtocolError:
                break
            while (msg := decoder.pop()) is not None:
                msg.close_fds()
    finally:
        decoder.close()
    assert fd_count() == baseline
