"""Ogg/Opus coding cost per 80 ms frame, and how much of it holds the GIL: ours (libopus via cffi)
vs sphn (the reference server's package).

    PYTHONPATH=. python bench/opus.py [--frames 250]

1. encode / decode time per 1920-sample frame of a synthetic voice (median), and the bitrate;
2. GIL: a pure-Python counting loop runs on the main thread while --threads encoder threads
   (default 1) encode --frames frames each; its count is compared with its count for the same
   time alone. 100 % = the encoders never held the GIL; a coder that holds the GIL while it
   encodes stops the counter for that long (the server's step loop is that counter: its thread
   needs the GIL to queue MLX work while the asyncio thread encodes every session's frame).
   With more encoder threads than free cores the counter also loses CPU time, GIL or not.
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from engine.audio.opus import OggOpusReader, OggOpusWriter, opus_version
from engine.server.client import speechlike

FRAME = 1920


def _writers(kind: str, complexity: int):
    if kind == "sphn":
        import sphn
        return lambda: sphn.OpusStreamWriter(24000)
    return lambda: OggOpusWriter(24000, complexity=complexity)


def _reader(kind: str):
    if kind == "sphn":
        import sphn
        return sphn.OpusStreamReader(24000)
    return OggOpusReader(24000)


def cost(kind: str, complexity: int, x: np.ndarray) -> dict:
    w = _writers(kind, complexity)()
    frames = [x[i:i + FRAME] for i in range(0, len(x) - FRAME + 1, FRAME)]
    te, data = [], []
    for f in frames:
        t0 = time.perf_counter()
        data.append(w.append_pcm(f))
        te.append(time.perf_counter() - t0)
    r, td = _reader(kind), []
    for d in data:
        t0 = time.perf_counter()
        r.append_bytes(d)
        td.append(time.perf_counter() - t0)
    kbps = sum(map(len, data[1:])) * 8 / ((len(data) - 1) * FRAME / 24000) / 1000
    return {"encode_ms": float(np.median(te)) * 1e3, "decode_ms": float(np.median(td)) * 1e3, "kbps": kbps}


def _spin(done: threading.Event) -> int:
    n = 0
    while not done.is_set():
        n += 1
    return n


def gil_share(kind: str, complexity: int, x: np.ndarray, threads: int, frames: int) -> dict:
    """Main-thread spin count while `threads` encoders run, over the count for the same time alone."""
    frame = x[:FRAME]
    make = _writers(kind, complexity)

    def work():
        w = make()
        for _ in range(frames):
            w.append_pcm(frame)

    done = threading.Event()
    ts = [threading.Thread(target=work) for _ in range(threads)]

    def finish():
        for t in ts:
            t.join()
        done.set()

    t0 = time.perf_counter()
    for t in ts:
        t.start()
    threading.Thread(target=finish).start()
    busy = _spin(done)
    wall = time.perf_counter() - t0
    alone_done = threading.Event()
    threading.Timer(wall, alone_done.set).start()
    alone = _spin(alone_done)
    return {"encode_wall_s": wall, "counter_share": busy / max(alone, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=500, help="frames per encoder thread in the GIL test")
    ap.add_argument("--threads", type=int, default=1, help="encoder threads in the GIL test")
    args = ap.parse_args()
    x = speechlike(20.0, 0)
    print(f"{opus_version()}, 24 kHz mono, 80 ms frames of a synthetic voice", flush=True)
    variants = [("sphn", 10), ("ours", 10), ("ours", 5)]
    try:
        import sphn  # noqa: F401
    except ImportError:
        variants = variants[1:]
        print("(sphn not installed: ours only)")
    print(f"{'coder':12s} {'encode ms':>9s} {'decode ms':>9s} {'kbit/s':>7s} {'counter share':>14s}")
    for kind, cx in variants:
        c = cost(kind, cx, x)
        g = gil_share(kind, cx, x, args.threads, args.frames)
        label = "sphn" if kind == "sphn" else f"ours cx {cx}"
        print(f"{label:12s} {c['encode_ms']:9.3f} {c['decode_ms']:9.3f} {c['kbps']:7.1f} "
              f"{100 * g['counter_share']:13.0f}%  ({args.threads} threads x {args.frames} frames: "
              f"{g['encode_wall_s']:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
