"""`python -m engine.profile`: where each millisecond of the 80 ms step goes, on this machine.

Runs the real DuplexSession loop (engine.session) with its stage timer on and reports, per stage
(capture wait, AEC, Mimi encode, temporal transformer, depformer, Mimi decode, playback push, and
the whole step), p50/p95/p99/max in ms, the real-time factor, deadline misses, model load time,
prompt and warm-up time, and memory (MLX active/peak/cache, process RSS now and peak).

    python -m engine.profile --model tiny --steps 200 --json prof.json --plot prof.png
    python -m engine.profile --model tiny --steps 200 --compare prof.json
    python -m engine.profile --model tiny --device-loopback          # mouth-to-ear on a device pair
    python -m engine.profile --model random:personaplex --quantize 4 --device gpu   # 7B shapes, random

`--model random:personaplex` (and `random:tiny`) is a BENCHMARK model: the real layer shapes with
random weights built in memory (no download, no checkpoint files). It babbles; it exists only to
time the full-size network where the released weights are not at hand.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from .cli import add_model_args
from .errors import AudioDeviceError, ConfigError, EngineError
from .session import FRAME, SAMPLE_RATE, STAGES, StageTimer

SCHEMA_VERSION = 2
FRAME_MS = FRAME / SAMPLE_RATE * 1e3
MODEL_DELAY_FRAMES = 2          # a user frame first affects agent audio two calls later (spec section 4)
RANDOM_PREFIX = "random:"
RANDOM_MODELS = ("personaplex", "tiny")
PERCENTILES = ("p50", "p95", "p99", "max", "mean")

# JSON layout, checked by validate() (tests, --compare): key -> type (dict = nested layout).
SCHEMA = {
    "schema": int, "tool": str, "date": str,
    "machine": {"platform": str, "processor": str, "python": str, "mlx": str, "mlx_device": str,
                "blas": str},
    "model": {"source": str, "quantize": (str, type(None)), "tiny": bool, "benchmark_weights": bool},
    "run": {"steps": int, "warmup_steps": int, "realtime": bool, "aec": bool, "voice": (str, type(None)),
            "input": str},
    "timing": {"load_s": float, "load_total_s": float, "prompt_ms": float, "first_step_ms": float,
               "warmup_ms": float, "warmup_excess_ms": float, "wall_s": float, "frame_ms": float, "rtf": float,
               "rtf_p99": float, "deadline_misses": int, "deadline_miss_rate": float},
    "stages": dict,
    "series": dict,
    "memory": {"mlx_active_mb": float, "mlx_peak_mb": float, "mlx_peak_run_mb": float,
               "mlx_cache_mb": float, "rss_mb": (float, type(None)), "rss_peak_mb": float},
    "instrumentation": {"off_us_per_step": float, "off_fraction_of_step": float},
    "session": dict,
}


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, "Or a benchmark model with random weights built in memory: random:personaplex "
                      "(the 7B shapes) or random:tiny.")
    p.add_argument("--device", default=None, choices=("cpu", "gpu"),
                   help="MLX device (default: MLX's default, the GPU where there is one)")
    p.add_argument("--steps", type=int, default=200, help="timed steps, after the warm-up (>= 1)")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps (compile, caches)")
    p.add_argument("--in-wav", default=None, help="mic input, looped to length (default: synthetic speech)")
    p.add_argument("--realtime", action="store_true",
                   help="pace the input at 12.5 Hz like a device (capture wait becomes real)")
    p.add_argument("--aec", action="store_true", help="include the Speex echo canceller in the loop")
    p.add_argument("--voice", default="NATF2", help="voice preset (the random:personaplex model uses none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-loopback", action="store_true",
                   help="also measure mouth-to-ear latency: a click through a real output->input loop")
    p.add_argument("--input-device", default=None, help="loopback input device (index or name)")
    p.add_argument("--output-device", default=None, help="loopback output device (index or name)")
    p.add_argument("--blocksize", type=int, default=480, help="PortAudio block for the loopback (samples)")
    p.add_argument("--overhead", action="store_true",
                   help="also run the loop 3x with the stage timer off and 3x on (alternating) and "
                        "report what timing costs")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument("--plot", default=None, help="write a PNG plot (needs matplotlib)")
    p.add_argument("--compare", default=None, help="an earlier --json file: print new/old ratios per stage")
    p.add_argument("--from-json", default=None,
                   help="do not run: print/plot/compare an earlier --json result (e.g. from a GPU machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args) -> np.ndarray | None:
    """Validate everything that can be checked before the (slow) model load; returns the input
    audio when --in-wav is given. Raises ConfigError / AudioFormatError / MissingLibraryError."""
    if isinstance(args.steps, bool) or not isinstance(args.steps, int) or args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: must be an integer >= 1")
    if args.warmup < 0:
        raise ConfigError(f"--warmup {args.warmup}: must be >= 0")
    if str(args.model).startswith(RANDOM_PREFIX) and args.model[len(RANDOM_PREFIX):] not in RANDOM_MODELS:
        raise ConfigError(f"--model {args.model}: benchmark models are "
                          + ", ".join(RANDOM_PREFIX + m for m in RANDOM_MODELS))
    if args.plot:
        _import_pyplot()
        _check_writable(args.plot, "--plot")
    if args.json:
        _check_writable(args.json, "--json")
    if args.compare:
        load_result(args.compare)
    if args.from_json:
        load_result(args.from_json, "--from-json")
    if args.device_loopback and not 16 <= args.blocksize <= 16384:
        raise ConfigError(f"--blocksize {args.blocksize}: use 16..16384 samples (480 = 20 ms)")
    if args.in_wav:
        from .audio.wav import load_audio
        audio, _ = load_audio(args.in_wav)
        return audio
    return None


def _check_writable(path: str, flag: str) -> None:
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {parent} does not exist")


def _import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import MissingLibraryError
        raise MissingLibraryError("--plot needs matplotlib: pip install matplotlib "
                                  "(or pip install 'personaplex-engine[plot]')") from None
    return plt


# ----------------------------------------------------------------------------------------------
# Benchmark model: real shapes, random weights (never used outside profiling/benchmarks)
# ----------------------------------------------------------------------------------------------
def load_random_model(name: str = "personaplex", quantize=None, worker=None, seed: int = 0):
    """A `PersonaPlex` with random weights at the shapes of `name` ("personaplex": the 7B LM and the
    released Mimi; "tiny": the tiny model's shapes), built in memory. BENCHMARK ONLY: it babbles.

    "tiny" borrows the generated tiny model's tokenizer and voices. "personaplex" needs no files and
    no packages beyond MLX and numpy (so it runs on a bare GPU machine): no voices (tiny voices have
    the wrong width; profile it with voice=None) and a word-level stand-in tokenizer
    (`_WordTokenizer`, about as many prompt tokens as the real 32k SentencePiece model).
    """
    from .api import PersonaPlex, _parse_quantize
    from .worker import ModelWorker

    if name not in RANDOM_MODELS:
        raise ConfigError(f"random model {name!r}: use one of {', '.join(RANDOM_MODELS)}")
    q = _parse_quantize(quantize)
    if name == "tiny":
        from . import hub
        tiny = hub.resolve_model("tiny", progress=False)
        files = dataclasses.replace(tiny, source=RANDOM_PREFIX + name, is_tiny=False)
    else:
        from .hub import ModelFiles
        none = Path("<random weights>")
        files = ModelFiles(lm=none, mimi=none, tokenizer=none, voices_dir=None, config=None,
                           source=RANDOM_PREFIX + name)
    own = worker is None
    worker = worker or ModelWorker()
    t0 = time.perf_counter()
    try:
        mimi, lm, gen, sp = worker.call(_build_random, files, q, name == "tiny", seed)
    except BaseException:
        if own:
            worker.shutdown()
        raise
    model = PersonaPlex(files, mimi, lm, gen, sp, worker, q, time.perf_counter() - t0)
    model.benchmark_weights = True
    return model


def _build_random(files, q, small: bool, seed: int):
    import mlx.core as mx

    from .models import quant
    from .models.gen import LmGen, SamplingParams
    from .models.lm import LM
    from .models.mimi import Mimi, tiny_state_dict

    lm = LM.random(files.lm_config(), mx.float32 if small else mx.bfloat16, seed=seed)
    if q is not None:
        quant.apply(lm, quant.QuantPlan.parse(q))
    mcfg = files.mimi_config()
    mimi = Mimi(mcfg, 8).load_reference_weights(tiny_state_dict(mcfg, seed=seed), source="random weights")
    if small:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(files.tokenizer))
    else:
        sp = _WordTokenizer(lm.config.text_card)
    from .api import _warm_mimi
    _warm_mimi(mimi)
    return mimi, lm, LmGen(lm, sampling=SamplingParams()), sp


class _WordTokenizer:
    """Benchmark stand-in for SentencePiece: one id per word (crc32 into the vocabulary, ids >= 4),
    no text on decode. Only the random benchmark model uses it."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        import zlib
        return [4 + zlib.crc32(w.encode()) % (self.vocab - 4) for w in text.split()]

    def get_piece_size(self) -> int:
        return 0            # decode_text_token shows nothing for ids outside the vocabulary


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def percentiles(vals) -> dict:
    a = np.asarray(vals, dtype=np.float64)
    if a.size == 0:
        return dict.fromkeys(PERCENTILES, 0.0)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "mean": float(a.mean())}


def synthetic_input(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like mic input: a buzzy 140 Hz voice in 3 Hz syllables, pauses, a little noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    env = 0.5 * (1 + np.sin(2 * np.pi * 3.0 * t)) * (np.sin(2 * np.pi * 0.25 * t) > -0.3)
    voiced = np.sign(np.sin(2 * np.pi * 140 * t)) * 0.05
    return ((voiced + 0.02 * rng.standard_normal(n)) * env).astype(np.float32)


def rss_mb() -> tuple[float | None, float]:
    """(current RSS or None where /proc is missing, peak RSS) of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024.0   # bytes vs KiB
    cur = None
    try:
        with open("/proc/self/statm") as f:
            cur = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return cur, peak_mb


def disabled_timer_cost_us(reps: int = 20000) -> float:
    """Microseconds per step that a disabled StageTimer costs the loop: the calls the session and
    FrameProcessor make per step (begin, 5 marks, end, the probe check), timed in a tight loop."""
    tm = StageTimer(False)
    begin, mark, end = tm.begin, tm.mark, tm.end
    t0 = time.perf_counter()
    for _ in range(reps):
        begin()
        mark("capture_wait")
        mark("aec")
        mark("mimi_encode", None)
        _ = (lambda s: mark(s)) if tm.enabled else None
        mark("mimi_decode")
        mark("playback_push")
        end()
    return (time.perf_counter() - t0) / reps * 1e6


def _input_audio(args, audio: np.ndarray | None, total: int) -> tuple[np.ndarray, str]:
    if audio is None:
        return synthetic_input(total * FRAME / SAMPLE_RATE, args.seed), "synthetic speech-like noise"
    reps = int(np.ceil(total * FRAME / max(len(audio), 1)))
    return np.tile(audio, reps)[: total * FRAME], os.path.basename(args.in_wav)


def _run_session(model, audio, args, voice, profile: bool, total: int, bar=None):
    session = model.session(source=audio, sink=None, voice=voice, realtime=args.realtime,
                            aec=args.aec, profile=profile, max_frames=total, seed=args.seed)
    t0 = time.perf_counter()
    session.start()
    last = 0
    while session.running:
        time.sleep(0.1)
        if bar is not None:
            n = session.stats().frames
            bar.update(n - last)
            last = n
    stats = session.wait()
    if bar is not None:
        bar.update(stats.frames - last)
    return session, stats, time.perf_counter() - t0


def _steady(session, warmup: int) -> list[float]:
    times = list(session._step_ms)
    return times[warmup:] if warmup < len(times) else times


def load_model(args):
    """Load the model named by --model on a worker set to --device; returns (model, seconds)."""
    from .api import PersonaPlex
    from .worker import ModelWorker

    worker = ModelWorker()
    if args.device is not None:
        import mlx.core as mx
        dev = mx.gpu if args.device == "gpu" else mx.cpu
        if not mx.is_available(dev):
            worker.shutdown()
            raise ConfigError(f"--device {args.device}: this MLX build ({mx.__version__}) has no GPU backend; "
                              "install mlx[cuda] (Linux + NVIDIA) or use Apple silicon, or pass --device cpu")
        worker.call(mx.set_default_device, dev)
    t0 = time.perf_counter()
    try:
        if str(args.model).startswith(RANDOM_PREFIX):
            model = load_random_model(args.model[len(RANDOM_PREFIX):], args.quantize, worker, args.seed)
        else:
            model = PersonaPlex.load(args.model, quantize=args.quantize, model_dir=args.model_dir,
                                     progress=not args.no_progress, worker=worker)
    except BaseException:
        worker.shutdown()
        raise
    return model, time.perf_counter() - t0


def run_profile(args, audio: np.ndarray | None = None) -> dict:
    """Load the model, run the real session loop for warmup + steps frames with stage timing on,
    and return the result dict (layout: SCHEMA)."""
    model, load_s = load_model(args)
    try:
        return _profile_loaded(model, load_s, args, audio)
    finally:
        model.close()


def _profile_loaded(model, load_s: float, args, audio) -> dict:
    import mlx.core as mx

    bench = bool(getattr(model, "benchmark_weights", False))
    voice = None if (bench and model.files.voices_dir is None) else args.voice
    total = args.steps + args.warmup
    pcm, input_desc = _input_audio(args, audio, total)

    # The prompt phases (voice + system prompt) run once per persona and are cached on the model:
    # time them here so the session's start-up does not blur the first steps.
    model._check_voice(voice)
    t0 = time.perf_counter()
    model.worker.call(model.prompts.state, voice, None, args.seed)
    prompt_ms = (time.perf_counter() - t0) * 1e3
    peak_load = model.worker.call(mx.get_peak_memory)      # load + prompt
    model.worker.call(mx.reset_peak_memory)

    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="step", desc="profiling", file=sys.stderr, leave=False)
        except ImportError:
            bar = None
    try:
        session, stats, wall = _run_session(model, pcm, args, voice, True, total, bar)
    finally:
        if bar is not None:
            bar.close()
    records = session.timer.records
    if len(records) < total:
        raise EngineError(f"the loop stopped after {len(records)} of {total} steps "
                          f"(session state {stats.state!r}); see the error above")
    warm, timed = records[: args.warmup], records[args.warmup:]
    steps = np.array([r["step"] for r in timed])
    p50 = float(np.median(steps))
    series = {s: [round(r.get(s, 0.0), 4) for r in timed] for s in STAGES}
    cur_rss, peak_rss = rss_mb()
    off_us = disabled_timer_cost_us()
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "python": platform.python_version(), "mlx": getattr(mx, "__version__", "?"),
               "mlx_device": str(model.worker.call(mx.default_device)),
               "blas": str(getattr(__import__("engine")._blas, "BLAS_IN_USE", "?"))}
    q = model.quantize
    result = {
        "schema": SCHEMA_VERSION,
        "tool": "engine.profile",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine,
        "model": {"source": str(model.files.source), "quantize": None if q is None else str(q),
                  "tiny": bool(model.is_tiny or model.files.source == RANDOM_PREFIX + "tiny"),
                  "benchmark_weights": bench},
        "run": {"steps": len(timed), "warmup_steps": len(warm), "realtime": bool(args.realtime),
                "aec": bool(args.aec), "voice": voice, "input": input_desc},
        "timing": {
            # Weights read (or generated), quantized and evaluated, on the worker; load_total_s
            # adds resolving the model (a first download, the tiny model's generation).
            "load_s": float(getattr(model, "load_seconds", load_s) or load_s),
            "load_total_s": float(load_s),
            "prompt_ms": float(prompt_ms),
            "first_step_ms": float(records[0]["step"]),
            "warmup_ms": float(sum(r["step"] for r in warm)),
            # What the warm-up steps cost beyond steady-state steps: compilation, allocations.
            "warmup_excess_ms": float(sum(r["step"] - p50 for r in warm)),
            "wall_s": float(wall),
            "frame_ms": FRAME_MS,
            "rtf": float(steps.mean() / FRAME_MS),
            "rtf_p99": float(np.percentile(steps, 99) / FRAME_MS),
            "deadline_misses": int((steps > FRAME_MS).sum()),
            "deadline_miss_rate": float((steps > FRAME_MS).mean()),
        },
        "stages": {s: percentiles(series[s]) for s in STAGES},
        "series": series,
        "memory": {"mlx_active_mb": mx.get_active_memory() / 2**20,
                   "mlx_peak_mb": max(peak_load, mx.get_peak_memory()) / 2**20,
                   "mlx_peak_run_mb": mx.get_peak_memory() / 2**20,
                   "mlx_cache_mb": mx.get_cache_memory() / 2**20,
                   "rss_mb": cur_rss, "rss_peak_mb": peak_rss},
        "instrumentation": {"off_us_per_step": off_us, "off_fraction_of_step": off_us / 1e3 / p50},
        "session": {k: v for k, v in dataclasses.asdict(stats).items()
                    if isinstance(v, (int, float, bool, str))},
    }
    if args.overhead:
        # The session's own step clock (not the stage timer) for both, warm-up skipped; off and on
        # runs alternate (3 each) so drift in machine load hits both alike.
        times = {False: [], True: []}
        for _ in range(3):
            for on in (False, True):
                sess, _, _ = _run_session(model, pcm, args, voice, on, total)
                times[on] += _steady(sess, args.warmup)
        on_p50, off_p50 = float(np.median(times[True])), float(np.median(times[False]))
        result["instrumentation"].update(step_p50_timer_on_ms=on_p50, step_p50_timer_off_ms=off_p50,
                                         on_cost_fraction=on_p50 / off_p50 - 1.0)
    return result


# ----------------------------------------------------------------------------------------------
# Mouth-to-ear: a click through a real output -> input loop
# ----------------------------------------------------------------------------------------------
def _device_spec(v):
    return int(v) if v is not None and str(v).isdigit() else v


def make_click(n: int = 96) -> np.ndarray:
    """A short broadband click: a Hann-windowed 3 kHz burst (4 ms), peak 0.8."""
    t = np.arange(n) / SAMPLE_RATE
    return (0.8 * np.hanning(n) * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)


def find_clicks(rec: np.ndarray, click: np.ndarray, starts, max_lag: int,
                min_snr: float = 8.0) -> list[int | None]:
    """For each emission index in `starts`, the lag (samples) at which `click` shows up in `rec`
    within [0, max_lag), by matched filtering; None where no confident peak was found."""
    lags: list[int | None] = []
    for s in starts:
        seg = rec[s: s + max_lag + len(click)]
        if len(seg) < len(click) + 1:
            lags.append(None)
            continue
        corr = np.abs(np.correlate(seg, click, mode="valid"))
        i = int(np.argmax(corr))
        floor = float(np.median(corr)) + 1e-9
        peak_ok = corr[i] > 0.05 * float(np.dot(click, click))     # at least -26 dB of the click
        lags.append(i if (corr[i] / floor >= min_snr and peak_ok) else None)
    return lags


def measure_loopback(input_device=None, output_device=None, blocksize: int = 480, clicks: int = 5,
                     spacing_s: float = 0.6, lead_s: float = 0.5, attempts: int = 3) -> dict:
    """Audio-path latency (output callback -> speaker -> mic -> input callback) of a device pair.

    The click train is queued in the playback ring before the stream starts, so the k-th click
    leaves the output callback at a known stream sample index; input and output advance together
    in the duplex callback, so its index in the captured stream minus that index is the round trip
    (device buffers, host audio server, any resampling). Lags longer than `spacing_s` are not found.

    An xrun (a late callback, a starved audio server) adds latency from that moment on, so clicks
    of one train can disagree. A train is "stable" when its clicks agree within a block; up to
    `attempts` trains are played until one is, and the best is reported (`stable` says which).
    """
    best, heard = None, []
    for attempt in range(1, attempts + 1):
        res = _click_train(input_device, output_device, blocksize, clicks, spacing_s, lead_s)
        heard.append(f"{res['clicks_found']}/{clicks} clicks, input peak {res['input_peak']:.3f}")
        if res["clicks_found"] >= clicks // 2 + 1:
            spread = res["audio_path_max_ms"] - res["audio_path_min_ms"]
            res["stable"] = bool(spread <= max(blocksize / SAMPLE_RATE * 1e3, 5.0))
            key = (res["stable"], res["clicks_found"], -spread)
            if best is None or key > best[0]:
                best = (key, res)
            if res["stable"]:
                break
    if best is None:
        raise AudioDeviceError(f"loopback: the click was heard in none of {attempts} tries ({'; '.join(heard)}; "
                               f"needs {clicks // 2 + 1} clicks within {spacing_s:.1f} s); connect the output "
                               "to the input (a cable, or the PulseAudio null sink's monitor as the input), "
                               "turn the volumes up and retry")
    return dict(best[1], attempts=attempt)           # attempts: trains played


def _click_train(input_device, output_device, blocksize, clicks, spacing_s, lead_s) -> dict:
    from .audio.io import open_duplex
    from .audio.ring import RingBuffer

    click = make_click()
    lead, space = int(lead_s * SAMPLE_RATE), int(spacing_s * SAMPLE_RATE)
    train = np.zeros(lead + clicks * space, np.float32)
    starts = [lead + k * space for k in range(clicks)]
    for s in starts:
        train[s: s + len(click)] = click
    cap = RingBuffer(1 << int(np.ceil(np.log2(len(train) + 2 * SAMPLE_RATE))))
    play = RingBuffer(1 << int(np.ceil(np.log2(len(train) + 1))))
    play.write(train)
    stream = open_duplex(cap, play, input_device=_device_spec(input_device),
                         output_device=_device_spec(output_device), blocksize=blocksize)
    try:
        lat = dict(stream.latencies)
        stream.start()
        time.sleep(len(train) / SAMPLE_RATE + spacing_s + 0.2)
        stream.stop()
        counters = dict(stream.counters)
    finally:
        stream.close()
    rec = cap.read(cap.available_read)
    if len(rec) < starts[0]:
        raise AudioDeviceError(f"loopback: only {len(rec)} samples were captured in "
                               f"{len(train) / SAMPLE_RATE:.1f} s; is the input device delivering audio?")
    lags = find_clicks(rec, click, starts, max_lag=space - len(click))
    ms = np.array([x for x in lags if x is not None], dtype=np.float64) / SAMPLE_RATE * 1e3
    nan = float("nan")
    return {"audio_path_ms": float(np.median(ms)) if ms.size else nan,
            "audio_path_min_ms": float(ms.min()) if ms.size else nan,
            "audio_path_max_ms": float(ms.max()) if ms.size else nan,
            "clicks_ms": [None if x is None else x / SAMPLE_RATE * 1e3 for x in lags],
            "clicks_found": int(ms.size), "clicks": clicks, "blocksize": int(blocksize),
            "input_peak": float(np.abs(rec).max()) if len(rec) else 0.0,
            "reported_latency_ms": {k: float(v) * 1e3 for k, v in lat.items()},
            "underrun_samples": int(counters.get("playback_underrun_samples", 0)),
            "overflow_samples": int(counters.get("capture_overflow_samples", 0))}


def mouth_to_ear(loop: dict, step_p50_ms: float) -> dict:
    """Add the model's algorithmic latency to a measured audio path: the mic frame must be complete
    (one frame), a user frame first affects agent audio two calls later (model delays), and the
    step itself; the playback ring's prebuffer absorbs the step when it stays under a frame."""
    model_ms = FRAME_MS + MODEL_DELAY_FRAMES * FRAME_MS + step_p50_ms
    return dict(loop, frame_ms=FRAME_MS, model_delay_ms=MODEL_DELAY_FRAMES * FRAME_MS,
                step_ms=step_p50_ms, model_ms=model_ms, total_ms=loop["audio_path_ms"] + model_ms)


# ----------------------------------------------------------------------------------------------
# Output: table, comparison, plot, JSON
# ----------------------------------------------------------------------------------------------
def print_table(res: dict, out=None) -> None:
    out = out or sys.stdout
    m, t, r = res["model"], res["timing"], res["run"]
    w = lambda s="": print(s, file=out)  # noqa: E731
    tag = " [benchmark model: random weights]" if m["benchmark_weights"] else ""
    w(f"\n{m['source']} (quantize={m['quantize'] or 'none'}) on {res['machine']['mlx_device']}{tag}, "
      f"{r['steps']} steps after {r['warmup_steps']} warm-up")
    w(f"{'stage':<14}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  ms")
    for s, v in res["stages"].items():
        w(f"{s:<14}{v['p50']:9.2f}{v['p95']:9.2f}{v['p99']:9.2f}{v['max']:9.2f}")
    w(f"real-time factor {t['rtf']:.3f} (mean step / {t['frame_ms']:.0f} ms; p99 {t['rtf_p99']:.3f}) | "
      f"deadline misses {t['deadline_misses']}/{r['steps']}")
    w(f"load {t['load_s']:.2f} s ({t['load_total_s']:.2f} s with resolving/downloading) | "
      f"prompt {t['prompt_ms']:.0f} ms | first step {t['first_step_ms']:.1f} ms | "
      f"warm-up {t['warmup_ms']:.0f} ms ({t['warmup_excess_ms']:+.0f} ms over steady state)")
    mem = res["memory"]
    rss = f"{mem['rss_mb']:.0f}" if mem["rss_mb"] is not None else "?"
    w(f"memory: MLX active {mem['mlx_active_mb']:.0f} MB, peak {mem['mlx_peak_mb']:.0f} MB "
      f"(during steps {mem['mlx_peak_run_mb']:.0f}), cache {mem['mlx_cache_mb']:.0f} MB | "
      f"process RSS {rss} MB, peak {mem['rss_peak_mb']:.0f} MB")
    ins = res["instrumentation"]
    line = (f"instrumentation off: {ins['off_us_per_step']:.2f} us/step "
            f"({100 * ins['off_fraction_of_step']:.4f} % of the step)")
    if "on_cost_fraction" in ins:
        line += (f" | timer on vs off: step p50 {ins['step_p50_timer_on_ms']:.2f} vs "
                 f"{ins['step_p50_timer_off_ms']:.2f} ms ({100 * ins['on_cost_fraction']:+.1f} %)")
    w(line)
    if "loopback" in res:
        lb = res["loopback"]
        w(f"mouth-to-ear: audio path {lb['audio_path_ms']:.1f} ms (min {lb['audio_path_min_ms']:.1f}, max "
          f"{lb['audio_path_max_ms']:.1f}, {lb['clicks_found']}/{lb['clicks']} clicks, block "
          f"{lb['blocksize']}{'' if lb['stable'] else ', UNSTABLE: xruns'}) + model {lb['model_ms']:.0f} ms "
          f"(frame {lb['frame_ms']:.0f} + delays {lb['model_delay_ms']:.0f} + step {lb['step_ms']:.1f}) "
          f"= {lb['total_ms']:.0f} ms")


def load_result(path, flag: str = "--compare") -> dict:
    """Read and validate an earlier --json result."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: file not found") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: not a readable JSON file ({e})") from None
    problems = validate(data)
    if problems:
        raise ConfigError(f"{flag} {path}: not an engine.profile result: {'; '.join(problems[:5])}")
    return data


def validate(res, schema=SCHEMA, where: str = "") -> list[str]:
    """Problems with `res` against SCHEMA (empty list: valid)."""
    if not isinstance(res, dict):
        return [f"{where or 'result'} is {type(res).__name__}, expected an object"]
    out = []
    for key, typ in schema.items():
        name = f"{where}{key}"
        if key not in res:
            out.append(f"missing {name}")
        elif isinstance(typ, dict):
            out += validate(res[key], typ, name + ".")
        else:
            ok_types = typ if isinstance(typ, tuple) else (typ,)
            v = res[key]
            if float in ok_types and isinstance(v, int) and not isinstance(v, bool):
                continue
            if not isinstance(v, ok_types) or (isinstance(v, bool) and bool not in ok_types):
                out.append(f"{name} is {type(v).__name__}")
    if where == "" and not out:
        if res["schema"] != SCHEMA_VERSION:
            out.append(f"schema {res['schema']} (this tool writes {SCHEMA_VERSION})")
        for s in STAGES:
            st = res["stages"].get(s)
            if not isinstance(st, dict) or any(not isinstance(st.get(p), (int, float)) for p in PERCENTILES):
                out.append(f"stages.{s} lacks {'/'.join(PERCENTILES)}")
            if not isinstance(res["series"].get(s), list) or len(res["series"][s]) != res["run"]["steps"]:
                out.append(f"series.{s} is not a list of {res['run']['steps']} values")
    return out


def compare(res: dict, old: dict, out=None) -> dict:
    """Print and return new/old ratios per stage (p50, p99) and for the real-time factor."""
    out = out or sys.stdout
    w = lambda s="": print(s, file=out)  # noqa: E731
    om, nm = old["model"], res["model"]
    w(f"\ncompare with {old['date']}: {om['source']} q={om['quantize'] or 'none'} on "
      f"{old['machine']['mlx_device']} ({old['machine']['processor']})")
    if (om["source"], om["quantize"], old["machine"]["mlx_device"]) != \
            (nm["source"], nm["quantize"], res["machine"]["mlx_device"]):
        w("note: model, quantization or device differ between the two runs")
    w(f"{'stage':<14}{'old p50':>9}{'new p50':>9}{'ratio':>7}{'old p99':>9}{'new p99':>9}{'ratio':>7}")
    ratio = lambda a, b: a / b if b > 0 else None          # noqa: E731 - None: old was 0 (JSON-safe)
    fmt = lambda r: f"{r:7.2f}" if r is not None else f"{'-':>7}"  # noqa: E731
    ratios = {}
    for s, v in res["stages"].items():
        o = old["stages"].get(s)
        if not o:
            continue
        ratios[s] = {"p50": ratio(v["p50"], o["p50"]), "p99": ratio(v["p99"], o["p99"])}
        w(f"{s:<14}{o['p50']:9.2f}{v['p50']:9.2f}{fmt(ratios[s]['p50'])}"
          f"{o['p99']:9.2f}{v['p99']:9.2f}{fmt(ratios[s]['p99'])}")
    ratios["rtf"] = ratio(res["timing"]["rtf"], old["timing"]["rtf"])
    w(f"real-time factor {old['timing']['rtf']:.3f} -> {res['timing']['rtf']:.3f} "
      f"(ratio {fmt(ratios['rtf']).strip()}; < 1 is faster)")
    return ratios


def plot(res: dict, path: str) -> None:
    """PNG: per-step stacked stage times with the 80 ms budget line, and p50/p99 per stage."""
    plt = _import_pyplot()
    series = res["series"]
    names = [s for s in STAGES if s not in ("step", "capture_wait")]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 7.5), gridspec_kw={"height_ratios": [3, 2]})
    x = np.arange(len(series["step"]))
    a1.stackplot(x, *[series[s] for s in names], labels=names, alpha=0.85)
    a1.plot(x, series["step"], color="k", lw=0.7, label="step")
    a1.axhline(res["timing"]["frame_ms"], color="r", ls="--", lw=1.2,
               label=f"{res['timing']['frame_ms']:.0f} ms budget")
    a1.set_xlim(0, max(len(x) - 1, 1))
    a1.set_ylim(0, max(res["timing"]["frame_ms"] * 1.15, max(series["step"], default=0) * 1.05))
    a1.set_xlabel("step (after warm-up)")
    a1.set_ylabel("ms")
    a1.legend(loc="upper right", fontsize=7, ncol=4)
    m = res["model"]
    a1.set_title(f"{m['source']}{' (random weights)' if m['benchmark_weights'] else ''}, "
                 f"q={m['quantize'] or 'none'}, {res['machine']['mlx_device']}: step p50 "
                 f"{res['stages']['step']['p50']:.1f} ms, RTF {res['timing']['rtf']:.2f}, "
                 f"misses {res['timing']['deadline_misses']}/{res['run']['steps']}", fontsize=9)
    allnames = list(STAGES)
    pos = np.arange(len(allnames))
    a2.bar(pos - 0.2, [res["stages"][s]["p50"] for s in allnames], 0.4, label="p50")
    a2.bar(pos + 0.2, [res["stages"][s]["p99"] for s in allnames], 0.4, label="p99")
    a2.set_xticks(pos, allnames, rotation=15, fontsize=8)
    a2.set_ylabel("ms")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(res: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, allow_nan=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        audio = check_args(args)
        loop = None
        if args.from_json:
            res = load_result(args.from_json, "--from-json")
            res.pop("compare", None)
        else:
            if args.device_loopback:   # before the model: fails fast, and no model work competes
                loop = measure_loopback(args.input_device, args.output_device, args.blocksize)
            res = run_profile(args, audio)
        if loop is not None:
            res["loopback"] = mouth_to_ear(loop, res["stages"]["step"]["p50"])
        print_table(res)
        if args.compare:
            res["compare"] = compare(res, load_result(args.compare))
        if args.json:
            write_json(res, args.json)
            print(f"wrote {args.json}", file=sys.stderr)
        if args.plot:
            plot(res, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        return 0
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
