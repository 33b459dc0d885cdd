"""A VM: guest memory, vCPU threads running KVM_RUN, exit dispatch.

    vm = VirtualMachine(vm_config, console=sink)   # nothing happens yet
    vm.start()                                     # devices connect, vCPUs run
    status = vm.wait()                             # the guest's exit status
    vm.close()

or ``VirtualMachine(...).run()`` for all of that.  ``stop()`` may be called
from any thread (a signal handler's thread too).

Exits the VMM handles (everything else needs no exit: virtio kicks are KVM
ioeventfds, back-end interrupts KVM irqfds, the PIC/IOAPIC/LAPIC/PIT are in
the kernel):

* PIO 0x3f8-0x3ff: the 8250 UART (console output).  Writes to THR are
  coalesced by KVM (KVM_REGISTER_COALESCED_MMIO, pio) into a ring the VMM
  drains before handling any exit and every 50 ms, so printing costs no exit
  per byte.
* PIO 0x501: the exit device; `outl` ends the VM with that status.
* Linux guests (acpi.py): PIO 0x600, the ACPI sleep control register
  (poweroff: status 0), 0x602 the ACPI reset register and 0x64 the 8042's
  reset command (reboot: the VM ends, status 0, or 255 after a panic),
  0x505 pvpanic (a kernel panic: status 255).  The UART raises IRQ 4 for an
  interrupt-driven ttyS0, so its writes are not coalesced for a kernel.
* PIO 0x502: the VMM's exception stubs (payload VMs): the VM ends with
  status 255 and a description of the exception on the log.
* PIO 0x70/0x71: a read-only CMOS clock (rtc.py): the time at boot.
* MMIO 0xd0000000 + i * 0x1000: virtio-mmio device i.  The loop around
  KVM_RUN is C (vcpu.c, GIL released): it answers InterruptStatus reads and
  InterruptACK writes, which a driver makes on every interrupt, by itself
  and returns every other exit to the Python dispatch here.
* Other ports read as all ones, writes to them are ignored; other MMIO
  reads return all ones.
* Triple fault (KVM_EXIT_SHUTDOWN), KVM internal errors, failed entries:
  the VM ends with status 255 and the reason on the log.

vCPU 0 enters the payload (or the kernel); the others wait in the kernel
for INIT/SIPI from the in-kernel LAPIC: Linux sends it to every CPU the
ACPI MADT lists; a CPL3 payload cannot (the guest ABI has no entry for
secondary vCPUs yet).  The boot info
cmdline of a payload gets ``tsc_khz=N`` appended (see payload_args).

Stopping: `stop()` sets kvm_run.immediate_exit on every vCPU and sends each
vCPU thread SIGURG.  The vCPU threads block SIGURG and give KVM a signal
mask without it (KVM_SET_SIGNAL_MASK), so the signal only ever interrupts
KVM_RUN; no handler is installed and SIGURG's default action is to be
ignored, so nothing else in the process is disturbed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from vhostd._vcpu import ffi as _ffi, lib as _vcpu
from vhostd.config import VmConfig
from vhostd.vmm import acpi, boot, kvm
from vhostd.vmm.rtc import CmosRtc
from vhostd.vmm.uart import Console, Uart8250
from vhostd.vmm.virtio_mmio import DEVICE_IDS, DeviceSetupError, VhostUserMmioDevice

log = logging.getLogger("vhostd.vmm")

KICK_SIGNAL = signal.SIGURG
KVM_SET_SIGNAL_MASK = kvm._iow(0x8B, 4)
assert KVM_SET_SIGNAL_MASK == 0x4004AE8B
#: Status of a VM that crashed (exception, triple fault, KVM error).
CRASH_STATUS = 255
#: First GSI of the virtio-mmio devices: device i raises GSI 5 + i.
FIRST_DEVICE_GSI = 5
HYPERVISOR_TIMING_LEAF = 0x40000010
CPUID_1_ECX_HYPERVISOR = 1 << 31
UART_IRQ = 4
KBD_COMMAND_PORT, KBD_RESET = 0x64, 0xFE
PANIC_MARK = b"Kernel panic - not syncing"
KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_CRASH = 1, 2, 3


class VmError(Exception):
    """The VM cannot be built or started (bad payload, back-end missing...)."""


@dataclass
class ExitCounts:
    pio: int = 0
    mmio: int = 0
    mmio_in_c: int = 0  # interrupt register accesses the C exit loop answered (counted at close)
    other: int = 0
    by_port: dict[int, int] = field(default_factory=dict)  # PIO exits by port

    def busiest(self, n: int = 5) -> str:
        top = sorted(self.by_port.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{port:#x}: {count}" for port, count in top)


def stdout_sink(data: bytes) -> None:
    out = sys.stdout.buffer
    out.write(data)
    out.flush()


class VirtualMachine:
    def __init__(self, config: VmConfig, *, console: Callable[[bytes], None] = stdout_sink,
                 populate: bool | None = None, connect_timeout: float = 10.0) -> None:
        """populate: prefault guest RAM (MAP_POPULATE); first touches of guest
        pages are much slower under PVM.  Default: for VMs up to 512 MiB on
        a PVM host; never with hardware virtualisation, where it only costs
        boot time and memory the guest may never use."""
        self.config = config
        self.name = config.name
        self.linux = config.kernel is not None and config.payload is None  # ACPI, power ports, UART IRQ
        self.console = Console(_PanicWatch(self, console))
        self.uart = Uart8250(self.console, boot.UART_PORT, irq=self._uart_irq if self.linux else None)
        self.panicked = False  # the guest said so (pvpanic, or its console)
        self.rtc = CmosRtc()
        self.hardware_virt = hardware_virtualisation()
        if populate is None:
            populate = config.memory <= 512 << 20 and not self.hardware_virt
        self.populate = populate
        self.connect_timeout = connect_timeout
        self.exit_status: int | None = None
        self.exit_reason = ""
        self.counts = ExitCounts()
        self.started_at = self.stopped_at = 0.0
        self._kvm: kvm.Kvm | None = None
        self._vm: kvm.Vm | None = None
        self.mem: kvm.GuestMemory | None = None
        self.devices: list[VhostUserMmioDevice] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._stop_lock = threading.RLock()  # stop() may run in a signal handler during stop()
        self._done = threading.Event()
        self._closed = False
        self._coalesced: kvm.CoalescedRing | None = None
        self._isrs = self._mmio_map = _ffi.NULL

    # ------------------------------------------------------------ build

    def _build(self) -> None:
        cfg = self.config
        self._kvm = kvm.Kvm()
        self._vm = vm = kvm.Vm(self._kvm)
        vm.set_tss_addr(0xFFFBD000)
        vm.set_identity_map_addr(0xFFFBC000)
        vm.create_irqchip()
        vm.create_pit2()
        self.mem = kvm.GuestMemory(cfg.memory, name=f"vhostd-vm-{cfg.name}", populate=self.populate)
        vm.add_memory(self.mem)
        for i in range(cfg.vcpus):
            vm.create_vcpu(i)
        self._set_cpuid()
        if (not self.uart.interrupt_driven and self._kvm.check_extension(kvm.KVM_CAP_COALESCED_PIO)
                and vm.vcpus[0].coalesced is not None):
            # UART output without an exit per byte: KVM queues THR writes.
            vm.register_coalesced_pio(boot.UART_PORT, 1)
            self._coalesced = vm.vcpus[0].coalesced

        boot_devices = []
        for i, dev in enumerate(cfg.devices):
            base = boot.MMIO_BASE + i * boot.MMIO_STRIDE
            gsi = FIRST_DEVICE_GSI + i
            try:
                d = VhostUserMmioDevice(vm=vm, mem=self.mem, slot=i, base=base, gsi=gsi, kind=dev.type,
                                        socket=dev.socket, queue_size=dev.queue_size, name=cfg.name,
                                        connect_timeout=self.connect_timeout)
            except DeviceSetupError as e:
                raise VmError(str(e)) from None
            self.devices.append(d)
            boot_devices.append(boot.BootDevice(base, DEVICE_IDS[dev.type], gsi))
            log.info("%s: virtio-mmio %s at %#x (gsi %d) -> %s: %d queue(s), features %#x, protocol %#x",
                     cfg.name, dev.type, base, gsi, dev.socket, d.num_queues, d.device_features, d.protocol)

        # The exit loop answers each device's interrupt registers in C.
        self._isrs = _ffi.new("struct vcpu_isr *[]", [d.isr for d in self.devices] or 1)
        self._mmio_map = _ffi.new("struct vcpu_mmio_map *", {
            "mmio_base": boot.MMIO_BASE, "stride": boot.MMIO_STRIDE, "num_devices": len(self.devices),
            "devices": self._isrs})

        bsp = vm.vcpus[0]
        try:
            if cfg.payload is not None:
                data = _read(cfg.payload, "payload")
                args = self.payload_args(cfg.args, bsp.tsc_khz())
                p = boot.setup_payload(self.mem, bsp, data, args, boot_devices, name=cfg.payload)
                log.info("%s: payload %s: entry %#x, image [%#x, %#x), free RAM from %#x", cfg.name, cfg.payload,
                         p.entry, p.image_start, p.image_end, p.free_start)
            elif cfg.kernel is not None:
                cmdline = self.kernel_cmdline(cfg.cmdline)
                initrd = _read(cfg.initrd, "initrd") if cfg.initrd else None
                tables = acpi.build(cfg.vcpus, [acpi.MmioDevice(b.mmio_base, boot.MMIO_STRIDE, b.irq)
                                                for b in boot_devices], boot.UART_PORT, UART_IRQ)
                img = boot.setup_linux(self.mem, bsp, _read(cfg.kernel, "kernel"), cmdline, initrd,
                                       acpi_tables=tables, rsdp=acpi.RSDP_GPA)
                log.info("%s: kernel %s at %#x, entry %#x, %d vCPU(s), cmdline %r", cfg.name, cfg.kernel,
                         img.load_addr, img.entry, cfg.vcpus, cmdline)
                if not self.hardware_virt:
                    log.warning("%s: this host's /dev/kvm is PVM (no VMX/SVM): a Linux kernel runs emulated at "
                                "CPL0, about a million instructions a second, and will not reach its userspace "
                                "in useful time; boot it on a host with hardware virtualisation", cfg.name)
            else:
                raise VmError(f"{cfg.name}: neither a payload nor a kernel to boot")
        except boot.BootError as e:
            raise VmError(f"{cfg.name}: {e}") from None

    @staticmethod
    def kernel_cmdline(cmdline: str) -> str:
        """The config's command line, plus ``panic=-1`` unless it sets
        panic=: a panicking guest then reboots at once and the VM ends
        (status 255), instead of spinning until the timeout."""
        words = cmdline.split()
        if not any(w.startswith("panic=") for w in words):
            words.append("panic=-1")
        return " ".join(words)

    @staticmethod
    def payload_args(args: str, tsc_khz: int) -> str:
        """The boot info cmdline: the config's args, plus ``tsc_khz=N``
        (KVM_GET_TSC_KHZ) unless args set it.  Programs cannot learn the TSC
        rate from CPUID under PVM, where CPUID at CPL3 is the host's
        (guest-drivers/README.md asks the VMM to pass it)."""
        if not tsc_khz or any(w.startswith("tsc_khz=") for w in args.split()):
            return args
        extended = f"{args} tsc_khz={tsc_khz}".strip()
        return extended if len(extended.encode()) < boot.BOOT_CMDLINE_SIZE else args

    def _set_cpuid(self) -> None:
        entries = self._kvm.supported_cpuid()
        tsc_khz = self._vm.vcpus[0].tsc_khz()
        for vcpu in self._vm.vcpus:
            mine = []
            for e in entries:
                e = kvm.kvm_cpuid_entry2.from_buffer_copy(e)
                if e.function == 1:
                    e.ebx = (e.ebx & 0x00FFFFFF) | (vcpu.index << 24)  # initial APIC ID
                    # "Running under a hypervisor": without it Linux does not look
                    # for KVM's leaves, so no kvmclock and no TSC frequency.
                    e.ecx |= CPUID_1_ECX_HYPERVISOR
                elif e.function in (0xB, 0x1F):
                    e.edx = vcpu.index  # x2APIC ID
                elif e.function == 0x40000000 and tsc_khz:
                    e.eax = max(e.eax, HYPERVISOR_TIMING_LEAF)
                mine.append(e)
            if tsc_khz:
                # The "hypervisor timing" leaf: TSC and bus frequency in kHz
                # (the guest-drivers runtime reads the TSC rate here).
                mine.append(kvm.kvm_cpuid_entry2(function=HYPERVISOR_TIMING_LEAF, eax=tsc_khz, ebx=1000000))
            vcpu.set_cpuid(mine)

    # ------------------------------------------------------------ run

    def start(self) -> None:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.started_at = time.monotonic()
        for vcpu in self._vm.vcpus:
            t = threading.Thread(target=self._vcpu_thread, args=(vcpu,), name=f"{self.name}-vcpu{vcpu.index}",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        if self._coalesced is not None:
            threading.Thread(target=self._console_flusher, name=f"{self.name}-console", daemon=True).start()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait until the VM has stopped; returns its exit status (None: still
        running after `timeout`, or stopped from the host)."""
        if not self._done.wait(timeout):
            return None
        for t in self._threads:
            t.join()
        self._drain_coalesced()
        self.console.flush()
        return self.exit_status

    def stop(self, status: int | None = None, reason: str = "stopped by the host") -> None:
        """End the VM (idempotent; the first call's status wins)."""
        with self._stop_lock:
            if self._stopping:
                return
            self._stopping = True
            self.exit_status = status
            self.exit_reason = reason
            self.stopped_at = time.monotonic()
            if self._vm is not None:
                for vcpu in self._vm.vcpus:
                    if vcpu.run is not None:
                        vcpu.run.immediate_exit = 1
                for t in self._threads:
                    if t.ident is not None and t.is_alive():
                        try:
                            signal.pthread_kill(t.ident, KICK_SIGNAL)
                        except (ProcessLookupError, OSError):
                            pass
        self._done.set()

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._done.is_set()

    @property
    def run_time(self) -> float:
        end = self.stopped_at or time.monotonic()
        return end - self.started_at if self.started_at else 0.0

    def run(self) -> int | None:
        """start(), wait(), close(); returns the exit status."""
        self.start()
        try:
            return self.wait()
        finally:
            self.stop()
            self.close()

    def close(self) -> None:
        """Release everything (stops the VM first if it still runs)."""
        if self._closed:
            return
        self.stop(self.exit_status, self.exit_reason or "closed")
        for t in self._threads:
            t.join()
        self._drain_coalesced()
        self.console.flush()
        self._closed = True
        self.counts.mmio_in_c = sum(_vcpu.vcpu_isr_fast_exits(d.isr) for d in self.devices)
        for d in self.devices:
            d.close()
        self.devices.clear()
        if self._vm is not None:
            self._vm.close()
        if self.mem is not None:
            self.mem.close()
        if self._kvm is not None:
            self._kvm.close()

    # ------------------------------------------------------------ vCPU thread

    def _vcpu_thread(self, vcpu: kvm.Vcpu) -> None:
        try:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
            _set_kvm_signal_mask(vcpu, old - {KICK_SIGNAL})
            self._vcpu_loop(vcpu)
        except Exception as e:  # a VMM bug or a KVM failure: end the VM, say why
            log.exception("%s: vCPU %d failed", self.name, vcpu.index)
            self.stop(CRASH_STATUS, f"vCPU {vcpu.index} failed: {e}")

    def _vcpu_loop(self, vcpu: kvm.Vcpu) -> None:
        # The hot path: locals only.  The ctypes views of kvm_run's exit union
        # share the mmap'ed page, so they are made once.
        run = vcpu.run
        io, mmio = run.u.io, run.u.mmio
        counts = self.counts
        fd, page, mmio_map = vcpu.fd, _ffi.cast("void *", vcpu.run_addr), self._mmio_map
        c_run, pio, mmio_exit = _vcpu.vcpu_run, self._pio, self._mmio
        EXIT_IO, EXIT_MMIO, EXIT_INTR = kvm.KVM_EXIT_IO, kvm.KVM_EXIT_MMIO, kvm.KVM_EXIT_INTR
        ring = self._coalesced.head if self._coalesced is not None else None
        drain = self._drain_coalesced
        while not self._stopping:
            reason = c_run(fd, page, mmio_map)  # the GIL is released inside
            if ring is not None and ring.first != ring.last:
                drain()  # writes queued before this exit come first
            if reason == EXIT_IO:
                counts.pio += 1
                pio(vcpu, io)
            elif reason == EXIT_MMIO:
                counts.mmio += 1
                mmio_exit(mmio)
            elif reason in (-errno.EINTR, -errno.EAGAIN) or reason == EXIT_INTR:
                _take_kick_signal()
            elif reason < 0:
                raise kvm.KvmError(-reason, f"KVM_RUN: {os.strerror(-reason)}")
            else:
                counts.other += 1
                self._other_exit(vcpu, run, reason)

    def _drain_coalesced(self) -> None:
        ring = self._coalesced
        if ring is None or not ring.pending():
            return
        for port, pio, data in ring.drain():
            if pio and self.uart.handles(port):
                self.uart.write(port, data)

    def _console_flusher(self) -> None:
        """Output a guest printed and then went quiet (no exits) still shows."""
        while not self._done.wait(0.05):
            self._drain_coalesced()

    def _pio(self, vcpu: kvm.Vcpu, io: kvm.kvm_run_io) -> None:
        port, size, count = io.port, io.size, io.count
        by_port = self.counts.by_port
        by_port[port] = by_port.get(port, 0) + 1
        addr = vcpu.run_addr + io.data_offset
        n = size * count
        if io.direction == kvm.KVM_EXIT_IO_OUT:
            data = ctypes.string_at(addr, n)
            if self.uart.handles(port):
                if size == 1:
                    self.uart.write(port, data)
                else:
                    for i in range(count):
                        self.uart.write(port, data[i * size:(i + 1) * size])
            elif port == boot.EXIT_PORT:
                value = int.from_bytes(data[:size], "little")
                self.stop(value, f"the guest wrote {value:#x} to the exit port")
            elif port == boot.EXCEPTION_PORT and self.config.payload is not None:
                what = boot.describe_exception(vcpu, self.mem, data[0])
                log.error("%s: %s", self.name, what)
                self.stop(CRASH_STATUS, what)
            elif self.linux and port in POWER_PORTS:
                self._power(port, data[0])
            elif self.rtc.handles(port):
                self.rtc.write(port, data)
        else:
            if self.uart.handles(port):
                value = self.uart.read(port, size) * count
            elif port == acpi.PVPANIC_PORT and self.linux:
                value = bytes([acpi.PVPANIC_PANICKED]) * n  # the events it reports
            elif self.rtc.handles(port):
                value = self.rtc.read(port, size) * count
            else:
                value = b"\xff" * n
            ctypes.memmove(addr, value, n)

    def _uart_irq(self, level: int) -> None:
        if self._vm is not None:
            self._vm.irq_line(UART_IRQ, level)

    def _power(self, port: int, value: int) -> None:
        """The guest's power interface (acpi.py): poweroff, reboot, panic."""
        if port == acpi.SLEEP_CONTROL_PORT:
            if value & acpi.SLP_EN and (value >> 2) & 7 == acpi.S5_TYPE:
                self.stop(0, "the guest powered off")
        elif port == acpi.PVPANIC_PORT:
            if value & acpi.PVPANIC_PANICKED:
                self.panicked = True
                self.stop(CRASH_STATUS, "the guest kernel panicked")
        elif (port == acpi.RESET_PORT and value == acpi.RESET_VALUE) or \
                (port == KBD_COMMAND_PORT and value == KBD_RESET):
            if self.panicked:
                self.stop(CRASH_STATUS, "the guest kernel panicked")
            else:
                self.stop(0, "the guest rebooted (a reboot ends the VM)")

    def _mmio(self, m: kvm.kvm_run_mmio) -> None:
        gpa, length = m.phys_addr, m.len
        index, offset = divmod(gpa - boot.MMIO_BASE, boot.MMIO_STRIDE)
        dev = self.devices[index] if gpa >= boot.MMIO_BASE and index < len(self.devices) else None
        if m.is_write:
            if dev is not None:
                dev.write(offset, bytes(m.data[:length]))
        else:
            data = dev.read(offset, length) if dev is not None else b"\xff" * length
            ctypes.memmove(ctypes.addressof(m.data), data, length)

    def _other_exit(self, vcpu: kvm.Vcpu, run: kvm.kvm_run, reason: int) -> None:
        name = kvm.EXIT_NAMES.get(reason, str(reason))
        if reason == kvm.KVM_EXIT_SYSTEM_EVENT:
            kind = run.u.system_event.type
            if kind == KVM_SYSTEM_EVENT_SHUTDOWN:
                self.stop(0, "the guest powered off")
            elif kind == KVM_SYSTEM_EVENT_RESET:
                self.stop(0, "the guest asked for a reset (not supported: stopped)")
            else:
                self._crash(vcpu, f"system event {kind}")
        elif reason == kvm.KVM_EXIT_HLT:
            self.stop(0, "the guest halted")
        elif reason == kvm.KVM_EXIT_SHUTDOWN:
            self._crash(vcpu, "triple fault (KVM_EXIT_SHUTDOWN)")
        elif reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            it = run.u.internal
            data = " ".join(f"{x:#x}" for x in it.data[:min(it.ndata, 16)])
            self._crash(vcpu, f"KVM internal error, suberror {it.suberror} [{data}]")
        elif reason == kvm.KVM_EXIT_FAIL_ENTRY:
            self._crash(vcpu, f"VM entry failed, reason {run.u.fail_entry.hardware_entry_failure_reason:#x}")
        else:
            self._crash(vcpu, f"unexpected exit {name}")

    def _crash(self, vcpu: kvm.Vcpu, what: str) -> None:
        try:
            r = vcpu.get_regs()
            s = vcpu.get_sregs()
            where = f" at rip {r.rip:#x} (cs {s.cs.selector:#x} rsp {r.rsp:#x} cr2 {s.cr2:#x})"
        except OSError:
            where = ""
        text = f"vCPU {vcpu.index}: {what}{where}"
        log.error("%s: %s", self.name, text)
        self.stop(CRASH_STATUS, text)


POWER_PORTS = frozenset({acpi.SLEEP_CONTROL_PORT, acpi.RESET_PORT, acpi.PVPANIC_PORT, KBD_COMMAND_PORT})


class _PanicWatch:
    """The console sink, noting a kernel panic's line on the way (a guest
    without the pvpanic driver reports its panic only there)."""

    def __init__(self, vm: VirtualMachine, sink: Callable[[bytes], None]) -> None:
        self.vm = vm
        self.sink = sink

    def __call__(self, data: bytes) -> None:
        if PANIC_MARK in data:
            self.vm.panicked = True
        self.sink(data)


def hardware_virtualisation() -> bool:
    """Whether this host's KVM runs guests on VMX/SVM (not PVM, which runs
    CPL0 code emulated)."""
    if os.path.exists("/sys/module/kvm_pvm"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return True
    return " vmx" in flags or " svm" in flags


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise VmError(f"cannot read {what} {path}: {e.strerror}") from None


def _set_kvm_signal_mask(vcpu: kvm.Vcpu, signals: set) -> None:
    """The signal mask in force while the vCPU is in KVM_RUN."""
    mask = 0
    for s in signals:
        mask |= 1 << (int(s) - 1)
    buf = ctypes.create_string_buffer(struct.pack("<IQ", 8, mask), 12)
    kvm._ioctl(vcpu.fd, KVM_SET_SIGNAL_MASK, buf, "KVM_SET_SIGNAL_MASK")


def _take_kick_signal() -> None:
    """Consume a pending kick signal (it stays pending while blocked)."""
    try:
        signal.sigtimedwait({KICK_SIGNAL}, 0)
    except OSError:
        pass
