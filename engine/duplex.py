"""`python -m engine.duplex`: a live full-duplex conversation (or the same loop driven by files).

Examples:
    python -m engine.duplex --in-wav examples/hello.wav --out-wav reply.wav     # the tiny model, no devices
    python -m engine.duplex --model nvidia/personaplex-7b-v1 --quantize 8 --voice NATF2
    python -m engine.duplex --list-devices
    python -m engine.duplex --turn-based --in-wav examples/hello.wav --out-wav turns.wav

The model is `tiny` unless --model says otherwise: random weights, so it babbles (see --model).

Output: the agent's words as lines (`agent: ...`, wrapped at 80 columns) on stdout, and with --asr
what the user said, one `  you: ...` line per utterance (cut where the VAD hears a pause). On a terminal
the health line is the status line below them; piped or redirected, a health line `-- ...` is
printed every 5 s instead. It reads: audio time | step time p50/p99 | mic and speaker buffer fill
| the counters that are not zero: miss (deadline misses), underrun (samples of silence played),
overflow (mic samples lost), drop (input frames dropped by the deadline policy), restart (audio
device streams that died on a host API error and were reopened). A summary follows
on stderr when the run ends (Ctrl-C, --seconds, or the end of --in-wav).

Input files may have any sample rate and channel count: they are downmixed and resampled to
24 kHz mono, and the conversion is printed.

Exit status: 0 done; 1 --list-devices found no audio device; 2 error (bad input, unknown
device or voice, model not found), with a message saying what to do.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from .cli import add_asr_arg, add_model_args, check_output_file, device_arg, note_if_tiny
from .errors import EngineError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.duplex", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--voice", default="NATF2", help="voice preset (see --list-voices) or a .wav/.pt path "
                   "(default: NATF2)")
    p.add_argument("--prompt", default=None, help="system prompt text (default: the assistant + focused preset)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--list-devices", action="store_true",
                   help="list audio devices and exit (exit status 1 and how to get one when there is none)")
    p.add_argument("--list-voices", action="store_true", help="list voices and exit")
    p.add_argument("--input-device", default=None, help="input device index or name (default: system default)")
    p.add_argument("--output-device", default=None, help="output device index or name")
    p.add_argument("--no-aec", action="store_true", help="disable Speex echo cancellation")
    p.add_argument("--in-wav", default=None,
                   help="drive the loop from a wav file (any rate and channel count) instead of the microphone")
    p.add_argument("--out-wav", default=None, help="write the agent's audio to a wav file instead of the speaker")
    p.add_argument("--fast", action="store_true", help="with --in-wav: run as fast as possible, not in real time")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds of audio")
    p.add_argument("--deadline-policy", default="catch_up", choices=["catch_up", "drop"])
    p.add_argument("--rt-priority", action="store_true",
                   help="run the model loop's thread at real-time priority (Linux SCHED_FIFO where allowed, "
                        "else a lower nice value; the summary says which)")
    p.add_argument("--turn-based", action="store_true", help="VAD endpointing, then a spoken reply, then listen again")
    p.add_argument("--silence-ms", type=float, default=1500, help="turn-based: silence that ends a turn (ms)")
    p.add_argument("--max-steps", type=int, default=75, help="turn-based: reply length in 80 ms steps (50..500)")
    p.add_argument("--quiet", action="store_true", help="no health line")
    add_asr_arg(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list_devices:
            from .audio.io import format_devices, list_devices
            devices = list_devices()
            print(format_devices(devices), file=sys.stdout if devices else sys.stderr)
            return 0 if devices else 1
        from .api import PersonaPlex
        check_output_file(args.out_wav, "--out-wav")
        note_if_tiny(args)
        t0 = time.perf_counter()
        model = PersonaPlex.load(args.model, quantize=args.quantize, model_dir=args.model_dir, asr=args.asr)
        print(f"[loaded {model.files.source}{f' and the recognizer {args.asr}' if args.asr else ''} in "
              f"{time.perf_counter() - t0:.1f} s]", file=sys.stderr)
        if args.list_voices:
            print("\n".join(model.list_voices()))
            return 0
        if args.turn_based:
            return _turn_based(model, args)
        return _live(model, args)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _live(model, args) -> int:
    from .display import Transcript

    source = args.in_wav if args.in_wav else "device"
    sink = args.out_wav if args.out_wav else "device"
    max_frames = None if args.seconds is None else int(args.seconds * 12.5)
    aec = False if args.no_aec else None
    session = model.session(source=source, sink=sink, voice=args.voice, system_prompt=args.prompt,
                            seed=args.seed, aec=aec, deadline_policy=args.deadline_policy,
                            realtime=not args.fast, input_device=device_arg(args.input_device),
                            output_device=device_arg(args.output_device), max_frames=max_frames,
                            thread_priority=args.rt_priority)
    if session.input_info:
        print(f"[input: {session.input_info}]", file=sys.stderr)
    stop = threading.Event()
    prev = signal.signal(signal.SIGINT, lambda *_: stop.set())
    session.start()
    print("[live: speak; Ctrl-C stops]" if source == "device" else f"[running {source}]", file=sys.stderr)
    view = Transcript(sys.stdout)
    every = 0.5 if view.tty else 1.0          # the view prints a health line every 5 s when not a terminal
    last_health = 0.0
    try:
        while session.running and not stop.is_set():
            _show_text(session, view)
            now = time.monotonic()
            if args.quiet:
                view.tick()
            elif now - last_health >= every:
                last_health = now
                st = session.stats()
                if st.frames:
                    view.health(f"{st.frames * 0.08:.0f} s | {st.health_line()}")
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, prev)
        stats = session.stop()
        _show_text(session, view)
        view.close()
    if session.error is not None:
        raise session.error
    print("--- summary ---", file=sys.stderr)
    print(f"frames {stats.frames} ({stats.frames * 0.08:.1f} s) | {stats.health_line()}", file=sys.stderr)
    print(f"samples in {stats.samples_in}, out {stats.samples_out}, late frames {stats.late_frames}, "
          f"drift-skipped {stats.drift_skipped_frames}, AEC {'on' if stats.aec else 'off'}", file=sys.stderr)
    if args.rt_priority:
        print(f"loop thread priority: {stats.thread_priority}", file=sys.stderr)
    if model.asr is not None:
        print(f"user transcript: {stats.user_utterances} utterances, {len(session.user_transcript)} transcribed, "
              f"{stats.asr_dropped} dropped (recognizer behind), {stats.asr_failed} failed", file=sys.stderr)
    if args.out_wav:
        print(f"wrote {args.out_wav}", file=sys.stderr)
    return 0


def _show_text(session, view) -> None:
    import queue
    while True:
        try:
            ev = session._events.get_nowait()
        except queue.Empty:
            return
        if ev.kind == "text":
            view.text(ev.value)
        elif ev.kind == "user_text":
            view.text(ev.value + "\n", speaker="you")     # one line per utterance


def _user_turn(model, user):
    """Start recognizing a turn-based user turn (returns a job id, None without --asr)."""
    return None if model.asr is None else model.asr.submit(user)


def _show_user_turn(model, job, view, timeout: float = 0.0):
    """Show the turn's `you:` line once its transcript is back; returns the job if not yet."""
    if job is None:
        return None
    tr = model.asr.result(job, timeout)
    if tr is None:
        return job
    if tr.error is None:
        view.text(tr.text + "\n", speaker="you")
    return None


def _turn_based(model, args) -> int:
    """Listen until the VAD says the turn ended, answer with respond_stream, listen again."""
    import numpy as np

    from .audio.vad import Endpointer

    if args.in_wav is None:
        return _turn_based_device(model, args)
    from .audio.wav import load_audio, write_wav
    from .display import Transcript
    audio, info = load_audio(args.in_wav)
    print(f"[input: {info}]", file=sys.stderr)
    ep = Endpointer(silence_ms=args.silence_ms)
    out, start, block = [], None, 480
    turns = 0
    for i in range(0, len(audio) + 24000 * 2, block):
        chunk = audio[i:i + block] if i < len(audio) else np.zeros(block, np.float32)
        if len(chunk) < block:
            chunk = np.concatenate([chunk, np.zeros(block - len(chunk), np.float32)])
        for ev in ep.feed(chunk):
            if ev.kind == "start":
                start = ev.sample
            elif ev.kind == "end" and start is not None:
                turns += 1
                user = audio[start:ev.sample]
                print(f"[turn {turns}: {len(user) / 24000:.1f} s of speech]", file=sys.stderr)
                view = Transcript(sys.stdout)
                job = _user_turn(model, user)
                for c in model.respond_stream(user, voice=args.voice, system_prompt=args.prompt,
                                              max_steps=args.max_steps, seed=args.seed):
                    out.append(c.samples)
                    job = _show_user_turn(model, job, view)
                    view.text(c.text)
                _show_user_turn(model, job, view, timeout=60.0)
                view.close()
                start = None
    if turns == 0:
        print("no speech turn detected in the input (webrtcvad found no speech followed by "
              f"{args.silence_ms:.0f} ms of silence)", file=sys.stderr)
    if args.out_wav:
        write_wav(args.out_wav, np.concatenate(out) if out else np.zeros(0, np.float32))
        print(f"wrote {args.out_wav} ({turns} turns)", file=sys.stderr)
    return 0


def _turn_based_device(model, args) -> int:
    import numpy as np

    from .audio.io import open_duplex
    from .audio.ring import RingBuffer
    from .audio.vad import Endpointer
    from .display import Transcript

    cap, play = RingBuffer(1 << 16), RingBuffer(1 << 16)
    stream = open_duplex(cap, play, input_device=device_arg(args.input_device),
                         output_device=device_arg(args.output_device))
    ep = Endpointer(silence_ms=args.silence_ms)
    stop = threading.Event()
    prev = signal.signal(signal.SIGINT, lambda *_: stop.set())
    heard: list = []
    stream.start()
    print("[turn-based: speak, pause 1.5 s, listen; Ctrl-C stops]", file=sys.stderr)
    try:
        while not stop.is_set():
            if cap.available_read < 480:
                time.sleep(0.01)
                continue
            block = cap.read(480)
            heard.append(block)
            for ev in ep.feed(block):
                if ev.kind == "end":
                    user = np.concatenate(heard)
                    heard.clear()
                    view = Transcript(sys.stdout)
                    job = _user_turn(model, user)
                    for c in model.respond_stream(user, voice=args.voice, system_prompt=args.prompt,
                                                  max_steps=args.max_steps, seed=args.seed):
                        while play.available_write < len(c.samples) and not stop.is_set():
                            time.sleep(0.01)
                        play.write(c.samples)
                        job = _show_user_turn(model, job, view)
                        view.text(c.text)
                    _show_user_turn(model, job, view, timeout=60.0)
                    view.close()
                    while play.available_read > 0 and not stop.is_set():
                        time.sleep(0.02)
                    cap.clear()
                    ep.reset()
            if len(heard) > 24000 * 30 // 480:
                heard = heard[-(24000 * 30 // 480):]
    finally:
        signal.signal(signal.SIGINT, prev)
        stream.stop()
        stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
