"""ACPI tables for a Linux guest: how it finds its CPUs, its interrupt
controller, its devices, and how it powers off.

Many distribution kernels (Debian's cloud kernel among them) have neither
MP-table parsing nor `virtio_mmio.device=` on the command line: ACPI is the
one description they read.  The VM is "hardware-reduced" ACPI (FADT flag
HW_REDUCED_ACPI, as Firecracker's): no SCI, no PM timer, no legacy PIC
or PIT for the kernel to drive; the in-kernel LAPICs (timer) and IOAPIC
(device interrupts) do the work.

    RSDP (at RSDP_GPA, also in boot_params.acpi_rsdp_addr)
     └ XSDT ─┬ FADT ── DSDT  \\_S5_ (poweroff), \\_SB_ devices: the UART
             │               (PNP0501), pvpanic (QEMU0001), each virtio-mmio
             │               device (LNRO0005: its window and its interrupt)
             └ MADT  one local APIC per vCPU, the IOAPIC, IRQ 0 -> GSI 2

Power goes through ports the VMM watches (vm.py): the FADT's sleep control
register (poweroff: SLP_EN with \\_S5_'s type), its reset register
(reboot), and pvpanic (a panic).

The DSDT is AML written byte by byte here; the few constructs it needs are
below (ACPI 6.4, chapter 20 "ACPI Machine Language").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: Where the tables go: inside the BIOS area e820 reports reserved.
RSDP_GPA = 0xF0000
TABLES_END = 0x100000
OEM_ID = b"VHOSTD"
OEM_TABLE_ID = b"VHOSTDVM"

IOAPIC_GPA = 0xFEC00000
LAPIC_GPA = 0xFEE00000

#: Ports of the VMM's power interface (byte writes; see vm.py).
SLEEP_CONTROL_PORT = 0x600
SLEEP_STATUS_PORT = 0x601
RESET_PORT = 0x602
RESET_VALUE = 0x01
PVPANIC_PORT = 0x505
#: \_S5_ sleep type: what the guest writes (shifted by 2, with SLP_EN) to power off.
S5_TYPE = 5
SLP_EN = 0x20
PVPANIC_PANICKED, PVPANIC_CRASH_LOADED = 1, 2


@dataclass(frozen=True)
class MmioDevice:
    base: int
    size: int
    gsi: int


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header, then body."""
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, b"VHSD", 1)
    raw = bytearray(header + body)
    raw[9] = _checksum(raw)
    return bytes(raw)


def _gas_io(port: int) -> bytes:
    """A Generic Address Structure: one byte in I/O space."""
    return struct.pack("<BBBBQ", 1, 8, 0, 1, port)


# ---------------------------------------------------------------- AML


def _pkg_length(n: int) -> bytes:
    """PkgLength of a body of n bytes (the encoding counts itself)."""
    if n + 1 < 0x40:
        return bytes([n + 1])
    for extra in (1, 2, 3):
        total = n + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            total >>= 4
            for _ in range(extra):
                out.append(total & 0xFF)
                total >>= 8
            return bytes(out)
    raise ValueError("AML package too long")


def _name_seg(name: str) -> bytes:
    raw = name.encode()
    assert len(raw) <= 4
    return raw.ljust(4, b"_")


def _integer(v: int) -> bytes:
    if v == 0:
        return b"\x00"
    if v == 1:
        return b"\x01"
    if v < 0x100:
        return b"\x0a" + bytes([v])
    if v < 0x10000:
        return b"\x0b" + struct.pack("<H", v)
    if v < 1 << 32:
        return b"\x0c" + struct.pack("<I", v)
    return b"\x0e" + struct.pack("<Q", v)


def _string(s: str) -> bytes:
    return b"\x0d" + s.encode() + b"\x00"


def _name(name: str, value: bytes) -> bytes:
    return b"\x08" + _name_seg(name) + value


def _buffer(data: bytes) -> bytes:
    body = _integer(len(data)) + data
    return b"\x11" + _pkg_length(len(body)) + body


def _package(elements: list[bytes]) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return b"\x12" + _pkg_length(len(body)) + body


def _device(name: str, body: bytes) -> bytes:
    inner = _name_seg(name) + body
    return b"\x5b\x82" + _pkg_length(len(inner)) + inner


def _scope(path: bytes, body: bytes) -> bytes:
    inner = path + body
    return b"\x10" + _pkg_length(len(inner)) + inner


def eisa_id(text: str) -> int:
    """EisaId("PNP0501"): three letters of five bits, four hex digits, as
    the DWord AML stores (bytes in the order they compress to)."""
    a, b, c = (ord(ch) - 0x40 for ch in text[:3])
    value = (a << 26) | (b << 21) | (c << 16) | int(text[3:], 16)
    return struct.unpack("<I", struct.pack(">I", value))[0]


def _resources(*descriptors: bytes) -> bytes:
    """A ResourceTemplate: the descriptors, then the end tag (checksum 0)."""
    return _buffer(b"".join(descriptors) + b"\x79\x00")


def _memory32_fixed(base: int, size: int) -> bytes:
    return struct.pack("<BHBII", 0x86, 9, 1, base, size)


def _interrupt(gsi: int) -> bytes:
    """Extended Interrupt: consumer, edge, active high, exclusive."""
    return struct.pack("<BHBBI", 0x89, 6, 0x03, 1, gsi)


def _io(port: int, length: int) -> bytes:
    return struct.pack("<BBHHBB", 0x47, 1, port, port, 1, length)


def _irq_no_flags(irq: int) -> bytes:
    return struct.pack("<BH", 0x22, 1 << irq)


def dsdt_body(devices: list[MmioDevice], uart_port: int, uart_irq: int) -> bytes:
    sb = _device("COM1", _name("_HID", _integer(eisa_id("PNP0501"))) + _name("_UID", _integer(0))
                 + _name("_CRS", _resources(_io(uart_port, 8), _irq_no_flags(uart_irq))))
    sb += _device("PEVT", _name("_HID", _string("QEMU0001"))
                  + _name("_CRS", _resources(_io(PVPANIC_PORT, 1))))
    for i, d in enumerate(devices):
        sb += _device(f"V{i:03X}", _name("_HID", _string("LNRO0005")) + _name("_UID", _integer(i))
                      + _name("_CRS", _resources(_memory32_fixed(d.base, d.size), _interrupt(d.gsi))))
    return (_name("_S5_", _package([_integer(S5_TYPE), _integer(S5_TYPE), _integer(0), _integer(0)]))
            + _scope(b"\\" + _name_seg("_SB"), sb))


# ---------------------------------------------------------------- tables

FADT_HW_REDUCED_ACPI = 1 << 20
FADT_RESET_REG_SUP = 1 << 10
FADT_LENGTH = 276


def fadt(dsdt_gpa: int) -> bytes:
    body = bytearray(FADT_LENGTH - 36)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)

    put(40, "<I", dsdt_gpa)
    put(45, "<B", 0)  # preferred PM profile: unspecified
    put(112, "<I", FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP)
    body[116 - 36:128 - 36] = _gas_io(RESET_PORT)
    put(128, "<B", RESET_VALUE)
    put(109, "<H", 0)  # IAPC_BOOT_ARCH: no legacy devices, no 8042
    put(131, "<B", 4)  # FADT minor version (6.4)
    put(140, "<Q", dsdt_gpa)
    body[244 - 36:256 - 36] = _gas_io(SLEEP_CONTROL_PORT)
    body[256 - 36:268 - 36] = _gas_io(SLEEP_STATUS_PORT)
    put(268, "<8s", b"VHOSTD\0\0")  # hypervisor vendor identity
    return _table(b"FACP", 6, bytes(body))


def madt(vcpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_GPA, 0)  # no 8259s (PCAT_COMPAT clear)
    for i in range(vcpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)  # processor i, APIC id i, enabled
    body += struct.pack("<BBBBII", 1, 12, vcpus, 0, IOAPIC_GPA, 0)  # IOAPIC (id after the CPUs), GSI base 0
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)  # ISA IRQ 0 -> GSI 2, bus-default polarity/trigger
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0x5, 1)  # LINT1 of every CPU is the NMI, edge, active high
    return _table(b"APIC", 5, body)


def build(vcpus: int, devices: list[MmioDevice], uart_port: int, uart_irq: int) -> dict[int, bytes]:
    """The tables, by guest physical address (all in [RSDP_GPA, TABLES_END))."""
    placed: dict[int, bytes] = {}
    at = RSDP_GPA + 64

    def place(data: bytes) -> int:
        nonlocal at
        gpa = at
        placed[gpa] = data
        at = (at + len(data) + 15) & ~15
        return gpa

    dsdt_gpa = place(_table(b"DSDT", 2, dsdt_body(devices, uart_port, uart_irq)))
    fadt_gpa = place(fadt(dsdt_gpa))
    madt_gpa = place(madt(vcpus))
    xsdt_gpa = place(_table(b"XSDT", 1, struct.pack("<QQ", fadt_gpa, madt_gpa)))
    if at > TABLES_END:
        raise ValueError(f"ACPI tables end at {at:#x}, beyond the BIOS area")
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_gpa, 0, b"\0\0\0"))
    rsdp[8] = _checksum(rsdp[:20])
    rsdp[32] = _checksum(rsdp)
    placed[RSDP_GPA] = bytes(rsdp)
    return placed
