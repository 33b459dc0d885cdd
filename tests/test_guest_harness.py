"""Proves the QEMU guest harness (tests/guest/) against qemu-storage-daemon as the
vhost-user-blk back-end, so that failures of vhostd's own end-to-end tests can
be blamed on vhostd rather than on the harness."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import time

import pytest

from guest.cpio import CpioWriter
from guest.qemu import BlkDisk, GuestError, GuestTimeout

MiB = 1 << 20
FILE_TEXT = "written by the guest through vhost-user-blk\n"


def _host(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def test_cpio_writer_is_readable_by_cpio(tmp_path):
    if not shutil.which("cpio"):
        pytest.skip("cpio(1) not installed")
    w = CpioWriter()
    w.file("a/b/c.txt", b"hello\n", 0o644)
    w.symlink("a/link", "b/c.txt")
    (tmp_path / "x.cpio").write_bytes(w.getvalue())
    out = tmp_path / "out"
    out.mkdir()
    with open(tmp_path / "x.cpio", "rb") as f:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=f, cwd=out, check=True)
    assert (out / "a/b/c.txt").read_text() == "hello\n"
    assert (out / "a/link").read_text() == "hello\n"


@pytest.mark.qemu
def test_ext4_on_vhost_user_blk(qemu_guest, storage_daemon):
    qsd = storage_daemon("64M")
    script = f"""
set -e
echo "VHOSTD-RESULT size=$(cat /sys/block/vda/size)"
# raw pattern at 1 MiB, read back past the page cache
yes VHOSTD-PATTERN | head -c 1048576 > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null
blockdev --flushbufs /dev/vda
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=64k skip=16 count=16 2>/dev/null | cmp - /tmp/pat
echo "VHOSTD-RESULT pattern=ok"
mkfs.ext4 -q /dev/vda
mount -t ext4 /dev/vda /mnt
printf '%s' '{FILE_TEXT}' > /mnt/file
head -c 1048576 /dev/urandom > /mnt/big
echo "VHOSTD-RESULT big=$(sha256sum /mnt/big | cut -d' ' -f1)"
sync
umount /mnt
e2fsck -fn /dev/vda
echo "VHOSTD-RESULT fsck=ok"
"""
    g = qemu_guest(script, disks=[qsd.socket])
    t0 = time.monotonic()
    rc = g.run(timeout=60)
    print(f"guest boot+test took {time.monotonic() - t0:.1f}s")
    assert rc == 0, g.console_tail()
    res = g.results()
    assert res["size"] == str(64 * MiB // 512)
    assert res["pattern"] == "ok" and res["fsck"] == "ok"

    qsd.stop()
    fsck = _host(["e2fsck", "-fn", str(qsd.image)])
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = _host(["debugfs", "-R", "cat /file", str(qsd.image)])
    assert cat.stdout == FILE_TEXT, cat.stderr
    big = subprocess.run(["debugfs", "-R", "cat /big", str(qsd.image)], capture_output=True)
    assert len(big.stdout) == MiB
    assert hashlib.sha256(big.stdout).hexdigest() == res["big"]


@pytest.mark.qemu
def test_two_disks_multiqueue(qemu_guest, storage_daemon):
    """Disk order = /dev/vdX order; num_queues reaches the guest; raw bytes land on the host."""
    a = storage_daemon("16M", name="a")
    b = storage_daemon("32M", name="b", num_queues=2)
    script = """
set -e
echo "VHOSTD-RESULT a=$(cat /sys/block/vda/size) b=$(cat /sys/block/vdb/size)"
echo "VHOSTD-RESULT qa=$(ls /sys/block/vda/mq | wc -l) qb=$(ls /sys/block/vdb/mq | wc -l)"
printf 'disk-A' | dd of=/dev/vda bs=512 seek=7 conv=fsync 2>/dev/null
printf 'disk-B' | dd of=/dev/vdb bs=512 seek=9 conv=fsync 2>/dev/null
"""
    # blk-mq uses min(num_queues, CPUs) queues, so two vCPUs are needed to see both.
    # Unset num-queues defaults to the vCPU count in QEMU 7.2, more than this
    # qemu-storage-daemon export offers, hence num_queues=1 for disk a.
    g = qemu_guest(script, disks=[(a.socket, 1), BlkDisk(b.socket, num_queues=2)], smp=2)
    assert g.run() == 0, g.console_tail()
    res = g.results()
    assert res["a"] == "32768 b=65536"
    assert res["qa"] == "1 qb=2"
    with open(a.image, "rb") as f:
        f.seek(7 * 512)
        assert f.read(6) == b"disk-A"
    with open(b.image, "rb") as f:
        f.seek(9 * 512)
        assert f.read(6) == b"disk-B"


@pytest.mark.qemu
def test_exit_code_and_no_disks(qemu_guest):
    g = qemu_guest("echo hello from the guest; exit 7")
    assert g.run() == 7
    assert "hello from the guest" in g.console
    assert g.boots == 1


@pytest.mark.qemu
def test_background_marker_timeout_and_kill(qemu_guest):
    g = qemu_guest("echo GUEST-READY; while :; do sleep 1; done", qmp=True)
    g.start()
    try:
        assert g.wait_for("GUEST-READY", timeout=60) == "GUEST-READY"
        assert g.qmp("query-status")["status"] == "running"
        with pytest.raises(GuestTimeout) as ei:
            g.wait_for("NEVER-PRINTED", timeout=1)
        assert "GUEST-READY" in str(ei.value)  # the console tail is in the error
        assert g.running()
        with pytest.raises(GuestTimeout):
            g.wait(timeout=1)  # wait() kills the guest when it times out
        assert not g.running()
        assert g.exit_code is None
    finally:
        g.kill()


@pytest.mark.qemu
def test_backend_restart_with_reconnect(qemu_guest, storage_daemon):
    """Kill qemu-storage-daemon while the guest does I/O, restart it, and the
    guest carries on (QEMU chardev reconnect=1)."""
    qsd = storage_daemon("16M")
    script = """
i=0
while [ $i -lt 12 ]; do
    printf "round-$i" | dd of=/dev/vda bs=512 seek=$i conv=fsync 2>/dev/null || echo WRITE-FAILED
    echo "ROUND $i"
    i=$((i+1))
    sleep 0.2
done
"""
    g = qemu_guest(script, disks=[BlkDisk(qsd.socket, reconnect=1)])
    g.start()
    g.wait_for("ROUND 2")
    qsd.stop(signal.SIGKILL)
    qsd.restart()
    assert g.wait(timeout=60) == 0, g.console_tail()
    assert "WRITE-FAILED" not in g.console
    qsd.stop()
    with open(qsd.image, "rb") as f:
        data = f.read(12 * 512)
    for i in range(12):
        assert data[i * 512:i * 512 + 8].rstrip(b"\0") == f"round-{i}".encode()


@pytest.mark.qemu
def test_reboot_keeps_disk_state(qemu_guest, storage_daemon):
    """allow_reboot: the same /test.sh runs on every boot and branches on disk state."""
    qsd = storage_daemon("16M")
    script = """
state=$(dd if=/dev/vda bs=6 count=1 2>/dev/null)
if [ "$state" = PHASE2 ]; then
    echo "VHOSTD-RESULT second_boot=yes"
    exit 0
fi
printf PHASE2 | dd of=/dev/vda conv=fsync 2>/dev/null
echo "rebooting"
reboot -f
"""
    g = qemu_guest(script, disks=[qsd.socket], allow_reboot=True, max_boots=2)
    assert g.run(timeout=90) == 0, g.console_tail()
    assert g.boots == 2
    assert g.results()["second_boot"] == "yes"


@pytest.mark.qemu
def test_missing_backend_is_a_clear_error(qemu_guest, tmp_path):
    g = qemu_guest("true", disks=[tmp_path / "nobody-listens.sock"])
    with pytest.raises(GuestError) as ei:
        g.run(timeout=30)
    assert "nobody-listens.sock" in str(ei.value)
