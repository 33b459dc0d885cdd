"""The pieces of a Linux boot the host can check without booting: the ACPI
tables the VMM writes and its UART's interrupt (tests/test_vmm_linux.py
boots the real thing one level down)."""

from __future__ import annotations

import struct

from vhostd.vmm import acpi
from vhostd.vmm.uart import Console, Uart8250


def tables(vcpus: int = 2, devices: int = 3) -> dict[int, bytes]:
    devs = [acpi.MmioDevice(0xD0000000 + i * 0x1000, 0x1000, 5 + i) for i in range(devices)]
    return acpi.build(vcpus, devs, 0x3F8, 4)


def at(placed: dict[int, bytes], gpa: int) -> bytes:
    return placed[gpa]


def test_every_table_is_reachable_from_the_rsdp_and_sums_to_zero():
    placed = tables()
    rsdp = at(placed, acpi.RSDP_GPA)
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt = at(placed, struct.unpack_from("<Q", rsdp, 24)[0])
    assert xsdt[:4] == b"XSDT" and sum(xsdt) % 256 == 0 and len(xsdt) == struct.unpack_from("<I", xsdt, 4)[0]
    sigs = {}
    for i in range((len(xsdt) - 36) // 8):
        t = at(placed, struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0])
        assert sum(t) % 256 == 0 and len(t) == struct.unpack_from("<I", t, 4)[0]
        sigs[t[:4]] = t
    assert set(sigs) == {b"FACP", b"APIC"}
    fadt = sigs[b"FACP"]
    assert struct.unpack_from("<I", fadt, 112)[0] & acpi.FADT_HW_REDUCED_ACPI
    dsdt = at(placed, struct.unpack_from("<Q", fadt, 140)[0])
    assert dsdt[:4] == b"DSDT" and sum(dsdt) % 256 == 0
    assert all(a < b for a, b in zip(sorted(placed), sorted(placed)[1:]))
    assert max(g + len(d) for g, d in placed.items()) <= acpi.TABLES_END


def test_madt_lists_every_vcpu_and_the_ioapic():
    placed = tables(vcpus=4)
    madt = next(d for d in placed.values() if d[:4] == b"APIC")
    off, cpus, ioapics = 44, [], []
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        if kind == 0:
            cpus.append(madt[off + 3])
        elif kind == 1:
            ioapics.append(struct.unpack_from("<I", madt, off + 4)[0])
        off += length
    assert off == len(madt) and cpus == [0, 1, 2, 3] and ioapics == [acpi.IOAPIC_GPA]


def test_dsdt_names_each_virtio_mmio_window_and_its_interrupt():
    placed = tables(devices=3)
    dsdt = next(d for d in placed.values() if d[:4] == b"DSDT")
    assert dsdt.count(b"LNRO0005") == 3 and b"_S5_" in dsdt and b"QEMU0001" in dsdt
    for i in range(3):
        assert struct.pack("<BHBII", 0x86, 9, 1, 0xD0000000 + i * 0x1000, 0x1000) in dsdt
        assert struct.pack("<BHBBI", 0x89, 6, 3, 1, 5 + i) in dsdt


def test_aml_package_lengths():
    assert acpi._pkg_length(10) == bytes([11])
    assert acpi._pkg_length(62) == bytes([63])
    assert acpi._pkg_length(63) == bytes([0x40 | 1, 4])  # 65 bytes in all: 0x41
    assert acpi._pkg_length(4000) == bytes([0x40 | (4002 & 0xF), 4002 >> 4])
    assert acpi.eisa_id("PNP0501") == 0x0105D041


def test_uart_raises_its_irq_for_an_empty_transmitter_until_iir_reports_it():
    levels, out = [], []
    u = Uart8250(Console(out.append), 0x3F8, irq=levels.append)
    u.write(0x3F8 + 4, b"\x08")  # MCR: OUT2 (the PC's interrupt gate)
    u.write(0x3F8 + 1, b"\x02")  # IER: THR empty
    assert levels == [1]
    assert u.read(0x3F8 + 2, 1) == b"\x02" and levels == [1, 0]  # IIR: THR empty, now cleared
    assert u.read(0x3F8 + 2, 1) == b"\x01"  # nothing pending
    u.write(0x3F8, b"A")
    assert levels == [1, 0, 1]
    u.write(0x3F8 + 1, b"\x00")  # interrupt off: the line drops
    assert levels == [1, 0, 1, 0]
    u.write(0x3F8 + 2, b"\x01")  # FCR: FIFOs on, a 16550A
    assert u.read(0x3F8 + 2, 1)[0] & 0xC0 == 0xC0


def test_polled_uart_has_no_interrupt():
    out = []
    u = Uart8250(Console(out.append), 0x3F8)
    u.write(0x3F8 + 1, b"\x02")
    u.write(0x3F8, b"x\n")
    assert out == [b"x\n"] and not u.interrupt_driven


def test_cmos_clock_gives_the_time_without_an_update_in_progress():
    import time

    from vhostd.vmm.rtc import CmosRtc

    rtc = CmosRtc(clock=lambda: time.struct_time((2026, 12, 2, 4, 27, 59, 2, 336, 0)))

    def reg(i: int) -> int:
        rtc.write(0x70, bytes([0x80 | i]))  # with the NMI mask bit, as Linux writes it
        return rtc.read(0x71, 1)[0]

    assert not reg(0x0A) & 0x80  # UIP clear: the guest does not poll
    assert reg(0x0B) & 0x02  # 24-hour
    assert [reg(i) for i in (0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32)] == [0x59, 0x27, 0x04, 0x02, 0x12, 0x26,
                                                                            0x20]
