"""Command-line entry points, run as a user would (python -m engine.X) on the tiny model."""
from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "hello.wav"


def run(*args, timeout=300, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=e)


def wav_info(path):
    with wave.open(str(path)) as w:
        return w.getnchannels(), w.getframerate(), w.getnframes()


def test_duplex_files_fast(tmp_path):
    out = tmp_path / "reply.wav"
    r = run("engine.duplex", "--model", "tiny", "--in-wav", str(HELLO), "--out-wav", str(out), "--fast")
    assert r.returncode == 0, r.stderr
    assert "babble" in r.stderr and "nvidia/personaplex-7b-v1" in r.stderr   # says how to get the real model
    assert "summary" in r.stderr and "frames" in r.stderr
    ch, rate, n = wav_info(out)
    _, _, n_in = wav_info(HELLO)
    assert (ch, rate) == (1, 24000) and n == int(np.ceil(n_in / 1920)) * 1920


def test_duplex_turn_based_files(tmp_path):
    out = tmp_path / "turns.wav"
    r = run("engine.duplex", "--model", "tiny", "--turn-based", "--in-wav", str(HELLO), "--out-wav", str(out),
            "--max-steps", "50")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("[turn ") == 2, r.stderr                         # two spoken sentences
    assert wav_info(out)[2] == 2 * 50 * 1920


@pytest.mark.parametrize("kind", ["stereo", "empty", "eight_bit", "missing"])
def test_duplex_bad_wav(tmp_path, kind):
    p = tmp_path / f"{kind}.wav"
    if kind != "missing":
        with wave.open(str(p), "wb") as w:
            w.setnchannels(2 if kind == "stereo" else 1)
            w.setsampwidth(1 if kind == "eight_bit" else 2)
            w.setframerate(24000)
            if kind != "empty":
                w.writeframes(bytes(4800 * (2 if kind == "stereo" else 1) * (1 if kind == "eight_bit" else 2)))
    r = run("engine.duplex", "--model", "tiny", "--in-wav", str(p), "--out-wav", str(tmp_path / "o.wav"), "--fast")
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    assert p.name in r.stderr


def test_respond_cli(tmp_path):
    out = tmp_path / "r.wav"
    r = run("engine.respond", str(HELLO), "-o", str(out), "--model", "tiny", "--voice", "NATF2",
            "--max-steps", "50", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "RTF" in r.stderr and wav_info(out)[2] == 50 * 1920
    r2 = run("engine.respond", "--list-voices", "--model", "tiny")
    assert r2.returncode == 0 and "NATF0" in r2.stdout and "VARM4" in r2.stdout
    r3 = run("engine.respond", str(HELLO), "--model", "tiny", "--voice", "NOPE")
    assert r3.returncode == 2 and "NOPE" in r3.stderr and "Traceback" not in r3.stderr
    r4 = run("engine.respond", str(HELLO), "--model", "tiny", "--max-steps", "9")
    assert r4.returncode == 2 and "max_steps" in r4.stderr


def test_model_not_found_is_clear():
    r = run("engine.respond", str(HELLO), "--model", "/nonexistent/dir/model")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "/nonexistent" in r.stderr


@pytest.mark.audio
def test_list_devices(pulse_server):
    r = run("engine.duplex", "--list-devices", env={"XDG_RUNTIME_DIR": pulse_server})
    assert r.returncode == 0, r.stderr
    assert "pulse" in r.stdout.lower() or "default" in r.stdout.lower()


@pytest.mark.audio
def test_duplex_live_device_seconds(pulse_server):
    r = run("engine.duplex", "--model", "tiny", "--seconds", "3", "--quiet", env={"XDG_RUNTIME_DIR": pulse_server})
    assert r.returncode == 0, r.stderr
    assert "summary" in r.stderr and "AEC on" in r.stderr


@pytest.mark.audio
def test_duplex_unknown_device(pulse_server):
    r = run("engine.duplex", "--model", "tiny", "--input-device", "99", "--seconds", "1",
            env={"XDG_RUNTIME_DIR": pulse_server})
    assert r.returncode == 2 and "99" in r.stderr and "Traceback" not in r.stderr


def _short_wav(tmp_path):
    p = tmp_path / "q.wav"
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(24000)
        w.writeframes((np.random.default_rng(0).standard_normal(12000) * 3000).astype(np.int16).tobytes())
    return p


def test_examples_run(tmp_path):
    q = _short_wav(tmp_path)
    r = subprocess.run([sys.executable, "examples/turn_based.py", str(q), "--max-steps", "50"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert wav_info(tmp_path / "q.reply.wav")[2] == 50 * 1920
    out = tmp_path / "s.wav"
    r = subprocess.run([sys.executable, "examples/stream_playback.py", str(q), "--no-device", "--max-steps", "50",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "first audio after" in r.stdout and wav_info(out)[2] == 50 * 1920


@pytest.mark.audio
def test_stream_playback_example_on_device(tmp_path, pulse_server):
    q = _short_wav(tmp_path)
    r = subprocess.run([sys.executable, "examples/stream_playback.py", str(q), "--max-steps", "50"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "XDG_RUNTIME_DIR": pulse_server})
    assert r.returncode == 0, r.stderr
    assert "playback underruns" in r.stdout
