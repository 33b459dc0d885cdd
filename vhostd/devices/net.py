"""virtio-net device model (virtio 1.2 section 5.1).

The frame path is C (native/net.c).  This class opens the back-end (a TAP
interface, a switch of this daemon, or loopback), decides the features,
builds the config space and tells the TAP which offloads the guest took.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import threading

from vhostd.devices.base import Device
from vhostd.native import ffi, lib
from vhostd.protocol.constants import ProtocolFeature
from vhostd.virtio import RING_FEATURES, bit

log = logging.getLogger("vhostd.net")

F_CSUM = 0
F_GUEST_CSUM = 1
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_HOST_UFO = 14
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_GUEST_ANNOUNCE = 21
F_MQ = 22
F_CTRL_MAC_ADDR = 23

STATUS_LINK_UP = 1
STATUS_ANNOUNCE = 2

# TAP ioctls and flags (linux/if_tun.h, linux/sockios.h)
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
IFF_UP = 0x1

BACKENDS = {"tap": lib.VD_NET_TAP, "switch": lib.VD_NET_SWITCH, "loopback": lib.VD_NET_LOOPBACK}

# Guest offload feature -> TAP offload flag it allows the kernel to hand us.
_TAP_OFFLOADS = {
    F_GUEST_CSUM: TUN_F_CSUM,
    F_GUEST_TSO4: TUN_F_TSO4,
    F_GUEST_TSO6: TUN_F_TSO6,
    F_GUEST_ECN: TUN_F_TSO_ECN,
    F_GUEST_UFO: TUN_F_UFO,
}
_OFFLOAD_FEATURES = (F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO,
                     F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO)


def _ifreq(name: str, data: bytes = b"") -> bytes:
    return struct.pack("16s", name.encode()) + data.ljust(24, b"\0")


def open_tap(name: str, queues: int, mtu: int) -> list[int]:
    """Create or attach TAP `name` with one fd per queue pair; bring it up."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, struct.pack("H", flags)))
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", 12))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCSIFMTU, _ifreq(name, struct.pack("i", mtu)))
            cur = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(name)), 16)[0]
            fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", cur | IFF_UP)))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise OSError(exc.errno, f"cannot open TAP {name}: {exc.strerror}") from None
    return fds


def close_taps(fds: list[int], threads: int = 32) -> None:
    """Close many TAP fds at once.  Closing the last fd of a TAP that vhostd
    created deletes the interface, and the kernel waits for a grace period
    per deletion unless several come in together (it batches them): 256
    TAPs take about 5 s one after the other, 0.1 s from 32 threads."""
    fds = list(fds)
    if len(fds) < 4:
        for fd in fds:
            os.close(fd)
        return
    lock = threading.Lock()

    def closer() -> None:
        while True:
            with lock:
                if not fds:
                    return
                fd = fds.pop()
            try:
                os.close(fd)
            except OSError:
                pass

    pool = [threading.Thread(target=closer, name="vhostd-close") for _ in range(min(threads, len(fds)))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def _supported_tap_offloads(fd: int) -> int:
    """The TAP offload flags this kernel accepts (UFO was missing for years)."""
    ok = 0
    for flag in (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, ok | flag | (TUN_F_CSUM if flag != TUN_F_CSUM else 0))
            ok |= flag
        except OSError:
            pass
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    return ok


class Switches:
    """The daemon's built-in switches, by name; one exists while a port uses it."""

    def __init__(self) -> None:
        self._by_name: dict[str, tuple[object, int]] = {}

    def acquire(self, name: str):
        sw, users = self._by_name.get(name, (None, 0))
        if sw is None:
            sw = lib.vd_switch_new()
            if sw == ffi.NULL:
                raise MemoryError("cannot allocate a switch")
        self._by_name[name] = (sw, users + 1)
        return sw

    def release(self, name: str) -> None:
        sw, users = self._by_name[name]
        if users == 1:
            lib.vd_switch_free(sw)
            del self._by_name[name]
        else:
            self._by_name[name] = (sw, users - 1)


class NetDevice(Device):
    def __init__(self, cfg, switches: Switches) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.pairs = cfg.queues
        self.num_queues = 2 * cfg.queues + 1  # rx/tx pairs, then the control queue
        self.max_queue_size = cfg.queue_size
        self.mtu = cfg.mtu
        self.poll_us = cfg.poll_us
        self.mac = bytes(int(x, 16) for x in cfg.mac.split(":"))
        self.status = STATUS_LINK_UP
        self._switches = switches
        self._switch = None
        self.tap_fds: list[int] = []
        self.tap_offloads = 0
        if cfg.backend == "tap":
            self.tap_fds = open_tap(cfg.tap, cfg.queues, cfg.mtu)
            self.tap_offloads = _supported_tap_offloads(self.tap_fds[0])
        params = ffi.new("struct vd_net_params *")
        params.backend = BACKENDS[cfg.backend]
        params.nqp = cfg.queues
        params.ctrl = 1
        for i, fd in enumerate(self.tap_fds):
            params.tap_fds[i] = fd
        ffi.memmove(params.mac, self.mac, 6)
        self._net = lib.vd_net_new(params)
        if self._net == ffi.NULL:
            self._close_taps()
            raise MemoryError("cannot allocate the net device")
        lib.vd_net_set_mtu(self._net, self.mtu)
        self.handler = ffi.addressof(lib, "vd_net_handle")
        self.ctx = ffi.cast("void *", self._net)

    def features(self) -> int:
        f = RING_FEATURES
        for b in (F_MAC, F_STATUS, F_MTU, F_MRG_RXBUF, F_CTRL_VQ, F_CTRL_RX, F_GUEST_ANNOUNCE, F_CTRL_MAC_ADDR):
            f |= bit(b)
        if self.pairs > 1:
            f |= bit(F_MQ)
        if self.cfg.offloads:
            for b in _OFFLOAD_FEATURES:
                # Guest-side offloads over a TAP need the kernel to support them.
                if b in _TAP_OFFLOADS and self.tap_fds and not self.tap_offloads & _TAP_OFFLOADS[b]:
                    continue
                f |= bit(b)
        return f

    def queue_num_reply(self) -> int:
        # vhost-user-net front-ends (QEMU, DPDK) read GET_QUEUE_NUM as queue pairs.
        return self.pairs

    def extra_protocol_features(self) -> int:
        return bit(ProtocolFeature.MTU) | bit(ProtocolFeature.RARP)

    def set_features(self, features: int) -> None:
        lib.vd_net_set_features(self._net, features)
        if self.tap_fds:
            hdr = lib.vd_net_hdr_len(self._net)
            offloads = 0
            for feature, flag in _TAP_OFFLOADS.items():
                if features & bit(feature):
                    offloads |= flag
            if offloads & ~TUN_F_CSUM:
                offloads |= TUN_F_CSUM  # the kernel wants CSUM with any segmentation offload
            for fd in self.tap_fds:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", hdr))
                fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)

    def reset(self) -> None:
        lib.vd_net_reset(self._net)

    def config_space(self) -> bytes:
        # mac (the driver's MAC_ADDR_SET shows here), status, max_virtqueue_pairs,
        # mtu, speed (unknown), duplex (unknown)
        mac = ffi.new("uint8_t[6]")
        lib.vd_net_get_mac(self._net, mac)
        return struct.pack("<6sHHHIB3x", bytes(mac), self.status, self.pairs, self.mtu, 0xFFFFFFFF, 0xFF)

    def write_config(self, offset: int, data: bytes) -> None:
        raise ValueError("the virtio-net config space is read-only")

    def set_mtu(self, mtu: int) -> None:
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu} is outside 68..65535")
        if self.tap_fds:
            # The TAP is the other end of the guest's link: same MTU, as at creation
            # (else the kernel sends frames the device must drop as too long).
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    fcntl.ioctl(s, SIOCSIFMTU, _ifreq(self.cfg.tap, struct.pack("i", mtu)))
            except OSError as exc:
                raise ValueError(f"cannot set the MTU of TAP {self.cfg.tap} to {mtu}: {exc.strerror}") from None
        self.mtu = mtu
        lib.vd_net_set_mtu(self._net, mtu)  # the receive limit follows what config space says

    def send_rarp(self, mac: bytes) -> None:
        """Announce `mac` (after migration) with a RARP request, as QEMU does."""
        frame = b"\xff" * 6 + mac + b"\x80\x35"  # broadcast, RARP ethertype
        frame += struct.pack(">HHBBH", 1, 0x0800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4)
        frame = frame.ljust(60, b"\0")
        lib.vd_net_inject(self._net, frame, len(frame))

    def attach(self, rings) -> None:
        """Start serving: rx queues are device-driven, the back-end starts."""
        rx_mask = sum(1 << (2 * i) for i in range(self.pairs))
        lib.vd_device_set_rx_queues(rings.ptr, rx_mask, ffi.addressof(lib, "vd_net_rx_kick"))
        rc = lib.vd_net_start(self._net, rings.ptr)
        if rc < 0:
            raise OSError(-rc, f"cannot start the net back-end: {os.strerror(-rc)}")
        if self.cfg.backend == "switch":
            self._switch = self._switches.acquire(self.cfg.switch)
            if lib.vd_switch_attach(self._switch, self._net) < 0:
                self._switches.release(self.cfg.switch)
                self._switch = None
                raise OSError(f"switch {self.cfg.switch} has no free port")

    def detach(self) -> None:
        """Stop reading the TAPs and leave the switch; rings stay."""
        lib.vd_net_stop(self._net)
        if self._switch is not None:
            self._switches.release(self.cfg.switch)
            self._switch = None

    def describe(self) -> dict:
        return {"backend": self.cfg.backend, "mac": self.cfg.mac, "mtu": self.cfg.mtu,
                **({"tap": self.cfg.tap} if self.cfg.backend == "tap" else {}),
                **({"switch": self.cfg.switch} if self.cfg.backend == "switch" else {})}

    def stats(self) -> list[dict[str, int]]:
        out = []
        st = ffi.new("struct vd_net_stats *")
        for qp in range(self.pairs):
            lib.vd_net_get_stats(self._net, qp, st)
            out.append({k: getattr(st, k) for k in ("tx_frames", "tx_bytes", "tx_dropped", "tx_bad",
                                                     "rx_frames", "rx_bytes", "rx_dropped")})
        return out

    def take_tap_fds(self) -> list[int]:
        """Hand the TAP fds to the caller, which closes them (close_taps)
        once detach() has stopped reading them."""
        fds, self.tap_fds = self.tap_fds, []
        return fds

    def _close_taps(self) -> None:
        for fd in self.tap_fds:
            os.close(fd)
        self.tap_fds = []

    def close(self) -> None:
        if self._net is not None:
            lib.vd_net_free(self._net)
            self._net = None
            self._close_taps()
