"""virtio-blk device model (virtio 1.2 section 5.2).

The request path is C (`vd_blk_handle` in native/blk.c); this class opens
the image, decides where its I/O runs, the features and the config space.

Where the I/O runs (`aio:` in the config, `vhostd status` shows it):
* io_uring -- the worker's ring; requests complete when their I/O does, many
  in flight per queue.  Images on file systems that may block the
  submitting thread (FUSE, network file systems) have every request handed
  to the kernel's workers (IOSQE_ASYNC), so a hung file never stalls the
  worker's other devices.
* threads -- a thread pool (where io_uring is unavailable, or by choice).
* inline -- with `aio: auto`, images on memory file systems (tmpfs): a read
  there is a memory copy that cannot hang, done at once in the worker, which
  is faster than any queue.

With ``backend: null`` there is no image (the native side gets fd -1): like
QEMU's null-co driver with its default read-zeroes=off, every request
succeeds without moving data, so reads leave the guest's buffers as they
were.  It measures what the protocol and the rings cost on their own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct

from vhostd.devices.base import Device
from vhostd.native import ffi, lib
from vhostd.protocol.constants import ProtocolFeature
from vhostd.virtio import RING_FEATURES, bit

log = logging.getLogger("vhostd.blk")

# statfs f_type of memory file systems (images there are served inline) and
# of local disk file systems whose io_uring submission does not block.
_MEMORY_FS = {0x01021994: "tmpfs", 0x858458F6: "ramfs", 0x958458F6: "hugetlbfs"}
_LOCAL_FS = {0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0xF2F52010: "f2fs"}
_OTHER_FS = {0x65735546: "fuse", 0x6969: "nfs", 0xFE534D42: "smb2", 0xFF534D42: "cifs", 0x01021997: "9p",
             0x00C36400: "ceph", 0x794C7630: "overlay"}
ENGINES = {"inline": lib.VD_BLK_INLINE, "io_uring": lib.VD_BLK_URING, "threads": lib.VD_BLK_THREADS}

F_SIZE_MAX = 1
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

SECTOR = 512
SIZE_MAX = 1 << 20  # largest single data segment we accept (bytes)
MAX_DISCARD_SECTORS = 0x3FFFFF  # ~2 GiB per segment
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = 0x3FFFFF
MAX_WRITE_ZEROES_SEG = 32
BLKGETSIZE64 = 0x80081272

# struct virtio_blk_config up to write_zeroes_may_unmap (offsets in comments)
_CONFIG = struct.Struct(
    "<Q"  # 0 capacity (sectors)
    "I"  # 8 size_max
    "I"  # 12 seg_max
    "HBB"  # 16 geometry: cylinders, heads, sectors
    "I"  # 20 blk_size
    "BBHI"  # 24 topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "BB"  # 32 writeback, unused0
    "H"  # 34 num_queues
    "III"  # 36 max_discard_sectors, max_discard_seg, discard_sector_alignment
    "II"  # 48 max_write_zeroes_sectors, max_write_zeroes_seg
    "B3x"  # 56 write_zeroes_may_unmap, unused1
)


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


class BlkDevice(Device):
    def __init__(self, cfg) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.num_queues = cfg.queues
        self.max_queue_size = cfg.queue_size
        self.readonly = cfg.readonly
        self.poll_us = cfg.poll_us
        self.block_size = SECTOR  # the logical block size the guest sees
        self.engine, self.engine_note = "none", ""
        if cfg.backend == "null":
            fd, size, is_blockdev = -1, cfg.size, False
        else:
            fd, size, is_blockdev = open_image(cfg.path, cfg.readonly, cfg.direct, cfg.size)
        try:
            params = self._params(cfg, fd, size, is_blockdev)
            self._blk = lib.vd_blk_new(params, self.num_queues)
            if self._blk == ffi.NULL:
                raise MemoryError("cannot allocate the blk device")
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        # From here on the native device owns the image fd (closed with its last reference).
        self.handler = ffi.addressof(lib, "vd_blk_handle")
        self.ctx = ffi.cast("void *", self._blk)

    def _params(self, cfg, fd: int, size: int, is_blockdev: bool):
        self.capacity = size // SECTOR
        serial = (cfg.serial if cfg.serial is not None else cfg.name).encode()[:20]
        params = ffi.new("struct vd_blk_params *")
        params.fd = fd
        params.capacity = self.capacity
        params.readonly = int(cfg.readonly)
        params.is_blockdev = int(is_blockdev)
        params.discard = int(cfg.discard)
        params.write_zeroes = int(cfg.write_zeroes)
        params.max_discard_sectors = MAX_DISCARD_SECTORS
        params.max_discard_seg = MAX_DISCARD_SEG
        params.max_write_zeroes_sectors = MAX_WRITE_ZEROES_SECTORS
        params.max_write_zeroes_seg = MAX_WRITE_ZEROES_SEG
        ffi.memmove(params.serial, serial.ljust(20, b"\0"), 20)
        if fd >= 0:
            info = ffi.new("struct vd_file_info *")
            lib.vd_file_probe(fd, info)
            self.engine, punt, self.engine_note = choose_engine(cfg.aio, info, cfg.name)
            params.engine = ENGINES[self.engine]
            params.punt = int(punt)
            if cfg.direct:
                # O_DIRECT alignment; unknown: the safe side (4 KiB).
                mem = info.dio_mem_align or 4096
                block = info.dio_offset_align or info.logical_block or 4096
                params.direct = 1
                params.dio_mem_align = mem
                params.dio_len_align = block
                self.block_size = max(SECTOR, block)
        return params

    def native(self):
        # The data plane's reference: the image stays open while its I/O is pending.
        return self.handler, ffi.cast("void *", lib.vd_blk_ref(self._blk)), lib.vd_blk_req_size(), \
            ffi.addressof(lib, "vd_blk_unref")

    def features(self) -> int:
        f = RING_FEATURES | bit(F_SIZE_MAX) | bit(F_SEG_MAX) | bit(F_BLK_SIZE) | bit(F_TOPOLOGY) | bit(F_MQ)
        if self.readonly:
            f |= bit(F_RO)
        else:
            f |= bit(F_FLUSH)
            if self.cfg.discard:
                f |= bit(F_DISCARD)
            if self.cfg.write_zeroes:
                f |= bit(F_WRITE_ZEROES)
        return f

    def config_space(self) -> bytes:
        return _CONFIG.pack(
            self.capacity,
            SIZE_MAX,
            self.max_queue_size - 2,  # seg_max: header and status take two descriptors
            0, 0, 0,  # geometry unused
            self.block_size,
            max(0, 12 - (self.block_size.bit_length() - 1)), 0, 1, 0,  # 4 KiB physical blocks (2^exp logical)
            0, 0,
            self.num_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 8,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
            1,
        )

    def extra_protocol_features(self) -> int:
        # Inflight tracking lets a restarted vhostd redo the requests it took
        # and never finished (QEMU's reconnect=1): no write the guest saw
        # completed is lost, none it is waiting for is forgotten.
        return bit(ProtocolFeature.INFLIGHT_SHMFD)

    def describe(self) -> dict:
        return {"aio": self.engine, "aio_note": self.engine_note, "block_size": self.block_size}

    def write_config(self, offset: int, data: bytes) -> None:
        # Only `writeback` is writable and only with CONFIG_WCE, which we do not offer.
        raise ValueError("the virtio-blk config space is read-only")

    def stats(self) -> list[dict[str, int]]:
        out = []
        st = ffi.new("struct vd_blk_stats *")
        for q in range(self.num_queues):
            lib.vd_blk_get_stats(self._blk, q, st)
            out.append({k: getattr(st, k) for k in ("reads", "writes", "flushes", "discards", "write_zeroes",
                                                     "get_ids", "read_bytes", "write_bytes", "errors", "unsupported",
                                                     "bounced")})
        return out

    def close(self) -> None:
        """Drop our reference; the image closes once the data plane's I/O on it is over."""
        if self._blk is not None:
            lib.vd_blk_unref(self._blk)
            self._blk = None
