"""Socket side of one device: listen, accept one front-end at a time, move
bytes and fds between the socket and the sans-IO protocol.

Runs on the asyncio loop with non-blocking sockets and add_reader/add_writer,
because asyncio streams cannot carry SCM_RIGHTS fds.
"""

from __future__ import annotations

import array
import asyncio
import errno
import logging
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import Callable

from vhostd.devices.base import Device
from vhostd.handler import DeviceHandler
from vhostd.protocol.backend import BackendProtocol
from vhostd.protocol.codec import MessageDecoder, ProtocolError
from vhostd.protocol.constants import MAX_FDS_PER_MESSAGE

MAX_PENDING_OUTPUT = 64 * 1024  # a front-end that does not read its replies is dropped
WAIT_CHECK = 1.0  # s: while an answer waits for the device, look this often besides its event fd
WAIT_WARN = 5.0  # s: then say so in the log, and every WAIT_WARN_AGAIN after that
WAIT_WARN_AGAIN = 30.0
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


@dataclass(frozen=True)
class Access:
    """Who may own the socket file and who may connect (SO_PEERCRED)."""

    owner: int | None = None
    group: int | None = None
    allow_uids: tuple[int, ...] | None = None
    allow_gids: tuple[int, ...] | None = None

    @classmethod
    def from_config(cls, cfg) -> "Access":
        return cls(cfg.socket_owner, cfg.socket_group, cfg.allow_uids, cfg.allow_gids)

    def allows(self, uid: int, gid: int) -> bool:
        if self.allow_uids is None and self.allow_gids is None:
            return True
        return uid in (self.allow_uids or ()) or gid in (self.allow_gids or ())


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))


class DeviceLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"{self.extra['device']}: {msg}", kwargs


def _recv(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    data, ancdata, flags, _ = sock.recvmsg(size, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ProtocolError(f"more than {MAX_FDS_PER_MESSAGE} file descriptors in one message")
    return data, fds


class Connection:
    """One front-end session on a device."""

    def __init__(self, server: DeviceServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.log = server.log
        self.decoder = MessageDecoder()
        self.protocol = BackendProtocol(server.handler, server.log)
        self._out = bytearray()
        self.closed = False
        self._wait_timer: asyncio.TimerHandle | None = None
        self._wait_since = 0.0
        self._wait_warned = 0.0
        loop = server.loop
        loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            # Never read past the current message: its fds arrive with its first byte.
            data, fds = _recv(self.sock, self.decoder.bytes_needed())
            if not data:
                for fd in fds:
                    os.close(fd)
                if not self.decoder.idle:
                    self.log.warning("front-end disconnected in the middle of a message")
                self.close("front-end disconnected")
                return
            self.decoder.feed(data, fds)
            while (msg := self.decoder.pop()) is not None:
                self.log.debug("<- %s flags=%#x size=%d fds=%d", msg.name, msg.flags, len(msg.payload), len(msg.fds))
                self._send_all(self.protocol.handle(msg))
                if self.closed:
                    return
                if self.protocol.waiting:
                    self._wait_for_device()
                    return
        except (BlockingIOError, InterruptedError):
            return
        except ProtocolError as exc:
            self.log.error("closing connection: %s", exc)
            self.close("protocol error")
        except OSError as exc:
            self.log.error("closing connection: socket error: %s", exc)
            self.close("socket error")
        except Exception:  # a bug must cost this connection, never the daemon
            self.log.exception("closing connection after an internal error")
            self.close("internal error")

    def _send_all(self, replies) -> None:
        for reply in replies:
            if reply.fds:
                self._send_with_fds(reply)
            else:
                self._send(reply.encode())

    # ------------------------------------------------------------ answers that wait for the device
    # GET_VRING_BASE and RESET_DEVICE are answered once the requests in flight
    # are done, which may take as long as a disk does.  Meanwhile the loop
    # goes on serving everything else; this front-end's next message is read
    # after the answer (only an EOF is noticed before).

    def _wait_for_device(self) -> None:
        fd = self.sock.fileno()
        loop = self.server.loop
        loop.remove_reader(fd)
        loop.add_reader(fd, self._on_readable_while_waiting)
        self._wait_since = self._wait_warned = time.monotonic()
        self._wait_timer = loop.call_later(WAIT_CHECK, self._wait_tick)

    def _wait_tick(self) -> None:
        self._wait_timer = None
        self.resume()
        if self.closed or not self.protocol.waiting:
            return
        now = time.monotonic()
        since = now - self._wait_since
        if now - self._wait_warned >= (WAIT_WARN if self._wait_warned == self._wait_since else WAIT_WARN_AGAIN):
            self._wait_warned = now
            self.log.warning("%s waits for the device's requests in flight (%.0f s so far)",
                             self.protocol.waiting, since)
        self._wait_timer = self.server.loop.call_later(WAIT_CHECK, self._wait_tick)

    def _on_readable_while_waiting(self) -> None:
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.error("closing connection: socket error: %s", exc)
            self.close("socket error")
            return
        if not data:
            self.close("front-end disconnected")
            return
        self.server.loop.remove_reader(self.sock.fileno())  # read after the answer

    def resume(self) -> None:
        """The device may have progressed: send the waiting answer if it is ready."""
        if self.closed or not self.protocol.waiting:
            return
        try:
            replies = self.protocol.poll()
            if replies is None:
                return
            if self._wait_timer is not None:
                self._wait_timer.cancel()
                self._wait_timer = None
            waited = time.monotonic() - self._wait_since
            if waited >= WAIT_WARN:
                self.log.info("answered after waiting %.1f s for the device", waited)
            self._send_all(replies)
        except ProtocolError as exc:
            self.log.error("closing connection: %s", exc)
            self.close("protocol error")
            return
        except OSError as exc:
            self.log.error("closing connection: socket error: %s", exc)
            self.close("socket error")
            return
        except Exception:  # a bug must cost this connection, never the daemon
            self.log.exception("closing connection after an internal error")
            self.close("internal error")
            return
        fd = self.sock.fileno()
        self.server.loop.remove_reader(fd)
        self.server.loop.add_reader(fd, self._on_readable)

    def _send(self, data: bytes) -> None:
        if self._out:
            self._out += data
        else:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent < len(data):
                self._out += data[sent:]
                self.server.loop.add_writer(self.sock.fileno(), self._on_writable)
        if len(self._out) > MAX_PENDING_OUTPUT:
            raise ProtocolError("front-end is not reading its replies")

    def _send_with_fds(self, reply) -> None:
        """A reply carrying fds (GET_INFLIGHT_FD) goes out whole at once:
        the fds must travel with its first byte."""
        try:
            if self._out:
                raise ProtocolError("front-end is not reading its replies")
            data = reply.encode()
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", reply.fds).tobytes())]
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):
                self._out += data[sent:]
                self.server.loop.add_writer(self.sock.fileno(), self._on_writable)
        finally:
            reply.close_fds()

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.error("closing connection: socket error: %s", exc)
            self.close("socket error")
            return
        del self._out[:sent]
        if not self._out:
            self.server.loop.remove_writer(self.sock.fileno())

    def close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.server.loop
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        loop.remove_reader(self.sock.fileno())
        loop.remove_writer(self.sock.fileno())
        self.decoder.close()
        self.sock.close()
        try:
            self.protocol.connection_lost()
        except Exception:
            self.log.exception("error while resetting the device")
        self.log.info("session ended (%s)", why)
        self.server.connection_closed(self)


class DeviceServer:
    """Listens on a device's socket and serves one front-end at a time."""

    def __init__(self, device: Device, handler: DeviceHandler, socket_path: str, loop: asyncio.AbstractEventLoop,
                 socket_mode: int | None = None, access: Access = Access(),
                 on_session: Callable[[], None] | None = None, listener: socket.socket | None = None) -> None:
        """listener: a listening socket passed by socket activation, used
        instead of binding socket_path; it stays open and bound when the
        device stops (its owner, systemd, keeps it for the next start)."""
        self.access = access
        self.passed = listener
        self.on_session = on_session
        self.peer: tuple[int, int, int] | None = None  # (pid, uid, gid) of the connected front-end
        self.device = device
        self.handler = handler
        self.socket_path = socket_path
        self.loop = loop
        self.socket_mode = socket_mode
        self.log = DeviceLog(logging.getLogger("vhostd.device"), {"device": device.name})
        self.connection: Connection | None = None
        self.sessions = 0
        self._listener: socket.socket | None = None

    def start(self) -> None:
        if self.passed is not None:
            self.passed.setblocking(False)
            self._listen_on(self.passed, "passed by socket activation")
            return
        remove_stale_socket(self.socket_path)
        os.makedirs(os.path.dirname(self.socket_path) or ".", exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.socket_path)
            # Ownership and mode before listen(): no window for the wrong peers.
            if self.access.owner is not None or self.access.group is not None:
                os.chown(self.socket_path, -1 if self.access.owner is None else self.access.owner,
                         -1 if self.access.group is None else self.access.group)
            if self.socket_mode is not None:
                os.chmod(self.socket_path, self.socket_mode)
            sock.listen(4)
        except BaseException:
            sock.close()
            raise
        self._listen_on(sock, "")

    def _listen_on(self, sock: socket.socket, how: str) -> None:
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)
        self.loop.add_reader(self.handler.event_fd, self._on_device_event)
        if (notes := self.device.notes_fd()) is not None:
            self.loop.add_reader(notes, self._on_notes)
        self.log.info("listening on %s%s", self.socket_path, f" ({how})" if how else "")

    def _on_device_event(self) -> None:
        """A queue broke, or one that drains has nothing pending any more."""
        self.handler.report_errors()
        if self.connection is not None:
            self.connection.resume()

    def _on_notes(self) -> None:
        for warning, line in self.device.take_notes():
            (self.log.warning if warning else self.log.info)("%s", line)

    def _on_accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.error("accept failed: %s", exc)
            return
        try:
            pid, uid, gid = peer_credentials(conn)
        except OSError as exc:
            self.log.error("refused a front-end: cannot read its credentials: %s", exc)
            conn.close()
            return
        if not self.access.allows(uid, gid):
            self.log.warning("refused front-end pid %d uid %d gid %d: not in allow_uids/allow_gids", pid, uid, gid)
            conn.close()
            return
        if self.connection is not None:
            # One front-end owns a device; a second would fight over its rings.
            self.log.warning("refused a second front-end (pid %d uid %d) while one is connected", pid, uid)
            conn.close()
            return
        conn.setblocking(False)
        self.sessions += 1
        self.peer = (pid, uid, gid)
        self.log.info("front-end connected (session %d, pid %d uid %d gid %d)", self.sessions, pid, uid, gid)
        self.connection = Connection(self, conn)
        if self.on_session:
            self.on_session()

    def connection_closed(self, conn: Connection) -> None:
        if self.connection is conn:
            self.connection = None
            self.peer = None
            if self.on_session:
                self.on_session()

    def stop_accepting(self) -> None:
        """Close the listening socket (and remove its file); a connected
        front-end stays until stop()."""
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            if self._listener is not self.passed:
                self._listener.close()
                try:
                    os.unlink(self.socket_path)
                except FileNotFoundError:
                    pass
            self._listener = None

    def stop(self) -> None:
        self.stop_accepting()
        if self.connection is not None:
            # Closing the session stops the rings after the workers finished
            # what they were doing: every request taken gets its used entry.
            self.connection.close("daemon stopping")
        self.loop.remove_reader(self.handler.event_fd)
        if (notes := self.device.notes_fd()) is not None:
            self.loop.remove_reader(notes)


def remove_stale_socket(path: str) -> None:
    """A socket file left by a previous run is removed; anything else is not ours."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, f"{path} is in use by another process")
