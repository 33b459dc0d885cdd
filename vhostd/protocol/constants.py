"""Numbers from the vhost-user specification (QEMU docs/interop/vhost-user.rst)."""

import enum


class Request(enum.IntEnum):
    """Front-end to back-end request codes."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the vhost-user protocol feature mask."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# Header flags
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

# Virtio feature bit that vhost-user reuses to announce protocol features.
F_PROTOCOL_FEATURES = 30
# vhost feature bit: the back-end logs its writes into guest memory (migration).
F_LOG_ALL = 26
# Virtio feature bit of packed rings: their SET/GET_VRING_BASE carry wrap counters.
F_RING_PACKED = 34
# SET_VRING_ADDR flag: log the used ring's writes at log_guest_addr.
VRING_F_LOG = 1

# SET_VRING_KICK/CALL/ERR payload: low byte is the ring index, bit 8 means "no fd".
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

# Limits the spec fixes or that we choose.
MAX_MEM_REGIONS_TABLE = 8  # SET_MEM_TABLE carries at most 8 regions
MAX_MEM_SLOTS = 509  # answered to GET_MAX_MEM_SLOTS
MAX_CONFIG_SPACE = 256  # virtio config space is at most 256 bytes
MAX_FDS_PER_MESSAGE = 8
HEADER_SIZE = 12
# Largest legal payload: SET_MEM_TABLE (8 + 8 * 32) or config (12 + 256).
MAX_PAYLOAD = 12 + MAX_CONFIG_SPACE
