"""The fuzz target shared by fuzz/protocol_fuzz.py (atheris, coverage-guided)
and tests/test_fuzz_corpus.py (replays fuzz/corpus/ in the suite and in the
sanitizer job): vhost-user bytes into the codec and state machine, against
the real device handler and data plane.

Input bytes are a stream of vhost-user messages; a byte before each chunk
says how many eventfds/memfds ride along.  Anything but ProtocolError
escaping, or a fault in C, is a bug.
"""

import logging
import os

from vhostd.config import BlkDeviceConfig
from vhostd.dataplane import Engine
from vhostd.devices.blk import BlkDevice
from vhostd.handler import DeviceHandler
from vhostd.protocol.backend import BackendProtocol
from vhostd.protocol.codec import MessageDecoder, ProtocolError
from vhostd.storage import null

ENGINE = Engine(1)
DEVICE = BlkDevice(BlkDeviceConfig(name="fuzz", socket="/nonexistent", backend="null", store=null.Settings(size=1 << 20), queues=2))
HANDLER = DeviceHandler(DEVICE, ENGINE, logging.getLogger("fuzz"))
DEVICE.attach(HANDLER.rings)


def fds_for(kind: int) -> list[int]:
    out = []
    for i in range(kind % 4):
        if (kind >> (2 + i)) & 1:
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.ftruncate(fd, 0x10000 << (kind & 3))
        else:
            fd = os.eventfd(0, os.EFD_CLOEXEC)
        out.append(fd)
    return out


def one_input(data: bytes) -> None:
    decoder = MessageDecoder()
    proto = BackendProtocol(HANDLER, logging.getLogger("fuzz"))
    pos = 0
    try:
        while pos < len(data):
            kind = data[pos]
            chunk = data[pos + 1:pos + 1 + decoder.bytes_needed()]
            pos += 1 + len(chunk)
            if not chunk:
                break
            try:
                decoder.feed(chunk, fds_for(kind))
                while (msg := decoder.pop()) is not None:
                    for reply in proto.handle(msg):
                        reply.close_fds()
            except ProtocolError:
                proto.connection_lost()
                proto = BackendProtocol(HANDLER, logging.getLogger("fuzz"))
                decoder.close()
                decoder = MessageDecoder()
    finally:
        decoder.close()
        proto.connection_lost()


