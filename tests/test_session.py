"""DuplexSession: the 12.5 Hz loop on the tiny model with array, file and real PortAudio sources."""
from __future__ import annotations

import time
import wave

import numpy as np
import pytest

from engine.errors import AudioDeviceError, AudioFormatError, ConfigError, UnknownVoice
from engine.session import FRAME, ArraySource

SR = 24000


def noise(seconds, seed=0, amp=0.05):
    return (amp * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def test_array_source_fast(tiny_model):
    audio = noise(2.0)
    s = tiny_model.session(source=audio, sink=None, seed=1)
    with s:
        st = s.wait(timeout=120)
    n_frames = int(np.ceil(len(audio) / FRAME))
    assert st.frames == n_frames and st.state == "stopped"
    assert st.samples_in == len(audio) and st.samples_out == n_frames * FRAME
    out = s.output_audio()
    assert out.shape == (n_frames * FRAME,) and np.abs(out).max() > 0
    kinds = [e.kind for e in s.events()]
    assert kinds[:2] == ["state", "state"] and kinds[-1] == "state"
    assert (st.deadline_misses > 0) == (st.step_ms_max > 80)


def test_same_output_as_respond_realtime(tiny_model):
    audio = noise(1.5, seed=3)
    s = tiny_model.session(source=audio, sink=None, seed=5).start()
    s.wait(timeout=120)
    ref = np.concatenate(list(tiny_model.respond_realtime([audio], seed=5)))
    np.testing.assert_array_equal(s.output_audio(), ref)
    texts = [e.value for e in s.events() if e.kind == "text"]
    assert texts == s.transcript and len(texts) > 0


def test_realtime_pacing_follows_the_source_clock(tiny_model):
    audio = noise(1.2)
    s = tiny_model.session(source=audio, sink=None, realtime=True, seed=1)
    t0 = time.monotonic()
    s.start().wait(timeout=60)
    assert time.monotonic() - t0 >= 1.1
    assert s.stats().late_frames <= 2


class _SlowGen:
    """Wraps the generator so every step takes at least `delay` seconds."""

    def __init__(self, gen, delay):
        self.gen, self.delay = gen, delay

    def step(self, *a, **k):
        time.sleep(self.delay)
        return self.gen.step(*a, **k)

    def __getattr__(self, name):
        return getattr(self.gen, name)


@pytest.fixture
def slow_model(tiny_model):
    real = tiny_model.gen
    tiny_model.gen = _SlowGen(real, 0.15)
    yield tiny_model
    tiny_model.gen = real


def test_deadline_policy_drop(slow_model):
    audio = noise(2.0)
    s = slow_model.session(source=ArraySource(audio, realtime=True), sink=None, deadline_policy="drop", seed=2)
    st = s.start().wait(timeout=60)
    assert st.deadline_misses == st.frames > 0               # every step is slower than 80 ms
    assert st.dropped_input_frames > 0
    # every input sample is accounted for: processed or dropped (counted)
    assert st.samples_in == len(audio)
    assert st.frames * FRAME + st.dropped_input_samples == len(audio)
    assert st.dropped_input_samples == st.dropped_input_frames * FRAME
    assert st.samples_out == st.frames * FRAME


def test_deadline_policy_catch_up(slow_model):
    audio = noise(1.6)
    s = slow_model.session(source=ArraySource(audio, realtime=True), sink=None, deadline_policy="catch_up",
                           max_backlog_frames=100, seed=2)
    st = s.start().wait(timeout=60)
    assert st.frames == 20 and st.dropped_input_frames == 0      # nothing dropped...
    assert st.late_frames > 0 and st.deadline_misses == 20        # ...but it ran late, counted
    assert st.samples_out == 20 * FRAME


def test_reset_starts_new_conversation(tiny_model):
    """After reset() the session answers as a fresh session given the rest of the input: the
    frames after the reset equal a new session's frames on the same audio (same seed), and
    differ from what the un-reset conversation said there."""
    audio, k = noise(2.4, seed=6), 12

    def run(source_audio, reset_after=None):
        out = []
        s = None

        def sink(frame):
            out.append(np.array(frame, np.float32))
            if len(out) == reset_after:
                s.reset()            # taken before the next frame is processed

        s = tiny_model.session(source=source_audio, sink=sink, seed=4).start()
        s.wait(timeout=120)
        return np.stack(out), [e.value for e in s.events() if e.kind == "state"], s.stats()

    got, states, st = run(audio, reset_after=k)
    assert "reset" in states and states[-1] == "stopped"
    fresh, _, _ = run(audio[k * FRAME:])
    kept, _, _ = run(audio)
    assert got.shape == kept.shape == (len(audio) // FRAME, FRAME)
    np.testing.assert_array_equal(got[:k], kept[:k])           # the same conversation until the reset
    np.testing.assert_array_equal(got[k:], fresh)              # then a new one
    assert not np.array_equal(got[k:], kept[k:])


def test_bad_arguments(tiny_model, tmp_path):
    with pytest.raises(UnknownVoice):
        tiny_model.session(source=noise(0.5), sink=None, voice="XYZ9")
    with pytest.raises(ConfigError, match="deadline_policy"):
        tiny_model.session(source=noise(0.5), sink=None, deadline_policy="later")
    with pytest.raises(ConfigError, match="source"):
        tiny_model.session(source=12345, sink=None)
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SR)
    with pytest.raises(AudioFormatError):
        tiny_model.session(source=str(empty), sink=None)
    eight = tmp_path / "eight.wav"
    with wave.open(str(eight), "wb") as w:
        w.setnchannels(1), w.setsampwidth(1), w.setframerate(SR)
        w.writeframes(bytes(1000))
    with pytest.raises(AudioFormatError, match="8-bit"):
        tiny_model.session(source=str(eight), sink=None)


def _write_int16(path, frames, rate):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1]), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(frames, "<i2").tobytes())


def test_any_rate_and_channels_converted(tiny_model, tmp_path):
    """Stereo files and arrays at any rate are downmixed and resampled, and input_info says so."""
    mono = (noise(1.0, seed=7, amp=0.2) * 32767).astype(np.int16)
    # Two equal channels at 24 kHz downmix exactly to the mono signal: the same conversation.
    stereo = tmp_path / "stereo.wav"
    _write_int16(stereo, np.stack([mono, mono], axis=1), SR)
    s = tiny_model.session(source=str(stereo), sink=None, seed=2)
    assert "2 ch" in s.input_info and "downmixed 2 channels to mono" in s.input_info
    with s:
        s.wait(timeout=120)
    ref = tiny_model.session(source=mono.astype(np.float32) / 32768, sink=None, seed=2)
    assert "downmixed" not in ref.input_info and "resampled" not in ref.input_info
    with ref:
        ref.wait(timeout=120)
    np.testing.assert_array_equal(s.output_audio(), ref.output_audio())
    # 48 kHz, 3 channels (file) and a (channels, frames) 16 kHz array: converted to 24 kHz mono.
    multi = tmp_path / "multi48k.wav"
    _write_int16(multi, np.repeat(np.stack([mono] * 3, axis=1), 2, axis=0), 48000)
    s = tiny_model.session(source=str(multi), sink=None, seed=2)
    assert "resampled 48000 -> 24000 Hz" in s.input_info and "downmixed 3 channels" in s.input_info
    with s:
        st = s.wait(timeout=120)
    assert st.frames == int(np.ceil(SR / FRAME))
    s = tiny_model.session(source=np.stack([noise(0.5, 1), noise(0.5, 2)])[:, ::3], sample_rate=8000, sink=None)
    assert "transposed" in s.input_info and "resampled 8000 -> 24000 Hz" in s.input_info
    with s:
        st = s.wait(timeout=120)
    assert st.frames == int(np.ceil(SR // 2 / FRAME))       # 0.5 s at 24 kHz (the last frame padded)


def test_wav_sink(tiny_model, tmp_path):
    out = tmp_path / "out.wav"
    s = tiny_model.session(source=noise(1.0), sink=str(out), seed=1).start()
    st = s.wait(timeout=60)
    with wave.open(str(out)) as w:
        assert w.getframerate() == SR and w.getnchannels() == 1
        assert w.getnframes() == st.frames * FRAME


@pytest.mark.audio
def test_device_session_on_null_sink(tiny_model, pulse_server):
    """>= 10 s on real PortAudio streams: every captured sample consumed or still queued, playback
    gaps only where underruns were counted, clean shutdown."""
    s = tiny_model.session(source="device", sink="device", seed=3, max_frames=130)
    s.start()
    st = s.wait(timeout=60)
    assert not s.running and st.state == "stopped"
    assert st.frames == 130
    c = s.device.stream.counters
    cap, play = s.device.ring, s.device.play_ring
    # capture: what the device delivered == what the loop read (incl. counted drops) + still queued + refused
    assert c["frames_in"] == st.samples_in + cap.available_read + cap.overflow_count
    assert cap.overflow_count == 0
    # playback: what the device played == what the loop pushed - still queued + silence counted as underrun
    pushed = st.samples_out + FRAME * 1                          # + the one prebuffer frame of silence
    assert c["frames_out"] == pushed - play.available_read + play.underrun_count
    assert st.samples_in >= 130 * FRAME
    assert st.aec is True
    assert st.step_ms_p50 < 80


@pytest.mark.audio
def test_unknown_device(tiny_model, pulse_server):
    with pytest.raises(AudioDeviceError):
        tiny_model.session(source="device", sink="device", input_device=999)


@pytest.mark.quiet
def test_simulated_device_accounting_and_live_aec(tiny_model):
    """The real rings and loop on a simulated device clock, with an acoustic echo path: every sample
    accounted for, and the AEC (with its delay tracker) removes the agent's echo from the mic.
    Marked `quiet`: the simulated device runs on the wall clock, and a machine busy elsewhere makes
    playback underrun, so the echo path the AEC tracks keeps moving."""
    from engine.session import DeviceIO

    played = []
    dev = DeviceIO.simulated(source=None, sink=lambda b: played.append(b.copy()),
                             echo_gain=0.5, echo_delay=2400)          # 100 ms echo path, -6 dB
    raw_e, heard_e = [], []

    def on_mic(raw, heard):
        raw_e.append(float(np.mean(raw ** 2)))
        heard_e.append(float(np.mean(heard ** 2)))

    s = tiny_model.session(source=dev, sink=dev, seed=6, max_frames=100, on_mic=on_mic)
    st = s.start().wait(timeout=120)
    c = dev.stream.counters
    assert st.frames == 100 and st.aec
    assert c["frames_in"] == st.samples_in + dev.ring.available_read + dev.ring.overflow_count
    assert c["frames_out"] == st.samples_out + FRAME - dev.play_ring.available_read + dev.play_ring.underrun_count
    assert s.delay_tracker.updates >= 1 and s.delay_tracker.last_confidence > 8
    # echo-only mic (no near-end talker): per-frame suppression after convergence (from 3.2 s);
    # the median tolerates the short re-alignment after a playback underrun on a loaded machine.
    raw, heard = np.array(raw_e[40:]), np.array(heard_e[40:])
    assert raw.mean() > 1e-4, "the agent must be audible for this test to mean anything"
    erle = 10 * np.log10(raw / np.maximum(heard, 1e-20))
    assert np.median(erle) >= 30, f"echo suppressed by only {np.median(erle):.1f} dB (median)"


def test_thread_priority_is_applied_then_restored(tiny_model):
    """thread_priority=True: the loop's thread runs boosted (or says why not) and the shared
    worker thread gets its old scheduling back when the session ends."""
    import os

    def sched():
        return (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority,
                os.getpriority(os.PRIO_PROCESS, __import__("threading").get_native_id()))

    before = tiny_model.worker.call(sched)
    during = []
    s = tiny_model.session(source=noise(0.5), sink=None, aec=False, thread_priority=True,
                           on_mic=lambda mic, heard: during.append(sched()))   # runs in the loop
    with s:
        stats = s.wait(timeout=120)
    assert stats.frames == 7 and stats.state == "stopped" and len(during) == 7
    what = stats.thread_priority
    if what.startswith("SCHED_FIFO"):
        assert during[0][0] == os.SCHED_FIFO and during[0][1] == 10
    elif what.startswith("nice"):
        assert during[0][2] == before[2] - 5
    else:
        assert what.startswith("unchanged") and during[0] == before
    assert tiny_model.worker.call(sched) == before


# ---------------------------------------------------------------------------------------------- stop()

def _boom(mic, heard):
    raise RuntimeError("boom in on_mic")


def test_stop_raises_an_unexpected_loop_error(tiny_model):
    """An error that ends the loop (here a user callback's) comes out of stop() and of the
    `with` block, whatever its type; it is also in `error` and the events."""
    s = tiny_model.session(source=noise(2.0), sink=None, on_mic=_boom).start()
    while s.running:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="boom in on_mic"):
        s.stop()
    assert isinstance(s.error, RuntimeError) and s.stats().state == "error"
    assert [e.value for e in s.events() if e.kind == "error"] == [s.error]
    with pytest.raises(RuntimeError, match="boom in on_mic"):
        with tiny_model.session(source=noise(2.0), sink=None, on_mic=_boom) as s2:
            while s2.running:
                time.sleep(0.01)
    # wait() already raised it inside the block: the `with` does not raise it a second time over it
    with pytest.raises(RuntimeError) as info:
        with tiny_model.session(source=noise(2.0), sink=None, on_mic=_boom) as s3:
            s3.wait(timeout=60)
    assert info.value is s3.error and info.value.__context__ is None


def test_stop_reports_a_sink_that_cannot_write(tiny_model, tmp_path):
    """The wav sink writes its file when the loop stops: a failure there is the session's error
    (it used to be swallowed, leaving no file and a session that said 'stopped')."""
    out = tmp_path / "no such dir" / "reply.wav"
    s = tiny_model.session(source=noise(0.5), sink=str(out), seed=1).start()
    with pytest.raises(FileNotFoundError):
        s.wait(timeout=60)
    assert isinstance(s.error, FileNotFoundError) and s.stats().state == "error"
    assert s.stats().frames == 7 and not out.exists()


def test_stop_of_a_clean_session_returns_stats(tiny_model):
    s = tiny_model.session(source=noise(0.5), sink=None, seed=1).start()
    s.wait(timeout=60)
    assert s.stop().state == "stopped" and s.stop().frames == 7   # again: same stats, no error
    assert s.error is None


def test_stop_cancels_a_session_that_has_not_started(tiny_model):
    """Queued behind other work on the model worker, the session is cancelled: no loop runs."""
    import threading

    gate = threading.Event()
    busy = tiny_model.worker.submit(gate.wait, 30)
    try:
        s = tiny_model.session(source=noise(0.5), sink=None).start()
        st = s.stop(timeout=5)
    finally:
        gate.set()
    busy.result(timeout=30)
    assert st.state == "stopped" and st.frames == 0 and s.error is None and not s.running
    assert list(s.events()) == []


def test_stop_timeout_is_an_error_not_silence(tiny_model):
    """A loop that does not end within the timeout is reported, and still stoppable later."""
    import threading

    from engine.errors import EngineError

    inside, release = threading.Event(), threading.Event()

    def stuck(mic, heard):
        inside.set()
        release.wait(30)

    s = tiny_model.session(source=noise(2.0), sink=None, on_mic=stuck).start()
    assert inside.wait(60)
    with pytest.raises(EngineError, match="did not stop within 0.2 s"):
        s.stop(timeout=0.2)
    assert s.running
    release.set()
    st = s.stop(timeout=60)
    assert st.state == "stopped" and st.frames == 1 and not s.running


# ---------------------------------------------------------------------------------------------- gc.freeze

def test_heap_is_frozen_once_per_loop_not_per_frame_processor(tiny_model):
    """The live loop freezes the heap once when it starts and unfreezes it when it ends; building
    a FrameProcessor (every respond() call) does not freeze anything."""
    import gc

    before = gc.get_freeze_count()
    tiny_model.respond(noise(0.5), max_steps=50, seed=1)
    assert gc.get_freeze_count() == before
    during = []
    s = tiny_model.session(source=noise(1.0), sink=None, seed=1,
                           on_mic=lambda mic, heard: during.append(gc.get_freeze_count()))
    with s:
        s.wait(timeout=60)
    # Frozen at the start; no freeze during the loop (the count of frozen objects may only fall,
    # as frozen objects are still freed by reference counting); unfrozen at the end.
    assert len(during) == 13 and during[0] > before
    assert all(b <= a for a, b in zip(during, during[1:])), during
    assert gc.get_freeze_count() == before


def test_frozen_heap_nests():
    import gc

    from engine.rt import frozen_heap

    before = gc.get_freeze_count()
    with frozen_heap():
        outer = gc.get_freeze_count()
        assert outer > before
        keep = [[i] for i in range(1000)]       # new objects: not frozen by the inner use
        # Other threads may free frozen objects meanwhile (the count can only fall), but the inner
        # use must neither freeze again (keep's 1000 lists would join) nor unfreeze (0 frozen).
        with frozen_heap():
            assert 0 < gc.get_freeze_count() <= outer
        assert 0 < gc.get_freeze_count() <= outer
    assert gc.get_freeze_count() == before and len(keep) == 1000
