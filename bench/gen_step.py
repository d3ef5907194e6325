"""Generator step latency: LmGen.step (live / exact, greedy / sampling) and the batched prompt prefill.

    PYTHONPATH=. python bench/gen_step.py                       # tiny model on the CPU
    PYTHONPATH=. python bench/gen_step.py --device gpu --config personaplex --dtype bfloat16 --quantize 8
    PYTHONPATH=. python bench/gen_step.py --config personaplex --layers 4 --dtype bfloat16 --quantize 4 --steps 20

Variants: eager, stage-compiled (temporal + one graph per depformer step, sampling eager),
step-compiled (the whole LmGen.step one mx.compile'd graph); each also prints the graph node count of
one step (bench/gpu_probe.py's counter: primitives after fusion, and those that are not views).

Random weights at the config's shapes (LM.random); prints p50/p99 per variant.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from engine.models.gen import LmGen, SamplingParams, VoicePrompt
from engine.models.lm import LM, LmConfig


def bench_steps(gen: LmGen, user: np.ndarray, n: int) -> tuple[float, float]:
    state = gen.new_state(1, seed=0)
    for _ in range(5):
        gen.step(state, user_codes=user)
    mx.eval(state.tokens)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        o = gen.step(state, user_codes=user)
        mx.eval(o.text, o.agent_codes)
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--config", choices=["tiny", "personaplex"], default="tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--layers", type=int, default=None, help="temporal layers (default: the config's)")
    args = ap.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    cfg = LmConfig.tiny() if args.config == "tiny" else LmConfig.personaplex()
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    lm = LM.random(cfg, dtype=getattr(mx, args.dtype), seed=0)
    if args.quantize:
        from engine.models import quant
        quant.apply(lm, quant.QuantPlan.parse(args.quantize))
    rng = np.random.default_rng(0)
    user = rng.integers(0, cfg.card, (1, 8)).astype(np.int32)
    print(f"device={args.device} config={args.config} layers={cfg.num_layers} dtype={args.dtype} "
          f"quantize={args.quantize}")
    from bench.gpu_probe import count_gen_step, summarize_nodes
    for variant in ("eager", "stage-compiled", "step-compiled"):
        lm.uncompile() if variant == "eager" else lm.compile()
        for mode in ("exact", "live"):
            for sp in (SamplingParams(greedy=True), SamplingParams()):
                gen = LmGen(lm, sp, depformer_mode=mode)
                gen.whole_step_compile = variant == "step-compiled"
                p50, p99 = bench_steps(gen, user, args.steps)
                st = gen.new_state(1, seed=0)
                for _ in range(4):
                    gen.step(st, user_codes=user)
                n = summarize_nodes(count_gen_step(gen, st, user))
                print(f"{variant:14s} mode={mode} greedy={sp.greedy}: p50 {p50:.2f} ms p99 {p99:.2f} ms  "
                      f"graph nodes {n['nodes']} (non-view ~{n['kernels']})", flush=True)
    gen = LmGen(lm, SamplingParams(greedy=True))
    voice = VoicePrompt.from_codes(rng.integers(0, cfg.card, (8, 50)))
    text = [int(t) for t in rng.integers(0, cfg.text_card, 40)]
    for variant in ("eager", "compiled"):
        lm.uncompile() if variant == "eager" else lm.compile()
        for batched in (True, False):
            for attempt in ("first", "again"):  # the first call of a shape pays tracing / JIT
                state = gen.new_state(1)
                t = time.perf_counter()
                gen.run_prompts(state, voice, text, batched=batched)
                mx.eval(state.cache.arrays())
                print(f"run_prompts lm {variant} batched={batched} ({attempt}): "
                      f"{(time.perf_counter() - t) * 1e3:.0f} ms for {state.offset} prompt calls", flush=True)


if __name__ == "__main__":
    main()
