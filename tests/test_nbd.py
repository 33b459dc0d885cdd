"""backend: nbd -- disks on real NBD servers (nbdkit with its plugins and
filters, qemu-nbd) over Unix sockets, started, paused, broken and killed by
the tests (tests/stores.py)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import pytest
import yaml

from conftest import Guest, wait_until
from guest.qsd import unix_socket_listening
from test_async_blk import counters, pending, start, status
from vhostd.control import request as control
from virtio_driver import BLK_S_IOERR, BLK_S_OK, BLK_T_DISCARD, BLK_T_FLUSH, BLK_T_IN, BLK_T_OUT

MiB = 1 << 20
BLK_T_WRITE_ZEROES = 13


def nbd_device(server, name: str = "n0", **kw) -> dict:
    return {"name": name, "backend": "nbd", "uri": server.uri, **kw}


def image(tmp_path, name: str = "export.img", size: int = 16 * MiB) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def file_bytes(path: str, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


# ------------------------------------------------------------------ data path


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd"])
def test_every_request_reaches_the_export(vhostd_factory, nbd_server, tmp_path, kind):
    """Reads, writes (scattered guest buffers too), flushes, discards and
    write-zeroes land in the server's own file."""
    path = image(tmp_path)
    server = nbd_server(plugin="file", args=(path,)) if kind == "nbdkit" else nbd_server(qemu_nbd_image=path)
    vd = start(vhostd_factory, [nbd_device(server)])
    st = status(vd)["n0"]
    assert st["aio"] == "nbd" and st["store"]["connected"] == 1 and st["store"]["server"] == server.uri
    g = vd.connect("n0")
    drv = g.blk(0)
    data = os.urandom(64 * 1024)
    assert drv.write(128, data, split=4096) == BLK_S_OK  # 16 scattered buffers: one bounced command
    assert drv.run(BLK_T_FLUSH)[0] == BLK_S_OK
    assert file_bytes(path, 128 * 512, len(data)) == data
    assert drv.read(128, len(data), split=8192) == (BLK_S_OK, data)
    seg = struct.pack("<QII", 128, 8, 0)
    assert drv.run(BLK_T_WRITE_ZEROES, data=seg)[0] == BLK_S_OK
    assert drv.run(BLK_T_DISCARD, data=struct.pack("<QII", 136, 8, 0))[0] == BLK_S_OK
    assert file_bytes(path, 128 * 512, 4096) == bytes(4096)  # (a discarded range may read as anything)
    c = counters(vd, "n0")
    assert (c["writes"], c["reads"], c["flushes"], c["write_zeroes"], c["discards"], c["errors"]) == (1, 1, 1, 1, 1, 0)
    assert c["bounced"] == 2
    g.close()


def test_the_server_decides_size_read_only_and_what_it_can(vhostd_factory, nbd_server, tmp_path):
    ro = nbd_server(plugin="memory", args=("8M",), readonly=True)
    nozero = nbd_server(plugin="memory", args=("4M",), filters=("nozero",))
    vd = start(vhostd_factory, [nbd_device(ro, "ro"), nbd_device(nozero, "nz")])
    g = vd.connect("ro")
    feats = g.offered
    assert feats & (1 << 5)  # VIRTIO_BLK_F_RO
    assert struct.unpack("<Q", g.fe.get_config(0, 8))[0] == 8 * MiB // 512
    drv = g.blk(0)
    assert drv.write(0, bytes(512)) == BLK_S_IOERR
    assert drv.read(0, 512)[0] == BLK_S_OK
    g2 = vd.connect("nz")
    assert struct.unpack("<Q", g2.fe.get_config(0, 8))[0] == 4 * MiB // 512
    assert not g2.offered & (1 << 14)  # no WRITE_ZEROES: the export cannot zero
    g.close()
    g2.close()


def test_several_connections_where_the_server_allows_them(vhostd_factory, nbd_server):
    multi = nbd_server(plugin="memory", args=("16M",))
    single = nbd_server(plugin="memory", args=("16M", "multi-conn-mode=disable"), filters=("multi-conn",))
    vd = start(vhostd_factory, [nbd_device(multi, "m", connections=4, queues=2),
                                nbd_device(single, "s", connections=4)])
    st = status(vd)
    assert (st["m"]["store"]["connections"], st["m"]["store"]["connected"]) == (4, 4)
    assert st["s"]["store"]["connections"] == 1
    assert st["s"]["aio_note"] == "1 connection: the server does not allow multi-conn"
    g = vd.connect("m")
    drvs = [g.blk(0, size=128), g.blk(1, size=128)]
    blocks = {}
    for i in range(32):  # in flight together, over both queues and all connections
        data = os.urandom(4096)
        blocks[i * 8] = data
        drvs[i % 2].submit(BLK_T_OUT, i * 8, data)
    for d in drvs:
        d.q.wait_used(16)
    for sector, data in blocks.items():
        assert drvs[0].read(sector, 4096) == (BLK_S_OK, data)
    g.close()


# ------------------------------------------------------------------ failures


def test_a_server_killed_mid_io_and_restarted_loses_nothing(vhostd_factory, nbd_server, tmp_path):
    """Writes in flight when the server dies are issued again on the new
    connection once it is back: every one completes, and the file has them."""
    path = image(tmp_path)
    server = nbd_server(plugin="file", args=(path,), pause=True)
    vd = start(vhostd_factory, [nbd_device(server, reconnect_delay=1)])
    g = vd.connect("n0")
    drv = g.blk(0, size=128)
    server.pause()
    blocks = {i * 8: os.urandom(4096) for i in range(24)}
    marks = []
    for sector, data in blocks.items():
        _, bufs, _ = drv.submit(BLK_T_OUT, sector, data)
        marks.append(bufs[-1])
    wait_until(lambda: pending(vd, "n0") == 24, what="24 writes in flight")
    mark = vd.log_mark()
    server.kill()
    vd.wait_log(mark, r"n0: connection 0 to .* lost")
    time.sleep(0.5)
    assert pending(vd, "n0") == 24  # waiting for the server, not failed
    server.pause_filter = False
    server.start()
    vd.wait_log(mark, r"n0: connection 0 to .* is back", timeout=10)
    assert len(drv.q.wait_used(24, timeout=10)) == 24
    assert all(g.mem.read(m, 1)[0] == BLK_S_OK for m in marks)
    for sector, data in blocks.items():
        assert file_bytes(path, sector * 512, 4096) == data
    assert status(vd)["n0"]["store"]["reconnects"] == 1
    g.close()


def test_a_hung_server_fails_requests_after_io_timeout_and_is_reconnected(vhostd_factory, nbd_server):
    server = nbd_server(plugin="memory", args=("16M",), pause=True)
    vd = start(vhostd_factory, [nbd_device(server, io_timeout=1, reconnect_delay=1)])
    g = vd.connect("n0")
    drv = g.blk(0)
    server.pause()
    mark = vd.log_mark()
    t0 = time.monotonic()
    bufs = [drv.submit(BLK_T_IN, 8 * i, in_len=4096)[1] for i in range(4)]
    done = drv.q.wait_used(4, timeout=10)
    waited = time.monotonic() - t0
    assert len(done) == 4 and all(g.mem.read(b[-1], 1)[0] == BLK_S_IOERR for b in bufs)
    assert waited >= 0.9  # not before io_timeout
    vd.wait_log(mark, r"n0: connection 0 to .* lost: the server does not answer; reconnecting")
    vd.wait_log(mark, r"n0: 4 request\(s\) failed after waiting 1 s")
    # nbdkit's pause filter aborts when a paused request's connection is
    # gone (nbdkit 1.3x: "raw_send_socket: Assertion sock >= 0"), so the
    # operator's fix here is a restart rather than resume.
    server.kill()
    server.start()
    vd.wait_log(mark, r"is back", timeout=10)
    assert drv.read(0, 4096)[0] == BLK_S_OK
    assert status(vd)["n0"]["store"]["timeouts"] == 4
    g.close()


def test_a_slow_server_is_waited_for(vhostd_factory, nbd_server):
    """Slower than usual is not broken: requests complete, late, on the same
    connection, while a neighbour disk is served at once."""
    server = nbd_server(plugin="memory", args=("16M", "delay-read=1"), filters=("delay",))
    vd = start(vhostd_factory, [nbd_device(server, io_timeout=5), {"name": "f", "size": "4M"}])
    g = vd.connect("n0")
    drv = g.blk(0)
    t0 = time.monotonic()
    bufs = [drv.submit(BLK_T_IN, 8 * i, in_len=4096)[1] for i in range(4)]
    f = vd.connect("f")
    assert f.blk(0).read(0, 4096)[0] == BLK_S_OK and time.monotonic() - t0 < 0.9
    f.close()
    assert len(drv.q.wait_used(4, timeout=10)) == 4
    assert time.monotonic() - t0 >= 0.9
    assert all(g.mem.read(b[-1], 1)[0] == BLK_S_OK for b in bufs)
    st = status(vd)["n0"]["store"]
    assert (st["reconnects"], st["timeouts"]) == (0, 0)
    g.close()


def test_errors_from_the_server_fail_the_request_at_once(vhostd_factory, nbd_server):
    server = nbd_server(plugin="memory", args=("16M", "error=EIO", "error-pread-rate=100%"), filters=("error",))
    vd = start(vhostd_factory, [nbd_device(server)])
    g = vd.connect("n0")
    drv = g.blk(0)
    assert drv.write(0, bytes(4096)) == BLK_S_OK
    t0 = time.monotonic()
    assert drv.read(0, 4096)[0] == BLK_S_IOERR
    assert time.monotonic() - t0 < 1  # not retried
    assert counters(vd, "n0")["errors"] == 1
    g.close()


def set_devices(vd, devices: list[dict]) -> None:
    """Rewrite the daemon's config file with these devices (for a reload)."""
    doc = yaml.safe_load(vd.config_path.read_text())
    doc["devices"] = devices
    vd.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))


def reload(vd) -> dict:
    reply = control(str(vd.workdir / "ctl.sock"), "reload", timeout=5)
    assert reply["ok"], reply
    return reply


def test_a_server_that_is_not_there_yet(vhostd_factory, nbd_server):
    """Added by a reload while its server is down: the device waits for the
    store (status says why), everything else goes on, and it starts when the
    server appears.  A reload that drops it while it waits cancels it."""
    server = nbd_server(plugin="memory", args=("16M",))
    server.stop()
    vd = start(vhostd_factory, [{"name": "f", "size": "4M"}])
    file_dev = dict(vd.devices[0])
    sock = os.path.join(os.path.dirname(vd.socket("f")), "n0.sock")
    remote = {"name": "n0", "type": "blk", "socket": sock, "backend": "nbd", "uri": server.uri}
    set_devices(vd, [file_dev, remote])
    assert reload(vd)["started"] == ["n0"]
    st = wait_until(lambda: (s := status(vd)["n0"])["attempts"] >= 1 and s["error"] and s, what="a failed attempt")
    assert st["state"] == "opening" and "cannot connect" in st["error"]
    assert status(vd)["f"]["state"] == "serving"
    server.start()
    wait_until(lambda: unix_socket_listening(sock), timeout=40, what="the device to listen")
    vd.devices.append(remote)
    g = Guest(vd, "n0")
    assert g.blk(0).read(0, 4096)[0] == BLK_S_OK
    g.close()
    server.stop()
    set_devices(vd, [file_dev, {**remote, "name": "n1", "socket": sock.replace("n0", "n1")}])
    reply = reload(vd)
    assert (reply["started"], reply["stopped"]) == (["n1"], ["n0"])
    assert status(vd)["n1"]["state"] == "opening"
    set_devices(vd, [file_dev])
    assert reload(vd)["stopped"] == ["n1"]
    assert "n1" not in status(vd)


def test_reload_with_another_uri_restarts_that_device_only(vhostd_factory, nbd_server):
    a, b = nbd_server(plugin="memory", args=("8M",)), nbd_server(plugin="memory", args=("16M",))
    vd = start(vhostd_factory, [nbd_device(a), {"name": "f", "size": "4M"}])
    set_devices(vd, [{**vd.devices[0], "uri": b.uri}, vd.devices[1]])
    reply = reload(vd)
    assert (reply["restarted"], reply["kept"]) == (["n0"], ["f"])
    wait_until(lambda: status(vd)["n0"].get("state") == "serving", what="n0 back")
    g = vd.connect("n0")
    assert struct.unpack("<Q", g.fe.get_config(0, 8))[0] == 16 * MiB // 512
    g.close()


# ------------------------------------------------------------------ config


def check(tmp_path, device: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "vhostd.yaml"
    cfg.write_text("devices:\n" + device)
    return subprocess.run([sys.executable, "-m", "vhostd", "check", "--config", str(cfg)], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ})


@pytest.mark.parametrize("device, line, message", [
    ("  - {name: n, type: blk, socket: n.sock, backend: nbd}\n", 2,
     "devices[0].uri: missing required key 'uri'"),
    ("  - {name: n, type: blk, socket: n.sock, backend: nbd, uri: 'http://x/y'}\n", 2,
     "devices[0].uri: must be an NBD URI such as nbd://host/export or nbd+unix:///export?socket=PATH, got 'http://x/y'"),
    ("  - {name: n, type: blk, socket: n.sock, backend: nbd, uri: 'nbd+unix:///e'}\n", 2,
     "devices[0].uri: an nbd+unix:// URI needs ?socket=PATH"),
    ("  - {name: n, type: blk, socket: n.sock, backend: nbd, uri: 'nbd://h/e', path: x.img}\n", 2,
     "devices[0].path: 'path' only applies to backend file, not nbd"),
    ("  - {name: n, type: blk, socket: n.sock, path: x.img, size: 1M, uri: 'nbd://h/e'}\n", 2,
     "devices[0].uri: 'uri' only applies to backend nbd, not file"),
    ("  - {name: n, type: blk, socket: n.sock, backend: nbd, uri: 'nbd://h/e', connections: 17}\n", 2,
     "devices[0].connections: must be an integer from 1 to 16, got 17"),
])
def test_config_errors(tmp_path, device, line, message):
    r = check(tmp_path, device)
    assert r.returncode == 1
    assert f"vhostd.yaml:{line}: {message}" in r.stderr + r.stdout


def test_a_relative_socket_in_the_uri_is_the_config_file_s(tmp_path):
    (tmp_path / "etc").mkdir()
    cfg = tmp_path / "etc" / "vhostd.yaml"
    cfg.write_text("devices:\n  - {name: n, type: blk, socket: n.sock, backend: nbd, "
                   "uri: 'nbd+unix:///exp?socket=../run/nbd.sock'}\n")
    from vhostd.config import load_config

    dev = load_config(cfg).devices[0]
    assert dev.store.uri == f"nbd+unix:///exp?socket={tmp_path}/run/nbd.sock"


def test_built_without_libnbd_check_says_so(tmp_path, build_without_store_libraries):
    cfg = tmp_path / "vhostd.yaml"
    cfg.write_text("devices:\n  - {name: f, type: blk, socket: f.sock, path: f.img, size: 1M}\n"
                   "  - {name: n, type: blk, socket: n.sock, backend: nbd, uri: 'nbd://h/e'}\n")
    env = {**os.environ, "VHOSTD_NATIVE_MODULE": str(build_without_store_libraries)}
    r = subprocess.run([sys.executable, "-m", "vhostd", "check", "--config", str(cfg)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 1
    assert ("vhostd.yaml:3: devices[1].backend: backend nbd needs libnbd, and this vhostd was built without it "
            "(install libnbd-dev, then reinstall vhostd)") in r.stderr + r.stdout
    ok = tmp_path / "ok.yaml"
    ok.write_text("devices:\n  - {name: f, type: blk, socket: f.sock, path: f.img, size: 1M}\n")
    assert subprocess.run([sys.executable, "-m", "vhostd", "check", "--config", str(ok)], env=env,
                          capture_output=True).returncode == 0
