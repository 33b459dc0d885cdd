"""virtio-blk device model (virtio 1.2 section 5.2).

The request path is C (`vd_blk_handle` in native/blk.c); this class decides
the features and builds the config space from the device's config and its
store (vhostd/storage: where the data lives, opened by the backend's module).
"""

from __future__ import annotations

import logging
import struct

from vhostd import storage
from vhostd.devices.base import Device
from vhostd.native import ffi, lib
from vhostd.protocol.constants import ProtocolFeature
from vhostd.storage import Store
from vhostd.virtio import RING_FEATURES, bit

log = logging.getLogger("vhostd.blk")

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


class BlkDevice(Device):
    def __init__(self, cfg, store: Store | None = None) -> None:
        """store: the device's open store; by default its backend opens it now."""
        self.name = cfg.name
        self.cfg = cfg
        self.num_queues = cfg.queues
        self.max_queue_size = cfg.queue_size
        self.poll_us = cfg.poll_us
        if store is None:
            store = storage.BACKENDS[cfg.backend].open_store(cfg.store, cfg.name, cfg.readonly)
        self.store = store
        # What status views name as the data (looked up now: a status must
        # never touch a file system, which may hang with the disk).
        names = storage.BACKENDS[cfg.backend].identity(cfg.store)
        self.image = names[2] if names else None
        # Another user of the image is told who holds it.
        store.owner = f"device {cfg.name!r} (socket {cfg.socket})"
        try:
            self.readonly = cfg.readonly or store.readonly
            self.capacity = store.capacity // SECTOR
            self.block_size = store.block_size  # the logical block size the guest sees
            self.flush = store.flush and not self.readonly
            self.discard = cfg.discard and store.discard and not self.readonly
            self.write_zeroes = cfg.write_zeroes and store.write_zeroes and not self.readonly
            serial = (cfg.serial if cfg.serial is not None else cfg.name).encode()[:20]
            params = ffi.new("struct vd_blk_params *")
            params.store = store.ptr
            params.capacity = self.capacity
            params.readonly = int(self.readonly)
            params.discard = int(self.discard)
            params.write_zeroes = int(self.write_zeroes)
            params.max_discard_sectors = MAX_DISCARD_SECTORS
            params.max_discard_seg = MAX_DISCARD_SEG
            params.max_write_zeroes_sectors = MAX_WRITE_ZEROES_SECTORS
            params.max_write_zeroes_seg = MAX_WRITE_ZEROES_SEG
            ffi.memmove(params.serial, serial.ljust(20, b"\0"), 20)
            self._blk = lib.vd_blk_new(params, self.num_queues)
            if self._blk == ffi.NULL:
                raise MemoryError("cannot allocate the blk device")
        except BaseException:
            store.close()
            raise
        self.handler = ffi.addressof(lib, "vd_blk_handle")
        self.ctx = ffi.cast("void *", self._blk)

    def native(self):
        # The data plane's reference: the store stays while its I/O is pending.
        return self.handler, ffi.cast("void *", lib.vd_blk_ref(self._blk)), lib.vd_blk_req_size(), \
            ffi.addressof(lib, "vd_blk_unref")

    def place(self, engine) -> int:
        return self.store.place(engine)

    def features(self) -> int:
        f = RING_FEATURES | bit(F_SIZE_MAX) | bit(F_SEG_MAX) | bit(F_BLK_SIZE) | bit(F_TOPOLOGY) | bit(F_MQ)
        if self.readonly:
            f |= bit(F_RO)
        if self.flush:
            f |= bit(F_FLUSH)
        if self.discard:
            f |= bit(F_DISCARD)
        if self.write_zeroes:
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
        return {"backend": self.cfg.backend, "image": self.image,
                "capacity": self.capacity * SECTOR, "readonly": self.readonly,
                **self.store.describe(), "block_size": self.block_size}

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

    def claim(self) -> None:
        """Lock a shared image for as long as the guest runs the device;
        storage.LockError names who has it instead.  (An image that is not
        shared stays locked from open to close.)"""
        self.store.claim()

    def release(self) -> None:
        """Unlock a shared image (the front-end stopped the device, nothing is in flight)."""
        self.store.release()

    def claim_waits(self) -> bool:
        return self.store.CLAIM_WAITS

    def notes_fd(self) -> int | None:
        return self.store.notes_fd()

    def take_notes(self) -> list[tuple[bool, str]]:
        return self.store.take_notes()

    def close(self) -> None:
        """Drop our references; the store goes once the data plane's I/O on it is over."""
        if self._blk is not None:
            lib.vd_blk_unref(self._blk)
            self._blk = None
            self.store.close()
