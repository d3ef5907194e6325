"""The 12.5 Hz full-duplex loop: rings -> AEC -> Mimi encode -> LM step -> Mimi decode -> ring.

Two objects live here:

- `FrameProcessor` does the model side of one 80 ms frame (1920 samples in, 1920 out). It owns the
  per-conversation state (Mimi streaming state, generator state with KV cache and token ring, AEC
  state) and must only be used on the model worker thread.
- `DuplexSession` runs the loop on the worker thread against a source (PortAudio device, wav file,
  numpy array, callback) and a sink, paced by the source's clock, with counters and live stats.

Deadline policy (`deadline_policy`), applied when the loop finds more than one frame of captured
audio waiting (it ran late):
- "catch_up" (default): process every waiting frame back to back. Nothing is dropped; the agent's
  voice arrives late by the backlog and the playback ring may underrun meanwhile (the output
  callback plays silence and counts it). If the backlog exceeds `max_backlog_frames`, the oldest
  frames beyond it are dropped as under "drop".
- "drop": keep only the newest frame and discard the older ones; each discarded frame is counted in
  `dropped_input_frames` and its samples in `dropped_input_samples`. Latency stays bounded.
Either way a step that takes longer than the frame period is counted in `deadline_misses`.

Clock drift between capture and playback devices: the loop produces exactly one output frame per
captured frame, so a playback device that runs slower than the capture device fills its ring. When
the playback ring holds more than `prebuffer_frames + drift_margin_frames` frames, the loop skips
pushing one output frame (counted in `drift_skipped_frames`). A faster playback device underruns
(counted by the ring). The capture ring cannot grow without bound: the loop consumes it at the
capture rate, and the drop policy bounds any backlog.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .errors import AudioFormatError, ConfigError, EngineError

_log = logging.getLogger(__name__)

FRAME = 1920
SAMPLE_RATE = 24000
FRAME_SECONDS = FRAME / SAMPLE_RATE

STAGES = ("capture_wait", "aec", "mimi_encode", "temporal", "depformer", "mimi_decode",
          "playback_push", "step")


# ----------------------------------------------------------------------------------------------
# Per-step timing (cheap when off)
# ----------------------------------------------------------------------------------------------
class StageTimer:
    """Per-stage durations (ms) of each step when enabled; a no-op otherwise.

    A step is `begin()`, then `mark(stage, *arrays)` after each stage, then `end()`. A mark charges
    the time since the previous mark (or `begin`) to `stage`; with arrays it first evaluates them
    (mx.eval), so MLX's lazy work is charged to the stage that queued it. Those host syncs are why
    timing is off in normal runs. `end()` stores the record with `step` = the sum of every stage
    but "capture_wait" (the loop's work for the frame, waiting excluded), so the stages add up to
    the step exactly. Disabled, each call is one attribute test: no clock reads, no evals, no records.
    """

    WAIT_STAGE = "capture_wait"

    def __init__(self, enabled: bool = False):
        self.enabled = bool(enabled)
        self.records: list[dict[str, float]] = []
        self._current: dict[str, float] | None = None
        self._t = 0.0

    def begin(self) -> None:
        if self.enabled:
            self._current = {}
            self._t = time.perf_counter()

    def mark(self, stage: str, *arrays: Any) -> None:
        if not self.enabled or self._current is None:
            return
        if arrays:
            import mlx.core as mx
            mx.eval(*arrays)
        now = time.perf_counter()
        self._current[stage] = self._current.get(stage, 0.0) + (now - self._t) * 1e3
        self._t = now

    def end(self, **extra: float) -> None:
        """Close the step's record; `extra` values are stored as they are (a given `step` wins)."""
        if not self.enabled or self._current is None:
            return
        rec = self._current
        rec["step"] = sum(v for k, v in rec.items() if k != self.WAIT_STAGE)
        rec.update(extra)
        self.records.append(rec)
        self._current = None


# ----------------------------------------------------------------------------------------------
# Model side of one frame
# ----------------------------------------------------------------------------------------------
@dataclass
class FrameResult:
    audio: np.ndarray             # (1920,) float32, the agent's voice for this frame
    text_token: int | None        # sampled text id (None before the delays allow output)
    text: str                     # its piece ("" for padding / silent ids)
    step_ms: float                # model time of this frame (AEC + encode + step + decode)


class FrameProcessor:
    """One conversation's model state; `process(mic, far)` advances it by one 80 ms frame.

    Worker thread only. `model` is a loaded `engine.api.PersonaPlex`.
    """

    def __init__(self, model, voice: str = "NATM0", system_prompt: str | None = None,
                 seed: int | None = None, aec=None, timer: StageTimer | None = None):
        self.model = model
        self.voice = voice
        self.system_prompt = system_prompt
        self.seed = seed
        self.aec = aec
        self.timer = timer or StageTimer(False)
        self.frames = 0
        self.clipped_samples = 0
        # Optional host-side timeline (benchmarks): a list that gets, per frame, the perf_counter
        # times (start, aec done, encode queued, LM step queued, decode queued, audio on the host).
        # No syncs are added, so it shows where the host waits, not what the GPU does.
        self.trace: list | None = None
        self.reset()

    def reset(self) -> None:
        """New conversation: fresh prompt state (from the model's prompt cache), Mimi and AEC state."""
        self.gen_state = self.model.prompts.state(self.voice, self.system_prompt, self.seed)
        self.mimi_state = self.model.mimi.make_state(1)
        if self.aec is not None:
            self.aec.reset()
        self.frames = 0

    def process(self, mic: np.ndarray, far: np.ndarray | None = None) -> FrameResult:
        import mlx.core as mx

        t0 = time.perf_counter()
        tm = self.timer
        if self.aec is not None and far is not None:
            mic = self.aec.process(mic, far)
        self.last_mic = mic            # what the model heard (after echo cancellation)
        tm.mark("aec")
        t_aec = time.perf_counter()
        x = mx.array(np.ascontiguousarray(mic, dtype=np.float32).reshape(1, 1, FRAME))
        codes = self.model.mimi.encode_step(x, self.mimi_state)          # (1, K, 1)
        tm.mark("mimi_encode", codes)
        t_enc = time.perf_counter()
        user = codes[:, : self.model.lm_codebooks, 0]
        probe = (lambda stage: tm.mark(stage)) if tm.enabled else None
        out = self.model.gen.step(self.gen_state, user_codes=user, probe=probe)
        t_lm = time.perf_counter()
        if out is None:
            audio = np.zeros(FRAME, np.float32)
            token = None
            tm.mark("mimi_decode")
        else:
            pcm = self.model.mimi.decode_step(out.agent_codes[:, :, None], self.mimi_state)
            t_dec = time.perf_counter()
            mx.eval(pcm, out.text)
            audio = np.array(pcm, dtype=np.float32).reshape(-1)
            token = int(np.array(out.text).reshape(-1)[0])
            over = np.abs(audio) > 1.0
            if over.any():     # a device would clip anyway; clip here so the AEC's far end is exact
                self.clipped_samples += int(np.count_nonzero(over))
                np.clip(audio, -1.0, 1.0, out=audio)
            tm.mark("mimi_decode")
        self.frames += 1
        text = self.model.decode_text(token) if token is not None else ""
        t1 = time.perf_counter()
        if self.trace is not None:
            self.trace.append((t0, t_aec, t_enc, t_lm, t_dec if out is not None else t_lm, t1))
        return FrameResult(audio, token, text, (t1 - t0) * 1e3)


# ----------------------------------------------------------------------------------------------
# Sources and sinks
# ----------------------------------------------------------------------------------------------
class Source:
    """Where microphone audio comes from. `read(n)` returns up to n new samples (float32, 24 kHz)."""

    realtime = False          # True when the source runs on its own clock (a device)
    ring = None               # capture RingBuffer if any (stats)

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def available(self) -> int:
        raise NotImplementedError

    def read(self, n: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def exhausted(self) -> bool:
        return False


class Sink:
    """Where the agent's audio goes."""

    ring = None

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def write(self, frame: np.ndarray) -> None:
        raise NotImplementedError

    def fill(self) -> int:
        """Samples queued but not yet played (0 for file/array sinks)."""
        return 0


class ArraySource(Source):
    """Audio from a numpy array (or a wav file loaded into one). Paced by the wall clock when
    `realtime` is true, else as fast as possible. The tail is padded to a whole frame."""

    def __init__(self, audio: np.ndarray, realtime: bool = False, info: str = ""):
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        self.info = info          # what the input was and how it was converted (load_audio's info)
        pad = (-len(audio)) % FRAME
        self.audio = np.concatenate([audio, np.zeros(pad, np.float32)]) if pad else audio
        self.pos = 0
        self.realtime = realtime
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.monotonic()

    def available(self) -> int:
        left = len(self.audio) - self.pos
        if not self.realtime:
            return left
        if self._t0 is None:
            self._t0 = time.monotonic()
        produced = int((time.monotonic() - self._t0) * SAMPLE_RATE)
        return max(0, min(left, produced - self.pos))

    def read(self, n: int) -> np.ndarray:
        n = min(n, len(self.audio) - self.pos)
        out = self.audio[self.pos:self.pos + n]
        self.pos += n
        return out

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.audio)


class CallbackSource(Source):
    """Pull audio from a user callback `fn(n) -> np.ndarray | None` (None ends the session)."""

    def __init__(self, fn: Callable[[int], np.ndarray | None]):
        self.fn = fn
        self._buf = np.zeros(0, np.float32)
        self._done = False

    def available(self) -> int:
        if len(self._buf) < FRAME and not self._done:
            block = self.fn(FRAME)
            if block is None:
                self._done = True
            else:
                self._buf = np.concatenate([self._buf, np.asarray(block, np.float32).reshape(-1)])
        return len(self._buf) if (len(self._buf) >= FRAME or self._done) else 0

    def read(self, n: int) -> np.ndarray:
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    @property
    def exhausted(self) -> bool:
        return self._done and len(self._buf) == 0


class ListSink(Sink):
    """Collects output frames in memory (`.audio()` concatenates them)."""

    def __init__(self):
        self.frames: list[np.ndarray] = []

    def write(self, frame: np.ndarray) -> None:
        self.frames.append(np.array(frame, np.float32, copy=True))

    def audio(self) -> np.ndarray:
        return np.concatenate(self.frames) if self.frames else np.zeros(0, np.float32)


class WavSink(ListSink):
    """Writes the output to a 24 kHz mono wav file when the session stops."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def stop(self) -> None:
        from .audio.wav import write_wav
        write_wav(self.path, self.audio(), SAMPLE_RATE)


class CallbackSink(Sink):
    def __init__(self, fn: Callable[[np.ndarray], None]):
        self.fn = fn

    def write(self, frame: np.ndarray) -> None:
        self.fn(frame)


class DeviceIO(Source, Sink):
    """PortAudio input + output through two lock-free rings (callbacks copy only)."""

    realtime = True

    def __init__(self, input_device=None, output_device=None, blocksize: int = 480,
                 ring_seconds: float = 2.0, *, virtual: dict | None = None):
        from .audio.ring import RingBuffer

        cap = 1 << int(np.ceil(np.log2(ring_seconds * SAMPLE_RATE)))
        self.ring = RingBuffer(cap)                      # capture: refuse new samples on overflow
        self.play_ring = RingBuffer(cap)
        if virtual is not None:
            from .audio.virtual import VirtualStream
            self.stream = VirtualStream(self.ring, self.play_ring, blocksize=blocksize, **virtual)
        else:
            from .audio.io import open_duplex
            self.stream = open_duplex(self.ring, self.play_ring, input_device=input_device,
                                      output_device=output_device, blocksize=blocksize)
        self.captured_total = 0

    @classmethod
    def simulated(cls, source=None, sink=None, blocksize: int = 480, **kwargs) -> "DeviceIO":
        """A device driven by a thread at the audio clock (engine.audio.virtual): the real rings and
        loop without a sound card. `source(n)` gives mic samples, `sink(block)` receives playback;
        kwargs: echo_gain, echo_delay, speed."""
        return cls(blocksize=blocksize, virtual=dict(source=source, sink=sink, **kwargs))

    def start(self) -> None:
        self.stream.start()

    def stop(self) -> None:
        self.stream.stop()
        self.stream.close()

    def available(self) -> int:
        return self.ring.available_read

    def read(self, n: int) -> np.ndarray:
        out = self.ring.read(n)
        self.captured_total += len(out)
        return out

    def write(self, frame: np.ndarray) -> None:
        self.play_ring.write(np.ascontiguousarray(frame, np.float32))

    def fill(self) -> int:
        return self.play_ring.available_read

    def latency_samples(self) -> int:
        """PortAudio's reported input + output latency (an upper bound of the echo lag)."""
        lat = self.stream.latencies
        return int((lat["input"] + lat["output"] + lat.get("resampler", 0.0)) * SAMPLE_RATE)


def make_source(source, realtime: bool, sample_rate: int | None = None) -> Source:
    """A Source for `source`; wav files and arrays of any rate and channel count are converted to
    24 kHz mono (`sample_rate`: the rate of an array; the returned source's `info` says what was done)."""
    if isinstance(source, Source):
        return source
    if isinstance(source, np.ndarray) or isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        from .audio.wav import load_audio
        audio, info = load_audio(source, sample_rate)
        return ArraySource(audio, realtime=realtime, info=info)
    if callable(source):
        return CallbackSource(source)
    raise ConfigError(f"unsupported source {type(source).__name__}: pass 'device', a wav path, "
                      "a numpy array, a callable fn(n) -> samples, or a Source")


def make_sink(sink) -> Sink:
    if sink is None:
        return ListSink()
    if isinstance(sink, Sink):
        return sink
    if callable(sink):
        return CallbackSink(sink)
    if isinstance(sink, (str, bytes)) or hasattr(sink, "__fspath__"):
        return WavSink(sink)
    raise ConfigError(f"unsupported sink {type(sink).__name__}: pass 'device', a wav path, "
                      "a callable fn(frame), a Sink, or None (collect in memory)")


# ----------------------------------------------------------------------------------------------
# Echo-path delay tracking for the AEC
# ----------------------------------------------------------------------------------------------
class EchoDelayTracker:
    """Keeps the AEC's far-end delay aligned with the measured speaker-to-mic lag.

    PortAudio's reported latencies overestimate the real echo lag (measured through PulseAudio:
    77 ms real vs 100 ms reported at blocksize 480), so the lag is measured from the signals: every
    `every_frames` steps, when the agent was audible, the raw mic (before AEC) is cross-correlated
    with what was pushed to the speaker (GCC-PHAT, engine.audio.aec.estimate_delay). A confident
    estimate that differs from the current delay by more than `tolerance` resets the delay line
    to lag - `margin` (the margin keeps the direct path inside the adaptive filter).
    """

    def __init__(self, aec, window_frames: int = 25, every_frames: int = 25, margin: int = 240,
                 tolerance: int = 240, min_confidence: float = 8.0):
        self.aec = aec
        self.window = window_frames
        self.every = every_frames
        self.margin, self.tolerance, self.min_conf = margin, tolerance, min_confidence
        self._near: deque[np.ndarray] = deque(maxlen=window_frames)
        self._far: deque[np.ndarray] = deque(maxlen=window_frames)
        self.frames = 0
        self.updates = 0
        self.last_lag: int | None = None
        self.last_confidence = 0.0

    def shift(self, samples: int) -> None:
        """The playback timeline moved by `samples` (silence inserted on underrun: +, a frame
        skipped: -): move the AEC delay with it and forget the windows measured before the move."""
        self.aec.set_delay(int(min(max(0, self.aec.delay + samples), 10 * SAMPLE_RATE)))
        self._near.clear()
        self._far.clear()
        self.frames = 0

    def observe(self, near: np.ndarray, far: np.ndarray) -> None:
        self._near.append(near)
        self._far.append(far)
        self.frames += 1
        # First estimate after ~1 s of audio (so the filter converges early), then every `every` frames.
        first = self.frames == max(2, self.window // 2) and self.updates == 0
        if not first and (self.frames % self.every or len(self._near) < self.window):
            return
        far_all = np.concatenate(self._far)
        if float(np.sqrt(np.mean(far_all * far_all))) < 1e-3:   # speaker silent: nothing to measure
            return
        from .audio.aec import estimate_delay
        lag, conf = estimate_delay(np.concatenate(self._near), far_all,
                                   max_delay=(self.window - 1) * FRAME)
        self.last_lag, self.last_confidence = lag, conf
        if conf >= self.min_conf and abs((lag - self.margin) - self.aec.delay) > self.tolerance:
            self.aec.set_delay(max(0, lag - self.margin))
            self.updates += 1
            self._near.clear()
            self._far.clear()
            self.frames = 0


# ----------------------------------------------------------------------------------------------
# The session
# ----------------------------------------------------------------------------------------------
@dataclass
class Event:
    kind: str                  # "text" | "user_text" | "state" | "stats" | "error"
    value: Any
    frame: int
    time: float = field(default_factory=time.monotonic)


@dataclass
class SessionStats:
    frames: int = 0
    step_ms_p50: float = 0.0
    step_ms_p99: float = 0.0
    step_ms_max: float = 0.0
    deadline_misses: int = 0
    late_frames: int = 0
    dropped_input_frames: int = 0
    dropped_input_samples: int = 0
    drift_skipped_frames: int = 0
    capture_fill: int = 0
    playback_fill: int = 0
    capture_overflow: int = 0
    playback_underrun: int = 0
    device_restarts: int = 0   # audio device streams that died (host API error) and were reopened
    samples_in: int = 0
    samples_out: int = 0
    clipped_samples: int = 0
    events_dropped: int = 0
    aec: bool = False
    aec_delay_ms: float = 0.0
    state: str = "idle"
    thread_priority: str = "default"
    user_utterances: int = 0   # --asr: utterances the VAD cut from what the model heard
    asr_dropped: int = 0       # utterances not transcribed: the recognizer was max_pending behind
    asr_failed: int = 0        # utterances whose recognition failed, or not back by the end (asr_drain_s)

    def health_line(self) -> str:
        """One short line: step time p50/p99, mic and speaker buffer fill, then the counters that are
        not zero: deadline misses, playback underrun samples, capture overflow samples, dropped input
        frames, audio streams reopened ("no misses, no losses" when all are zero)."""
        issues = [f"{name} {n}" for name, n in (
            ("miss", self.deadline_misses), ("underrun", self.playback_underrun),
            ("overflow", self.capture_overflow), ("drop", self.dropped_input_frames),
            ("restart", self.device_restarts)) if n]
        return (f"step {self.step_ms_p50:.1f}/{self.step_ms_p99:.1f} ms | mic "
                f"{self.capture_fill / SAMPLE_RATE * 1e3:.0f} out {self.playback_fill / SAMPLE_RATE * 1e3:.0f} ms"
                f" | {' '.join(issues) or 'no misses, no losses'}")


class DuplexSession:
    """An embeddable full-duplex conversation.

    >>> with model.session(source="device", sink="device", voice="NATF2") as s:
    ...     for ev in s.events():
    ...         if ev.kind == "text": print(ev.value, end="")

    `source`: "device" (PortAudio input), a wav path (any rate and channel count), a numpy array
    (24 kHz mono float32, or any rate with `sample_rate=` and any channel count), a callable
    `fn(n) -> samples | None`, or a `Source`; files and arrays are downmixed and resampled to 24 kHz
    mono and `input_info` says what was converted. `sink`: "device", a wav path, a callable `fn(frame)`,
    a `Sink`, or None (kept in memory, see `output_audio()`). File and array sources run in real time
    when `realtime=True`, else as fast as possible. `DeviceIO.simulated(...)` passed as both source
    and sink runs the real rings and loop on a simulated device clock (tests, soak runs).
    `on_text(piece)` gets each text piece; `on_mic(raw, heard)` gets each mic frame before and after AEC.
    """

    def __init__(self, model, *, source="device", sink="device", voice: str = "NATM0",
                 system_prompt: str | None = None, seed: int | None = None, aec: bool | None = None,
                 deadline_policy: str = "catch_up", max_backlog_frames: int = 5,
                 prebuffer_frames: int = 1, drift_margin_frames: int = 3, realtime: bool | None = None,
                 input_device=None, output_device=None, blocksize: int = 480,
                 max_frames: int | None = None, on_text: Callable[[str], None] | None = None,
                 on_mic: Callable[[np.ndarray, np.ndarray], None] | None = None,
                 profile: bool = False, event_queue_size: int = 1024, record_steps: bool = False,
                 thread_priority: bool = False, sample_rate: int | None = None, asr=None,
                 asr_silence_ms: float = 800, asr_drain_s: float = 5.0):
        if deadline_policy not in ("catch_up", "drop"):
            raise ConfigError(f"deadline_policy={deadline_policy!r}: use 'catch_up' or 'drop'")
        if max_backlog_frames < 1:
            raise ConfigError(f"max_backlog_frames={max_backlog_frames}: must be >= 1")
        self.model = model
        self.voice, self.system_prompt, self.seed = voice, system_prompt, seed
        model._check_voice(voice)
        # source/sink "device": PortAudio; a DeviceIO instance (e.g. DeviceIO.simulated()) as both.
        src_dev = isinstance(source, DeviceIO) or (isinstance(source, str) and source == "device")
        sink_dev = isinstance(sink, DeviceIO) or (isinstance(sink, str) and sink == "device")
        device = source if isinstance(source, DeviceIO) else sink if isinstance(sink, DeviceIO) else None
        if device is None and (src_dev or sink_dev):
            device = DeviceIO(input_device=input_device, output_device=output_device,
                              blocksize=blocksize)
        if src_dev:
            self.source: Source = device
        else:
            self.source = make_source(source, realtime=bool(realtime), sample_rate=sample_rate)
        # What a file or array input was and how it was converted (e.g. downmixed, resampled).
        self.input_info: str = getattr(self.source, "info", "")
        self.sink: Sink = device if sink_dev else make_sink(sink)
        self.device = device
        self.aec_enabled = (src_dev and sink_dev) if aec is None else bool(aec)
        self.policy = deadline_policy
        self.max_backlog = max_backlog_frames
        self.prebuffer = prebuffer_frames
        self.drift_margin = drift_margin_frames
        self.max_frames = max_frames
        self.on_text = on_text
        self.on_mic = on_mic
        # Opt-in full history of step times (ms, float32: 4 bytes a step) for soak runs.
        self.step_log = array("f") if record_steps else None
        # Opt-in: run the loop's thread in the real-time scheduling class while the session is
        # live (engine.rt; falls back to a lower nice value, or nothing, without the privilege).
        self.thread_priority = bool(thread_priority)
        self.timer = StageTimer(profile)
        self._events: "queue.Queue[Event]" = queue.Queue(maxsize=event_queue_size)
        self._stop = threading.Event()
        self._reset_req = threading.Event()
        self._future = None
        self._stats = SessionStats(aec=self.aec_enabled)
        self._step_ms: deque[float] = deque(maxlen=500)
        self._stats_lock = threading.Lock()
        self.transcript: list[str] = []
        self.delay_tracker: EchoDelayTracker | None = None
        self.error: BaseException | None = None
        # Optional transcript of the user (engine.asr): None uses the model's recognizer if it has
        # one, False none, a model name a recognizer of this session's own, or a Recognizer.
        self._asr_owned = False
        if asr is None:
            asr = getattr(model, "asr", None)
        elif isinstance(asr, (str, bytes)) or hasattr(asr, "__fspath__"):
            from .asr import Recognizer
            asr, self._asr_owned = Recognizer(asr), True
        self.asr = asr or None
        self.asr_silence_ms, self.asr_drain_s = float(asr_silence_ms), float(asr_drain_s)
        self.user_transcript: list = []      # engine.asr.Transcript per utterance, in order
        self._asr_jobs: deque = deque()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "DuplexSession":
        if self._future is not None:
            raise EngineError("session already started; create a new DuplexSession or call reset()")
        self._future = self.model.worker.submit(self._run)
        return self

    def stop(self, timeout: float | None = 10.0) -> SessionStats:
        """End the session: ask the loop to stop, wait for it (at most `timeout` s) and return the
        final stats. A session still queued behind other work on the model worker is cancelled.

        Raises whatever ended the loop (also in `self.error`): an error in a step or a callback,
        or one from stopping the source or sink (e.g. a wav sink that cannot write its file).
        Raises EngineError when the loop has not ended within `timeout`.
        """
        self._stop.set()
        fut = self._future
        if fut is None:
            return self.stats()
        if fut.cancel():                  # never started: nothing ran, nothing to clean up
            self._stats.state = "stopped"
            return self.stats()
        try:
            fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            if fut.done():                # the loop itself raised a TimeoutError
                raise
            raise EngineError(f"the session loop did not stop within {timeout} s and is still "
                              "running on the model worker; call stop() again to wait longer") from None
        return self.stats()

    def wait(self, timeout: float | None = None) -> SessionStats:
        """Block until the source is exhausted (files/arrays) or `max_frames` were processed."""
        if self._future is None:
            raise EngineError("session not started")
        self._future.result(timeout=timeout)
        return self.stats()

    def reset(self) -> None:
        """Start a new conversation (fresh prompt state) without reloading weights."""
        self._reset_req.set()

    @property
    def running(self) -> bool:
        return self._future is not None and not self._future.done()

    def __enter__(self) -> "DuplexSession":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stop()
        except BaseException as e:
            if e is not exc:              # not the loop's error already on its way (from wait())
                raise

    # -- outputs -------------------------------------------------------------------------------
    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Iterate events (text pieces, state changes) until the session ends."""
        while True:
            try:
                ev = self._events.get(timeout=0.1)
            except queue.Empty:
                if not self.running:
                    return
                continue
            yield ev

    def output_audio(self) -> np.ndarray:
        if isinstance(self.sink, ListSink):
            return self.sink.audio()
        raise EngineError("output_audio() needs sink=None (in-memory sink)")

    def stats(self) -> SessionStats:
        with self._stats_lock:
            s = SessionStats(**self._stats.__dict__)
            times = np.array(self._step_ms) if self._step_ms else None
        if times is not None:
            s.step_ms_p50 = float(np.percentile(times, 50))
            s.step_ms_p99 = float(np.percentile(times, 99))
            s.step_ms_max = float(times.max())
        src_ring = getattr(self.source, "ring", None)
        if src_ring is not None:
            s.capture_fill = src_ring.available_read
            s.capture_overflow = src_ring.overflow_count
        if self.device is not None:
            s.playback_fill = self.device.play_ring.available_read
            s.playback_underrun = self.device.play_ring.underrun_count
            s.device_restarts = int(self.device.stream.counters.get("stream_restarts", 0))
        s.events_dropped = self._events_dropped
        proc = getattr(self, "processor", None)
        if proc is not None:
            s.clipped_samples = proc.clipped_samples
        if self.delay_tracker is not None:
            s.aec_delay_ms = self.delay_tracker.aec.delay / SAMPLE_RATE * 1e3
        return s

    _events_dropped = 0

    def _emit(self, kind: str, value: Any, frame: int) -> None:
        try:
            self._events.put_nowait(Event(kind, value, frame))
        except queue.Full:
            self._events_dropped += 1

    # -- the user's transcript (engine.asr) ------------------------------------------------------
    def _asr_feed(self, heard: np.ndarray | None, frame: int, drain: bool = False) -> None:
        """Cut what the model heard into utterances (None: the end of the stream, the utterance in
        progress is cut there), hand them to the recognizer and emit the transcripts that are
        back, in utterance order. Live sources never wait here: a recognizer `max_pending` behind
        drops the utterance (counted). File and array sources have no deadline: they wait for room
        instead (up to 600 s an utterance). `drain` (the end of the session): wait for every
        transcript, `asr_drain_s` at most for a live source."""
        st, rec = self._stats, self.asr
        wait_for_room = not self.source.realtime
        for u in (self._asr_cutter.feed(heard) if heard is not None else self._asr_cutter.flush()):
            st.user_utterances += 1
            while (wait_for_room and len(self._asr_jobs) >= rec.max_pending
                   and self._asr_emit(self._asr_jobs[0], frame, timeout=600.0)):
                pass
            job = rec.submit(u.audio, u.sample_rate, index=u.index, start_s=u.start_s, end_s=u.end_s)
            if job is None:
                st.asr_dropped += 1
            else:
                self._asr_jobs.append(job)
        deadline = time.monotonic() + (self.asr_drain_s if self.source.realtime else 600.0 * len(self._asr_jobs))
        while self._asr_jobs:
            left = max(0.0, deadline - time.monotonic()) if drain else 0.0
            if not self._asr_emit(self._asr_jobs[0], frame, timeout=left):
                if drain:     # not back in time: counted as failed, their late results dropped
                    st.asr_failed += len(self._asr_jobs)
                    for job in self._asr_jobs:
                        rec.discard(job)
                    self._asr_jobs.clear()
                return

    def _asr_emit(self, job, frame: int, timeout: float) -> bool:
        tr = self.asr.result(job, timeout)
        if tr is None:
            return False
        self._asr_jobs.popleft()
        if tr.error is not None:
            self._stats.asr_failed += 1
            return True
        self.user_transcript.append(tr)
        self._emit("user_text", tr.text, frame)
        return True

    # -- the loop (worker thread) --------------------------------------------------------------
    def _make_processor(self) -> FrameProcessor:
        aec = None
        if self.aec_enabled:
            from .audio.aec import EchoCanceller
            aec = EchoCanceller(sample_rate=SAMPLE_RATE, filter_ms=150)
            if self.device is not None:
                # First guess until the tracker has measured the lag: the echo in the mic frame read
                # now was played (queued playback + device latencies) ago, and the far-end we pass
                # is the frame pushed one step earlier.
                delay = self.prebuffer * FRAME + self.device.latency_samples() - FRAME
                aec.set_delay(max(0, delay - 480))
            self.delay_tracker = EchoDelayTracker(aec)
        return FrameProcessor(self.model, self.voice, self.system_prompt, self.seed, aec=aec,
                              timer=self.timer)

    def _run(self) -> None:
        from .rt import boost_current_thread, frozen_heap

        st = self._stats
        undo_priority = None
        heap = contextlib.ExitStack()
        try:
            if self.thread_priority:
                st.thread_priority, undo_priority = boost_current_thread()
            st.state = "prompting"
            self._emit("state", "prompting", 0)
            proc = self._make_processor()
            self.processor = proc
            heap.enter_context(frozen_heap())     # weights, caches, prompt state: frozen while live
            self.source.start()
            if self.sink is not self.source:
                self.sink.start()
            silence = np.zeros(FRAME, np.float32)
            for _ in range(self.prebuffer if self.source.realtime else 0):
                self.sink.write(silence)
            last_out = silence
            last_underrun = self.device.play_ring.underrun_count if self.device is not None else 0
            if self.asr is not None:
                from .audio.vad import UtteranceCutter
                self._asr_cutter = UtteranceCutter(silence_ms=self.asr_silence_ms)
            st.state = "live"
            self._emit("state", "live", 0)
            period = FRAME_SECONDS
            while not self._stop.is_set():
                if self._reset_req.is_set():
                    self._reset_req.clear()
                    proc.reset()
                    self._emit("state", "reset", st.frames)
                if self.max_frames is not None and st.frames >= self.max_frames:
                    break
                self.timer.begin()
                avail = self.source.available()
                while avail < FRAME:
                    if self.source.exhausted or self._stop.is_set():
                        break
                    time.sleep(0.002)
                    avail = self.source.available()
                if avail < FRAME and not (avail > 0 and self.source.exhausted):
                    break     # stopped, or the source ended on a frame boundary (a partial tail is padded)
                self.timer.mark("capture_wait")
                backlog = avail // FRAME
                if self.source.realtime and backlog > 1:
                    st.late_frames += backlog - 1
                    keep = 1 if self.policy == "drop" else self.max_backlog
                    if backlog > keep:
                        n_drop = (backlog - keep) * FRAME
                        dropped = self.source.read(n_drop)
                        with self._stats_lock:
                            st.dropped_input_frames += backlog - keep
                            st.dropped_input_samples += len(dropped)
                            st.samples_in += len(dropped)
                        if proc.aec is not None:   # the mic jumped ahead of the far-end stream
                            self.delay_tracker.shift(-len(dropped))
                mic = self.source.read(FRAME)
                st.samples_in += len(mic)
                if len(mic) < FRAME:
                    mic = np.concatenate([mic, np.zeros(FRAME - len(mic), np.float32)])
                t0 = time.perf_counter()
                if proc.aec is not None:
                    if self.device is not None:
                        # Silence the speaker played on underrun delayed everything after it.
                        under = self.device.play_ring.underrun_count
                        if under > last_underrun:
                            self.delay_tracker.shift(under - last_underrun)
                        last_underrun = under
                    self.delay_tracker.observe(mic, last_out)
                res = proc.process(mic, last_out if proc.aec is not None else None)
                if self.on_mic is not None:
                    self.on_mic(mic, proc.last_mic)
                out = res.audio
                if (self.source.realtime and self.sink.fill() >
                        (self.prebuffer + self.drift_margin) * FRAME):
                    st.drift_skipped_frames += 1
                    if proc.aec is not None:   # this frame is never played: later ones come earlier
                        self.delay_tracker.shift(-FRAME)
                else:
                    self.sink.write(out)
                    st.samples_out += FRAME
                last_out = out
                if self.asr is not None:
                    self._asr_feed(proc.last_mic, st.frames + 1)
                self.timer.mark("playback_push")
                step_ms = (time.perf_counter() - t0) * 1e3
                self.timer.end()
                with self._stats_lock:
                    st.frames += 1
                    self._step_ms.append(step_ms)
                    if self.step_log is not None:
                        self.step_log.append(step_ms)
                    if step_ms > period * 1e3:
                        st.deadline_misses += 1
                if res.text:
                    self.transcript.append(res.text)
                    self._emit("text", res.text, st.frames)
                    if self.on_text is not None:
                        self.on_text(res.text)
            if self.asr is not None:        # the utterance in progress, then what is still queued
                self._asr_feed(None, st.frames, drain=True)
        except BaseException as exc:  # noqa: BLE001 - surfaced through stop()/wait()/error
            self.error = exc
            st.state = "error"
            self._emit("error", exc, st.frames)
            raise
        finally:
            heap.close()
            if undo_priority is not None:     # the worker thread outlives the session
                undo_priority()
            if self._asr_owned:
                self.asr.close()
            stop_error = None
            for part in {id(self.source): self.source, id(self.sink): self.sink}.values():
                try:
                    part.stop()
                except Exception as e:  # noqa: BLE001 - stop the other part too, then report it
                    if self.error is not None or stop_error is not None:
                        _log.error("stopping %s failed after an earlier error: %r", type(part).__name__, e)
                    else:
                        stop_error = e
            if stop_error is not None:        # the loop itself ended cleanly: this is the error
                self.error = stop_error
                st.state = "error"
                self._emit("error", stop_error, st.frames)
            if st.state != "error":
                st.state = "stopped"
            self._emit("state", st.state, st.frames)
            if stop_error is not None:
                raise stop_error


# ----------------------------------------------------------------------------------------------
# Generator-level API: blocks in -> blocks out
# ----------------------------------------------------------------------------------------------
def rechunk(blocks: Iterable[np.ndarray], size: int = FRAME, pad_tail: bool = True) -> Iterator[np.ndarray]:
    """Turn an iterable of arbitrary-length 1-D float blocks into exact `size`-sample frames."""
    buf = np.zeros(0, np.float32)
    for block in blocks:
        arr = np.asarray(block)
        if arr.dtype == np.int16:
            arr = arr.astype(np.float32) / 32768.0
        arr = arr.astype(np.float32, copy=False).reshape(-1)
        if not np.all(np.isfinite(arr)):
            raise AudioFormatError("input block contains NaN or inf samples; clean the signal first")
        buf = np.concatenate([buf, arr]) if len(buf) else arr
        while len(buf) >= size:
            yield buf[:size]
            buf = buf[size:]
    if len(buf) and pad_tail:
        yield np.concatenate([buf, np.zeros(size - len(buf), np.float32)])
