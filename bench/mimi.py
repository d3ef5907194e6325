"""Mimi streaming latency: one 1920-sample frame encode_step + decode_step, ours vs the reference.

    PYTHONPATH=. python bench/mimi.py                       # 7B-size Mimi, CPU, ours and torch
    PYTHONPATH=. python bench/mimi.py --config tiny          # the embedded tiny model
    PYTHONPATH=. python bench/mimi.py --device gpu --dtype bfloat16   # MLX CUDA (+ torch CUDA)
    PYTHONPATH=. python bench/mimi.py --modes compiled,fixed,eager --count-ops --no-ref

Random weights at the config's shapes (the timing does not depend on their values). Prints
p50 / p99 / max in ms per frame for encode, decode and both, for each implementation.
`--modes` lists our step modes to time (`Mimi.make_state(mode=...)`): "compiled" (one
mx.compile'd graph per step, fixed-shape state; the default), "fixed" (same state, uncompiled),
"eager" (growing KV windows; the pre-compile path). `--compiled` = `--modes compiled`. The KV
windows fill after 125 frames: `--warmup 130` times the steady state only.
`--count-ops` prints the graph nodes of one encode and one decode step per mode (from
`mx.export_to_dot`; "kernels" excludes views such as reshape/transpose/slice).
`--no-cudnn-sdpa` sets MLX_CUDA_USE_CUDNN_SDPA=0 (MLX CUDA's bf16/fp16 attention with 2 queries
goes to cuDNN, which builds a graph per new K/V shape).
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import re
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


def bench_ours(cfg, dtype, n: int, warmup: int, mode: str, mimi=None):
    if mimi is None:
        mimi = _ours(cfg, dtype)
    st = mimi.make_state(1, mode=mode)
    pcm = _signal(n + warmup)[None, None]
    enc, dec, both, cpu = [], [], [], []
    for i in range(n + warmup):
        fr = pcm[:, :, i * FRAME:(i + 1) * FRAME]
        c0, t0 = time.process_time(), time.perf_counter()
        codes = mimi.encode_step(fr, st)
        mx.eval(codes)  # the step is asynchronous: wait, to time encode alone
        t1 = time.perf_counter()
        out = mimi.decode_step(codes, st)
        np.asarray(out)
        t2, c2 = time.perf_counter(), time.process_time()
        if i >= warmup:
            enc.append(t1 - t0), dec.append(t2 - t1), both.append(t2 - t0), cpu.append(c2 - c0)
    return enc, dec, both, cpu


def _ours(cfg, dtype):
    return Mimi(cfg, 8, dtype=dtype).load_reference_weights(tiny_state_dict(cfg, seed=0))


_VIEWS = {"Reshape", "Transpose", "Slice", "Broadcast", "AsStrided", "ExpandDims", "Squeeze",
          "Flatten", "Unflatten", "StopGradient", "Depends"}


def _count(*outs) -> tuple[int, int, int, collections.Counter]:
    """(nodes, non-view primitives, estimated launches, counts by primitive) of the graph.

    Launch estimate: a Concatenate of k inputs is k copies on MLX CUDA, and a Reshape of an
    AsStrided view is one copy; fused elementwise chains ("Compiled...") are one kernel each.
    """
    f = io.StringIO()
    mx.export_to_dot(f, *outs)
    dot = f.getvalue()
    label = dict(re.findall(r'\{ (\d+) \[label ="([^"]+)", shape=rectangle\]', dot))
    edges = re.findall(r'^"?(\w+)"? -> "?(\w+)"?$', dot, flags=re.M)
    made_by = {dst: src for src, dst in edges if src in label}  # array -> primitive producing it
    c = collections.Counter(label.values())
    kernels = sum(v for k, v in c.items() if k not in _VIEWS)
    launches = kernels
    for src, dst in edges:
        if label.get(dst) == "Concatenate":
            launches += 1
        elif label.get(dst) == "Reshape" and label.get(made_by.get(src)) == "AsStrided":
            launches += 1
    launches -= c["Concatenate"]
    return sum(c.values()), kernels, launches, c


def count_ops(mimi, mode: str, frames: int = 3) -> str:
    """Graph nodes of one encode and one decode step (after `frames` steps), not evaluated."""
    st = mimi.make_state(1, mode=mode)
    x = mx.array(_signal(frames + 1)[None, None])
    for i in range(frames):
        mimi.decode_step(mimi.encode_step(x[:, :, i * FRAME:(i + 1) * FRAME], st), st)
    mx.eval(st.arrays())
    fr = x[:, :, frames * FRAME:].transpose(0, 2, 1)
    if mode == "eager":
        lat = mimi._latent(fr, st.encoder)
        codes = mimi.quantizer.encode(lat, mimi.num_codebooks)
        e = _count(codes, *st.arrays())
        mx.eval(codes, *st.arrays())
        d = _count(mimi._synth(codes, st.decoder), *st.arrays())
    else:
        fe, fd = mimi._step_fns(mode)
        lat, codes, ne = fe(fr, st.enc_flat)
        e = _count(lat, codes, *ne)
        mx.eval(codes)
        pcm, nd = fd(codes, st.dec_flat)
        d = _count(pcm, *nd)
    top = lambda c: ", ".join(f"{k[:40]} {v}" for k, v in c.most_common(8))
    return (f"  encode step: {e[0]} nodes, {e[1]} non-view ops, ~{e[2]} launches ({top(e[3])})\n"
            f"  decode step: {d[0]} nodes, {d[1]} non-view ops, ~{d[2]} launches ({top(d[3])})")


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
    ap.add_argument("--modes", default="compiled,eager",
                    help="comma-separated step modes of ours: compiled, fixed, eager")
    ap.add_argument("--compiled", action="store_true", help="only the compiled step (--modes compiled)")
    ap.add_argument("--count-ops", action="store_true", help="print graph node counts per mode")
    ap.add_argument("--no-cudnn-sdpa", action="store_true",
                    help="MLX_CUDA_USE_CUDNN_SDPA=0 (diagnostic for bf16 attention on CUDA)")
    ap.add_argument("--no-ref", action="store_true", help="skip the torch reference")
    args = ap.parse_args()
    if args.no_cudnn_sdpa:
        os.environ["MLX_CUDA_USE_CUDNN_SDPA"] = "0"  # read at the first attention call
    modes = ["compiled"] if args.compiled else [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("compiled", "fixed", "eager")]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from compiled, fixed, eager")
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    cfg = MimiConfig.personaplex() if args.config == "personaplex" else MimiConfig.tiny()
    dtype = mx.bfloat16 if args.dtype == "bfloat16" else mx.float32
    print(f"Mimi {args.config}, {args.device}, {args.dtype}, {args.frames} frames after "
          f"{args.warmup} warm-up (BLAS: {engine._blas.BLAS_IN_USE}; mlx {mx.__version__}; "
          f"{mx.default_device()}; cuDNN SDPA {'off' if args.no_cudnn_sdpa else 'default'})")
    mimi = _ours(cfg, dtype)
    if args.count_ops:
        for m in modes:
            print(f"ops, mode {m}:\n{count_ops(mimi, m)}")
    rows = [(f"ours (MLX, {m})", bench_ours(cfg, dtype, args.frames, args.warmup, m, mimi))
            for m in modes]
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
