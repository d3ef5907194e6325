"""The public API: PersonaPlex.load(), respond(), respond_stream(), respond_diagnostic(),
respond_realtime() and session().

Every method is safe to call from any thread and from asyncio: the model work runs on the one
`ModelWorker` thread that owns all MLX calls; results come back as numpy arrays and Python values.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator

import numpy as np

from .errors import AudioFormatError, ConfigError, UnknownVoice
from .session import FRAME, SAMPLE_RATE, DuplexSession, FrameProcessor, StageTimer, rechunk
from .worker import ModelWorker

DEFAULT_REPO = "nvidia/personaplex-7b-v1"
MIN_STEPS, MAX_STEPS = 50, 500


@dataclass
class Response:
    """A whole turn: the agent's audio (24 kHz mono float32), its text and text token ids."""

    audio: np.ndarray
    text: str
    text_tokens: list[int]
    sample_rate: int = SAMPLE_RATE
    input_info: str = ""
    babble: bool = False     # True for the tiny random model: the output is noise-like babble
    user_text: str | None = None   # what the user said, when the model has a recognizer (asr=)

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass
class AudioChunk:
    """Part of a streamed turn. `samples` is one decoded 80 ms frame (or more)."""

    samples: np.ndarray
    text_tokens: list[int]
    text: str
    is_final: bool


@dataclass
class Diagnostics:
    """Per-step timings (ms per stage), token entropies and hidden-state statistics."""

    step_timings: list[dict[str, float]] = field(default_factory=list)
    text_entropy: list[float] = field(default_factory=list)
    audio_entropy: list[float] = field(default_factory=list)
    hidden_stats: list[dict[str, float]] = field(default_factory=list)
    prompt_ms: float = 0.0
    input_info: str = ""

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": len(self.step_timings), "prompt_ms": self.prompt_ms}
        if self.step_timings:
            keys = sorted({k for r in self.step_timings for k in r})
            for k in keys:
                vals = np.array([r.get(k, 0.0) for r in self.step_timings])
                out[f"{k}_p50_ms"] = float(np.percentile(vals, 50))
                out[f"{k}_p99_ms"] = float(np.percentile(vals, 99))
        if self.text_entropy:
            out["text_entropy_mean"] = float(np.mean(self.text_entropy))
        if self.audio_entropy:
            out["audio_entropy_mean"] = float(np.mean(self.audio_entropy))
        return out


def _entropy(logits) -> float:
    import mlx.core as mx
    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    return float(-(mx.exp(lp) * lp).sum(axis=-1).mean().item())


class PersonaPlex:
    """A loaded PersonaPlex model (weights shared by every conversation)."""

    def __init__(self, files, mimi, lm, gen, sp, worker: ModelWorker, quantize=None,
                 load_seconds: float = 0.0):
        self.files = files
        self.mimi, self.lm, self.gen, self.sp = mimi, lm, gen, sp
        self.worker = worker
        self.quantize = quantize
        self.load_seconds = load_seconds
        self.is_tiny = bool(getattr(files, "is_tiny", False))
        self.lm_codebooks = 8
        self._voice_cache: dict[str, Any] = {}
        from .models.gen import PromptCache
        # States after the prompt phases per (voice, prompt): FrameProcessor and the server's loop
        # take new conversations' states from it.
        self.prompts = PromptCache(gen, self._prompt_inputs)
        self.asr = None          # engine.asr.Recognizer when loaded with asr=

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | os.PathLike = DEFAULT_REPO, quantize: int | str | None = None, *,
             model_dir: str | os.PathLike | None = None, offline: bool | None = None,
             progress: bool = True, dtype: str | None = None, depformer_mode: str = "live",
             sampling=None, worker: ModelWorker | None = None, asr=None) -> "PersonaPlex":
        """Load a model: "tiny" (embedded, random weights, babbles), a repo id, or a local directory.

        The Swift demo's converted checkpoints (`aufklarer/PersonaPlex-7B-MLX-8bit` / `-4bit`, or a
        directory in that layout) load as they are quantized.
        quantize: None (full precision; for a converted checkpoint: as stored), 8 or 4 (MLX affine,
        group 64), applied at load. A converted checkpoint accepts only its own bits.
        dtype: "float32" | "bfloat16" | "float16" | None (float32 for the tiny model, else bfloat16;
        a converted checkpoint's fp16 floats, scales and biases are cast to it).
        asr: a speech recognizer for the user's side (engine.asr; needs the `asr` extra): a repo id
        (e.g. engine.asr.DEFAULT_ASR_REPO), a local directory, "tiny", or a Recognizer. It loads in
        its own process while the model loads; then `Response.user_text` and the sessions'
        `user_text` events carry what the user said.
        """
        from . import hub

        quantize = _parse_quantize(quantize)
        files = hub.resolve_model(model, model_dir=model_dir, offline=offline, progress=progress,
                                  quantize=quantize if isinstance(quantize, int) else None)
        recognizer = None
        if asr is not None and not hasattr(asr, "submit"):
            from .asr import Recognizer
            recognizer = Recognizer(asr, wait=False, offline=offline, progress=progress)
        elif asr is not None:
            recognizer = asr
        try:
            worker = worker or ModelWorker()
            t0 = time.perf_counter()
            mimi, lm, gen, sp = worker.call(_load_on_worker, files, quantize, dtype, depformer_mode,
                                            sampling)
            if recognizer is not None:
                recognizer.wait_ready()
        except BaseException:
            if recognizer is not None and recognizer is not asr:
                recognizer.close()
            raise
        if quantize is None and lm.quant_plan is not None:   # a converted checkpoint's own plan
            quantize = lm.quant_plan.name
        model = cls(files, mimi, lm, gen, sp, worker, quantize, time.perf_counter() - t0)
        model.asr = recognizer
        return model

    def close(self) -> None:
        if self.asr is not None:
            self.asr.close()
        self.worker.shutdown()

    # -- voices and prompts --------------------------------------------------------------------
    def list_voices(self) -> list[str]:
        from . import persona
        names = list(persona.VOICES)
        names += [n for n in self.files.voice_names() if n not in names]
        return names

    def _check_voice(self, voice) -> None:
        """Validate a voice on the caller's thread (clear UnknownVoice before any model work).
        Preset and .pt voices are read here (no MLX); .wav voices are encoded later on the worker."""
        from . import persona
        if voice is None or voice in self._voice_cache:
            return
        s = os.fspath(voice) if isinstance(voice, os.PathLike) else voice
        if isinstance(s, str) and s.lower().endswith((".wav", ".wave")):
            if not Path(s).expanduser().is_file():
                raise UnknownVoice(f"custom voice file {s} does not exist")
            return
        self._voice_cache[voice] = persona.load_voice(voice, self.files)

    def _voice(self, voice):
        from . import persona
        if voice is None:
            return None
        if voice not in self._voice_cache:
            self._voice_cache[voice] = persona.load_voice(voice, self.files, mimi=self.mimi)
        return self._voice_cache[voice]

    def _prompt_inputs(self, voice, system_prompt):
        """`self.prompts`' resolver: (key, inputs) of a (voice name or path, system prompt or
        preset name) pair; inputs() reads the voice and tokenizes the prompt (worker thread)."""
        from . import persona
        text = persona.resolve_prompt(system_prompt)

        def inputs():
            # An empty prompt skips the text phase (the reference crashes on it).
            tokens = persona.encode_system_prompt(text, self.sp) if text.strip() else []
            return self._voice(voice), tokens

        return (voice, text), inputs

    def decode_text(self, token: int | None) -> str:
        from . import persona
        if token is None:
            return ""
        return persona.decode_text_token(int(token), self.sp)

    # -- input handling ------------------------------------------------------------------------
    def _prepare_audio(self, audio, sample_rate: int | None) -> tuple[np.ndarray, str]:
        from .audio.wav import load_audio
        return load_audio(audio, sample_rate=sample_rate)

    @staticmethod
    def _check_steps(max_steps) -> int:
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
            raise ConfigError(f"max_steps={max_steps!r} must be an integer in {MIN_STEPS}..{MAX_STEPS}")
        if not MIN_STEPS <= int(max_steps) <= MAX_STEPS:
            raise ConfigError(f"max_steps={max_steps} out of range: use {MIN_STEPS}..{MAX_STEPS} "
                              f"(each step is 80 ms of agent speech)")
        return int(max_steps)

    # -- the user's transcript (asr=) ----------------------------------------------------------
    def _asr_submit(self, pcm: np.ndarray) -> int | None:
        """Start recognizing the user's turn in the recognizer's process (it runs while the model
        answers); None without a recognizer."""
        if self.asr is None:
            return None
        job = self.asr.submit(pcm, SAMPLE_RATE)
        if job is None:
            from .errors import EngineError
            raise EngineError("the speech recognizer is stopped or has max_pending turns queued")
        return job

    def _asr_text(self, job: int | None, timeout: float = 120.0) -> str | None:
        if job is None:
            return None
        from .errors import EngineError
        tr = self.asr.result(job, timeout)
        if tr is None:
            raise EngineError(f"the speech recognizer gave no transcript within {timeout:.0f} s")
        if tr.error is not None:
            raise EngineError(f"speech recognition of the user's turn failed: {tr.error}")
        return tr.text

    # -- turn-based ----------------------------------------------------------------------------
    def _turn(self, audio: np.ndarray, voice, system_prompt, max_steps, seed, timer=None,
              diag: Diagnostics | None = None) -> Iterator[tuple[np.ndarray | None, int | None]]:
        """Worker thread: feed the user's audio frame by frame, then let the agent speak for
        max_steps frames (fed with silence). Yields (agent frame, text token) for the agent phase."""
        t0 = time.perf_counter()
        proc = FrameProcessor(self, voice, system_prompt, seed, timer=timer)
        if diag is not None:
            diag.prompt_ms = (time.perf_counter() - t0) * 1e3
        for frame in rechunk([audio]):
            if timer is not None:
                timer.begin()
            proc.process(frame)
            if timer is not None:
                timer.end()
        silence = np.zeros(FRAME, np.float32)
        for _ in range(max_steps):
            if timer is not None:
                timer.begin()
            res = proc.process(silence)
            if timer is not None:
                timer.end(step=res.step_ms)
            yield res.audio, res.text_token

    def respond(self, audio, voice: str = "NATM0", system_prompt: str | None = None,
                max_steps: int = 75, seed: int | None = None,
                sample_rate: int | None = None) -> Response:
        """One turn: the user's audio in, the agent's answer (max_steps x 80 ms) out.

        audio: a wav path or an array (24 kHz mono float32/int16, or any rate/channels with
        `sample_rate` given: resampled and downmixed; `Response.input_info` says what was done).
        """
        max_steps = self._check_steps(max_steps)
        self._check_voice(voice)
        pcm, info = self._prepare_audio(audio, sample_rate)

        def run():
            frames, tokens = [], []
            for a, t in self._turn(pcm, voice, system_prompt, max_steps, seed):
                frames.append(a)
                if t is not None:
                    tokens.append(t)
            return frames, tokens

        return self._reply(pcm, info, run)

    def _reply(self, pcm, info: str, run) -> Response:
        """Run a turn (`run` on the worker: (frames, text tokens)) while the recognizer, if any,
        transcribes the user's audio; the Response of both."""
        job = self._asr_submit(pcm)
        try:
            frames, tokens = self.worker.call(run)
        except BaseException:
            if job is not None:
                self.asr.discard(job)
            raise
        text = "".join(self.decode_text(t) for t in tokens)
        return Response(np.concatenate(frames), text, tokens, input_info=info, babble=self.is_tiny,
                        user_text=self._asr_text(job))

    def respond_stream(self, audio, voice: str = "NATM0", system_prompt: str | None = None,
                       max_steps: int = 75, seed: int | None = None,
                       sample_rate: int | None = None) -> Iterator[AudioChunk]:
        """Like respond(), but yields one AudioChunk per decoded 80 ms frame as soon as it exists."""
        max_steps = self._check_steps(max_steps)
        self._check_voice(voice)
        pcm, _ = self._prepare_audio(audio, sample_rate)
        return self.worker.stream(self._stream_chunks, pcm, voice, system_prompt, max_steps, seed)

    def _stream_chunks(self, pcm, voice, system_prompt, max_steps, seed) -> Iterator[AudioChunk]:
        n = 0
        for a, t in self._turn(pcm, voice, system_prompt, max_steps, seed):
            n += 1
            toks = [t] if t is not None else []
            yield AudioChunk(a, toks, self.decode_text(t), n == max_steps)

    async def arespond_stream(self, audio, voice: str = "NATM0", system_prompt: str | None = None,
                              max_steps: int = 75, seed: int | None = None,
                              sample_rate: int | None = None) -> AsyncIterator[AudioChunk]:
        """asyncio variant of respond_stream()."""
        max_steps = self._check_steps(max_steps)
        self._check_voice(voice)
        pcm, _ = self._prepare_audio(audio, sample_rate)
        async for chunk in self.worker.astream(self._stream_chunks, pcm, voice, system_prompt,
                                               max_steps, seed):
            yield chunk

    async def arespond(self, audio, **kwargs) -> Response:
        """asyncio variant of respond()."""
        import asyncio
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.respond(audio, **kwargs))

    def respond_diagnostic(self, audio, voice: str = "NATM0", system_prompt: str | None = None,
                           max_steps: int = 75, seed: int | None = None,
                           sample_rate: int | None = None) -> tuple[Response, Diagnostics]:
        """respond() plus per-step stage timings, token entropies and hidden-state statistics."""
        max_steps = self._check_steps(max_steps)
        self._check_voice(voice)
        pcm, info = self._prepare_audio(audio, sample_rate)
        diag = Diagnostics(input_info=info)

        def run():
            timer = StageTimer(True)
            frames, tokens = [], []
            with _capture_stats(self.gen, diag):
                for a, t in self._turn(pcm, voice, system_prompt, max_steps, seed, timer, diag):
                    frames.append(a)
                    if t is not None:
                        tokens.append(t)
            diag.step_timings = timer.records[-max_steps:]
            return frames, tokens

        return self._reply(pcm, info, run), diag

    # -- full duplex ---------------------------------------------------------------------------
    def respond_realtime(self, blocks: Iterable[np.ndarray], voice: str = "NATM0",
                         system_prompt: str | None = None, seed: int | None = None) -> Iterator[np.ndarray]:
        """Continuous in, continuous out: an iterable of mic blocks (24 kHz mono, any length) in,
        an iterator of 1920-sample agent blocks out, one per 80 ms of input (the tail is padded).
        Needs no audio device: feed it from files, sockets or numpy."""
        self._check_voice(voice)

        def run():
            from .rt import frozen_heap
            proc = FrameProcessor(self, voice, system_prompt, seed)
            with frozen_heap():
                for frame in rechunk(blocks):
                    yield proc.process(frame).audio

        return self.worker.stream(run, maxsize=8)

    def session(self, **kwargs) -> DuplexSession:
        """A DuplexSession on this model (see engine.session.DuplexSession for arguments)."""
        return DuplexSession(self, **kwargs)


# ----------------------------------------------------------------------------------------------
def _parse_quantize(q):
    if q in (None, "none", "None", "", 0, "bf16", "fp16", "float"):
        return None
    if isinstance(q, str) and q.isdigit():
        q = int(q)
    if q in (4, 8):
        return int(q)
    if isinstance(q, str):
        return q  # a named mixed plan; engine.models.quant validates it
    raise ConfigError(f"quantize={q!r}: use 4, 8, None, or a plan name from engine.models.quant")


def _load_on_worker(files, quantize, dtype, depformer_mode, sampling):
    import mlx.core as mx
    import sentencepiece as spm

    from .models.gen import LmGen, SamplingParams
    from .models.lm import LM
    from .models.mimi import Mimi

    if dtype is None:
        dt = mx.float32 if files.is_tiny else mx.bfloat16
    else:
        try:
            dt = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[str(dtype)]
        except KeyError:
            raise ConfigError(f"dtype={dtype!r}: use float32, bfloat16 or float16") from None
    mimi = Mimi.from_file(files.mimi, num_codebooks=8, config=files.mimi_config())
    if files.layout == "mlx":   # the Swift demo's converted checkpoints: used as they are quantized
        from .models.mlx_layout import load_lm
        lm = load_lm(files.lm_files, config=files.lm_config(), dtype=dt, quantize=quantize,
                     config_raw=files.mlx_config)
    else:
        lm = LM.from_file(files.lm, config=files.lm_config(), dtype=dt, quantize=quantize)
    lm.compile()   # mx.compile'd steps: fewer host ops per step (tested equal to eager)
    gen = LmGen(lm, sampling=sampling or SamplingParams(), depformer_mode=depformer_mode)
    sp = spm.SentencePieceProcessor(model_file=str(files.tokenizer))
    _warm_mimi(mimi)
    return mimi, lm, gen, sp


def _warm_mimi(mimi) -> None:
    """One streaming encode + decode on a throw-away state: compiles the step graphs and JITs their
    kernels at load time instead of in the first live frame."""
    import mlx.core as mx
    st = mimi.make_state(1)
    codes = mimi.encode_step(mx.zeros((1, 1, mimi.frame_size)), st)
    mx.eval(mimi.decode_step(codes, st))


class _capture_stats:
    """Context manager (worker thread): route the generator's logits and the LM's per-layer-group
    hidden states into `diag` for the duration of a diagnostic turn. The LM runs uncompiled meanwhile
    (the hooks read values on the host)."""

    def __init__(self, gen, diag: Diagnostics):
        self.gen, self.lm, self.diag = gen, gen.lm, diag

    def __enter__(self):
        self._compiled = getattr(self.lm, "_compiled", None)
        if self._compiled is not None:
            self.lm.uncompile()
        self.gen.stats_hook = self._record
        self.lm.stats_hook = self._record
        return self

    def _record(self, name: str, x) -> None:
        import mlx.core as mx
        if name == "text_logits":
            self.diag.text_entropy.append(_entropy(x))
        elif name == "audio_logits":
            self.diag.audio_entropy.append(_entropy(x))
        else:
            xf = x.astype(mx.float32)
            self.diag.hidden_stats.append({"name": name, "mean": float(xf.mean().item()),
                                           "std": float(mx.sqrt(xf.var()).item()),
                                           "absmax": float(mx.abs(xf).max().item())})

    def __exit__(self, *exc):
        self.gen.stats_hook = None
        self.lm.stats_hook = None
        if self._compiled is not None:
            self.lm.compile()
