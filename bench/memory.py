"""Memory of the batched server's state, part by part: what one more session costs on the device.

    PYTHONPATH=. python bench/memory.py                                          # tiny model, CPU
    PYTHONPATH=. python bench/memory.py --device gpu --config personaplex --rows 4 --fused depformer

Random weights at the config's shapes (bench/serve.py's BenchModel), the server's code path
(`BatchEngine`, compiled). Prints one JSON line of MLX active memory (GB) over the loaded weights
after each phase: the prompted state the PromptCache keeps (one per voice and prompt, shared),
the engine (the fused kernels' packed weights, once per model), the KV rows of `--rows` sessions,
their joins, live steps and full-ring steps; plus the arrays' own sizes (KV, batched Mimi state)
and `per_session_gb`, the state one more session adds.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: F401,E402  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
from serve import BenchModel  # noqa: E402

from engine.models.gen import SamplingParams  # noqa: E402
from engine.server.batch import FUSED_CHOICES, BatchEngine, SlotParams, fused_choice  # noqa: E402
from engine.worker import ModelWorker  # noqa: E402


def measure(model, rows: int, fused: str, kv_dtype: str = "model") -> dict:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()

    def now():
        gc.collect()
        return round((mx.get_active_memory() - base) / 1e9, 4)

    r = {"rows": rows, "fused": fused, "kv": kv_dtype}
    st = model.prompts.state(None, None, 0, warm=False)
    mx.eval(st.cache.arrays())
    r["prompt_state_gb"] = now()
    del st
    f, parts = fused_choice(fused)
    be = BatchEngine(model, compiled=True, capacity=rows, fused=f, fused_parts=parts, kv_dtype=kv_dtype)
    r["engine_gb"] = now()
    be.reserve()
    r["reserved_gb"] = now()
    for i in range(rows):
        be.join(i, model.prompts.state(None, None, i, warm=False), SlotParams(SamplingParams(), i))
    r["joined_gb"] = now()
    frames = np.zeros((rows, be.mimi.frame_size), np.float32)
    for _ in range(3):
        be.step(frames)
    r["stepped_gb"] = now()
    be.set_offsets(2 * model.lm.config.context + np.arange(rows) * 7)
    for _ in range(3):
        be.step(frames)
    r["full_ring_gb"] = now()
    r["peak_gb"] = round((mx.get_peak_memory() - base) / 1e9, 4)
    kv = sum(a.nbytes for a in be.cache.keys + be.cache.values) / 1e9
    mimi = sum(a.nbytes for a in be.enc + be.dec) / 1e9
    small = sum(a.nbytes for a in (be.cache.pos, be.cache.offset, be.state.tokens, be.state.key)) / 1e9
    r.update(kv_gb=round(kv, 4), mimi_gb=round(mimi, 4), rings_gb=round(small, 6),
             per_session_gb=round((kv + mimi + small) / rows, 4))
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--config", choices=["tiny", "personaplex"], default="tiny")
    ap.add_argument("--quantize", default=None, help="4, 8 or none (default: 4 for personaplex, none for tiny)")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--fused", default="off", choices=FUSED_CHOICES)
    ap.add_argument("--kv", default="model", choices=("model", "fp8"), dest="kv_dtype",
                    help="the sessions' KV rings: the model's dtype or fp8 e4m3 (engine.serve --kv)")
    args = ap.parse_args()
    quant = args.quantize or ("4" if args.config == "personaplex" else None)
    quant = int(quant) if quant and quant.isdigit() else (None if quant == "none" else quant)
    dtype = mx.bfloat16 if args.config == "personaplex" else mx.float32
    worker = ModelWorker()
    try:
        def run():
            mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
            model = BenchModel(args.config, dtype, quant, 60, worker)
            model.lm.compile()
            return measure(model, args.rows, args.fused, args.kv_dtype)
        print(json.dumps(worker.call(run)), flush=True)
    finally:
        worker.shutdown()


if __name__ == "__main__":
    main()
