"""Does the user transcript (--asr) delay the live loop? Step times with and without it, same run.

Runs real-time DuplexSessions (wall-clock paced source, in-memory sink) of the tiny model on the
same input, alternating: without a recognizer, with one, without, with ... (so a change of machine
load hits both sides alike), and reports per side the step p50/p99/max, the deadline misses, and
for the recognizer the utterances, transcripts, drops, its own time per utterance and the latency
from the end of an utterance to its text, and what the loop itself pays for it per step (the
cutter's VAD, handing utterances over, polling for transcripts: `loop_asr_*_ms`, inside the step).

The recognizer is "tiny" (random, small) or, by default, `random:0.6b`: Qwen3-ASR-0.6B's real
shapes with random weights (built once into the cache by engine.tiny_asr), so its process does the
work the released model does (random weights never emit end-of-text: each utterance decodes
`--max-new-tokens` tokens, about what a 3-4 s utterance needs).

    python bench/asr.py                                   # 4 x 30 s, the 0.6B-shaped recognizer
    python bench/asr.py --asr-model tiny --rounds 2 --seconds 20
    python bench/asr.py --asr-model DIR_OR_REPO --json out.jsonl

Input: examples/hello.wav (11 s of speech) and silences, repeated.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import engine  # noqa: E402  (OpenBLAS before mlx)
from engine.session import FRAME, SAMPLE_RATE  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def conversation(seconds: float) -> np.ndarray:
    """hello.wav cut into ~2-4 s phrases at its pauses by nothing cleverer than fixed pieces,
    each followed by 1.5 s of silence, repeated to `seconds`."""
    from engine.audio.wav import load_audio

    speech, _ = load_audio(os.path.join(ROOT, "examples", "hello.wav"))
    pieces, i, rng = [], 0, np.random.default_rng(0)
    while sum(p.size for p in pieces) < seconds * SAMPLE_RATE:
        n = int(rng.uniform(2.0, 4.0) * SAMPLE_RATE)
        if i + n > speech.size:
            i = 0
        pieces += [speech[i:i + n], np.zeros(int(1.5 * SAMPLE_RATE), np.float32)]
        i += n
    x = np.concatenate(pieces)[: int(seconds * SAMPLE_RATE)]
    return x + np.random.default_rng(1).standard_normal(x.size).astype(np.float32) * 1e-4


def asr_model_dir(name: str) -> str:
    if name != "random:0.6b":
        return name
    from engine.tiny import build_once, read_build_id
    from engine.tiny_asr import QWEN3_ASR_0_6B, build_asr_dir, tiny_asr_dir

    d = tiny_asr_dir().parent / "random-qwen3-asr-0.6b"
    build_once(d, "0.6b-v1", lambda out: build_asr_dir(out, QWEN3_ASR_0_6B, seed=1),
               lambda p: read_build_id(p) == "0.6b-v1" and (p / "model.safetensors").is_file())
    return str(d)


def run_once(model, audio, rec) -> dict:
    s = model.session(source=audio, sink=None, realtime=True, asr=rec if rec is not None else False,
                      record_steps=True, seed=1, asr_drain_s=30.0)
    feed_ms = []                  # what the loop pays per step: VAD, hand-over, polling
    if rec is not None:
        inner = s._asr_feed

        def timed(utterances, frame, drain=False):
            t = time.perf_counter()
            inner(utterances, frame, drain)
            if not drain:
                feed_ms.append((time.perf_counter() - t) * 1e3)
        s._asr_feed = timed
    s.start()
    s.wait()
    st = s.stats()
    steps = np.array(s.step_log)
    row = {"asr": rec is not None, "frames": st.frames, "step_p50_ms": float(np.percentile(steps, 50)),
           "step_p99_ms": float(np.percentile(steps, 99)), "step_max_ms": float(steps.max()),
           "misses": st.deadline_misses, "late_frames": st.late_frames}
    if rec is not None:
        tr = s.user_transcript
        f = np.array(feed_ms) if feed_ms else np.zeros(1)
        row.update(loop_asr_p50_ms=float(np.percentile(f, 50)), loop_asr_p99_ms=float(np.percentile(f, 99)),
                   loop_asr_max_ms=float(f.max()))
        row.update(utterances=st.user_utterances, transcripts=len(tr), dropped=st.asr_dropped,
                   failed=st.asr_failed,
                   recognize_p50_s=float(np.median([t.recognize_s for t in tr])) if tr else None,
                   recognize_max_s=float(max(t.recognize_s for t in tr)) if tr else None,
                   latency_p50_s=float(np.median([t.latency_s for t in tr])) if tr else None,
                   latency_max_s=float(max(t.latency_s for t in tr)) if tr else None,
                   audio_p50_s=float(np.median([t.end_s - t.start_s for t in tr])) if tr else None)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asr-model", default="random:0.6b", help="random:0.6b | tiny | a directory | a repo id")
    p.add_argument("--rounds", type=int, default=2, help="pairs of sessions (without, with)")
    p.add_argument("--seconds", type=float, default=30.0, help="audio per session")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=None, help="BLAS threads of the recognizer process")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--json", default=None, help="append the rows to this JSONL file")
    args = p.parse_args(argv)

    from engine.asr import Recognizer

    model = engine.PersonaPlex.load("tiny", progress=False)
    t0 = time.perf_counter()
    rec = Recognizer(asr_model_dir(args.asr_model), max_new_tokens=args.max_new_tokens, threads=args.threads,
                     nice=args.nice, progress=False)
    print(f"[recognizer {args.asr_model} ready in {time.perf_counter() - t0:.1f} s: {rec.info}]", file=sys.stderr)
    audio = conversation(args.seconds)
    rows = []
    try:
        for r in range(args.rounds):
            for use in (False, True):
                row = run_once(model, audio, rec if use else None)
                if use:       # the next session starts with an idle recognizer
                    row["idle_wait_s"] = -time.perf_counter()
                    rec.wait_idle(600)
                    row["idle_wait_s"] += time.perf_counter()
                row.update(round=r, asr_model=args.asr_model, machine=platform.machine(), cpus=os.cpu_count(),
                           max_new_tokens=args.max_new_tokens, load_avg=os.getloadavg()[0])
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        rec.close()
        model.close()
    for use in (False, True):
        side = [r for r in rows if r["asr"] == use]
        steps = [r["step_p99_ms"] for r in side]
        print(f"{'with' if use else 'without'} asr: step p99 per session {', '.join(f'{v:.1f}' for v in steps)} ms; "
              f"misses {sum(r['misses'] for r in side)} in {sum(r['frames'] for r in side)} steps", file=sys.stderr)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
