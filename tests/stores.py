"""Real storage servers for tests: NBD servers (nbdkit with its plugins and
filters, qemu-nbd) over Unix sockets, and one Ceph cluster for the session
(tests/ceph.py), started, hung, killed and restarted by the tests; and the
data plane built as where their client libraries are missing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from ceph import TOOLS as CEPH_TOOLS, CephCluster


def wait_for(path: str, proc: subprocess.Popen, what: str, timeout: float = 10, log: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if log:
                with open(log, errors="replace") as f:
                    err += f.read()
            raise RuntimeError(f"{what} exited ({proc.returncode}): {err}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not make {path}")
        time.sleep(0.01)


class NbdServer:
    """An NBD export on a Unix socket.

    nbdkit: `plugin` with `args`, behind `filters` (each with its own
    key=value args in `args` too); `pause` adds the pause filter with a
    control socket (pause()/resume()).  qemu-nbd: serves `image` (raw).
    The socket stays at the same path across stop() and start()."""

    def __init__(self, *, plugin: str = "memory", args: tuple[str, ...] = ("64M",), filters: tuple[str, ...] = (),
                 pause: bool = False, qemu_nbd_image: str | None = None, readonly: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="vd-nbd-", dir="/tmp")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.ctl = os.path.join(self.dir, "ctl.sock")
        self.plugin, self.args, self.filters = plugin, tuple(args), tuple(filters)
        self.pause_filter = pause
        self.image = qemu_nbd_image
        self.readonly = readonly
        self.proc: subprocess.Popen | None = None
        self.paused = False

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def command(self) -> list[str]:
        if self.image is not None:
            return ["qemu-nbd", "-k", self.sock, "-f", "raw", "--persistent", "--shared=16", "--cache=none",
                    "--aio=threads", *(["--read-only"] if self.readonly else []), self.image]
        cmd = ["nbdkit", "-f", "-U", self.sock, *(["--readonly"] if self.readonly else [])]
        filters = list(self.filters) + (["pause"] if self.pause_filter else [])
        cmd += [f"--filter={f}" for f in filters]
        cmd += [self.plugin, *self.args]
        if self.pause_filter:
            cmd.append(f"pause-control={self.ctl}")
        return cmd

    def start(self) -> "NbdServer":
        for path in (self.sock, self.ctl):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.log = os.path.join(self.dir, "server.log")
        with open(self.log, "ab") as log:  # a file, not a pipe: a chatty server must never block on it
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_for(self.sock, self.proc, self.command()[0], log=self.log)
        self.paused = False
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Gone at once, as a crashed server or a lost network."""
        if self.proc is not None:
            self.paused = False
            self.stop(signal.SIGKILL)

    def _control(self, cmd: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.ctl)
            s.sendall(cmd)
            s.recv(1)

    def pause(self) -> None:
        """Every request from now on waits, the connection stays up."""
        self._control(b"p")
        self.paused = True

    def resume(self) -> None:
        self._control(b"r")
        self.paused = False

    def close(self) -> None:
        self.kill()  # nobody needs it to finish gracefully
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def nbd_server(vhostd_factory):
    """Factory: nbd_server(**NbdServer kwargs) -> a started server.  It
    depends on vhostd_factory so that its servers are torn down (resumed,
    stopped) first: a stopping daemon never waits on a paused server."""
    if not shutil.which("nbdkit") or not shutil.which("qemu-nbd"):
        pytest.fail("nbdkit and qemu-nbd are missing: run scripts/test-deps.sh")
    servers: list[NbdServer] = []

    def make(**kw) -> NbdServer:
        s = NbdServer(**kw)
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="session")
def ceph_cluster():
    """One Ceph cluster (a monitor and a bluestore OSD, so that the OSD can be
    killed and restarted without losing data) for every test of the session;
    each test makes its own images."""
    missing = [t for t in CEPH_TOOLS if not shutil.which(t)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/test-deps.sh")
    cluster = CephCluster("bluestore")
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture
def osd(ceph_cluster):
    """The cluster's OSD, for a test to hang or kill; running again afterwards."""
    yield ceph_cluster
    if ceph_cluster.osd is None:
        ceph_cluster.start_osd()
    else:
        ceph_cluster.resume_osd()


@pytest.fixture(scope="session")
def build_without_store_libraries(tmp_path_factory):
    """The data plane built as on a machine without libnbd-dev and librbd-dev."""
    out = tmp_path_factory.mktemp("nolibs")
    env = {**os.environ, "VHOSTD_NO_NBD": "1", "VHOSTD_NO_RBD": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", f"from vhostd.native.build import make_builder; "
                    f"make_builder(absolute_paths=True).compile(tmpdir={str(out)!r})"],
                   check=True, env=env, cwd=root, capture_output=True)
    return next(out.glob("vhostd/_native*.so"))
