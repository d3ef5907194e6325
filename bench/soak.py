"""Soak run: a long simulated conversation at real-time pace through the real loop and rings.

The mic is a simulated device (engine.audio.virtual: a thread at the audio clock writing the
capture ring, reading the playback ring, with an echo path), fed with synthetic speech-like audio
generated on the fly; what it plays is counted. Reports RSS growth after warm-up, sample accounting,
step-time percentiles in the first and last 5 minutes, and every counter.

    python bench/soak.py --minutes 30 --json soak.json      # the benchmark (docs/performance.md)
    python bench/soak.py --seconds 60                       # the CI version (tests/test_soak.py)
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

import engine  # noqa: E402  (loads OpenBLAS before mlx)
from engine.session import FRAME, SAMPLE_RATE, DeviceIO  # noqa: E402


class SpeechLike:
    """Endless speech-like mic signal: 3-4 s talk spurts (buzz + noise, syllable envelope), pauses."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.t = 0

    def __call__(self, n: int) -> np.ndarray:
        t = (self.t + np.arange(n)) / SAMPLE_RATE
        self.t += n
        talk = (np.sin(2 * np.pi * t / 7.0) > -0.2)
        env = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) * talk
        f0 = 120 + 20 * np.sin(2 * np.pi * 0.3 * t)
        buzz = np.sign(np.sin(2 * np.pi * np.cumsum(f0) / SAMPLE_RATE)) * 0.05
        return ((buzz + 0.01 * self.rng.standard_normal(n)) * env).astype(np.float32)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pct(a, q):
    return float(np.percentile(a, q)) if len(a) else float("nan")


def run(seconds: float, model_name: str = "tiny", warmup_s: float = 30.0, window_s: float = 300.0,
        progress: bool = True) -> dict:
    model = engine.PersonaPlex.load(model_name, progress=False)
    played = {"n": 0}

    def sink(block):
        played["n"] += len(block)

    dev = DeviceIO.simulated(source=SpeechLike(), sink=sink, echo_gain=0.3, echo_delay=2400)
    frames = int(seconds * SAMPLE_RATE / FRAME)
    s = model.session(source=dev, sink=dev, seed=1, max_frames=frames, record_steps=True)
    rss = []
    t0 = time.monotonic()
    s.start()
    warm_rss = None
    while s.running:
        time.sleep(1.0)
        el = time.monotonic() - t0
        rss.append((el, rss_mb()))
        if warm_rss is None and el >= warmup_s:
            warm_rss = rss[-1][1]
        if progress and int(el) % 30 == 0:
            st = s.stats()
            print(f"[{el:6.0f} s] frames {st.frames} | {st.health_line()} | rss {rss[-1][1]:.0f} MB",
                  file=sys.stderr, flush=True)
    st = s.wait()
    wall = time.monotonic() - t0
    c = dev.stream.counters
    steps = np.array(s.step_log, dtype=np.float64)
    per_window = int(window_s * SAMPLE_RATE / FRAME)
    first, last = steps[:per_window], steps[-per_window:]
    cap_ok = c["frames_in"] == st.samples_in + dev.ring.available_read + dev.ring.overflow_count
    pushed = st.samples_out + s.prebuffer * FRAME
    play_ok = c["frames_out"] == pushed - dev.play_ring.available_read + dev.play_ring.underrun_count
    end_rss = rss[-1][1] if rss else rss_mb()
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "model": model_name, "seconds": seconds, "wall_s": wall, "frames": st.frames,
        "rss_warm_mb": warm_rss, "rss_end_mb": end_rss,
        "rss_growth_mb": (end_rss - warm_rss) if warm_rss is not None else None,
        "captured": c["frames_in"], "consumed": st.samples_in, "capture_left": dev.ring.available_read,
        "capture_overflow": dev.ring.overflow_count, "capture_accounted": bool(cap_ok),
        "pushed": pushed, "played": c["frames_out"], "playback_left": dev.play_ring.available_read,
        "playback_underrun": dev.play_ring.underrun_count, "playback_accounted": bool(play_ok),
        "step_p50_ms": pct(steps, 50), "step_p99_ms": pct(steps, 99), "step_max_ms": float(steps.max()),
        "first_window_p99_ms": pct(first, 99), "last_window_p99_ms": pct(last, 99), "window_s": window_s,
        "deadline_misses": st.deadline_misses, "late_frames": st.late_frames,
        "dropped_input_frames": st.dropped_input_frames, "drift_skipped_frames": st.drift_skipped_frames,
        "clipped_samples": st.clipped_samples, "aec_delay_ms": st.aec_delay_ms,
        "sink_received": played["n"],
    }
    model.close()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--model", default="tiny")
    p.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline (default 60, CI 20)")
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    seconds = a.seconds if a.seconds is not None else (a.minutes or 30) * 60
    warm = a.warmup if a.warmup is not None else (60.0 if seconds >= 600 else min(20.0, seconds / 3))
    window = 300.0 if seconds >= 1200 else seconds / 3
    res = run(seconds, a.model, warm, window, progress=not a.quiet)
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    ok = res["capture_accounted"] and res["playback_accounted"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
