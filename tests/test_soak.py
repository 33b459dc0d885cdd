"""A bounded soak: many devices, front-ends connecting and disconnecting in
a loop with verified writes, garbage-sending peers, and SIGHUP reloads that
add and remove a device, all against one daemon.  Checks at the end: the
daemon is alive, no acknowledged write is lost (read back through a fresh
front-end and on the host image), file descriptors and guest mappings are
back to the baseline, and every misbehaviour cost one log line, no traceback.

VHOSTD_SOAK_SECONDS=N runs it longer (default 20 in the suite):
    VHOSTD_SOAK_SECONDS=3600 .venv/bin/python -m pytest tests/test_soak.py
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time

import yaml

from conftest import BLK_S_OK, Guest, wait_until

SECONDS = float(os.environ.get("VHOSTD_SOAK_SECONDS", "20"))
BLK = 6
SECTORS = 4 << 20 >> 9


def test_soak(vhostd_factory, sockdir):
    devices = [{"name": f"d{i}", "size": "4M"} for i in range(BLK)]
    devices += [{"name": f"n{i}", "type": "net", "backend": "loopback"} for i in range(2)]
    vd = vhostd_factory(devices, daemon={"workers": 2})
    base_devices = [dict(d) for d in vd.devices]
    extra = {"name": "extra", "type": "blk", "socket": os.path.join(sockdir, "extra.sock"), "path": "extra.img",
             "size": "1M"}
    baseline_fds = vd.fd_count()
    rng = random.Random(1234)
    acked: dict[tuple[str, int], bytes] = {}
    counts = {"sessions": 0, "writes": 0, "reloads": 0, "garbage": 0}
    with_extra = False
    end = time.monotonic() + SECONDS
    seq = 0
    while time.monotonic() < end:
        action = rng.random()
        if action < 0.1:
            # reload: add or remove the extra device; the others are untouched
            with_extra = not with_extra
            doc = yaml.safe_load(vd.config_path.read_text())
            doc["devices"] = base_devices + ([extra] if with_extra else [])
            vd.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
            mark = vd.log_mark()
            os.kill(vd.pid, signal.SIGHUP)
            vd.wait_log(mark, r"reload: \d+ kept")
            counts["reloads"] += 1
        elif action < 0.2:
            name = f"d{rng.randrange(BLK)}"
            vd.wait_session_idle(name)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(vd.socket(name))
                try:
                    s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
                except OSError:
                    pass
            vd.wait_session_idle(name)
            counts["garbage"] += 1
        else:
            name = f"d{rng.randrange(BLK)}"
            vd.wait_session_idle(name)
            g = Guest(vd, name)
            drv = g.blk(size=64)
            for _ in range(rng.randrange(1, 20)):
                seq += 1
                sector = rng.randrange(0, SECTORS - 8, 8)
                data = seq.to_bytes(8, "little") * 512
                assert drv.write(sector, data) == BLK_S_OK
                acked[(name, sector)] = data
                counts["writes"] += 1
            g.close(wait=rng.random() < 0.5)
            counts["sessions"] += 1
    for i in range(BLK):
        vd.wait_session_idle(f"d{i}")
    vd.assert_alive()
    # Every acknowledged write, through a fresh front-end and on the image.
    by_dev: dict[str, list[tuple[int, bytes]]] = {}
    for (name, sector), data in acked.items():
        by_dev.setdefault(name, []).append((sector, data))
    for name, items in by_dev.items():
        g = Guest(vd, name)
        drv = g.blk(size=64)
        for sector, data in items:
            assert drv.read(sector, 4096) == (BLK_S_OK, data), f"{name} sector {sector} lost"
            assert vd.read_image(name, sector * 512, 4096) == data
        g.close()
    if with_extra:  # back to the starting set for the fd comparison
        doc = yaml.safe_load(vd.config_path.read_text())
        doc["devices"] = base_devices
        vd.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        mark = vd.log_mark()
        os.kill(vd.pid, signal.SIGHUP)
        vd.wait_log(mark, r"reload: \d+ kept")
    wait_until(lambda: vd.fd_count() == baseline_fds, 5, what=f"fd count back to {baseline_fds}")
    assert vd.memfd_mappings() == 0
    log = vd.log()
    assert "Traceback" not in log
    assert log.count("closing connection") <= counts["garbage"]
    assert counts["sessions"] > 5 and counts["reloads"] > 0, counts
