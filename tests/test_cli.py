"""The command line as a user runs it: `vhostd check` and `vhostd serve` on
good and bad configs (real subprocesses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def vhostd(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhostd", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_check_bundled_configs():
    for name in ("vhostd.yaml", "example-full.yaml"):
        r = vhostd("check", "--config", str(ROOT / "config" / name))
        assert r.returncode == 0, r.stderr
        assert "ok" in r.stdout


def test_check_lists_every_problem_with_file_line_and_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "devices:\n"
        "  - name: disk0\n"
        "    type: blk\n"
        "    socket: d0.sock\n"
        "    path: d0.img\n"
        "    size: 64X\n"
        "    queues: two\n"
        "    readonyl: true\n"
        "  - name: disk0\n"
        "    type: blk\n"
        "    socket: d0.sock\n"
        "    path: missing.img\n"
    )
    r = vhostd("check", "--config", str(cfg))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert any(l.startswith(f"{cfg}:6: devices[0].size:") for l in lines), r.stderr
    assert any(l.startswith(f"{cfg}:7: devices[0].queues:") for l in lines), r.stderr
    assert any(l.startswith(f"{cfg}:8: devices[0].readonyl:") and "readonly" in l for l in lines), r.stderr
    assert any(l.startswith(f"{cfg}:9: devices[1].name:") and "duplicate" in l for l in lines), r.stderr
    assert any("devices[1].socket" in l for l in lines), r.stderr
    assert any("devices[1].path" in l and "missing.img" in l for l in lines), r.stderr


def test_serve_refuses_bad_config_before_touching_anything(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "devices:\n"
        "  - name: good\n"
        "    type: blk\n"
        "    socket: run/good.sock\n"
        "    path: var/good.img\n"
        "    size: 1M\n"
        "  - name: bad\n"
        "    type: blk\n"
        "    socket: run/bad.sock\n"
        "    path: var/bad.img\n"
        "    queues: 0\n"
        "    size: 1M\n"
    )
    r = vhostd("serve", "--config", str(cfg))
    assert r.returncode == 1
    assert f"{cfg}:11: devices[1].queues:" in r.stderr
    # Nothing was created: no socket, no image, no directories.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_serve_fails_cleanly_when_socket_is_taken(tmp_path):
    (tmp_path / "d.sock").write_text("not a socket")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("devices:\n  - {name: d, type: blk, socket: d.sock, path: d.img, size: 1M}\n")
    r = vhostd("serve", "--config", str(cfg))
    assert r.returncode == 1
    assert "d.sock" in r.stderr and "Traceback" not in r.stderr
