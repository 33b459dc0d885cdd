"""cffi build script for the VMM's vCPU exit loop (module `vhostd._vcpu`).

Its own small module: `vhostd vm run` loads it without the data plane's
libraries (librbd, libnbd, liburing), which cost start-up time.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def make_builder(absolute_paths: bool) -> FFI:
    ffi = FFI()
    lines = (HERE / "vcpu.h").read_text().splitlines()
    ffi.cdef("\n".join(line for line in lines if not line.lstrip().startswith("#")))
    root = HERE.parent.parent
    src = HERE / "vcpu.c"
    ffi.set_source(
        "vhostd._vcpu",
        '#include "vcpu.h"\n',
        sources=[str(src) if absolute_paths else str(src.relative_to(root))],
        include_dirs=[str(HERE)],
        extra_compile_args=["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-fvisibility=hidden"],
        extra_link_args=["-pthread"],
    )
    return ffi


ffibuilder = make_builder(absolute_paths=False)

if __name__ == "__main__":
    make_builder(absolute_paths=True).compile(tmpdir=str(HERE.parent.parent / "build" / "cffi-vcpu"))
