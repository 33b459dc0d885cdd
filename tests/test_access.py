"""Who may connect: socket owner/group/mode, SO_PEERCRED allow-lists, and
dropping privileges, against the real daemon with front-ends running as
other users (setpriv)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Guest, blk_roundtrip

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run front-ends as other users")

NOBODY = 65534

# A front-end as another user: connect, GET_FEATURES, print the answer.
PROBE = """
import sys
from vhostd.frontend import Frontend, BackendError
try:
    with Frontend(sys.argv[1], timeout=3) as fe:
        print("features", hex(fe.get_features()))
except (OSError, BackendError) as exc:
    print("refused", type(exc).__name__)
"""


def probe_as(uid: int, gid: int, sock: str) -> str:
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", sys.executable, "-c", PROBE, sock]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env, cwd="/").stdout.strip()


def test_socket_owner_group_and_mode(vhostd_factory, sockdir):
    os.chmod(sockdir, 0o755)
    vd = vhostd_factory([{"name": "d0", "socket_owner": "nobody", "socket_group": NOBODY, "socket_mode": "0600"}])
    st = os.stat(vd.socket("d0"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
    assert probe_as(NOBODY, NOBODY, vd.socket("d0")).startswith("features")  # the owner may
    assert probe_as(1234, 1234, vd.socket("d0")).startswith("refused")  # others: EACCES from the kernel


def test_allow_list_refuses_others_and_logs_once(vhostd_factory, sockdir):
    os.chmod(sockdir, 0o755)
    vd = vhostd_factory([{"name": "d0", "socket_mode": "0666", "allow_uids": ["root"], "allow_gids": [1500]}])
    baseline = vd.fd_count()
    mark = vd.log_mark()
    for _ in range(3):
        assert probe_as(NOBODY, NOBODY, vd.socket("d0")).startswith("refused")
    lines = vd.wait_log(mark, r"d0: refused front-end pid \d+ uid 65534 gid 65534: not in allow_uids/allow_gids",
                        count=3)
    assert len(lines) == 3
    assert probe_as(2000, 1500, vd.socket("d0")).startswith("features")  # allowed by gid
    vd.wait_session_idle("d0")
    g = Guest(vd, "d0")  # root: allowed by uid
    blk_roundtrip(vd, g.blk(), 0, name="d0")
    g.close()
    assert vd.fd_count() == baseline
    vd.assert_alive()


def test_daemon_drops_privileges_and_still_serves(vhostd_factory, sockdir, tmp_path):
    os.chmod(sockdir, 0o777)
    vd = vhostd_factory([{"name": "d0", "socket_mode": "0666"}], daemon={"user": "nobody", "group": "nogroup"})
    vd.wait_log(0, r"dropped privileges to uid 65534 gid 65534")
    with open(f"/proc/{vd.pid}/status") as f:
        ids = {line.split(":")[0]: line.split()[1:] for line in f if line.startswith(("Uid", "Gid", "Groups"))}
    assert ids["Uid"] == ["65534"] * 4 and ids["Gid"] == ["65534"] * 4 and ids["Groups"] == ["65534"]
    g = Guest(vd, "d0")
    blk_roundtrip(vd, g.blk(), 0, name="d0")  # the image was opened before the drop
    g.close()


def test_user_without_root_is_refused(sockdir):
    tmp_path = Path(sockdir)  # /tmp/vd-*: reachable for another user, unlike pytest's tmp_path
    (tmp_path / "c.yaml").write_text(
        "daemon: {user: nobody}\ndevices:\n  - {name: d0, type: blk, socket: d0.sock, path: d0.img, size: 1M}\n")
    os.chmod(tmp_path, 0o777)
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                          "vhostd", "serve", "--config", str(tmp_path / "c.yaml")], capture_output=True, text=True,
                         timeout=30, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 1
    assert "need vhostd to be started as root" in out.stderr and "Traceback" not in out.stderr, out.stderr
