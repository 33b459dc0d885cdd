"""Proves the vhost-user-net test harness (tests/net/, QemuGuest nics=) against
DPDK's own vhost-user implementations, so that failures of vhostd's net tests
can be blamed on vhostd rather than on the harness:

* testpmd virtio-user (front-end) <-> testpmd net_vhost (back-end): exact counts;
* a QEMU Linux guest whose virtio-net NIC is served by testpmd's net_vhost;
* two guests switched by one testpmd (io forwarding port 0 <-> port 1);
* a guest reaching a TAP in a network namespace through testpmd;
* the namespace / TAP / veth helpers on their own.

Frame sizes: testpmd's generated frames are --txpkts bytes (default 64)
including the Ethernet header, without FCS; DPDK byte counters and Linux
interface byte counters count the same bytes (no virtio-net header).
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import time

import pytest

from guest.qemu import NetNic
from net.netns import NetNs, cleanup_stale, list_netns
from net.testpmd import (
    TapPort, Testpmd, VhostPort, VirtioUserPort, parse_forward_stats, parse_port_stats,
)

SHOW_PORT_STATS = """testpmd> show port stats all

  ######################## NIC statistics for port 0  ########################
  RX-packets: 128        RX-missed: 1          RX-bytes:  8192
  RX-errors: 2
  RX-nombuf:  3
  TX-packets: 127        TX-errors: 4          TX-bytes:  8128

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################

  ######################## NIC statistics for port 1  ########################
  RX-packets: 5          RX-missed: 0          RX-bytes:  434
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 6          TX-errors: 0          TX-bytes:  500

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
"""

STOP_OUTPUT = """Telling cores to stop...
Waiting for lcores to finish...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 3200           RX-dropped: 0             RX-total: 3200
  TX-packets: 256            TX-dropped: 2944          TX-total: 3200
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 3200           RX-dropped: 0             RX-total: 3200
  TX-packets: 256            TX-dropped: 2944          TX-total: 3200
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.
"""


def _elapsed(t0: float, what: str) -> None:
    print(f"{what}: {time.monotonic() - t0:.1f}s")


# ----------------------------------------------------------------------------- parsers

def test_stats_parsers():
    s = parse_port_stats(SHOW_PORT_STATS)
    assert sorted(s) == [0, 1]
    p0 = s[0]
    assert (p0.rx_packets, p0.rx_missed, p0.rx_bytes, p0.rx_errors, p0.rx_nombuf) == (128, 1, 8192, 2, 3)
    assert (p0.tx_packets, p0.tx_errors, p0.tx_bytes) == (127, 4, 8128)
    assert s[1].rx_bytes == 434 and s[1].tx_packets == 6
    # The periodic (--stats-period) output clears the screen first.
    periodic = "\x1b[2J\x1b[1;1H\nPort statistics ====================================\n" + SHOW_PORT_STATS
    assert parse_port_stats(periodic) == s
    f = parse_forward_stats(STOP_OUTPUT)
    assert list(f) == [0]  # the accumulated block is not a port
    assert (f[0].rx_packets, f[0].tx_packets, f[0].tx_dropped, f[0].tx_total) == (3200, 256, 2944, 3200)


def test_testpmd_command_line(tmp_path):
    tp = Testpmd([VhostPort("/s/a.sock", queues=2), VirtioUserPort("/s/b.sock", server=True, mac="02:00:00:00:00:09"),
                  TapPort("tap7")],
                 forward_mode="txonly", txpkts=128, burst=8, cpu=1, taskset=True, netns="ns1",
                 eth_peers={0: "02:00:00:00:00:01"}, workdir=tmp_path, name="x")
    cmd = tp.command()
    assert cmd[:8] == ["ip", "netns", "exec", "ns1", "taskset", "-c", "1", "stdbuf"]
    joined = " ".join(cmd)
    for part in ["--lcores 0@1,1@1", "--no-huge", "--no-pci", f"--file-prefix=vhostd-test-{os.getpid()}-",
                 "--vdev net_vhost0,iface=/s/a.sock,queues=2",
                 "--vdev net_virtio_user1,path=/s/b.sock,queues=1,server=1,mac=02:00:00:00:00:09",
                 "--vdev net_tap2,iface=tap7", "-- --forward-mode=txonly", "--rxq=2 --txq=2", " -i",
                 "--txpkts=128", "--burst=8", "--eth-peer=0,02:00:00:00:00:01"]:
        assert part in joined, part
    with pytest.raises(ValueError):
        Testpmd([], forward_mode="bogus")


# ----------------------------------------------------------------------------- netns helpers

def test_netns_veth_between_namespaces(netns):
    t0 = time.monotonic()
    a, b = netns(), netns()
    assert a.name != b.name and {a.name, b.name} <= set(list_netns())
    a.add_veth("va", peer="vb", peer_ns=b, addr="10.9.1.1/24", peer_addr="10.9.1.2/24",
               mac="02:00:00:09:01:01", peer_mac="02:00:00:09:01:02")
    assert a.mac("va") == "02:00:00:09:01:01" and b.mac("vb") == "02:00:00:09:01:02"
    a.ping("10.9.1.2", count=2)
    # IPv6 is off: exactly ARP request+reply and two echo requests+replies.
    sa, sb = a.stats("va"), b.stats("vb")
    assert sa["tx_packets"] == sb["rx_packets"] == 3
    assert sb["tx_packets"] == sa["rx_packets"] == 3
    # The host namespace never saw the devices.
    assert not os.path.exists("/sys/class/net/va") and not os.path.exists("/sys/class/net/vb")
    a.delete()
    assert a.name not in list_netns()
    # The veth peer goes with a, but asynchronously (the kernel dismantles a
    # namespace in a workqueue): it can linger for a moment.
    deadline = time.monotonic() + 10
    while b.run(["ls", "/sys/class/net"]).stdout.split() != ["lo"]:
        assert time.monotonic() < deadline, "veth peer still there 10 s after its namespace was deleted"
        time.sleep(0.05)
    _elapsed(t0, "veth test")


def test_netns_tap_capture_and_inject(netns):
    ns = netns()
    ns.add_tap("tap0", addr="10.9.2.1/24", mac="02:00:00:09:02:01")
    fd = ns.open_tap("tap0")
    try:
        assert ns.read_sys("tap0", "carrier") == "1"  # a TAP has carrier while an fd is attached
        pinger = ns.ping("10.9.2.2", wait=5, background=True)
        # The ping first asks who has 10.9.2.2: read that ARP request from the TAP.
        assert select.select([fd], [], [], 5)[0], "no frame from the TAP"
        frame = os.read(fd, 2048)
        dst, src, ethertype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
        assert ethertype == 0x0806 and dst == b"\xff" * 6 and src == bytes.fromhex("020000090201")
        assert frame[20:22] == b"\x00\x01" and frame[38:42] == bytes([10, 9, 2, 2])
        # Inject the ARP reply: the namespace's stack learns the neighbour and
        # the echo request follows, addressed to the MAC we made up.
        peer = bytes.fromhex("020000090202")
        reply = (src + peer + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x02"
                 + peer + bytes([10, 9, 2, 2]) + src + bytes([10, 9, 2, 1]))
        os.write(fd, reply)
        assert select.select([fd], [], [], 5)[0], "no echo request after the ARP reply"
        frame = os.read(fd, 2048)
        assert frame[:6] == peer and frame[12:14] == b"\x08\x00" and frame[23] == 1  # IPv4, ICMP
        pinger.kill()
        pinger.wait()
        assert "02:00:00:09:02:02" in ns.ip("neigh", "show", "dev", "tap0").stdout
        assert ns.stats("tap0")["rx_packets"] == 1  # the injected reply
    finally:
        os.close(fd)


def test_netns_cleanup_is_robust():
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    ns = NetNs()
    ns.add_tap("tapx")
    sleeper = ns.popen(["sleep", "60"])  # a process inside keeps a namespace alive
    # `ip netns exec` enters the namespace after it starts: wait until it is inside.
    deadline = time.monotonic() + 5
    while str(sleeper.pid) not in subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True,
                                                 text=True).stdout.split():
        assert time.monotonic() < deadline, "the sleeper never entered the namespace"
        time.sleep(0.01)
    ns.delete()
    assert sleeper.wait(5) != 0
    assert ns.name not in list_netns()
    ns.delete()  # idempotent
    # A namespace left behind by a test process that died is collected.
    dead_pid = 4194304 + 1  # above the kernel's pid_max limit: never a live process
    stale = NetNs(f"vht-{dead_pid}-0")
    assert stale.name in list_netns()
    assert stale.name in cleanup_stale()
    assert stale.name not in list_netns()
    stale.created = False
    with pytest.raises(RuntimeError), NetNs() as inner:
        name = inner.name
        raise RuntimeError("test failure inside")
    assert name not in list_netns()


# ----------------------------------------------------------------------------- (a) testpmd <-> testpmd

@pytest.mark.dpdk
def test_virtio_user_to_vhost_exact_round_trip(testpmd, sock_dir):
    """virtio-user sends exactly 4 bursts x 32 frames of 64 bytes; net_vhost
    swaps the MACs and sends each back; every counter on both sides is 128."""
    t0 = time.monotonic()
    sock = sock_dir / "rt.sock"
    be = testpmd([VhostPort(sock)], forward_mode="macswap", auto_start=True)
    fe = testpmd([VirtioUserPort(sock, mac="02:00:00:00:0a:01")], forward_mode="rxonly", burst=32, txpkts=64)
    fe.wait_link(0)
    be.wait_link(0)
    assert be.mac(0) == "56:48:4f:53:54:00"
    assert fe.mac(0) == "02:00:00:00:0a:01"
    _elapsed(t0, "both testpmd up, links up")
    # Within one ring (256): all frames of tx_first fit before the front-end
    # starts draining its rx ring, so nothing can be dropped anywhere.
    fe.start_forwarding(tx_first=4)
    fe.wait_rx(128, timeout=10)
    time.sleep(0.2)  # anything extra would show up now
    f, b = fe.stop(), be.stop()
    assert f.returncode == 0 and b.returncode == 0
    for s in (f[0], b[0]):
        assert (s.rx_packets, s.tx_packets) == (128, 128), s
        assert (s.rx_bytes, s.tx_bytes) == (128 * 64, 128 * 64), s
        assert s.rx_missed == s.rx_errors == s.tx_errors == 0, s
    assert f.forward[0].tx_dropped == b.forward[0].tx_dropped == 0
    _elapsed(t0, "round trip test")


@pytest.mark.dpdk
def test_virtio_user_to_vhost_one_way_bulk(testpmd, sock_dir):
    """3200 frames of 128 bytes one way: what the front-end's PMD transmitted is
    exactly what the back-end's PMD received."""
    t0 = time.monotonic()
    sock = sock_dir / "bulk.sock"
    be = testpmd([VhostPort(sock)], forward_mode="rxonly", auto_start=True)
    fe = testpmd([VirtioUserPort(sock)], forward_mode="io", txpkts=128)
    fe.wait_link(0)
    be.wait_link(0)
    fe.start_forwarding(tx_first=100)
    fe.wait_stats(lambda s: s[0].tx_packets > 0)
    sent = fe.stop()
    be.wait_stats(lambda s: s[0].rx_packets >= sent[0].tx_packets, timeout=10)
    got = be.stop()
    fwd = sent.forward[0]
    assert fwd.tx_packets + fwd.tx_dropped == 3200  # frames generated
    assert sent[0].tx_packets == fwd.tx_packets > 0
    assert got[0].rx_packets == sent[0].tx_packets
    assert got[0].rx_bytes == sent[0].tx_bytes == 128 * sent[0].tx_packets
    print(f"sent {sent[0].tx_packets}, dropped at the front-end {fwd.tx_dropped}")
    _elapsed(t0, "bulk test")


@pytest.mark.dpdk
def test_virtio_user_to_vhost_multiqueue(testpmd, sock_dir):
    t0 = time.monotonic()
    sock = sock_dir / "mq.sock"
    be = testpmd([VhostPort(sock, queues=2)], forward_mode="macswap", auto_start=True)
    fe = testpmd([VirtioUserPort(sock, queues=2)], forward_mode="rxonly")
    fe.wait_link(0)
    be.wait_link(0)
    assert be.port_info(0)["Current number of RX queues"] == "2"
    fe.start_forwarding(tx_first=2)  # 2 bursts of 32 on each of the 2 queues
    fe.wait_rx(128)
    time.sleep(0.2)
    f, b = fe.stop(), be.stop()
    assert f[0].tx_packets == b[0].rx_packets == b[0].tx_packets == f[0].rx_packets == 128
    _elapsed(t0, "multiqueue test")


@pytest.mark.dpdk
def test_noninteractive_forwarding(testpmd, sock_dir):
    """--auto-start --stats-period mode: periodic stats parse, SIGINT stop returns
    the forward stats (the only exact counters in this mode)."""
    t0 = time.monotonic()
    sock = sock_dir / "ni.sock"
    be = testpmd([VhostPort(sock)], forward_mode="macswap", interactive=False, stats_period=1)
    fe = testpmd([VirtioUserPort(sock)], forward_mode="io", interactive=False, tx_first=True, stats_period=1)
    s = fe.wait_stats(lambda s: s[0].rx_packets >= 10000, timeout=15)
    assert s[0].tx_packets >= s[0].rx_packets
    f, b = fe.stop(), be.stop()
    assert f.returncode == 0 and b.returncode == 0
    # Frames in flight when the two stopped are the only difference.
    assert 0 <= f.forward[0].tx_packets - b.forward[0].rx_packets <= 32 * 2 + 256
    assert b.forward[0].rx_packets >= 10000
    print(f"frames round-tripped: {f.forward[0].rx_packets}")
    _elapsed(t0, "non-interactive test")


# ----------------------------------------------------------------------------- (b) guest <-> testpmd

@pytest.mark.qemu
@pytest.mark.dpdk
def test_guest_pings_testpmd_icmpecho(qemu_guest, testpmd, sock_dir):
    """testpmd's icmpecho mode answers ARP and ICMP echo: the guest's ping works,
    and each side counts exactly what the other sent (1 ARP + 3 echoes)."""
    t0 = time.monotonic()
    sock = sock_dir / "icmp.sock"
    be = testpmd([VhostPort(sock)], forward_mode="icmpecho", auto_start=True)
    g = qemu_guest("""
. /etc/vhostd-net.sh
echo "VHOSTD-RESULT mac=$(cat /sys/class/net/eth0/address)"
echo "VHOSTD-RESULT driver=$(basename $(readlink /sys/class/net/eth0/device/driver))"
net_up eth0 10.0.0.1/24 || exit 1
ping -c 3 -i 0.2 -W 2 10.0.0.2 || exit 2
echo "VHOSTD-RESULT neigh=$(arp -an | grep 10.0.0.2)"
net_stats eth0
""", nics=[NetNic(sock)])
    assert g.run(timeout=60) == 0, g.console_tail()
    res = g.results()
    assert res["mac"] == g.macs[0] and res["driver"] == "virtio_net"
    assert "56:48:4f:53:54:00" in res["neigh"]  # testpmd answered ARP with its port MAC
    st = be.stop()[0]
    assert int(res["eth0_tx_packets"]) == st.rx_packets == 4
    assert int(res["eth0_rx_packets"]) == st.tx_packets == 4
    assert int(res["eth0_tx_bytes"]) == st.rx_bytes == 42 + 3 * 98
    assert int(res["eth0_rx_bytes"]) == st.tx_bytes
    _elapsed(t0, "icmpecho guest test")


@pytest.mark.qemu
@pytest.mark.dpdk
def test_guest_frames_counted_by_macswap(qemu_guest, testpmd, sock_dir):
    """Only the frames the script sends leave the guest (IPv6 off, static ARP):
    3 echo requests, reflected by macswap, are 3 frames at every counter."""
    t0 = time.monotonic()
    sock = sock_dir / "swap.sock"
    be = testpmd([VhostPort(sock)], forward_mode="macswap", auto_start=True)
    g = qemu_guest("""
. /etc/vhostd-net.sh
net_up eth0 10.0.0.1/24 || exit 1
arp -s 10.0.0.2 02:00:00:00:00:02
ping -c 3 -i 0.2 -W 1 10.0.0.2   # the reflected requests are not for us: no replies
net_stats eth0
""", nics=[NetNic(sock)])
    assert g.run(timeout=60) == 0, g.console_tail()
    res = g.results()
    final = be.stop()
    st = final[0]
    assert int(res["eth0_tx_packets"]) == st.rx_packets == 3
    assert int(res["eth0_rx_packets"]) == st.tx_packets == 3
    assert int(res["eth0_tx_bytes"]) == st.rx_bytes == 3 * 98
    assert final.forward[0].tx_dropped == 0
    _elapsed(t0, "macswap guest test")


# ----------------------------------------------------------------------------- (c) two guests

@pytest.mark.qemu
@pytest.mark.dpdk
def test_two_guests_ping_through_testpmd_io(qemu_guest, testpmd, sock_dir):
    """testpmd io-forwards port 0 <-> port 1 (paired topology), i.e. a wire
    between two guests: they ping each other; nothing is lost or made up."""
    t0 = time.monotonic()
    s0, s1 = sock_dir / "wire0.sock", sock_dir / "wire1.sock"
    sw = testpmd([VhostPort(s0), VhostPort(s1)], forward_mode="io", auto_start=True)

    def script(me: int, peer: int) -> str:
        return f"""
. /etc/vhostd-net.sh
net_up eth0 10.0.0.{me}/24 || exit 1
net_ping_until 10.0.0.{peer} 40 || exit 2     # the peer may still be booting
ping -c 3 -i 0.2 -W 2 10.0.0.{peer} || exit 3
# Stay up until the peer has pinged us too (1 + 3 echo requests at least).
n=0
while [ "$(net_icmp_in_echos)" -lt 4 ]; do
    n=$((n + 1)); [ $n -lt 400 ] || exit 4
    usleep 100000
done
echo "VHOSTD-RESULT peer_mac=$(arp -an | grep '(10.0.0.{peer})' | awk '{{print $4}}')"
net_stats eth0
"""
    a = qemu_guest(script(1, 2), nics=[NetNic(s0)])
    b = qemu_guest(script(2, 1), nics=[NetNic(s1)])
    assert a.macs[0] != b.macs[0]
    a.start()
    b.start()
    assert a.wait(timeout=90) == 0, a.console_tail()
    assert b.wait(timeout=90) == 0, b.console_tail()
    ra, rb = a.results(), b.results()
    assert ra["peer_mac"] == b.macs[0] and rb["peer_mac"] == a.macs[0]
    st = sw.stop()
    fwd = st.forward
    # guest A -> port 0 -> port 1 -> guest B, and back.  What one guest sent
    # before the other one's driver was ready is dropped by net_vhost's tx
    # (counted only by the forward engine, not in the PMD's tx_errors).
    assert int(ra["eth0_tx_packets"]) == st[0].rx_packets == st[1].tx_packets + fwd[1].tx_dropped
    assert st[1].tx_packets == int(rb["eth0_rx_packets"])
    assert int(rb["eth0_tx_packets"]) == st[1].rx_packets == st[0].tx_packets + fwd[0].tx_dropped
    assert st[0].tx_packets == int(ra["eth0_rx_packets"])
    assert st[0].tx_errors == st[1].tx_errors == 0
    print(f"dropped while the peer was not ready: {fwd[0].tx_dropped} + {fwd[1].tx_dropped}")
    _elapsed(t0, "two guests test")


# ----------------------------------------------------------------------------- (d) guest <-> netns TAP

@pytest.mark.qemu
@pytest.mark.dpdk
def test_guest_pings_netns_tap_through_testpmd(qemu_guest, testpmd, netns, sock_dir):
    """Guest <-> testpmd (net_vhost port 0 <-> net_tap port 1, io) <-> a TAP in a
    network namespace: the path a vhost-user-net back-end with a TAP provides."""
    t0 = time.monotonic()
    ns = netns()
    sock = sock_dir / "tap.sock"
    br = testpmd([VhostPort(sock), TapPort("vtap0", mac="02:00:00:00:0b:02")], forward_mode="io",
                 auto_start=True, netns=ns.name)
    ns.add_addr("vtap0", "10.0.0.2/24")
    ns.link_up("vtap0")
    g = qemu_guest("""
. /etc/vhostd-net.sh
net_up eth0 10.0.0.1/24 || exit 1
net_ping_until 10.0.0.2 20 || exit 2
ping -c 3 -i 0.2 -W 2 10.0.0.2 || exit 3
echo GUEST-PINGED
n=0
while [ "$(net_icmp_in_echos)" -lt 2 ]; do   # the namespace pings back
    n=$((n + 1)); [ $n -lt 300 ] || exit 4
    usleep 100000
done
net_stats eth0
""", nics=[NetNic(sock)])
    g.start()
    g.wait_for("GUEST-PINGED", timeout=60)
    ns.ping("10.0.0.1", count=2)
    assert g.wait(timeout=30) == 0, g.console_tail()
    res = g.results()
    tap = ns.stats("vtap0")
    assert ns.mac("vtap0") == "02:00:00:00:0b:02"
    st = br.stop()  # net_tap deletes the TAP when testpmd closes the port
    assert int(res["eth0_tx_packets"]) == st[0].rx_packets == st[1].tx_packets == tap["rx_packets"]
    assert int(res["eth0_rx_packets"]) == st[0].tx_packets == st[1].rx_packets == tap["tx_packets"]
    _elapsed(t0, "guest-netns test")


# ----------------------------------------------------------------------------- back-end restart

@pytest.mark.qemu
@pytest.mark.dpdk
def test_backend_restart_with_reconnect(qemu_guest, testpmd, sock_dir):
    """The back-end dies (SIGKILL) and comes back on the same socket: with
    chardev reconnect=1 QEMU reconnects, the guest sees carrier go down and up,
    and traffic flows again through the new back-end."""
    t0 = time.monotonic()
    sock = sock_dir / "restart.sock"
    be = testpmd([VhostPort(sock)], forward_mode="icmpecho", auto_start=True)
    g = qemu_guest("""
. /etc/vhostd-net.sh
net_up eth0 10.0.0.1/24 || exit 1
ping -c 2 -i 0.2 -W 2 10.0.0.2 || exit 2
echo PHASE1-OK
n=0
while [ "$(cat /sys/class/net/eth0/carrier)" = 1 ]; do
    n=$((n + 1)); [ $n -lt 600 ] || exit 3
    usleep 50000
done
echo CARRIER-LOST
net_wait_carrier eth0 30 || exit 4
echo CARRIER-BACK
net_ping_until 10.0.0.2 20 || exit 5
ping -c 2 -i 0.2 -W 2 10.0.0.2 || exit 6
""", nics=[NetNic(sock, reconnect=1)])
    g.start()
    g.wait_for("PHASE1-OK", timeout=60)
    be.kill()
    g.wait_for("CARRIER-LOST", timeout=20)
    be2 = testpmd([VhostPort(sock)], forward_mode="icmpecho", auto_start=True)
    g.wait_for("CARRIER-BACK", timeout=30)
    assert g.wait(timeout=60) == 0, g.console_tail()
    st = be2.stop()[0]
    assert st.rx_packets >= 3 and st.tx_packets == st.rx_packets  # every frame answered
    _elapsed(t0, "restart test")
