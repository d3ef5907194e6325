"""PersonaPlex public API on the embedded tiny model: respond, respond_stream (sync + async),
respond_diagnostic, respond_realtime, input handling, errors and threading."""
from __future__ import annotations

import asyncio
import resource
import threading
import time

import numpy as np
import pytest

import engine
from engine.errors import AudioFormatError, ConfigError, UnknownVoice

SR = 24000


def speechy(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    env = 0.5 * (1 + np.sin(2 * np.pi * 3 * t))
    return ((np.sign(np.sin(2 * np.pi * 150 * t)) * 0.1 + 0.02 * rng.standard_normal(n)) * env).astype(np.float32)


def test_public_names_importable():
    for name in ("PersonaPlex", "Response", "AudioChunk", "Diagnostics", "DuplexSession", "RingBuffer",
                 "EchoCanceller", "ModelWorker", "EngineError", "UnknownVoice"):
        assert getattr(engine, name) is not None


def test_respond_shapes_and_determinism(tiny_model):
    audio = speechy(1.0)
    r1 = tiny_model.respond(audio, voice="NATF2", max_steps=50, seed=7)
    assert isinstance(r1, engine.Response)
    assert r1.audio.dtype == np.float32 and r1.audio.shape == (50 * 1920,)
    assert r1.sample_rate == 24000 and r1.babble is True
    assert np.all(np.isfinite(r1.audio)) and np.abs(r1.audio).max() > 0
    assert len(r1.text_tokens) == 50
    assert len(set(r1.text_tokens)) > 3          # the random model really samples
    r2 = tiny_model.respond(audio, voice="NATF2", max_steps=50, seed=7)
    np.testing.assert_array_equal(r1.audio, r2.audio)
    assert r1.text_tokens == r2.text_tokens
    r3 = tiny_model.respond(audio, voice="NATF2", max_steps=50, seed=8)
    assert r3.text_tokens != r1.text_tokens


def test_respond_prompt_and_voice_change_output(tiny_model):
    audio = speechy(0.5)
    a = tiny_model.respond(audio, voice="NATF2", max_steps=50, seed=1)
    b = tiny_model.respond(audio, voice="VARM3", max_steps=50, seed=1)
    c = tiny_model.respond(audio, voice="NATF2", system_prompt="You are a pirate.", max_steps=50, seed=1)
    d = tiny_model.respond(audio, voice="NATF2", system_prompt="", max_steps=50, seed=1)  # empty prompt works
    assert not np.array_equal(a.audio, b.audio)
    assert not np.array_equal(a.audio, c.audio)
    assert d.audio.shape == a.audio.shape


def test_input_conversions(tiny_model):
    mono = speechy(0.5)
    pcm16 = (mono * 32767).astype(np.int16)
    r = tiny_model.respond(pcm16, max_steps=50, seed=3)
    assert r.audio.shape == (50 * 1920,)
    stereo48 = np.stack([speechy(0.5, 1), speechy(0.5, 2)], axis=1)
    stereo48 = np.repeat(stereo48, 2, axis=0)           # 48 kHz, 2 channels
    r = tiny_model.respond(stereo48, sample_rate=48000, max_steps=50, seed=3)
    assert "48000" in r.input_info and ("mono" in r.input_info or "downmix" in r.input_info)


@pytest.mark.parametrize("bad", [50 - 1, 501, 75.5, True, "75"])
def test_max_steps_validated(tiny_model, bad):
    with pytest.raises(ConfigError, match="max_steps"):
        tiny_model.respond(speechy(0.2), max_steps=bad)


def test_bad_inputs(tiny_model):
    with pytest.raises(UnknownVoice, match="NATF0"):
        tiny_model.respond(speechy(0.2), voice="NOPE")
    bad = speechy(0.2)
    bad[10] = np.nan
    with pytest.raises(AudioFormatError, match="NaN"):
        tiny_model.respond(bad)
    with pytest.raises(AudioFormatError):
        tiny_model.respond(np.zeros(0, np.float32))


def test_respond_stream_first_chunk_early(tiny_model):
    audio = speechy(0.5)
    t0 = time.perf_counter()
    it = tiny_model.respond_stream(audio, voice="NATM1", max_steps=100, seed=5)
    first = next(it)
    t_first = time.perf_counter() - t0
    rest = list(it)
    t_all = time.perf_counter() - t0
    chunks = [first] + rest
    assert len(chunks) == 100
    assert all(c.samples.shape == (1920,) for c in chunks)
    assert [c.is_final for c in chunks] == [False] * 99 + [True]
    assert t_first < 0.5 * t_all                     # streamed, not produced after the whole turn
    whole = tiny_model.respond(audio, voice="NATM1", max_steps=100, seed=5)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), whole.audio)
    assert "".join(c.text for c in chunks) == whole.text


def test_async_respond_stream(tiny_model):
    async def go():
        out = []
        async for c in tiny_model.arespond_stream(speechy(0.3), max_steps=50, seed=2):
            out.append(c)
        return out

    chunks = asyncio.run(go())
    assert len(chunks) == 50 and chunks[-1].is_final
    whole = tiny_model.respond(speechy(0.3), max_steps=50, seed=2)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), whole.audio)


def test_async_respond_gives_respond_and_keeps_the_event_loop_free(tiny_model):
    """arespond() returns what respond() returns for the same arguments, the event loop keeps
    running meanwhile (a 10 ms ticker is never held up for long), and errors reach the awaiter."""
    audio = speechy(0.5)

    async def go():
        ticks = []
        done = asyncio.Event()

        async def ticker():
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                ticks.append(now)

        task = asyncio.create_task(ticker())
        t0 = time.perf_counter()
        reply = await tiny_model.arespond(audio, voice="NATF1", max_steps=60, seed=8)
        took = time.perf_counter() - t0
        done.set()
        await task
        with pytest.raises(UnknownVoice):
            await tiny_model.arespond(audio, voice="NOBODY")
        return reply, took, ticks

    reply, took, ticks = asyncio.run(go())
    want = tiny_model.respond(audio, voice="NATF1", max_steps=60, seed=8)
    np.testing.assert_array_equal(reply.audio, want.audio)
    assert reply.text == want.text and reply.audio.shape == (60 * 1920,)
    # the loop ran throughout the turn (blocked, it would tick once or not at all); a loose bound,
    # as a loaded machine stretches each 10 ms sleep
    assert len(ticks) >= max(5, 0.2 * took / 0.01), (len(ticks), took)


def test_respond_diagnostic(tiny_model):
    resp, diag = tiny_model.respond_diagnostic(speechy(0.4), max_steps=50, seed=4)
    assert resp.audio.shape == (50 * 1920,)
    assert len(diag.step_timings) == 50
    for stage in ("mimi_encode", "temporal", "depformer", "mimi_decode"):
        assert all(r[stage] > 0 for r in diag.step_timings), stage
    # entropies per generated step (text) and per agent codebook; hidden stats per layer group
    assert len(diag.text_entropy) >= 50 and len(diag.audio_entropy) >= 8 * 50
    assert all(e >= 0 for e in diag.text_entropy) and max(diag.text_entropy) > 0.1
    groups = {h["name"] for h in diag.hidden_stats}
    assert len(groups) >= 2 and all(h["std"] > 0 for h in diag.hidden_stats)
    summary = diag.summary()
    assert summary["steps"] == 50 and summary["step_p50_ms"] > 0
    assert diag.prompt_ms > 0


def test_respond_realtime_block_sizes(tiny_model):
    audio = speechy(2.0)
    blocks = [audio[i:i + 700] for i in range(0, len(audio), 700)]   # odd block size
    out = list(tiny_model.respond_realtime(blocks, seed=9))
    assert len(out) == int(np.ceil(len(audio) / 1920))
    assert all(o.shape == (1920,) and o.dtype == np.float32 for o in out)
    out2 = list(tiny_model.respond_realtime([audio], seed=9))
    np.testing.assert_array_equal(np.concatenate(out), np.concatenate(out2))


def test_many_threads_alternating_calls(tiny_model):
    """100 alternating respond / respond_stream calls from 4 threads: no crash, no leak."""
    audio = speechy(0.16)
    errors: list[BaseException] = []
    results: list[int] = []
    lock = threading.Lock()

    def worker(tid: int):
        try:
            for i in range(25):
                if (i + tid) % 2:
                    r = tiny_model.respond(audio, max_steps=50, seed=i)
                    n = len(r.audio)
                else:
                    n = sum(len(c.samples) for c in tiny_model.respond_stream(audio, max_steps=50, seed=i))
                with lock:
                    results.append(n)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    tiny_model.respond(audio, max_steps=50, seed=0)      # warm-up before measuring memory
    prompted = len(tiny_model.prompts)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert not errors, errors[0]
    assert results == [50 * 1920] * 100
    assert (rss1 - rss0) / 1024 < 200, f"peak RSS grew by {(rss1 - rss0) / 1024:.0f} MB"
    assert len(tiny_model.prompts) == prompted        # one prompted state serves every call
