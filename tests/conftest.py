"""Shared fixtures for the test suite."""

import sys
from pathlib import Path

# Make tests/guest importable as `guest` however pytest imports this file.
_here = str(Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)

# QEMU guest harness (tests/guest/): fixtures guest_image, qemu_guest,
# storage_daemon, sock_dir; skips `qemu`-marked tests when QEMU cannot run.
pytest_plugins = ["guest.fixtures", "stores", "hanging_disk", "vmm_guests"]


def pytest_configure(config):
    config.addinivalue_line("markers", "qemu: boots a Linux guest under QEMU (TCG)")


# ======================================================================
# vhost-user protocol / virtio-blk / hostile-peer harness.
#
# Everything here is real: the `vhostd serve` subprocess, Unix sockets,
# memfd guest memory mapped by both sides, eventfds.  `Vhostd` adds log,
# fd and mapping inspection to DaemonProcess; `Guest` is one front-end
# session (handshake, memory table, queues) on one device.
# ======================================================================

import hashlib
import os
import re
import select
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path

import pytest

from daemon import DaemonProcess
from virtio_driver import BLK_S_OK, BLK_T_IN, BLK_T_OUT, BlkDriver, GuestMemory, PackedQueue, SplitQueue
from vhostd.frontend import BackendError, Frontend, make_eventfd
from vhostd.protocol.constants import F_PROTOCOL_FEATURES
from vhostd.virtio import F_RING_EVENT_IDX, F_RING_PACKED

STATUS_NEEDS_RESET = 0x40


def wait_until(pred, timeout: float = 5.0, interval: float = 0.002, what: str = "condition"):
    """Poll `pred` until it returns something true; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for the daemon's HTTP listeners)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readable(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def eventfd_take(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def fd_is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


class Vhostd(DaemonProcess):
    """The real daemon plus what tests need to look inside it from outside."""

    def __init__(self, workdir: Path, sockdir: str, devices: list[dict], daemon: dict | None = None,
                 prefix: list[str] | tuple[str, ...] = (), vms: list[dict] | None = None) -> None:
        for d in devices:
            d.setdefault("type", "blk")
            d.setdefault("socket", os.path.join(sockdir, d["name"] + ".sock"))
            if d["type"] != "blk" or d.get("backend", "file") != "file":
                continue
            d.setdefault("path", d["name"] + ".img")
            if not (Path(workdir) / d["path"]).exists():
                d.setdefault("size", "4M")
        super().__init__(workdir, devices, daemon, prefix, vms)

    # ------------------------------------------------------------ files
    def image(self, name: str) -> Path:
        for d in self.devices:
            if d["name"] == name:
                return (self.workdir / d["path"]).resolve()
        raise KeyError(name)

    def read_image(self, name: str, offset: int, length: int) -> bytes:
        with open(self.image(name), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def write_image(self, name: str, offset: int, data: bytes) -> None:
        with open(self.image(name), "r+b") as f:
            f.seek(offset)
            f.write(data)

    def image_digest(self, name: str) -> str:
        return hashlib.sha256(self.image(name).read_bytes()).hexdigest()

    # ------------------------------------------------------------ log
    def log_mark(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, mark: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def log_lines(self, mark: int, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.log_since(mark).splitlines() if rx.search(line)]

    def wait_log(self, mark: int, pattern: str, count: int = 1, timeout: float = 5.0) -> list[str]:
        try:
            return wait_until(lambda: (l := self.log_lines(mark, pattern)) and len(l) >= count and l,
                              timeout, what=f"{count} log line(s) matching {pattern!r}")
        except TimeoutError:
            raise AssertionError(f"no log line matching {pattern!r} in:\n{self.log_since(mark)}") from None

    # ------------------------------------------------------------ process
    @property
    def pid(self) -> int:
        return self.proc.pid

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def memfd_mappings(self, tag: str = "vhostd-test-guest") -> int:
        with open(f"/proc/{self.pid}/maps") as f:
            return sum(1 for line in f if tag in line)

    def session_idle(self, name: str) -> bool:
        """True when every session the device accepted has ended."""
        log = self.log()
        return log.count(f"{name}: front-end connected") == log.count(f"{name}: session ended")

    def wait_session_idle(self, name: str, timeout: float = 5.0) -> None:
        wait_until(lambda: self.session_idle(name), timeout, what=f"the session on {name} to end")

    def assert_alive(self) -> None:
        assert self.alive(), f"vhostd died (status {self.proc.returncode}):\n{self.log()}"

    def stop(self, timeout: float = 10.0) -> int:
        self.stopped_on_purpose = True
        return super().stop(timeout)

    def finish(self) -> None:
        """Stop; the daemon must exit 0 and never have logged a traceback."""
        alive = self.alive() or getattr(self, "stopped_on_purpose", False)
        status = self.stop()
        log = self.log()
        assert alive, f"vhostd was already dead (status {status}):\n{log}"
        assert status == 0, f"vhostd exited with {status}:\n{log}"
        assert "Traceback" not in log, log

    # ------------------------------------------------------------ sessions
    def connect(self, name: str, **kw) -> "Guest":
        return Guest(self, name, **kw)


def connect_frontend(path: str, timeout: float = 5.0) -> tuple[Frontend, int]:
    """Connect and GET_FEATURES.  While the daemon still holds the previous
    session it closes new connections at once; retry until it is free."""
    deadline = time.monotonic() + timeout
    while True:
        fe = Frontend(path, timeout=timeout)
        try:
            return fe, fe.get_features()
        except (BackendError, ConnectionError):
            fe.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


class _UsedEvent:
    """Like a real driver with EVENT_IDX, ask for an interrupt on the next
    completion each time the used ring has been consumed (split: used_event
    = last seen; packed: a DESC event at the next used position).  Set
    auto_used_event = False to drive it by hand."""

    auto_used_event = True

    def poll_used(self):
        out = super().poll_used()
        while self.auto_used_event:
            self.set_used_event(self.last_used)
            if not self.has_used():
                break
            out += super().poll_used()  # completed before the event was written
        return out


class DriverQueue(_UsedEvent, SplitQueue):
    """SplitQueue that asks for an interrupt on the next completion (_UsedEvent)."""


class PackedDriverQueue(_UsedEvent, PackedQueue):
    """PackedQueue that asks for an interrupt on the next completion (_UsedEvent),
    when EVENT_IDX was negotiated (else the driver area stays ENABLE)."""


class Guest:
    """One front-end session on one device: handshake, memory, queues.

    features: mask of offered virtio features to ack (None: all offered
              but the packed ring layout, which takes packed=True).
    protocol: mask of offered protocol features to ack (None: all).
    layout:   GuestMemory layout [(gpa, size), ...] (None: one 16 MiB region).
    packed:   ack VIRTIO_F_RING_PACKED (if offered): queue() lays out packed rings.
    """

    def __init__(self, vd: Vhostd, name: str, *, features: int | None = None, protocol: int | None = None,
                 layout=None, mem_size: int = 16 << 20, handshake: bool = True, packed: bool = False) -> None:
        self.vd = vd
        self.name = name
        self.fe, self.offered = connect_frontend(vd.socket(name))
        self.queues: list[SplitQueue | PackedQueue] = []
        self.extra_fds: list[int] = []
        self.mem: GuestMemory | None = None
        self.closed = False
        if handshake:
            self.fe.set_owner()
            pf = self.fe.get_protocol_features()
            self.fe.set_protocol_features(pf if protocol is None else pf & protocol)
            acked = self.offered if features is None else self.offered & features
            if not packed:
                acked &= ~(1 << F_RING_PACKED)
            self.fe.set_features(acked)
            self.features = acked
            self.mem = GuestMemory(layout, mem_size)
            self.mem.give_to(self.fe)

    def eventfd(self) -> int:
        fd = make_eventfd()
        self.extra_fds.append(fd)
        return fd

    @property
    def packed(self) -> bool:
        return bool(getattr(self, "features", 0) & (1 << F_RING_PACKED))

    def queue(self, index: int = 0, size: int = 128, *, kick: bool = True, enable: bool = True, region: int = 0,
              arena: int = 1 << 20, base: int | None = None, err: bool = True) -> SplitQueue | PackedQueue:
        """Lay out a ring (packed if negotiated, else split) in guest memory
        and start it on the device.  base: where a resumed ring stands (split:
        the avail and used index; packed: position | wrap counter << 15).
        q.err is the queue's SET_VRING_ERR eventfd (or None)."""
        if self.packed:
            q = PackedDriverQueue(self.mem, size, region, arena)
            q.event_idx = q.auto_used_event = bool(self.features & (1 << F_RING_EVENT_IDX))
            if base is not None:
                q.resume_at(base & 0x7FFF, base >> 15 & 1)
        else:
            q = DriverQueue(self.mem, size, region, arena)
            if base is not None:
                # A resumed ring: the driver's indices and the used idx in memory agree on `base`.
                q.avail_idx = q.last_used = base
                q.set_avail_idx(base)
                self.mem.write(q.used + 2, struct.pack("<H", base))
        q.err = self.eventfd() if err else None
        if err:
            self.fe.set_vring_err(index, q.err)
        q.attach(self.fe, index, enable=enable, kick=kick)
        q.index = index
        self.queues.append(q)
        return q

    def blk(self, index: int = 0, **kw) -> BlkDriver:
        return BlkDriver(self.queue(index, **kw))

    def status(self) -> int:
        return self.fe.get_status()

    def close(self, wait: bool = True) -> None:
        """Disconnect; by default wait until the daemon has ended the session."""
        if self.closed:
            return
        self.closed = True
        self.fe.close()
        if wait and self.vd.alive():
            self.vd.wait_session_idle(self.name)
        for q in self.queues:
            q.close()
        for fd in self.extra_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if self.mem is not None:
            self.mem.close()


def wait_broken(q: SplitQueue | PackedQueue, timeout: float = 5.0) -> None:
    """The device reports a broken queue on the vring err eventfd."""
    assert q.err is not None
    assert readable(q.err, timeout), "vring err eventfd was not signalled"
    assert eventfd_take(q.err) >= 1


def blk_roundtrip(vd: Vhostd, drv: BlkDriver, sector: int, length: int = 4096, name: str | None = None) -> None:
    """Write random data, read it back through the device, check the image file."""
    data = os.urandom(length)
    assert drv.write(sector, data) == BLK_S_OK
    status, back = drv.read(sector, length)
    assert status == BLK_S_OK and back == data
    if name is not None:
        assert vd.read_image(name, sector * 512, length) == data


@pytest.fixture
def sockdir():
    """AF_UNIX paths are limited to 107 bytes: keep sockets in a short dir."""
    path = tempfile.mkdtemp(prefix="vd-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vhostd_factory(tmp_path, sockdir):
    """Start `vhostd serve` on the given devices (function scope).  At teardown
    the daemon must stop with status 0 and a log free of tracebacks."""
    started: list[Vhostd] = []

    def start(devices: list[dict], daemon: dict | None = None, workdir: Path | None = None,
              prefix: list[str] | tuple[str, ...] = (), activate: tuple[str, ...] = ()) -> Vhostd:
        """activate: devices whose sockets the test binds and passes (socket activation)."""
        wd = workdir or tmp_path / f"vhostd{len(started)}"
        wd.mkdir(exist_ok=True)
        vd = Vhostd(wd, sockdir, devices, daemon, prefix)
        for name in activate:
            vd.activate(name)
        started.append(vd)
        return vd.start()

    yield start
    for vd in started:
        vd.finish()


@pytest.fixture(scope="module")
def module_vhostd_factory(tmp_path_factory):
    """Like vhostd_factory, but one daemon serves a whole test module."""
    started: list[Vhostd] = []
    sock = tempfile.mkdtemp(prefix="vd-", dir="/tmp")

    def start(devices: list[dict], daemon: dict | None = None, images: dict[str, bytes] | None = None,
              vms: list[dict] | None = None) -> Vhostd:
        wd = tmp_path_factory.mktemp("vhostd")
        for name, content in (images or {}).items():
            (wd / f"{name}.img").write_bytes(content)
        vd = Vhostd(wd, sock, devices, daemon, vms=vms)
        started.append(vd)
        return vd.start()

    yield start
    try:
        for vd in started:
            vd.finish()
    finally:
        shutil.rmtree(sock, ignore_errors=True)


__all__ = [
    "BLK_S_OK", "BLK_T_IN", "BLK_T_OUT", "F_PROTOCOL_FEATURES", "STATUS_NEEDS_RESET", "Guest", "Vhostd",
    "blk_roundtrip", "connect_frontend", "eventfd_take", "fd_is_closed", "free_port", "readable", "wait_broken",
    "wait_until",
]


# ======================================================================
# vhost-user-net harness (tests/net/): DPDK testpmd as reference peer,
# network namespaces with TAP/veth.  Fixtures testpmd, netns; `dpdk`-marked
# tests are skipped when dpdk-testpmd is not installed.
# ======================================================================

pytest_plugins = [*pytest_plugins, "net.fixtures"]

_pytest_configure_before_net = pytest_configure


def pytest_configure(config):  # noqa: F811 - extends the hook defined above
    _pytest_configure_before_net(config)
    config.addinivalue_line("markers", "dpdk: uses DPDK dpdk-testpmd as vhost-user-net peer")


# ======================================================================
# vhostd's VMM (tests/test_vmm.py): KVM guests; skipped when /dev/kvm is absent.
# ======================================================================

_pytest_configure_before_kvm = pytest_configure


def pytest_configure(config):  # noqa: F811 - extends the hook defined above
    _pytest_configure_before_kvm(config)
    config.addinivalue_line("markers", "kvm: runs a guest under vhostd's VMM (needs /dev/kvm)")
