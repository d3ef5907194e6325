"""Make MLX's CPU backend use an optimised BLAS on Linux.

The Linux `mlx[cpu]` wheel bundles netlib's reference BLAS, which is 30-45x slower than
OpenBLAS for the matrix products Mimi and the LM run on the CPU. Loading Debian's OpenBLAS
with global symbol visibility *before* `mlx.core` is imported makes MLX's `cblas_*` calls
bind to it (results are identical). This module must be imported before anything imports
mlx; `engine/__init__.py` does that first. Set PERSONAPLEX_NO_OPENBLAS=1 to opt out.
"""
from __future__ import annotations

import ctypes
import os
import sys

# Debian/Ubuntu: `apt-get install libopenblas0-pthread` (or -openmp / -serial).
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-serial/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-serial/libblas.so.3",
)

#: Which BLAS MLX's CPU backend uses: a path, "system (macOS Accelerate)", or "bundled reference BLAS (slow)".
BLAS_IN_USE = "not checked"
_handle = None


def preload() -> str:
    """Load OpenBLAS globally if we are on Linux and it exists. Returns a description."""
    global BLAS_IN_USE, _handle
    if _handle is not None or BLAS_IN_USE != "not checked":
        return BLAS_IN_USE
    if sys.platform == "darwin":
        BLAS_IN_USE = "Accelerate (macOS)"
        return BLAS_IN_USE
    if os.environ.get("PERSONAPLEX_NO_OPENBLAS"):
        BLAS_IN_USE = "bundled reference BLAS (slow; PERSONAPLEX_NO_OPENBLAS set)"
        return BLAS_IN_USE
    if "mlx.core" in sys.modules:
        BLAS_IN_USE = "unknown (mlx was imported before engine; import engine first for OpenBLAS)"
        return BLAS_IN_USE
    for path in _CANDIDATES:
        if os.path.exists(path):
            try:
                _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            BLAS_IN_USE = f"OpenBLAS ({path})"
            return BLAS_IN_USE
    BLAS_IN_USE = ("bundled reference BLAS (slow: install Debian's libopenblas0-pthread "
                   "to make CPU inference 30x faster)")
    return BLAS_IN_USE
