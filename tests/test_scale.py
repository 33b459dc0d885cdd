"""One daemon, many devices: they all start and listen, one of them serves
I/O while the others idle, idle devices cost no thread, and SIGTERM stops the
lot.  Functional only: benchmarks/scale.py measures the costs (memory, idle
CPU, start-up time, throughput among idle devices).

TAP devices run inside a network namespace the test makes (root only).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import Guest, Vhostd, blk_roundtrip, wait_until
from daemon import DaemonProcess
from net_driver import BROADCAST, ETH_P_ARP, NetDriver, arp, eth, mac_bytes, parse_arp, parse_eth
from net.netns import netns_available

NBLK, NNET = 64, 64
WORKERS = 2


class ManyVhostd(Vhostd):
    """Vhostd for a mix of blk and net devices, optionally under a command
    prefix (a namespace, a lower open-file limit)."""

    def __init__(self, workdir: Path, sockdir: str, devices: list[dict], daemon: dict | None = None,
                 prefix: list[str] = ()) -> None:
        for d in devices:
            d.setdefault("type", "blk")
            d.setdefault("socket", os.path.join(sockdir, d["name"] + ".sock"))
            if d["type"] == "blk":
                d.setdefault("path", d["name"] + ".img")
                d.setdefault("size", "1M")
        DaemonProcess.__init__(self, workdir, devices, daemon, prefix)

    def threads(self) -> int:
        """vhostd's own threads: io_uring's kernel workers (iou-wrk-*, made
        on demand and gone when idle) are the kernel's, not ours."""
        n = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/comm") as f:
                    n += not f.read().startswith("iou-")
            except FileNotFoundError:
                pass
        return n

    def listening(self) -> set[str]:
        """Socket paths the daemon listens on, from its own network
        namespace's /proc/net/unix (one read for every device; connecting
        would take a device's only session)."""
        found = set()
        with open(f"/proc/{self.pid}/net/unix") as f:
            next(f)
            for line in f:
                parts = line.rstrip("\n").split(None, 7)
                if len(parts) >= 8 and int(parts[3], 16) & 0x10000:
                    found.add(parts[7])
        return found

    def wait_all_listening(self) -> None:
        want = {self.socket(d["name"]) for d in self.devices}
        wait_until(lambda: want <= self.listening(), timeout=30, what="every socket to listen")


@pytest.fixture
def many_vhostd(tmp_path):
    """Factory: start a ManyVhostd; each must stop with status 0 and a clean log."""
    started: list[ManyVhostd] = []
    sockdirs: list[str] = []

    def start(devices: list[dict], daemon: dict | None = None, prefix: list[str] = ()) -> ManyVhostd:
        wd = tmp_path / f"vhostd{len(started)}"
        wd.mkdir()
        sockdirs.append(tempfile.mkdtemp(prefix="vds-", dir="/tmp"))
        vd = ManyVhostd(wd, sockdirs[-1], devices, daemon or {"workers": WORKERS}, prefix)
        started.append(vd)
        return vd.start(timeout=60)

    yield start
    try:
        for vd in started:
            vd.finish()
    finally:
        for d in sockdirs:
            shutil.rmtree(d, ignore_errors=True)


def mixed_devices(nblk: int, nnet: int) -> list[dict]:
    """nblk blk devices, nnet net devices: every fourth on one of two
    switches, the others loopback."""
    devices: list[dict] = [{"name": f"b{i}"} for i in range(nblk)]
    for i in range(nnet):
        if i % 4 == 3:
            devices.append({"name": f"n{i}", "type": "net", "backend": "switch", "switch": f"lan{i % 2}"})
        else:
            devices.append({"name": f"n{i}", "type": "net", "backend": "loopback"})
    return devices


def loopback_roundtrip(vd: ManyVhostd, name: str) -> None:
    g = Guest(vd, name)
    try:
        d = NetDriver(g)
        d.post_rx(8)
        frame = eth(BROADCAST, mac_bytes("52:54:00:00:77:01"), 0x88B5, bytes(range(100)))
        d.send(frame)
        assert d.recv().frame == frame
    finally:
        g.close()


def test_many_devices_start_serve_idle_without_threads_and_stop(many_vhostd):
    small = many_vhostd(mixed_devices(1, 1))
    small.wait_all_listening()
    base_threads = small.threads()
    small.finish()

    vd = many_vhostd(mixed_devices(NBLK, NNET))
    vd.wait_all_listening()
    # Idle devices cost no thread: as many as with one device of each type.
    assert vd.threads() == base_threads

    # One device in the middle serves I/O while the others idle, with no
    # thread of its own either.
    g = vd.connect(f"b{NBLK // 2}")
    drv = g.blk(0)
    for sector in (0, 7, 2040):
        blk_roundtrip(vd, drv, sector, 4096, f"b{NBLK // 2}")
    assert vd.threads() == base_threads
    g.close()
    loopback_roundtrip(vd, f"n{NNET - 2}")
    assert vd.threads() == base_threads

    # SIGTERM stops the daemon (DaemonProcess.stop fails if it takes more
    # than its timeout) and every socket goes away with it.
    assert vd.stop() == 0
    assert not any(os.path.exists(vd.socket(d["name"])) for d in vd.devices)
    assert "Traceback" not in vd.log()


def test_open_file_limit_is_lifted_for_many_devices(many_vhostd):
    """Under the soft limit services usually get, a few hundred devices
    would run out of fds: the daemon lifts it to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 200  # 64 blk (socket, eventfd, image) + 64 net (socket, eventfd) alone need more
    if hard != resource.RLIM_INFINITY and hard < 2 * low:
        pytest.skip(f"the hard open-file limit ({hard}) is too low for this test")
    prefix = ["sh", "-c", f'ulimit -Sn {low} && exec "$@"', "sh"]
    vd = many_vhostd(mixed_devices(NBLK, NNET), prefix=prefix)
    vd.wait_all_listening()
    with open(f"/proc/{vd.pid}/limits") as f:
        line = next(l for l in f if l.startswith("Max open files"))
    assert int(line.split()[3]) > low, line
    g = vd.connect("b0")
    blk_roundtrip(vd, g.blk(0), 1, 4096, "b0")
    g.close()


def test_switch_with_many_idle_ports(many_vhostd):
    """Ports without a driver take no part in a flood but its drop count;
    the connected ones get every frame."""
    ports = [{"name": f"p{i}", "type": "net", "backend": "switch", "switch": "big"} for i in range(48)]
    vd = many_vhostd(ports)
    vd.wait_all_listening()
    a, b = Guest(vd, "p3"), Guest(vd, "p40")
    try:
        da, db = NetDriver(a), NetDriver(b)
        db.post_rx(16)
        da.post_rx(16)
        src = mac_bytes("52:54:00:00:55:03")
        frames = [eth(BROADCAST, src, 0x88B5, bytes([i]) * 80) for i in range(5)]
        frames.append(eth(mac_bytes("52:54:00:00:55:99"), src, 0x88B5, b"unknown unicast".ljust(80, b".")))
        for frame in frames:
            da.send(frame)
        assert [db.recv().frame for _ in frames] == frames
        da.expect_nothing()  # never back out of the port it came from
    finally:
        a.close()
        b.close()
    mark = vd.log_mark()
    os.kill(vd.pid, signal.SIGUSR1)
    line = vd.wait_log(mark, r" p47: stats 0: .*rx_dropped=\d+$")[0]
    assert f"rx_dropped={len(frames)}" in line, line


# ---------------------------------------------------------------------- TAP


GUEST_MAC, HOST_IP, GUEST_IP = "52:54:00:00:66:02", "10.66.0.1", "10.66.0.2"


@pytest.fixture
def tap_ns():
    ok, why = netns_available()
    if not ok:
        pytest.skip(f"network namespaces/TAP unavailable: {why}")
    from net.netns import NetNs

    ns = NetNs()
    yield ns
    ns.delete()


def tap_devices(n: int) -> list[dict]:
    return [{"name": f"t{i}", "type": "net", "backend": "tap", "tap": f"vst{i}", "mac": GUEST_MAC} for i in range(n)]


def arp_with_the_kernel(vd: ManyVhostd, ns, name: str, ifname: str) -> None:
    """The guest asks the kernel for HOST_IP on the TAP and gets the answer:
    frames go both ways through TAP queues served by the workers."""
    ns.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", ifname])
    g = Guest(vd, name)
    try:
        d = NetDriver(g)
        d.post_rx(64)
        mac = mac_bytes(GUEST_MAC)
        d.send(eth(BROADCAST, mac, ETH_P_ARP, arp(1, mac, GUEST_IP, bytes(6), HOST_IP)))

        def is_reply(frame: bytes) -> bool:
            _, _, et, body = parse_eth(frame)
            return et == ETH_P_ARP and parse_arp(body)["op"] == 2

        rx = d.recv_match(is_reply)
        assert parse_arp(parse_eth(rx.frame)[3])["spa"] == HOST_IP
    finally:
        g.close()


def test_tap_devices_take_no_threads(tap_ns, many_vhostd):
    one = many_vhostd(tap_devices(1), prefix=tap_ns.wrap([]))
    one.wait_all_listening()
    base_threads = one.threads()
    one.finish()

    vd = many_vhostd(tap_devices(16), prefix=tap_ns.wrap([]))
    vd.wait_all_listening()
    assert vd.threads() == base_threads  # no thread per TAP
    arp_with_the_kernel(vd, tap_ns, "t9", "vst9")
    assert vd.threads() == base_threads

    # A TAP deleted under the daemon: that device's frames stop, the others' do not.
    g = Guest(vd, "t3")
    d = NetDriver(g)
    d.post_rx(16)
    tap_ns.run(["ip", "link", "del", "vst3"])
    arp_with_the_kernel(vd, tap_ns, "t12", "vst12")
    g.close()
    assert vd.stop() == 0
    # The TAPs the daemon made went away with it.
    assert subprocess.run(tap_ns.wrap(["ip", "link", "show", "vst0"]), capture_output=True).returncode != 0
