"""A vhost-user proxy that hides the dirty log from the back-end: the control
that shows a migration test can tell a back-end that logs from one that does
not.

QEMU connects to `listen`; the proxy connects to the real back-end at
`backend` and relays every message both ways, file descriptors included,
except that VHOST_USER_SET_LOG_BASE gets a fresh memfd of the same size
instead of QEMU's log: the back-end goes on "logging" (feature negotiation
and replies unchanged), but QEMU never sees a dirty bit from it.

    with LogHidingProxy(proxy_sock, vd.socket("src")) as p:
        ...QEMU on proxy_sock...
        assert p.hidden          # QEMU did ask for a log
"""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Union

SET_LOG_BASE = 6  # vhost-user front-end request number
HEADER = struct.Struct("<III")  # request, flags, payload size
MAX_FDS = 64


def _recv_message(s: socket.socket) -> tuple[bytes, bytes, list[int]] | None:
    fds = array.array("i")
    data, anc, _flags, _addr = s.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
    while data and len(data) < HEADER.size:
        more = s.recv(HEADER.size - len(data))
        if not more:
            break
        data += more
    if len(data) < HEADER.size:
        for fd in fds:
            os.close(fd)
        return None
    size = HEADER.unpack(data)[2]
    payload = b""
    while len(payload) < size:
        more = s.recv(size - len(payload))
        if not more:
            return None
        payload += more
    return data, payload, list(fds)


class LogHidingProxy:
    def __init__(self, listen: Union[str, os.PathLike], backend: Union[str, os.PathLike]):
        self.listen = Path(listen)
        self.backend = Path(backend)
        self.hidden = 0  # SET_LOG_BASE messages whose log was swapped
        self._server: socket.socket | None = None
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> "LogHidingProxy":
        if self.listen.exists():
            self.listen.unlink()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.listen))
        self._server.listen(1)
        t = threading.Thread(target=self._serve, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def _serve(self) -> None:
        try:
            front, _ = self._server.accept()
        except OSError:  # stopped before QEMU came
            return
        back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        back.connect(str(self.backend))
        self._socks += [front, back]
        t = threading.Thread(target=self._relay, args=(back, front, False), daemon=True)
        t.start()
        self._threads.append(t)
        self._relay(front, back, True)

    def _relay(self, src: socket.socket, dst: socket.socket, from_frontend: bool) -> None:
        try:
            while (m := _recv_message(src)) is not None:
                header, payload, fds = m
                if from_frontend and HEADER.unpack(header)[0] == SET_LOG_BASE and fds:
                    size = struct.unpack_from("<Q", payload)[0]
                    decoy = os.memfd_create("hidden-dirty-log")
                    os.ftruncate(decoy, size)
                    os.close(fds[0])
                    fds[0] = decoy
                    self.hidden += 1
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                dst.sendmsg([header + payload], anc)
                for fd in fds:
                    os.close(fd)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_RDWR)  # one side gone: end the other
            except OSError:
                pass

    def stop(self) -> None:
        for s in [self._server, *self._socks]:
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        for t in self._threads:
            t.join(5)
        if self.listen.exists():
            self.listen.unlink()

    def __enter__(self) -> "LogHidingProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
