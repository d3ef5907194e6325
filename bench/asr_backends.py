"""Speed of the MLX speech recognizers considered for --asr, at their released shapes, here.

No weights can be downloaded here, so each candidate runs with random weights at the real shapes
(the work per token and per second of audio is the same; the words are not): Qwen3-ASR-0.6B through
mlx-qwen3-asr (built by engine.tiny_asr in the checkpoint's own format) and Whisper large-v3-turbo
and small through mlx-whisper (its config.json + weights.safetensors). Each transcribes a 3 s
utterance with a fixed number of generated tokens (end-of-text and the repetition guard are
disabled so random weights cannot stop early), twice: with N and with 2N tokens, so

    fixed part (mel + encoder + prompt) = 2 t(N) - t(2N),   per token = (t(2N) - t(N)) / N.

    pip install mlx-whisper==0.4.3          # only for this comparison (not in the asr extra)
    python bench/asr_backends.py --tokens 16 --repeats 3 [--json out.jsonl]

Whisper pads every utterance to its 30 s window; Qwen3-ASR encodes only the audio it gets.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import engine  # noqa: E402  (OpenBLAS before mlx)

WHISPER = {   # mlx-whisper ModelDimensions of the released checkpoints
    "whisper-large-v3-turbo": dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20,
                                   n_audio_layer=32, n_vocab=51866, n_text_ctx=448, n_text_state=1280,
                                   n_text_head=20, n_text_layer=4),
    "whisper-small": dict(n_mels=80, n_audio_ctx=1500, n_audio_state=768, n_audio_head=12, n_audio_layer=12,
                          n_vocab=51865, n_text_ctx=448, n_text_state=768, n_text_head=12, n_text_layer=12),
}


def utterance(seconds: float = 3.0, rate: int = 16000) -> np.ndarray:
    from engine.audio.resample import resample
    from engine.audio.wav import load_audio

    x, _ = load_audio(Path(__file__).resolve().parents[1] / "examples" / "hello.wav")
    return resample(x[: int(seconds * 24000)], 24000, rate).astype(np.float32)


def qwen_runner():
    import mlx_qwen3_asr.generate as gen

    from engine.asr import load_backend

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from asr import asr_model_dir

    gen._detect_repetition = lambda *a, **k: False            # random weights: run every token
    session = load_backend(asr_model_dir("random:0.6b"))       # what the recognizer process runs

    def run(audio, tokens):
        session.transcribe(audio, language="English", max_new_tokens=tokens)
    return run


def whisper_runner(name: str, dtype, cache: Path):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper import audio as wa
    from mlx_whisper import decoding, whisper
    from mlx_whisper.load_models import load_model

    d = cache / f"random-{name}"
    if not (d / "weights.safetensors").is_file():
        d.mkdir(parents=True, exist_ok=True)
        model = whisper.Whisper(whisper.ModelDimensions(**WHISPER[name]), mx.float16)
        mx.save_safetensors(str(d / "weights.safetensors"), dict(tree_flatten(model.parameters())))
        (d / "config.json").write_text(json.dumps(WHISPER[name]))
    model = load_model(str(d), dtype=dtype)
    model.set_dtype(dtype)          # the loader keeps the file's float16 (slow on MLX's CPU backend)
    mx.eval(model.parameters())
    n_mels = WHISPER[name]["n_mels"]

    def run(audio, tokens):
        mel = wa.log_mel_spectrogram(wa.pad_or_trim(mx.array(audio), wa.N_SAMPLES), n_mels=n_mels)
        eot = 50257   # both vocabularies' end-of-text
        opts = decoding.DecodingOptions(language="en", task="transcribe", temperature=0.0, sample_len=tokens,
                                        without_timestamps=True, fp16=dtype == mx.float16,
                                        suppress_tokens=[eot], suppress_blank=False)
        decoding.decode(model, mel.astype(dtype), opts)
    return run


def measure(run, audio, tokens: int, repeats: int) -> dict:
    run(audio, tokens)                    # warm-up (kernels, caches)
    t1, t2 = [], []
    for _ in range(repeats):
        t = time.perf_counter(); run(audio, tokens); t1.append(time.perf_counter() - t)
        t = time.perf_counter(); run(audio, 2 * tokens); t2.append(time.perf_counter() - t)
    a, b = float(np.median(t1)), float(np.median(t2))
    return {"t_n_s": a, "t_2n_s": b, "fixed_s": 2 * a - b, "per_token_ms": (b - a) / tokens * 1e3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--only", default=None, help="comma-separated subset: qwen3-asr-0.6b,whisper-large-v3-turbo,whisper-small")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import mlx.core as mx

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = mx.float32 if args.device == "cpu" else mx.float16
    cache = Path(os.environ.get("PERSONAPLEX_CACHE") or Path.home() / ".cache" / "personaplex-engine")
    audio = utterance(args.seconds)
    names = ["qwen3-asr-0.6b", "whisper-large-v3-turbo", "whisper-small"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    rows = []
    for name in names:
        t0 = time.perf_counter()
        run = qwen_runner() if name.startswith("qwen") else whisper_runner(name, dtype, cache)
        row = {"backend": name, "device": args.device, "dtype": str(dtype), "audio_s": args.seconds,
               "tokens": args.tokens, "load_s": time.perf_counter() - t0, "machine": platform.machine(),
               "cpus": os.cpu_count(), **measure(run, audio, args.tokens, args.repeats)}
        est = row["fixed_s"] + 20 * row["per_token_ms"] / 1e3
        row["est_3s_utterance_20_tokens_s"] = est
        rows.append(row)
        print(json.dumps(row), flush=True)
        del run
        mx.clear_cache()
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
