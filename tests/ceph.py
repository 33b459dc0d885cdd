"""A real, throw-away Ceph cluster for tests: one monitor and one OSD
(memstore: objects in the OSD's memory) on loopback, no systemd, no auth,
everything in one temporary directory.  About two seconds to start.

Tests make images with rbd(), kill and restart the OSD to play a failing
cluster, and read images back with the `rbd` tool to check what vhostd wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephCluster:
    def __init__(self, objectstore: str = "memstore") -> None:
        self.objectstore = objectstore
        self.dir = tempfile.mkdtemp(prefix="vd-ceph-", dir="/tmp")
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.mon: subprocess.Popen | None = None
        self.osd: subprocess.Popen | None = None
        self.osd_id = 0

    def _write_conf(self) -> None:
        d = self.dir
        v2, v1 = _free_port(), _free_port()
        while v1 == v2:
            v1 = _free_port()
        self.mon_addr = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        self.fsid = str(uuid.uuid4())
        for sub in ("run", "log", "mon/a", "osd"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        settings = {
            "global": {
                "fsid": self.fsid, "mon host": self.mon_addr, "public addr": "127.0.0.1",
                "auth cluster required": "none", "auth service required": "none", "auth client required": "none",
                "run dir": f"{d}/run", "admin socket": f"{d}/run/$name.asok", "pid file": f"{d}/run/$name.pid",
                "log file": f"{d}/log/$name.log", "mon cluster log file": f"{d}/log/cluster.log",
                "crash dir": f"{d}/crash",
                # one OSD holds everything
                "osd pool default size": 1, "osd pool default min size": 1, "osd crush chooseleaf type": 0,
                "osd pool default pg autoscale mode": "off", "mon allow pool size one": "true",
                "mon warn on pool no redundancy": "false", "mon data avail warn": 1, "mon data avail crit": 0,
                # monitor changes (a new OSD map) take a second each by default
                "paxos propose interval": 0.01, "paxos min wait": 0.001,
                "ms bind ipv6": "false",
                # (keep osd heartbeat grace at its default: a PG's read lease is
                # 0.8 of it, and a paused OSD whose leases ran out leaves writes
                # "waiting for readable")
            },
            "mon": {"mon data": f"{d}/mon/$id"},
            "osd": {
                "osd data": f"{d}/osd/$id", "osd objectstore": self.objectstore,
                "memstore device bytes": 1 << 30, "memstore page set": "true",
                # bluestore: a sparse file in the OSD's directory, small caches
                "bluestore block create": "true", "bluestore block size": 2 << 30,
                "bluestore block db create": "false", "bluestore block wal create": "false",
                "bluestore fsck on mkfs": "false", "bluestore cache autotune": "false",
                "bluestore cache size": 64 << 20, "osd memory target": 900 << 20,
                # short PG logs keep the memstore OSD small under random writes
                "osd min pg log entries": 10, "osd max pg log entries": 100, "osd pg log dups tracked": 10,
                "osd pg log trim min": 10, "osd op num shards": 1, "osd op num threads per shard": 2,
            },
        }
        with open(self.conf, "w") as f:
            for section, values in settings.items():
                f.write(f"[{section}]\n" + "".join(f"{k} = {val}\n" for k, val in values.items()))

    def env(self) -> dict:
        return {**os.environ, "CEPH_CONF": self.conf}

    def run(self, *cmd: str, input: bytes | None = None, timeout: float = 60) -> bytes:
        p = subprocess.run(cmd, env=self.env(), input=input, capture_output=True, timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
        return p.stdout

    def ceph(self, *args: str) -> str:
        return self.run("ceph", "--connect-timeout", "30", *args).decode()

    def rbd(self, *args: str, input: bytes | None = None) -> str:
        return self.run("rbd", *args, input=input).decode()

    # ---- images, for the tests to make and to look into
    def new_image(self, size: int | None = None, data: bytes | None = None) -> str:
        """A fresh image in pool rbd, empty (size bytes) or holding data."""
        name = "t" + uuid.uuid4().hex[:12]
        if data is not None:
            self.run("rbd", "import", "--no-progress", "-", f"rbd/{name}", input=data)
        else:
            self.rbd("create", "--size", f"{size}B", f"rbd/{name}")
        return name

    def export(self, spec: str) -> bytes:
        """The whole of image (or image@snapshot) rbd/spec, as the cluster has it."""
        return self.run("rbd", "export", "--no-progress", f"rbd/{spec}", "-")

    def _daemon(self, *cmd: str, log: str) -> subprocess.Popen:
        with open(os.path.join(self.dir, "log", log), "ab") as out:  # a file: a chatty daemon must never block
            return subprocess.Popen([*cmd, "-c", self.conf, "-f"], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=out, env=self.env())

    def start(self) -> "CephCluster":
        self._write_conf()
        monmap = os.path.join(self.dir, "monmap")
        self.run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", self.mon_addr, monmap)
        self.run("ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", monmap)
        self.mon = self._daemon("ceph-mon", "-i", "a", log="mon.out")
        self.ceph("quorum_status")
        osd_uuid = str(uuid.uuid4())
        self.osd_id = int(self.ceph("osd", "new", osd_uuid).strip())
        os.makedirs(os.path.join(self.dir, "osd", str(self.osd_id)))
        self.run("ceph-osd", "-c", self.conf, "-i", str(self.osd_id), "--mkfs", "--osd-uuid", osd_uuid)
        self.start_osd()
        self.ceph("osd", "pool", "create", "rbd", "8", "8")
        self.rbd("pool", "init", "rbd")
        return self

    def osd_epoch(self) -> int | None:
        """The map epoch the OSD came up in, or None while it is down."""
        osds = json.loads(self.ceph("osd", "dump", "-f", "json"))["osds"]
        mine = [o for o in osds if o["osd"] == self.osd_id]
        return mine[0]["up_from"] if mine and mine[0]["up"] else None

    def start_osd(self, timeout: float = 60) -> None:
        before = self.osd_epoch() if self.mon else None
        self.osd = self._daemon("ceph-osd", "-i", str(self.osd_id), log="osd.out")
        deadline = time.monotonic() + timeout
        while (epoch := self.osd_epoch()) is None or epoch == before:  # the new one, not the dead one
            if self.osd.poll() is not None:
                raise RuntimeError(f"ceph-osd exited ({self.osd.returncode}); see {self.dir}/log")
            if time.monotonic() > deadline:
                raise TimeoutError("the OSD did not come up")
            time.sleep(0.1)

    def stop_osd(self, sig: int = signal.SIGSTOP) -> None:
        """SIGSTOP: the OSD hangs (its connections stay open, nothing
        answers); SIGKILL: it is gone (its objects too: memstore)."""
        assert self.osd is not None
        self.osd.send_signal(sig)
        if sig == signal.SIGKILL:
            self.osd.wait()
            self.osd = None

    def resume_osd(self) -> None:
        assert self.osd is not None
        self.osd.send_signal(signal.SIGCONT)

    def close(self) -> None:
        for p in (self.osd, self.mon):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if os.environ.get("VHOSTD_KEEP_CEPH"):  # for a post-mortem: the daemons' logs
            print(f"ceph cluster directory kept: {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
