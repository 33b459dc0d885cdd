"""Run the real `vhostd serve` in a subprocess for tests."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml


class DaemonProcess:
    """`vhostd serve` on a config written from Python data.

    devices: list of dicts as they would appear in the YAML.  Relative paths
    are resolved against `workdir`.  The log goes to workdir/vhostd.log.
    """

    def __init__(self, workdir: Path, devices: list[dict], daemon: dict | None = None,
                 prefix: list[str] | tuple[str, ...] = (), vms: list[dict] | None = None) -> None:
        """prefix: command words before the daemon's, e.g. ["ip", "netns", "exec", NS].
        vms: the config's `vms:` (VMs of the built-in VMM)."""
        self.prefix = list(prefix)
        self.workdir = Path(workdir)
        self.config_path = self.workdir / "vhostd.yaml"
        self.log_path = self.workdir / "vhostd.log"
        doc = {"devices": devices}
        if daemon:
            doc["daemon"] = daemon
        if vms:
            doc["vms"] = vms
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.devices = devices
        self.proc: subprocess.Popen | None = None
        #: listening sockets handed to every start as systemd would
        #: (LISTEN_FDS, LISTEN_FDNAMES); the test holds them, like systemd.
        self.activation: list[tuple[str, socket.socket]] = []

    def activate(self, name: str) -> socket.socket:
        """Bind the device's socket here and pass it to the daemon at each
        start (socket activation)."""
        path = self.socket(name)
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(16)
        self.activation.append((name, sock))
        return sock

    def socket(self, name: str) -> str:
        for d in self.devices:
            if d["name"] == name:
                return str((self.workdir / d["socket"]).resolve())
        raise KeyError(name)

    def start(self, timeout: float = 15.0) -> DaemonProcess:
        self._log = open(self.log_path, "ab")
        n = len(self.activation)
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "vhostd", "serve", "--config", str(self.config_path), "--log-level", "debug"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir,
            preexec_fn=self._pass_sockets if n else None, pass_fds=range(3, 3 + n),
        )
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(self.socket(d["name"])) for d in self.devices):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vhostd exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vhostd did not create its sockets:\n{self.log()}")
            time.sleep(0.02)
        return self

    def _pass_sockets(self) -> None:
        """In the child, before exec: the sockets at fds 3.. and the
        variables naming them, as systemd does."""
        high = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 100) for _, sock in self.activation]
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i)
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(high)),
                          LISTEN_FDNAMES=":".join(name for name, _ in self.activation))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"vhostd did not stop on SIGTERM:\n{self.log()}")
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self._log.close()
