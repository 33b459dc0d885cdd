"""vhostd: a vhost-user device back-end daemon (virtio-blk, virtio-net) with a tiny VMM."""

__version__ = "0.1.0"
