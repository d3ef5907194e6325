"""Decode attention over per-row KV rings: the CUDA kernels (engine/models/ring_attn.py) against
MLX's `scaled_dot_product_attention`, one layer at the 7B shapes (32 heads x 128, 3000 slots).

    PYTHONPATH=. python bench/ring_attn.py                      # check, then time 1-64 rows
    PYTHONPATH=. python bench/ring_attn.py --rows 32,64 --fills 3000,750
    PYTHONPATH=. python bench/ring_attn.py --rows 32,64 --kv fp8      # also the kernels on fp8 rings

Check: the kernels against MLX (mask = stored slots) on rows at different fills, wrapped rings and
holes, float32 and bfloat16, eager and inside mx.compile; prints the largest difference. Time: a
call queued `--calls` times, then one evaluation; ms per call and the KV bytes of the stored slots
read per second. "fill" is the stored slots per row (3000: full rings, no mask for MLX). With
`--kv fp8` each row also times the kernels on the same rings stored as fp8 e4m3 (`fp8_ms`, half the
bytes; their largest difference from the bf16 kernels' result in `fp8_diff`).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import engine  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from engine.models.ring_attn import ring_attention, unsupported


def rings(B, H, C, hd, fills, dtype, seed=0):
    kk, kv, kq = mx.random.split(mx.random.key(seed), 3)
    k = mx.random.normal((B, H, C, hd), dtype, key=kk)
    v = mx.random.normal((B, H, C, hd), dtype, key=kv)
    q = mx.random.normal((B, H, 1, hd), dtype, key=kq)
    pos = np.full((B, C), -1, np.int32)
    for b, n in enumerate(fills):
        pos[b, :n] = np.arange(n)
    return q, k, v, mx.array(pos)


def reference(q, k, v, pos, scale):
    B = q.shape[0]
    return mx.fast.scaled_dot_product_attention(q, k[:B], v[:B], scale=scale, mask=(pos >= 0)[:, None, None, :])


def check(C: int) -> dict:
    H, hd = 4, 128
    scale = hd ** -0.5
    out = {}
    for dtype in (mx.float32, mx.bfloat16):
        fills = [1, 5, 255, 256, 257, 1000, C - 1, C]
        q, k, v, pos = rings(len(fills) + 2, H, C, hd, fills + [C, C], dtype, seed=1)   # 2 spare rows
        p = np.array(pos)
        rng = np.random.default_rng(2)
        p[2, rng.choice(C, C // 3, replace=False)] = 7        # holes and stored slots anywhere (wrapped rings)
        pos = mx.array(p[:len(fills)])
        q = q[:len(fills)]
        ref = reference(q, k, v, pos, scale).astype(mx.float32)
        eager = ring_attention(q, k, v, pos, scale).astype(mx.float32)
        comp = mx.compile(lambda a, b, c, d: ring_attention(a, b, c, d, scale))(q, k, v, pos).astype(mx.float32)
        out[str(dtype)] = {"eager": float(mx.abs(eager - ref).max()), "compiled": float(mx.abs(comp - ref).max()),
                           "ref_scale": float(mx.abs(ref).max())}
    return out


def timed(fn, calls):
    outs = [fn() for _ in range(3)]
    mx.eval(outs)
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        outs = [fn() for _ in range(calls)]
        mx.eval(outs)
        best.append((time.perf_counter() - t0) / calls * 1e3)
    return min(best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,16,32,64")
    ap.add_argument("--fills", default="3000,750,256")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--kv", choices=("bf16", "fp8"), default="bf16",
                    help="fp8: also time the kernels on the rings stored as fp8 e4m3")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    H, C, hd = 32, 3000, 128
    why = unsupported(hd, mx.bfloat16)
    if why:
        raise SystemExit(why)
    print(json.dumps({"check": check(C)}), flush=True)
    scale = hd ** -0.5
    for B in map(int, args.rows.split(",")):
        for fill in map(int, args.fills.split(",")):
            q, k, v, pos = rings(B, H, C, hd, [fill] * B, mx.bfloat16)
            mask = None if fill >= C else (pos >= 0)[:, None, None, :]
            mlx_ms = timed(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask), args.calls)
            ker_ms = timed(lambda: ring_attention(q, k, v, pos, scale), args.calls)
            gb = B * H * fill * hd * 2 * 2 / 1e9
            row = {"rows": B, "fill": fill, "mlx_ms": round(mlx_ms, 4), "kernel_ms": round(ker_ms, 4),
                   "mlx_gbs": round(gb / mlx_ms * 1e3), "kernel_gbs": round(gb / ker_ms * 1e3),
                   "speedup": round(mlx_ms / ker_ms, 2)}
            if args.kv == "fp8":
                k8, v8 = mx.to_fp8(k), mx.to_fp8(v)
                mx.eval(k8, v8)
                f8_ms = timed(lambda: ring_attention(q, k8, v8, pos, scale), args.calls)
                diff = mx.abs(ring_attention(q, k8, v8, pos, scale).astype(mx.float32)
                              - ring_attention(q, k, v, pos, scale).astype(mx.float32)).max()
                row.update(fp8_ms=round(f8_ms, 4), fp8_gbs=round(gb / 2 / f8_ms * 1e3),
                           fp8_speedup=round(ker_ms / f8_ms, 2), fp8_diff=round(float(diff), 4))
                del k8, v8
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
            del q, k, v, pos


if __name__ == "__main__":
    main()
