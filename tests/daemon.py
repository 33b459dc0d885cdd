"""Run the real `vhostd serve` in a subprocess for tests."""

from __future__ import annotations

import os
import signal
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
                 prefix: list[str] | tuple[str, ...] = ()) -> None:
        """prefix: command words before the daemon's, e.g. ["ip", "netns", "exec", NS]."""
        self.prefix = list(prefix)
        self.workdir = Path(workdir)
        self.config_path = self.workdir / "vhostd.yaml"
        self.log_path = self.workdir / "vhostd.log"
        doc = {"devices": devices}
        if daemon:
            doc["daemon"] = daemon
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.devices = devices
        self.proc: subprocess.Popen | None = None

    def socket(self, name: str) -> str:
        for d in self.devices:
            if d["name"] == name:
                return str((self.workdir / d["socket"]).resolve())
        raise KeyError(name)

    def start(self, timeout: float = 15.0) -> DaemonProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "vhostd", "serve", "--config", str(self.config_path), "--log-level", "debug"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(self.socket(d["name"])) for d in self.devices):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vhostd exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vhostd did not create its sockets:\n{self.log()}")
            time.sleep(0.02)
        return self

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
