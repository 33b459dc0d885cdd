"""Getting a vCPU to its first guest instruction.

Two ways in:

* ``setup_payload``: the guest ABI of guest-drivers/ABI.md.  An ELF64 program
  entered directly in 64-bit long mode at CPL3 (CS 0x1b, SS/DS/ES 0x23,
  RFLAGS.IOPL=3, IF=0), RSP = 0x200000, RDI = the boot info at 0x1000, the
  first 4 GiB identity mapped with 2 MiB user pages.  Nothing runs at CPL0,
  which matters under PVM where CPL0 code is emulated.

* ``setup_linux``: a bzImage through the 64-bit boot protocol of
  Documentation/arch/x86/boot.rst (boot_params zero page, e820 map, command
  line, initrd; entry at startup_64 = protected-mode kernel + 0x200 at CPL0
  with paging on and __BOOT_CS/__BOOT_DS = 0x10/0x18).

Tables the VMM owns (both paths) live in [0x2000, 0x10000):

    0x2000 PML4, 0x3000 PDPT, 0x4000-0x7fff four page directories (4 GiB)
    0x8000 GDT, 0x8100 IDT (32 exception gates), 0x8400 exception stubs,
    0x9000 TSS with a full I/O permission bitmap (all ports allowed),
    0xc000-0xffff CPL0 stack for the exception stubs

The I/O bitmap matters: PVM (these machines' KVM) checks it for `in`/`out`
at CPL3 even with RFLAGS.IOPL=3, so IOPL alone does not open the ports.

The exception stubs (ABI path only) report a CPU exception the program takes
to the VMM: each writes its vector number to port 0x502 (VMM-private), the
VMM reads the exception frame and ends the VM with a diagnostic instead of a
silent triple fault.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vhostd.vmm.kvm import GuestMemory, Vcpu, kvm_segment

MiB = 1 << 20
GiB = 1 << 30

# ---------------------------------------------------------------- ABI constants (guest-drivers/ABI.md)

BOOT_INFO_GPA = 0x1000
BOOT_MAGIC = 0x564844424F4F5431
BOOT_VERSION = 1
BOOT_MAX_DEVICES = 16
BOOT_CMDLINE_SIZE = 256
STACK_TOP = 0x200000
IMAGE_MIN = 0x200000
MMIO_BASE = 0xD0000000
MMIO_STRIDE = 0x1000
#: Guest RAM must end below the virtio-mmio window.
MAX_MEMORY = 3 * GiB
UART_PORT = 0x3F8
EXIT_PORT = 0x501
EXCEPTION_PORT = 0x502  # VMM-private: the exception stubs report here

PML4_GPA = 0x2000
PDPT_GPA = 0x3000
PD_GPA = 0x4000  # four of them: 0x4000-0x7fff
GDT_GPA = 0x8000
IDT_GPA = 0x8100
STUBS_GPA = 0x8400
TSS_GPA = 0x9000
TSS_SIZE = 104
IO_BITMAP_SIZE = 65536 // 8
TSS_LIMIT = TSS_SIZE + IO_BITMAP_SIZE  # the bitmap is followed by one 0xff byte
EXC_STACK_TOP = 0x10000
IDENTITY_MAP = 4 * GiB

# GDT selectors
KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, TSS_SEL = 0x08, 0x10, 0x18 | 3, 0x20 | 3, 0x28
# The Linux 64-bit boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
LINUX_CS, LINUX_DS = 0x10, 0x18

PTE_P, PTE_RW, PTE_US, PTE_PS = 1, 2, 4, 0x80
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_RESERVED, RFLAGS_IOPL3 = 0x2, 0x3000

EXCEPTION_NAMES = {
    0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint", 4: "#OF overflow",
    5: "#BR bound range", 6: "#UD invalid opcode", 7: "#NM device not available", 8: "#DF double fault",
    10: "#TS invalid TSS", 11: "#NP segment not present", 12: "#SS stack fault",
    13: "#GP general protection", 14: "#PF page fault", 16: "#MF x87 error", 17: "#AC alignment check",
    18: "#MC machine check", 19: "#XM SIMD error", 20: "#VE virtualization", 21: "#CP control protection",
}
EXCEPTIONS_WITH_ERROR_CODE = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}
NUM_EXCEPTION_GATES = 32


class BootError(Exception):
    """The payload or kernel cannot be loaded (bad file, does not fit)."""


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


# ---------------------------------------------------------------- page tables, GDT, IDT


def write_page_tables(mem: GuestMemory, *, user: bool) -> None:
    """Identity map [0, 4 GiB) with 2 MiB pages (U=1 for the CPL3 payload)."""
    flags = PTE_P | PTE_RW | (PTE_US if user else 0)
    mem.write(PML4_GPA, struct.pack("<Q", PDPT_GPA | flags).ljust(4096, b"\0"))
    npd = IDENTITY_MAP // GiB
    mem.write(PDPT_GPA, b"".join(struct.pack("<Q", (PD_GPA + i * 4096) | flags) for i in range(npd)).ljust(4096, b"\0"))
    mem.write(PD_GPA, b"".join(struct.pack("<Q", (i << 21) | flags | PTE_PS) for i in range(512 * npd)))


def _descriptor(base: int, limit: int, access: int, flags: int) -> int:
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | access << 40 | ((limit >> 16) & 0xF) << 48
            | flags << 52 | ((base >> 24) & 0xFF) << 56)


CODE64 = lambda dpl: _descriptor(0, 0xFFFFF, 0x9B | dpl << 5, 0xA)  # noqa: E731  P, S, exec/read, accessed; G, L
DATA = lambda dpl: _descriptor(0, 0xFFFFF, 0x93 | dpl << 5, 0xC)  # noqa: E731  P, S, read/write, accessed; G, D/B


def _tss_descriptor(base: int, limit: int) -> bytes:
    low = _descriptor(base, limit, 0x8B, 0)  # P, 64-bit TSS (busy)
    return struct.pack("<QQ", low, base >> 32)


def _seg(selector: int, *, code: bool, dpl: int) -> kvm_segment:
    return kvm_segment(base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3, present=1, dpl=dpl,
                       db=0 if code else 1, s=1, l=1 if code else 0, g=1)


def _tr() -> kvm_segment:
    return kvm_segment(base=TSS_GPA, limit=TSS_LIMIT, selector=TSS_SEL, type=11, present=1, s=0, g=0)


def write_abi_tables(mem: GuestMemory) -> None:
    """GDT (kernel + user code/data, TSS), TSS (RSP0 for the exception stubs),
    IDT with 32 exception gates and the stubs they point to."""
    gdt = struct.pack("<5Q", 0, CODE64(0), DATA(0), CODE64(3), DATA(3)) + _tss_descriptor(TSS_GPA, TSS_LIMIT)
    mem.write(GDT_GPA, gdt)
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, EXC_STACK_TOP)  # RSP0
    struct.pack_into("<H", tss, 102, TSS_SIZE)  # the I/O bitmap follows the TSS
    mem.write(TSS_GPA, bytes(tss) + bytes(IO_BITMAP_SIZE) + b"\xff")
    idt = bytearray()
    stubs = bytearray()
    for vector in range(NUM_EXCEPTION_GATES):
        addr = STUBS_GPA + vector * 16
        # mov $vector, %al ; mov $0x502, %dx ; out %al, (%dx) ; 1: hlt ; jmp 1b
        stub = bytes([0xB0, vector, 0x66, 0xBA]) + struct.pack("<H", EXCEPTION_PORT) + bytes([0xEE, 0xF4, 0xEB, 0xFD])
        stubs += stub.ljust(16, b"\xcc")
        # 64-bit interrupt gate, DPL 0, present, IST 0
        idt += struct.pack("<HHBBHII", addr & 0xFFFF, KERNEL_CS, 0, 0x8E, (addr >> 16) & 0xFFFF, addr >> 32, 0)
    mem.write(IDT_GPA, bytes(idt))
    mem.write(STUBS_GPA, bytes(stubs))


def _long_mode_sregs(vcpu: Vcpu, cs: kvm_segment, ds: kvm_segment, gdt_limit: int, idt_limit: int):
    s = vcpu.get_sregs()
    s.cr3 = PML4_GPA
    s.cr4 = CR4_PAE
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    s.efer = EFER_LME | EFER_LMA
    s.gdt.base, s.gdt.limit = GDT_GPA, gdt_limit
    s.idt.base, s.idt.limit = IDT_GPA, idt_limit
    s.cs = cs
    s.ds = s.es = s.fs = s.gs = s.ss = ds
    s.tr = _tr()
    return s


def enter_cpl3(vcpu: Vcpu, entry: int, rsp: int, rdi: int) -> None:
    """Point the vCPU at `entry` in 64-bit mode at CPL3, IOPL=3, IF=0."""
    s = _long_mode_sregs(vcpu, _seg(USER_CS, code=True, dpl=3), _seg(USER_DS, code=False, dpl=3),
                         6 * 8 + 8 - 1, NUM_EXCEPTION_GATES * 16 - 1)
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
        setattr(r, name, 0)
    r.rip, r.rsp, r.rdi = entry, rsp, rdi
    r.rflags = RFLAGS_RESERVED | RFLAGS_IOPL3
    vcpu.set_regs(r)


# ---------------------------------------------------------------- ELF payload


@dataclass(frozen=True)
class Payload:
    entry: int
    image_start: int
    image_end: int  # end of the highest PT_LOAD segment (memsz)

    @property
    def free_start(self) -> int:
        return align_up(self.image_end, 2 * MiB)


PT_LOAD = 1


def load_elf(mem: GuestMemory, data: bytes, *, name: str = "payload") -> Payload:
    """Copy the PT_LOAD segments of a static x86-64 ELF64 executable to their
    physical addresses (zero-filling up to p_memsz)."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise BootError(f"{name} is not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise BootError(f"{name} is not a little-endian ELF64 file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != 62:
        raise BootError(f"{name} is not an x86-64 program (e_machine {e_machine})")
    if e_type != 2:
        raise BootError(f"{name} is not a static executable (e_type {e_type}; 2 = ET_EXEC expected)")
    e_entry, e_phoff = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    if e_phentsize < 56 or e_phoff + e_phnum * e_phentsize > len(data):
        raise BootError(f"{name}: program headers outside the file")
    lo, hi = None, None
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(data):
            raise BootError(f"{name}: segment {i} is larger than the file")
        if p_paddr < IMAGE_MIN:
            raise BootError(f"{name}: segment {i} at {p_paddr:#x} is below {IMAGE_MIN:#x} (link at or above it)")
        if not mem.contains(p_paddr, p_memsz):
            raise BootError(f"{name}: segment {i} [{p_paddr:#x}, {p_paddr + p_memsz:#x}) does not fit in "
                            f"{mem.size // MiB} MiB of guest memory")
        mem.write(p_paddr, data[p_offset:p_offset + p_filesz])
        mem.fill(p_paddr + p_filesz, p_memsz - p_filesz)
        lo = p_paddr if lo is None else min(lo, p_paddr)
        hi = p_paddr + p_memsz if hi is None else max(hi, p_paddr + p_memsz)
    if lo is None:
        raise BootError(f"{name} has no loadable segment")
    if not lo <= e_entry < hi:
        raise BootError(f"{name}: entry point {e_entry:#x} is outside its segments")
    return Payload(entry=e_entry, image_start=lo, image_end=hi)


@dataclass(frozen=True)
class BootDevice:
    mmio_base: int
    device_id: int
    irq: int


def boot_info(memory: int, free_start: int, cmdline: str, devices: list[BootDevice]) -> bytes:
    """struct vhostd_boot_info (ABI.md)."""
    if len(devices) > BOOT_MAX_DEVICES:
        raise BootError(f"{len(devices)} devices; the boot info has room for {BOOT_MAX_DEVICES}")
    raw = cmdline.encode()
    if len(raw) >= BOOT_CMDLINE_SIZE:
        raise BootError(f"args are {len(raw)} bytes; at most {BOOT_CMDLINE_SIZE - 1} fit in the boot info")
    out = struct.pack("<QIIQQQ", BOOT_MAGIC, BOOT_VERSION, len(devices), memory, free_start, memory)
    out += raw.ljust(BOOT_CMDLINE_SIZE, b"\0")
    for d in devices:
        out += struct.pack("<QII", d.mmio_base, d.device_id, d.irq)
    out = out.ljust(296 + 16 * BOOT_MAX_DEVICES, b"\0")
    assert len(out) == 552
    return out


def setup_payload(mem: GuestMemory, vcpu: Vcpu, data: bytes, args: str, devices: list[BootDevice],
                  *, name: str = "payload") -> Payload:
    """Load the ELF program, write the boot info and tables, and point the
    boot vCPU at the entry (ABI.md)."""
    payload = load_elf(mem, data, name=name)
    if payload.free_start > mem.size:
        raise BootError(f"{name} ends at {payload.image_end:#x}; memory ({mem.size // MiB} MiB) leaves no free RAM "
                        f"after it (free RAM starts at the next 2 MiB boundary, {payload.free_start:#x})")
    write_page_tables(mem, user=True)
    write_abi_tables(mem)
    mem.write(BOOT_INFO_GPA, boot_info(mem.size, payload.free_start, args, devices))
    enter_cpl3(vcpu, payload.entry, STACK_TOP, BOOT_INFO_GPA)
    return payload


def describe_exception(vcpu: Vcpu, mem: GuestMemory, vector: int) -> str:
    """What the program did, from the frame the CPU pushed on the stub's stack."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    name = EXCEPTION_NAMES.get(vector, f"vector {vector}")
    try:
        frame = mem.read(regs.rsp, 6 * 8)
    except ValueError:
        return f"guest exception {name} (stack {regs.rsp:#x} unreadable)"
    words = struct.unpack("<6Q", frame)
    if vector in EXCEPTIONS_WITH_ERROR_CODE:
        error, rip, cs, rflags, rsp = words[:5]
        text = f"guest exception {name} error code {error:#x} at rip {rip:#x}"
    else:
        rip, cs, rflags, rsp = words[:4]
        text = f"guest exception {name} at rip {rip:#x}"
    text += f" (cs {cs:#x} rsp {rsp:#x} rflags {rflags:#x}"
    if vector == 14:
        text += f" cr2 {sregs.cr2:#x}"
    return text + ")"


# ---------------------------------------------------------------- Linux bzImage (64-bit boot protocol)

ZERO_PAGE_GPA = 0x10000
CMDLINE_GPA = 0x20000
CMDLINE_MAX = 0x10000
E820_RAM, E820_RESERVED = 1, 2
# boot_params / setup_header offsets (Documentation/arch/x86/zero-page.rst, boot.rst)
_EXT_RAMDISK_IMAGE, _EXT_RAMDISK_SIZE, _EXT_CMD_LINE_PTR = 0x0C0, 0x0C4, 0x0C8
_E820_ENTRIES, _SENTINEL, _SETUP_SECTS, _VID_MODE, _BOOT_FLAG = 0x1E8, 0x1EF, 0x1F1, 0x1FA, 0x1FE
_HEADER, _VERSION, _TYPE_OF_LOADER, _LOADFLAGS = 0x202, 0x206, 0x210, 0x211
_RAMDISK_IMAGE, _RAMDISK_SIZE, _HEAP_END_PTR, _CMD_LINE_PTR, _INITRD_ADDR_MAX = 0x218, 0x21C, 0x224, 0x228, 0x22C
_KERNEL_ALIGNMENT, _RELOCATABLE, _XLOADFLAGS, _CMDLINE_SIZE = 0x230, 0x234, 0x236, 0x238
_PREF_ADDRESS, _INIT_SIZE, _E820_TABLE = 0x258, 0x260, 0x2D0
LOADED_HIGH, CAN_USE_HEAP = 0x01, 0x80
XLF_KERNEL_64 = 0x01


@dataclass(frozen=True)
class LinuxImage:
    entry: int
    load_addr: int
    boot_params: int
    initrd: tuple[int, int] | None


def e820_map(memory: int) -> list[tuple[int, int, int]]:
    return [
        (0, 0x9FC00, E820_RAM),
        (0x9FC00, 0x400, E820_RESERVED),
        (0xF0000, 0x10000, E820_RESERVED),
        (0x100000, memory - 0x100000, E820_RAM),
    ]


def load_bzimage(mem: GuestMemory, kernel: bytes, cmdline: str, initrd: bytes | None = None) -> LinuxImage:
    """Place a bzImage, its boot_params and command line, and an initrd."""
    if len(kernel) < 0x300 or kernel[_HEADER:_HEADER + 4] != b"HdrS":
        raise BootError("the kernel is not a bzImage (no 'HdrS' setup header)")
    version = struct.unpack_from("<H", kernel, _VERSION)[0]
    if version < 0x20C:
        raise BootError(f"boot protocol {version >> 8}.{version & 0xff:02d} is too old; the 64-bit entry needs 2.12")
    if not kernel[_XLOADFLAGS] & XLF_KERNEL_64:
        raise BootError("the kernel has no 64-bit entry point (XLF_KERNEL_64 not set)")
    setup_sects = kernel[_SETUP_SECTS] or 4
    pm_offset = (setup_sects + 1) * 512
    pm = kernel[pm_offset:]
    header_end = 0x202 + kernel[0x201]
    bp = bytearray(4096)
    bp[_SETUP_SECTS:header_end] = kernel[_SETUP_SECTS:header_end]

    pref = struct.unpack_from("<Q", kernel, _PREF_ADDRESS)[0]
    init_size = struct.unpack_from("<I", kernel, _INIT_SIZE)[0]
    align = struct.unpack_from("<I", kernel, _KERNEL_ALIGNMENT)[0] or 2 * MiB
    load = pref if pref >= 0x100000 else align_up(0x1000000, align)
    end = load + max(init_size, len(pm))
    if end > mem.size:
        raise BootError(f"the kernel needs memory up to {end:#x}; the VM has {mem.size // MiB} MiB")
    mem.write(load, pm)

    raw_cmdline = cmdline.encode() + b"\0"
    limit = struct.unpack_from("<I", kernel, _CMDLINE_SIZE)[0] + 1 if version >= 0x206 else 256
    if len(raw_cmdline) > min(limit, CMDLINE_MAX):
        raise BootError(f"the command line is {len(raw_cmdline) - 1} bytes; this kernel takes at most {limit - 1}")
    mem.write(CMDLINE_GPA, raw_cmdline)

    bp[_VID_MODE:_VID_MODE + 2] = struct.pack("<H", 0xFFFF)
    bp[_TYPE_OF_LOADER] = 0xFF
    bp[_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", bp, _HEAP_END_PTR, 0xFE00 - 0x200)
    struct.pack_into("<I", bp, _CMD_LINE_PTR, CMDLINE_GPA)
    struct.pack_into("<I", bp, _EXT_CMD_LINE_PTR, 0)

    placed = None
    if initrd:
        max_addr = struct.unpack_from("<I", kernel, _INITRD_ADDR_MAX)[0] if version >= 0x203 else 0x37FFFFFF
        top = min(max_addr + 1, mem.size)
        addr = (top - len(initrd)) & ~(2 * MiB - 1)
        if addr < end:
            raise BootError(f"the initrd ({len(initrd)} bytes) does not fit between the kernel and the end of memory")
        mem.write(addr, initrd)
        struct.pack_into("<II", bp, _RAMDISK_IMAGE, addr & 0xFFFFFFFF, len(initrd) & 0xFFFFFFFF)
        struct.pack_into("<II", bp, _EXT_RAMDISK_IMAGE, addr >> 32, len(initrd) >> 32)
        placed = (addr, len(initrd))

    table = e820_map(mem.size)
    bp[_E820_ENTRIES] = len(table)
    for i, (addr, size, kind) in enumerate(table):
        struct.pack_into("<QQI", bp, _E820_TABLE + 20 * i, addr, size, kind)
    bp[_SENTINEL] = 0
    mem.write(ZERO_PAGE_GPA, bytes(bp))
    return LinuxImage(entry=load + 0x200, load_addr=load, boot_params=ZERO_PAGE_GPA, initrd=placed)


_ACPI_RSDP_ADDR = 0x070


def setup_linux(mem: GuestMemory, vcpu: Vcpu, kernel: bytes, cmdline: str, initrd: bytes | None = None,
                acpi_tables: dict[int, bytes] | None = None, rsdp: int = 0) -> LinuxImage:
    """Load the kernel and enter its 64-bit entry point at CPL0 (boot.rst,
    "64-bit boot protocol"): paging on with an identity map covering the
    kernel, boot_params and command line; CS = __BOOT_CS, DS/ES/SS = __BOOT_DS;
    interrupts off; RSI = boot_params.  acpi_tables (gpa -> bytes) go into
    the reserved BIOS area, and boot_params names the RSDP at rsdp."""
    image = load_bzimage(mem, kernel, cmdline, initrd)
    for gpa, data in (acpi_tables or {}).items():
        mem.write(gpa, data)
    if rsdp:
        mem.write(ZERO_PAGE_GPA + _ACPI_RSDP_ADDR, struct.pack("<Q", rsdp))
    write_page_tables(mem, user=False)
    gdt = struct.pack("<4Q", 0, 0, CODE64(0), DATA(0)) + _tss_descriptor(TSS_GPA, 103)
    mem.write(GDT_GPA, gdt)
    mem.write(TSS_GPA, bytes(TSS_SIZE))
    s = _long_mode_sregs(vcpu, _seg(LINUX_CS, code=True, dpl=0), _seg(LINUX_DS, code=False, dpl=0), len(gdt) - 1, 0)
    s.tr = kvm_segment(base=TSS_GPA, limit=103, selector=0x20, type=11, present=1)
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rsi, r.rsp = image.entry, image.boot_params, EXC_STACK_TOP
    r.rflags = RFLAGS_RESERVED
    vcpu.set_regs(r)
    return image
