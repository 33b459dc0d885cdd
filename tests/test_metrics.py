"""Prometheus metrics over real HTTP from the real daemon."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.request

from conftest import Guest, blk_roundtrip, free_port, wait_until


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if m and m.group(1) == name and all(f'{k}="{v}"' in m.group(2) for k, v in labels.items()):
            return float(m.group(3))
    raise AssertionError(f"no {name}{{{want}}} in:\n{text}")


def start(vhostd_factory, devices):
    port = free_port()
    vd = vhostd_factory(devices, daemon={"workers": 1, "metrics": f"127.0.0.1:{port}"})

    def up():
        try:
            return scrape(port)
        except OSError:
            return None

    wait_until(up, 10, what="the metrics endpoint")
    return vd, port


def test_blk_counters_and_latency_histogram(vhostd_factory):
    vd, port = start(vhostd_factory, [{"name": "d0", "size": "4M"}])
    g = Guest(vd, "d0")
    drv = g.blk()
    for i in range(7):
        blk_roundtrip(vd, drv, 8 * i)
    text = scrape(port)
    assert value(text, "vhostd_device_connected", device="d0") == 1
    assert value(text, "vhostd_device_needs_reset", device="d0") == 0
    assert value(text, "vhostd_queue_requests_total", device="d0", queue="0") == 14
    assert value(text, "vhostd_queue_pending", device="d0", queue="0") == 0
    assert value(text, "vhostd_blk_writes_total", device="d0", queue="0") == 7
    assert value(text, "vhostd_blk_reads_total", device="d0", queue="0") == 7
    assert value(text, "vhostd_blk_write_bytes_total", device="d0", queue="0") == 7 * 4096
    assert value(text, "vhostd_request_latency_seconds_count", device="d0", queue="0") == 14
    assert value(text, "vhostd_request_latency_seconds_bucket", device="d0", queue="0", le="+Inf") == 14
    assert value(text, "vhostd_request_latency_seconds_sum", device="d0", queue="0") > 0
    buckets = [float(m) for m in re.findall(r'vhostd_request_latency_seconds_bucket\{[^}]*device="d0"[^}]*\} (\S+)',
                                             text)]
    assert buckets == sorted(buckets)  # cumulative
    assert 'vhostd_device_info{device="d0",socket="' in text
    g.close()
    assert value(scrape(port), "vhostd_device_connected", device="d0") == 0


def test_net_counters(vhostd_factory):
    from net_driver import NetDriver, NetHdr

    vd, port = start(vhostd_factory, [{"name": "lo", "type": "net", "backend": "loopback"}])
    g = Guest(vd, "lo")
    d = NetDriver(g, 1)
    d.post_rx(8)
    frame = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x01" + b"\x08\x00" + bytes(100)
    for _ in range(5):
        assert d.send(frame, NetHdr()) == 0
        assert d.recv().frame == frame
    text = scrape(port)
    assert value(text, "vhostd_net_tx_frames_total", device="lo", pair="0") == 5
    assert value(text, "vhostd_net_rx_frames_total", device="lo", pair="0") == 5
    assert value(text, "vhostd_net_tx_bytes_total", device="lo", pair="0") == 5 * len(frame)
    assert value(text, "vhostd_request_latency_seconds_count", device="lo", queue="1") == 5  # tx queue
    g.close()


def test_off_by_default_and_bad_address(vhostd_factory, tmp_path):
    vd = vhostd_factory([{"name": "d0", "size": "4M"}])
    listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    assert f"pid={vd.pid}," not in listening
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("daemon:\n  metrics: localhost\ndevices:\n  - {name: d0, type: blk, socket: s, path: p, size: 1M}\n")
    out = subprocess.run([sys.executable, "-m", "vhostd", "check", "--config", str(cfg)], capture_output=True,
                         text=True)
    assert out.returncode == 1 and f"{cfg}:2: daemon.metrics: must be an address like 127.0.0.1:9110" in out.stderr


def test_endpoint_survives_garbage(vhostd_factory):
    vd, port = start(vhostd_factory, [{"name": "d0", "size": "4M"}])
    for junk in (b"\x00\xff garbage\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"POST /metrics HTTP/1.1\r\n"
                 b"Content-Length: 999999\r\n\r\nxx"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)
                s.recv(100)
            except OSError:
                pass
    assert "vhostd_device_info" in scrape(port)
    vd.assert_alive()
