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


def run(model_name: str, quantize, device: str, seconds: float, aec: bool, warmup: int = 20,
        fused: bool = True) -> dict:
    model = load(model_name, quantize, device)
    if not fused:
        model.worker.call(model.gen.set_fused, False)
    n_frames = int(seconds * SAMPLE_RATE / FRAME)
    voice = None if model_name == "random:personaplex" else "NATF2"   # the random 7B has no voice files

    def body():
        from engine.audio.aec import EchoCanceller
        canceller = EchoCanceller(sample_rate=SAMPLE_RATE, filter_ms=150) if aec else None
        t0 = time.perf_counter()
        proc = FrameProcessor(model, voice=voice, system_prompt=None, seed=1, aec=canceller)
        prompt_s = time.perf_counter() - t0
        mic = speechish(FRAME * 64)
        far = np.zeros(FRAME, np.float32)
        times = []
        for i in range(warmup + n_frames):
            k = i % 64
            t = time.perf_counter()
            res = proc.process(mic[k * FRAME:(k + 1) * FRAME], far if aec else None)
            times.append((time.perf_counter() - t) * 1e3)
            far = res.audio
        return prompt_s, np.array(times[warmup:])

    prompt_s, ms = model.worker.call(body)
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
    a = p.parse_args(argv)
    q = None if a.quantize in (None, "none") else int(a.quantize)
    res = run(a.model, q, a.device, a.seconds, not a.no_aec, fused=not a.no_fused)
    print(json.dumps(res))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
