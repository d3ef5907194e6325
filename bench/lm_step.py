"""LM step latency (one 12.5 Hz frame: embed + temporal + text sampling + depformer sampling).

  python bench/lm_step.py --device gpu                     # 7B shapes, random weights, bf16/8/4-bit,
                                                           # eager + compiled, + torch reference if importable
  python bench/lm_step.py --device cpu --tiny              # tiny model on this CPU
  python bench/lm_step.py --quality                        # quantization damage on the tiny model (CPU)

Weights are generated directly in MLX at the real shapes (no 16 GB files). Each timed step is
followed by a full `mx.eval` of the sampled tokens and the cache (wall clock per step), after
--warmup untimed steps. The reference is PyPI moshi's `LMGen.step` (torch, CUDA graphs, bf16) on a
PersonaPlex-shaped `LMModel` (dep_q 16: 16 depformer steps, top-k sampling), run in a subprocess so
the two frameworks never share a process. Results: one JSON line per config (also --json FILE).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pct(ts, q):
    ts = sorted(ts)
    return ts[min(len(ts) - 1, int(round(q * (len(ts) - 1))))]


def emit(args, row):
    line = json.dumps(row)
    print("RESULT", line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


def stats(ts):
    return dict(n=len(ts), p50=1e3 * pct(ts, 0.5), p99=1e3 * pct(ts, 0.99), max=1e3 * max(ts),
                mean=1e3 * sum(ts) / len(ts))


# ----------------------------------------------------------------------------- MLX
def mlx_main(args):
    import engine  # noqa: F401  (OpenBLAS before mlx on Linux CPU)
    import mlx.core as mx
    from engine.models import quant
    from engine.models.lm import LM, LmConfig

    dev = mx.gpu if args.device == "gpu" else mx.cpu
    mx.set_default_device(dev)
    config = LmConfig.tiny() if args.tiny else LmConfig.personaplex()
    B = args.batch

    def sample_topk(logits, temp, k, key):
        if args.greedy:
            return mx.argmax(logits, -1).astype(mx.int32)
        logits = logits.astype(mx.float32) / temp
        kth = mx.partition(logits, -k, axis=-1)[..., -k][..., None]  # top-k threshold
        logits = mx.where(logits < kth, -mx.inf, logits)
        return mx.random.categorical(logits, key=key).astype(mx.int32)

    for qspec in args.quant.split(","):
        plan = quant.QuantPlan.parse(qspec)
        t0 = time.perf_counter()
        lm = LM.random(config, mx.bfloat16 if args.dtype == "bf16" else mx.float32, seed=0)
        quant.apply(lm, plan)
        mx.eval(lm.parameters())
        build_s = time.perf_counter() - t0
        for mode in args.modes.split(","):
            lm.uncompile() if mode == "eager" else lm.compile()
            if mode == "gen":
                emit(args, gen_mode(args, lm, plan, dev, build_s))
                continue
            cache = lm.make_cache(B)
            key = mx.random.key(0)
            user = mx.random.randint(0, config.card, (B, 8, args.warmup + args.steps + 1)).astype(mx.int32)
            frame = mx.array([[config.text_card] + [config.card] * config.n_q] * B, mx.int32)
            if hasattr(mx, "reset_peak_memory"):
                mx.reset_peak_memory()
            ts = []
            for i in range(args.warmup + args.steps):
                t = time.perf_counter()
                key, k_text, k_dep = mx.random.split(key, 3)
                h, tl = lm.temporal(lm.embed(frame[:, :, None]), cache)
                text = sample_topk(tl[:, -1], 0.7, 25, k_text)
                dc = lm.make_depformer_cache()
                prev, codes = text, []
                dkeys = mx.random.split(k_dep, args.dep_steps)
                for s in range(args.dep_steps):
                    prev = sample_topk(lm.depformer_step(s, h[:, -1], prev, dc), 0.8, 250, dkeys[s])
                    if s >= 8:  # live use: user codebooks are teacher-forced
                        prev = user[:, s - 8, i]
                    codes.append(prev)
                frame = mx.concatenate([text[:, None], mx.stack(codes[:8], 1), user[:, :, i]], 1)
                mx.eval(frame, *cache.arrays())
                if i >= args.warmup:
                    ts.append(time.perf_counter() - t)
            peak = mx.get_peak_memory() / 2**30 if hasattr(mx, "get_peak_memory") else None
            emit(args, dict(impl="engine (MLX)", device=str(dev), tiny=args.tiny, quant=plan.name if plan else args.dtype,
                            mode=mode, sampling="greedy" if args.greedy else "top-k", batch=B, dep_steps=args.dep_steps, build_s=round(build_s, 1),
                            weights_gib=lm.nbytes / 2**30, peak_gib=peak, **stats(ts)))
        del lm, cache
        gc.collect()
        mx.clear_cache()


def gen_mode(args, lm, plan, dev, build_s):
    """mode "gen": engine.models.gen.LmGen.step on a compiled LM (the whole step is ONE compiled
    graph), live depformer mode (8 steps; --dep-steps 16 = exact), same sampling as above."""
    import mlx.core as mx
    import numpy as np
    from engine.models.gen import LmGen, SamplingParams
    sp = SamplingParams(greedy=True) if args.greedy else SamplingParams()
    gen = LmGen(lm, sp, depformer_mode="exact" if args.dep_steps > 8 else "live")
    state = gen.new_state(args.batch, seed=0)
    user = np.random.default_rng(0).integers(0, lm.config.card, (args.warmup + args.steps, args.batch, 8))
    user = [mx.array(u.astype(np.int32)) for u in user]
    if hasattr(mx, "reset_peak_memory"):
        mx.reset_peak_memory()
    ts = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        o = gen.step(state, user_codes=user[i])
        mx.eval(state.tokens, *state.cache.arrays(), *([] if o is None else [o.text, o.agent_codes]))
        if i >= args.warmup:
            ts.append(time.perf_counter() - t)
    peak = mx.get_peak_memory() / 2**30 if hasattr(mx, "get_peak_memory") else None
    return dict(impl="engine LmGen.step (MLX, whole-step compiled)", device=str(dev), tiny=args.tiny,
                quant=plan.name if plan else args.dtype, mode="gen", sampling="greedy" if args.greedy else "top-k",
                batch=args.batch, dep_steps=args.dep_steps, build_s=round(build_s, 1),
                weights_gib=lm.nbytes / 2**30, peak_gib=peak, **stats(ts))


# ----------------------------------------------------------------------------- torch reference
def ref_main(args):
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    import torch
    from engine.models.lm import LmConfig
    from moshi.models.lm import LMGen, LMModel

    dev = torch.device("cuda" if args.device == "gpu" else "cpu")
    config = LmConfig.tiny() if args.tiny else LmConfig.personaplex()
    kwargs = config.to_dict()
    kwargs.update(layer_scale=None, depformer_layer_scale=None)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lm = LMModel(**kwargs, device=dev, dtype=torch.bfloat16).eval()
    build_s = time.perf_counter() - t0
    gen = LMGen(lm, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
    B = args.batch
    ts = []
    with torch.no_grad(), gen.streaming(B):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            user = torch.randint(0, config.card, (B, 8, 1), device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            gen.step(user)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                ts.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    emit(args, dict(impl=f"moshi {__import__('moshi').__version__} LMGen (torch {torch.__version__})",
                    device=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", tiny=args.tiny,
                    quant="bf16", mode="cuda graphs" if dev.type == "cuda" else "eager", batch=B,
                    dep_steps=config.dep_q, build_s=round(build_s, 1), peak_gib=peak, **stats(ts)))


def have_reference() -> bool:
    try:
        import moshi.models.lm  # noqa: F401
        import torch
    except Exception:  # noqa: BLE001
        return False
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- quantization damage
def quality_main(args):
    import engine  # noqa: F401
    import mlx.core as mx
    from engine.models.lm import LM, LmConfig, random_state_dict

    from bench.quant_damage import measure_damage

    mx.set_default_device(mx.cpu)
    config = LmConfig.tiny()
    plans = args.plans.split(",")
    print("| plan | weights MiB | KL text | KL audio | TF top-1 text | TF top-1 audio | greedy agree text | greedy agree audio | first divergence |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seed in range(args.seeds):
        sd = {k: mx.array(v) for k, v in random_state_dict(config, seed).items()}
        ref = LM.from_weights(sd, config, mx.float32)
        for p in plans:
            # "kv8": the KV rings in fp8 (e4m3); "PLAN+kv8": weight plan PLAN and fp8 rings
            parts = p.split("+")
            kv = "fp8" if "kv8" in parts else "model"
            wplan = [x for x in parts if x != "kv8"]
            q = LM.from_weights(sd, config, mx.float32, wplan[0]) if wplan else ref
            r = measure_damage(ref, q, steps=args.steps, seed=seed, batch=2, kv_dtype=kv)
            print(f"| {p} (seed {seed}) | {q.nbytes / 2**20:.1f} | {r['kl_text']:.5f} | {r['kl_audio']:.5f} | "
                  f"{r['tf_top1_text']:.3f} | {r['tf_top1_audio']:.3f} | {r['agree_text']:.3f} | "
                  f"{r['agree_audio']:.3f} | {r['first_divergence']} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny config instead of the 7B shapes")
    ap.add_argument("--quant", default="bf16,8,4", help="comma list: bf16, 8, 4, or plans like t8d4")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="float dtype")
    ap.add_argument("--modes", default="eager,compiled,gen",
                    help="eager / compiled (this file's loop over lm stages) / gen (LmGen.step, one graph)")
    ap.add_argument("--dep-steps", type=int, default=8, help="8 = live mode, 16 = exact (reference) mode")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--greedy", action="store_true", help="argmax instead of top-k sampling (MLX side)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--ref", choices=("auto", "on", "off", "only"), default="auto",
                    help="torch reference LMGen (auto: on a GPU when torch+moshi import)")
    ap.add_argument("--quality", action="store_true", help="quantization damage table (tiny, CPU)")
    ap.add_argument("--plans", default="t8,t4,d8,d4,e8,e4,h8,h4,t8d8,t8d4,t4d4,t8d8e8h8,t4d4e4h4,kv8,t4d4e4h4+kv8",
                    help="weight plans of the quality table; kv8 = float weights with fp8 KV rings, "
                         "PLAN+kv8 = both")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quality:
        args.steps = min(args.steps, 50)
        return quality_main(args)
    if args.ref == "only":
        return ref_main(args)
    want_ref = args.ref == "on" or (args.ref == "auto" and args.device == "gpu" and have_reference())
    if want_ref:  # own process: torch and MLX never share CUDA state
        cmd = [sys.executable, os.path.abspath(__file__), "--ref", "only"] + [
            a for a in sys.argv[1:] if a not in ("--ref", "auto", "on")]
        subprocess.run(cmd, check=False)
    mlx_main(args)


if __name__ == "__main__":
    main()
