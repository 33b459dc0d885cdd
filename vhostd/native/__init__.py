"""The compiled data plane (`vhostd._native`, built by cffi from build.py)."""

try:
    from vhostd._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "vhostd's native data plane is not built; install the package with "
        "`pip install -e .` (needs gcc and the Python headers)"
    ) from exc

__all__ = ["ffi", "lib"]
