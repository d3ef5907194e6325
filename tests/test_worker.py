"""ModelWorker: the one thread that runs every MLX call."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.worker import ModelWorker, WorkerClosed

ROOT = Path(__file__).resolve().parents[1]


def test_calls_run_in_order_on_one_thread():
    w = ModelWorker()
    seen = []
    futs = [w.submit(lambda i=i: seen.append((i, threading.get_ident()))) for i in range(50)]
    for f in futs:
        f.result()
    assert [i for i, _ in seen] == list(range(50))
    assert {t for _, t in seen} == {w.thread.ident}
    assert w.call(lambda: w.on_worker()) is True and not w.on_worker()
    w.shutdown()


def test_exceptions_reach_the_caller_and_worker_survives():
    w = ModelWorker()
    with pytest.raises(ZeroDivisionError):
        w.call(lambda: 1 / 0)
    assert w.call(lambda: 41 + 1) == 42
    # nested submission from the worker runs inline instead of deadlocking
    assert w.call(lambda: w.call(lambda: "inner")) == "inner"
    w.shutdown()
    with pytest.raises(WorkerClosed):
        w.submit(lambda: None)


def test_stream_and_astream():
    w = ModelWorker()

    def gen(n):
        assert w.on_worker()
        for i in range(n):
            yield i
        raise ValueError("end of stream error")

    it = w.stream(gen, 3)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="end of stream"):
        next(it)

    async def consume():
        out = []
        async for x in w.astream(lambda: iter(range(5))):
            out.append(x)
        return out, await w.acall(lambda: "ok")

    assert asyncio.run(consume()) == ([0, 1, 2, 3, 4], "ok")
    w.shutdown()


def test_load_use_close_exits_cleanly():
    """Regression: closing a model used to end the MLX thread, and mlx 0.32.4 then aborted the
    process at exit ("terminate called without an active exception")."""
    code = ("import engine, numpy as np\n"
            "m = engine.PersonaPlex.load('tiny', progress=False)\n"
            "m.respond(np.zeros(4800, np.float32), max_steps=50, seed=0)\n"
            "m.close()\nprint('closed')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "closed" in r.stdout and "terminate called" not in r.stderr


def test_abandoned_bounded_stream_does_not_block_the_worker():
    w = ModelWorker()

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    it = w.stream(endless, maxsize=2)
    assert next(it) == 0
    it.close()                                   # consumer walks away with the queue full
    assert w.submit(lambda: "still alive").result(timeout=5) == "still alive"
    w.shutdown()
