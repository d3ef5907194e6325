"""Streaming playback: the reply starts playing after its first 80 ms frame is decoded.

    python examples/stream_playback.py examples/hello.wav            # needs an output device
    python examples/stream_playback.py examples/hello.wav --no-device --out reply.wav

Chunks from respond_stream() go into the engine's lock-free playback ring; the PortAudio callback
copies them out (silence, counted as underrun, if the model falls behind).
"""
import argparse
import time

import numpy as np

import engine
from engine.audio.ring import RingBuffer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("input")
    p.add_argument("--model", default="tiny")
    p.add_argument("--voice", default="NATM0")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--no-device", action="store_true", help="don't play; just time the chunks")
    p.add_argument("--out", default=None, help="also write the reply to a wav file")
    args = p.parse_args()

    model = engine.PersonaPlex.load(args.model)
    ring = RingBuffer(1 << 17)
    stream = None
    if not args.no_device:
        from engine.audio.io import open_output
        stream = open_output(ring)
        stream.start()
    t0 = time.perf_counter()
    chunks = []
    for i, chunk in enumerate(model.respond_stream(args.input, voice=args.voice, max_steps=args.max_steps)):
        if i == 0:
            print(f"first audio after {(time.perf_counter() - t0) * 1e3:.0f} ms")
        ring.write(chunk.samples)
        chunks.append(chunk.samples)
        print(chunk.text, end="", flush=True)
    print()
    if stream is not None:
        while ring.available_read:          # let the speaker drain the ring
            time.sleep(0.05)
        stream.stop()
        stream.close()
        print(f"playback underruns: {ring.underrun_count} samples")
    if args.out:
        from engine.audio.wav import write_wav
        write_wav(args.out, np.concatenate(chunks))
    model.close()


if __name__ == "__main__":
    main()
