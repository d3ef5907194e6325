"""Generator step latency: LmGen.step (live / exact, greedy / sampling) and the batched prompt prefill.

    PYTHONPATH=. python bench/gen_step.py                       # tiny model on the CPU
    PYTHONPATH=. python bench/gen_step.py --device gpu --config personaplex --dtype bfloat16 --quantize 8

Random weights at the config's shapes (LM.random); prints p50/p99 per variant.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

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
    args = ap.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    cfg = LmConfig.tiny() if args.config == "tiny" else LmConfig.personaplex()
    lm = LM.random(cfg, dtype=getattr(mx, args.dtype), seed=0)
    if args.quantize:
        from engine.models import quant
        quant.apply(lm, quant.QuantPlan.parse(args.quantize))
    rng = np.random.default_rng(0)
    user = rng.integers(0, cfg.card, (1, 8)).astype(np.int32)
    print(f"device={args.device} config={args.config} dtype={args.dtype} quantize={args.quantize}")
    for compiled in (False, True):
        if compiled:
            lm.compile()
        for mode in ("exact", "live"):
            for sp in (SamplingParams(greedy=True), SamplingParams()):
                p50, p99 = bench_steps(LmGen(lm, sp, depformer_mode=mode), user, args.steps)
                print(f"compiled={compiled} mode={mode} greedy={sp.greedy}: p50 {p50:.2f} ms p99 {p99:.2f} ms")
    lm.uncompile()
    gen = LmGen(lm, SamplingParams(greedy=True))
    voice = VoicePrompt.from_codes(rng.integers(0, cfg.card, (8, 50)))
    text = [int(t) for t in rng.integers(0, cfg.text_card, 40)]
    for batched in (True, False):
        state = gen.new_state(1)
        t = time.perf_counter()
        gen.run_prompts(state, voice, text, batched=batched)
        mx.eval(state.cache.arrays())
        print(f"run_prompts batched={batched}: {(time.perf_counter() - t) * 1e3:.0f} ms "
              f"for {state.offset} prompt calls")


if __name__ == "__main__":
    main()
