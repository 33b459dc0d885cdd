"""End to end on remote stores: a real Linux guest under QEMU (TCG) with
one disk on an NBD server (nbdkit serving an image file) and one on an RBD
image in the session's Ceph cluster.  The guest makes and checks a file
system on each; the host then checks them again from the server's side (the
NBD image file, and `rbd export` of the RBD image)."""

from __future__ import annotations

import subprocess

import pytest

from guest.qemu import BlkDisk
from test_qemu_blk import MiB, host_debugfs_cat, host_e2fsck, pattern

pytestmark = pytest.mark.qemu

DISK = 32 * MiB


def test_guest_file_systems_on_nbd_and_rbd(vhostd_factory, qemu_guest, nbd_server, ceph_cluster, tmp_path):
    nbd_image = tmp_path / "nbd.img"
    with open(nbd_image, "wb") as f:
        f.truncate(DISK)
    server = nbd_server(plugin="file", args=(str(nbd_image),))
    rbd_image = ceph_cluster.new_image(size=DISK)
    vd = vhostd_factory([
        {"name": "n", "backend": "nbd", "uri": server.uri, "serial": "on-nbd"},
        {"name": "r", "backend": "rbd", "image": rbd_image, "ceph_conf": ceph_cluster.conf, "serial": "on-rbd",
         "queues": 2},
    ])
    payload = pattern("payload", MiB + 321)
    script = """
set -e
for d in /sys/block/vd*; do
    case "$(cat $d/serial)" in on-nbd) nbd=/dev/${d##*/};; on-rbd) rbd=/dev/${d##*/};; esac
done
mkdir -p /mnt
for kind in nbd rbd; do
    eval dev=\\$$kind
    echo "VHOSTD-RESULT $kind.size=$(cat /sys/block/${dev#/dev/}/size)"
    mkfs.ext4 -q -F -b 4096 -E nodiscard $dev
    mount -t ext4 $dev /mnt
    cp /payload /mnt/payload
    mkdir /mnt/dir
    for i in $(seq 1 20); do echo "$kind $i" > /mnt/dir/f$i; done
    sync
    umount /mnt
    e2fsck -fn $dev >/dev/null
    mount -t ext4 $dev /mnt
    cmp /payload /mnt/payload
    echo "VHOSTD-RESULT $kind.files=$(ls /mnt/dir | wc -l)"
    fstrim /mnt && echo "VHOSTD-RESULT $kind.trim=ok"
    umount /mnt
done
"""
    g = qemu_guest(script, disks=[BlkDisk(vd.socket("n"), num_queues=1), BlkDisk(vd.socket("r"), num_queues=2)],
                   files={"payload": payload}, smp=2)
    assert g.run() == 0, g.console_tail()
    res = g.results()
    for kind in ("nbd", "rbd"):
        assert res[f"{kind}.size"] == str(DISK // 512)
        assert res[f"{kind}.files"] == "20"
        assert res[f"{kind}.trim"] == "ok"
    rbd_copy = tmp_path / "rbd.img"
    subprocess.run(["rbd", "export", "--no-progress", f"rbd/{rbd_image}", str(rbd_copy)], check=True,
                   env=ceph_cluster.env(), capture_output=True)
    for image in (nbd_image, rbd_copy):
        host_e2fsck(image)
        assert host_debugfs_cat(image, "/payload") == payload
