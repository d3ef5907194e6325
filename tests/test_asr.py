"""The optional transcript of the user (engine.asr): utterance cutting, the recognizer process on a
random Qwen3-ASR-format model built locally (engine.tiny_asr), session events, Response.user_text,
and the errors. The tiny recognizer's text is nonsense: these tests check the plumbing."""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

import engine  # noqa: F401
from engine import asr
from engine.errors import CorruptCheckpoint, EngineError, MissingLibraryError, ModelNotFound

from .audio._signals import SR, speechlike

pytest.importorskip("webrtcvad", reason="webrtcvad not installed: pip install webrtcvad-wheels")
needs_backend = pytest.mark.skipif(
    __import__("importlib").util.find_spec("mlx_qwen3_asr") is None,
    reason='the asr extra is not installed: pip install -e ".[asr]"')

FAST = dict(max_new_tokens=12)     # the random model never says end-of-text: keep its answers short


def conversation(*parts) -> np.ndarray:
    """("s", seconds, seed) speech / ("q", seconds) silence, with a faint noise floor."""
    xs = [speechlike(int(p[1] * SR), p[2]) if p[0] == "s" else np.zeros(int(p[1] * SR), np.float32)
          for p in parts]
    x = np.concatenate(xs).astype(np.float32)
    return x + np.random.default_rng(7).standard_normal(x.size).astype(np.float32) * 1e-4


def cut(x, block=1920, **kw):
    c = asr.UtteranceCutter(**kw)
    out = []
    for i in range(0, x.size, block):
        out += c.feed(x[i:i + block])
    return out + c.flush(), c


# ----------------------------------------------------------------------------------------------
# Utterances
def test_utterances_are_cut_where_the_vad_says():
    from engine.audio.vad import Endpointer

    x = conversation(("q", 0.5), ("s", 2.0, 1), ("q", 2.0), ("s", 1.0, 2), ("q", 1.5))
    utts, c = cut(x)
    ep = Endpointer(silence_ms=800)
    events = []
    for i in range(0, x.size, 1920):
        events += ep.feed(x[i:i + 1920])
    assert [e.kind for e in events] == ["start", "end", "start", "end"]
    assert len(utts) == 2 and c.utterances == 2 and c.cuts == 0
    for u, (s, e) in zip(utts, [(events[0], events[1]), (events[2], events[3])]):
        assert u.start == s.sample - c.pre_roll
        assert u.end == e.sample - c.silence + c.tail
        np.testing.assert_array_equal(u.audio, x[u.start:u.end])
    # the speech is inside, the long silences are not
    assert utts[0].start_s < 0.5 < 2.5 < utts[0].end_s < 3.0
    assert 2.5 < utts[1].start_s < 4.5 < 5.5 < utts[1].end_s < 6.0
    # block size does not matter
    utts2, _ = cut(x, block=480)
    assert [(u.start, u.end) for u in utts2] == [(u.start, u.end) for u in utts]


def test_long_speech_is_cut_and_counted_and_idle_memory_is_bounded():
    x = conversation(("q", 0.3), ("s", 5.0, 3), ("q", 2.0))
    utts, c = cut(x, max_seconds=2.2)
    assert [u.cut for u in utts] == [True, True, False] and c.cuts == 2
    assert all(a.end == b.start for a, b in zip(utts, utts[1:]))        # contiguous, nothing lost
    np.testing.assert_array_equal(np.concatenate([u.audio for u in utts]), x[utts[0].start:utts[-1].end])
    silent, c = cut(np.zeros(20 * SR, np.float32))
    assert silent == [] and c._buffered <= c.keep_idle + 1920


def test_flush_returns_the_utterance_in_progress():
    x = conversation(("q", 0.3), ("s", 1.5, 4))          # the stream ends while the user speaks
    utts, c = cut(x)
    assert len(utts) == 1 and utts[0].end == x.size and not utts[0].cut


# ----------------------------------------------------------------------------------------------
# Files and errors
def test_tiny_recognizer_has_the_released_layout():
    from engine.tiny_asr import SPECIAL_TOKENS, ensure_tiny_asr

    d = ensure_tiny_asr()
    assert asr.resolve_asr_model("tiny") == d
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_asr" and cfg["thinker_config"]["audio_token_id"] == 151676
    from engine.hub import check_safetensors
    keys = check_safetensors(d / "model.safetensors")
    assert "thinker.audio_tower.conv2d1.weight" in keys and "thinker.model.embed_tokens.weight" in keys
    assert keys["thinker.audio_tower.conv2d1.weight"]["shape"] == [8, 1, 3, 3]     # PyTorch layout
    assert keys["thinker.model.embed_tokens.weight"]["shape"][0] == 151936
    added = json.loads((d / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {int(k): v["content"] for k, v in added.items()} == SPECIAL_TOKENS
    assert ensure_tiny_asr() == d          # built once


def test_missing_extra_names_the_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlx_qwen3_asr" else real(n, *a))
    with pytest.raises(MissingLibraryError, match=r'pip install -e "\.\[asr\]"'):
        asr.Recognizer("tiny")


def test_missing_model_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFound, match="neither a local directory"):
        asr.resolve_asr_model("not a model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="lacks vocab.json, merges.txt, model.safetensors"):
        asr.resolve_asr_model(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE"):
        asr.resolve_asr_model("Qwen/Qwen3-ASR-0.6B", offline=True, progress=False)


def test_truncated_weights_are_refused(tmp_path):
    import shutil

    from engine.tiny_asr import ensure_tiny_asr
    d = tmp_path / "asr"
    shutil.copytree(ensure_tiny_asr(), d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        asr.resolve_asr_model(d)


@needs_backend
def test_load_failure_in_the_process_is_raised(tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from engine.tiny_asr import ensure_tiny_asr
    d = tmp_path / "asr"
    shutil.copytree(ensure_tiny_asr(), d)
    sd = load_file(str(d / "model.safetensors"))
    del sd["thinker.model.norm.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(EngineError, match="could not load .*norm"):
        asr.Recognizer(d)


@needs_backend
def test_cpu_backend_runs_in_float32_with_one_embedding():
    """The checkpoint is half precision; MLX's CPU backend has no fast half matmuls."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from engine.tiny_asr import ensure_tiny_asr
    session = asr.load_backend(str(ensure_tiny_asr()))
    params = tree_flatten(session.model.parameters())
    assert {str(v.dtype) for _, v in params if mx.issubdtype(v.dtype, mx.floating)} == {"mlx.core.float32"}
    assert session.model.lm_head.weight is session.model.model.embed_tokens.weight


# ----------------------------------------------------------------------------------------------
# The recognizer process
@pytest.fixture(scope="module")
def recognizer():
    if __import__("importlib").util.find_spec("mlx_qwen3_asr") is None:
        pytest.skip('the asr extra is not installed: pip install -e ".[asr]"')
    rec = asr.Recognizer("tiny", **FAST)
    yield rec
    rec.close()


def test_recognizer_answers_in_order_and_deterministically(recognizer):
    a, b = speechlike(SR, 1), speechlike(2 * SR, 2)
    jobs = [recognizer.submit(a, index=0), recognizer.submit(b, index=1), recognizer.submit(a, index=2)]
    got = [recognizer.result(j, timeout=60) for j in jobs]
    assert [t.index for t in got] == [0, 1, 2] and all(t.error is None for t in got)
    assert all(isinstance(t.text, str) and t.text for t in got)
    assert got[0].text == got[2].text                          # same audio, same (nonsense) text
    assert got[1].end_s == pytest.approx(2.0) and got[0].recognize_s > 0
    assert recognizer.transcribe(a) == got[0].text
    assert recognizer.pending == 0 and recognizer.completed >= 4


def test_ctrl_c_in_the_terminal_does_not_end_the_recognizer(recognizer):
    os.kill(recognizer._proc.pid, signal.SIGINT)         # what a Ctrl-C sends the process group
    assert recognizer.transcribe(speechlike(SR, 3))
    assert recognizer.alive


def test_a_dead_recognizer_loses_jobs_with_an_error_and_drops_new_ones():
    pytest.importorskip("mlx_qwen3_asr")
    rec = asr.Recognizer("tiny", **FAST)
    try:
        job = rec.submit(speechlike(SR, 1))
        os.kill(rec._proc.pid, signal.SIGKILL)
        rec._proc.wait(10)
        t = rec.result(job, timeout=5)
        assert t is not None and t.index == 0
        if t.error is not None:                  # (it may have answered before it died)
            assert "exited" in t.error and rec.failed == 1
        assert rec.submit(speechlike(SR, 2)) is None and rec.dropped == 1
    finally:
        rec.close()


# ----------------------------------------------------------------------------------------------
# Sessions and respond()
def test_session_emits_user_text_per_utterance_in_order(tiny_model, recognizer):
    x = conversation(("q", 0.5), ("s", 1.5, 1), ("q", 1.5), ("s", 1.0, 2), ("q", 1.2), ("s", 1.2, 3), ("q", 1.0))
    expected, _ = cut(x)
    assert len(expected) == 3
    s = tiny_model.session(source=x, sink=None, realtime=False, asr=recognizer, seed=1)
    s.start()
    events = list(s.events())
    s.wait(60)
    user = [e for e in events if e.kind == "user_text"]
    assert [e.value for e in user] == [t.text for t in s.user_transcript]
    assert [(t.index, t.start_s, t.end_s) for t in s.user_transcript] == \
        [(u.index, u.start_s, u.end_s) for u in expected]
    for ev, u in zip(user, expected):          # never before the utterance ended
        assert ev.frame * 1920 >= u.end
    assert [e.frame for e in user] == sorted(e.frame for e in user)
    kinds = [e.kind for e in events]
    assert kinds.index("state") < kinds.index("user_text") < len(kinds) - 1 and events[-1].value == "stopped"
    st = s.stats()
    assert (st.user_utterances, st.asr_dropped, st.asr_failed) == (3, 0, 0)
    assert recognizer.alive                    # the session does not close a recognizer it was given


def test_a_stalled_recognizer_never_stops_the_live_loop(tiny_model):
    """Live (real-time) sources never wait for recognition: with the recognizer process frozen,
    the loop runs every frame, drops what does not fit into max_pending, and counts it."""
    pytest.importorskip("mlx_qwen3_asr")
    rec = asr.Recognizer("tiny", max_pending=1, **FAST)
    try:
        x = conversation(("q", 0.3), ("s", 0.8, 1), ("q", 1.0), ("s", 0.8, 2), ("q", 1.0), ("s", 0.8, 3), ("q", 1.0))
        os.kill(rec._proc.pid, signal.SIGSTOP)
        s = tiny_model.session(source=x, sink=None, realtime=True, asr=rec, asr_drain_s=0.5, seed=1)
        t0 = time.monotonic()
        s.start()
        s.wait(120)
        took = time.monotonic() - t0
        st = s.stats()
        assert st.frames == -(-x.size // 1920)
        assert (st.user_utterances, st.asr_dropped, st.asr_failed) == (3, 2, 1)
        assert s.user_transcript == []
        assert took < x.size / SR + 30          # a loop waiting on the frozen process never ends
        os.kill(rec._proc.pid, signal.SIGCONT)
        assert rec.wait_idle(60)
        assert rec.pending == 0 and rec._done == {}     # the late transcript was dropped, not kept
    finally:
        os.kill(rec._proc.pid, signal.SIGCONT)
        rec.close()


def test_respond_fills_user_text(tiny_model, recognizer):
    x = conversation(("q", 0.2), ("s", 1.0, 5), ("q", 0.3))
    assert tiny_model.respond(x, max_steps=50, seed=1).user_text is None
    tiny_model.asr = recognizer
    try:
        r = tiny_model.respond(x, max_steps=50, seed=1)
        d, _ = tiny_model.respond_diagnostic(x, max_steps=50, seed=1)
    finally:
        tiny_model.asr = None
    assert r.user_text == recognizer.transcribe(x) and r.user_text
    assert d.user_text == r.user_text


# ----------------------------------------------------------------------------------------------
# Command lines
def run_cli(*args, timeout=300):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", *args], cwd=root, capture_output=True, text=True, timeout=timeout)


@needs_backend
def test_duplex_cli_shows_you_lines_per_utterance(tmp_path):
    import re
    r = run_cli("engine.duplex", "--in-wav", "examples/hello.wav", "--out-wav", str(tmp_path / "r.wav"), "--fast",
                "--asr", "tiny")
    assert r.returncode == 0, r.stderr
    m = re.search(r"user transcript: (\d+) utterances, (\d+) transcribed, 0 dropped .*, 0 failed", r.stderr)
    assert m and int(m.group(1)) == int(m.group(2)) >= 1
    you = [ln for ln in r.stdout.splitlines() if ln.startswith("  you: ")]
    assert len(you) == int(m.group(1)) and all(len(ln) > len("  you: ") for ln in you)
    assert all(ln.startswith(("agent: ", "  you: ", "-- ")) for ln in r.stdout.splitlines())


@needs_backend
def test_respond_cli_prints_what_the_user_said():
    r = run_cli("engine.respond", "examples/hello.wav", "--asr", "tiny", "--max-steps", "50")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("you: ") and len(first) > len("you: ")


def test_cli_asr_model_missing_is_clear(tmp_path):
    r = run_cli("engine.respond", "examples/hello.wav", "--asr", str(tmp_path), "--max-steps", "50")
    assert r.returncode == 2
    assert "error:" in r.stderr and ("lacks config.json" in r.stderr or 'pip install -e ".[asr]"' in r.stderr)


# ----------------------------------------------------------------------------------------------
# The server (engine.serve --asr): metadata messages for the clients that ask
def test_query_asks_for_user_text():
    from engine.server import protocol as P
    assert P.parse_query({}).user_text is False
    assert P.parse_query({"user_text": "1"}).user_text is True
    assert P.parse_query({"user_text": "0"}).user_text is False


def test_server_sends_user_text_only_to_clients_that_ask(tiny_model, recognizer):
    pytest.importorskip("uvicorn", reason="pip install 'personaplex-engine[serve]'")
    import asyncio

    from engine.server.app import ServerConfig, start
    from engine.server.client import run_client

    x = conversation(("q", 0.4), ("s", 1.2, 1), ("q", 1.3), ("s", 1.0, 2), ("q", 3.0))   # 2 s to spare at the end
    expected, _ = cut(x)
    q = {"voice_prompt": "NATF0.pt", "seed": "1"}

    async def main():
        tiny_model.asr = recognizer
        try:
            runner, server, port = await start(tiny_model, "127.0.0.1", 0, ServerConfig(compiled=False))
        finally:
            tiny_model.asr = None
        try:
            url = f"ws://127.0.0.1:{port}"
            asked, plain = await asyncio.gather(run_client(url, x, {**q, "user_text": "1"}), run_client(url, x, q))
            return asked, plain, server.metrics
        finally:
            await runner.cleanup()

    asked, plain, m = asyncio.run(main())
    assert asked["error"] is None and plain["error"] is None
    assert plain["user_text"] == [] and plain["text"]           # the agent's text as before, nothing more
    got = asked["user_text"]
    assert len(got) == len(expected) == 2 and m.asr_utterances == 2 and m.asr_dropped == m.asr_failed == 0
    assert all(g["user_text"] for g in got)
    for g, u in zip(got, expected):     # the same VAD boundaries, within the Opus round trip's shift
        assert abs(g["start_s"] - u.start_s) < 0.15 and abs(g["end_s"] - u.end_s) < 0.15
