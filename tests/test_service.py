"""Running under systemd: sd_notify over a real datagram socket (path and
abstract), the watchdog, journald's log format, SIGTERM, and the unit file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon import DaemonProcess

REPO = Path(__file__).resolve().parent.parent


class NotifySocket:
    """What systemd does: a SOCK_DGRAM socket that collects notifications."""

    def __init__(self, address: str) -> None:
        self.address = address  # the NOTIFY_SOCKET value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages:
                if key in m and (value is None or m[key] == value):
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} notification; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def close(self) -> None:
        self.sock.close()


def daemon(tmp_path, env: dict[str, str], stderr_file: Path | None = None, n: int = 3) -> DaemonProcess:
    devices = [{"name": f"d{i}", "type": "blk", "socket": f"d{i}.sock", "path": f"d{i}.img", "size": "1M"}
               for i in range(n)]
    d = DaemonProcess(tmp_path, devices, daemon={"workers": 1})
    cmd = [sys.executable, "-m", "vhostd", "serve", "--config", str(d.config_path)]
    out = open(stderr_file or d.log_path, "ab")
    d.proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=tmp_path, env={**os.environ, **env})
    d._log = out
    return d


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_status_reload_stopping(tmp_path, kind):
    address = str(tmp_path / "notify") if kind == "path" else f"@vhostd-test-{os.getpid()}-{time.monotonic_ns()}"
    ns = NotifySocket(address)
    d = daemon(tmp_path, {"NOTIFY_SOCKET": address})
    try:
        ready = ns.wait_for("READY", "1")
        # READY comes only once every device listens.
        assert all((tmp_path / f"d{i}.sock").exists() for i in range(3))
        assert ready.get("STATUS") == "serving 3 device(s), 0 connected"
        d.proc.send_signal(signal.SIGHUP)
        reloading = ns.wait_for("RELOADING", "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert sum(1 for m in ns.messages if m.get("READY") == "1") >= 1
        ns.messages.clear()
        ns.wait_for("READY", "1")  # the reload ends with READY=1 again
        d.proc.send_signal(signal.SIGTERM)
        ns.wait_for("STOPPING", "1")
        assert d.proc.wait(10) == 0
        assert not any((tmp_path / f"d{i}.sock").exists() for i in range(3))
    finally:
        d.kill()
        ns.close()


def collect(ns: NotifySocket, seconds: float) -> list[dict[str, str]]:
    end = time.monotonic() + seconds
    got = []
    while (left := end - time.monotonic()) > 0:
        ns.sock.settimeout(left)
        try:
            data = ns.sock.recv(4096).decode()
        except socket.timeout:
            break
        got.append(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))
    return got


def test_watchdog_pings(tmp_path):
    address = str(tmp_path / "notify")
    ns = NotifySocket(address)
    d = daemon(tmp_path, {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}, n=1)
    try:
        ns.wait_for("READY", "1")
        pings = [m for m in collect(ns, 1.5) if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 4, pings  # every 100 ms (half of WATCHDOG_USEC)
    finally:
        assert d.stop() == 0
        ns.close()


def test_watchdog_for_another_pid_is_not_ours(tmp_path):
    address = str(tmp_path / "notify")
    ns = NotifySocket(address)
    d = daemon(tmp_path, {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}, n=1)
    try:
        ns.wait_for("READY", "1")
        assert not any("WATCHDOG" in m for m in collect(ns, 0.6))
    finally:
        assert d.stop() == 0
        ns.close()


def test_journal_format_under_systemd(tmp_path):
    err = tmp_path / "stderr"
    err.touch()
    st = os.stat(err)
    d = daemon(tmp_path, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stderr_file=err, n=1)
    try:
        deadline = time.monotonic() + 10
        while "listening on" not in err.read_text():
            assert time.monotonic() < deadline and d.proc.poll() is None, err.read_text()
            time.sleep(0.02)
    finally:
        assert d.stop() == 0
    lines = err.read_text().splitlines()
    assert lines and all(re.match(r"<[2-7]>", line) for line in lines), lines
    assert any(line.startswith("<6>vhostd.device: d0: listening on") for line in lines), lines
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), lines


def test_text_format_without_systemd(tmp_path):
    d = daemon(tmp_path, {"JOURNAL_STREAM": "1:2"}, n=1)  # not our stderr: text
    try:
        deadline = time.monotonic() + 10
        while "listening on" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.02)
    finally:
        assert d.stop() == 0
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO vhostd.device: d0: listening on", d.log(), re.M)


def test_unit_files_verify(tmp_path):
    """vhostd.service and vhostd.socket, together; the socket unit listens
    on the device sockets of the config the service runs."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (package systemd)")
    unit = (REPO / "config" / "vhostd.service").read_text()
    # verify wants the Exec binaries to exist: point them at this checkout's vhostd.
    exe = shutil.which("vhostd") or str(Path(sys.executable).with_name("vhostd"))
    unit = unit.replace("/usr/local/bin/vhostd", exe)
    path = tmp_path / "vhostd.service"
    path.write_text(unit)
    sockets = (REPO / "config" / "vhostd.socket").read_text()
    (tmp_path / "vhostd.socket").write_text(sockets)
    out = subprocess.run(["systemd-analyze", "verify", str(path), str(tmp_path / "vhostd.socket")],
                         capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if re.search(r"vhostd\.(service|socket)", line)
                and "Failed to" not in re.split(r"vhostd\.(?:service|socket)", line, maxsplit=1)[0]]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    from vhostd.config import load_config

    cfg = load_config(REPO / "config" / "vhostd-systemd.yaml", check_files=False)
    assert cfg.daemon.control_socket
    listen = re.findall(r"^ListenStream=(\S+)", sockets, re.M)
    assert listen == [d.socket for d in cfg.devices]


def test_sigterm_completes_what_the_guest_submitted(vhostd_factory):
    """Requests published right before SIGTERM all get their used entry and
    land in the image; the daemon exits 0 and removes its sockets."""
    from conftest import Guest
    from virtio_driver import BLK_T_OUT

    vd = vhostd_factory([{"name": "d0", "size": "4M"}, {"name": "d1", "size": "4M"}])
    g = Guest(vd, "d0")
    drv = g.blk(size=256)
    heads = [drv.submit(BLK_T_OUT, 8 * i, bytes([i + 1]) * 4096)[0] for i in range(60)]
    vd.stopped_on_purpose = True
    vd.proc.send_signal(signal.SIGTERM)
    assert vd.proc.wait(10) == 0
    done = {u.head for u in drv.q.poll_used()}
    assert done == set(heads)
    for i in range(60):
        assert vd.read_image("d0", 8 * i * 512, 4096) == bytes([i + 1]) * 4096
    assert not os.path.exists(vd.socket("d0")) and not os.path.exists(vd.socket("d1"))
    assert "Traceback" not in vd.log()
    g.close(wait=False)
