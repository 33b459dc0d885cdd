"""Loading and validating the vhostd YAML configuration file.

The entry point is :func:`load_config`.  It either returns a fully validated,
immutable :class:`Config` or raises :class:`ConfigError` listing *every*
problem it found, each with the file, the 1-based line and the dotted key
path (``devices[1].queues``) it concerns::

    config/vhostd.yaml:7: devices[0].queues: must be an integer from 1 to 64, got 'two' (device 'disk0')

The file is parsed with ``yaml.compose`` so that every value keeps the line it
came from; values are then checked against small per-section key tables
(``_DAEMON_KEYS``, ``_COMMON_DEVICE_KEYS`` and ``DEVICE_TYPES[...]``).  Adding a
device type means writing its dataclass, its key table and (optionally) a
check hook, and registering it in ``DEVICE_TYPES``.
"""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, TypeAlias

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "BLK_BACKENDS",
    "BlkDeviceConfig",
    "NetDeviceConfig",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "DeviceConfig",
    "DEVICE_TYPES",
    "LOG_LEVELS",
    "Problem",
    "VmConfig",
    "VmDeviceConfig",
    "load_config",
    "parse_size",
]

LOG_LEVELS = ("debug", "info", "warning", "error")

#: Longest usable AF_UNIX socket path: sun_path is 108 bytes including the NUL.
MAX_SOCKET_PATH = 107
#: virtio-blk GET_ID returns at most this many bytes.
MAX_SERIAL = 20
MAX_QUEUES = 64
MAX_QUEUE_SIZE = 1024
MAX_WORKERS = 1024
SECTOR = 512

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


# --------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file.

    ``line`` is 1-based, or None when the problem is not tied to a line (the
    file cannot be read, is empty).  ``key`` is the dotted path of the
    offending key (``devices[1].queues``), or "" for problems about the file
    as a whole (YAML syntax errors, wrong top-level type).  Empty parts are
    left out of ``str()``.
    """

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The config file is unusable.  ``problems`` lists everything wrong."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    workers: int = 0  # 0 = pick automatically
    log_level: str = "info"
    log_format: str = "auto"  # one of LOG_FORMATS; auto = journal when stderr is the journal
    control_socket: str | None = None  # `vhostd status` / `vhostd reload` talk to the daemon here
    user: int | None = None  # uid to drop to once every socket, image and TAP is open
    group: int | None = None  # gid to drop to (default: the user's primary group)
    metrics: tuple[str, int] | None = None  # (host, port) of the Prometheus endpoint; None = off


LOG_FORMATS = ("auto", "journal", "text")


@dataclass(frozen=True, kw_only=True)
class BlkDeviceConfig:
    name: str
    type: Literal["blk"] = "blk"
    socket: str  # absolute path of the vhost-user socket vhostd listens on
    backend: str = "file"  # one of BLK_BACKENDS
    path: str | None = None  # absolute path of the image (regular file or block device); None with backend null
    readonly: bool = False
    queues: int = 1
    queue_size: int = 256  # largest ring size offered; power of two
    size: int | None = None  # bytes; creates a missing image (file), the capacity (null)
    serial: str | None = None  # GET_ID string; load_config fills in the name
    discard: bool = True
    write_zeroes: bool = True
    direct: bool = False  # open the image with O_DIRECT
    aio: str = "auto"  # one of BLK_AIO: where the image's I/O runs
    poll_us: int = 0  # busy-poll window of a queue that ran empty, in microseconds (0 = off)
    socket_mode: int | None = None  # chmod() the socket to this, e.g. 0o660
    socket_owner: int | None = None  # chown() the socket to this uid
    socket_group: int | None = None  # ... and this gid
    allow_uids: tuple[int, ...] | None = None  # peers allowed by SO_PEERCRED uid (None = anyone)
    allow_gids: tuple[int, ...] | None = None  # ... or by gid
    line: int = field(default=0, compare=False)  # where the device starts in the YAML (0 = unknown)


#: file: the data lives in an image; null: no storage at all, like QEMU's
#: null-co driver (requests succeed without moving data), to measure the
#: protocol and ring overhead alone.
BLK_BACKENDS = ("file", "null")
#: auto: io_uring (images on memory file systems inline); io_uring; threads: a thread pool.
BLK_AIO = ("auto", "io_uring", "threads")
MAX_POLL_US = 1_000_000

NET_BACKENDS = ("tap", "switch", "loopback")
MAX_QUEUE_PAIRS = 16


@dataclass(frozen=True, kw_only=True)
class NetDeviceConfig:
    name: str
    type: Literal["net"] = "net"
    socket: str
    backend: str  # one of NET_BACKENDS
    tap: str | None = None  # TAP interface name (backend tap)
    switch: str | None = None  # switch name (backend switch); ports naming the same switch are connected
    mac: str | None = None  # guest MAC; load_config fills in one derived from the name
    mtu: int = 1500
    queues: int = 1  # queue pairs
    queue_size: int = 256
    offloads: bool = True  # offer checksum/TSO/UFO offloads to the guest
    socket_mode: int | None = None
    socket_owner: int | None = None  # chown() the socket to this uid
    socket_group: int | None = None  # ... and this gid
    allow_uids: tuple[int, ...] | None = None  # peers allowed by SO_PEERCRED uid (None = anyone)
    allow_gids: tuple[int, ...] | None = None  # ... or by gid
    line: int = field(default=0, compare=False)


#: Every device config class.
DeviceConfig: TypeAlias = BlkDeviceConfig | NetDeviceConfig


#: Guest RAM of a VM must end below its virtio-mmio window (0xd0000000).
MIN_VM_MEMORY = 4 << 20
MAX_VM_MEMORY = 3 << 30
VM_MEMORY_ALIGN = 2 << 20
MAX_VCPUS = 64
MAX_VM_DEVICES = 16
MAX_VM_ARGS = 255  # the boot info's cmdline field is 256 bytes with the NUL
VM_DEVICE_TYPES = ("blk", "net")
DEFAULT_VM_QUEUE_SIZE = 256


@dataclass(frozen=True, kw_only=True)
class VmDeviceConfig:
    """One virtio-mmio device of a VM, served by a vhost-user back-end."""

    type: str  # one of VM_DEVICE_TYPES
    socket: str  # absolute path of the back-end's vhost-user socket
    #: QueueNumMax offered to the guest.  Default: the queue_size of the
    #: vhostd device of this config on the same socket, else 256.
    queue_size: int = DEFAULT_VM_QUEUE_SIZE
    line: int = field(default=0, compare=False)


@dataclass(frozen=True, kw_only=True)
class VmConfig:
    """A VM of the built-in VMM (vhostd/vmm): a guest-drivers payload
    (ELF, guest-drivers/ABI.md) or a Linux kernel, and its devices."""

    name: str
    memory: int  # bytes of guest RAM
    vcpus: int = 1
    payload: str | None = None  # absolute path of the ELF program
    kernel: str | None = None  # absolute path of a bzImage (instead of a payload)
    cmdline: str = ""  # kernel command line
    initrd: str | None = None
    args: str = ""  # the payload's boot info cmdline
    autostart: bool = False  # `vhostd serve` runs it next to the devices
    devices: tuple[VmDeviceConfig, ...] = ()
    line: int = field(default=0, compare=False)


@dataclass(frozen=True, kw_only=True)
class Config:
    path: str  # absolute path of the config file
    daemon: DaemonConfig
    devices: tuple[DeviceConfig, ...]
    vms: tuple[VmConfig, ...] = ()

    def vm(self, name: str) -> VmConfig:
        """The VM called `name`; KeyError if there is none."""
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)


# --------------------------------------------------------------------------
# Scalar validators
#
# Each takes the YAML node and the load context and returns the Python value,
# or raises _Invalid with a message that says what is accepted and what was
# found.  The caller adds file, line and key.
# --------------------------------------------------------------------------


class _Invalid(Exception):
    pass


_TAG = "tag:yaml.org,2002:"
_constructor = SafeConstructor()


def _describe(node: Node) -> str:
    """How a value is shown after 'got': quoted strings, raw scalars, kinds."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _TAG + "null":
        return "nothing" if node.value in ("", "~") else node.value
    if node.tag == _TAG + "str":
        return repr(node.value)
    return node.value


def _is(node: Node, kind: str) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG + kind


def _string(node: Node, what: str = "a string") -> str:
    if _is(node, "str"):
        return node.value
    hint = " (put it in quotes)" if isinstance(node, ScalarNode) and node.value else ""
    raise _Invalid(f"must be {what}, got {_describe(node)}{hint}")


def _bool(node: Node, ctx: _Context) -> bool:
    if _is(node, "bool"):
        return _constructor.construct_yaml_bool(node)
    raise _Invalid(f"must be true or false, got {_describe(node)}")


def _int(node: Node, what: str) -> int:
    if _is(node, "int"):
        return _constructor.construct_yaml_int(node)
    raise _Invalid(f"must be {what}, got {_describe(node)}")


def _int_range(lo: int, hi: int) -> Callable[[Node, _Context], int]:
    what = f"an integer from {lo} to {hi}"

    def parse(node: Node, ctx: _Context) -> int:
        value = _int(node, what)
        if not lo <= value <= hi:
            raise _Invalid(f"must be {what}, got {_describe(node)}")
        return value

    return parse


def _power_of_two(lo: int, hi: int) -> Callable[[Node, _Context], int]:
    what = f"a power of two from {lo} to {hi}"

    def parse(node: Node, ctx: _Context) -> int:
        value = _int(node, what)
        if not (lo <= value <= hi and value & (value - 1) == 0):
            raise _Invalid(f"must be {what}, got {_describe(node)}")
        return value

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[Node, _Context], str]:
    what = "one of " + ", ".join(choices)

    def parse(node: Node, ctx: _Context) -> str:
        value = _string(node, what).lower()
        if value not in choices:
            raise _Invalid(f"must be {what}, got {_describe(node)}{_did_you_mean(value, choices)}")
        return value

    return parse


def _name(node: Node, ctx: _Context) -> str:
    what = "a name of 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
    value = _string(node, what)
    if not _NAME_RE.fullmatch(value):
        raise _Invalid(f"must be {what}, got {_describe(node)}")
    return value


def _path(node: Node, ctx: _Context) -> str:
    value = _string(node, "a file path")
    if not value:
        raise _Invalid("must be a file path, got an empty string")
    if "\0" in value:
        raise _Invalid("must not contain a NUL character")
    return ctx.resolve(value)


def _socket_path(node: Node, ctx: _Context) -> str:
    value = _path(node, ctx)
    length = len(os.fsencode(value))
    if length > MAX_SOCKET_PATH:
        raise _Invalid(
            f"socket path {value} is {length} bytes long, but AF_UNIX socket paths "
            f"are limited to {MAX_SOCKET_PATH} bytes; choose a shorter path"
        )
    return value


_SIZE_RE = re.compile(r"(\d+)\s*(?:([KMGT])(iB)?|(B))?", re.IGNORECASE)
_FRACTION_RE = re.compile(r"[-+]?\d*\.\d*(?:e[-+]?\d+)?\s*[A-Za-z]*", re.IGNORECASE)
_DECIMAL_SUFFIX_RE = re.compile(r"\d+\s*([KMGT]B)", re.IGNORECASE)
_SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_HELP = "a positive size in bytes, optionally with a suffix K, M, G or T (or KiB, MiB, GiB, TiB)"
_MAX_SIZE = (1 << 63) - 1  # off_t


def parse_size(value: int | str) -> int:
    """Parse a size such as ``4096``, ``"64M"`` or ``"1 GiB"`` into bytes.

    Suffixes are 1024-based; floats, negative numbers and zero are rejected.
    Raises ValueError with a message meant for humans ("must be ..., got ...").
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be {_SIZE_HELP}, got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        text = value.strip()
        m = _SIZE_RE.fullmatch(text)
        if not m:
            if _FRACTION_RE.fullmatch(text) and any(c.isdigit() for c in text):
                raise ValueError(f"must be a whole number of bytes, got {value!r}; use a smaller unit, e.g. 1536M instead of 1.5G")
            d = _DECIMAL_SUFFIX_RE.fullmatch(text)
            if d:
                unit = d.group(1)[0].upper()
                raise ValueError(f"has the ambiguous suffix {d.group(1)!r}; write {unit} or {unit}iB (sizes are 1024-based)")
            raise ValueError(f"must be {_SIZE_HELP}, got {value!r}")
        number = int(m.group(1))
        if m.group(2):
            number *= _SIZE_UNITS[m.group(2).lower()]
    if number <= 0:
        raise ValueError(f"must be {_SIZE_HELP}, got {value!r}")
    if number > _MAX_SIZE:
        raise ValueError(f"is too large ({value!r}); the limit is 2**63-1 bytes")
    return number


def _size(multiple: int) -> Callable[[Node, _Context], int]:
    def parse(node: Node, ctx: _Context) -> int:
        if _is(node, "int"):
            raw: int | str = _constructor.construct_yaml_int(node)
        elif _is(node, "str"):
            raw = node.value
        elif _is(node, "float"):
            raise _Invalid(f"must be a whole number of bytes, got {node.value}")
        else:
            raise _Invalid(f"must be {_SIZE_HELP}, got {_describe(node)}")
        try:
            value = parse_size(raw)
        except ValueError as e:
            raise _Invalid(str(e)) from None
        if value % multiple:
            raise _Invalid(f"must be a multiple of {multiple} bytes, got {_describe(node)} ({value} bytes)")
        return value

    return parse


def _serial(node: Node, ctx: _Context) -> str:
    what = f"a string of at most {MAX_SERIAL} printable ASCII characters"
    value = _string(node, what)
    if not value:
        raise _Invalid(f"must be {what}, got an empty string; leave 'serial' out to use the device name")
    if not all(" " <= c <= "~" for c in value):
        raise _Invalid(f"must be {what}, got {_describe(node)}")
    if len(value) > MAX_SERIAL:
        raise _Invalid(f"must be {what}, got {_describe(node)} ({len(value)} characters)")
    return value


_MODE_RE = re.compile(r"(?:0o?)?([0-7]{1,4})", re.IGNORECASE)


def _account(kind: str, lookup: Callable[[str], int]) -> Callable[[Node, _Context], int]:
    """A user or group: a name (looked up now, so a typo is a config error) or a number."""

    def parse(node: Node, ctx: _Context) -> int:
        if _is(node, "int"):
            return _int_range(0, 2**32 - 2)(node, ctx)
        name = _string(node, f"a {kind} name or a numeric {kind[0]}id")
        try:
            return lookup(name)
        except KeyError:
            raise _Invalid(f"no {kind} named {name!r} on this system") from None

    return parse


_user = _account("user", lambda name: pwd.getpwnam(name).pw_uid)
_group = _account("group", lambda name: grp.getgrnam(name).gr_gid)


def _id_list(one: Callable[[Node, _Context], int], what: str) -> Callable[[Node, _Context], tuple[int, ...]]:
    def parse(node: Node, ctx: _Context) -> tuple[int, ...]:
        if not isinstance(node, SequenceNode):
            raise _Invalid(f"must be a list of {what}, e.g. [qemu, 107], got {_describe(node)}")
        return tuple(one(item, ctx) for item in node.value)

    return parse


_ADDRESS_RE = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})")


def _address(node: Node, ctx: _Context) -> tuple[str, int]:
    """host:port or [v6-address]:port, e.g. 127.0.0.1:9110."""
    what = "an address like 127.0.0.1:9110 or [::1]:9110"
    m = _ADDRESS_RE.fullmatch(_string(node, what).strip())
    if not m or not 1 <= int(m.group(3)) <= 65535:
        raise _Invalid(f"must be {what}, got {_describe(node)}")
    return (m.group(1) or m.group(2), int(m.group(3)))


def _mode(node: Node, ctx: _Context) -> int:
    """A file mode, always read as octal like chmod: 0660, "0660", 660, 0o660."""
    what = "an octal file mode from 0000 to 0777, like 0660"
    if not (_is(node, "int") or _is(node, "str")):
        raise _Invalid(f"must be {what}, got {_describe(node)}")
    m = _MODE_RE.fullmatch(node.value.strip())
    if not m or int(m.group(1), 8) > 0o777:
        raise _Invalid(f"must be {what}, got {_describe(node)}")
    return int(m.group(1), 8)


# --------------------------------------------------------------------------
# Key tables
# --------------------------------------------------------------------------


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Key:
    """One key a config section accepts."""

    parse: Callable[[Node, "_Context"], Any]
    default: Any = REQUIRED
    help: str = ""  # what the key is for; used in 'missing key' messages


@dataclass(frozen=True)
class DeviceType:
    """Everything load_config needs to know about one ``type:`` of device."""

    cls: type
    keys: dict[str, Key]  # type-specific keys, on top of _COMMON_DEVICE_KEYS
    #: Called once all keys are read; fills derived defaults into
    #: ``draft.values`` and reports cross-key problems with ``draft.report``.
    finish: Callable[["_DeviceDraft", "_Context"], None] | None = None
    #: Called only with check_files=True, to look at the files on disk.
    check_files: Callable[["_DeviceDraft", "_Context"], None] | None = None
    #: Keys naming disk images that two writable devices must not share.
    image_keys: tuple[str, ...] = ()


_DAEMON_KEYS: dict[str, Key] = {
    "workers": Key(_int_range(0, MAX_WORKERS), 0),
    "log_level": Key(_choice(LOG_LEVELS), "info"),
    "log_format": Key(_choice(LOG_FORMATS), "auto"),
    "control_socket": Key(_socket_path, None),
    "user": Key(_user, None),
    "group": Key(_group, None),
    "metrics": Key(_address, None),
}

# "type" is handled before the table (it selects the table), but it is listed
# so that it counts as a known key.
_COMMON_DEVICE_KEYS: dict[str, Key] = {
    "name": Key(_name, help="a unique device name"),
    "type": Key(lambda node, ctx: node.value, help="the device type, e.g. 'blk'"),
    "socket": Key(_socket_path, help="the vhost-user socket path vhostd listens on"),
    "socket_mode": Key(_mode, None),
    "socket_owner": Key(_user, None),
    "socket_group": Key(_group, None),
    "allow_uids": Key(_id_list(_user, "user names or uids"), None),
    "allow_gids": Key(_id_list(_group, "group names or gids"), None),
}

def _blk_backend(node: Node, ctx: _Context) -> str:
    # YAML reads a bare `null` as "no value"; here it names the null backend.
    if _is(node, "null") and node.value.lower() == "null":
        return "null"
    return _choice(BLK_BACKENDS)(node, ctx)


_BLK_KEYS: dict[str, Key] = {
    "backend": Key(_blk_backend, "file"),
    # Required with backend file; _finish_blk says so.
    "path": Key(_path, None, help="the disk image: a regular file or a block device"),
    "readonly": Key(_bool, False),
    "queues": Key(_int_range(1, MAX_QUEUES), 1),
    "queue_size": Key(_power_of_two(2, MAX_QUEUE_SIZE), 256),
    "size": Key(_size(SECTOR), None),
    "serial": Key(_serial, None),
    "discard": Key(_bool, True),
    "write_zeroes": Key(_bool, True),
    "direct": Key(_bool, False),
    "aio": Key(_choice(BLK_AIO), "auto"),
    "poll_us": Key(_int_range(0, MAX_POLL_US), 0),
}


_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")


def _ifname(node: Node, ctx: "_Context") -> str:
    value = _string(node, "an interface name")
    if not _IFNAME_RE.fullmatch(value):
        raise _Invalid(f"must be an interface name of 1 to 15 characters from A-Z a-z 0-9 _ . -, got {value!r}")
    return value


def _mac(node: Node, ctx: "_Context") -> str:
    value = _string(node, "a MAC address")
    if not _MAC_RE.fullmatch(value):
        raise _Invalid(f"must be a MAC address like 52:54:00:12:34:56, got {value!r}")
    if int(value[:2], 16) & 1:
        raise _Invalid(f"{value} is a multicast address; a NIC needs a unicast MAC")
    if value == "00:00:00:00:00:00":
        raise _Invalid("00:00:00:00:00:00 is not a usable MAC address")
    return value.lower()


_NET_KEYS: dict[str, Key] = {
    "backend": Key(_choice(NET_BACKENDS), help=f"where frames go: {', '.join(NET_BACKENDS)}"),
    "tap": Key(_ifname, None),
    "switch": Key(_name, None),
    "mac": Key(_mac, None),
    "mtu": Key(_int_range(68, 65535), 1500),
    "queues": Key(_int_range(1, MAX_QUEUE_PAIRS), 1),
    "queue_size": Key(_power_of_two(2, MAX_QUEUE_SIZE), 256),
    "offloads": Key(_bool, True),
}


def default_mac(name: str) -> str:
    """A stable locally administered unicast MAC derived from the device name."""
    import hashlib

    digest = hashlib.sha256(name.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x52, 0x54, 0x00) + tuple(digest[:3]))


# --------------------------------------------------------------------------
# Load context and helpers
# --------------------------------------------------------------------------


class _Context:
    def __init__(self, file: str, base_dir: str, check_files: bool):
        self.file = file
        self.base_dir = base_dir
        self.check_files = check_files
        self.problems: list[Problem] = []

    def report(self, node: Node | int | None, key: str, message: str) -> None:
        line = node if node is None or isinstance(node, int) else node.start_mark.line + 1
        self.problems.append(Problem(self.file, line, key, message))

    def resolve(self, value: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))


@dataclass
class _DeviceDraft:
    """A device while it is being validated."""

    index: int
    node: MappingNode
    type: DeviceType | None = None
    values: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)  # value node of each key present
    bad: set[str] = field(default_factory=set)  # keys present but invalid

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def key(self, name: str) -> str:
        return f"devices[{self.index}].{name}"

    @property
    def label(self) -> str:
        """' (device 'disk0')' when the name is known, for message suffixes."""
        name = self.values.get("name")
        return f" (device {name!r})" if name else ""

    def report(self, ctx: _Context, key: str, message: str, node: Node | int | None = None) -> None:
        """Report a problem with ``key``, on the line of its value by default."""
        if node is None:
            node = self.nodes.get(key, self.node)
        ctx.report(node, self.key(key), message + self.label)

    def ok(self, *keys: str) -> bool:
        """True when none of ``keys`` failed validation."""
        return not any(k in self.bad for k in keys)


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _mapping_items(node: MappingNode, ctx: _Context, path: str) -> dict[str, tuple[Node, Node]]:
    """The keys of a mapping as {name: (key node, value node)}, in file order.

    Reports duplicate and non-string keys.  Supports YAML merge keys
    (``<<: *defaults``): merged keys are overridden by ones written out.
    """
    items: dict[str, tuple[Node, Node]] = {}
    merged: dict[str, tuple[Node, Node]] = {}

    def merge_from(value: Node, seen: set[int]) -> None:
        sources = value.value if isinstance(value, SequenceNode) else [value]
        for src in sources:
            if not isinstance(src, MappingNode):
                ctx.report(src, path, f"'<<' can only merge mappings, got {_describe(src)}")
                continue
            if id(src) in seen:
                continue
            seen.add(id(src))
            for k, v in src.value:
                if k.tag == _TAG + "merge":
                    merge_from(v, seen)
                elif isinstance(k, ScalarNode):
                    merged.setdefault(k.value, (k, v))

    for key_node, value_node in node.value:
        if key_node.tag == _TAG + "merge":
            merge_from(value_node, {id(node)})
            continue
        if not isinstance(key_node, ScalarNode) or key_node.tag == _TAG + "null":
            ctx.report(key_node, path, f"keys must be names, got {_describe(key_node)}")
            continue
        name = key_node.value
        if name in items:
            first = items[name][0].start_mark.line + 1
            ctx.report(key_node, _join(path, name), f"duplicate key {name!r} (first given at line {first})")
            continue
        items[name] = (key_node, value_node)
    for name, pair in merged.items():
        items.setdefault(name, pair)
    return items


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key(ctx: _Context, key_node: Node, path: str, name: str, known: Any, suffix: str = "") -> None:
    ctx.report(key_node, _join(path, name), f"unknown key {name!r}{_did_you_mean(name, known)}{suffix}")


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


def _parse_daemon(node: Node | None, ctx: _Context) -> DaemonConfig:
    if node is None or _is(node, "null"):
        return DaemonConfig()
    if not isinstance(node, MappingNode):
        ctx.report(node, "daemon", f"must be a mapping of daemon settings, got {_describe(node)}")
        return DaemonConfig()
    values = {}
    for name, (key_node, value_node) in _mapping_items(node, ctx, "daemon").items():
        spec = _DAEMON_KEYS.get(name)
        if spec is None:
            _unknown_key(ctx, key_node, "daemon", name, _DAEMON_KEYS)
            continue
        try:
            values[name] = spec.parse(value_node, ctx)
        except _Invalid as e:
            ctx.report(_value_line(key_node, value_node), f"daemon.{name}", str(e))
    return DaemonConfig(**values)


def _value_line(key_node: Node, value_node: Node) -> int:
    """Line to blame for a bad value: the value's own, or the key's if empty."""
    if _is(value_node, "null") and value_node.value == "":
        return key_node.start_mark.line + 1
    return value_node.start_mark.line + 1


def _parse_device(index: int, node: Node, ctx: _Context) -> _DeviceDraft | None:
    path = f"devices[{index}]"
    if not isinstance(node, MappingNode):
        ctx.report(node, path, f"each device must be a mapping of keys (name, type, socket, ...), got {_describe(node)}")
        return None
    dev = _DeviceDraft(index, node)
    items = _mapping_items(node, ctx, path)
    for name, (key_node, value_node) in items.items():
        dev.nodes[name] = value_node

    # The name first, so that later messages can mention it.
    if "name" in items:
        _parse_key(dev, "name", items["name"], _COMMON_DEVICE_KEYS["name"], ctx)

    # The type selects the key table.
    if "type" in items:
        key_node, type_node = items["type"]
        type_name = type_node.value if _is(type_node, "str") else None
        if type_name in DEVICE_TYPES:
            dev.type = DEVICE_TYPES[type_name]
            dev.values["type"] = type_name
        else:
            dev.bad.add("type")
            suggestion = _did_you_mean(type_name, DEVICE_TYPES) if type_name else ""
            dev.report(
                ctx,
                "type",
                f"unknown device type {_describe(type_node)}{suggestion}; supported types: {', '.join(DEVICE_TYPES)}",
                node=type_node if type_node.value else key_node,
            )

    known = dict(_COMMON_DEVICE_KEYS)
    if dev.type is not None:
        known.update(dev.type.keys)
    for name, (key_node, value_node) in items.items():
        if name in ("name", "type"):
            continue
        spec = known.get(name)
        if spec is not None:
            _parse_key(dev, name, (key_node, value_node), spec, ctx)
        elif dev.type is not None:
            # Without a valid type we cannot tell which keys are unknown.
            _unknown_key(ctx, key_node, path, name, known, dev.label)

    # Without a valid type only the common keys can be known to be missing.
    for name, spec in known.items():
        if name in items:
            continue
        if spec.default is REQUIRED:
            dev.bad.add(name)
            dev.report(ctx, name, f"missing required key {name!r} ({spec.help})", node=node)
        else:
            dev.values[name] = spec.default

    if dev.type is not None and dev.type.finish is not None:
        dev.type.finish(dev, ctx)
    return dev


def _parse_key(dev: _DeviceDraft, name: str, pair: tuple[Node, Node], spec: Key, ctx: _Context) -> None:
    key_node, value_node = pair
    try:
        dev.values[name] = spec.parse(value_node, ctx)
    except _Invalid as e:
        dev.bad.add(name)
        dev.report(ctx, name, str(e), node=_value_line(key_node, value_node))


def _finish_blk(dev: _DeviceDraft, ctx: _Context) -> None:
    backend = dev.values.get("backend")
    if dev.ok("backend") and backend is not None:
        path_given = dev.values.get("path") is not None or "path" in dev.bad
        if backend == "file" and not path_given:
            dev.bad.add("path")
            dev.report(ctx, "path", f"missing required key 'path' ({_BLK_KEYS['path'].help})", node=dev.node)
        elif backend == "null":
            if path_given:
                dev.report(ctx, "path", "'path' only applies to backend file; a null disk has no image")
            if dev.values.get("direct") is True:
                dev.report(ctx, "direct", "'direct' only applies to backend file; a null disk has no image")
            if "aio" in dev.nodes:
                dev.report(ctx, "aio", "'aio' only applies to backend file; a null disk does no I/O")
            if dev.values.get("size") is None and "size" not in dev.bad:
                dev.report(ctx, "size", "missing key 'size' (backend null needs it: the disk's capacity)",
                           node=dev.nodes.get("backend"))
    if dev.values.get("serial") is None and "name" in dev.values:
        dev.values["serial"] = dev.values["name"][:MAX_SERIAL]


def _check_blk_files(dev: _DeviceDraft, ctx: _Context) -> None:
    if not dev.ok("path") or dev.values.get("path") is None:
        return
    path = dev.values["path"]
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        dev.report(ctx, "path", f"cannot access image {path}: {e.strerror}")
        return
    if st is None:
        if "size" in dev.bad:
            return
        if dev.values.get("size") is None:
            dev.report(ctx, "path", f"image {path} does not exist; create it, or set 'size' to have vhostd create it")
            return
        why = _why_not_creatable(path)
        if why:
            dev.report(ctx, "path", f"image {path} does not exist and cannot be created: {why}")
        return
    if stat.S_ISDIR(st.st_mode):
        dev.report(ctx, "path", f"image {path} is a directory; expected a regular file or a block device")
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        dev.report(ctx, "path", f"image {path} is not a regular file or a block device")
        return
    if not os.access(path, os.R_OK):
        dev.report(ctx, "path", f"image {path} is not readable")
    elif dev.values.get("readonly") is False and dev.ok("readonly") and not os.access(path, os.W_OK):
        dev.report(ctx, "path", f"image {path} is not writable; fix its permissions or set 'readonly: true'")
    if stat.S_ISREG(st.st_mode) and st.st_size % SECTOR:
        dev.report(ctx, "path", f"image {path} is {st.st_size} bytes long, which is not a multiple of {SECTOR}")


def _why_not_creatable(path: str) -> str | None:
    """Why ``path`` could not be created (with its missing parent directories), or None."""
    parent = os.path.dirname(path)
    while True:
        try:
            st = os.stat(parent)
        except (FileNotFoundError, NotADirectoryError):
            up = os.path.dirname(parent)
            if up == parent:
                return f"no part of {parent} exists"
            parent = up
            continue
        except OSError as e:
            return f"cannot access {parent}: {e.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{parent} is not a directory"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"directory {parent} is not writable"
        return None


def _check_socket_file(dev: _DeviceDraft, ctx: _Context) -> None:
    if not dev.ok("socket") or "socket" not in dev.values:
        return
    sock = dev.values["socket"]
    try:
        st = os.lstat(sock)
    except (FileNotFoundError, NotADirectoryError):
        why = _why_not_creatable(sock)
        if why:
            dev.report(ctx, "socket", f"cannot create socket {sock}: {why}")
        return
    except OSError as e:
        dev.report(ctx, "socket", f"cannot access socket path {sock}: {e.strerror}")
        return
    if not stat.S_ISSOCK(st.st_mode):
        dev.report(ctx, "socket", f"{sock} already exists and is not a socket; vhostd will not replace it")


def _finish_net(dev: _DeviceDraft, ctx: _Context) -> None:
    backend = dev.values.get("backend")
    if backend is not None and dev.ok("backend"):
        for key in ("tap", "switch"):
            given = dev.values.get(key) is not None or key in dev.bad
            if backend == key and not given:
                dev.report(ctx, key, f"missing key '{key}' (backend {key} needs it)", node=dev.nodes.get("backend"))
            elif backend != key and given:
                dev.report(ctx, key, f"'{key}' only applies to backend {key}, not {backend}")
    if dev.values.get("mac") is None and "mac" not in dev.bad and "name" in dev.values:
        dev.values["mac"] = default_mac(dev.values["name"])


# Adding a device type, e.g. virtio-net: a frozen NetDeviceConfig dataclass, a
# _NET_KEYS table ({"mac": Key(_mac, None), ...}), an entry here, and
# NetDeviceConfig in the DeviceConfig alias.  Unknown-key detection,
# missing-key reports, defaults and the cross-device checks come for free.
DEVICE_TYPES: dict[str, DeviceType] = {
    "blk": DeviceType(
        cls=BlkDeviceConfig,
        keys=_BLK_KEYS,
        finish=_finish_blk,
        check_files=_check_blk_files,
        image_keys=("path",),
    ),
    "net": DeviceType(cls=NetDeviceConfig, keys=_NET_KEYS, finish=_finish_net),
}


def _check_across_devices(devs: list[_DeviceDraft], ctx: _Context) -> None:
    names: dict[str, _DeviceDraft] = {}
    sockets: dict[str, _DeviceDraft] = {}
    images: dict[str, list[tuple[_DeviceDraft, str]]] = {}
    writers: dict[str, _DeviceDraft] = {}

    def who(d: _DeviceDraft) -> str:
        name = d.values.get("name")
        return f"device {name!r} (line {d.line})" if name else f"devices[{d.index}] (line {d.line})"

    for d in devs:
        if d.type is None:
            continue
        for key in d.type.image_keys:
            if d.ok(key) and d.values.get(key) is not None:
                images.setdefault(os.path.realpath(d.values[key]), []).append((d, key))

    for d in devs:
        name = d.values.get("name")
        if name is not None and d.ok("name"):
            if name in names:
                ctx.report(d.nodes["name"], d.key("name"), f"duplicate device name {name!r}; already used by {who(names[name])}")
            else:
                names[name] = d

        sock = d.values.get("socket")
        if sock is not None and d.ok("socket"):
            real = os.path.realpath(sock)
            if real in sockets:
                ctx.report(d.nodes["socket"], d.key("socket"), f"socket {sock} is already used by {who(sockets[real])}")
            else:
                sockets[real] = d
            for other, _key in images.get(real, ()):
                owner = "this device" if other is d else who(other)
                ctx.report(d.nodes["socket"], d.key("socket"), f"socket {sock} is also the image path of {owner}")

        if d.type is None or d.values.get("readonly", False) is not False or not d.ok("readonly"):
            continue
        for key in d.type.image_keys:
            if not d.ok(key) or d.values.get(key) is None:
                continue
            real = os.path.realpath(d.values[key])
            if real in writers:
                ctx.report(
                    d.nodes[key],
                    d.key(key),
                    f"image {d.values[key]} is also used by writable {who(writers[real])}; "
                    "two writable devices would corrupt it, so set 'readonly: true' on one of them",
                )
            else:
                writers[real] = d


# --------------------------------------------------------------------------
# VMs (the built-in VMM, vhostd/vmm)
# --------------------------------------------------------------------------


def _vm_memory(node: Node, ctx: _Context) -> int:
    value = _size(1)(node, ctx)
    if value % VM_MEMORY_ALIGN:
        raise _Invalid(f"must be a multiple of {VM_MEMORY_ALIGN >> 20}M (the guest is mapped with 2 MiB pages), "
                       f"got {_describe(node)}")
    if not MIN_VM_MEMORY <= value <= MAX_VM_MEMORY:
        raise _Invalid(f"must be from {MIN_VM_MEMORY >> 20}M to {MAX_VM_MEMORY >> 30}G, got {_describe(node)}")
    return value


def _text(limit: int | None, what: str) -> Callable[[Node, _Context], str]:
    def parse(node: Node, ctx: _Context) -> str:
        if _is(node, "null"):
            return ""
        if not isinstance(node, ScalarNode):
            raise _Invalid(f"must be {what}, got {_describe(node)}")
        value = node.value  # numbers and booleans are fine as text here
        if "\0" in value:
            raise _Invalid("must not contain a NUL character")
        if limit is not None and len(value.encode()) > limit:
            raise _Invalid(f"must be at most {limit} bytes, got {len(value.encode())}")
        return value

    return parse


_VM_KEYS: dict[str, Key] = {
    "name": Key(_name, help="a unique VM name"),
    "memory": Key(_vm_memory, help="the guest RAM size, e.g. 256M"),
    "vcpus": Key(_int_range(1, MAX_VCPUS), 1),
    "payload": Key(_path, None),
    "kernel": Key(_path, None),
    "cmdline": Key(_text(None, "a kernel command line"), ""),
    "initrd": Key(_path, None),
    "args": Key(_text(MAX_VM_ARGS, "the payload's command line"), ""),
    "autostart": Key(_bool, False),
}
#: Keys of a VM besides _VM_KEYS (parsed on their own).
_VM_SPECIAL_KEYS = ("devices",)

_VM_DEVICE_KEYS: dict[str, Key] = {
    "type": Key(_choice(VM_DEVICE_TYPES), help=f"the virtio device type: {', '.join(VM_DEVICE_TYPES)}"),
    "socket": Key(_socket_path, help="the vhost-user socket of the back-end"),
    "queue_size": Key(_power_of_two(2, MAX_QUEUE_SIZE), None),
}


@dataclass
class _VmDraft(_DeviceDraft):
    devices: list["_VmDeviceDraft"] = field(default_factory=list)

    def key(self, name: str) -> str:
        return f"vms[{self.index}].{name}"

    @property
    def label(self) -> str:
        name = self.values.get("name")
        return f" (VM {name!r})" if name else ""


@dataclass
class _VmDeviceDraft(_DeviceDraft):
    vm: _VmDraft | None = None

    def key(self, name: str) -> str:
        return f"vms[{self.vm.index}].devices[{self.index}].{name}"

    @property
    def label(self) -> str:
        return self.vm.label


def _parse_keys(draft: _DeviceDraft, items: dict[str, tuple[Node, Node]], table: dict[str, Key], path: str,
                ctx: _Context, skip: tuple[str, ...] = ()) -> None:
    """Parse every key of `items` with `table`, report unknown and missing
    keys, fill in defaults."""
    for name, (key_node, value_node) in items.items():
        if name in skip or name in draft.values or name in draft.bad:
            continue
        spec = table.get(name)
        if spec is None:
            _unknown_key(ctx, key_node, path, name, [*table, *skip], draft.label)
        else:
            _parse_key(draft, name, (key_node, value_node), spec, ctx)
    for name, spec in table.items():
        if name in items:
            continue
        if spec.default is REQUIRED:
            draft.bad.add(name)
            draft.report(ctx, name, f"missing required key {name!r} ({spec.help})", node=draft.node)
        else:
            draft.values[name] = spec.default


def _parse_vm(index: int, node: Node, ctx: _Context) -> _VmDraft | None:
    path = f"vms[{index}]"
    if not isinstance(node, MappingNode):
        ctx.report(node, path, f"each VM must be a mapping of keys (name, memory, payload, ...), got {_describe(node)}")
        return None
    vm = _VmDraft(index, node)
    items = _mapping_items(node, ctx, path)
    for name, (_key_node, value_node) in items.items():
        vm.nodes[name] = value_node
    if "name" in items:  # first, so that later messages can mention it
        _parse_key(vm, "name", items["name"], _VM_KEYS["name"], ctx)
    _parse_keys(vm, items, _VM_KEYS, path, ctx, skip=_VM_SPECIAL_KEYS)
    if "devices" in items:
        vm.devices = _parse_vm_devices(vm, *items["devices"], ctx)
    _finish_vm(vm, ctx)
    return vm


def _parse_vm_devices(vm: _VmDraft, key_node: Node, seq: Node, ctx: _Context) -> list[_VmDeviceDraft]:
    if _is(seq, "null"):
        return []
    if not isinstance(seq, SequenceNode):
        vm.bad.add("devices")
        vm.report(ctx, "devices", f"must be a list of devices (each like '- {{type: blk, socket: PATH}}'), "
                  f"got {_describe(seq)}", node=_value_line(key_node, seq))
        return []
    if len(seq.value) > MAX_VM_DEVICES:
        vm.report(ctx, "devices", f"a VM has room for at most {MAX_VM_DEVICES} devices, got {len(seq.value)}")
    out = []
    for j, node in enumerate(seq.value):
        path = f"{vm.key('devices')}[{j}]"
        if not isinstance(node, MappingNode):
            ctx.report(node, path, f"each device must be a mapping with 'type' and 'socket', got {_describe(node)}"
                       + vm.label)
            continue
        dev = _VmDeviceDraft(j, node, vm=vm)
        items = _mapping_items(node, ctx, path)
        for name, (_key_node, value_node) in items.items():
            dev.nodes[name] = value_node
        _parse_keys(dev, items, _VM_DEVICE_KEYS, path, ctx)
        out.append(dev)
    return out


def _finish_vm(vm: _VmDraft, ctx: _Context) -> None:
    v = vm.values
    payload, kernel = v.get("payload"), v.get("kernel")
    if payload is None and kernel is None and not vm.bad & {"payload", "kernel"}:
        vm.report(ctx, "payload", "missing key 'payload' (the guest program, an ELF file) or 'kernel' (a Linux bzImage)",
                  node=vm.node)
    elif payload is not None and kernel is not None:
        vm.report(ctx, "kernel", "'payload' and 'kernel' exclude each other; give one of them")
    if kernel is None and "kernel" not in vm.bad:
        for key in ("cmdline", "initrd"):
            if key in vm.nodes and v.get(key) not in (None, ""):
                vm.report(ctx, key, f"'{key}' only applies with 'kernel'; a payload takes 'args'")
    if payload is None and "payload" not in vm.bad and v.get("args"):
        vm.report(ctx, "args", "'args' only applies with 'payload'; a kernel takes 'cmdline'")


def _check_vm_files(vm: _VmDraft, ctx: _Context) -> None:
    for key, what in (("payload", "payload"), ("kernel", "kernel"), ("initrd", "initrd")):
        path = vm.values.get(key)
        if path is None or not vm.ok(key):
            continue
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            vm.report(ctx, key, f"{what} {path} does not exist")
            continue
        except OSError as e:
            vm.report(ctx, key, f"cannot access {what} {path}: {e.strerror}")
            continue
        if not stat.S_ISREG(st.st_mode):
            vm.report(ctx, key, f"{what} {path} is not a regular file")
        elif not os.access(path, os.R_OK):
            vm.report(ctx, key, f"{what} {path} is not readable")


def _check_across_vms(vms: list[_VmDraft], devs: list[_DeviceDraft], ctx: _Context) -> None:
    names: dict[str, _VmDraft] = {}
    for vm in vms:
        name = vm.values.get("name")
        if name is None or not vm.ok("name"):
            continue
        if name in names:
            ctx.report(vm.nodes["name"], vm.key("name"),
                       f"duplicate VM name {name!r}; already used by the VM on line {names[name].line}")
        else:
            names[name] = vm
    # A VM device on the socket of a vhostd device of this file offers that
    # device's queue size by default.
    queue_sizes = {}
    for d in devs:
        if d.ok("socket") and "socket" in d.values and "queue_size" in d.values:
            queue_sizes[os.path.realpath(d.values["socket"])] = d.values["queue_size"]
    for vm in vms:
        for dev in vm.devices:
            if dev.values.get("queue_size") is None:
                sock = dev.values.get("socket")
                dev.values["queue_size"] = (queue_sizes.get(os.path.realpath(sock), DEFAULT_VM_QUEUE_SIZE)
                                            if sock else DEFAULT_VM_QUEUE_SIZE)


def _parse_vms(key_node: Node, seq: Node, ctx: _Context) -> list[_VmDraft]:
    if _is(seq, "null"):
        return []
    if not isinstance(seq, SequenceNode):
        ctx.report(_value_line(key_node, seq), "vms",
                   f"must be a list of VMs (each starting with '- name: ...'), got {_describe(seq)}")
        return []
    return [vm for i, node in enumerate(seq.value) if (vm := _parse_vm(i, node, ctx)) is not None]


def _build_vm(vm: _VmDraft) -> VmConfig:
    devices = tuple(VmDeviceConfig(**d.values, line=d.line) for d in vm.devices)
    return VmConfig(**vm.values, devices=devices, line=vm.line)


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def load_config(path: str | os.PathLike, *, check_files: bool = True) -> Config:
    """Read, parse and validate the config file at ``path``.

    Relative ``socket`` and ``path`` values (and a VM's ``payload``,
    ``kernel`` and ``initrd``) are resolved against the directory
    holding the config file.  With ``check_files`` the image files and socket
    directories are looked at on disk as well.  Raises ConfigError listing all
    problems found.
    """
    file = os.fspath(path)
    if isinstance(file, bytes):
        file = os.fsdecode(file)
    abs_file = os.path.abspath(file)
    ctx = _Context(file, os.path.dirname(abs_file), check_files)

    root = _compose(file, ctx)
    if root is None:
        raise ConfigError(ctx.problems)

    if not isinstance(root, MappingNode):
        ctx.report(root, "", f"the top level must be a mapping with 'daemon' and 'devices' keys, got {_describe(root)}")
        raise ConfigError(ctx.problems)

    items = _mapping_items(root, ctx, "")
    for name, (key_node, _value) in items.items():
        if name not in ("daemon", "devices", "vms"):
            _unknown_key(ctx, key_node, "", name, ("daemon", "devices", "vms"))

    daemon = _parse_daemon(items["daemon"][1] if "daemon" in items else None, ctx)

    # VMs first: a file with VMs may leave out the devices (the VMs can use
    # back-ends that are not vhostd's).
    vms = _parse_vms(*items["vms"], ctx) if "vms" in items else []
    has_vms = "vms" in items and isinstance(items["vms"][1], SequenceNode) and bool(items["vms"][1].value)

    drafts: list[_DeviceDraft] = []
    if "devices" not in items:
        if not has_vms:
            ctx.report(root, "devices", "missing required key 'devices' (the list of devices to serve)")
    else:
        key_node, seq = items["devices"]
        if has_vms and (_is(seq, "null") or isinstance(seq, SequenceNode) and not seq.value):
            pass
        elif not isinstance(seq, SequenceNode):
            ctx.report(
                _value_line(key_node, seq),
                "devices",
                f"must be a list of devices (each starting with '- name: ...'), got {_describe(seq)}",
            )
        elif not seq.value:
            ctx.report(seq, "devices", "must list at least one device")
        else:
            for i, dev_node in enumerate(seq.value):
                dev = _parse_device(i, dev_node, ctx)
                if dev is not None:
                    drafts.append(dev)

    _check_across_devices(drafts, ctx)
    _check_across_vms(vms, drafts, ctx)
    if check_files:
        for dev in drafts:
            _check_socket_file(dev, ctx)
            if dev.type is not None and dev.type.check_files is not None:
                dev.type.check_files(dev, ctx)
        for vm in vms:
            _check_vm_files(vm, ctx)

    if ctx.problems:
        ctx.problems.sort(key=lambda p: p.line or 0)
        raise ConfigError(ctx.problems)

    devices = tuple(d.type.cls(**d.values, line=d.line) for d in drafts if d.type is not None)
    return Config(path=abs_file, daemon=daemon, devices=devices, vms=tuple(_build_vm(vm) for vm in vms))


def _compose(file: str, ctx: _Context) -> Node | None:
    """Parse the file into a YAML node tree, or report why not and return None."""
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        ctx.report(None, "", f"cannot read config file: {e.strerror}")
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        ctx.report(data[: e.start].count(b"\n") + 1, "", "the file is not valid UTF-8")
        return None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        message = f"invalid YAML: {e.problem or e.context}"
        if e.problem and e.context:
            message += f" ({e.context}"
            if e.context_mark is not None:
                message += f" started at line {e.context_mark.line + 1}"
            message += ")"
        ctx.report(mark.line + 1 if mark else None, "", message)
        return None
    except yaml.reader.ReaderError as e:
        char = ord(e.character) if isinstance(e.character, str) else e.character
        ctx.report(text[: e.position].count("\n") + 1, "", f"invalid YAML: unacceptable character #x{char:04x} ({e.reason})")
        return None
    except yaml.YAMLError as e:  # anything else PyYAML may raise
        ctx.report(None, "", f"invalid YAML: {e}")
        return None
    if root is None or _is(root, "null") and root.value == "":
        ctx.report(None, "", "the file is empty; expected a mapping with a 'devices' list")
        return None
    return root
