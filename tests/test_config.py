"""Tests for vhostd.config: parsing, defaults, validation and error reporting."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import textwrap
from pathlib import Path

import pytest

from vhostd import config as config_mod
from vhostd import storage
from vhostd.config import (
    DEVICE_TYPES,
    BlkDeviceConfig,
    Config,
    ConfigError,
    DaemonConfig,
    Problem,
    load_config,
    parse_size,
)

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "vhostd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def image(path: Path, size: int = 1 << 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def problems(path: Path, **kwargs) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    return info.value.problems


def only_problem(path: Path, **kwargs) -> Problem:
    found = problems(path, **kwargs)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def line_of(path: Path, needle: str) -> int:
    """1-based line of the only line containing ``needle``."""
    hits = [i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text]
    assert len(hits) == 1, f"{needle!r} found on lines {hits}"
    return hits[0]


def one_device(tmp_path: Path, extra: str = "", *, with_image: bool = True) -> Path:
    """A config with one blk device disk0 plus the lines in ``extra``."""
    if with_image:
        image(tmp_path / "disk0.img")
    body = textwrap.indent(textwrap.dedent(extra).strip("\n"), "    ")
    return write(
        tmp_path,
        "devices:\n"
        "  - name: disk0\n"
        "    type: blk\n"
        "    socket: disk0.sock\n"
        "    path: disk0.img\n" + (body + "\n" if body else ""),
    )


# --------------------------------------------------------------------------
# defaults and values
# --------------------------------------------------------------------------


def test_minimal_config_gets_defaults(tmp_path):
    cfg = load_config(one_device(tmp_path))
    assert isinstance(cfg, Config)
    assert cfg.path == str(tmp_path / "vhostd.yaml")
    assert cfg.daemon == DaemonConfig(workers=0, log_level="info")
    assert cfg.devices == (
        BlkDeviceConfig(
            name="disk0",
            type="blk",
            socket=str(tmp_path / "disk0.sock"),
            backend="file",
            store=storage.file.Settings(path=str(tmp_path / "disk0.img"), size=None, direct=False, aio="auto"),
            readonly=False,
            queues=1,
            queue_size=256,
            serial="disk0",
            discard=True,
            write_zeroes=True,
            poll_us=0,
            socket_mode=None,
        ),
    )
    assert cfg.devices[0].line == 2


def test_all_keys_are_read(tmp_path):
    cfg = load_config(
        one_device(
            tmp_path,
            """
            readonly: true
            queues: 64
            queue_size: 1024
            size: 2M
            serial: my-serial
            discard: false
            write_zeroes: false
            direct: true
            poll_us: 250
            socket_mode: "0600"
            """,
        )
    )
    dev = cfg.devices[0]
    assert dev.readonly is True
    assert dev.queues == 64
    assert dev.queue_size == 1024
    assert dev.store.size == 2 << 20
    assert dev.serial == "my-serial"
    assert (dev.discard, dev.write_zeroes, dev.store.direct) == (False, False, True)
    assert dev.poll_us == 250
    assert dev.socket_mode == 0o600


def test_daemon_section(tmp_path):
    image(tmp_path / "d.img")
    path = write(
        tmp_path,
        """
        daemon:
          workers: 4
          log_level: WARNING
        devices:
          - {name: d, type: blk, socket: d.sock, path: d.img}
        """,
    )
    assert load_config(path).daemon == DaemonConfig(workers=4, log_level="warning")


def test_empty_daemon_section_means_defaults(tmp_path):
    image(tmp_path / "d.img")
    path = write(tmp_path, "daemon:\ndevices:\n  - {name: d, type: blk, socket: d.sock, path: d.img}\n")
    assert load_config(path).daemon == DaemonConfig()


def test_serial_defaults_to_name_cut_to_20_bytes(tmp_path):
    name = "a-rather-long-device-name-indeed"
    image(tmp_path / "d.img")
    path = write(tmp_path, f"devices:\n  - {{name: {name}, type: blk, socket: d.sock, path: d.img}}\n")
    assert load_config(path).devices[0].serial == name[:20]


def test_several_devices_keep_order_and_lines(tmp_path):
    for n in ("a", "b", "c"):
        image(tmp_path / f"{n}.img")
    path = write(
        tmp_path,
        """
        devices:
          - name: a
            type: blk
            socket: a.sock
            path: a.img
          - {name: b, type: blk, socket: b.sock, path: b.img}

          - name: c
            type: blk
            socket: c.sock
            path: c.img
        """,
    )
    devices = load_config(path).devices
    assert [d.name for d in devices] == ["a", "b", "c"]
    assert [d.line for d in devices] == [2, 6, 8]


def agree(cls, keys: dict, bookkeeping: set[str], what: str) -> None:
    declared = {f.name: f.default for f in dataclasses.fields(cls)}
    assert set(keys) <= set(declared), what
    for key, spec in keys.items():
        if spec.default is config_mod.REQUIRED:
            if key != "type":
                assert declared[key] is dataclasses.MISSING, key
        else:
            assert declared[key] == spec.default, key
    # Every dataclass field except the bookkeeping ones is a config key.
    assert set(declared) - set(keys) == bookkeeping, what


def test_key_tables_agree_with_dataclass_defaults():
    """The defaults load_config applies are the ones the dataclasses declare."""
    for type_name, dev_type in DEVICE_TYPES.items():
        keys = {**config_mod._COMMON_DEVICE_KEYS, **dev_type.keys}
        agree(dev_type.cls, keys, {"line", "store"} if dev_type.variants else {"line"}, type_name)
        for name, mod in dev_type.variants.items():
            agree(mod.Settings, mod.KEYS, set(), f"{type_name} {dev_type.variant_key} {name}")
    daemon_defaults = {f.name: f.default for f in dataclasses.fields(DaemonConfig)}
    assert daemon_defaults == {k: s.default for k, s in config_mod._DAEMON_KEYS.items()}


def test_config_is_immutable(tmp_path):
    cfg = load_config(one_device(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.devices[0].queues = 3  # type: ignore[misc]


def test_device_line_is_not_part_of_equality():
    a = BlkDeviceConfig(name="a", socket="/s", store=storage.file.Settings(path="/p"), line=1)
    b = BlkDeviceConfig(name="a", socket="/s", store=storage.file.Settings(path="/p"), line=9)
    assert a == b


def test_merge_keys_share_settings(tmp_path):
    image(tmp_path / "a.img")
    image(tmp_path / "b.img")
    path = write(
        tmp_path,
        """
        devices:
          - &base
            name: a
            type: blk
            socket: a.sock
            path: a.img
            queues: 4
            direct: true
          - <<: *base
            name: b
            socket: b.sock
            path: b.img
            direct: false
        """,
    )
    a, b = load_config(path).devices
    assert (b.name, b.queues, b.store.direct, b.socket) == ("b", 4, False, str(tmp_path / "b.sock"))
    assert a.store.direct is True


# --------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------


def test_relative_paths_resolve_against_config_dir_not_cwd(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    image(tmp_path / "var" / "d.img")
    path = write(conf_dir, "devices:\n  - {name: d, type: blk, socket: ../run/./d.sock, path: ../var/d.img}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dev = load_config(os.path.relpath(path)).devices[0]
    assert dev.socket == str(tmp_path / "run" / "d.sock")
    assert dev.store.path == str(tmp_path / "var" / "d.img")
    assert os.path.isabs(load_config(os.path.relpath(path)).path)


def test_absolute_paths_are_kept(tmp_path):
    img = image(tmp_path / "abs.img")
    sub = tmp_path / "conf"
    sub.mkdir()
    path = write(sub, f"devices:\n  - {{name: d, type: blk, socket: {tmp_path}/s.sock, path: {img}}}\n")
    dev = load_config(path).devices[0]
    assert (dev.socket, dev.store.path) == (f"{tmp_path}/s.sock", str(img))


def test_tilde_expands_to_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    image(tmp_path / "home" / "d.img")
    path = write(tmp_path, "devices:\n  - {name: d, type: blk, socket: ~/d.sock, path: ~/d.img}\n")
    dev = load_config(path).devices[0]
    assert dev.store.path == str(tmp_path / "home" / "d.img")


def test_accepts_pathlike(tmp_path):
    assert load_config(Path(one_device(tmp_path))).devices[0].name == "disk0"


# --------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (4096, 4096),
        ("4096", 4096),
        ("1K", 1024),
        ("1k", 1024),
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
        ("3KiB", 3 << 10),
        ("3MiB", 3 << 20),
        ("3GiB", 3 << 30),
        ("3TiB", 3 << 40),
        ("1 G", 1 << 30),
        ("512B", 512),
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        (0, "positive"),
        (-512, "positive"),
        ("0", "positive"),
        ("-1M", "positive"),
        ("64X", "suffix K, M, G or T"),
        ("M", "suffix K, M, G or T"),
        ("", "suffix K, M, G or T"),
        ("1.5G", "whole number"),
        ("64MB", "ambiguous suffix 'MB'"),
        (True, "positive size"),
        (1.5, "positive size"),
        ("9999999T", "too large"),
    ],
)
def test_parse_size_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_size(text)


@pytest.mark.parametrize(
    "value, expected",
    [("1G", 1 << 30), ("512", 512), ("1_048_576", 1 << 20), ('"64 MiB"', 64 << 20)],
)
def test_blk_size_in_yaml(tmp_path, value, expected):
    assert load_config(one_device(tmp_path, f"size: {value}")).devices[0].store.size == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("1000", "must be a multiple of 512 bytes, got 1000 (1000 bytes)"),
        ("1.5", "must be a whole number of bytes, got 1.5"),
        ("1.5G", "must be a whole number of bytes, got '1.5G'"),
        ("64X", "got '64X'"),
        ("-4096", "got -4096"),
        ("0", "got 0"),
        ("true", "got true"),
        ("[1]", "got a list"),
    ],
)
def test_blk_size_errors(tmp_path, value, message):
    path = one_device(tmp_path, f"size: {value}")
    p = only_problem(path)
    assert (p.line, p.key) == (6, "devices[0].size")
    assert message in p.message
    assert p.message.endswith("(device 'disk0')")


# --------------------------------------------------------------------------
# individual keys
# --------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["'0660'", '"660"', "0660", "660", "0o660", "'0o660'"])
def test_socket_mode_is_always_octal(tmp_path, value):
    assert load_config(one_device(tmp_path, f"socket_mode: {value}")).devices[0].socket_mode == 0o660


@pytest.mark.parametrize("value", ["0999", "1777", "0o1000", "rw-rw----", "true", "0x1b0", "''"])
def test_socket_mode_errors(tmp_path, value):
    p = only_problem(one_device(tmp_path, f"socket_mode: {value}"))
    assert p.key == "devices[0].socket_mode"
    assert "must be an octal file mode from 0000 to 0777" in p.message


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("yes", True), ("off", False), ("True", True)])
def test_bools_are_what_yaml_calls_bools(tmp_path, value, expected):
    assert load_config(one_device(tmp_path, f"readonly: {value}")).devices[0].readonly is expected


@pytest.mark.parametrize("value, shown", [('"yes"', "'yes'"), ("1", "1"), ("0", "0"), ("'true'", "'true'"), ("", "nothing")])
def test_non_bools_are_rejected(tmp_path, value, shown):
    p = only_problem(one_device(tmp_path, f"direct: {value}"))
    assert (p.line, p.key) == (6, "devices[0].direct")
    assert p.message == f"must be true or false, got {shown} (device 'disk0')"


@pytest.mark.parametrize("value, ok", [(1, True), (64, True), (0, False), (65, False), ("'2'", False), ("2.0", False)])
def test_queues_range(tmp_path, value, ok):
    path = one_device(tmp_path, f"queues: {value}")
    if ok:
        assert load_config(path).devices[0].queues == value
    else:
        assert only_problem(path).message.startswith("must be an integer from 1 to 64, got ")


@pytest.mark.parametrize("value, ok", [(2, True), (128, True), (1024, True), (1, False), (100, False), (2048, False), (0, False)])
def test_queue_size_power_of_two(tmp_path, value, ok):
    path = one_device(tmp_path, f"queue_size: {value}")
    if ok:
        assert load_config(path).devices[0].queue_size == value
    else:
        assert only_problem(path).message == f"must be a power of two from 2 to 1024, got {value} (device 'disk0')"


@pytest.mark.parametrize(
    "value, message",
    [
        ("'123456789012345678901'", "(21 characters)"),
        ("'disk\u00e9'", "printable ASCII"),
        ("''", "leave 'serial' out"),
        ("12345", "(put it in quotes)"),
    ],
)
def test_serial_errors(tmp_path, value, message):
    p = only_problem(one_device(tmp_path, f"serial: {value}"))
    assert p.key == "devices[0].serial"
    assert message in p.message


def test_serial_of_exactly_20_characters(tmp_path):
    assert load_config(one_device(tmp_path, "serial: '12345678901234567890'")).devices[0].serial == "12345678901234567890"


@pytest.mark.parametrize("name", ["d", "disk0", "0", "A.b-c_d", "x" * 64])
def test_good_names(tmp_path, name):
    image(tmp_path / "d.img")
    path = write(tmp_path, f"devices:\n  - {{name: '{name}', type: blk, socket: d.sock, path: d.img}}\n")
    assert load_config(path).devices[0].name == name


@pytest.mark.parametrize("name", ["''", "-disk", ".hidden", "has space", "disk/0", "'" + "x" * 65 + "'", "dísk", "12", "true"])
def test_bad_names(tmp_path, name):
    image(tmp_path / "d.img")
    path = write(tmp_path, f"devices:\n  - name: {name}\n    type: blk\n    socket: d.sock\n    path: d.img\n")
    p = only_problem(path)
    assert (p.line, p.key) == (2, "devices[0].name")
    assert "must be a name of 1 to 64 letters, digits" in p.message


def test_numeric_name_hints_at_quotes(tmp_path):
    image(tmp_path / "d.img")
    path = write(tmp_path, "devices:\n  - {name: 12, type: blk, socket: d.sock, path: d.img}\n")
    assert only_problem(path).message.endswith("got 12 (put it in quotes)")


@pytest.mark.parametrize(
    "text, key, message",
    [
        ("workers: -1", "daemon.workers", "must be an integer from 0 to 1024, got -1"),
        ("workers: auto", "daemon.workers", "must be an integer from 0 to 1024, got 'auto'"),
        ("log_level: verbose", "daemon.log_level", "must be one of debug, info, warning, error, got 'verbose'"),
        ("log_level: warn", "daemon.log_level", "must be one of debug, info, warning, error, got 'warn' (did you mean 'warning'?)"),
        ("log_levle: info", "daemon.log_levle", "unknown key 'log_levle' (did you mean 'log_level'?)"),
    ],
)
def test_daemon_errors(tmp_path, text, key, message):
    image(tmp_path / "d.img")
    path = write(tmp_path, f"daemon:\n  {text}\ndevices:\n  - {{name: d, type: blk, socket: d.sock, path: d.img}}\n")
    p = only_problem(path)
    assert (p.line, p.key, p.message) == (2, key, message)


def test_daemon_must_be_a_mapping(tmp_path):
    image(tmp_path / "d.img")
    path = write(tmp_path, "daemon: [1]\ndevices:\n  - {name: d, type: blk, socket: d.sock, path: d.img}\n")
    p = only_problem(path)
    assert (p.line, p.key, p.message) == (1, "daemon", "must be a mapping of daemon settings, got a list")


# --------------------------------------------------------------------------
# structural errors, each with its line
# --------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest(tmp_path):
    path = one_device(tmp_path, "readonyl: true")
    p = only_problem(path)
    assert str(p) == f"{path}:6: devices[0].readonyl: unknown key 'readonyl' (did you mean 'readonly'?) (device 'disk0')"


def test_a_misspelt_type_is_an_unknown_key_too(tmp_path):
    path = write(tmp_path, """
        devices:
          - name: d0
            typ: blk
            socket: /tmp/d0.sock
            path: /tmp/d0.img
        """)
    found = [str(p) for p in problems(path, check_files=False)]
    assert f"{path}:3: devices[0].typ: unknown key 'typ' (did you mean 'type'?) (device 'd0')" in found


def test_colon_separated_values_are_text_not_base_60_numbers(tmp_path):
    """YAML 1.1 reads 52:54:00:12:34:56 as a base-60 number; vhostd takes
    the text written, as YAML 1.2 does."""
    path = write(tmp_path, """
        devices:
          - {name: n0, type: net, socket: /tmp/n0.sock, backend: loopback, mac: 52:54:00:12:34:56}
          - {name: n1, type: net, socket: /tmp/n1.sock, backend: loopback, mac: 02:00:00:00:00:01, queue_size: 0x100}
        """)
    cfg = load_config(path, check_files=False)
    assert [d.mac for d in cfg.devices] == ["52:54:00:12:34:56", "02:00:00:00:00:01"]
    assert cfg.devices[1].queue_size == 256


def test_unknown_key_without_close_match(tmp_path):
    p = only_problem(one_device(tmp_path, "colour: blue"))
    assert p.message == "unknown key 'colour' (device 'disk0')"


def test_unknown_top_level_key(tmp_path):
    image(tmp_path / "d.img")
    path = write(tmp_path, "device:\n  - x\ndevices:\n  - {name: d, type: blk, socket: d.sock, path: d.img}\n")
    p = only_problem(path)
    assert (p.line, p.key, p.message) == (1, "device", "unknown key 'device' (did you mean 'devices'?)")


def test_wrong_value_reported_on_its_own_line(tmp_path):
    path = one_device(tmp_path, "queues:\n  two")
    p = only_problem(path)
    assert (p.line, p.key) == (7, "devices[0].queues")
    assert p.message == "must be an integer from 1 to 64, got 'two' (device 'disk0')"


def test_empty_value_reported_on_key_line(tmp_path):
    path = one_device(tmp_path, "queues:\nserial: x")
    p = only_problem(path)
    assert (p.line, p.message) == (6, "must be an integer from 1 to 64, got nothing (device 'disk0')")


def test_missing_required_keys_point_at_device(tmp_path):
    path = write(
        tmp_path,
        """
        devices:
          # a comment
          - name: d
            type: blk
        """,
    )
    found = problems(path)
    assert [(p.line, p.key) for p in found] == [(3, "devices[0].socket"), (3, "devices[0].path")]
    assert found[0].message == "missing required key 'socket' (the vhost-user socket path vhostd listens on) (device 'd')"
    assert found[1].message.startswith("missing required key 'path'")


def test_missing_name_and_type(tmp_path):
    image(tmp_path / "d.img")
    path = write(tmp_path, "devices:\n  - socket: d.sock\n    path: d.img\n")
    found = problems(path)
    assert [(p.line, p.key) for p in found] == [(2, "devices[0].name"), (2, "devices[0].type")]
    # Without a type, 'path' cannot be judged unknown.
    assert "missing required key 'type'" in found[1].message


def test_unknown_device_type(tmp_path):
    path = write(tmp_path, "devices:\n  - name: n0\n    type: nett\n    socket: n.sock\n    mac: 52:54:00:00:00:01\n")
    p = only_problem(path)
    assert (p.line, p.key) == (3, "devices[0].type")
    assert p.message == "unknown device type 'nett' (did you mean 'net'?); supported types: blk, net (device 'n0')"


def test_unknown_device_type_suggestion(tmp_path):
    path = write(tmp_path, "devices:\n  - {name: d, type: blkk, socket: d.sock, path: d.img}\n")
    assert "unknown device type 'blkk' (did you mean 'blk'?)" in only_problem(path).message


def test_device_type_must_be_a_string(tmp_path):
    path = write(tmp_path, "devices:\n  - {name: d, type: 1, socket: d.sock, path: d.img}\n")
    assert only_problem(path).message == "unknown device type 1; supported types: blk, net (device 'd')"


def test_duplicate_key_in_mapping(tmp_path):
    path = one_device(tmp_path, "queues: 1\nreadonly: false\nqueues: 2")
    p = only_problem(path)
    assert (p.line, p.key, p.message) == (8, "devices[0].queues", "duplicate key 'queues' (first given at line 6)")


def test_duplicate_top_level_key(tmp_path):
    image(tmp_path / "d.img")
    path = write(tmp_path, "daemon: {}\ndevices:\n  - {name: d, type: blk, socket: d.sock, path: d.img}\ndaemon: {}\n")
    p = only_problem(path)
    assert (p.line, p.key) == (4, "daemon")


def test_non_string_key(tmp_path):
    path = one_device(tmp_path, "? [a, b]\n: 1")
    p = only_problem(path)
    assert (p.line, p.key) == (6, "devices[0]")
    assert p.message == "keys must be names, got a list"


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "devices:\n  - name: d\n    type: blk: x\n")
    p = only_problem(path)
    assert (p.line, p.key) == (3, "")
    assert p.message == "invalid YAML: mapping values are not allowed here"
    assert str(p) == f"{path}:3: invalid YAML: mapping values are not allowed here"


def test_yaml_syntax_error_with_context(tmp_path):
    path = write(tmp_path, "devices:\n  - name: 'd\n    type: blk\n")
    p = only_problem(path)
    assert p.line == 4
    assert p.message == "invalid YAML: found unexpected end of stream (while scanning a quoted scalar started at line 2)"


def test_bad_indentation(tmp_path):
    path = write(tmp_path, "devices:\n  - name: d\n   type: blk\n")
    p = only_problem(path)
    assert p.line == 3
    assert p.message.startswith("invalid YAML: ")


def test_undefined_alias(tmp_path):
    p = only_problem(write(tmp_path, "devices:\n  - *nope\n"))
    assert (p.line, p.message) == (2, "invalid YAML: found undefined alias 'nope'")


def test_several_documents(tmp_path):
    p = only_problem(write(tmp_path, "devices: []\n---\ndevices: []\n"))
    assert p.line == 2
    assert "single document" in p.message


def test_not_utf8(tmp_path):
    path = tmp_path / "vhostd.yaml"
    path.write_bytes(b"devices:\n  - name: d\xe9\n")
    assert (only_problem(path).line, only_problem(path).message) == (2, "the file is not valid UTF-8")


def test_control_character(tmp_path):
    path = tmp_path / "vhostd.yaml"
    path.write_bytes(b"devices:\n\n  - name: d\x01\n")
    p = only_problem(path)
    assert p.line == 3
    assert p.message.startswith("invalid YAML: unacceptable character #x0001")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "vhostd.yaml"
    path.write_text(text)
    p = only_problem(path)
    assert (p.line, p.key) == (None, "")
    assert str(p) == f"{path}: the file is empty; expected a mapping with a 'devices' list"


def test_missing_file(tmp_path):
    p = only_problem(tmp_path / "nope.yaml")
    assert p.line is None
    assert p.message == "cannot read config file: No such file or directory"


@pytest.mark.parametrize("text, shown", [("- a\n- b\n", "a list"), ("devices\n", "'devices'"), ("42\n", "42")])
def test_top_level_must_be_a_mapping(tmp_path, text, shown):
    p = only_problem(write(tmp_path, text))
    assert (p.line, p.key) == (1, "")
    assert p.message == f"the top level must be a mapping with 'daemon' and 'devices' keys, got {shown}"


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("devices:\n  name: d\n", 2, "must be a list of devices (each starting with '- name: ...'), got a mapping"),
        ("devices: disk0\n", 1, "must be a list of devices (each starting with '- name: ...'), got 'disk0'"),
        ("devices:\n", 1, "must be a list of devices (each starting with '- name: ...'), got nothing"),
        ("devices: []\n", 1, "must list at least one device"),
        ("daemon: {}\n", 1, "missing required key 'devices' (the list of devices to serve)"),
    ],
)
def test_devices_must_be_a_nonempty_list(tmp_path, text, line, message):
    p = only_problem(write(tmp_path, text))
    assert (p.line, p.key, p.message) == (line, "devices", message)


def test_device_must_be_a_mapping(tmp_path):
    p = only_problem(write(tmp_path, "devices:\n  - disk0\n"))
    assert (p.line, p.key) == (2, "devices[0]")
    assert p.message == "each device must be a mapping of keys (name, type, socket, ...), got 'disk0'"


# --------------------------------------------------------------------------
# checks across devices
# --------------------------------------------------------------------------


def test_duplicate_names(tmp_path):
    image(tmp_path / "a.img")
    image(tmp_path / "b.img")
    path = write(
        tmp_path,
        """
        devices:
          - {name: d, type: blk, socket: a.sock, path: a.img}
          - {name: d, type: blk, socket: b.sock, path: b.img}
        """,
    )
    p = only_problem(path)
    assert (p.line, p.key, p.message) == (3, "devices[1].name", "duplicate device name 'd'; already used by device 'd' (line 2)")


def test_duplicate_sockets(tmp_path):
    image(tmp_path / "a.img")
    image(tmp_path / "b.img")
    path = write(
        tmp_path,
        """
        devices:
          - {name: a, type: blk, socket: x.sock, path: a.img}
          - {name: b, type: blk, socket: ./sub/../x.sock, path: b.img}
        """,
    )
    p = only_problem(path)
    assert (p.line, p.key) == (3, "devices[1].socket")
    assert p.message == f"socket {tmp_path}/x.sock is already used by device 'a' (line 2)"


def test_socket_equal_to_an_image(tmp_path):
    image(tmp_path / "a.img")
    image(tmp_path / "b.img")
    path = write(
        tmp_path,
        """
        devices:
          - {name: a, type: blk, socket: a.sock, path: a.img}
          - {name: b, type: blk, socket: a.img, path: b.img}
        """,
    )
    found = problems(path)
    assert [(p.line, p.key) for p in found] == [(3, "devices[1].socket"), (3, "devices[1].socket")]
    assert found[0].message == f"socket {tmp_path}/a.img is also the image path of device 'a' (line 2)"
    # check_files also notices that a regular file sits where the socket goes
    assert found[1].message.endswith("already exists and is not a socket; vhostd will not replace it (device 'b')")
    assert len(problems(path, check_files=False)) == 1


def test_socket_equal_to_own_image(tmp_path):
    path = write(tmp_path, "devices:\n  - {name: a, type: blk, socket: a.img, path: a.img, size: 1M}\n")
    p = only_problem(path, check_files=False)
    assert p.message == f"socket {tmp_path}/a.img is also the image path of this device"


def test_two_writable_devices_on_one_image(tmp_path):
    image(tmp_path / "shared.img")
    path = write(
        tmp_path,
        """
        devices:
          - {name: a, type: blk, socket: a.sock, path: shared.img}
          - {name: b, type: blk, socket: b.sock, path: shared.img, readonly: true}
          - {name: c, type: blk, socket: c.sock, path: ./shared.img}
        """,
    )
    p = only_problem(path)
    assert (p.line, p.key) == (4, "devices[2].path")
    assert p.message.startswith(f"image {tmp_path}/shared.img is also used by writable device 'a' (line 2)")


def test_readonly_devices_may_share_an_image(tmp_path):
    image(tmp_path / "shared.img")
    path = write(
        tmp_path,
        """
        devices:
          - {name: a, type: blk, socket: a.sock, path: shared.img, readonly: true}
          - {name: b, type: blk, socket: b.sock, path: shared.img, readonly: true}
          - {name: c, type: blk, socket: c.sock, path: shared.img}
        """,
    )
    assert len(load_config(path).devices) == 3


def test_shared_image_through_symlink(tmp_path):
    image(tmp_path / "real.img")
    (tmp_path / "link.img").symlink_to(tmp_path / "real.img")
    path = write(
        tmp_path,
        """
        devices:
          - {name: a, type: blk, socket: a.sock, path: real.img}
          - {name: b, type: blk, socket: b.sock, path: link.img}
        """,
    )
    assert only_problem(path).key == "devices[1].path"


def test_socket_path_length_limit(tmp_path):
    base = f"{tmp_path}/"
    ok = base + "s" * (107 - len(base))
    too_long = base + "s" * (108 - len(base))
    assert len(ok) == 107
    path = write(tmp_path, f"devices:\n  - {{name: a, type: blk, socket: {ok}, path: a.img, size: 1M}}\n")
    assert load_config(path, check_files=False).devices[0].socket == ok
    path = write(tmp_path, f"devices:\n  - name: a\n    type: blk\n    socket: {too_long}\n    path: a.img\n    size: 1M\n")
    p = only_problem(path, check_files=False)
    assert (p.line, p.key) == (4, "devices[0].socket")
    assert p.message == (
        f"socket path {too_long} is 108 bytes long, but AF_UNIX socket paths are limited "
        "to 107 bytes; choose a shorter path (device 'a')"
    )


def test_socket_length_counts_resolved_path(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    path = write(deep, "devices:\n  - {name: a, type: blk, socket: x.sock, path: a.img, size: 1M}\n")
    assert "AF_UNIX" in only_problem(path, check_files=False).message


# --------------------------------------------------------------------------
# every problem at once
# --------------------------------------------------------------------------


def test_all_problems_reported_in_one_pass(tmp_path):
    image(tmp_path / "a.img")
    path = write(
        tmp_path,
        """
        daemon:
          workers: many
          log_level: loud
        devices:
          - name: a
            type: blk
            socket: a.sock
            path: a.img
            queues: two
            readonyl: true
          - name: a
            type: blk
            socket: a.sock
            path: missing.img
            size: 1.5G
          - name: c
            type: blk
            queue_size: 100
          - 42
        """,
    )
    found = problems(path)
    assert [(p.line, p.key) for p in found] == [
        (2, "daemon.workers"),
        (3, "daemon.log_level"),
        (9, "devices[0].queues"),
        (10, "devices[0].readonyl"),
        (11, "devices[1].name"),
        (13, "devices[1].socket"),
        (15, "devices[1].size"),
        (16, "devices[2].socket"),
        (16, "devices[2].path"),
        (18, "devices[2].queue_size"),
        (19, "devices[3]"),
    ]
    text = str(ConfigError(found))
    assert text.splitlines() == [str(p) for p in found]
    assert text.splitlines()[2] == f"{path}:9: devices[0].queues: must be an integer from 1 to 64, got 'two' (device 'a')"


def test_problems_are_sorted_by_line(tmp_path):
    image(tmp_path / "a.img")
    image(tmp_path / "b.img")
    # The duplicate-name check runs after all keys are read, yet comes first.
    path = write(
        tmp_path,
        """
        devices:
          - {name: a, type: blk, socket: a.sock, path: a.img}
          - {name: a, type: blk, socket: b.sock, path: b.img}
          - {name: c, type: blk, socket: c.sock, path: c.img, queues: 0}
        """,
    )
    assert [p.line for p in problems(path, check_files=False)] == [3, 4]


def test_problem_and_error_formatting():
    p = Problem("c.yaml", 7, "devices[0].queues", "must be an integer from 1 to 64, got 'two'")
    assert str(p) == "c.yaml:7: devices[0].queues: must be an integer from 1 to 64, got 'two'"
    assert str(Problem("c.yaml", None, "", "the file is empty")) == "c.yaml: the file is empty"
    assert str(Problem("c.yaml", 3, "", "invalid YAML: x")) == "c.yaml:3: invalid YAML: x"
    err = ConfigError([p, Problem("c.yaml", 9, "devices", "x")])
    assert str(err) == "c.yaml:7: devices[0].queues: must be an integer from 1 to 64, got 'two'\nc.yaml:9: devices: x"
    assert err.problems[0] is p


def test_file_name_is_shown_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "devices: []\n", name="my.yaml")
    assert str(only_problem("my.yaml")) == "my.yaml:1: devices: must list at least one device"


# --------------------------------------------------------------------------
# checks on disk (check_files=True)
# --------------------------------------------------------------------------


def test_missing_image_without_size(tmp_path):
    path = one_device(tmp_path, with_image=False)
    p = only_problem(path)
    assert (p.line, p.key) == (5, "devices[0].path")
    assert p.message == (
        f"image {tmp_path}/disk0.img does not exist; create it, or set 'size' to have vhostd create it (device 'disk0')"
    )
    assert load_config(path, check_files=False).devices[0].store.path == f"{tmp_path}/disk0.img"


def test_missing_image_with_size_and_missing_dirs_is_fine(tmp_path):
    path = write(tmp_path, "devices:\n  - {name: d, type: blk, socket: run/a/d.sock, path: var/b/c/d.img, size: 1G}\n")
    dev = load_config(path).devices[0]
    assert dev.store.size == 1 << 30
    assert not (tmp_path / "var").exists() and not (tmp_path / "run").exists()


def test_image_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "var").write_text("not a dir")
    path = write(tmp_path, "devices:\n  - {name: d, type: blk, socket: d.sock, path: var/d.img, size: 1G}\n")
    p = only_problem(path)
    assert p.key == "devices[0].path"
    assert p.message == f"image {tmp_path}/var/d.img does not exist and cannot be created: {tmp_path}/var is not a directory (device 'd')"


def test_image_in_unwritable_directory_cannot_be_created(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(config_mod.os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    path = write(tmp_path, "devices:\n  - {name: d, type: blk, socket: d.sock, path: locked/sub/d.img, size: 1G}\n")
    assert only_problem(path).message.endswith(f"cannot be created: directory {locked} is not writable (device 'd')")


def test_image_is_a_directory(tmp_path):
    (tmp_path / "disk0.img").mkdir()
    p = only_problem(one_device(tmp_path, "size: 1M", with_image=False))
    assert p.message == f"image {tmp_path}/disk0.img is a directory; expected a regular file or a block device (device 'disk0')"


def test_image_is_not_a_file_or_block_device(tmp_path):
    os.mkfifo(tmp_path / "disk0.img")
    p = only_problem(one_device(tmp_path, with_image=False))
    assert p.message == f"image {tmp_path}/disk0.img is not a regular file or a block device (device 'disk0')"


def test_character_device_is_rejected(tmp_path):
    path = write(tmp_path, "devices:\n  - {name: d, type: blk, socket: d.sock, path: /dev/null}\n")
    assert "is not a regular file or a block device" in only_problem(path).message


def test_image_size_must_be_a_multiple_of_512(tmp_path):
    image(tmp_path / "disk0.img", 1000)
    p = only_problem(one_device(tmp_path, with_image=False))
    assert (p.line, p.key) == (5, "devices[0].path")
    assert p.message == f"image {tmp_path}/disk0.img is 1000 bytes long, which is not a multiple of 512 (device 'disk0')"


def test_existing_image_ignores_size(tmp_path):
    image(tmp_path / "disk0.img", 4096)
    assert load_config(one_device(tmp_path, "size: 1G", with_image=False)).devices[0].store.size == 1 << 30


def _deny_write(monkeypatch, target: Path):
    real_access = os.access

    def access(p, mode):
        if str(p) == str(target) and mode & os.W_OK:
            return False
        return real_access(p, mode)

    monkeypatch.setattr(config_mod.os, "access", access)


def test_writable_device_needs_writable_image(tmp_path, monkeypatch):
    path = one_device(tmp_path)
    _deny_write(monkeypatch, tmp_path / "disk0.img")
    p = only_problem(path)
    assert p.message == (
        f"image {tmp_path}/disk0.img is not writable; fix its permissions or set 'readonly: true' (device 'disk0')"
    )


def test_readonly_device_accepts_readonly_image(tmp_path, monkeypatch):
    path = one_device(tmp_path, "readonly: true")
    _deny_write(monkeypatch, tmp_path / "disk0.img")
    assert load_config(path).devices[0].readonly is True


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write any file")
def test_readonly_file_for_real(tmp_path):
    path = one_device(tmp_path)
    (tmp_path / "disk0.img").chmod(0o444)
    assert "is not writable" in only_problem(path).message


def test_socket_path_taken_by_a_file(tmp_path):
    (tmp_path / "disk0.sock").write_text("")
    p = only_problem(one_device(tmp_path))
    assert (p.line, p.key) == (4, "devices[0].socket")
    assert p.message == f"{tmp_path}/disk0.sock already exists and is not a socket; vhostd will not replace it (device 'disk0')"


def test_stale_socket_is_fine(tmp_path):
    sock_path = tmp_path / "disk0.sock"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock_path))
        assert load_config(one_device(tmp_path)).devices[0].socket == str(sock_path)
    finally:
        s.close()


def test_socket_directory_must_be_creatable(tmp_path):
    (tmp_path / "run").write_text("")
    path = one_device(tmp_path)
    path.write_text(path.read_text().replace("socket: disk0.sock", "socket: run/x/disk0.sock"))
    p = only_problem(path)
    assert p.key == "devices[0].socket"
    assert p.message == f"cannot create socket {tmp_path}/run/x/disk0.sock: {tmp_path}/run is not a directory (device 'disk0')"


def test_check_files_false_skips_disk_checks(tmp_path):
    (tmp_path / "disk0.sock").mkdir()
    path = one_device(tmp_path, with_image=False)
    assert len(problems(path)) == 2
    assert load_config(path, check_files=False).devices[0].name == "disk0"


def test_file_checks_skip_keys_that_are_already_wrong(tmp_path):
    # size is invalid, so "missing image" would only add noise
    p = only_problem(one_device(tmp_path, "size: lots", with_image=False))
    assert p.key == "devices[0].size"


# --------------------------------------------------------------------------
# the bundled configs
# --------------------------------------------------------------------------


def test_bundled_default_config_loads():
    cfg = load_config(REPO / "config" / "vhostd.yaml")
    (dev,) = cfg.devices
    assert (dev.name, dev.type, dev.queues, dev.store.size, dev.readonly) == ("disk0", "blk", 1, 1 << 30, False)
    assert dev.socket == str(REPO / "run" / "disk0.sock")
    assert dev.store.path == str(REPO / "var" / "disk0.img")


def test_bundled_default_config_loads_on_a_fresh_checkout(tmp_path):
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "vhostd.yaml", tmp_path / "config" / "vhostd.yaml")
    dev = load_config(tmp_path / "config" / "vhostd.yaml").devices[0]
    assert dev.store.path == str(tmp_path / "var" / "disk0.img")
    assert not (tmp_path / "run").exists() and not (tmp_path / "var").exists()


def moved(settings, tmp_path: Path):
    """A backend's settings with the checkout's paths (path, a URI's socket) under tmp_path."""
    return dataclasses.replace(settings, **{
        f.name: getattr(settings, f.name).replace(str(REPO), str(tmp_path))
        for f in dataclasses.fields(settings) if isinstance(getattr(settings, f.name), str)})


def test_full_example_loads(tmp_path):
    cfg = load_config(REPO / "config" / "example-full.yaml", check_files=False)
    assert len(cfg.devices) >= 3
    assert len({d.name for d in cfg.devices}) == len(cfg.devices)
    # also on a fresh checkout, with the disk checks
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "example-full.yaml", tmp_path / "config" / "example-full.yaml")
    assert load_config(tmp_path / "config" / "example-full.yaml") == dataclasses.replace(
        cfg,
        path=str(tmp_path / "config" / "example-full.yaml"),
        daemon=dataclasses.replace(cfg.daemon, control_socket=cfg.daemon.control_socket.replace(str(REPO),
                                                                                                str(tmp_path))),
        devices=tuple(
            dataclasses.replace(
                d,
                socket=d.socket.replace(str(REPO), str(tmp_path)),
                **({"store": moved(d.store, tmp_path)} if getattr(d, "store", None) else {}),
            )
            for d in cfg.devices
        ),
    )


def test_full_example_documents_every_key():
    text = (REPO / "config" / "example-full.yaml").read_text()
    keys = set(config_mod._DAEMON_KEYS) | set(config_mod._COMMON_DEVICE_KEYS)
    for dev_type in DEVICE_TYPES.values():
        keys |= set(dev_type.keys)
        for backend in dev_type.variants.values():
            keys |= set(backend.KEYS)
    for key in keys:
        assert f"{key}:" in text, f"example-full.yaml does not show {key!r}"
    for type_name in DEVICE_TYPES:
        assert f"type: {type_name}" in text


# --------------------------------------------------------------------------
# blk backend: file (an image) or null (no storage, like QEMU's null-co)
# --------------------------------------------------------------------------


def null_device(tmp_path: Path, extra: str = "") -> Path:
    body = textwrap.indent(textwrap.dedent(extra).strip("\n"), "    ")
    return write(
        tmp_path,
        "devices:\n"
        "  - name: n0\n"
        "    type: blk\n"
        "    socket: n0.sock\n"
        "    backend: null\n" + (body + "\n" if body else ""),
    )


def test_null_backend_takes_its_capacity_from_size(tmp_path):
    (dev,) = load_config(null_device(tmp_path, "size: 1T")).devices
    assert (dev.backend, dev.store, dev.serial) == ("null", storage.null.Settings(size=1 << 40), "n0")
    assert list(tmp_path.iterdir()) == [tmp_path / "vhostd.yaml"]  # no image checked or created


@pytest.mark.parametrize("spelling", ["null", "Null", "NULL", "'null'", '"null"'])
def test_null_backend_spellings(tmp_path, spelling):
    path = write(tmp_path, f"devices:\n  - {{name: n0, type: blk, socket: n0.sock, backend: {spelling}, size: 1M}}\n")
    assert load_config(path).devices[0].backend == "null"


def test_backend_defaults_to_file(tmp_path):
    assert load_config(one_device(tmp_path)).devices[0].backend == "file"
    assert load_config(one_device(tmp_path / "b", "backend: file")).devices[0].backend == "file"


@pytest.mark.parametrize(
    "extra, key, message",
    [
        ("size: 1M\npath: n0.img", "devices[0].path", "'path' only applies to backend file, not null (device 'n0')"),
        ("size: 1M\ndirect: true", "devices[0].direct",
         "'direct' only applies to backend file, not null (device 'n0')"),
        ("size: 1M\ndirect: false", "devices[0].direct",
         "'direct' only applies to backend file, not null (device 'n0')"),
        ("", "devices[0].size", "missing required key 'size' (the disk's capacity) (device 'n0')"),
        ("size: 1000", "devices[0].size", "must be a multiple of 512 bytes, got 1000 (1000 bytes) (device 'n0')"),
    ],
)
def test_null_backend_errors(tmp_path, extra, key, message):
    path = null_device(tmp_path, extra)
    p = only_problem(path)
    assert (p.key, p.message) == (key, message)
    needle = {"devices[0].path": "path:", "devices[0].direct": "direct:"}.get(key, "- name:" if not extra else "size:")
    assert p.line == line_of(path, needle)
    assert str(p).startswith(f"{path}:{p.line}: {key}: ")


def test_file_backend_still_needs_a_path(tmp_path):
    path = write(tmp_path, "devices:\n  - name: d\n    type: blk\n    socket: d.sock\n    backend: file\n")
    p = only_problem(path)
    assert (p.line, p.key) == (2, "devices[0].path")
    assert p.message.startswith("missing required key 'path'")


@pytest.mark.parametrize("value, shown", [("nul", "'nul' (did you mean 'null'?)"), ("~", "nothing (put it in quotes)"),
                                          ("", "nothing"), ("3", "3 (put it in quotes)")])
def test_bad_backend(tmp_path, value, shown):
    path = write(tmp_path, f"devices:\n  - name: d\n    type: blk\n    socket: d.sock\n    backend: {value}\n")
    p = only_problem(path)  # no complaint about 'path' or 'size': the backend is unknown
    assert p.key == "devices[0].backend"
    assert p.message == f"must be one of file, null, nbd, rbd, got {shown} (device 'd')"


def test_null_devices_do_not_share_images(tmp_path):
    path = write(tmp_path, """
        devices:
          - {name: a, type: blk, socket: a.sock, backend: null, size: 1M}
          - {name: b, type: blk, socket: b.sock, backend: null, size: 1M}
        """)
    assert [d.name for d in load_config(path).devices] == ["a", "b"]


def test_net_device_keys_and_backend_rules(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text(
        "devices:\n"
        "  - {name: t0, type: net, socket: t0.sock, backend: tap, tap: vt0, queues: 2, mtu: 9000}\n"
        "  - {name: s0, type: net, socket: s0.sock, backend: switch}\n"
        "  - {name: l0, type: net, socket: l0.sock, backend: loopback, tap: x0}\n"
        "  - {name: m0, type: net, socket: m0.sock, backend: loopback, mac: '01:00:5e:00:00:01'}\n"
        "  - {name: b0, type: net, socket: b0.sock, backend: bridge}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    got = {(p.line, p.key) for p in exc.value.problems}
    assert (3, "devices[1].switch") in got
    assert (4, "devices[2].tap") in got
    assert (5, "devices[3].mac") in got
    assert (6, "devices[4].backend") in got
    assert len(got) == 4, str(exc.value)


def test_net_defaults(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("devices:\n  - {name: l0, type: net, socket: l0.sock, backend: loopback}\n")
    (dev,) = load_config(path).devices
    assert (dev.queues, dev.mtu, dev.queue_size, dev.offloads) == (1, 1500, 256, True)
    assert dev.mac == config_mod.default_mac("l0") and dev.mac.startswith("52:54:00:")


# --------------------------------------------------------------------------
# vms: the built-in VMM
# --------------------------------------------------------------------------

from vhostd.config import VmConfig, VmDeviceConfig  # noqa: E402


def vm_config(tmp_path: Path, text: str, *, payload: bool = True) -> Path:
    if payload:
        (tmp_path / "prog.elf").write_bytes(b"\x7fELF")
    return write(tmp_path, text)


def test_vm_minimal_gets_defaults_and_needs_no_devices_section(tmp_path):
    path = vm_config(tmp_path, """
        vms:
          - name: vm0
            memory: 64M
            payload: prog.elf
        """)
    cfg = load_config(path)
    assert cfg.devices == ()
    assert cfg.vms == (VmConfig(name="vm0", memory=64 << 20, vcpus=1, payload=str(tmp_path / "prog.elf"),
                                kernel=None, cmdline="", initrd=None, args="", autostart=False, devices=()),)
    assert cfg.vms[0].line == 2
    assert cfg.vm("vm0") is cfg.vms[0]
    with pytest.raises(KeyError):
        cfg.vm("other")


def test_vm_all_keys_are_read(tmp_path):
    image(tmp_path / "d.img")
    (tmp_path / "bzImage").write_bytes(b"k")
    (tmp_path / "initrd.gz").write_bytes(b"i")
    path = vm_config(tmp_path, """
        devices:
          - {name: d, type: blk, socket: d.sock, path: d.img, queue_size: 128}
        vms:
          - name: a
            memory: 1G
            vcpus: 2
            payload: prog.elf
            args: net=loopback seed=7
            autostart: true
            devices:
              - {type: blk, socket: d.sock}
              - type: net
                socket: /tmp/other.sock
                queue_size: 1024
          - name: b
            memory: 256M
            kernel: bzImage
            cmdline: earlyprintk=serial,ttyS0 nokaslr
            initrd: initrd.gz
        """)
    a, b = load_config(path).vms
    assert (a.memory, a.vcpus, a.args, a.autostart) == (1 << 30, 2, "net=loopback seed=7", True)
    assert a.devices == (
        # the vhostd device on the same socket sets the default queue size
        VmDeviceConfig(type="blk", socket=str(tmp_path / "d.sock"), queue_size=128),
        VmDeviceConfig(type="net", socket="/tmp/other.sock", queue_size=1024),
    )
    assert [d.line for d in a.devices] == [11, 12]
    assert (b.kernel, b.initrd, b.cmdline, b.payload) == (str(tmp_path / "bzImage"), str(tmp_path / "initrd.gz"),
                                                          "earlyprintk=serial,ttyS0 nokaslr", None)


def test_vm_device_queue_size_defaults_to_256_for_foreign_backends(tmp_path):
    path = vm_config(tmp_path, """
        vms:
          - {name: a, memory: 8M, payload: prog.elf, devices: [{type: blk, socket: /run/qsd.sock}]}
        """)
    assert load_config(path).vms[0].devices[0].queue_size == 256


def test_vm_key_tables_agree_with_dataclass_defaults():
    declared = {f.name: f.default for f in dataclasses.fields(VmConfig)}
    assert set(declared) - set(config_mod._VM_KEYS) == {"devices", "line"}
    for key, spec in config_mod._VM_KEYS.items():
        if spec.default is config_mod.REQUIRED:
            assert declared[key] is dataclasses.MISSING, key
        else:
            assert declared[key] == spec.default, key
    declared = {f.name for f in dataclasses.fields(VmDeviceConfig)}
    assert declared - set(config_mod._VM_DEVICE_KEYS) == {"line"}


@pytest.mark.parametrize(
    "lines, key, message",
    [
        ("memory: 3M", "memory", "must be a multiple of 2M (the guest is mapped with 2 MiB pages), got '3M'"),
        ("memory: 2M", "memory", "must be from 4M to 3G, got '2M'"),
        ("memory: 4G", "memory", "must be from 4M to 3G, got '4G'"),
        ("memory: lots", "memory", "must be a positive size in bytes"),
        ("vcpus: 0", "vcpus", "must be an integer from 1 to 64, got 0"),
        ("autostart: yes please", "autostart", "must be true or false, got 'yes please'"),
        ("args: " + "x" * 256, "args", "must be at most 255 bytes, got 256"),
        ("cmdline: quiet", "cmdline", "'cmdline' only applies with 'kernel'; a payload takes 'args'"),
        ("initrd: prog.elf", "initrd", "'initrd' only applies with 'kernel'; a payload takes 'args'"),
        ("kernel: prog.elf", "kernel", "'payload' and 'kernel' exclude each other; give one of them"),
        ("memroy: 8M", "memroy", "unknown key 'memroy' (did you mean 'memory'?)"),
        ("devices: {type: blk}", "devices", "must be a list of devices (each like '- {type: blk, socket: PATH}'), "
                                            "got a mapping"),
    ],
)
def test_vm_errors(tmp_path, lines, key, message):
    path = vm_config(tmp_path, """
        vms:
          - name: vm0
            memory: 8M
            payload: prog.elf
        """)
    text = path.read_text()
    first, rest = lines.split(":", 1)
    if first == "memory":
        text = text.replace("    memory: 8M\n", f"    {lines}\n")
    else:
        text += f"    {lines}\n"
    path.write_text(text)
    p = only_problem(path)
    assert p.key == f"vms[0].{key}"
    assert p.line == line_of(path, lines[:30])
    assert p.message.startswith(message), p.message
    assert p.message.endswith(" (VM 'vm0')")


def test_vm_device_errors_name_the_device_path(tmp_path):
    path = vm_config(tmp_path, """
        vms:
          - name: vm0
            memory: 8M
            payload: prog.elf
            devices:
              - {type: blk, socket: a.sock}
              - {type: scsi, socket: b.sock}
              - {type: net}
              - {type: blk, socket: c.sock, sockt: x}
              - just a string
        """)
    got = {(p.line, p.key): p.message for p in problems(path)}
    assert got == {
        (7, "vms[0].devices[1].type"): "must be one of blk, net, got 'scsi' (VM 'vm0')",
        (8, "vms[0].devices[2].socket"): "missing required key 'socket' (the vhost-user socket of the back-end) "
                                         "(VM 'vm0')",
        (9, "vms[0].devices[3].sockt"): "unknown key 'sockt' (did you mean 'socket'?) (VM 'vm0')",
        (10, "vms[0].devices[4]"): "each device must be a mapping with 'type' and 'socket', got 'just a string' "
                                   "(VM 'vm0')",
    }


def test_vm_needs_a_payload_or_kernel_and_a_unique_name(tmp_path):
    path = vm_config(tmp_path, """
        vms:
          - name: vm0
            memory: 8M
          - name: vm0
            memory: 8M
            payload: prog.elf
          - memory: 8M
            payload: prog.elf
        """)
    got = {(p.line, p.key): p.message for p in problems(path)}
    assert got == {
        (2, "vms[0].payload"): "missing key 'payload' (the guest program, an ELF file) or 'kernel' "
                               "(a Linux bzImage) (VM 'vm0')",
        (4, "vms[1].name"): "duplicate VM name 'vm0'; already used by the VM on line 2",
        (7, "vms[2].name"): "missing required key 'name' (a unique VM name)",
    }


def test_vm_files_are_checked(tmp_path):
    (tmp_path / "dir").mkdir()
    path = vm_config(tmp_path, """
        vms:
          - {name: a, memory: 8M, payload: missing.elf}
          - {name: b, memory: 8M, kernel: dir, initrd: gone.img}
        """, payload=False)
    got = {(p.line, p.key): p.message for p in problems(path)}
    assert got == {
        (2, "vms[0].payload"): f"payload {tmp_path / 'missing.elf'} does not exist (VM 'a')",
        (3, "vms[1].kernel"): f"kernel {tmp_path / 'dir'} is not a regular file (VM 'b')",
        (3, "vms[1].initrd"): f"initrd {tmp_path / 'gone.img'} does not exist (VM 'b')",
    }
    assert load_config(path, check_files=False).vms[0].payload == str(tmp_path / "missing.elf")


def test_vms_must_be_a_list_and_devices_stay_required_without_vms(tmp_path):
    p = problems(write(tmp_path, "vms: {name: a}\n"))[0]
    assert (p.line, p.key) == (1, "vms")
    assert p.message == "must be a list of VMs (each starting with '- name: ...'), got a mapping"
    p = only_problem(write(tmp_path, "vms: []\n"))
    assert p.message == "missing required key 'devices' (the list of devices to serve)"


# --------------------------------------------------------------------------
# access control and the daemon's service keys
# --------------------------------------------------------------------------


def load(tmp_path, text):
    return load_config(write(tmp_path, text))


def load_errors(tmp_path, text):
    return [str(p) for p in problems(write(tmp_path, text))]


def test_access_keys_resolve_names_and_numbers(tmp_path):
    cfg = load(tmp_path, """
        daemon: {control_socket: ctl.sock, user: nobody, group: 65534, log_format: journal}
        devices:
          - {name: d0, type: blk, socket: d0.sock, path: d0.img, size: 1M, socket_owner: root,
             socket_group: 0, allow_uids: [root, 65534], allow_gids: [nogroup]}
    """)
    assert cfg.daemon.control_socket == str(tmp_path / "ctl.sock")
    assert (cfg.daemon.user, cfg.daemon.group, cfg.daemon.log_format) == (65534, 65534, "journal")
    dev = cfg.devices[0]
    assert (dev.socket_owner, dev.socket_group, dev.allow_uids, dev.allow_gids) == (0, 0, (0, 65534), (65534,))


@pytest.mark.parametrize("snippet,where,message", [
    ("daemon: {user: no-such-user-here}", "daemon.user", "no user named 'no-such-user-here'"),
    ("daemon: {group: no-such-group}", "daemon.group", "no group named 'no-such-group'"),
    ("daemon: {log_format: xml}", "daemon.log_format", "must be one of auto, journal, text"),
    ("daemon: {control_socket: [1]}", "daemon.control_socket", "must be"),
])
def test_bad_daemon_service_keys(tmp_path, snippet, where, message):
    errors = load_errors(tmp_path, snippet + "\ndevices:\n  - {name: d0, type: blk, socket: d0.sock, path: d0.img, size: 1M}\n")
    assert any(f":1: {where}: " in e and message in e for e in errors), errors


def test_bad_allow_list_names_the_device_key(tmp_path):
    errors = load_errors(tmp_path, """
        devices:
          - {name: d0, type: blk, socket: d0.sock, path: d0.img, size: 1M,
             allow_uids: root}
          - {name: d1, type: blk, socket: d1.sock, path: d1.img, size: 1M, allow_gids: [nosuchgroupx]}
    """)
    assert any(":3: devices[0].allow_uids: must be a list of user names or uids" in e for e in errors), errors
    assert any(":4: devices[1].allow_gids: no group named 'nosuchgroupx'" in e for e in errors), errors
