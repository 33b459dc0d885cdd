"""Network namespaces with TAP and veth devices for tests, always cleaned up.

    with NetNs() as ns:                                  # ip netns add vht-<pid>-<n>
        ns.add_tap("tap0", addr="10.9.0.1/24")           # persistent TAP inside, up
        fd = ns.open_tap("tap0")                         # /dev/net/tun fd attached to it
        ns.ping("10.9.0.2", check=False)
        frame = os.read(fd, 65536)                       # the ARP request the ping sent
    # namespace (and every device in it) deleted here, even on an exception

    with NetNs() as a, NetNs() as b:
        a.add_veth("va", peer="vb", peer_ns=b, addr="10.9.1.1/24", peer_addr="10.9.1.2/24")
        a.run(["ping", "-c", "1", "10.9.1.2"])

Devices are created directly inside their namespace (`ip -n NS link add`), so
nothing ever appears in the host's namespace and names cannot clash with host
interfaces.  Namespace names are `vht-<pid>-<counter>`: unique per process
and recognisable, so `cleanup_stale()` (run on the first NetNs of a process)
deletes the namespaces of test processes that died without cleaning up.
Namespaces still alive at interpreter exit are deleted by an atexit hook.

In tests, the `netns` fixture (tests/net/fixtures.py) makes namespaces that
are deleted at teardown whatever the outcome.

Processes run inside with `ns.run()` / `ns.popen()` / `ns.wrap(cmd)`
(`ip netns exec`).  A TAP that a process outside the namespace must open
(e.g. a daemon under test) can be opened with `open_tap()`, which attaches
the fd from a helper thread that temporarily enters the namespace; the fd
keeps working after the thread returns.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import itertools
import os
import re
import shutil
import struct
import subprocess
import threading
from pathlib import Path
from typing import Sequence

NETNS_DIR = Path("/run/netns")
NAME_PREFIX = "vht-"
_NAME_RE = re.compile(re.escape(NAME_PREFIX) + r"(\d+)-(\d+)$")

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
CLONE_NEWNET = 0x40000000

_counter = itertools.count()
_live: dict[str, "NetNs"] = {}
_live_lock = threading.Lock()
_stale_checked = False


class NetNsError(RuntimeError):
    pass


def netns_available() -> tuple[bool, str]:
    """(True, "") if network namespaces and TAP devices can be made here, else (False, why)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if not shutil.which("ip"):
        return False, "ip (iproute2) not found; run scripts/test-deps.sh"
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun does not exist"
    return True, ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise NetNsError(f"ip {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def ping_command(addr: str, count: int = 1, *, interval: float = 0.2, wait: float = 2) -> list[str]:
    """A ping command line that works with iputils ping and busybox ping alike."""
    exe = ["ping"] if shutil.which("ping") else ["busybox", "ping"]
    return [*exe, "-c", str(count), "-i", f"{interval:g}", "-W", f"{wait:g}", addr]


def list_netns() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Delete vht-<pid>-* namespaces whose process is gone; return their names."""
    gone = []
    for name in list_netns():
        m = _NAME_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not os.path.exists(f"/proc/{m.group(1)}"):
            if _ip("netns", "del", name, check=False).returncode == 0:
                gone.append(name)
    return gone


def _cleanup_all() -> None:
    with _live_lock:
        live = list(_live.values())
    for ns in live:
        ns.delete()


atexit.register(_cleanup_all)

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


class NetNs:
    """One network namespace; create() on construction (or on __enter__).

    ipv6=False (default) disables IPv6 in the namespace before any device
    exists, so interfaces send only what the test sends (no router/neighbour
    solicitations, MLD reports) and packet counters stay exact."""

    def __init__(self, name: str | None = None, *, create: bool = True, ipv6: bool = False):
        global _stale_checked
        if not _stale_checked:
            _stale_checked = True
            cleanup_stale()
        self.name = name or f"{NAME_PREFIX}{os.getpid()}-{next(_counter)}"
        self.created = False
        self.ipv6 = ipv6
        if create:
            self.create()

    # ------------------------------------------------------------------ lifecycle

    def create(self) -> "NetNs":
        if self.created:
            return self
        _ip("netns", "add", self.name)
        self.created = True
        with _live_lock:
            _live[self.name] = self
        try:
            self.ip("link", "set", "lo", "up")
            if not self.ipv6:
                # /proc/sys/net shows the namespace of the process that opens it.
                self.run(["sh", "-c", "for k in all default; do "
                          "echo 1 > /proc/sys/net/ipv6/conf/$k/disable_ipv6; done"])
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Delete the namespace; devices inside go with it (a veth's peer in
        another namespace too).  Idempotent; kills processes still inside."""
        if not self.created:
            return
        self.created = False
        with _live_lock:
            _live.pop(self.name, None)
        # Processes left inside keep the namespace (and its devices) alive after
        # `ip netns del`: end them first.
        out = _ip("netns", "pids", self.name, check=False).stdout.split()
        for pid in out:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", self.name, check=False)

    def __enter__(self) -> "NetNs":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.delete()

    def __repr__(self) -> str:
        return f"NetNs({self.name!r})"

    # ------------------------------------------------------------------ running things

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """The command line that runs `cmd` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 30.0,
            **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        p = subprocess.run(self.wrap(cmd), timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise NetNsError(f"in {self.name}: {' '.join(cmd)} failed ({p.returncode}):\n"
                             f"{p.stdout}{p.stderr}")
        return p

    def popen(self, cmd: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.wrap(cmd), **kw)

    def ping(self, addr: str, count: int = 1, *, interval: float = 0.2, wait: float = 2,
             check: bool = True, background: bool = False):
        """Ping `addr` from inside the namespace; CompletedProcess (or a Popen with
        background=True).  Uses ping(8) if installed, else busybox's applet
        (busybox-static is a test dependency anyway)."""
        cmd = ping_command(addr, count, interval=interval, wait=wait)
        if background:
            return self.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self.run(cmd, check=check, timeout=count * (interval + wait) + 10)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`ip -n NS args...`"""
        return _ip("-n", self.name, *args, check=check)

    # ------------------------------------------------------------------ devices

    def link_up(self, ifname: str) -> None:
        self.ip("link", "set", ifname, "up")

    def add_addr(self, ifname: str, cidr: str) -> None:
        self.ip("addr", "add", cidr, "dev", ifname)

    def set_mac(self, ifname: str, mac: str) -> None:
        self.ip("link", "set", ifname, "address", mac)

    def mac(self, ifname: str) -> str:
        return self.read_sys(ifname, "address")

    def read_sys(self, ifname: str, attr: str) -> str:
        """/sys/class/net/IF/ATTR as seen inside the namespace."""
        return self.run(["cat", f"/sys/class/net/{ifname}/{attr}"]).stdout.strip()

    def stats(self, ifname: str) -> dict[str, int]:
        """Packet counters of an interface (`ip -s -j link`)."""
        import json
        data = json.loads(self.ip("-s", "-j", "link", "show", ifname).stdout)[0]["stats64"]
        out = {}
        for d in ("rx", "tx"):
            for k, v in data[d].items():
                out[f"{d}_{k}"] = v
        return out

    def add_tap(self, ifname: str = "tap0", *, multi_queue: bool = False, vnet_hdr: bool = False,
                addr: str | None = None, mac: str | None = None, up: bool = True) -> str:
        """A persistent TAP device in the namespace.  A process attaches with
        TUNSETIFF using the same name and flags (IFF_TAP|IFF_NO_PI, plus
        IFF_MULTI_QUEUE / IFF_VNET_HDR if given here): see open_tap()."""
        args = ["tuntap", "add", "dev", ifname, "mode", "tap"]
        if multi_queue:
            args.append("multi_queue")
        if vnet_hdr:
            args.append("vnet_hdr")
        self.ip(*args)
        if mac:
            self.set_mac(ifname, mac)
        if addr:
            self.add_addr(ifname, addr)
        if up:
            self.link_up(ifname)
        return ifname

    def add_veth(self, ifname: str, peer: str, *, peer_ns: "NetNs | None" = None,
                 addr: str | None = None, peer_addr: str | None = None,
                 mac: str | None = None, peer_mac: str | None = None, up: bool = True) -> tuple[str, str]:
        """A veth pair: `ifname` here, `peer` in peer_ns (default: here too)."""
        args = ["link", "add", ifname]
        if mac:
            args += ["address", mac]
        args += ["type", "veth", "peer", "name", peer]
        if peer_mac:
            args += ["address", peer_mac]
        if peer_ns is not None:
            args += ["netns", peer_ns.name]
        self.ip(*args)
        other = peer_ns or self
        if addr:
            self.add_addr(ifname, addr)
        if peer_addr:
            other.add_addr(peer, peer_addr)
        if up:
            self.link_up(ifname)
            other.link_up(peer)
        return ifname, peer

    def open_tap(self, ifname: str, *, multi_queue: bool = False, vnet_hdr: bool = False,
                 nonblock: bool = False) -> int:
        """Open /dev/net/tun and attach to TAP `ifname` in this namespace (creating
        it if absent, as a non-persistent device that lives as long as the fd).
        Returns the fd: os.read() gives one frame, os.write() injects one."""
        result: dict[str, object] = {}

        def work() -> None:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(f"{NETNS_DIR}/{self.name}", os.O_RDONLY)
            try:
                _setns(target)
                try:
                    fd = os.open("/dev/net/tun", os.O_RDWR | (os.O_NONBLOCK if nonblock else 0))
                    flags = IFF_TAP | IFF_NO_PI
                    if multi_queue:
                        flags |= IFF_MULTI_QUEUE
                    if vnet_hdr:
                        flags |= IFF_VNET_HDR
                    try:
                        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), flags))
                    except OSError:
                        os.close(fd)
                        raise
                    result["fd"] = fd
                finally:
                    _setns(own)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                result["error"] = e
            finally:
                os.close(own)
                os.close(target)

        # setns() changes only the calling thread: use a short-lived one so the
        # test's own threads never run in the namespace.
        t = threading.Thread(target=work, name=f"open_tap-{self.name}")
        t.start()
        t.join()
        if "error" in result:
            raise NetNsError(f"cannot open TAP {ifname} in {self.name}: {result['error']}")
        return int(result["fd"])  # type: ignore[arg-type]
