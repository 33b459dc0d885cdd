"""Virtio device models.  A device offers features and a config space and
hands the data plane a C request handler; it never sees rings or vhost-user."""

from vhostd.devices.base import Device
from vhostd.devices.blk import BlkDevice
from vhostd.devices.net import NetDevice, Switches

__all__ = ["Device", "BlkDevice", "NetDevice", "Switches", "create_device"]


def create_device(cfg, switches: Switches, store=None) -> Device:
    """Build the device model a config entry describes (a blk device on the
    store given, or its backend opens it now)."""
    if cfg.type == "blk":
        return BlkDevice(cfg, store)
    if cfg.type == "net":
        return NetDevice(cfg, switches)
    raise ValueError(f"unknown device type {cfg.type!r}")
