"""`python -m engine.profile`: where each millisecond of the 80 ms step goes, on this machine.

Runs the real DuplexSession loop (engine.session) with stage timing on, and reports per stage
p50/p95/p99/max, the real-time factor, deadline misses, warm-up, load time and peak memory.

    python -m engine.profile --model tiny --steps 200 --json prof.json --plot prof.png
    python -m engine.profile --model tiny --steps 200 --compare prof.json
    python -m engine.profile --model tiny --device-loopback      # mouth-to-ear on a real device pair
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import numpy as np

from .errors import EngineError
from .session import FRAME, SAMPLE_RATE, STAGES

SCHEMA_VERSION = 1
WARMUP_STEPS = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--quantize", default="none", help="none | 8 | 4")
    p.add_argument("--steps", type=int, default=200, help="timed steps (after warm-up)")
    p.add_argument("--in-wav", default=None, help="mic input (default: synthetic speech-like noise)")
    p.add_argument("--realtime", action="store_true", help="pace the input at 12.5 Hz (measures capture wait)")
    p.add_argument("--aec", action="store_true", help="include Speex AEC in the loop")
    p.add_argument("--voice", default="NATF2")
    p.add_argument("--device-loopback", action="store_true",
                   help="measure the audio path latency with a click through a real output->input loop")
    p.add_argument("--input-device", default=None)
    p.add_argument("--output-device", default=None)
    p.add_argument("--json", default=None, help="write results as JSON")
    p.add_argument("--plot", default=None, help="write a PNG plot (needs matplotlib)")
    p.add_argument("--compare", default=None, help="an earlier --json file: print ratios per stage")
    p.add_argument("--no-progress", action="store_true")
    return p


def _pct(vals) -> dict:
    a = np.asarray(vals, dtype=np.float64)
    if a.size == 0:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "mean": float(a.mean())}


def _synthetic_input(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    env = 0.5 * (1 + np.sin(2 * np.pi * 3.0 * t)) * (np.sin(2 * np.pi * 0.25 * t) > -0.3)
    voiced = np.sign(np.sin(2 * np.pi * 140 * t)) * 0.05
    return ((voiced + 0.02 * rng.standard_normal(n)) * env).astype(np.float32)


def _rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 1024.0 / 1024.0


def run_profile(args) -> dict:
    import mlx.core as mx

    from .api import PersonaPlex

    t0 = time.perf_counter()
    model = PersonaPlex.load(args.model, quantize=args.quantize, model_dir=args.model_dir,
                             progress=not args.no_progress)
    load_s = time.perf_counter() - t0
    total = args.steps + WARMUP_STEPS
    if args.in_wav:
        from .audio.wav import load_audio
        audio, _ = load_audio(args.in_wav)
        reps = int(np.ceil(total * FRAME / max(len(audio), 1)))
        audio = np.tile(audio, reps)[: total * FRAME]
    else:
        audio = _synthetic_input(total * FRAME / SAMPLE_RATE)
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="step", desc="profiling", file=sys.stderr)
        except ImportError:
            bar = None
    session = model.session(source=audio, sink=None, voice=args.voice, realtime=args.realtime,
                            aec=args.aec, profile=True, max_frames=total)
    t_start = time.perf_counter()
    session.start()
    last = 0
    while session.running:
        time.sleep(0.1)
        if bar is not None:
            n = session.stats().frames
            bar.update(n - last)
            last = n
    stats = session.wait()
    wall = time.perf_counter() - t_start
    if bar is not None:
        bar.update(stats.frames - last)
        bar.close()
    records = session.timer.records
    warm, timed = records[:WARMUP_STEPS], records[WARMUP_STEPS:]
    stages = {}
    for s in STAGES:
        key = s
        vals = [r.get(key, 0.0) for r in timed]
        stages[s] = _pct(vals)
    steps = [r.get("step", 0.0) for r in timed]
    frame_ms = FRAME / SAMPLE_RATE * 1e3
    result = {
        "schema": SCHEMA_VERSION,
        "tool": "engine.profile",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "mlx_device": str(mx.default_device()), "blas": __import__("engine")._blas.BLAS_IN_USE},
        "model": {"source": str(model.files.source), "quantize": model.quantize, "tiny": model.is_tiny},
        "steps": len(timed),
        "warmup_steps": len(warm),
        "warmup_ms": float(sum(r.get("step", 0.0) for r in warm)),
        "load_s": load_s,
        "wall_s": wall,
        "frame_ms": frame_ms,
        "rtf": float(np.mean(steps) / frame_ms) if steps else 0.0,
        "deadline_misses": int(sum(1 for x in steps if x > frame_ms)),
        "stages": stages,
        "series": {"step": steps, **{s: [r.get(s, 0.0) for r in timed] for s in STAGES if s != "step"}},
        "memory": {"mlx_active_mb": mx.get_active_memory() / 2**20, "mlx_peak_mb": mx.get_peak_memory() / 2**20,
                   "rss_peak_mb": _rss_mb()},
        "session": {k: v for k, v in stats.__dict__.items() if isinstance(v, (int, float, bool, str))},
    }
    model.close()
    return result


def loopback(args) -> dict:
    """Play a click through the output device and find it in the input: audio-path latency."""
    from .audio.io import open_duplex
    from .audio.ring import RingBuffer

    cap, play = RingBuffer(1 << 16), RingBuffer(1 << 16)
    dev = lambda v: int(v) if v is not None and str(v).isdigit() else v  # noqa: E731
    stream = open_duplex(cap, play, input_device=dev(args.input_device), output_device=dev(args.output_device))
    click = np.zeros(SAMPLE_RATE // 2, np.float32)
    click[:48] = np.hanning(48).astype(np.float32) * 0.8
    stream.start()
    try:
        time.sleep(0.3)
        cap.clear()
        play.write(np.zeros(1920, np.float32))
        t_written = cap.available_read  # capture position when the click is queued
        play.write(click)
        queued_before = 1920
        time.sleep(1.0)
        rec = cap.read(cap.available_read)
    finally:
        stream.stop()
        stream.close()
    if len(rec) == 0:
        raise EngineError("loopback: nothing was captured; is the input device delivering audio?")
    env = np.abs(rec)
    thresh = max(0.05, 0.3 * env.max())
    hits = np.nonzero(env > thresh)[0]
    if hits.size == 0:
        raise EngineError("loopback: the click was not heard on the input; connect output to input "
                          "(a cable, or the PulseAudio null sink's monitor) and retry")
    latency_samples = int(hits[0]) - t_written - queued_before
    audio_ms = latency_samples / SAMPLE_RATE * 1e3
    return {"audio_path_ms": audio_ms, "click_at_sample": int(hits[0])}


def print_table(res: dict, out=sys.stdout) -> None:
    print(f"\n{res['model']['source']} (quantize={res['model']['quantize']}) on {res['machine']['mlx_device']}, "
          f"{res['steps']} steps", file=out)
    print(f"{'stage':<14}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  ms", file=out)
    for s, v in res["stages"].items():
        print(f"{s:<14}{v['p50']:9.2f}{v['p95']:9.2f}{v['p99']:9.2f}{v['max']:9.2f}", file=out)
    print(f"real-time factor {res['rtf']:.3f} (step mean / 80 ms) | deadline misses {res['deadline_misses']} | "
          f"warm-up {res['warmup_ms']:.0f} ms | load {res['load_s']:.1f} s", file=out)
    m = res["memory"]
    print(f"memory: MLX active {m['mlx_active_mb']:.0f} MB, peak {m['mlx_peak_mb']:.0f} MB, "
          f"process RSS peak {m['rss_peak_mb']:.0f} MB", file=out)
    if "loopback" in res:
        lb = res["loopback"]
        print(f"mouth-to-ear: audio path {lb['audio_path_ms']:.0f} ms + model {lb['model_ms']:.0f} ms "
              f"= {lb['total_ms']:.0f} ms", file=out)


def compare(res: dict, old: dict, out=sys.stdout) -> dict:
    ratios = {}
    print(f"\ncompare with {old.get('date', '?')} ({old.get('model', {}).get('source', '?')}):", file=out)
    print(f"{'stage':<14}{'old p50':>10}{'new p50':>10}{'ratio':>8}", file=out)
    for s, v in res["stages"].items():
        o = old.get("stages", {}).get(s)
        if not o:
            continue
        r = v["p50"] / o["p50"] if o["p50"] > 0 else float("nan")
        ratios[s] = r
        print(f"{s:<14}{o['p50']:10.2f}{v['p50']:10.2f}{r:8.2f}", file=out)
    return ratios


def plot(res: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise EngineError("--plot needs matplotlib: pip install matplotlib") from e
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7))
    series = res["series"]
    a1.plot(series["step"], lw=0.8, label="step")
    a1.axhline(res["frame_ms"], color="r", ls="--", label="80 ms budget")
    a1.set_xlabel("step")
    a1.set_ylabel("ms")
    a1.legend()
    a1.set_title(f"{res['model']['source']} q={res['model']['quantize']} on {res['machine']['mlx_device']}")
    names = [s for s in STAGES if s != "step"]
    p50 = [res["stages"][s]["p50"] for s in names]
    p99 = [res["stages"][s]["p99"] for s in names]
    x = np.arange(len(names))
    a2.bar(x - 0.2, p50, 0.4, label="p50")
    a2.bar(x + 0.2, p99, 0.4, label="p99")
    a2.set_xticks(x, names, rotation=20)
    a2.set_ylabel("ms")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        print("error: --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        res = run_profile(args)
        if args.device_loopback:
            lb = loopback(args)
            # Model latency: one frame to fill + the step + 2 frames of model delay (spec section 4).
            model_ms = res["frame_ms"] * 3 + res["stages"]["step"]["p50"]
            lb.update(model_ms=model_ms, total_ms=lb["audio_path_ms"] + model_ms)
            res["loopback"] = lb
        print_table(res)
        if args.compare:
            with open(args.compare) as f:
                res["compare"] = compare(res, json.load(f))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
            print(f"wrote {args.json}", file=sys.stderr)
        if args.plot:
            plot(res, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        return 0
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
