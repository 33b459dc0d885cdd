"""systemd socket activation: `vhostd serve` takes the listening sockets
passed with LISTEN_FDS / LISTEN_FDNAMES, serves its devices on them, and
leaves them bound when it stops, so front-ends can connect while it
restarts.  The tests bind the sockets themselves and pass them as systemd
does (tests/daemon.py), or run systemd-socket-activate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import yaml
from conftest import Guest, wait_until
from virtio_driver import BLK_S_OK

DATA = b"activated".ljust(4096, b".")


def test_a_passed_socket_is_served_and_stays_through_restarts(vhostd_factory):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}, {"name": "d1", "size": "4M"}], activate=("d0",))
    assert "d0: listening on " in vd.log() and "(passed by socket activation)" in vd.log()
    assert vd.log().count("passed by socket activation") == 1  # d1 bound its own socket
    g = Guest(vd, "d0")
    assert g.blk(0).write(8, DATA) == BLK_S_OK
    g.close()
    d1 = Guest(vd, "d1")
    d1.close()
    for restart in range(2):
        vd.stop()
        # vhostd is gone, its socket is not: a front-end connects now and
        # is answered once vhostd is back.
        assert os.path.exists(vd.socket("d0")) and not os.path.exists(vd.socket("d1"))
        got = {}

        def reconnect() -> None:
            s = Guest(vd, "d0")
            got["read"] = s.blk(0).read(8, 4096)
            s.close()

        t = threading.Thread(target=reconnect)
        t.start()
        time.sleep(0.3)  # connected and waiting in the backlog
        assert t.is_alive()
        vd.start()
        t.join(10)
        assert got.get("read") == (BLK_S_OK, DATA), (restart, vd.log())


def test_a_passed_socket_that_matches_no_device_is_named_in_the_log(vhostd_factory):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}, {"name": "gone", "size": "4M"}], activate=("gone",))
    vd.stop()
    # the config loses the device; the next start is passed its socket all the same
    vd.devices.pop()
    vd.config_path.write_text(yaml.safe_dump({"devices": vd.devices}, sort_keys=False))
    mark = vd.log_mark()
    vd.start()
    vd.wait_log(mark, r"a socket passed by socket activation \(.*gone\.sock, name 'gone'\) matches no device")


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="systemd-socket-activate is not installed "
                    "(package systemd)")
def test_systemd_socket_activate_starts_vhostd_on_the_first_connection(tmp_path):
    sock = tmp_path / "d0.sock"
    (tmp_path / "vhostd.yaml").write_text(
        f"devices:\n  - {{name: d0, type: blk, socket: {sock}, path: {tmp_path / 'd0.img'}, size: 4M}}\n")
    log = open(tmp_path / "vhostd.log", "wb")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    act = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), "--fdname=d0",
                            sys.executable, "-m", "vhostd", "serve", "--config", str(tmp_path / "vhostd.yaml")],
                           stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: sock.exists(), 10, what="systemd-socket-activate to listen")

        class Where:  # what Guest needs of a daemon here: the socket path
            @staticmethod
            def socket(name: str) -> str:
                return str(sock)

        g = Guest(Where, "d0")  # this connection starts vhostd
        drv = g.blk(0)
        assert drv.write(0, DATA) == BLK_S_OK
        assert drv.read(0, 4096) == (BLK_S_OK, DATA)
        g.close(wait=False)
    finally:
        act.terminate()
        act.wait(10)
    text = (tmp_path / "vhostd.log").read_text()
    assert "d0: listening on" in text and "(passed by socket activation)" in text, text
    assert "Traceback" not in text, text


def test_listen_fds_are_only_taken_by_the_pid_they_are_for():
    from vhostd.systemd import listen_fds

    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "d0"}
    assert listen_fds(env) == [] and env == {}  # and no child inherits them
    assert listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "many"}) == []
