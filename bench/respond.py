"""Real-time factor of the turn-based API: respond() wall time / seconds of audio processed.

A turn feeds `--user-seconds` of speech-like audio frame by frame, then the agent speaks for
`--max-steps` frames; RTF counts both (every 80 ms frame of either phase is one model step).

    python bench/respond.py --model tiny                                   # CPU
    python bench/respond.py --model random:personaplex --quantize 4 --device gpu
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.duplex import load, speechish  # noqa: E402  (imports engine first: OpenBLAS before mlx)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--quantize", default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--user-seconds", type=float, default=4.0)
    p.add_argument("--max-steps", type=int, default=125)
    p.add_argument("--turns", type=int, default=3)
    a = p.parse_args(argv)
    q = None if a.quantize in (None, "none") else int(a.quantize)
    model = load(a.model, q, a.device)
    voice = None if a.model == "random:personaplex" else "NATF2"
    audio = speechish(int(a.user_seconds * 24000))
    frames = int(np.ceil(len(audio) / 1920)) + a.max_steps
    rows = []
    for turn in range(a.turns + 1):                 # turn 0 warms up (prompt prefill, compile)
        t0 = time.perf_counter()
        r = model.respond(audio, voice=voice, max_steps=a.max_steps, seed=turn)
        wall = time.perf_counter() - t0
        if turn:
            rows.append(wall)
        assert r.audio.shape == (a.max_steps * 1920,)
    wall = float(np.median(rows))
    res = {"bench": "respond", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": a.model,
           "quantize": q, "device": a.device, "user_s": a.user_seconds, "reply_s": a.max_steps * 0.08,
           "frames": frames, "wall_s_median": wall, "rtf": wall / (frames * 0.08),
           "ms_per_frame": wall / frames * 1e3}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
