"""The KVM API through ctypes: VM, memory slots, vCPUs, irqchip, ioeventfd, irqfd.

Struct layouts and ioctl numbers follow <linux/kvm.h> (x86-64); sizes and
offsets are asserted below against values printed by a C program compiled
with that header (see the numbers in the asserts).  Every ioctl but KVM_RUN
goes through libc's ioctl via ctypes, which releases the GIL for the
duration of the call.  KVM_RUN is issued by the C exit loop (vcpu.c), which
also runs without the GIL: a vCPU thread in the guest does not stop the rest
of the process.

Pitfall: an ioctl argument must stay referenced until the call returns;
``_ioctl`` takes the ctypes object itself, never a bare address of a
temporary.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int

# ---------------------------------------------------------------- ioctl numbers

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, 8)
KVM_REGISTER_COALESCED_MMIO = _iow(0x67, 16)
KVM_UNREGISTER_COALESCED_MMIO = _iow(0x68, 16)
KVM_IRQFD = _iow(0x76, 32)
KVM_CREATE_PIT2 = _iow(0x77, 64)
KVM_IOEVENTFD = _iow(0x79, 64)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, 144)
KVM_SET_REGS = _iow(0x82, 144)
KVM_GET_SREGS = _ior(0x83, 312)
KVM_SET_SREGS = _iow(0x84, 312)
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_TSC_KHZ = _io(0xA3)

# Checked against <linux/kvm.h> (printed by a C program).
assert KVM_RUN == 0xAE80 and KVM_GET_REGS == 0x8090AE81 and KVM_SET_SREGS == 0x4138AE84
assert KVM_SET_CPUID2 == 0x4008AE90 and KVM_GET_SUPPORTED_CPUID == 0xC008AE05
assert KVM_SET_USER_MEMORY_REGION == 0x4020AE46 and KVM_CREATE_PIT2 == 0x4040AE77
assert KVM_IOEVENTFD == 0x4040AE79 and KVM_IRQFD == 0x4020AE76 and KVM_IRQ_LINE == 0x4008AE61
assert KVM_REGISTER_COALESCED_MMIO == 0x4010AE67 and KVM_SET_IDENTITY_MAP_ADDR == 0x4008AE48
assert KVM_GET_TSC_KHZ == 0xAEA3

KVM_API_VERSION = 12

# Capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_COALESCED_PIO = 162

# Exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_NAMES = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 11: "SET_TPR", 12: "TPR_ACCESS",
    17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT", 39: "MEMORY_FAULT",
}

KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0

KVM_COALESCED_MMIO_PAGE_OFFSET = 2
PAGE_SIZE = 4096

# ---------------------------------------------------------------- structures

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class kvm_regs(ctypes.Structure):
    _fields_ = [(n, u64) for n in
                "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8),
                ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
                ("unusable", u8), ("padding", u8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = ([(n, kvm_segment) for n in "cs ds es fs gs ss tr ldt".split()]
                + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
                + [(n, u64) for n in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()]
                + [("interrupt_bitmap", u64 * 4)])


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", ctypes.c_int32),
                ("flags", u32), ("pad", u8 * 36)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_coalesced_mmio_zone(ctypes.Structure):
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


class kvm_coalesced_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("len", u32), ("pio", u32), ("data", u8 * 8)]


class kvm_coalesced_mmio_ring(ctypes.Structure):
    _fields_ = [("first", u32), ("last", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
                ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


def _cpuid2_type(n: int) -> type:
    class kvm_cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]
    return kvm_cpuid2


class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [("io", kvm_run_io), ("mmio", kvm_run_mmio), ("internal", kvm_run_internal),
                ("fail_entry", kvm_run_fail_entry), ("ex", kvm_run_ex),
                ("system_event", kvm_run_system_event), ("padding", ctypes.c_char * 256)]


class kvm_run(ctypes.Structure):
    """The head of struct kvm_run (the part a VMM reads), up to the exit union."""

    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("u", kvm_run_exit)]


# Sizes and offsets printed by a C program against <linux/kvm.h>.
assert ctypes.sizeof(kvm_regs) == 144 and ctypes.sizeof(kvm_sregs) == 312
assert ctypes.sizeof(kvm_segment) == 24 and ctypes.sizeof(kvm_dtable) == 16
assert kvm_sregs.gdt.offset == 192 and kvm_sregs.cr0.offset == 224 and kvm_sregs.efer.offset == 264
assert kvm_sregs.interrupt_bitmap.offset == 280
assert ctypes.sizeof(kvm_userspace_memory_region) == 32
assert ctypes.sizeof(kvm_ioeventfd) == 64 and kvm_ioeventfd.fd.offset == 20 and kvm_ioeventfd.flags.offset == 24
assert ctypes.sizeof(kvm_irqfd) == 32 and kvm_irqfd.resamplefd.offset == 12
assert ctypes.sizeof(kvm_pit_config) == 64
assert ctypes.sizeof(kvm_coalesced_mmio_zone) == 16 and ctypes.sizeof(kvm_coalesced_mmio) == 24
assert kvm_coalesced_mmio.data.offset == 16 and ctypes.sizeof(kvm_coalesced_mmio_ring) == 8
assert ctypes.sizeof(kvm_cpuid_entry2) == 40 and kvm_cpuid_entry2.eax.offset == 12
assert kvm_run.exit_reason.offset == 8 and kvm_run.immediate_exit.offset == 1 and kvm_run.u.offset == 32
assert kvm_run.u.offset + kvm_run_io.data_offset.offset == 40
assert kvm_run.u.offset + kvm_run_mmio.data.offset == 40 and kvm_run.u.offset + kvm_run_mmio.len.offset == 48
assert kvm_run.u.offset + kvm_run_mmio.is_write.offset == 52
assert kvm_run.u.offset + kvm_run_system_event.data.offset == 40
assert kvm_run.u.offset + kvm_run_fail_entry.cpu.offset == 40

# ---------------------------------------------------------------- helpers


class KvmError(OSError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""


def _ioctl(fd: int, request: int, arg: ctypes._CData | int = 0, what: str | None = None) -> int:
    """ioctl(fd, request, arg); arg is a ctypes object (passed by address) or an int."""
    if isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    r = _libc.ioctl(fd, request, ptr)
    if r < 0:
        e = ctypes.get_errno()
        raise KvmError(e, f"{what or hex(request)}: {os.strerror(e)}")
    return r


def _mmap(length: int, prot: int, flags: int, fd: int, offset: int = 0) -> int:
    addr = _libc.mmap(None, length, prot, flags, fd, offset)
    if addr in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, f"mmap of {length} bytes: {os.strerror(e)}")
    return addr


def _munmap(addr: int, length: int) -> None:
    _libc.munmap(addr, length)


# ---------------------------------------------------------------- guest memory


class GuestMemory:
    """Guest RAM: a memfd mapped MAP_SHARED, so a vhost-user back-end can map
    the same pages (SET_MEM_TABLE sends the fd).  One contiguous range of
    guest-physical addresses [gpa, gpa + size)."""

    def __init__(self, size: int, *, gpa: int = 0, name: str = "vhostd-vm", populate: bool = False) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size {size} is not a positive multiple of {PAGE_SIZE}")
        self.size = size
        self.gpa = gpa
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            self.hva = _mmap(size, mmap.PROT_READ | mmap.PROT_WRITE, flags, self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self._buf = (ctypes.c_char * size).from_address(self.hva)
        self.view = memoryview(self._buf).cast("B")

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size and length >= 0

    def to_hva(self, gpa: int, length: int = 1) -> int:
        if not self.contains(gpa, length):
            raise ValueError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")
        return self.hva + gpa - self.gpa

    def read(self, gpa: int, length: int) -> bytes:
        off = self.to_hva(gpa, length) - self.hva
        return bytes(self.view[off:off + length])

    def write(self, gpa: int, data: bytes) -> None:
        off = self.to_hva(gpa, len(data)) - self.hva
        self.view[off:off + len(data)] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        ctypes.memset(self.to_hva(gpa, length), byte, length)

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 2), "little")

    def close(self) -> None:
        if self.fd < 0:
            return
        self.view.release()
        del self._buf
        _munmap(self.hva, self.size)
        os.close(self.fd)
        self.fd = -1


# ---------------------------------------------------------------- /dev/kvm, VM, vCPU


class Kvm:
    """/dev/kvm: capability checks and the system-wide queries."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = _ioctl(self.fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if version != KVM_API_VERSION:
                raise KvmError(errno.EINVAL, f"KVM API version {version}, expected {KVM_API_VERSION}")
            self.vcpu_mmap_size = _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        r = _libc.ioctl(self.fd, KVM_CHECK_EXTENSION, cap)
        return max(r, 0)

    def supported_cpuid(self) -> list[kvm_cpuid_entry2]:
        n = 128
        while True:
            buf = _cpuid2_type(n)()
            buf.nent = n
            try:
                _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """One KVM virtual machine (the VM file descriptor)."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = _ioctl(kvm.fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        self.vcpus: list[Vcpu] = []
        self._slots = 0

    def check_extension(self, cap: int) -> int:
        r = _libc.ioctl(self.fd, KVM_CHECK_EXTENSION, cap)
        return max(r, 0)

    def add_memory(self, mem: GuestMemory, flags: int = 0) -> int:
        """Map guest memory as the next memory slot; returns the slot number."""
        slot = self._slots
        region = kvm_userspace_memory_region(slot, flags, mem.gpa, mem.size, mem.hva)
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
        self._slots += 1
        return slot

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        a = u64(addr)
        _ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, a, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and local APICs (before any vCPU exists)."""
        _ioctl(self.fd, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        cfg = kvm_pit_config()
        _ioctl(self.fd, KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        lv = kvm_irq_level(irq, level)
        _ioctl(self.fd, KVM_IRQ_LINE, lv, "KVM_IRQ_LINE")

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None, pio: bool = False,
                  deassign: bool = False) -> None:
        """Guest writes of `length` bytes to `addr` (MMIO, or a port with pio)
        signal eventfd `fd` in the kernel instead of exiting to the VMM."""
        s = kvm_ioeventfd()
        s.addr, s.len, s.fd = addr, length, fd
        s.flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            s.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
            s.datamatch = datamatch
        _ioctl(self.fd, KVM_IOEVENTFD, s, "KVM_IOEVENTFD")

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """A write to eventfd `fd` raises interrupt line `gsi` (in the kernel)."""
        s = kvm_irqfd(fd=fd, gsi=gsi, flags=KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        _ioctl(self.fd, KVM_IRQFD, s, "KVM_IRQFD")

    def register_coalesced_pio(self, port: int, size: int) -> None:
        zone = kvm_coalesced_mmio_zone(addr=port, size=size, pio=1)
        _ioctl(self.fd, KVM_REGISTER_COALESCED_MMIO, zone, "KVM_REGISTER_COALESCED_MMIO")

    def create_vcpu(self, index: int | None = None) -> Vcpu:
        vcpu = Vcpu(self, len(self.vcpus) if index is None else index)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """One virtual CPU: its fd, its mmap'ed kvm_run, registers."""

    def __init__(self, vm: Vm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = _ioctl(vm.fd, KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        self.mmap_size = vm.kvm.vcpu_mmap_size
        try:
            self.run_addr = _mmap(self.mmap_size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.run = kvm_run.from_address(self.run_addr)
        self.coalesced: CoalescedRing | None = None
        if (vm.kvm.check_extension(KVM_CAP_COALESCED_MMIO)
                and self.mmap_size >= (KVM_COALESCED_MMIO_PAGE_OFFSET + 1) * PAGE_SIZE):
            self.coalesced = CoalescedRing(self.run_addr + KVM_COALESCED_MMIO_PAGE_OFFSET * PAGE_SIZE)

    # -- registers
    def get_regs(self) -> kvm_regs:
        r = kvm_regs()
        _ioctl(self.fd, KVM_GET_REGS, r, "KVM_GET_REGS")
        return r

    def set_regs(self, r: kvm_regs) -> None:
        _ioctl(self.fd, KVM_SET_REGS, r, "KVM_SET_REGS")

    def get_sregs(self) -> kvm_sregs:
        s = kvm_sregs()
        _ioctl(self.fd, KVM_GET_SREGS, s, "KVM_GET_SREGS")
        return s

    def set_sregs(self, s: kvm_sregs) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, s, "KVM_SET_SREGS")

    def set_cpuid(self, entries: list[kvm_cpuid_entry2]) -> None:
        buf = _cpuid2_type(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        _ioctl(self.fd, KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def tsc_khz(self) -> int:
        try:
            return _ioctl(self.fd, KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")
        except KvmError:
            return 0

    # -- running
    def close(self) -> None:
        if self.fd >= 0:
            if self.coalesced is not None:
                self.coalesced.detach()
            self.run = None  # type: ignore[assignment]
            _munmap(self.run_addr, self.mmap_size)
            os.close(self.fd)
            self.fd = -1


class CoalescedRing:
    """The VM's ring of coalesced MMIO/PIO writes (one per VM; every vCPU's
    mmap shows it).  KVM appends writes to registered zones here instead of
    exiting; the VMM consumes them, in order, before it handles any other exit
    and from time to time.  Consumers must hold `lock`."""

    MAX = (PAGE_SIZE - ctypes.sizeof(kvm_coalesced_mmio_ring)) // ctypes.sizeof(kvm_coalesced_mmio)

    def __init__(self, addr: int) -> None:
        self.head = kvm_coalesced_mmio_ring.from_address(addr)
        self.entries = (kvm_coalesced_mmio * self.MAX).from_address(addr + ctypes.sizeof(kvm_coalesced_mmio_ring))
        self.lock = threading.Lock()

    def pending(self) -> bool:
        return self.head is not None and self.head.first != self.head.last

    def drain(self) -> list[tuple[int, bool, bytes]]:
        """Take every queued write as (address or port, is_pio, data)."""
        out = []
        with self.lock:
            head = self.head
            if head is None:
                return out
            first, last = head.first, head.last
            while first != last:
                e = self.entries[first]
                out.append((e.phys_addr, bool(e.pio), bytes(e.data[:min(e.len, 8)])))
                first = (first + 1) % self.MAX
            head.first = first
        return out

    def detach(self) -> None:
        with self.lock:
            self.head = None
            self.entries = None
