"""pytest fixtures and hooks for guest tests; tests/conftest.py re-exports them.

    @pytest.mark.qemu
    def test_x(qemu_guest, storage_daemon, tmp_path):
        qsd = storage_daemon(size="64M")           # sparse image in tmp_path, started
        g = qemu_guest("mkfs.ext4 -q /dev/vda", disks=[qsd.socket])
        assert g.run() == 0, g.console_tail()

Tests marked `qemu` are skipped only when qemu-system-x86_64 cannot run; the
guest image is built (or taken from the cache) by the `guest_image` fixture.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .build_guest import GuestImage, ensure_guest_image
from .qemu import QemuGuest, qemu_available
from .qsd import StorageDaemon


@functools.lru_cache(maxsize=None)
def _qemu_status() -> tuple[bool, str]:
    return qemu_available()


def require_qemu() -> None:
    ok, why = _qemu_status()
    if not ok:
        pytest.skip(f"QEMU unavailable: {why}")


def pytest_report_header(config):
    ok, why = _qemu_status()
    return f"qemu: {why}" if ok else f"qemu: UNAVAILABLE, qemu tests will be skipped: {why}"


def pytest_runtest_setup(item):
    if item.get_closest_marker("qemu") is not None:
        require_qemu()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """Kernel + base initramfs; built on first use (cold: a few seconds + download)."""
    require_qemu()
    return ensure_guest_image()


@pytest.fixture
def qemu_guest(guest_image, tmp_path):
    """Factory: qemu_guest(script, disks=..., **kw) -> QemuGuest (not started).

    Each guest gets its own directory under tmp_path (console.log, qemu.log,
    qemu.cmd are kept there for post-mortems); all are killed at teardown.
    """
    guests: list[QemuGuest] = []

    def make(script: str, disks=(), **kw) -> QemuGuest:
        kw.setdefault("workdir", tmp_path / f"guest{len(guests)}")
        kw.setdefault("image", guest_image)
        g = QemuGuest(script, disks, **kw)
        guests.append(g)
        return g

    yield make
    for g in guests:
        g.close()


@pytest.fixture
def sock_dir(tmp_path):
    """A directory for unix sockets: tmp_path when its path is short enough for
    sun_path (107 bytes, with room for a file name), else a short temp dir."""
    if len(str(tmp_path)) <= 80:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="vhostd-sock-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def storage_daemon(tmp_path, sock_dir):
    """Factory: storage_daemon(size="64M" | image=path, num_queues=None, extra_exports=0) -> started StorageDaemon.

    Creates a sparse raw image in tmp_path unless `image` is given; the socket
    goes to sock_dir.  extra_exports: more sockets on the same image
    (d.extra_sockets), e.g. for a live-migration destination.
    """
    daemons: list[StorageDaemon] = []

    def make(size: str | int = "64M", *, image: str | os.PathLike | None = None,
             num_queues: int | None = None, name: str | None = None, extra_exports: int = 0) -> StorageDaemon:
        name = name or f"qsd{len(daemons)}"
        if image is None:
            image = tmp_path / f"{name}.img"
            with open(image, "wb") as f:
                f.truncate(_parse_size(size))
        sock = sock_dir / f"{name}.sock"
        extra = [sock_dir / f"{name}-{i + 1}.sock" for i in range(extra_exports)]
        d = StorageDaemon(image, sock, num_queues=num_queues, log=tmp_path / f"{name}.log", extra_sockets=extra)
        daemons.append(d)
        return d.start()

    yield make
    for d in daemons:
        d.stop()


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = size.strip().upper().removesuffix("IB").removesuffix("B")
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)
