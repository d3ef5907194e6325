"""A simulated full-duplex audio device: a thread that behaves like PortAudio's callback.

Every `blocksize` samples of wall-clock time (paced against the monotonic clock, so it never
drifts), the thread writes one block of "microphone" audio into the capture ring and reads one
block for the "speaker" from the playback ring (silence + an underrun count when it is short),
exactly as the real callbacks in engine.audio.io do. Optionally the speaker leaks back into the
microphone through a simulated echo path (delay, gain), which exercises the AEC in the live loop.

Used by the soak benchmark and tests: the real loop and rings, no sound card. The source and sink
are plain callables, so a file, a generator or a counter can stand behind them.
"""
from __future__ import annotations

import threading as _threading
import time as _time
from typing import Callable

import numpy as _np

from ..errors import ConfigError

__all__ = ["VirtualStream"]


class VirtualStream:
    """Drop-in for engine.audio.io.AudioStreams (start/stop/close/latencies/counters).

    Args:
        capture_ring, playback_ring: the engine's RingBuffers.
        source: fn(n) -> n float32 samples of microphone audio (None: silence).
        sink: fn(block) called with every played block (a view: copy it to keep it).
        blocksize: samples per simulated callback (480 = 20 ms).
        echo_gain, echo_delay: the speaker reaches the mic `echo_delay` samples later, scaled.
        speed: clock rate factor (1.0 = real time; a drifting device is e.g. 1.001).
    """

    def __init__(self, capture_ring, playback_ring, source: Callable[[int], _np.ndarray] | None = None,
                 sink: Callable[[_np.ndarray], None] | None = None, blocksize: int = 480,
                 sample_rate: int = 24000, echo_gain: float = 0.0, echo_delay: int = 0,
                 speed: float = 1.0):
        if blocksize < 1 or speed <= 0 or (echo_gain and echo_delay < blocksize):
            raise ConfigError(f"bad VirtualStream settings: blocksize={blocksize}, speed={speed}, "
                              f"echo_delay={echo_delay} (an echo needs echo_delay >= blocksize)")
        self.capture_ring, self.playback_ring = capture_ring, playback_ring
        self.source, self.sink = source, sink
        self.blocksize, self.sample_rate = int(blocksize), int(sample_rate)
        self.echo_gain, self.echo_delay, self.speed = float(echo_gain), int(echo_delay), float(speed)
        self._echo = _np.zeros(self.echo_delay + self.blocksize, _np.float32)
        self._out = _np.zeros(self.blocksize, _np.float32)
        self._thread: _threading.Thread | None = None
        self._running = False
        self.frames_in = self.frames_out = self.callbacks = 0

    def _tick(self) -> None:
        n = self.blocksize
        mic = _np.zeros(n, _np.float32) if self.source is None else _np.asarray(self.source(n), _np.float32)
        if self.echo_gain:
            # _echo holds the last echo_delay + n played samples, oldest first; index n is the
            # sample played echo_delay samples before this block starts.
            mic = mic + self.echo_gain * self._echo[n:2 * n]
        self.capture_ring.write(_np.ascontiguousarray(mic, dtype=_np.float32))
        self.frames_in += n
        self.playback_ring.read_exact_or_zero(self._out)
        self.frames_out += n
        if self.echo_gain:
            self._echo = _np.concatenate([self._echo[n:], self._out])
        if self.sink is not None:
            self.sink(self._out)
        self.callbacks += 1

    def _run(self) -> None:
        period = self.blocksize / self.sample_rate / self.speed
        t_next = _time.monotonic()
        while self._running:
            t_next += period
            self._tick()
            delay = t_next - _time.monotonic()
            if delay > 0:
                _time.sleep(delay)

    def start(self) -> None:
        if self._thread is None:
            self._running = True
            self._thread = _threading.Thread(target=self._run, name="virtual-audio", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()

    @property
    def latencies(self) -> dict:
        return {"input": 0.0, "output": 0.0, "resampler": 0.0, "block": self.blocksize / self.sample_rate}

    @property
    def counters(self) -> dict:
        return {"callbacks": self.callbacks, "frames_in": self.frames_in, "frames_out": self.frames_out,
                "status_flags": 0, "stream_restarts": 0, "restart_failures": 0,
                "capture_overflow_samples": self.capture_ring.overflow_count,
                "playback_underrun_samples": self.playback_ring.underrun_count}
