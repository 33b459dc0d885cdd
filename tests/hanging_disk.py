"""A disk image that really hangs, for tests: nbdkit's memory plugin behind
its pause filter, shown as a plain file by nbdfuse (FUSE).  pause() makes
every request to the file wait until resume(), in the kernel, exactly like
a network disk that stopped answering.

Use it with `direct: true`, so that every read reaches FUSE instead of the
page cache."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest


class HangingDisk:
    def __init__(self, size: str = "64M") -> None:
        self.dir = tempfile.mkdtemp(prefix="vd-hang-", dir="/tmp")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.ctl = os.path.join(self.dir, "ctl.sock")
        self.mnt = os.path.join(self.dir, "mnt")
        self.path = os.path.join(self.mnt, "nbd")
        os.mkdir(self.mnt)
        self.procs: list[subprocess.Popen] = []
        self.paused = False
        try:
            self._run(["nbdkit", "-f", "-U", self.sock, "--filter=pause", "memory", size,
                       f"pause-control={self.ctl}"], self.ctl)
            self._run(["nbdfuse", self.mnt, f"nbd+unix:///?socket={self.sock}"], self.path)
        except BaseException:
            self.close()
            raise

    def _run(self, cmd: list[str], appears: str) -> None:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(p)
        deadline = time.monotonic() + 10
        while not os.path.exists(appears):
            if p.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited ({p.returncode}): {p.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[0]} did not make {appears}")
            time.sleep(0.01)

    def _control(self, cmd: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.ctl)
            s.sendall(cmd)
            s.recv(1)

    def pause(self) -> None:
        """Every request from now on waits (those running finish first)."""
        self._control(b"p")
        self.paused = True

    def resume(self) -> None:
        self._control(b"r")
        self.paused = False

    def close(self) -> None:
        if self.paused:
            try:
                self.resume()
            except OSError:
                pass
        subprocess.run(["fusermount3", "-u", "-z", self.mnt], stderr=subprocess.DEVNULL, check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p.stderr:
                p.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def hanging_disk(vhostd_factory):
    """A fresh hanging disk per test.  It depends on vhostd_factory so that it
    is torn down (resumed) first: a daemon waiting on it can always stop."""
    if not shutil.which("nbdkit") or not shutil.which("nbdfuse"):
        pytest.fail("nbdkit and nbdfuse are missing: run scripts/test-deps.sh")
    disk = HangingDisk()
    yield disk
    disk.close()
