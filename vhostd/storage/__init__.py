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

Locking (file and rbd, whose Settings have ``shared``): a store is locked
against other users of its image -- OFD locks on an image file, librbd's
exclusive lock on an RBD image.  Not shared: open_store takes the lock and
it stays while the store does.  Shared: ``claim()`` takes it when the guest
starts the device and ``release()`` drops it when the front-end stops it,
so a migration's destination can take over from its source.

The device model (vhostd/devices/blk.py) sees only the Store.
"""

from __future__ import annotations

import os
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
    #: who uses it, for another user's lock error ("device 'a' (socket ...)")
    owner: str = ""
    #: locked only while the device runs (claim/release), not for the store's life
    shared: bool = False
    _notes_fd: int | None = field(default=None, repr=False)
    _worker: int | None = field(default=None, repr=False)  # once placed

    #: whether it has lines for the log (a remote store's connection coming and going)
    TALKS = False
    #: whether claim/release wait for a network (a cluster's lock): then the
    #: control plane runs them on a thread of their own
    CLAIM_WAITS = False

    def claim(self) -> None:
        """Take the image's lock if not held; LockError says who holds it."""

    def release(self) -> None:
        """A shared store drops its lock (nothing of it is in flight any more)."""

    def place(self, engine) -> int:
        """The worker the store (and so the device's queues) runs on, or -1
        when any will do.  Its first call settles it."""
        if self._worker is None:
            self._worker = self._attach(engine)
        return self._worker

    def _attach(self, engine) -> int:
        return -1

    def describe(self) -> dict:
        """What `vhostd status` shows about it (may change, e.g. a connection's state).
        A remote store adds "store": {"server", "up" (it answers), "timeouts"
        (requests failed after io_timeout), and counters of its own kind}."""
        return dict(self.facts)

    def notes_fd(self) -> int | None:
        """An eventfd that becomes readable when the store has lines for the
        log (take_notes), or None if it never has."""
        if self._notes_fd is None and self.TALKS and self.ptr not in (None, ffi.NULL):
            self._notes_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            lib.vd_store_set_event_fd(self.ptr, self._notes_fd)
        return self._notes_fd

    def take_notes(self) -> list[tuple[bool, str]]:
        """(is a warning, line) for each line the store has for the log."""
        try:
            os.eventfd_read(self._notes_fd)
        except (BlockingIOError, TypeError):
            pass
        out, buf = [], ffi.new("char[]", 256)
        while self.ptr not in (None, ffi.NULL) and lib.vd_store_take_note(self.ptr, buf, 256):
            line = ffi.string(buf).decode(errors="replace")
            out.append((line[:1] == "W", line[1:]))
        return out

    def close(self) -> None:
        """Drop our reference; the native store goes once its I/O is over."""
        if self.ptr is not None and self.ptr != ffi.NULL:
            if self._notes_fd is not None:
                lib.vd_store_set_event_fd(self.ptr, -1)
            lib.vd_store_unref(self.ptr)
        if self._notes_fd is not None:
            os.close(self._notes_fd)
            self._notes_fd = None
        self.ptr = None


class LockError(OSError):
    """The image is locked by another user; the message names it."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


#: image key -> the store of this daemon holding its lock, to name it to a second
_holders: dict = {}


def hold(key, store: Store) -> None:
    _holders[key] = store


def unhold(key, store: Store) -> None:
    if _holders.get(key) is store:
        del _holders[key]


def holder(key) -> str | None:
    """Which device of this daemon holds the image's lock, if one does."""
    store = _holders.get(key)
    return f"{store.owner or 'another device'} of this daemon" if store is not None else None


def wait_closed(timeout: float) -> int:
    """Wait up to timeout seconds for stores still closing in the background
    (after their last reference went); returns how many are left."""
    return lib.vd_stores_settle(int(timeout * 1000))


from vhostd.storage import file, nbd, null, rbd  # noqa: E402  (they use Store)

#: backend name -> its module
BACKENDS = {"file": file, "null": null, "nbd": nbd, "rbd": rbd}
