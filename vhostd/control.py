"""The control socket: `vhostd status` and `vhostd reload` talk to a running
daemon here.

One JSON object per line each way: the client sends {"cmd": "status"} or
{"cmd": "reload"} and gets one reply, {"ok": true, ...} or {"ok": false,
"error": "..."}; then the connection closes.  The socket is mode 0600: only
the daemon's own user (and root) may use it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat

from vhostd.virtio import feature_names

log = logging.getLogger("vhostd.control")

MAX_REQUEST = 4096  # bytes in one request line
CLIENT_TIMEOUT = 5.0  # seconds a client may take to send its request


def device_status(name: str, server, cfg) -> dict:
    """Everything `vhostd status` shows about one device."""
    handler = server.handler
    queues = []
    for i in range(server.device.num_queues):
        q = handler.rings.queue_info(i)
        queues.append({"index": i, "size": q.num, "started": q.started, "enabled": q.enabled, "broken": q.broken,
                       "last_avail": q.last_avail, "used_idx": q.used_idx,
                       "driver_avail": q.driver_avail, "packed": q.packed, "requests": q.requests,
                       "kicks": q.kicks, "notifies": q.notifies, "bytes_out": q.out_bytes, "bytes_in": q.in_bytes,
                       "pending": q.pending})
    needs_reset = handler.rings.needs_reset
    if needs_reset:
        handler.log_errors()  # (its error eventfd may not have been read yet)
    peer = None
    if server.peer is not None:
        peer = dict(zip(("pid", "uid", "gid"), server.peer))
    return {
        "name": name,
        "type": cfg.type,
        "state": "serving",
        "socket": server.socket_path,
        "connected": server.connection is not None,
        "peer": peer,
        "sessions": server.sessions,
        "features": handler.features,
        "feature_names": feature_names(handler.features, cfg.type),
        "status": handler.status,
        "needs_reset": needs_reset,
        "reset_reason": handler.reset_reason if needs_reset else "",
        **server.device.describe(),
        "queues": queues,
        "counters": server.device.stats(),
    }


def opening_status(name: str, op) -> dict:
    """A device whose store is still being opened (a remote disk not reached yet)."""
    return {"name": name, "type": op.cfg.type, "socket": op.cfg.socket, "state": "opening", "attempts": op.attempts,
            "error": op.error, "backend": op.cfg.backend}


def daemon_status(daemon) -> dict:
    """The one snapshot of the daemon: `vhostd status --json`, the metrics
    and the web console all show this."""
    return {"ok": True, "config": daemon.config.path, "pid": os.getpid(),
            "devices": [device_status(name, server, daemon.configs[name]) for name, server in daemon.servers.items()]
            + [opening_status(name, op) for name, op in daemon.opening.items()],
            "vms": daemon.vms.describe() if daemon.vms is not None else []}


class ControlServer:
    def __init__(self, daemon, path: str) -> None:
        self.daemon = daemon
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        from vhostd.server import remove_stale_socket

        remove_stale_socket(self.path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)  # before listen(): no window for others
            sock.listen(8)
            self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_REQUEST)
        except BaseException:
            sock.close()
            raise
        log.info("control socket %s", self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), CLIENT_TIMEOUT)
                reply = self._handle(line)
            except asyncio.TimeoutError:
                reply = {"ok": False, "error": f"no request within {CLIENT_TIMEOUT:g} s"}
            except (ValueError, asyncio.LimitOverrunError):
                reply = {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), CLIENT_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            pass
        except Exception:  # a bug here must cost this client, never the daemon
            log.exception("control request failed")
        finally:
            writer.close()

    def _handle(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
            cmd = request.get("cmd") if isinstance(request, dict) else None
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "a request is one JSON object per line, like {\"cmd\": \"status\"}"}
        if cmd == "status":
            return daemon_status(self.daemon)
        if cmd == "reload":
            return self.daemon.reload()
        return {"ok": False, "error": f"unknown command {cmd!r}; known: status, reload"}

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def request(path: str, cmd: str, timeout: float = 30.0) -> dict:
    """Client side: send one command, return the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
