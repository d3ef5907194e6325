"""Turn-based conversation from files: one reply per input wav.

    python examples/turn_based.py examples/hello.wav                 # tiny model (babbles)
    python examples/turn_based.py q1.wav q2.wav --model nvidia/personaplex-7b-v1 --quantize 8

Each reply is written next to the input as <name>.reply.wav; the transcript and timing are printed.
The prompt state (voice + system prompt) is computed once and reused for every turn.
"""
import argparse
import time
from pathlib import Path

import engine
from engine.audio.wav import write_wav


def main():
    p = argparse.ArgumentParser()
    p.add_argument("inputs", nargs="+")
    p.add_argument("--model", default="tiny")
    p.add_argument("--quantize", default=None)
    p.add_argument("--voice", default="NATF2")
    p.add_argument("--prompt", default="assistant+focused")
    p.add_argument("--max-steps", type=int, default=75)
    args = p.parse_args()

    model = engine.PersonaPlex.load(args.model, quantize=args.quantize)
    for path in args.inputs:
        t0 = time.perf_counter()
        reply = model.respond(path, voice=args.voice, system_prompt=args.prompt, max_steps=args.max_steps)
        out = Path(path).with_suffix(".reply.wav")
        write_wav(out, reply.audio, reply.sample_rate)
        print(f"{path}: {reply.text!r}  ({reply.duration:.1f} s of audio in {time.perf_counter() - t0:.1f} s) -> {out}")
    model.close()


if __name__ == "__main__":
    main()
