"""Echo canceller (libspeexdsp via cffi): synthetic echo path, double talk, API and errors."""
from __future__ import annotations

import numpy as np
import pytest

import engine  # noqa: F401  (OpenBLAS before mlx; errors)
from engine.audio import aec
from engine.errors import AudioFormatError, ConfigError, MissingLibraryError

from ._signals import SR, db, echo_path, speechlike

BLOCK = 1920
DELAY = 1200  # 50 ms bulk speaker -> mic delay


@pytest.fixture(scope="module")
def scene():
    """8 s: far end plays throughout; near-end talks over it from 5 s to 7 s (double talk)."""
    n = 8 * SR
    far = speechlike(n, 1)
    near = speechlike(n, 2, f0=220.0)
    near[: 5 * SR] = 0
    near[7 * SR:] = 0
    echo = echo_path(far, 3, DELAY)
    noise = np.random.default_rng(4).standard_normal(n).astype(np.float32) * 3e-4  # -70 dBFS floor
    return far, near, echo + near + noise


def run(ec, mic, far):
    return np.concatenate([ec.process(mic[i:i + BLOCK], far[i:i + BLOCK]) for i in range(0, mic.size, BLOCK)])


def test_estimate_delay_finds_direct_path(scene):
    far, _, mic = scene
    lag, confidence = aec.estimate_delay(mic[: 3 * SR], far[: 3 * SR], max_delay=SR // 2)
    assert abs(lag - DELAY) <= 2
    assert confidence > 20
    # Unrelated signals: no trustworthy peak.
    _, weak = aec.estimate_delay(speechlike(3 * SR, 9), far[: 3 * SR], max_delay=SR // 2)
    assert weak < confidence / 4


def test_suppression_and_double_talk(scene):
    far, near, mic = scene
    lag, _ = aec.estimate_delay(mic[: 3 * SR], far[: 3 * SR], max_delay=SR // 2)
    ec = aec.EchoCanceller(filter_ms=100, residual_suppression=True)
    ec.set_delay(lag - 100)  # a little margin so the direct path is inside the filter
    out = run(ec, mic, far)
    assert out.dtype == np.float32 and out.shape == mic.shape
    half = SR // 2
    # Echo-only segments after 1 s of convergence, in 0.5 s windows (before and after double talk).
    for start in list(range(SR, 5 * SR, half)) + [7 * SR + half]:
        seg = slice(start, start + half)
        assert db(mic[seg], out[seg]) >= 30.0, f"only {db(mic[seg], out[seg]):.1f} dB at {start / SR:.1f} s"
    # Double talk: the near-end talker keeps its level within 1 dB.
    dt = slice(5 * SR, 7 * SR)
    assert abs(db(out[dt], near[dt])) <= 1.0
    # The output during double talk is mostly the near end, not echo (the preprocessor delays it by one frame).
    lat = ec.latency
    assert lat == 480
    assert np.corrcoef(out[5 * SR + lat:7 * SR], near[5 * SR:7 * SR - lat])[0, 1] > 0.95


def test_without_reference_nothing_is_cancelled(scene):
    far, _, mic = scene
    ec = aec.EchoCanceller(filter_ms=100)
    out = run(ec, mic[: 3 * SR], np.zeros(3 * SR, np.float32))
    seg = slice(SR, 3 * SR)
    assert db(mic[seg], out[seg]) < 6.0  # suppression above comes from cancelling, not from gating


def test_block_size_independent_and_reset(scene):
    far, _, mic = scene
    n = 2 * SR
    a = run(aec.EchoCanceller(), mic[:n], far[:n])
    ec = aec.EchoCanceller()
    b = np.concatenate([ec.process(mic[i:i + 480], far[i:i + 480]) for i in range(0, n, 480)])
    np.testing.assert_array_equal(a, b)
    ec.reset()
    np.testing.assert_array_equal(run(ec, mic[:n], far[:n]), a)
    assert ec.frames_processed == n // 480


def test_delay_line_keeps_history():
    line = aec._DelayLine(3)
    x = np.arange(1, 9, dtype=np.float32)
    np.testing.assert_array_equal(line.process(x[:4]), [0, 0, 0, 1])
    np.testing.assert_array_equal(line.process(x[4:]), [2, 3, 4, 5])
    line.set_delay(1)  # shorter: continues from the newest samples
    np.testing.assert_array_equal(line.process(np.array([9, 10], np.float32)), [8, 9])
    line.set_delay(3)  # longer: zeros inserted before the kept history
    np.testing.assert_array_equal(line.process(np.array([11, 12, 13], np.float32)), [0, 0, 10])


def test_set_delay_delays_reference(scene):
    far, _, mic = scene
    n = 2 * SR
    ec = aec.EchoCanceller(delay=480)
    shifted = np.concatenate([np.zeros(480, np.float32), far[: n - 480]])
    a = run(ec, mic[:n], far[:n])
    b = run(aec.EchoCanceller(), mic[:n], shifted)
    np.testing.assert_array_equal(a, b)
    assert ec.delay == 480


@pytest.mark.parametrize("near,far", [
    (np.zeros(1000, np.float32), np.zeros(1000, np.float32)),  # not a multiple of 480
    (np.zeros(960, np.float32), np.zeros(480, np.float32)),    # lengths differ
    (np.zeros((2, 480), np.float32), np.zeros((2, 480), np.float32)),
    (np.full(480, np.nan, np.float32), np.zeros(480, np.float32)),
    (np.zeros(480, np.int16), np.zeros(480, np.float32)),
    (np.zeros(0, np.float32), np.zeros(0, np.float32)),
])
def test_bad_blocks(near, far):
    with pytest.raises(AudioFormatError):
        aec.EchoCanceller().process(near, far)


@pytest.mark.parametrize("kw", [dict(frame_size=0), dict(sample_rate=1000), dict(filter_ms=5), dict(delay=-1)])
def test_bad_config(kw):
    with pytest.raises(ConfigError):
        aec.EchoCanceller(**kw)


def test_passthrough_matches_interface():
    p = aec.PassthroughEchoCanceller()
    x = speechlike(1920, 5)
    np.testing.assert_array_equal(p.process(x, np.ones(1920, np.float32)), x)
    assert not p.enabled and aec.EchoCanceller.enabled


def test_missing_library_error(monkeypatch):
    monkeypatch.setattr(aec, "_lib", None)
    monkeypatch.setattr(aec, "_LIB_NAMES", ["libspeexdsp-does-not-exist.so.9"])
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    with pytest.raises(MissingLibraryError) as e:
        aec.EchoCanceller()
    msg = str(e.value)
    assert "apt-get install libspeexdsp1" in msg and "brew install speexdsp" in msg and "--no-aec" in msg
