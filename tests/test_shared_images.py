"""Shared images and image locking: `shared: true` lets several devices (of
this daemon or of another, e.g. a migration's source and destination) name
one image, and a lock lets only one of them run it at a time.  Real
daemons, real sockets, real memfd guest memory, real OFD locks on a real
file, and librbd's exclusive lock in the session's Ceph cluster."""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import sys

import pytest

from conftest import STATUS_NEEDS_RESET, Guest, Vhostd, blk_roundtrip, wait_broken, wait_until
from test_async_blk import pending, start
from test_config import image, only_problem, write
from test_rbd import rbd_device
from vhostd.config import load_config
from virtio_driver import BLK_S_OK, BLK_T_OUT

MiB = 1 << 20


# ------------------------------------------------------------------ vhostd check


def test_check_refuses_two_writable_devices_unless_both_are_shared(tmp_path):
    image(tmp_path / "disk.img")
    for a, b in (("", ""), ("shared: true", ""), ("", "shared: true"), ("shared: false", "shared: true")):
        path = write(tmp_path, f"""
            devices:
              - {{name: a, type: blk, socket: a.sock, path: disk.img, {a}}}
              - {{name: b, type: blk, socket: b.sock, path: disk.img, {b}}}
            """.replace(", }", "}"))
        p = only_problem(path)
        assert (p.line, p.key) == (3, "devices[1].path"), (a, b, p)
        assert p.message.startswith(f"image {tmp_path}/disk.img is also used by writable device 'a' (line 2)")
        assert "'shared: true' on both" in p.message


def test_check_accepts_shared_writers_and_a_reader_beside_them(tmp_path):
    image(tmp_path / "disk.img")
    path = write(tmp_path, """
        devices:
          - {name: a, type: blk, socket: a.sock, path: disk.img, shared: true}
          - {name: b, type: blk, socket: b.sock, path: ./disk.img, shared: true}
          - {name: c, type: blk, socket: c.sock, path: disk.img, readonly: true}
        """)
    cfg = load_config(path)
    assert [d.store.shared for d in cfg.devices] == [True, True, False]
    # A third writer that does not say shared clashes with the first.
    path = write(tmp_path, """
        devices:
          - {name: a, type: blk, socket: a.sock, path: disk.img, shared: true}
          - {name: b, type: blk, socket: b.sock, path: disk.img, shared: true}
          - {name: c, type: blk, socket: c.sock, path: disk.img}
        """)
    p = only_problem(path)
    assert (p.line, p.key) == (4, "devices[2].path") and "writable device 'a' (line 2)" in p.message


def test_check_says_nbd_takes_no_lock(tmp_path):
    path = write(tmp_path, """
        devices:
          - name: n
            type: blk
            socket: n.sock
            backend: nbd
            uri: nbd://localhost/x
            shared: true
        """)
    p = only_problem(path, check_files=False)
    assert (p.line, p.key) == (7, "devices[0].shared")
    assert "backend nbd takes no lock" in p.message and "NBD server's business" in p.message


# ------------------------------------------------------------------ helpers


def shared_disk(name: str, path, **kw) -> dict:
    return {"name": name, "path": str(path), "size": "4M", "shared": True, **kw}


def refused(vd: Vhostd, g: Guest, mark: int, holder: str):
    """Start queue 0 of g's device: refused, NEEDS_RESET, one log line naming the holder."""
    q = g.queue(0)
    wait_broken(q)
    assert g.status() & STATUS_NEEDS_RESET
    lines = vd.wait_log(mark, rf"{g.name}: queue 0 marked NEEDS_RESET: queue 0 cannot start: image .* is in use by "
                              rf"{holder}")
    assert len(lines) == 1, lines
    return q


def restart(g: Guest) -> None:
    """The front-end resets the device (clearing NEEDS_RESET)."""
    g.fe.reset_device()
    assert not g.status() & STATUS_NEEDS_RESET


def ofd_locked(path, start: int) -> bool:
    """Whether some open file description holds a lock on byte `start` of path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, start, 1, 0))
        return struct.unpack("@hhqqi4x", got)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


# ------------------------------------------------------------------ files, one daemon


def test_two_shared_devices_in_one_daemon_take_turns(vhostd_factory, tmp_path):
    img = tmp_path / "disk.img"
    vd = vhostd_factory([shared_disk("a", img), shared_disk("b", img)])
    assert not ofd_locked(img, 101), "a shared image is locked before the guest starts it"
    ga = vd.connect("a")
    da = ga.blk(0)
    blk_roundtrip(vd, da, 8, name="a")
    assert ofd_locked(img, 101) and ofd_locked(img, 201)

    # B starts while A runs: refused, naming A and its socket.
    gb = vd.connect("b")
    refused(vd, gb, vd.log_mark(), rf"device 'a' \(socket {vd.socket('a')}\) of this daemon")
    assert not ga.status() & STATUS_NEEDS_RESET
    blk_roundtrip(vd, da, 16, name="a")  # A goes on undisturbed

    # A stops (GET_VRING_BASE, as at a migration's end): B may start after a reset.
    ga.fe.get_vring_base(0)
    assert not ofd_locked(img, 101)
    restart(gb)
    db = gb.blk(0)
    blk_roundtrip(vd, db, 24, name="b")
    assert db.read(8, 4096)[1] == vd.read_image("a", 8 * 512, 4096)

    # Now A is the one refused, naming B.
    mark = vd.log_mark()
    restart(ga)
    refused(vd, ga, mark, rf"device 'b' \(socket {vd.socket('b')}\) of this daemon")

    # B's front-end goes away: that releases the image too.
    gb.close()
    assert not ofd_locked(img, 101)
    restart(ga)
    blk_roundtrip(vd, ga.blk(0), 32, name="a")
    ga.close()


def test_a_non_shared_image_is_locked_while_the_device_exists(vhostd_factory, tmp_path):
    img = tmp_path / "disk.img"
    ro = tmp_path / "ro.img"
    vd = vhostd_factory([{"name": "a", "path": str(img), "size": "4M"},
                         {"name": "r", "path": str(ro), "size": "4M", "readonly": True}])
    # Held before any front-end comes, and through a session that ends.
    assert ofd_locked(img, 101) and ofd_locked(img, 201) and not ofd_locked(img, 100)
    g = vd.connect("a")
    blk_roundtrip(vd, g.blk(0), 8, name="a")
    g.fe.get_vring_base(0)
    g.close()
    assert ofd_locked(img, 101)
    # A read-only device takes only a shared lock on byte 100 (that of a reader).
    assert ofd_locked(ro, 100) and not ofd_locked(ro, 101) and not ofd_locked(ro, 201)
    vd.stop()
    assert not ofd_locked(img, 101) and not ofd_locked(ro, 100)


def test_the_lock_stays_while_writes_of_a_gone_front_end_are_in_flight(vhostd_factory, hanging_disk):
    """A front-end that leaves with writes in flight: the image stays locked
    until they are done, so the next user's writes cannot be overtaken."""
    vd = start(vhostd_factory, [{"name": "a", "path": hanging_disk.path, "direct": True, "shared": True},
                                {"name": "b", "path": hanging_disk.path, "direct": True, "shared": True}])
    ga = vd.connect("a")
    da = ga.blk(0)
    hanging_disk.pause()
    for i in range(2):
        da.submit(BLK_T_OUT, 8 * i, b"\x01" * 4096)
    wait_until(lambda: pending(vd, "a") == 2, what="2 writes pending")
    ga.close()
    gb = vd.connect("b")
    refused(vd, gb, 0, "device 'a'")
    assert ofd_locked(hanging_disk.path, 101)
    hanging_disk.resume()
    wait_until(lambda: not ofd_locked(hanging_disk.path, 101), what="the lock to go with the last write")
    restart(gb)
    db = gb.blk(0)
    assert db.read(0, 4096) == (BLK_S_OK, b"\x01" * 4096)
    gb.close()


# ------------------------------------------------------------------ files, two daemons


def second_daemon(tmp_path, sockdir, devices: list[dict]) -> Vhostd:
    wd = tmp_path / "second"
    wd.mkdir(exist_ok=True)
    return Vhostd(wd, sockdir, devices)


def test_a_second_daemon_cannot_open_a_non_shared_image(vhostd_factory, tmp_path, sockdir):
    img = tmp_path / "disk.img"
    vd = vhostd_factory([{"name": "a", "path": str(img), "size": "4M"}])
    other = second_daemon(tmp_path, sockdir, [{"name": "b", "path": str(img)}])
    with pytest.raises(RuntimeError) as info:
        other.start()
    other.stop()
    assert f"image {img} is in use by another process" in str(info.value)
    g = vd.connect("a")
    blk_roundtrip(vd, g.blk(0), 8, name="a")
    g.close()


def test_a_shared_image_runs_in_one_daemon_at_a_time(vhostd_factory, tmp_path, sockdir):
    """Migration on shared storage: the destination's daemon opens the image
    beside the source's, and may run it once the source stopped it."""
    img = tmp_path / "disk.img"
    src = vhostd_factory([shared_disk("src", img)])
    dst = vhostd_factory([shared_disk("dst", img)])
    gs = src.connect("src")
    ds = gs.blk(0)
    blk_roundtrip(src, ds, 8, name="src")

    gd = dst.connect("dst")
    refused(dst, gd, 0, "another process")

    gs.fe.get_vring_base(0)
    restart(gd)
    dd = gd.blk(0)
    blk_roundtrip(dst, dd, 16, name="dst")
    assert dd.read(8, 4096)[1] == src.read_image("src", 8 * 512, 4096)
    gd.close()
    gs.close()


def test_a_qemu_style_reader_that_does_not_share_writes_keeps_a_writer_out(vhostd_factory, tmp_path, sockdir):
    """QEMU's file-posix takes a shared lock on byte 201 when it does not let
    others write: vhostd's writer then refuses the image (and vice versa)."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 * MiB))
    fd = os.open(img, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_RDLCK, 0, 201, 1, 0))
        other = second_daemon(tmp_path, sockdir, [{"name": "w", "path": str(img)}])
        with pytest.raises(RuntimeError) as info:
            other.start()
        other.stop()
        assert "is in use by another process" in str(info.value)
    finally:
        os.close(fd)


def qsd_command(img, sock: str) -> list[str]:
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        pytest.fail("qemu-storage-daemon is missing: run scripts/test-deps.sh")
    return [qsd, "--blockdev", f"driver=file,node-name=f,filename={img}", "--export",
            f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on"]


def test_vhostd_and_qemu_storage_daemon_keep_each_other_out(vhostd_factory, tmp_path, sockdir):
    """vhostd's bytes are QEMU's file-posix lock bytes: a writing qsd and a
    writing vhostd refuse each other's image."""
    img = tmp_path / "disk.img"
    vd = vhostd_factory([{"name": "a", "path": str(img), "size": "4M"}])
    p = subprocess.run(qsd_command(img, f"{sockdir}/q.sock"), capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "Failed to lock byte 101" in p.stderr, p.stderr
    vd.stop()

    qsd = subprocess.Popen(qsd_command(img, f"{sockdir}/q.sock"), stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: os.path.exists(f"{sockdir}/q.sock") or qsd.poll() is not None, 10, what="qsd")
        assert qsd.poll() is None, qsd.stderr.read()
        other = second_daemon(tmp_path, sockdir, [{"name": "b", "path": str(img)}])
        with pytest.raises(RuntimeError) as info:
            other.start()
        other.stop()
        assert f"image {img} is in use by another process" in str(info.value)
    finally:
        qsd.terminate()
        qsd.communicate(timeout=10)


# ------------------------------------------------------------------ RBD


def test_rbd_shared_devices_in_one_daemon_take_turns(vhostd_factory, ceph_cluster):
    img = ceph_cluster.new_image(size=4 * MiB)
    vd = vhostd_factory([rbd_device(ceph_cluster, img, "a", shared=True),
                         rbd_device(ceph_cluster, img, "b", shared=True)])
    wait_until(lambda: "b: store open" in vd.log() and "a: store open" in vd.log(), 30, what="the stores")
    ga = vd.connect("a")
    da = ga.blk(0)
    data = os.urandom(4096)
    assert da.write(8, data) == BLK_S_OK

    gb = vd.connect("b")
    q = gb.queue(0)
    wait_broken(q)
    assert gb.status() & STATUS_NEEDS_RESET
    vd.wait_log(0, rf"b: queue 0 marked NEEDS_RESET: queue 0 cannot start: image rbd/{img} is locked by the Ceph "
                   rf"client at \S+ \(device 'a' \(socket {vd.socket('a')}\) of this daemon")

    ga.fe.get_vring_base(0)
    restart(gb)
    db = gb.blk(0)
    assert db.read(8, 4096) == (BLK_S_OK, data)
    assert db.write(16, data) == BLK_S_OK
    gb.close()
    ga.close()


def launch(vd: Vhostd) -> Vhostd:
    """Start the daemon without waiting for its sockets (a store that cannot
    be opened yet has none)."""
    vd._log = open(vd.log_path, "ab")
    vd.proc = subprocess.Popen([sys.executable, "-m", "vhostd", "serve", "--config", str(vd.config_path),
                                "--log-level", "debug"], stdout=vd._log, stderr=subprocess.STDOUT, cwd=vd.workdir)
    return vd


def test_rbd_non_shared_image_is_held_against_another_daemon(vhostd_factory, ceph_cluster, tmp_path, sockdir):
    img = ceph_cluster.new_image(size=4 * MiB)
    first = vhostd_factory([rbd_device(ceph_cluster, img, "a")])
    wait_until(lambda: "a: store open" in first.log(), 30, what="the store")
    second = launch(second_daemon(tmp_path, sockdir, [rbd_device(ceph_cluster, img, "b")]))
    try:
        # The second keeps trying (as for a cluster that is not there), saying why.
        second.wait_log(0, rf"b: cannot open its store \(image rbd/{img} is locked by the Ceph client at ", timeout=30)
        assert "b: store open" not in second.log()
        g = first.connect("a")
        assert g.blk(0).write(8, os.urandom(4096)) == BLK_S_OK
        g.close()
        first.stop()  # closing the image drops its lock
        second.wait_log(0, "b: store open after", timeout=30)
    finally:
        second.finish()


def test_rbd_lock_waiting_for_a_hung_cluster_holds_up_neither_the_control_plane_nor_others(vhostd_factory,
                                                                                          osd):
    """Taking a shared RBD image's lock waits for the cluster: it runs off the
    event loop, so status answers and other devices serve meanwhile; after
    LOCK_WAIT the start is refused (NEEDS_RESET), saying why."""
    import signal
    import threading
    import time

    from test_async_blk import status

    img = osd.new_image(size=4 * MiB)
    vd = start(vhostd_factory, [rbd_device(osd, img, "a", shared=True), {"name": "f", "size": "4M"}])
    wait_until(lambda: "a: store open" in vd.log(), 30, what="the store")
    ga = vd.connect("a")
    ga.fe.sock.settimeout(30)  # the kick's answer comes after LOCK_WAIT
    osd.stop_osd(signal.SIGSTOP)
    started = {}
    t0 = time.monotonic()
    starter = threading.Thread(target=lambda: started.setdefault("q", ga.queue(0)))
    starter.start()
    wait_until(lambda: "a: <- SET_VRING_KICK" in vd.log(), 5, what="the kick")
    t = time.monotonic()
    assert status(vd)["f"]["state"] == "serving" and time.monotonic() - t < 1.0
    gf = vd.connect("f")
    assert gf.blk(0).write(0, os.urandom(4096)) == BLK_S_OK
    gf.close()
    starter.join(30)
    assert time.monotonic() - t0 >= 4.5  # LOCK_WAIT
    wait_broken(started["q"])
    vd.wait_log(0, r"a: queue 0 marked NEEDS_RESET: queue 0 cannot start: the Ceph cluster did not answer")
    osd.resume_osd()
    ga.close()

