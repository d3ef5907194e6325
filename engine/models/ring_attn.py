"""Decode attention over per-row KV rings as two CUDA kernels (MLX CUDA backend).

The batched server steps B conversations at their own positions: each row attends its one query to
its own ring of `context` slots, and `pos` (B, context) says which slots hold a key (>= 0) and which
are still empty (-1). MLX's `scaled_dot_product_attention` needs that as a mask over the whole ring,
reads every slot of every row, and runs at about half the H200's memory bandwidth there
(docs/performance.md). `ring_attention` reads only the stored slots, in chunks spread over the whole
GPU (cuda/ring_attn_part.cu), and merges the chunks' partial softmaxes (cuda/ring_attn_combine.cu).
It computes what `scaled_dot_product_attention(q, k[:B], v[:B], mask=(pos >= 0)[:, None, None])`
computes, in float32 inside, and works inside `mx.compile`.
"""
from __future__ import annotations

import functools
from pathlib import Path

import mlx.core as mx

_SRC = Path(__file__).with_name("cuda")
THREADS = 256


def chunk_slots(rows: int, heads: int) -> int:
    """Ring slots per block of the first pass: 256, or 64 when there are few (row, head) pairs,
    so that a step of a few rows still spreads over every SM of the GPU."""
    return 256 if rows * heads >= 256 else 64


def unsupported(head_dim: int, dtype) -> str | None:
    """Why the kernels cannot serve this shape here, or None."""
    from .fused import cuda_backend
    if not cuda_backend():
        return "ring attention kernels need MLX's CUDA backend with the GPU as default device"
    if head_dim % 8 or 32 % (head_dim // 8):
        return f"head_dim={head_dim}: the kernels need head_dim / 8 to divide 32"
    if dtype not in (mx.float32, mx.bfloat16, mx.float16, mx.uint8):
        return f"cache dtype {dtype} (supported: float32, bfloat16, float16, uint8 = fp8 e4m3)"
    return None


@functools.lru_cache(maxsize=1)
def _kernels():
    hdr = (_SRC / "common.cuh").read_text()
    part = mx.fast.cuda_kernel(name="pp_ring_attn_part", source=(_SRC / "ring_attn_part.cu").read_text(),
                               header=hdr, input_names=["q", "k", "v", "pos", "sc"], output_names=["part"])
    comb = mx.fast.cuda_kernel(name="pp_ring_attn_combine", source=(_SRC / "ring_attn_combine.cu").read_text(),
                               header=hdr, input_names=["part"], output_names=["o"])
    return part, comb


def ring_attention(q: mx.array, k: mx.array, v: mx.array, pos: mx.array, scale: float) -> mx.array:
    """q (B, H, 1, hd) one query per row, k / v (R >= B, H, C, hd) the rings (rows past B are not
    read), pos (B, C) int32 each slot's stored position (< 0: empty) -> (B, H, 1, hd) in k's dtype,
    or in q's where the rings hold fp8 e4m3 (uint8, `lm.to_cache`). Every row must have at least
    one stored slot (a step stores its own key before attending)."""
    B, H, _, hd = q.shape
    C = k.shape[2]
    part_k, comb_k = _kernels()
    ch = chunk_slots(B, H)
    nck = -(-C // ch)
    t = q.dtype if k.dtype == mx.uint8 else k.dtype
    part = part_k(inputs=[q.reshape(B, H, hd).astype(t), k, v, pos.astype(mx.int32),
                          mx.array([scale], mx.float32)],
                  template=[("T", t), ("H", H), ("HD", hd), ("C", C), ("CH", ch), ("NT", THREADS)],
                  grid=(B * H * nck * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                  output_shapes=[(B, H, nck, hd + 2)], output_dtypes=[mx.float32])[0]
    o = comb_k(inputs=[part], template=[("T", t), ("HD", hd), ("NCK", nck)],
               grid=(B * H * hd, 1, 1), threadgroup=(hd, 1, 1),
               output_shapes=[(B, H, hd)], output_dtypes=[t])[0]
    return o.reshape(B, H, 1, hd)
