"""Where a blk device's data lives: one module per `backend:` of a blk device.

Each module holds everything about its kind of store in one place:

* ``Settings``: a frozen dataclass of its config keys (BlkDeviceConfig.store);
* ``KEYS``: how those keys are read from the YAML file (vhostd/configkeys.py),
  ``finish(draft, ctx)``: their cross-checks, and optionally
  ``check_files(draft, ctx)``: what `vhostd check` looks at on disk;
* ``identity(settings)``: what names its data, so that two writable devices
  cannot share it (None: nothing to share);
* ``open_store(settings, name, readonly)``: the open Store the device's requests go
  to.  A store with ``BLOCKING_OPEN`` may take long to open (it reaches a
  server): the daemon opens it off its event loop.

The device model (vhostd/devices/blk.py) sees only the Store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vhostd.native import ffi, lib


@dataclass
class Store:
    """An open store: the native handle the device's requests go to, and what
    the device must tell the guest about it."""

    ptr: Any                    # struct vd_store * (ffi.NULL: no data at all, a null disk)
    capacity: int               # bytes
    readonly: bool = False      # the store itself refuses writes
    block_size: int = 512       # the logical block size the guest should use
    flush: bool = True          # what it can do
    discard: bool = True
    write_zeroes: bool = True
    facts: dict = field(default_factory=dict)  # for `vhostd status`: engine, server, ...

    def describe(self) -> dict:
        """What `vhostd status` shows about it (may change, e.g. a connection's state)."""
        return dict(self.facts)

    def close(self) -> None:
        """Drop our reference; the native store goes once its I/O is over."""
        if self.ptr is not None and self.ptr != ffi.NULL:
            lib.vd_store_unref(self.ptr)
        self.ptr = None


from vhostd.storage import file, null  # noqa: E402  (they use Store)

#: backend name -> its module
BACKENDS = {"file": file, "null": null}
