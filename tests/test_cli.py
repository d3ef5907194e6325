"""Command-line entry points, run as a user would (python -m engine.X) on the tiny model."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
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
    r = run("engine.duplex", "--in-wav", str(HELLO), "--out-wav", str(out), "--fast")   # the default model
    assert r.returncode == 0, r.stderr
    assert "babble" in r.stderr and "nvidia/personaplex-7b-v1" in r.stderr   # says how to get the real model
    assert "summary" in r.stderr and "frames" in r.stderr
    ch, rate, n = wav_info(out)
    _, _, n_in = wav_info(HELLO)
    assert (ch, rate) == (1, 24000) and n == int(np.ceil(n_in / 1920)) * 1920
    lines = r.stdout.splitlines()           # piped: transcript lines, no carriage returns
    said = [ln for ln in lines if ln.startswith("agent: ")]
    assert "\r" not in r.stdout and said and all(len(ln) <= 80 for ln in lines)
    assert all(ln.startswith(("agent: ", "-- ")) for ln in lines)
    # The reply is listenable: speech level (-20 dBFS RMS +-2 dB; random-weight noise at full
    # scale is ~-2 dBFS), under 1 % of the samples at full scale, no DC offset.
    from engine.audio.wav import load_audio
    pcm = load_audio(out)[0].astype(np.float64)
    dbfs = 10 * np.log10(np.mean(pcm ** 2))
    assert -22.0 <= dbfs <= -18.0, dbfs
    assert np.mean(np.abs(pcm) >= 32767 / 32768) < 0.01 and abs(pcm.mean()) < 0.003


def test_duplex_realtime_piped_health_lines(tmp_path):
    t0 = time.monotonic()
    r = run("engine.duplex", "--in-wav", str(HELLO), "--out-wav", str(tmp_path / "o.wav"), "--seconds", "7")
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout and "\033" not in r.stdout
    lines = r.stdout.splitlines()
    health = [ln for ln in lines if ln.startswith("-- ")]
    # the first once audio flows, then one per 5 s of wall-clock time (not one per poll)
    assert 1 <= len(health) <= 1 + wall // 5, r.stdout
    pattern = r"-- \d+ s \| step \d+\.\d/\d+\.\d ms \| mic \d+ out \d+ ms \| (no misses, no losses|miss|underrun|drop)"
    assert all(re.match(pattern, h) and len(h) <= 80 for h in health), health
    said = [ln for ln in lines if ln.startswith("agent: ")]
    assert len(said) + len(health) == len(lines) and said


def test_duplex_converts_any_wav(tmp_path):
    """A stereo 48 kHz file is downmixed and resampled, and the conversion is printed."""
    p = tmp_path / "stereo48k.wav"
    x = (np.random.default_rng(1).standard_normal((48000, 2)) * 3000).astype(np.int16)
    with wave.open(str(p), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(48000)
        w.writeframes(x.tobytes())
    for extra in ([], ["--turn-based", "--max-steps", "50"]):
        out = tmp_path / "o.wav"
        r = run("engine.duplex", "--in-wav", str(p), "--out-wav", str(out), "--fast", *extra)
        assert r.returncode == 0, r.stderr
        assert "downmixed 2 channels to mono" in r.stderr and "resampled 48000 -> 24000 Hz" in r.stderr
        if not extra:
            assert wav_info(out) == (1, 24000, int(np.ceil(24000 / 1920)) * 1920)


def test_duplex_turn_based_files(tmp_path):
    out = tmp_path / "turns.wav"
    r = run("engine.duplex", "--model", "tiny", "--turn-based", "--in-wav", str(HELLO), "--out-wav", str(out),
            "--max-steps", "50")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("[turn ") == 2, r.stderr                         # two spoken sentences
    assert wav_info(out)[2] == 2 * 50 * 1920


@pytest.mark.parametrize("kind", ["empty", "eight_bit", "missing"])
def test_duplex_bad_wav(tmp_path, kind):
    p = tmp_path / f"{kind}.wav"
    if kind != "missing":
        with wave.open(str(p), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(1 if kind == "eight_bit" else 2)
            w.setframerate(24000)
            if kind != "empty":
                w.writeframes(bytes(4800 * (1 if kind == "eight_bit" else 2)))
    r = run("engine.duplex", "--model", "tiny", "--in-wav", str(p), "--out-wav", str(tmp_path / "o.wav"), "--fast")
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    assert p.name in r.stderr


@pytest.mark.parametrize("tool,flag", [("engine.duplex", "--out-wav"), ("engine.respond", "--output")])
def test_output_file_in_a_missing_directory_is_refused_before_loading(tmp_path, tool, flag):
    """A reply that could not be written is refused up front (before any model work), naming the
    flag and the directory; a directory given as the file is refused too."""
    extra = ["--in-wav", str(HELLO), "--fast"] if tool == "engine.duplex" else [str(HELLO)]
    for target, words in ((tmp_path / "nowhere" / "r.wav", "does not exist"), (tmp_path, "is a directory")):
        r = run(tool, "--model", "tiny", *extra, flag, str(target))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert flag in r.stderr and words in r.stderr and "[loaded" not in r.stderr, r.stderr
    assert not (tmp_path / "nowhere").exists()


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


def test_respond_converts_any_wav(tmp_path):
    p = tmp_path / "q.wav"
    x = (np.random.default_rng(2).standard_normal((16000, 3)) * 3000).astype(np.int16)
    with wave.open(str(p), "wb") as w:
        w.setnchannels(3), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(x.tobytes())
    for mode in ([], ["--stream"], ["--diagnostic"]):
        r = run("engine.respond", str(p), "--max-steps", "50", *mode)
        assert r.returncode == 0, r.stderr
        assert "[input: q.wav: 16000 Hz, 3 ch, int16, 1.00 s; downmixed 3 channels to mono; " \
               "resampled 16000 -> 24000 Hz]" in r.stderr, mode


def test_model_not_found_is_clear():
    r = run("engine.respond", str(HELLO), "--model", "/nonexistent/dir/model")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "/nonexistent" in r.stderr


def test_every_cli_states_the_default_model():
    for tool in ("engine.duplex", "engine.respond", "engine.profile"):
        r = run(tool, "--help")
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())
        assert "Default: tiny." in text and "babbles" in text and "nvidia/personaplex-7b-v1" in text, tool
        assert ".cache/personaplex-engine" in text.replace("- ", "-"), tool     # where the tiny model is built


@pytest.mark.audio
def test_list_devices(pulse_server):
    r = run("engine.duplex", "--list-devices", env={"XDG_RUNTIME_DIR": pulse_server})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["index", "name", "host", "API", "in", "out", "rate", "(Hz)", "default"]
    rows = [ln for ln in lines[1:] if ln[:5].strip().isdigit()]
    assert rows and "DeviceInfo(" not in r.stdout
    # aligned: the name column starts at the same place in the header and every row
    col = lines[0].index("name")
    assert all(row[col - 1] == " " and row[col] != " " for row in rows)
    assert sum("input + output" in row for row in rows) == 1   # the null sink is default input and output


def test_list_devices_none_found(tmp_path):
    """No sound server and no sound card: a clear message, how to get a device, exit status 1."""
    pytest.importorskip("pyaudio", reason="PyAudio not installed")
    if Path("/dev/snd").exists():
        pytest.skip("this machine has a sound card: PortAudio would list it")
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "PULSE_SERVER": str(tmp_path / "none")}
    r = run("engine.duplex", "--list-devices", env=env)
    assert r.returncode == 1, r.stderr
    assert r.stdout == "" and r.stderr.startswith("no audio devices found")
    assert "scripts/pulse.sh start" in r.stderr and "--in-wav" in r.stderr and "--out-wav" in r.stderr
    r = run("engine.duplex", "--seconds", "1", env=env)                 # live mode: the same advice
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no audio input device found" in r.stderr and "scripts/pulse.sh start" in r.stderr


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


def test_library_example_runs_as_in_the_readme(tmp_path):
    """examples/library.py is the README's library snippet, and it runs as written."""
    code = (ROOT / "examples" / "library.py").read_text()
    body = code.split('"""', 2)[2].strip()                        # the file minus its docstring
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("## Library", 1)[1].split("```python\n", 1)[1].split("```", 1)[0].strip()
    assert snippet == body
    (tmp_path / "examples").mkdir()
    for name in ("library.py", "hello.wav"):
        (tmp_path / "examples" / name).write_bytes((ROOT / "examples" / name).read_bytes())
    r = subprocess.run([sys.executable, "examples/library.py"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "hello.wav: 24000 Hz, 1 ch" in r.stdout and "step p50" in r.stdout
    n_in = wav_info(HELLO)[2]
    whole = int(np.ceil(n_in / 1920)) * 1920
    expect = {"reply.wav": 75 * 1920, "reply_stream.wav": 75 * 1920, "reply_realtime.wav": whole,
              "reply_duplex.wav": whole}
    assert {name: wav_info(tmp_path / name) for name in expect} == {n: (1, 24000, k) for n, k in expect.items()}


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
