"""Focused GPU probe: what makes the batched (T=64) temporal prefill slow on MLX CUDA, and how many
graph nodes / kernels one LM step builds. Runs in well under 2 minutes on an H100.

    PYTHONPATH=. python bench/gpu_probe.py --device gpu                 # the probe (7B shapes)
    PYTHONPATH=. python bench/gpu_probe.py --device cpu --small         # smoke test on a laptop/CPU

Every suspect is timed twice: `cold` = its first call in this process (includes NVRTC JIT / cuDNN
plan building for a new shape), `warm` = median of the following calls (each call is synced with
mx.eval; a call chains `--chain` identical ops, like the 32 layers of one step, and the time is
per op). Suspects, at the PersonaPlex 7B shapes (dim 4096, 32 heads x 128, context 3000):

  mm.*       x (M, K) @ W.T for the temporal projections, M = 1 (a step), 8 / 16 (a server batch of
             sessions), 64 (a prefill chunk):
             bf16 dense, 8-bit and 4-bit `quantized_matmul`, and 4-bit dequantize-then-matmul
  kv.*       writing T = 1 / 64 new keys into a (1, 32, 3000, 128) bf16 ring: scatter (what
             lm._temporal did), dynamic `slice_update` (what it does for non-wrapping chunks)
  sdpa.*     q (1, 32, T, 128) against 3000 keys: no mask, bool (T, 3000) mask, additive mask
  chunk.*    lm.temporal over 64 positions as ONE T=64 chunk vs 64 T=1 steps, --layers layers
             (default 8: same per-layer structure as 32, 4x cheaper), 4-bit / 8-bit, with the
             quantized matmuls of the chunk as quantized_matmul or as dequantize + dense matmul
  prefill.*  LmGen.run_prompts (102 prompt calls) at --step-layers layers, 4-bit: batched with
             dequantized chunks (the new default; quantized_matmul chunks are in chunk.*),
             with the chunk guard, and stepwise
  step.*     one LmGen.step (live; greedy / top-k) at --step-layers (default 32) layers, 4-bit and
             8-bit: eager, per-stage compiled (temporal + 16 depformer graphs), whole-step compiled
             (the default with lm.compile()), with the graph's node counts in the note: `nodes`
             counts primitives after mx.compile's fusion, `non-view` leaves out views (reshape,
             slice, transpose, broadcast, ...) that launch nothing on the GPU.
  fused.*    (experimental, last) residual add + RMSNorm as one mx.fast.cuda_kernel vs the two MLX
             ops: max difference and time per pair in a chain of 32 (the step has ~161 such adds).

Prints one table at the end (and JSON lines with --json FILE).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402,F401  (OpenBLAS before mlx on Linux CPU)
import mlx.core as mx  # noqa: E402

# Primitives that only make a view (no kernel on the GPU backends; a few us of host time each).
VIEW_PRIMITIVES = {"Broadcast", "Reshape", "Slice", "Transpose", "ExpandDims", "Squeeze", "AsStrided",
                   "StopGradient", "Split", "Flatten", "Unflatten", "Depends", "BroadcastAxes"}


# ----------------------------------------------------------------------------- op counting
def graph_nodes(outputs) -> dict:
    """Primitive name -> count in the (unevaluated) graph that computes `outputs`."""
    outputs = [o for o in outputs if isinstance(o, mx.array)]
    buf = io.StringIO()
    mx.export_to_dot(buf, *outputs)
    counts: dict = {}
    for name in re.findall(r'label ="([^"]+)", shape=rectangle', buf.getvalue()):
        key = "Compiled(fused)" if name.startswith("Compiled") else name
        counts[key] = counts.get(key, 0) + 1
    return counts


def summarize_nodes(counts: dict) -> dict:
    nodes = sum(counts.values())
    views = sum(v for k, v in counts.items() if k in VIEW_PRIMITIVES)
    return {"nodes": nodes, "kernels": nodes - views, "fused": counts.get("Compiled(fused)", 0)}


class gpu_shaped:
    """On the CPU, mx.fast.rms_norm / rope / scaled_dot_product_attention expand into several
    primitives; on a GPU each is ONE kernel. Inside this context each becomes one stand-in node
    (a Softmax; attention also keeps its keys/values alive through Depends), so a CPU-built graph
    has the GPU's node structure. Values are wrong: use it for counting only."""

    def __enter__(self):
        f = mx.fast
        self.saved = (f.rms_norm, f.rope, f.scaled_dot_product_attention)
        f.rms_norm = lambda x, w, eps, **kw: mx.softmax(x, axis=-1)
        f.rope = lambda x, dims, **kw: mx.softmax(x, axis=-1)

        def sdpa(q, k, v, *, scale, mask=None, **kw):
            deps = [k, v] + ([mask] if isinstance(mask, mx.array) else [])
            return mx.depends([mx.softmax(q, axis=-1)], deps)[0]
        f.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc):
        mx.fast.rms_norm, mx.fast.rope, mx.fast.scaled_dot_product_attention = self.saved


def count_gen_step(gen, state, user, gpu_like: bool | None = None) -> dict:
    """Graph node counts of one `gen.step(state, user_codes=user)` (state is advanced). gpu_like
    (default: on the CPU) counts each fused fast op as one node, as on a GPU (`gpu_shaped`);
    its step then computes wrong values, so use a throw-away state."""
    if gpu_like is None:
        gpu_like = mx.default_device().type == mx.cpu
    captured = []
    real_async, real_eval = mx.async_eval, mx.eval
    mx.eval(state.tokens, state.key, *state.cache.arrays())
    compiled = gen.lm._compiled is not None
    if compiled and gpu_like:
        gen.lm.compile()  # fresh traces under the stand-ins
    mx.async_eval = lambda *a: captured.extend(_leaves(a))
    mx.eval = lambda *a: captured.extend(_leaves(a))
    try:
        if gpu_like:
            with gpu_shaped():
                gen.step(state, user_codes=user)
        else:
            gen.step(state, user_codes=user)
    finally:
        mx.async_eval, mx.eval = real_async, real_eval
        if compiled and gpu_like:
            gen.lm.compile()  # drop the stand-in traces
    captured += [state.tokens, state.key, *state.cache.arrays()]
    counts = graph_nodes(captured)
    if gpu_like and "Softmax" in counts:
        counts["fast op (rms_norm/rope/sdpa)"] = counts.pop("Softmax")
    mx.eval(captured)
    return counts


def _leaves(x):
    if isinstance(x, mx.array):
        return [x]
    if isinstance(x, (list, tuple)):
        return [y for z in x for y in _leaves(z)]
    if isinstance(x, dict):
        return [y for z in x.values() for y in _leaves(z)]
    return []


# ----------------------------------------------------------------------------- timing
def timeit(fn, reps: int, budget_s: float):
    """fn() -> arrays. Returns (cold seconds, warm median seconds or None, warm count)."""
    t = time.perf_counter()
    mx.eval(fn())
    cold = time.perf_counter() - t
    ts = []
    while len(ts) < reps and sum(ts) + cold < budget_s:
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    return cold, (statistics.median(ts) if ts else None), len(ts)


class Table:
    def __init__(self, json_path):
        self.rows, self.json_path = [], json_path

    def add(self, name, cold, warm, n, per=1, note=""):
        row = {"name": name, "cold_ms": 1e3 * cold / per, "warm_ms": None if warm is None else 1e3 * warm / per,
               "n": n, "note": note}
        self.rows.append(row)
        w = "-" if warm is None else f"{row['warm_ms']:.3f}"
        print(f"  {name:44s} cold {row['cold_ms']:9.3f} ms  warm {w:>9s} ms  (n={n}) {note}", flush=True)
        if self.json_path:
            with open(self.json_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def print(self):
        print("\n| suspect | cold ms (first call) | warm ms (median) | n | note |")
        print("|---|---:|---:|---:|---|")
        for r in self.rows:
            w = "-" if r["warm_ms"] is None else f"{r['warm_ms']:.3f}"
            print(f"| {r['name']} | {r['cold_ms']:.3f} | {w} | {r['n']} | {r['note']} |")


# ----------------------------------------------------------------------------- suspects
def probe_matmul(tab, args, D, H3, Hin, Hid):
    key = mx.random.key(1)
    shapes = {"in_proj": (D, H3), "linear_in": (D, Hin), "linear_out": (Hid, D)}
    for name, (K, N) in shapes.items():
        w = (mx.random.normal((N, K), key=key) / math.sqrt(K)).astype(mx.bfloat16)
        q8 = mx.quantize(w, 64, 8)
        q4 = mx.quantize(w, 64, 4)
        mx.eval(w, *q8, *q4)
        for M in args.rows:
            x = mx.random.normal((M, K), key=key).astype(mx.bfloat16)
            mx.eval(x)
            c = args.chain
            variants = {
                "bf16": lambda x=x: [x @ w.T for _ in range(c)],
                "q8": lambda x=x: [mx.quantized_matmul(x, *q8, transpose=True, group_size=64, bits=8)
                                   for _ in range(c)],
                "q4": lambda x=x: [mx.quantized_matmul(x, *q4, transpose=True, group_size=64, bits=4)
                                   for _ in range(c)],
            }
            if M > 1:
                variants["q4 dequant+mm"] = lambda x=x: [x @ mx.dequantize(*q4, group_size=64, bits=4).T
                                                          for _ in range(c)]
                variants["q8 dequant+mm"] = lambda x=x: [x @ mx.dequantize(*q8, group_size=64, bits=8).T
                                                          for _ in range(c)]
            for v, fn in variants.items():
                cold, warm, n = timeit(fn, args.reps, args.budget)
                tab.add(f"mm.{name} {K}->{N} M={M} {v}", cold, warm, n, per=c)
        del w, q8, q4


def probe_kv(tab, args, H, C, hd):
    key = mx.random.key(2)
    c = args.chain
    for T in (1, 64):
        upd = mx.random.normal((1, H, T, hd), key=key).astype(mx.bfloat16)
        start = mx.array(100, mx.int32)
        idx = start + mx.arange(T, dtype=mx.int32)
        mx.eval(upd, idx)
        ring = [mx.zeros((1, H, C, hd), mx.bfloat16) for _ in range(c)]
        mx.eval(ring)

        def scatter():
            for i in range(c):
                r = ring[i]
                r[:, :, idx] = upd
                ring[i] = r
            return ring

        def slice_update():
            for i in range(c):
                ring[i] = mx.slice_update(ring[i], upd, mx.stack([start]), axes=(2,))
            return ring

        def put_along():
            ix = mx.broadcast_to(idx[None, None, :, None], upd.shape)
            for i in range(c):
                ring[i] = mx.put_along_axis(ring[i], ix, upd, axis=2)
            return ring

        for name, fn in (("scatter", scatter), ("slice_update", slice_update), ("put_along_axis", put_along)):
            cold, warm, n = timeit(fn, args.reps, args.budget)
            tab.add(f"kv.write T={T} {name}", cold, warm, n, per=c, note=f"ring (1,{H},{C},{hd}) bf16")
        # The mask the temporal step builds from the slot-position table (once per step, not per layer).
        pos = mx.where(mx.arange(C) < 2000, mx.arange(C), -1).astype(mx.int32)
        mx.eval(pos)

        def mask():
            p = pos
            p[idx] = idx
            t_abs = idx
            delta = t_abs[:, None] - p[None, :]
            return [(p[None, :] >= 0) & (delta >= 0) & (delta < C)]

        cold, warm, n = timeit(mask, args.reps, args.budget)
        tab.add(f"kv.mask build T={T}", cold, warm, n)
        del ring


def probe_sdpa(tab, args, H, C, hd):
    key = mx.random.key(3)
    k = mx.random.normal((1, H, C, hd), key=key).astype(mx.bfloat16)
    v = mx.random.normal((1, H, C, hd), key=key).astype(mx.bfloat16)
    mx.eval(k, v)
    c = args.chain
    scale = 1 / math.sqrt(hd)
    for T in (1, 64):
        q = mx.random.normal((1, H, T, hd), key=key).astype(mx.bfloat16)
        j = mx.arange(C)
        bmask = (j[None, :] <= (2000 + mx.arange(T))[:, None])
        amask = mx.where(bmask, 0.0, -mx.inf).astype(mx.bfloat16)
        mx.eval(q, bmask, amask)
        for name, m in (("no mask", None), ("bool mask", bmask), ("additive mask", amask)):
            fn = (lambda m=m, q=q: [mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=m)
                                    for _ in range(c)])
            cold, warm, n = timeit(fn, args.reps, args.budget)
            tab.add(f"sdpa T={T} {name}", cold, warm, n, per=c, note=f"{C} keys")


def build_lm(args, bits, layers):
    from engine.models import quant
    from engine.models.lm import LM, LmConfig
    cfg = LmConfig.personaplex() if not args.small else LmConfig.tiny()
    import dataclasses
    cfg = dataclasses.replace(cfg, num_layers=layers)
    lm = LM.random(cfg, mx.bfloat16, seed=0)
    if bits:
        quant.apply(lm, bits)
    mx.eval(lm.parameters())
    return lm


def probe_chunk(tab, args, lm, label):
    T = 64
    D = lm.config.dim
    x = (0.1 * mx.random.normal((1, T, D), key=mx.random.key(4))).astype(mx.bfloat16)
    mx.eval(x)

    def chunk():
        cache = lm.make_cache(1)
        h, logits = lm.temporal(x, cache)
        return [h, logits, *cache.arrays()]

    def steps():
        cache = lm.make_cache(1)
        out = []
        for t in range(T):
            h, logits = lm.temporal(x[:, t:t + 1], cache)
            mx.eval(h, logits, *cache.arrays())  # per step, as run_prompts(batched=False) does
            out.append(h)
        return out

    reps = max(1, args.reps // 5)
    for name, fn in (("one T=64 chunk", chunk), ("64 x T=1 steps", steps)):
        for dense in ((False, True) if lm.quant_plan is not None and name.startswith("one") else (False,)):
            lm.dense_prefill_rows = 2 if dense else None
            cold, warm, n = timeit(fn, reps, args.budget)
            tab.add(f"chunk.{label} {name}{' dequant+mm' if dense else ''}", cold, warm, n,
                    note=f"{lm.config.num_layers} layers, 64 positions")
    lm.dense_prefill_rows = None


def probe_ops(tab, args, lm, label):
    import numpy as np
    from engine.models.gen import LmGen, SamplingParams
    user = np.zeros((1, 8), np.int32)
    L = lm.config.num_layers
    for mode in ("eager", "stage-compiled", "step-compiled"):
        if mode == "eager":
            lm.uncompile()
        else:
            lm.compile()
        for sp in (SamplingParams(greedy=True), SamplingParams()):
            gen = LmGen(lm, sp, depformer_mode="live")
            gen.whole_step_compile = mode == "step-compiled"
            scratch = gen.new_state(1, seed=0)
            for _ in range(4):
                gen.step(scratch, user_codes=user)
            counts = count_gen_step(gen, scratch, user)
            n = summarize_nodes(counts)
            state = gen.new_state(1, seed=0)
            for _ in range(4):
                gen.step(state, user_codes=user)

            def one():
                o = gen.step(state, user_codes=user)
                return [o.text, o.agent_codes]

            cold, warm, k = timeit(one, args.reps * 4, args.budget)
            top = ", ".join(f"{a} {b}" for a, b in sorted(counts.items(), key=lambda kv: -kv[1])[:5])
            tab.add(f"step.{label} L={L} LmGen.step live {'greedy' if sp.greedy else 'top-k'} {mode}", cold, warm, k,
                    note=f"nodes {n['nodes']}, non-view {n['kernels']}, fused {n['fused']} ({top})")
    lm.uncompile()


def probe_prefill(tab, args, lm, label):
    """The original pathology: LmGen.run_prompts (50-frame wav voice + 40 text tokens = 102 calls)."""
    import numpy as np
    from engine.models.gen import LmGen, SamplingParams, VoicePrompt
    rng = np.random.default_rng(0)
    voice = VoicePrompt.from_codes(rng.integers(0, lm.config.card, (8, 50)))
    text = [int(t) for t in rng.integers(0, lm.config.text_card, 40)]
    for batched, guard, rows in ((True, False, 16), (True, True, 16), (False, False, 16)):
        gen = LmGen(lm, SamplingParams())
        gen.prefill_guard = guard
        lm.dense_prefill_rows = rows

        def run():
            st = gen.new_state(1, seed=0)
            gen.run_prompts(st, voice, text, batched=batched)
            return st.cache.arrays()

        cold, warm, n = timeit(run, 3, args.budget * 2)
        tab.add(f"prefill.{label} run_prompts batched={batched} guard={guard} dense_rows={rows}", cold, warm, n,
                note=f"102 calls, {lm.config.num_layers} layers, chunk_ok={gen.chunk_ok}")
    lm.dense_prefill_rows = 16


_ADD_NORM_SRC = """
    unsigned int row = blockIdx.x;
    unsigned int tid = threadIdx.x;
    const T* xr = x + (size_t)row * DIM;
    const T* rr = r + (size_t)row * DIM;
    T* sr = s + (size_t)row * DIM;
    T* yr = y + (size_t)row * DIM;
    __shared__ float part[NT];
    float acc = 0.0f;
    for (unsigned int i = tid; i < DIM; i += NT) {
        T v = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
        sr[i] = v;
        float f = static_cast<float>(v);
        acc += f * f;
    }
    part[tid] = acc;
    __syncthreads();
    for (unsigned int half = NT / 2; half > 0; half >>= 1) {
        if (tid < half) part[tid] += part[tid + half];
        __syncthreads();
    }
    float inv = rsqrtf(part[0] / DIM + eps[0]);
    for (unsigned int i = tid; i < DIM; i += NT) {
        yr[i] = static_cast<T>(static_cast<float>(sr[i]) * inv * static_cast<float>(w[i]));
    }
"""


def probe_fused(tab, args):
    """Experimental, GPU only, run last: residual add + RMSNorm as ONE custom CUDA kernel (would
    remove the ~161 lone residual Adds of a step). Reports correctness vs the MLX ops and time per
    pair in a chain of 32. One block of NT threads per row; every access is row < grid rows,
    i < DIM, so a wrong result cannot write out of bounds."""
    if not hasattr(mx.fast, "cuda_kernel") or mx.default_device().type != mx.gpu:
        print("  fused: skipped (needs mx.fast.cuda_kernel on a GPU)")
        return
    kernel = mx.fast.cuda_kernel(name="add_rms_norm", input_names=["x", "r", "w", "eps"],
                                 output_names=["s", "y"], source=_ADD_NORM_SRC)
    NT = 256
    for D in (4096, 1024):
        key = mx.random.key(5)
        x = mx.random.normal((1, D), key=key).astype(mx.bfloat16)
        r = mx.random.normal((1, D), key=mx.random.key(6)).astype(mx.bfloat16)
        w = (1 + 0.1 * mx.random.normal((D,), key=mx.random.key(7))).astype(mx.bfloat16)
        eps = mx.array([1e-8], mx.float32)
        mx.eval(x, r, w, eps)

        def fused(a, b):
            return kernel(inputs=[a, b, w, eps], template=[("T", mx.bfloat16), ("DIM", D), ("NT", NT)],
                          grid=(a.shape[0] * NT, 1, 1), threadgroup=(NT, 1, 1),
                          output_shapes=[a.shape, a.shape], output_dtypes=[a.dtype, a.dtype])

        def plain(a, b):
            s_ = a + b
            return s_, mx.fast.rms_norm(s_, w, 1e-8)

        try:
            s1, y1 = fused(x, r)
            s2, y2 = plain(x, r)
            err = float(mx.max(mx.abs(y1.astype(mx.float32) - y2.astype(mx.float32))))
            same_s = bool(mx.array_equal(s1, s2))
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  fused D={D}: kernel failed: {e}")
            return
        for name, f in (("fused kernel", fused), ("add + fast.rms_norm", plain)):
            def chain(f=f):
                a, outs = x, []
                for _ in range(32):
                    a, yy = f(a, r)
                    outs.append(yy)
                return outs
            cold, warm, n = timeit(chain, args.reps, args.budget)
            tab.add(f"fused.add_rms_norm D={D} {name}", cold, warm, n, per=32,
                    note=f"max |y diff| {err:.2e}, sum equal {same_s}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    ap.add_argument("--small", action="store_true", help="tiny widths (CPU smoke test)")
    ap.add_argument("--layers", type=int, default=8, help="temporal layers of the chunk-probe models")
    ap.add_argument("--step-layers", type=int, default=32, help="temporal layers of the step / prefill models")
    ap.add_argument("--chain", type=int, default=4, help="ops chained per timed call (time is per op)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rows", default="1,8,16,64", help="matmul M values (8/16: a server batch of sessions)")
    ap.add_argument("--budget", type=float, default=2.5, help="seconds per suspect, cold call included")
    ap.add_argument("--only", default="mm,kv,sdpa,chunk,prefill,ops,fused")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.rows = [int(m) for m in args.rows.split(",")]
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    t0 = time.perf_counter()
    if args.small:
        D, H, hd, C, hidden = 128, 4, 32, 3000, 576
    else:
        D, H, hd, C, hidden = 4096, 32, 128, 3000, 11264
    print(f"device {mx.default_device()} mlx {mx.__version__} dims D={D} H={H} hd={hd} C={C}", flush=True)
    tab = Table(args.json)
    only = set(args.only.split(","))
    if "mm" in only:
        probe_matmul(tab, args, D, 3 * D, 2 * hidden, hidden)
    if "kv" in only:
        probe_kv(tab, args, H, C, hd)
    if "sdpa" in only:
        probe_sdpa(tab, args, H, C, hd)
    if "chunk" in only:
        for bits in (4, 8):
            lm = build_lm(args, bits, args.layers)
            probe_chunk(tab, args, lm, f"q{bits}" if bits else "bf16")
            del lm
            mx.clear_cache()
    if "ops" in only or "prefill" in only:
        for bits in (4, 8):
            lm = build_lm(args, bits, args.step_layers)
            if "prefill" in only and bits == 4:
                probe_prefill(tab, args, lm, f"q{bits}")
            if "ops" in only:
                probe_ops(tab, args, lm, f"q{bits}")
            del lm
            mx.clear_cache()
    if "fused" in only:
        probe_fused(tab, args)
    tab.print()
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
