"""Synthetic test signals shared by the audio tests (speech-like far/near ends, an echo path)."""
from __future__ import annotations

import numpy as np

SR = 24000


def speechlike(n: int, seed: int, f0: float = 140.0, rms: float = 0.1) -> np.ndarray:
    """Voiced harmonics with a wandering pitch, breath noise and a syllable-rate envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    f = f0 * (1 + 0.15 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f) / SR
    x = sum((0.6 / k) * np.sin(k * phase + rng.uniform(0, 6)) for k in range(1, 25))
    x = x + 0.3 * rng.standard_normal(n)
    x = x * (0.3 + 0.7 * np.abs(np.sin(2 * np.pi * 2.0 * t + rng.uniform(0, 6))))
    return (x * (rms / np.sqrt(np.mean(x ** 2)))).astype(np.float32)


def echo_path(x: np.ndarray, seed: int, delay: int, gain: float = 0.5, n_reflections: int = 12) -> np.ndarray:
    """Direct path at `delay` samples plus decaying reflections within the next 100 ms."""
    rng = np.random.default_rng(seed)
    h = np.zeros(delay + 2400 + 1)
    h[delay] = gain
    for d in rng.integers(delay + 24, delay + 2400, size=n_reflections):
        h[d] += rng.uniform(-0.3, 0.3) * gain * np.exp(-(d - delay) / 1200)
    return np.convolve(x, h)[: x.size].astype(np.float32)


def db(a: np.ndarray, b: np.ndarray) -> float:
    """Energy of a over energy of b, in dB."""
    return float(10 * np.log10(np.mean(np.square(a, dtype=np.float64)) / np.mean(np.square(b, dtype=np.float64))))
