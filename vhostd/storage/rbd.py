"""backend: rbd: an image in a Ceph cluster (RADOS block device), through
librbd's asynchronous API (native/rbd.c).

The image's size comes from the cluster; a `snapshot` is served read-only.
Ceph mends its own failures (librados follows OSDs as they go and come back
and resends), so requests wait through them, as QEMU's do; `io_timeout`
fails them after so many seconds instead, and then turns librbd's cache off
(a write the cache took and that then timed out would be lost behind a flush
that succeeds).  Devices naming the same cluster alike share one connection
to it.  Opening connects at once, so the daemon
does it off its event loop and tries again while the cluster is not there
(vhostd/daemon.py).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from dataclasses import dataclass

from vhostd import configkeys as v
from vhostd import storage
from vhostd.configkeys import Key
from vhostd.native import ffi, lib
from vhostd.storage import LockError, Store

log = logging.getLogger("vhostd.blk")

BLOCKING_OPEN = True
LOCK_WAIT = 5.0  # seconds a lock call waits for the cluster to answer
ERRLEN = 512
DEFAULT_CONF = "/etc/ceph/ceph.conf"

# What Ceph accepts in pool, namespace, image and snapshot names, less what
# would be ambiguous in pool/namespace/image@snapshot.
_RADOS_NAME = re.compile(r"[^/@\s\x00]{1,127}")


@dataclass(frozen=True, kw_only=True)
class Settings:
    image: str
    pool: str = "rbd"
    namespace: str = ""  # "": the pool's default namespace
    snapshot: str = ""  # "": the image itself; else that snapshot, read-only
    ceph_conf: str = DEFAULT_CONF
    ceph_user: str = "admin"  # the Ceph client id (client.<ceph_user>)
    keyring: str = ""  # "": where ceph.conf says
    io_timeout: int = 0  # seconds a request may wait for the cluster before it fails; 0 = as long as it takes
    warn_after: int = 10  # seconds a request may wait before the log says the cluster does not answer
    shared: bool = False  # others may name the image: locked only while the device runs


def _rados_name(what: str):
    def parse(node, ctx: v.Context) -> str:
        value = v.string(node, what)
        if not _RADOS_NAME.fullmatch(value) or len(value.encode()) > 127:
            raise v.Invalid(f"must be {what}: 1 to 127 bytes without '/', '@' or spaces, got {v.describe(node)}")
        return value

    return parse


def _optional_name(what: str):
    name = _rados_name(what)

    def parse(node, ctx: v.Context) -> str:
        return "" if v.is_kind(node, "str") and node.value == "" else name(node, ctx)

    return parse


def _short_path(node, ctx: v.Context) -> str:
    value = v.path(node, ctx)
    if len(value.encode()) >= 500:
        raise v.Invalid("must be shorter than 500 bytes")
    return value


KEYS: dict[str, Key] = {
    "image": Key(_rados_name("an RBD image name"), help="the RBD image's name (in `pool`)"),
    "pool": Key(_rados_name("a Ceph pool name"), "rbd"),
    "namespace": Key(_optional_name("an RBD namespace"), ""),
    "snapshot": Key(_optional_name("a snapshot name"), ""),
    "ceph_conf": Key(_short_path, DEFAULT_CONF),
    "ceph_user": Key(_rados_name("a Ceph client id (without 'client.')"), "admin"),
    "keyring": Key(_short_path, ""),
    "io_timeout": Key(v.int_range(0, 86400), 0),
    "warn_after": Key(v.int_range(1, 86400), 10),
    "shared": Key(v.boolean, False),
}


def finish(dev: v.Draft, ctx: v.Context) -> None:
    if not lib.vd_rbd_available():
        dev.report(ctx, "backend", "backend rbd needs librbd, and this vhostd was built without it "
                                   "(install librbd-dev and librados-dev, then reinstall vhostd)")
    if dev.values.get("snapshot") and dev.values.get("readonly") is False and "readonly" in dev.nodes:
        dev.report(ctx, "readonly", "a snapshot is read-only: drop 'readonly: false' or the 'snapshot'")


def check_files(dev: v.Draft, ctx: v.Context) -> None:
    for key in ("ceph_conf", "keyring"):
        path = dev.values.get(key)
        if not path or not dev.ok(key):
            continue
        if not os.path.isfile(path):
            dev.report(ctx, key, f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a file")
        elif not os.access(path, os.R_OK):
            dev.report(ctx, key, f"{path} is not readable")


def image_name(settings: Settings) -> str:
    """pool/[namespace/]image[@snapshot], as the log and status show it."""
    ns = f"{settings.namespace}/" if settings.namespace else ""
    snap = f"@{settings.snapshot}" if settings.snapshot else ""
    return f"{settings.pool}/{ns}{settings.image}{snap}"


def identity(settings: Settings) -> tuple[str, str, str]:
    # A snapshot is another image as far as sharing goes (and read-only anyway).
    return "image", "RBD image", f"{image_name(settings)} in the cluster of {os.path.realpath(settings.ceph_conf)}"


class RbdStore(Store):
    TALKS = True
    CLAIM_WAITS = True

    def _attach(self, engine) -> int:
        # Any worker may issue and complete its requests (librbd calls back
        # on its own threads); one of them watches for stalls.
        rc = lib.vd_rbd_store_attach(self.ptr, engine.ptr, lib.vd_engine_pick_worker(engine.ptr))
        if rc < 0:
            raise OSError(-rc, f"cannot watch the RBD image from a worker: {os.strerror(-rc)}")
        return -1

    def describe(self) -> dict:
        info = ffi.new("struct vd_rbd_info *")
        if self.ptr is not None:
            lib.vd_rbd_store_info(self.ptr, info)
        return {**self.facts, "store": {"server": self.facts["server"], "up": not info.stalled,
                                        "timeouts": info.timeouts, "in_flight": info.inflight,
                                        "oldest_ms": info.oldest_ms, "stalls": info.stalls}}

    # Locking: librbd's exclusive lock, taken by hand.  Its calls wait for the
    # cluster: the control plane makes claim/release (ring start and stop) on
    # a lock thread of the device's (CLAIM_WAITS, handler.py), never on the
    # event loop, and each waits LOCK_WAIT seconds at most; one that answers
    # later is undone.
    _held = False
    _lockable = False  # writable: a read-only image takes no lock
    _key = None

    def _lock_call(self, acquire: bool, wait: float | None) -> None:
        done = threading.Event()
        out: dict = {}
        mu = threading.Lock()
        ptr = self.ptr
        lib.vd_store_ref(ptr)  # the store stays while the call runs

        def run() -> None:
            err = ffi.new("char[]", ERRLEN)
            rc = lib.vd_rbd_store_lock(ptr, int(acquire), err, ERRLEN)
            with mu:
                out["rc"], out["err"] = rc, ffi.string(err).decode(errors="replace")
                late = "gave_up" in out
            if late and acquire and rc == 0:
                lib.vd_rbd_store_lock(ptr, 0, err, ERRLEN)  # nobody waits for it any more
            lib.vd_store_unref(ptr)
            done.set()

        threading.Thread(target=run, name="vhostd-rbd-lock", daemon=True).start()
        done.wait(wait)
        with mu:
            if "rc" not in out:
                out["gave_up"] = True
                raise LockError(errno.ETIMEDOUT, f"the Ceph cluster did not answer for {self.facts['server']}'s "
                                                 f"lock within {wait:g} s")
        rc, err = out["rc"], out["err"]
        if rc == -errno.EBUSY:
            who = storage.holder(self._key)
            raise LockError(errno.EBUSY, f"{err}" + (f" ({who})" if who else ""))
        if rc < 0:
            raise LockError(-rc, err)

    def claim(self) -> None:
        if self._held or not self._lockable or self.ptr in (None, ffi.NULL):
            return
        self._lock_call(True, LOCK_WAIT)
        self._held = True
        storage.hold(self._key, self)

    def release(self) -> None:
        if self.shared and self._held and self.ptr not in (None, ffi.NULL):
            self._held = False
            storage.unhold(self._key, self)
            try:
                self._lock_call(False, LOCK_WAIT)
            except LockError as exc:
                log.warning("%s: %s (closing the image drops it)", self.facts["server"], exc)

    def close(self) -> None:
        # rbd_close (when the last I/O is done) releases the lock.
        if self._key is not None:
            storage.unhold(self._key, self)
        self._held = False
        super().close()


def _put(field, text: str) -> None:
    raw = text.encode()
    ffi.memmove(field, raw, len(raw))  # the struct is zeroed: NUL-terminated


def open_store(settings: Settings, name: str, readonly: bool) -> Store:
    """Connect and open the image (blocking); raises OSError saying why not."""
    p = ffi.new("struct vd_rbd_params *")
    for field, text in ((p.conf, settings.ceph_conf), (p.user, settings.ceph_user), (p.keyring, settings.keyring),
                        (p.pool, settings.pool), (p.ns, settings.namespace), (p.image, settings.image),
                        (p.snap, settings.snapshot)):
        _put(field, text)
    p.io_timeout_s = settings.io_timeout
    p.warn_after_s = settings.warn_after
    p.readonly = int(readonly)
    err = ffi.new("char[]", ERRLEN)
    ptr = lib.vd_rbd_store_new(p, err, ERRLEN)
    if ptr == ffi.NULL:
        raise OSError(ffi.string(err).decode(errors="replace"))
    info = ffi.new("struct vd_rbd_info *")
    lib.vd_rbd_store_info(ptr, info)
    store = RbdStore(ptr, info.size, readonly=bool(info.readonly), owner=f"device {name!r}", shared=settings.shared,
                     facts={"aio": "rbd", "aio_note": f"objects of {info.object_size >> 10} KiB",
                            "server": f"rbd:{image_name(settings)}"})
    store._key = ("rbd",) + identity(settings)[1:]
    store._lockable = not store.readonly
    try:
        if store._lockable and not settings.shared:
            # We are off the event loop here: wait as long as the cluster takes.
            try:
                store._lock_call(True, None)
            except LockError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                log.warning("%s: %s; it is not locked against other users", name, exc.strerror)
                store._lockable = False
            else:
                store._held = True
                storage.hold(store._key, store)
        elif store._lockable:
            # A shared image that cannot be locked would let two writers in:
            # find out now (held by another user, e.g. a migration's source, is fine).
            try:
                store._lock_call(True, None)
                store._lock_call(False, None)
            except LockError as exc:
                if exc.errno != errno.EBUSY:
                    raise
    except BaseException:
        store.close()
        raise
    return store
