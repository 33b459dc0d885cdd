"""vhost-user-net test harness: DPDK testpmd as reference peer (testpmd.py),
network namespaces with TAP/veth (netns.py), pytest fixtures (fixtures.py).
QEMU guests with vhost-user-net NICs: guest.qemu.QemuGuest(nics=[NetNic(...)])."""
