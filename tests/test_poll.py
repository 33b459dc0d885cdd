"""Busy polling (a device's poll_us; blk, then net): a queue that ran empty keeps the
driver's notifications off and is re-checked by its worker for poll_us
microseconds, so requests published without a kick in that window are
served; afterwards notifications are back on and a request needs a kick.

The daemon runs one data plane worker, so every queue here shares it."""

from __future__ import annotations

import os
import struct
import time

import pytest

from conftest import BLK_S_OK, STATUS_NEEDS_RESET, Guest, wait_broken, wait_until
from net_driver import NetDriver, NetHdr
from virtio_driver import BLK_T_IN, USED_F_NO_NOTIFY, BlkDriver, SplitQueue, blk_header

from vhostd.config import ConfigError, load_config

F_EVENT_IDX = 29
LONG_US = 1_000_000  # the longest window: "soon after" is easily soon enough
SHORT_US = 20_000
FRAME = bytes.fromhex("ffffffffffff525400000001") + b"\x08\x00" + bytes(50)


@pytest.fixture(scope="module")
def vd(module_vhostd_factory):
    return module_vhostd_factory(
        [
            {"name": "long", "poll_us": LONG_US, "queues": 2},
            {"name": "short", "poll_us": SHORT_US},
            {"name": "plain"},  # poll_us 0: kicks as always
        ],
        daemon={"workers": 1},
    )


@pytest.fixture
def guest(vd):
    opened: list[Guest] = []

    def make(name: str, event_idx: bool = True, **kw) -> Guest:
        g = vd.connect(name, features=None if event_idx else ~(1 << F_EVENT_IDX), **kw)
        assert bool(g.features & (1 << F_EVENT_IDX)) == event_idx
        opened.append(g)
        return g

    yield make
    for g in opened:
        g.close()
    vd.assert_alive()


def read_no_kick(q: SplitQueue, sector: int = 0) -> int:
    """Publish a 4 KiB read without notifying the device; returns its status buffer."""
    return q.add([blk_header(BLK_T_IN, sector)], [4096, 1], kick=False)[1][-1]


def notifications_on(q: SplitQueue, event_idx: bool) -> bool:
    """Whether the device asks to be kicked for the next request."""
    if event_idx:
        return q.avail_event() == q.avail_idx
    return not q.used_flags() & USED_F_NO_NOTIFY


def assert_not_served(q: SplitQueue, seconds: float = 0.2) -> None:
    before = q.used_idx()
    time.sleep(seconds)
    assert q.used_idx() == before, "served without a kick"


def worker_cpu_seconds(vd) -> float:
    """CPU time (user + system) of the data plane worker thread so far."""
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{vd.pid}/task"):
        try:
            with open(f"/proc/{vd.pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        if "(vhostd-w0)" in stat:
            fields = stat.rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick
    raise AssertionError("no vhostd-w0 thread")


# ====================================================================== the window


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
def test_requests_without_a_kick_inside_the_window_are_served(vd, guest, event_idx):
    q = guest("long", event_idx).queue(0)
    drv = BlkDriver(q)
    assert drv.read(0, 4096)[0] == BLK_S_OK  # kicked; the queue is now in its window
    assert not notifications_on(q, event_idx)
    for i in range(20):
        status = read_no_kick(q, i * 8)
        q.wait_used(1, timeout=2)
        assert q.mem.read(status, 1)[0] == BLK_S_OK
        assert not notifications_on(q, event_idx)  # still off: each request restarts the window


def test_a_burst_larger_than_the_budget_is_served_without_a_kick(vd, guest):
    q = guest("long").queue(0, size=256)
    data = os.urandom(512)
    assert BlkDriver(q).write(0, data) == BLK_S_OK
    status = [q.add([blk_header(BLK_T_IN, 0)], [512, 1], indirect=True, kick=False)[1] for _ in range(200)]
    assert len(q.wait_used(200, timeout=5)) == 200
    assert all(q.mem.read(s, 1)[0] == BLK_S_OK and q.mem.read(d, 512) == data for d, s in status)


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
def test_after_the_window_a_request_needs_a_kick(vd, guest, event_idx):
    q = guest("short", event_idx).queue(0)
    drv = BlkDriver(q)
    assert drv.read(0, 4096)[0] == BLK_S_OK
    # the window closes by itself, and notifications come back on
    wait_until(lambda: notifications_on(q, event_idx), 5, what="notifications re-enabled")
    read_no_kick(q)
    assert_not_served(q)
    q.notify()
    q.wait_used(1)
    # and the kick opened a new window
    read_no_kick(q)
    q.wait_used(1, timeout=2)


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
def test_poll_us_0_waits_for_kicks(vd, guest, event_idx):
    q = guest("plain", event_idx).queue(0)
    drv = BlkDriver(q)
    assert drv.read(0, 4096)[0] == BLK_S_OK
    assert notifications_on(q, event_idx)  # on again before the request completed
    read_no_kick(q)
    assert_not_served(q)
    q.notify()
    q.wait_used(1)


def test_an_idle_device_costs_nothing_once_its_window_is_over(vd, guest):
    q = guest("short").queue(0)
    assert BlkDriver(q).read(0, 4096)[0] == BLK_S_OK
    wait_until(lambda: notifications_on(q, True), 5, what="the window to end")
    time.sleep(0.05)
    before = worker_cpu_seconds(vd)
    time.sleep(0.5)
    assert worker_cpu_seconds(vd) - before <= 0.05


def test_the_worker_spins_during_a_window(vd, guest):
    q = guest("long").queue(0)
    assert BlkDriver(q).read(0, 4096)[0] == BLK_S_OK
    before, t0 = worker_cpu_seconds(vd), time.monotonic()
    time.sleep(0.5)
    busy = (worker_cpu_seconds(vd) - before) / (time.monotonic() - t0)
    assert busy > 0.2, f"worker busy {busy:.0%} of the window"


# ====================================================================== the worker's other duties


def test_other_queues_of_the_worker_are_served_during_a_window(vd, guest):
    g = guest("long")
    spinning = g.queue(0)
    other = g.queue(1)
    assert BlkDriver(spinning).read(0, 4096)[0] == BLK_S_OK
    plain = guest("plain").queue(0)
    for _ in range(20):
        for q in (other, plain):
            t0 = time.monotonic()
            assert BlkDriver(q).read(8, 4096)[0] == BLK_S_OK
            assert time.monotonic() - t0 < 1
        read_no_kick(spinning)  # and the spinning queue keeps being served
        spinning.wait_used(1, timeout=2)


def test_disconnect_and_reconnect_during_a_window(vd, guest):
    g = guest("long")
    q = g.queue(0)
    assert BlkDriver(q).read(0, 4096)[0] == BLK_S_OK
    g.close()  # the queue stops while on the spin list
    g = guest("long")
    q = g.queue(0)
    data = os.urandom(4096)
    assert BlkDriver(q).write(16, data) == BLK_S_OK
    status = read_no_kick(q, 16)
    q.wait_used(1, timeout=2)
    assert q.mem.read(status - 4096, 4096) == data  # (the data buffer sits just before the status)
    assert vd.read_image("long", 16 * 512, 4096) == data


def test_get_vring_base_during_a_window_then_resume(vd, guest):
    g = guest("long")
    q = g.queue(0)
    drv = BlkDriver(q)
    for i in range(3):
        assert drv.read(i, 512)[0] == BLK_S_OK
    assert g.fe.get_vring_base(0) == 3  # stops the queue inside its window
    read_no_kick(q)
    assert_not_served(q, 0.1)  # a stopped queue is not polled
    g.fe.set_vring_kick(0, q.kick)  # restart: it looks at the ring by itself
    q.wait_used(1, timeout=2)
    read_no_kick(q)
    q.wait_used(1, timeout=2)


def test_disabled_queue_is_not_polled(vd, guest):
    g = guest("long")
    q = g.queue(0)
    assert BlkDriver(q).read(0, 512)[0] == BLK_S_OK
    g.fe.set_vring_enable(0, False)
    read_no_kick(q)
    assert_not_served(q, 0.1)
    g.fe.set_vring_enable(0, True)
    q.wait_used(1, timeout=2)


def test_a_ring_broken_during_the_window_is_reported(vd, guest):
    g = guest("long")
    q = g.queue(0)
    assert BlkDriver(q).read(0, 512)[0] == BLK_S_OK
    # a head beyond the ring, published without a kick
    q.mem.write(q.avail + 4 + 2 * (q.avail_idx % q.size), struct.pack("<H", q.size + 5))
    q.avail_idx += 1
    q.set_avail_idx(q.avail_idx)
    wait_broken(q)
    assert g.status() & STATUS_NEEDS_RESET
    g.close()
    # the device works again for the next front-end
    q = guest("long").queue(0)
    assert BlkDriver(q).read(0, 512)[0] == BLK_S_OK


def test_memory_cut_off_during_the_window_breaks_only_that_queue(vd, guest):
    """The worker polling the ring touches pages the front-end truncated:
    SIGBUS, caught, the queue is broken.  Twice, so the guard still works
    after it caught one (the signal mask is not saved or restored)."""
    for _ in range(2):
        g = guest("long")
        q = g.queue(0)
        assert BlkDriver(q).read(0, 512)[0] == BLK_S_OK
        mark = vd.log_mark()
        os.ftruncate(g.mem.fd, 0)  # from here on the test must not touch g.mem
        wait_broken(q)
        vd.wait_log(mark, r"long: .*faulted \(SIGBUS\)")
        assert g.status() & STATUS_NEEDS_RESET
        g.close()
    q = guest("plain").queue(0)  # the worker is fine
    assert BlkDriver(q).read(0, 512)[0] == BLK_S_OK


def test_daemon_stops_promptly_during_a_window(vhostd_factory):
    vd = vhostd_factory([{"name": "d", "poll_us": LONG_US}], daemon={"workers": 1})
    g = vd.connect("d")
    q = g.queue(0)
    assert BlkDriver(q).write(0, b"\x01" * 512) == BLK_S_OK
    read_no_kick(q)
    q.wait_used(1, timeout=2)
    t0 = time.monotonic()
    assert vd.stop() == 0
    assert time.monotonic() - t0 < 5
    g.close(wait=False)


# ====================================================================== config


def blk_config(tmp_path, value: str) -> str:
    (tmp_path / "d.img").write_bytes(bytes(4096))
    path = tmp_path / "vhostd.yaml"
    path.write_text(f"devices:\n  - name: d\n    type: blk\n    socket: d.sock\n    path: d.img\n    poll_us: {value}\n")
    return str(path)


@pytest.mark.parametrize("value, expected", [("0", 0), ("1", 1), ("50", 50), ("1000000", 1000000)])
def test_poll_us_values(tmp_path, value, expected):
    assert load_config(blk_config(tmp_path, value)).devices[0].poll_us == expected


@pytest.mark.parametrize("value, shown", [("-1", "-1"), ("1000001", "1000001"), ("fast", "'fast'"), ("1.5", "1.5"),
                                          ("true", "true"), ("", "nothing")])
def test_poll_us_errors(tmp_path, value, shown):
    path = blk_config(tmp_path, value)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    (p,) = exc.value.problems
    assert (p.line, p.key) == (6, "devices[0].poll_us")
    assert p.message == f"must be an integer from 0 to 1000000, got {shown} (device 'd')"
    assert str(p).startswith(f"{path}:6: devices[0].poll_us: ")


def test_poll_us_defaults_to_0(tmp_path):
    path = tmp_path / "vhostd.yaml"
    path.write_text("devices:\n  - {name: d, type: blk, socket: d.sock, backend: null, size: 1M}\n")
    assert load_config(path).devices[0].poll_us == 0


def test_poll_us_is_a_net_key_too(tmp_path):
    path = tmp_path / "vhostd.yaml"
    path.write_text("devices:\n  - {name: n, type: net, socket: n.sock, backend: loopback, poll_us: 5}\n")
    assert load_config(path).devices[0].poll_us == 5


# ====================================================================== net


@pytest.fixture(scope="module")
def net_vd(module_vhostd_factory):
    return module_vhostd_factory(
        [{"name": "nloop", "type": "net", "backend": "loopback", "poll_us": LONG_US},
         {"name": "nplain", "type": "net", "backend": "loopback"}],
        daemon={"workers": 1},
    )


def send_no_kick(drv: NetDriver, frame: bytes) -> None:
    drv.tx[0].add([NetHdr().pack(drv.hdr_len) + frame], [], kick=False)


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
def test_net_tx_inside_the_window_needs_no_kick(net_vd, event_idx):
    g = net_vd.connect("nloop", features=None if event_idx else ~(1 << F_EVENT_IDX))
    try:
        drv = NetDriver(g)
        drv.post_rx(32)
        drv.send(FRAME)  # kicked; the tx queue is now in its window
        assert drv.recv().frame == FRAME
        assert not notifications_on(drv.tx[0], event_idx)
        for i in range(10):
            frame = FRAME[:-1] + bytes([i])
            send_no_kick(drv, frame)
            assert drv.recv().frame == frame
    finally:
        g.close()


def test_net_rx_refills_are_not_kicked(net_vd):
    """A kick of an rx queue says buffers came; later refills need none until
    the device runs out (loopback and switch drop when there is no buffer)."""
    g = net_vd.connect("nplain", features=~(1 << F_EVENT_IDX))
    try:
        drv = NetDriver(g)
        drv.post_rx(4)
        wait_until(lambda: drv.rx[0].used_flags() & USED_F_NO_NOTIFY, 5, what="rx notifications off")
        drv.send(FRAME)
        assert drv.recv().frame == FRAME
        drv.post_rx(4, kick=False)  # as a polling driver would: no kick needed
        for _ in range(6):
            drv.send(FRAME)
            assert drv.recv().frame == FRAME
    finally:
        g.close()
