"""An 8250/16550 UART, transmit side only: enough for a polling console
(the guest-drivers runtime, Linux earlyprintk=serial,ttyS0).

THR writes (with DLAB clear) go to the console sink; LSR always reads 0x60
(transmitter empty, nothing received); LCR, IER, MCR and SCR hold what was
written; IIR reads 0x01 (no interrupt pending); MSR reads 0xb0 (DCD, DSR,
CTS).  The divisor latch is accepted and ignored.  No interrupts, no input.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_THRE_TEMT = 0x60


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
    def __init__(self, console: Console, base: int = 0x3F8) -> None:
        self.console = console
        self.base = base
        self.regs = bytearray(8)
        self.divisor = bytearray(2)

    def handles(self, port: int) -> bool:
        return self.base <= port < self.base + 8

    def write(self, port: int, data: bytes) -> None:
        reg = port - self.base
        if reg == THR and not self.regs[LCR] & LCR_DLAB:
            self.console.write(data)
            return
        for i, value in enumerate(data):  # `outw` to LCR etc.: byte by byte
            r = reg + i
            if r >= 8:
                break
            if r in (THR, IER) and self.regs[LCR] & LCR_DLAB:
                self.divisor[r] = value
            elif r in (IER, LCR, MCR, SCR):
                self.regs[r] = value

    def read(self, port: int, size: int) -> bytes:
        out = bytearray()
        for i in range(size):
            r = port - self.base + i
            if r >= 8:
                out.append(0xFF)
            elif r in (THR, IER) and self.regs[LCR] & LCR_DLAB:
                out.append(self.divisor[r])
            elif r == THR:
                out.append(0)
            elif r == IIR:
                out.append(0x01)
            elif r == LSR:
                out.append(LSR_THRE_TEMT)
            elif r == MSR:
                out.append(0xB0)
            else:
                out.append(self.regs[r])
        return bytes(out)
