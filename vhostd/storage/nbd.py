"""backend: nbd: an export of an NBD server (nbdkit, qemu-nbd, a storage
appliance), through libnbd's asynchronous API (native/nbd.c).

The export's size, whether it is read-only and whether it can flush, trim
and zero come from the server.  Connections that die are made again with
back-off; requests wait meanwhile and fail after `io_timeout` seconds.
Opening connects at once, so the daemon does it off its event loop and
tries again while the server is not there (vhostd/daemon.py).
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

from vhostd import configkeys as v
from vhostd.configkeys import Key
from vhostd.native import ffi, lib
from vhostd.storage import Store

BLOCKING_OPEN = True
SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")
ERRLEN = 512


@dataclass(frozen=True, kw_only=True)
class Settings:
    uri: str  # the NBD URI; a relative ?socket= path resolved against the config file
    connections: int = 1  # wanted; more than 1 only where the server allows multi-conn
    reconnect_delay: int = 5  # seconds: the longest wait between reconnect attempts
    io_timeout: int = 30  # seconds a request may wait for the server before it fails; 0 = never
    shared: bool = False  # never set: see _no_lock


def _uri(node, ctx: v.Context) -> str:
    what = "an NBD URI such as nbd://host/export or nbd+unix:///export?socket=PATH"
    text = v.string(node, what).strip()
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in SCHEMES:
        raise v.Invalid(f"must be {what}, got {v.describe(node)}")
    if len(text.encode()) >= 1000:
        raise v.Invalid("must be shorter than 1000 bytes")
    if parts.scheme.endswith("+unix"):
        query = urllib.parse.parse_qs(parts.query)
        if "socket" not in query:
            raise v.Invalid(f"an {parts.scheme}:// URI needs ?socket=PATH, got {v.describe(node)}")
        sock = ctx.resolve(query["socket"][0])
        query["socket"] = [sock]
        # (urlunsplit would drop the empty host: nbd+unix:/// must keep its three slashes)
        text = f"{parts.scheme}://{parts.netloc}{parts.path}?{urllib.parse.urlencode(query, doseq=True, safe='/')}"
        if parts.fragment:
            text += f"#{parts.fragment}"
    return text


def _no_lock(node, ctx: v.Context) -> bool:
    # vhostd takes no lock on an export: who may connect and write is the
    # NBD server's business (qemu-nbd serves one client unless given -e).
    raise v.Invalid("backend nbd takes no lock, so 'shared' does not apply: whether two clients may use "
                    "one export is the NBD server's business (e.g. qemu-nbd's --shared); drop the key")


KEYS: dict[str, Key] = {
    "uri": Key(_uri, help="the export: nbd://host[:port]/export or nbd+unix:///export?socket=PATH"),
    "connections": Key(v.int_range(1, lib.VD_NBD_MAX_CONN), 1),
    "reconnect_delay": Key(v.int_range(1, 3600), 5),
    "io_timeout": Key(v.int_range(0, 86400), 30),
    "shared": Key(_no_lock, False),
}


def finish(dev: v.Draft, ctx: v.Context) -> None:
    if not lib.vd_nbd_available():
        dev.report(ctx, "backend", "backend nbd needs libnbd, and this vhostd was built without it "
                                   "(install libnbd-dev, then reinstall vhostd)")


def identity(settings: Settings) -> tuple[str, str, str]:
    return "uri", "export", settings.uri


class NbdStore(Store):
    TALKS = True

    def _attach(self, engine) -> int:
        worker = lib.vd_engine_pick_worker(engine.ptr)
        rc = lib.vd_nbd_store_attach(self.ptr, engine.ptr, worker)
        if rc < 0:
            raise OSError(-rc, f"cannot put the NBD connections on a worker: {os.strerror(-rc)}")
        return worker

    def describe(self) -> dict:
        info = ffi.new("struct vd_nbd_info *")
        if self.ptr is not None:
            lib.vd_nbd_store_info(self.ptr, info)
        return {**self.facts, "store": {"server": self.facts["server"], "up": info.ready > 0,
                                        "timeouts": info.timeouts, "connections": info.connections,
                                        "connected": info.ready, "reconnects": info.reconnects}}


def open_store(settings: Settings, name: str, readonly: bool) -> Store:
    """Connect (blocking); raises OSError saying why not."""
    p = ffi.new("struct vd_nbd_params *")
    uri = settings.uri.encode()
    ffi.memmove(p.uri, uri, len(uri))
    p.connections = settings.connections
    p.reconnect_delay_ms = settings.reconnect_delay * 1000
    p.io_timeout_ms = settings.io_timeout * 1000
    err = ffi.new("char[]", ERRLEN)
    ptr = lib.vd_nbd_store_new(p, err, ERRLEN)
    if ptr == ffi.NULL:
        raise OSError(ffi.string(err).decode(errors="replace"))
    info = ffi.new("struct vd_nbd_info *")
    lib.vd_nbd_store_info(ptr, info)
    store = NbdStore(ptr, info.size, readonly=bool(info.readonly), block_size=info.block_min,
                     flush=bool(info.can_flush), discard=bool(info.can_trim), write_zeroes=bool(info.can_zero),
                     facts={"aio": "nbd", "aio_note": "", "server": settings.uri})
    if settings.connections > info.connections:
        store.facts["aio_note"] = "1 connection: the server does not allow multi-conn"
    return store
