"""Loading and validating the vhostd YAML configuration file.

The entry point is :func:`load_config`.  It either returns a fully validated,
immutable :class:`Config` or raises :class:`ConfigError` listing *every*
problem it found, each with the file, the 1-based line and the dotted key
path (``devices[1].queues``) it concerns::

    config/vhostd.yaml:7: devices[0].queues: must be an integer from 1 to 64, got 'two' (device 'disk0')

The file is parsed with ``yaml.compose`` so that every value keeps the line it
came from; values are then checked against small per-section key tables
(``_DAEMON_KEYS``, ``_COMMON_DEVICE_KEYS`` and ``DEVICE_TYPES[...]``) whose
parsers live in vhostd/configkeys.py.  Adding a device type means writing its
dataclass, its key table and (optionally) a check hook, and registering it in
``DEVICE_TYPES``.  A blk device's ``backend`` selects more keys: those of its
store, which live with the code that opens it (vhostd/storage).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, TypeAlias

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from vhostd import storage
from vhostd import configkeys as v
from vhostd.configkeys import MAX_SERIAL, REQUIRED, Key, Problem, parse_size

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

MAX_QUEUES = 64
MAX_QUEUE_SIZE = 1024
MAX_WORKERS = 1024


# --------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------


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
    web: tuple[str, int] | None = None  # (host, port) of the web console (vhostd.web); None = off
    web_token_file: str | None = None  # holds the token the console's actions need; None = read-only


LOG_FORMATS = ("auto", "journal", "text")


@dataclass(frozen=True, kw_only=True)
class BlkDeviceConfig:
    name: str
    type: Literal["blk"] = "blk"
    socket: str  # absolute path of the vhost-user socket vhostd listens on
    backend: str = "file"  # one of BLK_BACKENDS: where the data lives
    store: Any  # that backend's settings: vhostd.storage.<backend>.Settings
    readonly: bool = False
    queues: int = 1
    queue_size: int = 256  # largest ring size offered; power of two
    serial: str | None = None  # GET_ID string; load_config fills in the name
    discard: bool = True
    write_zeroes: bool = True
    poll_us: int = 0  # busy-poll window of a queue that ran empty, in microseconds (0 = off)
    socket_mode: int | None = None  # chmod() the socket to this, e.g. 0o660
    socket_owner: int | None = None  # chown() the socket to this uid
    socket_group: int | None = None  # ... and this gid
    allow_uids: tuple[int, ...] | None = None  # peers allowed by SO_PEERCRED uid (None = anyone)
    allow_gids: tuple[int, ...] | None = None  # ... or by gid
    line: int = field(default=0, compare=False)  # where the device starts in the YAML (0 = unknown)


#: Where a blk device's data lives; each has its module in vhostd/storage.
BLK_BACKENDS = tuple(storage.BACKENDS)
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
    poll_us: int = 0  # busy-poll window of a tx queue that ran empty, in microseconds (0 = off)
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
# or raises v.Invalid with a message that says what is accepted and what was
# found.  The caller adds file, line and key.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceType:
    """Everything load_config needs to know about one ``type:`` of device."""

    cls: type
    keys: dict[str, Key]  # type-specific keys, on top of _COMMON_DEVICE_KEYS
    #: Called once all keys are read; fills derived defaults into
    #: ``draft.values`` and reports cross-key problems with ``draft.report``.
    finish: Callable[[v.Draft, v.Context], None] | None = None
    #: A key whose value selects more keys (blk's ``backend``), and for each
    #: of its values the module with those keys (see vhostd/storage): their
    #: KEYS and Settings, optional finish and check_files, and identity.
    variant_key: str | None = None
    variants: dict[str, Any] = field(default_factory=dict)


_DAEMON_KEYS: dict[str, Key] = {
    "workers": Key(v.int_range(0, MAX_WORKERS), 0),
    "log_level": Key(v.choice(LOG_LEVELS), "info"),
    "log_format": Key(v.choice(LOG_FORMATS), "auto"),
    "control_socket": Key(v.socket_path, None),
    "user": Key(v.user, None),
    "group": Key(v.group, None),
    "metrics": Key(v.address, None),
    "web": Key(v.address, None),
    "web_token_file": Key(v.path, None),
}

# "type" is handled before the table (it selects the table), but it is listed
# so that it counts as a known key.
_COMMON_DEVICE_KEYS: dict[str, Key] = {
    "name": Key(v.name, help="a unique device name"),
    "type": Key(lambda node, ctx: node.value, help="the device type, e.g. 'blk'"),
    "socket": Key(v.socket_path, help="the vhost-user socket path vhostd listens on"),
    "socket_mode": Key(v.mode, None),
    "socket_owner": Key(v.user, None),
    "socket_group": Key(v.group, None),
    "allow_uids": Key(v.id_list(v.user, "user names or uids"), None),
    "allow_gids": Key(v.id_list(v.group, "group names or gids"), None),
}

def _blk_backend(node: Node, ctx: v.Context) -> str:
    # YAML reads a bare `null` as "no value"; here it names the null backend.
    if v.is_kind(node, "null") and node.value.lower() == "null":
        return "null"
    return v.choice(BLK_BACKENDS)(node, ctx)


# The keys every blk device takes; each backend adds its own (vhostd/storage).
_BLK_KEYS: dict[str, Key] = {
    "backend": Key(_blk_backend, "file"),
    "readonly": Key(v.boolean, False),
    "queues": Key(v.int_range(1, MAX_QUEUES), 1),
    "queue_size": Key(v.power_of_two(2, MAX_QUEUE_SIZE), 256),
    "serial": Key(v.serial, None),
    "discard": Key(v.boolean, True),
    "write_zeroes": Key(v.boolean, True),
    "poll_us": Key(v.int_range(0, MAX_POLL_US), 0),
}


_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")


def _ifname(node: Node, ctx: "v.Context") -> str:
    value = v.string(node, "an interface name")
    if not _IFNAME_RE.fullmatch(value):
        raise v.Invalid(f"must be an interface name of 1 to 15 characters from A-Z a-z 0-9 _ . -, got {value!r}")
    return value


def _mac(node: Node, ctx: "v.Context") -> str:
    value = v.string(node, "a MAC address")
    if not _MAC_RE.fullmatch(value):
        raise v.Invalid(f"must be a MAC address like 52:54:00:12:34:56, got {value!r}")
    if int(value[:2], 16) & 1:
        raise v.Invalid(f"{value} is a multicast address; a NIC needs a unicast MAC")
    if value == "00:00:00:00:00:00":
        raise v.Invalid("00:00:00:00:00:00 is not a usable MAC address")
    return value.lower()


_NET_KEYS: dict[str, Key] = {
    "backend": Key(v.choice(NET_BACKENDS), help=f"where frames go: {', '.join(NET_BACKENDS)}"),
    "tap": Key(_ifname, None),
    "switch": Key(v.name, None),
    "mac": Key(_mac, None),
    "mtu": Key(v.int_range(68, 65535), 1500),
    "queues": Key(v.int_range(1, MAX_QUEUE_PAIRS), 1),
    "queue_size": Key(v.power_of_two(2, MAX_QUEUE_SIZE), 256),
    "offloads": Key(v.boolean, True),
    "poll_us": Key(v.int_range(0, MAX_POLL_US), 0),
}


def default_mac(name: str) -> str:
    """A stable locally administered unicast MAC derived from the device name."""
    import hashlib

    digest = hashlib.sha256(name.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x52, 0x54, 0x00) + tuple(digest[:3]))


# --------------------------------------------------------------------------
# Load context and helpers
# --------------------------------------------------------------------------


def _mapping_items(node: MappingNode, ctx: v.Context, path: str) -> dict[str, tuple[Node, Node]]:
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
                ctx.report(src, path, f"'<<' can only merge mappings, got {v.describe(src)}")
                continue
            if id(src) in seen:
                continue
            seen.add(id(src))
            for k, val in src.value:
                if k.tag == v.TAG + "merge":
                    merge_from(val, seen)
                elif isinstance(k, ScalarNode):
                    merged.setdefault(k.value, (k, val))

    for key_node, value_node in node.value:
        if key_node.tag == v.TAG + "merge":
            merge_from(value_node, {id(node)})
            continue
        if not isinstance(key_node, ScalarNode) or key_node.tag == v.TAG + "null":
            ctx.report(key_node, path, f"keys must be names, got {v.describe(key_node)}")
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


def _unknown_key(ctx: v.Context, key_node: Node, path: str, name: str, known: Any, suffix: str = "") -> None:
    ctx.report(key_node, _join(path, name), f"unknown key {name!r}{v.did_you_mean(name, known)}{suffix}")


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


def _parse_daemon(node: Node | None, ctx: v.Context) -> DaemonConfig:
    if node is None or v.is_kind(node, "null"):
        return DaemonConfig()
    if not isinstance(node, MappingNode):
        ctx.report(node, "daemon", f"must be a mapping of daemon settings, got {v.describe(node)}")
        return DaemonConfig()
    values = {}
    items = _mapping_items(node, ctx, "daemon")
    for name, (key_node, value_node) in items.items():
        spec = _DAEMON_KEYS.get(name)
        if spec is None:
            _unknown_key(ctx, key_node, "daemon", name, _DAEMON_KEYS)
            continue
        try:
            values[name] = spec.parse(value_node, ctx)
        except v.Invalid as e:
            ctx.report(v.value_line(key_node, value_node), f"daemon.{name}", str(e))
    _check_web(values, items, ctx)
    return DaemonConfig(**values)


def _check_web(values: dict, items: dict, ctx: v.Context) -> None:
    """The console's actions need a token; one the network can reach also
    needs it for reading (and a token file anyone else can read is no secret)."""
    web, token_file = values.get("web"), values.get("web_token_file")
    if web is not None and token_file is None and not v.is_loopback(web[0]):
        ctx.report(v.value_line(*items["web"]), "daemon.web",
                   f"{web[0]} is not a loopback address: a console others can reach needs daemon.web_token_file "
                   "(or listen on 127.0.0.1 / [::1])")
    if token_file is not None and ctx.check_files:
        problem = v.why_not_secret(token_file)
        if problem:
            ctx.report(v.value_line(*items["web_token_file"]), "daemon.web_token_file", problem)


def _parse_device(index: int, node: Node, ctx: v.Context) -> v.Draft | None:
    path = f"devices[{index}]"
    if not isinstance(node, MappingNode):
        ctx.report(node, path, f"each device must be a mapping of keys (name, type, socket, ...), got {v.describe(node)}")
        return None
    dev = v.Draft(index, node)
    items = _mapping_items(node, ctx, path)
    for name, (key_node, value_node) in items.items():
        dev.nodes[name] = value_node

    # The name first, so that later messages can mention it.
    if "name" in items:
        _parse_key(dev, "name", items["name"], _COMMON_DEVICE_KEYS["name"], ctx)

    # The type selects the key table.
    if "type" in items:
        key_node, type_node = items["type"]
        type_name = type_node.value if v.is_kind(type_node, "str") else None
        if type_name in DEVICE_TYPES:
            dev.type = DEVICE_TYPES[type_name]
            dev.values["type"] = type_name
        else:
            dev.bad.add("type")
            suggestion = v.did_you_mean(type_name, DEVICE_TYPES) if type_name else ""
            dev.report(
                ctx,
                "type",
                f"unknown device type {v.describe(type_node)}{suggestion}; supported types: {', '.join(DEVICE_TYPES)}",
                node=type_node if type_node.value else key_node,
            )

    known = dict(_COMMON_DEVICE_KEYS)
    variant = None
    if dev.type is not None:
        known.update(dev.type.keys)
        variant = _variant(dev, items, ctx)
        if variant is not None:
            known.update(variant.KEYS)
    for name, (key_node, value_node) in items.items():
        if name in ("name", "type") or name == (dev.type and dev.type.variant_key):
            continue
        spec = known.get(name)
        if spec is not None:
            _parse_key(dev, name, (key_node, value_node), spec, ctx)
        elif dev.type is not None:
            # Without a valid type we cannot tell which keys are unknown.
            takers = [k for k, mod in dev.type.variants.items() if name in mod.KEYS]
            if not takers:
                _unknown_key(ctx, key_node, path, name, [*known, *_variant_keys(dev.type)], dev.label)
            elif variant is not None:  # with an invalid backend it cannot be told
                kind = dev.type.variant_key
                dev.report(ctx, name, f"{name!r} only applies to {kind} {' or '.join(takers)}, not "
                           f"{dev.values[kind]}", node=key_node)
        elif "type" not in items and name not in _any_device_key():
            # No type to pick the key table, but a key no device type has is
            # a typo all the same (typ: blk).
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

    if variant is not None and hasattr(variant, "finish"):
        variant.finish(dev, ctx)
    if dev.type is not None and dev.type.finish is not None:
        dev.type.finish(dev, ctx)
    return dev


def _variant(dev: v.Draft, items: dict[str, tuple[Node, Node]], ctx: v.Context) -> Any:
    """Read the key that selects the device's variant (blk's backend) and
    return the variant's module, or None."""
    kind = dev.type.variant_key
    if kind is None:
        return None
    if kind in items:
        _parse_key(dev, kind, items[kind], dev.type.keys[kind], ctx)
    else:
        dev.values[kind] = dev.type.keys[kind].default
    return dev.type.variants.get(dev.values.get(kind))


def _variant_keys(t: DeviceType) -> list[str]:
    return [k for mod in t.variants.values() for k in mod.KEYS]


def _any_device_key() -> set[str]:
    """Every key some device type knows."""
    return {*_COMMON_DEVICE_KEYS, *(k for t in DEVICE_TYPES.values()
                                    for k in [*t.keys, *_variant_keys(t), *([t.variant_key] if t.variant_key else [])])}


def _build_device(d: v.Draft) -> Any:
    """The device's config from its checked values; a variant's keys become
    its own Settings (BlkDeviceConfig.store)."""
    values = dict(d.values)
    if d.type.variant_key is not None:
        mod = d.type.variants[values[d.type.variant_key]]
        values["store"] = mod.Settings(**{k: values.pop(k) for k in mod.KEYS})
    return d.type.cls(**values, line=d.line)


def _identity(d: v.Draft) -> tuple[str, str, str, str] | None:
    """(key, value as written, what kind of data, what names it) of the data
    a device's variant uses, for the shared-data checks; None if it has none
    or it is invalid."""
    if d.type is None or d.type.variant_key is None:
        return None
    mod = d.type.variants.get(d.values.get(d.type.variant_key))
    if mod is None or not d.ok(*mod.KEYS) or any(k not in d.values for k in mod.KEYS):
        return None
    found = mod.identity(mod.Settings(**{k: d.values[k] for k in mod.KEYS}))
    if found is None:
        return None
    key, what, ident = found
    return key, str(d.values[key]), what, ident


def _parse_key(dev: v.Draft, name: str, pair: tuple[Node, Node], spec: Key, ctx: v.Context) -> None:
    key_node, value_node = pair
    try:
        dev.values[name] = spec.parse(value_node, ctx)
    except v.Invalid as e:
        dev.bad.add(name)
        dev.report(ctx, name, str(e), node=v.value_line(key_node, value_node))


def _finish_blk(dev: v.Draft, ctx: v.Context) -> None:
    if dev.values.get("serial") is None and "name" in dev.values:
        dev.values["serial"] = dev.values["name"][:MAX_SERIAL]


def _check_socket_file(dev: v.Draft, ctx: v.Context) -> None:
    if not dev.ok("socket") or "socket" not in dev.values:
        return
    sock = dev.values["socket"]
    try:
        st = os.lstat(sock)
    except (FileNotFoundError, NotADirectoryError):
        why = v.why_not_creatable(sock)
        if why:
            dev.report(ctx, "socket", f"cannot create socket {sock}: {why}")
        return
    except OSError as e:
        dev.report(ctx, "socket", f"cannot access socket path {sock}: {e.strerror}")
        return
    if not stat.S_ISSOCK(st.st_mode):
        dev.report(ctx, "socket", f"{sock} already exists and is not a socket; vhostd will not replace it")


def _finish_net(dev: v.Draft, ctx: v.Context) -> None:
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
        variant_key="backend",
        variants=storage.BACKENDS,
    ),
    "net": DeviceType(cls=NetDeviceConfig, keys=_NET_KEYS, finish=_finish_net),
}


def _check_across_devices(devs: list[v.Draft], ctx: v.Context) -> None:
    names: dict[str, v.Draft] = {}
    sockets: dict[str, v.Draft] = {}
    images: dict[str, list[v.Draft]] = {}
    writers: dict[str, list[v.Draft]] = {}

    def who(d: v.Draft) -> str:
        name = d.values.get("name")
        return f"device {name!r} (line {d.line})" if name else f"devices[{d.index}] (line {d.line})"

    data = {id(d): _identity(d) for d in devs}
    for d in devs:
        if data[id(d)] is not None:
            images.setdefault(data[id(d)][3], []).append(d)

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
            for other in images.get(real, ()):
                owner = "this device" if other is d else who(other)
                ctx.report(d.nodes["socket"], d.key("socket"), f"socket {sock} is also the image path of {owner}")

        if data[id(d)] is None or d.values.get("readonly", False) is not False or not d.ok("readonly"):
            continue
        key, written, what, ident = data[id(d)]
        # Writers may share data only if every one of them says so: then the
        # image's lock lets one run at a time (vhostd/storage).
        shared = d.values.get("shared") is True and d.ok("shared")
        clash = next((w for w in writers.get(ident, ()) if not (shared and w.values.get("shared") is True)), None)
        if clash is not None:
            ctx.report(
                d.nodes.get(key, d.node),
                d.key(key),
                f"{what} {written} is also used by writable {who(clash)}; "
                "two writable devices would corrupt it, so set 'readonly: true' on one of them, "
                "or 'shared: true' on both if only one runs at a time (e.g. a migration's source and destination)",
            )
        else:
            writers.setdefault(ident, []).append(d)


# --------------------------------------------------------------------------
# VMs (the built-in VMM, vhostd/vmm)
# --------------------------------------------------------------------------


def _vm_memory(node: Node, ctx: v.Context) -> int:
    value = v.size(1)(node, ctx)
    if value % VM_MEMORY_ALIGN:
        raise v.Invalid(f"must be a multiple of {VM_MEMORY_ALIGN >> 20}M (the guest is mapped with 2 MiB pages), "
                       f"got {v.describe(node)}")
    if not MIN_VM_MEMORY <= value <= MAX_VM_MEMORY:
        raise v.Invalid(f"must be from {MIN_VM_MEMORY >> 20}M to {MAX_VM_MEMORY >> 30}G, got {v.describe(node)}")
    return value


def _text(limit: int | None, what: str) -> Callable[[Node, v.Context], str]:
    def parse(node: Node, ctx: v.Context) -> str:
        if v.is_kind(node, "null"):
            return ""
        if not isinstance(node, ScalarNode):
            raise v.Invalid(f"must be {what}, got {v.describe(node)}")
        value = node.value  # numbers and booleans are fine as text here
        if "\0" in value:
            raise v.Invalid("must not contain a NUL character")
        if limit is not None and len(value.encode()) > limit:
            raise v.Invalid(f"must be at most {limit} bytes, got {len(value.encode())}")
        return value

    return parse


_VM_KEYS: dict[str, Key] = {
    "name": Key(v.name, help="a unique VM name"),
    "memory": Key(_vm_memory, help="the guest RAM size, e.g. 256M"),
    "vcpus": Key(v.int_range(1, MAX_VCPUS), 1),
    "payload": Key(v.path, None),
    "kernel": Key(v.path, None),
    "cmdline": Key(_text(None, "a kernel command line"), ""),
    "initrd": Key(v.path, None),
    "args": Key(_text(MAX_VM_ARGS, "the payload's command line"), ""),
    "autostart": Key(v.boolean, False),
}
#: Keys of a VM besides _VM_KEYS (parsed on their own).
_VM_SPECIAL_KEYS = ("devices",)

_VM_DEVICE_KEYS: dict[str, Key] = {
    "type": Key(v.choice(VM_DEVICE_TYPES), help=f"the virtio device type: {', '.join(VM_DEVICE_TYPES)}"),
    "socket": Key(v.socket_path, help="the vhost-user socket of the back-end"),
    "queue_size": Key(v.power_of_two(2, MAX_QUEUE_SIZE), None),
}


@dataclass
class _VmDraft(v.Draft):
    devices: list["_VmDeviceDraft"] = field(default_factory=list)

    def key(self, name: str) -> str:
        return f"vms[{self.index}].{name}"

    @property
    def label(self) -> str:
        name = self.values.get("name")
        return f" (VM {name!r})" if name else ""


@dataclass
class _VmDeviceDraft(v.Draft):
    vm: _VmDraft | None = None

    def key(self, name: str) -> str:
        return f"vms[{self.vm.index}].devices[{self.index}].{name}"

    @property
    def label(self) -> str:
        return self.vm.label


def _parse_keys(draft: v.Draft, items: dict[str, tuple[Node, Node]], table: dict[str, Key], path: str,
                ctx: v.Context, skip: tuple[str, ...] = ()) -> None:
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


def _parse_vm(index: int, node: Node, ctx: v.Context) -> _VmDraft | None:
    path = f"vms[{index}]"
    if not isinstance(node, MappingNode):
        ctx.report(node, path, f"each VM must be a mapping of keys (name, memory, payload, ...), got {v.describe(node)}")
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


def _parse_vm_devices(vm: _VmDraft, key_node: Node, seq: Node, ctx: v.Context) -> list[_VmDeviceDraft]:
    if v.is_kind(seq, "null"):
        return []
    if not isinstance(seq, SequenceNode):
        vm.bad.add("devices")
        vm.report(ctx, "devices", f"must be a list of devices (each like '- {{type: blk, socket: PATH}}'), "
                  f"got {v.describe(seq)}", node=v.value_line(key_node, seq))
        return []
    if len(seq.value) > MAX_VM_DEVICES:
        vm.report(ctx, "devices", f"a VM has room for at most {MAX_VM_DEVICES} devices, got {len(seq.value)}")
    out = []
    for j, node in enumerate(seq.value):
        path = f"{vm.key('devices')}[{j}]"
        if not isinstance(node, MappingNode):
            ctx.report(node, path, f"each device must be a mapping with 'type' and 'socket', got {v.describe(node)}"
                       + vm.label)
            continue
        dev = _VmDeviceDraft(j, node, vm=vm)
        items = _mapping_items(node, ctx, path)
        for name, (_key_node, value_node) in items.items():
            dev.nodes[name] = value_node
        _parse_keys(dev, items, _VM_DEVICE_KEYS, path, ctx)
        out.append(dev)
    return out


def _finish_vm(vm: _VmDraft, ctx: v.Context) -> None:
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


def _check_vm_files(vm: _VmDraft, ctx: v.Context) -> None:
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


def _check_across_vms(vms: list[_VmDraft], devs: list[v.Draft], ctx: v.Context) -> None:
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


def _parse_vms(key_node: Node, seq: Node, ctx: v.Context) -> list[_VmDraft]:
    if v.is_kind(seq, "null"):
        return []
    if not isinstance(seq, SequenceNode):
        ctx.report(v.value_line(key_node, seq), "vms",
                   f"must be a list of VMs (each starting with '- name: ...'), got {v.describe(seq)}")
        return []
    return [vm for i, node in enumerate(seq.value) if (vm := _parse_vm(i, node, ctx)) is not None]


def _build_vm(vm: _VmDraft) -> VmConfig:
    devices = tuple(VmDeviceConfig(**d.values, line=d.line) for d in vm.devices)
    return VmConfig(**vm.values, devices=devices, line=vm.line)


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def load_config(path: str | os.PathLike, *, check_files: bool = True, text: str | None = None) -> Config:
    """Read, parse and validate the config file at ``path`` (or ``text``,
    a config made by the program, which ``path`` then only names).

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
    ctx = v.Context(file, os.path.dirname(abs_file), check_files)

    root = _compose(file, ctx, text)
    if root is None:
        raise ConfigError(ctx.problems)

    if not isinstance(root, MappingNode):
        ctx.report(root, "", f"the top level must be a mapping with 'daemon' and 'devices' keys, got {v.describe(root)}")
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

    drafts: list[v.Draft] = []
    if "devices" not in items:
        if not has_vms:
            ctx.report(root, "devices", "missing required key 'devices' (the list of devices to serve)")
    else:
        key_node, seq = items["devices"]
        if has_vms and (v.is_kind(seq, "null") or isinstance(seq, SequenceNode) and not seq.value):
            pass
        elif not isinstance(seq, SequenceNode):
            ctx.report(
                v.value_line(key_node, seq),
                "devices",
                f"must be a list of devices (each starting with '- name: ...'), got {v.describe(seq)}",
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
            if dev.type is not None and dev.type.variant_key is not None:
                mod = dev.type.variants.get(dev.values.get(dev.type.variant_key))
                if mod is not None and hasattr(mod, "check_files"):
                    mod.check_files(dev, ctx)
        for vm in vms:
            _check_vm_files(vm, ctx)

    if ctx.problems:
        ctx.problems.sort(key=lambda p: p.line or 0)
        raise ConfigError(ctx.problems)

    devices = tuple(_build_device(d) for d in drafts if d.type is not None)
    return Config(path=abs_file, daemon=daemon, devices=devices, vms=tuple(_build_vm(vm) for vm in vms))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers: as in YAML
    1.2's core schema, `mac: 52:54:00:12:34:56` (or a time like 1:30) is
    the text written, not a number that needs quotes."""


# PyYAML's int and float patterns less their base-60 forms (digits:digits).
_NUMBERS = {
    "tag:yaml.org,2002:int": re.compile(
        r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    "tag:yaml.org,2002:float": re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
}


def _without_base_60(resolvers: dict) -> dict:
    return {first: [(tag, _NUMBERS.get(tag, regexp)) for tag, regexp in entries]
            for first, entries in resolvers.items()}


_Loader.yaml_implicit_resolvers = _without_base_60(yaml.SafeLoader.yaml_implicit_resolvers)


def _compose(file: str, ctx: v.Context, text: str | None = None) -> Node | None:
    """Parse the file (or text) into a YAML node tree, or report why not and return None."""
    try:
        if text is not None:
            data = text.encode()
        else:
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
        root = yaml.compose(text, Loader=_Loader)
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
    if root is None or v.is_kind(root, "null") and root.value == "":
        ctx.report(None, "", "the file is empty; expected a mapping with a 'devices' list")
        return None
    return root
