"""PortAudio streams on the PulseAudio null sink: loopback tone, sample accounting, device errors."""
from __future__ import annotations

import time

import numpy as np
import pytest

import engine  # noqa: F401
from engine.audio import io
from engine.audio.ring import RingBuffer
from engine.errors import AudioDeviceError

pytestmark = pytest.mark.audio
SR = 24000


def tone_freq(x, rate):
    """A sine's frequency from its median period: the intervals between upward zero crossings
    (linearly interpolated). A dropout in the null sink (a phase jump) spoils the one or two periods
    around it, not the median, however many windows it falls in; an FFT peak or a mean over the
    stretch moves with every jump. Most periods must agree with the median (within 1 %): a few
    dropouts pass, a signal that is not one steady tone does not."""
    up = np.flatnonzero((x[:-1] < 0) & (x[1:] >= 0))
    assert up.size >= 20, f"no tone in {x.size} samples ({up.size} upward zero crossings)"
    t = up + x[up] / (x[up] - x[up + 1])                # where the line crosses zero
    periods = np.diff(t)
    p = float(np.median(periods))
    agree = float(np.mean(np.abs(periods - p) < 0.01 * p))
    assert agree > 0.8, f"only {agree:.0%} of {periods.size} periods within 1 % of the median {p:.2f} samples"
    return rate / p


def test_list_devices(pulse_server):
    devs = io.list_devices()
    assert any(d.max_input_channels > 0 for d in devs) and any(d.max_output_channels > 0 for d in devs)
    table = io.format_devices(devs)
    assert devs[0].name in table
    assert io.find_device(None, "output").is_default_output


def run_loopback(seconds, **kw):
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * SR) / SR)).astype(np.float32)
    cap, play = RingBuffer(1 << 17), RingBuffer(1 << 17)
    assert play.write(tone) == tone.size
    with io.open_duplex(cap, play, blocksize=480, **kw) as s:
        assert s.active
        time.sleep(seconds)
        s.stop()
        counters, lat = s.counters, s.latencies
    assert not s.active
    return cap, play, counters, lat, s


def test_format_devices_table_and_none():
    devs = [io.DeviceInfo(0, "HDA Intel PCH: ALC3246 Analog (hw:0,0)", "ALSA", 2, 2, 44100.0),
            io.DeviceInfo(7, "default", "JACK Audio Connection Kit", 32, 0, 48000.0, True, False),
            io.DeviceInfo(12, "speakers", "ALSA", 0, 2, 96000.0, False, True)]
    lines = io.format_devices(devs).splitlines()
    assert lines[0].split() == ["index", "name", "host", "API", "in", "out", "rate", "(Hz)", "default"]
    rows = lines[1:4]
    for col in ("name", "host API", "rate (Hz)", "default"):       # every column starts at its header
        c = lines[0].index(col)
        assert all(r[c - 2:c] == "  " for r in rows if len(r) > c), col
    assert rows[0].split()[0] == "0" and rows[2].lstrip().startswith("12  speakers")
    assert rows[1].endswith("48000  input") and rows[2].endswith("96000  output")
    assert rows[0].rstrip().endswith("44100")                        # not a default device
    end_in = lines[0].index(" in ") + 3                              # numbers right-aligned under "in"
    assert [r[end_in - 2:end_in] for r in rows] == [" 2", "32", " 0"]
    none = io.format_devices([])
    assert none.startswith("no audio devices found") and "scripts/pulse.sh start" in none and "--in-wav" in none


@pytest.mark.quiet  # the real audio path in real time: a busy machine makes the null sink drop
def test_loopback_tone_and_sample_accounting(pulse_server):
    cap, play, c, lat, s = run_loopback(2.5)
    assert not s.resampling and s.device_rate == SR
    # 20 ms callbacks for 2.5 s: allow start-up slack, but the clock must be roughly real time.
    assert 100 <= c["callbacks"] <= 135, c
    assert c["frames_in"] == c["frames_out"] == 480 * c["callbacks"]
    # Every captured sample is in the capture ring (nothing lost: it did not overflow).
    assert c["capture_overflow_samples"] == 0
    assert cap.available_read == c["frames_in"]
    # Playback: the 2 s tone was consumed, the rest of the callbacks played counted silence.
    assert play.available_read == 0
    assert c["playback_underrun_samples"] == c["frames_out"] - 2 * SR
    assert 0 < lat["input"] < 0.5 and 0 < lat["output"] < 0.5
    rec = cap.read(cap.available_read)
    loud = np.flatnonzero(np.abs(rec) > 0.1)
    assert loud.size > SR  # most of the 2 s tone came back
    seg = rec[loud[0] + 2400: loud[0] + 2400 + SR]
    assert abs(tone_freq(seg, SR) - 440) < 1
    assert abs(np.sqrt(np.mean(seg ** 2)) - 0.5 / np.sqrt(2)) < 0.02


@pytest.mark.quiet  # the real audio path in real time: a busy machine makes the null sink drop
def test_device_at_other_rate_is_resampled(pulse_server):
    cap, play, c, lat, s = run_loopback(2.0, device_rate=48000)
    assert s.resampling and s.device_rate == 48000 and s.device_blocksize == 960
    assert lat["resampler"] > 0
    rec = cap.read(cap.available_read)
    assert 0.9 * c["frames_in"] / 2 - 2000 <= rec.size <= c["frames_in"] / 2  # 48k -> 24k (minus filter delay)
    loud = np.flatnonzero(np.abs(rec) > 0.1)
    assert loud.size > SR // 2, c
    seg = rec[loud[0] + 2400: loud[0] + 2400 + SR // 2]
    assert abs(tone_freq(seg, SR) - 440) < 1, c
    assert abs(np.sqrt(np.mean(seg ** 2)) - 0.5 / np.sqrt(2)) < 0.03


@pytest.mark.quiet  # the real audio path in real time
def test_stream_that_dies_is_reopened_and_counted(pulse_server, monkeypatch):
    """A stream that goes inactive under a running conversation (PortAudio's ALSA host API ends its
    callback thread when `PaAlsaStream_WaitForFrames` fails) is reopened by the service thread on
    the same rings; tries that fail are counted and retried; the conversation's audio goes on."""
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(3 * SR) / SR)).astype(np.float32)
    cap, play = RingBuffer(1 << 17), RingBuffer(1 << 17)
    play.write(tone)

    def wait_for(cond, what, timeout=3.0):
        t = time.monotonic()
        while not cond():
            assert time.monotonic() - t < timeout, f"{what}: {s.counters}"
            time.sleep(0.01)

    real_open = io.AudioStreams._open_one
    tries = []

    def flaky_open(self, want_in, want_out, **kw):  # the device refuses twice, then opens again
        tries.append(time.monotonic())
        if len(tries) <= 2:
            raise AudioDeviceError("could not open the audio stream", pa_error="Device unavailable")
        return real_open(self, want_in, want_out, **kw)

    with io.open_duplex(cap, play, blocksize=480) as s:
        time.sleep(0.3)
        assert s.counters["stream_restarts"] == 0
        monkeypatch.setattr(io.AudioStreams, "_open_one", flaky_open)
        s._streams[0][2].stop_stream()              # what the host API does: the stream goes inactive
        wait_for(lambda: s.counters["stream_restarts"] == 1, "the dead stream was not reopened")
        c = s.counters
        assert c["restart_failures"] == 2 and len(tries) == 3 and "reopened" in s.last_error
        assert tries[2] - tries[1] >= tries[1] - tries[0] >= 0.05     # backing off between tries
        n = c["callbacks"]
        wait_for(lambda: s.counters["callbacks"] >= n + 25, "no callbacks after the reopen")
        assert s.active
        time.sleep(1.5)
        s.stop()
        assert s.counters["stream_restarts"] == 1 and s.counters["frames_in"] == 480 * s.counters["callbacks"]
        rec = cap.read(cap.available_read)
        loud = np.flatnonzero(np.abs(rec) > 0.1)
        assert loud.size > SR            # the tone went on through the reopened stream and came back
        assert abs(tone_freq(rec[loud[-1] - SR // 2: loud[-1] - 2400], SR) - 440) < 1

        # A device that stays away: the tries go on, further and further apart; once it is back,
        # stop() then start() opens the stream anew.
        refusals = []

        def away(self, *a, **kw):
            refusals.append(time.monotonic())
            raise AudioDeviceError("could not open the audio stream", pa_error="Device unavailable")

        s.start()
        s.restart_backoff = 0.05
        monkeypatch.setattr(io.AudioStreams, "_open_one", away)
        s._streams[0][2].stop_stream()
        wait_for(lambda: len(refusals) >= 5, "no retries while the device is away")
        gaps = np.diff(refusals)
        assert s.counters["stream_restarts"] == 1 and not s.active and "failed" in s.last_error
        assert gaps[-1] > 3 * gaps[0], gaps
        s.stop()
        monkeypatch.setattr(io.AudioStreams, "_open_one", real_open)
        s.start()
        n = s.counters["callbacks"]
        wait_for(lambda: s.counters["callbacks"] >= n + 10, "no callbacks after start() opened the stream anew")
        s.stop()


def test_input_only_and_output_only(pulse_server):
    cap, play = RingBuffer(1 << 15), RingBuffer(1 << 15)
    with io.open_input(cap, blocksize=480) as si, io.open_output(play, blocksize=480) as so:
        time.sleep(0.6)
    assert si.counters["frames_in"] > 0 and si.counters["frames_out"] == 0
    assert so.counters["frames_out"] > 0 and so.counters["playback_underrun_samples"] == so.counters["frames_out"]
    assert cap.available_read == si.counters["frames_in"]


@pytest.mark.parametrize("kw,words", [
    (dict(input_device=99), ["unknown input device index 99", "available input devices"]),
    (dict(output_device="no-such-card"), ["unknown output device 'no-such-card'"]),
    (dict(device_rate=1), ["does not support this sample rate", "rate=1", "blocksize=480", "host API=ALSA"]),
])
def test_device_errors(pulse_server, kw, words):
    with pytest.raises(AudioDeviceError) as e:
        io.open_duplex(RingBuffer(1024), RingBuffer(1024), blocksize=480, **kw)
    for w in words:
        assert w in str(e.value)


def test_bad_blocksize(pulse_server):
    with pytest.raises(engine.ConfigError):
        io.open_duplex(RingBuffer(1024), RingBuffer(1024), blocksize=3)


def test_missing_pyaudio(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pyaudio", None)
    with pytest.raises(engine.MissingLibraryError) as e:
        io.list_devices()
    assert "pip install pyaudio" in str(e.value) and "--in-wav" in str(e.value)
