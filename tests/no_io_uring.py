"""Run a command where io_uring is forbidden, as a seccomp policy (Docker's
default profile, systemd's SystemCallFilter=) would: io_uring_setup fails
with EPERM.  `python3 tests/no_io_uring.py CMD...`"""

import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AUDIT_ARCH_X86_64 = 0xC000003E
NR_IO_URING_SETUP = 425
EPERM = 1
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000


def insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


PROGRAM = b"".join([
    insn(LD_W_ABS, 0, 0, 4),                      # seccomp_data.arch
    insn(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),         # another ABI: allow
    insn(LD_W_ABS, 0, 0, 0),                      # seccomp_data.nr
    insn(JEQ_K, 0, 1, NR_IO_URING_SETUP),
    insn(RET_K, 0, 0, RET_ERRNO | EPERM),
    insn(RET_K, 0, 0, RET_ALLOW),
])


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(PROGRAM)
    fprog = struct.pack("<HxxxxxxQ", len(PROGRAM) // 8, ctypes.addressof(buf))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0):
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
