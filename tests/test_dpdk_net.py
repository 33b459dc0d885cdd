"""vhostd's virtio-net against DPDK's virtio-user PMD (testpmd): a fast,
independent vhost-user-net front-end that nobody here wrote.

Counts are exact: testpmd in rxonly mode sends `start tx_first N` (N bursts of
32 frames) and then only receives, so every frame sent must arrive once.

The loopback tests run on split and on packed virtqueues (virtio-user's
packed_vq=1); `vhostd status` must show the layout testpmd asked for.
"""

from __future__ import annotations

import pytest

from daemon import DaemonProcess
from net.testpmd import VirtioUserPort
from vhostd.control import request as control

pytestmark = pytest.mark.dpdk

BURST = 32
LAYOUTS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


@pytest.fixture
def vhostd_net(tmp_path):
    started = []

    def start(devices: list[dict]) -> DaemonProcess:
        for d in devices:
            d.setdefault("type", "net")
            d.setdefault("socket", str(tmp_path / f"{d['name']}.sock"))
        vd = DaemonProcess(tmp_path, devices, daemon={"control_socket": "ctl.sock"}).start()
        started.append(vd)
        return vd

    yield start
    for vd in started:
        alive = vd.alive()
        assert vd.stop() == 0 and alive, vd.log()
        assert "Traceback" not in vd.log()


def served_layouts(vd, name: str) -> set[bool]:
    """{True} when vhostd serves every started queue of the device as a packed
    ring, {False} when all are split (what `vhostd status` shows)."""
    devices = control(str(vd.workdir / "ctl.sock"), "status", timeout=5)["devices"]
    queues = next(d for d in devices if d["name"] == name)["queues"]
    return {q["packed"] for q in queues if q["started"]}


def send_bursts(tp, bursts: int) -> None:
    tp.clear_stats()
    tp.start_forwarding(tx_first=bursts)


@LAYOUTS
@pytest.mark.parametrize("frame", [64, 1500])
def test_loopback_returns_every_frame(vhostd_net, testpmd, frame, packed):
    vd = vhostd_net([{"name": "l0", "backend": "loopback"}])
    tp = testpmd([VirtioUserPort(vd.socket("l0"), packed=packed)], forward_mode="rxonly", txpkts=frame, burst=BURST)
    tp.wait_link(0)
    sent = 8 * BURST
    send_bursts(tp, 8)
    stats = tp.wait_rx(sent)
    tp.stop_forwarding()
    assert served_layouts(vd, "l0") == {packed}
    final = tp.port_stats()[0]
    assert final.tx_packets == sent
    assert final.rx_packets == sent, "loopback lost or duplicated frames"
    assert final.rx_bytes == final.tx_bytes == sent * frame
    assert stats[0].rx_missed == 0 and final.rx_errors == 0


@LAYOUTS
def test_loopback_io_forwarding_sustained(vhostd_net, testpmd, packed):
    """Frames circulate (io forward: every received frame is sent again) for a
    second; at the end sent - received is at most what is still in flight.
    The rings wrap hundreds of times (packed: the wrap counters flip)."""
    vd = vhostd_net([{"name": "l0", "backend": "loopback"}])
    tp = testpmd([VirtioUserPort(vd.socket("l0"), packed=packed)], forward_mode="io", burst=BURST)
    tp.wait_link(0)
    send_bursts(tp, 4)
    stats = tp.wait_rx(200_000, timeout=30)
    tp.stop_forwarding()
    assert served_layouts(vd, "l0") == {packed}
    s = tp.port_stats()[0]
    assert s.rx_packets >= 200_000
    assert 0 <= s.tx_packets - s.rx_packets <= 4 * BURST, (s.tx_packets, s.rx_packets)
    assert stats[0].rx_errors == 0


@pytest.mark.parametrize("a_packed", [False, True], ids=["split", "packed-split"])
@pytest.mark.parametrize("frame", [64, 1500])
def test_switch_between_two_testpmd_ports(vhostd_net, testpmd, frame, a_packed):
    """testpmd A sends to an unknown MAC: the switch floods to B (the only
    other port) and never back to A; B replies are learnt the other way.
    a_packed: A's rings are packed, B's split (frames cross layouts)."""
    vd = vhostd_net([
        {"name": "a", "backend": "switch", "switch": "lan"},
        {"name": "b", "backend": "switch", "switch": "lan"},
    ])
    b = testpmd([VirtioUserPort(vd.socket("b"), mac="02:00:00:00:00:0b")], forward_mode="rxonly", txpkts=frame,
                burst=BURST, eth_peers={0: "02:00:00:00:00:0a"}, name="b")
    a = testpmd([VirtioUserPort(vd.socket("a"), mac="02:00:00:00:00:0a", packed=a_packed)], forward_mode="rxonly",
                txpkts=frame, burst=BURST, eth_peers={0: "02:00:00:00:00:0b"}, name="a")
    a.wait_link(0)
    b.wait_link(0)
    b.clear_stats()
    b.start_forwarding()  # rxonly: B polls its rx queue
    sent = send_rounds(a, b)
    assert a.port_stats()[0].tx_packets == sent
    assert b.port_stats()[0].rx_packets == sent, "switch lost frames"
    assert (served_layouts(vd, "a"), served_layouts(vd, "b")) == ({a_packed}, {False})
    assert a.port_stats()[0].rx_packets == 0, "switch sent frames back to their source port"
    # and the other way, now that both MACs are learnt
    b.stop_forwarding()
    a.start_forwarding()
    sent = send_rounds(b, a)
    assert a.port_stats()[0].rx_packets == sent
    assert b.port_stats()[0].rx_packets == 0  # nothing looped back
    a.stop_forwarding()


def send_rounds(src, dst, rounds: int = 8, bursts: int = 4) -> int:
    """A moderate rate: rounds of `bursts` bursts (less than a ring), each
    waited for at the receiver, so the switch never has to drop."""
    src.clear_stats()
    dst.clear_stats()
    for r in range(1, rounds + 1):
        src.start_forwarding(tx_first=bursts)
        dst.wait_rx(r * bursts * BURST)
        src.stop_forwarding()
    return rounds * bursts * BURST


@pytest.mark.parametrize("layouts", [(False,) * 3, (True,) * 3, (True, False, True)],
                         ids=["split", "packed", "packed-split-packed"])
def test_testpmd_disconnects_and_reconnects(vhostd_net, testpmd, layouts):
    """Three testpmd sessions one after the other on one device; each new
    session negotiates its own ring layout."""
    vd = vhostd_net([{"name": "l0", "backend": "loopback"}])
    for round_, packed in enumerate(layouts):
        tp = testpmd([VirtioUserPort(vd.socket("l0"), packed=packed)], forward_mode="rxonly", burst=BURST,
                     name=f"r{round_}")
        tp.wait_link(0)
        send_bursts(tp, 4)
        tp.wait_rx(4 * BURST)
        assert tp.port_stats()[0].rx_packets == 4 * BURST
        assert served_layouts(vd, "l0") == {packed}
        tp.stop()
    assert vd.log().count("l0: front-end connected") == 3
    assert "NEEDS_RESET" not in vd.log()
