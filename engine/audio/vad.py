"""Voice activity detection and end-of-turn detection with webrtcvad (turn-based mode).

webrtcvad accepts only 8/16/32/48 kHz and 10/20/30 ms frames, so `Vad` resamples the 24 kHz
stream to 16 kHz (engine.audio.resample) and cuts it into VAD frames. `Endpointer` turns the
per-frame decisions into turn events: "start" once `start_ms` of speech arrived, "end" after
`silence_ms` (1.5 s by default) of non-speech following it. Pure frame processors: no I/O, no threads.
"""
from __future__ import annotations

from dataclasses import dataclass as _dataclass

import numpy as _np

from ..errors import AudioFormatError, ConfigError, MissingLibraryError
from .resample import StreamingResampler as _StreamingResampler

__all__ = ["Vad", "Endpointer", "TurnEvent", "VAD_RATE"]

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
