"""Use OpenBLAS for MLX's CPU matmuls on Linux.

MLX's Linux CPU wheel bundles a slow reference BLAS; Debian's
libopenblas0-pthread is ~30x faster. Its libblas.so.3 must be loaded with
RTLD_GLOBAL before mlx is first imported for MLX to bind to it.
"""

import ctypes
import os
import sys
import warnings

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)

status = "not applicable"


def use_openblas() -> str:
    """Load OpenBLAS if possible; returns a short status for reports."""
    global status
    if not sys.platform.startswith("linux") or os.environ.get("MLX_KVQ_NO_OPENBLAS"):
        return status
    path = next((p for p in CANDIDATES if os.path.exists(p)), None)
    if path is None:
        status = "missing (apt-get install libopenblas0-pthread for ~30x faster CPU matmuls)"
    elif "mlx.core" in sys.modules and path not in os.environ.get("LD_PRELOAD", ""):
        status = f"not used: mlx was imported before mlx_kvq (set LD_PRELOAD={path})"
        warnings.warn(f"OpenBLAS {status}", stacklevel=3)
    else:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        status = f"OpenBLAS ({path})"
    return status
