"""The compiled data plane (`vhostd._native`, built by cffi from build.py).

VHOSTD_NATIVE_MODULE=/path/to/_native.so loads another build of it instead
(the sanitizer job's, scripts/sanitize.sh) without reinstalling the package.
"""

import os
import sys

_override = os.environ.get("VHOSTD_NATIVE_MODULE")
if _override and "vhostd._native" not in sys.modules:
    import importlib.util

    _spec = importlib.util.spec_from_file_location("vhostd._native", _override)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["vhostd._native"] = _module
    _spec.loader.exec_module(_module)

try:
    from vhostd._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "vhostd's native data plane is not built; install the package with "
        "`pip install -e .` (needs gcc and the Python headers)"
    ) from exc

__all__ = ["ffi", "lib"]
