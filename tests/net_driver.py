"""Driver side of virtio-net for tests (virtio 1.2 section 5.1), on top of
the split-queue model in virtio_driver.py: the virtio-net header, rx buffers
posted the way Linux posts them (mergeable small buffers, or one big chain),
frames sent on tx, frames received and reassembled from num_buffers, and
control-queue commands.  Also hand-built Ethernet/ARP/IPv4/ICMP/TCP frames
with correct checksums, and a network namespace helper.

Queue layout of a vhostd net device: rx0, tx0, rx1, tx1, ..., control last.
"""

from __future__ import annotations

import os
import select
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass, field

# ------------------------------------------------------------------ features

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
F_VERSION_1 = 32

GUEST_OFFLOADS = (F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO)

HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_ECN = 0, 1, 3, 4, 0x80

CTRL_RX, CTRL_MAC, CTRL_VLAN, CTRL_ANNOUNCE, CTRL_MQ = 0, 1, 2, 3, 4
CTRL_RX_PROMISC, CTRL_RX_ALLMULTI = 0, 1
CTRL_MAC_TABLE_SET, CTRL_MAC_ADDR_SET = 0, 1
CTRL_ANNOUNCE_ACK = 0
CTRL_MQ_VQ_PAIRS_SET = 0
NET_OK, NET_ERR = 0, 1

STATUS_LINK_UP = 1


def bit(n: int) -> int:
    return 1 << n


# ------------------------------------------------------------------ header


@dataclass
class NetHdr:
    """struct virtio_net_hdr (with num_buffers: 12 bytes, VERSION_1 or MRG_RXBUF)."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    FMT = "<BBHHHHH"

    def pack(self, length: int = 12) -> bytes:
        raw = struct.pack(self.FMT, self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                          self.csum_offset, self.num_buffers)
        return raw[:length]

    @classmethod
    def unpack(cls, data: bytes) -> "NetHdr":
        data = bytes(data[:12]).ljust(12, b"\0")
        return cls(*struct.unpack(cls.FMT, data))

    def offload_fields(self) -> tuple:
        """Everything but num_buffers (which the device fills in on rx)."""
        return (self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset)


@dataclass
class RxFrame:
    hdr: NetHdr
    frame: bytes
    lens: list[int] = field(default_factory=list)  # used length of each buffer the frame took
    qp: int = 0  # the queue pair it arrived on

    @property
    def nbufs(self) -> int:
        return len(self.lens)


# ------------------------------------------------------------------ driver


class NetDriver:
    """The guest's virtio-net driver over one vhost-user session.

    guest: a session object with `.mem`, `.features` and
    `.queue(index, size=, arena=)` (tests/conftest.py Guest).  Sets up
    `pairs` rx/tx queue pairs and, if `ctrl`, the control queue after them.
    """

    def __init__(self, guest, pairs: int = 1, *, ctrl: bool = True, rx_size: int = 256, tx_size: int = 256,
                 rx_arena: int = 2 << 20, tx_arena: int = 1 << 20, device_pairs: int | None = None) -> None:
        self.guest = guest
        self.mem = guest.mem
        self.features = guest.features
        self.mrg = bool(self.features & bit(F_MRG_RXBUF))
        self.hdr_len = 12 if self.features & (bit(F_VERSION_1) | bit(F_MRG_RXBUF)) else 10
        self.pairs = pairs
        self.rx = []
        self.tx = []
        for qp in range(pairs):
            self.rx.append(guest.queue(2 * qp, size=rx_size, arena=rx_arena))
            self.tx.append(guest.queue(2 * qp + 1, size=tx_size, arena=tx_arena))
        ctrl_index = 2 * (device_pairs or pairs)
        self.ctrlq = guest.queue(ctrl_index, size=16, arena=64 << 10) if ctrl else None
        # per rx queue: head -> [(addr, len), ...] of the chain's writable buffers
        self._posted: list[dict[int, list[tuple[int, int]]]] = [{} for _ in range(pairs)]
        self._used: list[list] = [[] for _ in range(pairs)]
        self._ids: list[dict[int, list[int]]] = [{} for _ in range(pairs)]  # head -> descriptor ids

    # ---------------------------------------------------------- rx
    def post_rx(self, count: int = 1, size: int = 1536, qp: int = 0, *, pieces: list[int] | None = None,
                kick: bool = True) -> list[int]:
        """Post `count` rx buffers of `size` bytes (or each a chain of writable
        descriptors of the given `pieces` lengths, like Linux's big-packet mode)."""
        q = self.rx[qp]
        heads = []
        for i in range(count):
            lens = pieces or [size]
            head, addrs = q.add([], lens, kick=kick and i == count - 1)
            self._posted[qp][head] = list(zip(addrs, lens))
            self._ids[qp][head] = list(q.chains[head])
            heads.append(head)
        return heads

    def posted(self, qp: int = 0) -> int:
        """Rx buffers the device has not used yet."""
        self._collect(qp)
        return len(self._posted[qp]) - len(self._used[qp])

    def _collect(self, qp: int) -> None:
        q = self.rx[qp]
        used = q.poll_used()
        for u in used:
            # poll_used gave the chain's descriptors back; a post_rx before
            # recv() read the buffer would reuse them: hold them until then.
            for i in self._ids[qp].get(u.head, []):
                q.free.remove(i)
        self._used[qp] += used

    def _read_buffer(self, qp: int, head: int, length: int) -> bytes:
        out = b""
        for addr, n in self._posted[qp][head]:
            if length <= 0:
                break
            take = min(n, length)
            out += self.mem.read(addr, take)
            length -= take
        return out

    def _wait_used(self, qp: int, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._collect(qp)
            if len(self._used[qp]) >= count:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"rx{qp}: {len(self._used[qp])} of {count} used buffers arrived")
            r, _, _ = select.select([self.rx[qp].call], [], [], min(left, 0.02))
            if r:
                self.rx[qp].call_pending()

    def recv(self, qp: int = 0, timeout: float = 5.0) -> RxFrame:
        """The next frame on rx queue pair `qp`, reassembled from its buffers."""
        self._wait_used(qp, 1, timeout)
        first = self._used[qp][0]
        data = self._read_buffer(qp, first.head, first.length)
        assert len(data) >= self.hdr_len, f"used length {first.length} is shorter than the header"
        hdr = NetHdr.unpack(data[: self.hdr_len])
        n = hdr.num_buffers if self.hdr_len == 12 else 1
        if not self.mrg:
            assert n in (0, 1) if self.hdr_len == 10 else n == 1, f"num_buffers {n} without MRG_RXBUF"
            n = 1
        assert n >= 1, "num_buffers is 0"
        self._wait_used(qp, n, timeout)
        used, self._used[qp] = self._used[qp][:n], self._used[qp][n:]
        payload = data[self.hdr_len :]
        for u in used[1:]:
            payload += self._read_buffer(qp, u.head, u.length)
        for u in used:
            del self._posted[qp][u.head]
            self.rx[qp].free.extend(self._ids[qp].pop(u.head, []))
        return RxFrame(hdr, payload, [u.length for u in used], qp)

    def recv_all(self, qp: int = 0, settle: float = 0.05) -> list[RxFrame]:
        """Every frame that arrives until none has for `settle` seconds."""
        out = []
        while True:
            try:
                out.append(self.recv(qp, timeout=settle))
            except TimeoutError:
                return out

    def recv_match(self, pred, qp: int | tuple[int, ...] = 0, timeout: float = 5.0, on_other=None) -> RxFrame:
        """The first frame for which pred(frame bytes) is true, on rx queue
        pair `qp` (or any of several); others are handed to on_other (e.g. to
        answer the kernel's ARP) or ignored.  Keeps rx buffers posted while
        it waits.  The frame's pair is in its `qp` attribute."""
        qps = (qp,) if isinstance(qp, int) else tuple(qp)
        deadline = time.monotonic() + timeout
        while True:
            got_any = False
            for q in qps:
                if self.posted(q) < 8:
                    self.post_rx(32, qp=q)
                self._collect(q)
                if not self._used[q]:
                    continue
                got_any = True
                f = self.recv(q)
                f.qp = q
                if pred(f.frame):
                    return f
                if on_other is not None:
                    on_other(f)
            if got_any:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching frame arrived")
            select.select([self.rx[q].call for q in qps], [], [], min(left, 0.02))
            for q in qps:
                self.rx[q].call_pending()

    def expect_nothing(self, qp: int = 0, wait: float = 0.1) -> None:
        time.sleep(wait)
        self._collect(qp)
        assert not self._used[qp], f"rx{qp}: unexpected frame(s): {len(self._used[qp])} used buffer(s)"

    # ---------------------------------------------------------- tx
    def send(self, frame: bytes, hdr: NetHdr | None = None, qp: int = 0, *, pieces: int = 0,
             hdr_apart: bool = False, indirect: bool = False, wait: bool = True, timeout: float = 5.0) -> int:
        """Transmit one frame; `pieces` > 0 splits the frame into descriptors
        of that size; `hdr_apart` puts the header in its own descriptor;
        `indirect` uses an indirect table.  Waits for the device to complete
        the chain; returns the used length."""
        raw_hdr = (hdr or NetHdr()).pack(self.hdr_len)
        return self.send_raw(self._tx_segments(raw_hdr, frame, pieces, hdr_apart), qp, indirect=indirect,
                             wait=wait, timeout=timeout)

    @staticmethod
    def _tx_segments(raw_hdr: bytes, frame: bytes, pieces: int, hdr_apart: bool) -> list[bytes]:
        body = [frame[i : i + pieces] for i in range(0, len(frame), pieces)] if pieces else [frame]
        body = [b for b in body if b]
        if hdr_apart or not body:
            return [raw_hdr, *body]
        return [raw_hdr + body[0], *body[1:]]

    def send_raw(self, segments: list[bytes], qp: int = 0, *, in_lens: list[int] = (), indirect: bool = False,
                 wait: bool = True, timeout: float = 5.0) -> int | None:
        q = self.tx[qp]
        head, _ = q.add(segments, list(in_lens), indirect=indirect)
        if not wait:
            return None
        (used,) = q.wait_used(1, timeout)
        assert used.head == head, (used.head, head)
        return used.length

    # ---------------------------------------------------------- control queue
    def ctrl(self, cls: int, cmd: int, data: bytes = b"", *, split: bool = True, timeout: float = 5.0) -> int:
        """One control command; returns the device's ack byte."""
        assert self.ctrlq is not None
        out = [bytes([cls, cmd])] + ([data] if data else []) if split else [bytes([cls, cmd]) + data]
        head, (ack_addr,) = self.ctrlq.add(out, [1])
        (used,) = self.ctrlq.wait_used(1, timeout)
        assert used.head == head and used.length == 1, used
        return self.mem.read(ack_addr, 1)[0]


# ------------------------------------------------------------------ frames


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ip_bytes(ip: str) -> bytes:
    return bytes(int(x) for x in ip.split("."))


BROADCAST = b"\xff" * 6
ETH_P_IP, ETH_P_ARP, ETH_P_RARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x8035, 0x86DD


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes, pad: bool = True) -> bytes:
    frame = dst + src + struct.pack(">H", ethertype) + payload
    return frame.ljust(60, b"\0") if pad else frame


def parse_eth(frame: bytes) -> tuple[bytes, bytes, int, bytes]:
    return frame[0:6], frame[6:12], struct.unpack(">H", frame[12:14])[0], frame[14:]


def inet_csum(data: bytes, start: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    s = start + sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def csum_fold(data: bytes, start: int = 0) -> int:
    """Ones' complement sum, folded, not inverted (the partial checksum a
    driver leaves in the field with NEEDS_CSUM)."""
    return ~inet_csum(data, start) & 0xFFFF


def arp(op: int, sha: bytes, spa: str, tha: bytes, tpa: str) -> bytes:
    return struct.pack(">HHBBH", 1, ETH_P_IP, 6, 4, op) + sha + ip_bytes(spa) + tha + ip_bytes(tpa)


def parse_arp(payload: bytes) -> dict:
    htype, ptype, hlen, plen, op = struct.unpack(">HHBBH", payload[:8])
    return {"op": op, "sha": payload[8:14], "spa": ".".join(map(str, payload[14:18])),
            "tha": payload[18:24], "tpa": ".".join(map(str, payload[24:28])), "ptype": ptype}


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1, ttl: int = 64) -> bytes:
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0,
                      ip_bytes(src), ip_bytes(dst))
    c = inet_csum(hdr)
    return hdr[:10] + struct.pack(">H", c) + hdr[12:] + payload


def parse_ipv4(packet: bytes) -> dict:
    ihl = (packet[0] & 0xF) * 4
    total = struct.unpack(">H", packet[2:4])[0]
    return {"proto": packet[9], "src": ".".join(map(str, packet[12:16])), "dst": ".".join(map(str, packet[16:20])),
            "header": packet[:ihl], "payload": packet[ihl:total], "hdr_ok": inet_csum(packet[:ihl]) == 0}


def icmp_echo(ident: int, seq: int, data: bytes, kind: int = 8) -> bytes:
    msg = struct.pack(">BBHHH", kind, 0, 0, ident, seq) + data
    c = inet_csum(msg)
    return msg[:2] + struct.pack(">H", c) + msg[4:]


def pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    return ip_bytes(src) + ip_bytes(dst) + struct.pack(">BBH", 0, proto, length)


TCP_SYN, TCP_ACK, TCP_RST = 0x02, 0x10, 0x04


def tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int = 0, flags: int = TCP_SYN,
        options: bytes = b"", payload: bytes = b"", partial: bool = False) -> bytes:
    """A TCP segment.  partial=True leaves the pseudo-header sum in the
    checksum field, for a frame sent with NEEDS_CSUM."""
    off = (20 + len(options)) // 4
    seg = struct.pack(">HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 65535, 0, 0) + options + payload
    ph = pseudo_header(src, dst, 6, len(seg))
    c = csum_fold(ph) if partial else inet_csum(ph + seg)
    return seg[:16] + struct.pack(">H", c) + seg[18:]


def parse_tcp(seg: bytes) -> dict:
    sport, dport, seq, ack, off, flags = struct.unpack(">HHIIBB", seg[:14])
    return {"sport": sport, "dport": dport, "seq": seq, "ack": ack, "flags": flags, "doff": (off >> 4) * 4}


def tcp_csum_ok(src: str, dst: str, seg: bytes) -> bool:
    return inet_csum(pseudo_header(src, dst, 6, len(seg)) + seg) == 0


def complete_csum(frame: bytes, hdr: NetHdr) -> bytes:
    """What a driver does with a NEEDS_CSUM frame: checksum from csum_start
    to the end (the field holds the pseudo-header sum) into csum_start + csum_offset."""
    if not hdr.flags & HDR_F_NEEDS_CSUM:
        return frame
    at = hdr.csum_start + hdr.csum_offset
    c = inet_csum(frame[hdr.csum_start :])
    return frame[:at] + struct.pack(">H", c) + frame[at + 2 :]


def tcp_gso_frame(dst: bytes, src: bytes, length: int, sport: int = 4000, dport: int = 5000,
                  src_ip: str = "10.1.0.1", dst_ip: str = "10.1.0.2", mss: int = 1448) -> tuple[NetHdr, bytes]:
    """A TCPv4 frame of `length` bytes for TSO (checksum partial) and its header."""
    body_len = length - 14 - 20 - 20
    payload = bytes((i * 7 + 3) & 0xFF for i in range(body_len))
    seg = tcp(src_ip, dst_ip, sport, dport, 1000, 1, TCP_ACK, payload=payload, partial=True)
    packet = ipv4(src_ip, dst_ip, 6, seg)
    # A GSO super-packet's IP total length may exceed 16 bits only with
    # BIG TCP; keep the frame below 64 KiB so the field stays honest.
    frame = eth(dst, src, ETH_P_IP, packet, pad=False)
    hdr = NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 14 + 20 + 20, mss, 14 + 20, 16)
    return hdr, frame


# ------------------------------------------------------------------ network namespace


class NetNamespaceUnavailable(Exception):
    pass


class Netns:
    """A network namespace this test process creates (`ip netns add`) and
    deletes; processes run inside it with `ip netns exec`."""

    _count = 0

    def __init__(self, prefix: str = "vdnet") -> None:
        if not shutil.which("ip"):
            raise NetNamespaceUnavailable("the ip command (iproute2) is not installed")
        if not os.path.exists("/dev/net/tun"):
            raise NetNamespaceUnavailable("/dev/net/tun does not exist")
        if Netns._count == 0:
            self._remove_stale(prefix)
        Netns._count += 1
        self.name = f"{prefix}-{os.getpid()}-{Netns._count}"
        p = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True)
        if p.returncode != 0:
            if "Operation not permitted" in p.stderr or "Permission denied" in p.stderr:
                raise NetNamespaceUnavailable(f"ip netns add: {p.stderr.strip()}")
            raise RuntimeError(f"ip netns add {self.name} failed: {p.stderr.strip()}")
        self.alive = True
        self.run("ip", "link", "set", "lo", "up")

    @staticmethod
    def _remove_stale(prefix: str) -> None:
        """Namespaces left by test processes that died (PREFIX-PID-N, PID gone)."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()[0].split("-") if line.strip() else []
            dead = len(parts) == 3 and parts[1].isdigit() and not os.path.exists(f"/proc/{parts[1]}")
            if dead and parts[0] == prefix:
                subprocess.run(["ip", "netns", "del", line.split()[0]], capture_output=True)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, *cmd: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
        p = subprocess.run([*self.prefix(), *cmd], capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"in netns {self.name}: {' '.join(cmd)} failed ({p.returncode}): "
                               f"{p.stdout}{p.stderr}")
        return p

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix(), *cmd], **kw)

    def delete(self) -> None:
        if not self.alive:
            return
        self.alive = False
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
