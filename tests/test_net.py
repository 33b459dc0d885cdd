"""virtio-net through the real daemon: loopback, the built-in learning
switch, malformed frames, the control queue, multiqueue, config space and
TAP devices inside a network namespace the test makes.

Everything is real: the `vhostd serve` subprocess (inside `ip netns exec`
for TAP), vhost-user over a Unix socket, memfd guest memory, eventfds, and
the kernel's own ARP/ICMP/TCP answering on the TAP.  The guest side is the
Python driver model in net_driver.py.  Drop counters are read from the
daemon's SIGUSR1 stats lines.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

from conftest import STATUS_NEEDS_RESET, Guest, Vhostd, readable, wait_until
from daemon import DaemonProcess
from net_driver import (
    BROADCAST,
    CTRL_ANNOUNCE,
    CTRL_ANNOUNCE_ACK,
    CTRL_MAC,
    CTRL_MAC_ADDR_SET,
    CTRL_MAC_TABLE_SET,
    CTRL_MQ,
    CTRL_MQ_VQ_PAIRS_SET,
    CTRL_RX,
    CTRL_RX_ALLMULTI,
    CTRL_RX_PROMISC,
    CTRL_VLAN,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_RARP,
    F_CTRL_MAC_ADDR,
    F_CTRL_RX,
    F_CTRL_VQ,
    F_GUEST_ANNOUNCE,
    F_GUEST_CSUM,
    F_GUEST_ECN,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_GUEST_UFO,
    F_HOST_TSO4,
    F_MAC,
    F_MQ,
    F_MRG_RXBUF,
    F_MTU,
    F_STATUS,
    F_VERSION_1,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    NET_ERR,
    NET_OK,
    STATUS_LINK_UP,
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    NetDriver,
    NetHdr,
    NetNamespaceUnavailable,
    Netns,
    arp,
    bit,
    complete_csum,
    eth,
    icmp_echo,
    inet_csum,
    ipv4,
    mac_bytes,
    parse_arp,
    parse_eth,
    parse_ipv4,
    parse_tcp,
    tcp,
    tcp_csum_ok,
    tcp_gso_frame,
)
from vhostd.config import default_mac
from vhostd.frontend import BackendError
from vhostd.protocol.codec import pack_u64
from vhostd.protocol.constants import Request

HDR = 12  # VERSION_1 is always negotiated: the header carries num_buffers
MAX_FRAME = 65535 + 14  # the largest frame vhostd takes after the header
ALL = (1 << 64) - 1
PSH = 0x08

MAC1, MAC2, MAC3 = "52:54:00:00:01:01", "52:54:00:00:01:02", "52:54:00:00:01:03"


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


def frame_to(dst: bytes, src: bytes, n: int = 100, seed: int = 0, ethertype: int = 0x88B5) -> bytes:
    """An n-byte frame (local experimental ethertype) with a recognisable body."""
    return eth(dst, src, ethertype, payload(n - 14, seed), pad=False)


# ---------------------------------------------------------------------- daemon


class NetVhostd(Vhostd):
    """Vhostd for net devices: no image files; `prefix` runs it elsewhere
    (ip netns exec NS)."""

    def __init__(self, workdir, sockdir: str, devices: list[dict], daemon: dict | None = None,
                 prefix: list[str] = ()) -> None:
        for d in devices:
            d.setdefault("type", "net")
            d.setdefault("socket", os.path.join(sockdir, d["name"] + ".sock"))
        DaemonProcess.__init__(self, workdir, devices, daemon, prefix)

    def stats(self, name: str) -> list[dict[str, int]]:
        """The device's counters per queue pair (SIGUSR1 stats lines)."""
        mark = self.log_mark()
        pairs = next(d.get("queues", 1) for d in self.devices if d["name"] == name)
        os.kill(self.pid, signal.SIGUSR1)
        pat = rf" {re.escape(name)}: stats (\d+): (.* rx_dropped=\d+)$"  # whole lines only
        lines = self.wait_log(mark, pat, count=pairs)
        out: list[dict[str, int]] = [{} for _ in range(pairs)]
        for line in lines:
            m = re.search(pat, line)
            out[int(m.group(1))] = {k: int(v) for k, v in (kv.split("=") for kv in m.group(2).split())}
        return out

    def counter(self, name: str, key: str, qp: int = 0) -> int:
        return self.stats(name)[qp][key]


@pytest.fixture
def net_vhostd(tmp_path, sockdir):
    """Factory: start `vhostd serve` with net devices (type net by default).
    At teardown every daemon must exit 0 with a log free of tracebacks."""
    started: list[NetVhostd] = []

    def start(devices: list[dict], daemon: dict | None = None, prefix: list[str] = ()) -> NetVhostd:
        wd = tmp_path / f"vhostd{len(started)}"
        wd.mkdir()
        vd = NetVhostd(wd, sockdir, devices, daemon or {"workers": 2}, prefix)
        started.append(vd)
        return vd.start()

    yield start
    for vd in started:
        vd.finish()


@pytest.fixture
def netns():
    """A network namespace of this test (skips if this machine cannot make one)."""
    try:
        ns = Netns()
    except NetNamespaceUnavailable as exc:
        print(f"SKIP: {exc}")
        pytest.skip(f"cannot make a network namespace with a TAP here: {exc}")
    yield ns
    ns.delete()


def connect(vd: NetVhostd, name: str, features: int = ALL, pairs: int = 1, packed: bool = False,
            **kw) -> tuple[Guest, NetDriver]:
    """A driver session; packed: on packed virtqueues (VIRTIO_F_RING_PACKED)."""
    g = Guest(vd, name, features=features, packed=packed)
    assert g.packed == packed
    return g, NetDriver(g, pairs, **kw)


# Tests that run on both ring layouts: split (virtio 1.2 2.7) and packed (2.8).
layouts = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


def assert_same(rx, frame: bytes, hdr: NetHdr | None = None) -> None:
    assert rx.frame == frame, f"frame differs: got {len(rx.frame)} bytes, sent {len(frame)}"
    want = (hdr or NetHdr()).offload_fields()
    assert rx.hdr.offload_fields() == want, (rx.hdr, hdr)
    assert rx.hdr.num_buffers == rx.nbufs


# ====================================================================== loopback


@layouts
def test_loopback_frames_and_headers_come_back_identical(net_vhostd, packed):
    vd = net_vhostd([{"name": "lo", "backend": "loopback"}])
    g, d = connect(vd, "lo", packed=packed)
    d.post_rx(32)
    src = mac_bytes(MAC1)
    cases = [
        (frame_to(BROADCAST, src, 60), NetHdr(), {}),
        (frame_to(BROADCAST, src, 1514, 1), NetHdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 16), {}),
        (frame_to(BROADCAST, src, 777, 2), NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16), {"pieces": 100}),
        (frame_to(BROADCAST, src, 1000, 3), NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV6, 74, 1428, 54, 16), {"hdr_apart": True}),
        (frame_to(BROADCAST, src, 1400, 4), NetHdr(HDR_F_NEEDS_CSUM, GSO_UDP, 42, 1400, 34, 6), {"pieces": 7}),
        (frame_to(BROADCAST, src, 1200, 5), NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 54, 536, 34, 16), {}),
        (frame_to(BROADCAST, src, 14, 6), NetHdr(HDR_F_DATA_VALID), {}),  # the shortest frame: a bare Ethernet header
        (frame_to(BROADCAST, src, 1514, 7), NetHdr(), {"pieces": 7, "hdr_apart": True}),  # 218 descriptors
        (frame_to(BROADCAST, src, 1500, 8), NetHdr(), {"pieces": 64, "indirect": True}),
    ]
    for frame, hdr, kw in cases:
        assert d.send(frame, hdr, **kw) == 0  # tx chains complete with used length 0
        rx = d.recv()
        assert_same(rx, frame, hdr)
        assert rx.nbufs == 1 and rx.lens == [HDR + len(frame)]
    # The header itself split over descriptors (5 + 7 bytes, the second with the frame's start).
    hdr = NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)
    split = frame_to(BROADCAST, src, 900, 9)
    d.send_raw([hdr.pack()[:5], hdr.pack()[5:] + split[:50], split[50:]])
    assert_same(d.recv(), split, hdr)
    d.expect_nothing()
    st = vd.stats("lo")[0]
    assert st["tx_frames"] == st["rx_frames"] == len(cases) + 1
    assert st["tx_bytes"] == st["rx_bytes"] == sum(len(f) for f, _, _ in cases) + len(split)
    assert st["rx_dropped"] == st["tx_bad"] == st["tx_dropped"] == 0
    g.close()


@layouts
def test_loopback_mergeable_buffers_carry_big_gso_frames(net_vhostd, packed):
    vd = net_vhostd([{"name": "lo", "backend": "loopback"}])
    g, d = connect(vd, "lo", packed=packed)
    assert g.features & bit(F_MRG_RXBUF)
    d.post_rx(64, 1536)
    src, dst = mac_bytes(MAC1), mac_bytes(MAC2)
    for length in (9000, 65000, MAX_FRAME):
        hdr, frame = tcp_gso_frame(dst, src, length)
        d.send(frame, hdr, pieces=4096)
        rx = d.recv()
        assert_same(rx, frame, hdr)
        total = HDR + length
        assert rx.nbufs == -(-total // 1536) > 1
        assert rx.lens == [1536] * (rx.nbufs - 1) + [total - 1536 * (rx.nbufs - 1)]
        d.post_rx(rx.nbufs, 1536)  # give back what it took
    # Not enough buffers posted for the frame: dropped whole, none consumed,
    # and the buffers that are there serve the next (small) frame.
    while d.posted() > 10:
        d.send(frame_to(dst, src, 60))
        d.recv()
    assert d.posted() == 10
    hdr, frame = tcp_gso_frame(dst, src, 65000)
    d.send(frame, hdr)
    d.expect_nothing()
    assert d.posted() == 10
    assert vd.counter("lo", "rx_dropped") == 1
    small = frame_to(dst, src, 200, 9)
    d.send(small)
    assert_same(d.recv(), small)
    g.close()


@layouts
def test_loopback_without_mergeable_buffers(net_vhostd, packed):
    vd = net_vhostd([{"name": "lo", "backend": "loopback", "mtu": 9000}])
    g, d = connect(vd, "lo", features=ALL & ~bit(F_MRG_RXBUF), packed=packed)
    assert not g.features & bit(F_MRG_RXBUF) and d.hdr_len == HDR
    src = mac_bytes(MAC1)
    d.post_rx(1, 1536)
    too_big = frame_to(BROADCAST, src, 1536 - HDR + 1)
    d.send(too_big)  # one byte too long for the only buffer: dropped, not split
    d.expect_nothing()
    assert d.posted() == 1
    assert vd.counter("lo", "rx_dropped") == 1
    fits = frame_to(BROADCAST, src, 1536 - HDR, 1)  # exactly fills it
    d.send(fits)
    rx = d.recv()
    assert_same(rx, fits)
    assert rx.hdr.num_buffers == 1 and rx.lens == [1536]
    # Linux's "big packets" layout: one chain of a header descriptor and pages.
    d.post_rx(2, pieces=[HDR] + [4096] * 17)
    hdr, big = tcp_gso_frame(BROADCAST, src, 65000)
    d.send(big, hdr)
    rx = d.recv()
    assert_same(rx, big, hdr)
    assert rx.hdr.num_buffers == 1 and rx.lens == [HDR + 65000]
    st = vd.stats("lo")[0]
    assert (st["rx_frames"], st["rx_dropped"], st["tx_frames"]) == (2, 1, 3)
    g.close()


def test_loopback_legacy_header_without_version_1(net_vhostd):
    """Neither VERSION_1 nor MRG_RXBUF: the 10-byte header, no num_buffers."""
    vd = net_vhostd([{"name": "lo", "backend": "loopback"}])
    g, d = connect(vd, "lo", features=ALL & ~bit(F_VERSION_1) & ~bit(F_MRG_RXBUF))
    assert d.hdr_len == 10
    d.post_rx(4)
    src = mac_bytes(MAC1)
    for i, hdr in enumerate((NetHdr(), NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16))):
        f = frame_to(BROADCAST, src, 1000 + i, i)
        d.send(f, hdr)
        rx = d.recv()
        assert rx.frame == f and rx.hdr.offload_fields() == hdr.offload_fields() and rx.lens == [10 + len(f)]
    g.close()


def test_loopback_receiver_without_guest_offloads(net_vhostd):
    """A driver that took no GUEST_* offload gets no partial checksum, no
    GSO frame (both dropped and counted) and header flags of zero."""
    vd = net_vhostd([{"name": "lo", "backend": "loopback"}])
    guest_offloads = sum(bit(f) for f in (F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO))
    g, d = connect(vd, "lo", features=ALL & ~guest_offloads)
    assert g.features & bit(F_HOST_TSO4)  # it may still send them
    d.post_rx(16)
    src = mac_bytes(MAC1)
    gso_hdr, gso = tcp_gso_frame(BROADCAST, src, 5000)
    d.send(gso, gso_hdr)
    d.send(frame_to(BROADCAST, src, 200), NetHdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 16))
    d.expect_nothing()
    assert vd.counter("lo", "rx_dropped") == 2
    f = frame_to(BROADCAST, src, 300, 1)
    d.send(f, NetHdr(HDR_F_DATA_VALID))
    rx = d.recv()
    assert rx.frame == f and rx.hdr == NetHdr(num_buffers=1)  # DATA_VALID is not passed on (5.1.6.4.1)
    g.close()


def test_mtu_bounds_non_gso_frames(net_vhostd):
    """With F_MTU the device passes no non-GSO frame over mtu + Ethernet
    header (+4 with a VLAN tag); GSO frames are not bound by it."""
    vd = net_vhostd([{"name": "lo", "backend": "loopback"}])
    g, d = connect(vd, "lo")
    assert g.features & bit(F_MTU)
    d.post_rx(64)
    src = mac_bytes(MAC1)
    vlan = b"\x81\x00\x00\x05"

    def tagged(n: int) -> bytes:
        return BROADCAST + src + vlan + struct.pack(">H", 0x88B5) + payload(n - 18)

    dropped = 0
    for frame, ok in ((frame_to(BROADCAST, src, 1514), True), (frame_to(BROADCAST, src, 1515), False),
                      (tagged(1518), True), (tagged(1519), False)):
        d.send(frame)
        if ok:
            assert_same(d.recv(), frame)
        else:
            d.expect_nothing(wait=0.02)
            dropped += 1
    hdr, gso = tcp_gso_frame(BROADCAST, src, 9000)
    d.send(gso, hdr)
    assert_same(d.recv(), gso, hdr)
    g.fe.request(Request.NET_SET_MTU, pack_u64(9000), ack=True)  # the front-end raises it
    jumbo = frame_to(BROADCAST, src, 9014)
    d.send(jumbo)
    assert_same(d.recv(), jumbo)
    assert vd.counter("lo", "rx_dropped") == dropped
    g.close()
    # A driver that did not take F_MTU is not bound by it.
    g, d = connect(vd, "lo", features=ALL & ~bit(F_MTU))
    d.post_rx(16)
    big = frame_to(BROADCAST, src, 20000)
    d.send(big)
    assert_same(d.recv(), big)
    g.close()


@layouts
def test_loopback_without_rx_buffers_drops_then_recovers(net_vhostd, packed):
    vd = net_vhostd([{"name": "lo", "backend": "loopback"}])
    g, d = connect(vd, "lo", packed=packed)
    src = mac_bytes(MAC1)
    for i in range(3):
        d.send(frame_to(BROADCAST, src, 100, i))  # tx completes although nothing can receive it
    d.expect_nothing()
    st = vd.stats("lo")[0]
    assert (st["tx_frames"], st["rx_frames"], st["rx_dropped"]) == (3, 0, 3)
    d.post_rx(4)
    later = frame_to(BROADCAST, src, 100, 42)
    d.send(later)
    assert_same(d.recv(), later)  # only the frame sent after the buffers came
    d.expect_nothing()
    assert vd.counter("lo", "rx_frames") == 1
    g.close()


# ====================================================================== switch


def switch_ports(net_vhostd, n: int = 3, switch: str = "sw0", **extra):
    macs = [MAC1, MAC2, MAC3][:n]
    return net_vhostd([{"name": f"p{i + 1}", "backend": "switch", "switch": switch, "mac": m, **extra}
                       for i, m in enumerate(macs)])


def test_switch_floods_unknown_and_broadcast_then_learns(net_vhostd):
    vd = switch_ports(net_vhostd)
    ports = [connect(vd, f"p{i}") for i in (1, 2, 3)]
    d1, d2, d3 = (d for _, d in ports)
    m1, m2, m3 = mac_bytes(MAC1), mac_bytes(MAC2), mac_bytes(MAC3)
    for d in (d1, d2, d3):
        d.post_rx(16)

    def only(frame: bytes, *receivers: NetDriver) -> None:
        for d in (d1, d2, d3):
            if d in receivers:
                assert_same(d.recv(), frame)
        for d in (d1, d2, d3):
            d.expect_nothing(wait=0.02)

    bcast = frame_to(BROADCAST, m1, 300, 1)
    d1.send(bcast)
    only(bcast, d2, d3)  # broadcast: everyone but the sender
    mcast = frame_to(bytes.fromhex("01005e000001"), m3, 80, 2)
    d3.send(mcast)
    only(mcast, d1, d2)
    unknown = frame_to(m2, m1, 200, 3)  # m2 has never sent: flooded
    d1.send(unknown)
    only(unknown, d2, d3)
    reply = frame_to(m1, m2, 200, 4)  # m1 was learned on p1
    d2.send(reply)
    only(reply, d1)
    again = frame_to(m2, m1, 200, 5)  # now m2 is known too
    d1.send(again)
    only(again, d2)
    to_self = frame_to(m3, m3, 90, 6)  # to a MAC learned on the source port: never back out
    d3.send(to_self)
    only(to_self)
    stranger = frame_to(mac_bytes("52:54:00:99:99:99"), m3, 120, 7)
    d3.send(stranger)
    only(stranger, d1, d2)
    # m1 moves to p3 (a migrated guest): the switch follows the last frame seen.
    moved = frame_to(BROADCAST, m1, 64, 8)
    d3.send(moved)
    only(moved, d1, d2)
    to_m1 = frame_to(m1, m2, 100, 9)
    d2.send(to_m1)
    only(to_m1, d3)
    for g, _ in ports:
        g.close()


@pytest.mark.parametrize("rings", [("split",) * 3, ("packed", "split", "packed")], ids=["split", "mixed"])
def test_switch_concurrent_senders(net_vhostd, rings):
    """Three ports blast broadcasts at the same time, served by two workers
    that deliver into each other's rx queues: every frame arrives intact at
    both other ports, nothing deadlocks (also between packed and split rings)."""
    vd = switch_ports(net_vhostd)
    ports = [connect(vd, n, packed=r == "packed")[1] for n, r in zip(("p1", "p2", "p3"), rings)]
    macs = [mac_bytes(m) for m in (MAC1, MAC2, MAC3)]
    per_port = 120
    for d in ports:
        d.post_rx(2 * per_port, 1536)
    sent = {}
    for k, d in enumerate(ports):
        for i in range(per_port):
            f = frame_to(BROADCAST, macs[k], 60 + (i * 37 + k * 11) % 1400, seed=k * 1000 + i)
            sent[f] = k
            d.tx[0].add([NetHdr().pack() + f], [], kick=False)
    for d in ports:  # all three at once
        d.tx[0].notify()
    for d in ports:
        d.tx[0].wait_used(per_port, timeout=10)
    for k, d in enumerate(ports):
        got = [d.recv().frame for _ in range(2 * per_port)]
        assert sorted(got) == sorted(f for f, src in sent.items() if src != k)
        for j in range(3):  # and each sender's frames in the order it sent them
            assert [f for f in got if sent[f] == j] == [f for f, src in sent.items() if src == j and j != k]
        d.expect_nothing(wait=0.01)
    for k in range(3):
        st = vd.stats(f"p{k + 1}")[0]
        assert (st["tx_frames"], st["rx_frames"], st["rx_dropped"]) == (per_port, 2 * per_port, 0)
    for d in ports:
        d.guest.close()


def test_switch_gso_frame_goes_through_unsegmented(net_vhostd):
    vd = switch_ports(net_vhostd, 2)
    (g1, d1), (g2, d2) = connect(vd, "p1"), connect(vd, "p2")
    d1.post_rx(8)
    d2.post_rx(64)
    m1, m2 = mac_bytes(MAC1), mac_bytes(MAC2)
    hdr, frame = tcp_gso_frame(m2, m1, 30000)
    d1.send(frame, hdr)
    rx = d2.recv()
    assert_same(rx, frame, hdr)  # one frame, header as sent: the switch does not segment
    assert rx.nbufs == -(-(HDR + 30000) // 1536)
    d2.expect_nothing()
    d1.expect_nothing()
    g1.close()
    g2.close()


def test_switch_receiver_without_tso_does_not_get_tso_frames(net_vhostd):
    vd = switch_ports(net_vhostd)
    (g1, d1), (g2, d2) = connect(vd, "p1"), connect(vd, "p2")
    g3, d3 = connect(vd, "p3", features=ALL & ~bit(F_GUEST_TSO4))
    assert not g3.features & bit(F_GUEST_TSO4) and g3.features & bit(F_GUEST_CSUM)
    for d in (d1, d2, d3):
        d.post_rx(32)
    m1 = mac_bytes(MAC1)
    hdr, tso = tcp_gso_frame(BROADCAST, m1, 20000)
    d1.send(tso, hdr)
    assert_same(d2.recv(), tso, hdr)
    d3.expect_nothing()
    assert vd.counter("p3", "rx_dropped") == 1
    assert vd.counter("p2", "rx_dropped") == 0
    # Checksum offload alone is fine for p3; so is a plain frame.
    csum_only = NetHdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 16)
    f = frame_to(BROADCAST, m1, 1000, 1)
    d1.send(f, csum_only)
    assert_same(d3.recv(), f, csum_only)
    assert_same(d2.recv(), f, csum_only)
    for g in (g1, g2, g3):
        g.close()


def test_switches_are_separate_and_independent(net_vhostd):
    vd = net_vhostd([
        {"name": "a1", "backend": "switch", "switch": "left", "mac": MAC1},
        {"name": "a2", "backend": "switch", "switch": "left", "mac": MAC2},
        {"name": "b1", "backend": "switch", "switch": "right", "mac": MAC1},  # same MAC, other switch
        {"name": "b2", "backend": "switch", "switch": "right", "mac": MAC3},
    ])
    a1, a2, b1, b2 = (connect(vd, n)[1] for n in ("a1", "a2", "b1", "b2"))
    everyone = (a1, a2, b1, b2)
    for d in everyone:
        d.post_rx(16)
    m1, m2, m3 = mac_bytes(MAC1), mac_bytes(MAC2), mac_bytes(MAC3)

    def only(frame: bytes, *receivers: NetDriver) -> None:
        for d in receivers:
            assert_same(d.recv(), frame)
        for d in everyone:
            d.expect_nothing(wait=0.02)

    f = frame_to(BROADCAST, m1, 100, 1)
    a1.send(f)
    only(f, a2)  # left's broadcast stays on left
    f = frame_to(BROADCAST, m1, 100, 2)
    b1.send(f)
    only(f, b2)
    # m1 is now learned on both switches, on different ports: each switch
    # has its own table.
    f = frame_to(m1, m2, 100, 3)
    a2.send(f)
    only(f, a1)
    f = frame_to(m1, m3, 100, 4)
    b2.send(f)
    only(f, b1)
    # b2's MAC is unknown on the left switch: flooded there, never crossing.
    f = frame_to(m3, m1, 100, 5)
    a1.send(f)
    only(f, a2)
    for d in everyone:
        d.guest.close()


def test_switch_port_disconnect_and_reconnect(net_vhostd):
    vd = switch_ports(net_vhostd, 2)
    (g1, d1), (g2, d2) = connect(vd, "p1"), connect(vd, "p2")
    m1, m2 = mac_bytes(MAC1), mac_bytes(MAC2)
    d1.post_rx(8)
    d2.post_rx(8)
    d2.send(frame_to(m1, m2, 64))  # learn m2 on p2
    d1.recv()
    g2.close()
    # p2 is gone: frames to it are dropped (and counted), p1 keeps working.
    for i in range(3):
        d1.send(frame_to(m2, m1, 100, i))
    assert vd.counter("p2", "rx_dropped") == 3
    g2, d2 = connect(vd, "p2")
    d2.post_rx(8)
    f = frame_to(m2, m1, 300, 9)
    d1.send(f)
    assert_same(d2.recv(), f)
    d2.expect_nothing()  # none of the frames sent while it was away
    f = frame_to(m1, m2, 300, 10)
    d2.send(f)
    assert_same(d1.recv(), f)
    # And once more, through a second reconnect of the other side.
    g1.close()
    g1, d1 = connect(vd, "p1")
    d1.post_rx(8)
    f = frame_to(m1, m2, 400, 11)
    d2.send(f)
    assert_same(d1.recv(), f)
    g1.close()
    g2.close()


# ====================================================================== bad frames


@layouts
def test_malformed_tx_frames_are_dropped_and_counted(net_vhostd, packed):
    vd = net_vhostd([{"name": "lo", "backend": "loopback", "mtu": 65535}])
    g, d = connect(vd, "lo", packed=packed)
    d.post_rx(128)
    src = mac_bytes(MAC1)
    good_n = 0

    def good() -> None:
        nonlocal good_n
        good_n += 1
        f = frame_to(BROADCAST, src, 100, good_n)
        d.send(f)
        assert_same(d.recv(), f)

    good()
    bad = [
        [NetHdr().pack()[:6]],                              # the header is larger than the whole chain
        [NetHdr().pack()],                                  # zero-length frame
        [NetHdr().pack(), b"\xff" * 13],                    # shorter than an Ethernet header
        [NetHdr().pack() + frame_to(BROADCAST, src, MAX_FRAME + 1)],  # over 64 KiB + Ethernet header
    ]
    for segs in bad:
        assert d.send_raw(segs) == 0
        d.expect_nothing(wait=0.01)
        good()
    # a tx chain without any readable byte: only a writable buffer
    assert d.send_raw([], in_lens=[64]) == 0
    good()
    # the largest frame there is still goes through
    biggest = frame_to(BROADCAST, src, MAX_FRAME, 77)
    d.send(biggest, pieces=8192)
    assert_same(d.recv(), biggest)
    st = vd.stats("lo")[0]
    assert st["tx_bad"] == len(bad) + 1
    assert st["tx_frames"] == st["rx_frames"] == good_n + 1
    assert st["rx_dropped"] == 0
    assert not g.status() & STATUS_NEEDS_RESET
    g.close()


def _bad_chain(q, addr: int, length: int, flags: int) -> int:
    if q.packed:
        return q.post([(addr, length, flags)])
    head = q.free.pop()
    q.chains[head] = [head]
    q.write_desc(head, addr, length, flags)
    q.publish(head)
    return head


@layouts
def test_tx_buffer_outside_guest_memory_breaks_only_that_queue(net_vhostd, packed):
    vd = net_vhostd([{"name": "lo", "backend": "loopback"}, {"name": "other", "backend": "loopback"}])
    g, d = connect(vd, "lo", packed=packed)
    go, do = connect(vd, "other")
    d.post_rx(8)
    do.post_rx(8)
    src = mac_bytes(MAC1)
    f = frame_to(BROADCAST, src, 100)
    d.send(f)
    assert_same(d.recv(), f)
    mark = vd.log_mark()
    _bad_chain(d.tx[0], 0x4000_0000, 128, 0)  # 1 GiB: far past the 16 MiB of guest memory
    assert readable(d.tx[0].err, 5), "tx vring err eventfd not signalled"
    wait_until(lambda: g.status() & STATUS_NEEDS_RESET, what="NEEDS_RESET")
    vd.wait_log(mark, r"lo: queue 1 marked NEEDS_RESET: .*outside guest memory")
    # More kicks on the broken queue: nothing moves, nothing more is logged.
    for _ in range(3):
        d.tx[0].notify()
    d.tx[0].add([NetHdr().pack() + f], [], kick=True)
    d.expect_nothing(wait=0.1)
    assert len(vd.log_lines(mark, r"marked NEEDS_RESET")) == 1
    # The other device does not notice.
    for i in range(3):
        f2 = frame_to(BROADCAST, src, 200, i)
        do.send(f2)
        assert_same(do.recv(), f2)
    assert not go.status() & STATUS_NEEDS_RESET
    vd.assert_alive()
    # A new session on the broken device starts clean.
    g.close()
    g, d = connect(vd, "lo", packed=packed)
    assert not g.status() & STATUS_NEEDS_RESET
    d.post_rx(4)
    d.send(f)
    assert_same(d.recv(), f)
    g.close()
    go.close()


@layouts
def test_rx_buffer_outside_guest_memory_breaks_the_rx_queue(net_vhostd, packed):
    vd = net_vhostd([{"name": "lo", "backend": "loopback"}, {"name": "other", "backend": "loopback"}])
    g, d = connect(vd, "lo", packed=packed)
    go, do = connect(vd, "other")
    do.post_rx(4)
    mark = vd.log_mark()
    _bad_chain(d.rx[0], 0x4000_0000, 1536, 2)  # a writable rx buffer outside guest memory
    f = frame_to(BROADCAST, mac_bytes(MAC1), 100)
    d.send(f)  # tx completes; the frame finds a broken rx queue
    assert readable(d.rx[0].err, 5), "rx vring err eventfd not signalled"
    vd.wait_log(mark, r"lo: queue 0 marked NEEDS_RESET: .*outside guest memory")
    assert g.status() & STATUS_NEEDS_RESET
    d.send(f)  # tx still completes
    assert len(vd.log_lines(mark, r"marked NEEDS_RESET")) == 1
    do.send(f)
    assert_same(do.recv(), f)
    g.close()
    go.close()


def test_switch_port_that_shrinks_its_memory_breaks_only_itself(net_vhostd):
    """A front-end that cuts its memfd short makes the switch's copy into its
    rx buffers fault (SIGBUS).  Its own rx queue breaks; the sender, the
    other ports and the daemon carry on."""
    vd = switch_ports(net_vhostd)
    (g1, d1), (g2, d2), (g3, d3) = (connect(vd, n) for n in ("p1", "p2", "p3"))
    for d in (d1, d2, d3):
        d.post_rx(8)
    m1 = mac_bytes(MAC1)
    f = frame_to(BROADCAST, m1, 500)
    d1.send(f)
    assert_same(d2.recv(), f)
    assert_same(d3.recv(), f)
    mark = vd.log_mark()
    os.ftruncate(g2.mem.fd, 0)  # from here on nobody touches g2.mem
    for i in range(3):
        f = frame_to(BROADCAST, m1, 500, i)
        d1.send(f)
        assert_same(d3.recv(), f)
    vd.wait_log(mark, r"p2: queue 0 marked NEEDS_RESET: .*SIGBUS")
    assert len(vd.log_lines(mark, "NEEDS_RESET")) == 1
    assert g2.status() & STATUS_NEEDS_RESET
    assert not g1.status() & STATUS_NEEDS_RESET and not g3.status() & STATUS_NEEDS_RESET
    g2.close()  # the session ends: the daemon did not keep p2's rx queue locked
    g2, d2 = connect(vd, "p2")
    d2.post_rx(4)
    f = frame_to(BROADCAST, mac_bytes(MAC3), 200, 9)
    d3.send(f)
    assert_same(d2.recv(), f)
    assert_same(d1.recv(), f)
    for g in (g1, g2, g3):
        g.close()


def test_switch_sender_that_shrinks_its_memory_breaks_only_itself(net_vhostd):
    """The frame's own pages vanish while the switch copies it out: the
    sender's tx queue breaks, the receivers get nothing half-copied."""
    vd = switch_ports(net_vhostd, mtu=65535)
    (g1, d1), (g2, d2), (g3, d3) = (connect(vd, n) for n in ("p1", "p2", "p3"))
    for d in (d1, d2, d3):
        d.post_rx(32)
    frame = frame_to(BROADCAST, mac_bytes(MAC1), 30000)
    q = d1.tx[0]
    head, _ = q.add([NetHdr().pack() + frame], [], kick=False)
    (addr,) = struct.unpack_from("<Q", d1.mem.read(q.desc + 16 * head, 8))
    cut = (addr + 8192) & ~4095  # header and the first pages stay, the rest is gone
    assert q.arena < cut < addr + len(frame)
    mark = vd.log_mark()
    os.ftruncate(g1.mem.fd, cut)  # rings (below the arena) survive; nobody reads past `cut` now
    q.notify()
    vd.wait_log(mark, r"p1: queue 1 marked NEEDS_RESET: .*SIGBUS")
    assert g1.status() & STATUS_NEEDS_RESET
    d2.expect_nothing()
    d3.expect_nothing()
    f = frame_to(BROADCAST, mac_bytes(MAC2), 3000, 1)
    d2.send(f)
    assert_same(d3.recv(), f)
    assert not g2.status() & STATUS_NEEDS_RESET and not g3.status() & STATUS_NEEDS_RESET
    assert len(vd.log_lines(mark, "NEEDS_RESET")) == 1
    g1.close()
    g2.close()
    g3.close()


def test_rx_buffer_without_writable_part_breaks_the_rx_queue(net_vhostd):
    """A read-only buffer on an rx queue is a driver bug: reported once as
    NEEDS_RESET instead of silently eating every frame after it."""
    vd = net_vhostd([{"name": "lo", "backend": "loopback"}])
    g, d = connect(vd, "lo")
    mark = vd.log_mark()
    d.rx[0].add([b"\0" * 1536], [])
    f = frame_to(BROADCAST, mac_bytes(MAC1), 100)
    d.send(f)
    vd.wait_log(mark, r"lo: queue 0 marked NEEDS_RESET: .*no device-writable part")
    assert g.status() & STATUS_NEEDS_RESET
    d.send(f)  # tx goes on completing
    assert vd.stats("lo")[0]["rx_dropped"] == 2
    assert len(vd.log_lines(mark, "NEEDS_RESET")) == 1
    g.close()
    g, d = connect(vd, "lo")
    d.post_rx(1)
    d.send(f)
    assert_same(d.recv(), f)
    g.close()


# ====================================================================== control queue


@layouts
def test_control_queue_commands(net_vhostd, packed):
    vd = net_vhostd([{"name": "lo", "backend": "loopback", "mac": MAC1}])
    g, d = connect(vd, "lo", packed=packed)
    for f in (F_CTRL_VQ, F_CTRL_RX, F_CTRL_MAC_ADDR, F_GUEST_ANNOUNCE):
        assert g.features & bit(f)
    assert not g.offered & bit(F_MQ)  # one queue pair: no MQ
    # RX mode
    assert d.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\x01") == NET_OK
    assert d.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\x00", split=False) == NET_OK
    assert d.ctrl(CTRL_RX, CTRL_RX_ALLMULTI, b"\x01") == NET_OK
    assert d.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\x01\x00") == NET_ERR  # the value is one byte
    assert d.ctrl(CTRL_RX, CTRL_RX_PROMISC) == NET_ERR
    assert d.ctrl(CTRL_RX, 42, b"\x01") == NET_ERR
    # MAC address
    new = "52:54:00:0a:0b:0c"
    assert d.ctrl(CTRL_MAC, CTRL_MAC_ADDR_SET, mac_bytes(new)) == NET_OK
    assert g.fe.get_config(0, 6) == mac_bytes(new)  # reflected in config space (CTRL_MAC_ADDR)
    assert d.ctrl(CTRL_MAC, CTRL_MAC_ADDR_SET, mac_bytes(new)[:5]) == NET_ERR
    # MAC table: two tables (unicast, multicast), each a le32 count and entries
    def table(*macs: str) -> bytes:
        return struct.pack("<I", len(macs)) + b"".join(mac_bytes(m) for m in macs)

    uni, multi = table(MAC2, MAC3), table("01:00:5e:00:00:01")
    assert d.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, uni + multi) == NET_OK
    assert d.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, table() + table()) == NET_OK
    for bad in (uni,                                       # the multicast table is missing
                uni + multi + b"\0",                       # trailing garbage
                struct.pack("<I", 3) + uni[4:] + multi,    # count says 3, two entries follow
                table(MAC2) + struct.pack("<I", 0xFFFFFFFF),  # absurd count
                b"\x01\x00"):                             # not even a count
        assert d.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, bad) == NET_ERR
    assert d.ctrl(CTRL_MAC, 7, mac_bytes(MAC2)) == NET_ERR
    # MQ: one pair here
    assert d.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 1)) == NET_OK
    assert d.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 0)) == NET_ERR
    assert d.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == NET_ERR
    assert d.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, b"\x01") == NET_ERR
    # Announce
    assert d.ctrl(CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK) == NET_OK
    assert d.ctrl(CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK, b"\x00") == NET_ERR
    # Classes we do not implement, and garbage
    assert d.ctrl(CTRL_VLAN, 0, b"\x01\x00") == NET_ERR
    assert d.ctrl(0x77, 0) == NET_ERR
    assert d.ctrl(0xFF, 0xFF, b"x" * 100) == NET_ERR
    # A one-byte command (no command byte) and a command without an ack
    # byte are refused without stalling the queue.
    head, (ack,) = d.ctrlq.add([b"\x00"], [1])
    (used,) = d.ctrlq.wait_used(1)
    assert used.length == 1 and d.mem.read(ack, 1)[0] == NET_ERR
    d.ctrlq.add([bytes([CTRL_RX, CTRL_RX_PROMISC, 1])], [])
    (used,) = d.ctrlq.wait_used(1)
    assert used.length == 0
    assert d.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\x01") == NET_OK
    # The data path is untouched by all this.
    d.post_rx(2)
    f = frame_to(BROADCAST, mac_bytes(new), 100)
    d.send(f)
    assert_same(d.recv(), f)
    assert not g.status() & STATUS_NEEDS_RESET
    g.close()
    # A new driver (device reset) sees the configured MAC again.
    g, d = connect(vd, "lo", packed=packed)
    assert g.fe.get_config(0, 6) == mac_bytes(MAC1)
    g.close()


# ====================================================================== multiqueue


@layouts
def test_multiqueue_loopback_two_pairs(net_vhostd, packed):
    vd = net_vhostd([{"name": "mq", "backend": "loopback", "queues": 2}])
    g, d = connect(vd, "mq", pairs=2, packed=packed)
    assert g.features & bit(F_MQ)
    assert g.fe.get_queue_num() == 2
    assert struct.unpack("<H", g.fe.get_config(8, 2))[0] == 2
    assert d.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == NET_OK
    assert d.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 3)) == NET_ERR
    src = mac_bytes(MAC1)
    for qp in (0, 1):
        d.post_rx(16, qp=qp)
    for i in range(10):
        qp = i % 2
        if i % 3 == 0:
            hdr, f = tcp_gso_frame(BROADCAST, src, 3000 + i * 100)
        else:
            hdr, f = NetHdr(), frame_to(BROADCAST, src, 100 + i, i)
        d.send(f, hdr, qp=qp)
        assert_same(d.recv(qp), f, hdr)  # back on the same pair
    d.expect_nothing(0)
    d.expect_nothing(1)
    st = vd.stats("mq")
    assert st[0]["tx_frames"] == st[0]["rx_frames"] == 5
    assert st[1]["tx_frames"] == st[1]["rx_frames"] == 5
    g.close()


def test_switch_multiqueue_ports_follow_the_receivers_active_pairs(net_vhostd):
    """Frames sent on the sender's pair 1 land on pair 1 of a receiver that
    enabled two pairs, and on pair 0 of one that (after a reconnect) uses one."""
    vd = switch_ports(net_vhostd, 2, queues=2)
    (g1, d1), (g2, d2) = connect(vd, "p1", pairs=2), connect(vd, "p2", pairs=2)
    for d in (d1, d2):
        assert d.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == NET_OK
        d.post_rx(8, qp=0)
        d.post_rx(8, qp=1)
    m1, m2 = mac_bytes(MAC1), mac_bytes(MAC2)
    for qp in (0, 1):
        f = frame_to(m2, m1, 300, qp)
        d1.send(f, qp=qp)
        assert_same(d2.recv(qp), f)
    g2.close()
    g2, d2 = connect(vd, "p2", pairs=1, device_pairs=2)  # a new driver, one pair, no VQ_PAIRS_SET
    d2.post_rx(8)
    for qp in (0, 1):
        f = frame_to(m2, m1, 300, 10 + qp)
        d1.send(f, qp=qp)
        assert_same(d2.recv(0), f)
    assert vd.counter("p2", "rx_dropped", 1) == 0
    g1.close()
    g2.close()


# ====================================================================== config space, MTU, RARP


def test_config_space(net_vhostd):
    vd = net_vhostd([
        {"name": "cfg", "backend": "loopback", "mac": "02:11:22:33:44:55", "mtu": 9000, "queues": 3},
        {"name": "plain", "backend": "loopback"},
    ])
    g = Guest(vd, "cfg")
    for f in (F_MAC, F_STATUS, F_MTU, F_MQ):
        assert g.offered & bit(f)
    mac, status, pairs, mtu = struct.unpack("<6sHHH", g.fe.get_config(0, 12))
    assert (mac, status, pairs, mtu) == (mac_bytes("02:11:22:33:44:55"), STATUS_LINK_UP, 3, 9000)
    assert g.fe.get_config(6, 2) == struct.pack("<H", STATUS_LINK_UP)  # partial reads at an offset
    g.close()
    g = Guest(vd, "plain")
    mac, status, pairs, mtu = struct.unpack("<6sHHH", g.fe.get_config(0, 12))
    assert mac == mac_bytes(default_mac("plain")) and not mac[0] & 1  # a unicast default
    assert (status, pairs, mtu) == (STATUS_LINK_UP, 1, 1500)
    g.close()


def test_net_set_mtu(net_vhostd):
    vd = net_vhostd([{"name": "lo", "backend": "loopback"}])
    g = Guest(vd, "lo")
    g.fe.request(Request.NET_SET_MTU, pack_u64(4000), ack=True)
    assert struct.unpack("<H", g.fe.get_config(10, 2))[0] == 4000
    for bad in (67, 65536):
        with pytest.raises(BackendError):
            g.fe.request(Request.NET_SET_MTU, pack_u64(bad), ack=True)
    assert struct.unpack("<H", g.fe.get_config(10, 2))[0] == 4000
    g.close()


def test_send_rarp_reaches_the_guest_on_loopback(net_vhostd):
    vd = net_vhostd([{"name": "lo", "backend": "loopback"}])
    g, d = connect(vd, "lo")
    d.post_rx(2)
    mac = mac_bytes("52:54:00:12:34:56")
    g.fe.request(Request.SEND_RARP, mac + b"\0\0", ack=True)
    rx = d.recv()
    assert rx.hdr == NetHdr(num_buffers=1)
    dst, src, ethertype, body = parse_eth(rx.frame)
    assert (dst, src, ethertype) == (BROADCAST, mac, ETH_P_RARP)
    a = parse_arp(body)
    assert a["op"] == 3 and a["sha"] == a["tha"] == mac and a["ptype"] == ETH_P_IP
    assert len(rx.frame) == 60
    d.expect_nothing()
    g.close()


def test_send_rarp_on_a_switch_announces_the_mac(net_vhostd):
    """After migration the front-end has vhostd announce the guest's MAC: the
    other ports see the RARP, and the switch learns where the MAC now is."""
    vd = switch_ports(net_vhostd)
    (g1, d1), (g2, d2), (g3, d3) = (connect(vd, n) for n in ("p1", "p2", "p3"))
    for d in (d1, d2, d3):
        d.post_rx(8)
    moved = mac_bytes("52:54:00:77:77:77")
    g1.fe.request(Request.SEND_RARP, moved + b"\0\0", ack=True)
    for d in (d2, d3):
        dst, src, ethertype, _ = parse_eth(d.recv().frame)
        assert (dst, src, ethertype) == (BROADCAST, moved, ETH_P_RARP)
    d1.expect_nothing()
    f = frame_to(moved, mac_bytes(MAC3), 100)
    d3.send(f)
    assert_same(d1.recv(), f)  # learned on p1: not flooded
    d2.expect_nothing()
    for g in (g1, g2, g3):
        g.close()


# ====================================================================== TAP in a network namespace

GUEST_MAC = "52:54:00:00:99:02"
HOST_IP, GUEST_IP = "10.99.0.1", "10.99.0.2"

LISTENER = textwrap.dedent("""
    import hashlib, socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen(4)
    s.settimeout(20)
    print("ready", flush=True)
    c, _ = s.accept()
    c.settimeout(20)
    c.sendall(bytes(i * 13 & 255 for i in range(int(sys.argv[3]))))
    want, got = int(sys.argv[4]), b""
    while len(got) < want:
        chunk = c.recv(65536)
        if not chunk:
            break
        got += chunk
    print(len(got), hashlib.md5(got).hexdigest(), flush=True)
""")


def tap_flags(ns: Netns, ifname: str) -> set[str]:
    out = ns.run("ip", "-o", "link", "show", ifname).stdout
    return set(re.search(r"<([^>]*)>", out).group(1).split(","))


class TapGuest:
    """Guest-side IPv4 over a NetDriver on a TAP: answers the kernel's ARP
    requests for GUEST_IP while waiting for what it wants."""

    def __init__(self, d: NetDriver) -> None:
        self.d = d
        self.mac = mac_bytes(GUEST_MAC)
        self.host_mac: bytes | None = None

    def _answer_arp(self, rx) -> None:
        dst, src, et, body = parse_eth(rx.frame)
        if et == ETH_P_ARP:
            a = parse_arp(body)
            if a["op"] == 1 and a["tpa"] == GUEST_IP:
                self.d.send(eth(src, self.mac, ETH_P_ARP, arp(2, self.mac, GUEST_IP, a["sha"], a["spa"])))

    def recv(self, pred, timeout: float = 5.0):
        return self.d.recv_match(pred, qp=tuple(range(self.d.pairs)), timeout=timeout, on_other=self._answer_arp)

    def ip_to_guest(self, proto: int):
        def pred(frame: bytes) -> bool:
            _, _, et, body = parse_eth(frame)
            if et != ETH_P_IP:
                return False
            p = parse_ipv4(body)
            return p["proto"] == proto and p["dst"] == GUEST_IP and p["src"] == HOST_IP
        return pred

    def send_ip(self, proto: int, data: bytes, hdr: NetHdr | None = None, qp: int = 0, ident: int = 1) -> None:
        self.d.send(eth(self.host_mac, self.mac, ETH_P_IP, ipv4(GUEST_IP, HOST_IP, proto, data, ident)), hdr, qp=qp)


def tap_daemon(net_vhostd, netns: Netns, tap: str = "vtap0", **extra) -> NetVhostd:
    return net_vhostd([{"name": "t0", "backend": "tap", "tap": tap, "mac": GUEST_MAC, **extra}],
                      prefix=netns.prefix())


def arp_resolve(tg: TapGuest, qp: int = 0) -> dict:
    tg.d.send(eth(BROADCAST, tg.mac, ETH_P_ARP, arp(1, tg.mac, GUEST_IP, bytes(6), HOST_IP)), qp=qp)

    def is_reply(frame: bytes) -> bool:
        _, _, et, body = parse_eth(frame)
        return et == ETH_P_ARP and parse_arp(body)["op"] == 2

    rx = tg.d.recv_match(is_reply, qp=tuple(range(tg.d.pairs)))  # the kernel picks the TAP queue of the reply
    dst, src, _, body = parse_eth(rx.frame)
    a = parse_arp(body)
    assert dst == tg.mac and a["tha"] == tg.mac and a["tpa"] == GUEST_IP and a["spa"] == HOST_IP
    assert a["sha"] == src
    tg.host_mac = src
    return a


def test_tap_arp_icmp_and_tcp_with_the_kernel(netns, net_vhostd):  # netns first: torn down after the daemon
    vd = tap_daemon(net_vhostd, netns)
    flags = tap_flags(netns, "vtap0")
    assert "UP" in flags, flags  # vhostd brought the link up
    netns.run("ip", "addr", "add", f"{HOST_IP}/24", "dev", "vtap0")
    host_mac = netns.run("cat", "/sys/class/net/vtap0/address").stdout.strip()
    listener = netns.popen(sys.executable, "-c", LISTENER, HOST_IP, "5001", "8000", "20000",
                           stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        g, d = connect(vd, "t0")
        assert g.features & bit(F_HOST_TSO4) and g.features & bit(F_GUEST_TSO4)
        tg = TapGuest(d)

        # No rx buffers yet: what the kernel sends waits in the TAP.  A UDP
        # datagram to the guest makes it ask for the guest's MAC first.
        netns.run(sys.executable, "-c", "import socket; socket.socket(2, 2).sendto(b'early', ('%s', 9))" % GUEST_IP)
        d.expect_nothing(wait=0.1)
        d.post_rx(64)  # the kick arms the TAP queue again

        def who_has_guest(frame: bytes) -> bool:
            _, _, et, body = parse_eth(frame)
            return et == ETH_P_ARP and parse_arp(body)["op"] == 1 and parse_arp(body)["tpa"] == GUEST_IP

        rx = tg.recv(who_has_guest, timeout=3)
        tg._answer_arp(rx)  # now the kernel sends the datagram it held back
        rx = tg.recv(tg.ip_to_guest(17))
        udp = parse_ipv4(parse_eth(rx.frame)[3])["payload"]
        assert struct.unpack(">H", udp[2:4])[0] == 9 and udp[8:] == b"early"

        # ARP: the kernel answers for its address.
        a = arp_resolve(tg)
        assert a["sha"] == mac_bytes(host_mac)

        # ICMP echo, checksummed by hand.
        data = payload(56, 5)
        tg.send_ip(1, icmp_echo(0x1234, 7, data))
        rx = tg.recv(tg.ip_to_guest(1))
        icmp = parse_ipv4(parse_eth(rx.frame)[3])["payload"]
        assert icmp[0] == 0 and struct.unpack(">HH", icmp[4:8]) == (0x1234, 7) and icmp[8:] == data
        assert inet_csum(icmp) == 0

        # TCP.  A SYN with a wrong checksum and no offload flag is dropped by
        # the kernel; the same SYN with NEEDS_CSUM and the pseudo-header sum
        # in the field (as a guest with CSUM sends it) is answered: the
        # virtio-net header reached the kernel intact.
        is_tcp = tg.ip_to_guest(6)
        mss = struct.pack(">BBH", 2, 4, 1460)
        syn = tcp(GUEST_IP, HOST_IP, 40000, 5001, 1000, flags=TCP_SYN, options=mss)
        wrong = syn[:16] + struct.pack(">H", (struct.unpack(">H", syn[16:18])[0] + 1) & 0xFFFF) + syn[18:]
        tg.send_ip(6, wrong)
        with pytest.raises(TimeoutError):
            tg.recv(is_tcp, timeout=0.3)
        partial = tcp(GUEST_IP, HOST_IP, 40000, 5001, 1000, flags=TCP_SYN, options=mss, partial=True)
        assert partial != syn
        tg.send_ip(6, partial, NetHdr(HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16))
        rx = tg.recv(is_tcp)
        ip = parse_ipv4(parse_eth(rx.frame)[3])
        t = parse_tcp(ip["payload"])
        assert t["flags"] & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK and t["ack"] == 1001 and t["sport"] == 5001
        if rx.hdr.flags & HDR_F_NEEDS_CSUM:  # the kernel left the checksum to us (GUEST_CSUM)
            assert (rx.hdr.csum_start, rx.hdr.csum_offset) == (34, 16)
        done = parse_ipv4(parse_eth(complete_csum(rx.frame, rx.hdr))[3])
        assert done["hdr_ok"] and tcp_csum_ok(HOST_IP, GUEST_IP, done["payload"])
        server_seq = t["seq"] + 1

        # Complete the handshake; the server sends 8000 bytes.  With
        # GUEST_TSO4 the kernel may hand them over as one GSO frame.
        def ack(seq: int, acked: int) -> bytes:
            return tcp(GUEST_IP, HOST_IP, 40000, 5001, seq, acked, TCP_ACK)

        tg.send_ip(6, ack(1001, server_seq))
        stream, have, gso_frames = bytearray(8000), set(), 0
        while len(have) < 8000:  # by offset: a retransmission (slow machine) may cut it differently
            rx = tg.recv(is_tcp)
            seg = parse_ipv4(parse_eth(rx.frame)[3])["payload"]
            t = parse_tcp(seg)
            body = seg[t["doff"] :]
            off = (t["seq"] - server_seq) & 0xFFFFFFFF
            if body and off + len(body) <= 8000:
                stream[off : off + len(body)] = body
                have.update(range(off, off + len(body)))
            assert tcp_csum_ok(HOST_IP, GUEST_IP, parse_ipv4(parse_eth(complete_csum(rx.frame, rx.hdr))[3])["payload"])
            if len(rx.frame) > 1514:
                assert rx.hdr.gso_type == GSO_TCPV4 and 0 < rx.hdr.gso_size <= 1460, rx.hdr
                assert rx.nbufs > 1  # 1536-byte buffers, merged
                gso_frames += 1
        assert stream == bytes(i * 13 & 255 for i in range(8000))
        # The kernel sends its first flight (cwnd 10 x MSS 1460 > 8000 bytes)
        # as TSO super-frames when the guest took GUEST_TSO4.
        assert gso_frames >= 1

        # Our 20000 bytes in one TSO frame (HOST_TSO4): the kernel takes it
        # as it is, the listener receives every byte.
        data = payload(20000, 3)
        seg = tcp(GUEST_IP, HOST_IP, 40000, 5001, 1001, server_seq + 8000, TCP_ACK | PSH, payload=data,
                  partial=True)
        tg.send_ip(6, seg, NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16), ident=2)
        line = listener.stdout.readline().split()
        assert line == ["20000", hashlib.md5(data).hexdigest()], line
        tg.send_ip(6, tcp(GUEST_IP, HOST_IP, 40000, 5001, 21001, 0, TCP_RST), ident=3)
        st = vd.stats("t0")[0]
        assert st["tx_dropped"] == st["tx_bad"] == 0 and st["rx_frames"] >= 4
        g.close()
    finally:
        listener.kill()
        listener.wait()


def ethtool_features(ns: Netns, ifname: str) -> dict[str, bool]:
    out = ns.run("ethtool", "-k", ifname).stdout
    return {m.group(1): m.group(2) == "on" for m in re.finditer(r"^\s*([\w-]+): (on|off)", out, re.M)}


def test_tap_offloads_follow_the_acked_features(netns, net_vhostd):  # netns first: torn down after the daemon
    vd = tap_daemon(net_vhostd, netns)
    have_ethtool = netns.run("sh", "-c", "command -v ethtool", check=False).returncode == 0
    mapping = {F_GUEST_CSUM: "tx-checksum-ip-generic", F_GUEST_TSO4: "tx-tcp-segmentation",
               F_GUEST_TSO6: "tx-tcp6-segmentation", F_GUEST_ECN: "tx-tcp-ecn-segmentation"}
    offload_bits = bit(F_GUEST_CSUM) | bit(F_GUEST_TSO4) | bit(F_GUEST_TSO6) | bit(F_GUEST_ECN) | bit(F_GUEST_UFO)
    variants = [ALL, ALL & ~(offload_bits & ~bit(F_GUEST_CSUM)), ALL & ~offload_bits, ALL]
    netns.run("ip", "addr", "add", f"{HOST_IP}/24", "dev", "vtap0")
    for i, mask in enumerate(variants):
        g, d = connect(vd, "t0", features=mask)
        acked = g.features
        if have_ethtool:
            feats = ethtool_features(netns, "vtap0")
            for f, name in mapping.items():
                assert feats[name] == bool(acked & bit(f)), (name, hex(acked), feats)
        d.post_rx(16)
        tg = TapGuest(d)
        if i == 0:
            # A header the kernel refuses (checksum start past the frame's end):
            # the TAP write fails, the frame is counted, the queue goes on.
            bad = eth(BROADCAST, tg.mac, ETH_P_IP, ipv4(GUEST_IP, HOST_IP, 17, b"\0" * 20))
            assert d.send(bad, NetHdr(HDR_F_NEEDS_CSUM, csum_start=5000, csum_offset=6)) == 0
            assert vd.counter("t0", "tx_dropped") == 1
        arp_resolve(tg)  # every session, whatever it took, has a working TAP
        g.close()
    assert vd.counter("t0", "tx_dropped") == 1
    if not have_ethtool:
        print("SKIP: ethtool is not installed: the TAP offload flags were not checked")
        pytest.skip("ethtool is not installed: the TAP offload flags were not checked")


def udp_flows_to_guest(netns: Netns, d: NetDriver, flows: int = 32) -> list[int]:
    """Send one datagram from each of `flows` source ports in the namespace
    to the guest; return how many arrived on each rx pair."""
    netns.run(sys.executable, "-c", textwrap.dedent(f"""
        import socket
        for p in range({flows}):
            s = socket.socket(2, 2); s.bind(("{HOST_IP}", 30000 + p)); s.sendto(b"flow", ("{GUEST_IP}", 9)); s.close()
    """))
    per_pair = [0] * d.pairs

    def is_flow(frame: bytes) -> bool:
        _, _, et, body = parse_eth(frame)
        return et == ETH_P_IP and parse_ipv4(body)["proto"] == 17 and parse_ipv4(body)["payload"][8:] == b"flow"

    for _ in range(flows):
        rx = d.recv_match(is_flow, qp=tuple(range(d.pairs)), timeout=3)
        per_pair[rx.qp] += 1
    return per_pair


def test_tap_multiqueue(netns, net_vhostd):
    vd = tap_daemon(net_vhostd, netns, tap="vtapmq", queues=2, mtu=9000)
    assert "UP" in tap_flags(netns, "vtapmq")
    assert "mtu 9000" in netns.run("ip", "-o", "link", "show", "vtapmq").stdout
    g = Guest(vd, "t0")
    g.fe.request(Request.NET_SET_MTU, pack_u64(4000), ack=True)  # the TAP follows the front-end's MTU
    assert "mtu 4000" in netns.run("ip", "-o", "link", "show", "vtapmq").stdout
    assert struct.unpack("<H", g.fe.get_config(10, 2))[0] == 4000
    g.close()
    queues = netns.run("ls", "/sys/class/net/vtapmq/queues").stdout.split()
    assert {"tx-0", "tx-1", "rx-0", "rx-1"} <= set(queues), queues
    netns.run("ip", "addr", "add", f"{HOST_IP}/24", "dev", "vtapmq")
    netns.run("ip", "neigh", "replace", GUEST_IP, "lladdr", GUEST_MAC, "dev", "vtapmq", "nud", "permanent")
    g, d = connect(vd, "t0", pairs=2)
    assert g.fe.get_queue_num() == 2
    assert d.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == NET_OK
    for qp in (0, 1):
        d.post_rx(32, qp=qp)
    tg = TapGuest(d)
    for qp in (1, 0):  # each pair's tx goes into its own TAP queue
        arp_resolve(tg, qp=qp)
    st = vd.stats("t0")
    assert st[0]["tx_frames"] >= 1 and st[1]["tx_frames"] >= 1
    # Both pairs in use: the kernel spreads 32 flows over both TAP queues.
    spread = udp_flows_to_guest(netns, d)
    assert sum(spread) == 32 and min(spread) > 0, spread
    # The driver goes down to one pair: every flow reaches pair 0, none is
    # stranded in the TAP queue of the unused pair.
    assert d.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 1)) == NET_OK
    assert udp_flows_to_guest(netns, d) == [32, 0]
    g.close()
    # A front-end that keeps the control queue to itself (QEMU) disables the
    # unused pair's vrings instead.
    g, d = connect(vd, "t0", pairs=2, ctrl=False)
    for qp in (0, 1):
        d.post_rx(32, qp=qp)
    assert sum(udp_flows_to_guest(netns, d)) == 32
    g.fe.set_vring_enable(2, False)
    g.fe.set_vring_enable(3, False)
    assert udp_flows_to_guest(netns, d) == [32, 0]
    g.fe.set_vring_enable(2, True)
    g.fe.set_vring_enable(3, True)
    assert min(udp_flows_to_guest(netns, d)) > 0
    g.close()
