"""The fused CUDA kernels compile (nvcc, no GPU needed) and fit the launch shapes engine/models/fused.py
uses: the batch-1 kernels 512 threads per block, the batched depformer at least 256 (fused.py falls
back to 256 when 512 does not launch). Skipped where the CUDA toolkit is missing."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cuda_check  # noqa: E402

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")


@pytest.mark.parametrize("name,threads,float32", [
    ("temporal", 512, False), ("depformer", 512, False), ("depformer_rows", 256, False),
    ("depformer", 512, True), ("depformer_rows", 256, True), ("ring_attn_part", 256, False),
    ("ring_attn_part_fp8", 256, False), ("ring_attn_part_fp8", 256, True), ("ring_attn_combine", 256, False)])
def test_kernel_compiles_and_launches(name, threads, float32):
    r = cuda_check.check(name, NVCC, float32)
    assert r["ok"], r["errors"]
    assert r["spill_bytes"] == 0
    assert r["registers"] * threads <= 65536, f"{name}: {r['registers']} registers x {threads} threads"


def test_a_broken_body_is_reported(tmp_path, monkeypatch):
    src = tmp_path / "cuda"
    src.mkdir()
    for f in cuda_check.SRC.iterdir():
        (src / f.name).write_text(f.read_text())
    (src / "depformer.cu").write_text((src / "depformer.cu").read_text() + "\nundefined_name += 1;\n")
    monkeypatch.setattr(cuda_check, "SRC", src)
    r = cuda_check.check("depformer", NVCC)
    assert not r["ok"] and any("undefined_name" in e for e in r["errors"])
