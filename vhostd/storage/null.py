"""backend: null: a disk with no storage at all, like QEMU's null-co driver
(read-zeroes=off): every request succeeds without moving data, so reads
leave the guest's buffers as they were.  It measures what the protocol and
the rings cost on their own."""

from __future__ import annotations

from dataclasses import dataclass

from vhostd import configkeys as v
from vhostd.configkeys import SECTOR, Key
from vhostd.native import ffi
from vhostd.storage import Store

BLOCKING_OPEN = False


@dataclass(frozen=True, kw_only=True)
class Settings:
    size: int  # bytes: the disk's capacity


KEYS: dict[str, Key] = {
    "size": Key(v.size(SECTOR), help="the disk's capacity"),
}


def identity(settings: Settings) -> None:
    return None


def open_store(settings: Settings, name: str, readonly: bool) -> Store:
    return Store(ffi.NULL, settings.size, facts={"aio": "none", "aio_note": ""})
