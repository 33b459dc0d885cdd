"""The daemon: one asyncio loop (uvloop) for the control plane, one native
engine for the data plane, a DeviceServer per configured device."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal

from vhostd.config import Config
from vhostd.dataplane import Engine
from vhostd.devices import Switches, create_device
from vhostd.devices.net import NetDevice, close_taps
from vhostd.handler import DeviceHandler
from vhostd.server import DeviceServer

log = logging.getLogger("vhostd")


def fds_needed(config: Config) -> int:
    """Open files the devices take with every front-end connected: each
    device holds a listening socket and an eventfd (plus its image or one
    TAP fd per queue pair); a session adds its socket and a kick, call and
    err eventfd per queue."""
    total = 64  # Python, the loop, the workers' epoll and wake fds, logs
    for cfg in config.devices:
        queues = 2 * cfg.queues + 1 if cfg.type == "net" else cfg.queues
        total += 3 + (cfg.queues if cfg.type == "net" else 1) + 3 * queues
    return total + 2 * config.daemon.workers


def raise_open_file_limit(wanted: int) -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit and return the new soft
    limit.  The usual soft default (1024) runs out at a few hundred devices;
    uvloop waits with epoll and nothing here uses select(), so a large limit
    costs nothing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("open file limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("the open file limit (%d) is below the %d files the devices may need with every front-end "
                    "connected; raise it (ulimit -n, LimitNOFILE=)", soft, wanted)
    return soft


class Daemon:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.engine = Engine(config.daemon.workers)
        self.servers: dict[str, DeviceServer] = {}
        self.switches = Switches()
        self._stopped = asyncio.Event()

    def start(self) -> None:
        """Start every device; if one fails, undo the others and raise."""
        try:
            for cfg in self.config.devices:
                self._start_device(cfg)
        except BaseException:
            self.close()
            raise
        log.info("serving %d device(s) with %d data plane worker(s)", len(self.servers), self.engine.workers)

    def _start_device(self, cfg) -> None:
        device = create_device(cfg, self.switches)
        handler = None
        try:
            handler = DeviceHandler(device, self.engine, logging.LoggerAdapter(log, {}))
            device.attach(handler.rings)
            server = DeviceServer(device, handler, cfg.socket, self.loop, cfg.socket_mode)
            handler.log = server.log
            server.start()
        except BaseException:
            device.detach()
            if handler is not None:
                handler.close()
            device.close()
            raise
        self.servers[cfg.name] = server

    def stop(self) -> None:
        self._stopped.set()

    def log_stats(self) -> None:
        """One line per queue (blk) or queue pair (net) with the device's
        counters, e.g. `net0: stats 0: tx_frames=3 ... rx_dropped=1`."""
        for name, server in self.servers.items():
            for i, counters in enumerate(server.device.stats()):
                log.info("%s: stats %d: %s", name, i, " ".join(f"{k}={v}" for k, v in counters.items()))

    async def wait(self) -> None:
        await self._stopped.wait()

    def close(self) -> None:
        taps: list[int] = []
        for server in self.servers.values():
            server.stop()
            server.device.detach()  # back-end threads and switch ports go before the rings
            server.handler.close()
            if isinstance(server.device, NetDevice):
                taps += server.device.take_tap_fds()  # closed together below: much faster
            server.device.close()
        self.servers.clear()
        close_taps(taps)
        self.engine.close()


async def serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    raise_open_file_limit(fds_needed(config))
    daemon = Daemon(config, loop)
    daemon.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    loop.add_signal_handler(signal.SIGUSR1, daemon.log_stats)
    vms = []
    try:
        autostart = [vm for vm in config.vms if vm.autostart]
        if autostart:
            # The built-in VMM: each VM runs on its own threads and connects
            # to the sockets this loop serves.
            from vhostd.vmm import start_vms

            vms = start_vms(autostart, log=log)
        await daemon.wait()
        log.info("stopping")
    finally:
        if vms:
            from vhostd.vmm import stop_vms

            # Off the loop: a vCPU may be waiting for an answer from a device
            # this loop serves.
            await loop.run_in_executor(None, stop_vms, vms)
        daemon.close()
    return 0
