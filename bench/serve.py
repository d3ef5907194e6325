"""Server capacity: how many concurrent sessions one batched 80 ms loop keeps in real time.

    PYTHONPATH=. python bench/serve.py                                   # tiny model, CPU
    PYTHONPATH=. python bench/serve.py --device gpu --config personaplex --quantize 4 \
        --sizes 1,8,16,24,32 --soak-sessions 16 --soak-seconds 300

Random weights at the config's shapes (LM.random + random Mimi codebooks), all in the server's
code path: `engine.server.batch.BatchEngine` joined by prompted B=1 states.
1. sweep: for each batch size B, the step time (Mimi encode + LM step + Mimi decode for B slots),
   p50/p99 over --steps steps, the stage split (encode / LM / decode) at p50, and the nodes and
   kernels of one step's graph (`graph_nodes` / `graph_kernels`: the host's work per tick; on the
   CPU MLX's fast ops count as the several primitives they expand to there).
   Rows are set to a full context first (positions past 3000, every KV slot attended): the
   steady-state worst case of long sessions (--fresh: just-joined sessions instead).
2. soak (--soak-sessions N): the real `StepLoop` (80 ms pacing, deadlines, inboxes fed in real time
   by a feeder thread) with N sessions for --soak-seconds; reports steps, misses, p50/p99. Every
   step from the first join counts: startup JIT work has to be done by reserve() and rehearse().
The verdict line gives the largest B whose p99 <= 80 ms in the sweep, and the soak's misses.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time

import numpy as np

import engine  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.gpu_probe import graph_nodes, summarize_nodes  # noqa: E402
from engine.models.gen import LmGen, PromptCache, SamplingParams
from engine.models.lm import LM, LmConfig
from engine.models.mimi import Mimi, MimiConfig, tiny_state_dict
from engine.server.batch import DEFAULT_FUSED_PARTS, FUSED_CHOICES, BatchEngine, SlotParams, fused_choice
from engine.server.loop import host_counters
from engine.worker import ModelWorker

FRAME = 1920


class BenchModel:
    """The parts of `engine.api.PersonaPlex` the server's loop uses, on random weights."""

    def __init__(self, config: str, dtype, quantize, prompt_len: int, worker: ModelWorker,
                 layers: int = 0, dep_layers: int = 0, mimi: str = ""):
        self.worker = worker
        lcfg = LmConfig.tiny() if config == "tiny" else LmConfig.personaplex()
        if layers or dep_layers:   # real widths, fewer layers: per-session scaling on a small machine
            lcfg = LmConfig(**{**lcfg.to_dict(), **({"num_layers": layers} if layers else {}),
                               **({"depformer_num_layers": dep_layers} if dep_layers else {})})
        mcfg = MimiConfig.tiny() if (mimi or config) == "tiny" else MimiConfig.personaplex()
        self.lm = LM.random(lcfg, dtype=dtype, seed=0)
        if quantize:
            from engine.models import quant
            quant.apply(self.lm, quant.QuantPlan.parse(quantize))
        self.mimi = Mimi(mcfg, num_codebooks=8).load_reference_weights(tiny_state_dict(mcfg, seed=0))
        self.gen = LmGen(self.lm, SamplingParams())
        rng = np.random.default_rng(0)
        tokens = [int(t) for t in rng.integers(4, lcfg.text_card, prompt_len)]
        # Every (voice, prompt) is the same: no voice, `prompt_len` random text tokens.
        self.prompts = PromptCache(self.gen, lambda voice, prompt: (None, lambda: (None, tokens)))

    def decode_text(self, token):
        return ""


def fill_context(be: BatchEngine) -> None:
    """Make every row look like a long session (ring full, positions past the context), so the
    attention runs over all `context` slots: the steady-state worst case, not a fresh session."""
    be.set_offsets(2 * be.lm.config.context + np.arange(be.size, dtype=np.int64) * 7)


def sweep(model: BenchModel, sizes, steps: int, compiled: bool, full: bool = True,
          fused=(False, DEFAULT_FUSED_PARTS), kv_dtype: str = "model") -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for b in sizes:
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        be = BatchEngine(model, compiled=compiled, capacity=b, fused=fused[0], fused_parts=fused[1],
                         kv_dtype=kv_dtype)
        for i in range(b):
            be.join(i, model.prompts.state(None, None, i, warm=False), SlotParams(SamplingParams(), i))
        if full:
            fill_context(be)
        frames = (0.1 * rng.standard_normal((b, FRAME))).astype(np.float32)
        for _ in range(5):
            be.step(frames)
        times, cpu = [], []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.thread_time()
            be.step(frames)
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.thread_time() - c0) * 1e3)
        stages = {"encode": [], "lm": [], "decode": []}
        for _ in range(min(steps, 20)):
            t0 = time.perf_counter()
            u = be._encode(frames)
            mx.eval(u)
            t1 = time.perf_counter()
            text, agent = be._lm_step(u)
            mx.eval(text, agent)
            t2 = time.perf_counter()
            mx.eval(be._decode(agent))
            t3 = time.perf_counter()
            for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
                stages[k].append(v * 1e3)
        # Host vs GPU: build the whole step's graph (no evaluation), then async_eval (the host
        # encodes and launches every kernel), then wait for the GPU. Host-bound: launch >> wait.
        split = {"build": [], "launch": [], "wait": [], "build_cpu": [], "launch_cpu": []}
        state, graph = None, None
        for _ in range(min(steps, 20)):
            # No reference to the last step's state may survive into the next: the step writes
            # the KV rings in place only when nothing else holds them (otherwise every step would
            # copy all rows' rings, and so would the temporal loop below).
            del state
            t0, c0 = time.perf_counter(), time.thread_time()
            text, agent = be._lm_step(be._encode(frames))
            pcm = be._decode(agent)
            cache = be.cache
            state = [pcm, text, be.state.tokens, be.state.key, cache.pos, cache.offset, *cache.keys, *cache.values]
            t1, c1 = time.perf_counter(), time.thread_time()
            if graph is None:             # the step's graph (not timed): does the host's work grow with rows?
                graph = summarize_nodes(graph_nodes(state))
            mx.async_eval(state)
            t2, c2 = time.perf_counter(), time.thread_time()
            mx.eval(state)
            t3 = time.perf_counter()
            for k, v in zip(split, (t1 - t0, t2 - t1, t3 - t2, c1 - c0, c2 - c1)):
                split[k].append(v * 1e3)
        del state, text, agent, pcm
        stages.update({f"split_{k}": v for k, v in split.items()})
        # inside the LM part: the temporal transformer alone, and the 1 + 8 sampling sites alone
        from engine.models.sampling import sample
        sp, c = SamplingParams(), be.lm.config
        x = mx.zeros((b, 1, c.dim), be.lm.dtype)
        lt = mx.random.normal((b, c.text_out)).astype(be.lm.dtype)
        la = mx.random.normal((b, c.card)).astype(be.lm.dtype)
        keys = mx.random.split(mx.random.key(0), b)
        mx.eval(lt, la, keys)
        temporal, sampling = [], []
        for _ in range(min(steps, 20)):
            t0 = time.perf_counter()
            mx.eval(*be._temporal(x))
            t1 = time.perf_counter()
            toks = [sample(lt, np.full(b, sp.temp_text, np.float32), np.full(b, sp.top_k_text, np.int32),
                           np.zeros(b, bool), keys)]
            toks += [sample(la, np.full(b, sp.temp_audio, np.float32), np.full(b, sp.top_k_audio, np.int32),
                            np.zeros(b, bool), keys) for _ in range(8)]
            mx.eval(toks)
            t2 = time.perf_counter()
            temporal.append((t1 - t0) * 1e3)
            sampling.append((t2 - t1) * 1e3)
        stages["temporal"], stages["sample9"] = temporal, sampling
        row = {"batch": b, "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
               "cpu_p50_ms": float(np.percentile(cpu, 50)),
               **{f"{k}_p50_ms": float(np.percentile(v, 50)) for k, v in stages.items()},
               "graph_nodes": graph["nodes"], "graph_kernels": graph["kernels"],
               "state_gb": (mx.get_active_memory() - base) / 1e9,
               "peak_over_weights_gb": (mx.get_peak_memory() - base) / 1e9}
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        out.append(row)
        while be.size:
            be.leave(be.slots[0])
        del be
        gc.collect()                      # the engine's compiled closures form a reference cycle
        mx.clear_cache()
    return out


class StepProfile:
    """cProfile of the loop's steps number `first` .. `first + n - 1` (counted from the first step of
    this soak), on the thread that runs them: `BatchEngine.step` is wrapped while it is installed."""

    def __init__(self, first: int, n: int):
        import cProfile
        self.first, self.n, self.count = first, n, 0
        self.prof = cProfile.Profile()
        self._orig = BatchEngine.step
        orig = self._orig

        def step(be, frames):
            i = self.count
            self.count += 1
            if not self.first <= i < self.first + self.n:
                return orig(be, frames)
            self.prof.enable()
            try:
                return orig(be, frames)
            finally:
                self.prof.disable()
        BatchEngine.step = step

    def report(self, top: int = 25) -> str:
        import io
        import pstats
        BatchEngine.step = self._orig
        if self.count <= self.first:
            return f"profile: the soak ran {self.count} steps, none from step {self.first} on"
        out = io.StringIO()
        st = pstats.Stats(self.prof, stream=out)
        print(f"profile of {min(self.n, max(0, self.count - self.first))} steps (ms per step = tottime / steps)",
              file=out)
        st.sort_stats("tottime").print_stats(top)
        return out.getvalue()


def soak(model: BenchModel, sessions: int, seconds: float, compiled: bool = False, spin_ms: float = 0.0,
         fused=(False, DEFAULT_FUSED_PARTS), period_ms: float = 80.0, profile_steps: int = 0,
         kv_dtype: str = "model") -> dict:
    from engine.server.loop import Inbox, Metrics, Slot, StepLoop

    metrics = Metrics(window=100000)
    # period_ms < the step time: the loop runs its ticks back to back (every tick a "miss"), which
    # times the same steps as the paced loop without the idle gaps between them.
    loop = StepLoop(model, metrics, frame_seconds=period_ms / 1e3, compiled=compiled, capacity=sessions)
    loop.fused, loop.fused_parts = fused
    loop.kv_dtype = kv_dtype
    loop.spin_s = spin_ms / 1e3
    joined = threading.Semaphore(0)
    received = [0] * sessions
    inboxes = []
    for i in range(sessions):
        inbox = Inbox(8, metrics)
        inboxes.append(inbox)

        def on_frame(pcm, text, i=i):
            received[i] += 1

        loop.join(Slot("bench", None, SlotParams(SamplingParams(), i), inbox,
                       lambda err: joined.release(), on_frame))
    loop.start()                          # reserve() + rehearse() first (loop.startup), then the joins
    deadline = time.perf_counter() + 600
    for _ in range(sessions):
        while not joined.acquire(timeout=1.0):
            if loop.failure is not None:  # the loop died at startup: say why now, not in 600 s
                raise loop.failure
            if time.perf_counter() > deadline:
                raise TimeoutError("soak: the sessions did not join within 600 s")
    print(f"soak: {sessions} joined, startup {loop.startup}", flush=True)
    prof = StepProfile(200, profile_steps) if profile_steps else None     # steps 200.. of the live loop
    stop = threading.Event()
    frame = (0.1 * np.random.default_rng(2).standard_normal(FRAME)).astype(np.float32)

    def feed():                           # every session's client, sending in real time
        t = time.perf_counter()
        while not stop.is_set():
            for ib in inboxes:
                ib.push(frame)
            t += 0.08
            time.sleep(max(0.0, t - time.perf_counter()))

    feeder = threading.Thread(target=feed, daemon=True)
    # Every step since the first join counts (the live steps right after startup included); only
    # the input counters start with the feeder (the joins take a few ticks, with silence as input).
    metrics.in_underrun_frames = metrics.in_dropped_frames = 0
    host0 = host_counters()
    mx.reset_peak_memory()                # a step that copies a KV ring instead of updating it in place shows here
    t0 = time.perf_counter()
    feeder.start()
    while (left := t0 + seconds - time.perf_counter()) > 0:     # progress every 30 s
        time.sleep(min(30.0, left))
        recent = sorted(list(metrics.step_ms)[-375:]) or [0.0]
        print(f"soak: {time.perf_counter() - t0:.0f} s, {metrics.steps} steps, {metrics.misses} misses, "
              f"last 30 s p50 {recent[len(recent) // 2]:.1f} ms", flush=True)
    active_gb, peak_gb = mx.get_active_memory() / 1e9, mx.get_peak_memory() / 1e9
    stop.set()
    steps, misses = metrics.steps, metrics.misses
    loop.stop(timeout=60)
    wall = time.perf_counter() - t0
    if prof is not None:
        print(prof.report(), flush=True)
    host1 = host_counters()
    ms, cpu = list(metrics.step_ms), list(metrics.step_cpu_ms)
    res = {"sessions": sessions, "spin_ms": spin_ms, "period_ms": period_ms, "seconds": round(wall, 1),
           "steps": steps, "expected_steps": int(wall / (period_ms / 1e3)), "misses": misses,
           "p50_ms": round(metrics.percentile(50), 2), "p99_ms": round(metrics.percentile(99), 2),
           "max_ms": round(max(metrics.step_ms), 2) if metrics.step_ms else 0.0,
           "input_underruns": metrics.in_underrun_frames, "input_drops": metrics.in_dropped_frames,
           **loop.startup,
           # when the slowest steps happened (step index, ms): spread out = host stalls, at one
           # point = a state change (e.g. the KV rings filling up at step ~context)
           "miss_steps": list(metrics.miss_steps)[:40],
           "join_ms": [round(v, 1) for v in metrics.join_ms],
           "cpu_p50_ms": round(float(np.percentile(cpu, 50)), 2) if cpu else 0.0,
           # device memory in use at the end of the run (weights, every session's state) and its peak
           "active_gb": round(active_gb, 2), "peak_gb": round(peak_gb, 2),
           "host": {k: round(host1[k] - host0.get(k, 0), 2) for k in host1},
           "loadavg": os.getloadavg()[0],
           # (step index, wall ms, loop-thread CPU ms) of the slowest steps
           "slowest": sorted(((i, round(v, 1), round(c, 1)) for i, (v, c) in enumerate(zip(ms, cpu))),
                             key=lambda t: -t[1])[:16]}
    print("soak", json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--config", choices=["tiny", "personaplex"], default="tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--layers", type=int, default=0, help="override the temporal layer count (0 = config's)")
    ap.add_argument("--dep-layers", type=int, default=0, help="override the depformer layer count")
    ap.add_argument("--mimi", choices=["", "tiny", "personaplex"], default="", help="Mimi size (default: --config)")
    ap.add_argument("--quantize", default=None, help="4, 8 or a plan name (default: none)")
    ap.add_argument("--sizes", default="1,2,4,8", help="batch sizes of the sweep (comma list; '' = none)")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per batch size")
    ap.add_argument("--prompt-len", type=int, default=60, help="text prompt tokens of every session")
    ap.add_argument("--compiled", action="store_true", help="mx.compile the temporal and depformer steps")
    ap.add_argument("--fused", default="auto", choices=FUSED_CHOICES,
                    help="batched CUDA kernels, as engine.serve --fused: auto (default: on CUDA the depformer "
                         "kernel on steps of up to 16 rows, MLX's depformer above, and the ring attention "
                         "kernels; MLX elsewhere), off (MLX only), depformer, attention, all (those "
                         "kernels at every row count)")
    ap.add_argument("--fused-depformer", action="store_true", help="the same as --fused depformer")
    ap.add_argument("--kv", default="model", choices=("model", "fp8"), dest="kv_dtype",
                    help="the sessions' KV rings, as engine.serve --kv: the model's dtype or fp8 (e4m3)")
    ap.add_argument("--fresh", action="store_true",
                    help="sweep with fresh sessions (short history) instead of full 3000-step contexts")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="OpenBLAS threads for the CPU sweep (the loop's setting; 0 = leave as is)")
    ap.add_argument("--soak-sessions", type=int, default=0, help="run the paced StepLoop with N sessions")
    ap.add_argument("--soak-seconds", type=float, default=300.0)
    ap.add_argument("--soak-period-ms", default="80",
                    help="the loop's tick period; a comma list runs one soak per value (e.g. 80,1: paced, then "
                         "back to back, to tell the cost of pacing from the cost of the step)")
    ap.add_argument("--spin-ms", default="0",
                    help="the loop polls this long before each tick instead of sleeping; a comma list "
                         "runs one soak per value (default 0)")
    ap.add_argument("--pre-engine", choices=["", "keep", "clear"], default="",
                    help="before the first soak, build and drop an engine with the soak's KV rows (reserve()), "
                         "keeping its buffers in MLX's cache (keep) or releasing them (clear)")
    ap.add_argument("--prompt-first", action="store_true",
                    help="build the sessions' prompted state before the first soak (a server's --warm prompt) "
                         "instead of during its rehearsal, after the KV rows")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="cProfile this many steps of each soak (from its 200th step on) and print the "
                         "functions that took the most time (the profiler slows the steps it times)")
    args = ap.parse_args()
    worker = ModelWorker("bench-serve")
    name = "depformer" if args.fused_depformer else args.fused
    if name not in ("auto", "off") and args.device != "gpu":
        ap.error(f"--fused {name} needs --device gpu (MLX's CUDA backend); use auto or off on the CPU")
    fused = fused_choice(name)

    def run():
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
        dtype = getattr(mx, args.dtype) if args.dtype else (mx.float32 if args.config == "tiny" else mx.bfloat16)
        quant = int(args.quantize) if args.quantize and args.quantize.isdigit() else args.quantize
        t0 = time.perf_counter()
        model = BenchModel(args.config, dtype, quant, args.prompt_len, worker, args.layers,
                           args.dep_layers, args.mimi)
        if args.compiled:
            model.lm.compile()              # the depformer steps (BatchEngine compiles the temporal)
        print(f"device={args.device} config={args.config} dtype={dtype} quantize={quant} "
              f"compiled={args.compiled} kv={args.kv_dtype} load {time.perf_counter() - t0:.1f} s", flush=True)
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        rows = []
        if sizes:
            try:
                rows += sweep(model, sizes, args.steps, args.compiled, not args.fresh, fused, args.kv_dtype)
            except RuntimeError as e:       # e.g. out of memory: report it, go on
                print(json.dumps({"error": str(e)[:300]}), flush=True)
                gc.collect()
                mx.clear_cache()
        return model, rows

    from engine.server.loop import blas_threads

    def run_cpu_threads():
        if args.device != "cpu" or not args.blas_threads:
            return run()
        with blas_threads(args.blas_threads):     # what the server's loop uses on the CPU
            return run()

    model, rows = worker.call(run_cpu_threads)
    ok = [r["batch"] for r in rows if r["p99_ms"] <= 80.0]
    if rows:
        print(f"sweep: largest batch with p99 <= 80 ms: {max(ok) if ok else 'none'}", flush=True)
    if args.pre_engine:
        def pre_engine():
            be = BatchEngine(model, compiled=args.compiled, capacity=args.soak_sessions or 1,
                             fused=fused[0], fused_parts=fused[1], kv_dtype=args.kv_dtype)
            be.reserve()
            del be
            gc.collect()
            if args.pre_engine == "clear":
                mx.clear_cache()
        worker.call(pre_engine)
    if args.prompt_first:
        worker.call(lambda: mx.eval(model.prompts.state(None, None, 0, warm=False).tokens))
    runs = [(float(s), float(p)) for s in args.spin_ms.split(",") for p in args.soak_period_ms.split(",")]
    for spin, period in (runs if args.soak_sessions else []):
        res = soak(model, args.soak_sessions, args.soak_seconds, args.compiled, spin, fused, period,
                   args.profile_steps, args.kv_dtype)
        verdict = "REAL TIME" if res["misses"] == 0 and res["p99_ms"] <= 80 else "NOT real time"
        if period < 80:
            verdict = "back to back (misses do not apply)"
        print(f"soak: {args.soak_sessions} sessions for {res['seconds']} s, spin {spin} ms, period {period} ms: "
              f"{verdict} ({res['misses']} misses, p50 {res['p50_ms']}, p99 {res['p99_ms']} ms)", flush=True)
        gc.collect()
        mx.clear_cache()
    worker.shutdown()


if __name__ == "__main__":
    main()
