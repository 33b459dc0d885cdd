"""backend: file (the default): an image file or a block device on this host.

Its I/O runs where `aio:` says (native/file.c, native/aio.c):
* io_uring -- the worker's ring; requests complete when their I/O does, many
  in flight per queue.  Images on file systems whose io_uring submission may
  block the submitting thread (FUSE, network file systems) have every
  request handed to the kernel's workers (IOSQE_ASYNC), so a hung file never
  stalls the worker's other devices.
* threads -- a thread pool (where io_uring is unavailable, or by choice).
* inline -- with `aio: auto`, images on memory file systems (tmpfs): a read
  there is a memory copy that cannot hang, done at once in the worker, which
  is faster than any queue.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass, field

from vhostd import configkeys as v
from vhostd import storage
from vhostd.configkeys import SECTOR, Key
from vhostd.native import ffi, lib
from vhostd.storage import LockError, Store

log = logging.getLogger("vhostd.blk")

#: auto: io_uring (images on memory file systems inline); io_uring; threads: a thread pool.
AIO = ("auto", "io_uring", "threads")
BLKGETSIZE64 = 0x80081272

# statfs f_type of memory file systems (images there are served inline) and
# of local disk file systems whose io_uring submission does not block.
_MEMORY_FS = {0x01021994: "tmpfs", 0x858458F6: "ramfs", 0x958458F6: "hugetlbfs"}
_LOCAL_FS = {0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0xF2F52010: "f2fs"}
_OTHER_FS = {0x65735546: "fuse", 0x6969: "nfs", 0xFE534D42: "smb2", 0xFF534D42: "cifs", 0x01021997: "9p",
             0x00C36400: "ceph", 0x794C7630: "overlay"}
_ENGINES = {"inline": lib.VD_FILE_INLINE, "io_uring": lib.VD_FILE_URING, "threads": lib.VD_FILE_THREADS}

BLOCKING_OPEN = False


@dataclass(frozen=True, kw_only=True)
class Settings:
    path: str  # absolute path of the image (regular file or block device)
    # bytes; creates a missing image.  Not a change of the device when the image exists.
    size: int | None = field(default=None, compare=False)
    direct: bool = False  # open the image with O_DIRECT
    aio: str = "auto"  # one of AIO: where the image's I/O runs
    shared: bool = False  # others may name the image: locked only while the device runs


KEYS: dict[str, Key] = {
    "path": Key(v.path, help="the disk image: a regular file or a block device"),
    "size": Key(v.size(SECTOR), None),
    "direct": Key(v.boolean, False),
    "aio": Key(v.choice(AIO), "auto"),
    "shared": Key(v.boolean, False),
}


def identity(settings: Settings) -> tuple[str, str, str]:
    """The key naming the data, what kind of data it is, and what names it."""
    return "path", "image", os.path.realpath(settings.path)


def check_files(dev: v.Draft, ctx: v.Context) -> None:
    if not dev.ok("path") or dev.values.get("path") is None:
        return
    path = dev.values["path"]
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        dev.report(ctx, "path", f"cannot access image {path}: {e.strerror}")
        return
    if st is None:
        if "size" in dev.bad:
            return
        if dev.values.get("size") is None:
            dev.report(ctx, "path", f"image {path} does not exist; create it, or set 'size' to have vhostd create it")
            return
        why = v.why_not_creatable(path)
        if why:
            dev.report(ctx, "path", f"image {path} does not exist and cannot be created: {why}")
        return
    if stat.S_ISDIR(st.st_mode):
        dev.report(ctx, "path", f"image {path} is a directory; expected a regular file or a block device")
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        dev.report(ctx, "path", f"image {path} is not a regular file or a block device")
        return
    if not os.access(path, os.R_OK):
        dev.report(ctx, "path", f"image {path} is not readable")
    elif dev.values.get("readonly") is False and dev.ok("readonly") and not os.access(path, os.W_OK):
        dev.report(ctx, "path", f"image {path} is not writable; fix its permissions or set 'readonly: true'")
    if stat.S_ISREG(st.st_mode) and st.st_size % SECTOR:
        dev.report(ctx, "path", f"image {path} is {st.st_size} bytes long, which is not a multiple of {SECTOR}")


def choose_engine(aio: str, info, name: str) -> tuple[str, bool, str]:
    """(engine, punt, why) for an image: see the module docstring."""
    fs = info.fs_type & 0xFFFFFFFF
    if aio == "auto" and fs in _MEMORY_FS and not info.is_blockdev:
        return "inline", False, f"image on {_MEMORY_FS[fs]}"
    if aio in ("auto", "io_uring"):
        why = ffi.new("char[]", 160)
        if lib.vd_uring_available(why, 160):
            if info.is_blockdev or fs in _LOCAL_FS or fs in _MEMORY_FS:
                return "io_uring", False, ""
            kind = _OTHER_FS.get(fs, f"file system {fs:#x}")
            return "io_uring", True, f"image on {kind}: requests go to kernel workers"
        reason = ffi.string(why).decode(errors="replace")
        if aio == "io_uring":
            log.warning("%s: aio io_uring is unavailable (%s); using the thread pool", name, reason)
        return "threads", False, f"io_uring unavailable: {reason}"
    return "threads", False, ""


def open_image(path: str, readonly: bool, direct: bool, create_size: int | None) -> tuple[int, int, bool]:
    """Open (creating sparse if asked) and return (fd, size in bytes, is block device)."""
    flags = os.O_RDONLY if readonly else os.O_RDWR
    flags |= os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    if create_size is not None and not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "xb") as f:
            f.truncate(create_size)
        log.info("created sparse image %s of %d bytes", path, create_size)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            buf = bytearray(8)
            fcntl.ioctl(fd, BLKGETSIZE64, buf)
            return fd, struct.unpack("<Q", buf)[0], True
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is neither a regular file nor a block device")
        return fd, st.st_size, False
    except BaseException:
        os.close(fd)
        raise


# OFD locks on the bytes QEMU's file-posix uses for its permissions (100 +
# perm: it uses the permission; 200 + perm: it does not let others have it;
# perm 0 consistent read, 1 write), so qemu and qemu-storage-daemon refuse
# an image vhostd writes, and the other way round.  A writer locks 101 and
# 201 exclusively: one writer at a time, and none while a QEMU reader that
# does not share writes has it; a reader takes a shared lock on 100, which
# conflicts with nobody (a read-only device beside a writer is allowed).
_WRITER_BYTES = ((fcntl.F_WRLCK, 101), (fcntl.F_WRLCK, 201))
_READER_BYTES = ((fcntl.F_RDLCK, 100),)
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock: type, whence, start, len, pid


def _setlk(fd: int, kind: int, start: int) -> None:
    # F_OFD_SETLK, never F_OFD_SETLKW: a held lock is an error, not a wait.
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0))


class FileStore(Store):
    _lock_fd: int | None = None  # (class defaults: not dataclass fields)
    _held = False

    def setup_lock(self, fd: int, path: str, shared: bool, readonly: bool) -> None:
        st = os.fstat(fd)
        # Our own open file description (a dup shares it): the lock belongs to
        # it, so it lasts until both this fd and the native store's are closed.
        self._lock_fd = os.dup(fd)
        self._key = ("file", st.st_dev, st.st_ino)
        self._path = path
        self._bytes = _READER_BYTES if readonly else _WRITER_BYTES
        self._held = False
        self.shared = shared

    def claim(self) -> None:
        if self._held or self._lock_fd is None:
            return
        taken = []
        try:
            for kind, start in self._bytes:
                _setlk(self._lock_fd, kind, start)
                taken.append(start)
        except OSError as exc:
            for start in taken:
                _setlk(self._lock_fd, fcntl.F_UNLCK, start)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise LockError(exc.errno, f"cannot lock image {self._path}: {exc.strerror}") from None
            who = storage.holder(self._key) or "another process (e.g. another vhostd, qemu or qemu-storage-daemon)"
            raise LockError(errno.EBUSY, f"image {self._path} is in use by {who}") from None
        self._held = True
        storage.hold(self._key, self)

    def release(self) -> None:
        if self.shared and self._held:
            for _, start in self._bytes:
                _setlk(self._lock_fd, fcntl.F_UNLCK, start)
            self._held = False
            storage.unhold(self._key, self)

    def close(self) -> None:
        # No explicit unlock: the native store's fd keeps the lock until its
        # last I/O is done (so no old write lands after another user's).
        if self._lock_fd is not None:
            storage.unhold(self._key, self)
            try:
                os.close(self._lock_fd)
            except OSError:
                pass  # closed all the same (e.g. ENOTCONN from a FUSE file system gone)
            self._lock_fd = None
            self._held = False
        super().close()


def open_store(settings: Settings, name: str, readonly: bool) -> Store:
    fd, size, is_blockdev = open_image(settings.path, readonly, settings.direct, settings.size)
    store = FileStore(ffi.NULL, size, owner=f"device {name!r}")
    try:
        store.setup_lock(fd, settings.path, settings.shared, readonly)
        if not settings.shared:
            store.claim()  # held for the device's life
        info = ffi.new("struct vd_file_info *")
        lib.vd_file_probe(fd, info)
        engine, punt, note = choose_engine(settings.aio, info, name)
        p = ffi.new("struct vd_file_params *")
        p.fd, p.engine, p.punt, p.is_blockdev = fd, _ENGINES[engine], int(punt), int(is_blockdev)
        block = SECTOR
        if settings.direct:
            # O_DIRECT alignment; unknown: the safe side (4 KiB).
            p.direct = 1
            p.dio_mem_align = info.dio_mem_align or 4096
            p.dio_len_align = info.dio_offset_align or info.logical_block or 4096
            block = max(SECTOR, p.dio_len_align)
        ptr = lib.vd_file_store_new(p)
        if ptr == ffi.NULL:
            raise MemoryError("cannot allocate the file store")
    except BaseException:
        store.close()
        os.close(fd)
        raise
    # From here on the native store owns fd (closed with its last reference).
    store.ptr, store.block_size, store.facts = ptr, block, {"aio": engine, "aio_note": note}
    return store
