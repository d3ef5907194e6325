"""Shared by the GPU test files (tests/test_fused*.py): the pytest marks they carry, and a
runner for the device, where pytest may be missing (`python3 tests/test_fused.py`)."""
from __future__ import annotations

import sys
import traceback


def gpu_marks(available: bool):
    """`pytestmark` for a GPU-only module (None where pytest is not installed)."""
    try:
        import pytest
    except ImportError:
        return None
    return [pytest.mark.gpu, pytest.mark.skipif(not available, reason="needs MLX's CUDA backend")]


def run_tests(namespace: dict) -> None:
    """Run every `test_*` function of a module (`-k a,b`: those whose name contains a or b); print PASS/FAIL lines;
    exit 1 on any failure."""
    want = (sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv[:-1] else "").split(",")
    fails = 0
    for name, fn in list(namespace.items()):
        if name.startswith("test_") and callable(fn) and any(w in name for w in want):
            try:
                fn()
                print("PASS", name, flush=True)
            except Exception as e:  # noqa: BLE001
                fails += 1
                traceback.print_exc()
                print("FAIL", name, type(e).__name__, str(e)[:2000], flush=True)
    sys.exit(1 if fails else 0)
