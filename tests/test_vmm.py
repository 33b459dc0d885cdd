"""vhostd's VMM (vhostd/vmm) on the real /dev/kvm: payloads under the guest
ABI (guest-drivers/ABI.md), virtio-mmio devices served by the real daemon
and by qemu-storage-daemon, the Linux boot path.

Guests:
* tests/vmm/probe.c, compiled here: prints the boot info and each device's
  id (and a blk device's capacity), then exits with `exit=N`; `exits=N`
  does N port writes the VMM must handle, `crash=1` takes a page fault,
  `spin=1` spins forever without exiting.
* guest-drivers/build/selftest.elf (`make -C guest-drivers`), when the
  guest-drivers sources are there.
* The Debian cloud kernel cached by tests/guest/build_guest.py.

Everything is skipped only when /dev/kvm does not exist.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemon import DaemonProcess
from vhostd.vmm.vm import hardware_virtualisation

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm does not exist on this machine"),
]

VM_RUN_TIMEOUT = 25  # seconds; each test stays well below 30 s


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def selftest_elf() -> Path:
    gd = ROOT / "guest-drivers"
    if not (gd / "Makefile").exists() or not (gd / "progs" / "selftest.c").exists():
        pytest.skip("guest-drivers/ has no selftest program yet")
    r = subprocess.run(["make", "-s", "-C", str(gd)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"make -C guest-drivers failed:\n{r.stdout}{r.stderr}"
    elf = gd / "build" / "selftest.elf"
    assert elf.exists()
    return elf


def write_vm_config(path: Path, vms: list[dict], devices: list[dict] | None = None) -> Path:
    doc: dict = {"vms": vms}
    if devices:
        doc["devices"] = devices
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def vm_run(config: Path, name: str, *extra: str, timeout: float = VM_RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhostd", "vm", "run", "--config", str(config), name,
                           "--timeout", str(timeout), *extra],
                          capture_output=True, text=True, timeout=timeout + 15, cwd=ROOT)


@pytest.fixture
def daemon(tmp_path, sockdir):
    """Start `vhostd serve` (the real daemon) on devices; at teardown it must
    stop with status 0 and without a traceback in its log."""
    started: list[DaemonProcess] = []

    def start(devices: list[dict]) -> DaemonProcess:
        for d in devices:
            d.setdefault("socket", os.path.join(sockdir, d["name"] + ".sock"))
        wd = tmp_path / f"vhostd{len(started)}"
        wd.mkdir()
        proc = DaemonProcess(wd, devices)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        status = proc.stop()
        log = proc.log()
        assert status == 0, log
        assert "Traceback" not in log, log


# ----------------------------------------------------------------------------- payload basics


def test_payload_console_and_exit_status(probe_elf, tmp_path):
    """The UART goes to stdout; `vhostd vm run` exits with the guest's status."""
    cfg = write_vm_config(tmp_path / "vm.yaml", [
        {"name": "p", "memory": "8M", "payload": str(probe_elf), "args": "exit=37 hello=1"},
        {"name": "big", "memory": "8M", "payload": str(probe_elf), "args": "exit=511"},
    ])
    r = vm_run(cfg, "p")
    assert r.returncode == 37, r.stdout + r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("probe: hello version=1 devices=0 memory=8388608 free=0x400000-0x800000"), r.stdout
    assert 'cmdline="exit=37 hello=1 tsc_khz=' in first  # the VMM passes the TSC rate
    assert r.stdout.endswith("probe: bye\n")
    # The exit code is the value written to port 0x501, & 0xff.
    assert vm_run(cfg, "big").returncode == 511 & 0xFF


def test_guest_exception_is_reported_not_a_silent_triple_fault(probe_elf, tmp_path):
    cfg = write_vm_config(tmp_path / "vm.yaml", [{"name": "c", "memory": "8M", "payload": str(probe_elf),
                                                  "args": "crash=1"}])
    r = vm_run(cfg, "c")
    assert r.returncode == 255, r.stdout + r.stderr
    assert "guest exception #PF page fault" in r.stderr and "cr2 0x10000000000" in r.stderr, r.stderr


def test_spinning_guest_is_stopped_by_timeout_and_by_sigterm(probe_elf, tmp_path):
    """A guest that never exits (CPL3 runs natively, no VM exits at all) is
    still stopped promptly: the VMM kicks its vCPU threads out of KVM_RUN.
    Two vCPUs: the second sits in the kernel waiting for INIT/SIPI."""
    cfg = write_vm_config(tmp_path / "vm.yaml", [{"name": "s", "memory": "8M", "vcpus": 2,
                                                  "payload": str(probe_elf), "args": "spin=1"}])
    t0 = time.monotonic()
    r = vm_run(cfg, "s", timeout=1)
    assert r.returncode == 124, r.stdout + r.stderr
    assert "timed out after 1 s" in r.stderr
    assert time.monotonic() - t0 < 10

    p = subprocess.Popen([sys.executable, "-m", "vhostd", "vm", "run", "--config", str(cfg), "s"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().startswith("probe: hello")
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 5
    finally:
        p.kill()
        p.wait()


def test_exit_round_trip_cost(probe_elf):
    """Measure what a guest exit handled in Python costs (printed with -s)."""
    from vhostd.config import VmConfig
    from vhostd.vmm import VirtualMachine

    n = 3000
    out = []
    vm = VirtualMachine(VmConfig(name="cost", memory=8 << 20, payload=str(probe_elf), args=f"exits={n} exit=5"),
                        console=out.append)
    assert vm.run() == 5
    assert vm.counts.by_port.get(0x80) == n
    per_exit = vm.run_time / vm.counts.pio
    print(f"\n{vm.counts.pio} PIO exits in {vm.run_time * 1e3:.1f} ms: {per_exit * 1e6:.1f} us per exit")
    assert per_exit < 1e-3


def test_bad_payload_is_refused_with_a_reason(tmp_path):
    bad = tmp_path / "notelf.bin"
    bad.write_bytes(b"\x7fELF" + bytes(60))
    cfg = write_vm_config(tmp_path / "vm.yaml", [{"name": "b", "memory": "8M", "payload": str(bad)}])
    r = vm_run(cfg, "b")
    assert r.returncode == 1
    assert "not a little-endian ELF64 file" in r.stderr, r.stderr
    r = vm_run(cfg, "nosuchvm")
    assert r.returncode == 1 and "no VM named 'nosuchvm' (VMs: b)" in r.stderr


# ----------------------------------------------------------------------------- devices


def test_blk_capacity_from_vhostd_config_space(probe_elf, tmp_path, daemon):
    """Config space reads are forwarded to the back-end (GET_CONFIG)."""
    size = 3 * 1024 * 1024 + 37 * 512
    vd = daemon([{"name": "d0", "type": "blk", "path": "d0.img", "size": size},
                 {"name": "n0", "type": "net", "backend": "loopback"}])
    cfg = write_vm_config(tmp_path / "vm.yaml", [{
        "name": "p", "memory": "16M", "payload": str(probe_elf), "args": "exit=3",
        "devices": [{"type": "blk", "socket": vd.socket("d0")}, {"type": "net", "socket": vd.socket("n0")}],
    }])
    r = vm_run(cfg, "p")
    assert r.returncode == 3, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "devices=2" in lines[0]
    assert lines[1] == f"probe: dev0 base=0xd0000000 irq=5 magic=0x74726976 version=2 id=2 capacity={size // 512}"
    assert lines[2] == "probe: dev1 base=0xd0001000 irq=6 magic=0x74726976 version=2 id=1"


def test_missing_backend_is_a_clear_error(probe_elf, tmp_path, sockdir):
    cfg = write_vm_config(tmp_path / "vm.yaml", [{
        "name": "p", "memory": "8M", "payload": str(probe_elf),
        "devices": [{"type": "blk", "socket": os.path.join(sockdir, "nobody.sock")}],
    }])
    t0 = time.monotonic()
    from vhostd.config import load_config
    from vhostd.vmm import VirtualMachine, VmError

    vm = VirtualMachine(load_config(cfg).vm("p"), connect_timeout=0.3)
    with pytest.raises(VmError, match="cannot connect to the vhost-user back-end at .*nobody.sock"):
        vm.start()
    assert time.monotonic() - t0 < 5


# ----------------------------------------------------------------------------- the transport, driven from Python

MMIO_MAGIC, STATUS, QSEL, QNUM, QREADY, ISR, IACK = 0x000, 0x070, 0x030, 0x038, 0x044, 0x060, 0x064
DF, DFSEL, GF, GFSEL = 0x010, 0x014, 0x020, 0x024
QDESC, QDRIVER, QDEVICE = 0x080, 0x090, 0x0A0


class MmioDriver:
    """A virtio-mmio driver in Python, talking to VhostUserMmioDevice the way
    the vCPU's MMIO exits would; kicks are written to the queue's kick
    eventfd directly (which is what KVM's ioeventfd does)."""

    def __init__(self, dev, mem) -> None:
        self.dev, self.mem = dev, mem

    def r32(self, off: int) -> int:
        return int.from_bytes(self.dev.read(off, 4), "little")

    def w32(self, off: int, value: int) -> None:
        self.dev.write(off, value.to_bytes(4, "little"))

    def w64(self, off: int, value: int) -> None:
        self.w32(off, value & 0xFFFFFFFF)
        self.w32(off + 4, value >> 32)

    def init(self, features: int) -> None:
        self.w32(STATUS, 0)
        assert self.r32(STATUS) == 0
        self.w32(STATUS, 1)
        self.w32(STATUS, 3)
        self.w32(GFSEL, 0)
        self.w32(GF, features & 0xFFFFFFFF)
        self.w32(GFSEL, 1)
        self.w32(GF, features >> 32)
        self.w32(STATUS, 0xB)
        assert self.r32(STATUS) == 0xB

    def queue(self, index: int, size: int, desc: int, avail: int, used: int) -> None:
        for gpa, length in ((desc, 16 * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)):
            self.mem.fill(gpa, length)
        self.w32(QSEL, index)
        self.w32(QNUM, size)
        self.w64(QDESC, desc)
        self.w64(QDRIVER, avail)
        self.w64(QDEVICE, used)
        self.w32(QREADY, 1)
        self.ring = (size, desc, avail, used)
        self.avail_idx = 0

    def blk_read(self, sector: int, length: int, base: int) -> tuple[int, bytes]:
        size, desc, avail, used = self.ring
        hdr, data, status = base, base + 0x1000, base + 0x1000 + length
        self.mem.write(hdr, struct.pack("<IIQ", 0, 0, sector))
        self.mem.write(status, b"\xff")
        for i, (addr, ln, flags) in enumerate(((hdr, 16, 1), (data, length, 3), (status, 1, 2))):
            self.mem.write(desc + 16 * i, struct.pack("<QIHH", addr, ln, flags, i + 1 if flags & 1 else 0))
        self.mem.write(avail + 4 + 2 * (self.avail_idx % size), struct.pack("<H", 0))
        self.avail_idx += 1
        self.mem.write(avail + 2, struct.pack("<H", self.avail_idx))
        os.eventfd_write(self.dev.queues[0].kick_fd, 1)
        deadline = time.monotonic() + 5
        while self.mem.read_u16(used + 2) != self.avail_idx:
            assert time.monotonic() < deadline, "the back-end did not complete the request"
            time.sleep(0.001)
        return self.mem.read(status, 1)[0], self.mem.read(data, length)


    def blk_read_packed(self, sector: int, length: int, base: int, buffer_id: int) -> tuple[int, bytes]:
        """One read on a packed ring (queue 0, set up with queue()), the
        first time round (wrap counter 1): a chain of three descriptors at
        positions 0..2, its first descriptor's flags written last."""
        size, desc, _, _ = self.ring
        hdr, data, status = base, base + 0x1000, base + 0x1000 + length
        self.mem.write(hdr, struct.pack("<IIQ", 0, 0, sector))
        self.mem.write(status, b"\xff")
        avail = 1 << 7  # AVAIL = wrap counter 1, USED = 0
        for i, (addr, ln, flags) in reversed(list(enumerate(((hdr, 16, 1), (data, length, 3), (status, 1, 2))))):
            self.mem.write(desc + 16 * i, struct.pack("<QIHH", addr, ln, buffer_id, flags | avail))
        os.eventfd_write(self.dev.queues[0].kick_fd, 1)
        deadline = time.monotonic() + 5
        while not self.mem.read_u16(desc + 14) & (1 << 15):  # USED = wrap counter 1
            assert time.monotonic() < deadline, "the back-end did not complete the request"
            time.sleep(0.001)
        used_id, used_len = struct.unpack("<HI", self.mem.read(desc + 12, 2) + self.mem.read(desc + 8, 4))
        assert used_id == buffer_id and used_len == length + 1
        return self.mem.read(status, 1)[0], self.mem.read(data, length)


def eventfd_count(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("eventfd-count:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"fd {fd} is not an eventfd")


@pytest.fixture
def transport():
    """A KVM VM with 16 MiB of memfd RAM, and a factory of virtio-mmio devices on it."""
    from vhostd.vmm import kvm
    from vhostd.vmm.virtio_mmio import VhostUserMmioDevice

    k = kvm.Kvm()
    vm = kvm.Vm(k)
    vm.create_irqchip()
    mem = kvm.GuestMemory(16 << 20)
    vm.add_memory(mem)
    devices = []

    def make(kind: str, socket: str) -> MmioDriver:
        dev = VhostUserMmioDevice(vm=vm, mem=mem, slot=len(devices), base=0xD0000000 + 0x1000 * len(devices),
                                  gsi=5 + len(devices), kind=kind, socket=socket)
        devices.append(dev)
        return MmioDriver(dev, mem)

    yield make
    for d in devices:
        d.close()
    vm.close()
    mem.close()
    k.close()


@pytest.fixture(params=["vhostd", "qemu-storage-daemon"])
def blk_backend(request, daemon, tmp_path, sockdir):
    """(image, socket, log) of a 1 MiB disk served by vhostd or by qemu-storage-daemon."""
    if request.param == "vhostd":
        vd = daemon([{"name": "d0", "type": "blk", "path": "d0.img", "size": "1M"}])
        yield vd.workdir / "d0.img", vd.socket("d0"), vd.log
        return
    from guest.qsd import QSD_BINARY, StorageDaemon

    if not shutil.which(QSD_BINARY):
        pytest.skip(f"{QSD_BINARY} is not installed")
    image = tmp_path / "q.img"
    image.write_bytes(bytes(1 << 20))
    with StorageDaemon(image, os.path.join(sockdir, "q.sock")) as qsd:
        yield image, str(qsd.socket), lambda: qsd.log
        assert qsd.proc.poll() is None, qsd.log


def test_transport_reset_stops_the_rings_and_the_device_restarts(transport, blk_backend):
    image, sock, log = blk_backend
    with open(image, "r+b") as f:
        f.seek(7 * 512)
        f.write(b"sector seven".ljust(512, b"."))
    drv = transport("blk", sock)
    assert drv.r32(MMIO_MAGIC) == 0x74726976
    drv.w32(DFSEL, 1)
    assert drv.r32(DF) & 1  # VIRTIO_F_VERSION_1
    for round_ in range(2):
        drv.init(1 << 32)
        drv.queue(0, 8, 0x100000, 0x101000, 0x102000)
        drv.w32(STATUS, 0xF)
        status, data = drv.blk_read(7, 512, 0x200000)
        assert status == 0 and data.startswith(b"sector seven"), round_
        # The back-end signalled the call eventfd (the ring asks for
        # interrupts); KVM's irqfd took the count at once.
        assert eventfd_count(drv.dev.queues[0].call_fd) == 0
        # Used buffers since the last InterruptACK show in InterruptStatus.
        assert drv.r32(ISR) & 1
        drv.w32(IACK, 1)
        assert drv.r32(ISR) == 0
        assert drv.dev.queues[0].started
        # Reset: GET_VRING_BASE stops the ring in the back-end; the next round
        # sets the device up again from scratch (ring base 0).
        drv.w32(STATUS, 0)
        assert drv.r32(STATUS) == 0 and not drv.dev.queues[0].started
        assert not drv.dev.broken
    if "<- SET_VRING_KICK" in log():  # vhostd logs each request at debug level
        assert log().count("<- SET_VRING_KICK") == 2 and log().count("<- GET_VRING_BASE") == 2, log()


def test_transport_packed_ring(transport, daemon):
    """A driver that acks RING_PACKED gets a packed ring in the back-end,
    started at position 0 with wrap counter 1, and InterruptStatus bit 0
    while it runs (no used index to watch)."""
    vd = daemon([{"name": "d0", "type": "blk", "path": "d0.img", "size": "1M"}])
    with open(vd.workdir / "d0.img", "r+b") as f:
        f.seek(3 * 512)
        f.write(b"sector three".ljust(512, b"."))
    drv = transport("blk", vd.socket("d0"))
    drv.w32(DFSEL, 1)
    assert drv.r32(DF) & (1 << 2)  # offered, because vhostd offers it
    for round_ in range(2):
        drv.init(1 << 32 | 1 << 34)
        drv.queue(0, 8, 0x100000, 0x101000, 0x102000)
        drv.w32(STATUS, 0xF)
        status, data = drv.blk_read_packed(3, 512, 0x200000, buffer_id=5)
        assert status == 0 and data.startswith(b"sector three"), round_
        assert drv.r32(ISR) & 1
        drv.w32(STATUS, 0)
        assert not drv.dev.queues[0].started and not drv.dev.broken
    assert drv.r32(ISR) == 0


def test_transport_bad_ring_address_sets_needs_reset(transport, daemon):
    vd = daemon([{"name": "d0", "type": "blk", "path": "d0.img", "size": "1M"}])
    drv = transport("blk", vd.socket("d0"))
    drv.init(1 << 32)
    drv.queue(0, 8, 0x100000, 0x101000, 0x102000)
    drv.w64(QDEVICE, 0x7FFFF000)  # far beyond the 16 MiB of RAM
    drv.w32(STATUS, 0xF)
    assert drv.r32(STATUS) & 0x40  # DEVICE_NEEDS_RESET
    assert not drv.dev.queues[0].started
    drv.w32(STATUS, 0)
    assert drv.r32(STATUS) == 0


def test_transport_refuses_features_it_did_not_offer(transport, daemon):
    vd = daemon([{"name": "d0", "type": "blk", "path": "d0.img", "size": "1M"}])
    drv = transport("blk", vd.socket("d0"))
    drv.w32(STATUS, 0)
    drv.w32(STATUS, 3)
    drv.w32(GFSEL, 1)
    drv.w32(GF, 1 | 1 << 1)  # VERSION_1 and ACCESS_PLATFORM, which the VMM never offers
    drv.w32(STATUS, 0xB)
    assert not drv.r32(STATUS) & 0x8  # FEATURES_OK did not stick


# ----------------------------------------------------------------------------- guest-drivers selftest


@pytest.mark.parametrize("ring", ["packed", "split"])
def test_selftest_against_vhostd_blk_and_net_loopback(selftest_elf, tmp_path, daemon, ring):
    """vhostd offers packed rings and the VMM passes that on: the selftest
    takes them unless told packed=0."""
    vd = daemon([{"name": "d0", "type": "blk", "path": "d0.img", "size": "32M", "queues": 4},
                 {"name": "n0", "type": "net", "backend": "loopback"}])
    cfg = write_vm_config(tmp_path / "vm.yaml", [{
        "name": "st", "memory": "64M", "payload": str(selftest_elf),
        "args": "net=loopback" + (" packed=0" if ring == "split" else ""),
        "devices": [{"type": "blk", "socket": vd.socket("d0")}, {"type": "net", "socket": vd.socket("n0")}],
    }])
    r = vm_run(cfg, "st", "--log-level", "info")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SELFTEST PASS" in r.stdout
    assert "blk0: PASS" in r.stdout and "net0: PASS" in r.stdout
    assert "net0: net=loopback sent=100 received=100 verified=100" in r.stdout
    assert f"ring={ring}" in r.stdout
    # The guest's InterruptStatus read and InterruptACK write were answered
    # by the C exit loop, with the state virtio_mmio.py keeps (packed rings
    # have no used index to watch: bit 0 stays set while they run).
    acked = "0x1 (packed rings: bit 0 kept set)" if ring == "packed" else "0x0"
    assert f"blk0: InterruptStatus 0x1, after InterruptACK {acked}" in r.stdout
    assert re.search(r"\d+ mmio \(and 3 answered in C\)", r.stderr), r.stderr


def test_selftest_against_qemu_storage_daemon(selftest_elf, tmp_path, sockdir):
    from guest.qsd import QSD_BINARY, StorageDaemon

    if not shutil.which(QSD_BINARY):
        pytest.skip(f"{QSD_BINARY} is not installed")
    img = tmp_path / "q.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    with StorageDaemon(img, os.path.join(sockdir, "q.sock")) as qsd:
        cfg = write_vm_config(tmp_path / "vm.yaml", [{
            "name": "st", "memory": "64M", "payload": str(selftest_elf), "args": "net=none",
            "devices": [{"type": "blk", "socket": str(qsd.socket)}],
        }])
        r = vm_run(cfg, "st")
        assert r.returncode == 0, r.stdout + r.stderr + qsd.log
        assert "blk0: PASS" in r.stdout and "SELFTEST PASS" in r.stdout
        assert qsd.proc.poll() is None, qsd.log


# ----------------------------------------------------------------------------- Linux


def cached_kernel() -> Path:
    cache = ROOT / "tests" / ".cache" / "guest"
    found = sorted(cache.glob("linux-image-*/bzImage"), key=lambda p: p.stat().st_mtime, reverse=True)
    if found:
        return found[0]
    try:
        from guest.build_guest import GuestBuildError, ensure_guest_image
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"no guest image builder: {e}")
    try:
        return ensure_guest_image().kernel
    except GuestBuildError as e:
        pytest.skip(f"no Linux kernel available: {e}")


def test_linux_reaches_its_early_console(tmp_path):
    """The bzImage path: boot_params, 64-bit entry, UART.  Under PVM the
    kernel runs emulated at CPL0, so only its first messages are expected."""
    kernel = cached_kernel()
    cfg = write_vm_config(tmp_path / "vm.yaml", [{
        "name": "linux", "memory": "256M", "kernel": str(kernel),
        "cmdline": "earlyprintk=serial,ttyS0 nokaslr console=ttyS0",
    }])
    p = subprocess.Popen([sys.executable, "-m", "vhostd", "vm", "run", "--config", str(cfg), "linux",
                          "--timeout", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    seen = b""
    try:
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 25
        while b"KASLR disabled" not in seen and time.monotonic() < deadline:
            if sel.select(0.5):
                chunk = os.read(p.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
        assert b"KASLR disabled: 'nokaslr' on cmdline." in seen, seen.decode(errors="replace") + p.stderr.read1().decode()
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 128 + signal.SIGTERM
        if not hardware_virtualisation():  # and it says why Linux gets no further here
            assert b"/dev/kvm is PVM" in p.stderr.read()
    finally:
        p.kill()
        p.wait()


# ----------------------------------------------------------------------------- vhostd serve with autostart VMs


def test_serve_runs_autostart_vms_next_to_its_devices(probe_elf, tmp_path, sockdir):
    """VMs with autostart: true run inside `vhostd serve`, on the devices it
    serves; their console goes to the log; SIGTERM stops the VMs too."""
    cfg = tmp_path / "vhostd.yaml"
    sock = os.path.join(sockdir, "d0.sock")
    cfg.write_text(yaml.safe_dump({
        "devices": [{"name": "d0", "type": "blk", "socket": sock, "path": "d0.img", "size": "2M"}],
        "vms": [
            {"name": "probe", "memory": "8M", "payload": str(probe_elf), "args": "exit=9", "autostart": True,
             "devices": [{"type": "blk", "socket": sock}]},
            {"name": "spinner", "memory": "8M", "payload": str(probe_elf), "args": "spin=1", "autostart": True},
            {"name": "manual", "memory": "8M", "payload": str(probe_elf)},
        ],
    }, sort_keys=False))
    log_path = tmp_path / "vhostd.log"
    with open(log_path, "wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "vhostd", "serve", "--config", str(cfg)], stdout=log,
                             stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 15
        while "probe: VM ended" not in log_path.read_text() or "spinner: console: probe: hello" not in log_path.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0, log_path.read_text()
    finally:
        p.kill()
        p.wait()
    text = log_path.read_text()
    assert "probe: console: probe: dev0 base=0xd0000000 irq=5 magic=0x74726976 version=2 id=2 capacity=4096" in text
    assert "probe: VM ended: the guest wrote 0x9 to the exit port (status 9" in text
    assert "spinner: VM ended: stopped by the host" in text
    assert "manual" not in text
    assert "Traceback" not in text


def test_selftest_garbage_makes_devices_need_reset_and_vhostd_survives(selftest_elf, tmp_path, daemon):
    """Malformed rings: vhostd breaks the queue and signals its error eventfd;
    the VMM turns that into DEVICE_NEEDS_RESET, which the guest reads."""
    vd = daemon([{"name": "d0", "type": "blk", "path": "d0.img", "size": "4M"},
                 {"name": "n0", "type": "net", "backend": "loopback"}])
    cfg = write_vm_config(tmp_path / "vm.yaml", [{
        "name": "g", "memory": "64M", "payload": str(selftest_elf), "args": "garbage=all garbage_wait_ms=300",
        "devices": [{"type": "blk", "socket": vd.socket("d0")}, {"type": "net", "socket": vd.socket("n0")}],
    }])
    r = vm_run(cfg, "g")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SELFTEST GARBAGE DONE devices=2" in r.stdout
    for dev in ("blk0", "net0"):
        line = next(l for l in r.stdout.splitlines() if l.startswith(f"garbage: {dev}: used_idx="))
        assert int(line.split("device_status=")[1], 16) & 0x40, line
    assert "the back-end reported an error on queue" in r.stderr
    assert vd.alive()


@pytest.mark.dpdk
def test_selftest_against_dpdk_vhost_backend(selftest_elf, tmp_path, sockdir, testpmd):
    """DPDK's vhost PMD as the net back-end, forwarding every frame back
    (io mode, one port).  It has no CONFIG protocol feature: the VMM
    synthesizes the config space (link up)."""
    from net.testpmd import VhostPort

    sock = os.path.join(sockdir, "dpdk.sock")
    tp = testpmd([VhostPort(sock)], forward_mode="io", auto_start=True)
    cfg = write_vm_config(tmp_path / "vm.yaml", [{
        "name": "st", "memory": "64M", "payload": str(selftest_elf), "args": "net=loopback net_timeout_ms=10000",
        "devices": [{"type": "net", "socket": sock}],
    }])
    r = vm_run(cfg, "st")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "net0: link=up mtu=1500" in r.stdout
    assert "net0: net=loopback sent=100 received=100 verified=100" in r.stdout and "SELFTEST PASS" in r.stdout
    assert tp.running()


def _vm_popen(config: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vhostd", "vm", "run", "--config", str(config), name,
                             "--timeout", str(VM_RUN_TIMEOUT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


def test_two_guests_exchange_frames_over_a_vhostd_switch(selftest_elf, tmp_path, daemon):
    """Two VMs, each with a NIC on the same vhostd switch: each sends frames
    to the other (selftest net=peer) and checks every one it gets back."""
    vd = daemon([{"name": "p0", "type": "net", "backend": "switch", "switch": "lan"},
                 {"name": "p1", "type": "net", "backend": "switch", "switch": "lan"}])
    cfg = write_vm_config(tmp_path / "vm.yaml", [
        {"name": f"g{i}", "memory": "64M", "payload": str(selftest_elf), "args": "net=peer",
         "devices": [{"type": "net", "socket": vd.socket(f"p{i}")}]}
        for i in range(2)
    ])
    procs = [_vm_popen(cfg, f"g{i}") for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=VM_RUN_TIMEOUT + 15)
        assert p.returncode == 0, out + err
        assert "SELFTEST PASS" in out and "net0: PASS" in out, out


def test_garbage_guest_does_not_disturb_another_guest(selftest_elf, tmp_path, daemon):
    """One VM writes garbage into its rings while another VM on other devices
    of the same daemon runs the full selftest: the daemon survives, the bad
    devices need reset, and the good guest passes."""
    vd = daemon([{"name": "bad", "type": "blk", "path": "bad.img", "size": "4M"},
                 {"name": "badnet", "type": "net", "backend": "loopback"},
                 {"name": "good", "type": "blk", "path": "good.img", "size": "32M"},
                 {"name": "goodnet", "type": "net", "backend": "loopback"}])
    cfg = write_vm_config(tmp_path / "vm.yaml", [
        {"name": "evil", "memory": "64M", "payload": str(selftest_elf), "args": "garbage=all garbage_wait_ms=300",
         "devices": [{"type": "blk", "socket": vd.socket("bad")}, {"type": "net", "socket": vd.socket("badnet")}]},
        {"name": "nice", "memory": "64M", "payload": str(selftest_elf), "args": "net=loopback",
         "devices": [{"type": "blk", "socket": vd.socket("good")}, {"type": "net", "socket": vd.socket("goodnet")}]},
    ])
    evil, nice = _vm_popen(cfg, "evil"), _vm_popen(cfg, "nice")
    out, err = evil.communicate(timeout=VM_RUN_TIMEOUT + 15)
    assert evil.returncode == 0 and "SELFTEST GARBAGE DONE devices=2" in out, out + err
    out, err = nice.communicate(timeout=VM_RUN_TIMEOUT + 15)
    assert nice.returncode == 0 and "SELFTEST PASS" in out, out + err
    assert vd.alive()
    log = vd.log()
    assert "bad: queue" in log and "NEEDS_RESET" in log
    assert "good: queue" not in log and "goodnet: queue" not in log
