"""The sans-IO vhost-user layer: framing, payload layouts and the back-end
state machine, driven with bytes and real fds only (no sockets)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import fd_is_closed
from vhostd.protocol.backend import BackendProtocol, RequestError
from vhostd.protocol.codec import (
    ConfigAccess,
    InflightDesc,
    LogArea,
    MemoryRegion,
    Message,
    MessageDecoder,
    PayloadError,
    ProtocolError,
    VringAddr,
    VringState,
    pack_memory_table,
    pack_single_region,
    pack_u64,
    request_name,
    unpack_memory_table,
    unpack_single_region,
    unpack_u64,
)
from vhostd.protocol.constants import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD,
    VERSION,
    VRING_F_LOG,
    VRING_NOFD_MASK,
    ProtocolFeature as PF,
    Request as R,
)


def hdr(request: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", request, flags, size)


def new_fds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


@pytest.fixture
def fds_to_close():
    held: list[int] = []
    yield held
    for fd in held:
        try:
            os.close(fd)
        except OSError:
            pass


# ====================================================================== header


def test_header_encoding_is_little_endian_request_flags_size():
    assert Message(R.GET_FEATURES).encode() == bytes.fromhex("01000000" "01000000" "00000000")
    m = Message(R.SET_FEATURES, VERSION | FLAG_NEED_REPLY, pack_u64(0x1_0000_0002))
    assert m.encode() == hdr(2, 0x9, 8) + bytes.fromhex("0200000001000000")
    assert len(Message(R.SET_OWNER).encode()) == HEADER_SIZE


def test_message_properties_and_reply():
    m = Message(R.GET_VRING_BASE, VERSION | FLAG_NEED_REPLY, b"x" * 8)
    assert m.name == "GET_VRING_BASE" and m.need_reply and not m.is_reply
    r = m.reply(b"abc")
    assert (r.request, r.flags, r.payload, r.fds) == (R.GET_VRING_BASE, VERSION | FLAG_REPLY, b"abc", [])
    assert r.is_reply and not r.need_reply
    assert Message(99).name == "request 99" == request_name(99)
    assert request_name(40) == "GET_STATUS"


def test_take_fd_and_close_fds(fds_to_close):
    a, b = new_fds(2)
    m = Message(R.SET_VRING_KICK, fds=[a, b])
    assert m.take_fd() == a
    fds_to_close.append(a)
    m.close_fds()
    assert m.fds == [] and fd_is_closed(b) and not fd_is_closed(a)
    assert Message(R.SET_OWNER).take_fd() is None


# ====================================================================== decoder


MESSAGES = [
    Message(R.GET_FEATURES),
    Message(R.SET_FEATURES, VERSION | FLAG_NEED_REPLY, pack_u64(1 << 32)),
    Message(R.SET_VRING_ADDR, VERSION, VringAddr(1, 0, 0x1000, 0x2000, 0x3000, 0).pack()),
    Message(R.SET_OWNER),
    Message(R.SET_CONFIG, VERSION, ConfigAccess(0, 256, 0, bytes(range(256))).pack()),
]
STREAM = b"".join(m.encode() for m in MESSAGES)


def drain(dec: MessageDecoder) -> list[Message]:
    out = []
    while (m := dec.pop()) is not None:
        out.append(m)
    return out


def same(a: Message, b: Message) -> bool:
    return (a.request, a.flags, a.payload) == (b.request, b.flags, b.payload)


def test_decoder_whole_stream_at_once():
    dec = MessageDecoder()
    dec.feed(STREAM)
    got = drain(dec)
    assert len(got) == len(MESSAGES) and all(same(a, b) for a, b in zip(got, MESSAGES))
    assert dec.idle and dec.bytes_needed() == HEADER_SIZE


def test_decoder_byte_by_byte():
    dec = MessageDecoder()
    got = []
    for i in range(len(STREAM)):
        dec.feed(STREAM[i : i + 1])
        got += drain(dec)
        if i < len(STREAM) - 1:
            assert len(got) < len(MESSAGES)
    assert len(got) == len(MESSAGES) and all(same(a, b) for a, b in zip(got, MESSAGES))


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=20))
def test_decoder_arbitrary_chunks(cuts):
    points = sorted(set([0, len(STREAM), *cuts]))
    dec = MessageDecoder()
    got = []
    for lo, hi in zip(points, points[1:]):
        dec.feed(STREAM[lo:hi])
        got += drain(dec)
    assert len(got) == len(MESSAGES) and all(same(a, b) for a, b in zip(got, MESSAGES))


def test_bytes_needed_tracks_header_then_payload():
    dec = MessageDecoder()
    data = Message(R.SET_VRING_NUM, VERSION, VringState(0, 64).pack()).encode()
    assert dec.bytes_needed() == 12
    dec.feed(data[:5])
    assert dec.bytes_needed() == 7 and not dec.idle
    dec.feed(data[5:12])
    assert dec.bytes_needed() == 8 and not dec.idle
    dec.feed(data[12:15])
    assert dec.bytes_needed() == 5
    dec.feed(data[15:])
    assert dec.idle and dec.pop().payload == VringState(0, 64).pack()


def test_fds_travel_with_their_message(fds_to_close):
    a, b, c = new_fds(3)
    fds_to_close += [a, b, c]
    kick = Message(R.SET_VRING_KICK, VERSION, pack_u64(0)).encode()
    table = Message(R.SET_MEM_TABLE, VERSION, pack_memory_table([MemoryRegion(0, 4096, 0, 0)] * 2)).encode()
    dec = MessageDecoder()
    # fds come with a message's first byte, as recvmsg delivers them
    dec.feed(kick[:1], [a])
    dec.feed(kick[1:])
    dec.feed(Message(R.SET_OWNER).encode())
    dec.feed(table[:3], [b, c])
    dec.feed(table[3:])
    got = drain(dec)
    assert [(m.request, m.fds) for m in got] == [(R.SET_VRING_KICK, [a]), (R.SET_OWNER, []), (R.SET_MEM_TABLE, [b, c])]


@pytest.mark.parametrize(
    "header, why",
    [
        (hdr(1, 0, 0), "version"),
        (hdr(1, 2, 0), "version"),
        (hdr(1, 3, 0), "version"),
        (hdr(1, VERSION | FLAG_REPLY, 0), "reply flag"),
        (hdr(5, VERSION, MAX_PAYLOAD + 1), "exceeds the limit"),
        (hdr(5, VERSION, 0xFFFF_FFFF), "exceeds the limit"),
    ],
)
def test_bad_header_raises_and_closes_held_fds(header, why):
    fds = new_fds(2)
    dec = MessageDecoder()
    dec.feed(header[:4], fds[:1])
    with pytest.raises(ProtocolError, match=why):
        dec.feed(header[4:], fds[1:])
    assert all(fd_is_closed(fd) for fd in fds)


def test_front_end_decoder_wants_the_reply_flag():
    dec = MessageDecoder(expect_reply=True)
    dec.feed(hdr(1, VERSION | FLAG_REPLY, 8) + pack_u64(7))
    assert unpack_u64(dec.pop().payload) == 7
    with pytest.raises(ProtocolError, match="reply flag"):
        dec.feed(hdr(1, VERSION, 0))


def test_largest_legal_payload_is_accepted():
    dec = MessageDecoder()
    dec.feed(hdr(R.SET_CONFIG, VERSION, MAX_PAYLOAD) + bytes(MAX_PAYLOAD))
    assert len(dec.pop().payload) == MAX_PAYLOAD


def test_more_than_eight_fds_on_one_message():
    fds = new_fds(MAX_FDS_PER_MESSAGE + 1)
    dec = MessageDecoder()
    dec.feed(hdr(R.SET_MEM_TABLE, VERSION, 8)[:6], fds[:5])
    with pytest.raises(ProtocolError, match="more than 8"):
        dec.feed(b"\0", fds[5:])
    assert all(fd_is_closed(fd) for fd in fds)


def test_close_releases_partial_and_undelivered_fds():
    a, b = new_fds(2)
    dec = MessageDecoder()
    dec.feed(Message(R.SET_VRING_CALL, VERSION, pack_u64(0)).encode(), [a])  # complete, not popped
    dec.feed(hdr(R.SET_VRING_KICK, VERSION, 8) + b"\0\0", [b])  # partial
    dec.close()
    assert fd_is_closed(a) and fd_is_closed(b)
    assert dec.pop() is None


# ====================================================================== payloads


def test_u64():
    assert pack_u64(5) == b"\x05" + bytes(7)
    assert pack_u64(-1) == b"\xff" * 8  # masked to 64 bits
    assert unpack_u64(pack_u64(0xDEAD_BEEF_0000_0001)) == 0xDEAD_BEEF_0000_0001
    assert unpack_u64(pack_u64(9) + bytes(32)) == 9  # QEMU pads some u64 payloads
    with pytest.raises(PayloadError):
        unpack_u64(b"\1" * 7)


@pytest.mark.parametrize(
    "obj",
    [
        VringState(3, 0xFFFF),
        VringState(0xFFFF_FFFF, 0),
        VringAddr(1, 1, 0x1000, 0x2000, 0x3000, 0x4000),
        VringAddr(0, 0, 2**64 - 1, 0, 2**63, 1),
        ConfigAccess(0, 60, 0, bytes(range(60))),
        ConfigAccess(255, 1, 1, b"\x7f"),
        ConfigAccess(8, 0, 0, b""),
        InflightDesc(1 << 20, 4096, 2, 256),
    ],
)
def test_payload_round_trip(obj):
    packed = obj.pack()
    assert type(obj).unpack(packed) == obj


@pytest.mark.parametrize(
    "cls, good",
    [(VringState, 8), (VringAddr, 40)],
)
def test_fixed_payloads_reject_wrong_sizes(cls, good):
    cls.unpack(bytes(good))
    for size in (0, good - 1, good + 1, good * 2):
        with pytest.raises(PayloadError, match=f"must be {good} bytes, got {size}"):
            cls.unpack(bytes(size))


def test_config_access_sizes():
    with pytest.raises(PayloadError, match="too short"):
        ConfigAccess.unpack(bytes(11))
    with pytest.raises(PayloadError, match="says 4 data bytes but carries 3"):
        ConfigAccess.unpack(struct.pack("<III", 0, 4, 0) + b"abc")
    with pytest.raises(PayloadError, match="says 4 data bytes but carries 5"):
        ConfigAccess.unpack(struct.pack("<III", 0, 4, 0) + b"abcde")


def test_inflight_desc_sizes():
    d = InflightDesc(1, 2, 3, 4)
    assert InflightDesc.unpack(d.pack() + bytes(4)) == d  # padded to 24 is fine
    with pytest.raises(PayloadError):
        InflightDesc.unpack(d.pack()[:-1])


REGIONS = [MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0), MemoryRegion(1 << 32, 4096, 0x7F10_0000_0000, 1 << 20)]


def test_memory_table_round_trip_and_layout():
    packed = pack_memory_table(REGIONS)
    assert packed[:8] == struct.pack("<II", 2, 0) and len(packed) == 8 + 2 * 32
    assert packed[8:40] == struct.pack("<QQQQ", 0, 1 << 20, 0x7F00_0000_0000, 0)
    assert unpack_memory_table(packed) == REGIONS
    # QEMU always sends room for 8 regions
    assert unpack_memory_table(packed + bytes(6 * 32)) == REGIONS
    assert unpack_memory_table(pack_memory_table([])) == []


def test_memory_table_rejects_bad_sizes():
    with pytest.raises(PayloadError, match="too short"):
        unpack_memory_table(bytes(7))
    with pytest.raises(PayloadError, match="at most 8"):
        unpack_memory_table(struct.pack("<II", 9, 0) + bytes(9 * 32))
    with pytest.raises(PayloadError, match="needs 72 bytes, got 71"):
        unpack_memory_table(pack_memory_table(REGIONS)[:-1])


def test_single_region_round_trip_and_size():
    packed = pack_single_region(REGIONS[1])
    assert len(packed) == 40 and packed[:8] == bytes(8)
    assert unpack_single_region(packed) == REGIONS[1]
    for size in (32, 39, 41, 48):
        with pytest.raises(PayloadError, match="must be 40 bytes"):
            unpack_single_region(bytes(size))


# ====================================================================== state machine


class Recorder:
    """A small RequestHandler of our own that records what the protocol asks."""

    FEATURES = (1 << 34) | (1 << 32) | (1 << 28) | (1 << 9)
    PROTOCOL = (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.CONFIG) | (1 << PF.STATUS) | (1 << PF.RESET_DEVICE) | (
        1 << PF.CONFIGURE_MEM_SLOTS) | (1 << PF.MTU) | (1 << PF.RARP) | (1 << PF.LOG_SHMFD)

    def __init__(self, queues: int = 2) -> None:
        self.queues = queues
        self.calls: list[tuple] = []
        self.owned_fds: list[int] = []
        self.refuse: set[str] = set()
        self.status = 0
        self.pending: dict[int, int] = {}  # requests in flight per ring (vring_pending)

    def _rec(self, name, *args):
        self.calls.append((name, *args))
        if name in self.refuse:
            raise RequestError(f"{name} refused by the test")

    def _own(self, fd):
        if fd is not None:
            self.owned_fds.append(fd)

    def device_features(self):
        return self.FEATURES

    def protocol_features(self):
        return self.PROTOCOL

    def queue_num_reply(self):
        return self.queues

    def set_mtu(self, mtu):
        self.calls.append(("set_mtu", mtu))

    def send_rarp(self, mac):
        self.calls.append(("send_rarp", mac))

    def num_queues(self):
        return self.queues

    def set_features(self, f):
        self._rec("set_features", f)

    def set_mem_table(self, regions, fds):
        for fd in fds:
            self._own(fd)
        self._rec("set_mem_table", regions, len(fds))

    def add_mem_region(self, region, fd):
        self._own(fd)
        self._rec("add_mem_region", region)

    def remove_mem_region(self, region):
        self._rec("remove_mem_region", region)

    def set_vring_num(self, i, n):
        self._rec("set_vring_num", i, n)

    def set_vring_addr(self, a):
        self._rec("set_vring_addr", a)

    def set_vring_base(self, i, b):
        self._rec("set_vring_base", i, b)

    def drain_vring(self, i):
        self._rec("drain_vring", i)

    def vring_pending(self, i):
        return self.pending.get(i, 0)

    def get_vring_base(self, i):
        self._rec("get_vring_base", i)
        return 0x1234

    def set_vring_kick(self, i, fd):
        self._own(fd)
        self._rec("set_vring_kick", i, fd)

    def set_vring_call(self, i, fd):
        self._own(fd)
        self._rec("set_vring_call", i, fd)

    def set_vring_err(self, i, fd):
        self._own(fd)
        self._rec("set_vring_err", i, fd)

    def set_vring_enable(self, i, e):
        self._rec("set_vring_enable", i, e)

    def get_config(self, off, size):
        self._rec("get_config", off, size)
        return bytes((off + k) & 0xFF for k in range(size))

    def set_config(self, off, data, flags):
        self._rec("set_config", off, data, flags)

    def set_status(self, s):
        self._rec("set_status", s)
        self.status = s

    def get_status(self):
        return self.status

    def set_log_base(self, fd, area):
        self._own(fd)
        self._rec("set_log_base", area)

    def set_log_fd(self, fd):
        self._own(fd)
        self._rec("set_log_fd")

    def reset(self):
        self._rec("reset")

    def disconnected(self):
        self._rec("disconnected")

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def rec(fds_to_close):
    r = Recorder()
    yield r
    fds_to_close += r.owned_fds


def proto(rec: Recorder, protocol: int = Recorder.PROTOCOL, features: int | None = None) -> BackendProtocol:
    p = BackendProtocol(rec)
    assert p.handle(Message(R.SET_PROTOCOL_FEATURES, VERSION, pack_u64(protocol))) == []
    if features is not None:
        p.handle(Message(R.SET_FEATURES, VERSION, pack_u64(features)))
    rec.calls.clear()
    return p


def ask(p: BackendProtocol, request: int, payload: bytes = b"", fds=(), ack: bool = True) -> list[Message]:
    flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
    return p.handle(Message(request, flags, payload, list(fds)))


def ack_value(replies: list[Message]) -> int:
    (r,) = replies
    assert r.is_reply and len(r.payload) == 8
    return unpack_u64(r.payload)


def test_features_offer_protocol_features_bit(rec):
    p = BackendProtocol(rec)
    (r,) = p.handle(Message(R.GET_FEATURES))
    assert r.request == R.GET_FEATURES and r.flags == VERSION | FLAG_REPLY
    assert unpack_u64(r.payload) == Recorder.FEATURES | (1 << F_PROTOCOL_FEATURES)
    (r,) = p.handle(Message(R.GET_PROTOCOL_FEATURES))
    assert unpack_u64(r.payload) == Recorder.PROTOCOL


def test_reply_ack_success_and_failure(rec):
    p = proto(rec)
    assert ack_value(ask(p, R.SET_OWNER)) == 0
    assert ask(p, R.SET_OWNER, ack=False) == []  # no need_reply: silence
    rec.refuse.add("set_vring_num")
    assert ack_value(ask(p, R.SET_VRING_NUM, VringState(0, 64).pack())) == 1
    # the session goes on
    assert ack_value(ask(p, R.SET_VRING_BASE, VringState(0, 3).pack())) == 0
    assert rec.names() == ["set_vring_num", "set_vring_base"]


def test_requests_with_a_reply_send_only_that_reply(rec):
    p = proto(rec)
    (r,) = ask(p, R.GET_VRING_BASE, VringState(1, 0).pack())
    assert VringState.unpack(r.payload) == VringState(1, 0x1234)
    (r,) = ask(p, R.GET_QUEUE_NUM)
    assert unpack_u64(r.payload) == 2


def test_refused_request_without_need_reply_is_a_protocol_error(rec):
    p = proto(rec)
    rec.refuse.add("set_vring_num")
    with pytest.raises(ProtocolError, match="SET_VRING_NUM refused: set_vring_num refused by the test"):
        ask(p, R.SET_VRING_NUM, VringState(0, 64).pack(), ack=False)


def test_refused_request_without_reply_ack_negotiated_is_a_protocol_error(rec):
    p = proto(rec, protocol=Recorder.PROTOCOL & ~(1 << PF.REPLY_ACK))
    rec.refuse.add("set_vring_num")
    with pytest.raises(ProtocolError, match="refused"):
        ask(p, R.SET_VRING_NUM, VringState(0, 64).pack(), ack=True)
    # ... and a successful need_reply request gets no ack without REPLY_ACK
    assert ask(p, R.SET_OWNER, ack=True) == []


@pytest.mark.parametrize("code", [0, 99, 0xFFFF_FFFF])
def test_unknown_request_code(rec, code):
    p = proto(rec)
    assert ack_value(ask(p, code)) == 1
    with pytest.raises(ProtocolError, match=f"unknown request code {code}"):
        ask(p, code, ack=False)
    assert rec.calls == []


@pytest.mark.parametrize("req", [R.IOTLB_MSG, R.SET_VRING_ENDIAN,
                                     R.SET_BACKEND_REQ_FD, R.POSTCOPY_ADVISE, R.VRING_KICK])
def test_known_but_unsupported_requests_are_refused(rec, req):
    request = req
    p = proto(rec)
    fd = new_fds(1)[0]
    assert ack_value(ask(p, request, bytes(8), [fd])) == 1
    assert fd_is_closed(fd)
    with pytest.raises(ProtocolError, match="not supported"):
        ask(p, request, bytes(8), ack=False)


@pytest.mark.parametrize(
    "req, payload, feature",
    [
        (R.GET_QUEUE_NUM, b"", PF.MQ),
        (R.SEND_RARP, bytes(8), PF.RARP),
        (R.NET_SET_MTU, (1500).to_bytes(8, "little"), PF.MTU),
        (R.GET_CONFIG, ConfigAccess(0, 8, 0, bytes(8)).pack(), PF.CONFIG),
        (R.SET_CONFIG, ConfigAccess(0, 8, 0, bytes(8)).pack(), PF.CONFIG),
        (R.GET_MAX_MEM_SLOTS, b"", PF.CONFIGURE_MEM_SLOTS),
        (R.ADD_MEM_REG, pack_single_region(REGIONS[0]), PF.CONFIGURE_MEM_SLOTS),
        (R.REM_MEM_REG, pack_single_region(REGIONS[0]), PF.CONFIGURE_MEM_SLOTS),
        (R.RESET_DEVICE, b"", PF.RESET_DEVICE),
        (R.SET_STATUS, pack_u64(1), PF.STATUS),
        (R.GET_STATUS, b"", PF.STATUS),
    ],
)
def test_request_needs_its_protocol_feature(rec, req, payload, feature):
    request = req
    p = proto(rec, protocol=Recorder.PROTOCOL & ~(1 << feature))
    fds = new_fds(1) if request == R.ADD_MEM_REG else []
    assert ack_value(ask(p, request, payload, fds)) == 1
    assert rec.calls == [] and all(fd_is_closed(fd) for fd in fds)
    with pytest.raises(ProtocolError, match=f"needs protocol feature {feature.name}"):
        ask(p, request, payload, ack=False)
    # with the feature negotiated the same request goes through
    p2 = proto(rec)
    fds = new_fds(1) if request == R.ADD_MEM_REG else []
    replies = ask(p2, request, payload, fds)
    assert len(replies) == 1 and (request in (R.GET_QUEUE_NUM, R.GET_CONFIG, R.GET_MAX_MEM_SLOTS, R.GET_STATUS)
                                  or ack_value(replies) == 0)


@pytest.mark.parametrize("req", [R.SET_OWNER, R.SET_FEATURES, R.SET_VRING_NUM, R.GET_FEATURES])
def test_unexpected_fds_are_closed_and_refused(rec, req):
    request = req
    p = proto(rec)
    fds = new_fds(2)
    payload = VringState(0, 8).pack() if request == R.SET_VRING_NUM else pack_u64(0)
    assert ack_value(ask(p, request, payload if request != R.SET_OWNER else b"", fds)) == 1
    assert all(fd_is_closed(fd) for fd in fds)
    assert rec.calls == []


def test_fd_carrying_requests(rec):
    p = proto(rec)
    kick, call, err = new_fds(3)
    for req, fd in ((R.SET_VRING_KICK, kick), (R.SET_VRING_CALL, call), (R.SET_VRING_ERR, err)):
        assert ack_value(ask(p, req, pack_u64(1), [fd])) == 0
    assert rec.calls == [("set_vring_kick", 1, kick), ("set_vring_call", 1, call), ("set_vring_err", 1, err)]
    assert not any(fd_is_closed(fd) for fd in (kick, call, err))  # the handler owns them now
    rec.calls.clear()
    for req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        assert ack_value(ask(p, req, pack_u64(0 | VRING_NOFD_MASK))) == 0
    assert [c[2] for c in rec.calls] == [None, None, None]


@pytest.mark.parametrize(
    "value, nfds, why",
    [
        (0, 0, "exactly one file descriptor, got 0"),
        (0, 2, "exactly one file descriptor, got 2"),
        (VRING_NOFD_MASK, 1, "no-fd flag set but a file descriptor was sent"),
        (1 << 9, 1, "reserved bits"),
        (1 << 40, 0, "reserved bits"),
        (2, 1, "ring index 2 out of range"),
        (0xFF | VRING_NOFD_MASK, 0, "ring index 255 out of range"),
    ],
)
def test_bad_vring_fd_requests(rec, caplog, value, nfds, why):
    p = proto(rec)
    fds = new_fds(nfds)
    assert ack_value(ask(p, R.SET_VRING_KICK, pack_u64(value), fds)) == 1
    assert why in caplog.text
    assert all(fd_is_closed(fd) for fd in fds) and rec.calls == []


@pytest.mark.parametrize(
    "req, payload",
    [
        (R.SET_VRING_NUM, VringState(2, 64).pack()),
        (R.SET_VRING_BASE, VringState(7, 0).pack()),
        (R.GET_VRING_BASE, VringState(2, 0).pack()),
        (R.SET_VRING_ADDR, VringAddr(2, 0, 0, 0, 0, 0).pack()),
        (R.SET_VRING_ENABLE, VringState(0xFFFF_FFFF, 1).pack()),
    ],
)
def test_ring_index_out_of_range(rec, req, payload):
    request = req
    p = proto(rec)
    assert ack_value(ask(p, request, payload)) == 1
    assert rec.calls == []
    with pytest.raises(ProtocolError, match="out of range"):
        ask(p, request, payload, ack=False)


@pytest.mark.parametrize(
    "req, payload",
    [
        (R.SET_FEATURES, b"\0" * 4),
        (R.SET_VRING_NUM, b"\0" * 12),
        (R.SET_VRING_ADDR, b"\0" * 32),
        (R.SET_MEM_TABLE, struct.pack("<II", 2, 0) + bytes(32)),
        (R.ADD_MEM_REG, bytes(32)),
        (R.GET_CONFIG, struct.pack("<III", 0, 8, 0)),
    ],
)
def test_malformed_payload_always_closes_the_connection(rec, req, payload):
    request = req
    """A payload of the wrong layout is a framing problem, not a refusal:
    even with REPLY_ACK the connection must go."""
    p = proto(rec)
    fds = new_fds(1) if request in (R.SET_MEM_TABLE, R.ADD_MEM_REG) else []
    with pytest.raises(ProtocolError, match=request.name):
        ask(p, request, payload, fds)
    assert all(fd_is_closed(fd) for fd in fds)


def test_set_features_with_unoffered_bits(rec):
    p = proto(rec)
    bad = Recorder.FEATURES | (1 << 5)
    assert ack_value(ask(p, R.SET_FEATURES, pack_u64(bad))) == 1
    assert p.acked_features == 0 and rec.calls == []
    with pytest.raises(ProtocolError, match="0x20 that were not offered"):
        ask(p, R.SET_FEATURES, pack_u64(bad), ack=False)


def test_set_protocol_features_with_unoffered_bits(rec):
    p = BackendProtocol(rec)
    with pytest.raises(ProtocolError, match="not offered"):
        p.handle(Message(R.SET_PROTOCOL_FEATURES, VERSION, pack_u64(1 << PF.PAGEFAULT)))
    assert p.acked_protocol_features == 0


def test_rings_auto_enabled_without_protocol_features(rec):
    p = proto(rec)
    assert ack_value(ask(p, R.SET_FEATURES, pack_u64(Recorder.FEATURES))) == 0
    assert rec.calls == [("set_features", Recorder.FEATURES), ("set_vring_enable", 0, True),
                         ("set_vring_enable", 1, True)]
    # and SET_VRING_ENABLE is then not available
    assert ack_value(ask(p, R.SET_VRING_ENABLE, VringState(0, 0).pack())) == 1


def test_rings_not_auto_enabled_with_protocol_features(rec):
    p = proto(rec)
    f = Recorder.FEATURES | (1 << F_PROTOCOL_FEATURES)
    assert ack_value(ask(p, R.SET_FEATURES, pack_u64(f))) == 0
    assert rec.calls == [("set_features", f)]
    assert ack_value(ask(p, R.SET_VRING_ENABLE, VringState(1, 1).pack())) == 0
    assert ack_value(ask(p, R.SET_VRING_ENABLE, VringState(1, 2).pack())) == 1
    assert rec.calls[1:] == [("set_vring_enable", 1, True)]


def test_set_vring_base_must_fit_16_bits(rec):
    p = proto(rec)
    assert ack_value(ask(p, R.SET_VRING_BASE, VringState(0, 0xFFFF).pack())) == 0
    assert ack_value(ask(p, R.SET_VRING_BASE, VringState(0, 0x10000).pack())) == 1
    assert rec.calls == [("set_vring_base", 0, 0xFFFF)]


def test_packed_ring_bases_use_32_bits(rec):
    """With packed rings the base carries the used side in bits 16-31."""
    p = proto(rec)
    ask(p, R.SET_FEATURES, pack_u64(1 << 34))
    assert ack_value(ask(p, R.SET_VRING_BASE, VringState(0, 0x8005_8003).pack())) == 0
    assert rec.calls[-1] == ("set_vring_base", 0, 0x8005_8003)


def test_set_mem_table(rec):
    p = proto(rec)
    fds = new_fds(2)
    assert ack_value(ask(p, R.SET_MEM_TABLE, pack_memory_table(REGIONS), fds)) == 0
    assert rec.calls == [("set_mem_table", REGIONS, 2)] and set(rec.owned_fds) == set(fds)


def test_set_mem_table_with_no_regions_explains_share_on(rec, caplog):
    p = proto(rec)
    assert ack_value(ask(p, R.SET_MEM_TABLE, pack_memory_table([]))) == 1
    assert "share=on" in caplog.text and rec.calls == []


@pytest.mark.parametrize("nfds", [0, 1, 3])
def test_set_mem_table_fd_count_mismatch(rec, caplog, nfds):
    p = proto(rec)
    fds = new_fds(nfds)
    assert ack_value(ask(p, R.SET_MEM_TABLE, pack_memory_table(REGIONS), fds)) == 1
    assert f"2 regions but {nfds} file descriptors" in caplog.text
    assert all(fd_is_closed(fd) for fd in fds) and rec.calls == []


def test_add_and_remove_mem_region(rec):
    p = proto(rec)
    (fd,) = new_fds(1)
    assert ack_value(ask(p, R.ADD_MEM_REG, pack_single_region(REGIONS[1]), [fd])) == 0
    assert ack_value(ask(p, R.ADD_MEM_REG, pack_single_region(REGIONS[1]))) == 1  # no fd
    (extra,) = new_fds(1)
    # REM_MEM_REG may carry an fd (spec: back-ends MAY accept it); it is closed
    assert ack_value(ask(p, R.REM_MEM_REG, pack_single_region(REGIONS[1]), [extra])) == 0
    assert fd_is_closed(extra) and not fd_is_closed(fd)
    assert rec.calls == [("add_mem_region", REGIONS[1]), ("remove_mem_region", REGIONS[1])]
    (r,) = ask(p, R.GET_MAX_MEM_SLOTS)
    assert unpack_u64(r.payload) == 509


def test_get_config_in_and_out_of_range(rec, caplog):
    p = proto(rec)
    (r,) = ask(p, R.GET_CONFIG, ConfigAccess(4, 8, 0, bytes(8)).pack())
    assert ConfigAccess.unpack(r.payload) == ConfigAccess(4, 8, 0, bytes(range(4, 12)))
    for off, size in ((250, 7), (256, 1), (0, 257), (0xFFFF_FFF0, 0x20)):
        (r,) = ask(p, R.GET_CONFIG, ConfigAccess(off, size, 0, bytes(size)).pack() if size < 300 else
                   struct.pack("<III", off, 0, 0))
        assert ConfigAccess.unpack(r.payload).size == 0
    assert rec.calls == [("get_config", 4, 8)]
    assert "outside the config space" in caplog.text


def test_set_config(rec):
    p = proto(rec)
    assert ack_value(ask(p, R.SET_CONFIG, ConfigAccess(32, 1, 0, b"\1").pack())) == 0
    assert ack_value(ask(p, R.SET_CONFIG, ConfigAccess(250, 8, 0, bytes(8)).pack())) == 1
    rec.refuse.add("set_config")
    assert ack_value(ask(p, R.SET_CONFIG, ConfigAccess(32, 1, 0, b"\1").pack())) == 1
    assert rec.names() == ["set_config", "set_config"]


def test_status_and_reset_device(rec):
    p = proto(rec, features=Recorder.FEATURES | (1 << F_PROTOCOL_FEATURES))
    assert p.acked_features
    assert ack_value(ask(p, R.SET_STATUS, pack_u64(0xF))) == 0
    assert ack_value(ask(p, R.SET_STATUS, pack_u64(0x100))) == 1
    (r,) = ask(p, R.GET_STATUS)
    assert unpack_u64(r.payload) == 0xF
    assert ack_value(ask(p, R.RESET_DEVICE)) == 0
    assert p.acked_features == 0 and rec.names() == ["set_status", "drain_vring", "drain_vring", "reset"]


def test_get_vring_base_waits_for_the_requests_in_flight(rec):
    """With requests of the ring still in flight, GET_VRING_BASE is answered
    only once they are done: no reply yet, the protocol waits and refuses to
    take the next message; poll() answers when the ring has drained."""
    p = proto(rec)
    rec.pending[1] = 3
    assert ask(p, R.GET_VRING_BASE, VringState(1, 0).pack(), ack=False) == []
    assert p.waiting == "GET_VRING_BASE of ring 1"
    assert rec.names() == ["drain_vring"]
    assert p.poll() is None
    with pytest.raises(ProtocolError, match="while GET_VRING_BASE of ring 1 was not answered"):
        ask(p, R.GET_FEATURES, ack=False)
    rec.pending[1] = 0
    (reply,) = p.poll()
    assert VringState.unpack(reply.payload) == VringState(1, 0x1234)
    assert p.waiting is None and p.poll() == []
    assert rec.names() == ["drain_vring", "get_vring_base"]


def test_reset_device_waits_for_every_ring_and_a_lost_connection_stops_waiting(rec):
    p = proto(rec, features=Recorder.FEATURES | (1 << F_PROTOCOL_FEATURES))
    rec.pending[0] = 1
    assert ask(p, R.RESET_DEVICE) == []
    assert p.waiting == "RESET_DEVICE" and "reset" not in rec.names()
    rec.pending[0] = 0
    (ack,) = p.poll()
    assert unpack_u64(ack.payload) == 0 and rec.names()[-1] == "reset" and p.acked_features == 0
    rec.pending[1] = 5
    ask(p, R.RESET_DEVICE, ack=False)
    p.connection_lost()
    assert p.waiting is None and rec.names()[-1] == "disconnected"


def test_reset_owner_disables_every_ring(rec):
    p = proto(rec)
    assert ack_value(ask(p, R.RESET_OWNER)) == 0
    assert rec.calls == [("set_vring_enable", 0, False), ("set_vring_enable", 1, False)]


def test_connection_lost_forgets_the_session(rec):
    p = proto(rec, features=Recorder.FEATURES)
    ask(p, R.SET_OWNER)
    assert p.owner and p.acked_features and p.acked_protocol_features
    p.connection_lost()
    assert (p.owner, p.acked_features, p.acked_protocol_features) == (False, 0, 0)
    assert rec.names()[-1] == "disconnected"


def test_handler_bug_propagates_and_unowned_fds_are_closed(rec):
    """A handler bug is not a protocol error (the server logs it as a bug);
    fds not yet handed to the handler are still closed."""
    p = proto(rec)

    def boom(*args):
        raise ZeroDivisionError("bug")

    rec.remove_mem_region = boom
    (fd,) = new_fds(1)
    with pytest.raises(ZeroDivisionError):
        ask(p, R.REM_MEM_REG, pack_single_region(REGIONS[0]), [fd])
    assert fd_is_closed(fd)


@settings(max_examples=150, deadline=None)
@given(req=st.integers(0, 45), flags=st.sampled_from([VERSION, VERSION | FLAG_NEED_REPLY]),
       payload=st.binary(max_size=80), nfds=st.integers(0, 2))
def test_any_message_is_answered_or_refused_cleanly(req, flags, payload, nfds):
    request = req
    """Whatever arrives, the state machine either replies, stays silent, or
    raises ProtocolError -- and never leaks an fd it was given."""
    rec = Recorder()
    p = proto(rec)
    fds = new_fds(nfds)
    try:
        replies = p.handle(Message(request, flags, payload, list(fds)))
    except ProtocolError:
        replies = []
    for r in replies:
        assert r.is_reply and r.request == request
    for fd in fds:
        if fd in rec.owned_fds:
            os.close(fd)
        else:
            assert fd_is_closed(fd)


# ---------------------------------------------------------------- migration: the dirty log


def test_set_log_base_maps_the_log_and_answers_once_mapped(rec):
    """QEMU waits for an answer to SET_LOG_BASE (LOG_SHMFD), REPLY_ACK or not."""
    p = proto(rec)
    fd = new_fds(1)[0]
    replies = ask(p, R.SET_LOG_BASE, LogArea(8192, 0).pack(), [fd], ack=False)
    assert ack_value(replies) == 0 and replies[0].request == R.SET_LOG_BASE
    assert rec.calls == [("set_log_base", LogArea(8192, 0))]


@pytest.mark.parametrize("payload, fds, message", [
    (bytes(8), 1, "log area payload must be 16 bytes"),
    (LogArea(8192, 0).pack(), 0, "expects exactly one file descriptor, got 0"),
    (LogArea(8192, 0).pack(), 2, "expects exactly one file descriptor, got 2"),
])
def test_set_log_base_with_a_bad_payload_or_fds_is_refused_and_closes_them(rec, payload, fds, message):
    p = proto(rec)
    sent = new_fds(fds)
    with pytest.raises(ProtocolError, match=message):
        ask(p, R.SET_LOG_BASE, payload, sent, ack=False)
    assert all(fd_is_closed(fd) for fd in sent) and rec.calls == []


def test_set_log_base_needs_log_shmfd(rec):
    p = proto(rec, protocol=Recorder.PROTOCOL & ~(1 << PF.LOG_SHMFD))
    fd = new_fds(1)[0]
    assert ack_value(ask(p, R.SET_LOG_BASE, LogArea(8192, 0).pack(), [fd])) == 1
    assert fd_is_closed(fd) and rec.calls == []


def test_set_log_fd_hands_over_its_fd(rec):
    p = proto(rec)
    fd = new_fds(1)[0]
    assert ack_value(ask(p, R.SET_LOG_FD, b"", [fd])) == 0
    assert rec.calls == [("set_log_fd",)] and rec.owned_fds == [fd]


def test_vring_addr_log_flag_passes_and_unknown_flags_are_refused(rec):
    p = proto(rec)
    addr = VringAddr(0, VRING_F_LOG, 0x1000, 0x2000, 0x3000, 0x2000)
    assert ack_value(ask(p, R.SET_VRING_ADDR, addr.pack())) == 0
    assert rec.calls == [("set_vring_addr", addr)]
    assert ack_value(ask(p, R.SET_VRING_ADDR, VringAddr(0, 2, 0x1000, 0x2000, 0x3000, 0).pack())) == 1
