"""webrtcvad endpointing at 24 kHz (resampled to 16 kHz)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

import engine  # noqa: F401
from engine.audio import vad
from engine.errors import ConfigError, MissingLibraryError

from ._signals import SR, speechlike

pytest.importorskip("webrtcvad", reason="webrtcvad not installed: pip install webrtcvad-wheels")


def feed_blocks(ep, x, block=1920):
    events = []
    for i in range(0, x.size, block):
        events += ep.feed(x[i:i + block])
    return events


def test_vad_decisions():
    v = vad.Vad()
    silence = v.process(np.zeros(SR, np.float32))
    assert len(silence) in (32, 33) and not any(silence)  # 1 s / 30 ms, minus the resampler's look-ahead
    speech = v.process(speechlike(2 * SR, 1))
    assert np.mean(speech) > 0.8


def test_turn_end_after_default_silence():
    x = np.concatenate([np.zeros(SR // 2), speechlike(2 * SR, 1), np.zeros(3 * SR)]).astype(np.float32)
    x += np.random.default_rng(0).standard_normal(x.size).astype(np.float32) * 1e-4  # mic noise floor
    ep = vad.Endpointer()
    ev = feed_blocks(ep, x)
    assert [e.kind for e in ev] == ["start", "end"]
    assert abs(ev[0].sample / SR - 0.5) < 0.15
    assert 2.5 + 1.5 - 0.05 <= ev[1].sample / SR <= 2.5 + 1.5 + 0.4  # webrtcvad has a short hangover
    assert ep.turns == 1 and not ep.in_turn


def test_short_pause_does_not_end_turn_but_custom_silence_does():
    x = np.concatenate([speechlike(SR, 1), np.zeros(SR), speechlike(SR, 2), np.zeros(SR // 2)]).astype(np.float32)
    assert [e.kind for e in feed_blocks(vad.Endpointer(), x)] == ["start"]
    ev = feed_blocks(vad.Endpointer(silence_ms=600), x)
    assert [e.kind for e in ev] == ["start", "end", "start"]


def test_click_is_not_a_turn():
    x = np.zeros(2 * SR, np.float32)
    x[SR:SR + 480] = speechlike(480, 3, rms=0.3)  # 20 ms burst
    assert feed_blocks(vad.Endpointer(), x) == []


def test_reset_and_bad_args():
    ep = vad.Endpointer(silence_ms=300)
    feed_blocks(ep, speechlike(SR, 1))
    assert ep.in_turn
    ep.reset()
    assert not ep.in_turn and ep.turns == 0
    with pytest.raises(ConfigError):
        vad.Vad(aggressiveness=5)
    with pytest.raises(ConfigError):
        vad.Vad(frame_ms=40)
    with pytest.raises(engine.AudioFormatError):
        vad.Vad().process(np.zeros((2, 480), np.float32))


def test_missing_webrtcvad(monkeypatch):
    monkeypatch.setitem(sys.modules, "webrtcvad", None)  # import now raises ImportError
    with pytest.raises(MissingLibraryError) as e:
        vad.Endpointer()
    assert "pip install webrtcvad-wheels" in str(e.value)
