"""The whole server path: websocket + Ogg/Opus + batched loop, with realtime clients in their own process.

    PYTHONPATH=. python bench/serve_ws.py                              # tiny model, CPU, 8 x 20 s
    PYTHONPATH=. python bench/serve_ws.py --clients 8 --seconds 20 --variants compiled:5,eager:10
    PYTHONPATH=. python bench/serve_ws.py --model random:personaplex --quantize 4 --device gpu \
        --clients 16 --seconds 300 --variants compiled:5          # the 7B shapes, random weights

For each variant (`compiled` or `eager` steps : libopus encoder complexity) the server starts
in this process on 127.0.0.1 with --max-sessions = --clients, `python -m engine.server.client`
streams --seconds of synthetic voice from every client in real time, and the server's own
metrics are reported: steps, deadline misses, step p50 / p99 / max, the slowest steps (index,
ms, batch size) and whether every client got continuous audio. Variants run one after another
in one process, so they are compared under the same machine conditions (rerun to see the noise).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import engine  # noqa: F401  (OpenBLAS before mlx)
from engine.models.gen import PromptCache
from engine.server.app import ServerConfig, start

ROOT = Path(__file__).resolve().parents[1]


class _AnyVoice:
    """A random-weights model has no voice files: serve every voice_prompt without a voice prompt
    (the prompt phases then hold the text prompt only). Everything else is the model's."""

    def __init__(self, model):
        self._model = model
        self.prompts = PromptCache(model.gen, lambda voice, prompt: model.prompts.resolve(None, prompt))

    def __getattr__(self, name):
        return getattr(self._model, name)

    def list_voices(self):
        return ["NATF0"]


async def _variant(model, clients: int, seconds: float, compiled: bool, complexity: int) -> dict:
    cfg = ServerConfig(max_sessions=clients, compiled=compiled, opus_complexity=complexity)
    t0 = time.perf_counter()
    runner, server, port = await start(model, "127.0.0.1", 0, cfg)
    try:
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "clients.json"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.server.client", "--url", f"ws://127.0.0.1:{port}",
                "--clients", str(clients), "--seconds", str(seconds), "--json", str(out),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(ROOT))
            text, _ = await proc.communicate()
            results = json.loads(out.read_text()) if out.exists() else []
    finally:
        await runner.cleanup()
    m = server.metrics
    ms, sizes = np.array(m.step_ms), list(m.batch_sizes)
    slow = sorted(range(len(ms)), key=lambda i: ms[i])[-3:][::-1]
    return {"compiled": compiled, "opus_complexity": complexity, "clients": clients, "seconds": seconds,
            "wall_s": round(time.perf_counter() - t0, 1), "steps": m.steps, "misses": m.misses,
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1), "slowest": [(i, round(float(ms[i]), 1), sizes[i]) for i in slow],
            "underrun_frames": m.in_underrun_frames, "client_rc": proc.returncode,
            "continuous": sum(1 for r in results if r["error"] is None
                              and r["samples"] >= (r["frames_sent"] - 8) * 1920),
            "max_gap_ms": round(max((r["max_gap_s"] for r in results), default=0) * 1e3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny",
                    help='"tiny" (default), a repo id, a model directory, random:personaplex or random:tiny')
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--variants", default="compiled:5,eager:10",
                    help="comma list of compiled|eager:complexity (default compiled:5,eager:10)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    from bench.duplex import load
    model = load(args.model, args.quantize, args.device)
    if args.model.startswith("random:"):
        model = _AnyVoice(model)
    print(f"model={args.model} device={args.device} cores={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.2f} date={time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    rows = []
    try:
        for v in args.variants.split(","):
            mode, _, cx = v.partition(":")
            row = asyncio.run(_variant(model, args.clients, args.seconds, mode == "compiled", int(cx or 5)))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        model.close()
    for r in rows:
        print(f"{'compiled' if r['compiled'] else 'eager':8s} opus {r['opus_complexity']:2d}: {r['steps']} steps, "
              f"{r['misses']} misses, step p50 {r['p50_ms']} p99 {r['p99_ms']} max {r['max_ms']} ms, "
              f"{r['continuous']}/{r['clients']} clients continuous")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
