"""systemd integration without libsystemd: the sd_notify datagram protocol,
socket activation (sockets passed as fds 3.. with $LISTEN_FDS) and the
journal's log format.

sd_notify: one datagram of newline-separated KEY=VALUE lines to the
AF_UNIX socket named by $NOTIFY_SOCKET (a leading '@' names an abstract
socket).  With the variable unset every call is a no-op, so the daemon runs
the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time

log = logging.getLogger("vhostd")


def _address() -> str | bytes | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return b"\0" + os.fsencode(addr[1:])
    return addr


def notify(*lines: str) -> bool:
    """Send the lines as one notification; True if it was sent."""
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), addr)
        return True
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def notify_ready(status: str | None = None) -> None:
    notify("READY=1", *([f"STATUS={status}"] if status else []))


def notify_status(status: str) -> None:
    notify(f"STATUS={status}")


def notify_reloading() -> None:
    # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match the
    # READY=1 that ends this reload; older versions ignore it.
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
           "STATUS=reloading the configuration")


def notify_stopping() -> None:
    notify("STOPPING=1", "STATUS=stopping")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when
    systemd does not watch this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode of the stream it connected to
    stderr; if stderr is still that stream, the journal reads our lines."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


# sd-daemon(3) priority prefixes, which the journal turns into the entry's priority.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`, no timestamp (the journal adds its own).  Every
    line of a multi-line record (a traceback) carries the prefix, so none
    of it lands at the wrong priority."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


#: the first fd systemd passes (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3


def listen_fds(environ: dict | None = None) -> list[tuple[str, socket.socket]]:
    """The sockets passed by socket activation ($LISTEN_FDS, for this pid),
    each with its name from $LISTEN_FDNAMES ("" when unnamed).  The
    variables are removed so that children do not take the fds as theirs.
    Only listening unix stream sockets are kept; anything else passed is
    logged and left alone."""
    env = os.environ if environ is None else environ
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not count or pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        log.warning("ignored LISTEN_FDS=%r: not a number", count)
        return []
    labels = names.split(":") if names else []
    passed = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        name = labels[i] if i < len(labels) else ""
        try:
            sock = listening_socket(fd)
        except ValueError as exc:
            log.warning("ignored passed fd %d (%s): %s", fd, name or "unnamed", exc)
            continue
        passed.append((name, sock))
    return passed


def listening_socket(fd: int) -> socket.socket:
    """Take over fd, which must be a listening unix stream socket (it is
    close-on-exec from now on).  ValueError says what it is instead, and
    leaves fd open."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ValueError("not a socket")
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"not usable ({exc.strerror})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError("not a unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ValueError("not listening")
    os.set_inheritable(fd, False)
    return sock


def bound_path(sock: socket.socket) -> str:
    """The absolute path a unix socket is bound to ("" if none)."""
    name = sock.getsockname()
    return os.path.abspath(name) if isinstance(name, str) and name else ""
