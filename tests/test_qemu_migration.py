"""Live migration with real QEMU (TCG): two QEMU processes on this machine,
the destination started with -incoming on a unix socket, QMP `migrate`.

* blk: the source and the destination QEMU sit on two sockets of one back-end
  naming the same image (vhostd: two `shared: true` devices; as a harness
  check, qemu-storage-daemon: two exports of one block node).  The guest keeps
  reading the disk into its page cache (back-end writes into guest RAM, which
  the back-end must log as dirty while QEMU migrates) and checksumming it, and
  keeps writing numbered blocks, while it migrates; afterwards it checks again
  what it had read (from its page cache where still there) and the test checks
  that every write is on the image.
  A control runs the vhostd case with the dirty log hidden from vhostd (a
  proxy hands it a decoy): the guest must notice.
* net: a guest on a vhostd switch port keeps a TCP stream going with a second
  guest on the same switch while it migrates to another port of that switch;
  the stream must survive whole.  (This one cannot see a missing log: the
  guest's driver itself writes into each receive buffer's page and next to
  the used ring, so QEMU re-sends those pages anyway; the blk tests carry
  the logging check.)
"""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from guest.log_hiding_proxy import LogHidingProxy
from guest.qemu import GuestError, NetNic

pytestmark = pytest.mark.qemu

MiB = 1 << 20
KiB = 1 << 10
DISK = 160 * MiB
CHUNK = 2 * MiB
CHUNKS = 48  # read region: [0, 96 MiB) of random data the test writes first
WRITE_BASE = 100 * MiB
SLOT = 128 * KiB
SLOTS = 64  # write region: [100 MiB, 108 MiB), round k writes slot k % SLOTS
FLAG = 120 * MiB  # the test writes STOP here once the guest runs on the destination
GUEST_MEM = "256M"
# Slow enough that the guest does I/O for seconds while RAM is copied (what
# the back-end writes to a page QEMU has already sent reaches the
# destination only if the back-end logs it), fast enough to converge.
MIGRATE_BW = 24 * MiB


def slot_payload() -> bytes:
    """What follows the 512-byte header in every slot (the guest has it as /w)."""
    out = bytearray()
    i = 0
    while len(out) < SLOT - 512:
        out += hashlib.sha256(f"slot:{i}".encode()).digest()
        i += 1
    return bytes(out[:SLOT - 512])


def slot_header(k: int) -> bytes:
    # the guest's printf '%-511s\n' "VHOSTD-ROUND $k"
    return f"VHOSTD-ROUND {k}".ljust(511).encode() + b"\n"


BLK_SCRIPT = f"""
echo 1 > /proc/sys/kernel/printk
# Linux drops a block device's page cache when its last opener closes it:
# hold it open so that what the rounds read stays cached.
exec 3</dev/vda
bad=0; k=0
check_chunk() {{  # chunk, how: a buffered read (page cache) of one chunk
    got=$(dd if=/dev/vda bs=1M skip=$(($1 * {CHUNK // MiB})) count={CHUNK // MiB} 2>/dev/null | sha256sum | cut -c1-64)
    want=$(sed -n "$(($1 + 1))p" /expect)
    if [ "$got" != "$want" ]; then echo "VHOSTD-MIG-BAD round=$k chunk=$1 $2"; bad=$((bad + 1)); fi
}}
echo VHOSTD-MIG-READY
while :; do
    # Each round reads a chunk not read before into the page cache, so the
    # back-end fills pages that were free, hence sent (as zero) with the first
    # copy of RAM and never written since by the guest's CPU: only the
    # back-end's dirty log gets them to the destination again.  (Re-reading
    # after dropping the cache would hit recycled pages the CPU has just
    # written, which QEMU re-sends anyway.)  After the last chunk, rounds
    # re-read cached chunks.
    c=$((k % {CHUNKS}))
    check_chunk $c read
    s=$((k % {SLOTS}))
    {{ printf '%-511s\\n' "VHOSTD-ROUND $k"; cat /w; }} | \\
        dd of=/dev/vda bs={SLOT} seek=$(({WRITE_BASE // SLOT} + s)) iflag=fullblock oflag=direct 2>/dev/null \\
        || {{ echo "VHOSTD-MIG-BAD write round=$k"; bad=$((bad + 1)); }}
    echo "VHOSTD-MIG-ROUND $k"
    k=$((k + 1))
    usleep 200000  # ~7 MiB/s of reads: the region lasts well past the migration
    [ "$(dd if=/dev/vda bs=4096 skip={FLAG // 4096} count=1 iflag=direct 2>/dev/null | head -c 4)" = STOP ] && break
done
# Everything read is still in the page cache: pages the back-end filled on
# the source, checked again here on the destination.
n=$k; [ $n -gt {CHUNKS} ] && n={CHUNKS}
i=0
while [ $i -lt $n ]; do check_chunk $i final; i=$((i + 1)); done
dmesg | grep -q -i -E "I/O error|blk_update_request" && {{ echo "VHOSTD-MIG-BAD ioerror"; bad=$((bad + 1)); }}
echo "VHOSTD-RESULT rounds=$k"
echo "VHOSTD-RESULT bad=$bad"
[ $bad -eq 0 ]
"""


def fill_image(path) -> list[str]:
    """A DISK-sized image whose read region is random; returns the chunks' sha256."""
    data = os.urandom(CHUNKS * CHUNK)
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(DISK)
    return [hashlib.sha256(data[i * CHUNK:(i + 1) * CHUNK]).hexdigest() for i in range(CHUNKS)]


def write_flag(path) -> None:
    with open(path, "r+b") as f:
        f.seek(FLAG)
        f.write(b"STOP")
        f.flush()
        os.fsync(f.fileno())


def migrate_blk_guest(qemu_guest, image, src_sock, dst_sock, digests):
    """Boot on src_sock, migrate mid-loop to a QEMU on dst_sock and stop the
    loop once the guest runs there.  Returns (destination guest, query-migrate's
    final answer, the rounds the source saw during the migration)."""
    # init_on_alloc=0: the guest kernel (Debian's default is 1) would otherwise
    # zero each page cache page with the CPU before the back-end fills it, and
    # QEMU tracks that write itself, hiding most of what a missing log loses.
    src = qemu_guest(BLK_SCRIPT, disks=[src_sock], memory=GUEST_MEM, qmp=True, timeout=120,
                     files={"expect": "\n".join(digests) + "\n", "w": slot_payload()},
                     cmdline_extra="init_on_alloc=0")
    src.start()
    src.wait_for("VHOSTD-MIG-READY", timeout=90)
    src.wait_for(re.compile(r"VHOSTD-MIG-ROUND 2\b"), timeout=60)
    dst = qemu_guest(**src.destination_args(disks=[dst_sock])).start()
    before = len(src.console)
    info = src.migrate(dst, max_bandwidth=MIGRATE_BW, timeout=120)
    during = [int(k) for k in re.findall(r"VHOSTD-MIG-ROUND (\d+)", src.console[before:])]
    # The guest must have done I/O while its RAM was being copied, else the
    # test proves nothing about dirty logging.
    assert len(during) >= 2, f"only {len(during)} round(s) during the migration: {info}"
    dst.wait_for("VHOSTD-MIG-ROUND", timeout=60)  # running on the destination now
    write_flag(image)
    return dst, info, during


def run_blk_migration(qemu_guest, image, src_sock, dst_sock, digests) -> dict:
    """migrate_blk_guest, then check the guest's verdict and the image.
    Returns query-migrate's final answer."""
    dst, info, during = migrate_blk_guest(qemu_guest, image, src_sock, dst_sock, digests)
    assert dst.wait(timeout=120) == 0, dst.console_tail()
    res = dst.results()
    assert res["bad"] == "0", dst.console_tail()
    rounds = int(res["rounds"])
    assert rounds > during[-1] + 1
    # Every write the guest made is on the image: slot s holds the last round k with k % SLOTS == s.
    payload = slot_payload()
    with open(image, "rb") as f:
        for s in range(min(rounds, SLOTS)):
            k = max(k for k in range(rounds) if k % SLOTS == s)
            f.seek(WRITE_BASE + s * SLOT)
            got = f.read(SLOT)
            assert got[:512] == slot_header(k), f"slot {s}: {got[:40]!r}, want round {k}"
            assert got[512:] == payload, f"slot {s} (round {k}): payload differs"
        f.seek(0)
        for i, want in enumerate(digests):
            assert hashlib.sha256(f.read(CHUNK)).hexdigest() == want, f"read region chunk {i} changed"
    assert info["status"] == "completed"
    return info


def test_blk_migration_vhostd_shared_devices(vhostd_factory, qemu_guest, tmp_path):
    """Source and destination on two `shared: true` devices of one vhostd naming one image."""
    wd = tmp_path / "vhostd0"
    wd.mkdir()
    digests = fill_image(wd / "disk.img")
    vd = vhostd_factory([{"name": "src", "path": "disk.img", "shared": True},
                         {"name": "dst", "path": "disk.img", "shared": True}], workdir=wd)
    info = run_blk_migration(qemu_guest, vd.image("src"), vd.socket("src"), vd.socket("dst"), digests)
    print("vhostd migration:", {k: info.get(k) for k in ("total-time", "downtime", "setup-time")})
    log = vd.log()
    # QEMU did hand the source device a dirty log (the debug log names each request).
    assert "SET_LOG_BASE" in log
    assert "NEEDS_RESET" not in log


def test_blk_migration_control_a_back_end_that_does_not_log_is_caught(vhostd_factory, qemu_guest, tmp_path,
                                                                     sock_dir):
    """The control: the same migration with the source's dirty log hidden from
    vhostd (a proxy hands it a decoy) must end with the guest reporting bad
    data, or crashing on it.  Guards the blk tests' power to see a back-end
    that does not log."""
    wd = tmp_path / "vhostd0"
    wd.mkdir()
    digests = fill_image(wd / "disk.img")
    vd = vhostd_factory([{"name": "src", "path": "disk.img", "shared": True},
                         {"name": "dst", "path": "disk.img", "shared": True}], workdir=wd)
    with LogHidingProxy(sock_dir / "hide-log.sock", vd.socket("src")) as proxy:
        dst, info, _ = migrate_blk_guest(qemu_guest, vd.image("src"), proxy.listen, vd.socket("dst"), digests)
        assert proxy.hidden, "QEMU never sent SET_LOG_BASE"
    try:
        rc = dst.wait(timeout=120)
    except GuestError:
        return  # the guest died of what it found (e.g. a panic): caught
    assert rc != 0 and "VHOSTD-MIG-BAD" in dst.console, (
        f"the guest saw nothing wrong although its back-end logged nothing: {info}\n" + dst.console_tail())


def test_blk_migration_qsd_harness_check(storage_daemon, qemu_guest, tmp_path):
    """The same with qemu-storage-daemon (two exports of one block node): checks
    the harness and the guest workload against a reference back-end."""
    image = tmp_path / "disk.img"
    digests = fill_image(image)
    qsd = storage_daemon(image=image, extra_exports=1)
    info = run_blk_migration(qemu_guest, image, qsd.socket, qsd.extra_sockets[0], digests)
    print("qsd migration:", {k: info.get(k) for k in ("total-time", "downtime", "setup-time")})


# ---------------------------------------------------------------- net

STREAM_BLOCK = 64 * KiB
STREAM_BLOCKS = 320  # at ~20 blocks/s: ~16 s of stream, several times a migration
# stream.sh: send /block STREAM_BLOCKS times, paced, with progress on the console
# (stdout is the TCP connection under nc -e).
STREAM = f"""#!/bin/sh
i=0
while [ $i -lt {STREAM_BLOCKS} ]; do
    cat /block
    i=$((i + 1))
    [ $((i % 20)) -eq 0 ] && echo "VHOSTD-NET-SENT $i" > /dev/ttyS0
    usleep 40000
done
echo VHOSTD-NET-SENT-ALL > /dev/ttyS0
"""
RECV_MD5 = "#!/bin/sh\nmd5sum | cut -c1-32 > /recv.md5\n"

def net_script(me: str, peer: str) -> str:
    """Each guest listens on 5000, then streams to the peer's 5000 while the
    peer streams to it; prints the md5 of what it received."""
    return f"""
set -e
echo 1 > /proc/sys/kernel/printk
. /etc/vhostd-net.sh
net_up eth0 {me}/24
nc -l -p 5000 -e /recv.sh &
listener=$!
net_ping_until {peer} 60
echo VHOSTD-NET-UP
n=0
until nc {peer} 5000 -e /stream.sh; do n=$((n + 1)); [ $n -lt 60 ] || exit 1; sleep 1; done
wait $listener
echo "VHOSTD-RESULT recv=$(cat /recv.md5)"
net_stats eth0
"""


def test_net_migration_between_switch_ports(vhostd_factory, qemu_guest):
    """Guest B on switch port p1 streams TCP to and from guest A (port p0) and
    migrates to port p2 mid-stream: both streams arrive whole."""
    vd = vhostd_factory([{"name": f"p{i}", "type": "net", "backend": "switch", "switch": "lan0"}
                         for i in range(3)])
    block = os.urandom(STREAM_BLOCK)
    want = hashlib.md5(block * STREAM_BLOCKS).hexdigest()
    files = {"block": block, "stream.sh": STREAM, "recv.sh": RECV_MD5}
    a = qemu_guest(net_script("10.79.0.1", "10.79.0.2"), nics=[NetNic(vd.socket("p0"))], memory=GUEST_MEM,
                   timeout=120, files=files)
    b = qemu_guest(net_script("10.79.0.2", "10.79.0.1"), nics=[NetNic(vd.socket("p1"))], memory=GUEST_MEM,
                   timeout=120, files=files, qmp=True)
    a.start()
    b.start()
    b.wait_for("VHOSTD-NET-SENT 20", timeout=120)  # both streams flow
    dst = qemu_guest(**b.destination_args(nics=[NetNic(vd.socket("p2"))])).start()
    info = b.migrate(dst, max_bandwidth=MIGRATE_BW, timeout=120)
    print("net migration:", {k: info.get(k) for k in ("total-time", "downtime", "setup-time")})
    # Both streams were still running when the guest moved, and go on after it.
    assert "VHOSTD-NET-SENT-ALL" not in a.console, "A's stream ended before the migration did"
    assert "VHOSTD-NET-SENT-ALL" not in b.console, "B's stream ended before the migration did"
    dst.wait_for("VHOSTD-NET-SENT", timeout=60)
    assert dst.wait(timeout=120) == 0, dst.console_tail()
    assert a.wait(timeout=60) == 0, a.console_tail()
    assert dst.results()["recv"] == want, "A -> B stream corrupted across the migration"
    assert a.results()["recv"] == want, "B -> A stream corrupted across the migration"
    assert "NEEDS_RESET" not in vd.log()
