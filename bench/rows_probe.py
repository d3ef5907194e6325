"""The batched depformer kernel at full size: build time, one launch per batch size, barrier errors.

    PYTHONPATH=. python bench/rows_probe.py --device gpu --config personaplex --quantize 4
Prints as it goes (and dumps every thread's stack if a stage hangs for --hang-s seconds).
"""
from __future__ import annotations

import argparse
import faulthandler
import sys
import time

import numpy as np

import engine  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from bench.serve import BenchModel
from engine.models.fused import FusedLM
from engine.models.gen import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    ap.add_argument("--config", choices=["tiny", "personaplex"], default="personaplex")
    ap.add_argument("--quantize", default="4")
    ap.add_argument("--sizes", default="1,8,16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--hang-s", type=float, default=120)
    args = ap.parse_args()
    faulthandler.dump_traceback_later(args.hang_s, repeat=True, file=sys.stderr)
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = mx.float32 if args.config == "tiny" else mx.bfloat16
    t0 = time.perf_counter()
    model = BenchModel(args.config, dtype, int(args.quantize) if args.quantize else None, 20, None)
    f = model.gen.fused_engine()
    print(f"load {time.perf_counter() - t0:.1f} s, fused: {f is not None}", flush=True)
    if f is None:
        print("no fused engine:", FusedLM.unsupported(model.lm))
        return
    c = model.lm.config
    n = 8
    t0 = time.perf_counter()
    nt, nb = f.prepare_rows(n)
    print(f"launch shape: {nt} threads x {nb} vectors per chunk, smem {4 * f._rows_smem_floats(nb)} bytes, "
          f"{f.blocks} blocks; prepared in {time.perf_counter() - t0:.1f} s", flush=True)
    sp = SamplingParams()
    for b in [int(x) for x in args.sizes.split(",")]:
        h = mx.random.normal((b, c.dim))
        args_ = (h, mx.zeros((b,), mx.int32), mx.full((b, n), -1, mx.int32), mx.full((b,), sp.temp_audio),
                 mx.full((b,), sp.top_k_audio, mx.int32), mx.random.gumbel((b, n, c.card)), n)
        mx.eval(args_[:-1])
        ts = []
        for r in range(args.reps):
            t = time.perf_counter()
            toks, scr = f.depformer_rows(*args_)
            mx.eval(toks, scr)
            ts.append((time.perf_counter() - t) * 1e3)
            if r == 0:
                print(f"B={b} first call {ts[0]:.1f} ms, barrier error {f.barrier_error(scr)}, "
                      f"tokens {np.array(toks)[0, :4].tolist()}", flush=True)
        print(f"B={b} p50 {np.median(ts[1:]):.2f} ms max {max(ts[1:]):.2f} ms", flush=True)
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
