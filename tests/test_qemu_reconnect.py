"""Reconnect without loss: a Linux guest under QEMU (chardev reconnect=1)
writes numbered, checksummed blocks while vhostd is killed with SIGKILL and
started again, several times, or stopped and started under socket
activation.  No write the guest saw complete may be lost,
and the guest must see no I/O error."""

from __future__ import annotations

import hashlib
import re

import pytest

from guest.qemu import BlkDisk
from guest.scripts import VIRTIO_ID_BLOCK, virtio_features
from vhostd.virtio import F_RING_PACKED

pytestmark = pytest.mark.qemu

BLOCKS = 160
KILLS = 4


def block(i: int) -> bytes:
    """What the guest writes to block i: a 4 KiB pattern naming i (the guest
    builds the same bytes with yes | head)."""
    line = f"block-{i:04d}\n".encode()
    return (line * (4096 // len(line) + 1))[:4096]


SCRIPT = f"""
i=0
while [ $i -lt {BLOCKS} ]; do
    n=$(printf %04d $i)
    yes block-$n | head -c 4096 > /b
    dd if=/b of=/dev/vda bs=4096 seek=$i conv=fsync 2>/dev/null || echo "WRITE-FAILED $i"
    echo "WROTE $i $(md5sum < /b | cut -c1-32)"
    i=$((i+1))
done
bad=0
i=0
while [ $i -lt {BLOCKS} ]; do
    n=$(printf %04d $i)
    want=$(yes block-$n | head -c 4096 | md5sum | cut -c1-32)
    got=$(dd if=/dev/vda bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | md5sum | cut -c1-32)
    [ "$want" = "$got" ] || {{ echo "BAD $i"; bad=$((bad+1)); }}
    i=$((i+1))
done
echo "VHOSTD-RESULT bad=$bad"
dmesg | grep -i -E "I/O error|blk_update_request|buffer i/o" && echo "VHOSTD-RESULT ioerrors=yes" || echo "VHOSTD-RESULT ioerrors=no"
"""


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_sigkill_and_restart_lose_no_completed_write(vhostd_factory, qemu_guest, packed):
    """packed: QEMU's packed=on; the restarted vhostd resumes the packed ring
    from the inflight area (QEMU keeps no packed ring position to give back
    when the back-end is gone)."""
    vd = vhostd_factory([{"name": "disk0", "size": "8M"}])
    g = qemu_guest(SCRIPT + virtio_features(VIRTIO_ID_BLOCK),
                   disks=[BlkDisk(vd.socket("disk0"), reconnect=1, packed=packed)])
    g.start()
    for k in range(KILLS):
        g.wait_for(re.compile(rf"WROTE {20 + k * 30} "), timeout=240)
        vd.kill()  # SIGKILL: no goodbye to QEMU, requests may be in flight
        vd.proc.wait()
        vd.start()
    check_every_write_landed(vd, g, KILLS + 1, packed)


def test_restarts_under_socket_activation_lose_nothing(vhostd_factory, qemu_guest):
    """An upgrade: vhostd stopped (SIGTERM) and started twice while its
    socket, passed by socket activation, stays bound; QEMU reconnects to
    the same socket at once."""
    vd = vhostd_factory([{"name": "disk0", "size": "8M"}], activate=("disk0",))
    g = qemu_guest(SCRIPT, disks=[BlkDisk(vd.socket("disk0"), reconnect=1)])
    g.start()
    for k in range(2):
        g.wait_for(re.compile(rf"WROTE {30 + k * 50} "), timeout=240)
        assert vd.stop() == 0
        vd.start()
    check_every_write_landed(vd, g, 3)
    assert vd.log().count("(passed by socket activation)") == 3


def check_every_write_landed(vd, g, sessions: int, packed: bool | None = None) -> None:
    """packed: also check bit 34 of the features the guest printed
    (virtio_features appended to SCRIPT)."""
    assert g.wait(timeout=600) == 0, g.console_tail()
    console = g.console
    assert "WRITE-FAILED" not in console, g.console_tail()
    results = g.results()
    if packed is not None:
        assert results.pop("features")[F_RING_PACKED] == ("1" if packed else "0")
    assert results == {"bad": "0", "ioerrors": "no"}, g.console_tail(60)
    # On the host: every block the guest saw written is in the image, intact.
    written = {int(m.group(1)): m.group(2) for m in re.finditer(r"WROTE (\d+) ([0-9a-f]{32})", console)}
    assert len(written) == BLOCKS
    image = vd.image("disk0").read_bytes()
    for i, digest in written.items():
        assert hashlib.md5(block(i)).hexdigest() == digest
        assert image[i * 4096:(i + 1) * 4096] == block(i), f"block {i} lost"
    log = vd.log()
    assert log.count("disk0: front-end connected") >= sessions
    assert "inflight tracking: " in log
