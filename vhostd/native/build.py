"""cffi build script for the C modules: the native data plane
(`vhostd._native`), and two small ones, the load generator's ring loop
(`vhostd._loadgen`: vhostd/loadgen/lg.c on the guest programs' virtqueue,
guest-drivers/lib/virtq.c built with -DVIRTQ_LIBC, the driver side of split
and packed rings, sharing no code with the back-end on purpose) and the
VMM's vCPU exit loop (`vhostd._vcpu`, vhostd/vmm/vcpu.c: `vm run` loads it
without the data plane's libraries).

Compiles with io_uring support when liburing's headers are installed
(Debian: liburing-dev), with the NBD store when libnbd's are (libnbd-dev)
and with the RBD store when librbd's are (librbd-dev, librados-dev);
VHOSTD_NO_URING=1 / VHOSTD_NO_NBD=1 / VHOSTD_NO_RBD=1 build without them.

Run at install time through setup.py's cffi_modules; `python -m
vhostd.native.build` builds them in place for development.  VHOSTD_SANITIZE=1
adds AddressSanitizer + UBSan for the sanitizer test job.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["memory.c", "log.c", "iov.c", "vring.c", "inflight.c", "request.c", "guard.c", "aio.c", "store.c", "file.c", "nbd.c", "rbd.c", "engine.c", "blk.c", "net.c", "net_switch.c", "net_tap.c", "probe.c"]


def _cdef_text() -> str:
    # api.h is plain C; cffi's cdef only needs its declarations.
    lines = (HERE / "api.h").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def _have_header(name: str, env: str) -> bool:
    """An optional library is used when its header is installed (and env is not set)."""
    if os.environ.get(env):
        return False
    return any(Path(d, name).exists() for d in ("/usr/include", "/usr/local/include"))


def _flags() -> tuple[list[str], list[str]]:
    cflags = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"]
    ldflags = ["-pthread"]
    # Optional libraries: io_uring (liburing-dev), NBD (libnbd-dev), RBD (librbd-dev).
    for header, env, define, libs in (("liburing.h", "VHOSTD_NO_URING", "VD_HAVE_URING", ["uring"]),
                                      ("libnbd.h", "VHOSTD_NO_NBD", "VD_HAVE_NBD", ["nbd"]),
                                      ("rbd/librbd.h", "VHOSTD_NO_RBD", "VD_HAVE_RBD", ["rbd", "rados"])):
        if _have_header(header, env):
            cflags.append(f"-D{define}")
            ldflags += [f"-l{lib}" for lib in libs]
    if os.environ.get("VHOSTD_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cflags = [f for f in cflags if f != "-O2"] + ["-O1"] + san
        ldflags += san
    return cflags, ldflags


def make_builder(absolute_paths: bool) -> FFI:
    ffi = FFI()
    ffi.cdef(_cdef_text())
    cflags, ldflags = _flags()
    # setuptools wants sources relative to setup.py; an in-place build compiles elsewhere.
    root = HERE.parent.parent
    sources = [str(HERE / s) if absolute_paths else str((HERE / s).relative_to(root)) for s in SOURCES]
    ffi.set_source(
        "vhostd._native",
        '#include "api.h"\n',
        sources=sources,
        include_dirs=[str(HERE)],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return ffi


ROOT = HERE.parent.parent
# More C a small module compiles: (sources, include dirs, macros), from the repository root.
GUEST_LIB = Path("guest-drivers/lib")
SMALL_EXTRAS = {"_loadgen": ([GUEST_LIB / "virtq.c"], [GUEST_LIB], [("VIRTQ_LIBC", "1")])}


def single_file_builder(module: str, folder: str, name: str, absolute_paths: bool) -> FFI:
    """vhostd.<module> from vhostd/<folder>/<name>.c, declared by <name>.h
    (plus what SMALL_EXTRAS adds)."""
    where = HERE.parent / folder
    ffi = FFI()
    lines = (where / f"{name}.h").read_text().splitlines()
    ffi.cdef("\n".join(line for line in lines if not line.lstrip().startswith("#")))
    extra_sources, extra_includes, macros = SMALL_EXTRAS.get(module, ([], [], []))
    # setuptools wants sources relative to setup.py; an in-place build compiles elsewhere.
    sources = [where / f"{name}.c", *(ROOT / s for s in extra_sources)]
    ffi.set_source(
        f"vhostd.{module}",
        f'#include "{name}.h"\n',
        sources=[str(s) if absolute_paths else str(s.relative_to(ROOT)) for s in sources],
        include_dirs=[str(where), *(str(ROOT / d) for d in extra_includes)],
        define_macros=macros,
        extra_compile_args=["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-fvisibility=hidden"],
        extra_link_args=["-pthread"],
    )
    return ffi


SMALL_MODULES = {"_loadgen": ("loadgen", "lg"), "_vcpu": ("vmm", "vcpu")}
ffibuilder = make_builder(absolute_paths=False)
loadgen_ffibuilder = single_file_builder("_loadgen", *SMALL_MODULES["_loadgen"], absolute_paths=False)
vcpu_ffibuilder = single_file_builder("_vcpu", *SMALL_MODULES["_vcpu"], absolute_paths=False)

if __name__ == "__main__":
    make_builder(absolute_paths=True).compile(tmpdir=str(HERE.parent.parent / "build" / "cffi"), verbose=False)
    for module, (folder, name) in SMALL_MODULES.items():
        single_file_builder(module, folder, name, absolute_paths=True).compile(
            tmpdir=str(HERE.parent.parent / "build" / f"cffi{module}"), verbose=False)
