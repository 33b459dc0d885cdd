"""The web console (`daemon: web: HOST:PORT`, off by default).

One page, shipped in this package (static/: HTML, CSS and script, no
framework, nothing fetched at run time), over aiohttp on the daemon's own
loop.  What it shows is vhostd.control.daemon_status, the snapshot behind
`vhostd status --json` and the metrics; once a second the console takes
one and streams it, with the rates since the last one, to every open page
(Server-Sent Events).

Reading needs nothing.  Actions (reload the config, start or stop a VM)
need the token of `daemon.web_token_file`, sent as `Authorization: Bearer
TOKEN`; without a token file the console is read-only.  The token never
travels in a URL or a cookie, so another site cannot make a browser use it.
Requests whose Host header is not this console's address are refused (a
DNS name rebound to 127.0.0.1 must not reach it), no CORS header is sent,
and request sizes are bounded.

    GET  /                      the page
    GET  /api/status            the snapshot (as `vhostd status --json`)
    GET  /api/events            the stream: a "hello" event with the graphs'
                                history and its length, then an "update" event a second
    POST /api/reload            reload the config; its outcome or FILE:LINE errors
    POST /api/vms/NAME/start    start a VM of the config
    POST /api/vms/NAME/stop     stop it
    GET  /metrics               the Prometheus metrics, as `daemon.metrics` serves them
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import sys
import time
from importlib import resources

from aiohttp import web

from vhostd.configkeys import is_loopback
from vhostd.control import daemon_status
from vhostd.web.rates import Rates

log = logging.getLogger("vhostd.web")

INTERVAL = 1.0  # seconds between updates
MAX_BODY = 4096  # bytes of a request body (actions take none)
MAX_HEADER = 4096  # bytes of a request line or header field
MAX_STREAMS = 32  # pages open at once
STATIC = {"console.js": "text/javascript", "console.css": "text/css", "index.html": "text/html"}
# Everything the page loads comes from here; nothing may frame it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _HttpLog(logging.LoggerAdapter):
    """aiohttp logs each malformed request with a traceback; a client's
    garbage is worth one debug line, not a traceback in the daemon's log."""

    def exception(self, msg, *args, exc_info=True, **kwargs):
        exc = sys.exc_info()[1] if exc_info is True else exc_info
        self.debug("%s: %s", msg % args if args else msg, (str(exc).strip().splitlines() or [repr(exc)])[0])


def read_token(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096).strip()


def _host_names(host: str, port: int) -> set[str]:
    """Host header values that name this console (lower case)."""
    if is_loopback(host):
        names = {host.lower(), "localhost", "127.0.0.1", "::1"}
    else:  # (the FQDN may take a DNS lookup: only when other machines may ask)
        names = {host.lower(), socket.gethostname().lower(), socket.getfqdn().lower()}
    return {_with_port(n, port) for n in names if n and n not in ("0.0.0.0", "::")}


def _with_port(name: str, port: int) -> str:
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


class WebConsole:
    def __init__(self, daemon, address: tuple[str, int], token_file: str | None) -> None:
        self.daemon = daemon
        self.host, self.port = address
        self.token = read_token(token_file) if token_file else None
        self.rates = Rates()
        self.last: bytes = b""  # the last update event, sent at once to a page that opens
        self._streams: set[asyncio.Queue] = set()
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task | None = None
        self._hosts = _host_names(self.host, self.port)
        self._files = {name: resources.files(__package__).joinpath("static", name).read_bytes() for name in STATIC}

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.middlewares.append(self._guard)
        app.on_response_prepare.append(self._headers)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/favicon.ico", lambda request: web.Response(status=204))  # (browsers ask)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/events", self._events)
        app.router.add_post("/api/reload", self._reload)
        app.router.add_post("/api/vms/{name}/{action:start|stop}", self._vm_action)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, max_line_size=MAX_HEADER,
                                     max_field_size=MAX_HEADER, max_headers=64,
                                     logger=_HttpLog(logging.getLogger("vhostd.web.http"), {}))
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        except OSError as exc:
            await self._runner.cleanup()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(f"daemon.web: cannot listen on {_with_port(self.host, self.port)}: {why}") from None
        except BaseException:
            await self._runner.cleanup()
            raise
        self._sample()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())
        log.info("web console on http://%s/ (%s)", _with_port(self.host, self.port),
                 "actions need the token of daemon.web_token_file" if self.token else "read-only: no web_token_file")

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        for q in self._streams:
            q.put_nowait(None)  # each stream ends
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ updates

    def _sample(self) -> None:
        status, wall = daemon_status(self.daemon), time.time()
        rates = self.rates.update(status, time.monotonic(), wall)
        update = {"time": wall, "actions": self.token is not None, "status": status, "rates": rates}
        self.last = _event("update", update)
        for q in self._streams:
            if q.full():  # a page that does not keep up misses updates, not the others
                q.get_nowait()
            q.put_nowait(self.last)

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            try:
                self._sample()
            except Exception:  # the console must never take the daemon down
                log.exception("web console: taking a snapshot failed")

    # ------------------------------------------------------------ guard

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        host = (request.headers.get("Host") or "").lower()
        if host not in self._hosts and host != self._local_address(request):
            log.warning("web console: refused a request for host %r from %s (not this console's address)",
                        host, request.remote)
            return _error(421, f"Host {host!r} is not this console's address")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("Origin")
            if origin is not None and origin.lower() != f"http://{host}":
                return _error(403, f"a request from {origin} may not act on this console")
            try:
                await request.read()  # (actions take no body; a big one is refused, not buffered)
            except web.HTTPRequestEntityTooLarge:
                return _error(413, f"a request body may be {MAX_BODY} bytes at most")
        return await handler(request)

    def _local_address(self, request: web.Request) -> str:
        # Listening on 0.0.0.0 or ::, the address a connection came in on names us too.
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        return _with_port(sockname[0], self.port) if sockname else ""

    @staticmethod
    async def _headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY_HEADERS)

    def _refusal(self, request: web.Request) -> web.Response | None:
        """Why an action may not run (a response), or None if it may."""
        if self.token is None:
            return _error(403, "the console is read-only: actions need daemon.web_token_file in the config")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
            log.warning("web console: refused %s %s from %s: %s", request.method, request.path, request.remote,
                        "wrong token" if given else "no token")
            return _error(401, "this action needs the token of daemon.web_token_file "
                               "(Authorization: Bearer TOKEN)" + (": that one is wrong" if given else ""))
        return None

    # ------------------------------------------------------------ routes

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._files["index.html"], content_type="text/html", charset="utf-8")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=self._files[name], content_type=STATIC[name], charset="utf-8")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(daemon_status(self.daemon))

    async def _metrics(self, request: web.Request) -> web.Response:
        from vhostd.metrics import exposition

        return web.Response(body=exposition(self.daemon), content_type="text/plain", charset="utf-8")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self._streams) >= MAX_STREAMS:
            return _error(503, f"{MAX_STREAMS} pages are open already")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        q: asyncio.Queue = asyncio.Queue(maxsize=2)
        self._streams.add(q)
        try:
            await response.write(_event("hello", {"keep": self.rates.history.maxlen,
                                                  "history": list(self.rates.history)}))
            await response.write(self.last)
            while (message := await q.get()) is not None:
                await response.write(message)
        except ConnectionError:
            pass
        finally:
            self._streams.discard(q)
        return response

    async def _reload(self, request: web.Request) -> web.Response:
        if (refused := self._refusal(request)) is not None:
            return refused
        log.info("web console: reload asked by %s", request.remote)
        outcome = self.daemon.reload()
        return web.json_response(outcome, status=200 if outcome.get("ok") else 422)

    async def _vm_action(self, request: web.Request) -> web.Response:
        if (refused := self._refusal(request)) is not None:
            return refused
        name, action = request.match_info["name"], request.match_info["action"]
        log.info("web console: %s VM %s asked by %s", action, name, request.remote)
        outcome = self.daemon.start_vm(name) if action == "start" else self.daemon.stop_vm(name)
        return web.json_response(outcome, status=200 if outcome.get("ok") else 409)


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": message}, status=status)
