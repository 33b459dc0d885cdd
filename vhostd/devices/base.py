from __future__ import annotations

from typing import Any


class Device:
    """What the vhost-user glue needs from a device model.

    A subclass sets name, num_queues, max_queue_size, handler (a C function
    pointer: int (*)(void *ctx, struct vd_req *)) and ctx (its first
    argument), and implements features() and config_space().  poll_us
    (default 0, off) is how long the data plane busy-polls a queue that ran
    empty before it waits for a kick again.
    """

    name: str
    num_queues: int
    max_queue_size: int
    handler: Any
    ctx: Any
    poll_us: int = 0

    def native(self) -> tuple[Any, Any, int, Any]:
        """What the data plane needs to create the device's queues: (handler,
        ctx, bytes of device state per request, release).  With a release
        function the data plane takes a reference to ctx and drops it once
        none of the device's I/O is pending any more."""
        from vhostd.native import ffi

        return self.handler, self.ctx, 0, ffi.NULL

    def features(self) -> int:
        """Device feature bits, ring/transport bits included."""
        raise NotImplementedError

    def queue_num_reply(self) -> int:
        """What GET_QUEUE_NUM answers; net devices count queue pairs."""
        return self.num_queues

    def extra_protocol_features(self) -> int:
        """vhost-user protocol features this device type adds (e.g. net's MTU)."""
        return 0

    def set_features(self, features: int) -> None:
        """The front-end acked these features."""

    def reset(self) -> None:
        """The device was reset or its front-end went away (rings already
        stopped): forget state the driver set, e.g. a MAC address."""

    def config_space(self) -> bytes:
        """The device's virtio config space as the driver reads it."""
        raise NotImplementedError

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write into config space; raise ValueError to refuse it."""
        raise ValueError("the config space is read-only")

    def set_mtu(self, mtu: int) -> None:
        raise ValueError("this device has no MTU")

    def send_rarp(self, mac: bytes) -> None:
        raise ValueError("this device cannot announce a MAC address")

    def claim(self) -> None:
        """The guest starts the device (its first queue): take what it must
        hold while it runs, e.g. a shared image's lock; OSError says why not."""

    def claim_waits(self) -> bool:
        """Whether claim may wait for a network (run it off the event loop)."""
        return False

    def release(self) -> None:
        """The front-end stopped the device and none of its I/O is in
        flight: let go of what claim took."""

    def attach(self, rings) -> None:
        """The device's rings exist in the data plane: start back-end work."""

    def detach(self) -> None:
        """Stop back-end work that touches the rings (before they are freed)."""

    def place(self, engine) -> int:
        """The worker all the device's queues must run on, or -1 (any: they
        are spread over the workers)."""
        return -1

    def notes_fd(self) -> int | None:
        """An fd that becomes readable when the device has lines for the log
        (take_notes), or None."""
        return None

    def take_notes(self) -> list[tuple[bool, str]]:
        """(is a warning, line) for each line the device has for the log."""
        return []

    def describe(self) -> dict[str, Any]:
        """Device-specific facts for `vhostd status` (e.g. blk's I/O engine)."""
        return {}

    def stats(self) -> list[dict[str, int]]:
        """Per-queue device counters."""
        return []

    def close(self) -> None: ...
