"""The daemon: one asyncio loop (uvloop) for the control plane, one native
engine for the data plane, a DeviceServer per configured device."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pwd
import resource
import signal
import socket
import threading
import time

from vhostd import storage, systemd
from vhostd.config import Config, ConfigError, load_config
from vhostd.dataplane import Engine
from vhostd.devices import Switches, create_device
from vhostd.devices.net import NetDevice, close_taps
from vhostd.handler import DeviceHandler
from vhostd.server import Access, DeviceServer

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


#: daemon keys a reload cannot apply (they keep their running value until a restart)
RESTART_KEYS = ("workers", "control_socket", "user", "group", "metrics", "web", "web_token_file")
#: seconds between attempts to open a store that is not there yet (doubling up to the second)
OPEN_RETRY = (1.0, 30.0)


@dataclasses.dataclass
class Opening:
    """A device whose store is being opened off the loop (a remote disk):
    it starts once the store is open; until then status shows why not."""

    cfg: object
    task: asyncio.Task | None = None
    attempts: int = 0
    error: str = ""


class Daemon:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 passed: list[tuple[str, socket.socket]] = ()) -> None:
        """passed: listening sockets from socket activation (systemd.listen_fds)."""
        self.config = config
        self.loop = loop
        self.passed = list(passed)
        self.engine = Engine(config.daemon.workers)
        self.servers: dict[str, DeviceServer] = {}
        self.configs: dict[str, object] = {}  # the config each running device was started from
        self.opening: dict[str, Opening] = {}  # devices whose store is still being opened
        self.switches = Switches()
        self._stopped = asyncio.Event()
        self.control = None  # vhostd.control.ControlServer when daemon.control_socket is set
        self.metrics = None  # vhostd.metrics.MetricsServer when daemon.metrics is set
        self.web = None  # vhostd.web.WebConsole when daemon.web is set
        self.vms = None  # vhostd.vmm.HostedVms when the config has VMs (imported only then)

    def start(self) -> None:
        """Start every device; if one fails, undo the others and raise."""
        try:
            for cfg in self.config.devices:
                self._start_device(cfg)
        except BaseException:
            self.close()
            raise
        for name, sock in self.passed:
            if not any(self.passed_listener(cfg) is sock for cfg in self.config.devices):
                log.warning("a socket passed by socket activation (%s, name %r) matches no device: unused",
                            systemd.bound_path(sock), name)
        log.info("serving %d device(s) with %d data plane worker(s)%s", len(self.servers), self.engine.workers,
                 f"; opening the store of {len(self.opening)} more" if self.opening else "")
        uring, why = self.engine.uring()
        if not uring and any(s.device.describe().get("aio") == "threads" for s in self.servers.values()):
            log.warning("io_uring is unavailable (%s): disk I/O runs on a thread pool", why)

    def passed_listener(self, cfg) -> socket.socket | None:
        """The passed socket for a device: the one named after it
        (FileDescriptorName=), else the one bound to its socket path."""
        named = [sock for name, sock in self.passed if name == cfg.name]
        if named:
            return named[0]
        return next((sock for _, sock in self.passed if systemd.bound_path(sock) == os.path.abspath(cfg.socket)), None)

    def _start_device(self, cfg, store=None) -> None:
        """Start a device (on store, if its store was opened already).  A
        store that may take long to open (a remote disk) is opened off the
        loop first, and the device starts when it is open."""
        if store is None and cfg.type == "blk" and storage.BACKENDS[cfg.backend].BLOCKING_OPEN:
            op = self.opening[cfg.name] = Opening(cfg)
            op.task = self.loop.create_task(self._open_store(op))
            return
        listener = self.passed_listener(cfg)
        if listener is not None and systemd.bound_path(listener) != os.path.abspath(cfg.socket):
            log.warning("%s: serving the passed socket %s, not the config's socket %s", cfg.name,
                        systemd.bound_path(listener) or "(unnamed)", cfg.socket)
        device = create_device(cfg, self.switches, store)
        handler = None
        try:
            handler = DeviceHandler(device, self.engine, logging.LoggerAdapter(log, {}))
            device.attach(handler.rings)
            server = DeviceServer(device, handler, cfg.socket, self.loop, cfg.socket_mode,
                                  access=Access.from_config(cfg), on_session=self._sessions_changed,
                                  listener=listener)
            handler.log = server.log
            if self.config.daemon.metrics or self.config.daemon.web:
                handler.rings.set_timing(True)  # latency histograms only when someone reads them
            server.start()
        except BaseException:
            device.detach()
            if handler is not None:
                handler.close()
            device.close()
            raise
        self.servers[cfg.name] = server
        self.configs[cfg.name] = cfg

    async def _open_store(self, op: Opening) -> None:
        cfg = op.cfg
        backend = storage.BACKENDS[cfg.backend]
        delay = OPEN_RETRY[0]
        while True:
            op.attempts += 1
            future = self.loop.run_in_executor(None, backend.open_store, cfg.store, cfg.name, cfg.readonly)
            try:
                store = await asyncio.shield(future)
                break
            except asyncio.CancelledError:
                # The thread cannot be stopped: the store it opens is closed when it is.
                future.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().close())
                raise
            except (OSError, ValueError) as exc:
                if str(exc) != op.error:
                    log.warning("%s: cannot open its store (%s); trying again every %g s at most", cfg.name, exc,
                                OPEN_RETRY[1])
                op.error = str(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, OPEN_RETRY[1])
        del self.opening[cfg.name]
        try:
            self._start_device(cfg, store)
        except (OSError, ValueError, MemoryError) as exc:
            log.error("%s: cannot start: %s", cfg.name, exc)
            return
        log.info("%s: store open%s", cfg.name, f" after {op.attempts} attempts" if op.attempts > 1 else "")
        self._sessions_changed()

    def _stop_device(self, name: str, taps: list[int] | None = None) -> None:
        """Close the device's session and socket and free it.  TAP fds go to
        `taps` when given (closing many together is much faster)."""
        if name in self.opening:
            self.opening.pop(name).task.cancel()
            return
        server = self.servers.pop(name)
        self.configs.pop(name, None)
        server.stop()
        server.device.detach()  # TAP reading and switch ports stop before the rings go
        server.handler.close()
        if isinstance(server.device, NetDevice):
            fds = server.device.take_tap_fds()
            if taps is None:
                close_taps(fds)
            else:
                taps += fds
        server.device.close()

    # ------------------------------------------------------------ reload

    def reload(self) -> dict:
        """Re-read the config file and apply the difference: start added
        devices, stop removed ones, restart changed ones; leave the others
        (and their front-ends) alone.  A config that does not validate
        changes nothing.  Returns what happened, for `vhostd reload`."""
        systemd.notify_reloading()
        try:
            try:
                new = load_config(self.config.path)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("reload refused: %s", problem)
                log.error("reload refused: %d problem(s) in %s; the running devices are unchanged",
                          len(exc.problems), self.config.path)
                return {"ok": False, "errors": [str(p) for p in exc.problems]}
            return self._apply(new)
        finally:
            systemd.notify_ready(self.status_line())

    def _apply(self, new: Config) -> dict:
        old_d, new_d = self.config.daemon, new.daemon
        for key in RESTART_KEYS:
            if getattr(old_d, key) != getattr(new_d, key):
                log.warning("reload: daemon.%s changed; this needs a restart and is ignored until then", key)
        if old_d.log_level != new_d.log_level:
            logging.getLogger().setLevel(new_d.log_level.upper())
            log.info("reload: log level is now %s", new_d.log_level)
        wanted = {cfg.name: cfg for cfg in new.devices}
        outcome = {"ok": True, "started": [], "stopped": [], "restarted": [], "kept": [], "failed": {}}
        taps: list[int] = []
        running = {**{n: op.cfg for n, op in self.opening.items()}, **self.configs}
        for name, cfg in running.items():
            if name not in wanted:
                self._stop_device(name, taps)
                outcome["stopped"].append(name)
            elif cfg != wanted[name]:  # settings that change nothing once running compare equal
                self._stop_device(name, taps)
                outcome["restarted"].append(name)
            else:
                outcome["kept"].append(name)
        close_taps(taps)
        for name, cfg in wanted.items():
            if name in self.servers or name in self.opening:
                continue
            try:
                self._start_device(cfg)
            except (OSError, ValueError, MemoryError) as exc:
                log.error("%s: cannot start: %s", name, exc)
                outcome["failed"][name] = str(exc)
                if name in outcome["restarted"]:
                    outcome["restarted"].remove(name)
                continue
            if name not in outcome["restarted"]:
                outcome["started"].append(name)
        # Keys that need a restart keep their running value.
        self.config = dataclasses.replace(new, daemon=dataclasses.replace(
            new_d, **{k: getattr(old_d, k) for k in RESTART_KEYS}))
        self.take_vms(new.vms)
        outcome["ok"] = not outcome["failed"]
        log.info("reload: %d kept, %d started, %d stopped, %d restarted, %d failed",
                 *(len(outcome[k]) for k in ("kept", "started", "stopped", "restarted", "failed")))
        return outcome

    # ------------------------------------------------------------ VMs

    def take_vms(self, configs) -> None:
        """Know the config's VMs (the built-in VMM is imported only if there are any)."""
        if self.vms is None and not configs:
            return
        if self.vms is None:
            from vhostd.vmm import HostedVms

            self.vms = HostedVms(log)
        self.vms.update(configs)

    def _vm(self, name: str):
        return self.vms.vms.get(name) if self.vms is not None else None

    def _no_vm(self, name: str) -> dict:
        return {"ok": False, "error": f"no VM named {name!r} in {self.config.path}"}

    def start_vm(self, name: str) -> dict:
        """Start a VM of the config (autostart, or an action of the web console)."""
        from vhostd.vmm import VmError

        vm = self._vm(name)
        if vm is None:
            return self._no_vm(name)
        try:
            vm.start()
        except (VmError, OSError) as exc:
            log.error("%s: VM not started: %s", name, exc)
            return {"ok": False, "error": str(exc)}
        log.info("%s: VM started", name)
        return {"ok": True, "vm": name, "state": "running"}

    def stop_vm(self, name: str) -> dict:
        vm = self._vm(name)
        if vm is None:
            return self._no_vm(name)
        if not vm.running:
            return {"ok": False, "error": f"VM {name!r} is not running"}
        vm.stop()
        return {"ok": True, "vm": name, "state": "stopping"}

    def status_line(self) -> str:
        connected = sum(1 for s in self.servers.values() if s.connection is not None)
        opening = f", {len(self.opening)} opening their store" if self.opening else ""
        return f"serving {len(self.servers)} device(s), {connected} connected{opening}"

    def _sessions_changed(self) -> None:
        systemd.notify_status(self.status_line())

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

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait (at most timeout s) until those in
        flight are done and visible to the guests, so that nothing is left
        half-done when the sessions close.  What a guest queued and we did
        not take stays in its ring for the next vhostd.  True if all drained."""
        rings = [s.handler.rings for s in self.servers.values() if s.connection is not None]
        for op in self.opening.values():
            op.task.cancel()
        for r in rings:
            for i in range(r.num_queues):
                r.drain(i)
        deadline = time.monotonic() + timeout
        while True:
            left = sum(r.pending(i) for r in rings for i in range(r.num_queues))
            if not left:
                return True
            if time.monotonic() >= deadline:
                log.warning("stopping with %d request(s) still in flight (their disks do not answer)", left)
                return False
            await asyncio.sleep(0.005)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.control is not None:
            self.control.close()
            self.control = None
        for server in self.servers.values():  # first: no new front-ends anywhere
            server.stop_accepting()
        taps: list[int] = []
        for name in [*self.opening, *self.servers]:
            self._stop_device(name, taps)
        close_taps(taps)
        self.engine.close()
        # Stores that close on threads of their own (an RBD image flushes
        # its cache) finish before the process ends, if the cluster lets them.
        left = storage.wait_closed(STORE_CLOSE_TIMEOUT)
        if left:
            log.warning("stopping with %d store(s) not closed after %g s (their servers do not answer)",
                        left, STORE_CLOSE_TIMEOUT)


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become uid/gid once everything privileged is open: supplementary
    groups first, then the gid, then the uid (after setuid the others are
    no longer allowed)."""
    if uid is None and gid is None:
        return
    if os.geteuid() != 0:
        raise PermissionError("daemon.user/daemon.group need vhostd to be started as root")
    if gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    os.setgroups([gid])
    os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    log.info("dropped privileges to uid %d gid %d", os.getuid(), os.getgid())


STOP_TIMEOUT = 10.0  # seconds from SIGTERM to exit, at most
STORE_CLOSE_TIMEOUT = 4.0  # of it, after the drain (half), for remote stores to close


def _give_up_stopping() -> None:
    log.error("shutdown did not finish within %g s; exiting anyway", STOP_TIMEOUT)
    logging.shutdown()
    os._exit(1)


async def _watchdog(interval: float) -> None:
    # Pinged from the loop itself: a wedged loop stops the pings, which is the point.
    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def serve(config: Config, passed: list[tuple[str, socket.socket]] | None = None) -> int:
    """Serve config until stopped.  passed: listening sockets given on the
    command line (one-device mode's --fd); default: socket activation's."""
    loop = asyncio.get_running_loop()
    raise_open_file_limit(fds_needed(config))
    daemon = Daemon(config, loop, systemd.listen_fds() if passed is None else passed)
    # Before the sockets appear: a signal sent as soon as they exist must
    # find its handler (the loop runs the handlers at the next await).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    loop.add_signal_handler(signal.SIGUSR1, daemon.log_stats)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    daemon.start()
    daemon.take_vms(config.vms)
    watchdog = None
    try:
        if config.daemon.control_socket:
            from vhostd.control import ControlServer

            daemon.control = ControlServer(daemon, config.daemon.control_socket)
            await daemon.control.start()
        if config.daemon.metrics:
            from vhostd.metrics import MetricsServer

            daemon.metrics = MetricsServer(daemon, config.daemon.metrics, loop)
        if config.daemon.web:
            from vhostd.web import WebConsole

            daemon.web = WebConsole(daemon, config.daemon.web, config.daemon.web_token_file)
            await daemon.web.start()
        drop_privileges(config.daemon.user, config.daemon.group)
        # The built-in VMM: each VM runs on its own threads and connects to
        # the sockets this loop serves.
        for vm in config.vms:
            if vm.autostart:
                daemon.start_vm(vm.name)
        systemd.notify_ready(daemon.status_line())
        if (interval := systemd.watchdog_interval()) is not None:
            watchdog = loop.create_task(_watchdog(interval))
        await daemon.wait()
        log.info("stopping")
        systemd.notify_stopping()
        # Shutdown is bounded: a hung disk must not keep the service from
        # stopping (systemd's TimeoutStopSec is longer).
        deadline = threading.Timer(STOP_TIMEOUT, _give_up_stopping)
        deadline.daemon = True
        deadline.start()
        await daemon.drain(STOP_TIMEOUT / 2)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if daemon.web is not None:
            await daemon.web.close()
            daemon.web = None
        if daemon.vms is not None:
            # Off the loop: a vCPU may be waiting for an answer from a device
            # this loop serves.
            await loop.run_in_executor(None, daemon.vms.stop_all)
        daemon.close()
    return 0
