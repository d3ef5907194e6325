"""The whole per-frame path of the live loop: AEC + Mimi encode + LM step + Mimi decode.

Runs engine.session.FrameProcessor (the object the live loop calls every 80 ms) over simulated
audio as fast as possible and reports per-frame latency p50/p99/max and how many frames would have
missed the 80 ms deadline. Each frame is fully synchronised (its audio comes back as numpy).

    python bench/duplex.py --model tiny --seconds 60                          # CPU, tiny model
    python bench/duplex.py --model random:personaplex --quantize 4 --device gpu --seconds 600
    python bench/duplex.py ... --json out.jsonl                               # append a result row
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import engine  # noqa: E402  (OpenBLAS before mlx)
from engine.session import FRAME, SAMPLE_RATE, FrameProcessor  # noqa: E402


def speechish(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SAMPLE_RATE
    env = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) * (np.sin(2 * np.pi * t / 6) > -0.3)
    return ((np.sign(np.sin(2 * np.pi * 130 * t)) * 0.05 + 0.01 * rng.standard_normal(n)) * env).astype(np.float32)


def load(model: str, quantize, device: str):
    import mlx.core as mx

    from engine.worker import ModelWorker

    worker = ModelWorker()
    worker.call(mx.set_default_device, mx.gpu if device == "gpu" else mx.cpu)
    if model.startswith("random:"):
        from engine.profile import load_random_model
        return load_random_model(model[len("random:"):], quantize, worker)
    return engine.PersonaPlex.load(model, quantize=quantize, worker=worker, progress=False)


def timeline_summary(trace, gc_events, t_first: float) -> dict:
    """Where the host spent each frame (no added syncs): AEC, queueing the Mimi encode, queueing the
    LM step, queueing the decode, then waiting for the audio. Averaged over all frames and over the
    frames slower than 15 ms, plus the garbage collections that overlapped a frame."""
    tr = np.array(trace)                                   # (frames, 6) perf_counter stamps
    parts = np.diff(tr, axis=1) * 1e3                      # aec, enc_q, lm_q, dec_q, wait
    total = (tr[:, 5] - tr[:, 0]) * 1e3
    names = ["aec", "encode_queue", "lm_queue", "decode_queue", "wait_audio"]
    slow = total > 15.0
    gc_ms = np.zeros(len(tr))
    gc_gen = np.full(len(tr), -1)
    for start, stop, gen in gc_events:
        i = np.searchsorted(tr[:, 0], start, side="right") - 1
        if 0 <= i < len(tr) and start <= tr[i, 5]:
            gc_ms[i] += (stop - start) * 1e3
            gc_gen[i] = max(gc_gen[i], gen)
    out = {"frames": int(len(tr)), "slow_frames": int(slow.sum()),
           "mean_ms": {n: float(parts[:, k].mean()) for k, n in enumerate(names)},
           "p99_ms": {n: float(np.percentile(parts[:, k], 99)) for k, n in enumerate(names)},
           "gc": {"collections": len(gc_events), "in_frames": int((gc_ms > 0).sum()),
                  "slow_frames_with_gc": int(((gc_ms > 0) & slow).sum()),
                  "max_ms": float(gc_ms.max()) if len(tr) else 0.0}}
    if slow.any():
        out["slow_mean_ms"] = {n: float(parts[slow, k].mean()) for k, n in enumerate(names)}
        worst = np.argsort(total)[-12:][::-1]
        out["worst"] = [{"frame": int(i), "total": round(float(total[i]), 2),
                         **{n: round(float(parts[i, k]), 2) for k, n in enumerate(names)},
                         "gc_ms": round(float(gc_ms[i]), 2), "gc_gen": int(gc_gen[i]),
                         "t_s": round(float(tr[i, 0] - t_first), 2)} for i in worst]
    return out


def synced_stages(model, proc, mic, n: int) -> dict:
    """n frames with a sync after each stage: device-side cost of encode, LM step and decode."""
    import mlx.core as mx
    rec = {"encode": [], "lm": [], "decode": []}
    for i in range(n):
        k = i % (len(mic) // FRAME)
        x = mx.array(mic[k * FRAME:(k + 1) * FRAME].reshape(1, 1, FRAME))
        t = time.perf_counter()
        codes = model.mimi.encode_step(x, proc.mimi_state)
        mx.eval(codes)
        t1 = time.perf_counter()
        out = model.gen.step(proc.gen_state, user_codes=codes[:, : model.lm_codebooks, 0])
        mx.eval(out.text, out.agent_codes)
        t2 = time.perf_counter()
        pcm = model.mimi.decode_step(out.agent_codes[:, :, None], proc.mimi_state)
        mx.eval(pcm)
        t3 = time.perf_counter()
        rec["encode"].append((t1 - t) * 1e3)
        rec["lm"].append((t2 - t1) * 1e3)
        rec["decode"].append((t3 - t2) * 1e3)
    return {k: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
            for k, v in rec.items()}


def run(model_name: str, quantize, device: str, seconds: float, aec: bool, warmup: int = 20,
        fused: bool = True, timeline: bool = False, stages: int = 0, rt: bool = False) -> dict:
    model = load(model_name, quantize, device)
    if not fused:
        model.worker.call(model.gen.set_fused, False)
    n_frames = int(seconds * SAMPLE_RATE / FRAME)
    voice = None if model_name == "random:personaplex" else "NATF2"   # the random 7B has no voice files

    def body():
        from engine.audio.aec import EchoCanceller
        from engine.rt import frozen_heap
        if rt:
            from engine.rt import boost_current_thread
            extra_rt = boost_current_thread()[0]
        canceller = EchoCanceller(sample_rate=SAMPLE_RATE, filter_ms=150) if aec else None
        t0 = time.perf_counter()
        proc = FrameProcessor(model, voice=voice, system_prompt=None, seed=1, aec=canceller)
        prompt_s = time.perf_counter() - t0
        mic = speechish(FRAME * 64)
        far = np.zeros(FRAME, np.float32)
        times = []
        extra = {"thread_priority": extra_rt} if rt else {}
        gc_events, gc_start = [], [0.0]

        def on_gc(phase, info):
            if phase == "start":
                gc_start[0] = time.perf_counter()
            else:
                gc_events.append((gc_start[0], time.perf_counter(), info["generation"]))
        if timeline:
            import gc
            gc.callbacks.append(on_gc)
        with frozen_heap():          # as the live loop (DuplexSession) runs
            for i in range(warmup + n_frames):
                if timeline and i == warmup:
                    proc.trace, gc_events[:] = [], []
                k = i % 64
                t = time.perf_counter()
                res = proc.process(mic[k * FRAME:(k + 1) * FRAME], far if aec else None)
                times.append((time.perf_counter() - t) * 1e3)
                far = res.audio
        if timeline:
            gc.callbacks.remove(on_gc)
            extra["timeline"] = timeline_summary(proc.trace, gc_events, proc.trace[0][0])
            proc.trace = None
        if stages:
            extra["synced_stages"] = synced_stages(model, proc, mic, stages)
        return prompt_s, np.array(times[warmup:]), extra

    prompt_s, ms, extra = model.worker.call(body)
    import mlx.core as mx
    dev_name = model.worker.call(lambda: str(mx.default_device()))
    res = {
        "bench": "duplex", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "mlx_device": dev_name, "model": model_name, "quantize": quantize, "aec": aec,
        "frames": int(len(ms)), "simulated_s": len(ms) * FRAME / SAMPLE_RATE,
        "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()), "mean_ms": float(ms.mean()),
        "deadline_misses": int((ms > 80.0).sum()), "over_15ms": int((ms > 15.0).sum()),
        "prompt_s": prompt_s, "load_s": model.load_seconds,
        "fused_lm_step": bool(model.worker.call(lambda: model.gen.fused_engine() is not None)),
        **extra,
    }
    if device == "gpu":
        try:
            import subprocess
            res["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | repo/dir | random:personaplex | random:tiny")
    p.add_argument("--quantize", default=None, help="none | 8 | 4")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--seconds", type=float, default=60.0, help="simulated audio (80 ms a frame)")
    p.add_argument("--no-aec", action="store_true")
    p.add_argument("--json", default=None, help="append the result row (JSON lines)")
    p.add_argument("--no-fused", action="store_true",
                   help="run the LM step as MLX graphs even where the fused CUDA kernels are available")
    p.add_argument("--rt", action="store_true",
                   help="run the frame loop's thread at real-time priority where allowed (engine.rt)")
    p.add_argument("--timeline", action="store_true",
                   help="record where the host spends each frame and the garbage collections (no added syncs)")
    p.add_argument("--stages", type=int, default=0,
                   help="after the run, N more frames synchronised after each stage (encode / LM / decode)")
    a = p.parse_args(argv)
    q = None if a.quantize in (None, "none") else int(a.quantize)
    res = run(a.model, q, a.device, a.seconds, not a.no_aec, fused=not a.no_fused,
              timeline=a.timeline, stages=a.stages, rt=a.rt)
    print(json.dumps(res))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
