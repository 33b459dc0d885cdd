"""Boot a Linux guest under QEMU (TCG) with vhost-user-blk disks and run a shell script in it.

Basic use (blocking)::

    from guest.qemu import QemuGuest, BlkDisk

    g = QemuGuest('''
        cat /sys/block/vda/size
        mkfs.ext4 -q /dev/vda && e2fsck -fn /dev/vda
    ''', disks=[sock_path], workdir=tmp_path)
    rc = g.run()              # start, wait for power-off, return the script's exit code
    assert rc == 0, g.console_tail()
    print(g.console)          # everything the guest printed (kernel + script)

The script becomes `/test.sh` in the guest and runs as root under busybox `sh`
with stdin = /dev/null and stdout/stderr on the serial console, after the
virtio modules are loaded (disks are /dev/vda, /dev/vdb, ... in the order
given).  mkfs.ext4, e2fsck and the busybox applets are available.  When it
returns, /init prints `VHOSTD-GUEST-EXIT=<rc>` and powers off; `exit_code`
is parsed from that line.  Lines `VHOSTD-RESULT key=value` printed by the
script are collected by `results()`.

Background use (e.g. restart the back-end while the guest does I/O)::

    g = QemuGuest(script_that_echoes_READY_then_loops, disks=[...], workdir=tmp_path)
    g.start()
    g.wait_for("READY")       # returns the line; later calls search after this match
    ...kill / restart the back-end...
    g.wait_for("DONE")        # or g.wait() for the exit, or g.kill()
    g.kill()

Reboots: by default QEMU runs with -no-reboot, so a guest reboot (or a kernel
panic: panic=-1) ends QEMU.  With `allow_reboot=True` QEMU resets the machine
instead and boots the same kernel and initramfs (same /test.sh) again, so
the script must decide what to do from state it finds on the disk, e.g.::

    if [ "$(dd if=/dev/vda bs=6 count=1 2>/dev/null)" = PHASE2 ]; then
        ...verify; exit 0           # second boot: /init powers off afterwards
    fi
    printf PHASE2 | dd of=/dev/vda conv=fsync 2>/dev/null
    reboot -f                       # first boot: reboot without returning

Each boot prints `VHOSTD-GUEST-BOOT` (counted by `boots`); `max_boots` (default
4 with allow_reboot) kills a guest that loops.  The exit code is the one of the
last boot.

All waits raise `GuestTimeout` (a `GuestError`) with the tail of the console
and of QEMU's own stderr in the message; `wait()` raises `GuestError` when
QEMU ended without the exit line (crash, panic, QEMU error).

Network: `nics=[NetNic(sock), ...]` adds vhost-user-net NICs; QEMU connects
to a back-end listening on each socket.  The guest sees them as eth0, eth1, ...
in that order (virtio-net-pci, MSI-X off: see NetNic), and /etc/vhostd-net.sh
(NET_HELPERS) has shell helpers for the script::

    g = QemuGuest('''
        . /etc/vhostd-net.sh
        net_up eth0 10.0.0.1/24          # no IPv6 chatter, link up, waits for carrier
        ping -c 3 -W 1 10.0.0.2
        net_stats eth0                   # VHOSTD-RESULT eth0_tx_packets=... etc.
    ''', nics=[NetNic(sock)], workdir=tmp_path)

Each NIC gets a MAC unique per test process (QEMU's default, 52:54:00:12:34:56,
is the same in every QEMU) unless given; `g.macs[i]` is the MAC of eth<i>.

Live migration: a second QemuGuest built from `destination_args()` (same
machine, `incoming=True`: QEMU -incoming on a unix socket) and QMP `migrate`::

    src = QemuGuest(script, disks=[sock_a], qmp=True, ...).start()
    src.wait_for("LOOPING")
    dst = QemuGuest(**src.destination_args(disks=[sock_b])).start()
    info = src.migrate(dst)        # until completed; info["downtime"], info["total-time"] (ms)
    dst.wait()                     # the guest's later output is on dst's console

A vhost-user socket serves one front-end at a time, so the destination needs
another socket on the same back-end (vhostd: a second `shared: true` device on
the same image, or another switch port; qsd: another export of the node).

Set VHOSTD_GUEST_TIMEOUT_SCALE (e.g. 3) to stretch every timeout on a slow
machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

from .build_guest import GUEST_BOOT_MARKER, GUEST_EXIT_MARKER, GuestImage, ensure_guest_image
from .cpio import CpioWriter, gzip_bytes

QEMU_BINARY = "qemu-system-x86_64"

# Quiet and cheap to boot under TCG: no speculative-execution mitigations to
# patch in, no TSC recalibration, no i8042 probing (saves ~0.5 s per boot).
KERNEL_CMDLINE = ("console=ttyS0 quiet panic=-1 mitigations=off tsc=reliable no_timer_check "
                  "i8042.noaux i8042.nokbd i8042.nopnp")

RESULT_PREFIX = "VHOSTD-RESULT "
_EXIT_RE = re.compile(re.escape(GUEST_EXIT_MARKER) + r"(-?\d+)")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")


class GuestError(RuntimeError):
    pass


class GuestTimeout(GuestError):
    pass


def timeout_scale() -> float:
    try:
        return max(float(os.environ.get("VHOSTD_GUEST_TIMEOUT_SCALE", "1")), 0.1)
    except ValueError:
        return 1.0


def qemu_available() -> tuple[bool, str]:
    """(True, version line) if qemu-system-x86_64 can run, else (False, reason)."""
    exe = shutil.which(QEMU_BINARY)
    if not exe:
        return False, f"{QEMU_BINARY} not found in PATH (apt-get install qemu-system-x86, see scripts/test-deps.sh)"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{exe} --version failed: {e}"
    if out.returncode != 0:
        return False, f"{exe} --version exited {out.returncode}: {out.stderr.strip()}"
    return True, f"{exe}: {out.stdout.splitlines()[0] if out.stdout else '?'}"


@dataclasses.dataclass
class BlkDisk:
    """A vhost-user-blk disk: QEMU connects to `socket` (the back-end listens there)."""
    socket: Union[str, os.PathLike]
    num_queues: int | None = None
    # chardev reconnect=<seconds>: QEMU reconnects when the back-end restarts
    # (without it, losing the back-end is final for that device).
    reconnect: int | None = None
    # packed=on: QEMU offers VIRTIO_F_RING_PACKED and the guest drives packed rings.
    packed: bool = False
    # extra -device properties, e.g. {"queue-size": 256, "config-wce": "off"}
    props: Mapping[str, object] = dataclasses.field(default_factory=dict)


DiskSpec = Union[str, os.PathLike, BlkDisk, tuple]


@dataclasses.dataclass
class NetNic:
    """A vhost-user-net NIC (virtio-net-pci) whose back-end listens on `socket`.

    queues>1 sets -netdev queues=N and -device mq=on (the guest enables
    min(N, vCPUs) queue pairs by default).  reconnect: chardev reconnect
    seconds.  server=True: QEMU listens on `socket` and waits (before the guest
    boots) until the back-end connects (e.g. testpmd net_vhost client=1).
    packed=True: -device packed=on (packed virtqueues, VIRTIO_F_RING_PACKED).
    mac: default a per-process unique 52:54:00:xx:xx:xx.  props: more -device
    properties, e.g. {"rx_queue_size": 1024, "mrg_rxbuf": False, "csum": False}.

    QEMU 7.2 under TCG segfaults in msix_set_vector_notifiers when a vhost-user
    net device uses MSI-X, so the device always gets vectors=0 (the guest
    uses INTx) and romfile= (no iPXE option ROM: nothing to load, faster boot).
    """
    socket: Union[str, os.PathLike]
    mac: str | None = None
    queues: int = 1
    reconnect: int | None = None
    server: bool = False
    packed: bool = False
    props: Mapping[str, object] = dataclasses.field(default_factory=dict)


NicSpec = Union[str, os.PathLike, NetNic]

_mac_counter = itertools.count(1)


def unique_mac() -> str:
    """A locally unique MAC in QEMU's 52:54:00 range from the pid and a counter,
    so two guests of one test (or of two pytest processes) never share one."""
    n = next(_mac_counter)
    pid = os.getpid() & 0xFFFF
    return f"52:54:00:{pid >> 8:02x}:{pid & 0xFF:02x}:{n & 0xFF:02x}"


def _as_nic(n: NicSpec) -> NetNic:
    return n if isinstance(n, NetNic) else NetNic(n)


# Shell helpers for guest scripts, at /etc/vhostd-net.sh when the guest has NICs.
NET_HELPERS = r"""
# . /etc/vhostd-net.sh    (busybox sh)

# net_up IFACE [ADDR/PREFIX] [CARRIER_TIMEOUT_S]: IPv6 off (no router/neighbour
# solicitations or MLD reports: only what the test sends leaves the guest),
# link up, address, then wait for carrier.
net_up() {
    _if=$1; _addr=$2; _t=${3:-20}
    echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null
    echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null
    echo 1 > /proc/sys/net/ipv6/conf/$_if/disable_ipv6 2>/dev/null
    ip link set lo up
    ip link set "$_if" up || return 1
    [ -z "$_addr" ] || ip addr add "$_addr" dev "$_if" || return 1
    net_wait_carrier "$_if" "$_t"
}

# net_wait_carrier IFACE [TIMEOUT_S]: 0 once /sys/class/net/IFACE/carrier is 1.
net_wait_carrier() {
    _n=$(( ${2:-20} * 10 ))
    while [ "$(cat /sys/class/net/$1/carrier 2>/dev/null)" != 1 ]; do
        _n=$((_n - 1))
        if [ $_n -le 0 ]; then echo "VHOSTD-NET: no carrier on $1"; return 1; fi
        usleep 100000
    done
}

# net_iface MAC: print the name of the interface with this MAC.
net_iface() {
    for _d in /sys/class/net/*; do
        [ "$(cat $_d/address)" = "$1" ] && { basename $_d; return 0; }
    done
    return 1
}

# net_stat IFACE COUNTER: e.g. net_stat eth0 tx_packets
net_stat() { cat /sys/class/net/$1/statistics/$2; }

# net_stats IFACE: VHOSTD-RESULT lines with the interface's packet counters.
net_stats() {
    for _c in rx_packets tx_packets rx_bytes tx_bytes rx_dropped tx_dropped rx_errors tx_errors; do
        echo "VHOSTD-RESULT $1_$_c=$(net_stat $1 $_c)"
    done
}

# net_icmp_in_echos: ICMP echo requests this guest has received.
net_icmp_in_echos() {
    awk '/^Icmp:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i; h = 1 } else print $c }' \
        /proc/net/snmp
}

# net_ping_until PEER [TRIES]: ping (1 s timeout each) until PEER answers.
net_ping_until() {
    _n=${2:-30}
    while [ $_n -gt 0 ]; do
        ping -c 1 -W 1 "$1" >/dev/null 2>&1 && return 0
        _n=$((_n - 1))
    done
    echo "VHOSTD-NET: $1 did not answer"
    return 1
}
"""


def _as_disk(d: DiskSpec) -> BlkDisk:
    if isinstance(d, BlkDisk):
        return d
    if isinstance(d, tuple):
        return BlkDisk(*d)
    return BlkDisk(d)


def _qemu_opt(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    s = str(v)
    return s.replace(",", ",,")  # QEMU option escaping


class QemuGuest:
    def __init__(
        self,
        script: str,
        disks: Sequence[DiskSpec] = (),
        *,
        extra_args: Iterable[str] = (),
        memory: str = "512M",
        smp: int = 1,
        cpu: str = "qemu64,+rdrand",
        timeout: float = 60.0,
        allow_reboot: bool = False,
        max_boots: int | None = None,
        workdir: Union[str, os.PathLike, None] = None,
        image: GuestImage | None = None,
        files: Mapping[str, Union[bytes, str, os.PathLike]] | None = None,
        cmdline_extra: str = "",
        qmp: bool = False,
        nics: Sequence[NicSpec] = (),
        incoming: Union[bool, str, None] = None,
    ):
        """
        script:      shell script run as /test.sh in the guest.
        disks:       socket paths, (socket, num_queues) tuples or BlkDisk objects.
        extra_args:  appended to the QEMU command line.
        memory:      guest RAM, always backed by a shared memfd (vhost-user needs it).
        smp:         vCPUs. Note: a disk without num_queues gets one queue per vCPU.
        cpu:         QEMU -cpu model. RDRAND matters: without it the guest CRNG takes
                     seconds to initialise under TCG and getrandom() (mkfs.ext4's
                     UUIDs) blocks for that long.
        timeout:     default for wait()/run(); wait_for() takes its own.
        allow_reboot: let the guest reboot instead of ending QEMU (see module doc).
        workdir:     where console.log, qemu.log and initrd.img go (default: a temp dir
                     that close() removes). Pass pytest's tmp_path to keep them.
        files:       extra files for the guest initramfs {guest path: bytes|str|host Path};
                     all are made executable.
        qmp:         open a QMP socket; use qmp("cmd", **args).
        nics:        socket paths or NetNic objects: vhost-user-net NICs eth0, eth1, ...
                     (see NetNic); self.macs[i] is the MAC of eth<i>.
        incoming:    a live-migration destination: True waits for the stream on a unix
                     socket of its own (self.migrate_path), a string is QEMU's -incoming
                     value as is.  See destination_args() and migrate().
        """
        self.script = script
        self.disks = [_as_disk(d) for d in disks]
        self.nics = [_as_nic(n) for n in nics]
        self.macs = [n.mac.lower() if n.mac else unique_mac() for n in self.nics]
        self.extra_args = list(extra_args)
        self.memory = memory
        self.smp = smp
        self.cpu = cpu
        self.timeout = timeout
        self.allow_reboot = allow_reboot
        self.max_boots = max_boots if max_boots is not None else (4 if allow_reboot else 1)
        self.files = dict(files or {})
        if self.nics:
            self.files.setdefault("etc/vhostd-net.sh", NET_HELPERS)
        self.cmdline_extra = cmdline_extra
        self.use_qmp = qmp
        self._image = image
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vhostd-guest-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_path = self.workdir / "console.log"
        self.qemu_log_path = self.workdir / "qemu.log"
        self.initrd_path = self.workdir / "initrd.img"
        self.qmp_path = self.workdir / "qmp.sock"
        if len(str(self.qmp_path)) > 100:  # sun_path holds 107 bytes
            self.qmp_path = Path(tempfile.mkdtemp(prefix="vhostd-qmp-")) / "qmp.sock"
        self.migrate_path = self.workdir / "migrate.sock"
        if len(str(self.migrate_path)) > 100:
            self.migrate_path = Path(tempfile.mkdtemp(prefix="vhostd-mig-")) / "migrate.sock"
        self.incoming = f"unix:{self.migrate_path}" if incoming is True else (incoming or None)
        self.proc: subprocess.Popen | None = None
        self.last_migration: dict | None = None  # see migrate()
        self._qemu_log = None
        self._cursor = 0
        self._final_console: str | None = None
        self._console_cache: tuple[int, str] = (-1, "")
        self._final_qemu_log: str | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None

    # ------------------------------------------------------------------ setup

    @property
    def image(self) -> GuestImage:
        if self._image is None:
            self._image = ensure_guest_image()
        return self._image

    def _write_initrd(self) -> None:
        w = CpioWriter()
        script = self.script if self.script.startswith("#!") else "#!/bin/sh\n" + self.script
        w.file("test.sh", script.encode(), 0o755)
        for path, content in sorted(self.files.items()):
            if isinstance(content, os.PathLike):
                data = Path(content).read_bytes()
            elif isinstance(content, str):
                data = content.encode()
            else:
                data = bytes(content)
            w.file(path, data, 0o755)
        # The kernel unpacks concatenated archives in order, later files on top;
        # a second gzip member can start at any offset.
        with open(self.initrd_path, "wb") as f:
            with open(self.image.initramfs, "rb") as base:
                shutil.copyfileobj(base, f)
            f.write(gzip_bytes(w.getvalue(), level=1))

    def command(self) -> list[str]:
        img = self.image
        cmd = [
            QEMU_BINARY, "-accel", "tcg", "-nographic", "-nodefaults", "-no-user-config",
            "-cpu", self.cpu, "-m", self.memory, "-smp", str(self.smp),
            "-object", f"memory-backend-memfd,id=mem,size={self.memory},share=on",
            "-numa", "node,memdev=mem",
            "-kernel", str(img.kernel), "-initrd", str(self.initrd_path),
            "-append", f"{KERNEL_CMDLINE} {self.cmdline_extra}".strip(),
            "-serial", f"file:{self.console_path}", "-monitor", "none",
        ]
        if not self.allow_reboot:
            cmd.append("-no-reboot")
        if self.use_qmp:
            cmd += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.incoming:
            cmd += ["-incoming", self.incoming]
        for i, d in enumerate(self.disks):
            chardev = f"socket,id=vub{i},path={_qemu_opt(os.fspath(d.socket))}"
            if d.reconnect is not None:
                chardev += f",reconnect={int(d.reconnect)}"
            dev = f"vhost-user-blk-pci,chardev=vub{i},id=vblk{i}"
            if d.num_queues is not None:
                dev += f",num-queues={int(d.num_queues)}"
            if d.packed:
                dev += ",packed=on"
            for k, v in d.props.items():
                dev += f",{k}={_qemu_opt(v)}"
            cmd += ["-chardev", chardev, "-device", dev]
        for i, (n, mac) in enumerate(zip(self.nics, self.macs)):
            chardev = f"socket,id=vun{i},path={_qemu_opt(os.fspath(n.socket))}"
            if n.server:
                chardev += ",server=on"
            if n.reconnect is not None:
                chardev += f",reconnect={int(n.reconnect)}"
            netdev = f"vhost-user,id=net{i},chardev=vun{i}"
            if n.queues > 1:
                netdev += f",queues={int(n.queues)}"
            dev = f"virtio-net-pci,netdev=net{i},id=vnet{i},mac={mac},romfile=,vectors=0"
            if n.queues > 1:
                dev += ",mq=on"
            if n.packed:
                dev += ",packed=on"
            for k, v in n.props.items():
                dev += f",{k}={_qemu_opt(v)}"
            cmd += ["-chardev", chardev, "-netdev", netdev, "-device", dev]
        return cmd + self.extra_args

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "QemuGuest":
        if self.proc is not None:
            raise GuestError("guest already started")
        self._write_initrd()
        self.console_path.write_bytes(b"")
        self._qemu_log = open(self.qemu_log_path, "wb")
        cmd = self.command()
        (self.workdir / "qemu.cmd").write_text(" ".join(_shell_quote(a) for a in cmd) + "\n")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._qemu_log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_boots(self) -> None:
        if self.boots > self.max_boots:
            self.kill()
            raise GuestError(f"guest booted {self.boots} times (max_boots={self.max_boots})\n"
                             + self._diagnostics())

    def wait(self, timeout: float | None = None) -> int:
        """Wait until QEMU exits; return the guest script's exit code."""
        if self.proc is None:
            raise GuestError("guest not started")
        limit = (self.timeout if timeout is None else timeout) * timeout_scale()
        deadline = time.monotonic() + limit
        while self.proc.poll() is None:
            self._check_boots()
            if time.monotonic() > deadline:
                self.kill()
                raise GuestTimeout(f"guest did not power off within {limit:.0f}s\n" + self._diagnostics())
            time.sleep(0.05)
        self._finish()
        code = self.exit_code
        if code is None:
            raise GuestError(f"QEMU exited with status {self.proc.returncode} and no "
                             f"{GUEST_EXIT_MARKER} line\n" + self._diagnostics())
        return code

    def run(self, timeout: float | None = None) -> int:
        """start() + wait(); always cleans up QEMU."""
        self.start()
        try:
            return self.wait(timeout)
        finally:
            self.kill()

    def wait_for(self, marker: Union[str, re.Pattern], timeout: float = 60.0) -> str:
        """Wait until `marker` (substring or regex) appears in the console after the
        previous wait_for() match; return the whole line it is on."""
        if self.proc is None:
            raise GuestError("guest not started")
        limit = timeout * timeout_scale()
        deadline = time.monotonic() + limit
        pat = marker if isinstance(marker, re.Pattern) else re.compile(re.escape(marker))
        while True:
            text = self.console
            m = pat.search(text, self._cursor)
            if m:
                self._cursor = m.end()
                start = text.rfind("\n", 0, m.start()) + 1
                end = text.find("\n", m.end())
                if end < 0:
                    end = len(text)
                return text[start:end]
            if self.proc.poll() is not None:
                self._finish()
                raise GuestError(f"QEMU exited (status {self.proc.returncode}) before "
                                 f"{pat.pattern!r} appeared\n" + self._diagnostics())
            self._check_boots()
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{pat.pattern!r} did not appear within {limit:.0f}s\n"
                                   + self._diagnostics())
            time.sleep(0.05)

    def kill(self) -> None:
        """Stop QEMU now (SIGTERM, then SIGKILL); no-op if it has exited."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._finish()

    def _finish(self) -> None:
        if self.ended_at is None:
            self.ended_at = time.monotonic()
        if self._qemu_log is not None:
            self._qemu_log.close()
            self._qemu_log = None

    def close(self) -> None:
        self.kill()
        for p in (self.qmp_path, self.migrate_path):
            if p.parent.name.startswith(("vhostd-qmp-", "vhostd-mig-")):
                shutil.rmtree(p.parent, ignore_errors=True)
        if self._own_workdir and self.workdir.exists():
            self._final_console = self.console
            self._final_qemu_log = self.qemu_log
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "QemuGuest":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ results

    @property
    def console(self) -> str:
        """Serial console so far, with CR and terminal escapes removed."""
        if self._final_console is not None:
            return self._final_console
        try:
            size = self.console_path.stat().st_size
            if self._console_cache[0] != size:  # waits poll this 20 times a second
                raw = self.console_path.read_bytes()
                # A CR at the very end may be half of a CRLF: leave it for later
                # so that the text only ever grows (wait_for keeps offsets into it).
                text = _ANSI_RE.sub("", raw.removesuffix(b"\r").decode(errors="replace"))
                # SeaBIOS ends its output with a bare CR: make that a line break too.
                self._console_cache = (size, text.replace("\r\n", "\n").replace("\r", "\n"))
        except FileNotFoundError:
            return ""
        return self._console_cache[1]

    @property
    def qemu_log(self) -> str:
        if self._final_qemu_log is not None:
            return self._final_qemu_log
        try:
            return self.qemu_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def exit_code(self) -> int | None:
        """Exit code of /test.sh (last boot), or None if no exit line was printed."""
        codes = _EXIT_RE.findall(self.console)
        return int(codes[-1]) if codes else None

    @property
    def boots(self) -> int:
        """How many times /init started (VHOSTD-GUEST-BOOT lines)."""
        return sum(1 for l in self.console.splitlines() if l.strip().endswith(GUEST_BOOT_MARKER))

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.monotonic()) - self.started_at

    def results(self) -> dict[str, str]:
        """{key: value} from lines `VHOSTD-RESULT key=value` (last one wins)."""
        out = {}
        for line in self.console.splitlines():
            i = line.find(RESULT_PREFIX)
            if i >= 0 and "=" in line[i:]:
                k, v = line[i + len(RESULT_PREFIX):].split("=", 1)
                out[k.strip()] = v.strip()
        return out

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def _diagnostics(self) -> str:
        qlog = "\n".join(self.qemu_log.splitlines()[-15:])
        return (f"--- console tail ({self.console_path}) ---\n{self.console_tail()}\n"
                f"--- qemu stderr ---\n{qlog or '(empty)'}")

    # ------------------------------------------------------------------ QMP

    def qmp(self, command: str, **arguments) -> object:
        """Run one QMP command (needs qmp=True) and return its "return" value."""
        if not self.use_qmp:
            raise GuestError("QemuGuest(qmp=True) is needed for qmp()")
        deadline = time.monotonic() + 10 * timeout_scale()
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self.qmp_path))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline or not self.running():
                    raise GuestError(f"cannot connect to QMP at {self.qmp_path}\n" + self._diagnostics())
                time.sleep(0.05)
        with s, s.makefile("rwb") as f:
            def call(cmd, args=None):
                msg = {"execute": cmd}
                if args:
                    msg["arguments"] = args
                f.write(json.dumps(msg).encode() + b"\n")
                f.flush()
                while True:
                    line = f.readline()
                    if not line:
                        raise GuestError(f"QMP connection closed during {cmd}")
                    reply = json.loads(line)
                    if "return" in reply:
                        return reply["return"]
                    if "error" in reply:
                        raise GuestError(f"QMP {cmd} failed: {reply['error']}")
            json.loads(f.readline())  # greeting
            call("qmp_capabilities")
            return call(command, arguments)

    # ------------------------------------------------------------------ migration

    def destination_args(self, **overrides) -> dict:
        """Keyword arguments (script included) for a QemuGuest that can take this
        guest by live migration: the same machine (RAM, CPUs, kernel, initramfs,
        devices in the same order, NICs with the same MACs), QMP on and
        `incoming=True`.  Override `disks` / `nics` to attach the destination to
        other back-end sockets: a vhost-user socket serves one front-end at a
        time, and the source keeps its connection until it is killed::

            dst = qemu_guest(**src.destination_args(disks=[sock_b])).start()
            info = src.migrate(dst)          # dst now runs the guest
            dst.wait_for("DONE")             # guest output continues on dst's console
        """
        nics = [_as_nic(n) for n in overrides.pop("nics", self.nics)]
        # The guest must keep its MACs: its driver read them at boot.
        nics = [dataclasses.replace(n, mac=n.mac or mac) for n, mac in zip(nics, self.macs)]
        kw = dict(script=self.script, disks=list(self.disks), nics=nics, extra_args=list(self.extra_args),
                  memory=self.memory, smp=self.smp, cpu=self.cpu, timeout=self.timeout,
                  allow_reboot=self.allow_reboot, max_boots=self.max_boots, image=self._image,
                  files=dict(self.files), cmdline_extra=self.cmdline_extra, qmp=True, incoming=True)
        kw.update(overrides)
        return kw

    def migrate(self, dest: "QemuGuest", *, timeout: float = 120.0, max_bandwidth: int | None = None,
                downtime_limit_ms: int | None = None, kill_source: bool = True) -> dict:
        """Live-migrate this (running, qmp=True) guest to `dest` (started, incoming=True)
        over a unix socket; wait until the migration completes and `dest` runs.
        Returns QEMU's final query-migrate answer: "total-time" and "downtime"
        (ms), "setup-time", "ram" statistics.  Raises GuestError when QEMU refuses
        (e.g. a migration blocker: a vhost-user back-end without dirty logging)
        or the migration fails.  max_bandwidth (bytes/s) stretches the
        migration so that a guest workload overlaps it for long enough.
        kill_source: end the source QEMU afterwards (it stays paused otherwise,
        holding its back-end connections)."""
        self.last_migration = None
        if not dest.incoming or not dest.incoming.startswith("unix:"):
            raise GuestError("the destination needs incoming=True (or 'unix:PATH')")
        # QEMU listens for the incoming stream before it serves QMP.
        status = dest.qmp("query-status")["status"]
        if status != "inmigrate":
            raise GuestError(f"destination is {status!r}, not waiting for a migration\n" + dest._diagnostics())
        params = {}
        if max_bandwidth is not None:
            params["max-bandwidth"] = int(max_bandwidth)
        if downtime_limit_ms is not None:
            params["downtime-limit"] = int(downtime_limit_ms)
        if params:
            self.qmp("migrate-set-parameters", **params)
        self.qmp("migrate", uri=dest.incoming)
        limit = timeout * timeout_scale()
        deadline = time.monotonic() + limit
        while True:
            info = self.qmp("query-migrate")
            state = info.get("status")
            if state == "completed":
                break
            if state in ("failed", "cancelled"):
                raise GuestError(f"migration {state}: {info.get('error-desc', '?')}\n--- source ---\n"
                                 f"{self._diagnostics()}\n--- destination ---\n{dest._diagnostics()}")
            if time.monotonic() > deadline:
                try:
                    self.qmp("migrate_cancel")
                except GuestError:
                    pass
                raise GuestTimeout(f"migration not done within {limit:.0f}s: {info}\n" + self._diagnostics())
            time.sleep(0.1)
        self.last_migration = info  # for callers that catch what follows
        while dest.qmp("query-status")["status"] != "running":
            if time.monotonic() > deadline:
                raise GuestTimeout("destination did not start running after the migration\n"
                                   + dest._diagnostics())
            time.sleep(0.05)
        if kill_source:
            self.kill()
        return info


def _shell_quote(s: str) -> str:
    return s if re.fullmatch(r"[\w@%+=:,./-]+", s) else "'" + s.replace("'", "'\\''") + "'"
