"""Virtio constants shared by every device type (OASIS virtio v1.2)."""

# Transport / ring feature bits (section 6)
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_RING_PACKED = 34

# Device status bits (section 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# Ring layouts and options every device offers; the front-end chooses.
RING_FEATURES = (1 << F_RING_INDIRECT_DESC) | (1 << F_RING_EVENT_IDX) | (1 << F_VERSION_1) | (1 << F_RING_PACKED)


def bit(n: int) -> int:
    return 1 << n


def feature_names(features: int, device_type: str) -> list[str]:
    """Names of the set feature bits, from the device module's F_* constants
    (e.g. ["SIZE_MAX", "FLUSH", "RING_EVENT_IDX", "VERSION_1"]); unknown bits as "bit N"."""
    import importlib

    names = {F_RING_INDIRECT_DESC: "RING_INDIRECT_DESC", F_RING_EVENT_IDX: "RING_EVENT_IDX",
             F_VERSION_1: "VERSION_1", F_RING_PACKED: "RING_PACKED", 30: "PROTOCOL_FEATURES"}
    try:
        module = importlib.import_module(f"vhostd.devices.{device_type}")
        for key, value in vars(module).items():
            if key.startswith("F_") and isinstance(value, int) and value < 28:
                names.setdefault(value, key[2:])
    except ImportError:
        pass
    return [names.get(b, f"bit {b}") for b in range(64) if features >> b & 1]
