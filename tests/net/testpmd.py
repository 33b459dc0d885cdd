"""DPDK `dpdk-testpmd` as a known-good vhost-user-net peer for tests.

testpmd plays either side of vhost-user:

* FRONT-END (the "guest"): `VirtioUserPort(sock)` = `--vdev net_virtio_userN,path=SOCK`;
  testpmd connects to a back-end listening on SOCK (or listens itself with
  server=True).
* BACK-END (the "device"): `VhostPort(sock)` = `--vdev net_vhostN,iface=SOCK`;
  testpmd listens on SOCK (or connects with client=True) and a front-end
  (QEMU, another testpmd) drives the virtqueues.

Ports get testpmd port ids 0, 1, ... in the order given.

Exact counts (interactive mode, the default)::

    rx = Testpmd([VhostPort(sock)], forward_mode="rxonly", workdir=tmp_path).start()
    tx = Testpmd([VirtioUserPort(sock)], forward_mode="io", burst=32, workdir=tmp_path).start()
    tx.wait_link(0); rx.wait_link(0)
    tx.start_forwarding(tx_first=4)          # exactly 4 bursts of 32 frames, 64 bytes each
    rx.wait_stats(lambda s: s[0].rx_packets >= 128, timeout=10)
    fin_tx, fin_rx = tx.stop(), rx.stop()    # final StatsSnapshot of each
    assert fin_tx.ports[0].tx_packets == fin_rx.ports[0].rx_packets == 128

Why interactive mode: testpmd then runs commands from stdin (`start`,
`start tx_first N`, `stop`, `show port stats all`, `show port info N`, any
other via `cmd()`), so the test decides when traffic starts and reads the
counters at the moment it wants them, not every `--stats-period` seconds.
Each command's output is the text between its echo and the next `testpmd> `
prompt.  stdout is a pipe, so testpmd runs under `stdbuf -oL` (its printf
output would otherwise sit in a 4 KiB stdio buffer until exit).

Non-interactive mode (`interactive=False`) is also supported for plain
"run and forward" use: `--auto-start --stats-period P` (without a stats period
testpmd exits at once), `--tx-first`; `port_stats()` then returns the last
periodic block and stop() sends SIGINT and parses the final forward stats.

Every run writes the full testpmd output to `<workdir>/testpmd-<name>.log`.

Counters (see `PortStats`): `show port stats` is the ethdev (PMD) view:
rx_packets/tx_packets are frames the PMD really received/handed over;
rx_missed, rx_errors, tx_errors are the drops the PMD reports.  The forward
engine's view (`ForwardStats`, printed by `stop`) also counts the frames
testpmd generated but the PMD refused (tx_dropped).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

TESTPMD_BINARY = "dpdk-testpmd"
PROMPT = "testpmd> "
DPDK_RUNTIME_DIR = Path("/var/run/dpdk")
FORWARD_MODES = ("io", "mac", "macswap", "flowgen", "rxonly", "txonly", "csum", "icmpecho",
                 "noisy", "5tswap")

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_counter = itertools.count()
_cpu_counter = itertools.count()

PathLike = Union[str, os.PathLike]


class TestpmdError(RuntimeError):
    pass


def testpmd_available() -> tuple[bool, str]:
    """(True, path) if dpdk-testpmd is installed, else (False, reason)."""
    exe = shutil.which(TESTPMD_BINARY)
    if not exe:
        return False, f"{TESTPMD_BINARY} not found (apt-get install dpdk-dev, see scripts/test-deps.sh)"
    if not shutil.which("stdbuf"):
        return False, "stdbuf (coreutils) not found"
    return True, exe


def _scale() -> float:
    try:
        return max(float(os.environ.get("VHOSTD_GUEST_TIMEOUT_SCALE", "1")), 0.1)
    except ValueError:
        return 1.0


# ---------------------------------------------------------------------------- ports

def _devargs(extra: Mapping[str, object]) -> str:
    out = ""
    for k, v in extra.items():
        if isinstance(v, bool):
            v = int(v)
        out += f",{k}={v}"
    return out


@dataclasses.dataclass
class VhostPort:
    """testpmd is the vhost-user BACK-END on `socket` (DPDK net_vhost PMD).

    client=True: testpmd connects to a front-end that listens (e.g. QEMU
    -chardev ...,server=on) instead of listening itself.  `extra` holds more
    devargs, e.g. {"reconnect": 1} isn't one; {"tso": 1}, {"linear-buffer": 1}
    are.  The port's MAC is 56:48:4F:53:54:0N ("VHOST" + N, N = vdev index).
    """
    socket: PathLike
    queues: int = 1
    client: bool = False
    extra: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def vdev(self, index: int) -> str:
        s = f"net_vhost{index},iface={os.fspath(self.socket)},queues={self.queues}"
        if self.client:
            s += ",client=1"
        return s + _devargs(self.extra)


@dataclasses.dataclass
class VirtioUserPort:
    """testpmd is the vhost-user FRONT-END on `socket` (DPDK virtio-user PMD).

    server=True: testpmd listens and the back-end connects to it.  mac: the
    port's MAC (default: random).  queue_size: ring size (DPDK default 256).
    packed=True: packed virtqueues (packed_vq=1), when the back-end offers them.
    """
    socket: PathLike
    queues: int = 1
    server: bool = False
    mac: str | None = None
    queue_size: int | None = None
    packed: bool = False
    extra: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def vdev(self, index: int) -> str:
        s = f"net_virtio_user{index},path={os.fspath(self.socket)},queues={self.queues}"
        if self.server:
            s += ",server=1"
        if self.mac:
            s += f",mac={self.mac}"
        if self.queue_size:
            s += f",queue_size={self.queue_size}"
        if self.packed:
            s += ",packed_vq=1"
        return s + _devargs(self.extra)


@dataclasses.dataclass
class TapPort:
    """A kernel TAP interface `iface` (DPDK net_tap PMD), created by testpmd in
    its network namespace (see Testpmd(netns=...)); the PMD sets it up.  A way
    to bridge a vhost-user port to a namespace's IP stack in io mode."""
    iface: str
    queues: int = 1
    mac: str | None = None
    extra: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def vdev(self, index: int) -> str:
        s = f"net_tap{index},iface={self.iface}"
        if self.mac:
            s += f",mac={self.mac}"
        return s + _devargs(self.extra)


Port = Union[VhostPort, VirtioUserPort, TapPort]


# ---------------------------------------------------------------------------- statistics

@dataclasses.dataclass
class PortStats:
    """`show port stats` of one port (ethdev counters of the PMD)."""
    port: int
    rx_packets: int = 0
    rx_missed: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_bytes: int = 0


@dataclasses.dataclass
class ForwardStats:
    """The forward engine's counters of one port, printed by `stop`."""
    port: int
    rx_packets: int = 0
    rx_dropped: int = 0
    rx_total: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0
    tx_total: int = 0


@dataclasses.dataclass
class StatsSnapshot:
    """What stop() returns: last NIC counters per port and the forward stats of
    the last `stop` (empty if forwarding never ran)."""
    ports: dict[int, PortStats]
    forward: dict[int, ForwardStats]
    returncode: int | None = None

    def __getitem__(self, port: int) -> PortStats:
        return self.ports[port]


_NIC_HDR = re.compile(r"NIC statistics for port (\d+)")
_FWD_HDR = re.compile(r"Forward statistics for port (\d+)")
_COUNTER = re.compile(r"([RT]X-[a-z]+):\s*(\d+)")
_NIC_KEYS = {f.name for f in dataclasses.fields(PortStats)}
_FWD_KEYS = {f.name for f in dataclasses.fields(ForwardStats)}


def _blocks(text: str, header: re.Pattern, complete_only: bool = False) -> list[tuple[int, str]]:
    """[(port, body)] for every header match; a body ends at the next header or
    at the closing line of '#' / '-' characters.  complete_only: skip a body
    with no closing line (testpmd is still printing it)."""
    out = []
    ms = list(header.finditer(text))
    for i, m in enumerate(ms):
        end = ms[i + 1].start() if i + 1 < len(ms) else len(text)
        body = text[m.end():end]
        close = re.search(r"\n\s*(?:#{20,}|-{20,})\s*(?:\n|$)", body)
        if close:
            body = body[:close.start()]
        elif complete_only:
            continue
        out.append((int(m.group(1)), body))
    return out


def _counters(body: str) -> dict[str, int]:
    return {k.lower().replace("-", "_"): int(v) for k, v in _COUNTER.findall(body)}


def parse_port_stats(text: str, complete_only: bool = False) -> dict[int, PortStats]:
    """Every 'NIC statistics for port N' block in `text`; the last one per port wins."""
    out: dict[int, PortStats] = {}
    for port, body in _blocks(text, _NIC_HDR, complete_only):
        c = {k: v for k, v in _counters(body).items() if k in _NIC_KEYS}
        out[port] = PortStats(port, **c)
    return out


def parse_forward_stats(text: str) -> dict[int, ForwardStats]:
    """Every 'Forward statistics for port N' block in `text`; the last one per port wins."""
    out: dict[int, ForwardStats] = {}
    for port, body in _blocks(text, _FWD_HDR):
        c = {k: v for k, v in _counters(body).items() if k in _FWD_KEYS}
        out[port] = ForwardStats(port, **c)
    return out


def clean_output(raw: str) -> str:
    return _ANSI_RE.sub("", raw).replace("\r\n", "\n")


# ---------------------------------------------------------------------------- the process

class Testpmd:
    __test__ = False  # not a pytest test class despite the name
    def __init__(
        self,
        ports: Sequence[Port],
        *,
        forward_mode: str = "io",
        interactive: bool = True,
        auto_start: bool = False,
        tx_first: bool = False,
        stats_period: int | None = None,
        txpkts: Union[int, Sequence[int], None] = None,
        burst: int | None = None,
        rxd: int | None = None,
        txd: int | None = None,
        eth_peers: Mapping[int, str] | None = None,
        tx_ip: tuple[str, str] | None = None,
        port_topology: str | None = None,
        cpu: int | None = None,
        taskset: bool = False,
        total_num_mbufs: int = 8192,
        memory_mb: int = 256,
        extra_eal: Iterable[str] = (),
        extra_args: Iterable[str] = (),
        name: str | None = None,
        workdir: PathLike | None = None,
        netns: str | None = None,
    ):
        """
        ports:        VhostPort / VirtioUserPort / TapPort, port ids 0.. in this order.
        forward_mode: io | macswap | txonly | rxonly | icmpecho | mac | ... (--forward-mode).
        interactive:  -i and commands on stdin (exact control); False: --auto-start
                      --stats-period (stats_period defaults to 1 then).
        auto_start:   interactive only: start forwarding at once (--auto-start).
        tx_first:     non-interactive only: send one burst first (--tx-first);
                      interactive: use start_forwarding(tx_first=N).
        txpkts:       frame length for txonly / tx_first (--txpkts; DPDK default 64),
                      or a list of segment lengths.
        burst:        frames per burst (--burst; DPDK default 32).
        eth_peers:    {port: MAC} destination MAC of generated frames (--eth-peer),
                      and of frames the 'mac' mode forwards.
        tx_ip:        (src, dst) IPv4 of generated frames (--tx-ip).
        cpu:          CPU both lcores run on (--lcores '0@C,1@C'); default: the CPUs
                      of this process's affinity set in turn, last first.
        taskset:      also start testpmd under `taskset -c cpu`.
        netns:        run testpmd inside this network namespace (`ip netns exec`),
                      for net_tap / net_af_packet vdevs in extra_eal.
        """
        if forward_mode.split(",")[0] not in FORWARD_MODES:
            raise ValueError(f"unknown forward mode {forward_mode!r}")
        self.ports = list(ports)
        self.forward_mode = forward_mode
        self.interactive = interactive
        self.auto_start = auto_start
        self.tx_first = tx_first
        self.stats_period = stats_period if stats_period is not None else (None if interactive else 1)
        self.txpkts = txpkts
        self.burst = burst
        self.rxd = rxd
        self.txd = txd
        self.eth_peers = dict(eth_peers or {})
        self.tx_ip = tx_ip
        self.port_topology = port_topology
        if cpu is None:
            # Alternate over the CPUs we may use, last first: a front-end and a
            # back-end started one after the other get different CPUs.  Two
            # busy-polling testpmds on one CPU only exchange frames when the
            # scheduler switches between them (~4000 frames/s instead of millions).
            cpus = sorted(os.sched_getaffinity(0))
            cpu = cpus[-1 - next(_cpu_counter) % len(cpus)]
        self.cpu = cpu
        self.taskset = taskset
        self.total_num_mbufs = total_num_mbufs
        self.memory_mb = memory_mb
        self.extra_eal = list(extra_eal)
        self.extra_args = list(extra_args)
        self.netns = netns
        n = next(_counter)
        self.name = name or f"tp{n}"
        # EAL's runtime directory /var/run/dpdk/<prefix>: unique per process and
        # instance whatever name the test chose (two instances must never share one).
        self.file_prefix = f"vhostd-test-{os.getpid()}-{n}"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(
            tempfile.mkdtemp(prefix="vhostd-testpmd-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"testpmd-{self.name}.log"
        if self.log_path.exists() and name is None:
            self.log_path = self.workdir / f"testpmd-{self.name}-{os.getpid()}.log"
        self.proc: subprocess.Popen | None = None
        self._buf = bytearray()
        self._buf_lock = threading.Lock()
        self._cmd_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._log = None
        self._scan = 0           # interactive: offset after the last consumed prompt
        self.forwarding = False
        self.final: StatsSnapshot | None = None
        self._last_fwd: dict[int, ForwardStats] = {}

    # ------------------------------------------------------------------ command line

    def command(self) -> list[str]:
        cmd: list[str] = []
        if self.netns:
            cmd += ["ip", "netns", "exec", self.netns]
        if self.taskset:
            cmd += ["taskset", "-c", str(self.cpu)]
        # testpmd's printf output goes through stdio: line-buffer it or a pipe
        # reader sees nothing until the buffer fills or the process exits.
        cmd += ["stdbuf", "-oL", "-eL", TESTPMD_BINARY,
                # Two lcores (main + one forwarding core) time-share one CPU.
                "--lcores", f"0@{self.cpu},1@{self.cpu}",
                "--no-huge", "-m", str(self.memory_mb), "--no-pci",
                f"--file-prefix={self.file_prefix}"]
        for i, p in enumerate(self.ports):
            cmd += ["--vdev", p.vdev(i)]
        cmd += self.extra_eal
        cmd += ["--", f"--forward-mode={self.forward_mode}",
                f"--total-num-mbufs={self.total_num_mbufs}"]
        queues = max((p.queues for p in self.ports), default=1)
        if queues > 1:
            cmd += [f"--rxq={queues}", f"--txq={queues}"]
        if self.interactive:
            cmd.append("-i")
            if self.auto_start:
                cmd.append("--auto-start")
        else:
            cmd += ["--auto-start", f"--stats-period={self.stats_period}"]
            if self.tx_first:
                cmd.append("--tx-first")
        if self.txpkts is not None:
            seg = [self.txpkts] if isinstance(self.txpkts, int) else list(self.txpkts)
            cmd.append("--txpkts=" + ",".join(str(s) for s in seg))
        if self.burst is not None:
            cmd.append(f"--burst={self.burst}")
        if self.rxd is not None:
            cmd.append(f"--rxd={self.rxd}")
        if self.txd is not None:
            cmd.append(f"--txd={self.txd}")
        for port, mac in sorted(self.eth_peers.items()):
            cmd.append(f"--eth-peer={port},{mac}")
        if self.tx_ip:
            cmd.append(f"--tx-ip={self.tx_ip[0]},{self.tx_ip[1]}")
        if self.port_topology:
            cmd.append(f"--port-topology={self.port_topology}")
        return cmd + self.extra_args

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> "Testpmd":
        """Start testpmd and wait until it is ready: the first prompt (interactive)
        or forwarding started (non-interactive); VhostPort sockets listen."""
        if self.proc is not None:
            raise TestpmdError("testpmd already started")
        ok, why = testpmd_available()
        if not ok:
            raise TestpmdError(why)
        for p in self.ports:
            # A SIGKILLed back-end leaves its socket file behind, and bind() fails on it.
            listens = isinstance(p, VhostPort) and not p.client or isinstance(p, VirtioUserPort) and p.server
            if listens and os.path.exists(p.socket):
                os.unlink(p.socket)
        self._log = open(self.log_path, "wb")
        cmd = self.command()
        self._log.write(("$ " + " ".join(cmd) + "\n").encode())
        self._log.flush()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"testpmd-{self.name}", daemon=True)
        self._reader.start()
        try:
            if self.interactive:
                self._wait_prompt(timeout)
                self.forwarding = self.auto_start
            else:
                self.wait_output(re.compile(r"forwarding packets/burst|Press enter to exit|Port statistics"),
                                 timeout)
                self.forwarding = True
            for p in self.ports:
                if isinstance(p, VhostPort) and not p.client or isinstance(p, VirtioUserPort) and p.server:
                    self._wait_listening(p.socket, timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def listening(self, path: PathLike) -> bool:
        """True if testpmd listens on the unix socket `path`.  Reads the process's
        own /proc/PID/net/unix: that table is per network namespace, and the
        pid is testpmd's (ip netns exec, taskset and stdbuf all exec)."""
        want = os.path.abspath(os.fspath(path))
        try:
            with open(f"/proc/{self.proc.pid}/net/unix") as f:
                next(f)
                for line in f:
                    parts = line.rstrip("\n").split(None, 7)
                    # Num RefCount Protocol Flags Type St Inode Path; Flags has __SO_ACCEPTCON
                    if len(parts) >= 8 and int(parts[3], 16) & 0x10000 and parts[7] == want:
                        return True
        except (OSError, StopIteration):
            pass
        return False

    def _wait_listening(self, path: PathLike, timeout: float) -> None:
        deadline = time.monotonic() + timeout * _scale()
        while not self.listening(path):
            self._check_alive(f"listening on {path}")
            if time.monotonic() > deadline:
                raise TestpmdError(f"testpmd does not listen on {path}\n{self.output_tail()}")
            time.sleep(0.02)

    def _read_loop(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            with self._buf_lock:
                self._buf.extend(chunk)
            log = self._log
            if log is not None:
                try:
                    log.write(chunk)
                    log.flush()
                except (ValueError, OSError):
                    pass

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self, what: str) -> None:
        if self.proc is None:
            raise TestpmdError("testpmd not started")
        if self.proc.poll() is not None:
            if self._reader is not None:
                self._reader.join(2)
            raise TestpmdError(f"testpmd exited with status {self.proc.returncode} while waiting for "
                               f"{what}\n{self.output_tail()}")

    def _text(self) -> str:
        """Raw output so far; offsets into it stay valid as it grows."""
        with self._buf_lock:
            return self._buf.decode("latin-1")

    @property
    def output(self) -> str:
        """Everything testpmd printed so far (terminal escapes removed)."""
        return clean_output(self._text())

    def output_tail(self, lines: int = 40) -> str:
        return f"--- testpmd {self.name} output tail ({self.log_path}) ---\n" + \
            "\n".join(self.output.splitlines()[-lines:])

    def wait_output(self, pattern: Union[str, re.Pattern], timeout: float = 10.0, start: int = 0) -> re.Match:
        """Wait until `pattern` (substring or regex) appears in the output after
        offset `start`; return the match (match.end() is a new offset)."""
        pat = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout * _scale()
        while True:
            m = pat.search(self._text(), start)
            if m:
                return m
            self._check_alive(repr(pat.pattern))
            if time.monotonic() > deadline:
                raise TestpmdError(f"{pat.pattern!r} not printed by testpmd within {timeout}s\n"
                                   + self.output_tail())
            time.sleep(0.01)

    # ------------------------------------------------------------------ interactive commands

    def _wait_prompt(self, timeout: float) -> str:
        """Wait for the next prompt after self._scan; return the text before it."""
        m = self.wait_output(PROMPT, timeout, self._scan)
        text = self._text()[self._scan:m.start()]
        self._scan = m.end()
        return text

    def cmd(self, command: str, timeout: float = 10.0) -> str:
        """Run one testpmd command (interactive mode); return its output (the
        text up to the next prompt, without the echoed command line)."""
        if not self.interactive:
            raise TestpmdError("cmd() needs interactive mode")
        if "\n" in command:
            raise ValueError("one command per call")
        with self._cmd_lock:
            self._check_alive(f"command {command!r}")
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
            text = self._wait_prompt(timeout)
        # The command line library echoes what it reads; drop that first line.
        first, _, rest = text.partition("\n")
        return rest if first.strip() == command.strip() else text

    def start_forwarding(self, tx_first: int | None = None) -> str:
        """`start`, or `start tx_first N`: first send N bursts (of --burst frames,
        --txpkts bytes each, built like txonly's), then run the forward mode."""
        out = self.cmd("start" if not tx_first else f"start tx_first {int(tx_first)}")
        self.forwarding = True
        return out

    def stop_forwarding(self) -> dict[int, ForwardStats]:
        """`stop`: stop forwarding; return the forward engine's per-port counters."""
        if not self.interactive:
            raise TestpmdError("stop_forwarding() needs interactive mode")
        out = self.cmd("stop")
        self.forwarding = False
        fwd = parse_forward_stats(out)
        if fwd:
            self._last_fwd = fwd
        return fwd

    def port_stats(self) -> dict[int, PortStats]:
        """Current NIC counters {port: PortStats}.  Interactive: asks now;
        otherwise the latest --stats-period block (may be up to a period old)."""
        if self.interactive:
            return parse_port_stats(self.cmd("show port stats all"))
        self._check_alive("statistics")
        text = self.output
        i = text.rfind("Port statistics ====")
        stats = parse_port_stats(text[i:] if i >= 0 else "", complete_only=True)
        if len(stats) < len(self.ports):  # a block still being printed (RX lines, no TX yet): the previous one
            j = text.rfind("Port statistics ====", 0, i) if i > 0 else -1
            stats = parse_port_stats(text[j:i] if j >= 0 else "", complete_only=True)
        return stats

    def clear_stats(self) -> None:
        self.cmd("clear port stats all")

    def port_info(self, port: int) -> dict[str, str]:
        """`show port info N` as {key: value}, e.g. info["Link status"] == "up"."""
        out = self.cmd(f"show port info {port}")
        info = {}
        for line in out.splitlines():
            k, sep, v = line.partition(": ")
            if sep and not k.startswith(" "):
                info.setdefault(k.strip(), v.strip())
        return info

    def link_up(self, port: int = 0) -> bool:
        if self.interactive:
            return self.port_info(port).get("Link status") == "up"
        # Non-interactive: the last link state change event printed for the port.
        # (vhost's LSC interrupts are printed as "Port N: link state change event".)
        raise TestpmdError("link_up() needs interactive mode")

    def mac(self, port: int = 0) -> str:
        """The port's own MAC address (lower case)."""
        return self.port_info(port)["MAC address"].lower()

    def wait_link(self, port: int = 0, up: bool = True, timeout: float = 20.0) -> None:
        """Wait until the port's link is up (vhost: the front-end started the
        queues; virtio-user: the back-end accepted the device) or down."""
        deadline = time.monotonic() + timeout * _scale()
        while self.link_up(port) != up:
            if time.monotonic() > deadline:
                raise TestpmdError(f"port {port} link not {'up' if up else 'down'} after {timeout}s\n"
                                   + self.output_tail())
            time.sleep(0.05)

    def wait_stats(self, predicate: Callable[[dict[int, PortStats]], object], timeout: float = 10.0,
                   interval: float = 0.05, what: str | None = None) -> dict[int, PortStats]:
        """Poll port_stats() until predicate(stats) is true; return those stats.
        Raises TestpmdError with the last stats seen on timeout."""
        deadline = time.monotonic() + timeout * _scale()
        while True:
            stats = self.port_stats()
            if stats and predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise TestpmdError(f"timed out after {timeout}s waiting for {what or 'stats condition'}; "
                                   f"last stats: {stats}\n{self.output_tail(20)}")
            time.sleep(interval)

    def wait_rx(self, count: int, port: int = 0, timeout: float = 10.0) -> dict[int, PortStats]:
        return self.wait_stats(lambda s: s[port].rx_packets >= count, timeout,
                               what=f"port {port} rx_packets >= {count}")

    # ------------------------------------------------------------------ stop

    def stop(self, timeout: float = 10.0) -> StatsSnapshot:
        """Stop forwarding and testpmd; return the final counters.

        Interactive: `stop`, `show port stats all`, `quit`; if testpmd does not
        exit, SIGINT, then SIGTERM, then SIGKILL.  Non-interactive: SIGINT (testpmd
        prints its forward stats and exits), then the same escalation."""
        if self.final is not None:
            return self.final
        if self.proc is None:
            raise TestpmdError("testpmd not started")
        ports: dict[int, PortStats] = {}
        fwd: dict[int, ForwardStats] = {}
        if self.interactive and self.running():
            try:
                if self.forwarding:
                    fwd = self.stop_forwarding()
                ports = self.port_stats()
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.flush()
            except (TestpmdError, OSError):
                pass
        elif not self.interactive:
            ports = self._safe_port_stats()
        mark = len(self._text())
        self._terminate(timeout)
        tail = self._text()[mark:]
        if not fwd:
            fwd = parse_forward_stats(tail) or self._last_fwd
        if not ports:
            ports = parse_port_stats(self.output)
        self.final = StatsSnapshot(ports, fwd, self.proc.returncode)
        self.forwarding = False
        return self.final

    def _safe_port_stats(self) -> dict[int, PortStats]:
        try:
            return self.port_stats()
        except TestpmdError:
            return {}

    def _terminate(self, timeout: float) -> None:
        """Wait for exit (after quit); escalate SIGINT -> SIGTERM -> SIGKILL."""
        steps = [(None, timeout if self.interactive else 0), (signal.SIGINT, timeout),
                 (signal.SIGTERM, 3), (signal.SIGKILL, 5)]
        for sig, wait in steps:
            if self.proc.poll() is not None:
                break
            if sig is not None:
                try:
                    os.killpg(self.proc.pid, sig)  # own session: testpmd (and ip netns exec, taskset)
                except ProcessLookupError:
                    break
            try:
                self.proc.wait(wait * _scale())
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(DPDK_RUNTIME_DIR / self.file_prefix, ignore_errors=True)

    def kill(self) -> None:
        """Stop now without collecting statistics (SIGKILL); no-op once stopped."""
        if self.proc is None or self.final is not None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._terminate(1)
        self.final = StatsSnapshot(parse_port_stats(self.output), self._last_fwd, self.proc.returncode)

    def close(self) -> None:
        """stop() if running (errors ignored); remove an own temp workdir."""
        if self.proc is not None and self.final is None:
            try:
                self.stop(timeout=5)
            except Exception:
                self.kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Testpmd":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()
