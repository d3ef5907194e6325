"""`python -m engine.respond in.wav -o out.wav`: one turn-based reply, with transcript and timing.

    python -m engine.respond examples/hello.wav -o reply.wav --voice NATF2 --max-steps 75
    python -m engine.respond question.wav -o answer.wav --model nvidia/personaplex-7b-v1 --voice NATM1
    python -m engine.respond --list-voices

The model is `tiny` unless --model says otherwise: random weights, so it babbles (see --model).
The input may have any sample rate and channel count: it is downmixed and resampled to 24 kHz
mono, and the conversion is printed. The transcript goes to stdout, everything else to stderr.
With --asr a line `you: ...` (what the user said, recognized while the model answers) comes first;
with --stream it follows the streamed reply.
Exit status: 0 done, 2 error (with a message saying what to do).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .cli import add_asr_arg, add_model_args, check_output_file, note_if_tiny
from .errors import EngineError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.respond", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help="the user's audio (wav, any rate/channels)")
    p.add_argument("-o", "--output", default=None, help="write the agent's reply here (24 kHz wav)")
    add_model_args(p)
    p.add_argument("--voice", default="NATM0", help="voice preset (see --list-voices) or a .wav/.pt path "
                   "(default: NATM0)")
    p.add_argument("--prompt", default=None, help="system prompt (default: assistant + focused)")
    p.add_argument("--max-steps", type=int, default=75, help="reply length in 80 ms steps (50..500)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="use respond_stream and print text as it comes")
    p.add_argument("--diagnostic", action="store_true", help="print per-stage timings and entropies (JSON)")
    p.add_argument("--list-voices", action="store_true", help="list the voices and exit")
    add_asr_arg(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .api import PersonaPlex
        check_output_file(args.output, "--output")
        note_if_tiny(args)
        t0 = time.perf_counter()
        model = PersonaPlex.load(args.model, quantize=args.quantize, model_dir=args.model_dir, asr=args.asr)
        load_s = time.perf_counter() - t0
        if args.list_voices:
            print("\n".join(model.list_voices()))
            return 0
        if not args.input:
            print("error: give an input wav (or --list-voices)", file=sys.stderr)
            return 2
        from .audio.wav import load_audio
        user, info = load_audio(args.input)
        print(f"[input: {info}]", file=sys.stderr)
        t1 = time.perf_counter()
        kw = dict(voice=args.voice, system_prompt=args.prompt, max_steps=args.max_steps, seed=args.seed)
        diag, user_text = None, None
        if args.stream:
            import numpy as np
            chunks, first = [], None
            job = model.asr.submit(user) if model.asr is not None else None   # recognized meanwhile
            for c in model.respond_stream(user, **kw):
                if first is None:
                    first = time.perf_counter() - t1
                chunks.append(c)
                sys.stdout.write(c.text)
                sys.stdout.flush()
            print()
            audio = np.concatenate([c.samples for c in chunks])
            text = "".join(c.text for c in chunks)
            print(f"[first chunk after {first * 1e3:.0f} ms]", file=sys.stderr)
            if job is not None:
                tr = model.asr.result(job, 120.0)
                user_text = tr.text if tr is not None and tr.error is None else None
        elif args.diagnostic:
            resp, diag = model.respond_diagnostic(user, **kw)
            audio, text, user_text = resp.audio, resp.text, resp.user_text
        else:
            resp = model.respond(user, **kw)
            audio, text, user_text = resp.audio, resp.text, resp.user_text
        took = time.perf_counter() - t1
        if user_text is not None and not args.stream:
            print(f"you: {user_text}")
        if not args.stream:
            print(text)
        elif user_text is not None:
            print(f"you: {user_text}")
        secs = len(audio) / 24000
        print(f"[load {load_s:.1f} s | reply {secs:.1f} s of audio in {took:.2f} s | RTF {took / max(secs, 1e-9):.2f}]",
              file=sys.stderr)
        if diag is not None:
            print(json.dumps(diag.summary(), indent=1))
        if args.output:
            from .audio.wav import write_wav
            write_wav(args.output, audio)
            print(f"wrote {args.output}", file=sys.stderr)
        return 0
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
