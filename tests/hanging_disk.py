"""A disk image that really hangs, for tests: nbdkit's memory plugin behind
its pause filter (tests/stores.py), shown as a plain file by nbdfuse (FUSE).
pause() makes every request to the file wait until resume(), in the kernel,
exactly like a network disk that stopped answering.

Use it with `direct: true`, so that every read reaches FUSE instead of the
page cache."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from stores import NbdServer, wait_for


class HangingDisk:
    def __init__(self, size: str = "64M") -> None:
        self.server = NbdServer(args=(size,), pause=True).start()
        self.mnt = os.path.join(self.server.dir, "mnt")
        self.path = os.path.join(self.mnt, "nbd")
        os.mkdir(self.mnt)
        self.fuse = subprocess.Popen(["nbdfuse", self.mnt, self.server.uri], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(self.path, self.fuse, "nbdfuse")
        except BaseException:
            self.close()
            raise

    @property
    def paused(self) -> bool:
        return self.server.paused

    def pause(self) -> None:
        """Every request from now on waits (those running finish first)."""
        self.server.pause()

    def resume(self) -> None:
        self.server.resume()

    def close(self) -> None:
        if self.server.paused:
            try:
                self.server.resume()
            except OSError:
                pass
        subprocess.run(["fusermount3", "-u", "-z", self.mnt], stderr=subprocess.DEVNULL, check=False)
        if self.fuse.poll() is None:
            self.fuse.terminate()
            try:
                self.fuse.wait(5)
            except subprocess.TimeoutExpired:
                self.fuse.kill()
                self.fuse.wait()
        if self.fuse.stderr:
            self.fuse.stderr.close()
        self.server.close()


@pytest.fixture
def hanging_disk(vhostd_factory):
    """A fresh hanging disk per test.  It depends on vhostd_factory so that it
    is torn down (resumed) first: a daemon waiting on it can always stop."""
    if not shutil.which("nbdkit") or not shutil.which("nbdfuse"):
        pytest.fail("nbdkit and nbdfuse are missing: run scripts/test-deps.sh")
    disk = HangingDisk()
    yield disk
    disk.close()
