"""End to end: a real Linux guest under QEMU (TCG) on vhostd's virtio-blk.

Each test starts the real `vhostd serve` and QEMU with vhost-user-blk-pci on
its socket, runs a shell script in the guest, and checks the result from the
host side too (image bytes, e2fsck and debugfs on the image file).
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from guest.qemu import BlkDisk
from guest.scripts import VIRTIO_ID_BLOCK, virtio_features
from vhostd.virtio import F_RING_PACKED

pytestmark = pytest.mark.qemu

MiB = 1 << 20
DISK = 64 * MiB
FS_BLOCKS = 14336  # 56 MiB of 4 KiB blocks: the last 8 MiB stay raw for pattern checks
RAW_OFFSET = 60 * MiB


def pattern(seed: str, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


def host_e2fsck(image) -> None:
    r = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def host_debugfs_cat(image, path: str) -> bytes:
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_guest_filesystem_and_raw_data(vhostd_factory, qemu_guest, packed):
    """The acceptance path of the foundation: capacity, serial, queues, raw
    writes, mkfs.ext4 + mount + files + sync + umount + fsck, and the host
    image holds exactly what the guest wrote; on split rings and, with QEMU's
    packed=on, on packed ones (the guest driver negotiated the layout)."""
    vd = vhostd_factory([{"name": "disk0", "size": "64M", "queues": 2, "serial": "vhostd-e2e"}])
    raw = pattern("raw", 3 * MiB + 512)
    payload = pattern("payload", 2 * MiB + 123)
    script = f"""
set -e
echo "VHOSTD-RESULT size=$(cat /sys/block/vda/size)"
echo "VHOSTD-RESULT serial=$(cat /sys/block/vda/serial)"
echo "VHOSTD-RESULT queues=$(ls /sys/block/vda/mq | wc -l)"
echo "VHOSTD-RESULT ro=$(cat /sys/block/vda/ro)"
echo "VHOSTD-RESULT discard=$(cat /sys/block/vda/queue/discard_max_bytes)"
dd if=/raw of=/dev/vda bs=4096 seek={RAW_OFFSET // 4096} conv=fsync 2>/dev/null
dd if=/dev/vda bs=4096 skip={RAW_OFFSET // 4096} count={len(raw) // 4096 + 1} 2>/dev/null | head -c {len(raw)} > /raw.back
cmp /raw /raw.back
echo "VHOSTD-RESULT raw=ok"
mkfs.ext4 -q -F -b 4096 /dev/vda {FS_BLOCKS}
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt
cp /payload /mnt/payload
mkdir /mnt/dir
for i in $(seq 1 50); do echo "file $i" > /mnt/dir/f$i; done
sync
umount /mnt
e2fsck -fn /dev/vda
mount -t ext4 /dev/vda /mnt
cmp /payload /mnt/payload
echo "VHOSTD-RESULT files=$(ls /mnt/dir | wc -l)"
umount /mnt
{virtio_features(VIRTIO_ID_BLOCK)}"""
    g = qemu_guest(script, disks=[BlkDisk(vd.socket("disk0"), num_queues=2, packed=packed)],
                   files={"raw": raw, "payload": payload}, smp=2)  # Linux uses min(queues, CPUs)
    assert g.run() == 0, g.console_tail()
    res = g.results()
    assert res["size"] == str(DISK // 512)
    assert res["serial"] == "vhostd-e2e"
    assert res["queues"] == "2"
    assert res["ro"] == "0"
    assert int(res["discard"]) > 0
    assert res["raw"] == "ok"
    assert res["files"] == "50"
    assert res["features"][F_RING_PACKED] == ("1" if packed else "0"), res["features"]
    image = vd.image("disk0")
    with open(image, "rb") as f:
        f.seek(RAW_OFFSET)
        assert f.read(len(raw)) == raw
    host_e2fsck(image)
    assert host_debugfs_cat(image, "/payload") == payload
    assert host_debugfs_cat(image, "/dir/f7") == b"file 7\n"
    assert "NEEDS_RESET" not in vd.log()


def test_guest_discard_and_readonly(vhostd_factory, qemu_guest):
    """blkdiscard punches holes in the image; a readonly device refuses writes."""
    vd = vhostd_factory([
        {"name": "rw", "size": "64M"},
        {"name": "ro", "size": "16M", "readonly": True},
    ])
    image = vd.image("rw")
    with open(image, "r+b") as f:
        f.seek(8 * MiB)
        f.write(b"\xaa" * (4 * MiB))
        f.flush()
        os.fsync(f.fileno())
    blocks_before = os.stat(image).st_blocks
    ro_digest = vd.image_digest("ro")
    script = f"""
blkdiscard -o {8 * MiB} -l {4 * MiB} /dev/vda && echo "VHOSTD-RESULT discard=ok"
echo "VHOSTD-RESULT ro=$(cat /sys/block/vdb/ro)"
if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync 2>/dev/null; then echo "VHOSTD-RESULT rowrite=ok"; else echo "VHOSTD-RESULT rowrite=refused"; fi
dd if=/dev/vdb of=/dev/null bs=4096 count=16 2>/dev/null && echo "VHOSTD-RESULT roread=ok"
true
"""
    g = qemu_guest(script, disks=[vd.socket("rw"), vd.socket("ro")])
    assert g.run() == 0, g.console_tail()
    res = g.results()
    assert res["discard"] == "ok"
    assert res["ro"] == "1"
    assert res["rowrite"] == "refused"
    assert res["roread"] == "ok"
    with open(image, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(4 * MiB) == bytes(4 * MiB)
    assert os.stat(image).st_blocks < blocks_before
    assert vd.image_digest("ro") == ro_digest


def test_guest_reboot_and_qemu_reconnect(vhostd_factory, qemu_guest):
    """The device keeps serving across a guest reboot (QEMU resets and
    re-initialises the rings on the same connection) and across a whole new
    QEMU process connecting after the first one went away."""
    vd = vhostd_factory([{"name": "disk0", "size": "64M"}])
    reboot_script = """
marker=$(dd if=/dev/vda bs=6 count=1 2>/dev/null)
if [ "$marker" = "PHASE2" ]; then
    dd if=/dev/vda bs=4096 skip=1 count=1 2>/dev/null | head -c 11 > /b
    [ "$(cat /b)" = "first boot!" ] && echo "VHOSTD-RESULT second=ok"
    printf PHASE3 | dd of=/dev/vda conv=fsync 2>/dev/null
    exit 0
fi
printf 'first boot!' | dd of=/dev/vda bs=4096 seek=1 conv=fsync 2>/dev/null
printf PHASE2 | dd of=/dev/vda conv=fsync 2>/dev/null
reboot -f
"""
    g = qemu_guest(reboot_script, disks=[vd.socket("disk0")], allow_reboot=True)
    assert g.run() == 0, g.console_tail()
    assert g.boots == 2
    assert g.results()["second"] == "ok"
    assert vd.read_image("disk0", 0, 6) == b"PHASE3"

    # A new QEMU process: new session on the same socket.
    g2 = qemu_guest("""
[ "$(dd if=/dev/vda bs=6 count=1 2>/dev/null)" = PHASE3 ] && echo "VHOSTD-RESULT third=ok"
printf PHASE4 | dd of=/dev/vda conv=fsync 2>/dev/null
""", disks=[vd.socket("disk0")])
    assert g2.run() == 0, g2.console_tail()
    assert g2.results()["third"] == "ok"
    assert vd.read_image("disk0", 0, 6) == b"PHASE4"
    log = vd.log()
    assert log.count("disk0: front-end connected") == 2
    assert "NEEDS_RESET" not in log


def test_qemu_killed_mid_io_then_new_guest(vhostd_factory, qemu_guest):
    """QEMU dies (SIGKILL) while the guest writes: the daemon drops the
    session cleanly and the next guest is served."""
    vd = vhostd_factory([{"name": "disk0", "size": "64M"}])
    g = qemu_guest("""
echo READY
while true; do dd if=/dev/urandom of=/dev/vda bs=65536 count=64 conv=fsync 2>/dev/null; done
""", disks=[vd.socket("disk0")])
    g.start()
    g.wait_for("READY", timeout=60)
    g.kill()
    g2 = qemu_guest("""
printf hello | dd of=/dev/vda bs=512 seek=100 conv=fsync 2>/dev/null
[ "$(dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 5)" = hello ] && echo "VHOSTD-RESULT ok=1"
""", disks=[vd.socket("disk0")])
    assert g2.run() == 0, g2.console_tail()
    assert g2.results()["ok"] == "1"
    assert vd.read_image("disk0", 100 * 512, 5) == b"hello"
    assert vd.alive()


def test_two_guests_two_devices_at_once(vhostd_factory, qemu_guest):
    """One daemon, two devices, two guests doing I/O concurrently."""
    vd = vhostd_factory([{"name": "a", "size": "32M"}, {"name": "b", "size": "32M"}])
    guests = []
    for name in ("a", "b"):
        data = pattern(name, 4 * MiB)
        script = """
set -e
for i in 1 2 3; do
  dd if=/data of=/dev/vda bs=65536 seek=$((i * 64)) conv=fsync 2>/dev/null
done
dd if=/dev/vda bs=65536 skip=128 count=64 2>/dev/null | cmp - /data
echo "VHOSTD-RESULT name=$(cat /sys/block/vda/serial)"
"""
        guests.append((name, data, qemu_guest(script, disks=[vd.socket(name)], files={"data": data})))
    for _, _, g in guests:
        g.start()
    for name, data, g in guests:
        assert g.wait() == 0, g.console_tail()
        assert g.results()["name"] == name
        for i in (1, 2, 3):
            assert vd.read_image(name, i * 64 * 65536, len(data)) == data
