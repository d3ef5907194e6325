"""Shared fixtures: a headless PulseAudio null sink (scripts/pulse.sh) for PortAudio, and the tiny model."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pulse_server():
    """Starts (or reuses) the 24 kHz mono null sink + monitor source; sets XDG_RUNTIME_DIR for libpulse.

    Skips when pulseaudio / pactl or PyAudio are not installed.
    """
    if shutil.which("pulseaudio") is None or shutil.which("pactl") is None:
        pytest.skip("pulseaudio not installed: apt-get install pulseaudio pulseaudio-utils libasound2-plugins")
    pytest.importorskip("pyaudio", reason="PyAudio not installed: pip install pyaudio")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "pulse.sh"), "start"], capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        pytest.skip(f"could not start PulseAudio: {res.stderr.strip()[-500:]}")
    env = {}
    for line in res.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            k, v = line[len("export "):].split("=", 1)
            env[k] = v.strip().strip("'\"")
    if "XDG_RUNTIME_DIR" not in env:
        pytest.skip(f"scripts/pulse.sh printed no XDG_RUNTIME_DIR: {res.stdout!r}")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["XDG_RUNTIME_DIR"]
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model():
    """The embedded tiny model (random weights), loaded once for the whole test session."""
    import engine

    model = engine.PersonaPlex.load("tiny", progress=False)
    yield model
    model.close()
