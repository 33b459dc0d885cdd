"""Coverage-guided fuzzing of the vhost-user codec + state machine with
atheris (libFuzzer for Python), against the real device handler and data
plane.  Not part of the test suite: run it with fuzz/run.sh.

Input bytes are a stream of vhost-user messages; a byte before each message
says how many eventfds/memfds ride along.  A crash (any exception other than
ProtocolError, or a fault in C) is saved by libFuzzer as crash-<hash>: add it
to fuzz/corpus/protocol/ and to a regression test.
"""

import logging
import os
import sys

import atheris

with atheris.instrument_imports():
    from vhostd.config import BlkDeviceConfig
    from vhostd.dataplane import Engine
    from vhostd.devices.blk import BlkDevice
    from vhostd.handler import DeviceHandler
    from vhostd.protocol.backend import BackendProtocol
    from vhostd.protocol.codec import MessageDecoder, ProtocolError

logging.disable(logging.CRITICAL)
ENGINE = Engine(1)
DEVICE = BlkDevice(BlkDeviceConfig(name="fuzz", socket="/nonexistent", backend="null", size=1 << 20, queues=2))
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


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
