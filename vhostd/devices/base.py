from __future__ import annotations

from typing import Any, Protocol


class Device(Protocol):
    """What the vhost-user glue needs from a device model."""

    name: str
    num_queues: int
    max_queue_size: int
    handler: Any  # C function pointer: uint32_t (*)(void *ctx, struct vd_req *, int queue)
    ctx: Any  # its first argument

    def features(self) -> int:
        """Device feature bits, ring/transport bits included."""

    def config_space(self) -> bytes:
        """The device's virtio config space as the driver reads it."""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write into config space; raise ValueError to refuse it."""

    def stats(self) -> list[dict[str, int]]:
        """Per-queue device counters."""

    def close(self) -> None: ...
