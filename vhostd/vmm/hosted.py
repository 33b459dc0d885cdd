"""VMs that `vhostd serve` runs next to its devices: those of the config's
``vms:``, started at boot (autostart) or later from the web console.

Each run of a VM is a fresh VirtualMachine on a thread of its own, so the
daemon's event loop stays free to serve the back-ends the VM connects to.
What a status view needs (state, exit status, the tail of the console) is
kept here; the console's lines also go to the log.
"""

from __future__ import annotations

import collections
import logging
import threading

from vhostd.vmm.vm import VirtualMachine, VmError

CONSOLE_TAIL = 200  # console lines kept per VM for status views


class ConsoleTail:
    """A VM's console sink: each line goes to the log and the last
    CONSOLE_TAIL lines are kept (the VMM's Console hands over whole lines)."""

    def __init__(self, log: logging.Logger, name: str) -> None:
        self.log = log
        self.name = name
        self._lines: collections.deque[str] = collections.deque(maxlen=CONSOLE_TAIL)
        self._lock = threading.Lock()  # written by vCPU threads, read by the loop

    def __call__(self, data: bytes) -> None:
        lines = data.decode(errors="replace").splitlines()
        with self._lock:
            self._lines.extend(lines)
        for line in lines:
            self.log.info("%s: console: %s", self.name, line)

    def tail(self, n: int = CONSOLE_TAIL) -> list[str]:
        with self._lock:
            return list(self._lines)[-n:]


class HostedVm:
    """One VM of the config: its current (or last) run and its console."""

    def __init__(self, cfg, log: logging.Logger) -> None:
        self.cfg = cfg
        self.log = log
        self.console = ConsoleTail(log, cfg.name)
        self.vm: VirtualMachine | None = None
        self.thread: threading.Thread | None = None
        self.error = ""  # why the last start failed
        self.runs = 0

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        """Start a run in the background; VmError if one is still going."""
        if self.running:
            raise VmError(f"VM {self.cfg.name!r} is already running")
        self.error = ""
        self.runs += 1
        self.vm = VirtualMachine(self.cfg, console=self.console)
        self.thread = threading.Thread(target=self._run, args=(self.vm,), name=f"vm-{self.cfg.name}", daemon=True)
        self.thread.start()

    def _run(self, vm: VirtualMachine) -> None:
        try:
            status = vm.run()
            self.log.info("%s: VM ended: %s (status %s, ran %.3f s)", vm.name, vm.exit_reason, status, vm.run_time)
        except VmError as e:
            self.error = str(e)
            self.log.error("%s: VM did not start: %s", vm.name, e)
        except Exception as e:
            self.error = f"failed: {e}"
            self.log.exception("%s: VM failed", vm.name)

    def stop(self) -> None:
        """Ask the VM to end (returns at once; join() waits)."""
        if self.vm is not None:
            self.vm.stop()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def describe(self, console_lines: int = 40) -> dict:
        """What `vhostd status` and the web console show about the VM."""
        vm = self.vm
        if self.running:
            state = "running"
        elif self.error:
            state = "failed"
        elif vm is None:
            state = "stopped"
        else:
            state = "ended"
        return {
            "name": self.cfg.name,
            "state": state,
            "autostart": self.cfg.autostart,
            "memory": self.cfg.memory,
            "vcpus": self.cfg.vcpus,
            "boots": self.cfg.payload or self.cfg.kernel,
            "devices": [{"type": d.type, "socket": d.socket} for d in self.cfg.devices],
            "runs": self.runs,
            "exit_status": None if vm is None or self.running else vm.exit_status,
            "exit_reason": "" if vm is None or self.running else vm.exit_reason,
            "error": self.error,
            "run_time": round(vm.run_time, 3) if vm is not None else 0.0,
            "console": self.console.tail(console_lines),
        }


class HostedVms:
    """The daemon's VMs by name, in config order."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.vms: dict[str, HostedVm] = {}

    def update(self, configs) -> None:
        """Take the VMs of a (re)loaded config: new ones are added, removed
        ones dropped; a running VM keeps running on the config it started
        with until it ends (and stays listed until then)."""
        wanted = {cfg.name: cfg for cfg in configs}
        for name in list(self.vms):
            if name not in wanted and not self.vms[name].running:
                del self.vms[name]
        for name, cfg in wanted.items():
            if name in self.vms:
                self.vms[name].cfg = cfg  # (a running one already holds its VirtualMachine)
            else:
                self.vms[name] = HostedVm(cfg, self.log)

    def describe(self) -> list[dict]:
        return [vm.describe() for vm in self.vms.values()]

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every running VM and wait for them to be torn down (blocks:
        run it off the loop, since a vCPU may wait for a device the loop serves)."""
        running = [vm for vm in self.vms.values() if vm.running]
        for vm in running:
            vm.stop()
        for vm in running:
            vm.join(timeout)
