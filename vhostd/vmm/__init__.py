"""vhostd's tiny VMM: KVM guests whose devices are vhost-user back-ends.

A VM is described by a ``vms:`` entry of the config file (vhostd.config.VmConfig)
and boots either a guest-drivers payload (an ELF program entered at CPL3,
guest-drivers/ABI.md) or a Linux bzImage.  Its devices are virtio-mmio
windows whose device side is any vhost-user back-end: vhostd itself,
qemu-storage-daemon, DPDK.

    from vhostd.vmm import VirtualMachine
    status = VirtualMachine(config.vm("vm0")).run()

Modules: kvm (the KVM ioctls), boot (long mode, ELF, boot info, bzImage),
uart (8250 console), virtio_mmio (the transport speaking vhost-user),
vm (vCPU threads and exit dispatch).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from vhostd.vmm.vm import CRASH_STATUS, VirtualMachine, VmError

__all__ = ["CRASH_STATUS", "VirtualMachine", "VmError", "kvm_available", "start_vms", "stop_vms"]


def kvm_available() -> tuple[bool, str]:
    """(True, "") when /dev/kvm can be opened, else (False, why not)."""
    try:
        from vhostd.vmm.kvm import Kvm

        Kvm().close()
    except OSError as e:
        return False, f"/dev/kvm: {e.strerror or e}"
    return True, ""


def start_vms(vm_configs, *, log: logging.Logger | None = None,
              on_exit: Callable[[VirtualMachine], None] | None = None) -> list[VirtualMachine]:
    """Start VMs in the background (for `vhostd serve` autostart): each is
    built and run on its own thread, so the caller's event loop stays free to
    serve the back-ends the VMs connect to.  Console lines go to the log.
    on_exit(vm) is called (on the VM's thread) when a VM ends."""
    log = log or logging.getLogger("vhostd.vmm")
    vms = []
    for cfg in vm_configs:
        console = _LogConsole(log, cfg.name)
        vm = VirtualMachine(cfg, console=console)
        vms.append(vm)
        t = threading.Thread(target=_run_in_background, args=(vm, log, on_exit), name=f"vm-{cfg.name}", daemon=True)
        vm._runner = t  # type: ignore[attr-defined]
        t.start()
    return vms


def stop_vms(vms: list[VirtualMachine], timeout: float = 10.0) -> None:
    """Stop the VMs start_vms() started and wait for them to be torn down."""
    for vm in vms:
        vm.stop()
    for vm in vms:
        t = getattr(vm, "_runner", None)
        if t is not None:
            t.join(timeout)


def _run_in_background(vm: VirtualMachine, log: logging.Logger, on_exit) -> None:
    try:
        status = vm.run()
        log.info("%s: VM ended: %s (status %s, ran %.3f s)", vm.name, vm.exit_reason, status, vm.run_time)
    except VmError as e:
        log.error("%s: VM did not start: %s", vm.name, e)
    except Exception:
        log.exception("%s: VM failed", vm.name)
    finally:
        if on_exit is not None:
            on_exit(vm)


class _LogConsole:
    def __init__(self, log: logging.Logger, name: str) -> None:
        self.log = log
        self.name = name

    def __call__(self, data: bytes) -> None:
        for line in data.decode(errors="replace").splitlines():
            self.log.info("%s: console: %s", self.name, line)
