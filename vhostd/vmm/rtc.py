"""A read-only MC146818 CMOS clock at ports 0x70/0x71: the wall-clock time
(UTC, BCD, 24-hour) a Linux guest reads once at boot.

Without it the ports read 0xff, the "update in progress" bit never clears,
and the kernel polls it 10 000 times per attempt (two VM exits each: some
40 000 exits of the boot, seconds on a nested host) before saying it cannot
read the time.  Writes to the clock are ignored; the other CMOS bytes read 0.
"""

from __future__ import annotations

import time

INDEX_PORT, DATA_PORT = 0x70, 0x71
SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
STATUS_A, STATUS_B, STATUS_C, STATUS_D, CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x32
STATUS_A_IDLE = 0x26   # 32.768 kHz time base, 1024 Hz rate, no update in progress
STATUS_B_24H = 0x02    # BCD, 24-hour
STATUS_D_VALID = 0x80  # the battery is fine


def _bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


class CmosRtc:
    def __init__(self, clock=time.gmtime) -> None:
        self.index = 0
        self.clock = clock

    def handles(self, port: int) -> bool:
        return port in (INDEX_PORT, DATA_PORT)

    def write(self, port: int, data: bytes) -> None:
        if port == INDEX_PORT and data:
            self.index = data[0] & 0x7F  # bit 7 is the NMI mask

    def register(self, index: int) -> int:
        t = self.clock()
        fields = {SECONDS: t.tm_sec, MINUTES: t.tm_min, HOURS: t.tm_hour, WEEKDAY: (t.tm_wday + 1) % 7 + 1,
                  DAY: t.tm_mday, MONTH: t.tm_mon, YEAR: t.tm_year % 100, CENTURY: t.tm_year // 100}
        if index in fields:
            return _bcd(min(fields[index], 99))
        return {STATUS_A: STATUS_A_IDLE, STATUS_B: STATUS_B_24H, STATUS_D: STATUS_D_VALID}.get(index, 0)

    def read(self, port: int, size: int) -> bytes:
        if port == INDEX_PORT:
            return bytes([self.index]) * size
        return bytes([self.register(self.index)]) * size
