"""Virtio constants shared by every device type (OASIS virtio v1.2)."""

# Transport / ring feature bits (section 6)
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32

# Device status bits (section 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

RING_FEATURES = (1 << F_RING_INDIRECT_DESC) | (1 << F_RING_EVENT_IDX) | (1 << F_VERSION_1)


def bit(n: int) -> int:
    return 1 << n
