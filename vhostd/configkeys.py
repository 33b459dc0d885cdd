"""Reading config values: each key of the YAML file is checked by a small
parser that returns the Python value or raises Invalid with a message saying
what is accepted and what was found; load_config adds file, line and key.

Key tables ({name: Key(parser, default)}) describe a section; a Draft is one
device (or VM) while its keys are being read.  The storage back-ends
(vhostd/storage) use the same parsers for their own keys.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import os
import pwd
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable

from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

#: Longest usable AF_UNIX socket path: sun_path is 108 bytes including the NUL.
MAX_SOCKET_PATH = 107
#: virtio-blk GET_ID returns at most this many bytes.
MAX_SERIAL = 20
SECTOR = 512

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


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


class Invalid(Exception):
    pass


TAG = "tag:yaml.org,2002:"
_constructor = SafeConstructor()


def describe(node: Node) -> str:
    """How a value is shown after 'got': quoted strings, raw scalars, kinds."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == TAG + "null":
        return "nothing" if node.value in ("", "~") else node.value
    if node.tag == TAG + "str":
        return repr(node.value)
    return node.value


def is_kind(node: Node, kind: str) -> bool:
    return isinstance(node, ScalarNode) and node.tag == TAG + kind


def string(node: Node, what: str = "a string") -> str:
    if is_kind(node, "str"):
        return node.value
    hint = " (put it in quotes)" if isinstance(node, ScalarNode) and node.value else ""
    raise Invalid(f"must be {what}, got {describe(node)}{hint}")


def boolean(node: Node, ctx: Context) -> bool:
    if is_kind(node, "bool"):
        return _constructor.construct_yaml_bool(node)
    raise Invalid(f"must be true or false, got {describe(node)}")


def integer(node: Node, what: str) -> int:
    if is_kind(node, "int"):
        return _constructor.construct_yaml_int(node)
    raise Invalid(f"must be {what}, got {describe(node)}")


def int_range(lo: int, hi: int) -> Callable[[Node, Context], int]:
    what = f"an integer from {lo} to {hi}"

    def parse(node: Node, ctx: Context) -> int:
        value = integer(node, what)
        if not lo <= value <= hi:
            raise Invalid(f"must be {what}, got {describe(node)}")
        return value

    return parse


def power_of_two(lo: int, hi: int) -> Callable[[Node, Context], int]:
    what = f"a power of two from {lo} to {hi}"

    def parse(node: Node, ctx: Context) -> int:
        value = integer(node, what)
        if not (lo <= value <= hi and value & (value - 1) == 0):
            raise Invalid(f"must be {what}, got {describe(node)}")
        return value

    return parse


def choice(choices: tuple[str, ...]) -> Callable[[Node, Context], str]:
    what = "one of " + ", ".join(choices)

    def parse(node: Node, ctx: Context) -> str:
        value = string(node, what).lower()
        if value not in choices:
            raise Invalid(f"must be {what}, got {describe(node)}{did_you_mean(value, choices)}")
        return value

    return parse


def name(node: Node, ctx: Context) -> str:
    what = "a name of 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
    value = string(node, what)
    if not _NAME_RE.fullmatch(value):
        raise Invalid(f"must be {what}, got {describe(node)}")
    return value


def path(node: Node, ctx: Context) -> str:
    value = string(node, "a file path")
    if not value:
        raise Invalid("must be a file path, got an empty string")
    if "\0" in value:
        raise Invalid("must not contain a NUL character")
    return ctx.resolve(value)


def socket_path(node: Node, ctx: Context) -> str:
    value = path(node, ctx)
    length = len(os.fsencode(value))
    if length > MAX_SOCKET_PATH:
        raise Invalid(
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


def size(multiple: int) -> Callable[[Node, Context], int]:
    def parse(node: Node, ctx: Context) -> int:
        if is_kind(node, "int"):
            raw: int | str = _constructor.construct_yaml_int(node)
        elif is_kind(node, "str"):
            raw = node.value
        elif is_kind(node, "float"):
            raise Invalid(f"must be a whole number of bytes, got {node.value}")
        else:
            raise Invalid(f"must be {_SIZE_HELP}, got {describe(node)}")
        try:
            value = parse_size(raw)
        except ValueError as e:
            raise Invalid(str(e)) from None
        if value % multiple:
            raise Invalid(f"must be a multiple of {multiple} bytes, got {describe(node)} ({value} bytes)")
        return value

    return parse


def serial(node: Node, ctx: Context) -> str:
    what = f"a string of at most {MAX_SERIAL} printable ASCII characters"
    value = string(node, what)
    if not value:
        raise Invalid(f"must be {what}, got an empty string; leave 'serial' out to use the device name")
    if not all(" " <= c <= "~" for c in value):
        raise Invalid(f"must be {what}, got {describe(node)}")
    if len(value) > MAX_SERIAL:
        raise Invalid(f"must be {what}, got {describe(node)} ({len(value)} characters)")
    return value


_MODE_RE = re.compile(r"(?:0o?)?([0-7]{1,4})", re.IGNORECASE)


def _account(kind: str, lookup: Callable[[str], int]) -> Callable[[Node, Context], int]:
    """A user or group: a name (looked up now, so a typo is a config error) or a number."""

    def parse(node: Node, ctx: Context) -> int:
        if is_kind(node, "int"):
            return int_range(0, 2**32 - 2)(node, ctx)
        name = string(node, f"a {kind} name or a numeric {kind[0]}id")
        try:
            return lookup(name)
        except KeyError:
            raise Invalid(f"no {kind} named {name!r} on this system") from None

    return parse


user = _account("user", lambda name: pwd.getpwnam(name).pw_uid)
group = _account("group", lambda name: grp.getgrnam(name).gr_gid)


def id_list(one: Callable[[Node, Context], int], what: str) -> Callable[[Node, Context], tuple[int, ...]]:
    def parse(node: Node, ctx: Context) -> tuple[int, ...]:
        if not isinstance(node, SequenceNode):
            raise Invalid(f"must be a list of {what}, e.g. [qemu, 107], got {describe(node)}")
        return tuple(one(item, ctx) for item in node.value)

    return parse


_ADDRESS_RE = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})")


def address(node: Node, ctx: Context) -> tuple[str, int]:
    """host:port or [v6-address]:port, e.g. 127.0.0.1:9110."""
    what = "an address like 127.0.0.1:9110 or [::1]:9110"
    m = _ADDRESS_RE.fullmatch(string(node, what).strip())
    if not m or not 1 <= int(m.group(3)) <= 65535:
        raise Invalid(f"must be {what}, got {describe(node)}")
    return (m.group(1) or m.group(2), int(m.group(3)))


def is_loopback(host: str) -> bool:
    """host (of an address key) is only reachable from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to


def why_not_secret(path: str) -> str | None:
    """Why the file at path cannot hold a secret (missing, empty, or open to
    other users), or None if it can."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return f"{path} is not a regular file"
        if st.st_mode & 0o077:
            return (f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: others may read the token; "
                    f"chmod 600 {path}")
        with open(path, "rb") as f:
            if not f.read(4096).strip():
                return f"{path} is empty: put the token in it (for example: head -c 32 /dev/urandom | base64)"
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    return None


def mode(node: Node, ctx: Context) -> int:
    """A file mode, always read as octal like chmod: 0660, "0660", 660, 0o660."""
    what = "an octal file mode from 0000 to 0777, like 0660"
    if not (is_kind(node, "int") or is_kind(node, "str")):
        raise Invalid(f"must be {what}, got {describe(node)}")
    m = _MODE_RE.fullmatch(node.value.strip())
    if not m or int(m.group(1), 8) > 0o777:
        raise Invalid(f"must be {what}, got {describe(node)}")
    return int(m.group(1), 8)

class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Key:
    """One key a config section accepts."""

    parse: Callable[[Node, "Context"], Any]
    default: Any = REQUIRED
    help: str = ""  # what the key is for; used in 'missing key' messages

class Context:
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
class Draft:
    """A device while it is being validated."""

    index: int
    node: MappingNode
    type: Any = None  # its DeviceType (vhostd.config), once known
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

    def report(self, ctx: Context, key: str, message: str, node: Node | int | None = None) -> None:
        """Report a problem with ``key``, on the line of its value by default."""
        if node is None:
            node = self.nodes.get(key, self.node)
        ctx.report(node, self.key(key), message + self.label)

    def ok(self, *keys: str) -> bool:
        """True when none of ``keys`` failed validation."""
        return not any(k in self.bad for k in keys)


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""

def value_line(key_node: Node, value_node: Node) -> int:
    """Line to blame for a bad value: the value's own, or the key's if empty."""
    if is_kind(value_node, "null") and value_node.value == "":
        return key_node.start_mark.line + 1
    return value_node.start_mark.line + 1

def why_not_creatable(path: str) -> str | None:
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
