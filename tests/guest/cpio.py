"""Minimal writer for the cpio "newc" format the Linux initramfs loader reads.

Written in Python (instead of calling cpio(1)) so that archives can hold device
nodes and root-owned files without running as root, and so that the output is
byte-for-byte reproducible (fixed mtimes, sorted order chosen by the caller).
"""

from __future__ import annotations

import gzip
import io
import stat

_MAGIC = b"070701"


class CpioWriter:
    """Accumulates entries; `getvalue()` returns the archive with its trailer."""

    def __init__(self, mtime: int = 0):
        self._buf = io.BytesIO()
        self._ino = 1
        self._mtime = mtime
        self._dirs: set[str] = {""}
        self._closed = False

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        if self._closed:
            raise ValueError("archive already finished")
        name = name.strip("/")
        if not name:
            return
        raw_name = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, self._mtime, len(data),
            0, 0, rdev[0], rdev[1], len(raw_name), 0,
        )
        self._ino += 1
        hdr = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._buf.write(hdr + raw_name)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        rem = self._buf.tell() % 4
        if rem:
            self._buf.write(b"\0" * (4 - rem))

    def _parents(self, name: str) -> None:
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self.mkdir(d)

    def mkdir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        if name in self._dirs:
            return
        self._parents(name)
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        if not self._closed:
            self._entry("TRAILER!!!", 0)
            self._closed = True
        return self._buf.getvalue()


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    # mtime=0 keeps the output reproducible.
    return gzip.compress(data, compresslevel=level, mtime=0)
