"""backend: rbd -- disks in a real Ceph cluster (a monitor and a bluestore
OSD, tests/ceph.py, one for the session) whose OSD the tests hang, kill and
restart.  What vhostd wrote is read back with the `rbd` tool."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from conftest import Guest, wait_until
from guest.qsd import unix_socket_listening
from test_async_blk import counters, pending, start, status
from test_metrics import free_port, scrape, value
from test_nbd import check, reload, set_devices
from virtio_driver import BLK_S_IOERR, BLK_S_OK, BLK_T_DISCARD, BLK_T_FLUSH, BLK_T_IN, BLK_T_OUT

MiB = 1 << 20
BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_F_RO = 1 << 5


def rbd_device(ceph, image: str, name: str = "r0", **kw) -> dict:
    return {"name": name, "backend": "rbd", "image": image, "ceph_conf": ceph.conf, **kw}


# ------------------------------------------------------------------ data path


def test_every_request_reaches_the_image(vhostd_factory, ceph_cluster):
    """What is in the image is what the guest reads; what the guest writes
    (from scattered buffers: no bounce), zeroes and discards is in the image."""
    before = os.urandom(4 * MiB)
    img = ceph_cluster.new_image(data=before)
    vd = start(vhostd_factory, [rbd_device(ceph_cluster, img)])
    st = status(vd)["r0"]
    assert st["aio"] == "rbd" and st["store"]["server"] == f"rbd:rbd/{img}" and st["store"]["up"]
    g = vd.connect("r0")
    assert struct.unpack("<Q", g.fe.get_config(0, 8))[0] == 4 * MiB // 512
    drv = g.blk(0)
    assert drv.read(2048, 64 * 1024, split=4096) == (BLK_S_OK, before[MiB:MiB + 64 * 1024])
    data = os.urandom(64 * 1024)
    assert drv.write(128, data, split=4096) == BLK_S_OK
    assert drv.run(BLK_T_FLUSH)[0] == BLK_S_OK
    assert drv.run(BLK_T_WRITE_ZEROES, data=struct.pack("<QII", 136, 8, 0))[0] == BLK_S_OK
    assert drv.run(BLK_T_DISCARD, data=struct.pack("<QII", 8000, 16, 0))[0] == BLK_S_OK
    assert drv.run(BLK_T_FLUSH)[0] == BLK_S_OK
    after = ceph_cluster.export(img)
    want = bytearray(before)
    want[128 * 512:128 * 512 + len(data)] = data
    want[136 * 512:144 * 512] = bytes(4096)
    assert after[:8000 * 512] == want[:8000 * 512] and after[8016 * 512:] == want[8016 * 512:]
    c = counters(vd, "r0")
    assert (c["reads"], c["writes"], c["flushes"], c["write_zeroes"], c["discards"], c["errors"]) == (1, 1, 2, 1, 1, 0)
    assert c["bounced"] == 0
    g.close()


def test_many_requests_in_flight_over_several_queues(vhostd_factory, ceph_cluster):
    img = ceph_cluster.new_image(size=16 * MiB)
    vd = start(vhostd_factory, [rbd_device(ceph_cluster, img, queues=2)])
    g = vd.connect("r0")
    drvs = [g.blk(0, size=128), g.blk(1, size=128)]
    blocks = {i * 8: os.urandom(4096) for i in range(64)}
    for i, (sector, data) in enumerate(blocks.items()):
        drvs[i % 2].submit(BLK_T_OUT, sector, data)
    for d in drvs:
        d.q.wait_used(32, timeout=20)
    for sector, data in blocks.items():
        assert drvs[1].read(sector, 4096) == (BLK_S_OK, data)
    image = ceph_cluster.export(img)
    assert all(image[s * 512:s * 512 + 4096] == d for s, d in blocks.items())
    g.close()


def test_a_snapshot_or_readonly_is_served_read_only(vhostd_factory, ceph_cluster):
    old = os.urandom(MiB)
    img = ceph_cluster.new_image(data=old)
    ceph_cluster.rbd("snap", "create", f"rbd/{img}@s1")
    vd = start(vhostd_factory, [rbd_device(ceph_cluster, img, "snap", snapshot="s1"),
                                rbd_device(ceph_cluster, img, "ro", readonly=True),
                                rbd_device(ceph_cluster, img, "rw")])
    assert status(vd)["snap"]["store"]["server"] == f"rbd:rbd/{img}@s1"
    rw = vd.connect("rw")
    new = os.urandom(4096)
    assert rw.blk(0).write(0, new) == BLK_S_OK
    for name, first in (("snap", old[:4096]), ("ro", new)):
        g = vd.connect(name)
        assert g.offered & VIRTIO_BLK_F_RO
        drv = g.blk(0)
        assert drv.read(0, 4096) == (BLK_S_OK, first)
        assert drv.write(0, bytes(4096)) == BLK_S_IOERR
        g.close()
    assert ceph_cluster.export(f"{img}@s1") == old
    rw.close()


def _mon_sessions(vd, ceph) -> int:
    """TCP connections of the daemon to the monitor: one per Ceph client."""
    port = ceph.mon_addr.split("v2:127.0.0.1:")[1].split(",")[0]
    out = subprocess.run(["ss", "-Htnp", "state", "established", "dst", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, check=True).stdout
    return sum(f"pid={vd.pid}," in line for line in out.splitlines())


def test_devices_on_one_cluster_share_one_client(vhostd_factory, ceph_cluster):
    imgs = [ceph_cluster.new_image(size=4 * MiB) for _ in range(3)]
    vd = start(vhostd_factory, [rbd_device(ceph_cluster, imgs[0], "a"), rbd_device(ceph_cluster, imgs[1], "b"),
                                rbd_device(ceph_cluster, imgs[2], "c", io_timeout=30)])
    for name in ("a", "b", "c"):
        g = vd.connect(name)
        assert g.blk(0).write(0, os.urandom(4096)) == BLK_S_OK
        g.close()
    # a and b share one; c's other timeout needs a client of its own
    wait_until(lambda: _mon_sessions(vd, ceph_cluster) == 2, what="two monitor sessions")


# ------------------------------------------------------------------ failures


def submit_writes(drv, count: int) -> tuple[dict, list]:
    blocks = {i * 8: os.urandom(4096) for i in range(count)}
    marks = [drv.submit(BLK_T_OUT, sector, data)[1][-1] for sector, data in blocks.items()]
    return blocks, marks


def test_requests_wait_while_the_osd_hangs_and_complete_when_it_answers(vhostd_factory, osd):
    img = osd.new_image(size=8 * MiB)
    port = free_port()
    vd = start(vhostd_factory, [rbd_device(osd, img, warn_after=1), {"name": "f", "size": "4M"}],
               metrics=f"127.0.0.1:{port}")
    g = vd.connect("r0")
    drv = g.blk(0, size=64)
    assert drv.write(0, bytes(4096)) == BLK_S_OK  # the image's lock is taken: what follows only waits for data
    mark = vd.log_mark()
    osd.stop_osd(signal.SIGSTOP)
    blocks, marks = submit_writes(drv, 16)
    vd.wait_log(mark, rf"r0: rbd/{img}: 16 request\(s\) waiting, the oldest for 1 s: the Ceph cluster does not answer",
                timeout=10)
    st = status(vd)["r0"]["store"]
    assert not st["up"] and st["in_flight"] == 16 and st["oldest_ms"] >= 1000
    shown = subprocess.run([sys.executable, "-m", "vhostd", "status", "--config", str(vd.config_path)],
                           capture_output=True, text=True, cwd=vd.workdir).stdout
    assert f"  store rbd:rbd/{img}: DOES NOT ANSWER  timeouts=0 in_flight=16 oldest_ms=" in shown
    metrics = scrape(port)
    assert (value(metrics, "vhostd_store_up", device="r0"), value(metrics, "vhostd_store_in_flight", device="r0"),
            value(metrics, "vhostd_store_stalls_total", device="r0")) == (0, 16, 1)
    f = vd.connect("f")  # the other disk does not notice
    assert f.blk(0).write(0, bytes(4096)) == BLK_S_OK
    f.close()
    osd.resume_osd()
    assert len(drv.q.wait_used(16, timeout=30)) == 16
    assert all(g.mem.read(m, 1)[0] == BLK_S_OK for m in marks)
    vd.wait_log(mark, rf"r0: rbd/{img}: the Ceph cluster answers again", timeout=5)
    st = status(vd)["r0"]["store"]
    assert st["up"] and st["stalls"] == 1 and st["in_flight"] == 0
    image = osd.export(img)
    assert all(image[s * 512:s * 512 + 4096] == d for s, d in blocks.items())
    g.close()


def test_an_osd_killed_mid_io_and_restarted_loses_nothing(vhostd_factory, osd):
    img = osd.new_image(size=8 * MiB)
    vd = start(vhostd_factory, [rbd_device(osd, img)])
    g = vd.connect("r0")
    drv = g.blk(0, size=128)
    assert drv.write(0, bytes(4096)) == BLK_S_OK
    osd.stop_osd(signal.SIGSTOP)  # so that they are surely in flight when it dies
    blocks, marks = submit_writes(drv, 24)
    wait_until(lambda: pending(vd, "r0") == 24, what="24 writes in flight")
    osd.stop_osd(signal.SIGKILL)
    time.sleep(0.5)
    assert pending(vd, "r0") == 24  # waiting for the cluster, not failed
    osd.start_osd()
    assert len(drv.q.wait_used(24, timeout=60)) == 24
    assert all(g.mem.read(m, 1)[0] == BLK_S_OK for m in marks)
    for sector, data in blocks.items():
        assert drv.read(sector, 4096) == (BLK_S_OK, data)
    image = osd.export(img)
    assert all(image[s * 512:s * 512 + 4096] == d for s, d in blocks.items())
    g.close()


def test_with_io_timeout_an_osd_killed_mid_io_fails_requests_only_after_it(vhostd_factory, osd):
    """io_timeout set: the requests the dead OSD holds fail (IOERR) once they
    waited that long, not before; what was acknowledged before it died, and
    every write that was acknowledged at all, is in the image afterwards."""
    img = osd.new_image(data=os.urandom(8 * MiB))  # data, so that reads go to the OSD
    vd = start(vhostd_factory, [rbd_device(osd, img, io_timeout=2)])
    g = vd.connect("r0")
    drv = g.blk(0, size=128)
    kept = os.urandom(8192)
    assert drv.write(64, kept) == BLK_S_OK
    assert drv.run(BLK_T_FLUSH)[0] == BLK_S_OK  # without io_timeout's no-cache, this turns on writeback
    osd.stop_osd(signal.SIGSTOP)
    t0 = time.monotonic()
    reads = [drv.submit(BLK_T_IN, 8192 + 8 * i, in_len=4096)[1][-1] for i in range(4)]
    blocks, writes = submit_writes(drv, 4)
    wait_until(lambda: pending(vd, "r0") == 8, what="8 requests in flight")
    osd.stop_osd(signal.SIGKILL)
    assert len(drv.q.wait_used(8, timeout=20)) == 8
    assert time.monotonic() - t0 >= 1.9  # not before io_timeout
    assert [g.mem.read(m, 1)[0] for m in reads + writes] == [BLK_S_IOERR] * 8
    assert status(vd)["r0"]["store"]["timeouts"] == 8
    osd.start_osd()
    assert drv.read(64, 8192) == (BLK_S_OK, kept)
    assert osd.export(img)[64 * 512:64 * 512 + 8192] == kept
    g.close()


def test_an_image_that_is_not_there_yet(vhostd_factory, ceph_cluster):
    """The device waits for its image (status says why) while the others
    serve, and starts once the image is made."""
    img = "t-later-" + os.urandom(4).hex()
    vd = start(vhostd_factory, [{"name": "f", "size": "4M"}])
    file_dev = dict(vd.devices[0])
    sock = os.path.join(os.path.dirname(vd.socket("f")), "r0.sock")
    remote = {**rbd_device(ceph_cluster, img), "type": "blk", "socket": sock}
    set_devices(vd, [file_dev, remote])
    assert reload(vd)["started"] == ["r0"]
    st = wait_until(lambda: (s := status(vd)["r0"])["error"] and s, what="a failed attempt")
    assert st["state"] == "opening" and st["error"] == f"there is no image rbd/{img} in the Ceph cluster"
    ceph_cluster.rbd("create", "--size", "4M", f"rbd/{img}")
    wait_until(lambda: unix_socket_listening(sock), timeout=40, what="the device to listen")
    vd.devices.append(remote)
    g = Guest(vd, "r0")
    assert g.blk(0).read(0, 4096) == (BLK_S_OK, bytes(4096))
    g.close()


def test_stopping_closes_the_image(vhostd_factory, ceph_cluster):
    """Stopping the daemon closes the image (its cache flushed, its lock
    released): another client can take it at once."""
    img = ceph_cluster.new_image(size=4 * MiB)
    vd = start(vhostd_factory, [rbd_device(ceph_cluster, img)])
    g = vd.connect("r0")
    data = os.urandom(4096)
    assert g.blk(0).write(8, data) == BLK_S_OK
    g.close()
    vd.stop()
    assert "not closed" not in vd.log()
    assert ceph_cluster.export(img)[4096:8192] == data
    assert ceph_cluster.rbd("status", "--format", "json", f"rbd/{img}").count('"address"') == 0  # no watcher left


def test_reload_with_another_image_restarts_that_device_only(vhostd_factory, ceph_cluster):
    a, b = ceph_cluster.new_image(size=4 * MiB), ceph_cluster.new_image(size=8 * MiB)
    vd = start(vhostd_factory, [rbd_device(ceph_cluster, a), {"name": "f", "size": "4M"}])
    set_devices(vd, [{**vd.devices[0], "image": b}, vd.devices[1]])
    reply = reload(vd)
    assert (reply["restarted"], reply["kept"]) == (["r0"], ["f"])
    wait_until(lambda: status(vd)["r0"].get("state") == "serving", what="r0 back")
    g = vd.connect("r0")
    assert struct.unpack("<Q", g.fe.get_config(0, 8))[0] == 8 * MiB // 512
    g.close()


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("device, line, message", [
    ("  - {name: r, type: blk, socket: r.sock, backend: rbd}\n", 2,
     "devices[0].image: missing required key 'image'"),
    ("  - {name: r, type: blk, socket: r.sock, backend: rbd, image: 'a/b'}\n", 2,
     "devices[0].image: must be an RBD image name: 1 to 127 bytes without '/', '@' or spaces, got 'a/b'"),
    ("  - {name: r, type: blk, socket: r.sock, backend: rbd, image: i, snapshot: s, readonly: false}\n", 2,
     "devices[0].readonly: a snapshot is read-only: drop 'readonly: false' or the 'snapshot'"),
    ("  - {name: r, type: blk, socket: r.sock, backend: rbd, image: i, ceph_conf: nope.conf}\n", 2,
     "devices[0].ceph_conf: {tmp}/nope.conf does not exist"),
    ("  - {name: r, type: blk, socket: r.sock, backend: rbd, image: i, uri: 'nbd://h/e'}\n", 2,
     "devices[0].uri: 'uri' only applies to backend nbd, not rbd"),
    ("  - {name: r, type: blk, socket: r.sock, backend: rbd, image: i, io_timeout: -1}\n", 2,
     "devices[0].io_timeout: must be an integer from 0 to 86400, got -1"),
    ("  - {name: r, type: blk, socket: r.sock, backend: rbd, image: i, user: bob}\n", 2,
     "devices[0].user: unknown key 'user' (did you mean 'ceph_user'?)"),
])
def test_config_errors(tmp_path, device, line, message):
    r = check(tmp_path, device)
    assert r.returncode == 1
    assert f"vhostd.yaml:{line}: {message.format(tmp=tmp_path)}" in r.stderr + r.stdout


def test_two_writable_devices_cannot_share_an_image(tmp_path):
    (tmp_path / "ceph.conf").write_text("[global]\n")
    r = check(tmp_path, "  - {name: a, type: blk, socket: a.sock, backend: rbd, image: i, ceph_conf: ceph.conf}\n"
                        "  - {name: b, type: blk, socket: b.sock, backend: rbd, image: i, ceph_conf: ceph.conf}\n")
    assert r.returncode == 1
    assert "vhostd.yaml:3: devices[1].image: " in r.stderr + r.stdout


def test_built_without_librbd_check_says_so(tmp_path, build_without_store_libraries):
    (tmp_path / "ceph.conf").write_text("[global]\n")
    cfg = tmp_path / "vhostd.yaml"
    cfg.write_text("devices:\n  - {name: r, type: blk, socket: r.sock, backend: rbd, image: i, ceph_conf: ceph.conf}\n")
    env = {**os.environ, "VHOSTD_NATIVE_MODULE": str(build_without_store_libraries)}
    r = subprocess.run([sys.executable, "-m", "vhostd", "check", "--config", str(cfg)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 1
    assert ("vhostd.yaml:2: devices[0].backend: backend rbd needs librbd, and this vhostd was built without it "
            "(install librbd-dev and librados-dev, then reinstall vhostd)") in r.stderr + r.stdout
