"""Prometheus metrics (`daemon: metrics: HOST:PORT`, off by default).

prometheus_client serves HTTP from its own thread; at each scrape the
collector asks the asyncio loop for a snapshot, because devices belong to
the loop (a reload may free one while a scrape runs).  Nothing is counted
in Python: the numbers are the data plane's own counters, and latency
histograms are switched on in the data plane only while metrics (or the
web console, which serves the same text at its /metrics: exposition()) are on.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from vhostd.control import daemon_status

log = logging.getLogger("vhostd.metrics")

SCRAPE_TIMEOUT = 5.0
QUEUE_COUNTERS = (("requests", "requests_total", "Requests completed"),
                  ("kicks", "kicks_total", "Kicks (driver notifications) received"),
                  ("notifies", "notifies_total", "Interrupts (call eventfd writes) sent"),
                  ("bytes_out", "queue_read_bytes_total", "Bytes the device read from guest buffers"),
                  ("bytes_in", "queue_written_bytes_total", "Bytes the device wrote into guest buffers"))
# What remote stores report of their own kind (vhostd status "store").
STORE_GAUGES = {"connected": "Connections to the NBD server that are up",
                "in_flight": "Requests the RBD image has not answered yet",
                "oldest_ms": "Milliseconds the oldest of those has waited"}
STORE_COUNTERS = {"reconnects": "Times a connection to the NBD server came back",
                  "stalls": "Times a request to the RBD image waited longer than warn_after"}


def snapshot(daemon) -> list[dict]:
    """Runs on the loop: what `vhostd status` shows, plus each queue's
    latency histogram (bucket counts, total ns)."""
    devices = daemon_status(daemon)["devices"]
    for d in devices:
        if d["state"] != "serving":
            continue
        rings = daemon.servers[d["name"]].handler.rings
        for q in d["queues"]:
            q["latency"] = rings.latency(q["index"])
    return devices


class DaemonCollector:
    def __init__(self, daemon, loop: asyncio.AbstractEventLoop) -> None:
        self.daemon = daemon
        self.loop = loop

    def collect(self):
        async def snap():
            return snapshot(self.daemon)

        try:
            devices = asyncio.run_coroutine_threadsafe(snap(), self.loop).result(SCRAPE_TIMEOUT)
        except Exception as exc:  # a scrape must never take the daemon down
            log.warning("metrics scrape failed: %s", exc)
            return
        yield from metric_families(devices)


def metric_families(devices: list[dict]):
    """The Prometheus metric families of a snapshot (from the loop)."""
    info = GaugeMetricFamily("vhostd_device_info", "One per device", labels=["device", "type", "socket"])
    connected = GaugeMetricFamily("vhostd_device_connected", "1 while a front-end is connected",
                                  labels=["device"])
    needs_reset = GaugeMetricFamily("vhostd_device_needs_reset", "1 when a queue broke (NEEDS_RESET)",
                                    labels=["device"])
    features = GaugeMetricFamily("vhostd_device_features", "Negotiated virtio feature bits", labels=["device"])
    qc = {key: CounterMetricFamily(f"vhostd_queue_{metric.removesuffix('_total')}", text,
                                   labels=["device", "queue"]) for key, metric, text in QUEUE_COUNTERS}
    pending = GaugeMetricFamily("vhostd_queue_pending", "Requests taken off the ring whose I/O is in flight",
                                labels=["device", "queue"])
    latency = HistogramMetricFamily("vhostd_request_latency_seconds",
                                    "Time from taking a request off the ring to its completion",
                                    labels=["device", "queue"])
    store_up = GaugeMetricFamily("vhostd_store_up", "1 when the device's remote store (NBD, RBD) answers",
                                 labels=["device"])
    store_timeouts = CounterMetricFamily("vhostd_store_timeouts", "Requests failed after waiting io_timeout",
                                         labels=["device"])
    # the rest of "store" is each kind's own: vhostd_store_<key>
    store_more: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    device_counters: dict[str, CounterMetricFamily] = {}
    for d in devices:
        dev = d["name"]
        info.add_metric([dev, d["type"], d["socket"]], 1)
        if d["state"] != "serving":  # its remote store is not open yet
            connected.add_metric([dev], 0)
            store_up.add_metric([dev], 0)
            continue
        if "store" in d:
            store_up.add_metric([dev], int(d["store"]["up"]))
            store_timeouts.add_metric([dev], d["store"]["timeouts"])
            for key, value in d["store"].items():
                if key in STORE_GAUGES or key in STORE_COUNTERS:
                    fam = store_more.get(key)
                    if fam is None:
                        kind, text = (GaugeMetricFamily, STORE_GAUGES[key]) if key in STORE_GAUGES \
                            else (CounterMetricFamily, STORE_COUNTERS[key])
                        fam = store_more[key] = kind(f"vhostd_store_{key}", text, labels=["device"])
                    fam.add_metric([dev], value)
        connected.add_metric([dev], int(d["connected"]))
        needs_reset.add_metric([dev], int(d["needs_reset"]))
        features.add_metric([dev], d["features"])
        for q in d["queues"]:
            buckets, total_ns = q["latency"]
            labels = [dev, str(q["index"])]
            for key, _, _ in QUEUE_COUNTERS:
                qc[key].add_metric(labels, q[key])
            pending.add_metric(labels, q["pending"])
            cumulative, running = [], 0
            for k, count in enumerate(buckets):
                running += count
                bound = "+Inf" if k == len(buckets) - 1 else repr((1 << k) / 1e6)
                cumulative.append((bound, running))
            if running:
                latency.add_metric(labels, cumulative, total_ns / 1e9)
        unit = "pair" if d["type"] == "net" else "queue"
        for i, counters in enumerate(d["counters"]):
            for key, value in counters.items():
                name = f"vhostd_{d['type']}_{key}"
                fam = device_counters.get(name)
                if fam is None:
                    fam = device_counters[name] = CounterMetricFamily(
                        name, f"{d['type']} {key.replace('_', ' ')} per {unit}", labels=["device", unit])
                fam.add_metric([dev, str(i)], value)
    yield from (info, connected, needs_reset, features, *qc.values(), pending, latency, store_up,
                store_timeouts, *store_more.values(), *device_counters.values())


class _Fixed:
    """A collector of one snapshot already taken (on the loop)."""

    def __init__(self, devices: list[dict]) -> None:
        self.devices = devices

    def collect(self):
        return metric_families(self.devices)


def exposition(daemon) -> bytes:
    """The metrics in Prometheus' text format, from the loop (the web console's /metrics)."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(snapshot(daemon)))
    return generate_latest(registry)


class MetricsServer:
    def __init__(self, daemon, address: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
        from prometheus_client import start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon, loop))
        host, port = address
        self.server, self.thread = start_http_server(port, host, registry=self.registry)
        # socketserver prints a traceback to stderr for every client that hangs
        # up early; one debug line is enough.
        self.server.handle_error = lambda request, client: log.debug("metrics client %s: %s", client,
                                                                     sys.exc_info()[1])
        self.daemon = daemon
        log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
