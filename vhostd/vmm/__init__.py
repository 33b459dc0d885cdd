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
vm (vCPU threads and exit dispatch), hosted (the VMs `vhostd serve` runs).
"""

from __future__ import annotations

from vhostd.vmm.hosted import HostedVm, HostedVms
from vhostd.vmm.vm import CRASH_STATUS, VirtualMachine, VmError

__all__ = ["CRASH_STATUS", "HostedVm", "HostedVms", "VirtualMachine", "VmError", "kvm_available"]


def kvm_available() -> tuple[bool, str]:
    """(True, "") when /dev/kvm can be opened, else (False, why not)."""
    try:
        from vhostd.vmm.kvm import Kvm

        Kvm().close()
    except OSError as e:
        return False, f"/dev/kvm: {e.strerror or e}"
    return True, ""
