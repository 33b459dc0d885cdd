"""End to end: Linux guests under QEMU (TCG) on vhostd's virtio-net.

* two guests on one vhostd switch: ping, and a TCP transfer each way whose
  checksum matches on both ends, with offloads negotiated;
* a guest on a TAP that vhostd creates inside a network namespace the test
  makes: ping from both sides and TCP both ways with the namespace's kernel,
  on split and on packed virtqueues (QEMU's packed=on).
"""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from daemon import DaemonProcess
from guest.qemu import NetNic
from guest.scripts import VIRTIO_ID_NET, virtio_features
from net.netns import NetNs, netns_available
from vhostd.virtio import F_RING_PACKED

pytestmark = pytest.mark.qemu

MiB = 1 << 20
RECV = "#!/bin/sh\ncat > /recv\n"
SEND = "#!/bin/sh\ncat /payload\n"

# virtio-net feature bits the guest should take when vhostd offers offloads
GUEST_CSUM, GUEST_TSO4, HOST_TSO4, MRG_RXBUF = 1, 7, 11, 15


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def peer_script(me: str, peer: str) -> str:
    return f"""
set -e
. /etc/vhostd-net.sh
net_up eth0 {me}/24
nc -l -p 5000 -e /recv.sh &
listener=$!
net_ping_until {peer}
ping -c 3 -W 2 {peer} > /dev/null && echo "VHOSTD-RESULT ping=ok"
n=0
until nc -w 2 {peer} 5000 -e /send.sh; do n=$((n + 1)); [ $n -lt 30 ] || exit 1; sleep 1; done
wait $listener
echo "VHOSTD-RESULT recv=$(md5sum /recv | cut -d' ' -f1)"
{virtio_features(VIRTIO_ID_NET)}
"""


def test_two_guests_on_a_vhostd_switch(tmp_path, qemu_guest):
    sock = tmp_path / "s"
    sock.mkdir()
    vd = DaemonProcess(tmp_path, [
        {"name": "p0", "type": "net", "socket": str(sock / "p0.sock"), "backend": "switch", "switch": "lan0"},
        {"name": "p1", "type": "net", "socket": str(sock / "p1.sock"), "backend": "switch", "switch": "lan0"},
    ]).start()
    try:
        payloads = [os.urandom(4 * MiB), os.urandom(4 * MiB)]
        guests = []
        for i, (me, peer) in enumerate((("10.77.0.1", "10.77.0.2"), ("10.77.0.2", "10.77.0.1"))):
            g = qemu_guest(peer_script(me, peer), nics=[NetNic(sock / f"p{i}.sock")], timeout=120,
                           files={"payload": payloads[i], "recv.sh": RECV, "send.sh": SEND})
            guests.append(g.start())
        for g in guests:
            assert g.wait() == 0, g.console_tail()
        for i, g in enumerate(guests):
            res = g.results()
            assert res["ping"] == "ok"
            assert res["recv"] == md5(payloads[1 - i]), "TCP payload corrupted between the guests"
            bits = res["features"]
            for b in (GUEST_CSUM, GUEST_TSO4, HOST_TSO4, MRG_RXBUF):
                assert bits[b] == "1", f"feature bit {b} not negotiated: {bits}"
        assert "NEEDS_RESET" not in vd.log()
    finally:
        assert vd.stop() == 0, vd.log()


def _recv_all(conn: socket.socket) -> bytes:
    chunks = []
    while data := conn.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_guest_on_tap_in_a_network_namespace(tmp_path, qemu_guest, packed):
    ok, why = netns_available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")
    sock = tmp_path / "t.sock"
    with NetNs() as ns:
        vd = DaemonProcess(tmp_path, [
            {"name": "t0", "type": "net", "socket": str(sock), "backend": "tap", "tap": "vtap0"},
        ], prefix=ns.wrap([])).start()
        try:
            # vhostd created the TAP in the namespace and brought it up.
            assert "UP" in ns.ip("link", "show", "vtap0").stdout
            ns.add_addr("vtap0", "10.78.0.1/24")
            to_guest = os.urandom(3 * MiB)
            from_guest = os.urandom(3 * MiB)
            script = f"""
set -e
. /etc/vhostd-net.sh
net_up eth0 10.78.0.2/24
nc -l -p 5001 -e /recv.sh &
listener=$!
net_ping_until 10.78.0.1
echo VHOSTD-NET-LISTENING
n=0
until nc -w 2 10.78.0.1 5000 -e /send.sh; do n=$((n + 1)); [ $n -lt 30 ] || exit 1; sleep 1; done
wait $listener
echo "VHOSTD-RESULT recv=$(md5sum /recv | cut -d' ' -f1)"
{virtio_features(VIRTIO_ID_NET)}
"""
            g = qemu_guest(script, nics=[NetNic(sock, packed=packed)], timeout=120,
                           files={"payload": from_guest, "recv.sh": RECV, "send.sh": SEND})
            # The namespace's side of the TCP transfers, run inside the namespace.
            server = ns.popen(["python3", "-c", (
                "import socket,hashlib,sys\n"
                "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                "s.bind(('10.78.0.1', 5000)); s.listen(1); c,_=s.accept(); d=b''\n"
                "while (b:=c.recv(65536)): d+=b\n"
                "print(hashlib.md5(d).hexdigest(), len(d))\n")], stdout=__import__("subprocess").PIPE, text=True)
            g.start()
            g.wait_for("VHOSTD-NET-LISTENING", timeout=90)
            ping = ns.run(["busybox", "ping", "-c", "3", "-W", "2", "10.78.0.2"], check=False)
            assert ping.returncode == 0, ping.stdout + ping.stderr
            sender = ns.popen(["python3", "-c", (
                "import socket,sys,time\n"
                "data=sys.stdin.buffer.read()\n"
                "for i in range(30):\n"
                "    try:\n"
                "        c=socket.create_connection(('10.78.0.2', 5001), timeout=5); break\n"
                "    except OSError: time.sleep(1)\n"
                "c.sendall(data); c.close()\n")], stdin=__import__("subprocess").PIPE)
            sender.communicate(to_guest, timeout=90)
            assert sender.returncode == 0
            assert g.wait() == 0, g.console_tail()
            out, _ = server.communicate(timeout=30)
            assert out.split()[0] == md5(from_guest), f"guest -> namespace payload corrupted: {out}"
            res = g.results()
            assert res["recv"] == md5(to_guest), "namespace -> guest payload corrupted"
            bits = res["features"]
            for b in (GUEST_CSUM, GUEST_TSO4, HOST_TSO4):
                assert bits[b] == "1", f"offload bit {b} not negotiated: {bits}"
            assert bits[F_RING_PACKED] == ("1" if packed else "0"), bits
            assert "NEEDS_RESET" not in vd.log()
        finally:
            assert vd.stop() == 0, vd.log()
