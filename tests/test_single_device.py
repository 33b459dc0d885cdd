"""One-device mode (`vhostd blk`, `vhostd net`, and the `vhostd-blk` /
`vhostd-net` programs): QEMU's back-end program conventions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Guest, wait_until
from nested.linux_vms import listening
from virtio_driver import BLK_S_OK

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA = b"one device".ljust(4096, b"-")


class At:
    """What Guest needs of a daemon: where the socket is (and whether it runs)."""

    def __init__(self, path: str, proc: subprocess.Popen) -> None:
        self.path, self.proc = path, proc

    def socket(self, name: str) -> str:
        return self.path

    def alive(self) -> bool:
        return self.proc.poll() is None


def start(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "vhostd"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    return out


@pytest.mark.parametrize("kind,btype", [("blk", "block"), ("net", "net")])
def test_capabilities_and_the_descriptor_agree(kind, btype):
    out = subprocess.run([str(BIN / f"vhostd-{kind}"), "--print-capabilities"], capture_output=True, text=True,
                         check=True).stdout
    caps = json.loads(out)
    assert caps["type"] == btype
    if kind == "blk":
        assert caps["features"] == ["read-only", "blk-file"]
    desc = json.loads((REPO / "config" / "vhost-user" / f"50-vhostd-{kind}.json").read_text())
    assert desc["type"] == btype and desc["binary"].endswith(f"/vhostd-{kind}") and desc["description"]


def test_blk_on_a_socket_path_serves_and_stops_cleanly(tmp_path, sockdir):
    path = os.path.join(sockdir, "one.sock")
    p = start(["blk", "--socket-path", path, "--blk-file", str(tmp_path / "d.img"), "--size", "4M"])
    wait_until(lambda: listening(path) or p.poll() is not None, 10, what="the socket")
    g = Guest(At(path, p), "blk0")
    drv = g.blk(0)
    assert drv.write(8, DATA) == BLK_S_OK
    g.close(wait=False)
    out = stop(p)
    assert "blk0: listening on " + path in out
    assert (tmp_path / "d.img").read_bytes()[8 * 512:8 * 512 + 4096] == DATA
    assert not os.path.exists(path)


def test_blk_on_an_inherited_listening_fd(tmp_path, sockdir):
    path = os.path.join(sockdir, "fd.sock")
    (tmp_path / "d.img").write_bytes(DATA + bytes(1 << 20))
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(4)
        fd = listener.fileno()
        p = start(["blk", "--fd", str(fd), "--blk-file", str(tmp_path / "d.img"), "--read-only"], pass_fds=[fd])
        g = Guest(At(path, p), "blk0")
        drv = g.blk(0)
        assert drv.read(0, 4096) == (BLK_S_OK, DATA)
        assert drv.write(0, bytes(4096)) != BLK_S_OK  # --read-only
        g.close(wait=False)
        out = stop(p)
    assert f"blk0: listening on {path} (passed by socket activation)" in out


@pytest.mark.parametrize("args,message", [
    (["blk", "--blk-file", "x.img"], "one of --socket-path or --fd is required"),
    (["blk", "--socket-path", "s.sock"], "--blk-file (the disk image) is required"),
    (["blk", "--socket-path", "s.sock", "--blk-file", "missing.img"], "--blk-file: image "),
    (["blk", "--socket-path", "s.sock", "--blk-file", "x.img", "--size", "1M", "--queues", "0"],
     "--queues: must be an integer from 1 to 64"),
    (["net", "--socket-path", "s.sock", "--backend", "carrier-pigeon"], "--backend: "),
    (["blk", "--fd", "0", "--blk-file", "x.img"], "--fd 0 is not a socket"),
])
def test_bad_options_fail_early_naming_the_option(tmp_path, args, message):
    r = subprocess.run([str(BIN / "vhostd"), *args], capture_output=True, text=True, cwd=tmp_path, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_an_fd_that_is_not_listening_is_refused(tmp_path):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        r = subprocess.run([str(BIN / "vhostd"), "blk", "--fd", str(a.fileno()), "--blk-file", "x.img"],
                           capture_output=True, text=True, cwd=tmp_path, pass_fds=[a.fileno()], timeout=30)
    assert r.returncode == 1 and "is not listening" in r.stderr, r.stderr
