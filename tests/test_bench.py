"""`vhostd bench blk`, the load generator, against real back-ends: vhostd and
qemu-storage-daemon.  Output shape and correctness only; speed is measured
in benchmarks/, never here."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys

import pytest

from guest.qsd import StorageDaemon
from vhostd.loadgen import magic

LINE = re.compile(r"^IOPS=(\d+) BW=([\d.]+)MiB/s lat_p50=([\d.]+)us lat_p99=([\d.]+)us ios=(\d+) errors=(\d+) "
                  r"\((\w+) bs=(\d+) iodepth=(\d+) queues=(\d+) seconds=([\d.]+)(?: ring=(\w+))?\)$")


def bench(sock: str, *args: str, seconds: float = 0.5) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhostd", "bench", "blk", "--socket", sock,
                           "--seconds", str(seconds), *args], capture_output=True, text=True, timeout=60)


def ok_line(out: subprocess.CompletedProcess) -> re.Match:
    assert out.returncode == 0, out.stderr
    m = LINE.match(out.stdout.strip().splitlines()[-1])
    assert m, out.stdout
    assert int(m.group(1)) > 0 and int(m.group(5)) > 0 and int(m.group(6)) == 0
    return m


@pytest.mark.parametrize("rw", ["randread", "randwrite", "read", "write"])
def test_every_mode_against_vhostd(vhostd_factory, rw):
    vd = vhostd_factory([{"name": "d0", "size": "16M", "queues": 2}])
    m = ok_line(bench(vd.socket("d0"), "--rw", rw, "--iodepth", "8"))
    assert m.group(7) == rw and m.group(9) == "8"
    log = vd.log()
    assert "error" not in log.lower(), log


def test_writes_land_where_they_say(vhostd_factory):
    """Every sector the generator wrote carries the magic and its own offset."""
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    ok_line(bench(vd.socket("d0"), "--rw", "randwrite", "--bs", "8192", "--iodepth", "4"))
    vd.wait_session_idle("d0")
    assert sectors_written(vd.image("d0").read_bytes()) > 100


def sectors_written(image: bytes) -> int:
    """Sectors carrying the generator's magic; each must name its own offset."""
    written = 0
    for off in range(0, len(image), 512):
        tag, where = struct.unpack_from("<QQ", image, off)
        if tag == 0:
            continue
        assert (tag, where) == (magic(), off), f"sector at {off} holds {tag:#x}/{where:#x}"
        written += 1
    return written


def test_packed_rings_against_vhostd(vhostd_factory):
    """--packed: the same load on packed virtqueues; writes land where they say."""
    vd = vhostd_factory([{"name": "d0", "size": "4M", "queues": 2}])
    m = ok_line(bench(vd.socket("d0"), "--packed", "--rw", "randwrite", "--bs", "8192", "--iodepth", "4",
                      "--queues", "2"))
    assert m.group(12) == "packed" and m.group(10) == "2"
    vd.wait_session_idle("d0")
    assert sectors_written(vd.image("d0").read_bytes()) > 100
    ok_line(bench(vd.socket("d0"), "--packed", "--rw", "read", "--iodepth", "32"))  # 96 descriptors of 128: wraps
    ok_line(bench(vd.socket("d0"), "--packed", "--poll", "--iodepth", "1"))
    ok_line(bench(vd.socket("d0"), "--packed", "--dirty-log", "--rw", "write"))
    out = bench(vd.socket("d0"), "--packed", "--json", "--rw", "randread", "--bs", "65536")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ring"] == "packed" and result["ios"] > 0 and result["errors"] == 0 and result["drained"]
    log = vd.log()
    assert "error" not in log.lower(), log


def test_queues_poll_and_json(vhostd_factory):
    vd = vhostd_factory([{"name": "d0", "size": "16M", "queues": 4}])
    m = ok_line(bench(vd.socket("d0"), "--queues", "4", "--iodepth", "2"))
    assert m.group(10) == "4"
    ok_line(bench(vd.socket("d0"), "--poll"))
    out = bench(vd.socket("d0"), "--json", "--rw", "read", "--bs", "65536")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ios"] > 0 and result["errors"] == 0 and result["bs"] == 65536 and result["drained"]
    assert result["lat_p50_us"] <= result["lat_p99_us"] and result["ring"] == "split"


def test_dirty_log_as_during_a_migration(vhostd_factory, tmp_path, sockdir):
    vd = vhostd_factory([{"name": "d0", "size": "16M"}])
    ok_line(bench(vd.socket("d0"), "--dirty-log", "--rw", "randwrite"))
    assert "dirty log: " in vd.log()
    img = tmp_path / "q.img"
    img.write_bytes(b"\0" * (8 << 20))
    with StorageDaemon(img, f"{sockdir}/q.sock") as qsd:  # libvhost-user logs too: the anchor
        ok_line(bench(str(qsd.socket), "--dirty-log"))


def test_against_qemu_storage_daemon(tmp_path, sockdir):
    img = tmp_path / "q.img"
    img.write_bytes(b"\0" * (8 << 20))
    with StorageDaemon(img, f"{sockdir}/q.sock", num_queues=2) as qsd:
        ok_line(bench(str(qsd.socket), "--rw", "randread"))
        ok_line(bench(str(qsd.socket), "--rw", "randwrite", "--queues", "2", "--iodepth", "4"))
        # libvhost-user has no packed rings: --packed is refused, clearly
        out = bench(str(qsd.socket), "--packed")
        assert out.returncode != 0 and "does not offer packed virtqueues" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    data = img.read_bytes()
    assert struct.unpack_from("<Q", data, data.find(struct.pack("<Q", magic())))[0] == magic()


def test_bad_arguments_are_clear(vhostd_factory, sockdir):
    vd = vhostd_factory([{"name": "ro", "size": "4M", "readonly": True, "discard": False, "write_zeroes": False},
                         {"name": "tiny", "size": 2048}])
    cases = [
        ((f"{sockdir}/missing.sock",), "cannot connect to"),
        ((vd.socket("ro"), "--bs", "1000"), "multiple of 512"),
        ((vd.socket("ro"), "--rw", "randwrite"), "read-only"),
        ((vd.socket("tiny"), "--bs", "4096"), "smaller than one block"),
        ((vd.socket("ro"), "--iodepth", "0"), "--iodepth 0"),
    ]
    for args, message in cases:
        out = bench(*args)
        assert out.returncode != 0, args
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    ok_line(bench(vd.socket("ro"), "--rw", "randread", "--bs", "512"))
