"""Shared fixtures: a headless PulseAudio null sink (scripts/pulse.sh) for PortAudio, the tiny model,
and the `quiet` mark: tests that judge real-time behaviour run after all others, once the CPUs are idle."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked `quiet` go last: the rest of the suite must not load the machine under them."""
    quiet = [item for item in items if item.get_closest_marker("quiet")]
    if quiet:
        items[:] = [item for item in items if not item.get_closest_marker("quiet")] + quiet


def _cpu_busy_fraction(seconds: float) -> float:
    """Share of all CPUs' time spent busy (not idle or iowait) over the next `seconds`."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


@pytest.fixture(autouse=True)
def _quiet_machine(request):
    """Before a `quiet` test: wait (up to 90 s) until the CPUs were at most 15 % busy over a whole
    second, so what the earlier tests left behind (threads winding down, servers closing, the
    kernel writing files back) is over. The waiting time is printed with the test's output."""
    if request.node.get_closest_marker("quiet") is None or not os.path.exists("/proc/stat"):
        yield
        return
    t0, busy = time.monotonic(), 1.0
    while time.monotonic() - t0 < 90:
        busy = _cpu_busy_fraction(1.0)
        if busy <= 0.15:
            break
    waited = time.monotonic() - t0
    print(f"[quiet] waited {waited:.1f} s for idle CPUs (last second {100 * busy:.0f} % busy)")
    if busy > 0.15:
        warnings.warn(f"the CPUs stayed {100 * busy:.0f} % busy for 90 s before this test: "
                      "something outside the suite is loading the machine")
    yield


@pytest.fixture(scope="session")
def pulse_server():
    """Starts (or reuses) the 24 kHz mono null sink + monitor source; sets XDG_RUNTIME_DIR for libpulse.
    A daemon it started is stopped at the end of the session.

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
    started = env.pop("PERSONAPLEX_PULSE_STARTED", None) == "1"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["XDG_RUNTIME_DIR"]
    if started:
        subprocess.run(["bash", str(ROOT / "scripts" / "pulse.sh"), "stop"], capture_output=True, timeout=60)
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
