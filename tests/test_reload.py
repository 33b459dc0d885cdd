"""Live reconfiguration (SIGHUP, `vhostd reload`) and the control socket
(`vhostd status`), against the real daemon."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys

import yaml

from conftest import Guest, blk_roundtrip, wait_until
from guest.qsd import unix_socket_listening
from vhostd.control import request


def control(vd) -> str:
    return str(vd.workdir / "ctl.sock")


def start(vhostd_factory, devices):
    vd = vhostd_factory(devices, daemon={"workers": 1, "control_socket": "ctl.sock"})
    wait_until(lambda: unix_socket_listening(control(vd)), 10, what="the control socket to listen")
    return vd


def rewrite(vd, devices: list[dict], daemon: dict | None = None) -> None:
    doc = yaml.safe_load(vd.config_path.read_text())
    doc["devices"] = devices
    if daemon:
        doc["daemon"].update(daemon)
    vd.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhostd", *args], capture_output=True, text=True, timeout=30)


def test_reload_keeps_unchanged_devices_serving(vhostd_factory):
    vd = start(vhostd_factory, [{"name": "keep", "size": "4M"}, {"name": "gone", "size": "4M"},
                                {"name": "change", "size": "4M"}])
    devices = [dict(d) for d in vd.devices]
    guest = Guest(vd, "keep")
    drv = guest.blk()
    blk_roundtrip(vd, drv, 8, name="keep")
    mark = vd.log_mark()
    keep, change = devices[0], dict(devices[2], readonly=True, discard=False, write_zeroes=False)
    added = {"name": "new", "type": "blk", "socket": os.path.join(os.path.dirname(keep["socket"]), "new.sock"),
             "path": "new.img", "size": "4M"}
    for round_ in range(3):
        rewrite(vd, [keep, change, added] if round_ % 2 == 0 else [keep, devices[1]])
        reply = request(control(vd), "reload")
        assert reply["ok"], reply
        assert reply["kept"][0] == "keep"
        blk_roundtrip(vd, drv, 16 + round_, name="keep")  # the session lives on
    first = vd.log_since(mark)
    assert "reload: 1 kept, 1 started, 1 stopped, 1 restarted, 0 failed" in first, first
    assert "reload: 1 kept, 1 started, 2 stopped, 0 restarted, 0 failed" in first, first
    assert vd.log().count("keep: front-end connected") == 1
    assert "keep: session ended" not in vd.log()
    assert "error" not in vd.log_since(mark).lower()
    guest.close()


def test_reload_via_sighup_adds_and_removes(vhostd_factory):
    vd = start(vhostd_factory, [{"name": "a", "size": "4M"}])
    a = dict(vd.devices[0])
    b = dict(a, name="b", socket=a["socket"].replace("a.sock", "b.sock"), path="b.img")
    rewrite(vd, [b])
    mark = vd.log_mark()
    os.kill(vd.pid, signal.SIGHUP)
    vd.wait_log(mark, r"reload: 0 kept, 1 started, 1 stopped")
    assert not os.path.exists(a["socket"]) and os.path.exists(b["socket"])
    vd.devices = [b]
    g = Guest(vd, "b")
    blk_roundtrip(vd, g.blk(), 0, name="b")
    g.close()


def test_invalid_config_is_refused_and_nothing_changes(vhostd_factory):
    vd = start(vhostd_factory, [{"name": "a", "size": "4M"}])
    g = Guest(vd, "a")
    drv = g.blk()
    good = vd.config_path.read_text()
    rewrite(vd, [dict(vd.devices[0]), {"name": "b", "type": "blk", "sockett": "x.sock"}])
    mark = vd.log_mark()
    out = cli("reload", "--control", control(vd))
    assert out.returncode == 1
    assert "refused" in out.stderr and "unknown key 'sockett'" in out.stderr, out.stderr
    lines = vd.wait_log(mark, r"reload refused: .*vhostd.yaml:\d+: devices\[1\]\.sockett: unknown key")
    assert len(lines) == 1
    blk_roundtrip(vd, drv, 4, name="a")
    assert "a: session ended" not in vd.log()
    vd.config_path.write_text(good)
    g.close()


def test_failed_start_is_reported_and_others_apply(vhostd_factory):
    vd = start(vhostd_factory, [{"name": "a", "size": "4M"}])
    a = dict(vd.devices[0])
    b = dict(a, name="b", socket=a["socket"].replace("a.sock", "b.sock"), path="b.img")
    c = dict(a, name="c", socket=a["socket"].replace("a.sock", "c.sock"), path="c.img")
    rewrite(vd, [a, b, c])
    with socket.socket(socket.AF_UNIX) as squatter:  # another process already serves b's socket
        squatter.bind(b["socket"])
        squatter.listen()
        reply = request(control(vd), "reload")
        assert not reply["ok"] and "in use by another process" in reply["failed"]["b"], reply
        assert reply["started"] == ["c"] and reply["kept"] == ["a"]
    out = cli("status", "--control", control(vd))
    assert "\nc  blk" in out.stdout and "\nb  blk" not in out.stdout


def test_status_shows_devices_queues_and_counters(vhostd_factory):
    vd = start(vhostd_factory, [{"name": "d0", "size": "4M"},
                                {"name": "n0", "type": "net", "backend": "loopback"}])
    g = Guest(vd, "d0")
    drv = g.blk()
    for i in range(5):
        blk_roundtrip(vd, drv, i)
    reply = request(control(vd), "status")
    assert reply["ok"] and reply["pid"] == vd.pid
    d0, n0 = reply["devices"]
    assert d0["name"] == "d0" and d0["connected"] and d0["peer"]["pid"] == os.getpid()
    assert "VERSION_1" in d0["feature_names"] and not d0["needs_reset"]
    q = d0["queues"][0]
    assert q["started"] and q["requests"] == 10 and q["size"] == 128
    assert d0["counters"][0]["writes"] == 5 and d0["counters"][0]["reads"] == 5
    assert n0["type"] == "net" and not n0["connected"] and len(n0["queues"]) == 3  # rx, tx, ctrl
    out = cli("status", "--config", str(vd.config_path))
    assert out.returncode == 0, out.stderr
    assert "d0  blk" in out.stdout and "connected (pid" in out.stdout and "writes=5" in out.stdout
    assert json.loads(cli("status", "--json", "--control", control(vd)).stdout)["devices"][0]["name"] == "d0"
    g.close()


def test_control_socket_is_private_and_robust(vhostd_factory):
    vd = start(vhostd_factory, [{"name": "d0", "size": "4M"}])
    st = os.stat(control(vd))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    for junk in (b"not json\n", b"[1,2]\n", b'{"cmd": "format-disk"}\n', b"x" * 10000 + b"\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(control(vd))
            s.sendall(junk)
            reply = json.loads(s.makefile().readline())
        assert reply["ok"] is False and reply["error"]
    with socket.socket(socket.AF_UNIX) as s:  # a client that says nothing is dropped, the daemon goes on
        s.connect(control(vd))
        assert request(control(vd), "status")["ok"]
    out = cli("status", "--control", str(vd.workdir / "nope.sock"))
    assert out.returncode == 1 and "cannot reach the daemon" in out.stderr
    vd.assert_alive()
