"""Acoustic echo cancellation with libspeexdsp (cffi ABI mode: nothing is compiled).

`EchoCanceller` is a pure frame processor: `process(near, far)` takes the microphone block and
the block that was *played* at the same time (the far end, or reference) and returns the mic
block with the echo of the far end removed. Stages per speex frame (default 480 samples = 20 ms):

1. a far-end delay line, so a reference that leaves the speaker `delay` samples after we hand it
   to the device lines up with its echo (`set_delay`, measured with `estimate_delay`);
2. speex_echo_cancellation (an MDF adaptive filter, `filter_ms` long);
3. speex_preprocess with the echo state attached: residual-echo suppression and denoise.

Only the runtime library is needed (`libspeexdsp1` on Debian/Ubuntu, `speexdsp` on Homebrew).
The object holds per-conversation state: make one per session, `reset()` between conversations.
No I/O and no threads; callers serialise access.
"""
from __future__ import annotations

import sys as _sys

import numpy as _np
from cffi import FFI as _FFI

from ..errors import AudioFormatError, ConfigError
from ._dlopen import open_library

__all__ = ["EchoCanceller", "PassthroughEchoCanceller", "estimate_delay", "load_speexdsp"]

_CDEF = """
typedef struct SpeexEchoState_ SpeexEchoState;
typedef struct SpeexPreprocessState_ SpeexPreprocessState;
SpeexEchoState *speex_echo_state_init(int frame_size, int filter_length);
void speex_echo_state_destroy(SpeexEchoState *st);
void speex_echo_cancellation(SpeexEchoState *st, const int16_t *rec, const int16_t *play, int16_t *out);
void speex_echo_state_reset(SpeexEchoState *st);
int speex_echo_ctl(SpeexEchoState *st, int request, void *ptr);
SpeexPreprocessState *speex_preprocess_state_init(int frame_size, int sampling_rate);
void speex_preprocess_state_destroy(SpeexPreprocessState *st);
int speex_preprocess_run(SpeexPreprocessState *st, int16_t *x);
int speex_preprocess_ctl(SpeexPreprocessState *st, int request, void *ptr);
"""

# Request numbers from speex/speex_echo.h and speex/speex_preprocess.h (libspeexdsp 1.2).
_ECHO_SET_SAMPLING_RATE = 24
_PP_SET_DENOISE = 0
_PP_SET_AGC = 2
_PP_SET_DEREVERB = 8
_PP_SET_NOISE_SUPPRESS = 18
_PP_SET_ECHO_SUPPRESS = 20
_PP_SET_ECHO_SUPPRESS_ACTIVE = 22
_PP_SET_ECHO_STATE = 24

if _sys.platform == "darwin":
    _LIB_NAMES = ["libspeexdsp.1.dylib", "libspeexdsp.dylib",
                  "/opt/homebrew/lib/libspeexdsp.dylib", "/usr/local/lib/libspeexdsp.dylib"]
else:
    _LIB_NAMES = ["libspeexdsp.so.1", "libspeexdsp.so"]

_ffi = _FFI()
_ffi.cdef(_CDEF)
_lib = None

_INSTALL_HINT = ("install it with `apt-get install libspeexdsp1` (Debian/Ubuntu) or `brew install speexdsp` "
                 "(macOS), or run without echo cancellation (`--no-aec`)")


def load_speexdsp():
    """Open libspeexdsp once (cached) and return the cffi library object.

    Raises:
        MissingLibraryError: the library is not installed (the message says how to install it).
    """
    global _lib
    if _lib is None:
        _lib = open_library(_ffi, _LIB_NAMES, "speexdsp", "libspeexdsp (echo cancellation)", _INSTALL_HINT)
    return _lib


def _as_block(x, name: str) -> _np.ndarray:
    a = _np.asarray(x)
    if a.ndim != 1:
        raise AudioFormatError(f"{name} must be a 1-D mono block, got shape {a.shape}")
    if a.dtype != _np.float32:
        if not _np.issubdtype(a.dtype, _np.floating):
            raise AudioFormatError(f"{name} must be float audio in [-1, 1], got dtype {a.dtype}")
        a = a.astype(_np.float32)
    if not _np.isfinite(a).all():
        raise AudioFormatError(f"{name} contains NaN or inf at sample {int(_np.argmin(_np.isfinite(a)))}")
    return a


class _DelayLine:
    """Delays a sample stream by `delay` samples (zeros first). Keeps `delay` samples of history."""

    def __init__(self, delay: int = 0):
        self.delay = 0
        self._hist = _np.zeros(0, _np.float32)
        self.set_delay(delay)

    def set_delay(self, delay: int) -> None:
        # Keep the newest samples we already have so the reference stays continuous.
        if delay <= self._hist.size:
            self._hist = self._hist[self._hist.size - delay:].copy()
        else:
            self._hist = _np.concatenate([_np.zeros(delay - self._hist.size, _np.float32), self._hist])
        self.delay = delay

    def process(self, x: _np.ndarray) -> _np.ndarray:
        if self.delay == 0:
            return x
        joined = _np.concatenate([self._hist, x])
        self._hist = joined[joined.size - self.delay:].copy()
        return joined[: x.size]

    def reset(self) -> None:
        self._hist[:] = 0.0


class EchoCanceller:
    """Speex echo canceller + residual-echo suppression + denoise, on float32 blocks.

    Args:
        sample_rate: audio rate in Hz (the engine runs at 24000).
        frame_size: speex frame in samples (480 = 20 ms); `process` takes any multiple of it.
        filter_ms: length of the adaptive echo-path filter (the echo tail it can model).
        residual_suppression: run speex_preprocess with the echo state (residual echo + noise).
        denoise: let the preprocessor suppress stationary noise too (only with residual_suppression).
        echo_suppress_db / echo_suppress_active_db: residual-echo attenuation without / with near-end
            speech (speex defaults are -40 / -15).
        noise_suppress_db: maximum noise attenuation (speex default -15).
        delay: initial far-end delay in samples (see `set_delay`).

    Raises:
        MissingLibraryError: libspeexdsp is not installed.
        ConfigError: a parameter is out of range.
    """

    enabled = True

    def __init__(self, sample_rate: int = 24000, frame_size: int = 480, filter_ms: float = 200,
                 residual_suppression: bool = True, *, denoise: bool = True,
                 echo_suppress_db: int = -40, echo_suppress_active_db: int = -15,
                 noise_suppress_db: int = -15, delay: int = 0):
        if int(sample_rate) != sample_rate or not 8000 <= sample_rate <= 96000:
            raise ConfigError(f"sample_rate must be an integer in [8000, 96000] Hz, got {sample_rate!r}")
        if int(frame_size) != frame_size or not 16 <= frame_size <= sample_rate // 10:
            raise ConfigError(f"frame_size must be an integer in [16, {sample_rate // 10}] samples, got {frame_size!r}")
        if not 10 <= filter_ms <= 2000:
            raise ConfigError(f"filter_ms must be in [10, 2000] ms, got {filter_ms!r}")
        self._lib = load_speexdsp()
        self.sample_rate, self.frame_size = int(sample_rate), int(frame_size)
        self.filter_length = int(round(filter_ms * sample_rate / 1000))
        self.residual_suppression, self.denoise = bool(residual_suppression), bool(denoise)
        self._pp_settings = (int(echo_suppress_db), int(echo_suppress_active_db), int(noise_suppress_db))
        self._make_states()
        self._delay = _DelayLine(self._check_delay(delay))
        self._cap = 0
        self._grow(4 * self.frame_size)
        self.frames_processed = 0

    # -- configuration -------------------------------------------------------------------------
    @staticmethod
    def _ctl_int(fn, state, request: int, value: int) -> None:
        v = _ffi.new("int32_t *", int(value))
        if fn(state, request, v) != 0:
            raise ConfigError(f"libspeexdsp rejected control request {request} = {value}")

    def _make_states(self) -> None:
        lib = self._lib
        echo = lib.speex_echo_state_init(self.frame_size, self.filter_length)
        if echo == _ffi.NULL:
            raise ConfigError(f"libspeexdsp refused frame_size={self.frame_size} filter_length={self.filter_length}")
        self._echo = _ffi.gc(echo, lib.speex_echo_state_destroy)
        self._ctl_int(lib.speex_echo_ctl, self._echo, _ECHO_SET_SAMPLING_RATE, self.sample_rate)
        # The preprocessor keeps a pointer to the echo state: create it after, drop it with it.
        self._pp = self._make_preprocessor() if self.residual_suppression else None

    def _make_preprocessor(self):
        lib = self._lib
        pp = _ffi.gc(lib.speex_preprocess_state_init(self.frame_size, self.sample_rate),
                     lib.speex_preprocess_state_destroy)
        ctl = lib.speex_preprocess_ctl
        echo_db, echo_active_db, noise_db = self._pp_settings
        for req, val in ((_PP_SET_DENOISE, int(self.denoise)), (_PP_SET_AGC, 0),
                         (_PP_SET_DEREVERB, 0), (_PP_SET_NOISE_SUPPRESS, noise_db),
                         (_PP_SET_ECHO_SUPPRESS, echo_db), (_PP_SET_ECHO_SUPPRESS_ACTIVE, echo_active_db)):
            self._ctl_int(ctl, pp, req, val)
        # SET_ECHO_STATE takes the echo state pointer itself.
        if ctl(pp, _PP_SET_ECHO_STATE, self._echo) != 0:
            raise ConfigError("libspeexdsp refused to attach the echo state to the preprocessor")
        return pp

    def _check_delay(self, samples) -> int:
        if int(samples) != samples or samples < 0 or samples > 10 * self.sample_rate:
            raise ConfigError(f"far-end delay must be an integer number of samples in [0, {10 * self.sample_rate}], "
                              f"got {samples!r}")
        return int(samples)

    def set_delay(self, samples: int) -> None:
        """Delay the far-end reference by `samples` before it reaches the echo filter.

        Use the measured speaker-to-mic lag minus a small margin (e.g. 10-20 ms), so the whole echo
        path, reflections included, falls inside the `filter_ms` window. Changing it keeps the far-end
        history (no gap), but the adaptive filter has to re-converge.
        """
        self._delay.set_delay(self._check_delay(samples))

    @property
    def latency(self) -> int:
        """Samples by which the output lags the input (the preprocessor's overlap: one frame)."""
        return self.frame_size if self.residual_suppression else 0

    @property
    def delay(self) -> int:
        """Current far-end delay in samples."""
        return self._delay.delay

    def reset(self) -> None:
        """Forget everything learned (new conversation): filter, preprocessor, delay-line contents."""
        # speex_echo_state_reset leaves some filter memories; fresh states give a true restart.
        self._pp = None
        self._make_states()
        self._delay.reset()
        self.frames_processed = 0

    # -- processing ----------------------------------------------------------------------------
    def _grow(self, n: int) -> None:
        if n <= self._cap:
            return
        self._cap = n
        self._near16 = _np.zeros(n, _np.int16)
        self._far16 = _np.zeros(n, _np.int16)
        self._out16 = _np.zeros(n, _np.int16)
        self._pnear = _ffi.cast("int16_t *", _ffi.from_buffer(self._near16))
        self._pfar = _ffi.cast("int16_t *", _ffi.from_buffer(self._far16))
        self._pout = _ffi.cast("int16_t *", _ffi.from_buffer(self._out16))

    def process(self, near, far) -> _np.ndarray:
        """Cancel the echo of `far` in `near`.

        Args:
            near: microphone samples, float32 in [-1, 1], length a multiple of `frame_size`.
            far: what the speaker played during the same interval (same length), before the
                delay line; pass zeros when nothing played.

        Returns:
            float32 array, same length as `near`: the echo-cancelled microphone signal.

        Raises:
            AudioFormatError: wrong shape, dtype, length, or non-finite samples.
        """
        near = _as_block(near, "near")
        far = _as_block(far, "far")
        n = near.size
        if far.size != n:
            raise AudioFormatError(f"near and far blocks must have the same length, got {n} and {far.size}")
        if n == 0 or n % self.frame_size:
            raise AudioFormatError(f"block length must be a positive multiple of frame_size={self.frame_size}, got {n}")
        far = self._delay.process(far)
        self._grow(n)
        near16, far16, out16 = self._near16[:n], self._far16[:n], self._out16[:n]
        _np.clip(_np.rint(near * 32768.0), -32768, 32767, out=near16, casting="unsafe")
        _np.clip(_np.rint(far * 32768.0), -32768, 32767, out=far16, casting="unsafe")
        lib, fs = self._lib, self.frame_size
        for i in range(0, n, fs):
            lib.speex_echo_cancellation(self._echo, self._pnear + i, self._pfar + i, self._pout + i)
            if self._pp is not None:
                lib.speex_preprocess_run(self._pp, self._pout + i)
        self.frames_processed += n // fs
        return out16.astype(_np.float32) * _np.float32(1.0 / 32768.0)


class PassthroughEchoCanceller:
    """Same interface as EchoCanceller, returns the mic unchanged (`--no-aec`)."""

    enabled = False
    latency = 0

    def __init__(self, sample_rate: int = 24000, frame_size: int = 480, **_ignored):
        self.sample_rate, self.frame_size = int(sample_rate), int(frame_size)
        self.delay = 0
        self.frames_processed = 0

    def set_delay(self, samples: int) -> None:
        self.delay = int(samples)

    def reset(self) -> None:
        self.frames_processed = 0

    def process(self, near, far) -> _np.ndarray:
        near = _as_block(near, "near")
        if _np.asarray(far).shape != near.shape:
            raise AudioFormatError(f"near and far blocks must have the same shape, got {near.shape} and "
                                   f"{_np.asarray(far).shape}")
        self.frames_processed += near.size // self.frame_size
        return near.copy()


def estimate_delay(near, far, max_delay: int | None = None, sample_rate: int = 24000) -> tuple[int, float]:
    """Estimate how many samples `near` lags `far` (near[t] ~ g * far[t - lag]) by cross-correlation.

    Uses the phase transform (GCC-PHAT), whose peak stays sharp for coloured signals such as speech
    and for echo paths with reflections; the strongest path wins.

    Args:
        near: recorded signal (mic), 1-D.
        far: reference (what was played), 1-D, covering the same time span (same start sample).
        max_delay: largest lag to consider in samples (default: 1 s or the signal length).

    Returns:
        (lag in samples >= 0, confidence): confidence is the peak height over the mean absolute
        correlation in the searched range; below ~5 the estimate is not trustworthy (silence, or
        no echo).

    Raises:
        AudioFormatError: bad shapes, empty or non-finite input.
    """
    near = _as_block(near, "near").astype(_np.float64)
    far = _as_block(far, "far").astype(_np.float64)
    if near.size == 0 or far.size == 0:
        raise AudioFormatError("estimate_delay needs non-empty signals")
    n = min(near.size, far.size)
    near, far = near[:n], far[:n]
    if max_delay is None:
        max_delay = min(n - 1, sample_rate)
    max_delay = int(min(max_delay, n - 1))
    if max_delay < 0:
        raise ConfigError(f"max_delay must be >= 0, got {max_delay}")
    nfft = 1 << int(_np.ceil(_np.log2(2 * n)))
    spec = _np.fft.rfft(near, nfft) * _np.conj(_np.fft.rfft(far, nfft))
    mag = _np.abs(spec)
    spec /= mag + 1e-12 * (mag.max() + 1e-30)
    cc = _np.fft.irfft(spec, nfft)[: max_delay + 1]
    a = _np.abs(cc)
    lag = int(_np.argmax(a))
    floor = float(a.mean()) + 1e-30
    return lag, float(a[lag] / floor)
