"""Band-limited sample-rate conversion in numpy (Kaiser-windowed sinc, polyphase table).

`resample(x, rate_in, rate_out)` converts a whole signal; `StreamingResampler` converts a stream
block by block and gives exactly the same samples as the whole-signal version (the kernel is
zero-phase; the stream holds back `half_width` input samples until the following ones arrive).
Output sample n sits at input time n * rate_in / rate_out; for rate_out / rate_in = L / M in lowest
terms the fractional position repeats every L outputs, so the kernel is tabulated per phase.
"""
from __future__ import annotations

from math import gcd as _gcd

import numpy as _np

from ..errors import AudioFormatError, ConfigError

__all__ = ["resample", "StreamingResampler"]

_MAX_TABLE_PHASES = 4096


def _kernel(u: _np.ndarray, cutoff: float, half_width: int, beta: float) -> _np.ndarray:
    # cutoff is relative to the input Nyquist (1.0 = no band limit beyond the input's own).
    z = u / half_width
    win = _np.where(_np.abs(z) < 1.0, _np.i0(beta * _np.sqrt(_np.clip(1.0 - z * z, 0.0, None))) / _np.i0(beta), 0.0)
    return cutoff * _np.sinc(cutoff * u) * win


class StreamingResampler:
    """Converts a float32 mono stream from `rate_in` to `rate_out`, block by block.

    Args:
        rate_in, rate_out: integer rates in Hz.
        zero_crossings: kernel half-width in zero crossings of the (lower) cutoff; 16 gives > 80 dB
            stop band with the default Kaiser beta.
        rolloff: cutoff as a fraction of the lower Nyquist frequency.
    """

    def __init__(self, rate_in: int, rate_out: int, *, zero_crossings: int = 16, rolloff: float = 0.94,
                 beta: float = 8.6):
        for name, r in (("rate_in", rate_in), ("rate_out", rate_out)):
            if int(r) != r or r <= 0:
                raise ConfigError(f"{name} must be a positive integer rate in Hz, got {r!r}")
        self.rate_in, self.rate_out = int(rate_in), int(rate_out)
        g = _gcd(self.rate_in, self.rate_out)
        self._up, self._down = self.rate_out // g, self.rate_in // g
        self._cutoff = min(1.0, self.rate_out / self.rate_in) * rolloff
        # Half-width in *input* samples: wide enough for `zero_crossings` lobes of the cutoff sinc.
        self.half_width = int(_np.ceil(zero_crossings / self._cutoff))
        self._beta = beta
        self._offsets = _np.arange(-self.half_width + 1, self.half_width + 1)  # taps around floor(t)
        self._table = None
        if self._up <= _MAX_TABLE_PHASES:
            frac = _np.arange(self._up)[:, None] / self._up
            self._table = _kernel(frac - self._offsets[None, :], self._cutoff, self.half_width,
                                  beta).astype(_np.float32)
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        # Input history: buffer[0] is absolute input index self._start (negative = leading zeros).
        self._buf = _np.zeros(self.half_width, _np.float32)
        self._start = -self.half_width
        self._n_out = 0   # next output index
        self._n_in = 0    # input samples received

    @property
    def ratio(self) -> float:
        return self.rate_out / self.rate_in

    def _emit(self, upto_in: int) -> _np.ndarray:
        """Outputs whose kernels lie within input samples [.., upto_in)."""
        buf_end = self._start + self._buf.size
        limit = min(upto_in, buf_end)
        # Output n needs input up to floor(n*M/L) + half_width < limit.
        last = ((limit - self.half_width) * self._up - 1) // self._down  # largest n with base+hw <= limit-1
        n = _np.arange(self._n_out, max(self._n_out, last + 1), dtype=_np.int64)
        if n.size == 0:
            return _np.zeros(0, _np.float32)
        num = n * self._down
        base = num // self._up
        out = _np.empty(n.size, _np.float32)
        step = 8192
        for a in range(0, n.size, step):
            b_ = base[a:a + step]
            idx = (b_ - self._start)[:, None] + self._offsets[None, :]
            if self._table is not None:
                k = self._table[num[a:a + step] % self._up]
            else:
                frac = (num[a:a + step] % self._up) / self._up
                k = _kernel(frac[:, None] - self._offsets[None, :], self._cutoff, self.half_width,
                            self._beta).astype(_np.float32)
            out[a:a + step] = _np.einsum("ij,ij->i", self._buf[idx], k)
        self._n_out = int(n[-1]) + 1
        # Drop input no future output needs: the next output reads from floor(n*M/L) - hw + 1.
        keep_from = (self._n_out * self._down) // self._up - self.half_width + 1
        drop = keep_from - self._start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._start += drop
        return out

    def process(self, block) -> _np.ndarray:
        """Feed input samples; returns the output samples that are complete so far (float32)."""
        x = _np.asarray(block, dtype=_np.float32).reshape(-1)
        if self._up == self._down:
            self._n_in += x.size
            self._n_out += x.size
            return x.copy()
        self._buf = _np.concatenate([self._buf, x])
        self._n_in += x.size
        return self._emit(self._start + self._buf.size)

    def flush(self) -> _np.ndarray:
        """End of stream: returns the remaining outputs (total = ceil(inputs * rate_out / rate_in))."""
        total = -(-self._n_in * self._up // self._down)
        if self._up == self._down or self._n_out >= total:
            return _np.zeros(0, _np.float32)
        self._buf = _np.concatenate([self._buf, _np.zeros(self.half_width + 1, _np.float32)])
        before = self._n_out
        out = self._emit(self._start + self._buf.size)[: max(0, total - before)]
        self._n_out = before + out.size
        return out


def resample(x, rate_in: int, rate_out: int) -> _np.ndarray:
    """Resample a whole mono float signal; returns float32 of length ceil(len(x) * rate_out / rate_in).

    Raises:
        AudioFormatError: x is not 1-D.
        ConfigError: a rate is not a positive integer.
    """
    a = _np.asarray(x, dtype=_np.float32)
    if a.ndim != 1:
        raise AudioFormatError(f"resample expects a 1-D mono signal, got shape {a.shape}")
    if rate_in == rate_out:
        return a.copy()
    r = StreamingResampler(rate_in, rate_out)
    return _np.concatenate([r.process(a), r.flush()])
