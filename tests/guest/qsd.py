"""qemu-storage-daemon as a reference vhost-user-blk back-end, and socket helpers.

    with StorageDaemon(img_path, sock_path) as qsd:     # waits until the socket listens
        QemuGuest(script, disks=[qsd.socket]).run()

`extra_sockets` exports the same image on more sockets (one block node, so
one cache and no image locking between them): e.g. the source and the
destination QEMU of a live migration, each on its own export.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence, Union

from .qemu import GuestError, timeout_scale

QSD_BINARY = "qemu-storage-daemon"


def unix_socket_listening(path: Union[str, os.PathLike]) -> bool:
    """True if some process listens on the unix socket `path` (from /proc/net/unix,
    so without connecting: a back-end serving one front-end at a time never
    sees a probe client)."""
    want = os.path.abspath(os.fspath(path))
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.rstrip("\n").split(None, 7)
                # Num RefCount Protocol Flags Type St Inode Path; Flags has __SO_ACCEPTCON
                if len(parts) >= 8 and int(parts[3], 16) & 0x10000 and parts[7] == want:
                    return True
    except OSError:
        pass
    return False


def wait_for_unix_socket(path: Union[str, os.PathLike], timeout: float = 10.0,
                         proc: subprocess.Popen | None = None) -> None:
    """Wait until something listens on the unix socket `path` (or `proc` dies)."""
    deadline = time.monotonic() + timeout * timeout_scale()
    while not unix_socket_listening(path):
        if proc is not None and proc.poll() is not None:
            raise GuestError(f"back-end exited with status {proc.returncode} before listening on {path}")
        if time.monotonic() > deadline:
            raise GuestError(f"nothing listens on {path} after {timeout}s")
        time.sleep(0.02)


class StorageDaemon:
    """qemu-storage-daemon exporting one raw image file over vhost-user-blk."""

    def __init__(self, image: Union[str, os.PathLike], sock: Union[str, os.PathLike], *,
                 num_queues: int | None = None, writable: bool = True,
                 log: Union[str, os.PathLike, None] = None,
                 extra_sockets: Sequence[Union[str, os.PathLike]] = ()):
        self.image = Path(image).absolute()
        self.socket = Path(sock).absolute()
        self.extra_sockets = [Path(s).absolute() for s in extra_sockets]
        self.num_queues = num_queues
        self.writable = writable
        self.log_path = Path(log) if log else self.socket.with_name(self.socket.name + ".qsd.log")
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [QSD_BINARY, "--blockdev", f"driver=file,node-name=f0,filename={self.image}"]
        for i, sock in enumerate([self.socket, *self.extra_sockets]):
            export = (f"type=vhost-user-blk,id=e{i},node-name=f0,addr.type=unix,"
                      f"addr.path={sock},writable={'on' if self.writable else 'off'}")
            if self.num_queues is not None:
                export += f",num-queues={self.num_queues}"
            cmd += ["--export", export]
        return cmd

    def start(self, timeout: float = 10.0) -> "StorageDaemon":
        if not shutil.which(QSD_BINARY):
            raise GuestError(f"{QSD_BINARY} not found (package qemu-system-common)")
        for sock in (self.socket, *self.extra_sockets):
            if sock.exists():
                sock.unlink()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        for sock in (self.socket, *self.extra_sockets):
            wait_for_unix_socket(sock, timeout, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the daemon (SIGKILL to simulate a crash) and return its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def restart(self, timeout: float = 10.0) -> "StorageDaemon":
        self.stop()
        self.proc = None
        return self.start(timeout)

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "StorageDaemon":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
