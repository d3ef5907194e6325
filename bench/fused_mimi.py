"""Mimi encode step on the GPU: the fused CUDA encoder (engine/models/fused_mimi.py) vs the compiled
MLX step, released Mimi shapes with random weights, float32, batch 1, in one process.

    python3 bench/fused_mimi.py --frames 300 [--json out.jsonl]

Per frame: `synced` = encode + wait for the codes; `queue` = host time to queue the step (what the
live frame pays before the LM step can be queued behind it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import engine  # noqa: E402,F401
import mlx.core as mx  # noqa: E402

from engine.models.mimi import Mimi, MimiConfig, tiny_state_dict  # noqa: E402
from engine.profile import synthetic_input  # noqa: E402

FRAME = 1920


def run(mimi, audio, fused: bool, warmup: int) -> dict:
    mimi.fused_encode, mimi._fused_enc = fused, None
    st = mimi.make_state(1)
    n = len(audio) // FRAME
    synced, queue = [], []
    for i in range(n):
        x = mx.array(audio[i * FRAME:(i + 1) * FRAME].reshape(1, 1, FRAME))
        t0 = time.perf_counter()
        codes = mimi.encode_step(x, st)
        t1 = time.perf_counter()
        mx.eval(codes)
        t2 = time.perf_counter()
        if i >= warmup:
            queue.append((t1 - t0) * 1e3)
            synced.append((t2 - t0) * 1e3)
    active = bool(mimi._fused_enc) if fused else False
    pct = lambda a, q: float(np.percentile(a, q))  # noqa: E731
    return {"fused": active, "synced_p50": pct(synced, 50), "synced_p99": pct(synced, 99),
            "queue_p50": pct(queue, 50), "queue_p99": pct(queue, 99), "frames": len(synced)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    mx.set_default_device(mx.gpu)
    cfg = MimiConfig()
    mimi = Mimi(cfg, 8).load_reference_weights(tiny_state_dict(cfg, seed=0), source="random")
    audio = synthetic_input((a.frames + a.warmup) * 0.08 + 0.1)[: (a.frames + a.warmup) * FRAME]
    rows = []
    for fused in (False, True, False, True):
        r = run(mimi, audio, fused, a.warmup)
        r.update(bench="fused_mimi", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        rows.append(r)
        print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
