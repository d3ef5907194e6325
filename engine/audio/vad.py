"""Voice activity detection and end-of-turn detection with webrtcvad (turn-based mode).

webrtcvad accepts only 8/16/32/48 kHz and 10/20/30 ms frames, so `Vad` resamples the 24 kHz
stream to 16 kHz (engine.audio.resample) and cuts it into VAD frames. `Endpointer` turns the
per-frame decisions into turn events: "start" once `start_ms` of speech arrived, "end" after
`silence_ms` (1.5 s by default) of non-speech following it. `UtteranceCutter` cuts the stream into
utterances at those events (the user's transcript, engine.asr). Pure frame processors: no I/O,
no threads.
"""
from __future__ import annotations

from dataclasses import dataclass as _dataclass

import numpy as _np

from ..errors import AudioFormatError, ConfigError, MissingLibraryError
from .resample import StreamingResampler as _StreamingResampler

__all__ = ["Vad", "Endpointer", "TurnEvent", "Utterance", "UtteranceCutter", "VAD_RATE"]

VAD_RATE = 16000


def _import_webrtcvad():
    try:
        import webrtcvad
    except ImportError as e:
        raise MissingLibraryError(
            "webrtcvad is not installed (needed by the turn-based mode): `pip install webrtcvad-wheels` "
            f"(or `pip install 'personaplex-engine[audio]'`); import failed with: {e}") from e
    return webrtcvad


class Vad:
    """Per-frame speech / non-speech decisions for a mono float32 stream.

    Args:
        aggressiveness: webrtcvad mode 0 (least) .. 3 (most aggressive in rejecting non-speech).
        sample_rate: rate of the input stream.
        frame_ms: VAD frame, 10, 20 or 30 ms.

    Raises:
        MissingLibraryError: webrtcvad is missing.  ConfigError: bad parameter.
    """

    def __init__(self, aggressiveness: int = 2, sample_rate: int = 24000, frame_ms: int = 30):
        if aggressiveness not in (0, 1, 2, 3):
            raise ConfigError(f"VAD aggressiveness must be 0, 1, 2 or 3, got {aggressiveness!r}")
        if frame_ms not in (10, 20, 30):
            raise ConfigError(f"VAD frame_ms must be 10, 20 or 30, got {frame_ms!r}")
        self._vad = _import_webrtcvad().Vad(int(aggressiveness))
        self.sample_rate, self.frame_ms = int(sample_rate), int(frame_ms)
        self.frame_len = VAD_RATE * frame_ms // 1000  # samples at 16 kHz
        self._resampler = None if self.sample_rate == VAD_RATE else _StreamingResampler(self.sample_rate, VAD_RATE)
        self._pending = _np.zeros(0, _np.float32)

    @property
    def frame_samples(self) -> int:
        """Input samples (at `sample_rate`) per VAD frame."""
        return self.sample_rate * self.frame_ms // 1000

    def reset(self) -> None:
        if self._resampler is not None:
            self._resampler.reset()
        self._pending = _np.zeros(0, _np.float32)

    def process(self, block) -> list[bool]:
        """Feed samples; returns one decision per VAD frame completed by this block (maybe none)."""
        x = _np.asarray(block)
        if x.ndim != 1 or not _np.issubdtype(x.dtype, _np.floating):
            raise AudioFormatError(f"VAD input must be a 1-D float block, got shape {x.shape} dtype {x.dtype}")
        if not _np.isfinite(x).all():
            raise AudioFormatError("VAD input contains NaN or inf")
        y = x.astype(_np.float32) if self._resampler is None else self._resampler.process(x)
        buf = _np.concatenate([self._pending, y])
        n = buf.size // self.frame_len
        pcm = _np.clip(_np.rint(buf[: n * self.frame_len] * 32768.0), -32768, 32767).astype("<i2")
        self._pending = buf[n * self.frame_len:]
        step = 2 * self.frame_len
        raw = pcm.tobytes()
        return [self._vad.is_speech(raw[i * step:(i + 1) * step], VAD_RATE) for i in range(n)]


@_dataclass(frozen=True)
class TurnEvent:
    """kind: "start" (speech began) or "end" (the turn ended); sample: input sample index where it happened."""

    kind: str
    sample: int


class Endpointer:
    """Says when the user's turn ended: after `silence_ms` of non-speech that follows speech.

    Args:
        silence_ms: silence that ends a turn (default 1500 ms).
        start_ms: speech needed before a turn counts as started (webrtcvad holds a 20 ms click for ~120 ms).
        sample_rate, aggressiveness, frame_ms: passed to `Vad`.

    `feed(block)` returns the events completed by the block. After "end" it listens for the next turn.
    """

    def __init__(self, silence_ms: float = 1500, sample_rate: int = 24000, aggressiveness: int = 2,
                 frame_ms: int = 30, start_ms: float = 150):
        if silence_ms <= 0 or start_ms < 0:
            raise ConfigError(f"silence_ms must be > 0 and start_ms >= 0, got {silence_ms!r} / {start_ms!r}")
        self.vad = Vad(aggressiveness, sample_rate, frame_ms)
        self.silence_frames = max(1, int(round(silence_ms / frame_ms)))
        self.start_frames = max(1, int(round(start_ms / frame_ms)))
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        self.in_turn = False
        self._speech_run = 0
        self._silence_run = 0
        self._frames = 0
        self.turns = 0

    def feed(self, block) -> list[TurnEvent]:
        events = []
        fs = self.vad.frame_samples
        for speech in self.vad.process(block):
            self._frames += 1
            if speech:
                self._speech_run += 1
                self._silence_run = 0
            else:
                self._speech_run = 0
                self._silence_run += 1
            if not self.in_turn and self._speech_run >= self.start_frames:
                self.in_turn = True
                events.append(TurnEvent("start", (self._frames - self._speech_run) * fs))
            elif self.in_turn and self._silence_run >= self.silence_frames:
                self.in_turn = False
                self.turns += 1
                events.append(TurnEvent("end", self._frames * fs))
        return events


@_dataclass
class Utterance:
    """A stretch of the user's stream the VAD called speech: samples [start, end) at `sample_rate`."""

    index: int
    start: int
    end: int
    audio: _np.ndarray
    sample_rate: int = 24000
    cut: bool = False          # True when cut at max_seconds (the speech went on)

    @property
    def start_s(self) -> float:
        return self.start / self.sample_rate

    @property
    def end_s(self) -> float:
        return self.end / self.sample_rate


class UtteranceCutter:
    """Cuts a mono stream into utterances at the VAD's turn boundaries.

    `feed(block)` returns the utterances completed by the block; `flush()` those in progress at the
    end of the stream. An utterance spans [VAD start - `pre_roll_ms`, last speech + `tail_ms`]: the
    endpointer reports the end `silence_ms` after the speech stopped, and that silence is not sent.
    Keeps at most `max_seconds` of audio (longer speech is cut into pieces, counted in `cuts`).
    Pure: no I/O, no threads, no MLX.
    """

    def __init__(self, silence_ms: float = 800, sample_rate: int = 24000, max_seconds: float = 30.0,
                 pre_roll_ms: float = 200, tail_ms: float = 300, aggressiveness: int = 2):
        if max_seconds <= 1 or pre_roll_ms < 0 or tail_ms < 0:
            raise ConfigError(f"max_seconds must be > 1 and pre_roll_ms, tail_ms >= 0, got {max_seconds!r}, "
                              f"{pre_roll_ms!r}, {tail_ms!r}")
        self.endpointer = Endpointer(silence_ms=silence_ms, sample_rate=sample_rate,
                                     aggressiveness=aggressiveness)
        self.sample_rate = int(sample_rate)
        self.max_samples = int(max_seconds * sample_rate)
        self.pre_roll = int(pre_roll_ms * sample_rate / 1000)
        self.tail = int(tail_ms * sample_rate / 1000)
        self.silence = int(silence_ms * sample_rate / 1000)
        self.keep_idle = self.pre_roll + int(0.5 * sample_rate)   # > the endpointer's start look-back
        self.reset()

    def reset(self) -> None:
        self.endpointer.reset()
        self._chunks: list[_np.ndarray] = []
        self._buf_start = 0          # stream index of the first buffered sample
        self._buffered = 0
        self.position = 0            # samples fed so far
        self._start: int | None = None
        self.utterances = 0
        self.cuts = 0

    def _slice(self, a: int, b: int) -> _np.ndarray:
        buf = _np.concatenate(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks = [buf]
        return buf[max(0, a - self._buf_start): max(0, b - self._buf_start)].copy()

    def _drop_before(self, s: int) -> None:
        if s <= self._buf_start:
            return
        buf = _np.concatenate(self._chunks) if self._chunks else _np.zeros(0, _np.float32)
        cut = min(s - self._buf_start, buf.size)
        self._chunks = [buf[cut:]]
        self._buf_start += cut
        self._buffered = buf.size - cut

    def _emit(self, start: int, end: int, cut: bool) -> Utterance:
        u = Utterance(self.utterances, start, end, self._slice(start, end), self.sample_rate, cut)
        self.utterances += 1
        self.cuts += int(cut)
        return u

    def feed(self, block) -> list[Utterance]:
        x = _np.asarray(block, _np.float32).reshape(-1)
        out: list[Utterance] = []
        self._chunks.append(x)
        self._buffered += x.size
        self.position += x.size
        for ev in self.endpointer.feed(x):
            if ev.kind == "start":
                self._start = max(self._buf_start, ev.sample - self.pre_roll)
            elif ev.kind == "end" and self._start is not None:
                end = min(ev.sample, ev.sample - self.silence + self.tail)
                if end > self._start:       # (else a max_seconds cut already took all the speech)
                    out.append(self._emit(self._start, end, False))
                    self._drop_before(end)
                self._start = None
        if self._start is not None and self.position - self._start >= self.max_samples:
            end = self._start + self.max_samples
            out.append(self._emit(self._start, end, True))
            self._drop_before(end)
            self._start = end
        if self._start is None and self._buffered > self.keep_idle:
            self._drop_before(self.position - self.keep_idle)
        return out

    def flush(self) -> list[Utterance]:
        """End of stream: the utterance in progress (if any), up to the last sample fed."""
        if self._start is None or self.position <= self._start:
            return []
        u = self._emit(self._start, self.position, False)
        self._drop_before(self.position)
        self._start = None
        return [u]
