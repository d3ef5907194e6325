"""Where a session's join into the batch spends its time (GPU diagnosis; see docs/performance.md (Server)).

    PYTHONPATH=. python bench/join_probe.py --device gpu --config personaplex --quantize 4 --capacity 16
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import engine  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from bench.serve import BenchModel
from engine.server.batch import BatchEngine, SlotParams, _concat_rows
from engine.worker import ModelWorker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--config", choices=["tiny", "personaplex"], default="tiny")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--capacity", type=int, default=4)
    args = ap.parse_args()
    worker = ModelWorker("join-probe")

    def ms(t0):
        return round((time.perf_counter() - t0) * 1e3, 2)

    def run():
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
        dtype = mx.float32 if args.config == "tiny" else mx.bfloat16
        q = int(args.quantize) if args.quantize else None
        model = BenchModel(args.config, dtype, q, 60, worker)
        be = BatchEngine(model, compiled=False, capacity=args.capacity)
        be.reserve()
        frames = np.zeros((1, 1920), np.float32)
        for i in range(args.capacity):
            t0 = time.perf_counter()
            st = model.prompts.state(None, None, i, warm=False)
            mx.eval(st.cache.keys, st.cache.values, st.tokens)
            tp = ms(t0)
            t0 = time.perf_counter()
            be.join(i, st, SlotParams())
            tj = ms(t0)
            t0 = time.perf_counter()
            be.step(np.zeros((be.size, 1920), np.float32))
            print({"join": i, "prompted_ms": tp, "join_ms": tj, "step_ms": ms(t0)}, flush=True)
        st = model.prompts.state(None, None, 99, warm=False)
        mx.eval(st.cache.keys, st.cache.values)
        r, L = args.capacity - 1, len(be.cache.keys)
        used = int(st.cache.step)
        for name in ("kv_dynamic_row", "kv_static_row", "kv_dynamic_used_slots", "kv_static_used_slots"):
            for rep in range(3):
                t0 = time.perf_counter()
                at = mx.array([r, 0, 0, 0], mx.int32)
                for i in range(L):
                    for lst, src in ((be.cache.keys, st.cache.keys[i]), (be.cache.values, st.cache.values[i])):
                        if name.endswith("used_slots"):
                            src = src[:, :, :used]
                        if name.startswith("kv_dynamic"):
                            lst[i] = mx.slice_update(lst[i], src, at, axes=(0, 1, 2, 3))
                        else:
                            x = lst[i]
                            x[r:r + 1, :, :src.shape[2]] = src
                            lst[i] = x
                mx.eval(be.cache.keys, be.cache.values)
                print({"part": name, "rep": rep, "ms": ms(t0)}, flush=True)
        enc, dec = be._fresh_mimi_rows(1)
        for rep in range(3):
            t0 = time.perf_counter()
            e2, d2 = _concat_rows(be.enc, enc), _concat_rows(be.dec, dec)
            mx.eval(e2, d2)
            print({"part": "mimi_concat", "rep": rep, "ms": ms(t0)}, flush=True)
        for rep in range(2):
            t0 = time.perf_counter()
            be.leave(be.slots[0])
            print({"part": "leave_first_row", "rep": rep, "ms": ms(t0)}, flush=True)
        del frames

    worker.call(run)
    worker.shutdown()


if __name__ == "__main__":
    main()
