"""virtio-mmio (virtio 1.2 section 4.2.2, version 2) devices whose device
half is a vhost-user back-end (vhostd, qemu-storage-daemon, DPDK...).

The VMM only runs the transport; the back-end does the work:

* DeviceFeatures = the back-end's GET_FEATURES minus the vhost-user protocol
  bit and minus transport features this VMM does not implement (packed
  rings, notification data, ring reset, access platform, SR-IOV).
* Config space reads: GET_CONFIG of the whole space (offset 0: some
  back-ends ignore the offset) when the back-end speaks the CONFIG protocol
  feature; a net device without it gets a synthesized config (MAC derived
  from the VM name and slot, link up, the queue pairs, MTU 1500).  Writes go
  to SET_CONFIG.  ConfigGeneration changes whenever the fetched config does.
* DRIVER_OK: SET_FEATURES (the driver's features, plus the protocol bit when
  negotiated), SET_MEM_TABLE (the guest memfd; addresses are this process's
  mapping of guest RAM), then per ready queue SET_VRING_NUM, SET_VRING_BASE 0
  (packed rings: wrap counter 1 in bit 15), SET_VRING_ADDR (host virtual addresses), SET_VRING_CALL, SET_VRING_KICK,
  SET_VRING_ERR and SET_VRING_ENABLE 1.  A queue made ready after DRIVER_OK
  starts at once.
* QueueNotify is a KVM ioeventfd (datamatch = queue index) on the queue's
  kick eventfd: a guest kick goes from KVM straight to the back-end, no exit.
* Each queue's call eventfd is a KVM irqfd on the device's GSI: the
  back-end's interrupt goes straight to the in-kernel irqchip, edge style.
* InterruptStatus: since interrupts bypass the VMM, bit 0 (used buffer) is
  computed: set when the used index of a running split queue moved since
  the driver last acknowledged bit 0, and always while a packed queue runs
  (a packed ring has no used index to watch).  Bit 1 (config change) is set when a
  config fetch saw the config change.  InterruptACK clears what it names.
  A driver reads and acknowledges on every interrupt, so this state lives in
  C (vcpu.c), where the vCPU exit loop answers both registers itself.
* Status 0 (reset): SET_VRING_ENABLE 0 and GET_VRING_BASE on each started
  queue, which stops it in the back-end; everything else is forgotten.
  The device sets DEVICE_NEEDS_RESET when the back-end refuses a request,
  goes away, or signals a queue's error eventfd.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time

from vhostd.frontend import BackendError, Frontend
from vhostd.protocol.codec import MemoryRegion, ProtocolError
from vhostd.protocol.constants import F_PROTOCOL_FEATURES, ProtocolFeature
from vhostd._vcpu import ffi as _ffi, lib as _vcpu
from vhostd.vmm.kvm import GuestMemory, Vm

# Registers (offsets into the device's 4 KiB window)
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MMIO_MAGIC = 0x74726976  # "virt"
MMIO_VERSION = 2
VENDOR = int.from_bytes(b"vhsd", "little")
WINDOW = 0x1000

S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET, S_FAILED = 1, 2, 4, 8, 0x40, 0x80
INT_VRING, INT_CONFIG = 1, 2

DEVICE_IDS = {"net": 1, "blk": 2}

VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34
PACKED_BASE = 1 << 15
VHOST_F_LOG_ALL = 26
#: Transport features this VMM cannot offer even when the back-end can.
UNSUPPORTED_FEATURES = (
    (1 << F_PROTOCOL_FEATURES) | (1 << VHOST_F_LOG_ALL)
    | (1 << 33)  # ACCESS_PLATFORM: no IOMMU here
    | (1 << 37)  # SR_IOV
    | (1 << 38)  # NOTIFICATION_DATA: QueueNotify must carry only the index (ioeventfd datamatch)
    | (1 << 40)  # RING_RESET: no QueueReset register
)
VIRTIO_NET_F_MTU, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ = 3, 5, 16, 17, 22
VIRTIO_NET_S_LINK_UP = 1
#: Protocol features this front-end uses.
WANTED_PROTOCOL = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
#: Full config space sizes asked for with GET_CONFIG (virtio 1.2 structs up to
#: the fields every back-end here knows).
CONFIG_SIZES = {"blk": 60, "net": 24}
MAX_QUEUES = {"blk": 64, "net": 2 * 16 + 1}

log = logging.getLogger("vhostd.vmm")


class DeviceSetupError(Exception):
    """The back-end could not be reached or refused the handshake."""


class Queue:
    def __init__(self, index: int) -> None:
        self.index = index
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.wired = False  # ioeventfd/irqfd registered with KVM
        self.reset()

    def reset(self) -> None:
        self.num = 0
        self.ready = 0
        self.desc = self.driver = self.device = 0
        self.started = False
        self.backend_index = self.index


def _set_low(value: int, low: int) -> int:
    return (value & ~0xFFFFFFFF) | (low & 0xFFFFFFFF)


def _set_high(value: int, high: int) -> int:
    return (value & 0xFFFFFFFF) | (high & 0xFFFFFFFF) << 32


def synthesized_mac(seed: str) -> bytes:
    digest = hashlib.sha256(seed.encode()).digest()
    return bytes((0x52, 0x54, 0x00)) + digest[:3]


class VhostUserMmioDevice:
    """One virtio-mmio device window backed by one vhost-user connection."""

    def __init__(self, *, vm: Vm, mem: GuestMemory, slot: int, base: int, gsi: int, kind: str, socket: str,
                 queue_size: int = 256, name: str = "vm", connect_timeout: float = 10.0,
                 request_timeout: float = 10.0) -> None:
        if kind not in DEVICE_IDS:
            raise ValueError(f"unknown device type {kind!r}")
        self.vm = vm
        self.mem = mem
        self.slot = slot
        self.base = base
        self.gsi = gsi
        self.kind = kind
        self.device_id = DEVICE_IDS[kind]
        self.socket = socket
        self.queue_size = queue_size
        self.label = f"{name}: device {slot} ({kind}, {socket})"
        self.mac_seed = f"{name}/{slot}"
        self.lock = threading.Lock()
        self.broken = False
        self.exits = 0
        self.fe = self._connect(socket, connect_timeout, request_timeout)
        try:
            self._handshake()
        except (BackendError, ProtocolError, OSError) as e:
            self.fe.close()
            raise DeviceSetupError(f"{self.label}: vhost-user handshake failed: {e}") from None
        self.queues = [Queue(i) for i in range(self.num_queues)]
        isr = _vcpu.vcpu_isr_new(self.num_queues)
        if isr == _ffi.NULL:
            self.fe.close()
            raise MemoryError("vcpu_isr_new")
        self.isr = _ffi.gc(isr, _vcpu.vcpu_isr_free)  # interrupt state, shared with the exit loop
        self._reset_state()

    # ------------------------------------------------------------ set-up

    @staticmethod
    def _connect(socket: str, timeout: float, request_timeout: float) -> Frontend:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return Frontend(socket, timeout=request_timeout)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if time.monotonic() >= deadline:
                    raise DeviceSetupError(f"cannot connect to the vhost-user back-end at {socket}: {e.strerror}") from None
                time.sleep(0.05)
            except OSError as e:
                raise DeviceSetupError(f"cannot connect to the vhost-user back-end at {socket}: {e}") from None

    def _handshake(self) -> None:
        fe = self.fe
        self.backend_features = fe.get_features()
        fe.set_owner()
        self.protocol = 0
        if self.backend_features & (1 << F_PROTOCOL_FEATURES):
            offered = fe.get_protocol_features()
            self.protocol = offered & WANTED_PROTOCOL
            fe.set_protocol_features(self.protocol)
        self.device_features = self.backend_features & ~UNSUPPORTED_FEATURES
        units = 1
        if self.protocol & (1 << ProtocolFeature.MQ):
            units = max(1, fe.get_queue_num())
        if self.kind == "net":
            self.pairs = min(units, 16)
            ctrl = 1 if self.device_features & (1 << VIRTIO_NET_F_CTRL_VQ) else 0
            self.num_queues = 2 * self.pairs + ctrl
        else:
            self.pairs = 0
            self.num_queues = min(units, MAX_QUEUES[self.kind])
        self.config_size = CONFIG_SIZES[self.kind]
        self.has_config = bool(self.protocol & (1 << ProtocolFeature.CONFIG))
        self._config_snapshot: bytes | None = None

    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.config_generation = 0
        _vcpu.vcpu_isr_ack(self.isr, INT_CONFIG)
        self.running = False
        for q in self.queues:
            q.reset()

    def _wire(self, q: Queue) -> None:
        """Eventfds for a queue, registered with KVM (once; kept across resets)."""
        if q.wired:
            return
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        q.kick_fd, q.call_fd, q.err_fd = os.eventfd(0, flags), os.eventfd(0, flags), os.eventfd(0, flags)
        self.vm.ioeventfd(q.kick_fd, self.base + QUEUE_NOTIFY, 4, datamatch=q.index)
        self.vm.irqfd(q.call_fd, self.gsi)
        q.wired = True

    # ------------------------------------------------------------ MMIO

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            self.exits += 1
            if offset >= CONFIG:
                return self._config_read(offset - CONFIG, size)
            reg = offset & ~3
            value = self._reg_read(reg)
            shift = (offset & 3) * 8
            return ((value >> shift) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self.exits += 1
            if offset >= CONFIG:
                self._config_write(offset - CONFIG, data)
                return
            if offset & 3 or len(data) != 4:
                log.debug("%s: ignored %d-byte write at register offset %#x", self.label, len(data), offset)
                return
            self._reg_write(offset, int.from_bytes(data, "little"))

    def _queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _reg_read(self, reg: int) -> int:
        q = self._queue()
        if reg == MAGIC_VALUE:
            return MMIO_MAGIC
        if reg == VERSION:
            return MMIO_VERSION
        if reg == DEVICE_ID:
            return self.device_id
        if reg == VENDOR_ID:
            return VENDOR
        if reg == DEVICE_FEATURES:
            sel = self.device_features_sel
            return (self.device_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        if reg == QUEUE_NUM_MAX:
            return self.queue_size if q is not None else 0
        if reg == QUEUE_NUM:
            return q.num if q else 0
        if reg == QUEUE_READY:
            return q.ready if q else 0
        if reg == INTERRUPT_STATUS:
            return self._interrupt_status()
        if reg == STATUS:
            self._check_errors()
            return self.status
        if reg in (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH,
                   QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH) and q is not None:
            value = {QUEUE_DESC_LOW: q.desc, QUEUE_DESC_HIGH: q.desc, QUEUE_DRIVER_LOW: q.driver,
                     QUEUE_DRIVER_HIGH: q.driver, QUEUE_DEVICE_LOW: q.device, QUEUE_DEVICE_HIGH: q.device}[reg]
            return value >> 32 if reg & 4 else value & 0xFFFFFFFF
        if reg in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions
        if reg == CONFIG_GENERATION:
            self._fetch_config()
            return self.config_generation
        return 0

    def _reg_write(self, reg: int, value: int) -> None:
        q = self._queue()
        if reg == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif reg == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif reg == DRIVER_FEATURES:
            if self.status & S_FEATURES_OK:
                return  # features are frozen once accepted
            if self.driver_features_sel == 0:
                self.driver_features = _set_low(self.driver_features, value)
            elif self.driver_features_sel == 1:
                self.driver_features = _set_high(self.driver_features, value)
        elif reg == QUEUE_SEL:
            self.queue_sel = value
        elif reg == STATUS:
            self._set_status(value)
        elif reg == INTERRUPT_ACK:
            self._interrupt_ack(value)
        elif reg == QUEUE_NOTIFY:
            # Kicks with a registered queue index never get here (ioeventfd).
            log.debug("%s: QueueNotify for queue %d, which does not exist", self.label, value)
        elif q is None or q.started and reg != QUEUE_READY:
            return
        elif reg == QUEUE_NUM:
            q.num = value
        elif reg == QUEUE_READY:
            self._set_queue_ready(q, value & 1)
        elif reg == QUEUE_DESC_LOW:
            q.desc = _set_low(q.desc, value)
        elif reg == QUEUE_DESC_HIGH:
            q.desc = _set_high(q.desc, value)
        elif reg == QUEUE_DRIVER_LOW:
            q.driver = _set_low(q.driver, value)
        elif reg == QUEUE_DRIVER_HIGH:
            q.driver = _set_high(q.driver, value)
        elif reg == QUEUE_DEVICE_LOW:
            q.device = _set_low(q.device, value)
        elif reg == QUEUE_DEVICE_HIGH:
            q.device = _set_high(q.device, value)

    # ------------------------------------------------------------ status

    def _set_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self._reset()
            return
        old = self.status
        new = value | (old & S_NEEDS_RESET)
        if new & S_FEATURES_OK and not old & S_FEATURES_OK and not self._features_ok():
            new &= ~S_FEATURES_OK
        self.status = new
        if new & S_DRIVER_OK and not old & S_DRIVER_OK and not new & S_FAILED:
            self._start()

    def _features_ok(self) -> bool:
        extra = self.driver_features & ~self.device_features
        if extra:
            log.warning("%s: driver accepted features %#x the device did not offer", self.label, extra)
            return False
        if not self.driver_features & (1 << VIRTIO_F_VERSION_1):
            log.warning("%s: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)", self.label)
            return False
        return True

    def _fail(self, why: str) -> None:
        if not self.status & S_NEEDS_RESET:
            log.warning("%s: %s; device needs reset", self.label, why)
        self.status |= S_NEEDS_RESET

    def _check_errors(self) -> None:
        for q in self.queues:
            if q.started and q.err_fd >= 0:
                try:
                    os.eventfd_read(q.err_fd)
                except BlockingIOError:
                    continue
                self._fail(f"the back-end reported an error on queue {q.index}")

    def _backend(self, what: str, fn, *args):
        """Run one front-end request; a failure breaks the device (NEEDS_RESET)."""
        if self.broken:
            raise BackendError("the back-end connection is gone")
        try:
            return fn(*args)
        except BackendError as e:
            if "closed" in str(e):
                self.broken = True
            self._fail(f"{what}: {e}")
            raise
        except (OSError, ProtocolError) as e:
            self.broken = True
            self._fail(f"{what}: {e}")
            raise BackendError(str(e)) from None

    def _start(self) -> None:
        if self.running:
            return
        feats = self.driver_features
        if self.backend_features & (1 << F_PROTOCOL_FEATURES):
            feats |= 1 << F_PROTOCOL_FEATURES
        mem = self.mem
        try:
            self._backend("SET_FEATURES", self.fe.set_features, feats)
            self._backend("SET_MEM_TABLE", self.fe.set_mem_table,
                          [MemoryRegion(mem.gpa, mem.size, mem.hva, 0)], [mem.fd])
        except BackendError:
            return
        self.running = True
        for q in self.queues:
            if q.ready:
                self._start_queue(q)

    @property
    def packed(self) -> bool:
        return bool(self.driver_features & (1 << VIRTIO_F_RING_PACKED))

    def _ring_sizes(self, q: Queue) -> tuple[int, int, int]:
        """Descriptor table/ring, driver area, device area (packed: the two event suppression areas)."""
        if self.packed:
            return 16 * q.num, 4, 4
        return 16 * q.num, 6 + 2 * q.num, 6 + 8 * q.num

    def _backend_index(self, q: Queue) -> int:
        """The ring number the back-end knows a queue by.  Only differs for the
        net control queue of a multi-queue back-end when the driver did not
        negotiate MQ: it is virtio queue 2 then, but the back-end's 2 * pairs."""
        if (self.kind == "net" and self.pairs > 1 and q.index == 2
                and self.driver_features & (1 << VIRTIO_NET_F_CTRL_VQ)
                and not self.driver_features & (1 << VIRTIO_NET_F_MQ)):
            return 2 * self.pairs
        return q.index

    def _start_queue(self, q: Queue) -> None:
        if q.started or self.status & S_NEEDS_RESET:
            return
        if not q.num or q.num & (q.num - 1) or q.num > self.queue_size:
            self._fail(f"queue {q.index}: size {q.num} is not a power of two up to {self.queue_size}")
            return
        d, a, u = self._ring_sizes(q)
        for what, gpa, length in (("descriptor table", q.desc, d), ("driver area", q.driver, a),
                                  ("device area", q.device, u)):
            if not self.mem.contains(gpa, length):
                self._fail(f"queue {q.index}: {what} at {gpa:#x} is outside guest RAM")
                return
        self._wire(q)
        bi = self._backend_index(q)
        fe = self.fe
        try:
            self._backend(f"queue {q.index}: SET_VRING_NUM", fe.set_vring_num, bi, q.num)
            # position 0; a packed ring's wrap counter starts at 1 (bit 15)
            self._backend(f"queue {q.index}: SET_VRING_BASE", fe.set_vring_base, bi, PACKED_BASE if self.packed else 0)
            self._backend(f"queue {q.index}: SET_VRING_ADDR", fe.set_vring_addr, bi, self.mem.to_hva(q.desc, d),
                          self.mem.to_hva(q.device, u), self.mem.to_hva(q.driver, a))
            self._backend(f"queue {q.index}: SET_VRING_CALL", fe.set_vring_call, bi, q.call_fd)
            self._backend(f"queue {q.index}: SET_VRING_KICK", fe.set_vring_kick, bi, q.kick_fd)
            self._backend(f"queue {q.index}: SET_VRING_ERR", fe.set_vring_err, bi, q.err_fd)
            if self.backend_features & (1 << F_PROTOCOL_FEATURES):
                # With protocol features negotiated rings start disabled.
                self._backend(f"queue {q.index}: SET_VRING_ENABLE", fe.set_vring_enable, bi, True)
        except BackendError:
            return
        q.started = True
        q.backend_index = bi
        used_idx = _ffi.NULL if self.packed else _ffi.cast("void *", self.mem.to_hva(q.device + 2, 2))
        _vcpu.vcpu_isr_start_queue(self.isr, q.index, used_idx)

    def _set_queue_ready(self, q: Queue, ready: int) -> None:
        if ready == q.ready:
            return
        if ready:
            q.ready = 1
            if self.running:
                self._start_queue(q)
        elif not q.started:
            q.ready = 0
        # Clearing QueueReady of a running queue needs VIRTIO_F_RING_RESET,
        # which is not offered: the write is ignored.

    def _stop_queues(self) -> None:
        for q in self.queues:
            if not q.started:
                continue
            q.started = False
            _vcpu.vcpu_isr_stop_queue(self.isr, q.index)
            if self.broken:
                continue
            try:
                if self.backend_features & (1 << F_PROTOCOL_FEATURES):
                    self._backend(f"queue {q.index}: SET_VRING_ENABLE 0", self.fe.set_vring_enable,
                                  q.backend_index, False)
                self._backend(f"queue {q.index}: GET_VRING_BASE", self.fe.get_vring_base, q.backend_index)
            except BackendError:
                pass
            for fd in (q.call_fd, q.err_fd):
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass

    def _reset(self) -> None:
        self._stop_queues()
        self._reset_state()

    # ------------------------------------------------------------ interrupts

    def _interrupt_status(self) -> int:
        return _vcpu.vcpu_isr_status(self.isr)

    def _interrupt_ack(self, value: int) -> None:
        _vcpu.vcpu_isr_ack(self.isr, value)

    # ------------------------------------------------------------ config space

    def _synthesized_config(self) -> bytes:
        if self.kind == "net":
            return struct.pack("<6sHHHIB3x", synthesized_mac(self.mac_seed), VIRTIO_NET_S_LINK_UP, self.pairs,
                               1500, 0xFFFFFFFF, 0xFF).ljust(self.config_size, b"\0")
        return bytes(self.config_size)

    def _fetch_config(self) -> bytes:
        data = None
        if self.has_config and not self.broken:
            for size in dict.fromkeys((self.config_size, 60, 24, 20, 12, 8)):
                if size > self.config_size:
                    continue
                try:
                    data = self.fe.get_config(0, size)
                except BackendError as e:
                    if "closed" in str(e):
                        self.broken = True
                        self._fail(f"GET_CONFIG: {e}")
                        break
                    continue
                except (OSError, ProtocolError) as e:
                    self.broken = True
                    self._fail(f"GET_CONFIG: {e}")
                    break
                if size != self.config_size:
                    log.debug("%s: the back-end serves %d bytes of config space", self.label, size)
                    self.config_size = size
                break
        if data is None:
            data = self._config_snapshot if self._config_snapshot is not None else self._synthesized_config()
        data = data.ljust(CONFIG_SIZES[self.kind], b"\0")
        if self._config_snapshot is not None and data != self._config_snapshot:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            _vcpu.vcpu_isr_raise(self.isr, INT_CONFIG)
        self._config_snapshot = data
        return data

    def _config_read(self, offset: int, size: int) -> bytes:
        data = self._fetch_config()
        return data[offset:offset + size].ljust(size, b"\0")

    def _config_write(self, offset: int, data: bytes) -> None:
        if not self.has_config or self.broken:
            return
        try:
            self.fe.set_config(offset, data)
        except BackendError as e:
            log.debug("%s: SET_CONFIG of %d bytes at %d refused: %s", self.label, len(data), offset, e)
        except (OSError, ProtocolError) as e:
            self.broken = True
            self._fail(f"SET_CONFIG: {e}")

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """Disconnect (the back-end stops the rings when the session ends) and
        release the eventfds and KVM registrations."""
        with self.lock:
            self.fe.close()
            for q in self.queues:
                # The interrupt state points into guest RAM, which may be unmapped next.
                _vcpu.vcpu_isr_stop_queue(self.isr, q.index)
                q.started = False
                if not q.wired:
                    continue
                try:
                    self.vm.ioeventfd(q.kick_fd, self.base + QUEUE_NOTIFY, 4, datamatch=q.index, deassign=True)
                    self.vm.irqfd(q.call_fd, self.gsi, deassign=True)
                except OSError:
                    pass
                for fd in (q.kick_fd, q.call_fd, q.err_fd):
                    os.close(fd)
                q.wired = False
