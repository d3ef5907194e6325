"""LM live step: the fused CUDA kernels (engine/models/fused.py) vs the compiled MLX step, same run.

    python3 bench/fused_step.py --quantize 4,8 --steps 200          # on the device (MLX CUDA)

Random weights at the PersonaPlex shapes (timings do not depend on the values). For each
quantization: LmGen.step p50/p99 (live mode, reference sampling, batch 1) with the fused path off
(one mx.compile'd MLX graph, the previous best) and on; then the same with a full KV ring (3000
positions, the attention worst case); then the two kernels alone. Prints one JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: F401,E402
import mlx.core as mx  # noqa: E402

from engine.models import fused as fz  # noqa: E402
from engine.models.gen import LmGen, SamplingParams  # noqa: E402
from engine.models.lm import LM, LmConfig  # noqa: E402


def pct(ts):
    return round(float(np.percentile(ts, 50)) * 1e3, 3), round(float(np.percentile(ts, 99)) * 1e3, 3)


def fill_context(gen, st):
    """Pretend the KV ring is full (every slot valid): the attention then reads all 3000 keys."""
    c = gen.config
    gen._mlx_cache(st)                 # the fused step's own layout back to an LmCache first
    cache = st.cache
    cache.pos = mx.arange(c.context, dtype=mx.int32)[None]
    cache.offset = mx.array([c.context + 7], mx.int32)
    cache.steps = np.array([c.context + 7], np.int64)
    mx.eval(cache.pos, cache.offset)


def time_gen(lm, fused, steps, full, user, compiled=True):
    gen = LmGen(lm, SamplingParams(), fused=fused)
    gen.whole_step_compile = compiled
    st = gen.new_state(1, seed=0)
    for _ in range(6):
        gen.step(st, user_codes=user)
    if full:
        fill_context(gen, st)
    for _ in range(10):
        o = gen.step(st, user_codes=user)
        mx.eval(o.agent_codes)
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        o = gen.step(st, user_codes=user)
        mx.eval(o.text, o.agent_codes)
        ts.append(time.perf_counter() - t)
    return pct(ts), gen


def time_kernels(gen, steps, full=True):
    f = gen.fused_engine()
    lm = gen.lm
    c = lm.config
    fc = fz.FusedCache.from_lm_cache(lm.make_cache(1))
    fc.pos = mx.arange(c.context, dtype=mx.int32) if full else mx.where(mx.arange(c.context) < 100, mx.arange(c.context), -1)
    x = mx.zeros((c.dim,), lm.dtype)
    out = {}
    for name in ("temporal", "depformer", "temporal+advance"):
        ts = []
        for i in range(steps + 5):
            t = time.perf_counter()
            if name == "temporal":
                r = f.temporal(x, fc)
            elif name == "temporal+advance":
                h, lg, scr = f.temporal(x, fc)
                fc = f.advance(fc, scr)
                r = (h, lg, fc.kv, fc.pos, scr)
            else:
                noise = mx.zeros((8, c.card), mx.float32)
                r = f.depformer(mx.zeros((c.dim,), mx.float32), mx.array([3], mx.int32), noise, 8, SamplingParams())
            mx.eval(*r)
            if i >= 5:
                ts.append(time.perf_counter() - t)
        out[name] = pct(ts)
        assert not f.barrier_error(r[-1]), f"{name}: grid barrier timed out"
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantize", default="4,8")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    mx.set_default_device(mx.gpu)
    cfg = LmConfig.personaplex()
    user = np.random.default_rng(0).integers(0, cfg.card, (1, 8)).astype(np.int32)
    print("blocks", fz.sm_count(), flush=True)
    for q in args.quantize.split(","):
        lm = LM.random(cfg, dtype=mx.bfloat16, seed=0)
        if q not in ("none", "bf16"):
            from engine.models import quant
            quant.apply(lm, quant.QuantPlan.parse(int(q)))
        lm.compile()
        for full in (False, True):
            for fused in (False, True):
                t0 = time.perf_counter()
                (p50, p99), gen = time_gen(lm, fused, args.steps, full, user)
                row = {"bench": "fused_step", "quantize": q, "fused": fused, "full_context": full,
                       "p50_ms": p50, "p99_ms": p99, "wall_s": round(time.perf_counter() - t0, 1)}
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
        (p50, p99), _ = time_gen(lm, True, args.steps, False, user, compiled=False)
        rows = [{"bench": "fused_step", "quantize": q, "fused": True, "full_context": False, "compiled": False,
                 "p50_ms": p50, "p99_ms": p99}]
        for full in (False, True):
            rows.append({"bench": "fused_kernels", "quantize": q, "full_context": full,
                         **time_kernels(gen, args.steps // 2, full)})
        for row in rows:
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
        del lm, gen
        mx.clear_cache()


if __name__ == "__main__":
    main()
