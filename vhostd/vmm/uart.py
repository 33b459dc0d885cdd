"""A 16550A UART, transmit side only: a polling console (the guest-drivers
runtime, Linux earlyprintk) or an interrupt-driven one (Linux's ttyS0).

THR writes (with DLAB clear) go to the console sink at once, so the
transmitter is always empty: LSR reads 0x60, and with IER's "THR empty"
interrupt enabled (and MCR's OUT2, which gates a PC UART's interrupt line)
the UART raises its IRQ after each write and when the interrupt is enabled,
until IIR reports it (reading IIR clears it, as on the real part).  FCR's
FIFO enable shows in IIR's top bits (a 16550A, so Linux writes 16 bytes per
interrupt).  LCR, IER, MCR and SCR hold what was written; MSR reads 0xb0
(DCD, DSR, CTS).  The divisor latch is accepted and ignored.  No input.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)
FCR = IIR  # written: FIFO control; read: interrupt identification
LCR_DLAB = 0x80
LSR_THRE_TEMT = 0x60
IER_THRI = 0x02
MCR_OUT2 = 0x08
IIR_NO_INT, IIR_THRI, IIR_FIFOS = 0x01, 0x02, 0xC0


class Console:
    """Collects guest output and hands it to `sink` line by line (a partial
    line is flushed by flush(), e.g. when the VM stops)."""

    def __init__(self, sink: Callable[[bytes], None], *, max_line: int = 4096) -> None:
        self.sink: Callable[[bytes], None] | None = sink
        self.max_line = max_line
        self._buf = bytearray()
        self._lock = threading.Lock()

    def _emit(self, data: bytes) -> None:
        if self.sink is None:
            return
        try:
            self.sink(data)
        except OSError as e:  # e.g. stdout closed: the guest runs on without a console
            logging.getLogger("vhostd.vmm").warning("console output lost from now on: %s", e)
            self.sink = None

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            if b"\n" in data or len(self._buf) >= self.max_line:
                cut = self._buf.rfind(b"\n") + 1 or len(self._buf)
                out = bytes(self._buf[:cut])
                del self._buf[:cut]
            else:
                return
        self._emit(out)

    def flush(self) -> None:
        with self._lock:
            out = bytes(self._buf)
            self._buf.clear()
        if out:
            self._emit(out)


class Uart8250:
    def __init__(self, console: Console, base: int = 0x3F8,
                 irq: Callable[[int], None] | None = None) -> None:
        """irq(level): drive the interrupt line (None: a polled console)."""
        self.console = console
        self.base = base
        self.regs = bytearray(8)
        self.divisor = bytearray(2)
        self.fifo = False
        self.thre_pending = False  # "THR empty" not yet reported by IIR
        self._irq = irq
        self._level = 0
        self._lock = threading.Lock()  # vCPUs of an SMP guest share the UART

    @property
    def interrupt_driven(self) -> bool:
        return self._irq is not None

    def handles(self, port: int) -> bool:
        return self.base <= port < self.base + 8

    def _update_irq(self) -> None:
        level = int(self.thre_pending and bool(self.regs[IER] & IER_THRI) and bool(self.regs[MCR] & MCR_OUT2))
        if self._irq is not None and level != self._level:
            self._level = level
            self._irq(level)

    def write(self, port: int, data: bytes) -> None:
        reg = port - self.base
        if reg == THR and not self.regs[LCR] & LCR_DLAB:
            self.console.write(data)
            with self._lock:
                self.thre_pending = True  # sent at once: empty again
                self._update_irq()
            return
        with self._lock:
            for i, value in enumerate(data):  # `outw` to LCR etc.: byte by byte
                r = reg + i
                if r >= 8:
                    break
                if r in (THR, IER) and self.regs[LCR] & LCR_DLAB:
                    self.divisor[r] = value
                elif r == IER:
                    if value & IER_THRI and not self.regs[IER] & IER_THRI:
                        self.thre_pending = True  # enabling it with THR empty interrupts at once
                    self.regs[IER] = value & 0x0F
                elif r == FCR:
                    self.fifo = bool(value & 1)
                elif r in (LCR, MCR, SCR):
                    self.regs[r] = value
            self._update_irq()

    def read(self, port: int, size: int) -> bytes:
        out = bytearray()
        with self._lock:
            for i in range(size):
                r = port - self.base + i
                if r >= 8:
                    out.append(0xFF)
                elif r in (THR, IER) and self.regs[LCR] & LCR_DLAB:
                    out.append(self.divisor[r])
                elif r == THR:
                    out.append(0)
                elif r == IIR:
                    fifos = IIR_FIFOS if self.fifo else 0
                    if self.thre_pending and self.regs[IER] & IER_THRI:
                        self.thre_pending = False
                        out.append(IIR_THRI | fifos)
                    else:
                        out.append(IIR_NO_INT | fifos)
                elif r == LSR:
                    out.append(LSR_THRE_TEMT)
                elif r == MSR:
                    out.append(0xB0)
                else:
                    out.append(self.regs[r])
            self._update_irq()
        return bytes(out)
