"""Mimi streaming latency: one 1920-sample frame encode_step + decode_step, ours vs the reference.

    PYTHONPATH=. python bench/mimi.py                       # 7B-size Mimi, CPU, ours and torch
    PYTHONPATH=. python bench/mimi.py --config tiny          # the embedded tiny model
    PYTHONPATH=. python bench/mimi.py --device gpu --dtype bfloat16   # MLX CUDA (+ torch CUDA)

Random weights at the config's shapes (the timing does not depend on their values). Prints
p50 / p99 / max in ms per frame for encode, decode and both, for each implementation.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import engine  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from engine.models.mimi import Mimi, MimiConfig, tiny_state_dict

FRAME = 1920


def _stats(ts) -> str:
    a = np.asarray(ts) * 1e3
    return f"p50 {np.percentile(a, 50):7.2f}  p99 {np.percentile(a, 99):7.2f}  max {a.max():7.2f}"


def _signal(n_frames: int) -> np.ndarray:
    t = np.arange(n_frames * FRAME) / 24000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t) ** 2
            + 0.01 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)


def bench_ours(cfg, dtype, n: int, warmup: int):
    sd = tiny_state_dict(cfg, seed=0)
    mimi = Mimi(cfg, 8, dtype=dtype).load_reference_weights(sd)
    st = mimi.make_state(1)
    pcm = _signal(n + warmup)[None, None]
    enc, dec, both, cpu = [], [], [], []
    for i in range(n + warmup):
        fr = pcm[:, :, i * FRAME:(i + 1) * FRAME]
        c0, t0 = time.process_time(), time.perf_counter()
        codes = mimi.encode_step(fr, st)
        t1 = time.perf_counter()
        out = mimi.decode_step(codes, st)
        np.asarray(out)
        t2, c2 = time.perf_counter(), time.process_time()
        if i >= warmup:
            enc.append(t1 - t0), dec.append(t2 - t1), both.append(t2 - t0), cpu.append(c2 - c0)
    return enc, dec, both, cpu


def bench_ref(cfg, device: str, n: int, warmup: int):
    import torch
    sys.path.insert(0, "tests/models")
    from conftest import mimi_reference_config  # noqa: E402
    from moshi.models.loaders import get_mimi

    torch.set_num_threads(torch.get_num_threads())
    model = get_mimi(None, mimi_config=mimi_reference_config(cfg), device=device, num_codebooks=8)
    pcm = torch.from_numpy(_signal(n + warmup)[None, None]).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    enc, dec, both, cpu = [], [], [], []
    with torch.no_grad(), model.streaming(1):
        for i in range(n + warmup):
            fr = pcm[:, :, i * FRAME:(i + 1) * FRAME]
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            codes = model.encode(fr)
            sync()
            t1 = time.perf_counter()
            out = model.decode(codes)
            out.cpu()
            t2, c2 = time.perf_counter(), time.process_time()
            if i >= warmup:
                enc.append(t1 - t0), dec.append(t2 - t1), both.append(t2 - t0), cpu.append(c2 - c0)
    return enc, dec, both, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--config", choices=["personaplex", "tiny"], default="personaplex")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-ref", action="store_true", help="skip the torch reference")
    args = ap.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    cfg = MimiConfig.personaplex() if args.config == "personaplex" else MimiConfig.tiny()
    dtype = mx.bfloat16 if args.dtype == "bfloat16" else mx.float32
    print(f"Mimi {args.config}, {args.device}, {args.dtype}, {args.frames} frames "
          f"(BLAS: {engine._blas.BLAS_IN_USE}; mlx {mx.__version__}; {mx.default_device()})")
    rows = [("ours (MLX)", bench_ours(cfg, dtype, args.frames, args.warmup))]
    if not args.no_ref:
        try:
            import torch
            dev = "cuda" if args.device == "gpu" and torch.cuda.is_available() else "cpu"
            if args.device == "gpu" and dev == "cpu":
                print("torch CUDA not available: reference skipped")
            else:
                rows.append((f"reference (torch {torch.__version__}, {dev}, fp32)",
                             bench_ref(cfg, dev, args.frames, args.warmup)))
        except ImportError as e:
            print(f"reference skipped: {e}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    for name, (enc, dec, both, cpu) in rows:
        print(f"{name}\n  encode  {_stats(enc)}\n  decode  {_stats(dec)}\n  frame   {_stats(both)}"
              f"\n  process CPU time per frame (all threads; less load-sensitive): "
              f"p50 {np.percentile(np.asarray(cpu) * 1e3, 50):7.2f} ms")


if __name__ == "__main__":
    main()
